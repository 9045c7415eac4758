//! End to end, with real processes on loopback: one control plane, two agents, two engine
//! emulators. A batch with malformed lines completes with exactly one result per valid
//! request; an agent killed with SIGKILL mid-batch has its leases expire and re-leased;
//! the control plane killed with SIGKILL mid-batch and restarted on the same data
//! directory loses no accepted batch and no recorded result. The control plane runs with
//! the flight recorder on, and both of its runs (before and after the SIGKILL) replay
//! through fresh cores to the same replies and actions (`tokenfab sim replay`); a core that
//! decides differently makes the replay report where. Metrics scrapes and `GET
//! /v1/tuning` and `/v1/sla` calls at irregular moments during the run change no decision:
//! the replay, which does not see them, matches what the live cores did.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;

const TENANT: &str = "acme-token";
const AGENT: &str = "agent-secret-of-the-tests";

fn start_server(dir: &std::path::Path, data: &str, port: u16, metrics_port: u16, name: &str) -> Proc {
    Proc::spawn(
        name,
        dir,
        &[
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--data-dir",
            data,
            "--tenant",
            &format!("acme={TENANT}"),
            "--lease-ttl",
            "2s",
            "--heartbeat-interval",
            "250ms",
            "--record",
            &dir.join("recording").to_string_lossy(),
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    )
}

async fn get(addr: SocketAddr, id: &str) -> pb::Batch {
    let mut c = tenant_client(addr, TENANT).await;
    c.get_batch(pb::GetBatchRequest { batch_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Polls until `done(batch)` or panics after `within`, printing the process logs.
async fn wait_for(
    addr: SocketAddr,
    id: &str,
    within: Duration,
    procs: &[&Proc],
    done: impl Fn(&pb::Batch) -> bool,
) -> pb::Batch {
    let deadline = Instant::now() + within;
    loop {
        let mut c = tenant_client(addr, TENANT).await;
        if let Ok(b) = c.get_batch(pb::GetBatchRequest { batch_id: id.into() }).await {
            let b = b.into_inner();
            if done(&b) {
                return b;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = procs.iter().map(|p| format!("--- {}\n{}", p.name, p.log())).collect();
                panic!(
                    "batch not there after {within:?}: {:?}\n{}",
                    b.request_counts,
                    logs.join("\n")
                );
            }
        } else if Instant::now() > deadline {
            panic!("control plane unreachable for {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_survives_malformed_lines_a_killed_agent_and_a_killed_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let control = format!("http://{addr}");

    let metrics_port = free_port();
    let mut server = start_server(dir.path(), data, port, metrics_port, "server");
    wait_tcp(addr, Duration::from_secs(20), &mut [&mut server]);

    // Two engine emulators at 4x time, one per agent.
    let mut emus = Vec::new();
    let mut emu_urls = Vec::new();
    for i in 0..2 {
        let p = free_port();
        let mut e = Proc::spawn(
            &format!("emu{i}"),
            dir.path(),
            &["engine-emu", "--listen", &format!("127.0.0.1:{p}"), "--time-scale", "4"],
            &[],
        );
        wait_tcp(
            format!("127.0.0.1:{p}").parse().unwrap(),
            Duration::from_secs(20),
            &mut [&mut e],
        );
        emus.push(e);
        emu_urls.push(format!("http://127.0.0.1:{p}"));
    }
    let agent = |i: usize| {
        Proc::spawn(
            &format!("agent{i}"),
            dir.path(),
            &[
                "agent",
                "--control",
                &control,
                "--node",
                &format!("node{i}"),
                "--replica",
                &format!("url={},model=llama-3.1-8b,window=32", emu_urls[i]),
                "--record",
                &dir.path().join("recording").to_string_lossy(),
            ],
            &[("TOKENFAB_AGENT_TOKEN", AGENT)],
        )
    };
    let mut agent0 = agent(0);
    let mut agent1 = agent(1);

    // Reads at irregular moments all through the run (Prometheus scrapes, `GET /v1/tuning`
    // and `/v1/sla`): the live cores serve them while deciding, the replay below feeds the
    // recorded inputs only, so a read that changed a decision would make it diverge.
    let reading = Arc::new(AtomicBool::new(true));
    // One reader per endpoint, so that a view that waits for the next refresh (up to a
    // second) does not hold back the scrapes.
    let readers: Vec<_> = ["/metrics", "/v1/tuning", "/v1/sla"]
        .into_iter()
        .enumerate()
        .map(|(i, path)| {
            let reading = reading.clone();
            let url = format!("http://127.0.0.1:{metrics_port}{path}");
            tokio::spawn(async move {
                let (mut reads, mut seed) = (0u32, 0x9e37_79b9_7f4a_7c15u64 ^ i as u64);
                while reading.load(Ordering::Relaxed) {
                    if let Ok(r) = reqwest::get(&url).await
                        && r.status().is_success()
                        && r.bytes().await.is_ok()
                    {
                        reads += 1;
                    }
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    tokio::time::sleep(Duration::from_millis((seed >> 40) % 100)).await;
                }
                (path, reads)
            })
        })
        .collect();

    // 1,500 valid requests and three malformed lines.
    let mut lines: Vec<String> = (0..1500).map(|i| chat_line(&format!("req-{i:04}"), 48)).collect();
    lines.insert(4, "{this is not json".into());
    lines.insert(
        99,
        r#"{"method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}]}}"#.into(),
    );
    lines.insert(776, chat_line("req-0003", 48));
    let input = dir.path().join("batch.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let env = [("TOKENFAB_CONTROL", control.as_str()), ("TOKENFAB_TOKEN", TENANT)];
    let out = run_cli(&["submit", input.to_str().unwrap(), "--model", "llama-3.1-8b"], &env);
    let id = out.split_whitespace().next().unwrap().to_string();
    assert!(id.starts_with("batch_"), "{out}");
    assert!(out.contains("1500 requests (3 invalid lines)"), "{out}");
    assert!(out.contains("line 5: not valid JSON"), "{out}");

    // Kill one agent mid-batch.
    let procs = [&server];
    wait_for(addr, &id, Duration::from_secs(60), &procs, |b| {
        counts(b).completed >= 150
    })
    .await;
    agent0.kill9();

    // A second, small batch accepted before the control plane dies.
    let small = dir.path().join("small.jsonl");
    std::fs::write(
        &small,
        (0..20)
            .map(|i| chat_line(&format!("s{i}"), 8))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let out = run_cli(&["submit", small.to_str().unwrap(), "--model", "llama-3.1-8b"], &env);
    let small_id = out.split_whitespace().next().unwrap().to_string();

    // The dead agent's leases expire (lease TTL 2 s) and its work is leased again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let expired = fetch_metric(
            &format!("http://127.0.0.1:{metrics_port}/metrics"),
            "tokenfab_control_leases_expired_total",
        )
        .await;
        if expired >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lease of the killed agent expired:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill the control plane mid-batch; remember what was recorded.
    let before = wait_for(addr, &id, Duration::from_secs(60), &procs, |b| {
        counts(b).completed >= 500
    })
    .await;
    server.kill9();
    let recorded_before = counts(&before).completed;
    assert!(
        recorded_before < 1500,
        "the batch must still be running when the control plane dies"
    );
    let mut server = start_server(dir.path(), data, port, metrics_port, "server-restarted");
    wait_tcp(addr, Duration::from_secs(20), &mut [&mut server]);
    let after = get(addr, &id).await;
    assert!(
        counts(&after).completed >= recorded_before,
        "recorded results lost across the restart: {} before, {} after",
        recorded_before,
        counts(&after).completed
    );
    let small_after = get(addr, &small_id).await;
    assert_eq!(
        counts(&small_after).total,
        20,
        "the accepted batch survived the restart"
    );

    // The surviving agent finishes both batches.
    let procs = [&server, &agent1];
    let done = wait_for(addr, &id, Duration::from_secs(120), &procs, is_final).await;
    assert_eq!(done.status, pb::BatchStatus::Completed as i32);
    let c = counts(&done);
    assert_eq!((c.total, c.completed, c.failed, c.invalid), (1503, 1500, 0, 3));
    assert_eq!(
        done.usage.unwrap().completion_tokens,
        1500 * 48,
        "usage adds up to exactly what was asked"
    );
    wait_for(addr, &small_id, Duration::from_secs(60), &procs, is_final).await;

    // Exactly one result per valid request.
    let mut c = tenant_client(addr, TENANT).await;
    let mut s = c
        .stream_results(pb::StreamResultsRequest {
            batch_id: id.clone(),
            kind: pb::ResultKind::Output as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(r) = s.message().await.unwrap() {
        let Some(pb::result_record::Outcome::Response(resp)) = &r.outcome else {
            panic!("output without response: {r:?}")
        };
        assert_eq!(resp.status_code, 200);
        let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(body["usage"]["completion_tokens"], 48);
        ids.push(r.custom_id);
    }
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 1500, "one result per valid request");
    assert_eq!(unique.len(), 1500, "no duplicated result");
    let expected: BTreeSet<String> = (0..1500).map(|i| format!("req-{i:04}")).collect();
    assert_eq!(unique.into_iter().cloned().collect::<BTreeSet<_>>(), expected);

    // Malformed lines are in the error output with their line numbers.
    let mut s = c
        .stream_results(pb::StreamResultsRequest {
            batch_id: id.clone(),
            kind: pb::ResultKind::Errors as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut errors = Vec::new();
    while let Some(r) = s.message().await.unwrap() {
        let Some(pb::result_record::Outcome::Error(e)) = r.outcome else {
            panic!("{r:?}")
        };
        errors.push((r.line, e.code));
    }
    assert_eq!(
        errors,
        [
            (5, "invalid_json".to_string()),
            (100, "missing_custom_id".to_string()),
            (777, "duplicate_custom_id".to_string())
        ]
    );

    // The CLI downloads the same, in the OpenAI Batch output format.
    let out_file = dir.path().join("out.jsonl");
    let err_file = dir.path().join("err.jsonl");
    run_cli(
        &[
            "results",
            &id,
            "-o",
            out_file.to_str().unwrap(),
            "--errors",
            err_file.to_str().unwrap(),
        ],
        &env,
    );
    let out = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(out.lines().count(), 1500);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["response"]["status_code"], 200);
    assert_eq!(std::fs::read_to_string(&err_file).unwrap().lines().count(), 3);

    // The flight recording replays: the control plane's run killed with SIGKILL (up to its
    // last complete line) and its restarted one, the agent killed with SIGKILL and the one
    // that lived, each through a fresh core, to identical replies and actions.
    reading.store(false, Ordering::Relaxed);
    let mut reads = Vec::new();
    for r in readers {
        reads.push(r.await.unwrap());
    }
    assert!(
        reads.iter().all(|(_, n)| *n >= 3) && reads.iter().map(|(_, n)| n).sum::<u32>() >= 30,
        "too few reads answered during the run: {reads:?}"
    );
    eprintln!("reads answered during the run: {reads:?}");
    server.terminate(Duration::from_secs(10));
    agent1.terminate(Duration::from_secs(10));
    let recording = dir.path().join("recording");
    let replay = std::process::Command::new(bin())
        .args(["sim", "replay", recording.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&replay.stdout).to_string();
    assert!(
        replay.status.success() && out.contains("every run replays to identical replies and actions"),
        "{out}\n{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let mut segments: Vec<_> = std::fs::read_dir(&recording)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let named = |prefix: &str| -> Vec<std::path::PathBuf> {
        segments
            .iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .cloned()
            .collect()
    };
    let control_runs = named("control-");
    assert_eq!(
        control_runs.len(),
        2,
        "one recorded run per start of the control plane: {segments:?}"
    );
    assert_eq!(
        named("agent-node0-").len(),
        1,
        "the agent killed with SIGKILL: {segments:?}"
    );
    assert_eq!(named("agent-node1-").len(), 1, "{segments:?}");
    assert!(out.contains("agent node0") && out.contains("agent node1"), "{out}");
    // "4 run(s), N inputs replayed in S s"
    let inputs: u64 = out
        .lines()
        .find(|l| l.contains(" inputs replayed"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        inputs > 100,
        "the runs' registrations, submissions, leases, reports and heartbeats: {out}"
    );

    // A changed decision: the control plane's first run replayed by a core whose leases live 7 s instead
    // of 2 s (leases of the killed agent expire later) diverges, and the replay says where.
    let text = std::fs::read_to_string(&control_runs[0]).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let mut start: serde_json::Value = serde_json::from_str(first).unwrap();
    start["start"]["config"]["lease_ttl"] = serde_json::json!({"secs": 7, "nanos": 0});
    std::fs::write(&control_runs[0], format!("{start}\n{rest}")).unwrap();
    let replay = std::process::Command::new(bin())
        .args(["sim", "replay", recording.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert!(!replay.status.success(), "a divergence fails the replay: {stdout}");
    assert!(
        stdout.contains("DIVERGES at line") && stdout.contains("recorded: ["),
        "{stdout}"
    );
    drop(emus);
}
