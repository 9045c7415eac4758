//! Scenario files: the cluster, the models it serves, the workload, the policies and how
//! long to simulate. YAML; see `simulations/README.md` for a guide and
//! `simulations/*.yaml` for examples.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokenfab_core::catalog::Catalog;
use tokenfab_core::perf::ReplicaPerf;
use tokenfab_core::policy::Policies;
use tokenfab_core::profile::{EngineProfile, Profiles};
use tokenfab_core::{AcceleratorId, ModelId};

/// A scenario that cannot be simulated: where (file and field path), what, and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {path}: {message}")]
pub struct ScenarioError {
    pub file: String,
    /// Field path, e.g. `workload.tenants[0].arrivals.batches_per_hour` (`.` for the whole file).
    pub path: String,
    pub message: String,
}

fn human<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| D::Error::custom(format!("'{s}' is not a duration ({e}); write e.g. 90s, 30m, 2h or 1d")))
}

fn human_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    human(d).map(Some)
}

fn ser_human<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_human_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_human(d, s),
        None => s.serialize_none(),
    }
}

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// The question this scenario answers, in one line.
    pub description: String,
    /// Simulated time during which batches arrive; the run continues until every batch
    /// has ended (completed or expired).
    #[serde(deserialize_with = "human", serialize_with = "ser_human")]
    pub duration: Duration,
    /// Seed of every random draw; `--seed` overrides it.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub site: Site,
    /// Accelerator pools: super-nodes of one accelerator class.
    pub pools: Vec<Pool>,
    /// Which models run where.
    pub deployments: Vec<Deployment>,
    pub workload: Workload,
    /// tokenfab's policies, the type the live system's flags produce: same names,
    /// defaults and checks (`tokenfab_core::policy::Policies`).
    #[serde(default)]
    pub policies: Policies,
    #[serde(default)]
    pub network: Network,
    /// Engine profiles (docs/engine-profiles.md): what the simulated engines do and what
    /// the control plane and agents believe they do. Without them both are the
    /// performance model.
    #[serde(default, skip_serializing_if = "ScenarioProfiles::is_empty")]
    pub profiles: ScenarioProfiles,
    #[serde(default)]
    pub report: ReportOptions,
}

/// Profile files, relative to the scenario file. A replica whose model, accelerator and
/// tensor-parallel degree no profile of a list describes follows the performance model
/// in that role.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ScenarioProfiles {
    /// What the simulated engines really do.
    #[serde(default)]
    pub truth: Vec<String>,
    /// What the control plane (admission, owed rates) and the agents (tuner) believe.
    #[serde(default)]
    pub belief: Vec<String>,
}

impl ScenarioProfiles {
    fn is_empty(&self) -> bool {
        self.truth.is_empty() && self.belief.is_empty()
    }

    /// Reads the truth and belief profiles, files relative to `base`; `file` names the
    /// scenario in errors.
    pub fn load(&self, base: &Path, file: &str) -> Result<(Profiles, Profiles), ScenarioError> {
        let read = |list: &[String], role: &str| -> Result<Profiles, ScenarioError> {
            let mut profiles = Vec::new();
            for (i, name) in list.iter().enumerate() {
                let at = format!("profiles.{role}[{i}]");
                let path = base.join(name);
                let text = std::fs::read_to_string(&path).map_err(|e| ScenarioError {
                    file: file.into(),
                    path: at.clone(),
                    message: format!("cannot read {}: {e}", path.display()),
                })?;
                profiles.push(EngineProfile::from_toml(&text).map_err(|e| ScenarioError {
                    file: file.into(),
                    path: at.clone(),
                    message: format!("{}: {e}", path.display()),
                })?);
            }
            Profiles::new(&profiles).map_err(|e| ScenarioError {
                file: file.into(),
                path: format!("profiles.{role}"),
                message: e.to_string(),
            })
        };
        Ok((read(&self.truth, "truth")?, read(&self.belief, "belief")?))
    }
}

/// Where the cluster runs: what energy costs there.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Power usage effectiveness (facility energy / IT energy).
    #[serde(default = "default_pue")]
    pub pue: f64,
    #[serde(default = "default_kwh")]
    pub usd_per_kwh: f64,
}

fn default_pue() -> f64 {
    tokenfab_core::usage::DEFAULT_PUE
}
fn default_kwh() -> f64 {
    tokenfab_core::usage::DEFAULT_USD_PER_KWH
}

impl Default for Site {
    fn default() -> Self {
        Site {
            pue: default_pue(),
            usd_per_kwh: default_kwh(),
        }
    }
}

/// Identical super-nodes of one accelerator class.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    /// Accelerator class from the catalog (`h100-sxm`, `h200-sxm`, `a100-sxm-80g`, `l40s`).
    pub accelerator: String,
    /// Super-nodes (each runs one agent).
    pub nodes: u32,
    pub devices_per_node: u32,
    /// Devices per high-bandwidth (NVLink) domain; default from the catalog.
    #[serde(default)]
    pub domain_size: Option<u32>,
    /// Price per device-hour; default from the catalog (indicative).
    #[serde(default)]
    pub price_usd_per_hour: Option<f64>,
    /// Power limit per device; default the device's maximum.
    #[serde(default)]
    pub power_limit_w: Option<f64>,
}

/// A model served on a pool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub pool: String,
    pub model: String,
    /// Devices per replica (tensor parallel); must fit in one high-bandwidth domain.
    #[serde(default = "one")]
    pub tensor_parallel: u32,
    /// Replicas on each node; default: as many as fit.
    #[serde(default)]
    pub replicas_per_node: Option<u32>,
    /// Concurrency window (requests in flight) per replica; default `policies.window`.
    #[serde(default)]
    pub window: Option<u32>,
    /// The engine's own limit on running sequences (vLLM's max_num_seqs); default 256, or
    /// 1024 with the tuner active (so that the tuner, not the engine, sets the batch size;
    /// the KV cache still bounds it). It is raised to the window if smaller, so that the
    /// window is what bounds concurrency.
    #[serde(default)]
    pub max_num_seqs: Option<u32>,
}

fn one() -> u32 {
    1
}

/// Who submits what, when.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub tenants: Vec<Tenant>,
}

/// One tenant's batches.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub name: String,
    pub model: String,
    pub arrivals: Arrivals,
    /// Requests per batch (not used by traces, which give requests individually).
    #[serde(default = "default_batch_size")]
    pub batch_size: Dist,
    /// Prompt tokens per request (traces carry their own).
    #[serde(default = "default_prompt")]
    pub prompt_tokens: Dist,
    /// Output tokens per request (traces carry their own).
    #[serde(default = "default_output")]
    pub output_tokens: Dist,
    /// Each batch must finish within this time of its arrival.
    #[serde(deserialize_with = "human", serialize_with = "ser_human")]
    pub completion_window: Duration,
    #[serde(default)]
    pub sla_class: Option<String>,
    /// When admission refuses a batch (its deadline cannot be met), submit it as
    /// best-effort instead of losing it.
    #[serde(default)]
    pub best_effort_if_late: bool,
    /// Share of spare (best-effort) capacity relative to other tenants.
    #[serde(default = "one_f")]
    pub weight: f64,
    /// Quota: unfinished batches at once (more are refused).
    #[serde(default)]
    pub max_active_batches: Option<u32>,
    /// Quota: output tokens submitted over any hour (more are refused).
    #[serde(default)]
    pub output_tokens_per_hour: Option<u64>,
    /// Requests share prompt prefixes (a system prompt, a document asked several
    /// questions): each request's prompt gets `tokens` more, shared by groups of
    /// `requests` consecutive requests of a batch (0: the whole batch).
    #[serde(default)]
    pub shared_prefix: Option<SharedPrefix>,
}

/// `workload.tenants[].shared_prefix`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedPrefix {
    pub tokens: u32,
    #[serde(default)]
    pub requests: u32,
}

fn default_batch_size() -> Dist {
    Dist::Fixed { value: 1000 }
}
fn default_prompt() -> Dist {
    Dist::Lognormal {
        mean: 400.0,
        sigma: 0.8,
        min: 1,
        max: 8192,
    }
}
fn default_output() -> Dist {
    Dist::Lognormal {
        mean: 250.0,
        sigma: 0.8,
        min: 1,
        max: 4096,
    }
}

/// When batches arrive.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrivals {
    /// A Poisson process.
    Poisson { batches_per_hour: f64 },
    /// A Poisson process whose rate follows the time of day (a cosine with its peak at
    /// `peak_hour`, `peak_to_trough` times the rate at the trough).
    Diurnal {
        mean_batches_per_hour: f64,
        peak_to_trough: f64,
        #[serde(default = "default_peak_hour")]
        peak_hour: f64,
    },
    /// Requests from a trace file (relative to the scenario file), grouped into one batch
    /// per `batch_every` of trace time.
    Trace {
        file: PathBuf,
        format: TraceFormat,
        #[serde(default, deserialize_with = "human_opt", serialize_with = "ser_human_opt")]
        batch_every: Option<Duration>,
        /// Multiplies trace time (0.5 replays twice as fast).
        #[serde(default = "one_f")]
        time_scale: f64,
    },
}

fn default_peak_hour() -> f64 {
    14.0
}
fn one_f() -> f64 {
    1.0
}

/// Trace file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceFormat {
    /// The Azure LLM inference trace CSV: `TIMESTAMP,ContextTokens,GeneratedTokens`.
    Azure,
    /// tokenfab's JSONL: one request per line, `{"t_s": 12.5, "prompt_tokens": 300, "output_tokens": 120}`.
    Jsonl,
}

/// A distribution of token counts or batch sizes (whole numbers).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Dist {
    Fixed {
        value: u32,
    },
    Uniform {
        min: u32,
        max: u32,
    },
    /// Log-normal with this mean and log-space standard deviation, clamped to [min, max].
    Lognormal {
        mean: f64,
        sigma: f64,
        min: u32,
        max: u32,
    },
}

/// The simulated network between agents and the control plane (not a policy: the live
/// system has a real one).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// Time for a call between agent and control plane and back.
    #[serde(deserialize_with = "human", serialize_with = "ser_human")]
    pub control_rtt: Duration,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            control_rtt: Duration::from_millis(1),
        }
    }
}

/// What the report records.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReportOptions {
    /// Time between two points of the time series; default: duration / 200.
    #[serde(default, deserialize_with = "human_opt", serialize_with = "ser_human_opt")]
    pub series_interval: Option<Duration>,
}

impl Scenario {
    /// Reads, parses and checks a scenario file.
    pub fn load(path: &Path) -> Result<(Scenario, PathBuf), ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: file.clone(),
            path: ".".into(),
            message: format!("cannot read the file: {e}"),
        })?;
        let scenario = Scenario::parse(&text, &file)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((scenario, base))
    }

    /// Parses and checks scenario text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Scenario, ScenarioError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let scenario: Scenario = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path.is_empty() || path == "?" {
                ".".to_string()
            } else {
                path
            };
            // The YAML error repeats the path; keep its message and position only.
            let inner = e.into_inner().to_string();
            let mut message = match inner.split_once(": ") {
                Some((prefix, rest)) if path.starts_with(prefix) => rest.to_string(),
                _ => inner,
            };
            if path == "policies" && message.contains("unknown field `control_rtt`") {
                message = "control_rtt moved to network.control_rtt (the simulated network is not a policy of the live system); write `network: {control_rtt: 1ms}`".into();
            }
            ScenarioError {
                file: file.into(),
                path,
                message,
            }
        })?;
        scenario.check(file)?;
        Ok(scenario)
    }

    fn check(&self, file: &str) -> Result<(), ScenarioError> {
        let err = |path: String, message: String| {
            Err(ScenarioError {
                file: file.into(),
                path,
                message,
            })
        };
        let catalog = Catalog::builtin();
        if self.duration.is_zero() {
            return err("duration".into(), "must be longer than zero".into());
        }
        if self.site.pue < 1.0 || !self.site.pue.is_finite() {
            return err("site.pue".into(), format!("is {}; a PUE is 1.0 or more", self.site.pue));
        }
        if self.site.usd_per_kwh < 0.0 || !self.site.usd_per_kwh.is_finite() {
            return err("site.usd_per_kwh".into(), "must be a price >= 0".into());
        }
        if self.pools.is_empty() {
            return err("pools".into(), "at least one pool is needed".into());
        }
        for (i, p) in self.pools.iter().enumerate() {
            let at = |f: &str| format!("pools[{i}].{f}");
            if self.pools[..i].iter().any(|q| q.name == p.name) {
                return err(
                    at("name"),
                    format!("'{}' is used twice; pool names must be unique", p.name),
                );
            }
            let acc = match catalog.accelerator(&AcceleratorId::new(p.accelerator.clone())) {
                Ok(a) => a,
                Err(e) => return err(at("accelerator"), e.to_string()),
            };
            if p.nodes == 0 {
                return err(at("nodes"), "must be at least 1".into());
            }
            if p.devices_per_node == 0 {
                return err(at("devices_per_node"), "must be at least 1".into());
            }
            if let Some(w) = p.power_limit_w
                && !(acc.power_limit_min_w..=acc.max_power_w).contains(&w)
            {
                return err(
                    at("power_limit_w"),
                    format!(
                        "{w} W is outside what a {} allows ({} to {} W)",
                        p.accelerator, acc.power_limit_min_w, acc.max_power_w
                    ),
                );
            }
            if p.price_usd_per_hour.is_some_and(|x| x < 0.0 || !x.is_finite()) {
                return err(at("price_usd_per_hour"), "must be a price >= 0".into());
            }
            if p.domain_size == Some(0) {
                return err(at("domain_size"), "must be at least 1".into());
            }
        }
        if self.deployments.is_empty() {
            return err(
                "deployments".into(),
                "at least one deployment is needed (which model runs on which pool)".into(),
            );
        }
        let mut used: Vec<u32> = vec![0; self.pools.len()];
        for (i, d) in self.deployments.iter().enumerate() {
            let at = |f: &str| format!("deployments[{i}].{f}");
            let Some(pi) = self.pools.iter().position(|p| p.name == d.pool) else {
                let names: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
                return err(
                    at("pool"),
                    format!("no pool named '{}'; pools are {}", d.pool, names.join(", ")),
                );
            };
            let pool = &self.pools[pi];
            let model = ModelId::new(d.model.clone());
            if let Err(e) = catalog.model(&model) {
                return err(at("model"), e.to_string());
            }
            let domain = self.domain_size(pool);
            if d.tensor_parallel == 0 || d.tensor_parallel > domain || !domain.is_multiple_of(d.tensor_parallel) {
                return err(
                    at("tensor_parallel"),
                    format!(
                        "{} devices per replica does not divide the {domain}-device high-bandwidth domain of pool '{}'; a replica never straddles two domains",
                        d.tensor_parallel, pool.name
                    ),
                );
            }
            if let Err(e) = ReplicaPerf::new(&model, &AcceleratorId::new(pool.accelerator.clone()), d.tensor_parallel) {
                return err(at("tensor_parallel"), e.to_string());
            }
            let per_node = self.replicas_per_node(d);
            if per_node == 0 {
                return err(at("replicas_per_node"), "must be at least 1".into());
            }
            used[pi] += per_node * d.tensor_parallel;
            if used[pi] > pool.devices_per_node {
                return err(
                    at("replicas_per_node"),
                    format!(
                        "deployments on pool '{}' need {} devices per node; its nodes have {}",
                        pool.name, used[pi], pool.devices_per_node
                    ),
                );
            }
            if d.window == Some(0) {
                return err(at("window"), "must be at least 1".into());
            }
            if d.max_num_seqs == Some(0) {
                return err(at("max_num_seqs"), "must be at least 1".into());
            }
        }
        if self.workload.tenants.is_empty() {
            return err("workload.tenants".into(), "at least one tenant is needed".into());
        }
        for (i, t) in self.workload.tenants.iter().enumerate() {
            let at = |f: &str| format!("workload.tenants[{i}].{f}");
            if !self.deployments.iter().any(|d| d.model == t.model) {
                let models: Vec<&str> = self.deployments.iter().map(|d| d.model.as_str()).collect();
                return err(
                    at("model"),
                    format!(
                        "'{}' is not deployed; deployed models are {}",
                        t.model,
                        models.join(", ")
                    ),
                );
            }
            if t.completion_window.is_zero() {
                return err(at("completion_window"), "must be longer than zero".into());
            }
            match &t.arrivals {
                Arrivals::Poisson { batches_per_hour }
                    if !(*batches_per_hour > 0.0 && batches_per_hour.is_finite()) =>
                {
                    return err(
                        at("arrivals.batches_per_hour"),
                        format!("is {batches_per_hour}; must be > 0"),
                    );
                }
                Arrivals::Diurnal {
                    mean_batches_per_hour,
                    peak_to_trough,
                    peak_hour,
                } => {
                    if !(*mean_batches_per_hour > 0.0 && mean_batches_per_hour.is_finite()) {
                        return err(
                            at("arrivals.mean_batches_per_hour"),
                            format!("is {mean_batches_per_hour}; must be > 0"),
                        );
                    }
                    if !(*peak_to_trough >= 1.0 && peak_to_trough.is_finite()) {
                        return err(
                            at("arrivals.peak_to_trough"),
                            format!("is {peak_to_trough}; must be >= 1 (1 = flat)"),
                        );
                    }
                    if !(0.0..24.0).contains(peak_hour) {
                        return err(at("arrivals.peak_hour"), format!("is {peak_hour}; must be in [0, 24)"));
                    }
                }
                Arrivals::Trace {
                    time_scale,
                    batch_every,
                    ..
                } => {
                    if !(*time_scale > 0.0 && time_scale.is_finite()) {
                        return err(at("arrivals.time_scale"), "must be > 0".into());
                    }
                    if batch_every.is_some_and(|b| b.is_zero()) {
                        return err(at("arrivals.batch_every"), "must be longer than zero".into());
                    }
                }
                _ => {}
            }
            if !(t.weight.is_finite() && t.weight > 0.0) {
                return err(
                    at("weight"),
                    format!("is {}; must be above 0 (1 is the default share)", t.weight),
                );
            }
            for (name, d) in [
                ("batch_size", &t.batch_size),
                ("prompt_tokens", &t.prompt_tokens),
                ("output_tokens", &t.output_tokens),
            ] {
                if let Some(m) = d.problem() {
                    return err(at(name), m);
                }
            }
        }
        if let Err(e) = self.policies.check() {
            return err(format!("policies.{}", e.field), e.message);
        }
        let classes = self.policies.classes();
        for (i, t) in self.workload.tenants.iter().enumerate() {
            if let Some(c) = &t.sla_class
                && !classes.iter().any(|k| &k.name == c)
            {
                let names: Vec<&str> = classes.iter().map(|k| k.name.as_str()).collect();
                return err(
                    format!("workload.tenants[{i}].sla_class"),
                    format!(
                        "'{c}' is not one of policies.sla_classes ({}); list it there (highest priority first), as the live control plane needs it in --sla-class",
                        names.join(", ")
                    ),
                );
            }
        }
        if self.report.series_interval.is_some_and(|s| s.is_zero()) {
            return err("report.series_interval".into(), "must be longer than zero".into());
        }
        Ok(())
    }

    /// Devices per high-bandwidth domain of a pool.
    pub fn domain_size(&self, pool: &Pool) -> u32 {
        let catalog_size = Catalog::builtin()
            .accelerator(&AcceleratorId::new(pool.accelerator.clone()))
            .map_or(1, |a| a.domain_size.max(1));
        pool.domain_size
            .unwrap_or(catalog_size)
            .min(pool.devices_per_node)
            .max(1)
    }

    /// Replicas of a deployment on each node of its pool.
    pub fn replicas_per_node(&self, d: &Deployment) -> u32 {
        d.replicas_per_node.unwrap_or_else(|| {
            let pool = self.pools.iter().find(|p| p.name == d.pool).expect("checked");
            pool.devices_per_node / d.tensor_parallel.max(1)
        })
    }

    /// Series interval actually used.
    pub fn series_interval(&self) -> Duration {
        self.report
            .series_interval
            .unwrap_or_else(|| (self.duration / 200).max(Duration::from_secs(1)))
    }
}

impl Dist {
    fn problem(&self) -> Option<String> {
        match *self {
            Dist::Fixed { value: 0 } => Some("value must be at least 1".into()),
            Dist::Uniform { min, max } if min == 0 || min > max => {
                Some(format!("needs 1 <= min <= max (got min {min}, max {max})"))
            }
            Dist::Lognormal { mean, sigma, min, max } => {
                if !(mean >= 1.0 && mean.is_finite()) {
                    Some(format!("mean must be >= 1 (got {mean})"))
                } else if !(sigma >= 0.0 && sigma.is_finite()) {
                    Some(format!("sigma must be >= 0 (got {sigma})"))
                } else if min == 0 || min > max {
                    Some(format!("needs 1 <= min <= max (got min {min}, max {max})"))
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// The mean of the distribution before clamping.
    pub fn mean(&self) -> f64 {
        match *self {
            Dist::Fixed { value } => f64::from(value),
            Dist::Uniform { min, max } => (f64::from(min) + f64::from(max)) / 2.0,
            Dist::Lognormal { mean, .. } => mean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: t
description: a test
duration: 1h
pools:
  - {name: h100, accelerator: h100-sxm, nodes: 1, devices_per_node: 8}
deployments:
  - {pool: h100, model: llama-3.1-8b}
workload:
  tenants:
    - name: acme
      model: llama-3.1-8b
      arrivals: {kind: poisson, batches_per_hour: 10}
      completion_window: 1h
"#;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(text, "s.yaml")
    }

    #[test]
    fn a_good_scenario_parses_with_defaults() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.duration, Duration::from_secs(3600));
        assert_eq!(s.replicas_per_node(&s.deployments[0]), 8);
        assert_eq!(s.policies.window, 64);
        assert_eq!(s.series_interval(), Duration::from_secs(18));
    }

    /// Errors name the file, the field path, what is wrong and what is allowed.
    #[test]
    fn errors_say_where_what_and_what_is_allowed() {
        let cases = [
            (
                GOOD.replace("kind: poisson, batches_per_hour: 10", "kind: bursty"),
                "s.yaml: workload.tenants[0].arrivals.kind: unknown variant `bursty`, expected one of `poisson`, `diurnal`, `trace` at line 13 column 24",
            ),
            (
                GOOD.replace("batches_per_hour: 10", "batches_per_hour: -3"),
                "s.yaml: workload.tenants[0].arrivals.batches_per_hour: is -3; must be > 0",
            ),
            (
                GOOD.replace("accelerator: h100-sxm", "accelerator: tpu-v5"),
                "s.yaml: pools[0].accelerator: unknown accelerator 'tpu-v5': the catalog knows a100-sxm-80g, ascend-910b, ascend-910c, cloudmatrix-384, edge-cpu, h100-sxm, h200-sxm, l40s",
            ),
            (
                GOOD.replace("duration: 1h", "duration: soon"),
                "s.yaml: duration: 'soon' is not a duration (expected number at 0); write e.g. 90s, 30m, 2h or 1d",
            ),
            (
                GOOD.replace("{pool: h100, model: llama-3.1-8b}", "{pool: h200, model: llama-3.1-8b}"),
                "s.yaml: deployments[0].pool: no pool named 'h200'; pools are h100",
            ),
            (
                GOOD.replace(
                    "{pool: h100, model: llama-3.1-8b}",
                    "{pool: h100, model: llama-3.1-70b, tensor_parallel: 3}",
                ),
                "s.yaml: deployments[0].tensor_parallel: 3 devices per replica does not divide the 8-device high-bandwidth domain of pool 'h100'; a replica never straddles two domains",
            ),
            (
                GOOD.replace(
                    "{pool: h100, model: llama-3.1-8b}",
                    "{pool: h100, model: llama-3.1-70b}",
                ),
                "s.yaml: deployments[0].tensor_parallel: model 'llama-3.1-70b' does not fit on 1 x h100-sxm: weights need 141.0 GB per device but 72.0 GB is usable; use more devices per replica",
            ),
            (
                GOOD.replace(
                    "model: llama-3.1-8b\n      arrivals",
                    "model: qwen3-30b-a3b\n      arrivals",
                ),
                "s.yaml: workload.tenants[0].model: 'qwen3-30b-a3b' is not deployed; deployed models are llama-3.1-8b",
            ),
            (
                GOOD.replace("devices_per_node: 8}", "devices_per_node: 8, speed: 9}"),
                "s.yaml: pools[0].speed: unknown field `speed`, expected one of `name`, `accelerator`, `nodes`, `devices_per_node`, `domain_size`, `price_usd_per_hour`, `power_limit_w` at line 6 column 72",
            ),
            (
                GOOD.replace("devices_per_node: 8}", "devices_per_node: 8, power_limit_w: 900}"),
                "s.yaml: pools[0].power_limit_w: 900 W is outside what a h100-sxm allows (200 to 700 W)",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(expected), "got:      {e}\nexpected: {expected}");
        }
    }

    #[test]
    fn unreadable_files_say_so() {
        let e = Scenario::load(Path::new("/nonexistent/x.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/x.yaml: .: cannot read the file"), "{e}");
    }
}
