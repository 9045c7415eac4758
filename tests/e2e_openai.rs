//! The OpenAI-compatible Files and Batches API, end to end with real processes:
//!
//! - the official `openai` Python package (tests/openai_client.py) uploads a file,
//!   creates a batch, polls it to completion and checks every line of its output and
//!   error files; cancels a running batch and finds its finished results kept;
//! - the same file submitted over gRPC gives the same results and usage;
//! - schemathesis checks every response against docs/openai-batch-api.yaml while it
//!   fuzzes every endpoint: no 5xx on any generated input.
//!
//! The Python tools come from scripts/setup-test-deps.sh (TOKENFAB_PYTHON). Without them
//! the test is skipped, except in CI (TOKENFAB_REQUIRE_LLAMA=1), where it fails.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;

const TENANT: &str = "acme-token";
const AGENT: &str = "agent-secret-of-the-tests";

fn python() -> Option<String> {
    python_with(&["openai", "schemathesis"])
}

/// An engine response without what differs between any two calls (its id and time).
fn comparable(r: &pb::ResultRecord) -> (u32, serde_json::Value, u64, u64) {
    let Some(pb::result_record::Outcome::Response(resp)) = &r.outcome else {
        panic!("not a response: {r:?}")
    };
    let mut body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let obj = body.as_object_mut().unwrap();
    obj.remove("id");
    obj.remove("created");
    let u = r.usage.unwrap_or_default();
    (resp.status_code, body, u.prompt_tokens, u.completion_tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_clients_work_unchanged_and_match_grpc() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let openai = format!("127.0.0.1:{}", free_port());
    let (server, addr) = start_server(
        dir.path(),
        &["--tenant", &format!("acme={TENANT}"), "--openai-listen", &openai],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let (emu, url) = spawn_emu(dir.path(), "emu", 10.0);
    let agent = spawn_agent(dir.path(), "n1", &format!("http://{addr}"), &url, 8, AGENT);
    let procs = [server, emu, agent];
    wait_registered(&procs, Duration::from_secs(30)).await;
    let base = format!("http://{openai}/v1");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/openai_client.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .env("TOKENFAB_OPENAI_URL", &base)
        .env("TOKENFAB_TOKEN", TENANT)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "the openai client failed:\n{stdout}\n{}\n--- server\n{}",
        String::from_utf8_lossy(&out.stderr),
        procs[0].log()
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let rest_id = seen["batch"].as_str().unwrap().to_string();
    assert!(seen["partial"].as_u64().unwrap() >= 1, "{seen}");

    // The same file over gRPC: the same results and the same usage.
    let mut lines: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"custom_id": "req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {{"model": "llama-3.1-8b", "messages": [{{"role": "user", "content": "question {i}"}}], "max_tokens": 16}}}}"#
            )
        })
        .collect();
    lines.insert(5, "this line is not JSON".into());
    let mut c = tenant_client(addr, TENANT).await;
    let grpc_id = c
        .create_batch(pb::CreateBatchRequest {
            options: Some(pb::BatchOptions {
                model: "llama-3.1-8b".into(),
                completion_window_seconds: 3600,
                ..Default::default()
            }),
            input_jsonl: format!("{}\n", lines.join("\n")).into_bytes().into(),
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .id;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (grpc, rest) = loop {
        let get = |id: String| async {
            tenant_client(addr, TENANT)
                .await
                .get_batch(pb::GetBatchRequest { batch_id: id })
                .await
                .unwrap()
                .into_inner()
        };
        let g = get(grpc_id.clone()).await;
        if g.status == pb::BatchStatus::Completed as i32 {
            break (g, get(rest_id.clone()).await);
        }
        assert!(Instant::now() < deadline, "{g:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (gu, ru) = (grpc.usage.unwrap(), rest.usage.unwrap());
    assert_eq!(
        (gu.prompt_tokens, gu.completion_tokens),
        (ru.prompt_tokens, ru.completion_tokens)
    );
    assert_eq!(counts(&grpc), counts(&rest));
    let by_id = |rows: Vec<pb::ResultRecord>| -> BTreeMap<String, (u32, serde_json::Value, u64, u64)> {
        rows.iter().map(|r| (r.custom_id.clone(), comparable(r))).collect()
    };
    let g = by_id(all_results(addr, TENANT, &grpc_id, pb::ResultKind::Output).await);
    let r = by_id(all_results(addr, TENANT, &rest_id, pb::ResultKind::Output).await);
    assert_eq!(g.len(), 40);
    assert_eq!(
        g, r,
        "the same requests get the same answers and usage through either door"
    );
    let ge = all_results(addr, TENANT, &grpc_id, pb::ResultKind::Errors).await;
    let re = all_results(addr, TENANT, &rest_id, pb::ResultKind::Errors).await;
    assert_eq!(
        ge.iter().map(|e| (e.line, e.outcome.clone())).collect::<Vec<_>>(),
        re.iter().map(|e| (e.line, e.outcome.clone())).collect::<Vec<_>>()
    );

    // Every response conforms to the OpenAPI document, and no generated input makes the
    // server fail (5xx).
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openai-batch-api.yaml");
    let st = std::path::Path::new(&python).with_file_name("schemathesis");
    let st = if st.exists() {
        st.into_os_string()
    } else {
        "schemathesis".into()
    };
    let out = std::process::Command::new(st)
        .args([
            "run",
            spec,
            "--url",
            &format!("http://{openai}"),
            "-H",
            &format!("Authorization: Bearer {TENANT}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "25",
            "--generation-deterministic",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
    assert!(procs.iter().all(|p| !p.log().contains("panicked")));
}
