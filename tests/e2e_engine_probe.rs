//! A replica whose engine does not answer (in Kubernetes: no engine pod on the agent's
//! node behind the node-local Service, because the operator scaled the engine where
//! placement wants it) takes no work and does not count as capacity, and joins when its
//! engine appears. Real processes on loopback: a control plane, one agent with two
//! replicas, and an engine emulator for one of them; the second emulator starts later on
//! the port the other replica names.

mod common;

use common::*;
use std::time::{Duration, Instant};

const TENANT: &str = "acme-token-probe";
const AGENT: &str = "agent-secret-of-the-tests";

/// The SLA document's replica count of the H100 pool.
async fn sla_replicas(http: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&http_text(&format!("http://{http}/v1/sla")).await).unwrap();
    v["pools"]
        .as_array()
        .and_then(|p| p.first())
        .and_then(|p| p["replicas"].as_u64())
        .unwrap_or(0)
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> F,
    procs: &[Proc],
) {
    let deadline = Instant::now() + within;
    while !f().await {
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| format!("--- {}\n{}", p.name, p.log())).collect();
            panic!("{what} did not happen within {within:?}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_does_not_answer_takes_no_work_and_is_not_capacity_until_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let (mut server, addr) = start_server(
        dir.path(),
        &["--tenant", &format!("acme={TENANT}"), "--metrics-listen", &http],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    wait_tcp(http.parse().unwrap(), Duration::from_secs(20), &mut [&mut server]);
    let (emu, engine) = spawn_emu(dir.path(), "emu-r0", 20.0);
    let absent_port = free_port();
    let absent = format!("http://127.0.0.1:{absent_port}");
    let agent_http = format!("127.0.0.1:{}", free_port());
    let agent = Proc::spawn(
        "agent-n1",
        dir.path(),
        &[
            "agent",
            "--control",
            &format!("http://{addr}"),
            "--node",
            "n1",
            "--devices",
            "none",
            "--accelerator",
            "h100-sxm",
            "--replica",
            &format!("url={engine},model=llama-3.1-8b,id=r0,window=8"),
            "--replica",
            &format!("url={absent},model=llama-3.1-8b,id=r1,window=8"),
            "--engine-probe-interval",
            "1s",
            "--metrics-listen",
            &agent_http,
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let mut procs = vec![server, emu, agent];
    wait_registered(&procs, Duration::from_secs(20)).await;

    // The absent engine is seen as such, and the SLA commits one replica, not two.
    let gauge = "tokenfab_agent_replica_engine_reachable{replica=\"r1\",model=\"llama-3.1-8b\"}";
    let metrics = format!("http://{agent_http}/metrics");
    wait_until(
        "the agent marking r1 unreachable",
        Duration::from_secs(20),
        || async { metric_value(&http_text(&metrics).await, gauge) == Some(0.0) },
        &procs,
    )
    .await;
    wait_until(
        "the SLA counting one replica",
        Duration::from_secs(20),
        || async { sla_replicas(&http).await == 1 },
        &procs,
    )
    .await;

    // A batch runs entirely on the engine that answers, with no failed call.
    let id = create(addr, TENANT, chat_batch("probe", 40, 16)).await;
    let done = wait_completed(addr, TENANT, &id, Duration::from_secs(120), &procs).await;
    assert_eq!(counts(&done).completed, 40, "{done:?}");
    // The agent's counters follow its heartbeats (every second).
    let r0 = "tokenfab_agent_replica_requests_total{replica=\"r0\",model=\"llama-3.1-8b\"}";
    wait_until(
        "the agent counting 40 answers from r0",
        Duration::from_secs(10),
        || async { metric_value(&http_text(&metrics).await, r0) == Some(40.0) },
        &procs,
    )
    .await;
    let text = http_text(&metrics).await;
    let value = |name: &str, replica: &str| {
        metric_value(
            &text,
            &format!("{name}{{replica=\"{replica}\",model=\"llama-3.1-8b\"}}"),
        )
    };
    assert_eq!(
        value("tokenfab_agent_replica_requests_total", "r0"),
        Some(40.0),
        "{text}"
    );
    assert_eq!(
        value("tokenfab_agent_replica_requests_total", "r1"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value("tokenfab_agent_replica_request_errors_total", "r1"),
        Some(0.0),
        "{text}"
    );
    assert!(
        procs[2].log().contains("does not answer"),
        "the agent says why r1 takes no work:\n{}",
        procs[2].log()
    );

    // Its engine appears: it counts again.
    let late = Proc::spawn(
        "emu-r1",
        dir.path(),
        &[
            "engine-emu",
            "--listen",
            &format!("127.0.0.1:{absent_port}"),
            "--time-scale",
            "20",
        ],
        &[],
    );
    procs.push(late);
    wait_until(
        "the SLA counting both replicas",
        Duration::from_secs(30),
        || async { sla_replicas(&http).await == 2 },
        &procs,
    )
    .await;
    assert_eq!(metric_value(&http_text(&metrics).await, gauge), Some(1.0));
}
