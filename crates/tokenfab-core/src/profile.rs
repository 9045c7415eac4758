//! Engine profiles: how one engine serving one model on one accelerator class (at one
//! tensor-parallel degree) behaves, as a table of decode steps. Each entry is the time of
//! one decode step and the average power of each device during it, at a decode batch, a
//! context length (tokens per sequence) and a power limit. A profile says where its
//! figures come from ([`Provenance`]): measured on a real engine, or predicted by the
//! performance model (a prior).
//!
//! The file format is TOML (or the same fields in JSON), documented in
//! `docs/engine-profiles.md`:
//!
//! ```toml
//! format = 1
//! model = "llama-3.1-8b"
//! accelerator = "h100-sxm"
//! tensor_parallel = 1
//! batches = [1, 8, 64, 256]
//! contexts = [512, 2048]
//! power_limits_w = [700.0]
//! # step_s[power][context][batch]; a missing point is written as -1 (not measured)
//! step_s = [[[0.0071, 0.0075, 0.0102, 0.0211], [0.0073, 0.0081, 0.0140, 0.0365]]]
//! power_w = [[[310.0, 350.0, 520.0, 640.0], [312.0, 360.0, 560.0, 660.0]]]
//!
//! [provenance]
//! source = "measured"
//! ...
//! ```
//!
//! Between the table's points a profile is interpolated so that it never invents a bump
//! the measurements do not have: along the batch, a monotone piecewise cubic (Fritsch and
//! Carlson's PCHIP), which is monotone wherever the measurements are and exact where they
//! lie on a line; along the context and the power limit, linearly. Beyond the largest
//! batch or context, the last segment's slope carries on (never downwards); below the
//! smallest, and outside the power limits, the nearest entry holds. Points that were not
//! measured are filled the same way from the measured points of their row.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The version of the file format this code reads and writes.
pub const PROFILE_FORMAT: u32 = 1;

/// Where a profile's figures come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// `measured` (a real engine on real hardware) or `model` (the performance model's
    /// prediction, a prior to be corrected by measurements).
    pub source: ProfileSource,
    /// The tool and version that wrote it, e.g. `tokenfab calibrate 0.1.0`.
    pub tool: String,
    /// When it was measured or computed (RFC 3339 date or date-time).
    pub date: String,
    /// The serving engine and its version, e.g. `vLLM 0.11.0`, `llama.cpp b6000`.
    #[serde(default)]
    pub engine: String,
    /// The hardware and driver, e.g. `1x H100 SXM5 80GB, driver 580.159.04`.
    #[serde(default)]
    pub hardware: String,
    /// Anything else a reader needs: what was not measured, the energy counter used.
    #[serde(default)]
    pub notes: String,
}

/// Whether a profile was measured or predicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileSource {
    Measured,
    Model,
}

impl ProfileSource {
    pub fn name(self) -> &'static str {
        match self {
            ProfileSource::Measured => "measured",
            ProfileSource::Model => "model",
        }
    }
}

/// One engine on one accelerator class: decode step time and per-device power against
/// decode batch, context length and power limit. See the module docs for the format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineProfile {
    pub format: u32,
    pub model: String,
    pub accelerator: String,
    pub tensor_parallel: u32,
    /// Decode batch sizes (sequences per step), ascending.
    pub batches: Vec<u32>,
    /// Context lengths (tokens per sequence), ascending.
    pub contexts: Vec<u32>,
    /// Power limits per device, W, ascending. One entry when the limit was not varied.
    pub power_limits_w: Vec<f64>,
    /// Seconds per decode step, indexed `[power limit][context][batch]`; -1 where not
    /// measured.
    pub step_s: Vec<Vec<Vec<f64>>>,
    /// Average power of one device during a step, W, indexed like `step_s`; -1 where not
    /// measured. Absent when the engine had no energy counter (a CPU engine).
    #[serde(default)]
    pub power_w: Option<Vec<Vec<Vec<f64>>>>,
    /// Seconds one prompt token adds to the step it is prefilled in (chunked prefill
    /// beside decoding). Absent: the performance model's prefill cost, scaled by how far
    /// the profile's decode step is from the model's at the same point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_s_per_token: Option<f64>,
    pub provenance: Provenance,
}

/// What is wrong with a profile, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("engine profile: {field}: {message}")]
pub struct ProfileError {
    /// The field, e.g. `step_s[0][1]`.
    pub field: String,
    pub message: String,
}

fn fail<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, ProfileError> {
    Err(ProfileError {
        field: field.into(),
        message: message.into(),
    })
}

/// A decode step's cost as a profile gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfiledStep {
    pub seconds: f64,
    /// Per device; `None` when the profile has no power figures.
    pub power_w: Option<f64>,
}

impl EngineProfile {
    /// Reads a profile from TOML text, checked ([`EngineProfile::check`]).
    pub fn from_toml(text: &str) -> Result<Self, ProfileError> {
        let p: EngineProfile = toml::from_str(text).or_else(|e| fail("(file)", e.to_string()))?;
        p.check()?;
        Ok(p)
    }

    /// The profile as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a profile is plain data")
    }

    /// Checks the table's shape and values; the error names the field.
    pub fn check(&self) -> Result<(), ProfileError> {
        if self.format != PROFILE_FORMAT {
            return fail(
                "format",
                format!("is {}; this tokenfab reads format {PROFILE_FORMAT}", self.format),
            );
        }
        if self.tensor_parallel == 0 {
            return fail("tensor_parallel", "must be at least 1");
        }
        ascending("batches", self.batches.iter().map(|&b| f64::from(b)), true)?;
        ascending("contexts", self.contexts.iter().map(|&c| f64::from(c)), true)?;
        ascending("power_limits_w", self.power_limits_w.iter().copied(), true)?;
        check_table("step_s", &self.step_s, self)?;
        if let Some(p) = &self.power_w {
            check_table("power_w", p, self)?;
        }
        if let Some(x) = self.prefill_s_per_token
            && !(x.is_finite() && x >= 0.0)
        {
            return fail(
                "prefill_s_per_token",
                format!("is {x}; it must be zero or a positive number of seconds"),
            );
        }
        Ok(())
    }

    /// The cost of a decode step of `batch` sequences of `context` tokens each at
    /// `power_limit_w` per device (see the module docs for how it is interpolated). This
    /// prepares the table on every call; code that asks often keeps a [`Compiled`].
    pub fn decode_step(&self, batch: u32, context: u32, power_limit_w: f64) -> ProfiledStep {
        self.compile().decode_step(batch, context, power_limit_w)
    }

    /// The table prepared for fast lookups (the interpolating curves are built once).
    pub fn compile(&self) -> Compiled {
        let curves = |table: &Vec<Vec<Vec<f64>>>| -> Vec<Vec<Curve>> {
            table
                .iter()
                .map(|per_power| per_power.iter().map(|row| Curve::new(&self.batches, row)).collect())
                .collect()
        };
        Compiled {
            model: self.model.clone(),
            accelerator: self.accelerator.clone(),
            tensor_parallel: self.tensor_parallel,
            source: self.provenance.source,
            contexts: self.contexts.iter().map(|&c| f64::from(c)).collect(),
            power_limits_w: self.power_limits_w.clone(),
            step_s: curves(&self.step_s),
            power_w: self.power_w.as_ref().map(curves),
            prefill_s_per_token: self.prefill_s_per_token,
        }
    }

    /// A profile predicted by the performance model: the prior a measured profile
    /// replaces. `perf` is the replica's model; the grid is the given batches, contexts
    /// and power limits.
    pub fn from_model(
        perf: &crate::perf::ReplicaPerf,
        model: &str,
        accelerator: &str,
        batches: &[u32],
        contexts: &[u32],
        power_limits_w: &[f64],
        date: &str,
    ) -> Result<Self, ProfileError> {
        let table = |f: &dyn Fn(&crate::perf::StepCost) -> f64| -> Vec<Vec<Vec<f64>>> {
            power_limits_w
                .iter()
                .map(|&p| {
                    contexts
                        .iter()
                        .map(|&c| {
                            batches
                                .iter()
                                .map(|&b| f(&perf.step(&crate::perf::StepShape::decode(b, c), p)))
                                .collect()
                        })
                        .collect()
                })
                .collect()
        };
        let profile = EngineProfile {
            format: PROFILE_FORMAT,
            model: model.to_string(),
            accelerator: accelerator.to_string(),
            tensor_parallel: perf.devices(),
            batches: batches.to_vec(),
            contexts: contexts.to_vec(),
            power_limits_w: power_limits_w.to_vec(),
            step_s: table(&|s| s.seconds),
            power_w: Some(table(&|s| s.power_w)),
            prefill_s_per_token: None,
            provenance: Provenance {
                source: ProfileSource::Model,
                tool: format!("tokenfab {}", env!("CARGO_PKG_VERSION")),
                date: date.to_string(),
                engine: "performance model (crates/tokenfab-core/src/perf.rs)".into(),
                hardware: accelerator.to_string(),
                notes: "predicted, not measured: a prior for calibration".into(),
            },
        };
        profile.check()?;
        Ok(profile)
    }
}

/// Truths that differ from a belief, for evaluating policies under a mismatch (the
/// simulator's `profiles.truth`): transformations of a profile, each noted in its
/// provenance.
impl EngineProfile {
    /// A copy whose steps take `factor` times as long, at the same power: an engine
    /// slower (factor > 1) or faster than this profile says.
    pub fn slower(&self, factor: f64) -> EngineProfile {
        let mut p = self.clone();
        for x in p.step_s.iter_mut().flatten().flatten() {
            if *x > 0.0 {
                *x *= factor;
            }
        }
        if let Some(x) = &mut p.prefill_s_per_token {
            *x *= factor;
        }
        p.note(&format!("step times x{factor}"));
        p
    }

    /// A copy whose energy per token falls with the batch the way a memory-bound engine's
    /// does, toward a floor, instead of this profile's shape: per device,
    /// `J(b) = F + (J(1) - F) / b`, where `F` is this profile's energy per token at
    /// `floor_batch` (and `J(1)` at batch 1), per context and power limit. Power follows
    /// from it and the unchanged step time, held between `idle_w` and the power limit.
    /// Needs power figures.
    pub fn energy_floor(&self, floor_batch: u32, idle_w: f64) -> Result<EngineProfile, ProfileError> {
        let Some(power) = &self.power_w else {
            return fail(
                "power_w",
                "is absent; an energy shape needs the profile's power figures",
            );
        };
        let compiled = self.compile();
        let mut new_power = power.clone();
        for (pi, &limit) in self.power_limits_w.iter().enumerate() {
            for (ci, &context) in self.contexts.iter().enumerate() {
                let jpt = |b: u32| {
                    let s = compiled.decode_step(b, context, limit);
                    s.power_w.expect("has power") * s.seconds / f64::from(b)
                };
                let (one, floor) = (jpt(1), jpt(floor_batch.max(1)));
                for (bi, &b) in self.batches.iter().enumerate() {
                    let seconds = self.step_s[pi][ci][bi];
                    if seconds <= 0.0 || power[pi][ci][bi] <= 0.0 {
                        continue;
                    }
                    let bf = f64::from(b);
                    let joules = floor + (one - floor) / bf;
                    new_power[pi][ci][bi] = (joules * bf / seconds).clamp(idle_w.min(limit), limit);
                }
            }
        }
        let mut p = self.clone();
        p.power_w = Some(new_power);
        p.note(&format!(
            "energy per token reshaped to a memory-bound floor (J(b) = F + (J(1) - F)/b, F at batch {floor_batch})"
        ));
        Ok(p)
    }

    fn note(&mut self, what: &str) {
        let notes = &mut self.provenance.notes;
        if !notes.is_empty() {
            notes.push_str("; ");
        }
        notes.push_str(what);
    }
}

fn ascending(field: &str, values: impl Iterator<Item = f64>, positive: bool) -> Result<(), ProfileError> {
    let v: Vec<f64> = values.collect();
    if v.is_empty() {
        return fail(field, "is empty; give at least one value");
    }
    for (i, x) in v.iter().enumerate() {
        if !x.is_finite() || (positive && *x <= 0.0) {
            return fail(format!("{field}[{i}]"), format!("is {x}; it must be a positive number"));
        }
        if i > 0 && *x <= v[i - 1] {
            return fail(
                format!("{field}[{i}]"),
                format!(
                    "is {x}, not above the entry before it ({}); list them in ascending order",
                    v[i - 1]
                ),
            );
        }
    }
    Ok(())
}

fn check_table(field: &str, t: &[Vec<Vec<f64>>], p: &EngineProfile) -> Result<(), ProfileError> {
    let dims = |f: &str, got: usize, want: usize, what: &str| {
        if got == want {
            Ok(())
        } else {
            fail(f, format!("has {got} entries; it needs one per {what} ({want})"))
        }
    };
    dims(field, t.len(), p.power_limits_w.len(), "power limit")?;
    for (pi, per_power) in t.iter().enumerate() {
        dims(&format!("{field}[{pi}]"), per_power.len(), p.contexts.len(), "context")?;
        for (ci, row) in per_power.iter().enumerate() {
            let at = format!("{field}[{pi}][{ci}]");
            dims(&at, row.len(), p.batches.len(), "batch")?;
            for (bi, &x) in row.iter().enumerate() {
                if !(x.is_finite() && (x > 0.0 || x == -1.0)) {
                    return fail(
                        format!("{at}[{bi}]"),
                        format!("is {x}; write a positive number, or -1 where it was not measured"),
                    );
                }
            }
            if row.iter().all(|&x| x < 0.0) {
                return fail(at, "has no measured point; a row needs at least one");
            }
        }
    }
    Ok(())
}

/// One row of a table as a curve over the batch: monotone cubic between measured points
/// (Fritsch–Carlson PCHIP, slopes computed once), the last slope beyond them (never
/// downwards), the first value below them.
#[derive(Debug, Clone, PartialEq)]
struct Curve {
    xs: Vec<f64>,
    ys: Vec<f64>,
    /// The Hermite slope at each point.
    ms: Vec<f64>,
}

impl Curve {
    fn new(batches: &[u32], row: &[f64]) -> Curve {
        let (xs, ys): (Vec<f64>, Vec<f64>) = batches
            .iter()
            .zip(row)
            .filter(|(_, y)| **y > 0.0)
            .map(|(&b, &y)| (f64::from(b), y))
            .unzip();
        let n = xs.len();
        let mut ms = vec![0.0; n];
        if n >= 2 {
            let h: Vec<f64> = (0..n - 1).map(|i| xs[i + 1] - xs[i]).collect();
            let d: Vec<f64> = (0..n - 1).map(|i| (ys[i + 1] - ys[i]) / h[i]).collect();
            ms[0] = d[0];
            ms[n - 1] = d[n - 2];
            for i in 1..n - 1 {
                ms[i] = if d[i - 1] * d[i] <= 0.0 {
                    0.0
                } else {
                    // Weighted harmonic mean of the neighbouring slopes.
                    let (w1, w2) = (2.0 * h[i] + h[i - 1], h[i] + 2.0 * h[i - 1]);
                    (w1 + w2) / (w1 / d[i - 1] + w2 / d[i])
                };
            }
            // End slopes that would overshoot are limited (keeps the ends monotone).
            for (i, k) in [(0, 0), (n - 1, n - 2)] {
                if ms[i] * d[k] <= 0.0 {
                    ms[i] = 0.0;
                } else if ms[i].abs() > 3.0 * d[k].abs() {
                    ms[i] = 3.0 * d[k];
                }
            }
        }
        Curve { xs, ys, ms }
    }

    fn at(&self, batch: f64) -> f64 {
        let (xs, ys, ms) = (&self.xs, &self.ys, &self.ms);
        let x = batch.max(1.0);
        let n = xs.len();
        if n == 1 || x <= xs[0] {
            return ys[0];
        }
        if x >= xs[n - 1] {
            // Beyond the table: the last segment's slope per sequence carries on, so that
            // a compute-bound tail grows linearly.
            let slope = ((ys[n - 1] - ys[n - 2]) / (xs[n - 1] - xs[n - 2])).max(0.0);
            return ys[n - 1] + slope * (x - xs[n - 1]);
        }
        let i = xs.partition_point(|&v| v <= x).clamp(1, n - 1) - 1;
        let h = xs[i + 1] - xs[i];
        let t = (x - xs[i]) / h;
        let (t2, t3) = (t * t, t * t * t);
        let h00 = 2.0 * t3 - 3.0 * t2 + 1.0;
        let h10 = t3 - 2.0 * t2 + t;
        let h01 = -2.0 * t3 + 3.0 * t2;
        let h11 = t3 - t2;
        h00 * ys[i] + h10 * h * ms[i] + h01 * ys[i + 1] + h11 * h * ms[i + 1]
    }
}

/// A profile prepared for lookups: what the performance model holds when a replica's
/// curve comes from a profile ([`crate::perf::ReplicaPerf::with_profile`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub model: String,
    pub accelerator: String,
    pub tensor_parallel: u32,
    pub source: ProfileSource,
    contexts: Vec<f64>,
    power_limits_w: Vec<f64>,
    step_s: Vec<Vec<Curve>>,
    power_w: Option<Vec<Vec<Curve>>>,
    prefill_s_per_token: Option<f64>,
}

impl Compiled {
    /// The cost of a decode step; see [`EngineProfile::decode_step`].
    pub fn decode_step(&self, batch: u32, context: u32, power_limit_w: f64) -> ProfiledStep {
        let b = f64::from(batch);
        let c = f64::from(context);
        let at = |table: &Vec<Vec<Curve>>| {
            blend(&self.power_limits_w, power_limit_w, |pi| {
                blend_context(&self.contexts, c, |ci| table[pi][ci].at(b))
            })
        };
        ProfiledStep {
            seconds: at(&self.step_s),
            power_w: self.power_w.as_ref().map(at),
        }
    }

    /// Seconds each prompt token adds to a step, when the profile measured it.
    pub fn prefill_s_per_token(&self) -> Option<f64> {
        self.prefill_s_per_token
    }

    /// The highest power limit the profile was measured at.
    pub fn top_power_limit_w(&self) -> f64 {
        *self.power_limits_w.last().expect("checked: not empty")
    }

    /// The lowest power limit the profile was measured at.
    pub fn lowest_power_limit_w(&self) -> f64 {
        self.power_limits_w[0]
    }
}

/// The profiles a shell was given, one per model, accelerator and tensor-parallel degree:
/// what the cores believe about those replicas instead of the performance model. Cheap to
/// clone; serialized as the list of profiles, each as its TOML text (exact floats: the
/// cores' recorded configurations carry them, so a replay believes bit for bit what the
/// live run believed).
#[derive(Clone, Default)]
pub struct Profiles(Arc<Vec<(EngineProfile, Arc<Compiled>)>>);

impl std::fmt::Debug for Profiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|p| {
                format!(
                    "{} on {} x{} ({:?})",
                    p.model, p.accelerator, p.tensor_parallel, p.provenance.source
                )
            }))
            .finish()
    }
}

impl PartialEq for Profiles {
    fn eq(&self, other: &Profiles) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(other.0.iter()).all(|(a, b)| a.0 == b.0)
    }
}

impl Serialize for Profiles {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(p, _)| p.to_toml()))
    }
}

impl<'de> Deserialize<'de> for Profiles {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Profiles, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        let list = texts
            .iter()
            .map(|t| EngineProfile::from_toml(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(serde::de::Error::custom)?;
        Profiles::new(&list).map_err(serde::de::Error::custom)
    }
}

impl Profiles {
    /// The set of `profiles`; two for the same model, accelerator and degree are refused.
    pub fn new(profiles: &[EngineProfile]) -> Result<Profiles, ProfileError> {
        let mut list: Vec<(EngineProfile, Arc<Compiled>)> = Vec::with_capacity(profiles.len());
        for p in profiles {
            p.check()?;
            if list.iter().any(|(q, _)| {
                q.model == p.model && q.accelerator == p.accelerator && q.tensor_parallel == p.tensor_parallel
            }) {
                return fail(
                    "model",
                    format!(
                        "two profiles describe {} on {} at tensor parallel {}; give one",
                        p.model, p.accelerator, p.tensor_parallel
                    ),
                );
            }
            list.push((p.clone(), Arc::new(p.compile())));
        }
        Ok(Profiles(Arc::new(list)))
    }

    /// The profiles, as given.
    pub fn iter(&self) -> impl Iterator<Item = &EngineProfile> {
        self.0.iter().map(|(p, _)| p)
    }

    /// The profile of `model` on `accelerator` at degree `tp`, if one was given.
    pub fn find(&self, model: &str, accelerator: &str, tp: u32) -> Option<&Arc<Compiled>> {
        self.0
            .iter()
            .map(|(_, c)| c)
            .find(|p| p.model == model && p.accelerator == accelerator && p.tensor_parallel == tp)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Linear blend of `f` over the entries of `grid` around `x`: between the two entries
/// that bracket it, or the nearest entry outside the grid.
fn blend(grid: &[f64], x: f64, f: impl Fn(usize) -> f64) -> f64 {
    let n = grid.len();
    if n == 1 || x <= grid[0] {
        return f(0);
    }
    if x >= grid[n - 1] {
        return f(n - 1);
    }
    let i = grid.partition_point(|&v| v <= x) - 1;
    let (a, b) = (f(i), f(i + 1));
    a + (b - a) * (x - grid[i]) / (grid[i + 1] - grid[i])
}

fn blend_context(grid: &[f64], x: f64, f: impl Fn(usize) -> f64) -> f64 {
    let n = grid.len();
    if x < grid[0] {
        return f(0);
    }
    if n > 1 && x > grid[n - 1] {
        // Longer contexts than measured: the last slope carries on, never downwards.
        let (a, b) = (f(n - 2), f(n - 1));
        let slope = ((b - a) / (grid[n - 1] - grid[n - 2])).max(0.0);
        return b + slope * (x - grid[n - 1]);
    }
    blend(grid, x, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::ReplicaPerf;
    use crate::{AcceleratorId, ModelId};

    fn h100_8b() -> ReplicaPerf {
        ReplicaPerf::new(&ModelId::new("llama-3.1-8b"), &AcceleratorId::new("h100-sxm"), 1).unwrap()
    }

    fn prior() -> EngineProfile {
        let perf = h100_8b();
        EngineProfile::from_model(
            &perf,
            "llama-3.1-8b",
            "h100-sxm",
            &[1, 4, 16, 64, 256, 1024],
            &[256, 1024, 4096],
            &[200.0, 450.0, 700.0],
            "2026-12-01",
        )
        .unwrap()
    }

    #[test]
    fn a_profile_reproduces_its_own_points_and_survives_a_round_trip() {
        let p = prior();
        let again = EngineProfile::from_toml(&p.to_toml()).unwrap();
        assert_eq!(again, p);
        for (pi, &w) in p.power_limits_w.iter().enumerate() {
            for (ci, &c) in p.contexts.iter().enumerate() {
                for (bi, &b) in p.batches.iter().enumerate() {
                    let s = p.decode_step(b, c, w);
                    assert!((s.seconds - p.step_s[pi][ci][bi]).abs() < 1e-12, "b {b} c {c} w {w}");
                    let want = p.power_w.as_ref().unwrap()[pi][ci][bi];
                    assert!((s.power_w.unwrap() - want).abs() < 1e-9);
                }
            }
        }
    }

    #[test]
    fn between_its_points_the_prior_stays_close_to_the_model() {
        let p = prior();
        let perf = h100_8b();
        let mut worst: f64 = 0.0;
        for b in [2, 8, 24, 48, 100, 180, 400, 700] {
            for c in [256, 512, 2048, 4096] {
                let want = perf.step(&crate::perf::StepShape::decode(b, c), 700.0).seconds;
                let got = p.decode_step(b, c, 700.0).seconds;
                worst = worst.max((got / want - 1.0).abs());
            }
        }
        assert!(worst < 0.05, "worst relative error {worst:.3}");
        eprintln!("worst relative error of the prior between its points: {worst:.4}");
    }

    #[test]
    fn sparse_monotone_measurements_give_a_monotone_curve() {
        // Step time rises with batch; some points were not measured.
        let mut p = prior();
        p.power_limits_w = vec![700.0];
        p.contexts = vec![1024];
        p.batches = vec![1, 2, 8, 32, 128, 512];
        p.step_s = vec![vec![vec![0.010, -1.0, 0.0104, 0.013, -1.0, 0.060]]];
        p.power_w = None;
        p.check().unwrap();
        let mut last = 0.0;
        for b in 1..=2048 {
            let s = p.decode_step(b, 1024, 700.0);
            assert!(s.seconds >= last - 1e-15, "falls at batch {b}: {} < {last}", s.seconds);
            assert!(s.power_w.is_none());
            last = s.seconds;
        }
        // Beyond the largest batch, the last slope per sequence carries on.
        let tail = p.decode_step(1024, 1024, 700.0).seconds;
        let slope = (0.060 - 0.013) / (512.0 - 32.0);
        assert!((tail - (0.060 + slope * 512.0)).abs() < 1e-12, "{tail}");
    }

    #[test]
    fn power_limits_and_contexts_blend_linearly_and_hold_outside() {
        let p = prior();
        let (lo, hi) = (p.decode_step(64, 1024, 450.0), p.decode_step(64, 1024, 700.0));
        let mid = p.decode_step(64, 1024, 575.0);
        assert!((mid.seconds - 0.5 * (lo.seconds + hi.seconds)).abs() < 1e-12);
        assert_eq!(
            p.decode_step(64, 1024, 900.0),
            hi,
            "above the highest limit: the highest"
        );
        assert_eq!(p.decode_step(64, 1024, 100.0), p.decode_step(64, 1024, 200.0));
        let longer = p.decode_step(64, 8192, 700.0).seconds;
        assert!(
            longer > p.decode_step(64, 4096, 700.0).seconds,
            "longer contexts cost more"
        );
    }

    #[test]
    fn mistakes_are_named_by_field() {
        let mut p = prior();
        p.batches.swap(1, 2);
        let e = p.check().unwrap_err();
        assert_eq!(e.field, "batches[2]");
        assert!(e.message.contains("ascending"), "{e}");
        let mut p = prior();
        p.step_s[1][2].pop();
        assert_eq!(p.check().unwrap_err().field, "step_s[1][2]");
        let mut p = prior();
        p.step_s[0][0][3] = 0.0;
        let e = p.check().unwrap_err();
        assert_eq!(e.field, "step_s[0][0][3]");
        assert!(e.message.contains("-1 where it was not measured"), "{e}");
        let mut p = prior();
        p.step_s[0][1] = vec![-1.0; 6];
        assert_eq!(p.check().unwrap_err().field, "step_s[0][1]");
        let e = EngineProfile::from_toml("format = 2").unwrap_err();
        assert_eq!(e.field, "(file)", "{e}");
        let mut p = prior();
        p.format = 2;
        assert!(
            EngineProfile::from_toml(&p.to_toml())
                .unwrap_err()
                .message
                .contains("reads format 1")
        );
    }
    fn believing(p: &EngineProfile) -> ReplicaPerf {
        let profiles = Profiles::new(std::slice::from_ref(p)).unwrap();
        let perf = ReplicaPerf::believed(
            &ModelId::new("llama-3.1-8b"),
            &AcceleratorId::new("h100-sxm"),
            1,
            &profiles,
        )
        .unwrap();
        assert!(perf.profile().is_some());
        perf
    }

    #[test]
    fn a_replica_on_the_models_own_profile_runs_like_the_model() {
        // Steady states mix prefill into decode steps: the profile gives the decode part
        // and the model's prefill cost is scaled onto it, so the two should agree.
        let (model, profiled) = (h100_8b(), believing(&prior()));
        let mut worst: f64 = 0.0;
        for batch in [1, 16, 100, 300, 900] {
            for (prompt, output) in [(600, 180), (2000, 64), (128, 512)] {
                // On the profile's own power limits: between them, the profile blends
                // linearly where the model bends (the interpolation's error, not this
                // rule's).
                for power in [200.0, 450.0, 700.0] {
                    let (a, b) = (
                        model.steady_state(batch, prompt, output, power),
                        profiled.steady_state(batch, prompt, output, power),
                    );
                    worst = worst
                        .max((b.output_tokens_per_s / a.output_tokens_per_s - 1.0).abs())
                        .max((b.joules_per_token / a.joules_per_token - 1.0).abs());
                }
            }
        }
        assert!(worst < 0.05, "worst relative difference {worst:.3}");
    }

    #[test]
    fn a_slower_truth_delivers_less_by_its_factor_and_keeps_its_power() {
        let base = believing(&prior());
        let slow = believing(&prior().slower(1.3));
        for (batch, power) in [(8, 700.0), (256, 700.0), (256, 300.0)] {
            let (a, b) = (
                base.steady_state(batch, 600, 180, power),
                slow.steady_state(batch, 600, 180, power),
            );
            let ratio = a.output_tokens_per_s / b.output_tokens_per_s;
            assert!((ratio - 1.3).abs() < 0.01, "batch {batch} at {power} W: {ratio}");
            assert!((a.power_w - b.power_w).abs() < 1e-6);
        }
        assert!(prior().slower(1.3).provenance.notes.contains("x1.3"));
    }

    #[test]
    fn an_energy_floor_stops_energy_per_token_falling_past_its_batch() {
        let p = prior();
        let floored = p.energy_floor(64, 70.0).unwrap();
        let jpt = |q: &EngineProfile, b: u32| {
            let s = q.decode_step(b, 1024, 700.0);
            s.power_w.unwrap() * s.seconds / f64::from(b)
        };
        // At the floor batch the shape passes near the original; beyond it the model keeps
        // falling while the floor holds.
        let (f64_, m64) = (jpt(&floored, 64), jpt(&p, 64));
        assert!(f64_ >= m64 && f64_ < m64 * 1.5, "{f64_} vs {m64}");
        assert!(jpt(&p, 1024) < 0.75 * m64, "the model keeps falling");
        // Beyond it the floor holds, unless holding it would take more than the power
        // limit (then the device draws the limit).
        for b in [128, 256, 512, 1024] {
            let seconds = floored.decode_step(b, 1024, 700.0).seconds;
            let reachable = m64.min(700.0 * seconds / f64::from(b));
            let got = jpt(&floored, b);
            assert!(got >= 0.99 * reachable, "batch {b}: {got} < {reachable}");
        }
        assert!(
            jpt(&floored, 128) > 1.1 * jpt(&p, 128),
            "the truth's energy differs from the model's"
        );
        // Steps take as long as before; power stays within the limit.
        assert_eq!(floored.step_s, p.step_s);
        for (pi, per) in floored.power_w.as_ref().unwrap().iter().enumerate() {
            for w in per.iter().flatten() {
                assert!(*w <= p.power_limits_w[pi] + 1e-9);
            }
        }
        let mut cpu = p.clone();
        cpu.power_w = None;
        assert_eq!(cpu.energy_floor(64, 70.0).unwrap_err().field, "power_w");
    }

    #[test]
    fn profiles_are_matched_by_model_accelerator_and_degree_and_travel_as_data() {
        let p = prior();
        let e = Profiles::new(&[p.clone(), p.clone()]).unwrap_err();
        assert!(e.message.contains("two profiles describe"), "{e}");
        let set = Profiles::new(std::slice::from_ref(&p)).unwrap();
        assert!(set.find("llama-3.1-8b", "h100-sxm", 1).is_some());
        assert!(set.find("llama-3.1-8b", "h100-sxm", 2).is_none());
        assert!(set.find("llama-3.1-8b", "h200-sxm", 1).is_none());
        let json = serde_json::to_string(&set).unwrap();
        let back: Profiles = serde_json::from_str(&json).unwrap();
        assert_eq!(back, set);
        // A profile of another model is refused by name.
        let other = ReplicaPerf::new(&ModelId::new("llama-3.1-70b"), &AcceleratorId::new("h100-sxm"), 4).unwrap();
        let e = other
            .with_profile(
                &ModelId::new("llama-3.1-70b"),
                &AcceleratorId::new("h100-sxm"),
                Arc::new(p.compile()),
            )
            .unwrap_err();
        assert_eq!(e.field, "model", "{e}");
    }
}
