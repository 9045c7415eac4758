//! Fidelity of the simulator against the live system.
//!
//! One small scenario runs twice: through the simulator (`tokenfab-sim`, virtual clock)
//! and through the live system as real processes on loopback (one control plane, two
//! agents, two engine emulators running the performance model at 5x time). Three batches
//! arrive at the same (emulated) times in both; the test compares total throughput and
//! each batch's completion time, which must agree within 5%, and prints the differences.
//!
//! The engine emulators stand in for GPUs (none can run on the CI machine); they run the
//! same `EngineModel` the simulator uses, so what this test checks is that the simulated
//! control plane, agents, leasing and timing reproduce the live ones.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;

const TENANT: &str = "planner-token";
const AGENT: &str = "agent-secret-of-the-tests";
/// Emulated seconds per wall second in the live run.
const SCALE: f64 = 5.0;
/// Batch `k` arrives at `ARRIVE_S[k]` emulated seconds.
const ARRIVE_S: [f64; 3] = [10.0, 50.0, 90.0];
const PER_BATCH: usize = 600;
const WINDOW: u32 = 64;

/// Request `i` of batch `k`: (prompt tokens, output tokens), spread deterministically.
fn shape(k: usize, i: usize) -> (u32, u32) {
    let h = (k * 7919 + i * 104_729) as u32;
    (64 + h % 700, 32 + (h / 7) % 224)
}

/// A chat request the emulator counts as exactly `prompt` prompt tokens (2 + 4 per
/// message + ceil(bytes / 4)) with exactly `output` output tokens.
fn line(k: usize, i: usize) -> String {
    let (prompt, output) = shape(k, i);
    let content = "a".repeat(4 * (prompt as usize - 6));
    format!(
        r#"{{"custom_id":"b{k}-{i:04}","method":"POST","url":"/v1/chat/completions","body":{{"model":"llama-3.1-8b","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":{output}}}}}"#
    )
}

struct Outcome {
    /// Per batch: emulated seconds from arrival to completion.
    completion_s: Vec<f64>,
    /// Output tokens / emulated seconds from the first arrival to the last completion.
    throughput: f64,
}

fn simulate(dir: &std::path::Path) -> Outcome {
    // The trace puts batch k's requests at t = ARRIVE_S[k] - 10 s; grouping by 10 s makes
    // each one batch arriving at the end of its 10 s window, i.e. at ARRIVE_S[k].
    let mut trace = String::new();
    for (k, at) in ARRIVE_S.iter().enumerate() {
        for i in 0..PER_BATCH {
            let (p, o) = shape(k, i);
            trace.push_str(&format!(
                "{{\"t_s\": {}, \"prompt_tokens\": {p}, \"output_tokens\": {o}}}\n",
                at - 10.0
            ));
        }
    }
    std::fs::write(dir.join("trace.jsonl"), trace).unwrap();
    let yaml = format!(
        r#"
name: fidelity
description: two H100s, one llama-3.1-8b replica each, three batches
duration: 100s
pools:
  - {{name: h100, accelerator: h100-sxm, nodes: 2, devices_per_node: 1}}
deployments:
  - {{pool: h100, model: llama-3.1-8b, window: {WINDOW}}}
workload:
  tenants:
    - name: planner
      model: llama-3.1-8b
      arrivals: {{kind: trace, file: trace.jsonl, format: jsonl, batch_every: 10s}}
      completion_window: 1h
# The live agents' wall-clock timings (20 ms report delay, 100 ms after an empty lease,
# ~0.4 ms per control-plane call on loopback) last SCALE times longer in emulated time.
policies: {{window: {WINDOW}, report_delay: 100ms, empty_lease_backoff: 500ms}}
network: {{control_rtt: 2ms}}
"#
    );
    let scenario = tokenfab_sim::Scenario::parse(&yaml, "fidelity.yaml").unwrap();
    let report = tokenfab_sim::run(&scenario, dir, 1, |_| {}).unwrap();
    assert_eq!(report.batch_records.len(), ARRIVE_S.len(), "one batch per arrival");
    let mut completion_s = Vec::new();
    for (b, at) in report.batch_records.iter().zip(ARRIVE_S) {
        assert!(
            (b.arrived.as_secs_f64() - at).abs() < 1e-9,
            "batch arrived at {}",
            b.arrived
        );
        assert_eq!(b.completed, PER_BATCH as u32);
        completion_s.push(b.ended.as_secs_f64() - at);
    }
    let last = report
        .batch_records
        .iter()
        .map(|b| b.ended.as_secs_f64())
        .fold(0.0, f64::max);
    Outcome {
        completion_s,
        throughput: report.requests.completion_tokens as f64 / (last - ARRIVE_S[0]),
    }
}

/// Submits a llama-3.1-8b batch with the server's default options; returns its id.
async fn submit(addr: SocketAddr, input: Vec<u8>, what: &str) -> String {
    let mut client = tenant_client(addr, TENANT).await;
    client
        .create_batch(pb::CreateBatchRequest {
            input_jsonl: input.into(),
            options: Some(pb::BatchOptions {
                model: "llama-3.1-8b".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("submitting {what}: {e}"))
        .into_inner()
        .batch
        .unwrap_or_else(|| panic!("no batch in the answer to {what}"))
        .id
}

/// Polls until batch `id` has completed; panics with the process logs otherwise.
async fn wait_done(addr: SocketAddr, id: &str, procs: &[Proc]) -> pb::Batch {
    wait_completed(addr, TENANT, id, Duration::from_secs(120), procs).await
}

async fn live(dir: &std::path::Path) -> Outcome {
    let (server, addr) = start_server(
        dir,
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--tenant",
            &format!("planner={TENANT}"),
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let control = format!("http://{addr}");
    let mut procs = vec![server];
    for n in 0..2 {
        let (emu, url) = spawn_emu(dir, &format!("emu{n}"), SCALE);
        procs.push(emu);
        procs.push(spawn_agent(dir, &format!("node{n}"), &control, &url, WINDOW, AGENT));
    }
    // Both agents registered: the first batch meets a ready cluster, as in the simulator.
    wait_registered(&procs, Duration::from_secs(30)).await;

    // Warm up: a small batch opens the agents' engine connections and the control plane's
    // store before time zero (a long-running cluster has done so long ago).
    let warm: Vec<u8> = (0..2 * WINDOW as usize)
        .map(|i| chat_line(&format!("warm-{i}"), 4))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    let warm = submit(addr, warm, "the warm-up batch").await;
    wait_done(addr, &warm, &procs).await;
    let mut ids = Vec::new();
    // Time zero is now; batch k is submitted at ARRIVE_S[k] / SCALE wall seconds.
    let start = Instant::now() + Duration::from_millis(200);
    for (k, at) in ARRIVE_S.iter().enumerate() {
        tokio::time::sleep_until((start + Duration::from_secs_f64(at / SCALE)).into()).await;
        let content: Vec<u8> = (0..PER_BATCH)
            .map(|i| line(k, i))
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes();
        ids.push(submit(addr, content, &format!("batch {k}")).await);
    }
    let mut done = Vec::new();
    for id in &ids {
        let b = wait_done(addr, id, &procs).await;
        assert_eq!(counts(&b).completed, PER_BATCH as u32);
        done.push(b);
    }
    let emulated = |ms: i64| ms as f64 / 1000.0 * SCALE;
    let completion_s: Vec<f64> = done
        .iter()
        .map(|b| emulated(b.completed_at_unix_ms - b.created_at_unix_ms))
        .collect();
    let first = done[0].created_at_unix_ms;
    let last = done.iter().map(|b| b.completed_at_unix_ms).max().unwrap();
    let tokens: u64 = done.iter().map(|b| b.usage.unwrap_or_default().completion_tokens).sum();
    Outcome {
        completion_s,
        throughput: tokens as f64 / emulated(last - first),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_and_live_system_agree_within_five_percent() {
    let dir = tempfile::tempdir().unwrap();
    let sim = simulate(dir.path());
    let live = live(dir.path()).await;
    let diff = |s: f64, l: f64| (l - s) / s;
    let mut report = vec![format!(
        "throughput: simulated {:.0} tok/s, live {:.0} tok/s ({:+.2}%)",
        sim.throughput,
        live.throughput,
        100.0 * diff(sim.throughput, live.throughput)
    )];
    for (k, (s, l)) in sim.completion_s.iter().zip(&live.completion_s).enumerate() {
        report.push(format!(
            "batch {k} completion: simulated {s:.2} s, live {l:.2} s ({:+.2}%)",
            100.0 * diff(*s, *l)
        ));
    }
    let report = report.join("\n");
    println!("{report}");
    assert!(diff(sim.throughput, live.throughput).abs() < 0.05, "{report}");
    for (s, l) in sim.completion_s.iter().zip(&live.completion_s) {
        assert!(diff(*s, *l).abs() < 0.05, "{report}");
    }
}
