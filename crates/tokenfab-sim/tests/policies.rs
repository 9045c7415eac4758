//! The control plane's policies, measured in the simulator: weighted fair sharing of
//! best-effort capacity, and admission control keeping admitted batches on time under
//! overload.

use std::path::Path;
use tokenfab_sim::{Scenario, run};

/// Three best-effort tenants, weights 2:1:1, each asking for more than the node has.
const CONTENTION: &str = r#"
name: contention
description: three tenants want more than two H100s deliver
duration: 40m
seed: 9
pools:
  - {name: h100, accelerator: h100-sxm, nodes: 1, devices_per_node: 2}
deployments:
  - {pool: h100, model: llama-3.1-8b, window: 64}
workload:
  tenants:
    - {name: a, weight: 2, model: llama-3.1-8b, arrivals: {kind: poisson, batches_per_hour: 150}, batch_size: {kind: fixed, value: 400}, prompt_tokens: {kind: fixed, value: 300}, output_tokens: {kind: lognormal, mean: 600, sigma: 0.3, min: 64, max: 2000}, completion_window: 15m, sla_class: best-effort}
    - {name: b, weight: 1, model: llama-3.1-8b, arrivals: {kind: poisson, batches_per_hour: 150}, batch_size: {kind: fixed, value: 400}, prompt_tokens: {kind: fixed, value: 300}, output_tokens: {kind: lognormal, mean: 600, sigma: 0.3, min: 64, max: 2000}, completion_window: 15m, sla_class: best-effort}
    - {name: c, weight: 1, model: llama-3.1-8b, arrivals: {kind: poisson, batches_per_hour: 150}, batch_size: {kind: fixed, value: 400}, prompt_tokens: {kind: fixed, value: 300}, output_tokens: {kind: lognormal, mean: 600, sigma: 0.3, min: 64, max: 2000}, completion_window: 15m, sla_class: best-effort}
"#;

#[test]
fn best_effort_capacity_goes_to_tenants_by_weight_under_contention() {
    let s = Scenario::parse(CONTENTION, "contention.yaml").unwrap();
    let r = run(&s, Path::new("."), s.seed, |_| {}).unwrap();
    assert!(
        r.utilization > 0.95,
        "contention keeps the devices busy: {}",
        r.utilization
    );
    let total: u64 = r.tenants.iter().map(|t| t.served_output_tokens).sum();
    let weights = [0.5, 0.25, 0.25];
    for (t, w) in r.tenants.iter().zip(weights) {
        let share = t.served_output_tokens as f64 / total as f64;
        assert!(
            (share / w - 1.0).abs() < 0.05,
            "tenant {} got {:.3} of the capacity, its weight is {w}",
            t.name,
            share
        );
    }
}

/// One committed tenant asking for about twice what two H100s deliver in time.
fn overload(admission: bool) -> String {
    format!(
        r#"
name: overload
description: committed batches arrive faster than two H100s finish them
duration: 40m
seed: 4
pools:
  - {{name: h100, accelerator: h100-sxm, nodes: 1, devices_per_node: 2}}
deployments:
  - {{pool: h100, model: llama-3.1-8b, window: 64}}
workload:
  tenants:
    - {{name: a, model: llama-3.1-8b, arrivals: {{kind: poisson, batches_per_hour: 200}}, batch_size: {{kind: fixed, value: 500}}, prompt_tokens: {{kind: fixed, value: 300}}, output_tokens: {{kind: lognormal, mean: 500, sigma: 0.3, min: 64, max: 2000}}, completion_window: 10m}}
policies: {{admission: {admission}}}
"#
    )
}

#[test]
fn admission_keeps_admitted_batches_on_time_under_overload() {
    let on = Scenario::parse(&overload(true), "on.yaml").unwrap();
    let off = Scenario::parse(&overload(false), "off.yaml").unwrap();
    let with = run(&on, Path::new("."), on.seed, |_| {}).unwrap();
    let without = run(&off, Path::new("."), off.seed, |_| {}).unwrap();
    assert!(
        without.batches.sla_attainment < 0.9,
        "the scenario overloads the cluster: {} on time without admission",
        without.batches.sla_attainment
    );
    assert!(with.requests.refused > 0, "admission refuses some batches");
    assert!(
        with.batches.sla_attainment >= 0.999,
        "admitted batches on time: {}",
        with.batches.sla_attainment
    );
}

/// A light load on a node of eight H100s: placement's advice for the busiest hour is fewer
/// replicas (the rest stopped), and the report counts free and stranded devices of the
/// scenario's layout (here: three 70B replicas at TP 2 on six devices leave an aligned pair
/// free, which another 70B replica could use: none stranded).
#[test]
fn the_report_advises_a_smaller_layout_for_a_light_load_and_counts_stranded_devices() {
    let yaml = r#"
name: light
description: little 70B work on eight H100s
duration: 30m
seed: 3
pools:
  - {name: h100, accelerator: h100-sxm, nodes: 1, devices_per_node: 8}
deployments:
  - {pool: h100, model: llama-3.1-70b, tensor_parallel: 2, replicas_per_node: 3, window: 64}
workload:
  tenants:
    - {name: a, model: llama-3.1-70b, arrivals: {kind: poisson, batches_per_hour: 4}, batch_size: {kind: fixed, value: 50}, prompt_tokens: {kind: fixed, value: 300}, output_tokens: {kind: fixed, value: 100}, completion_window: 1h}
"#;
    let s = Scenario::parse(yaml, "light.yaml").unwrap();
    let r = run(&s, Path::new("."), s.seed, |_| {}).unwrap();
    assert_eq!(
        (r.fragmentation.devices, r.fragmentation.free),
        (8, 2),
        "{:?}",
        r.fragmentation
    );
    assert_eq!(
        r.fragmentation.stranded, 0,
        "a free aligned pair fits another 70B replica"
    );
    let advice = r.placement_advice.expect("arrivals give a demand");
    assert_eq!(advice.replicas_now, 3);
    assert_eq!(advice.replicas_planned, 1, "{advice:?}");
    assert_eq!(advice.stop.len(), 2, "{advice:?}");
    assert!(advice.demand[0].tokens_per_s > 0.0 && advice.demand[0].unmet_tokens_per_s == 0.0);
}
