//! `sim compare`'s baselines: the hindsight-best static row is the best point of its grid,
//! and the row at the tuner's attainment is the best point that keeps the tuner's SLA
//! attainment without refusing more.

use std::path::Path;
use tokenfab_sim::Scenario;
use tokenfab_sim::compare::{CompareOptions, CompareRow, StaticConfig, compare};

/// Committed batches that two H100s can finish in time only at a large window and high
/// power: slower settings must refuse more (admission is on) or miss deadlines.
const TIGHT: &str = r#"
name: tight
description: committed batches that only a fast setting keeps without refusing
duration: 20m
seed: 5
pools:
  - {name: h100, accelerator: h100-sxm, nodes: 1, devices_per_node: 2}
deployments:
  - {pool: h100, model: llama-3.1-8b, window: 64}
workload:
  tenants:
    - {name: a, model: llama-3.1-8b, arrivals: {kind: poisson, batches_per_hour: 120}, batch_size: {kind: fixed, value: 400}, prompt_tokens: {kind: fixed, value: 300}, output_tokens: {kind: lognormal, mean: 500, sigma: 0.3, min: 64, max: 2000}, completion_window: 10m}
"#;

fn find<'a>(rows: &'a [CompareRow], name: &str) -> Option<&'a CompareRow> {
    rows.iter().find(|r| r.variant == name)
}

#[test]
fn the_static_rows_are_the_best_grid_points_under_their_rules() {
    let s = Scenario::parse(TIGHT, "tight.yaml").unwrap();
    let mut static_grid = Vec::new();
    for window in [8, 64, 512] {
        for power_fraction in [1.0, 0.5, 0.0] {
            static_grid.push(StaticConfig { window, power_fraction });
        }
    }
    let options = CompareOptions {
        oracle: false,
        static_grid,
        jobs: 2,
        ..CompareOptions::default()
    };
    let c = compare(&s, Path::new("."), s.seed, &options, |_| {}).unwrap();
    let grid = &c.static_grid;
    for r in c.rows.iter().chain(grid) {
        println!(
            "{:<28} {:.4} tok/J  on time {:.2}%  refused {:.2}%",
            r.variant,
            r.output_tokens_per_joule,
            r.sla_attainment * 100.0,
            r.refused_share * 100.0
        );
    }
    assert_eq!(grid.len(), 9, "one row per grid point");

    // The grid's points differ in what they keep: the comparison has something to choose.
    let attainments: Vec<f64> = grid.iter().map(|r| r.sla_attainment).collect();
    let refused: Vec<f64> = grid.iter().map(|r| r.refused_share).collect();
    assert!(
        refused.iter().cloned().fold(0.0, f64::max) > refused.iter().cloned().fold(1.0, f64::min) + 0.01
            || attainments.iter().cloned().fold(0.0, f64::max) > attainments.iter().cloned().fold(1.0, f64::min) + 0.01,
        "the scenario separates the settings: refused {refused:?}, on time {attainments:?}"
    );

    // hindsight-static: most tokens/J among the points at the grid's top attainment.
    let top = attainments.iter().cloned().fold(0.0, f64::max);
    let hindsight = find(&c.rows, "hindsight-static").expect("a hindsight-static row");
    for r in grid.iter().filter(|r| r.sla_attainment >= top) {
        assert!(
            hindsight.output_tokens_per_joule >= r.output_tokens_per_joule,
            "{} beats hindsight-static",
            r.variant
        );
    }
    assert!(hindsight.sla_attainment >= top);

    // At the tuner's attainment: the best point keeping its attainment, refusing no more.
    let tuner = find(&c.rows, "tuner").expect("a tuner row");
    let qualifies =
        |r: &CompareRow| r.sla_attainment >= tuner.sla_attainment && r.refused_share <= tuner.refused_share + 1e-12;
    match find(&c.rows, "hindsight-static-at-tuner") {
        Some(at) => {
            assert!(
                qualifies(at),
                "the row keeps the tuner's attainment: {at:?} vs {tuner:?}"
            );
            for r in grid.iter().filter(|r| qualifies(r)) {
                assert!(
                    at.output_tokens_per_joule >= r.output_tokens_per_joule,
                    "{} qualifies and beats the row",
                    r.variant
                );
            }
            let ratio = c.tuner_vs_static_at_equal_attainment.expect("the ratio");
            assert!((ratio - tuner.output_tokens_per_joule / at.output_tokens_per_joule).abs() < 1e-12);
        }
        None => {
            assert!(
                !grid.iter().any(qualifies),
                "a grid point qualifies, but there is no row"
            );
            assert!(c.tuner_vs_static_at_equal_attainment.is_none());
        }
    }
    // Refusing work must not make a static row look better at equal attainment: some grid
    // point qualifies here (the fastest keeps everything the tuner keeps).
    assert!(
        find(&c.rows, "hindsight-static-at-tuner").is_some(),
        "no grid point keeps the tuner's attainment: {:?}",
        grid.iter()
            .map(|r| (&r.variant, r.sla_attainment, r.refused_share))
            .collect::<Vec<_>>()
    );
}
