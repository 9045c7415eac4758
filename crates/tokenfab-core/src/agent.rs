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
use crate::time::Timestamp;
use crate::tuner::{Observation, ReplicaTuner, TunerMode, TunerStatus};
use crate::usage::Usage;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

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
}

/// How the agent picks the replica for the next request (among replicas of the model with
/// room in their window).
/// How far into its model's queue a replica looks for a request whose prompt prefix it
/// holds (or that has none) before it takes the oldest anyway.
pub const AFFINITY_LOOKAHEAD: usize = 64;

/// Prefixes whose replica the agent remembers (forgotten all at once beyond this).
const MAX_PREFIX_HOMES: usize = 65_536;

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

/// Where the agent is in closing its books on shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Not shut down, or still draining.
    Open,
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
    Report(Vec<ReportedResult>),
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
    /// Output tokens/s the control plane says the replica owes to deadlines.
    owed: f64,
    /// What the performance model recommends (advisory mode), refreshed now and then.
    advice: Option<crate::tuner::Advice>,
    advised_at: Timestamp,
    /// The replica's engine has a generated-token counter (its readings carry it).
    engine_counter: bool,
    /// The performance model of the replica, if its accelerator is in the catalog.
    perf: Option<crate::perf::ReplicaPerf>,
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
    reporting: Option<Vec<WorkUnitId>>,
    report_retry_at: Timestamp,
    registered: bool,
    registering: bool,
    register_retry_at: Option<Timestamp>,
    heartbeat_at: Option<Timestamp>,
    heartbeating: bool,
    sample_at: Timestamp,
    sample_started: Timestamp,
    sampling: bool,
    /// Sampling paused: every replica is idle, so all energy until work starts again is
    /// idle energy, read in one go when it does.
    resting: bool,
    /// The sample in flight books idle energy: taken as work started after a rest (it
    /// closes the rest) or during a long rest.
    closing_rest: bool,
    /// When to read the devices next while resting.
    rest_sample_at: Timestamp,
    /// Closing the books on shutdown, once drained: a last reading, then a last heartbeat
    /// that carries it.
    closing: Closing,
    /// The latest time seen.
    now: Timestamp,
    shutting_down: bool,
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
            registered: false,
            registering: true,
            register_retry_at: None,
            heartbeat_at: None,
            heartbeating: false,
            sample_at: now,
            sample_started: now,
            sampling: false,
            resting: false,
            closing_rest: false,
            rest_sample_at: Timestamp::MAX,
            closing: Closing::Open,
            now,
            shutting_down: false,
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
        self.registering = false;
        self.registered = true;
        self.register_retry_at = None;
        if !heartbeat_interval.is_zero() {
            self.config.heartbeat_interval = heartbeat_interval;
        }
        self.heartbeat_at = Some(now.saturating_add(self.config.heartbeat_interval));
        for m in &mut self.models {
            m.lease_retry_at = None;
        }
        self.pump(now);
    }

    pub fn register_failed(&mut self, now: Timestamp) {
        self.registering = false;
        self.register_retry_at = Some(now.saturating_add(self.config.error_backoff));
    }

    /// A lease call returned. `Err(true)` means the control plane does not know this
    /// node (register again); `Err(false)` any other failure.
    pub fn lease_done(&mut self, now: Timestamp, model: &ModelId, result: Result<Option<LeaseGrant>, bool>) {
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
                if self.shutting_down {
                    self.release_queued();
                }
            }
            Ok(_) => {
                state.lease_retry_at = Some(now.saturating_add(self.config.empty_lease_backoff));
            }
            Err(unknown_node) => {
                state.lease_retry_at = Some(now.saturating_add(self.config.error_backoff));
                if unknown_node {
                    self.need_registration();
                }
            }
        }
        self.pump(now);
    }

    /// An engine call returned.
    pub fn engine_done(
        &mut self,
        now: Timestamp,
        replica: usize,
        unit: WorkUnitId,
        req: RequestRef,
        reply: EngineReply,
    ) {
        let latency = self.dispatched_at.remove(&req).map_or(Duration::ZERO, |t| now.since(t));
        let r = &mut self.replicas[replica];
        r.in_flight -= 1;
        r.stats.latency_sum_s += latency.as_secs_f64();
        let (outcome, usage) = match reply {
            EngineReply::Answered { status_code, .. } if EngineReply::is_retryable_status(status_code) => {
                r.stats.errors += 1;
                let code = format!("engine_http_{status_code}");
                let message = format!("replica {} answered HTTP {status_code}", r.spec.id);
                mark_unhealthy(r, now);
                (ReportedOutcome::Retryable { code, message }, Usage::default())
            }
            EngineReply::Answered {
                status_code,
                body,
                request_id,
                prompt_tokens,
                completion_tokens,
            } => {
                r.backoff = self.config.replica_backoff;
                r.stats.requests_done += 1;
                r.stats.prompt_tokens += prompt_tokens;
                r.stats.completion_tokens += completion_tokens;
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    ..Usage::default()
                };
                (
                    ReportedOutcome::Final(Outcome::Response {
                        status_code,
                        body,
                        request_id,
                    }),
                    usage,
                )
            }
            EngineReply::Unreachable { code, message } => {
                r.stats.errors += 1;
                mark_unhealthy(r, now);
                (
                    ReportedOutcome::Retryable {
                        code,
                        message: format!("replica {}: {message}", r.spec.id),
                    },
                    Usage::default(),
                )
            }
        };
        r.finished.push((
            ReportedResult {
                unit,
                req,
                outcome,
                usage,
                latency,
            },
            unit,
        ));
        self.pump(now);
    }

    /// Device readings, one per replica in spec order; `None` where the replica has no
    /// energy counter (its requests are charged no energy or device time).
    pub fn device_sample(&mut self, now: Timestamp, readings: Vec<Option<EnergyReading>>) {
        self.sampling = false;
        let closing_rest = std::mem::take(&mut self.closing_rest);
        let tokens: Vec<Option<u64>> = readings.iter().map(|r| r.and_then(|r| r.tokens)).collect();
        for (r, reading) in self.replicas.iter_mut().zip(readings) {
            if r.first_reading.is_none() {
                r.first_reading = reading;
            }
            if closing_rest {
                book_idle(r, reading);
            } else {
                attribute(r, reading, now, &mut self.ready);
            }
        }
        if self.closing == Closing::Reading {
            self.closing = Closing::Read;
        }
        if !closing_rest {
            self.tune(now, &tokens);
        }
        self.pump(now);
    }

    /// Feeds each replica's tuner the latest counters and applies what it decides; in
    /// advisory mode, refreshes the performance model's recommendation instead.
    fn tune(&mut self, now: Timestamp, tokens: &[Option<u64>]) {
        for i in 0..self.replicas.len() {
            let queued = self.models[self.replicas[i].model].queue.len() as u32;
            let r = &mut self.replicas[i];
            if self.config.tuner.mode == TunerMode::Advisory {
                advise(r, &self.config.tuner, now);
                continue;
            }
            let Some(t) = r.tuner.as_mut() else { continue };
            if r.setting_power {
                // The tuner waits for its power limit to be in force.
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
            t.observe(Observation {
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
            });
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
            objective: config.objective.name().into(),
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
                t.reason = s.last_reason;
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
        for unit in self.reporting.take().unwrap_or_default() {
            self.close_item(unit);
        }
        self.pump(now);
    }

    /// A report failed; the results come back to be sent again.
    pub fn report_failed(&mut self, now: Timestamp, results: Vec<ReportedResult>, unknown_node: bool) {
        let units = self.reporting.take().unwrap_or_default();
        for (r, u) in results.into_iter().zip(units).rev() {
            self.ready.push_front((r, u, now));
        }
        self.report_retry_at = now.saturating_add(self.config.error_backoff);
        if unknown_node {
            self.need_registration();
        }
        self.pump(now);
    }

    pub fn heartbeat_done(&mut self, now: Timestamp, reply: Result<HeartbeatReply, bool>) {
        self.heartbeating = false;
        if self.closing == Closing::Reporting {
            self.closing = Closing::Closed;
        }
        match reply {
            Err(true) => self.need_registration(),
            Err(false) => {}
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
        self.shutting_down = true;
        self.release_queued();
        self.pump(now);
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

    /// Per replica, what its devices' energy counters rose by from the first reading to
    /// the last one (`None` without readings). With nothing in flight it equals the
    /// replica's attributed plus idle energy: the books account for every joule measured.
    pub fn measured_energy_j(&self) -> Vec<Option<f64>> {
        self.replicas
            .iter()
            .map(|r| match (r.first_reading, r.last_reading) {
                (Some(a), Some(b)) => Some(b.energy_j - a.energy_j),
                _ => None,
            })
            .collect()
    }

    /// What the heartbeat tells the control plane of each replica.
    pub fn telemetry(&self) -> Vec<crate::control::ReplicaReport> {
        self.replicas
            .iter()
            .map(|r| crate::control::ReplicaReport {
                replica: r.spec.id.clone(),
                window: r.window,
                in_flight: r.in_flight,
                attributed_j: r.stats.attributed_j,
                idle_j: r.stats.idle_j,
                power_limit_w: r.power_limit_w,
                tuning: self.tuning_report(r),
            })
            .collect()
    }

    // ---- time -----------------------------------------------------------------------

    /// The next time [`AgentCore::handle_timeout`] has something to do. Only deadlines it
    /// will act on are returned, so an idle agent sleeps instead of spinning.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut t = if self.sampling {
            self.sample_started
                .saturating_add(self.config.sample_interval * SAMPLE_GIVE_UP)
        } else if self.resting {
            self.rest_sample_at
        } else {
            self.sample_at
        };
        let mut at = |x: Timestamp| t = t.min(x);
        if !self.registering
            && let Some(x) = self.register_retry_at
        {
            at(x);
        }
        if self.registered
            && !self.heartbeating
            && let Some(x) = self.heartbeat_at
        {
            at(x);
        }
        if let Some(&(_, _, x)) = self
            .ready
            .front()
            .filter(|_| self.registered && self.reporting.is_none())
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
        if self.register_retry_at.is_some_and(|t| t <= now) && !self.registering {
            self.register_retry_at = None;
            self.registering = true;
            self.actions.push_back(AgentAction::Register);
        }
        if self.registered && !self.heartbeating && self.heartbeat_at.is_some_and(|t| t <= now) {
            self.heartbeating = true;
            self.heartbeat_at = Some(now.saturating_add(self.config.heartbeat_interval));
            self.actions.push_back(AgentAction::Heartbeat {
                held: self.held_units(),
            });
        }
        if self.sampling
            && now
                >= self
                    .sample_started
                    .saturating_add(self.config.sample_interval * SAMPLE_GIVE_UP)
        {
            // The reading is overdue (a device or emulator hangs): finished requests go
            // out without their energy share rather than wait; the next good reading's
            // difference covers the gap, so no energy is lost from the books.
            self.sampling = false;
            if std::mem::take(&mut self.closing_rest) {
                // The reading that should have closed a rest never came: what the devices
                // drew during the rest is unknown and must not be charged to the work that
                // starts now, so the next reading starts a new baseline instead.
                for r in &mut self.replicas {
                    r.last_reading = None;
                }
            }
            for r in &mut self.replicas {
                attribute(r, None, now, &mut self.ready);
            }
            if self.closing == Closing::Reading {
                self.closing = Closing::Read;
            }
        }
        // Idle, with a first reading taken (the baseline a rest is measured from).
        let idle = self
            .replicas
            .iter()
            .all(|r| r.in_flight == 0 && r.finished.is_empty() && r.last_reading.is_some());
        if self.sample_at <= now && !self.sampling && !self.resting && idle {
            self.resting = true;
            self.rest_sample_at = if self.config.idle_sample_interval.is_zero() {
                Timestamp::MAX
            } else {
                now.saturating_add(self.config.idle_sample_interval)
            };
        }
        if self.resting && !self.sampling && self.rest_sample_at <= now {
            // A long rest: book what the idle devices drew so far, and rest on.
            self.rest_sample_at = now.saturating_add(self.config.idle_sample_interval);
            self.sampling = true;
            self.closing_rest = true;
            self.sample_started = now;
            self.actions.push_back(AgentAction::SampleDevices);
        }
        if self.sample_at <= now && !self.sampling && !self.resting {
            self.sampling = true;
            self.sample_started = now;
            self.sample_at = now.saturating_add(self.config.sample_interval);
            self.actions.push_back(AgentAction::SampleDevices);
        }
        for m in &mut self.models {
            if m.lease_retry_at.is_some_and(|t| t <= now) {
                m.lease_retry_at = None;
            }
        }
        self.pump(now);
    }

    /// Reads the devices now, whatever the schedule (e.g. to close the books at the end):
    /// emits [`AgentAction::SampleDevices`] unless a reading is already on its way.
    pub fn sample_now(&mut self, now: Timestamp) {
        if self.sampling {
            return;
        }
        self.closing_rest = std::mem::take(&mut self.resting);
        self.sampling = true;
        self.sample_started = now;
        self.sample_at = now.saturating_add(self.config.sample_interval);
        self.actions.push_back(AgentAction::SampleDevices);
    }

    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop_front()
    }

    // ---- internals ------------------------------------------------------------------

    fn need_registration(&mut self) {
        self.registered = false;
        if !self.registering && self.register_retry_at.is_none() {
            self.registering = true;
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
        if self.registered && !self.shutting_down {
            self.lease(now);
        }
        self.maybe_report(now);
        if self.shutting_down {
            self.close_books(now);
        }
    }

    /// On shutdown, once every result is acknowledged: a last device reading, then a last
    /// heartbeat carrying it.
    fn close_books(&mut self, now: Timestamp) {
        if self.closing == Closing::Open && !self.sampling && self.work_drained() {
            self.closing = Closing::Reading;
            self.sample_now(now);
        }
        if self.closing == Closing::Read && !self.heartbeating {
            self.heartbeating = true;
            self.closing = Closing::Reporting;
            self.actions.push_back(AgentAction::Heartbeat {
                held: self.held_units(),
            });
        }
    }

    fn dispatch(&mut self, now: Timestamp) {
        loop {
            // Among active, healthy replicas with room and work queued for their model:
            // the one with the most free room relative to its window, or the next in turn.
            let n = self.replicas.len();
            let mut best: Option<(usize, f64)> = None;
            for k in 0..n {
                let i = match self.config.routing {
                    Routing::PrefixAffinity | Routing::LeastLoaded => k,
                    Routing::RoundRobin => (self.next_replica + k) % n,
                };
                let r = &self.replicas[i];
                if !r.active || r.in_flight >= r.window || r.healthy_at > now {
                    continue;
                }
                if self.models[r.model].queue.is_empty() {
                    continue;
                }
                let load = f64::from(r.in_flight) / f64::from(r.window);
                if best.is_none_or(|(_, l)| load < l) {
                    best = Some((i, load));
                }
                if self.config.routing == Routing::RoundRobin {
                    break;
                }
            }
            let Some((i, _)) = best else { break };
            let pick = if self.config.routing == Routing::PrefixAffinity {
                self.affine_item(now, i)
            } else {
                0
            };
            self.next_replica = (i + 1) % n;
            if self.resting && !self.sampling {
                // Work starts after a rest: read the devices first, to close the rest, and
                // dispatch once the reading is in (or given up), so that no busy energy is
                // booked as idle.
                self.resting = false;
                self.sampling = true;
                self.closing_rest = true;
                self.sample_started = now;
                self.sample_at = now.saturating_add(self.config.sample_interval);
                self.actions.push_back(AgentAction::SampleDevices);
            }
            if self.closing_rest {
                break;
            }
            let r = &mut self.replicas[i];
            let (unit, item) = self.models[r.model].queue.remove(pick).expect("picked from the queue");
            r.in_flight += 1;
            self.dispatched_at.insert(item.req, now);
            self.actions.push_back(AgentAction::Dispatch { replica: i, unit, item });
        }
    }

    /// Prefix affinity: which queued request (index into its model's queue) replica `i`
    /// takes. Among the first [`AFFINITY_LOOKAHEAD`], the first that has no shared prefix,
    /// whose prefix was first sent to `i`, whose prefix is new (it is then `i`'s from now
    /// on), or whose prefix's replica can no longer take work; if every one of them belongs
    /// to another replica, the oldest (no replica idles while work waits).
    fn affine_item(&mut self, now: Timestamp, i: usize) -> usize {
        let m = self.replicas[i].model;
        for (k, (_, item)) in self.models[m].queue.iter().take(AFFINITY_LOOKAHEAD).enumerate() {
            let Some(prefix) = item.prefix else { return k };
            match self.prefix_home.get(&prefix) {
                Some(&h) if h == i => return k,
                Some(&h) => {
                    let r = &self.replicas[h];
                    if r.model != m || !r.active || r.healthy_at > now {
                        self.prefix_home.insert(prefix, i);
                        return k;
                    }
                }
                None => {
                    if self.prefix_home.len() >= MAX_PREFIX_HOMES {
                        self.prefix_home.clear();
                    }
                    self.prefix_home.insert(prefix, i);
                    return k;
                }
            }
        }
        0
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
                .filter(|r| r.model == m && r.healthy_at <= now && r.active)
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
        if self.reporting.is_some() || self.ready.is_empty() || self.report_retry_at > now || !self.registered {
            return;
        }
        let oldest = self.ready.front().map(|&(_, _, t)| t).expect("non-empty");
        let due = self.ready.len() >= self.config.report_max
            || oldest.saturating_add(self.config.report_delay) <= now
            || self.shutting_down;
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
        self.reporting = Some(units);
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
            .and_then(|a| crate::perf::ReplicaPerf::new(&spec.model, a, spec.devices).ok());
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
            owed: 0.0,
            advice: None,
            advised_at: now,
            engine_counter: false,
            perf,
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

fn mark_unhealthy(r: &mut Replica, now: Timestamp) {
    r.healthy_at = now.saturating_add(r.backoff);
    r.backoff = (r.backoff * 2).min(Duration::from_secs(30));
}

/// Books the energy since the last reading as idle (a rest, during which nothing ran).
fn book_idle(r: &mut Replica, reading: Option<EnergyReading>) {
    if let (Some(new), Some(old)) = (reading, r.last_reading) {
        r.stats.idle_j += (new.energy_j - old.energy_j).max(0.0);
    }
    r.stats.idle_j += r.carried_j;
    r.carried_j = 0.0;
    r.carried_device_s = 0.0;
    if reading.is_some() {
        r.last_reading = reading;
    }
}

/// Shares the energy and device time since the last reading among the requests that
/// finished since then (see the module docs).
fn attribute(
    r: &mut Replica,
    reading: Option<EnergyReading>,
    now: Timestamp,
    ready: &mut VecDeque<(ReportedResult, WorkUnitId, Timestamp)>,
) {
    let (joules, device_s) = match (reading, r.last_reading) {
        (Some(new), Some(old)) => (
            (new.energy_j - old.energy_j).max(0.0),
            (new.clock_s - old.clock_s).max(0.0) * f64::from(r.spec.devices),
        ),
        _ => (0.0, 0.0),
    };
    if reading.is_some() {
        r.last_reading = reading;
    }
    if r.finished.is_empty() {
        if r.in_flight > 0 {
            r.carried_j += joules;
            r.carried_device_s += device_s;
        } else {
            r.stats.idle_j += joules + r.carried_j;
            r.carried_j = 0.0;
            r.carried_device_s = 0.0;
        }
        return;
    }
    let pool_j = joules + r.carried_j;
    let pool_s = device_s + r.carried_device_s;
    r.carried_j = 0.0;
    r.carried_device_s = 0.0;
    r.stats.attributed_j += pool_j;
    let weights: Vec<f64> = r.finished.iter().map(|(res, _)| res.usage.tokens() as f64).collect();
    let total: f64 = weights.iter().sum();
    let n = r.finished.len() as f64;
    for ((mut res, unit), w) in r.finished.drain(..).zip(weights) {
        let share = if total > 0.0 { w / total } else { 1.0 / n };
        res.usage.joules = pool_j * share;
        res.usage.device_seconds = pool_s * share;
        ready.push_back((res, unit, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_micros(1_000_000);

    fn spec(id: &str, window: u32) -> ReplicaSpec {
        ReplicaSpec {
            id: ReplicaId::from(id),
            model: ModelId::from("m"),
            devices: 2,
            window,
            max_concurrency: 64,
            power: None,
            accelerator: None,
        }
    }

    fn drain(core: &mut AgentCore) -> Vec<AgentAction> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    fn grant(unit: u64, n: u32) -> LeaseGrant {
        LeaseGrant {
            unit: WorkUnitId(unit),
            expires_at: T0,
            items: (0..n)
                .map(|i| LeasedItem {
                    req: RequestRef {
                        batch: crate::BatchId(1),
                        index: i,
                    },
                    attempt: 1,
                    prefix: None,
                })
                .collect(),
        }
    }

    fn answered(tokens: u64) -> EngineReply {
        EngineReply::Answered {
            status_code: 200,
            body: b"{}".to_vec(),
            request_id: "x".into(),
            prompt_tokens: tokens,
            completion_tokens: tokens,
        }
    }

    fn started(window: u32) -> AgentCore {
        let mut core = AgentCore::new(AgentConfig::default(), vec![spec("r0", window), spec("r1", window)], T0);
        assert_eq!(drain(&mut core), [AgentAction::Register, AgentAction::SampleDevices]);
        core.registered(T0, Duration::from_secs(1));
        core
    }

    #[test]
    fn leases_fill_the_windows_and_dispatch_spreads_load() {
        let mut core = started(4);
        // Free slots 8 + prefetch 8.
        assert_eq!(
            drain(&mut core),
            [AgentAction::Lease {
                model: ModelId::from("m"),
                max: 16,
                wait: AgentConfig::default().lease_wait,
            }]
        );
        core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 16))));
        let actions = drain(&mut core);
        let per_replica = |i| {
            actions
                .iter()
                .filter(|a| matches!(a, AgentAction::Dispatch { replica, .. } if *replica == i))
                .count()
        };
        assert_eq!((per_replica(0), per_replica(1)), (4, 4), "{actions:?}");
        assert!(
            !actions.iter().any(|a| matches!(a, AgentAction::Lease { .. })),
            "8 queued: enough"
        );
        assert_eq!(core.held_units(), [WorkUnitId(1)]);
    }

    /// Requests sharing a prefix stay with the replica that took the first of them; the
    /// other replica takes the next request that is not tied elsewhere, or the oldest when
    /// all are. Plain least-loaded routing spreads them.
    #[test]
    fn requests_sharing_a_prefix_stay_on_one_replica() {
        let prefixes = [Some(1), Some(1), Some(1), Some(2), None];
        let routed = |routing: Routing| -> Vec<(usize, Option<u64>)> {
            let config = AgentConfig {
                routing,
                ..AgentConfig::default()
            };
            let mut core = AgentCore::new(config, vec![spec("r0", 4), spec("r1", 4)], T0);
            drain(&mut core);
            core.registered(T0, Duration::from_secs(1));
            drain(&mut core);
            let mut g = grant(1, prefixes.len() as u32);
            for (item, p) in g.items.iter_mut().zip(prefixes) {
                item.prefix = p;
            }
            core.lease_done(T0, &ModelId::from("m"), Ok(Some(g)));
            drain(&mut core)
                .into_iter()
                .filter_map(|a| match a {
                    AgentAction::Dispatch { replica, item, .. } => Some((replica, item.prefix)),
                    _ => None,
                })
                .collect()
        };
        // Prefix 1 goes to r0 with its first request; r1 skips it for prefix 2, then for
        // the request without a prefix.
        assert_eq!(
            routed(Routing::PrefixAffinity),
            [(0, Some(1)), (1, Some(2)), (0, Some(1)), (1, None), (0, Some(1))]
        );
        assert_eq!(
            routed(Routing::LeastLoaded),
            [(0, Some(1)), (1, Some(1)), (0, Some(1)), (1, Some(2)), (0, None)]
        );
        // All tied to a busy replica: the idle one takes the oldest rather than idle.
        let config = AgentConfig {
            routing: Routing::PrefixAffinity,
            ..AgentConfig::default()
        };
        let mut core = AgentCore::new(config, vec![spec("r0", 1), spec("r1", 1)], T0);
        drain(&mut core);
        core.registered(T0, Duration::from_secs(1));
        drain(&mut core);
        let mut g = grant(1, 2);
        for item in &mut g.items {
            item.prefix = Some(5);
        }
        core.lease_done(T0, &ModelId::from("m"), Ok(Some(g)));
        let replicas: Vec<usize> = drain(&mut core)
            .into_iter()
            .filter_map(|a| match a {
                AgentAction::Dispatch { replica, .. } => Some(replica),
                _ => None,
            })
            .collect();
        assert_eq!(replicas, [0, 1]);
    }

    #[test]
    fn results_wait_for_their_energy_share_then_are_reported_and_acked() {
        let mut core = started(4);
        drain(&mut core);
        core.device_sample(
            T0,
            vec![
                Some(EnergyReading {
                    energy_j: 100.0,
                    clock_s: 10.0,
                    tokens: None,
                }),
                None,
            ],
        );
        core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 2))));
        let dispatched: Vec<_> = drain(&mut core)
            .into_iter()
            .filter_map(|a| match a {
                AgentAction::Dispatch { replica, unit, item } => Some((replica, unit, item)),
                _ => None,
            })
            .collect();
        assert_eq!(dispatched.len(), 2, "one on each replica");
        let t1 = T0.saturating_add(Duration::from_millis(50));
        for &(replica, unit, item) in &dispatched {
            core.engine_done(
                t1,
                replica,
                unit,
                item.req,
                answered(if replica == 0 { 30 } else { 10 }),
            );
        }
        assert!(
            drain(&mut core).iter().all(|a| !matches!(a, AgentAction::Report(_))),
            "no report before the energy share"
        );
        let t2 = T0.saturating_add(Duration::from_millis(100));
        core.handle_timeout(t2);
        assert!(drain(&mut core).contains(&AgentAction::SampleDevices));
        core.device_sample(
            t2,
            vec![
                Some(EnergyReading {
                    energy_j: 160.0,
                    clock_s: 10.5,
                    tokens: None,
                }),
                None,
            ],
        );
        core.handle_timeout(t2.saturating_add(Duration::from_millis(20)));
        let report = drain(&mut core)
            .into_iter()
            .find_map(|a| match a {
                AgentAction::Report(r) => Some(r),
                _ => None,
            })
            .expect("report due");
        assert_eq!(report.len(), 2);
        let on_r0 = report.iter().find(|r| r.usage.prompt_tokens == 30).unwrap();
        assert_eq!(
            on_r0.latency,
            Duration::from_millis(50),
            "dispatched at T0, answered 50 ms later"
        );
        assert_eq!(on_r0.usage.joules, 60.0, "the whole 60 J delta of replica 0");
        assert_eq!(on_r0.usage.device_seconds, 1.0, "0.5 s x 2 devices");
        let on_r1 = report.iter().find(|r| r.usage.prompt_tokens == 10).unwrap();
        assert_eq!(on_r1.usage.joules, 0.0, "replica 1 has no energy counter");
        assert_eq!(core.held_units(), [WorkUnitId(1)], "held until acknowledged");
        core.report_acked(t2);
        assert!(core.held_units().is_empty());
    }

    #[test]
    fn energy_is_shared_by_tokens_and_idle_energy_is_not_charged() {
        let mut r = Replica::new(spec("r", 4), 0, &AgentConfig::default(), T0);
        r.in_flight = 1;
        r.last_reading = Some(EnergyReading {
            energy_j: 0.0,
            clock_s: 0.0,
            tokens: None,
        });
        let mut ready = VecDeque::new();
        let result = |tokens| ReportedResult {
            unit: WorkUnitId(1),
            req: RequestRef::default(),
            outcome: ReportedOutcome::Retryable {
                code: String::new(),
                message: String::new(),
            },
            usage: Usage {
                prompt_tokens: tokens,
                ..Usage::default()
            },
            latency: Duration::ZERO,
        };
        // Interval 1: work running, nothing finished: carried.
        attribute(
            &mut r,
            Some(EnergyReading {
                energy_j: 40.0,
                clock_s: 1.0,
                tokens: None,
            }),
            T0,
            &mut ready,
        );
        assert!(ready.is_empty());
        // Interval 2: two finish, 1:3 tokens, sharing 40 + 60 J.
        r.finished = vec![(result(10), WorkUnitId(1)), (result(30), WorkUnitId(1))];
        attribute(
            &mut r,
            Some(EnergyReading {
                energy_j: 100.0,
                clock_s: 2.0,
                tokens: None,
            }),
            T0,
            &mut ready,
        );
        let j: Vec<f64> = ready.iter().map(|(r, _, _)| r.usage.joules).collect();
        assert_eq!(j, [25.0, 75.0]);
        // Interval 3: nothing in flight: idle.
        r.in_flight = 0;
        attribute(
            &mut r,
            Some(EnergyReading {
                energy_j: 130.0,
                clock_s: 3.0,
                tokens: None,
            }),
            T0,
            &mut ready,
        );
        assert_eq!((r.stats.attributed_j, r.stats.idle_j), (100.0, 30.0));
    }

    #[test]
    fn a_failing_replica_is_rested_and_its_request_retried() {
        let mut core = started(1);
        drain(&mut core);
        core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 4))));
        let first = drain(&mut core)
            .into_iter()
            .find_map(|a| match a {
                AgentAction::Dispatch { replica, unit, item } => Some((replica, unit, item)),
                _ => None,
            })
            .unwrap();
        let reply = EngineReply::Unreachable {
            code: "connect_failed".into(),
            message: "connection refused".into(),
        };
        core.engine_done(T0, first.0, first.1, first.2.req, reply);
        let actions = drain(&mut core);
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, AgentAction::Dispatch { replica, .. } if *replica == first.0)),
            "no new work for the failed replica while it rests: {actions:?}"
        );
        let (_, stats) = core.replicas().nth(first.0).unwrap();
        assert_eq!(stats.errors, 1);
        // After the 500 ms rest the replica gets work again.
        let rested = T0.saturating_add(Duration::from_millis(500));
        assert!(core.poll_timeout().unwrap() <= rested);
        core.handle_timeout(rested);
        let actions = drain(&mut core);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, AgentAction::Dispatch { replica, .. } if *replica == first.0)),
            "{actions:?}"
        );
    }

    #[test]
    fn an_unknown_node_registers_again_and_keeps_its_results() {
        let mut core = started(1);
        drain(&mut core);
        core.lease_done(T0, &ModelId::from("m"), Err(true));
        assert!(drain(&mut core).contains(&AgentAction::Register));
        let results = vec![ReportedResult {
            unit: WorkUnitId(3),
            req: RequestRef::default(),
            outcome: ReportedOutcome::Final(Outcome::Error {
                code: "c".into(),
                message: "m".into(),
            }),
            usage: Usage::default(),
            latency: Duration::ZERO,
        }];
        core.reporting = Some(vec![WorkUnitId(3)]);
        core.report_failed(T0, results.clone(), true);
        assert_eq!(core.ready.len(), 1, "kept for the next report");
    }

    #[test]
    fn an_idle_agent_sleeps_until_its_next_real_deadline() {
        let mut core = started(4);
        drain(&mut core);
        core.lease_done(T0, &ModelId::from("m"), Ok(None));
        core.device_sample(T0, vec![None, None]);
        drain(&mut core);
        // Nothing to do now: the next wake-up is the next sample, heartbeat or lease retry.
        let next = core.poll_timeout().unwrap();
        assert!(next > T0, "{next} must be in the future");
        assert_eq!(next, T0.saturating_add(Duration::from_millis(100)));
        // A heartbeat in flight does not make the agent spin either.
        let t = T0.saturating_add(Duration::from_secs(1));
        core.handle_timeout(t);
        assert!(
            drain(&mut core)
                .iter()
                .any(|a| matches!(a, AgentAction::Heartbeat { .. }))
        );
        assert!(core.poll_timeout().unwrap() > t);
    }

    /// A device reading of `j` joules at `s` seconds.
    fn reading(j: f64, s: f64) -> Option<EnergyReading> {
        Some(EnergyReading {
            energy_j: j,
            clock_s: s,
            tokens: None,
        })
    }

    #[test]
    fn an_idle_agent_rests_its_devices_and_books_the_rest_as_idle_energy() {
        let mut core = started(4);
        drain(&mut core);
        core.lease_done(T0, &ModelId::from("m"), Ok(None));
        // The baseline reading; then nothing runs, so the next due sample is skipped.
        core.device_sample(T0, vec![reading(0.0, 0.0), reading(0.0, 0.0)]);
        drain(&mut core);
        let t1 = T0.saturating_add(Duration::from_millis(100));
        core.handle_timeout(t1);
        assert!(!drain(&mut core).contains(&AgentAction::SampleDevices));
        let next = core.poll_timeout().unwrap();
        assert!(
            next >= T0.saturating_add(Duration::from_secs(1)),
            "rests until the heartbeat: {next}"
        );
        // Work arrives after 60 s: the devices are read first, and only then is the
        // request dispatched; the 60 s of energy since the baseline is idle, charged to
        // no request.
        let t2 = T0.saturating_add(Duration::from_secs(60));
        core.lease_done(t2, &ModelId::from("m"), Ok(Some(grant(1, 1))));
        let first = drain(&mut core);
        assert!(first.contains(&AgentAction::SampleDevices), "{first:?}");
        assert!(
            !first.iter().any(|a| matches!(a, AgentAction::Dispatch { .. })),
            "no dispatch before the reading: {first:?}"
        );
        core.device_sample(t2, vec![reading(4200.0, 60.0), reading(4200.0, 60.0)]);
        assert!(
            drain(&mut core)
                .iter()
                .any(|a| matches!(a, AgentAction::Dispatch { .. }))
        );
        let idle: f64 = core.replicas().map(|(_, s)| s.idle_j).sum();
        let attributed: f64 = core.replicas().map(|(_, s)| s.attributed_j).sum();
        assert_eq!((idle, attributed), (8400.0, 0.0));
    }

    #[test]
    fn a_rest_whose_closing_reading_never_comes_is_charged_to_nobody() {
        let mut core = started(4);
        drain(&mut core);
        core.lease_done(T0, &ModelId::from("m"), Ok(None));
        core.device_sample(T0, vec![reading(0.0, 0.0), reading(0.0, 0.0)]);
        core.handle_timeout(T0.saturating_add(Duration::from_millis(100)));
        drain(&mut core);
        // An hour of rest, then work; the closing reading hangs and is given up.
        let t = T0.saturating_add(Duration::from_secs(3600));
        core.lease_done(t, &ModelId::from("m"), Ok(Some(grant(1, 1))));
        let first = drain(&mut core);
        assert!(first.contains(&AgentAction::SampleDevices), "{first:?}");
        assert!(
            !first.iter().any(|a| matches!(a, AgentAction::Dispatch { .. })),
            "{first:?}"
        );
        let late = t.saturating_add(Duration::from_millis(300));
        core.handle_timeout(late);
        let (replica, unit, item) = drain(&mut core)
            .into_iter()
            .find_map(|a| match a {
                AgentAction::Dispatch { replica, unit, item } => Some((replica, unit, item)),
                _ => None,
            })
            .expect("dispatched once the reading is given up");
        // The request runs 2 s; the next good reading sees the whole hour plus those 2 s.
        let done = late.saturating_add(Duration::from_secs(2));
        core.engine_done(done, replica, unit, item.req, answered(5));
        core.handle_timeout(done);
        drain(&mut core);
        core.device_sample(
            done,
            vec![reading(360_000.0 + 1_400.0, 3602.3), reading(360_000.0, 3602.3)],
        );
        let attributed: f64 = core.replicas().map(|(_, s)| s.attributed_j).sum();
        assert_eq!(attributed, 0.0, "the unknown hour is not charged to the request");
    }

    #[test]
    fn an_overdue_device_sample_does_not_hold_results_back() {
        let mut core = started(4);
        drain(&mut core);
        core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 1))));
        let (replica, unit, item) = drain(&mut core)
            .into_iter()
            .find_map(|a| match a {
                AgentAction::Dispatch { replica, unit, item } => Some((replica, unit, item)),
                _ => None,
            })
            .unwrap();
        core.engine_done(T0, replica, unit, item.req, answered(5));
        // The sample asked for at T0 never comes back.
        let late = T0.saturating_add(Duration::from_millis(300));
        assert!(core.poll_timeout().unwrap() <= late);
        core.handle_timeout(late);
        core.handle_timeout(late.saturating_add(Duration::from_millis(20)));
        let reported = drain(&mut core)
            .into_iter()
            .any(|a| matches!(a, AgentAction::Report(r) if r.len() == 1));
        assert!(reported, "the finished request is reported without its energy share");
    }

    #[test]
    fn queued_work_of_units_the_control_plane_forgot_is_dropped() {
        let mut core = started(1);
        drain(&mut core);
        core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(7, 5))));
        let dispatched = drain(&mut core)
            .iter()
            .filter(|a| matches!(a, AgentAction::Dispatch { .. }))
            .count();
        assert_eq!(dispatched, 2, "one per replica");
        core.heartbeat_done(
            T0,
            Ok(HeartbeatReply {
                directives: vec![],
                unknown_units: vec![WorkUnitId(7)],
            }),
        );
        assert_eq!(
            core.held_units(),
            [WorkUnitId(7)],
            "still held until the two running requests are reported"
        );
        assert!(
            core.models.iter().all(|m| m.queue.is_empty()),
            "the three queued requests are dropped"
        );
    }

    #[test]
    fn shutdown_releases_queued_work_and_drains() {
        let mut core = started(1);
        drain(&mut core);
        core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 5))));
        let dispatched: Vec<_> = drain(&mut core)
            .into_iter()
            .filter_map(|a| match a {
                AgentAction::Dispatch { replica, unit, item } => Some((replica, unit, item)),
                _ => None,
            })
            .collect();
        core.shutdown(T0);
        let released: usize = drain(&mut core)
            .iter()
            .map(|a| match a {
                AgentAction::Release { items, .. } => items.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(released, 3);
        assert!(!core.is_drained());
        for (replica, unit, item) in dispatched {
            core.engine_done(T0, replica, unit, item.req, answered(1));
        }
        core.device_sample(T0, vec![None, None]);
        let report = drain(&mut core)
            .into_iter()
            .any(|a| matches!(a, AgentAction::Report(_)));
        assert!(report, "shutdown reports at once");
        core.report_acked(T0);
        assert!(core.held_units().is_empty());
        // Then the books close: a last device reading, then a last heartbeat carrying it.
        assert_eq!(drain(&mut core), [AgentAction::SampleDevices]);
        assert!(!core.is_drained());
        let reading = |j| {
            Some(EnergyReading {
                energy_j: j,
                clock_s: 1.0,
                tokens: None,
            })
        };
        core.device_sample(T0, vec![reading(50.0), reading(70.0)]);
        assert_eq!(drain(&mut core), [AgentAction::Heartbeat { held: vec![] }]);
        assert!(!core.is_drained(), "waits for the last heartbeat");
        core.heartbeat_done(T0, Err(false));
        assert!(core.is_drained(), "a failed last heartbeat does not hold the agent");
    }

    #[test]
    fn idle_devices_are_read_now_and_then_and_booked_as_idle() {
        let mut core = started(4);
        drain(&mut core);
        let reading = |j| {
            Some(EnergyReading {
                energy_j: j,
                clock_s: 0.0,
                tokens: None,
            })
        };
        core.device_sample(T0, vec![reading(0.0), reading(0.0)]);
        // Nothing runs: at the next sample time the agent rests instead of sampling.
        let t1 = T0.saturating_add(Duration::from_millis(100));
        core.handle_timeout(t1);
        assert!(!drain(&mut core).contains(&AgentAction::SampleDevices));
        // ... until the idle sample interval has passed.
        let t2 = t1.saturating_add(AgentConfig::default().idle_sample_interval);
        assert_eq!(core.poll_timeout().map(|t| t <= t2), Some(true));
        core.handle_timeout(t2);
        assert!(drain(&mut core).contains(&AgentAction::SampleDevices));
        core.device_sample(t2, vec![reading(350.0), reading(360.0)]);
        let idle: Vec<f64> = core.telemetry().iter().map(|r| r.idle_j).collect();
        assert_eq!(idle, [350.0, 360.0], "the whole rest so far is idle energy");
        assert!(core.telemetry().iter().all(|r| r.attributed_j == 0.0));
    }
}
