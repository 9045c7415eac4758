//! The one objective type: what the tuner maximizes per replica and what placement
//! minimizes per output token. The policy's `ObjectiveKind` is the user's choice without
//! prices; [`crate::policy::Policies::objective`] turns it into an [`Objective`].

use crate::perf::SteadyState;

/// What tuning and placement optimize, with the prices a cost objective weighs with.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Objective {
    /// Output tokens per joule of device energy.
    TokensPerJoule,
    /// Output tokens per dollar: device time at `usd_per_device_hour` plus energy at
    /// `usd_per_kwh` and `pue`. Device time dominates, so this favours throughput.
    TokensPerDollar {
        usd_per_device_hour: f64,
        usd_per_kwh: f64,
        pue: f64,
    },
    /// Output tokens per second. Used where no energy counter exists (e.g. an engine on a
    /// CPU): with the machine's power constant, tokens per joule is proportional to it.
    Throughput,
}

impl Objective {
    /// The prices a tokens-per-dollar objective weighs with.
    pub fn pricing(&self) -> Option<crate::usage::Pricing> {
        match *self {
            Objective::TokensPerDollar {
                usd_per_device_hour,
                usd_per_kwh,
                pue,
            } => Some(crate::usage::Pricing {
                usd_per_device_hour,
                usd_per_kwh,
                pue,
            }),
            Objective::TokensPerJoule | Objective::Throughput => None,
        }
    }
}

impl Objective {
    /// The unit of the objective, for people.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::TokensPerJoule => "output tokens/J",
            Objective::TokensPerDollar { .. } => "output tokens/$",
            Objective::Throughput => "output tokens/s",
        }
    }
}

impl Objective {
    /// What one output token costs at steady state `s` of a replica of `devices` devices
    /// (lower is better), for placement: joules per token; dollars per token, with the
    /// node's own device price `usd_per_device_hour` in place of the objective's; or
    /// device-seconds per token for throughput.
    pub fn cost_per_token(&self, s: &SteadyState, devices: f64, usd_per_device_hour: f64) -> f64 {
        match *self {
            Objective::TokensPerJoule => s.joules_per_token,
            Objective::TokensPerDollar { usd_per_kwh, pue, .. } => {
                let prices = crate::usage::Pricing {
                    usd_per_device_hour,
                    usd_per_kwh,
                    pue,
                };
                // One second of the replica at this power.
                prices.cost_usd(s.power_w * devices, devices) / s.output_tokens_per_s
            }
            Objective::Throughput => devices / s.output_tokens_per_s,
        }
    }
}
