//! Prometheus metrics of the control plane, served on `/metrics` (OpenMetrics text).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokenfab_core::control::ControlStats;

pub struct Metrics {
    registry: Registry,
    pub batches_submitted: Counter,
    pub commits: Counter,
    pub commit_seconds: Histogram,
    results_recorded: Gauge,
    duplicates_dropped: Gauge,
    leases_granted: Gauge,
    leases_expired: Gauge,
    requests_retried: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tokenfab_control");
        let m = Metrics {
            batches_submitted: Counter::default(),
            commits: Counter::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            results_recorded: Gauge::default(),
            duplicates_dropped: Gauge::default(),
            leases_granted: Gauge::default(),
            leases_expired: Gauge::default(),
            requests_retried: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "batches_submitted",
            "Batches accepted (durable)",
            m.batches_submitted.clone(),
        );
        registry.register(
            "store_commits",
            "Durable commits (one per round of commands)",
            m.commits.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Time to make one round durable",
            m.commit_seconds.clone(),
        );
        registry.register(
            "results_recorded",
            "Results recorded exactly once since start",
            m.results_recorded.clone(),
        );
        registry.register(
            "duplicates_dropped",
            "Results dropped because the request already had one",
            m.duplicates_dropped.clone(),
        );
        registry.register(
            "leases_granted",
            "Work units leased to agents",
            m.leases_granted.clone(),
        );
        registry.register(
            "leases_expired",
            "Work units whose lease expired (agent lost)",
            m.leases_expired.clone(),
        );
        registry.register(
            "requests_retried",
            "Requests put back in the queue for another try",
            m.requests_retried.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn observe_core(&self, s: &ControlStats) {
        self.results_recorded.set(s.results_recorded as i64);
        self.duplicates_dropped.set(s.duplicates_dropped as i64);
        self.leases_granted.set(s.leases_granted as i64);
        self.leases_expired.set(s.leases_expired as i64);
        self.requests_retried.set(s.requests_retried as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
