//! The control plane under abuse: memory and latency figures; prints figures, asserts
//! nothing.
//!
//!     cargo bench -p tokenfab --bench abuse
//!     cargo bench -p tokenfab --bench abuse -- uploads     # one part only
//!     cargo bench -p tokenfab --bench abuse -- queued
//!
//! The control plane runs as its own process (the release `tokenfab server`); its
//! resident memory is read from /proc (VmRSS, sampled every 20 ms, and the kernel's peak
//! VmHWM).
//!
//! 1. uploads: one tenant streams four 190 MiB batch files at once (~2 KB requests) while
//!    another lists its batches in a loop: the control plane's peak and settled resident
//!    memory, the listing latency (p50/p99/max), then resident memory right after a
//!    restart with those four batches live.
//! 2. queued: 1,000,000 queued requests (five batches of 200,000 ~230-byte requests), and
//!    the same after a restart.
//! 3. openai: a 190 MiB file uploaded through the OpenAI-compatible API (multipart,
//!    streamed), run as a batch by two agents on engine emulators at 1000x, and its
//!    output file downloaded: the control plane's resident memory through each step.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::batch_service_client::BatchServiceClient;
use tonic::Request;
use tonic::transport::Channel;

mod support;
use support::port;

const SECRET: &str = "bench-agent-secret-0123";

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &std::path::Path) -> Server {
    start_with(data, &[])
}

fn start_with(data: &std::path::Path, extra: &[&str]) -> Server {
    let addr: SocketAddr = format!("127.0.0.1:{}", port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .args([
            "server",
            "--listen",
            &addr.to_string(),
            "--data-dir",
            data.to_str().unwrap(),
            "--tenant",
            "big=big-token",
            "--tenant",
            "other=other-token",
            "--max-file-bytes",
            "400MiB",
            "--max-requests-per-batch",
            "1000000",
            "--max-uploads-per-tenant",
            "4",
            "--min-free-space",
            "64MiB",
            "--no-admission",
        ])
        .args(extra)
        .env("TOKENFAB_AGENT_TOKEN", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the control plane did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, addr }
}

/// (VmRSS, VmHWM) of a process, bytes.
fn memory(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
}

/// Samples VmRSS every 20 ms until stopped; keeps the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(memory(pid).0, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A request line of about `bytes` bytes.
fn line(tag: &str, i: usize, bytes: usize) -> String {
    let head = format!(
        r#"{{"custom_id":"{tag}-{i}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":""#
    );
    let tail = r#""}],"max_tokens":64}}"#;
    let fill = bytes.saturating_sub(head.len() + tail.len()).max(1);
    format!(
        "{head}{}{tail}\n",
        "Summarize the ticket. ".repeat(fill / 22 + 1).split_at(fill).0
    )
}

/// Streams a batch of `lines` lines of about `bytes` bytes each, in 1 MiB pieces made as
/// they are sent.
async fn upload(addr: SocketAddr, token: &str, tag: String, lines: usize, bytes: usize) -> Duration {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = BatchServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let options = pb::UploadBatchChunk {
        chunk: Some(pb::upload_batch_chunk::Chunk::Options(pb::BatchOptions {
            model: "llama-3.1-8b".into(),
            completion_window_seconds: 7 * 24 * 3600,
            ..Default::default()
        })),
    };
    let per_piece = ((1 << 20) / bytes).max(1);
    let pieces = lines.div_ceil(per_piece);
    let stream = tonic::codegen::tokio_stream::iter(std::iter::once(options).chain((0..pieces).map(move |p| {
        let mut data = String::with_capacity(1 << 20);
        for i in p * per_piece..((p + 1) * per_piece).min(lines) {
            data.push_str(&line(&tag, i, bytes));
        }
        pb::UploadBatchChunk {
            chunk: Some(pb::upload_batch_chunk::Chunk::Data(data.into_bytes().into())),
        }
    })));
    let t = Instant::now();
    client.upload_batch(authed(token, stream)).await.unwrap();
    t.elapsed()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn uploads() {
    const LINES: usize = 100_000;
    const BYTES: usize = 1_992; // 100,000 lines of ~1,992 bytes = 190 MiB
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data);
    let pid = server.child.id();
    let idle = memory(pid).0;
    let sampler = Sampler::start(pid);
    // The other tenant lists its (one) batch in a loop while the uploads run.
    let addr = server.addr;
    upload(addr, "other-token", "o".into(), 10, 200).await;
    let listing = Arc::new(AtomicBool::new(true));
    let flag = listing.clone();
    let lister = tokio::spawn(async move {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = BatchServiceClient::new(channel);
        let mut ms = Vec::new();
        while flag.load(Ordering::Relaxed) {
            let t = Instant::now();
            c.list_batches(authed("other-token", pb::ListBatchesRequest::default()))
                .await
                .unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ms
    });
    let t = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|u| tokio::spawn(upload(addr, "big-token", format!("u{u}"), LINES, BYTES)))
        .collect();
    let mut each = Vec::new();
    for task in tasks {
        each.push(task.await.unwrap().as_secs_f64());
    }
    let wall = t.elapsed().as_secs_f64();
    listing.store(false, Ordering::Relaxed);
    let mut ms = lister.await.unwrap();
    let peak = sampler.peak();
    ms.sort_by(f64::total_cmp);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = memory(pid).0;
    let file_mib = (LINES * BYTES) as f64 / (1 << 20) as f64;
    println!("uploads: 4 concurrent uploads of {file_mib:.0} MiB ({LINES} requests of ~{BYTES} B each) by one tenant");
    println!(
        "  wall {wall:.1} s for all four ({:.0} MiB/s), each {:.1}-{:.1} s",
        4.0 * file_mib / wall,
        each.iter().copied().fold(f64::MAX, f64::min),
        each.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "  control plane resident memory: idle {}, peak {} (VmHWM {}), settled with 400,000 requests queued {}",
        mib(idle),
        mib(peak),
        mib(memory(pid).1),
        mib(settled)
    );
    println!(
        "  another tenant's ListBatches during the uploads: {} calls, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms.len(),
        percentile(&ms, 0.50),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(0.0)
    );
    restart(server, &data, "with those 4 batches live").await;
}

/// Stops `server`, starts a new one on `data`, and prints how soon it serves and its
/// resident memory then.
async fn restart(server: Server, data: &std::path::Path, what: &str) {
    drop(server);
    let t = Instant::now();
    let server = start(data);
    let up = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, hwm) = memory(server.child.id());
    println!(
        "  restart {what}: serving after {up:.1} s, resident {} (peak during recovery {})",
        mib(rss),
        mib(hwm)
    );
}

async fn queued() {
    const BATCHES: usize = 5;
    const LINES: usize = 200_000;
    const BYTES: usize = 230;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data);
    let pid = server.child.id();
    let idle = memory(pid).0;
    let t = Instant::now();
    for b in 0..BATCHES {
        upload(server.addr, "big-token", format!("q{b}"), LINES, BYTES).await;
    }
    let secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, hwm) = memory(pid);
    println!(
        "queued: {} requests of ~{BYTES} B queued in {BATCHES} batches ({:.0} requests/s submitted)",
        BATCHES * LINES,
        (BATCHES * LINES) as f64 / secs
    );
    println!(
        "  control plane resident memory: idle {}, with 1,000,000 queued {} (peak {})",
        mib(idle),
        mib(rss),
        mib(hwm)
    );
    restart(server, &data, "with 1,000,000 requests queued").await;
}

/// A helper process (engine emulator or agent), killed when dropped.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn helper(args: &[&str]) -> Helper {
    Helper(
        Command::new(env!("CARGO_BIN_EXE_tokenfab"))
            .args(args)
            .env("TOKENFAB_AGENT_TOKEN", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn openai() {
    const LINES: usize = 100_000;
    const BYTES: usize = 1_992;
    let dir = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", port());
    let server = start_with(&dir.path().join("data"), &["--openai-listen", &api]);
    let pid = server.child.id();
    let mut helpers = Vec::new();
    for i in 0..2 {
        let emu = format!("127.0.0.1:{}", port());
        helpers.push(helper(&[
            "engine-emu",
            "--listen",
            &emu,
            "--time-scale",
            "1000",
            "--max-num-seqs",
            "512",
        ]));
        while std::net::TcpStream::connect(&emu).is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        helpers.push(helper(&[
            "agent",
            "--control",
            &format!("http://{}", server.addr),
            "--node",
            &format!("n{i}"),
            "--replica",
            &format!("url=http://{emu},model=llama-3.1-8b,window=256,max=1024"),
        ]));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let http = reqwest::Client::new();
    let base = format!("http://{api}/v1");
    let idle = memory(pid).0;

    // Upload, streamed: the file is made as it is sent.
    let sampler = Sampler::start(pid);
    let per_piece = (1 << 20) / BYTES;
    let pieces = LINES.div_ceil(per_piece);
    let body = tonic::codegen::tokio_stream::iter((0..pieces).map(move |p| {
        let mut data = String::with_capacity(1 << 20);
        for i in p * per_piece..((p + 1) * per_piece).min(LINES) {
            data.push_str(
                &line("o", i, BYTES).replace(r#""max_tokens":64"#, r#""model":"llama-3.1-8b","max_tokens":16"#),
            );
        }
        Ok::<_, std::io::Error>(data.into_bytes())
    }));
    let part = reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(body)).file_name("big.jsonl");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part("file", part);
    let t = Instant::now();
    let file: serde_json::Value = http
        .post(format!("{base}/files"))
        .bearer_auth("big-token")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let upload_s = t.elapsed().as_secs_f64();
    let upload_peak = sampler.peak();
    let after_upload = memory(pid).0;

    // The batch runs; then its output file streams back.
    let sampler = Sampler::start(pid);
    let t = Instant::now();
    let batch: serde_json::Value = http
        .post(format!("{base}/batches"))
        .bearer_auth("big-token")
        .json(&serde_json::json!({
            "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = batch["id"].as_str().unwrap_or_else(|| panic!("{batch}")).to_string();
    let done = loop {
        let b: serde_json::Value = http
            .get(format!("{base}/batches/{id}"))
            .bearer_auth("big-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if b["status"] == "completed" {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let run_s = t.elapsed().as_secs_f64();
    let run_peak = sampler.peak();
    let before_download = memory(pid).0;
    let sampler = Sampler::start(pid);
    let t = Instant::now();
    let mut resp = http
        .get(format!(
            "{base}/files/{}/content",
            done["output_file_id"].as_str().unwrap()
        ))
        .bearer_auth("big-token")
        .send()
        .await
        .unwrap();
    let mut downloaded = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        downloaded += chunk.len() as u64;
    }
    let download_s = t.elapsed().as_secs_f64();
    let download_peak = sampler.peak();
    println!(
        "openai: a {} file uploaded through /v1/files ({LINES} requests), run as a batch, its output downloaded",
        mib(file["bytes"].as_u64().unwrap_or(0))
    );
    println!(
        "  upload {upload_s:.1} s; batch {run_s:.1} s ({} completed); output file {} in {download_s:.1} s",
        done["request_counts"]["completed"],
        mib(downloaded)
    );
    println!(
        "  control plane resident memory: idle {}, peak during the upload {} (after {}), peak while the batch was parsed and ran {}, before the download {}, peak during it {}",
        mib(idle),
        mib(upload_peak),
        mib(after_upload),
        mib(run_peak),
        mib(before_download),
        mib(download_peak)
    );
    drop(helpers);
}

fn main() {
    support::run_parts(vec![
        ("uploads", Box::pin(uploads())),
        ("queued", Box::pin(queued())),
        ("openai", Box::pin(openai())),
    ]);
}
