//! Throughput benchmarks; prints figures, asserts nothing.
//!
//!     cargo bench -p tokenfab --bench throughput
//!     cargo bench -p tokenfab --bench throughput -- ingest     # one part only
//!     cargo bench -p tokenfab --bench throughput -- e2e
//!     cargo bench -p tokenfab --features etcd --bench throughput -- ingest e2e   # with etcd
//!     cargo bench -p tokenfab --features etcd,raft --bench throughput -- ingest e2e   # and Raft
//!
//! 1. ingest: durable results per second into one control plane on its own (gRPC reports
//!    of 1,000 results each from 8 concurrent clients, redb with fsync per commit), with
//!    the commit latency's percentiles (from the control plane's own histogram).
//! 2. e2e: requests per second end to end through one control plane and two agents, each
//!    agent driving one engine emulator at 1000x time scale, all as separate processes.
//!
//! With the `etcd` feature, `ingest-etcd` and `e2e-etcd` run the same on the etcd backend:
//! a 3-member etcd cluster on loopback (Debian's etcd-server), and for e2e three
//! `tokenfab server --store etcd` replicas (one elected, two waiting) with the agents given
//! all three URLs. With `raft`, `ingest-raft` and `e2e-raft` run on a Raft group of three
//! replicas on loopback (in the bench's process for ingest; `tokenfab server --store raft`
//! processes for e2e): every commit reaches a majority's log with an fsync before it is
//! acknowledged, and every replica applies it to its own redb.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenfab_control::{ServerConfig, TenantToken};
use tokenfab_core::batch_input::InputLimits;
use tokenfab_core::control::ControlConfig;
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::agent_service_client::AgentServiceClient;
use tokenfab_proto::v1::batch_service_client::BatchServiceClient;
use tonic::Request;
use tonic::transport::Channel;

const RESPONSE: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1795000000,"model":"llama-3.1-8b","choices":[{"index":0,"message":{"role":"assistant","content":"The order arrived damaged; the customer asks for a replacement and a refund of the shipping fee."},"finish_reason":"stop"}],"usage":{"prompt_tokens":41,"completion_tokens":21,"total_tokens":62}}"#;

mod support;
use support::port;

/// The cluster's agent secret in these benchmarks.
const SECRET: &str = "bench-agent-secret-0123";

fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn line(i: usize, max_tokens: u32) -> String {
    format!(
        r#"{{"custom_id":"r{i}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"Summarize ticket {i}: order arrived damaged."}}],"max_tokens":{max_tokens}}}}}"#
    )
}

async fn upload(client: &mut BatchServiceClient<Channel>, token: &str, input: String) -> String {
    let options = pb::BatchOptions {
        model: "llama-3.1-8b".into(),
        ..Default::default()
    };
    let mut chunks = vec![pb::UploadBatchChunk {
        chunk: Some(pb::upload_batch_chunk::Chunk::Options(options)),
    }];
    for c in input.as_bytes().chunks(1 << 20) {
        chunks.push(pb::UploadBatchChunk {
            chunk: Some(pb::upload_batch_chunk::Chunk::Data(c.to_vec().into())),
        });
    }
    let resp = client
        .upload_batch(authed(token, tonic::codegen::tokio_stream::iter(chunks)))
        .await
        .unwrap()
        .into_inner();
    resp.batch.unwrap().id
}

async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The commit latency's median and 99th percentile, seconds, from the control plane's
/// histogram (the upper bound of the bucket each falls in).
fn commit_quantiles(text: &str) -> (f64, f64) {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tokenfab_control_store_commit_seconds_bucket{le=\""))
        .filter_map(|r| {
            let (le, rest) = r.split_once("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let q = |p: f64| buckets.iter().find(|b| b.1 >= p * total).map_or(f64::NAN, |b| b.0);
    (q(0.5), q(0.99))
}

async fn ingest() {
    let dir = tempfile::tempdir().unwrap();
    ingest_with(
        "embedded (redb, fsync)",
        tokenfab_store::RedbStore::open(dir.path()).unwrap(),
    )
    .await;
}

#[cfg(feature = "etcd")]
async fn ingest_etcd() {
    let Some(etcd) = tokenfab_store_etcd::testing::Etcd::cluster(3).await else {
        println!("ingest-etcd: no etcd binary (Debian: etcd-server); skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = tokenfab_store_etcd::EtcdStore::open(
        tokenfab_store_etcd::EtcdOptions::new(etcd.urls.clone(), "/bench", "cp-0"),
        dir.path(),
        Box::new(|_| {}),
    )
    .await
    .unwrap();
    ingest_with("etcd (3 members) + redb", store).await;
}

#[cfg(feature = "raft")]
async fn ingest_raft() {
    let dir = tempfile::tempdir().unwrap();
    let peers: std::collections::BTreeMap<u64, String> =
        (1..=3).map(|id| (id, format!("http://127.0.0.1:{}", port()))).collect();
    let mut pending = Vec::new();
    for id in 1..=3u64 {
        let mut opts = tokenfab_store_raft::RaftOptions::new(id, &format!("cp{id}"), peers.clone()).unwrap();
        opts.listen = peers[&id].trim_start_matches("http://").parse().unwrap();
        let data = dir.path().join(format!("cp{id}"));
        pending.push(tokio::spawn(async move {
            tokenfab_store_raft::RaftStore::open(opts, &data, Box::new(|_, _| {}))
                .await
                .unwrap()
        }));
    }
    // The first to lead serves; the two others follow (and apply every commit) meanwhile.
    let leader = loop {
        if let Some(i) = pending.iter().position(|t| t.is_finished()) {
            break pending.remove(i).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    ingest_with("Raft (3 replicas, each with redb)", leader).await;
    for t in pending {
        t.abort();
    }
}

async fn ingest_with<S: tokenfab_store::Store + Clone>(backend: &str, store: S) {
    const N: usize = 200_000;
    const PER_REPORT: usize = 1000;
    const CLIENTS: usize = 8;
    let server = tokenfab_control::start(
        ServerConfig {
            record: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            openai_listen: None,
            tenants: vec![TenantToken::new("t", "t")],
            agent_secret: SECRET.into(),
            admin_token: None,
            http_token: None,
            transport: tokenfab_control::Transport::default(),
            tls: None,
            control: ControlConfig {
                lease_ttl: Duration::from_secs(3600),
                ..ControlConfig::default()
            },
            limits: InputLimits {
                max_file_bytes: 1 << 30,
                max_line_bytes: 1 << 20,
                max_requests: 1_000_000,
                ..InputLimits::default()
            },
        },
        store,
    )
    .await
    .unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tenant = BatchServiceClient::new(channel.clone()).max_encoding_message_size(64 << 20);
    let mut agent = AgentServiceClient::new(channel.clone())
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);

    let node_token = tokenfab_identity::node_token(SECRET, "n");
    let t = Instant::now();
    let id = upload(
        &mut tenant,
        "t",
        (0..N).map(|i| line(i, 32)).collect::<Vec<_>>().join("\n"),
    )
    .await;
    let submit_s = t.elapsed().as_secs_f64();
    let device = pb::Device {
        index: 0,
        accelerator: "h100-sxm".into(),
        ..Default::default()
    };
    agent
        .register(authed(
            &node_token,
            pb::RegisterRequest {
                node: "n".into(),
                devices: vec![device],
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let mut units = Vec::new();
    loop {
        let r = agent
            .lease_work(authed(
                &node_token,
                pb::LeaseWorkRequest {
                    node: "n".into(),
                    model: "llama-3.1-8b".into(),
                    max_requests: PER_REPORT as u32,
                    wait_ms: 0,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        match r.units.into_iter().next() {
            Some(u) => units.push(u),
            None => break,
        }
    }
    assert_eq!(units.iter().map(|u| u.items.len()).sum::<usize>(), N);
    let reports: Vec<pb::ReportResultsRequest> = units
        .into_iter()
        .map(|u| pb::ReportResultsRequest {
            node: "n".into(),
            results: u
                .items
                .iter()
                .map(|w| pb::WorkResult {
                    unit_id: u.unit_id,
                    batch: w.batch,
                    index: w.index,
                    outcome: Some(pb::work_result::Outcome::Response(pb::EngineResponse {
                        status_code: 200,
                        body: RESPONSE.as_bytes().to_vec().into(),
                        request_id: String::new(),
                    })),
                    usage: Some(pb::Usage {
                        prompt_tokens: 41,
                        completion_tokens: 21,
                        joules: 1.0,
                        device_seconds: 0.01,
                        cost_usd: 0.0,
                    }),
                    latency_us: 0,
                })
                .collect(),
        })
        .collect();
    let commits_before = metric(server.metrics_addr.unwrap(), "tokenfab_control_store_commits_total").await;
    let t = Instant::now();
    let mut tasks = Vec::new();
    let mut shards: Vec<Vec<pb::ReportResultsRequest>> = (0..CLIENTS).map(|_| Vec::new()).collect();
    for (i, r) in reports.into_iter().enumerate() {
        shards[i % CLIENTS].push(r);
    }
    for shard in shards {
        let mut agent = AgentServiceClient::new(channel.clone()).max_encoding_message_size(256 << 20);
        let node_token = node_token.clone();
        tasks.push(tokio::spawn(async move {
            for r in shard {
                let s = agent.report_results(authed(&node_token, r)).await.unwrap().into_inner();
                assert_eq!(s.recorded as usize, PER_REPORT);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report_s = t.elapsed().as_secs_f64();
    let commits = metric(server.metrics_addr.unwrap(), "tokenfab_control_store_commits_total").await - commits_before;
    let b = tenant
        .get_batch(authed("t", pb::GetBatchRequest { batch_id: id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.status, pb::BatchStatus::Completed as i32);
    let metrics = reqwest::get(format!("http://{}/metrics", server.metrics_addr.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (p50, p99) = commit_quantiles(&metrics);
    println!(
        "ingest, {backend}: {N} results of {} B bodies, {CLIENTS} clients x reports of {PER_REPORT}",
        RESPONSE.len()
    );
    println!(
        "  submit (upload + validate + durable) {N} requests: {submit_s:.2} s = {:.0} requests/s",
        N as f64 / submit_s
    );
    println!(
        "  durable results ingested: {report_s:.2} s = {:.0} results/s ({commits} commits, {:.0} results per commit)",
        N as f64 / report_s,
        N as f64 / commits.max(1.0)
    );
    println!(
        "  commit latency (all commits): p50 <= {:.1} ms, p99 <= {:.1} ms",
        p50 * 1e3,
        p99 * 1e3
    );
    server.shutdown().await.unwrap();
}

struct Proc(Child);

impl Proc {
    /// User + system CPU seconds so far, from /proc (Linux).
    fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..13)
            .map_or(0.0, |f| f.iter().filter_map(|x| x.parse::<f64>().ok()).sum());
        ticks / 100.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .args(args)
        .env("TOKENFAB_AGENT_TOKEN", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

async fn wait_tcp(addr: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing on {addr}");
}

async fn e2e() {
    e2e_with("1 control plane (embedded store)", 1, &|_, _| vec![]).await;
}

#[cfg(feature = "etcd")]
async fn e2e_etcd() {
    let Some(etcd) = tokenfab_store_etcd::testing::Etcd::cluster(3).await else {
        println!("e2e-etcd: no etcd binary (Debian: etcd-server); skipped");
        return;
    };
    let endpoints = etcd.urls.join(",");
    e2e_with("3 control-plane replicas on a 3-member etcd", 3, &|i, _| {
        [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--replica-name",
            &format!("cp{i}"),
        ]
        .map(String::from)
        .to_vec()
    })
    .await;
}

#[cfg(feature = "raft")]
async fn e2e_raft() {
    let peer: Vec<u16> = (0..3).map(|_| port()).collect();
    let peers = (0..3)
        .map(|i| format!("{}=http://127.0.0.1:{}", i + 1, peer[i]))
        .collect::<Vec<_>>()
        .join(",");
    e2e_with("3 control-plane replicas in a Raft group", 3, &|i, _| {
        [
            "--store",
            "raft",
            "--raft-id",
            &(i + 1).to_string(),
            "--raft-peers",
            &peers,
            "--raft-listen",
            &format!("127.0.0.1:{}", peer[i]),
            "--replica-name",
            &format!("cp{i}"),
        ]
        .map(String::from)
        .to_vec()
    })
    .await;
}

/// Through `replicas` control planes, replica `i` started with `store(i, data dir)` as its
/// store flags (one replica with none: the embedded store); the one that serves is found
/// by its gRPC port (the others do not listen on it).
async fn e2e_with(label: &str, replicas: usize, store: &dyn Fn(usize, &str) -> Vec<String>) {
    const N: usize = 50_000;
    const WINDOW: u32 = 256;
    let dir = tempfile::tempdir().unwrap();
    let cps: Vec<String> = (0..replicas).map(|_| format!("127.0.0.1:{}", port())).collect();
    let mut servers = Vec::new();
    for (i, cp) in cps.iter().enumerate() {
        let data = dir.path().join(format!("cp{i}"));
        let data = data.to_str().unwrap();
        let extra = store(i, data);
        let mut args = vec!["server", "--listen", cp, "--data-dir", data, "--tenant", "t=t"];
        args.extend(extra.iter().map(String::as_str));
        servers.push(spawn(&args));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = 'found: loop {
        for (i, cp) in cps.iter().enumerate() {
            if std::net::TcpStream::connect(cp).is_ok() {
                break 'found i;
            }
        }
        assert!(Instant::now() < deadline, "no control plane listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let server = &servers[leader];
    let cp = cps[leader].clone();
    let control: String = cps.iter().map(|c| format!("http://{c}")).collect::<Vec<_>>().join(",");
    let mut procs = Vec::new();
    for i in 0..2 {
        let emu = format!("127.0.0.1:{}", port());
        procs.push(spawn(&[
            "engine-emu",
            "--listen",
            &emu,
            "--time-scale",
            "1000",
            "--max-num-seqs",
            "512",
        ]));
        wait_tcp(&emu).await;
        let replica = format!("url=http://{emu},model=llama-3.1-8b,window={WINDOW},max=1024");
        procs.push(spawn(&[
            "agent",
            "--control",
            &control,
            "--node",
            &format!("n{i}"),
            "--replica",
            &replica,
        ]));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let channel = Channel::from_shared(format!("http://{cp}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tenant = BatchServiceClient::new(channel).max_encoding_message_size(64 << 20);
    let input = (0..N).map(|i| line(i, 16)).collect::<Vec<_>>().join("\n");
    let t = Instant::now();
    let id = upload(&mut tenant, "t", input).await;
    loop {
        let b = tenant
            .get_batch(authed("t", pb::GetBatchRequest { batch_id: id.clone() }))
            .await
            .unwrap()
            .into_inner();
        if b.status == pb::BatchStatus::Completed as i32 {
            let c = b.request_counts.unwrap();
            assert_eq!(c.completed as usize, N);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "e2e, {label}: {N} requests (16 output tokens each), 2 agents + 2 emulators at 1000x, window {WINDOW}, separate processes"
    );
    println!(
        "  submit to completed: {s:.2} s = {:.0} requests/s end to end",
        N as f64 / s
    );
    let cpu: Vec<String> = std::iter::once(("control plane", server))
        .chain(
            procs
                .iter()
                .enumerate()
                .map(|(i, p)| (if i % 2 == 0 { "emulator" } else { "agent" }, p)),
        )
        .map(|(name, p)| format!("{name} {:.2}", p.cpu_s()))
        .collect();
    println!("  CPU seconds per process: {}", cpu.join(", "));
}

/// One emulator alone, driven by a plain HTTP client at the agents' concurrency: the
/// ceiling the engine side puts on the end-to-end figure.
async fn emulator_alone() {
    const N: usize = 25_000;
    const CONCURRENCY: usize = 256;
    let emu = format!("127.0.0.1:{}", port());
    let p = spawn(&[
        "engine-emu",
        "--listen",
        &emu,
        "--time-scale",
        "1000",
        "--max-num-seqs",
        "512",
    ]);
    wait_tcp(&emu).await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(1024).build().unwrap();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (http, next, url) = (http.clone(), next.clone(), format!("http://{emu}/v1/chat/completions"));
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < N {
                    let body = r#"{"messages":[{"role":"user","content":"Summarize ticket: order arrived damaged."}],"max_tokens":16}"#;
                    let r = http.post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
                    assert!(r.status().is_success());
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "emulator alone: {N} requests at {CONCURRENCY} in flight: {:.0} requests/s (emulator CPU {:.2} s in {s:.2} s)",
        N as f64 / s,
        p.cpu_s()
    );
}

fn main() {
    #[allow(unused_mut)]
    let mut parts: Vec<support::Part> = vec![
        ("ingest", Box::pin(ingest())),
        ("e2e", Box::pin(e2e())),
        ("emulator", Box::pin(emulator_alone())),
    ];
    #[cfg(feature = "etcd")]
    {
        parts.insert(1, ("ingest-etcd", Box::pin(ingest_etcd())));
        parts.insert(3, ("e2e-etcd", Box::pin(e2e_etcd())));
    }
    #[cfg(feature = "raft")]
    {
        let at = parts.iter().position(|(n, _)| *n == "e2e").unwrap_or(0);
        parts.insert(at, ("ingest-raft", Box::pin(ingest_raft())));
        parts.insert(at + 2, ("e2e-raft", Box::pin(e2e_raft())));
    }
    support::run_parts(parts);
}
