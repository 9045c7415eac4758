//! Admission control and best-effort work, end to end with real processes on loopback:
//! one control plane, one agent, one engine emulator (standing in for an H100, at 20x
//! time). A batch whose completion window cannot be met is refused with the earliest
//! completion the cluster could promise, or accepted as best-effort when the tenant asks;
//! committed work overtakes queued best-effort work, which still completes.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;

const TENANT: &str = "acme-token";
const AGENT: &str = "agent-secret-of-the-tests";

fn batch(prefix: &str, n: usize, max_tokens: u32) -> Vec<u8> {
    (0..n)
        .map(|i| chat_line(&format!("{prefix}-{i:05}"), max_tokens))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

fn options(window_s: u64, class: &str, best_effort_if_late: bool) -> Option<pb::BatchOptions> {
    Some(pb::BatchOptions {
        model: "llama-3.1-8b".into(),
        completion_window_seconds: window_s,
        sla_class: class.into(),
        best_effort_if_late,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_batches_are_refused_with_the_earliest_time_and_best_effort_work_yields() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let (server, addr) = start_server(
        dir.path(),
        &[
            "--tenant",
            &format!("acme={TENANT}"),
            "--metrics-listen",
            &format!("127.0.0.1:{http_port}"),
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let (emu, emu_url) = spawn_emu(dir.path(), "emu", 20.0);
    let agent = spawn_agent(dir.path(), "node0", &format!("http://{addr}"), &emu_url, 32, AGENT);
    let procs = [emu, agent];
    wait_registered(&procs, Duration::from_secs(30)).await;
    let agent = &procs[1];
    let mut client = tenant_client(addr, TENANT).await;

    // 20,000 requests of 2,000 output tokens cannot finish on one H100 in a minute.
    let huge = batch("huge", 20_000, 2000);
    let err = client
        .create_batch(pb::CreateBatchRequest {
            options: options(60, "", false),
            input_jsonl: huge.clone().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("cannot complete within its 1m window"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("earliest completion"), "{}", err.message());
    let earliest_ms: i64 = err
        .metadata()
        .get("tokenfab-earliest-completion-unix-ms")
        .expect("the earliest time travels as metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        earliest_ms > now_ms + 60_000,
        "earliest {earliest_ms} is not after the asked minute"
    );

    // Asked to, the cluster takes it as best-effort instead (then the tenant cancels it).
    let accepted = client
        .create_batch(pb::CreateBatchRequest {
            options: options(60, "", true),
            input_jsonl: huge.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    assert_eq!(accepted.sla_class, "best-effort");
    client
        .cancel_batch(pb::CancelBatchRequest { batch_id: accepted.id })
        .await
        .unwrap();

    // Best-effort work queued first; committed work submitted after overtakes it.
    let mut ids = Vec::new();
    for (class, prefix, n, tokens) in [("best-effort", "be", 600, 200), ("", "std", 200, 50)] {
        let b = client
            .create_batch(pb::CreateBatchRequest {
                options: options(3600, class, false),
                input_jsonl: batch(prefix, n, tokens).into(),
            })
            .await
            .unwrap()
            .into_inner()
            .batch
            .unwrap();
        ids.push(b.id);
    }
    let (be, committed) = (ids[0].clone(), ids[1].clone());
    let mut done = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.len() < 2 {
        for id in [&be, &committed] {
            let b = client
                .get_batch(pb::GetBatchRequest { batch_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if is_final(&b) {
                assert_eq!(b.status, pb::BatchStatus::Completed as i32, "{b:?}");
                done.entry(id.clone()).or_insert(b.completed_at_unix_ms);
            }
        }
        assert!(
            Instant::now() < deadline,
            "batches not done:\n{}\n{}",
            server.log(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        done[&committed] < done[&be],
        "the committed batch finished at {} ms, after the best-effort one ({} ms)",
        done[&committed],
        done[&be]
    );

    // Token accounting: the tenant's usage is exactly the sum over its batches.
    let listed = client
        .list_batches(pb::ListBatchesRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .batches;
    assert_eq!(listed.len(), 3, "the refused batch is not one");
    let sum = listed.iter().fold(pb::Usage::default(), |mut s, b| {
        let u = b.usage.unwrap_or_default();
        s.prompt_tokens += u.prompt_tokens;
        s.completion_tokens += u.completion_tokens;
        s.joules += u.joules;
        s.cost_usd += u.cost_usd;
        s
    });
    let metered = client
        .get_usage(pb::GetUsageRequest {
            since_unix_ms: 0,
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let u = metered.usage.unwrap();
    assert_eq!(metered.batches, 3);
    let completed: u64 = listed.iter().map(|b| u64::from(counts(b).completed)).sum();
    assert_eq!(metered.requests_completed, completed);
    assert!(
        completed >= 800,
        "600 best-effort + 200 committed, and what of the cancelled one ran"
    );
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens),
        (sum.prompt_tokens, sum.completion_tokens)
    );
    assert!(u.completion_tokens >= 600 * 200 + 200 * 50);
    assert!((u.joules - sum.joules).abs() <= 1e-9 * sum.joules.max(1.0));
    assert!((u.cost_usd - sum.cost_usd).abs() <= 1e-9 * sum.cost_usd.max(1.0));
    assert!(u.joules > 0.0 && u.cost_usd > 0.0, "energy and cost are metered: {u:?}");
    let env = [
        ("TOKENFAB_CONTROL", format!("http://{addr}")),
        ("TOKENFAB_TOKEN", TENANT.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run_cli(&["usage", "--since", "1h"], &env);
    let grouped = {
        let d = u.completion_tokens.to_string();
        let mut g = String::new();
        for (i, ch) in d.chars().enumerate() {
            if i > 0 && (d.len() - i) % 3 == 0 {
                g.push(',');
            }
            g.push(ch);
        }
        g
    };
    assert!(out.contains(&grouped), "{grouped} not in:\n{out}");

    // The published SLA document: valid against its schema, and saying what happened.
    let sla_url = format!("http://127.0.0.1:{http_port}");
    let text = http_text(&format!("{sla_url}/v1/sla")).await;
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pool = &doc["pools"][0];
    assert_eq!(pool["model"], "llama-3.1-8b", "{doc:#}");
    assert_eq!(pool["accelerator"], "h100-sxm", "{doc:#}");
    assert_eq!(pool["devices"], 1);
    assert!(pool["measuredOutputTokensPerSecond"].as_f64().unwrap() > 0.0, "{doc:#}");
    assert!(
        pool["committedOutputTokensPerSecond"].as_f64().unwrap() > 0.0,
        "{doc:#}"
    );
    assert_eq!(
        pool["outputTokens"].as_u64().unwrap(),
        u.completion_tokens,
        "every result counts"
    );
    let classes = doc["classes"].as_array().unwrap();
    let class = |name: &str| {
        classes
            .iter()
            .find(|c| c["class"] == name)
            .unwrap_or_else(|| panic!("{doc:#}"))
    };
    assert_eq!(class("standard")["onTime"], 1);
    assert_eq!(class("standard")["committed"], true);
    assert_eq!(
        class("best-effort")["batches"],
        1,
        "the batch the tenant cancelled is not counted"
    );
    validate_against_schema(&text, dir.path());
    // The same measurement as llm-d Benchmark Reports (one per pool), valid against the
    // llm-d schema, with the pool's figures where the fields map.
    let reports = http_text(&format!("{sla_url}/v1/sla/llm-d")).await;
    let parsed: serde_json::Value = serde_json::from_str(&reports).unwrap();
    let report = &parsed[0];
    let agg = &report["results"]["request_performance"]["aggregate"];
    assert_eq!(
        agg["requests"]["total"].as_u64(),
        pool["requests"].as_u64(),
        "{report:#}"
    );
    assert_eq!(
        agg["latency"]["request_latency"]["p99"], pool["requestLatencySeconds"]["p99"],
        "{report:#}"
    );
    assert_eq!(
        report["scenario"]["stack"][0]["standardized"]["model"]["name"],
        "llama-3.1-8b"
    );
    match llmd_schema() {
        Some(schema) => validate(&reports, &schema, true, dir.path()),
        None => eprintln!("skipping the llm-d schema check: shared/data/third-party is not beside this checkout"),
    }
    // The same document over gRPC (SlaService), for any tenant.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {TENANT}").parse().unwrap();
    let mut sla = tokenfab_proto::v1::sla_service_client::SlaServiceClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        },
    );
    let wire = sla.get_sla(pb::GetSlaRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (wire.api_version.as_str(), wire.kind.as_str()),
        ("tokenfab.io/v1", "ThroughputSLA")
    );
    assert_eq!(wire.pools[0].output_tokens, u.completion_tokens);
    assert_eq!(wire.classes.len(), classes.len());
    // Metering and the SLA figures are exported as Prometheus metrics too (refreshed every
    // 5 s).
    let tenant_gauge = "tokenfab_control_tenant_output_tokens_total{tenant=\"acme\"}";
    let sla_gauge =
        "tokenfab_control_sla_measured_output_tokens_per_second{model=\"llama-3.1-8b\",accelerator=\"h100-sxm\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = http_text(&format!("{sla_url}/metrics")).await;
        let exported = metric_value(&metrics, tenant_gauge);
        let measured = metric_value(&metrics, sla_gauge);
        // A refresh taken after the last result carries exactly the metered usage.
        if exported == Some(u.completion_tokens as f64) && measured.is_some_and(|v| v > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{tenant_gauge} is {exported:?}, not {} as metered, or {sla_gauge} is not above 0, in:\n{metrics}",
            u.completion_tokens
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = run_cli(&["sla", "--url", &sla_url], &[]);
    assert!(
        out.contains("ThroughputSLA") && out.contains("h100-sxm") && out.contains("best-effort"),
        "{out}"
    );
}

/// Validates `json` against docs/throughput-sla.schema.json with Python's `jsonschema`
/// (installed by scripts/setup-test-deps.sh). Without it the check is skipped, except in
/// CI (TOKENFAB_REQUIRE_LLAMA=1), where it fails.
fn validate_against_schema(json: &str, dir: &std::path::Path) {
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/throughput-sla.schema.json");
    validate(json, std::path::Path::new(schema), false, dir);
}

/// The llm-d Benchmark Report schema (v0.2.1, from llm-d/llm-d-benchmark, Apache-2.0),
/// which the project reads from the `shared/data/third-party` folder beside its checkout
/// instead of copying it.
fn llmd_schema() -> Option<std::path::PathBuf> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/third-party/llm-d-benchmark-report-v0.2.1.schema.json");
    path.exists().then_some(path)
}

/// Validates `json` against the JSON Schema at `schema` (each element, if `each`) with
/// Draft 2020-12 and format checking.
fn validate(json: &str, schema: &std::path::Path, each: bool, dir: &std::path::Path) {
    let python = std::env::var("TOKENFAB_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = std::process::Command::new(&python)
        .args(["-c", "import jsonschema"])
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        assert!(
            std::env::var("TOKENFAB_REQUIRE_LLAMA").is_err(),
            "{python} has no jsonschema: run scripts/setup-test-deps.sh"
        );
        eprintln!("skipping the JSON Schema check: {python} has no jsonschema (run scripts/setup-test-deps.sh)");
        return;
    }
    let doc = dir.join("document.json");
    std::fs::write(&doc, json).unwrap();
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import json,sys,jsonschema
V=jsonschema.Draft202012Validator
s=json.load(open(sys.argv[1])); V.check_schema(s)
d=json.load(open(sys.argv[2]))
docs=d if sys.argv[3]=='each' else [d]
assert docs, 'no document'
for x in docs: V(s, format_checker=V.FORMAT_CHECKER).validate(x)
print('valid', len(docs))",
            schema.to_str().unwrap(),
            doc.to_str().unwrap(),
            if each { "each" } else { "one" },
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the document does not match {}:\n{}\n{json}",
        schema.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
