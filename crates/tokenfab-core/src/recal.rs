//! Online recalibration: each replica's belief about itself (its engine profile, or the
//! performance model) corrected from its own telemetry while it runs.
//!
//! A belief says how long a step takes and how much power the devices draw at a given
//! batch, request shape and power limit. The replica measures, over intervals of a few
//! seconds, the output tokens it delivered, the energy its devices drew (where they have a
//! counter), the requests in flight and the shape of the requests that finished. From an
//! interval the recalibrator computes what the uncorrected belief predicts for the same
//! mean batch, shape and power limit, and the two ratios:
//!
//! - **time**: predicted over measured throughput, i.e. measured over believed step time
//!   (1.3 = the engine is 30% slower than believed);
//! - **power**: measured over believed device power.
//!
//! Each is a running mean of its logarithm: the first intervals weigh equally, later ones
//! at least `alpha` (so that a change of the truth is followed within a few intervals).
//! The correction's *uncertainty* is one standard error of the time ratio: the spread of
//! the intervals around the estimate over the square root of the intervals it rests on,
//! plus the prior's error shrinking as measurements come in. Before any measurement the
//! correction is 1 and the uncertainty is the prior's error.
//!
//! The corrected belief is [`crate::perf::ReplicaPerf::corrected`]: the tuner follows it;
//! the control plane's capacity estimates (admission, owed rates, placement) divide by the
//! time correction raised by its uncertainty, so that admission stays conservative while
//! the correction is uncertain. The *model error* of an interval is how far the corrected
//! belief (before that interval updated it) was from what was measured: it is what
//! `tokenfab tuning`, `/v1/tuning` and the metrics show.

use crate::perf::ReplicaPerf;
use crate::time::Timestamp;
use crate::tuner::Observation;
use std::time::Duration;

/// Settings of the recalibration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecalConfig {
    pub enabled: bool,
    /// Shortest measurement interval.
    pub interval: Duration,
    /// Fewest requests finished in an interval for it to count.
    pub min_finished: u64,
    /// Least weight of a new interval (0 < alpha <= 1).
    pub alpha: f64,
    /// How far the belief may be off before anything was measured (relative, one
    /// standard error): admission counts on that much less until measurements say.
    pub prior_error: f64,
}

impl Default for RecalConfig {
    fn default() -> Self {
        RecalConfig {
            enabled: true,
            interval: Duration::from_secs(5),
            min_finished: 8,
            alpha: 0.3,
            prior_error: 0.1,
        }
    }
}

/// A replica's correction of its belief, as measured so far.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Correction {
    /// Measured over believed step time (1.3 = 30% slower than believed).
    pub time: f64,
    /// Measured over believed device power.
    pub power: f64,
    /// Relative standard error of `time`.
    pub uncertainty: f64,
    /// Intervals measured (throughput), and of them with an energy reading.
    pub samples: u32,
    pub power_samples: u32,
    /// How far the corrected belief was from the last interval's measured throughput and
    /// energy per token (relative, before the interval updated it); `None` before two
    /// intervals.
    pub model_error: Option<f64>,
    pub energy_error: Option<f64>,
}

impl Correction {
    /// No correction, with the prior's error.
    pub fn prior(prior_error: f64) -> Correction {
        Correction {
            time: 1.0,
            power: 1.0,
            uncertainty: prior_error,
            samples: 0,
            power_samples: 0,
            model_error: None,
            energy_error: None,
        }
    }

    /// The time correction raised by its uncertainty: what capacity estimates divide by.
    pub fn conservative_time(&self) -> f64 {
        self.time * (1.0 + self.uncertainty)
    }
}

/// Where an interval started.
#[derive(Debug, Clone, Copy)]
struct Start {
    at: Timestamp,
    tokens: u64,
    energy_j: Option<f64>,
    finished: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    window: u32,
    power_limit_w: f64,
}

/// The recalibration of one replica (see the module docs).
#[derive(Debug, Clone)]
pub struct Recalibrator {
    config: RecalConfig,
    start: Option<Start>,
    in_flight_sum: f64,
    ticks: u32,
    log_time: f64,
    log_power: f64,
    /// Running mean of squared deviations of the log time ratio.
    var_time: f64,
    samples: u32,
    power_samples: u32,
    model_error: Option<f64>,
    energy_error: Option<f64>,
}

impl Recalibrator {
    pub fn new(config: RecalConfig) -> Recalibrator {
        Recalibrator {
            config,
            start: None,
            in_flight_sum: 0.0,
            ticks: 0,
            log_time: 0.0,
            log_power: 0.0,
            var_time: 0.0,
            samples: 0,
            power_samples: 0,
            model_error: None,
            energy_error: None,
        }
    }

    /// The correction so far.
    pub fn correction(&self) -> Correction {
        let n = f64::from(self.samples);
        // Intervals the running mean rests on: all of them at first, then about 2/alpha.
        let effective = n.min((2.0 - self.config.alpha) / self.config.alpha).max(1.0);
        let prior = self.config.prior_error / (n + 1.0).sqrt();
        let spread = if self.samples >= 2 {
            (self.var_time / effective).sqrt()
        } else {
            0.0
        };
        Correction {
            time: self.log_time.exp(),
            power: self.log_power.exp(),
            uncertainty: (prior * prior + spread * spread).sqrt(),
            samples: self.samples,
            power_samples: self.power_samples,
            model_error: self.model_error,
            energy_error: self.energy_error,
        }
    }

    /// Takes the replica's counters now; `perf` is its uncorrected belief, `devices` its
    /// device count. Returns true when an interval ended and changed the correction.
    pub fn observe(&mut self, perf: &ReplicaPerf, o: &Observation, window: u32, power_limit_w: f64) -> bool {
        if !self.config.enabled {
            return false;
        }
        let restart = |o: &Observation| Start {
            at: o.at,
            tokens: o.tokens,
            energy_j: o.energy_j,
            finished: o.finished,
            prompt_tokens: o.prompt_tokens,
            completion_tokens: o.completion_tokens,
            window,
            power_limit_w,
        };
        let Some(start) = self.start else {
            self.start = Some(restart(o));
            self.in_flight_sum = 0.0;
            self.ticks = 0;
            return false;
        };
        // A knob changed or a counter went back (a restart): begin again from here.
        if start.window != window
            || start.power_limit_w != power_limit_w
            || o.tokens < start.tokens
            || o.finished < start.finished
        {
            self.start = Some(restart(o));
            self.in_flight_sum = 0.0;
            self.ticks = 0;
            return false;
        }
        self.in_flight_sum += f64::from(o.in_flight);
        self.ticks += 1;
        let elapsed = o.at.since(start.at);
        let finished = o.finished - start.finished;
        if elapsed < self.config.interval || finished < self.config.min_finished {
            return false;
        }
        let seconds = elapsed.as_secs_f64();
        let tokens = (o.tokens - start.tokens) as f64;
        let batch = self.in_flight_sum / f64::from(self.ticks.max(1));
        let prompt = (o.prompt_tokens.saturating_sub(start.prompt_tokens)) as f64 / finished as f64;
        let output = (o.completion_tokens.saturating_sub(start.completion_tokens)) as f64 / finished as f64;
        let energy = match (start.energy_j, o.energy_j) {
            (Some(a), Some(b)) if b > a => Some(b - a),
            _ => None,
        };
        self.start = Some(restart(o));
        self.in_flight_sum = 0.0;
        self.ticks = 0;
        if tokens <= 0.0 || batch < 1.0 {
            return false;
        }
        let believed = perf.steady_state(
            batch.round() as u32,
            prompt.round() as u32,
            output.round().max(1.0) as u32,
            power_limit_w,
        );
        let measured_tps = tokens / seconds;
        let time_ratio = believed.output_tokens_per_s / measured_tps;
        if !(time_ratio.is_finite() && time_ratio > 0.0) {
            return false;
        }
        let before = self.correction();
        if self.samples > 0 {
            let predicted = believed.output_tokens_per_s / before.time;
            self.model_error = Some((predicted / measured_tps - 1.0).abs());
        }
        let weight = (1.0 / f64::from(self.samples + 1)).max(self.config.alpha);
        let deviation = time_ratio.ln() - self.log_time;
        self.log_time += weight * deviation;
        self.var_time = (1.0 - weight) * (self.var_time + weight * deviation * deviation);
        self.samples += 1;
        if let Some(joules) = energy {
            let devices = f64::from(perf.devices());
            let measured_w = joules / seconds / devices;
            let power_ratio = measured_w / believed.power_w;
            if power_ratio.is_finite() && power_ratio > 0.0 {
                if self.power_samples > 0 {
                    let predicted_jpt = believed.joules_per_token * before.time * before.power;
                    let measured_jpt = joules / tokens;
                    self.energy_error = Some((predicted_jpt / measured_jpt - 1.0).abs());
                }
                let weight = (1.0 / f64::from(self.power_samples + 1)).max(self.config.alpha);
                self.log_power += weight * (power_ratio.ln() - self.log_power);
                self.power_samples += 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AcceleratorId, ModelId};

    fn perf() -> ReplicaPerf {
        ReplicaPerf::new(&ModelId::new("llama-3.1-8b"), &AcceleratorId::new("h100-sxm"), 1).unwrap()
    }

    /// Counters of a replica running `batch` sequences of (600, 180) tokens steadily on an
    /// engine `slower` times slower than `perf` at `power` times its power, sampled every
    /// 100 ms for `seconds` from `from`.
    struct Truth {
        slower: f64,
        power: f64,
    }

    fn feed(
        r: &mut Recalibrator,
        belief: &ReplicaPerf,
        truth: &dyn Fn(f64) -> Truth,
        o: &mut Observation,
        seconds: f64,
        errors: &mut Vec<(f64, Correction)>,
    ) {
        let batch = 64;
        let ticks = (seconds * 10.0) as u32;
        // Exact running totals; the counters are their whole parts.
        let (mut tokens, mut joules) = (o.tokens as f64, o.energy_j.unwrap_or(0.0));
        for _ in 0..ticks {
            let t = o.at.since(Timestamp::ZERO).as_secs_f64();
            let now = truth(t);
            let s = belief.steady_state(batch, 600, 180, 700.0);
            tokens += s.output_tokens_per_s / now.slower * 0.1;
            let finished = tokens / 180.0;
            joules += s.power_w * now.power * 0.1;
            o.at = o.at.saturating_add(Duration::from_millis(100));
            o.tokens = tokens as u64;
            o.finished = finished as u64;
            o.completion_tokens = o.finished * 180;
            o.prompt_tokens = o.finished * 600;
            o.energy_j = Some(joules);
            o.in_flight = batch;
            if r.observe(belief, o, batch, 700.0) {
                errors.push((t, r.correction()));
            }
        }
    }

    fn start() -> Observation {
        Observation {
            energy_j: Some(0.0),
            ..Observation::default()
        }
    }

    #[test]
    fn before_measurements_the_correction_is_the_prior() {
        let r = Recalibrator::new(RecalConfig::default());
        let c = r.correction();
        assert_eq!((c.time, c.power, c.samples), (1.0, 1.0, 0));
        assert!((c.uncertainty - 0.1).abs() < 1e-12);
        assert!((c.conservative_time() - 1.1).abs() < 1e-12);
    }

    #[test]
    fn a_slower_engine_is_learned_and_a_step_change_followed_within_a_bounded_time() {
        let belief = perf();
        let mut r = Recalibrator::new(RecalConfig::default());
        let mut o = start();
        let mut seen = Vec::new();
        // 30% slower at 80% of the believed power, then at t = 120 s the engine becomes
        // 10% faster than believed at full believed power.
        let truth = |t: f64| {
            if t < 120.0 {
                Truth {
                    slower: 1.3,
                    power: 0.8,
                }
            } else {
                Truth {
                    slower: 1.0 / 1.1,
                    power: 1.0,
                }
            }
        };
        feed(&mut r, &belief, &truth, &mut o, 240.0, &mut seen);
        let at = |t: f64| seen.iter().rev().find(|(s, _)| *s < t).expect("measured by then").1;
        let early = at(119.0);
        assert!((early.time / 1.3 - 1.0).abs() < 0.03, "{early:?}");
        assert!((early.power / 0.8 - 1.0).abs() < 0.03, "{early:?}");
        assert!(
            early.model_error.unwrap() < 0.05 && early.uncertainty < 0.05,
            "{early:?}"
        );
        // After the step: the error is large at first, under 5% within 60 s.
        let after_step = seen.iter().find(|(t, _)| *t > 120.0).unwrap().1;
        assert!(after_step.model_error.unwrap() > 0.2, "{after_step:?}");
        let settled = seen
            .iter()
            .filter(|(t, _)| *t > 120.0)
            .find(|(_, c)| c.model_error.is_some_and(|e| e < 0.05))
            .map(|(t, _)| t - 120.0)
            .expect("converges");
        assert!(settled <= 60.0, "took {settled} s");
        let end = at(240.0);
        assert!((end.time * 1.1 - 1.0).abs() < 0.02, "{end:?}");
    }

    #[test]
    fn knob_changes_and_idle_intervals_do_not_count() {
        let belief = perf();
        let mut r = Recalibrator::new(RecalConfig::default());
        let mut o = start();
        // Idle: no tokens, nothing learned.
        for _ in 0..100 {
            o.at = o.at.saturating_add(Duration::from_millis(100));
            assert!(!r.observe(&belief, &o, 64, 700.0));
        }
        // A window that changes every second never completes an interval.
        for i in 0..100u32 {
            o.at = o.at.saturating_add(Duration::from_millis(100));
            o.tokens += 500;
            o.finished += 3;
            o.in_flight = 64;
            assert!(!r.observe(&belief, &o, 32 + (i / 10) % 2, 700.0));
        }
        assert_eq!(r.correction().samples, 0);
        let off = RecalConfig {
            enabled: false,
            ..RecalConfig::default()
        };
        let mut r = Recalibrator::new(off);
        let mut seen = Vec::new();
        feed(
            &mut r,
            &belief,
            &|_| Truth {
                slower: 2.0,
                power: 1.0,
            },
            &mut start(),
            30.0,
            &mut seen,
        );
        assert!(seen.is_empty() && r.correction().time == 1.0);
    }
}
