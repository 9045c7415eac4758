//! Safe to share (issue 11), end to end with real processes on loopback: what one tenant
//! or one node could do to the others, each of which the earlier control plane let
//! happen.
//!
//! - A batch of 1 MB lines at window 256 completes (all bodies of a lease went into one
//!   reply over the 256 MiB gRPC limit, and every request ended `retries_exhausted`).
//! - A node cannot record a result for work not leased to it (a forged result reached
//!   another tenant's download), nor register as another node (which dropped that
//!   node's leases).
//! - On a small filesystem the test mounts itself (tmpfs), a full data directory refuses
//!   new batches with a clear error while reads work and running work records its results;
//!   the control plane survives the disk filling up completely, and recovers by itself
//!   when space is freed.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

const TENANT: &str = "acme-token";
const RIVAL: &str = "rival-token";
const AGENT: &str = "agent-secret-of-the-tests";

async fn wait_batch(addr: SocketAddr, token: &str, id: &str, within: Duration, procs: &[&Proc]) -> pb::Batch {
    let deadline = Instant::now() + within;
    loop {
        let mut c = tenant_client(addr, token).await;
        if let Ok(b) = c.get_batch(pb::GetBatchRequest { batch_id: id.into() }).await {
            let b = b.into_inner();
            if [
                pb::BatchStatus::Completed,
                pb::BatchStatus::Failed,
                pb::BatchStatus::Expired,
                pb::BatchStatus::Cancelled,
            ]
            .iter()
            .any(|s| *s as i32 == b.status)
            {
                return b;
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| format!("--- {}\n{}", p.name, p.log())).collect();
            panic!("{id} did not finish within {within:?}:\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Uploads a batch of `n` lines produced by `line`, streamed in 1 MiB pieces (never the
/// whole file in memory).
async fn upload(
    addr: SocketAddr,
    token: &str,
    n: usize,
    line: impl Fn(usize) -> String + Send + 'static,
) -> Result<pb::CreateBatchResponse, tonic::Status> {
    let mut c = tenant_client(addr, token).await;
    let options = pb::BatchOptions {
        model: "llama-3.1-8b".into(),
        ..Default::default()
    };
    let first = std::iter::once(pb::UploadBatchChunk {
        chunk: Some(pb::upload_batch_chunk::Chunk::Options(options)),
    });
    let rest = (0..n).map(move |i| pb::UploadBatchChunk {
        chunk: Some(pb::upload_batch_chunk::Chunk::Data(
            format!("{}\n", line(i)).into_bytes().into(),
        )),
    });
    c.upload_batch(tonic::codegen::tokio_stream::iter(first.chain(rest)))
        .await
        .map(|r| r.into_inner())
}

fn agent_client(
    addr: SocketAddr,
    token: &str,
) -> AgentServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor + Clone>,
> {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    })
}

/// A 1,000,000-byte chat request. The bulk is in a field engines ignore, so the engine
/// emulator's prefill stays short: this measures tokenfab's transport, not prefill.
fn megabyte_line(i: usize) -> String {
    let head = format!(
        r#"{{"custom_id":"big-{i:04}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"request {i}"}}],"max_tokens":8,"padding":""#
    );
    let tail = r#""}}"#;
    format!("{head}{}{tail}", "x".repeat(1_000_000 - head.len() - tail.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_megabyte_lines_at_window_256_completes() {
    const N: usize = 280; // 280 MB: more than one 256 MiB reply could carry
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = start_server(
        dir.path(),
        &["--tenant", &format!("acme={TENANT}"), "--max-file-bytes", "400MiB"],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let (emu, url) = spawn_emu(dir.path(), "emu", 1000.0);
    let agent = spawn_agent(dir.path(), "n1", &format!("http://{addr}"), &url, 256, AGENT);
    let procs = [server, emu, agent];
    wait_registered(&procs, Duration::from_secs(30)).await;
    let created = upload(addr, TENANT, N, megabyte_line).await.unwrap();
    let id = created.batch.unwrap().id;
    let done = wait_batch(
        addr,
        TENANT,
        &id,
        Duration::from_secs(240),
        &procs.iter().collect::<Vec<_>>(),
    )
    .await;
    let c = counts(&done);
    assert_eq!(
        (done.status, c.completed, c.failed),
        (pb::BatchStatus::Completed as i32, N as u32, 0),
        "every 1 MB request answered: {done:?}\n{}",
        procs[0].log()
    );
    let out = all_results(addr, TENANT, &id, pb::ResultKind::Output).await;
    assert_eq!(out.len(), N);
    assert_eq!(out[0].custom_id, "big-0000");
    // The agent's leases stayed within the reply budget (16 MiB by default): no lease
    // failed for its size.
    assert!(!procs[2].log().contains("leasing work failed"), "{}", procs[2].log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_records_results_only_for_its_own_leases_and_registers_only_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = start_server(
        dir.path(),
        &[
            "--tenant",
            &format!("acme={TENANT}"),
            "--tenant",
            &format!("rival={RIVAL}"),
            "--heartbeat-interval",
            "250ms",
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    // The victim's batch waits in the queue: no agent serves the model yet.
    let lines: Vec<String> = (0..4).map(|i| chat_line(&format!("v{i}"), 8)).collect();
    let victim = tenant_client(addr, TENANT)
        .await
        .create_batch(pb::CreateBatchRequest {
            options: Some(pb::BatchOptions {
                model: "llama-3.1-8b".into(),
                ..Default::default()
            }),
            input_jsonl: lines.join("\n").into_bytes().into(),
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .id;
    let batch_no: u64 = victim.trim_start_matches("batch_").parse().unwrap();

    // A node with its own token (not the cluster secret) registers, holding no lease,
    // and reports a forged final result for the victim's queued request.
    let evil_token = tokenfab_identity::node_token(AGENT, "evil");
    let mut evil = agent_client(addr, &evil_token);
    evil.register(pb::RegisterRequest {
        node: "evil".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let forged = |unit: u64, index: u32| pb::WorkResult {
        unit_id: unit,
        batch: batch_no,
        index,
        outcome: Some(pb::work_result::Outcome::Response(pb::EngineResponse {
            status_code: 200,
            body: br#"{"choices":[{"message":{"content":"FORGED"}}]}"#.to_vec().into(),
            request_id: "forged".into(),
        })),
        usage: Some(pb::Usage::default()),
        latency_us: 0,
    };
    let r = evil
        .report_results(pb::ReportResultsRequest {
            node: "evil".into(),
            results: vec![forged(1, 0), forged(u64::MAX, 1)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.recorded, r.not_leased), (0, 2), "{r:?}");

    // Its token names it: it cannot act as another node.
    let e = evil
        .register(pb::RegisterRequest {
            node: "honest".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("may act only as the node its token names"),
        "{}",
        e.message()
    );
    let e = evil
        .report_results(pb::ReportResultsRequest {
            node: "honest".into(),
            results: vec![forged(1, 0)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // The honest node comes up and runs the batch; while it holds leases, the evil node
    // still cannot write into them, and cannot take them over by registering as it.
    let (emu, url) = spawn_emu(dir.path(), "emu", 2.0);
    let honest = spawn_agent(dir.path(), "honest", &format!("http://{addr}"), &url, 4, AGENT);
    let procs = [server, emu, honest];
    wait_registered(&procs, Duration::from_secs(30)).await;
    for unit in 0..64u64 {
        let r = evil
            .report_results(pb::ReportResultsRequest {
                node: "evil".into(),
                results: (0..4).map(|i| forged(unit, i)).collect(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.recorded, 0, "unit {unit}: {r:?}");
    }
    let done = wait_batch(
        addr,
        TENANT,
        &victim,
        Duration::from_secs(60),
        &procs.iter().collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(counts(&done).completed, 4);
    let out = all_results(addr, TENANT, &victim, pb::ResultKind::Output).await;
    assert_eq!(out.len(), 4);
    for r in &out {
        let Some(pb::result_record::Outcome::Response(resp)) = &r.outcome else {
            panic!("{r:?}")
        };
        assert!(
            !String::from_utf8_lossy(&resp.body).contains("FORGED"),
            "a forged result reached the tenant: {r:?}"
        );
    }
    // Nothing of the victim's is visible to another tenant either.
    let e = tenant_client(addr, RIVAL)
        .await
        .get_batch(pb::GetBatchRequest {
            batch_id: victim.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

/// A tmpfs the test mounts, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` when this process may not mount (not root, or no permission in a container).
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn free_bytes(at: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(at)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

/// Writes zeros to `path` until the filesystem has at most `leave` bytes free.
fn fill(path: &Path, leave: u64) {
    use std::io::Write;
    let dir = path.parent().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let chunk = vec![0u8; 1 << 20];
    loop {
        let free = free_bytes(dir);
        if free <= leave {
            break;
        }
        let n = (free - leave).min(chunk.len() as u64) as usize;
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
        f.flush().unwrap();
    }
}

async fn healthz(metrics: SocketAddr) -> serde_json::Value {
    let text = http_text(&format!("http://{metrics}/healthz")).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("/healthz: {e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_batches_keeps_serving_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let Some(fs) = Tmpfs::mount(&dir.path().join("small"), "64m") else {
        assert!(!root, "running as root, but mounting a tmpfs failed");
        eprintln!("SKIPPED: mounting a tmpfs needs root; this test runs in CI as root");
        return;
    };
    let data = fs.0.join("data");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut server = Proc::spawn(
        "server",
        dir.path(),
        &[
            "server",
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
            "--data-dir",
            data.to_str().unwrap(),
            "--tenant",
            &format!("acme={TENANT}"),
            "--min-free-space",
            "16MiB",
            "--heartbeat-interval",
            "250ms",
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    wait_tcp(addr, Duration::from_secs(20), &mut [&mut server]);
    // A slow engine (20x real time): the first batch is still running when the disk fills.
    let (emu, url) = spawn_emu(dir.path(), "emu", 20.0);
    let agent = spawn_agent(dir.path(), "n1", &format!("http://{addr}"), &url, 64, AGENT);
    let procs = [server, emu, agent];
    wait_registered(&procs, Duration::from_secs(30)).await;
    let mut c = tenant_client(addr, TENANT).await;
    let running = create(addr, TENANT, chat_batch("run", 64, 2000)).await;

    // The disk fills (another program, say) to 8 MiB free: under the 16 MiB kept.
    let filler = fs.0.join("filler");
    fill(&filler, 8 << 20);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match c.create_batch(chat_batch("new", 1, 8)).await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(300)).await,
            Ok(b) => panic!("accepted with the disk nearly full: {b:?}"),
        }
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .starts_with("the control plane's disk is nearly full ("),
        "{}",
        refused.message()
    );
    // /healthz follows within its one-second refresh.
    let deadline = Instant::now() + Duration::from_secs(5);
    let h = loop {
        let h = healthz(metrics).await;
        if h["status"] == "degraded" || Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["problems"][0].as_str().unwrap().contains("new batches are refused"),
        "{h}"
    );
    // Reads keep working, and the running batch records its results to the end.
    let list = c
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.batches.iter().any(|b| b.id == running));
    let done = wait_batch(
        addr,
        TENANT,
        &running,
        Duration::from_secs(120),
        &procs.iter().collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(counts(&done).completed, 64, "{done:?}");

    // Space is freed: new batches are taken again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        match c.create_batch(chat_batch("after", 2, 8)).await {
            Ok(b) => break b.into_inner().batch.unwrap().id,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("still refused after space was freed: {e:?}"),
        }
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(healthz(metrics).await["status"], "ok");

    // The disk fills up completely while a batch with large results runs: commits fail.
    // The control plane does not exit; it says so, and once space is freed it rebuilds
    // from what is durable and the batch still completes, every request exactly once.
    let big = create(addr, TENANT, chat_batch("big", 256, 1500)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    fill(&filler, 0);
    let failures = || async {
        let text = http_text(&format!("http://{metrics}/metrics")).await;
        text.lines()
            .find_map(|l| l.strip_prefix("tokenfab_control_store_failures_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline && failures().await == 0.0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed_commits = failures().await;
    std::fs::remove_file(&filler).unwrap();
    let done = wait_batch(
        addr,
        TENANT,
        &big,
        Duration::from_secs(120),
        &procs.iter().collect::<Vec<_>>(),
    )
    .await;
    let mut server = procs.into_iter().next().unwrap();
    assert_eq!(counts(&done).completed, 256, "{done:?}");
    assert!(server.exited().is_none(), "the control plane exited:\n{}", server.log());
    assert!(
        failed_commits > 0.0,
        "the full disk never failed a commit:\n{}",
        server.log()
    );
    assert!(
        server.log().contains("a commit failed; nothing of it was acknowledged"),
        "{}",
        server.log()
    );
    eprintln!("full disk: {failed_commits} commits failed; the store was reopened each time");
    let done = wait_batch(addr, TENANT, &again, Duration::from_secs(10), &[&server]).await;
    assert_eq!(counts(&done).completed, 2, "{done:?}");
}

/// `tokenfab admin backup` of a control plane that keeps serving, `verify` of its data
/// directory once stopped, and `restore` into a new one that a control plane serves from:
/// finished results come back identical and an unfinished batch completes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_restores_into_a_working_control_plane() {
    const ADMIN: &str = "operator-token";
    let dir = tempfile::tempdir().unwrap();
    let envs = [("TOKENFAB_AGENT_TOKEN", AGENT), ("TOKENFAB_ADMIN_TOKEN", ADMIN)];
    let (server, addr) = start_server(dir.path(), &["--tenant", &format!("acme={TENANT}")], &envs);
    let (emu, url) = spawn_emu(dir.path(), "emu", 20.0);
    let agent = spawn_agent(dir.path(), "n1", &format!("http://{addr}"), &url, 8, AGENT);
    let mut procs = vec![server, emu, agent];
    wait_registered(&procs, Duration::from_secs(30)).await;
    let finished = create(addr, TENANT, chat_batch("f", 10, 8)).await;
    let refs: Vec<&Proc> = procs.iter().collect();
    wait_batch(addr, TENANT, &finished, Duration::from_secs(60), &refs).await;
    let running = create(addr, TENANT, chat_batch("r", 40, 3000)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let file = dir.path().join("cluster.tfbackup");
    let control = format!("http://{addr}");
    let out = run_cli(
        &["admin", "backup", "-o", file.to_str().unwrap()],
        &[("TOKENFAB_CONTROL", &control), ("TOKENFAB_ADMIN_TOKEN", ADMIN)],
    );
    assert!(out.contains("read back and checked"), "{out}");
    assert!(out.contains("2 batches, 50 requests"), "{out}");
    let refused = std::process::Command::new(bin())
        .args(["admin", "backup", "-o", dir.path().join("x").to_str().unwrap()])
        .env("TOKENFAB_CONTROL", &control)
        .env("TOKENFAB_ADMIN_TOKEN", TENANT)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not the operator's admin token"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let finished_before = all_results(addr, TENANT, &finished, pb::ResultKind::Output).await;

    // Stop everything; the stopped data directory verifies clean.
    for p in procs.iter_mut() {
        p.kill9();
    }
    let data = dir.path().join("data");
    let out = run_cli(&["admin", "verify", "--data-dir", data.to_str().unwrap()], &[]);
    assert!(out.contains("no problems found"), "{out}");

    // Restore into a new directory and serve from it.
    let restored = dir.path().join("restored");
    let out = run_cli(
        &[
            "admin",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            restored.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.contains("restored 2 batches, 50 requests"), "{out}");
    let addr2: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut server = Proc::spawn(
        "server-restored",
        dir.path(),
        &[
            "server",
            "--listen",
            &addr2.to_string(),
            "--data-dir",
            restored.to_str().unwrap(),
            "--tenant",
            &format!("acme={TENANT}"),
        ],
        &envs,
    );
    wait_tcp(addr2, Duration::from_secs(20), &mut [&mut server]);
    let (emu, url) = spawn_emu(dir.path(), "emu2", 100.0);
    let agent = spawn_agent(dir.path(), "n2", &format!("http://{addr2}"), &url, 64, AGENT);
    let procs = [server, emu, agent];
    wait_registered(&procs, Duration::from_secs(30)).await;
    assert_eq!(
        all_results(addr2, TENANT, &finished, pb::ResultKind::Output).await,
        finished_before
    );
    let done = wait_batch(
        addr2,
        TENANT,
        &running,
        Duration::from_secs(120),
        &procs.iter().collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(counts(&done).completed, 40, "{done:?}");
}
