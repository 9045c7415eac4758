//! The node agent's brain: what to lease, where to send each request, when to report,
//! heartbeat and sample devices, and how device energy is attributed to requests.
//!
//! The shell (tokenfab-agent) performs each [`AgentAction`] and feeds the outcome back
//! through the matching method. Request bodies never enter the core: the shell keeps them
//! from the lease reply and looks them up on [`AgentAction::Dispatch`].
//!
//! # Energy attribution
//!
//! Each replica's devices are sampled periodically (energy counter and device clock).
//! The energy and device-time of an interval go to the requests that finished on that
//! replica in the interval, in proportion to their tokens (prompt + completion). An
//! interval in which requests ran but none finished carries its energy forward to the
//! next one that has finishers; an interval with no request in flight is idle energy,
//! reported in telemetry and not charged to any request. So attributed plus idle energy
//! equals the measured energy.

use crate::control::{HeartbeatReply, LeaseGrant, LeasedItem, ReportedOutcome, ReportedResult};
use crate::durable::Outcome;
use crate::ids::{ModelId, ReplicaId, RequestRef, WorkUnitId};
use crate::protocol::CallFailure;
use crate::time::Timestamp;
use crate::tuner::{Observation, ReplicaTuner, TunerMode, TunerStatus};
use crate::usage::Usage;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

mod dispatch;
mod energy;

use energy::Sampler;

/// Settings of the agent core.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgentConfig {
    /// Most requests asked for in one lease.
    pub lease_batch: u32,
    /// Requests kept queued locally beyond free window slots, as a fraction of the window.
    pub prefetch: f64,
    /// Most results in one report.
    pub report_max: usize,
    /// Most response bytes in one report (well under the gRPC message limit).
    pub report_max_bytes: usize,
    /// Longest a ready result waits before a report is sent.
    pub report_delay: Duration,
    /// How often device energy counters are read.
    pub sample_interval: Duration,
    /// While every replica is idle, how often the devices are still read so that idle
    /// energy reaches the books (and the control plane) as it accrues; zero: only when
    /// work starts again.
    pub idle_sample_interval: Duration,
    /// Heartbeat period until the control plane says otherwise.
    pub heartbeat_interval: Duration,
    /// Wait after a lease came back empty.
    pub empty_lease_backoff: Duration,
    /// How long the control plane may hold a lease call open while it has no work (a long
    /// poll: work that arrives meanwhile is handed out at once). Zero: answer at once.
    pub lease_wait: Duration,
    /// Wait after a failed call to the control plane.
    pub error_backoff: Duration,
    /// First wait before sending work to a replica that failed; doubles up to 30 s.
    pub replica_backoff: Duration,
    /// The batch-size and power tuner of each replica (see [`crate::tuner`]).
    pub tuner: crate::tuner::TunerConfig,
    /// Which replica gets the next request.
    pub routing: Routing,
    /// Measured engine profiles: the curve the tuner believes for replicas they describe
    /// (the performance model for the others).
    #[serde(default)]
    pub profiles: crate::profile::Profiles,
    /// Each replica's belief corrected online from its telemetry.
    #[serde(default)]
    pub recalibration: crate::recal::RecalConfig,
}

/// How far into its model's queue a replica looks for a request whose prompt prefix it
/// holds (or that has none) before it takes the oldest anyway.
pub const AFFINITY_LOOKAHEAD: usize = 64;

/// Prefixes whose replica the agent remembers (forgotten all at once beyond this).
const MAX_PREFIX_HOMES: usize = 65_536;

/// How the agent picks the replica for the next request (among replicas of the model with
/// room in their window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The replica with the most free room relative to its window takes the next request,
    /// but requests sharing a prompt prefix stay with the replica that took the first of
    /// them (whose prefix cache holds it): a replica skips requests whose prefix belongs to
    /// another replica, looking up to [`AFFINITY_LOOKAHEAD`] deep, and takes the oldest
    /// request when it finds none of its own.
    PrefixAffinity,
    /// The replica with the most free room relative to its window.
    LeastLoaded,
    /// Each replica in turn (what a plain load balancer does).
    RoundRobin,
}

impl Default for AgentConfig {
    /// The default policies ([`crate::policy::Policies::default`]), no device prices.
    fn default() -> Self {
        crate::policy::Policies::default().agent_config(crate::policy::Prices::none())
    }
}

impl AgentConfig {
    /// The agent's mechanics at their defaults. The fields that come from policy hold
    /// placeholders here: [`crate::policy::Policies::agent_config`] sets them.
    pub(crate) fn mechanics() -> Self {
        AgentConfig {
            report_delay: Duration::ZERO,
            sample_interval: Duration::ZERO,
            heartbeat_interval: Duration::ZERO,
            empty_lease_backoff: Duration::ZERO,
            lease_wait: Duration::ZERO,
            tuner: crate::tuner::TunerConfig::mechanics(),
            routing: Routing::LeastLoaded,
            profiles: crate::profile::Profiles::default(),
            recalibration: crate::recal::RecalConfig::default(),
            lease_batch: 1024,
            prefetch: 1.0,
            report_max: 1024,
            report_max_bytes: 16 << 20,
            idle_sample_interval: Duration::from_secs(5),
            error_backoff: Duration::from_millis(500),
            replica_backoff: Duration::from_millis(500),
        }
    }
}

/// Where the agent stands with the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    /// A registration call is on its way.
    Registering,
    /// Not registered (a registration failed); the next one goes out at `retry_at`.
    Unregistered { retry_at: Timestamp },
    /// Registered: leases and reports flow, and a heartbeat is due at `heartbeat_at`.
    Registered { heartbeat_at: Timestamp },
}

/// Where the agent is in its life: serving, or closing its books on shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Taking work.
    Serving,
    /// Shut down: queued work released, running work finishing and being reported.
    Draining,
    /// The last device reading is on its way.
    Reading,
    /// The last reading is in: the last heartbeat is to be sent.
    Read,
    /// The last heartbeat (with the last reading's telemetry) is on its way.
    Reporting,
    /// Done: the agent may exit.
    Closed,
}

/// A device sample not back after this many sample intervals is given up.
const SAMPLE_GIVE_UP: u32 = 3;

/// One engine replica the agent drives.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaSpec {
    pub id: ReplicaId,
    pub model: ModelId,
    /// Devices the replica occupies (for device-seconds).
    pub devices: u32,
    /// Initial concurrency window (requests in flight).
    pub window: u32,
    /// The window never goes above this (the engine's own limit).
    pub max_concurrency: u32,
    /// The power limit range of the replica's devices, when the agent can set it.
    pub power: Option<PowerRange>,
    /// The accelerator class of the replica's devices, if known (for the performance
    /// model's advice).
    pub accelerator: Option<crate::ids::AcceleratorId>,
}

/// A settable power limit, per device.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PowerRange {
    pub min_w: f64,
    pub max_w: f64,
    /// The limit now.
    pub current_w: f64,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentAction {
    /// Send the node's registration; answer with `registered` or `register_failed`.
    Register,
    /// Ask for up to `max` requests of `model`, letting the control plane wait up to
    /// `wait` for work to arrive; answer with `lease_done`.
    Lease { model: ModelId, max: u32, wait: Duration },
    /// Send this request to replica `replica` (index into the specs); answer with `engine_done`.
    Dispatch {
        replica: usize,
        unit: WorkUnitId,
        item: LeasedItem,
    },
    /// Report these results; answer with `report_acked` or `report_failed`.
    /// The core keeps its own reference until the call is answered, so a failed report
    /// is sent again without the shell handing anything back.
    Report(std::sync::Arc<Vec<ReportedResult>>),
    /// Heartbeat with these held units; answer with `heartbeat_done`.
    Heartbeat { held: Vec<WorkUnitId> },
    /// Read every replica's device energy; answer with `device_sample`.
    SampleDevices,
    /// Give these leased requests back.
    Release { unit: WorkUnitId, items: Vec<RequestRef> },
    /// Set the power limit of every device of replica `replica` to `watts`; answer with
    /// `power_limit_done`.
    SetPowerLimit { replica: usize, watts: f64 },
    /// The tuner of replica `replica` changed its knobs (already applied to the window;
    /// the power limit follows as `SetPowerLimit`): for logs.
    Tuned {
        replica: usize,
        window: u32,
        power_limit_w: Option<f64>,
        reason: String,
    },
}

/// What an engine call returned.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum EngineReply {
    /// The engine answered with an HTTP response.
    Answered {
        status_code: u16,
        body: Vec<u8>,
        request_id: String,
        prompt_tokens: u64,
        completion_tokens: u64,
    },
    /// No usable answer: connection failed, timed out, or the engine was overloaded.
    Unreachable { code: String, message: String },
}

impl EngineReply {
    /// HTTP statuses that mean "try again later" rather than "this request is bad".
    pub fn is_retryable_status(status_code: u16) -> bool {
        matches!(status_code, 429 | 500 | 502 | 503 | 504)
    }
}

/// A reading of one replica's devices.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EnergyReading {
    /// Energy counter summed over the replica's devices, joules.
    pub energy_j: f64,
    /// The devices' clock, seconds (wall time for real devices, emulated time for
    /// emulated ones).
    pub clock_s: f64,
    /// The engine's counter of output tokens generated, if it has one (emulators and vLLM
    /// do); otherwise the tuner counts the tokens of finished requests.
    pub tokens: Option<u64>,
}

impl EnergyReading {
    /// One replica's reading from its devices' own (each device's energy counter, clock
    /// and engine token counter): the counters summed, the clock and token counter of the
    /// first device. `None` unless every one of its `devices` devices answered: a sum over
    /// some of them would book too little energy now and the rest as a jump later.
    pub fn of_devices(devices: usize, readings: &[EnergyReading]) -> Option<EnergyReading> {
        (!readings.is_empty() && readings.len() == devices).then(|| EnergyReading {
            energy_j: readings.iter().map(|d| d.energy_j).sum(),
            clock_s: readings[0].clock_s,
            tokens: readings[0].tokens,
        })
    }
}

/// Counters of one replica, for telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReplicaStats {
    pub window: u32,
    pub in_flight: u32,
    pub requests_done: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub errors: u64,
    /// Sum of engine-call latencies (dispatch to answer) of every finished call, seconds.
    pub latency_sum_s: f64,
    /// Energy attributed to requests, and idle energy, joules.
    pub attributed_j: f64,
    pub idle_j: f64,
}

#[derive(Debug, Clone)]
struct Replica {
    spec: ReplicaSpec,
    /// Index of the replica's model in `AgentCore::models`.
    model: usize,
    window: u32,
    in_flight: u32,
    healthy_at: Timestamp,
    backoff: Duration,
    stats: ReplicaStats,
    last_reading: Option<EnergyReading>,
    /// The first reading of the replica's devices: the books start there.
    first_reading: Option<EnergyReading>,
    carried_j: f64,
    carried_device_s: f64,
    /// Finished since the last sample, waiting for their energy share.
    finished: Vec<(ReportedResult, WorkUnitId)>,
    /// The replica's tuner (active mode).
    tuner: Option<crate::tuner::ReplicaTuner>,
    /// The power limit set on its devices, if the agent set one.
    power_limit_w: Option<f64>,
    /// A power-limit change is on its way (tuner decisions wait for it).
    setting_power: bool,
    /// Receives work (placement may park a replica: it then idles).
    active: bool,
    /// Its engine answers probes (see [`AgentCore::engine_probe`]).
    reachable: bool,
    /// Output tokens/s the control plane says the replica owes to deadlines.
    owed: f64,
    /// What the performance model recommends (advisory mode), refreshed now and then.
    advice: Option<crate::tuner::Advice>,
    advised_at: Timestamp,
    /// The replica's engine has a generated-token counter (its readings carry it).
    engine_counter: bool,
    /// What the replica believes about itself (its profile, or the performance model, if
    /// its accelerator is in the catalog), corrected by what it measured.
    perf: Option<crate::perf::ReplicaPerf>,
    /// The belief before correction, and its online recalibration ([`crate::recal`]).
    belief: Option<crate::perf::ReplicaPerf>,
    recal: crate::recal::Recalibrator,
    /// Output tokens at the last advice (advisory mode measures throughput between two).
    advice_tokens: u64,
    /// The performance model's values for the advice (see [`crate::tuner::AdviceGrid`]).
    advice_grid: crate::tuner::AdviceGrid,
}

/// Work and leasing of one model.
#[derive(Debug, Clone)]
struct ModelState {
    id: ModelId,
    queue: VecDeque<(WorkUnitId, LeasedItem)>,
    /// A lease call is in flight.
    leasing: bool,
    /// No lease before this time (after an empty or failed one).
    lease_retry_at: Option<Timestamp>,
}

/// A report on its way, and the unit of each of its results.
#[derive(Debug, Clone)]
struct Report {
    results: std::sync::Arc<Vec<ReportedResult>>,
    units: Vec<WorkUnitId>,
}

/// The agent's state machine.
#[derive(Debug, Clone)]
pub struct AgentCore {
    config: AgentConfig,
    replicas: Vec<Replica>,
    /// Per model the replicas serve (sorted by name): queued work and lease state.
    models: Vec<ModelState>,
    /// Where round-robin routing looks first.
    next_replica: usize,
    /// The replica each shared prefix was first sent to (prefix-affinity routing).
    prefix_home: BTreeMap<u64, usize>,
    /// When each in-flight request was dispatched (for its latency).
    dispatched_at: BTreeMap<RequestRef, Timestamp>,
    /// Open items per held unit (leased, not yet acknowledged or released).
    held: BTreeMap<WorkUnitId, u32>,
    ready: VecDeque<(ReportedResult, WorkUnitId, Timestamp)>,
    /// The report on its way: kept until acknowledged, to be sent again if it fails.
    reporting: Option<Report>,
    report_retry_at: Timestamp,
    session: Session,
    /// A heartbeat call is on its way (at most one at a time, the closing one included).
    heartbeat_in_flight: bool,
    /// Device readings: working, resting, or one on its way.
    sampler: Sampler,
    /// When to read the devices next while working.
    sample_at: Timestamp,
    /// When to read the devices next while resting.
    rest_sample_at: Timestamp,
    /// Serving, or shut down and closing the books once drained: a last reading, then a
    /// last heartbeat that carries it.
    closing: Closing,
    /// The latest time seen.
    now: Timestamp,
    actions: VecDeque<AgentAction>,
}

impl AgentCore {
    /// A new agent; its first action is to register.
    pub fn new(config: AgentConfig, replicas: Vec<ReplicaSpec>, now: Timestamp) -> Self {
        let names: BTreeSet<&ModelId> = replicas.iter().map(|r| &r.model).collect();
        let models: Vec<ModelState> = names
            .into_iter()
            .map(|id| ModelState {
                id: id.clone(),
                queue: VecDeque::new(),
                leasing: false,
                lease_retry_at: None,
            })
            .collect();
        let replicas = replicas
            .into_iter()
            .map(|spec| {
                let model = models.iter().position(|m| m.id == spec.model).expect("collected above");
                Replica::new(spec, model, &config, now)
            })
            .collect();
        let mut core = AgentCore {
            config,
            replicas,
            models,
            next_replica: 0,
            prefix_home: BTreeMap::new(),
            dispatched_at: BTreeMap::new(),
            held: BTreeMap::new(),
            ready: VecDeque::new(),
            reporting: None,
            report_retry_at: Timestamp::ZERO,
            session: Session::Registering,
            heartbeat_in_flight: false,
            sampler: Sampler::Working,
            sample_at: now,
            rest_sample_at: Timestamp::MAX,
            closing: Closing::Serving,
            now,
            actions: VecDeque::new(),
        };
        core.actions.push_back(AgentAction::Register);
        core.handle_timeout(now);
        core
    }

    pub fn replicas(&self) -> impl Iterator<Item = (&ReplicaSpec, ReplicaStats)> {
        self.replicas.iter().map(|r| {
            (
                &r.spec,
                ReplicaStats {
                    window: r.window,
                    in_flight: r.in_flight,
                    ..r.stats
                },
            )
        })
    }

    /// Units the agent holds (for heartbeats).
    pub fn held_units(&self) -> Vec<WorkUnitId> {
        self.held.keys().copied().collect()
    }

    /// Sets a replica's concurrency window (the tuner's knob), within 1..=max_concurrency.
    pub fn set_window(&mut self, now: Timestamp, replica: usize, window: u32) {
        if let Some(r) = self.replicas.get_mut(replica) {
            r.window = window.clamp(1, r.spec.max_concurrency.max(1));
        }
        self.pump(now);
    }

    // ---- outcomes of actions --------------------------------------------------------

    pub fn registered(&mut self, now: Timestamp, heartbeat_interval: Duration) {
        if !heartbeat_interval.is_zero() {
            self.config.heartbeat_interval = heartbeat_interval;
        }
        self.session = Session::Registered {
            heartbeat_at: now.saturating_add(self.config.heartbeat_interval),
        };
        for m in &mut self.models {
            m.lease_retry_at = None;
        }
        self.pump(now);
    }

    pub fn register_failed(&mut self, now: Timestamp) {
        self.session = Session::Unregistered {
            retry_at: now.saturating_add(self.config.error_backoff),
        };
    }

    /// A lease call returned.
    pub fn lease_done(&mut self, now: Timestamp, model: &ModelId, result: Result<Option<LeaseGrant>, CallFailure>) {
        let Some(m) = self.models.iter().position(|m| &m.id == model) else {
            // Not a model of this node (a confused control plane): give the work back.
            if let Ok(Some(grant)) = result
                && !grant.items.is_empty()
            {
                let items = grant.items.into_iter().map(|i| i.req).collect();
                self.actions.push_back(AgentAction::Release {
                    unit: grant.unit,
                    items,
                });
            }
            self.pump(now);
            return;
        };
        let state = &mut self.models[m];
        state.leasing = false;
        match result {
            Ok(Some(grant)) if !grant.items.is_empty() => {
                self.held.insert(grant.unit, grant.items.len() as u32);
                state.queue.extend(grant.items.into_iter().map(|i| (grant.unit, i)));
                if self.shutting_down() {
                    self.release_queued();
                }
            }
            Ok(_) => {
                state.lease_retry_at = Some(now.saturating_add(self.config.empty_lease_backoff));
            }
            Err(failure) => {
                state.lease_retry_at = Some(now.saturating_add(self.config.error_backoff));
                if failure == CallFailure::UnknownNode {
                    self.need_registration();
                }
            }
        }
        self.pump(now);
    }

    /// Feeds each replica's tuner the latest counters and applies what it decides; in
    /// advisory mode, refreshes the performance model's recommendation instead.
    fn tune(&mut self, now: Timestamp, tokens: &[Option<u64>]) {
        for i in 0..self.replicas.len() {
            let queued = self.models[self.replicas[i].model].queue.len() as u32;
            let r = &mut self.replicas[i];
            if r.setting_power {
                // The tuner and the recalibration wait for a power limit to be in force.
                continue;
            }
            // Tokens from the engine's counter where it has one; from finished requests
            // otherwise. A replica whose counter failed to read this time is skipped, so
            // that the two are never mixed.
            let engine_tokens = tokens.get(i).copied().flatten();
            if engine_tokens.is_none() && r.engine_counter {
                continue;
            }
            r.engine_counter |= engine_tokens.is_some();
            let observation = Observation {
                at: now,
                tokens: engine_tokens.unwrap_or(r.stats.completion_tokens),
                energy_j: r.last_reading.map(|x| x.energy_j),
                finished: r.stats.requests_done,
                errors: r.stats.errors,
                latency_sum_s: r.stats.latency_sum_s,
                in_flight: r.in_flight,
                queued,
                prompt_tokens: r.stats.prompt_tokens,
                completion_tokens: r.stats.completion_tokens,
            };
            if let Some(belief) = &r.belief {
                let power = r.power_limit_w.unwrap_or(belief.max_power_w());
                if r.recal.observe(belief, &observation, r.window, power) {
                    let c = r.recal.correction();
                    let corrected = belief.corrected(c.time, c.power);
                    if let Some(t) = r.tuner.as_mut() {
                        t.set_model(corrected.clone());
                    }
                    r.perf = Some(corrected);
                }
            }
            if self.config.tuner.mode == TunerMode::Advisory {
                advise(r, &self.config.tuner, now);
                continue;
            }
            let Some(t) = r.tuner.as_mut() else { continue };
            t.observe(observation);
            while let Some(d) = t.poll_decision() {
                r.window = d.window.clamp(1, r.spec.max_concurrency.max(1));
                if let Some(watts) = d.power_limit_w
                    && r.spec.power.is_some()
                    && r.power_limit_w != Some(watts)
                {
                    r.setting_power = true;
                    self.actions.push_back(AgentAction::SetPowerLimit { replica: i, watts });
                }
                self.actions.push_back(AgentAction::Tuned {
                    replica: i,
                    window: r.window,
                    power_limit_w: d.power_limit_w,
                    reason: d.reason,
                });
            }
        }
    }

    /// A power-limit change of replica `replica` is done: `Ok` with the limit now in
    /// force, or `Err` with why it could not be set (the tuner then leaves power alone).
    pub fn power_limit_done(&mut self, now: Timestamp, replica: usize, result: Result<f64, String>) {
        let Some(r) = self.replicas.get_mut(replica) else {
            return;
        };
        r.setting_power = false;
        match result {
            Ok(watts) => r.power_limit_w = Some(watts),
            Err(why) => {
                r.spec.power = None;
                if let Some(t) = r.tuner.as_mut() {
                    t.disable_power(now);
                }
                self.actions.push_back(AgentAction::Tuned {
                    replica,
                    window: r.window,
                    power_limit_w: None,
                    reason: format!("the power limit cannot be set ({why}): tuning the window only"),
                });
            }
        }
        self.pump(now);
    }

    /// Whether replica `replica`'s engine answers. Work queued for a model none of whose
    /// replicas here can take it goes back to the control plane.
    pub fn engine_probe(&mut self, now: Timestamp, replica: usize, reachable: bool) {
        let Some(r) = self.replicas.get_mut(replica) else {
            return;
        };
        if r.reachable == reachable {
            return;
        }
        r.reachable = reachable;
        if !reachable {
            let stranded: Vec<bool> = (0..self.models.len())
                .map(|m| !self.replicas.iter().any(|r| r.model == m && r.active && r.reachable))
                .collect();
            if stranded.iter().any(|s| *s) {
                self.release_models(|m| stranded[m]);
            }
        }
        self.pump(now);
    }

    /// The control plane's instructions for this node's replicas.
    fn follow(&mut self, now: Timestamp, directives: &[crate::control::ReplicaDirective]) {
        for d in directives {
            let Some(r) = self.replicas.iter_mut().find(|r| r.spec.id == d.replica) else {
                continue;
            };
            r.active = d.active;
            r.owed = d.owed_tokens_per_s;
            if let Some(t) = r.tuner.as_mut() {
                t.set_owed(now, d.owed_tokens_per_s);
            }
        }
        // Work queued for a model none of whose replicas here is active any more goes back
        // to the control plane, for the active replicas elsewhere.
        let parked: Vec<bool> = (0..self.models.len())
            .map(|m| !self.replicas.iter().any(|r| r.model == m && r.active))
            .collect();
        if parked.iter().any(|p| *p) {
            self.release_models(|m| parked[m]);
        }
        self.tune(now, &[]);
    }

    fn tuning_report(&self, r: &Replica) -> Option<crate::control::TuningReport> {
        let config = &self.config.tuner;
        let mut t = crate::control::TuningReport {
            mode: config.mode,
            objective: std::borrow::Cow::Borrowed(config.objective.name()),
            owed_tokens_per_s: r.owed,
            advice: r.advice.clone(),
            ..Default::default()
        };
        match (config.mode, &r.tuner) {
            (TunerMode::Off, _) => return None,
            (TunerMode::Active, Some(tuner)) => {
                let s = tuner.status();
                if let Some(e) = s.current {
                    t.objective_value = e.objective;
                    t.measured_tokens_per_s = e.tokens_per_s;
                }
                t.holding = s.holding;
                t.moves = s.moves;
                t.reason = s.last_reason.into();
            }
            _ => {
                t.reason = match &r.advice {
                    Some(_) => "advisory: the performance model's recommendation, not applied".into(),
                    None if r.perf.is_none() => {
                        "advisory: no performance model for this replica (its accelerator is not in the catalog)".into()
                    }
                    None => "advisory: waiting for finished requests to know their shape".into(),
                };
            }
        }
        Some(t)
    }

    /// Each replica's tuner, if it runs.
    pub fn tuner_status(&self) -> Vec<Option<TunerStatus>> {
        self.replicas
            .iter()
            .map(|r| r.tuner.as_ref().map(ReplicaTuner::status))
            .collect()
    }

    pub fn report_acked(&mut self, now: Timestamp) {
        for unit in self.reporting.take().map(|r| r.units).unwrap_or_default() {
            self.close_item(unit);
        }
        self.pump(now);
    }

    /// A report failed: its results (which the core kept) go back to the front of the
    /// queue, to be sent again after the error backoff.
    pub fn report_failed(&mut self, now: Timestamp, failure: CallFailure) {
        if let Some(report) = self.reporting.take() {
            // No copy when the shell has let go of the report (it has: the call is over).
            let results = std::sync::Arc::unwrap_or_clone(report.results);
            for (r, u) in results.into_iter().zip(report.units).rev() {
                self.ready.push_front((r, u, now));
            }
        }
        self.report_retry_at = now.saturating_add(self.config.error_backoff);
        if failure == CallFailure::UnknownNode {
            self.need_registration();
        }
        self.pump(now);
    }

    pub fn heartbeat_done(&mut self, now: Timestamp, reply: Result<HeartbeatReply, CallFailure>) {
        self.heartbeat_in_flight = false;
        if self.closing == Closing::Reporting {
            self.closing = Closing::Closed;
        }
        match reply {
            Err(CallFailure::UnknownNode) => self.need_registration(),
            Err(CallFailure::Unavailable) => {}
            Ok(h) => {
                self.forget_units(&h.unknown_units);
                self.follow(now, &h.directives);
            }
        }
        self.pump(now);
    }

    /// Stop taking work: queued requests are released, running ones finish and are
    /// reported; then the devices are read one last time and a last heartbeat carries
    /// the closed books. [`AgentCore::is_drained`] says when it is safe to exit.
    pub fn shutdown(&mut self, now: Timestamp) {
        if self.closing == Closing::Serving {
            self.closing = Closing::Draining;
        }
        self.release_queued();
        self.pump(now);
    }

    fn shutting_down(&self) -> bool {
        self.closing != Closing::Serving
    }

    fn is_registered(&self) -> bool {
        matches!(self.session, Session::Registered { .. })
    }

    /// Shut down, every result acknowledged, and the books closed.
    pub fn is_drained(&self) -> bool {
        self.closing == Closing::Closed
    }

    fn work_drained(&self) -> bool {
        self.replicas.iter().all(|r| r.in_flight == 0 && r.finished.is_empty())
            && self.ready.is_empty()
            && self.reporting.is_none()
            && self.models.iter().all(|m| m.queue.is_empty())
    }

    /// What the heartbeat tells the control plane of each replica.
    pub fn telemetry(&self) -> Vec<crate::control::ReplicaReport> {
        self.replicas
            .iter()
            .map(|r| crate::control::ReplicaReport {
                unreachable: !r.reachable,
                replica: r.spec.id.clone(),
                window: r.window,
                in_flight: r.in_flight,
                attributed_j: r.stats.attributed_j,
                idle_j: r.stats.idle_j,
                power_limit_w: r.power_limit_w,
                tuning: self.tuning_report(r),
                calibration: r.belief.as_ref().map(|_| r.recal.correction()),
            })
            .collect()
    }

    // ---- time -----------------------------------------------------------------------

    /// The next time [`AgentCore::handle_timeout`] has something to do. Only deadlines it
    /// will act on are returned, so an idle agent sleeps instead of spinning.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut t = self.sampler_deadline();
        let mut at = |x: Timestamp| t = t.min(x);
        match self.session {
            Session::Registering => {}
            Session::Unregistered { retry_at } => at(retry_at),
            Session::Registered { heartbeat_at } if !self.heartbeat_in_flight => at(heartbeat_at),
            Session::Registered { .. } => {}
        }
        if let Some(&(_, _, x)) = self
            .ready
            .front()
            .filter(|_| self.is_registered() && self.reporting.is_none())
        {
            at(x.saturating_add(self.config.report_delay).max(self.report_retry_at));
        }
        for x in self.models.iter().filter_map(|m| m.lease_retry_at) {
            at(x);
        }
        // A resting replica with room and queued work becomes usable again.
        for r in &self.replicas {
            if r.in_flight < r.window && r.healthy_at > self.now && !self.models[r.model].queue.is_empty() {
                at(r.healthy_at);
            }
        }
        Some(t).filter(|&t| t < Timestamp::MAX)
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = now;
        match self.session {
            Session::Unregistered { retry_at } if retry_at <= now => {
                self.session = Session::Registering;
                self.actions.push_back(AgentAction::Register);
            }
            Session::Registered { heartbeat_at } if !self.heartbeat_in_flight && heartbeat_at <= now => {
                self.heartbeat_in_flight = true;
                self.session = Session::Registered {
                    heartbeat_at: now.saturating_add(self.config.heartbeat_interval),
                };
                self.actions.push_back(AgentAction::Heartbeat {
                    held: self.held_units(),
                });
            }
            _ => {}
        }
        self.sampler_timeout(now);
        for m in &mut self.models {
            if m.lease_retry_at.is_some_and(|t| t <= now) {
                m.lease_retry_at = None;
            }
        }
        self.pump(now);
    }

    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop_front()
    }

    // ---- internals ------------------------------------------------------------------

    /// The control plane does not know this node: register again, unless a registration
    /// is on its way or waiting to be retried.
    fn need_registration(&mut self) {
        if let Session::Registered { .. } = self.session {
            self.session = Session::Registering;
            self.actions.push_back(AgentAction::Register);
        }
    }

    fn close_item(&mut self, unit: WorkUnitId) {
        if let Some(open) = self.held.get_mut(&unit) {
            *open -= 1;
            if *open == 0 {
                self.held.remove(&unit);
            }
        }
    }

    /// Units the control plane no longer knows were leased again elsewhere: their queued,
    /// not yet started requests are dropped (running ones finish; results of either are
    /// recorded once, by whoever reports first).
    fn forget_units(&mut self, units: &[WorkUnitId]) {
        if units.is_empty() {
            return;
        }
        let gone: BTreeSet<WorkUnitId> = units.iter().copied().collect();
        let mut dropped = Vec::new();
        for m in &mut self.models {
            m.queue.retain(|(u, _)| {
                let keep = !gone.contains(u);
                if !keep {
                    dropped.push(*u);
                }
                keep
            });
        }
        for u in dropped {
            self.close_item(u);
        }
    }

    fn release_queued(&mut self) {
        self.release_models(|_| true);
    }

    /// Gives back the queued work of the models `which` selects.
    fn release_models(&mut self, which: impl Fn(usize) -> bool) {
        let mut by_unit: BTreeMap<WorkUnitId, Vec<RequestRef>> = BTreeMap::new();
        for (i, m) in self.models.iter_mut().enumerate() {
            if !which(i) {
                continue;
            }
            for (unit, item) in m.queue.drain(..) {
                by_unit.entry(unit).or_default().push(item.req);
            }
        }
        for (unit, items) in by_unit {
            for _ in &items {
                self.close_item(unit);
            }
            self.actions.push_back(AgentAction::Release { unit, items });
        }
    }

    /// Dispatches queued work into free window slots, then leases more if needed, then
    /// reports if due.
    fn pump(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        self.dispatch(now);
        if self.is_registered() && !self.shutting_down() {
            self.lease(now);
        }
        self.maybe_report(now);
        if self.shutting_down() {
            self.close_books(now);
        }
    }

    /// On shutdown, once every result is acknowledged: a last device reading, then a last
    /// heartbeat carrying it.
    fn close_books(&mut self, now: Timestamp) {
        if self.closing == Closing::Draining && !self.sampler.reading() && self.work_drained() {
            self.closing = Closing::Reading;
            self.sample_now(now);
        }
        if self.closing == Closing::Read && !self.heartbeat_in_flight {
            self.heartbeat_in_flight = true;
            self.closing = Closing::Reporting;
            self.actions.push_back(AgentAction::Heartbeat {
                held: self.held_units(),
            });
        }
    }

    fn lease(&mut self, now: Timestamp) {
        for m in 0..self.models.len() {
            let state = &self.models[m];
            if state.leasing || state.lease_retry_at.is_some_and(|t| t > now) {
                continue;
            }
            let (mut free, mut window, mut healthy) = (0u32, 0u32, false);
            for r in self
                .replicas
                .iter()
                .filter(|r| r.model == m && r.healthy_at <= now && r.active && r.reachable)
            {
                free += r.window - r.in_flight.min(r.window);
                window += r.window;
                healthy = true;
            }
            if !healthy {
                continue;
            }
            let queued = state.queue.len() as u32;
            // Watermarks: lease when the queue beyond the free slots falls below half the
            // prefetch, then fill it to the whole prefetch. With one lease in flight per
            // model, lease size is what bounds throughput, so leases are never tiny.
            let prefetch = (self.config.prefetch * f64::from(window)).ceil() as u32;
            if queued >= free + prefetch.div_ceil(2) && queued > 0 {
                continue;
            }
            let want = (free + prefetch).saturating_sub(queued);
            if want == 0 {
                continue;
            }
            let state = &mut self.models[m];
            state.leasing = true;
            self.actions.push_back(AgentAction::Lease {
                model: state.id.clone(),
                max: want.min(self.config.lease_batch),
                wait: self.config.lease_wait,
            });
        }
    }

    fn maybe_report(&mut self, now: Timestamp) {
        if self.reporting.is_some() || self.ready.is_empty() || self.report_retry_at > now || !self.is_registered() {
            return;
        }
        let oldest = self.ready.front().map(|&(_, _, t)| t).expect("non-empty");
        let due = self.ready.len() >= self.config.report_max
            || oldest.saturating_add(self.config.report_delay) <= now
            || self.shutting_down();
        if !due {
            return;
        }
        let mut n = 0;
        let mut bytes = 0;
        for (r, _, _) in self.ready.iter().take(self.config.report_max) {
            let size = match &r.outcome {
                ReportedOutcome::Final(Outcome::Response { body, .. }) => body.len(),
                _ => 0,
            } + 256;
            if n > 0 && bytes + size > self.config.report_max_bytes {
                break;
            }
            bytes += size;
            n += 1;
        }
        let (results, units): (Vec<_>, Vec<_>) = self.ready.drain(..n).map(|(r, u, _)| (r, u)).unzip();
        let results = std::sync::Arc::new(results);
        self.reporting = Some(Report {
            results: results.clone(),
            units,
        });
        self.actions.push_back(AgentAction::Report(results));
    }
}

/// How often advisory mode refreshes its recommendation.
const ADVICE_EVERY: Duration = Duration::from_secs(10);

/// Refreshes the performance model's recommendation for `r` (advisory mode): what the
/// tuner would choose for the requests the replica has been serving, owing what the
/// control plane says.
fn advise(r: &mut Replica, config: &crate::tuner::TunerConfig, now: Timestamp) {
    let Some(perf) = &r.perf else { return };
    if now.since(r.advised_at) < ADVICE_EVERY || r.stats.requests_done == 0 {
        return;
    }
    let seconds = now.since(r.advised_at).as_secs_f64();
    let measured = (r.stats.completion_tokens - r.advice_tokens) as f64 / seconds;
    r.advised_at = now;
    r.advice_tokens = r.stats.completion_tokens;
    let n = r.stats.requests_done;
    let shape = (
        (r.stats.prompt_tokens / n) as u32,
        (r.stats.completion_tokens / n).max(1) as u32,
    );
    let power = r.power_limit_w.unwrap_or(perf.max_power_w());
    r.advice = Some(crate::tuner::advise(
        perf,
        config,
        &mut r.advice_grid,
        r.window,
        r.spec.max_concurrency,
        power,
        shape,
        r.owed,
        (measured > 0.0).then_some(measured),
    ));
}

impl Replica {
    fn new(spec: ReplicaSpec, model: usize, config: &AgentConfig, now: Timestamp) -> Replica {
        let window = spec.window.clamp(1, spec.max_concurrency.max(1));
        let perf = spec
            .accelerator
            .as_ref()
            .and_then(|a| crate::perf::ReplicaPerf::believed(&spec.model, a, spec.devices, &config.profiles).ok());
        let tuner = (config.tuner.mode == TunerMode::Active).then(|| {
            let t = ReplicaTuner::new(
                config.tuner.clone(),
                window,
                spec.max_concurrency,
                spec.power.map(|p| (p.min_w, p.max_w, p.current_w)),
                now,
            );
            match &perf {
                Some(p) => t.with_model(p.clone()),
                None => t,
            }
        });
        // The tuner starts from its grid point nearest the configured window.
        let window = tuner.as_ref().map_or(window, ReplicaTuner::window);
        Replica {
            tuner,
            power_limit_w: spec.power.map(|p| p.current_w),
            setting_power: false,
            active: true,
            reachable: true,
            owed: 0.0,
            advice: None,
            advised_at: now,
            engine_counter: false,
            belief: perf.clone(),
            perf,
            recal: crate::recal::Recalibrator::new(config.recalibration.clone()),
            advice_tokens: 0,
            advice_grid: crate::tuner::AdviceGrid::default(),
            model,
            window,
            in_flight: 0,
            healthy_at: now,
            backoff: config.replica_backoff,
            stats: ReplicaStats {
                window,
                ..ReplicaStats::default()
            },
            last_reading: None,
            first_reading: None,
            carried_j: 0.0,
            carried_device_s: 0.0,
            finished: Vec::new(),
            spec,
        }
    }
}

#[cfg(test)]
mod tests;
