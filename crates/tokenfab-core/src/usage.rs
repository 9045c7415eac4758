//! Usage accounting: tokens, energy, device time and cost, and the price model.

use serde::{Deserialize, Serialize};
use std::ops::AddAssign;

/// Resources one request (or a sum of requests) consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens as the engine reported them.
    pub prompt_tokens: u64,
    /// Completion tokens as the engine reported them.
    pub completion_tokens: u64,
    /// Device energy attributed to the work, joules.
    pub joules: f64,
    /// Device time attributed to the work, device-seconds.
    pub device_seconds: f64,
    /// Cost in US dollars, from [`Pricing::cost_usd`].
    pub cost_usd: f64,
}

impl Usage {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

impl AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        // Saturating: counts come from agents and engines, and must never overflow.
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.joules += o.joules;
        self.device_seconds += o.device_seconds;
        self.cost_usd += o.cost_usd;
    }
}

/// Prices of one accelerator pool at one site.
///
/// cost = device-seconds x price per device-hour / 3600 + joules x PUE x price per kWh / 3.6e6
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pricing {
    pub usd_per_device_hour: f64,
    pub usd_per_kwh: f64,
    /// Power usage effectiveness of the site: facility energy / IT energy.
    pub pue: f64,
}

impl Pricing {
    /// The one cost rule: device time at its price plus energy (with the site's PUE) at
    /// its price. Every cost the cores compute and every cost-based objective goes
    /// through it (the simulator's bill of a whole pool prices its device-hours itself).
    pub fn cost_usd(&self, joules: f64, device_seconds: f64) -> f64 {
        self.device_usd(device_seconds) + self.energy_usd(joules)
    }

    /// A site's energy price alone (device time unpriced).
    pub fn energy_only(usd_per_kwh: f64, pue: f64) -> Pricing {
        Pricing {
            usd_per_device_hour: 0.0,
            usd_per_kwh,
            pue,
        }
    }

    /// Dollars for `device_seconds` of device time.
    pub fn device_usd(&self, device_seconds: f64) -> f64 {
        device_seconds * self.usd_per_device_hour / 3600.0
    }

    /// Dollars for `joules` of device energy, the facility's overhead (PUE) included.
    pub fn energy_usd(&self, joules: f64) -> f64 {
        joules * self.pue * self.usd_per_kwh / 3.6e6
    }
}

/// Site defaults when a deployment configures nothing: assumption, flagged in docs.
/// 0.10 $/kWh and PUE 1.2 are round illustrative figures, not measurements.
pub const DEFAULT_USD_PER_KWH: f64 = 0.10;
pub const DEFAULT_PUE: f64 = 1.2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_adds_device_time_and_energy() {
        let p = Pricing {
            usd_per_device_hour: 2.0,
            usd_per_kwh: 0.10,
            pue: 1.5,
        };
        // One device-hour plus 3.6 MJ (1 kWh) of device energy.
        let c = p.cost_usd(3.6e6, 3600.0);
        assert!((c - (2.0 + 0.15)).abs() < 1e-12, "{c}");
    }
}

/// A byte count as people read it: `512 B`, `3.2 MiB`, `50.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod bytes_tests {
    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(50 << 30), "50.0 GiB");
    }
}
