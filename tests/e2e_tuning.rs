//! The batch-size and power tuner, live: one control plane, one agent with `--tuner active`
//! and one engine emulator (an emulated H100 at 10x time, so wall-clock rates are ten times
//! the emulated ones throughout the system). A batch whose deadline needs about half of
//! full-power throughput makes the tuner settle on a large window at a reduced power
//! limit; the simulator, given the same load, predicts the same point. A second batch with
//! a tight deadline then raises the rate owed, and the tuner must deliver it again within
//! a stated bound.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;

const TENANT: &str = "acme-token";
const AGENT: &str = "agent-secret-of-the-tests";
const SCALE: f64 = 10.0;
/// The emulator counts this many prompt tokens for each line `chat_line` writes.
const PROMPT: u32 = 10;
const OUTPUT: u32 = 200;

/// How long the tuner may take to settle, and to deliver a raised rate, in wall time (x10
/// emulated).
const CONVERGE_WITHIN: Duration = Duration::from_secs(20);
const RECONVERGE_WITHIN: Duration = Duration::from_secs(10);

fn batch(prefix: &str, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| chat_line(&format!("{prefix}-{i:05}"), OUTPUT))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    window: u32,
    power_w: f64,
    converged: bool,
    owed: f64,
    measured: f64,
}

async fn point(url: &str) -> Option<Point> {
    let text = http_text(&format!("{url}/v1/tuning")).await;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let r = &v["replicas"][0];
    Some(Point {
        window: r["window"].as_u64()? as u32,
        power_w: r["power_limit_w"].as_f64()?,
        converged: r["converged"].as_bool()?,
        owed: r["owed_tokens_per_s"].as_f64()?,
        measured: r["measured_tokens_per_s"].as_f64()?,
    })
}

/// The point the simulator's tuner first settles on for `requests` requests due in
/// `window_emulated`, on the same emulated H100 with the same tuner settings.
fn simulated(requests: usize, window_emulated: Duration, dir: &std::path::Path) -> (u32, f64) {
    let trace = dir.join("batch.jsonl");
    let lines: Vec<String> = (0..requests)
        .map(|_| format!(r#"{{"t_s": 0, "prompt_tokens": {PROMPT}, "output_tokens": {OUTPUT}}}"#))
        .collect();
    std::fs::write(&trace, lines.join("\n")).unwrap();
    let yaml = format!(
        r#"
name: e2e-tuning
description: the live test's load
duration: 2s
pools:
  - {{name: h100, accelerator: h100-sxm, nodes: 1, devices_per_node: 1}}
deployments:
  - {{pool: h100, model: llama-3.1-8b, window: 64, max_num_seqs: 1024}}
workload:
  tenants:
    - name: acme
      model: llama-3.1-8b
      arrivals: {{kind: trace, file: {}, format: jsonl, batch_every: 1s}}
      completion_window: {}s
policies:
  admission: false
  tuner: {{mode: active}}
"#,
        trace.display(),
        window_emulated.as_secs()
    );
    let s = tokenfab_sim::Scenario::parse(&yaml, "e2e-tuning.yaml").unwrap();
    let mut sim = tokenfab_sim::Simulation::new(&s, dir, 1).unwrap();
    let step = Duration::from_secs(5);
    let mut at = tokenfab_core::Timestamp::ZERO;
    loop {
        at = at.saturating_add(step);
        let done = sim.run_until(at, &mut |_| {});
        let t = sim.tuners()[0].clone().expect("the tuner runs");
        if t.holding && t.moves > 0 {
            return (t.home_window, t.home_power_limit_w.expect("power is tuned"));
        }
        assert!(!done, "the simulated batch ended before the tuner settled: {t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tuner_settles_where_the_simulator_predicts_and_follows_a_tighter_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let (_server, addr) = start_server(
        dir.path(),
        &[
            "--tenant",
            &format!("acme={TENANT}"),
            "--metrics-listen",
            &http,
            // Admission estimates capacity at emulated rates; at 10x the live rates are ten
            // times higher, so it would refuse what the emulator finishes in time.
            "--no-admission",
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let port = free_port();
    let mut emu = Proc::spawn(
        "emu",
        dir.path(),
        &[
            "engine-emu",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--time-scale",
            &SCALE.to_string(),
            "--max-num-seqs",
            "1024",
        ],
        &[],
    );
    let engine = format!("http://127.0.0.1:{port}");
    wait_tcp(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(20),
        &mut [&mut emu],
    );
    let agent = Proc::spawn(
        "agent-node0",
        dir.path(),
        &[
            "agent",
            "--control",
            &format!("http://{addr}"),
            "--node",
            "node0",
            "--replica",
            &format!("url={engine},model=llama-3.1-8b,window=64,max=1024"),
            "--tuner",
            "active",
            // The simulator's default epoch (3 s) in emulated time.
            "--tuner-epoch",
            "300ms",
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let procs = [emu, agent];
    wait_registered(&procs, Duration::from_secs(30)).await;
    let url = format!("http://{http}");
    let client = tenant_client(addr, TENANT).await;

    // Batch A: 12,000 requests due in 40 s (400 s emulated): the control plane asks for
    // about 2.4M / (0.8 x 400) = 7,500 emulated tokens/s, half of what full power gives.
    let (requests, due) = (12_000, Duration::from_secs(40));
    let submit = |prefix: &'static str, n: usize, due: Duration| {
        let mut client = client.clone();
        async move {
            client
                .create_batch(pb::CreateBatchRequest {
                    options: Some(pb::BatchOptions {
                        model: "llama-3.1-8b".into(),
                        completion_window_seconds: due.as_secs(),
                        ..Default::default()
                    }),
                    input_jsonl: batch(prefix, n).into(),
                })
                .await
                .unwrap()
                .into_inner()
                .batch
                .unwrap()
                .id
        }
    };
    let a = submit("a", requests, due).await;
    let started = Instant::now();
    let settled = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(p) = point(&url).await
            && p.converged
            && p.owed > 0.0
        {
            break (p, started.elapsed());
        }
        assert!(
            started.elapsed() < CONVERGE_WITHIN,
            "the tuner did not settle within {CONVERGE_WITHIN:?}: {:?}\n{}",
            point(&url).await,
            procs[1].log()
        );
    };
    let (live, took) = settled;
    eprintln!(
        "live: settled on window {} at {:.0} W in {took:?} ({:.0} tokens/s owed, {:.0} measured, wall)",
        live.window, live.power_w, live.owed, live.measured
    );
    assert!(
        live.power_w < 600.0,
        "a half-loaded deadline leaves room to cap power: {live:?}"
    );
    assert!(live.measured >= live.owed, "{live:?}");

    // The simulator's prediction for the same load.
    let (window, power) = simulated(requests, due.mul_f64(SCALE), dir.path());
    eprintln!("simulator: settles on window {window} at {power:.0} W");
    let step_up = |w: u32| (f64::from(w) * 1.5).round() as u32 + 1;
    assert!(
        live.window <= step_up(window) && window <= step_up(live.window),
        "live window {} vs simulated {window}: more than one grid step apart",
        live.window
    );
    assert!(
        (live.power_w - power).abs() <= 70.0 + 1.0,
        "live power limit {:.0} W vs simulated {power:.0} W: more than one 70 W step apart",
        live.power_w
    );

    // Batch B: 6,000 requests due in 15 s (150 s emulated) raise the rate owed above what
    // the settled point delivers.
    let b = submit("b", 6_000, Duration::from_secs(15)).await;
    let changed = Instant::now();
    let (after, took) = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(p) = point(&url).await
            && p.owed > live.owed * 1.3
            && p.measured >= p.owed
            && p.converged
        {
            break (p, changed.elapsed());
        }
        assert!(
            changed.elapsed() < RECONVERGE_WITHIN,
            "the tuner did not deliver the raised rate within {RECONVERGE_WITHIN:?}: {:?}\n{}",
            point(&url).await,
            procs[1].log()
        );
    };
    eprintln!(
        "after the tight batch: window {} at {:.0} W in {took:?} ({:.0} owed, {:.0} measured)",
        after.window, after.power_w, after.owed, after.measured
    );
    assert!(after.power_w > live.power_w, "{after:?} vs {live:?}");
    // Every decision is in the agent's log with its reason.
    let log = procs[1].log();
    assert!(log.contains("tuner: model:"), "{log}");
    // Both batches complete on time.
    for id in [a, b] {
        let v = wait_completed(addr, TENANT, &id, Duration::from_secs(90), &procs).await;
        assert!(
            v.completed_at_unix_ms <= v.deadline_unix_ms,
            "{id} finished late: {v:?}"
        );
    }
    // The online recalibration measured what the belief (the performance model, in
    // emulated time) got wrong here: every step takes a tenth of the believed time, since
    // the emulator runs at 10x. It shows in /v1/tuning and in the metrics.
    let doc: serde_json::Value = serde_json::from_str(&http_text(&format!("{url}/v1/tuning")).await).unwrap();
    let c = &doc["replicas"][0]["calibration"];
    eprintln!("recalibration: {c}");
    assert_eq!(doc["replicas"][0]["belief"], "model", "{doc}");
    let time = c["time"].as_f64().expect("a time correction");
    // Each interval needs the window and power limit unchanged for 5 s, which the tuner's
    // moves interrupt: one or more, depending on how busy the machine is.
    let samples = c["samples"].as_u64().unwrap();
    assert!(samples >= 1, "{c}");
    if samples >= 2 {
        assert!(c["model_error"].as_f64().unwrap() < 0.05, "{c}");
    }
    assert!(
        (time * SCALE - 1.0).abs() < 0.15,
        "steps take 1/{SCALE} of the believed time, measured x{time:.3}"
    );
    // The metrics are refreshed every few seconds (not on each scrape), so the correction
    // shows there within one refresh.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = http_text(&format!("{url}/metrics")).await;
        let shown: f64 = metrics
            .lines()
            .find(|l| l.starts_with("tokenfab_control_replica_step_time_correction_ratio{"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("the correction is a metric:\n{metrics}"));
        if (shown * SCALE - 1.0).abs() < 0.15 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the metric still shows x{shown} 15 s after /v1/tuning showed x{time}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
