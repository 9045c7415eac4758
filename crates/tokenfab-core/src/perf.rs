//! The performance and energy model of one engine replica: how long an engine step takes
//! and how much power the devices draw, as functions of batch size, context length and
//! power limit.
//!
//! # The model
//!
//! A replica is one model on `tp` devices of one accelerator class (tensor parallel).
//! Continuous-batching engines (vLLM, SGLang, TGI, llama.cpp) advance in *steps*: each step
//! computes one new token for every decoding sequence, plus a chunk of prompt (prefill)
//! tokens. Per device, a step takes
//!
//! ```text
//! t = t_memory + t_compute / f + (t_step + t_seq * seqs) / f + t_allreduce
//! t_memory  = (weight bytes + KV bytes read) / tp / (peak bandwidth * bandwidth_efficiency)
//! t_compute = (2 * active params * tokens + 4 * layers * heads * head_dim * attended tokens)
//!             / tp / (peak FLOP/s * flop_efficiency)
//! ```
//!
//! The terms add rather than overlap: ML.ENERGY's H100 measurements show step time growing
//! close to linearly in batch size, which a `max(memory, compute)` roofline does not
//! reproduce (see `tools/calibrate/fit_mlenergy.py`).
//!
//! Power per device is idle power plus a draw per phase (memory-bound, compute-bound,
//! other), weighted by the time spent in each. `f` is the SM clock as a fraction of its
//! maximum: when the demanded power exceeds the power limit, the device lowers `f` until
//! it fits, as a GPU's power limiter does. Dynamic power scales as `f * V(f)^2`
//! with `V(f) = v0 + (1 - v0) f`; memory-bound time does not stretch with the SM clock,
//! which is why capping power costs decode little speed and saves energy.
//!
//! Constants come from the catalog's `[calibration]` section, fitted to the ML.ENERGY
//! Leaderboard v3 H100 rows (test `matches_mlenergy_h100` checks every row). Other
//! accelerator classes reuse the efficiencies and scale the phase power by their dynamic
//! range (max power - idle power): an assumption, flagged as `calibrated = false` in the
//! catalog.

use crate::catalog::{Accelerator, Calibration, Catalog, CatalogError, ModelShape};
use crate::ids::{AcceleratorId, ModelId};
use crate::profile::{Compiled, ProfileError, Profiles};
use std::sync::Arc;

/// The accelerator the calibration was fitted on; other classes scale from it.
const REFERENCE_ACCELERATOR: &str = "h100-sxm";

/// The request shape (prompt, output tokens) capacities are quoted at where the work's
/// own shape is not known.
pub const REFERENCE_SHAPE: (u32, u32) = (512, 256);

/// Lengths within 10% of each other share a bucket (and so an estimate): the bucket of
/// `tokens`.
pub fn length_bucket(tokens: u32) -> i32 {
    (f64::from(tokens.max(1)).ln() / 1.1f64.ln()).round() as i32
}

/// The length a bucket stands for.
pub fn bucket_length(bucket: i32) -> u32 {
    1.1f64.powi(bucket).round().max(1.0) as u32
}

/// `shape` with each length moved to its bucket's length.
pub fn bucketed(shape: (u32, u32)) -> (u32, u32) {
    (
        bucket_length(length_bucket(shape.0)),
        bucket_length(length_bucket(shape.1)),
    )
}

/// What one engine step computes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Sequences taking part in the step (decoding plus prefilling).
    pub seqs: u32,
    /// Tokens computed: one per decoding sequence plus every prefill token of the step.
    pub tokens: u32,
    /// Context tokens whose KV cache the step reads (summed over sequences).
    pub kv_read_tokens: u64,
    /// Sum over computed tokens of the context each attends to (attention FLOPs).
    pub attended_tokens: u64,
    /// For mixture-of-experts models: tokens routed through the experts this step
    /// (normally equal to `tokens`).
    pub routed_tokens: u32,
}

impl StepShape {
    /// A pure decode step: `batch` sequences with `context` tokens of context each.
    pub fn decode(batch: u32, context: u32) -> StepShape {
        let kv = u64::from(batch) * u64::from(context);
        StepShape {
            seqs: batch,
            tokens: batch,
            kv_read_tokens: kv,
            attended_tokens: kv,
            routed_tokens: batch,
        }
    }
}

/// Time, power and energy of one step, per device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub seconds: f64,
    /// Average power of one device over the step.
    pub power_w: f64,
    /// Energy of one device over the step (power x time).
    pub energy_j: f64,
    /// SM clock the power limiter settled on, as a fraction of maximum (1.0 = unthrottled).
    pub clock: f64,
}

/// Throughput and energy of a replica running `batch` sequences continuously.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SteadyState {
    pub output_tokens_per_s: f64,
    /// Power per device.
    pub power_w: f64,
    /// Energy of all the replica's devices per output token.
    pub joules_per_token: f64,
    /// Time between two tokens of one sequence.
    pub inter_token_s: f64,
}

/// The performance and energy model of one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaPerf {
    tp: u32,
    /// Bytes of weights every step reads per device (dense part, for MoE).
    dense_weight_bytes: f64,
    /// Expert weight bytes per device (MoE), read in proportion to experts touched.
    expert_weight_bytes: f64,
    experts: f64,
    experts_per_token: f64,
    kv_bytes_per_token: f64,
    flops_per_token: f64,
    flops_per_attended_token: f64,
    bandwidth: f64,
    flops: f64,
    step_overhead_s: f64,
    seq_overhead_s: f64,
    allreduce_latency_s: f64,
    allreduce_bytes_per_token: f64,
    link_bytes_per_s: f64,
    layers: f64,
    idle_w: f64,
    memory_w: f64,
    compute_w: f64,
    other_w: f64,
    memory_fixed_share: f64,
    voltage_floor: f64,
    min_clock: f64,
    max_power_w: f64,
    min_power_w: f64,
    kv_capacity_tokens: u64,
    price_usd_per_hour: f64,
    /// Where the replica's curve comes from a profile (measured, or a truth that differs
    /// from the model), the profile; the model above fills in what it does not say.
    profile: Option<Arc<Compiled>>,
    /// A correction measured online ([`crate::recal`]): step times and power times these.
    time_factor: f64,
    power_factor: f64,
}

impl ReplicaPerf {
    /// The model for `model` on `tp` devices of class `accelerator`, from the built-in
    /// catalog.
    pub fn new(model: &ModelId, accelerator: &AcceleratorId, tp: u32) -> Result<Self, CatalogError> {
        Self::from_catalog(Catalog::builtin(), model, accelerator, tp)
    }

    pub fn from_catalog(
        catalog: &Catalog,
        model: &ModelId,
        accelerator: &AcceleratorId,
        tp: u32,
    ) -> Result<Self, CatalogError> {
        let shape = catalog.model(model)?;
        let acc = catalog.accelerator(accelerator)?;
        let reference = catalog.accelerator(&AcceleratorId::from(REFERENCE_ACCELERATOR))?;
        Self::build(
            shape,
            acc,
            reference,
            &catalog.calibration,
            model,
            accelerator,
            tp.max(1),
        )
    }

    fn build(
        shape: &ModelShape,
        acc: &Accelerator,
        reference: &Accelerator,
        cal: &Calibration,
        model: &ModelId,
        accelerator: &AcceleratorId,
        tp: u32,
    ) -> Result<Self, CatalogError> {
        let tpf = f64::from(tp);
        let weight_bytes = shape.weights_gb * 1e9;
        let usable_per_device = acc.memory_gb * 1e9 * cal.memory_usable_fraction;
        if weight_bytes / tpf >= usable_per_device {
            return Err(CatalogError::DoesNotFit {
                model: model.to_string(),
                accelerator: accelerator.to_string(),
                devices: tp,
                weights_gb: weight_bytes / tpf / 1e9,
                usable_gb: usable_per_device / 1e9,
            });
        }
        // Mixture of experts: total = shared + experts, active = shared + k/E * experts.
        let (dense, expert, experts, k) = match (shape.active_params_b, shape.experts, shape.experts_per_token) {
            (Some(active), Some(e), Some(k)) if e > 0 && k > 0 && k < e => {
                let ratio = f64::from(k) / f64::from(e);
                let expert_params = (shape.params_b - active) / (1.0 - ratio);
                let expert_share = (expert_params / shape.params_b).clamp(0.0, 1.0);
                (
                    weight_bytes * (1.0 - expert_share),
                    weight_bytes * expert_share,
                    f64::from(e),
                    f64::from(k),
                )
            }
            _ => (weight_bytes, 0.0, 1.0, 1.0),
        };
        let active_params = shape.active_params_b.unwrap_or(shape.params_b) * 1e9;
        let kv_capacity = ((usable_per_device * tpf - weight_bytes) / shape.kv_bytes_per_token as f64).max(0.0);
        // Phase power scales with the accelerator's dynamic range relative to the
        // reference (H100) the constants were fitted on.
        let scale = (acc.max_power_w - acc.idle_power_w) / (reference.max_power_w - reference.idle_power_w);
        let tp_factor = if tp > 1 { cal.tensor_parallel_power_factor } else { 1.0 };
        Ok(ReplicaPerf {
            tp,
            dense_weight_bytes: dense / tpf,
            expert_weight_bytes: expert / tpf,
            experts,
            experts_per_token: k,
            kv_bytes_per_token: shape.kv_bytes_per_token as f64 / tpf,
            flops_per_token: 2.0 * active_params / tpf,
            flops_per_attended_token: 4.0
                * f64::from(shape.layers)
                * f64::from(shape.heads)
                * f64::from(shape.head_dim)
                / tpf,
            bandwidth: acc.memory_tb_s * 1e12 * cal.bandwidth_efficiency,
            flops: acc.bf16_tflops * 1e12 * cal.flop_efficiency,
            step_overhead_s: cal.per_step_overhead_us * 1e-6,
            seq_overhead_s: cal.per_sequence_overhead_us * 1e-6,
            allreduce_latency_s: if tp > 1 { cal.allreduce_latency_us * 1e-6 } else { 0.0 },
            allreduce_bytes_per_token: if tp > 1 { f64::from(shape.hidden) * 2.0 } else { 0.0 },
            link_bytes_per_s: acc.link_gb_s * 1e9,
            layers: f64::from(shape.layers),
            idle_w: acc.idle_power_w,
            memory_w: cal.memory_phase_power_w * scale * tp_factor,
            compute_w: cal.compute_phase_power_w * scale * tp_factor,
            other_w: cal.other_phase_power_w * scale,
            memory_fixed_share: cal.memory_clock_independent_share,
            voltage_floor: cal.voltage_floor,
            min_clock: cal.min_clock_fraction,
            max_power_w: acc.max_power_w,
            min_power_w: acc.power_limit_min_w,
            kv_capacity_tokens: kv_capacity as u64,
            price_usd_per_hour: acc.price_usd_per_hour,
            profile: None,
            time_factor: 1.0,
            power_factor: 1.0,
        })
    }

    /// The replica whose decode steps follow `profile` instead of the model; the model
    /// still gives the memory, the power range and the price, and whatever the profile
    /// does not measure (see [`ReplicaPerf::step`]). The profile must be of this model,
    /// accelerator and tensor-parallel degree.
    pub fn with_profile(
        mut self,
        model: &ModelId,
        accelerator: &AcceleratorId,
        profile: Arc<Compiled>,
    ) -> Result<Self, ProfileError> {
        let wrong = |field: &str, got: String, want: String| ProfileError {
            field: field.into(),
            message: format!("is {got}, but the replica it was given to has {want}"),
        };
        if profile.model != model.as_str() {
            return Err(wrong("model", profile.model.clone(), model.to_string()));
        }
        if profile.accelerator != accelerator.as_str() {
            return Err(wrong(
                "accelerator",
                profile.accelerator.clone(),
                accelerator.to_string(),
            ));
        }
        if profile.tensor_parallel != self.tp {
            return Err(wrong(
                "tensor_parallel",
                profile.tensor_parallel.to_string(),
                self.tp.to_string(),
            ));
        }
        self.profile = Some(profile);
        Ok(self)
    }

    /// The model of a replica as `profiles` describe it: the profile of this model,
    /// accelerator and degree where there is one, the performance model otherwise.
    pub fn believed(
        model: &ModelId,
        accelerator: &AcceleratorId,
        tp: u32,
        profiles: &Profiles,
    ) -> Result<Self, CatalogError> {
        let perf = Self::new(model, accelerator, tp)?;
        Ok(match profiles.find(model.as_str(), accelerator.as_str(), perf.tp) {
            Some(p) => perf
                .with_profile(model, accelerator, p.clone())
                .expect("found by the same key"),
            None => perf,
        })
    }

    /// The replica corrected by what it measured: every step `time` times as long, its
    /// devices drawing `power` times the power (see [`crate::recal`]).
    pub fn corrected(&self, time: f64, power: f64) -> Self {
        let mut c = self.clone();
        c.time_factor = if time.is_finite() && time > 0.0 { time } else { 1.0 };
        c.power_factor = if power.is_finite() && power > 0.0 { power } else { 1.0 };
        c
    }

    /// The profile the replica's steps follow, if any.
    pub fn profile(&self) -> Option<&Compiled> {
        self.profile.as_deref()
    }

    /// Devices the replica spans.
    pub fn devices(&self) -> u32 {
        self.tp
    }
    /// Power of one idle device.
    pub fn idle_power_w(&self) -> f64 {
        self.idle_w
    }
    /// The device's maximum (and default) power limit.
    pub fn max_power_w(&self) -> f64 {
        self.max_power_w
    }
    /// The lowest power limit the device accepts.
    pub fn min_power_w(&self) -> f64 {
        self.min_power_w
    }
    /// Tokens of KV cache the replica can hold (all devices together).
    pub fn kv_capacity_tokens(&self) -> u64 {
        self.kv_capacity_tokens
    }
    /// Indicative price of one device-hour of this accelerator class.
    pub fn price_usd_per_device_hour(&self) -> f64 {
        self.price_usd_per_hour
    }

    /// Cost of one engine step under `power_limit_w` (per device; clamped to the device's
    /// allowed range).
    ///
    /// With a profile, the step is the profile's decode step at the step's sequences and
    /// mean context, plus its prompt tokens at the profile's `prefill_s_per_token`; where
    /// the profile has none, it is the model's whole step scaled by the profile's decode
    /// step over the model's (time and power each). Power is the profile's, or the
    /// model's where the profile has no power figures. Below the lowest power limit the profile measured, time and
    /// power change from that limit as the model says they would.
    pub fn step(&self, s: &StepShape, power_limit_w: f64) -> StepCost {
        let limit = power_limit_w.clamp(self.min_power_w, self.max_power_w);
        let cost = match &self.profile {
            None => self.model_step(s, limit),
            Some(p) => self.profiled_step(p, s, limit),
        };
        if self.time_factor == 1.0 && self.power_factor == 1.0 {
            return cost;
        }
        let (seconds, power_w) = (cost.seconds * self.time_factor, cost.power_w * self.power_factor);
        StepCost {
            seconds,
            power_w,
            energy_j: power_w * seconds,
            clock: cost.clock,
        }
    }

    fn profiled_step(&self, p: &Compiled, s: &StepShape, limit: f64) -> StepCost {
        let seqs = s.seqs.max(1);
        let context = u32::try_from(s.kv_read_tokens / u64::from(seqs)).unwrap_or(u32::MAX);
        let prompt_tokens = s.tokens.saturating_sub(s.seqs);
        let decode_shape = StepShape::decode(seqs, context);
        let lowest = p.lowest_power_limit_w();
        let (mut decode, below) = if limit < lowest {
            let (at, from) = (
                self.model_step(&decode_shape, limit),
                self.model_step(&decode_shape, lowest),
            );
            (
                p.decode_step(seqs, context, lowest),
                Some((at.seconds / from.seconds, at.power_w / from.power_w)),
            )
        } else {
            (p.decode_step(seqs, context, limit), None)
        };
        if let Some((time, power)) = below {
            decode.seconds *= time;
            decode.power_w = decode.power_w.map(|w| w * power);
        }
        let (seconds, power_w) = match p.prefill_s_per_token() {
            // Measured: prompt tokens add their own time at the decode step's power.
            Some(per_token) => (
                decode.seconds + per_token * f64::from(prompt_tokens),
                decode.power_w.unwrap_or_else(|| self.model_step(s, limit).power_w),
            ),
            None if prompt_tokens == 0 => (
                decode.seconds,
                decode.power_w.unwrap_or_else(|| self.model_step(s, limit).power_w),
            ),
            // Not measured: the model's whole step, scaled by how far the profile's decode
            // step is from the model's (time and power alike).
            None => {
                let (whole, alone) = (self.model_step(s, limit), self.model_step(&decode_shape, limit));
                let power = match decode.power_w {
                    Some(w) => whole.power_w * w / alone.power_w,
                    None => whole.power_w,
                };
                (whole.seconds * decode.seconds / alone.seconds, power)
            }
        };
        let seconds = seconds.max(1e-9);
        // Not clamped to the limit: at its lowest clock a device may draw more than a
        // very low limit (the model says so too), and a measured figure is what it is.
        let power_w = power_w.max(0.0);
        let unlimited = p.decode_step(seqs, context, p.top_power_limit_w()).seconds;
        StepCost {
            seconds,
            power_w,
            energy_j: power_w * seconds,
            clock: (unlimited / decode.seconds).min(1.0),
        }
    }

    fn model_step(&self, s: &StepShape, limit: f64) -> StepCost {
        let phases = self.phases(s);
        let full = phases.at_clock(self, 1.0);
        if full.power_w <= limit {
            return full;
        }
        let floor = phases.at_clock(self, self.min_clock);
        if floor.power_w >= limit {
            return floor;
        }
        // Power rises with clock; find the highest clock within the limit.
        let (mut lo, mut hi) = (self.min_clock, 1.0);
        for _ in 0..24 {
            let mid = 0.5 * (lo + hi);
            if phases.at_clock(self, mid).power_w > limit {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        phases.at_clock(self, lo)
    }

    /// Output tokens/s of the replica at window `window` for requests of `shape`, at full
    /// power: the capacity placement, admission and owed rates count on.
    pub fn capacity(&self, window: u32, shape: (u32, u32)) -> f64 {
        self.steady_state(window, shape.0, shape.1.max(1), f64::MAX)
            .output_tokens_per_s
    }

    /// Throughput and energy with `batch` sequences always running, each with
    /// `prompt_tokens` of prompt and `output_tokens` of output, prefill interleaved with
    /// decode as continuous batching does.
    pub fn steady_state(&self, batch: u32, prompt_tokens: u32, output_tokens: u32, power_limit_w: f64) -> SteadyState {
        let b = f64::from(batch.max(1));
        let p = f64::from(prompt_tokens);
        let o = f64::from(output_tokens.max(1));
        let prefill_per_step = b * p / o;
        let mean_context = p + o / 2.0;
        let shape = StepShape {
            seqs: batch.max(1),
            tokens: (b + prefill_per_step).round() as u32,
            kv_read_tokens: (b * mean_context).round() as u64,
            attended_tokens: (b * mean_context + prefill_per_step * p / 2.0).round() as u64,
            routed_tokens: (b + prefill_per_step).round() as u32,
        };
        let cost = self.step(&shape, power_limit_w);
        SteadyState {
            output_tokens_per_s: b / cost.seconds,
            power_w: cost.power_w,
            joules_per_token: cost.energy_j * f64::from(self.tp) / b,
            inter_token_s: cost.seconds,
        }
    }

    fn phases(&self, s: &StepShape) -> Phases {
        let weight_bytes = if self.expert_weight_bytes > 0.0 {
            // Share of experts touched when `routed` tokens each pick k of E experts.
            let routed = f64::from(s.routed_tokens.max(1));
            let untouched = (1.0 - self.experts_per_token / self.experts).powf(routed);
            self.dense_weight_bytes + self.expert_weight_bytes * (1.0 - untouched)
        } else {
            self.dense_weight_bytes
        };
        let bytes = weight_bytes + s.kv_read_tokens as f64 * self.kv_bytes_per_token;
        let flops =
            f64::from(s.tokens) * self.flops_per_token + s.attended_tokens as f64 * self.flops_per_attended_token;
        let allreduce = if self.tp > 1 {
            2.0 * self.layers
                * (self.allreduce_latency_s
                    + f64::from(s.tokens) * self.allreduce_bytes_per_token / self.link_bytes_per_s)
        } else {
            0.0
        };
        Phases {
            memory_s: bytes / self.bandwidth,
            compute_s: flops / self.flops,
            sm_other_s: self.step_overhead_s + self.seq_overhead_s * f64::from(s.seqs),
            allreduce_s: allreduce,
        }
    }
}

/// Step time split by what bounds it, at full clock.
#[derive(Debug, Clone, Copy)]
struct Phases {
    memory_s: f64,
    compute_s: f64,
    sm_other_s: f64,
    allreduce_s: f64,
}

impl Phases {
    fn at_clock(&self, m: &ReplicaPerf, f: f64) -> StepCost {
        let compute = self.compute_s / f;
        let other = self.sm_other_s / f + self.allreduce_s;
        let seconds = (self.memory_s + compute + other).max(1e-9);
        let v = m.voltage_floor + (1.0 - m.voltage_floor) * f;
        let dynamic = f * v * v;
        let memory_w = m.memory_w * (m.memory_fixed_share + (1.0 - m.memory_fixed_share) * dynamic);
        let energy_above_idle =
            memory_w * self.memory_s + m.compute_w * dynamic * compute + m.other_w * dynamic * other;
        let power_w = m.idle_w + energy_above_idle / seconds;
        StepCost {
            seconds,
            power_w,
            energy_j: power_w * seconds,
            clock: f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100(model: &str, tp: u32) -> ReplicaPerf {
        ReplicaPerf::new(&ModelId::from(model), &AcceleratorId::from("h100-sxm"), tp).unwrap()
    }

    /// ML.ENERGY Leaderboard v3 rows (max_num_seqs, output tok/s, W per GPU), from
    /// ml-energy/leaderboard public/data/models/*__lm-arena-chat.json, commit 0cd52da.
    const LLAMA8_H100: [(u32, f64, f64); 10] = [
        (8, 1070.0, 486.0),
        (16, 1954.0, 513.0),
        (32, 3391.0, 560.0),
        (64, 5147.0, 610.0),
        (96, 6260.0, 644.0),
        (128, 7037.0, 669.0),
        (192, 8223.0, 688.0),
        (256, 9010.0, 691.0),
        (384, 9248.0, 687.0),
        (512, 9806.0, 688.0),
    ];
    const LLAMA70_4XH100: [(u32, f64, f64); 8] = [
        (8, 470.0, 441.0),
        (16, 863.0, 451.0),
        (32, 1487.0, 449.0),
        (64, 2511.0, 500.0),
        (128, 3876.0, 546.0),
        (256, 4915.0, 589.0),
        (512, 5921.0, 623.0),
        (1024, 6827.0, 637.0),
    ];

    #[test]
    fn matches_mlenergy_h100() {
        let prompt = Catalog::builtin().calibration.fit_mean_prompt_tokens;
        let cases = [
            (h100("llama-3.1-8b", 1), 395, &LLAMA8_H100[..]),
            (h100("llama-3.1-70b", 4), 352, &LLAMA70_4XH100[..]),
        ];
        let mut sq = 0.0;
        let mut n = 0.0;
        for (m, out, rows) in cases {
            for &(b, tok_s, watts) in rows {
                let s = m.steady_state(b, prompt, out, 700.0);
                let tok_err = s.output_tokens_per_s / tok_s - 1.0;
                let w_err = s.power_w / watts - 1.0;
                let j_err = s.joules_per_token / (watts * f64::from(m.devices()) / tok_s) - 1.0;
                assert!(
                    tok_err.abs() < 0.06,
                    "tp{} b={b}: {:.0} tok/s vs {tok_s}",
                    m.devices(),
                    s.output_tokens_per_s
                );
                assert!(
                    w_err.abs() < 0.06,
                    "tp{} b={b}: {:.0} W vs {watts}",
                    m.devices(),
                    s.power_w
                );
                assert!(
                    j_err.abs() < 0.08,
                    "tp{} b={b}: J/token off by {:.1}%",
                    m.devices(),
                    j_err * 100.0
                );
                sq += tok_err * tok_err + w_err * w_err;
                n += 2.0;
            }
        }
        let rms = (sq / n).sqrt();
        assert!(rms < 0.035, "rms error {rms:.3}");
    }

    #[test]
    fn bigger_batches_raise_throughput_and_tokens_per_joule() {
        let m = h100("llama-3.1-8b", 1);
        let mut last = m.steady_state(1, 200, 400, 700.0);
        for b in [2, 4, 8, 16, 32, 64, 128, 256] {
            let s = m.steady_state(b, 200, 400, 700.0);
            assert!(s.output_tokens_per_s > last.output_tokens_per_s, "b={b}");
            assert!(s.joules_per_token < last.joules_per_token, "b={b}");
            assert!(s.inter_token_s > last.inter_token_s, "b={b}: latency rises with batch");
            last = s;
        }
    }

    #[test]
    fn power_limit_is_respected_and_saves_energy_when_memory_bound() {
        let m = h100("llama-3.1-8b", 1);
        let shape = StepShape::decode(8, 400);
        let full = m.step(&shape, 700.0);
        let capped = m.step(&shape, 300.0);
        assert!(full.power_w > 300.0);
        assert!(capped.power_w <= 300.0 + 1e-6, "{}", capped.power_w);
        assert!(capped.clock < 1.0);
        // Memory-bound decode: small slowdown, real energy saving.
        assert!(
            capped.seconds / full.seconds < 1.25,
            "{} vs {}",
            capped.seconds,
            full.seconds
        );
        assert!(
            capped.energy_j < full.energy_j * 0.85,
            "{} vs {}",
            capped.energy_j,
            full.energy_j
        );
        // Limits outside the device's range are clamped to it.
        assert_eq!(m.step(&shape, 10_000.0), full);
        assert_eq!(m.step(&shape, 1.0), m.step(&shape, m.min_power_w()));
    }

    #[test]
    fn other_accelerators_rank_as_their_datasheets_say() {
        let model = ModelId::from("llama-3.1-8b");
        let tps = |acc: &str| {
            ReplicaPerf::new(&model, &AcceleratorId::from(acc), 1)
                .unwrap()
                .steady_state(64, 200, 400, f64::MAX)
                .output_tokens_per_s
        };
        let (h200, h100, a100, l40s) = (tps("h200-sxm"), tps("h100-sxm"), tps("a100-sxm-80g"), tps("l40s"));
        assert!(h200 > h100 && h100 > a100 && a100 > l40s, "{h200} {h100} {a100} {l40s}");
    }

    #[test]
    fn models_that_do_not_fit_are_refused_with_advice() {
        let e = ReplicaPerf::new(&ModelId::from("llama-3.1-70b"), &AcceleratorId::from("h100-sxm"), 1).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("does not fit") && msg.contains("more devices"), "{msg}");
        assert!(h100("llama-3.1-70b", 2).kv_capacity_tokens() > 0);
    }

    #[test]
    fn moe_reads_fewer_weights_at_small_batch() {
        let m = ReplicaPerf::new(&ModelId::from("qwen3-30b-a3b"), &AcceleratorId::from("h100-sxm"), 1).unwrap();
        let one = StepShape::decode(1, 100);
        let many = StepShape {
            routed_tokens: 256,
            tokens: 256,
            seqs: 256,
            ..one
        };
        assert!(m.phases(&one).memory_s < 0.3 * m.phases(&many).memory_s);
    }
}
