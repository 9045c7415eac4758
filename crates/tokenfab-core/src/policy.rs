//! Every decision-shaping setting of tokenfab, in one type with one set of defaults.
//!
//! The control plane's flags, the agent's flags and a scenario's `policies:` section all
//! produce a [`Policies`]; the control core's and the agent core's configurations are
//! derived from it here ([`Policies::control_config`], [`Policies::agent_config`]). A
//! setting added here is therefore a flag and a scenario field at once, with the same
//! name, default and meaning, and the simulator can express every mode the live system
//! has.
//!
//! What is not policy stays out: deployment facts (models served, prices, quotas,
//! retention, limits on input) are set by the caller on the derived configurations.

use crate::AcceleratorId;
use crate::agent::{AgentConfig, Routing};
use crate::catalog::Catalog;
use crate::control::{ControlConfig, PlacementMode, QueueOrder, SlaClass};
use crate::placement::ActivationConfig;
use crate::tuner::{Objective, TunerConfig, TunerMode};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// A setting with a fixed set of named values: parsed from flags and YAML alike (`-` and
/// `_` are the same), written kebab-case for people and snake_case in YAML and JSON.
pub trait Choice: Sized + Copy + PartialEq + 'static {
    /// Every value with its name, in the order `--help` lists them.
    const CHOICES: &'static [(&'static str, Self)];

    fn name(self) -> &'static str {
        Self::CHOICES.iter().find(|(_, v)| *v == self).map_or("?", |(n, _)| n)
    }

    /// The value named `s`, or an error that lists the names.
    fn parse_choice(s: &str) -> Result<Self, String> {
        let wanted = s.trim().replace('_', "-").to_ascii_lowercase();
        Self::CHOICES
            .iter()
            .find(|(n, _)| *n == wanted)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::CHOICES.iter().map(|(n, _)| *n).collect();
                format!("'{s}' is not one of {}", names.join(", "))
            })
    }
}

macro_rules! choice {
    ($t:ty { $($name:literal => $v:expr),+ $(,)? }) => {
        impl Choice for $t {
            const CHOICES: &'static [(&'static str, Self)] = &[$(($name, $v)),+];
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                <$t as Choice>::parse_choice(s)
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(Choice::name(*self))
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&Choice::name(*self).replace('-', "_"))
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$t as Choice>::parse_choice(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

choice!(QueueOrder { "deadline" => QueueOrder::Deadline, "slack" => QueueOrder::Slack });
choice!(PlacementMode {
    "off" => PlacementMode::Off,
    "advisory" => PlacementMode::Advisory,
    "active" => PlacementMode::Active,
});
choice!(TunerMode {
    "off" => TunerMode::Off,
    "advisory" => TunerMode::Advisory,
    "active" => TunerMode::Active,
});
choice!(Routing {
    "prefix-affinity" => Routing::PrefixAffinity,
    "least-loaded" => Routing::LeastLoaded,
    "round-robin" => Routing::RoundRobin,
});
choice!(ObjectiveKind {
    "tokens-per-joule" => ObjectiveKind::TokensPerJoule,
    "tokens-per-dollar" => ObjectiveKind::TokensPerDollar,
    "throughput" => ObjectiveKind::Throughput,
});

/// What the tuner maximizes, as configured (the prices a tokens-per-dollar objective
/// needs come from the site and the devices: [`Prices`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectiveKind {
    TokensPerJoule,
    TokensPerDollar,
    Throughput,
}

/// Durations written for people (`90s`, `5m`, `1h 30m`), in YAML and JSON.
pub mod human_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// `s` as a duration, or an error with examples.
    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim())
            .map_err(|e| format!("'{s}' is not a duration ({e}); write e.g. 90s, 30m, 2h or 1d"))
    }
}

/// An SLA class as written in policies: `{name, best_effort}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassPolicy {
    pub name: String,
    /// Never refused for lack of capacity; runs only when no committed work waits.
    #[serde(default)]
    pub best_effort: bool,
}

impl From<&ClassPolicy> for SlaClass {
    fn from(c: &ClassPolicy) -> SlaClass {
        SlaClass {
            name: c.name.clone(),
            committed: !c.best_effort,
        }
    }
}

impl From<&SlaClass> for ClassPolicy {
    fn from(c: &SlaClass) -> ClassPolicy {
        ClassPolicy {
            name: c.name.clone(),
            best_effort: !c.committed,
        }
    }
}

/// `placement`: which replicas take work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementPolicy {
    /// `active` parks surplus replicas, `advisory` only shows what it would park and the
    /// layout it would choose, `off` gives no advice.
    pub mode: PlacementMode,
    /// How long a replica must be surplus before it is parked.
    #[serde(with = "human_duration")]
    pub park_after: Duration,
    /// Capacity kept active beyond the rate owed, as a fraction of it.
    pub margin: f64,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        let activation = ActivationConfig::default();
        PlacementPolicy {
            mode: PlacementMode::Advisory,
            park_after: activation.park_after,
            margin: activation.margin,
        }
    }
}

/// `tuner`: the batch-size and power tuner on every replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TunerPolicy {
    /// `active` moves windows (and power limits), `advisory` only recommends, `off`
    /// leaves them as configured.
    pub mode: TunerMode,
    pub objective: ObjectiveKind,
    /// Tune power limits too, where the devices allow.
    pub power: bool,
    /// Throughput kept above what deadlines need, as a fraction of it.
    pub throughput_margin: f64,
    /// The control plane asks for the rate that finishes every batch within this share of
    /// the time left to its deadline.
    pub deadline_share: f64,
    /// Fewest finished requests in one measurement epoch.
    pub epoch_requests: u64,
    /// Shortest measurement epoch.
    #[serde(with = "human_duration")]
    pub epoch: Duration,
    /// Follow each replica's performance model (checked by measurement); `false`: search
    /// by measurement alone.
    pub model: bool,
}

impl Default for TunerPolicy {
    fn default() -> Self {
        TunerPolicy {
            mode: TunerMode::Advisory,
            objective: ObjectiveKind::TokensPerJoule,
            power: true,
            throughput_margin: 0.1,
            deadline_share: 0.8,
            epoch_requests: 24,
            epoch: Duration::from_secs(3),
            model: true,
        }
    }
}

/// `recalibration`: each replica's belief about itself corrected online from its own
/// telemetry (see [`crate::recal`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecalibrationPolicy {
    /// Correct the beliefs; `false` keeps the profile (or the performance model) as given.
    pub enabled: bool,
    /// Shortest measurement interval.
    #[serde(with = "human_duration")]
    pub interval: Duration,
    /// How far a belief may be off before anything was measured (relative): capacity
    /// estimates count on that much less until measurements narrow it.
    pub prior_error: f64,
}

impl Default for RecalibrationPolicy {
    fn default() -> Self {
        let c = crate::recal::RecalConfig::default();
        RecalibrationPolicy {
            enabled: c.enabled,
            interval: c.interval,
            prior_error: c.prior_error,
        }
    }
}

/// Every decision-shaping setting (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policies {
    /// Concurrency window of a replica that sets none.
    pub window: u32,
    /// How long a lease lives without a heartbeat that renews it.
    #[serde(with = "human_duration")]
    pub lease_ttl: Duration,
    /// How often agents report; the control plane tells them at registration.
    #[serde(with = "human_duration")]
    pub heartbeat_interval: Duration,
    /// Attempts per request before a retryable failure is final.
    pub max_attempts: u32,
    /// How long an agent holds finished results to report them together.
    #[serde(with = "human_duration")]
    pub report_delay: Duration,
    /// How long an agent waits before asking again after a lease came back empty.
    #[serde(with = "human_duration")]
    pub empty_lease_backoff: Duration,
    /// How long the control plane holds a lease call open waiting for work (a long poll);
    /// zero makes agents poll every `empty_lease_backoff`.
    #[serde(with = "human_duration")]
    pub lease_wait: Duration,
    /// How often each agent reads its devices' energy counters to share energy among the
    /// requests that finished.
    #[serde(with = "human_duration")]
    pub energy_sample_interval: Duration,
    /// Refuse batches of committed SLA classes whose deadline cannot be met.
    pub admission: bool,
    /// Share of the estimated capacity admission counts on, in (0, 1].
    pub admission_headroom: f64,
    /// SLA classes, highest priority first, committed ones before best-effort ones.
    pub sla_classes: Vec<ClassPolicy>,
    /// The class of batches that name none: `standard` if listed, else the first.
    pub default_sla_class: Option<String>,
    /// Order of committed work within a class.
    pub queue_order: QueueOrder,
    pub placement: PlacementPolicy,
    pub tuner: TunerPolicy,
    pub recalibration: RecalibrationPolicy,
    /// How an agent picks the replica for the next request.
    pub routing: Routing,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            window: 64,
            lease_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            max_attempts: 4,
            report_delay: Duration::from_millis(20),
            empty_lease_backoff: Duration::from_millis(100),
            lease_wait: Duration::from_secs(5),
            energy_sample_interval: Duration::from_millis(100),
            admission: true,
            // On the mixed-fleet scenario under overload, 0.9 and 0.8 kept every admitted
            // batch on time and 1.0 did not (95%); 0.9 refuses less (simulations/README.md).
            admission_headroom: 0.9,
            sla_classes: vec![
                ClassPolicy {
                    name: "standard".into(),
                    best_effort: false,
                },
                ClassPolicy {
                    name: "best-effort".into(),
                    best_effort: true,
                },
            ],
            default_sla_class: None,
            queue_order: QueueOrder::Deadline,
            placement: PlacementPolicy::default(),
            tuner: TunerPolicy::default(),
            recalibration: RecalibrationPolicy::default(),
            routing: Routing::PrefixAffinity,
        }
    }
}

/// Prices a tokens-per-dollar objective needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    pub usd_per_device_hour: f64,
    pub usd_per_kwh: f64,
    pub pue: f64,
}

impl Prices {
    /// No prices (a tokens-per-dollar objective then counts energy alone).
    pub fn none() -> Prices {
        Prices {
            usd_per_device_hour: 0.0,
            usd_per_kwh: crate::usage::DEFAULT_USD_PER_KWH,
            pue: crate::usage::DEFAULT_PUE,
        }
    }

    /// The site's prices, with the device-hour price given or else the catalog's
    /// indicative price of `accelerator` (0 when unknown).
    pub fn new(
        usd_per_device_hour: Option<f64>,
        accelerator: Option<&AcceleratorId>,
        usd_per_kwh: f64,
        pue: f64,
    ) -> Prices {
        let catalog = || {
            accelerator
                .and_then(|a| Catalog::builtin().accelerator(a).ok())
                .map_or(0.0, |a| a.price_usd_per_hour)
        };
        Prices {
            usd_per_device_hour: usd_per_device_hour.unwrap_or_else(catalog),
            usd_per_kwh,
            pue,
        }
    }
}

/// A setting out of range: which, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// The setting, as a scenario spells it (`placement.margin`).
    pub field: &'static str,
    pub message: String,
}

impl Policies {
    /// The SLA classes as the control core takes them.
    pub fn classes(&self) -> Vec<SlaClass> {
        self.sla_classes.iter().map(SlaClass::from).collect()
    }

    /// The class of batches that name none.
    pub fn default_class(&self) -> String {
        self.default_sla_class.clone().unwrap_or_else(|| {
            self.sla_classes
                .iter()
                .find(|c| c.name == "standard")
                .or(self.sla_classes.first())
                .map_or_else(|| "standard".into(), |c| c.name.clone())
        })
    }

    /// Checks every setting; the error names the first one out of range.
    pub fn check(&self) -> Result<(), PolicyError> {
        let bad = |field, message: String| Err(PolicyError { field, message });
        if self.window == 0 {
            return bad("window", "must be at least 1".into());
        }
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval", "must be longer than zero".into());
        }
        if self.lease_ttl < self.heartbeat_interval * 2 {
            return bad(
                "lease_ttl",
                format!(
                    "{} is too short: agents renew leases with each heartbeat (every {}), so a lease must live at least two heartbeats",
                    humantime::format_duration(self.lease_ttl),
                    humantime::format_duration(self.heartbeat_interval)
                ),
            );
        }
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".into());
        }
        if !(self.admission_headroom > 0.0 && self.admission_headroom <= 1.0) {
            return bad(
                "admission_headroom",
                format!("is {}; it must be in (0, 1]", self.admission_headroom),
            );
        }
        if self.empty_lease_backoff.is_zero() {
            return bad("empty_lease_backoff", "must be longer than zero".into());
        }
        if !(self.recalibration.prior_error >= 0.0 && self.recalibration.prior_error < 1.0) {
            return bad(
                "recalibration.prior_error",
                format!("is {}; it must be in [0, 1)", self.recalibration.prior_error),
            );
        }
        if self.recalibration.interval.is_zero() {
            return bad("recalibration.interval", "must be longer than zero".into());
        }
        if self.energy_sample_interval.is_zero() {
            return bad("energy_sample_interval", "must be longer than zero".into());
        }
        SlaClass::check(&self.classes(), &self.default_class()).map_err(|message| PolicyError {
            field: "sla_classes",
            message,
        })?;
        if !(self.placement.margin >= 0.0 && self.placement.margin.is_finite()) {
            return bad("placement.margin", "must be a fraction >= 0".into());
        }
        if !(self.tuner.deadline_share > 0.0 && self.tuner.deadline_share <= 1.0) {
            return bad(
                "tuner.deadline_share",
                format!("is {}; it must be in (0, 1]", self.tuner.deadline_share),
            );
        }
        if !(self.tuner.throughput_margin >= 0.0 && self.tuner.throughput_margin.is_finite()) {
            return bad("tuner.throughput_margin", "must be a fraction >= 0".into());
        }
        if self.tuner.epoch.is_zero() {
            return bad("tuner.epoch", "must be longer than zero".into());
        }
        Ok(())
    }

    /// The control core's configuration: these policies, and the defaults of everything
    /// else (models, prices, quotas and retention are the caller's to set).
    pub fn control_config(&self) -> ControlConfig {
        ControlConfig {
            lease_ttl: self.lease_ttl,
            heartbeat_interval: self.heartbeat_interval,
            max_attempts: self.max_attempts,
            sla_classes: self.classes(),
            default_sla_class: self.default_class(),
            queue_order: self.queue_order,
            deadline_share: self.tuner.deadline_share,
            placement: self.placement.mode,
            activation: ActivationConfig {
                park_after: self.placement.park_after,
                margin: self.placement.margin,
                ..ActivationConfig::default()
            },
            admission: self.admission,
            admission_headroom: self.admission_headroom,
            belief_prior_error: self.recalibration.prior_error,
            ..ControlConfig::deployment_defaults()
        }
    }

    /// The tuner's objective with `prices`.
    pub fn objective(&self, prices: Prices) -> Objective {
        match self.tuner.objective {
            ObjectiveKind::TokensPerJoule => Objective::TokensPerJoule,
            ObjectiveKind::Throughput => Objective::Throughput,
            ObjectiveKind::TokensPerDollar => Objective::TokensPerDollar {
                usd_per_device_hour: prices.usd_per_device_hour,
                usd_per_kwh: prices.usd_per_kwh,
                pue: prices.pue,
            },
        }
    }

    /// An agent core's configuration (`prices` for a tokens-per-dollar objective).
    pub fn agent_config(&self, prices: Prices) -> AgentConfig {
        AgentConfig {
            report_delay: self.report_delay,
            sample_interval: self.energy_sample_interval,
            heartbeat_interval: self.heartbeat_interval,
            empty_lease_backoff: self.empty_lease_backoff,
            lease_wait: self.lease_wait,
            tuner: TunerConfig {
                mode: self.tuner.mode,
                objective: self.objective(prices),
                tune_power: self.tuner.power,
                epoch: self.tuner.epoch,
                epoch_min_finished: self.tuner.epoch_requests.max(1),
                throughput_margin: self.tuner.throughput_margin,
                model_guided: self.tuner.model,
                ..TunerConfig::mechanics()
            },
            routing: self.routing,
            recalibration: crate::recal::RecalConfig {
                enabled: self.recalibration.enabled,
                interval: self.recalibration.interval,
                prior_error: self.recalibration.prior_error,
                ..crate::recal::RecalConfig::default()
            },
            ..AgentConfig::mechanics()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_read_both_spellings_and_name_the_others() {
        assert_eq!("prefix_affinity".parse::<Routing>(), Ok(Routing::PrefixAffinity));
        assert_eq!("Round-Robin".parse::<Routing>(), Ok(Routing::RoundRobin));
        assert_eq!(Routing::LeastLoaded.to_string(), "least-loaded");
        assert_eq!(
            "closest".parse::<Routing>(),
            Err("'closest' is not one of prefix-affinity, least-loaded, round-robin".into())
        );
        assert_eq!(
            serde_json::to_string(&ObjectiveKind::TokensPerDollar).unwrap(),
            "\"tokens_per_dollar\""
        );
    }

    #[test]
    fn an_empty_document_is_the_default_and_defaults_pass_the_checks() {
        let p: Policies = serde_json::from_str("{}").unwrap();
        assert_eq!(p, Policies::default());
        p.check().unwrap();
        let round: Policies = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(round, p);
    }

    #[test]
    fn derived_configurations_carry_every_policy() {
        let p = Policies {
            lease_ttl: Duration::from_secs(30),
            queue_order: QueueOrder::Slack,
            placement: PlacementPolicy {
                mode: PlacementMode::Active,
                park_after: Duration::from_secs(7),
                margin: 0.5,
            },
            tuner: TunerPolicy {
                mode: TunerMode::Active,
                objective: ObjectiveKind::TokensPerDollar,
                ..TunerPolicy::default()
            },
            routing: Routing::RoundRobin,
            ..Policies::default()
        };
        let c = p.control_config();
        assert_eq!(
            (c.lease_ttl, c.queue_order, c.placement),
            (Duration::from_secs(30), QueueOrder::Slack, PlacementMode::Active)
        );
        assert_eq!(
            (c.activation.park_after, c.activation.margin),
            (Duration::from_secs(7), 0.5)
        );
        let prices = Prices::new(None, Some(&AcceleratorId::new("h100-sxm")), 0.1, 1.2);
        assert!(prices.usd_per_device_hour > 0.0, "the catalog's price");
        let a = p.agent_config(prices);
        assert_eq!((a.tuner.mode, a.routing), (TunerMode::Active, Routing::RoundRobin));
        assert_eq!(
            a.tuner.objective,
            Objective::TokensPerDollar {
                usd_per_device_hour: prices.usd_per_device_hour,
                usd_per_kwh: 0.1,
                pue: 1.2
            }
        );
    }

    #[test]
    fn checks_name_the_setting() {
        let p = Policies {
            admission_headroom: 1.5,
            ..Policies::default()
        };
        assert_eq!(p.check().unwrap_err().field, "admission_headroom");
        let mut p = Policies::default();
        p.sla_classes.reverse();
        let e = p.check().unwrap_err();
        assert_eq!(e.field, "sla_classes");
        assert!(e.message.contains("comes after a best-effort class"), "{e}");
        let p = Policies {
            heartbeat_interval: Policies::default().lease_ttl,
            ..Policies::default()
        };
        assert_eq!(p.check().unwrap_err().field, "lease_ttl");
    }
}
