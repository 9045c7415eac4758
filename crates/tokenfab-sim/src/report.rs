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
use tokenfab_core::sla::CompletionTimes;
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

/// Where the record of each ended batch goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchRecords {
    /// Kept in memory, in the report's `batch_records` (and written as `batches.csv` by
    /// [`Report::write`]). Memory grows with the batches: for tests and small runs.
    Keep,
    /// Streamed to this CSV file (the format of `batches.csv`) as batches end.
    Csv(std::path::PathBuf),
    /// Not kept (the report's totals and percentiles are computed all the same).
    Discard,
}

/// The first refusal reasons a report keeps (the counts cover all of them).
pub const REFUSALS_KEPT: usize = 1000;

const BATCHES_CSV_HEADER: &str = "tenant,sla_class,arrived_s,ended_s,deadline_s,completion_s,status,met,requests,completed,failed,output_tokens,joules,cost_usd";

fn write_record(f: &mut impl Write, tenant: &str, b: &BatchRecord) -> std::io::Result<()> {
    writeln!(
        f,
        "{},{},{},{},{},{:.3},{},{},{},{},{},{},{:.3},{:.6}",
        tenant,
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
    )
}

#[derive(Debug)]
enum Records {
    Keep(Vec<BatchRecord>),
    /// The file, and the first error writing it (reported at the end).
    Csv(std::io::BufWriter<std::fs::File>, Option<std::io::Error>),
    Discard,
}

impl Clone for Records {
    /// A forked simulation (the oracle's trials) keeps records in memory only if its
    /// parent does; it never writes to the parent's file.
    fn clone(&self) -> Self {
        match self {
            Records::Keep(v) => Records::Keep(v.clone()),
            Records::Csv(..) | Records::Discard => Records::Discard,
        }
    }
}

/// Ended batches of one kind (all, or one SLA class): how many, how many on time, and
/// their completion times.
#[derive(Debug, Clone, Default)]
struct Ended {
    batches: u64,
    met: u64,
    completion: CompletionTimes,
}

impl Ended {
    fn add(&mut self, b: &BatchRecord) {
        self.batches += 1;
        self.met += u64::from(b.met);
        self.completion.record(b.ended.since(b.arrived).as_secs_f64());
    }

    fn attainment(&self) -> f64 {
        on_time_share(self.met, self.batches)
    }
}

/// Share of `batches` that met their deadline (1 when none ended).
fn on_time_share(met: u64, batches: u64) -> f64 {
    if batches == 0 {
        return 1.0;
    }
    met as f64 / batches as f64
}

fn percentiles(t: &CompletionTimes) -> Percentiles {
    Percentiles {
        p50: t.quantile(0.5),
        p90: t.quantile(0.9),
        p99: t.quantile(0.99),
        max: t.max(),
        mean: t.mean(),
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct TenantEnded {
    batches: u64,
    met: u64,
    usage: Usage,
    completed: u64,
    failed: u64,
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
    /// What the ended batches add up to: totals and completion-time histograms, so that
    /// memory does not grow with the batches that end.
    ended: Ended,
    ended_by_class: BTreeMap<String, Ended>,
    ended_by_tenant: Vec<TenantEnded>,
    status_counts: BTreeMap<&'static str, u64>,
    last_end_s: f64,
    /// Each ended batch's record: kept, streamed to a CSV file, or dropped.
    records: Records,
    arrived_batches: Vec<u64>,
    arrived_requests: Vec<u64>,
    served_tokens: Vec<u64>,
    arrived_output_tokens: u64,
    arrived_prompt_tokens: u64,
    /// Refused batches and requests per tenant, and the first `REFUSALS_KEPT` reasons.
    refused_batches: Vec<u64>,
    refused_requests: u64,
    refusals: Vec<String>,
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
    /// The collector of a run of `s` with `seed`.
    pub(crate) fn new(s: &Scenario, engines: &[Engine], seed: u64) -> Self {
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
            ended: Ended::default(),
            ended_by_class: BTreeMap::new(),
            ended_by_tenant: vec![TenantEnded::default(); n],
            status_counts: BTreeMap::new(),
            last_end_s: 0.0,
            records: Records::Keep(Vec::new()),
            arrived_batches: vec![0; n],
            arrived_requests: vec![0; n],
            served_tokens: vec![0; n],
            arrived_output_tokens: 0,
            arrived_prompt_tokens: 0,
            refused_batches: vec![0; n],
            refused_requests: 0,
            refusals: Vec::new(),
            tenants: s.workload.tenants.iter().map(|t| t.name.clone()).collect(),
            scenario: s.name.clone(),
            description: s.description.clone(),
            seed,
            arrivals_s: s.duration.as_secs_f64(),
            pue: s.site.pue,
            usd_per_kwh: s.site.usd_per_kwh,
            tuner_moves: 0,
        }
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

    /// Records of ended batches are not kept from now on.
    pub(crate) fn discard_records(&mut self) {
        self.records = Records::Discard;
    }

    /// Where the records of ended batches go from now on (a CSV file gets its header at
    /// once).
    pub(crate) fn set_records(&mut self, to: &BatchRecords) -> std::io::Result<()> {
        self.records = match to {
            BatchRecords::Keep => Records::Keep(Vec::new()),
            BatchRecords::Discard => Records::Discard,
            BatchRecords::Csv(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
                writeln!(f, "{BATCHES_CSV_HEADER}")?;
                Records::Csv(f, None)
            }
        };
        Ok(())
    }

    /// Output tokens of completed requests, batches ended, and those that missed their
    /// deadline, so far.
    pub(crate) fn progress(&self) -> (u64, usize, usize) {
        let tokens = self.ended_by_tenant.iter().map(|t| t.usage.completion_tokens).sum();
        (
            tokens,
            self.ended.batches as usize,
            (self.ended.batches - self.ended.met) as usize,
        )
    }

    /// A tuner moved a replica's knobs.
    pub(crate) fn tuned(&mut self) {
        self.tuner_moves += 1;
    }

    pub(crate) fn refused(&mut self, tenant: usize, requests: usize, why: String) {
        self.refused_batches[tenant] += 1;
        self.refused_requests += requests as u64;
        if self.refusals.len() < REFUSALS_KEPT {
            self.refusals.push(format!("{}: {why}", self.tenants[tenant]));
        }
    }

    pub(crate) fn ended(&mut self, b: BatchRecord) {
        self.ended.add(&b);
        match self.ended_by_class.get_mut(&b.sla_class) {
            Some(e) => e.add(&b),
            None => self.ended_by_class.entry(b.sla_class.clone()).or_default().add(&b),
        }
        let t = &mut self.ended_by_tenant[b.tenant];
        t.batches += 1;
        t.met += u64::from(b.met);
        t.usage += b.usage;
        t.completed += u64::from(b.completed);
        t.failed += u64::from(b.failed);
        *self.status_counts.entry(b.status.as_str()).or_default() += 1;
        self.last_end_s = self.last_end_s.max(b.ended.as_secs_f64());
        match &mut self.records {
            Records::Keep(v) => v.push(b),
            Records::Csv(f, error) => {
                if error.is_none()
                    && let Err(e) = write_record(f, &self.tenants[b.tenant], &b)
                {
                    *error = Some(e);
                }
            }
            Records::Discard => {}
        }
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
        mut self,
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
        for t in &self.ended_by_tenant {
            usage += t.usage;
            completed += t.completed;
            failed += t.failed;
        }
        let records_kept = matches!(self.records, Records::Keep(_));
        let (batch_records, records_error) = match std::mem::replace(&mut self.records, Records::Discard) {
            Records::Keep(v) => (v, None),
            Records::Csv(mut f, error) => {
                let error = error.map_or_else(|| f.flush().err(), Some);
                (Vec::new(), error.map(|e| e.to_string()))
            }
            Records::Discard => (Vec::new(), None),
        };
        let tenants = self
            .tenants
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let m = metered
                    .get(&tokenfab_core::TenantId::new(name.clone()))
                    .copied()
                    .unwrap_or_default();
                let ended = &self.ended_by_tenant[i];
                TenantReport {
                    attributed_energy_j: m.usage.joules,
                    idle_energy_share_j: m.idle_joules,
                    name: name.clone(),
                    batches: self.arrived_batches[i],
                    requests: self.arrived_requests[i],
                    output_tokens: ended.usage.completion_tokens,
                    served_output_tokens: self.served_tokens[i],
                    sla_attainment: on_time_share(ended.met, ended.batches),
                    refused_batches: self.refused_batches[i],
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
            last_batch_end_s: self.last_end_s,
            events,
            requests: RequestTotals {
                arrived: self.arrived_requests.iter().sum(),
                completed,
                failed,
                refused: self.refused_requests,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                workload_prompt_tokens: self.arrived_prompt_tokens,
                workload_output_tokens: self.arrived_output_tokens,
                duplicates_dropped: control.duplicates_dropped,
                retried: control.requests_retried,
            },
            batches: BatchTotals {
                arrived: self.arrived_batches.iter().sum(),
                by_status: self.status_counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                sla_attainment: self.ended.attainment(),
                completion_s: percentiles(&self.ended.completion),
                by_class: self
                    .ended_by_class
                    .iter()
                    .map(|(class, e)| {
                        (
                            class.clone(),
                            ClassReport {
                                batches: e.batches,
                                sla_attainment: e.attainment(),
                                completion_s: percentiles(&e.completion),
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
            refusals: self.refusals,
            series: self.series,
            completion_cdf: self.ended.completion.cdf(),
            batch_records,
            records_kept,
            records_error,
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

/// Batch completion times, seconds from arrival to end.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestTotals {
    /// Requests of admitted batches.
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

impl RequestTotals {
    /// Share of all submitted requests (admitted or not) that admission refused.
    pub fn refused_share(&self) -> f64 {
        self.refused as f64 / (self.arrived + self.refused).max(1) as f64
    }
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
    /// Why batches were refused: the first 1,000 (`requests.refused` and each tenant's
    /// `refused_batches` count all of them).
    pub refusals: Vec<String>,
    #[serde(skip)]
    pub series: Vec<SeriesPoint>,
    /// Every ended batch, when the run kept them ([`BatchRecords::Keep`]).
    #[serde(skip)]
    pub batch_records: Vec<BatchRecord>,
    /// Batch completion times as (seconds, share of batches at or below), from the run's
    /// histogram (within 0.1%).
    #[serde(skip)]
    pub completion_cdf: Vec<(f64, f64)>,
    /// Whether `batch_records` holds every ended batch (the run kept them).
    #[serde(skip)]
    pub records_kept: bool,
    /// Why the batch records could not be written to their CSV file, if they could not.
    #[serde(skip)]
    pub records_error: Option<String>,
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

    /// Writes `report.json`, `sla.json`, `llm-d-benchmark-reports.json`, `series.csv` and,
    /// when the run kept its batch records, `batches.csv` into `dir`.
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
        if !self.records_kept {
            // Streamed to their file while the run went, or not kept.
            return Ok(());
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("batches.csv"))?);
        writeln!(f, "{BATCHES_CSV_HEADER}")?;
        for b in &self.batch_records {
            write_record(&mut f, &self.tenants[b.tenant].name, b)?;
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
