//! Measuring the throughput SLA: what the cluster delivered over a sliding window.
//!
//! The meter keeps, per (model, accelerator class) pool, counters of recorded results in
//! fixed time buckets covering the window (output and prompt tokens, attributed joules,
//! device-seconds, cost, requests), an HDR histogram of request latency per bucket, and,
//! per model and SLA class, the batches that ended in each bucket (how many, how many on
//! time, an HDR histogram of their completion times). Buckets older than the window are
//! dropped as time passes, so every figure describes the last `window` (or less, right
//! after a start), and memory does not grow with the requests and batches counted.
//!
//! The method (what a token is, how energy is attributed, how percentiles are taken) is
//! written out in `docs/sla.md` and carried in every published document.

use crate::batch::BatchStatus;
use crate::ids::{AcceleratorId, ModelId, TenantId};
use crate::time::Timestamp;
use crate::usage::Usage;
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Whether a batch that ended with `status` at `ended` met its `deadline`: it completed,
/// and by then. The one rule the SLA document and the simulator's report count by.
pub fn deadline_met(status: BatchStatus, ended: Option<Timestamp>, deadline: Timestamp) -> bool {
    status == BatchStatus::Completed && ended.is_some_and(|t| t <= deadline)
}

/// Latency histograms record microseconds up to an hour, with 3 significant digits.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// Counters of one pool in one bucket.
#[derive(Debug, Clone)]
struct Bucket {
    start: Timestamp,
    requests: u64,
    usage: Usage,
    latency_us: Histogram<u64>,
}

impl Bucket {
    fn new(start: Timestamp) -> Self {
        Bucket {
            start,
            requests: 0,
            usage: Usage::default(),
            latency_us: Histogram::new_with_max(LATENCY_MAX_US, 3).expect("valid histogram bounds"),
        }
    }
}

/// Batch completion times: an HDR histogram of microseconds with 3 significant digits
/// (quantiles within 0.1%; it grows to whatever the longest time is), and their exact sum
/// and maximum. Its memory does not grow with the times recorded. The SLA meter and the
/// simulator's report both count completion times with it.
#[derive(Debug, Clone)]
pub struct CompletionTimes {
    hist: Histogram<u64>,
    sum_s: f64,
    max_s: f64,
}

impl Default for CompletionTimes {
    fn default() -> Self {
        CompletionTimes {
            hist: Histogram::new(3).expect("3 significant digits are valid"),
            sum_s: 0.0,
            max_s: 0.0,
        }
    }
}

impl CompletionTimes {
    pub fn record(&mut self, seconds: f64) {
        // Auto-resizing: any value fits.
        let _ = self.hist.record((seconds * 1e6).round().max(0.0) as u64);
        self.sum_s += seconds;
        self.max_s = self.max_s.max(seconds);
    }

    /// Adds the times `other` recorded.
    pub fn merge(&mut self, other: &CompletionTimes) {
        // Auto-resizing: adding never fails.
        let _ = self.hist.add(&other.hist);
        self.sum_s += other.sum_s;
        self.max_s = self.max_s.max(other.max_s);
    }

    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The time at quantile `q` (0 to 1), seconds: the histogram's value, never above the
    /// longest time; 0 when none was recorded.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        (self.hist.value_at_quantile(q) as f64 / 1e6).min(self.max_s)
    }

    /// Exact mean and maximum, seconds (0 when none was recorded).
    pub fn mean(&self) -> f64 {
        self.sum_s / self.len().max(1) as f64
    }

    pub fn max(&self) -> f64 {
        self.max_s
    }

    /// The distribution as (seconds, share of the times at or below).
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let n = self.len().max(1) as f64;
        let mut seen = 0u64;
        self.hist
            .iter_recorded()
            .map(|v| {
                seen += v.count_at_value();
                ((v.value_iterated_to() as f64 / 1e6).min(self.max_s), seen as f64 / n)
            })
            .collect()
    }
}

/// The batches of one model and SLA class that ended in one bucket.
#[derive(Debug, Clone)]
struct EndedBucket {
    start: Timestamp,
    batches: u64,
    /// Completed by their deadline.
    on_time: u64,
    completion: CompletionTimes,
}

/// Sliding-window measurement of delivered throughput, energy, cost and completion times.
#[derive(Debug, Clone)]
pub struct SlaMeter {
    window: Duration,
    bucket: Duration,
    pools: BTreeMap<(ModelId, AcceleratorId), VecDeque<Bucket>>,
    ended: BTreeMap<(ModelId, String), VecDeque<EndedBucket>>,
    /// Attributed joules of each tenant's recorded results, per bucket (for sharing idle
    /// energy).
    tenants: BTreeMap<TenantId, VecDeque<(Timestamp, f64)>>,
    started: Option<Timestamp>,
    /// The earliest time a bucket of `pools` or `tenants` ages out (`None`: unknown,
    /// look).
    next_expiry: Option<Timestamp>,
}

/// What one pool delivered over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolFigures {
    pub model: ModelId,
    pub accelerator: AcceleratorId,
    pub requests: u64,
    pub usage: Usage,
    /// Request latency (dispatch to answer), seconds.
    pub latency_s: Percentiles,
}

/// Completion times and attainment of one SLA class (one model) over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassFigures {
    pub model: ModelId,
    pub class: String,
    pub batches: u64,
    pub on_time: u64,
    /// Batch completion times, seconds (percentiles from an HDR histogram, 3 significant
    /// digits).
    pub completion_s: Percentiles,
}

impl SlaMeter {
    /// A meter over `window`, in buckets of `window / 60` (at least one second).
    pub fn new(window: Duration) -> Self {
        let bucket = (window / 60).max(Duration::from_secs(1));
        SlaMeter {
            window,
            bucket,
            pools: BTreeMap::new(),
            ended: BTreeMap::new(),
            tenants: BTreeMap::new(),
            started: None,
            next_expiry: None,
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether a bucket starting at `start` is still in the window ending at `now`.
    fn in_window(&self, now: Timestamp, start: Timestamp) -> bool {
        now.since(start.saturating_add(self.bucket)) < self.window
    }

    /// Seconds the figures cover at `now`: from the start of the oldest bucket in the
    /// window (up to a bucket more than the window), or less right after the start.
    pub fn covered_s(&self, now: Timestamp) -> f64 {
        let Some(started) = self.started else { return 0.0 };
        let oldest = self
            .pools
            .values()
            .filter_map(|r| r.iter().find(|b| self.in_window(now, b.start)))
            .map(|b| b.start)
            .min();
        let from = oldest.map_or(started, |o| o.max(started));
        let kept = now.since(from).as_secs_f64();
        if oldest.is_some() {
            kept
        } else {
            kept.min(self.window.as_secs_f64())
        }
    }

    fn start(&mut self, now: Timestamp) {
        if self.started.is_none() {
            self.started = Some(now);
        }
    }

    /// A recorded result of `model` served on `accelerator`.
    pub fn result(
        &mut self,
        now: Timestamp,
        model: &ModelId,
        accelerator: &AcceleratorId,
        usage: Usage,
        latency: Duration,
    ) {
        self.start(now);
        self.expire(now);
        let start = self.bucket_start(now);
        // The common case, a result for the current bucket of a known pool, copies no key
        // (the map is keyed by owned names; a pool is found by comparing them in place).
        let known = self
            .pools
            .iter_mut()
            .find(|((m, a), _)| m == model && a == accelerator)
            .map(|(_, r)| r);
        let ring = match known {
            Some(r) if r.back().is_some_and(|b| b.start >= start) => r,
            _ => {
                self.added(start);
                let ring = self.pools.entry((model.clone(), accelerator.clone())).or_default();
                ring.push_back(Bucket::new(start));
                ring
            }
        };
        let b = ring.back_mut().expect("pushed");
        b.requests += 1;
        b.usage += usage;
        b.latency_us
            .saturating_record((latency.as_micros() as u64).clamp(1, LATENCY_MAX_US));
    }

    /// `joules` of device energy were attributed to a result of `tenant` at `now`.
    pub fn tenant_energy(&mut self, now: Timestamp, tenant: &TenantId, joules: f64) {
        if !(joules.is_finite() && joules > 0.0) {
            return;
        }
        self.start(now);
        self.expire(now);
        let start = self.bucket_start(now);
        if let Some((at, j)) = self.tenants.get_mut(tenant).and_then(|r| r.back_mut())
            && *at == start
        {
            *j += joules;
            return;
        }
        self.added(start);
        self.tenants
            .entry(tenant.clone())
            .or_default()
            .push_back((start, joules));
    }

    /// Each tenant's attributed joules over the window ending at `now` (tenants with none
    /// are left out).
    pub fn tenant_energy_in_window(&mut self, now: Timestamp) -> Vec<(TenantId, f64)> {
        self.expire(now);
        self.tenants
            .iter()
            .map(|(t, ring)| (t.clone(), ring.iter().map(|(_, j)| j).sum::<f64>()))
            .filter(|(_, j)| *j > 0.0)
            .collect()
    }

    fn bucket_start(&self, now: Timestamp) -> Timestamp {
        let len = self.bucket.as_micros() as u64;
        Timestamp::from_micros(now.as_micros() / len * len)
    }

    /// A batch ended at `now` (only completed batches can be on time). Batches the tenant
    /// cancelled are not counted: their end says nothing about the service.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_ended(
        &mut self,
        now: Timestamp,
        model: &ModelId,
        class: &str,
        created: Timestamp,
        deadline: Timestamp,
        status: BatchStatus,
    ) {
        self.start(now);
        self.expire(now);
        if status == BatchStatus::Cancelled {
            return;
        }
        let start = self.bucket_start(now);
        let known = self
            .ended
            .iter_mut()
            .find(|((m, c), _)| m == model && c == class)
            .map(|(_, r)| r);
        let ring = match known {
            Some(r) if r.back().is_some_and(|b| b.start >= start) => r,
            _ => {
                let ring = self.ended.entry((model.clone(), class.to_string())).or_default();
                ring.push_back(EndedBucket {
                    start,
                    batches: 0,
                    on_time: 0,
                    completion: CompletionTimes::default(),
                });
                ring
            }
        };
        let b = ring.back_mut().expect("pushed");
        b.batches += 1;
        b.on_time += u64::from(deadline_met(status, Some(now), deadline));
        b.completion.record(now.since(created).as_secs_f64());
    }

    /// Drops what is older than the window. The rings are walked only once something in
    /// them can have aged out (`next_expiry`), so calling this on every result is cheap.
    fn expire(&mut self, now: Timestamp) {
        let (window, bucket) = (self.window, self.bucket);
        for ring in self.ended.values_mut() {
            while ring
                .front()
                .is_some_and(|b| now.since(b.start.saturating_add(bucket)) >= window)
            {
                ring.pop_front();
            }
        }
        if self.next_expiry.is_some_and(|t| now < t) {
            return;
        }
        self.expire_rings(now);
    }

    fn expire_rings(&mut self, now: Timestamp) {
        let window = self.window;
        let bucket = self.bucket;
        for ring in self.pools.values_mut() {
            while ring
                .front()
                .is_some_and(|b| now.since(b.start.saturating_add(bucket)) >= window)
            {
                ring.pop_front();
            }
        }
        self.pools.retain(|_, r| !r.is_empty());
        for ring in self.tenants.values_mut() {
            while ring
                .front()
                .is_some_and(|(at, _)| now.since(at.saturating_add(bucket)) >= window)
            {
                ring.pop_front();
            }
        }
        self.tenants.retain(|_, r| !r.is_empty());
        let oldest = self
            .pools
            .values()
            .filter_map(|r| r.front().map(|b| b.start))
            .chain(self.tenants.values().filter_map(|r| r.front().map(|(at, _)| *at)))
            .min();
        self.next_expiry = Some(oldest.map_or(Timestamp::MAX, |t| self.ages_out(t)));
    }

    /// When a bucket starting at `start` leaves the window.
    fn ages_out(&self, start: Timestamp) -> Timestamp {
        start.saturating_add(self.bucket).saturating_add(self.window)
    }

    /// A bucket starting at `start` was added to a ring.
    fn added(&mut self, start: Timestamp) {
        let t = self.ages_out(start);
        self.next_expiry = self.next_expiry.map(|n| n.min(t));
    }

    /// The pools' figures over the window ending at `now`. A read: what has aged out is
    /// left out, not dropped (writes drop it).
    pub fn pools(&self, now: Timestamp) -> Vec<PoolFigures> {
        self.pools
            .iter()
            .filter(|(_, ring)| ring.iter().any(|b| self.in_window(now, b.start)))
            .map(|((model, accelerator), ring)| {
                let mut latency = Histogram::<u64>::new_with_max(LATENCY_MAX_US, 3).expect("valid histogram bounds");
                let mut usage = Usage::default();
                let mut requests = 0;
                for b in ring.iter().filter(|b| self.in_window(now, b.start)) {
                    latency.add(&b.latency_us).expect("same bounds");
                    usage += b.usage;
                    requests += b.requests;
                }
                let q = |p: f64| latency.value_at_quantile(p) as f64 / 1e6;
                PoolFigures {
                    model: model.clone(),
                    accelerator: accelerator.clone(),
                    requests,
                    usage,
                    latency_s: Percentiles {
                        mean: if requests > 0 { latency.mean() / 1e6 } else { 0.0 },
                        p50: q(0.5),
                        p90: q(0.9),
                        p99: q(0.99),
                    },
                }
            })
            .collect()
    }

    /// Per model and SLA class: batches ended in the window, on time, completion times.
    /// A read, like [`SlaMeter::pools`].
    pub fn classes(&self, now: Timestamp) -> Vec<ClassFigures> {
        self.ended
            .iter()
            .filter(|(_, ring)| ring.iter().any(|b| self.in_window(now, b.start)))
            .map(|((model, class), ring)| {
                let mut times = CompletionTimes::default();
                let (mut batches, mut on_time) = (0, 0);
                for b in ring.iter().filter(|b| self.in_window(now, b.start)) {
                    times.merge(&b.completion);
                    batches += b.batches;
                    on_time += b.on_time;
                }
                ClassFigures {
                    model: model.clone(),
                    class: class.clone(),
                    batches,
                    on_time,
                    completion_s: Percentiles {
                        mean: times.mean(),
                        p50: times.quantile(0.5),
                        p90: times.quantile(0.9),
                        p99: times.quantile(0.99),
                    },
                }
            })
            .collect()
    }
}

/// `apiVersion` of the published document.
pub const API_VERSION: &str = "tokenfab.io/v1";
/// `kind` of the published document.
pub const KIND: &str = "ThroughputSLA";

/// The published throughput SLA (see `docs/sla.md`; JSON Schema in
/// `docs/throughput-sla.schema.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ThroughputSla {
    pub api_version: String,
    pub kind: String,
    pub metadata: SlaMetadata,
    pub method: SlaMethod,
    pub pools: Vec<SlaPool>,
    pub classes: Vec<SlaClassEntry>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SlaMetadata {
    /// When the figures were taken (Unix ms).
    pub generated_at_unix_ms: u64,
    /// The measurement window.
    pub window_seconds: f64,
    /// The time the figures cover: from the start of the oldest bucket kept (the window
    /// plus up to one bucket), less right after a start.
    pub covered_seconds: f64,
}

/// How the figures are measured, stated in the document itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SlaMethod {
    pub specification: String,
    pub tokens: String,
    pub throughput: String,
    pub percentiles: String,
    pub energy: String,
    pub cost: String,
    pub commitment: String,
    /// When a result counted here became durable, and where (the control plane's store);
    /// the shell fills it in from its store.
    pub durability: String,
}

impl Default for SlaMethod {
    fn default() -> Self {
        SlaMethod {
            specification: "tokenfab.io/v1 ThroughputSLA, docs/sla.md".into(),
            tokens: "output tokens are the engine-reported usage.completion_tokens of successfully completed requests; prompt tokens are usage.prompt_tokens".into(),
            throughput: "measured output tokens per second = output tokens of results recorded in the window / covered seconds, per model and accelerator class".into(),
            percentiles: "from HDR histograms (3 significant digits): of the completion times (end - creation) of the batches that ended in the window's buckets, and of request latency (dispatch to answer)".into(),
            energy: "each agent reads its devices' energy counters every 100 ms and shares the energy of an interval among the requests that finished in it, in proportion to their prompt + output tokens; intervals with nothing running are idle energy, charged to no request".into(),
            cost: "device-seconds x price per device-hour / 3600 + joules x PUE x price per kWh / 3.6e6, per request, with the operator's prices".into(),
            commitment: "committed output tokens per second = the performance model's steady-state throughput of every registered replica at its concurrency window, for the window's mean prompt and output lengths, times the admission headroom".into(),
            durability: "a result counts once it is durable in the control plane's store".into(),
        }
    }
}

/// One model on one accelerator class.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SlaPool {
    pub model: String,
    pub accelerator: String,
    pub devices: u32,
    pub replicas: u32,
    pub committed_output_tokens_per_second: f64,
    pub measured_output_tokens_per_second: f64,
    pub requests: u64,
    pub output_tokens: u64,
    pub prompt_tokens: u64,
    pub output_tokens_per_joule: f64,
    pub cost_per_million_output_tokens_usd: f64,
    pub request_latency_seconds: Percentiles,
}

/// One SLA class of one model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SlaClassEntry {
    pub model: String,
    pub class: String,
    /// Committed classes are admission-checked; best-effort ones are not.
    pub committed: bool,
    pub batches: u64,
    pub on_time: u64,
    /// on_time / batches (1 when no batch ended).
    pub attainment: f64,
    pub completion_seconds: Percentiles,
}

/// A distribution's mean and percentiles (0 for an empty one).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_micros(1_000_000_000);

    fn at(s: u64) -> Timestamp {
        T0.saturating_add(Duration::from_secs(s))
    }
    fn usage(tokens: u64, joules: f64) -> Usage {
        Usage {
            prompt_tokens: 10,
            completion_tokens: tokens,
            joules,
            device_seconds: 1.0,
            cost_usd: 0.01,
        }
    }

    #[test]
    fn figures_cover_exactly_the_window() {
        let (m, a) = (ModelId::from("m"), AcceleratorId::from("h100-sxm"));
        let mut meter = SlaMeter::new(Duration::from_secs(600));
        // One result every second for 20 minutes: 100 tokens, 10 J, latency 1..1200 ms.
        for s in 0..1200 {
            meter.result(at(s), &m, &a, usage(100, 10.0), Duration::from_millis(s + 1));
        }
        let p = &meter.pools(at(1200))[0];
        // The window is 10 minutes of 10 s buckets: the last 600 results.
        assert_eq!(p.requests, 600);
        assert_eq!(p.usage.completion_tokens, 60_000);
        assert!((p.usage.joules - 6000.0).abs() < 1e-9);
        // Latencies of the last 600 results are 601..1200 ms: p50 ~ 900 ms, p99 ~ 1194 ms.
        assert!((p.latency_s.p50 - 0.900).abs() < 0.002, "{:?}", p.latency_s);
        assert!((p.latency_s.p99 - 1.194).abs() < 0.002, "{:?}", p.latency_s);
        assert!((p.latency_s.mean - 0.9005).abs() < 0.002, "{:?}", p.latency_s);
        // The figures cover the buckets kept: 600 s, so the rate is exact.
        assert_eq!(meter.covered_s(at(1200)), 600.0);
        assert_eq!(p.usage.completion_tokens as f64 / meter.covered_s(at(1200)), 100.0);
        // Mid-bucket, the oldest bucket kept starts up to a bucket before the window.
        meter.result(at(1205), &m, &a, usage(100, 10.0), Duration::from_millis(1));
        let p = &meter.pools(at(1205))[0];
        assert_eq!(meter.covered_s(at(1205)), 605.0);
        assert_eq!(p.requests, 601);
        // Long after, nothing is left.
        assert!(meter.pools(at(5000)).is_empty());
    }

    #[test]
    fn completion_times_and_attainment_per_class() {
        let m = ModelId::from("m");
        let mut meter = SlaMeter::new(Duration::from_secs(3600));
        for (i, done) in [100u64, 200, 300, 400].into_iter().enumerate() {
            // Deadlines at 250 s after creation: the last two are late.
            meter.batch_ended(at(done), &m, "standard", at(0), at(250), BatchStatus::Completed);
            let _ = i;
        }
        meter.batch_ended(at(50), &m, "best-effort", at(0), at(10), BatchStatus::Expired);
        meter.batch_ended(at(60), &m, "best-effort", at(0), at(10), BatchStatus::Cancelled);
        let c = meter.classes(at(500));
        let std = c.iter().find(|c| c.class == "standard").unwrap();
        assert_eq!((std.batches, std.on_time), (4, 2));
        // Exact mean; percentiles within the histogram's 3 significant digits.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 1e-3;
        let c_s = std.completion_s;
        assert!(
            c_s.mean == 250.0 && close(c_s.p50, 200.0) && close(c_s.p90, 400.0) && close(c_s.p99, 400.0),
            "{c_s:?}"
        );
        let be = c.iter().find(|c| c.class == "best-effort").unwrap();
        assert_eq!(
            (be.batches, be.on_time),
            (1, 0),
            "an expired batch is never on time; a cancelled one is not counted"
        );
    }
}
