//! The operating curve of one model on one accelerator: output tokens per joule and
//! inter-token latency against the batch size (the concurrency window), from the
//! performance model, with the point tokenfab's tuner settles on marked.
//!
//! The curve is the performance model's steady state (every sequence of the batch running,
//! prefill interleaved with decode as continuous batching does) at full power and at the
//! tuner's chosen power limit. The chosen point is not read off the curve: the simulator
//! runs the tuner on one replica under a load that keeps it saturated with no deadline
//! pressure, and reports where the tuner settles by measurement (the model is what the
//! simulated engine runs on, so the two agree only if the tuner works).

use crate::scenario::{Scenario, ScenarioError};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;
use tokenfab_core::Timestamp;
use tokenfab_core::ids::{AcceleratorId, ModelId};
use tokenfab_core::perf::ReplicaPerf;

/// One batch size on the curve.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CurvePoint {
    pub batch: u32,
    pub tokens_per_joule_full_power: f64,
    pub inter_token_ms_full_power: f64,
    pub tokens_per_s_full_power: f64,
    /// At the power limit the tuner chose.
    pub tokens_per_joule_tuned_power: f64,
    pub inter_token_ms_tuned_power: f64,
    pub tokens_per_s_tuned_power: f64,
}

/// The curve and the tuner's point.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub model: String,
    pub accelerator: String,
    pub tensor_parallel: u32,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub max_power_w: f64,
    /// The largest batch whose KV cache fits (the curve stops there).
    pub kv_batch_limit: u32,
    /// Where the tuner settled, how long that took (simulated), and the tokens/J it
    /// measured there (device energy of the replica, from the simulated counters).
    pub tuner_window: u32,
    pub tuner_power_limit_w: f64,
    pub tuner_settled_s: f64,
    pub tuner_measured_tokens_per_joule: f64,
    pub points: Vec<CurvePoint>,
}

/// What to draw.
#[derive(Debug, Clone)]
pub struct CurveSpec {
    pub model: String,
    pub accelerator: String,
    pub tensor_parallel: u32,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

impl Default for CurveSpec {
    fn default() -> Self {
        CurveSpec {
            model: "llama-3.1-8b".into(),
            accelerator: "h100-sxm".into(),
            tensor_parallel: 1,
            prompt_tokens: 512,
            output_tokens: 256,
        }
    }
}

/// Computes the curve and runs the tuner (see the module docs).
pub fn curve(spec: &CurveSpec) -> Result<Curve, ScenarioError> {
    let model = ModelId::new(spec.model.clone());
    let accelerator = AcceleratorId::new(spec.accelerator.clone());
    let perf = ReplicaPerf::new(&model, &accelerator, spec.tensor_parallel).map_err(|e| ScenarioError {
        file: "curve".into(),
        path: "--model/--accelerator/--tensor-parallel".into(),
        message: e.to_string(),
    })?;
    let (window, power, settled_s, measured) = tuner_point(spec, &perf)?;
    let per_seq = u64::from(spec.prompt_tokens.max(1)) + u64::from(spec.output_tokens.max(1));
    let kv_batch_limit = (perf.kv_capacity_tokens() / per_seq).clamp(1, 4096) as u32;
    // About 12 points per doubling, every power of two, vLLM's default and the tuner's
    // window (or the KV cache's limit, if the window is larger: the engine runs no more
    // sequences than its cache holds, the rest of the window waits in its queue).
    let top = kv_batch_limit.min(1024);
    let mut batches: std::collections::BTreeSet<u32> = (0..)
        .map(|k| 1.06f64.powi(k).round() as u32)
        .take_while(|&b| b <= top)
        .chain((0..11).map(|k| 1u32 << k))
        .chain([256, window.min(top), top])
        .filter(|&b| (1..=top).contains(&b))
        .collect();
    batches.insert(1);
    let points = batches
        .into_iter()
        .map(|b| {
            let full = perf.steady_state(b, spec.prompt_tokens, spec.output_tokens, perf.max_power_w());
            let tuned = perf.steady_state(b, spec.prompt_tokens, spec.output_tokens, power);
            CurvePoint {
                batch: b,
                tokens_per_joule_full_power: 1.0 / full.joules_per_token,
                inter_token_ms_full_power: full.inter_token_s * 1e3,
                tokens_per_s_full_power: full.output_tokens_per_s,
                tokens_per_joule_tuned_power: 1.0 / tuned.joules_per_token,
                inter_token_ms_tuned_power: tuned.inter_token_s * 1e3,
                tokens_per_s_tuned_power: tuned.output_tokens_per_s,
            }
        })
        .collect();
    Ok(Curve {
        model: spec.model.clone(),
        accelerator: spec.accelerator.clone(),
        tensor_parallel: spec.tensor_parallel,
        prompt_tokens: spec.prompt_tokens,
        output_tokens: spec.output_tokens,
        max_power_w: perf.max_power_w(),
        kv_batch_limit,
        tuner_window: window,
        tuner_power_limit_w: power,
        tuner_settled_s: settled_s,
        tuner_measured_tokens_per_joule: measured,
        points,
    })
}

/// Runs the simulator's tuner on one replica kept saturated; returns where it settles.
fn tuner_point(spec: &CurveSpec, perf: &ReplicaPerf) -> Result<(u32, f64, f64, f64), ScenarioError> {
    let yaml = format!(
        r#"
name: curve
description: one replica kept busy, no deadline pressure
duration: 2h
pools:
  - {{name: p, accelerator: {acc}, nodes: 1, devices_per_node: {tp}}}
deployments:
  - {{pool: p, model: {model}, tensor_parallel: {tp}, window: 64, max_num_seqs: 1024}}
workload:
  tenants:
    - name: load
      model: {model}
      arrivals: {{kind: poisson, batches_per_hour: 60}}
      batch_size: {{kind: fixed, value: 50000}}
      prompt_tokens: {{kind: fixed, value: {prompt}}}
      output_tokens: {{kind: fixed, value: {output}}}
      completion_window: 7d
policies:
  admission: false
  tuner: {{mode: active}}
"#,
        acc = spec.accelerator,
        tp = spec.tensor_parallel,
        model = spec.model,
        prompt = spec.prompt_tokens,
        output = spec.output_tokens,
    );
    let s = Scenario::parse(&yaml, "curve")?;
    let mut sim = crate::Simulation::new(&s, Path::new("."), 1)?;
    let step = Duration::from_secs(5);
    let mut at = Timestamp::ZERO;
    loop {
        at = at.saturating_add(step);
        let done = sim.run_until(at, &mut |_| {});
        let Some(t) = sim.tuners().first().cloned().flatten() else {
            return Err(ScenarioError {
                file: "curve".into(),
                path: ".".into(),
                message: "the tuner does not run on this replica".into(),
            });
        };
        if t.holding && t.moves > 0 {
            // What the tuner measured at the point it settled on.
            let measured = t
                .measured
                .iter()
                .find(|(w, p, _)| *w == t.home_window && *p == t.home_power_limit_w)
                .map_or(0.0, |(_, _, e)| e.objective);
            let power = t.home_power_limit_w.unwrap_or_else(|| perf.max_power_w());
            return Ok((t.home_window, power, at.as_secs_f64(), measured));
        }
        if done || at.as_secs_f64() > 7200.0 {
            return Err(ScenarioError {
                file: "curve".into(),
                path: ".".into(),
                message: format!("the tuner did not settle in 2 simulated hours: {t:?}"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tuner_settles_at_the_best_point_of_the_curve() {
        let c = curve(&CurveSpec::default()).unwrap();
        let best = c
            .points
            .iter()
            .map(|p| p.tokens_per_joule_tuned_power.max(p.tokens_per_joule_full_power))
            .fold(0.0, f64::max);
        let at = c
            .points
            .iter()
            .find(|p| p.batch == c.tuner_window.min(c.kv_batch_limit))
            .expect("the tuner's window is on the curve");
        assert!(
            at.tokens_per_joule_tuned_power >= 0.97 * best,
            "the tuner's point gives {:.2} tokens/J on the model's curve, the best is {best:.2}: {c:?}",
            at.tokens_per_joule_tuned_power
        );
        // What the tuner measured in the simulated engine is near the steady state (the
        // engine also prefills new requests in bursts and idles between steps).
        assert!(
            (c.tuner_measured_tokens_per_joule / at.tokens_per_joule_tuned_power - 1.0).abs() < 0.15,
            "measured {:.2} vs model {:.2}",
            c.tuner_measured_tokens_per_joule,
            at.tokens_per_joule_tuned_power
        );
        // Latency rises with the batch, and tokens/J at full power is below the tuned power's.
        assert!(
            c.points
                .windows(2)
                .all(|w| w[1].inter_token_ms_full_power >= w[0].inter_token_ms_full_power)
        );
        assert!(
            c.points
                .iter()
                .all(|p| p.tokens_per_joule_tuned_power >= p.tokens_per_joule_full_power)
        );
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("curve.svg");
        crate::plot::curve_plot(&c, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.contains("<svg") && text.contains("tuner: window"),
            "{}",
            &text[..200.min(text.len())]
        );
    }

    #[test]
    fn an_unknown_model_is_named_in_the_error() {
        let e = curve(&CurveSpec {
            model: "llama-9".into(),
            ..CurveSpec::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("llama-9"), "{e}");
    }
}
