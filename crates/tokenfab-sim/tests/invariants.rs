//! Determinism and conservation of the simulator, on small scenarios.

use std::path::Path;
use tokenfab_sim::{Scenario, run};

const SMALL: &str = r#"
name: small
description: two nodes, two tenants, some batches expire
duration: 10m
seed: 3
pools:
  - {name: h100, accelerator: h100-sxm, nodes: 2, devices_per_node: 4}
  - {name: l40s, accelerator: l40s, nodes: 1, devices_per_node: 2}
deployments:
  - {pool: h100, model: llama-3.1-8b, replicas_per_node: 3, window: 32}
  - {pool: l40s, model: llama-3.1-8b, window: 16}
workload:
  tenants:
    - name: a
      model: llama-3.1-8b
      arrivals: {kind: poisson, batches_per_hour: 120}
      batch_size: {kind: uniform, min: 50, max: 300}
      prompt_tokens: {kind: lognormal, mean: 300, sigma: 0.6, min: 8, max: 4000}
      output_tokens: {kind: lognormal, mean: 60, sigma: 0.6, min: 1, max: 400}
      completion_window: 30m
    - name: b
      model: llama-3.1-8b
      arrivals: {kind: diurnal, mean_batches_per_hour: 60, peak_to_trough: 3}
      batch_size: {kind: fixed, value: 400}
      completion_window: 20s
      sla_class: best-effort
"#;

fn small() -> Scenario {
    Scenario::parse(SMALL, "small.yaml").unwrap()
}

#[test]
fn same_scenario_and_seed_give_a_byte_identical_report() {
    let s = small();
    let dir = tempfile::tempdir().unwrap();
    let a = run(&s, Path::new("."), 3, |_| {}).unwrap();
    let b = run(&s, Path::new("."), 3, |_| {}).unwrap();
    a.write(&dir.path().join("a")).unwrap();
    b.write(&dir.path().join("b")).unwrap();
    for f in ["report.json", "sla.json", "series.csv", "batches.csv"] {
        let x = std::fs::read(dir.path().join("a").join(f)).unwrap();
        let y = std::fs::read(dir.path().join("b").join(f)).unwrap();
        assert!(x == y, "{f} differs between two runs with the same seed");
    }
    let c = run(&s, Path::new("."), 4, |_| {}).unwrap();
    assert_ne!(a.to_json(), c.to_json(), "another seed gives another run");
}

#[test]
fn every_request_ends_exactly_once_and_tokens_and_energy_add_up() {
    let s = small();
    let r = run(&s, Path::new("."), 3, |_| {}).unwrap();
    let q = &r.requests;
    assert!(q.arrived > 5_000, "a meaningful run: {} requests", q.arrived);
    // Every arrived request is completed, failed (which includes expired) or refused, once.
    assert_eq!(q.completed + q.failed + q.refused, q.arrived);
    let per_batch: u64 = r.batch_records.iter().map(|b| u64::from(b.completed + b.failed)).sum();
    let sizes: u64 = r.batch_records.iter().map(|b| u64::from(b.requests)).sum();
    assert_eq!(per_batch, sizes, "every batch accounts for each of its requests");
    assert_eq!(r.batches.arrived, r.batch_records.len() as u64, "every batch ended");
    // The 20 s window of tenant b cannot always be met: some batches expire, and their
    // unfinished requests fail exactly once too.
    assert!(
        r.batches.by_status.get("expired").copied().unwrap_or(0) > 0,
        "{:?}",
        r.batches.by_status
    );
    // Tokens: what the results report is what the engines computed for them.
    let completed_output: u64 = r.batch_records.iter().map(|b| b.usage.completion_tokens).sum();
    assert_eq!(completed_output, q.completion_tokens);
    assert!(q.completion_tokens <= q.workload_output_tokens);
    assert!(
        r.engine_output_tokens >= q.completion_tokens,
        "engines also ran requests whose batch expired meanwhile"
    );
    // Energy: the agents' attributed + idle energy is the engines' measured energy (the
    // agents read their devices one last time at the end).
    let engine_energy: f64 = r.pools.iter().map(|p| p.energy_j).sum::<f64>()
        - r.pools
            .iter()
            .map(|p| f64::from(p.idle_devices) * p.idle_power_w / f64::from(p.devices) * r.simulated_s)
            .sum::<f64>();
    let agents = r.energy_attributed_j + r.energy_agent_idle_j;
    let slack = 1e-6 * engine_energy;
    assert!(
        (engine_energy - agents).abs() < slack,
        "measured {engine_energy} J, attributed + idle {agents} J"
    );
    // Idle energy is shared among the tenants, or charged to nobody when no tenant had
    // used the cluster within the SLA window: none is lost or counted twice.
    let shared: f64 = r.tenants.iter().map(|t| t.idle_energy_share_j).sum();
    assert!(shared > 0.0);
    assert!(
        (shared + r.energy_idle_unallocated_j - r.energy_agent_idle_j).abs() < 1e-6 * r.energy_agent_idle_j,
        "idle {} J = shared {shared} J + unallocated {} J",
        r.energy_agent_idle_j,
        r.energy_idle_unallocated_j
    );
    let tenant_attributed: f64 = r.tenants.iter().map(|t| t.attributed_energy_j).sum();
    let batch_attributed: f64 = r.batch_records.iter().map(|b| b.usage.joules).sum();
    assert!((tenant_attributed - batch_attributed).abs() < 1e-6 * batch_attributed);
    // Energy is the integral of power: the series' power over time adds up to the total.
    let series_energy: f64 = {
        let mut e = 0.0;
        let mut last_t = 0.0;
        for p in r.series.iter().filter(|p| p.pool == "h100") {
            e += p.power_w * (p.t_s - last_t);
            last_t = p.t_s;
        }
        e
    };
    let h100 = r.pools.iter().find(|p| p.name == "h100").unwrap();
    assert!(
        (series_energy / h100.energy_j - 1.0).abs() < 1e-6,
        "{series_energy} vs {}",
        h100.energy_j
    );
}

#[test]
fn streamed_batch_records_match_the_kept_ones_and_the_totals() {
    // `tokenfab sim` streams each batch's record to batches.csv as it ends and keeps only
    // totals and histograms; the file and the report must say what the kept records say.
    let s = small();
    let dir = tempfile::tempdir().unwrap();
    let kept = run(&s, Path::new("."), s.seed, |_| {}).unwrap();
    assert!(kept.records_kept && !kept.batch_records.is_empty());
    kept.write(dir.path()).unwrap();
    let csv = dir.path().join("streamed.csv");
    let streamed = tokenfab_sim::run_with(
        &s,
        Path::new("."),
        s.seed,
        &tokenfab_sim::BatchRecords::Csv(csv.clone()),
        |_| {},
    )
    .unwrap();
    assert!(!streamed.records_kept && streamed.batch_records.is_empty());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("batches.csv")).unwrap(),
        std::fs::read_to_string(&csv).unwrap(),
        "the streamed file is the one written from the kept records"
    );
    assert_eq!(kept.to_json(), streamed.to_json(), "the same report either way");
    // The report's figures from its histograms against the exact ones from the records.
    let mut times: Vec<f64> = kept
        .batch_records
        .iter()
        .map(|b| b.ended.since(b.arrived).as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let nearest_rank = |p: f64| times[((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
    let c = kept.batches.completion_s;
    for (p, got) in [(0.5, c.p50), (0.9, c.p90), (0.99, c.p99)] {
        let exact = nearest_rank(p);
        assert!((got - exact).abs() <= exact * 1e-3 + 1e-6, "p{p}: {got} vs {exact}");
    }
    assert_eq!(c.max, *times.last().unwrap());
    assert!((c.mean - times.iter().sum::<f64>() / times.len() as f64).abs() < 1e-9);
    let met = kept.batch_records.iter().filter(|b| b.met).count() as f64;
    assert_eq!(kept.batches.sla_attainment, met / times.len() as f64);
    // A file that cannot be created is an error that names it, not a panic.
    let bad = dir.path().join("batches.csv").join("not-a-dir.csv");
    let err = tokenfab_sim::run_with(
        &s,
        Path::new("."),
        s.seed,
        &tokenfab_sim::BatchRecords::Csv(bad),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not-a-dir.csv"), "{err}");
}
