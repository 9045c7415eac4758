//! What a simulation measured: totals, percentiles, per-pool and per-tenant figures, and
//! time series. The report holds no wall-clock value, so the same scenario and seed give
//! a byte-identical `report.json`.

use crate::scenario::Scenario;
use crate::sim::Engine;
use crate::workload::RequestShape;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use tokenfab_core::agent::ReplicaStats;
use tokenfab_core::batch::BatchStatus;
use tokenfab_core::catalog::Catalog;
use tokenfab_core::control::ControlCore;
use tokenfab_core::usage::Usage;
use tokenfab_core::{AcceleratorId, Timestamp};

/// One ended batch.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub tenant: usize,
    pub sla_class: String,
    pub arrived: Timestamp,
    pub ended: Timestamp,
    pub deadline: Timestamp,
    pub met: bool,
    pub status: BatchStatus,
    pub requests: u32,
    pub completed: u32,
    pub failed: u32,
    pub usage: Usage,
}

#[derive(Debug, Clone)]
struct PoolInfo {
    name: String,
    accelerator: String,
    devices: u32,
    /// Devices no replica occupies: they idle for the whole run.
    unassigned: u32,
    idle_w: f64,
    price_usd_per_hour: f64,
    calibrated: bool,
}

/// One point of the time series of one pool.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesPoint {
    pub t_s: f64,
    pub pool: String,
    pub output_tokens_per_s: f64,
    pub power_w: f64,
    pub utilization: f64,
    /// Requests waiting to be leased, cluster-wide.
    pub queue_depth: u64,
    /// Mean concurrency window and power limit per device of the pool's replicas.
    pub window_mean: f64,
    pub power_limit_w_mean: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Cumulative {
    tokens: u64,
    energy_j: f64,
    busy_device_s: f64,
}

/// Collects measurements while a simulation runs.
#[derive(Debug, Clone)]
pub struct Collector {
    pub(crate) interval: Duration,
    pools: Vec<PoolInfo>,
    series: Vec<SeriesPoint>,
    last: Vec<Cumulative>,
    last_t: Timestamp,
    batches: Vec<BatchRecord>,
    arrived_batches: Vec<u64>,
    arrived_requests: Vec<u64>,
    served_tokens: Vec<u64>,
    arrived_output_tokens: u64,
    arrived_prompt_tokens: u64,
    refused: Vec<(usize, usize, String)>,
    tenants: Vec<String>,
    scenario: String,
    description: String,
    seed: u64,
    arrivals_s: f64,
    pue: f64,
    usd_per_kwh: f64,
    tuner_moves: u64,
}

fn cumulative(engines: &[Engine], pool: usize, now: Timestamp) -> Cumulative {
    let mut c = Cumulative::default();
    for e in engines.iter().filter(|e| e.pool == pool) {
        let s = e.model.stats();
        c.tokens += s.completion_tokens;
        c.energy_j += e.model.energy_j(now);
        c.busy_device_s += s.busy_s * f64::from(e.devices);
    }
    c
}

impl Collector {
    pub(crate) fn new(s: &Scenario, engines: &[Engine]) -> Self {
        let catalog = Catalog::builtin();
        let pools: Vec<PoolInfo> = s
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let acc = catalog
                    .accelerator(&AcceleratorId::new(p.accelerator.clone()))
                    .expect("checked when parsed");
                let devices = p.nodes * p.devices_per_node;
                let assigned: u32 = engines.iter().filter(|e| e.pool == i).map(|e| e.devices).sum();
                PoolInfo {
                    name: p.name.clone(),
                    accelerator: p.accelerator.clone(),
                    devices,
                    unassigned: devices - assigned,
                    idle_w: acc.idle_power_w,
                    price_usd_per_hour: p.price_usd_per_hour.unwrap_or(acc.price_usd_per_hour),
                    calibrated: acc.calibrated,
                }
            })
            .collect();
        let n = s.workload.tenants.len();
        Collector {
            interval: s.series_interval(),
            last: vec![Cumulative::default(); pools.len()],
            pools,
            series: Vec::new(),
            last_t: Timestamp::ZERO,
            batches: Vec::new(),
            arrived_batches: vec![0; n],
            arrived_requests: vec![0; n],
            served_tokens: vec![0; n],
            arrived_output_tokens: 0,
            arrived_prompt_tokens: 0,
            refused: Vec::new(),
            tenants: s.workload.tenants.iter().map(|t| t.name.clone()).collect(),
            scenario: s.name.clone(),
            description: s.description.clone(),
            seed: s.seed,
            arrivals_s: s.duration.as_secs_f64(),
            pue: s.site.pue,
            usd_per_kwh: s.site.usd_per_kwh,
            tuner_moves: 0,
        }
    }

    pub(crate) fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    /// An engine finished `tokens` output tokens for `tenant` at `now`.
    pub(crate) fn served(&mut self, tenant: usize, tokens: u32, now: Timestamp) {
        if now.as_secs_f64() <= self.arrivals_s {
            self.served_tokens[tenant] += u64::from(tokens);
        }
    }

    pub(crate) fn arrived(&mut self, tenant: usize, requests: &[RequestShape]) {
        self.arrived_batches[tenant] += 1;
        self.arrived_requests[tenant] += requests.len() as u64;
        self.arrived_output_tokens += requests.iter().map(|r| u64::from(r.output)).sum::<u64>();
        self.arrived_prompt_tokens += requests.iter().map(|r| u64::from(r.prompt)).sum::<u64>();
    }

    /// Output tokens of completed requests, batches ended, and those that missed their
    /// deadline, so far.
    pub(crate) fn progress(&self) -> (u64, usize, usize) {
        let tokens = self.batches.iter().map(|b| b.usage.completion_tokens).sum();
        let missed = self.batches.iter().filter(|b| !b.met).count();
        (tokens, self.batches.len(), missed)
    }

    /// A tuner moved a replica's knobs.
    pub(crate) fn tuned(&mut self) {
        self.tuner_moves += 1;
    }

    pub(crate) fn refused(&mut self, tenant: usize, requests: usize, why: String) {
        self.refused.push((tenant, requests, why));
    }

    pub(crate) fn ended(&mut self, b: BatchRecord) {
        self.batches.push(b);
    }

    /// A point of the time series; `windows` is each engine's concurrency window.
    pub(crate) fn sample(&mut self, now: Timestamp, engines: &[Engine], windows: &[u32], queue_depth: u64) {
        let dt = now.since(self.last_t).as_secs_f64();
        if dt <= 0.0 && !self.series.is_empty() {
            return;
        }
        for (i, p) in self.pools.iter().enumerate() {
            let c = cumulative(engines, i, now);
            let prev = self.last[i];
            if dt > 0.0 {
                let idle_unassigned = f64::from(p.unassigned) * p.idle_w;
                let mine: Vec<(usize, &Engine)> = engines.iter().enumerate().filter(|(_, e)| e.pool == i).collect();
                let n = mine.len().max(1) as f64;
                self.series.push(SeriesPoint {
                    t_s: now.as_secs_f64(),
                    pool: p.name.clone(),
                    output_tokens_per_s: (c.tokens - prev.tokens) as f64 / dt,
                    power_w: (c.energy_j - prev.energy_j) / dt + idle_unassigned,
                    utilization: (c.busy_device_s - prev.busy_device_s) / dt / f64::from(p.devices),
                    queue_depth,
                    window_mean: mine.iter().map(|(k, _)| f64::from(windows[*k])).sum::<f64>() / n,
                    power_limit_w_mean: mine.iter().map(|(_, e)| e.model.power_limit_w()).sum::<f64>() / n,
                });
            }
            self.last[i] = c;
        }
        self.last_t = now;
    }

    pub(crate) fn finish(
        self,
        end: Timestamp,
        engines: &[Engine],
        agents: &[ReplicaStats],
        control: &ControlCore,
        events: u64,
    ) -> Report {
        let metered = control.tenant_totals();
        let idle_unallocated_j = control.idle_unallocated_j();
        let control = control.stats();
        let end_s = end.as_secs_f64();
        let mut pools = Vec::new();
        let (mut energy, mut device_usd, mut tokens, mut busy, mut devices) = (0.0, 0.0, 0u64, 0.0, 0u32);
        // The site's energy price (device time is priced per pool below).
        let site = tokenfab_core::usage::Pricing::energy_only(self.usd_per_kwh, self.pue);
        for (i, p) in self.pools.iter().enumerate() {
            let c = cumulative(engines, i, end);
            let pool_energy = c.energy_j + f64::from(p.unassigned) * p.idle_w * end_s;
            let usd_devices = f64::from(p.devices) * p.price_usd_per_hour * end_s / 3600.0;
            let usd_energy = site.energy_usd(pool_energy);
            pools.push(PoolReport {
                name: p.name.clone(),
                accelerator: p.accelerator.clone(),
                devices: p.devices,
                idle_devices: p.unassigned,
                output_tokens: c.tokens,
                energy_j: pool_energy,
                idle_power_w: f64::from(p.devices) * p.idle_w,
                utilization: c.busy_device_s / (end_s * f64::from(p.devices)).max(1e-9),
                device_cost_usd: usd_devices,
                energy_cost_usd: usd_energy,
                model_calibrated: p.calibrated,
            });
            energy += pool_energy;
            device_usd += usd_devices;
            tokens += c.tokens;
            busy += c.busy_device_s;
            devices += p.devices;
        }
        let attributed: f64 = agents.iter().map(|a| a.attributed_j).sum();
        let agent_idle: f64 = agents.iter().map(|a| a.idle_j).sum();
        let energy_usd = site.energy_usd(energy);
        let mut usage = Usage::default();
        let (mut completed, mut failed) = (0u64, 0u64);
        let mut status_counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut by_class: BTreeMap<String, Vec<&BatchRecord>> = BTreeMap::new();
        for b in &self.batches {
            usage += b.usage;
            completed += u64::from(b.completed);
            failed += u64::from(b.failed);
            *status_counts.entry(b.status.as_str()).or_default() += 1;
            by_class.entry(b.sla_class.clone()).or_default().push(b);
        }
        let all: Vec<&BatchRecord> = self.batches.iter().collect();
        let tenants = self
            .tenants
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mine: Vec<&BatchRecord> = self.batches.iter().filter(|b| b.tenant == i).collect();
                let m = metered
                    .get(&tokenfab_core::TenantId::new(name.clone()))
                    .copied()
                    .unwrap_or_default();
                TenantReport {
                    attributed_energy_j: m.usage.joules,
                    idle_energy_share_j: m.idle_joules,
                    name: name.clone(),
                    batches: self.arrived_batches[i],
                    requests: self.arrived_requests[i],
                    output_tokens: mine.iter().map(|b| b.usage.completion_tokens).sum(),
                    served_output_tokens: self.served_tokens[i],
                    sla_attainment: attainment(&mine),
                    refused_batches: self.refused.iter().filter(|r| r.0 == i).count() as u64,
                }
            })
            .collect();
        let out = usage.completion_tokens as f64;
        Report {
            scenario: self.scenario,
            description: self.description,
            seed: self.seed,
            arrivals_s: self.arrivals_s,
            simulated_s: end_s,
            last_batch_end_s: self.batches.iter().map(|b| b.ended.as_secs_f64()).fold(0.0, f64::max),
            events,
            requests: RequestTotals {
                arrived: self.arrived_requests.iter().sum(),
                completed,
                failed,
                refused: self.refused.iter().map(|r| r.1 as u64).sum(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                workload_prompt_tokens: self.arrived_prompt_tokens,
                workload_output_tokens: self.arrived_output_tokens,
                duplicates_dropped: control.duplicates_dropped,
                retried: control.requests_retried,
            },
            batches: BatchTotals {
                arrived: self.arrived_batches.iter().sum(),
                by_status: status_counts.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                sla_attainment: attainment(&all),
                completion_s: Percentiles::of(&all),
                by_class: by_class
                    .into_iter()
                    .map(|(class, bs)| {
                        (
                            class,
                            ClassReport {
                                batches: bs.len() as u64,
                                sla_attainment: attainment(&bs),
                                completion_s: Percentiles::of(&bs),
                            },
                        )
                    })
                    .collect(),
            },
            output_tokens_per_s: out / end_s.max(1e-9),
            energy_j: energy,
            energy_attributed_j: attributed,
            energy_agent_idle_j: agent_idle,
            energy_idle_unallocated_j: idle_unallocated_j,
            output_tokens_per_joule: out / energy.max(1e-9),
            utilization: busy / (end_s * f64::from(devices)).max(1e-9),
            idle_power_w: self.pools.iter().map(|p| f64::from(p.devices) * p.idle_w).sum(),
            cost: CostReport {
                device_usd,
                energy_usd,
                total_usd: device_usd + energy_usd,
                per_million_output_tokens_usd: if out > 0.0 {
                    (device_usd + energy_usd) / out * 1e6
                } else {
                    0.0
                },
            },
            engine_output_tokens: tokens,
            pools,
            tenants,
            refusals: self
                .refused
                .iter()
                .map(|r| format!("{}: {}", self.tenants[r.0], r.2))
                .collect(),
            series: self.series,
            batch_records: self.batches,
            sla: None,
            replicas: Vec::new(),
            prefix_lookups: 0,
            prefix_hits: 0,
            cached_prompt_tokens: 0,
            fragmentation: tokenfab_core::placement::Fragmentation::default(),
            placement_advice: None,
        }
    }
}

fn attainment(bs: &[&BatchRecord]) -> f64 {
    if bs.is_empty() {
        return 1.0;
    }
    bs.iter().filter(|b| b.met).count() as f64 / bs.len() as f64
}

/// Batch completion times, seconds from arrival to end.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    fn of(bs: &[&BatchRecord]) -> Percentiles {
        let mut v: Vec<f64> = bs.iter().map(|b| b.ended.since(b.arrived).as_secs_f64()).collect();
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        // Nearest-rank percentiles.
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestTotals {
    pub arrived: u64,
    pub completed: u64,
    pub failed: u64,
    /// Requests of batches refused at submission.
    pub refused: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Tokens the workload asked for (for conservation checks).
    pub workload_prompt_tokens: u64,
    pub workload_output_tokens: u64,
    pub duplicates_dropped: u64,
    pub retried: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    pub batches: u64,
    pub sla_attainment: f64,
    pub completion_s: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchTotals {
    pub arrived: u64,
    pub by_status: BTreeMap<String, u64>,
    /// Share of ended batches completed by their deadline.
    pub sla_attainment: f64,
    pub completion_s: Percentiles,
    pub by_class: BTreeMap<String, ClassReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolReport {
    pub name: String,
    pub accelerator: String,
    pub devices: u32,
    pub idle_devices: u32,
    pub output_tokens: u64,
    pub energy_j: f64,
    /// Power of the whole pool when idle.
    pub idle_power_w: f64,
    pub utilization: f64,
    pub device_cost_usd: f64,
    pub energy_cost_usd: f64,
    /// False when the accelerator's figures are not fitted to measurements (see the catalog).
    pub model_calibrated: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantReport {
    pub name: String,
    /// Device energy attributed to the tenant's results, and its share of idle energy
    /// (shared by attributed energy over the SLA window, as the live control plane does).
    pub attributed_energy_j: f64,
    pub idle_energy_share_j: f64,
    pub batches: u64,
    pub requests: u64,
    /// Output tokens of the tenant's completed requests.
    pub output_tokens: u64,
    /// Output tokens the engines generated for the tenant while batches were arriving
    /// (simulated time up to `duration`), whether or not their batch then completed: the
    /// tenant's share of capacity, for fairness under contention.
    pub served_output_tokens: u64,
    pub sla_attainment: f64,
    pub refused_batches: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    pub device_usd: f64,
    pub energy_usd: f64,
    pub total_usd: f64,
    pub per_million_output_tokens_usd: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    /// Simulated seconds during which batches arrived.
    pub arrivals_s: f64,
    /// Simulated seconds: the scenario's duration, or until the last batch ended if later.
    /// Devices are billed and draw idle power for all of it.
    pub simulated_s: f64,
    /// Simulated second at which the last batch ended.
    pub last_batch_end_s: f64,
    pub events: u64,
    pub requests: RequestTotals,
    pub batches: BatchTotals,
    pub output_tokens_per_s: f64,
    /// All device energy, idle included.
    pub energy_j: f64,
    /// Energy the agents attributed to requests (the rest was idle).
    pub energy_attributed_j: f64,
    /// Energy the agents counted as idle (no request in flight on the replica).
    pub energy_agent_idle_j: f64,
    /// Idle energy reported while no tenant had results in the SLA window (charged to
    /// nobody); the rest of the idle energy is in the tenants' `idle_energy_share_j`.
    pub energy_idle_unallocated_j: f64,
    pub output_tokens_per_joule: f64,
    /// Busy device-seconds / device-seconds.
    pub utilization: f64,
    /// Power of the whole cluster when idle.
    pub idle_power_w: f64,
    pub cost: CostReport,
    /// Output tokens the engines generated: `requests.completion_tokens` plus work repeated
    /// after a lost lease and requests still running when their batch expired.
    pub engine_output_tokens: u64,
    pub pools: Vec<PoolReport>,
    pub tenants: Vec<TenantReport>,
    pub refusals: Vec<String>,
    #[serde(skip)]
    pub series: Vec<SeriesPoint>,
    #[serde(skip)]
    pub batch_records: Vec<BatchRecord>,
    /// The throughput SLA document the simulated control plane publishes at the end
    /// (written as `sla.json`; its window covers the whole run).
    #[serde(skip)]
    pub sla: Option<tokenfab_core::sla::ThroughputSla>,
    /// Every replica's window and power limit at the end, and how often its tuner moved.
    pub replicas: Vec<ReplicaEnd>,
    /// Requests with a shared prompt prefix the engines admitted, those whose prefix their
    /// engine's cache held, and the prompt tokens not prefilled thanks to it.
    pub prefix_lookups: u64,
    pub prefix_hits: u64,
    pub cached_prompt_tokens: u64,
    /// Free and stranded devices of the scenario's layout.
    pub fragmentation: tokenfab_core::placement::Fragmentation,
    /// The layout placement would choose on this fleet for each model's busiest hour of
    /// arrivals, next to the scenario's.
    pub placement_advice: Option<tokenfab_core::control::PlanView>,
}

/// One replica at the end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaEnd {
    pub node: String,
    pub replica: String,
    pub window: u32,
    pub power_limit_w: f64,
    pub tuner_moves: u64,
}

impl Report {
    /// `report.json`: deterministic for a scenario and seed.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }

    /// Writes `report.json`, `sla.json`, `llm-d-benchmark-reports.json`, `series.csv` and
    /// `batches.csv` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), self.to_json() + "\n")?;
        if let Some(sla) = &self.sla {
            let json = serde_json::to_string_pretty(sla).expect("the SLA document serializes");
            std::fs::write(dir.join("sla.json"), json + "\n")?;
            let reports = tokenfab_core::llmd::benchmark_reports(sla);
            let json = serde_json::to_string_pretty(&reports).expect("the reports serialize");
            std::fs::write(dir.join("llm-d-benchmark-reports.json"), json + "\n")?;
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("series.csv"))?);
        writeln!(
            f,
            "t_s,pool,output_tokens_per_s,power_w,utilization,queue_depth,window_mean,power_limit_w_mean"
        )?;
        for p in &self.series {
            writeln!(
                f,
                "{},{},{:.3},{:.3},{:.5},{},{:.1},{:.1}",
                p.t_s,
                p.pool,
                p.output_tokens_per_s,
                p.power_w,
                p.utilization,
                p.queue_depth,
                p.window_mean,
                p.power_limit_w_mean
            )?;
        }
        f.flush()?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("batches.csv"))?);
        writeln!(
            f,
            "tenant,sla_class,arrived_s,ended_s,deadline_s,completion_s,status,met,requests,completed,failed,output_tokens,joules,cost_usd"
        )?;
        for b in &self.batch_records {
            writeln!(
                f,
                "{},{},{},{},{},{:.3},{},{},{},{},{},{},{:.3},{:.6}",
                self.tenants[b.tenant].name,
                b.sla_class,
                b.arrived.as_secs_f64(),
                b.ended.as_secs_f64(),
                b.deadline.as_secs_f64(),
                b.ended.since(b.arrived).as_secs_f64(),
                b.status,
                b.met,
                b.requests,
                b.completed,
                b.failed,
                b.usage.completion_tokens,
                b.usage.joules,
                b.usage.cost_usd
            )?;
        }
        f.flush()
    }

    /// The summary a person reads, as (label, value) rows.
    pub fn summary(&self) -> Vec<(String, String)> {
        let c = &self.batches.completion_s;
        let mut rows = vec![
            ("scenario".into(), format!("{} (seed {})", self.scenario, self.seed)),
            (
                "simulated".into(),
                format!(
                    "{} of arrivals, the last batch ended at {}, devices billed for {}",
                    secs(self.arrivals_s),
                    secs(self.last_batch_end_s),
                    secs(self.simulated_s)
                ),
            ),
            (
                "requests".into(),
                format!(
                    "{} arrived, {} completed, {} failed, {} refused",
                    self.requests.arrived, self.requests.completed, self.requests.failed, self.requests.refused
                ),
            ),
            (
                "batches".into(),
                format!(
                    "{} arrived; {}",
                    self.batches.arrived,
                    self.batches
                        .by_status
                        .iter()
                        .map(|(k, v)| format!("{v} {k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            (
                "output tokens".into(),
                format!(
                    "{} ({:.0}/s)",
                    self.requests.completion_tokens, self.output_tokens_per_s
                ),
            ),
            (
                "batch completion time".into(),
                format!(
                    "p50 {}, p90 {}, p99 {}, max {}",
                    secs(c.p50),
                    secs(c.p90),
                    secs(c.p99),
                    secs(c.max)
                ),
            ),
            (
                "SLA attainment".into(),
                format!(
                    "{:.2}% of batches by their deadline",
                    self.batches.sla_attainment * 100.0
                ),
            ),
        ];
        for (class, r) in &self.batches.by_class {
            rows.push((
                format!("  class {class}"),
                format!(
                    "{} batches, {:.2}% on time, p99 {}",
                    r.batches,
                    r.sla_attainment * 100.0,
                    secs(r.completion_s.p99)
                ),
            ));
        }
        rows.extend([
            ("device utilization".into(), format!("{:.1}%", self.utilization * 100.0)),
            (
                "energy".into(),
                format!(
                    "{:.1} kWh ({:.1} kWh attributed to requests, idle power {:.1} kW)",
                    self.energy_j / 3.6e6,
                    self.energy_attributed_j / 3.6e6,
                    self.idle_power_w / 1000.0
                ),
            ),
            ("output tokens/J".into(), format!("{:.2}", self.output_tokens_per_joule)),
            (
                "cost".into(),
                format!(
                    "${:.2} (devices ${:.2}, energy ${:.2})",
                    self.cost.total_usd, self.cost.device_usd, self.cost.energy_usd
                ),
            ),
            (
                "cost per 1M output tokens".into(),
                format!("${:.4}", self.cost.per_million_output_tokens_usd),
            ),
        ]);
        for p in &self.pools {
            let note = if p.model_calibrated {
                ""
            } else {
                " (uncalibrated model)"
            };
            rows.push((
                format!("  pool {}", p.name),
                format!(
                    "{} x {}{note}: {:.1}% busy, {:.1} kWh, {} output tokens",
                    p.devices,
                    p.accelerator,
                    p.utilization * 100.0,
                    p.energy_j / 3.6e6,
                    p.output_tokens
                ),
            ));
        }
        if self.prefix_lookups > 0 {
            rows.push((
                "prefix cache".into(),
                format!(
                    "{:.1}% of {} requests with a shared prefix found it cached; {} prompt tokens not prefilled",
                    self.prefix_hits as f64 * 100.0 / self.prefix_lookups as f64,
                    self.prefix_lookups,
                    self.cached_prompt_tokens
                ),
            ));
        }
        let f = self.fragmentation;
        rows.push((
            "free devices".into(),
            format!(
                "{} of {} serve no replica; {} of them stranded (no served model fits them)",
                f.free, f.devices, f.stranded
            ),
        ));
        if let Some(a) = &self.placement_advice {
            let models: Vec<String> = a
                .demand
                .iter()
                .map(|d| format!("{} {:.0} tok/s", d.model, d.tokens_per_s))
                .collect();
            let change = if a.start.is_empty() && a.stop.is_empty() {
                format!("keep all {} replicas", a.replicas_now)
            } else {
                format!(
                    "{} replicas instead of {} (start {}, stop {}; stranded devices {} -> {})",
                    a.replicas_planned,
                    a.replicas_now,
                    a.start.len(),
                    a.stop.len(),
                    a.fragmentation_now.stranded,
                    a.fragmentation_planned.stranded
                )
            };
            rows.push((
                "placement advice".into(),
                format!("for the busiest hour ({}): {change}", models.join(", ")),
            ));
        }
        rows
    }
}

fn secs(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.2} h", s / 3600.0)
    }
}
