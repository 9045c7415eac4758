//! Prometheus metrics of the control plane, served on `/metrics` (OpenMetrics text).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use tokenfab_core::TenantId;
use tokenfab_core::control::{ControlStats, TenantUsage};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    model: String,
    accelerator: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    node: String,
    replica: String,
    model: String,
}

type PerReplica = Family<ReplicaLabel, Gauge<f64, AtomicU64>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabel {
    backend: String,
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    model: String,
    class: String,
}

/// A counter that mirrors a running total kept elsewhere (the core's statistics, which
/// start again from zero when the core is rebuilt after a failed commit): it advances by
/// each rise of the total, and by the whole total after such a restart, so it never goes
/// down and Prometheus's `rate()` stays right.
#[derive(Default)]
struct Mirrored {
    counter: Counter,
    last: AtomicU64,
}

impl Mirrored {
    fn set_total(&self, total: u64) {
        let last = self.last.swap(total, std::sync::atomic::Ordering::Relaxed);
        self.counter.inc_by(if total >= last { total - last } else { total });
    }
}

// A tenant's metered usage only grows (it is restored from the store when the core is
// rebuilt): its counters follow it with `advance`.
use tokenfab_metrics::advance_f64 as advance;

type PerPool = Family<PoolLabel, Gauge<f64, AtomicU64>>;
type PerClass = Family<ClassLabel, Gauge<f64, AtomicU64>>;

/// A per-tenant running total (tokens, requests, joules, dollars): a counter.
type PerTenant = Family<TenantLabel, Counter<f64, AtomicU64>>;
type PerReplicaCount = Family<ReplicaLabel, Counter>;

pub struct Metrics {
    registry: Registry,
    pub batches_submitted: Counter,
    pub commits: Counter,
    pub commit_seconds: Histogram,
    pub store_failures: Counter,
    pub uploads_in_progress: Gauge,
    pub uploads_refused: Counter,
    store_free_bytes: Gauge,
    storage_low: Gauge,
    store_info: Family<StoreLabel, Gauge>,
    store_log_position: Gauge,
    results_not_leased: Mirrored,
    batches_deleted: Mirrored,
    results_recorded: Mirrored,
    duplicates_dropped: Mirrored,
    leases_granted: Mirrored,
    leases_expired: Mirrored,
    requests_retried: Mirrored,
    nodes_forgotten: Mirrored,
    tenant_output_tokens: PerTenant,
    tenant_prompt_tokens: PerTenant,
    tenant_requests: PerTenant,
    tenant_joules: PerTenant,
    tenant_cost_usd: PerTenant,
    tenant_idle_joules: PerTenant,
    idle_unallocated_joules: Counter<f64, AtomicU64>,
    sla_committed: PerPool,
    sla_measured: PerPool,
    sla_tokens_per_joule: PerPool,
    sla_cost_per_million: PerPool,
    sla_attainment: PerClass,
    sla_completion_p99: PerClass,
    replica_window: PerReplica,
    replica_power_limit: PerReplica,
    replica_owed: PerReplica,
    replica_measured: PerReplica,
    replica_objective: PerReplica,
    replica_active: PerReplica,
    replica_tuner_moves: PerReplicaCount,
    replica_time_correction: PerReplica,
    replica_power_correction: PerReplica,
    replica_correction_uncertainty: PerReplica,
    replica_model_error: PerReplica,
    free_devices: Gauge,
    stranded_devices: Gauge,
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
            store_failures: Counter::default(),
            uploads_in_progress: Gauge::default(),
            uploads_refused: Counter::default(),
            store_free_bytes: Gauge::default(),
            storage_low: Gauge::default(),
            store_info: Family::default(),
            store_log_position: Gauge::default(),
            results_not_leased: Mirrored::default(),
            batches_deleted: Mirrored::default(),
            results_recorded: Mirrored::default(),
            duplicates_dropped: Mirrored::default(),
            leases_granted: Mirrored::default(),
            leases_expired: Mirrored::default(),
            requests_retried: Mirrored::default(),
            nodes_forgotten: Mirrored::default(),
            tenant_output_tokens: PerTenant::default(),
            tenant_prompt_tokens: PerTenant::default(),
            tenant_requests: PerTenant::default(),
            tenant_joules: PerTenant::default(),
            tenant_cost_usd: PerTenant::default(),
            tenant_idle_joules: PerTenant::default(),
            idle_unallocated_joules: Counter::default(),
            sla_committed: PerPool::default(),
            sla_measured: PerPool::default(),
            sla_tokens_per_joule: PerPool::default(),
            sla_cost_per_million: PerPool::default(),
            sla_attainment: PerClass::default(),
            sla_completion_p99: PerClass::default(),
            replica_window: PerReplica::default(),
            replica_power_limit: PerReplica::default(),
            replica_owed: PerReplica::default(),
            replica_measured: PerReplica::default(),
            replica_objective: PerReplica::default(),
            replica_active: PerReplica::default(),
            replica_tuner_moves: PerReplicaCount::default(),
            replica_time_correction: PerReplica::default(),
            replica_power_correction: PerReplica::default(),
            replica_correction_uncertainty: PerReplica::default(),
            replica_model_error: PerReplica::default(),
            free_devices: Gauge::default(),
            stranded_devices: Gauge::default(),
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
            "store_failures",
            "Commits that failed (the store was reopened and the state rebuilt from what is durable)",
            m.store_failures.clone(),
        );
        registry.register(
            "uploads_in_progress",
            "Batch input files being received or parsed now",
            m.uploads_in_progress.clone(),
        );
        registry.register(
            "uploads_refused",
            "Uploads refused because too many were in progress",
            m.uploads_refused.clone(),
        );
        registry.register(
            "store_free_bytes",
            "Free space where the store writes, bytes",
            m.store_free_bytes.clone(),
        );
        registry.register(
            "storage_low",
            "1 while new batches are refused for lack of disk space",
            m.storage_low.clone(),
        );
        registry.register(
            "store_info",
            "1, labelled with the store's backend (embedded or etcd) and, replicated, this replica's name (the elected one: only it serves)",
            m.store_info.clone(),
        );
        registry.register(
            "store_log_position",
            "The last entry of the replicated log this replica wrote or applied (etcd backend; 0 otherwise)",
            m.store_log_position.clone(),
        );
        registry.register(
            "results_not_leased",
            "Results refused because the reporting node held no lease on the request",
            m.results_not_leased.counter.clone(),
        );
        registry.register(
            "batches_deleted",
            "Batches deleted (retention ended, or deleted by their tenant)",
            m.batches_deleted.counter.clone(),
        );
        registry.register(
            "results_recorded",
            "Results recorded exactly once since start",
            m.results_recorded.counter.clone(),
        );
        registry.register(
            "duplicates_dropped",
            "Results dropped because the request already had one",
            m.duplicates_dropped.counter.clone(),
        );
        registry.register(
            "leases_granted",
            "Work units leased to agents",
            m.leases_granted.counter.clone(),
        );
        registry.register(
            "leases_expired",
            "Work units whose lease expired (agent lost)",
            m.leases_expired.counter.clone(),
        );
        registry.register(
            "nodes_forgotten",
            "Nodes forgotten because their agent stopped heartbeating for three lease lifetimes (stopped, drained or lost); their replicas no longer count as capacity",
            m.nodes_forgotten.counter.clone(),
        );
        registry.register(
            "requests_retried",
            "Requests put back in the queue for another try",
            m.requests_retried.counter.clone(),
        );
        for (name, help, family) in [
            (
                "tenant_output_tokens",
                "Output (completion) tokens of each tenant's recorded results, all batches",
                &m.tenant_output_tokens,
            ),
            (
                "tenant_prompt_tokens",
                "Prompt tokens of each tenant's recorded results, all batches",
                &m.tenant_prompt_tokens,
            ),
            (
                "tenant_requests",
                "Each tenant's requests with a recorded result (completed or failed)",
                &m.tenant_requests,
            ),
            (
                "tenant_energy_joules",
                "Device energy attributed to each tenant's results, joules",
                &m.tenant_joules,
            ),
            (
                "tenant_cost_usd",
                "Cost of each tenant's results, US dollars",
                &m.tenant_cost_usd,
            ),
            (
                "tenant_idle_energy_joules",
                "Each tenant's share of idle device energy, joules (shared by attributed energy over the SLA window)",
                &m.tenant_idle_joules,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        for (name, help, family) in [
            (
                "replica_window",
                "Concurrency window (requests in flight = batch size) of each replica",
                &m.replica_window,
            ),
            (
                "replica_power_limit_watts",
                "Power limit per device the agent set on each replica",
                &m.replica_power_limit,
            ),
            (
                "replica_owed_output_tokens_per_second",
                "Output tokens/s each replica owes to deadlines (its share of its model's required rate)",
                &m.replica_owed,
            ),
            (
                "replica_measured_output_tokens_per_second",
                "Output tokens/s the replica's tuner measured at its current point",
                &m.replica_measured,
            ),
            (
                "replica_tuner_objective",
                "The tuner's objective (e.g. output tokens/J) measured at the current point",
                &m.replica_objective,
            ),
            (
                "replica_active",
                "1 when placement lets the replica take work, 0 when it is parked",
                &m.replica_active,
            ),
            (
                "replica_step_time_correction_ratio",
                "Measured over believed step time of each replica (online recalibration; 1.3 = 30% slower than its profile or the performance model says)",
                &m.replica_time_correction,
            ),
            (
                "replica_power_correction_ratio",
                "Measured over believed device power of each replica (online recalibration)",
                &m.replica_power_correction,
            ),
            (
                "replica_correction_uncertainty_ratio",
                "Relative standard error of the step-time correction (the assumed prior error before any measurement); capacity estimates count on that much less",
                &m.replica_correction_uncertainty,
            ),
            (
                "replica_model_error_ratio",
                "How far each replica's corrected belief was from the throughput it measured in its last interval (relative)",
                &m.replica_model_error,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "replica_tuner_moves",
            "Knob changes (window or power limit) each replica's tuner made since its agent started",
            m.replica_tuner_moves.clone(),
        );
        registry.register(
            "free_devices",
            "Registered devices no replica occupies",
            m.free_devices.clone(),
        );
        registry.register(
            "stranded_devices",
            "Free devices no served model can use (no free aligned group in their high-bandwidth domain fits one): fragmentation",
            m.stranded_devices.clone(),
        );
        registry.register(
            "idle_unallocated_energy_joules",
            "Idle device energy reported while no tenant had results in the SLA window: charged to nobody",
            m.idle_unallocated_joules.clone(),
        );
        for (name, help, family) in [
            (
                "sla_committed_output_tokens_per_second",
                "Committed output tokens/s per model and accelerator (the ThroughputSLA document)",
                &m.sla_committed,
            ),
            (
                "sla_measured_output_tokens_per_second",
                "Measured output tokens/s over the SLA window per model and accelerator",
                &m.sla_measured,
            ),
            (
                "sla_output_tokens_per_joule",
                "Output tokens per attributed joule over the SLA window",
                &m.sla_tokens_per_joule,
            ),
            (
                "sla_cost_per_million_output_tokens_usd",
                "Cost per million output tokens over the SLA window, US dollars",
                &m.sla_cost_per_million,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "sla_attainment_ratio",
            "Share of batches that ended in the SLA window that completed by their deadline",
            m.sla_attainment.clone(),
        );
        registry.register(
            "sla_completion_p99_seconds",
            "p99 batch completion time over the SLA window, seconds",
            m.sla_completion_p99.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The SLA document's figures as gauges.
    pub fn observe_sla(&self, doc: &tokenfab_core::sla::ThroughputSla) {
        // Series for pools and classes no longer in the window disappear.
        for f in [
            &self.sla_committed,
            &self.sla_measured,
            &self.sla_tokens_per_joule,
            &self.sla_cost_per_million,
        ] {
            f.clear();
        }
        self.sla_attainment.clear();
        self.sla_completion_p99.clear();
        for p in &doc.pools {
            let l = PoolLabel {
                model: p.model.clone(),
                accelerator: p.accelerator.clone(),
            };
            self.sla_committed
                .get_or_create(&l)
                .set(p.committed_output_tokens_per_second);
            self.sla_measured
                .get_or_create(&l)
                .set(p.measured_output_tokens_per_second);
            self.sla_tokens_per_joule
                .get_or_create(&l)
                .set(p.output_tokens_per_joule);
            self.sla_cost_per_million
                .get_or_create(&l)
                .set(p.cost_per_million_output_tokens_usd);
        }
        for c in &doc.classes {
            let l = ClassLabel {
                model: c.model.clone(),
                class: c.class.clone(),
            };
            self.sla_attainment.get_or_create(&l).set(c.attainment);
            self.sla_completion_p99.get_or_create(&l).set(c.completion_seconds.p99);
        }
    }

    /// Each replica's knobs and its tuner's view, and how fragmented the free devices are.
    pub fn observe_replicas(
        &self,
        replicas: &[tokenfab_core::control::ReplicaView],
        fragmentation: tokenfab_core::placement::Fragmentation,
    ) {
        self.free_devices.set(i64::from(fragmentation.free));
        self.stranded_devices.set(i64::from(fragmentation.stranded));
        for f in [
            &self.replica_window,
            &self.replica_power_limit,
            &self.replica_owed,
            &self.replica_measured,
            &self.replica_objective,
            &self.replica_active,
            &self.replica_time_correction,
            &self.replica_power_correction,
            &self.replica_correction_uncertainty,
            &self.replica_model_error,
        ] {
            f.clear();
        }
        self.replica_tuner_moves.clear();
        for r in replicas {
            let l = ReplicaLabel {
                node: r.node.clone(),
                replica: r.replica.clone(),
                model: r.model.clone(),
            };
            self.replica_window.get_or_create(&l).set(f64::from(r.window));
            if let Some(p) = r.power_limit_w {
                self.replica_power_limit.get_or_create(&l).set(p);
            }
            self.replica_owed.get_or_create(&l).set(r.owed_tokens_per_s);
            self.replica_measured.get_or_create(&l).set(r.measured_tokens_per_s);
            self.replica_objective.get_or_create(&l).set(r.objective_value);
            self.replica_active
                .get_or_create(&l)
                .set(if r.active { 1.0 } else { 0.0 });
            self.replica_tuner_moves.get_or_create(&l).inc_by(r.tuner_moves);
            if let Some(c) = &r.calibration {
                self.replica_time_correction.get_or_create(&l).set(c.time);
                self.replica_power_correction.get_or_create(&l).set(c.power);
                self.replica_correction_uncertainty.get_or_create(&l).set(c.uncertainty);
                if let Some(e) = c.model_error {
                    self.replica_model_error.get_or_create(&l).set(e);
                }
            }
        }
    }

    /// Per-tenant metering (token accounting) from the core's totals, and the idle energy
    /// not yet charged to any tenant.
    pub fn observe_tenants(&self, totals: &BTreeMap<TenantId, TenantUsage>, idle_unallocated_j: f64) {
        advance(&self.idle_unallocated_joules, idle_unallocated_j);
        for (tenant, t) in totals {
            let label = TenantLabel {
                tenant: tenant.to_string(),
            };
            advance(
                &self.tenant_output_tokens.get_or_create(&label),
                t.usage.completion_tokens as f64,
            );
            advance(
                &self.tenant_prompt_tokens.get_or_create(&label),
                t.usage.prompt_tokens as f64,
            );
            advance(
                &self.tenant_requests.get_or_create(&label),
                (t.requests_completed + t.requests_failed) as f64,
            );
            advance(&self.tenant_joules.get_or_create(&label), t.usage.joules);
            advance(&self.tenant_cost_usd.get_or_create(&label), t.usage.cost_usd);
            advance(&self.tenant_idle_joules.get_or_create(&label), t.idle_joules);
        }
    }

    /// Free space for the store, and whether new batches are refused for lack of it.
    pub fn observe_store(&self, info: &tokenfab_store::StoreInfo) {
        self.store_info
            .get_or_create(&StoreLabel {
                backend: info.backend.to_string(),
                replica: info.replica.clone().unwrap_or_default(),
            })
            .set(1);
        self.store_log_position
            .set(i64::try_from(info.log_position.unwrap_or(0)).unwrap_or(i64::MAX));
    }

    pub fn observe_disk(&self, free: Option<u64>, low: bool) {
        if let Some(f) = free {
            self.store_free_bytes.set(i64::try_from(f).unwrap_or(i64::MAX));
        }
        self.storage_low.set(i64::from(low));
    }

    pub fn observe_core(&self, s: &ControlStats) {
        self.results_not_leased.set_total(s.results_not_leased);
        self.batches_deleted.set_total(s.batches_deleted);
        self.results_recorded.set_total(s.results_recorded);
        self.duplicates_dropped.set_total(s.duplicates_dropped);
        self.leases_granted.set_total(s.leases_granted);
        self.leases_expired.set_total(s.leases_expired);
        self.requests_retried.set_total(s.requests_retried);
        self.nodes_forgotten.set_total(s.nodes_forgotten);
    }

    /// The `/metrics` response to a request with `headers` (OpenMetrics or the classic
    /// text format, as its `Accept` header asks).
    pub fn respond(&self, headers: &axum::http::HeaderMap) -> axum::response::Response {
        tokenfab_metrics::respond(&self.registry, headers)
    }
}
