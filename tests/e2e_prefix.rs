//! Prefix-affinity routing, live: one control plane, one agent driving four engine
//! emulators (emulated H100s with vLLM-style prefix caches). A batch asks eight questions
//! about each of 40 documents (each document is the prompt prefix of its eight requests).
//! With `--routing prefix-affinity` the questions about one document go to the replica
//! that prefilled it and find it cached; with `--routing least-loaded` they spread over
//! the replicas, and each prefills the document again. The emulators' own counters say
//! how many requests found their prefix cached.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;

const DOCS: usize = 40;
const QUESTIONS: usize = 8;
const REPLICAS: usize = 4;

fn document(d: usize) -> String {
    // About 600 tokens of text by the emulator's count (4 bytes a token).
    (0..300)
        .map(|w| format!("w{}", (d * 7919 + w * 104_729) % 100_000))
        .collect::<Vec<_>>()
        .join(" ")
}

fn batch() -> Vec<u8> {
    let mut lines = Vec::new();
    for d in 0..DOCS {
        let doc = document(d);
        for q in 0..QUESTIONS {
            lines.push(format!(
                r#"{{"custom_id":"d{d}-q{q}","method":"POST","url":"/v1/chat/completions","body":{{"model":"llama-3.1-8b","messages":[{{"role":"system","content":"Answer from this document: {doc}"}},{{"role":"user","content":"question {q}"}}],"max_tokens":16}}}}"#
            ));
        }
    }
    lines.join("\n").into_bytes()
}

/// Runs the batch with `routing`; returns (requests with a shared prefix, of them found
/// cached) summed over the emulators.
async fn run(routing: &str) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = start_server(
        dir.path(),
        &["--tenant", "acme=tok"],
        &[("TOKENFAB_AGENT_TOKEN", "agent-secret-of-the-tests")],
    );
    let mut procs = Vec::new();
    let mut engines = Vec::new();
    for i in 0..REPLICAS {
        let (p, url) = spawn_emu(dir.path(), &format!("emu-{i}"), 10.0);
        procs.push(p);
        engines.push(url);
    }
    let control = format!("http://{addr}");
    let mut args = vec!["agent", "--control", &control, "--node", "node0", "--routing", routing];
    let replicas: Vec<String> = engines
        .iter()
        .map(|e| format!("url={e},model=llama-3.1-8b,window=16"))
        .collect();
    for r in &replicas {
        args.extend(["--replica", r.as_str()]);
    }
    procs.push(Proc::spawn(
        "agent",
        dir.path(),
        &args,
        &[("TOKENFAB_AGENT_TOKEN", "agent-secret-of-the-tests")],
    ));
    wait_registered(&procs, Duration::from_secs(30)).await;
    let mut client = tenant_client(addr, "tok").await;
    let id = client
        .create_batch(pb::CreateBatchRequest {
            options: Some(pb::BatchOptions {
                model: "llama-3.1-8b".into(),
                completion_window_seconds: 3600,
                ..Default::default()
            }),
            input_jsonl: batch().into(),
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .id;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let b = client
            .get_batch(pb::GetBatchRequest { batch_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if is_final(&b) {
            let c = counts(&b);
            assert_eq!((c.completed, c.failed), ((DOCS * QUESTIONS) as u32, 0), "{b:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "batch not done in 120 s: {b:?}\n{}",
            procs[REPLICAS].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut totals = (0.0, 0.0);
    for e in &engines {
        let url = format!("{e}/metrics");
        totals.0 += fetch_metric(&url, "tokenfab_emu_prefix_cache_queries_total").await;
        totals.1 += fetch_metric(&url, "tokenfab_emu_prefix_cache_hits_total").await;
    }
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sharing_a_document_go_where_it_is_cached() {
    let requests = (DOCS * QUESTIONS) as f64;
    let (queries, affine) = run("prefix-affinity").await;
    assert_eq!(queries, requests, "every request has the document as its prefix");
    let (_, spread) = run("least-loaded").await;
    println!(
        "prefix cache hits: prefix-affinity {affine} of {requests} ({:.0}%), least-loaded {spread} ({:.0}%)",
        affine / requests * 100.0,
        spread / requests * 100.0
    );
    // With affinity, all but the first question of each document can hit (7 of 8); some
    // may spill to the other replica when theirs is full.
    assert!(
        affine >= 0.75 * requests,
        "prefix-affinity: only {affine} of {requests} hit"
    );
    // Spread over four replicas, each document is prefilled on most of them: at least
    // twice as many prefills as with affinity.
    assert!(
        requests - spread >= 2.0 * (requests - affine),
        "documents prefilled: least-loaded {}, prefix-affinity {}",
        requests - spread,
        requests - affine
    );
}
