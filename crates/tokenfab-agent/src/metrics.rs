//! The agent's own Prometheus metrics and health, served on `--metrics-listen`:
//! `/metrics` (OpenMetrics text), `/healthz` (the process is alive) and `/readyz`
//! (registered with the control plane).
//!
//! Each node reports what only it sees: its engine replicas' requests, tokens, latency and
//! energy books, its devices' power and energy counters, and how its calls to the control
//! plane fare. The control plane's `/metrics` has the cluster's view.

use crate::devices::DeviceReading;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokenfab_core::agent::ReplicaStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    call: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// The agent's calls to the control plane, as labelled in
/// `tokenfab_agent_control_call_failures_total`.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    Register,
    Lease,
    Report,
    Heartbeat,
}

impl Call {
    fn label(self) -> &'static str {
        match self {
            Call::Register => "register",
            Call::Lease => "lease",
            Call::Report => "report",
            Call::Heartbeat => "heartbeat",
        }
    }
}

/// One replica's series, made once so that the hot path (one observation per engine
/// call) does not build label sets.
struct ReplicaSeries {
    window: Gauge,
    in_flight: Gauge,
    requests: Counter,
    errors: Counter,
    prompt_tokens: Counter,
    output_tokens: Counter,
    attributed_joules: FloatCounter,
    idle_joules: FloatCounter,
    power_limit: FloatGauge,
    engine_seconds: Histogram,
    reachable: Gauge,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    registered: Gauge,
    replicas: Vec<ReplicaSeries>,
    device_power: Family<DeviceLabel, FloatGauge>,
    device_power_limit: Family<DeviceLabel, FloatGauge>,
    device_energy: Family<DeviceLabel, FloatCounter>,
    device_utilization: Family<DeviceLabel, FloatGauge>,
    device_temperature: Family<DeviceLabel, FloatGauge>,
    device_read_failures: Counter,
    call_failures: Family<CallLabel, Counter>,
    ready: AtomicBool,
}

use tokenfab_metrics::{advance, advance_f64};

impl AgentMetrics {
    /// Metrics for an agent driving `replicas` (id, model), in the agent's order.
    pub fn new(replicas: &[(String, String)]) -> AgentMetrics {
        let mut registry = Registry::with_prefix("tokenfab_agent");
        let registered = Gauge::default();
        registry.register(
            "registered",
            "1 while the agent is registered with the control plane (it leases work only then)",
            registered.clone(),
        );
        let window = Family::<ReplicaLabel, Gauge>::default();
        let in_flight = Family::<ReplicaLabel, Gauge>::default();
        let requests = Family::<ReplicaLabel, Counter>::default();
        let errors = Family::<ReplicaLabel, Counter>::default();
        let prompt_tokens = Family::<ReplicaLabel, Counter>::default();
        let output_tokens = Family::<ReplicaLabel, Counter>::default();
        let attributed = Family::<ReplicaLabel, FloatCounter>::default();
        let idle = Family::<ReplicaLabel, FloatCounter>::default();
        let power_limit = Family::<ReplicaLabel, FloatGauge>::default();
        let reachable = Family::<ReplicaLabel, Gauge>::default();
        registry.register(
            "replica_engine_reachable",
            "1 while each replica's engine answers the agent's probes (it takes work and counts as capacity only then)",
            reachable.clone(),
        );
        let engine_seconds = Family::<ReplicaLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.01, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "replica_window",
            "Requests each engine replica may have in flight (the batch size the tuner sets)",
            window.clone(),
        );
        registry.register(
            "replica_in_flight",
            "Requests in flight on each engine replica now",
            in_flight.clone(),
        );
        registry.register(
            "replica_requests",
            "Engine calls of each replica that returned an answer (a response, successful or not, that is final)",
            requests.clone(),
        );
        registry.register(
            "replica_request_errors",
            "Engine calls of each replica that failed and were put back for another try (unreachable engine, timeout, 5xx)",
            errors.clone(),
        );
        registry.register(
            "replica_prompt_tokens",
            "Prompt tokens each replica processed, as its engine reported them",
            prompt_tokens.clone(),
        );
        registry.register(
            "replica_output_tokens",
            "Output (completion) tokens each replica generated, as its engine reported them",
            output_tokens.clone(),
        );
        registry.register(
            "replica_attributed_energy_joules",
            "Device energy the agent attributed to each replica's requests, joules",
            attributed.clone(),
        );
        registry.register(
            "replica_idle_energy_joules",
            "Device energy of each replica while it ran no request, joules",
            idle.clone(),
        );
        registry.register(
            "replica_power_limit_watts",
            "Power limit per device the agent set on each replica (absent until it sets one)",
            power_limit.clone(),
        );
        registry.register(
            "engine_request_duration_seconds",
            "Time from sending a request to its engine to the engine's answer, per replica",
            engine_seconds.clone(),
        );
        let series = replicas
            .iter()
            .map(|(replica, model)| {
                let l = ReplicaLabel {
                    replica: replica.clone(),
                    model: model.clone(),
                };
                ReplicaSeries {
                    window: window.get_or_create(&l).clone(),
                    in_flight: in_flight.get_or_create(&l).clone(),
                    requests: requests.get_or_create(&l).clone(),
                    errors: errors.get_or_create(&l).clone(),
                    prompt_tokens: prompt_tokens.get_or_create(&l).clone(),
                    output_tokens: output_tokens.get_or_create(&l).clone(),
                    attributed_joules: attributed.get_or_create(&l).clone(),
                    idle_joules: idle.get_or_create(&l).clone(),
                    power_limit: power_limit.get_or_create(&l).clone(),
                    engine_seconds: engine_seconds.get_or_create(&l).clone(),
                    reachable: {
                        let g = reachable.get_or_create(&l).clone();
                        g.set(1);
                        g
                    },
                }
            })
            .collect();
        let device_power = Family::<DeviceLabel, FloatGauge>::default();
        let device_power_limit = Family::<DeviceLabel, FloatGauge>::default();
        let device_energy = Family::<DeviceLabel, FloatCounter>::default();
        let device_utilization = Family::<DeviceLabel, FloatGauge>::default();
        let device_temperature = Family::<DeviceLabel, FloatGauge>::default();
        let device_read_failures = Counter::default();
        let call_failures = Family::<CallLabel, Counter>::default();
        registry.register(
            "device_power_watts",
            "Power draw of each device at the last reading, watts",
            device_power.clone(),
        );
        registry.register(
            "device_power_limit_watts",
            "Power limit of each device at the last reading, watts",
            device_power_limit.clone(),
        );
        registry.register(
            "device_energy_joules",
            "Energy each device used, from its energy counter, joules (counted from the agent's first reading)",
            device_energy.clone(),
        );
        registry.register(
            "device_utilization_ratio",
            "Share of the last sample period a kernel ran on each device (NVML; absent where the device does not say)",
            device_utilization.clone(),
        );
        registry.register(
            "device_temperature_celsius",
            "Temperature of each device (NVML; absent where the device does not say)",
            device_temperature.clone(),
        );
        registry.register(
            "device_read_failures",
            "Device readings that failed (the books then miss that interval's energy)",
            device_read_failures.clone(),
        );
        registry.register(
            "control_call_failures",
            "Calls to the control plane that failed and are retried, by call",
            call_failures.clone(),
        );
        for call in [Call::Register, Call::Lease, Call::Report, Call::Heartbeat] {
            // Every call's series exists from the start, at zero.
            drop(call_failures.get_or_create(&CallLabel { call: call.label() }));
        }
        AgentMetrics {
            registry,
            registered,
            replicas: series,
            device_power,
            device_power_limit,
            device_energy,
            device_utilization,
            device_temperature,
            device_read_failures,
            call_failures,
            ready: AtomicBool::new(false),
        }
    }

    /// Whether the agent is registered with the control plane.
    pub fn set_registered(&self, registered: bool) {
        self.registered.set(i64::from(registered));
        self.ready.store(registered, Ordering::Relaxed);
    }

    pub fn call_failed(&self, call: Call) {
        self.call_failures
            .get_or_create(&CallLabel { call: call.label() })
            .inc();
    }

    pub fn device_read_failed(&self) {
        self.device_read_failures.inc();
    }

    /// Whether replica `replica`'s engine answers probes.
    pub fn set_reachable(&self, replica: usize, reachable: bool) {
        if let Some(s) = self.replicas.get(replica) {
            s.reachable.set(i64::from(reachable));
        }
    }

    /// One engine call of replica `replica` took `seconds`.
    pub fn engine_call(&self, replica: usize, seconds: f64) {
        if let Some(s) = self.replicas.get(replica) {
            s.engine_seconds.observe(seconds);
        }
    }

    /// The replicas' running totals and knobs, from the agent core (in the agent's order).
    pub fn observe_replicas<'a>(&self, stats: impl Iterator<Item = (ReplicaStats, Option<f64>)> + 'a) {
        for (s, (st, power_limit)) in self.replicas.iter().zip(stats) {
            s.window.set(i64::from(st.window));
            s.in_flight.set(i64::from(st.in_flight));
            advance(&s.requests, st.requests_done);
            advance(&s.errors, st.errors);
            advance(&s.prompt_tokens, st.prompt_tokens);
            advance(&s.output_tokens, st.completion_tokens);
            advance_f64(&s.attributed_joules, st.attributed_j);
            advance_f64(&s.idle_joules, st.idle_j);
            if let Some(w) = power_limit {
                s.power_limit.set(w);
            }
        }
    }

    /// A reading of the node's devices. The energy counter is exposed as the energy used
    /// since the agent's first reading: `first` holds each device's counter then.
    pub fn observe_devices(&self, readings: &[DeviceReading], first: &mut Vec<(u32, f64)>) {
        for d in readings {
            let l = DeviceLabel {
                device: d.index.to_string(),
            };
            self.device_power.get_or_create(&l).set(d.power_w);
            self.device_power_limit.get_or_create(&l).set(d.power_limit_w);
            if let Some(u) = d.utilization {
                self.device_utilization.get_or_create(&l).set(u);
            }
            if let Some(t) = d.temperature_c {
                self.device_temperature.get_or_create(&l).set(t);
            }
            let start = match first.iter().find(|(i, _)| *i == d.index) {
                Some((_, e)) => *e,
                None => {
                    first.push((d.index, d.energy_j));
                    d.energy_j
                }
            };
            advance_f64(&self.device_energy.get_or_create(&l), d.energy_j - start);
        }
    }

    /// The metrics in the OpenMetrics text format.
    #[cfg(test)]
    fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The agent's HTTP routes: `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Arc<AgentMetrics>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(serve_metrics))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(ready))
        .with_state(metrics)
}

async fn serve_metrics(
    axum::extract::State(m): axum::extract::State<Arc<AgentMetrics>>,
    headers: axum::http::HeaderMap,
) -> Response {
    tokenfab_metrics::respond(&m.registry, &headers)
}

async fn ready(axum::extract::State(m): axum::extract::State<Arc<AgentMetrics>>) -> Response {
    if m.ready.load(Ordering::Relaxed) {
        "ready: registered with the control plane\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not registered with the control plane yet (see the agent's log for why)\n",
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(done: u64, tokens: u64, joules: f64) -> ReplicaStats {
        ReplicaStats {
            window: 8,
            in_flight: 3,
            requests_done: done,
            prompt_tokens: 2 * tokens,
            completion_tokens: tokens,
            errors: 1,
            latency_sum_s: 0.0,
            attributed_j: joules,
            idle_j: 1.0,
        }
    }

    #[test]
    fn running_totals_become_counters_that_never_go_down() {
        let m = AgentMetrics::new(&[("r0".into(), "llama".into())]);
        m.observe_replicas([(stats(10, 100, 5.0), Some(300.0))].into_iter());
        m.observe_replicas([(stats(25, 250, 12.5), None)].into_iter());
        // A smaller total (it cannot happen in the core; the counter must not follow it).
        m.observe_replicas([(stats(20, 200, 10.0), None)].into_iter());
        m.engine_call(0, 0.5);
        let text = m.encode();
        for line in [
            "tokenfab_agent_replica_requests_total{replica=\"r0\",model=\"llama\"} 25",
            "tokenfab_agent_replica_output_tokens_total{replica=\"r0\",model=\"llama\"} 250",
            "tokenfab_agent_replica_prompt_tokens_total{replica=\"r0\",model=\"llama\"} 500",
            "tokenfab_agent_replica_attributed_energy_joules_total{replica=\"r0\",model=\"llama\"} 12.5",
            "tokenfab_agent_replica_in_flight{replica=\"r0\",model=\"llama\"} 3",
            "tokenfab_agent_replica_power_limit_watts{replica=\"r0\",model=\"llama\"} 300.0",
            "tokenfab_agent_engine_request_duration_seconds_count{replica=\"r0\",model=\"llama\"} 1",
            "tokenfab_agent_control_call_failures_total{call=\"lease\"} 0",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }

    #[test]
    fn device_energy_counts_from_the_first_reading() {
        let m = AgentMetrics::new(&[]);
        let mut first = Vec::new();
        let reading = |energy_j| DeviceReading {
            index: 1,
            energy_j,
            power_w: 250.0,
            power_limit_w: 700.0,
            clock_s: 0.0,
            engine_tokens: None,
            utilization: Some(0.97),
            temperature_c: Some(61.0),
        };
        m.observe_devices(&[reading(1.0e6)], &mut first);
        m.observe_devices(&[reading(1.0e6 + 420.0)], &mut first);
        let text = m.encode();
        assert!(
            text.contains("tokenfab_agent_device_energy_joules_total{device=\"1\"} 420.0"),
            "{text}"
        );
        assert!(
            text.contains("tokenfab_agent_device_power_watts{device=\"1\"} 250.0"),
            "{text}"
        );
        assert!(
            text.contains("tokenfab_agent_device_utilization_ratio{device=\"1\"} 0.97"),
            "{text}"
        );
        assert!(
            text.contains("tokenfab_agent_device_temperature_celsius{device=\"1\"} 61.0"),
            "{text}"
        );
    }
}
