//! The event loop: tokenfab's live decision code on a virtual clock.
//!
//! Components and how they talk, as in the live system:
//! - one [`ControlCore`] (the control plane's brain);
//! - one [`AgentCore`] per node; its calls to the control plane are answered after
//!   `network.control_rtt`;
//! - one [`EngineModel`] per replica, driven by the agent's dispatches, reporting finished
//!   requests back to the agent; device samples read the engines' energy counters.
//!
//! Events are kept in a heap ordered by `(time, sequence number)`, so equal times resolve
//! in the order they were scheduled and a run is a pure function of scenario and seed.
//! Each component has at most one live timer; a timer superseded by an earlier one is
//! skipped when popped.

use crate::ScenarioError;
use crate::report::{BatchRecord, Collector};
use crate::scenario::Scenario;
use crate::workload::{RequestShape, Workload};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

/// Maps keyed by ids the simulator made: a fast fixed hash (never iterated, so order
/// does not matter).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;
use std::path::Path;
use std::time::Duration;
use tokenfab_core::agent::{AgentAction, AgentConfig, AgentCore, EnergyReading, EngineReply, PowerRange, ReplicaSpec};
use tokenfab_core::control::{
    Action, ControlConfig, ControlCore, HeartbeatReply, LeaseAnswer, LeaseGrant, NewBatch, NodeDevice,
    NodeRegistration, NodeReplica,
};
use tokenfab_core::durable::RequestMeta;
use tokenfab_core::engine::{EngineConfig, EngineModel};
use tokenfab_core::perf::ReplicaPerf;
use tokenfab_core::policy::Prices;
use tokenfab_core::protocol::{CallFailure, ControlInput, ControlReply};
use tokenfab_core::{
    AcceleratorId, BatchId, ModelId, NodeId, ReplicaId, RequestRef, SuperNodeId, TenantId, Timestamp, WorkUnitId,
};

#[derive(Debug, Clone, Copy)]
enum Kind {
    Arrival,
    Control,
    Agent(usize),
    Engine(usize),
    Series,
    /// The next of `Simulation::replies` (all replies take the same time, so they come
    /// back in the order they were sent).
    Reply,
}

#[derive(Debug, Clone)]
enum Reply {
    Registered,
    Lease(ModelId, Option<LeaseGrant>),
    Reported,
    Heartbeat(Result<HeartbeatReply, CallFailure>),
}

#[derive(Clone)]
struct Event {
    at: Timestamp,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Clone)]
pub(crate) struct Node {
    pub agent: AgentCore,
    pub id: NodeId,
    /// Engine index of each of the agent's replicas.
    pub engines: Vec<usize>,
    registration: NodeRegistration,
    wake: Option<Timestamp>,
}

#[derive(Clone)]
pub(crate) struct Engine {
    pub model: EngineModel,
    pub model_id: ModelId,
    pub pool: usize,
    pub devices: u32,
    wake: Option<Timestamp>,
}

#[derive(Clone)]
struct LiveBatch {
    tenant: usize,
    shapes: Vec<RequestShape>,
}

/// A simulation in progress. Cloning it forks the run (the oracle tries configurations
/// from the same state this way).
#[derive(Clone)]
pub struct Simulation<'a> {
    pub(crate) scenario: &'a Scenario,
    now: Timestamp,
    seq: u64,
    events: BinaryHeap<Reverse<Event>>,
    control: ControlCore,
    control_wake: Option<Timestamp>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) engines: Vec<Engine>,
    workload: Workload,
    arrivals_done: bool,
    batches: FastMap<BatchId, LiveBatch>,
    /// Tenant of every batch ever admitted (engines may finish work of ended batches).
    tenant_of: FastMap<BatchId, usize>,
    /// Requests of each batch handed to agents and not yet answered by an engine or
    /// released: an agent runs them even after their batch ended, as the live one does.
    outstanding: FastMap<BatchId, u32>,
    /// Request shapes of ended batches that agents still hold requests of.
    ended_shapes: FastMap<BatchId, Vec<RequestShape>>,
    /// Unit of every request running on an engine, by engine request id.
    running: FastMap<u64, WorkUnitId>,
    /// Prompt and output tokens and requests arrived per model and hour, for placement's
    /// advice.
    arrived_hourly: BTreeMap<(ModelId, u64), (u64, u64, u64)>,
    rtt: Duration,
    /// Replies on their way back to agents, in sending order.
    replies: VecDeque<(usize, Reply)>,
    /// Lease calls the control plane holds open, by ticket: the node that made them.
    waiting: FastMap<u64, usize>,
    next_ticket: u64,
    pub(crate) collector: Collector,
    dirty_agents: Vec<usize>,
    dirty_engines: Vec<usize>,
    /// (node, replica on the node) of every engine.
    owners: Vec<(usize, usize)>,
    event_count: u64,
}

fn engine_id(r: RequestRef) -> u64 {
    (r.batch.0 << 32) | u64::from(r.index)
}

fn request_ref(id: u64) -> RequestRef {
    RequestRef {
        batch: BatchId(id >> 32),
        index: id as u32,
    }
}

impl<'a> Simulation<'a> {
    /// Builds the cluster of `scenario`; trace files are read relative to `base`.
    pub fn new(scenario: &'a Scenario, base: &Path, seed: u64) -> Result<Self, ScenarioError> {
        let workload = Workload::new(scenario, base, seed)?;
        let (truth, belief) = scenario.profiles.load(base, &scenario.name)?;
        let models = scenario
            .deployments
            .iter()
            .map(|d| ModelId::new(d.model.clone()))
            .collect();
        let control = ControlCore::new(ControlConfig {
            models,
            usd_per_kwh: scenario.site.usd_per_kwh,
            pue: scenario.site.pue,
            // The simulated window is the scenario's; no batch may outlive the run.
            max_completion_window: Duration::from_secs(365 * 86400),
            // The report records each batch when it ends; the control plane then keeps it a
            // minute (for results that arrive late) instead of for ever, so that memory
            // does not grow with the batches that end. Deleted batches' usage stays in the
            // tenants' totals.
            retention: Some(Duration::from_secs(60)),
            // The SLA document at the end covers the whole run.
            sla_window: scenario.duration.max(Duration::from_secs(60)) * 2,
            tenant_weights: scenario
                .workload
                .tenants
                .iter()
                .map(|t| (TenantId::new(t.name.clone()), t.weight))
                .collect(),
            tenant_quotas: scenario
                .workload
                .tenants
                .iter()
                .filter(|t| t.max_active_batches.is_some() || t.output_tokens_per_hour.is_some())
                .map(|t| {
                    let quota = tokenfab_core::control::Quota {
                        max_active_batches: t.max_active_batches,
                        output_tokens_per_hour: t.output_tokens_per_hour,
                        ..Default::default()
                    };
                    (TenantId::new(t.name.clone()), quota)
                })
                .collect(),
            profiles: belief.clone(),
            ..scenario.policies.control_config()
        });
        let mut nodes = Vec::new();
        let mut engines = Vec::new();
        for (pi, pool) in scenario.pools.iter().enumerate() {
            let accelerator = AcceleratorId::new(pool.accelerator.clone());
            let domain = scenario.domain_size(pool);
            for n in 0..pool.nodes {
                let node_id = NodeId::new(format!("{}-{n}", pool.name));
                let mut specs = Vec::new();
                let mut node_engines = Vec::new();
                let mut replicas = Vec::new();
                let mut next_device = 0u32;
                let tuning = scenario.policies.tuner.mode == tokenfab_core::tuner::TunerMode::Active;
                for d in scenario.deployments.iter().filter(|d| d.pool == pool.name) {
                    let model = ModelId::new(d.model.clone());
                    let window = d.window.unwrap_or(scenario.policies.window);
                    let default_seqs = if tuning { 1024 } else { 256 };
                    let max_num_seqs = d.max_num_seqs.unwrap_or(default_seqs).max(window);
                    for _ in 0..scenario.replicas_per_node(d) {
                        let perf =
                            ReplicaPerf::believed(&model, &accelerator, d.tensor_parallel, &truth).map_err(|e| {
                                ScenarioError {
                                    file: scenario.name.clone(),
                                    path: "deployments".into(),
                                    message: e.to_string(),
                                }
                            })?;
                        let limit = pool.power_limit_w.unwrap_or(perf.max_power_w());
                        let power = PowerRange {
                            min_w: perf.min_power_w(),
                            max_w: perf.max_power_w(),
                            current_w: limit,
                        };
                        let engine = EngineModel::new(
                            perf,
                            EngineConfig {
                                max_num_seqs,
                                power_limit_w: limit,
                                ..EngineConfig::default()
                            },
                            Timestamp::ZERO,
                        );
                        let devices: Vec<u32> = (next_device..next_device + d.tensor_parallel).collect();
                        next_device += d.tensor_parallel;
                        let rid = ReplicaId::new(format!("r{}", specs.len()));
                        replicas.push(NodeReplica {
                            replica: rid.clone(),
                            model: model.clone(),
                            devices,
                            max_concurrency: max_num_seqs,
                            window,
                        });
                        specs.push(ReplicaSpec {
                            id: rid,
                            model: model.clone(),
                            devices: d.tensor_parallel,
                            window,
                            max_concurrency: max_num_seqs,
                            power: Some(power),
                            accelerator: Some(accelerator.clone()),
                        });
                        node_engines.push(engines.len());
                        engines.push(Engine {
                            model: engine,
                            model_id: model.clone(),
                            pool: pi,
                            devices: d.tensor_parallel,
                            wake: None,
                        });
                    }
                }
                let registration = NodeRegistration {
                    node: node_id.clone(),
                    super_node: SuperNodeId::new(node_id.to_string()),
                    devices: (0..pool.devices_per_node)
                        .map(|i| NodeDevice {
                            index: i,
                            accelerator: accelerator.clone(),
                            domain: i / domain,
                        })
                        .collect(),
                    replicas,
                    usd_per_device_hour: pool.price_usd_per_hour,
                };
                let prices = Prices::new(
                    pool.price_usd_per_hour,
                    Some(&accelerator),
                    scenario.site.usd_per_kwh,
                    scenario.site.pue,
                );
                let agent = AgentCore::new(
                    AgentConfig {
                        // The live agent samples idle devices every few seconds; the
                        // simulator's engines integrate idle energy exactly instead.
                        idle_sample_interval: Duration::ZERO,
                        profiles: belief.clone(),
                        ..scenario.policies.agent_config(prices)
                    },
                    specs,
                    Timestamp::ZERO,
                );
                nodes.push(Node {
                    agent,
                    id: node_id,
                    engines: node_engines,
                    registration,
                    wake: None,
                });
            }
        }
        let collector = Collector::new(scenario, &engines, seed);
        let mut owners = vec![(0, 0); engines.len()];
        for (n, node) in nodes.iter().enumerate() {
            for (r, &e) in node.engines.iter().enumerate() {
                owners[e] = (n, r);
            }
        }
        let mut sim = Simulation {
            scenario,
            now: Timestamp::ZERO,
            seq: 0,
            events: BinaryHeap::new(),
            control,
            control_wake: None,
            nodes,
            engines,
            workload,
            arrivals_done: false,
            batches: FastMap::default(),
            tenant_of: FastMap::default(),
            outstanding: FastMap::default(),
            ended_shapes: FastMap::default(),
            running: FastMap::default(),
            arrived_hourly: BTreeMap::new(),
            rtt: scenario.network.control_rtt,
            replies: VecDeque::new(),
            waiting: FastMap::default(),
            next_ticket: 0,
            collector,
            dirty_agents: Vec::new(),
            dirty_engines: Vec::new(),
            owners,
            event_count: 0,
        };
        match sim.workload.peek() {
            Some(t) => sim.push(t, Kind::Arrival),
            None => sim.arrivals_done = true,
        }
        sim.push(Timestamp::ZERO, Kind::Series);
        sim.dirty_agents = (0..sim.nodes.len()).collect();
        Ok(sim)
    }

    /// Requests of `grant` are now held by an agent.
    /// Work leased to an agent: counted as outstanding, and each request's prefix key
    /// filled in from its shape (what a live agent reads from the request body).
    fn granted(&mut self, grant: &mut LeaseGrant) {
        for i in &mut grant.items {
            *self.outstanding.entry(i.req.batch).or_default() += 1;
            i.prefix = self
                .batches
                .get(&i.req.batch)
                .and_then(|b| b.shapes.get(i.req.index as usize))
                .and_then(|s| s.prefix)
                .map(|p| p.key);
        }
    }

    /// A held request was answered or given back.
    fn answered(&mut self, batch: BatchId) {
        if let Some(n) = self.outstanding.get_mut(&batch) {
            *n -= 1;
            if *n == 0 {
                self.outstanding.remove(&batch);
                self.ended_shapes.remove(&batch);
            }
        }
    }

    /// A reply to agent `n`, arriving at `at` (now + the round-trip time).
    fn send(&mut self, at: Timestamp, n: usize, reply: Reply) {
        self.replies.push_back((n, reply));
        self.push(at, Kind::Reply);
    }

    fn push(&mut self, at: Timestamp, kind: Kind) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            at,
            seq: self.seq,
            kind,
        }));
    }

    /// Runs to the end: every arrival has come and every batch has ended. `progress` is
    /// called now and then with the simulated time reached.
    pub fn run(mut self, mut progress: impl FnMut(Timestamp)) -> crate::report::Report {
        self.run_until(Timestamp::MAX, &mut progress);
        self.finish(progress)
    }

    /// Sets every replica to one static configuration: `window` requests in flight (up to
    /// its engine's limit) and a power limit of `power_fraction` of the device maximum (at
    /// least the device minimum). For baselines and the oracle; a running tuner would move
    /// them again.
    pub fn set_static(&mut self, window: u32, power_fraction: f64) {
        let now = self.now;
        for (n, node) in self.nodes.iter_mut().enumerate() {
            for (r, &e) in node.engines.iter().enumerate() {
                node.agent.set_window(now, r, window);
                let model = &mut self.engines[e].model;
                let perf = model.perf();
                let watts = static_power_w(perf.min_power_w(), perf.max_power_w(), power_fraction);
                model.set_power_limit(now, watts);
                self.dirty_engines.push(e);
            }
            self.dirty_agents.push(n);
        }
    }

    /// Every replica's tuner status, node by node, in the agents' replica order (`None`
    /// where no tuner runs).
    pub fn tuners(&self) -> Vec<Option<tokenfab_core::tuner::TunerStatus>> {
        self.nodes.iter().flat_map(|n| n.agent.tuner_status()).collect()
    }

    /// Simulated time reached.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Each engine's concurrency window (its agent's).
    fn windows(&self) -> Vec<u32> {
        let mut out = vec![0; self.engines.len()];
        for node in &self.nodes {
            for ((_, stats), &e) in node.agent.replicas().zip(&node.engines) {
                out[e] = stats.window;
            }
        }
        out
    }

    /// Energy all replicas' devices drew so far, joules (devices no replica occupies draw
    /// constant idle power and are left out).
    pub fn energy_j(&self) -> f64 {
        self.engines.iter().map(|e| e.model.energy_j(self.now)).sum()
    }

    /// Output tokens of completed requests so far, batches ended so far and those of
    /// them that missed their deadline.
    pub fn progress(&self) -> (u64, usize, usize) {
        self.collector.progress()
    }

    /// Per model: the output rate its unfinished batches need to meet their deadlines,
    /// and what its replicas deliver flat out (window `window`, full power, a
    /// 512-prompt/256-output shape).
    pub fn backlog(&mut self, window: u32) -> Vec<(f64, f64)> {
        let models: std::collections::BTreeSet<ModelId> = self.engines.iter().map(|e| e.model_id.clone()).collect();
        let mut out = Vec::new();
        for model in models {
            let need = self.control.required_rate(&model);
            let have: f64 = self
                .engines
                .iter()
                .filter(|e| e.model_id == model)
                .map(|e| e.model.perf().capacity(window, tokenfab_core::perf::REFERENCE_SHAPE))
                .sum();
            out.push((need, have));
        }
        out
    }

    /// Runs every event up to `until`, or to the end of the run; the clock then stands at
    /// `until` (or the run's last event). Returns true once the run is over.
    pub fn run_until(&mut self, until: Timestamp, progress: &mut impl FnMut(Timestamp)) -> bool {
        self.settle();
        while self.events.peek().is_some_and(|Reverse(ev)| ev.at <= until) {
            let Reverse(ev) = self.events.pop().expect("peeked");
            self.now = ev.at;
            self.event_count += 1;
            if self.event_count.is_multiple_of(65_536) {
                progress(self.now);
            }
            match ev.kind {
                Kind::Arrival => self.arrive(),
                Kind::Control => {
                    if self.control_wake == Some(ev.at) {
                        self.control_wake = None;
                        self.control.handle_timeout(self.now);
                    }
                }
                Kind::Agent(n) => {
                    if self.nodes[n].wake == Some(ev.at) {
                        self.nodes[n].wake = None;
                        self.nodes[n].agent.handle_timeout(self.now);
                        self.dirty_agents.push(n);
                    }
                }
                Kind::Engine(e) => {
                    if self.engines[e].wake == Some(ev.at) {
                        self.engines[e].wake = None;
                        self.step_engine(e);
                    }
                }
                Kind::Reply => {
                    let (n, reply) = self.replies.pop_front().expect("one reply per reply event");
                    self.reply(n, reply);
                }
                Kind::Series => {
                    self.catch_up_engines();
                    let windows = self.windows();
                    self.collector
                        .sample(self.now, &self.engines, &windows, self.control.pending_requests());
                    if !self.finished() {
                        let next = self.now.saturating_add(self.collector.interval);
                        self.push(next, Kind::Series);
                    }
                }
            }
            self.settle();
            if self.finished() {
                return true;
            }
        }
        if self.events.is_empty() {
            return true;
        }
        self.now = self.now.max(until);
        self.catch_up_engines();
        false
    }

    /// Ends the run: the books are closed and the report written.
    pub fn finish(mut self, mut progress: impl FnMut(Timestamp)) -> crate::report::Report {
        let events = self.event_count;
        // The cluster is there (and billed, and drawing idle power) for the whole
        // scenario, even when the last batch ends before it does.
        self.now = self.now.max(self.duration_end());
        progress(self.now);
        self.catch_up_engines();
        // The agents read their devices one last time, so that their books (energy
        // attributed to requests, and idle) run to the end.
        for n in 0..self.nodes.len() {
            self.nodes[n].agent.sample_now(self.now);
            self.perform(n);
            // ... and tell the control plane, which shares the idle energy among tenants.
            let telemetry = self.nodes[n].agent.telemetry();
            let _ = self.control.heartbeat(self.now, &self.nodes[n].id, &[], telemetry);
        }
        let windows = self.windows();
        self.collector
            .sample(self.now, &self.engines, &windows, self.control.pending_requests());
        let end = self.now;
        let sla = self.control.sla_document(end);
        let fragmentation = self.control.fragmentation();
        let advice = self.placement_advice();
        let agents: Vec<_> = self
            .nodes
            .iter()
            .flat_map(|n| n.agent.replicas().map(|(_, s)| s))
            .collect();
        let mut report = self
            .collector
            .finish(end, &self.engines, &agents, &self.control, events);
        report.sla = Some(sla);
        report.fragmentation = fragmentation;
        for e in &self.engines {
            let st = e.model.stats();
            report.prefix_lookups += st.prefix_lookups;
            report.prefix_hits += st.prefix_hits;
            report.cached_prompt_tokens += st.cached_prompt_tokens;
        }
        report.placement_advice = advice;
        for node in &self.nodes {
            let status = node.agent.tuner_status();
            for (((spec, stats), &e), tuner) in node.agent.replicas().zip(&node.engines).zip(status) {
                report.replicas.push(crate::report::ReplicaEnd {
                    node: node.id.to_string(),
                    replica: spec.id.to_string(),
                    window: tuner.as_ref().map_or(stats.window, |t| t.home_window),
                    power_limit_w: tuner
                        .as_ref()
                        .and_then(|t| t.home_power_limit_w)
                        .unwrap_or_else(|| self.engines[e].model.power_limit_w()),
                    tuner_moves: tuner.map_or(0, |t| t.moves),
                });
            }
        }
        report
    }

    /// Placement's layout for each model's busiest hour of arrivals.
    fn placement_advice(&self) -> Option<tokenfab_core::control::PlanView> {
        let demands = tokenfab_core::placement::Demand::busiest_hours(
            self.arrived_hourly.iter().map(|((model, _), &work)| (model, work)),
        );
        (!demands.is_empty()).then(|| self.control.plan_for(&demands))
    }

    /// Brings every engine to `now`: engines skip ahead over steps in which nothing
    /// finishes, and their energy and counters are read at `now`.
    fn catch_up_engines(&mut self) {
        for e in &mut self.engines {
            e.model.handle_timeout(self.now);
        }
    }

    /// Every batch has arrived and ended, and the scenario's duration is over (the
    /// cluster runs, idles and is billed until then).
    fn finished(&self) -> bool {
        self.arrivals_done && self.batches.is_empty() && self.now >= self.duration_end()
    }

    fn duration_end(&self) -> Timestamp {
        Timestamp::ZERO.saturating_add(self.scenario.duration)
    }

    fn arrive(&mut self) {
        let Some(a) = self.workload.pop() else { return };
        let tenant = &self.scenario.workload.tenants[a.tenant];
        let requests: Vec<RequestMeta> = a
            .requests
            .iter()
            .enumerate()
            .map(|(i, r)| RequestMeta {
                line: i as u32 + 1,
                prompt_tokens_estimate: r.prompt,
                max_tokens: Some(r.output),
                // A chat body holds about four bytes per prompt token.
                body_bytes: r.prompt.saturating_mul(4),
            })
            .collect();
        let new = NewBatch {
            tenant: TenantId::new(tenant.name.clone()),
            model: ModelId::new(tenant.model.clone()),
            sla_class: tenant.sla_class.clone(),
            completion_window: Some(tenant.completion_window),
            metadata: BTreeMap::new(),
            endpoint: tokenfab_core::batch_input::Endpoint::ChatCompletions,
            input_bytes: 0,
            line_error_bytes: 0,
            input_file: None,
            lines: requests.len() as u32,
            invalid_lines: 0,
            requests,
            best_effort_if_late: tenant.best_effort_if_late,
        };
        let hour = self.now.as_micros() / 3_600_000_000;
        let e = self
            .arrived_hourly
            .entry((ModelId::new(tenant.model.clone()), hour))
            .or_default();
        for r in &a.requests {
            *e = (e.0 + u64::from(r.prompt), e.1 + u64::from(r.output), e.2 + 1);
        }
        let ControlReply::Submitted(answer) = self.control.handle(self.now, ControlInput::Submit(new)) else {
            unreachable!("a submission is answered as one")
        };
        // The simulated store commits at once and never fails: what the core asked to
        // persist is durable as soon as it asked.
        let persisted = self.control.advance(self.control.handled());
        match answer.release(persisted).expect("the simulated store has committed it") {
            Ok(view) => {
                self.collector.arrived(a.tenant, &a.requests);
                self.tenant_of.insert(view.meta.id, a.tenant);
                self.batches.insert(
                    view.meta.id,
                    LiveBatch {
                        tenant: a.tenant,
                        shapes: a.requests,
                    },
                );
            }
            Err(e) => self.collector.refused(a.tenant, a.requests.len(), e.to_string()),
        }
        match self.workload.peek() {
            Some(t) => self.push(t, Kind::Arrival),
            None => self.arrivals_done = true,
        }
    }

    fn step_engine(&mut self, e: usize) {
        self.engines[e].model.handle_timeout(self.now);
        self.dirty_engines.push(e);
        while let Some(f) = self.engines[e].model.poll_finished() {
            let Some(unit) = self.running.remove(&f.id) else {
                continue;
            };
            let req = request_ref(f.id);
            self.answered(req.batch);
            if let Some(&t) = self.tenant_of.get(&req.batch) {
                self.collector.served(t, f.completion_tokens, self.now);
            }
            let (node, replica) = self.owner(e);
            let reply = EngineReply::Answered {
                status_code: 200,
                body: Vec::new(),
                request_id: String::new(),
                prompt_tokens: u64::from(f.prompt_tokens),
                completion_tokens: u64::from(f.completion_tokens),
            };
            self.nodes[node].agent.engine_done(self.now, replica, unit, req, reply);
            self.dirty_agents.push(node);
        }
    }

    fn owner(&self, engine: usize) -> (usize, usize) {
        self.owners[engine]
    }

    fn reply(&mut self, n: usize, reply: Reply) {
        let now = self.now;
        let agent = &mut self.nodes[n].agent;
        match reply {
            Reply::Registered => agent.registered(now, self.control.config().heartbeat_interval),
            Reply::Lease(model, grant) => agent.lease_done(now, &model, Ok(grant)),
            Reply::Reported => agent.report_acked(now),
            Reply::Heartbeat(r) => agent.heartbeat_done(now, r),
        }
        self.dirty_agents.push(n);
    }

    /// Performs what components asked for until nothing is left, then re-arms timers.
    fn settle(&mut self) {
        loop {
            self.drain_control();
            let Some(n) = self.dirty_agents.pop() else { break };
            self.perform(n);
            let want = self.nodes[n].agent.poll_timeout();
            if let Some(t) = want.filter(|&t| self.nodes[n].wake.is_none_or(|w| t < w)) {
                self.nodes[n].wake = Some(t.max(self.now));
                self.push(t.max(self.now), Kind::Agent(n));
            }
        }
        while let Some(e) = self.dirty_engines.pop() {
            let want = self.engines[e].model.poll_timeout();
            if let Some(t) = want.filter(|&t| self.engines[e].wake.is_none_or(|w| t < w)) {
                self.engines[e].wake = Some(t);
                self.push(t, Kind::Engine(e));
            }
        }
        let want = self.control.poll_timeout();
        if let Some(t) = want.filter(|&t| self.control_wake.is_none_or(|w| t < w)) {
            self.control_wake = Some(t.max(self.now));
            self.push(t.max(self.now), Kind::Control);
        }
    }

    fn drain_control(&mut self) {
        while let Some(a) = self.control.poll_action() {
            let id = match a {
                Action::BatchChanged(id) => id,
                Action::LeaseReady {
                    ticket, model, grant, ..
                } => {
                    let n = self.waiting.remove(&ticket).expect("a waiting lease of a node");
                    // The call was made a while ago; only the answer travels now. All
                    // replies take the same time, so they stay in order.
                    let at = self.now.saturating_add(self.rtt);
                    let mut grant = grant;
                    if let Some(g) = &mut grant {
                        self.granted(g);
                    }
                    self.send(at, n, Reply::Lease(model, grant));
                    continue;
                }
                Action::Persist(_) => continue,
            };
            let Some(view) = self.control.view(id) else { continue };
            let status = view.life.status();
            if !status.is_terminal() {
                continue;
            }
            if let Some(b) = self.batches.remove(&id) {
                if self.outstanding.contains_key(&id) {
                    self.ended_shapes.insert(id, b.shapes);
                }
                self.collector.ended(BatchRecord {
                    tenant: b.tenant,
                    sla_class: view.meta.sla_class.clone(),
                    arrived: view.life.created_at,
                    ended: view.life.ended_at().unwrap_or(self.now),
                    deadline: view.meta.deadline,
                    met: tokenfab_core::sla::deadline_met(status, view.life.ended_at(), view.meta.deadline),
                    status,
                    requests: view.meta.requests,
                    completed: view.counts.completed,
                    failed: view.counts.failed,
                    usage: view.usage,
                });
            }
        }
    }

    fn perform(&mut self, n: usize) {
        let now = self.now;
        let at = now.saturating_add(self.rtt);
        while let Some(action) = self.nodes[n].agent.poll_action() {
            match action {
                AgentAction::Register => {
                    let reg = self.nodes[n].registration.clone();
                    self.control.register(now, reg);
                    self.send(at, n, Reply::Registered);
                }
                AgentAction::Lease { model, max, wait } => {
                    self.next_ticket += 1;
                    let ticket = self.next_ticket;
                    let until = now.saturating_add(wait);
                    let answer = self
                        .control
                        .lease_or_wait(now, &self.nodes[n].id, &model, max, until, ticket)
                        .expect("simulated nodes are registered");
                    match answer {
                        LeaseAnswer::Granted(mut g) => {
                            self.granted(&mut g);
                            self.send(at, n, Reply::Lease(model, Some(g)));
                        }
                        LeaseAnswer::Empty => self.send(at, n, Reply::Lease(model, None)),
                        LeaseAnswer::Waiting => {
                            self.waiting.insert(ticket, n);
                        }
                    }
                }
                AgentAction::Dispatch { replica, unit, item } => {
                    let e = self.nodes[n].engines[replica];
                    let shape = self
                        .batches
                        .get(&item.req.batch)
                        .map(|b| &b.shapes)
                        .or_else(|| self.ended_shapes.get(&item.req.batch))
                        .and_then(|shapes| shapes.get(item.req.index as usize))
                        .copied();
                    let id = engine_id(item.req);
                    let submitted = shape.map(|s| {
                        self.engines[e]
                            .model
                            .submit_with_prefix(now, id, s.prompt, s.output, s.prefix)
                    });
                    match submitted {
                        Some(Ok(())) => {
                            self.running.insert(id, unit);
                            self.dirty_engines.push(e);
                        }
                        // The engine refused the request (or, defensively, its shape is
                        // unknown): answer as the engine would.
                        other => {
                            self.answered(item.req.batch);
                            let message = match other {
                                Some(Err(err)) => err.to_string(),
                                _ => "batch no longer running".into(),
                            };
                            let body = format!("{{\"error\":{{\"message\":{}}}}}", serde_json::Value::String(message))
                                .into_bytes();
                            let reply = EngineReply::Answered {
                                status_code: 400,
                                body,
                                request_id: String::new(),
                                prompt_tokens: 0,
                                completion_tokens: 0,
                            };
                            self.nodes[n].agent.engine_done(now, replica, unit, item.req, reply);
                        }
                    }
                }
                AgentAction::Report(results) => {
                    let node = self.nodes[n].id.clone();
                    // The agent's answer does not depend on the summary (the shell only
                    // says the call got through), so it is not opened here.
                    // The agent keeps its own copy until the call is answered.
                    let results = results.as_ref().clone();
                    let _ = self.control.handle(now, ControlInput::Report { node, results });
                    self.send(at, n, Reply::Reported);
                }
                AgentAction::Heartbeat { held } => {
                    let telemetry = self.nodes[n].agent.telemetry();
                    let r = self
                        .control
                        .heartbeat(now, &self.nodes[n].id, &held, telemetry)
                        .map_err(|_| CallFailure::UnknownNode);
                    self.send(at, n, Reply::Heartbeat(r));
                }
                AgentAction::SampleDevices => {
                    for &e in &self.nodes[n].engines {
                        self.engines[e].model.handle_timeout(now);
                    }
                    let readings = self.nodes[n]
                        .engines
                        .iter()
                        .map(|&e| {
                            Some(EnergyReading {
                                energy_j: self.engines[e].model.energy_j(now),
                                clock_s: now.as_secs_f64(),
                                tokens: Some(self.engines[e].model.stats().completion_tokens),
                            })
                        })
                        .collect();
                    self.nodes[n].agent.device_sample(now, readings);
                }
                AgentAction::SetPowerLimit { replica, watts } => {
                    let e = self.nodes[n].engines[replica];
                    self.engines[e].model.set_power_limit(now, watts);
                    self.dirty_engines.push(e);
                    let applied = self.engines[e].model.power_limit_w();
                    self.nodes[n].agent.power_limit_done(now, replica, Ok(applied));
                }
                AgentAction::Tuned { .. } => self.collector.tuned(),
                AgentAction::Release { unit, items } => {
                    for r in &items {
                        self.answered(r.batch);
                    }
                    let _ = self.control.release(now, &self.nodes[n].id, unit, &items);
                }
            }
        }
    }
}

/// The power limit a static setting of `power_fraction` means on a device whose limit
/// ranges from `min_w` to `max_w`: that share of the maximum, never below the minimum (0 is
/// the minimum). The oracle and the hindsight-static grid of `sim compare` both use it.
pub fn static_power_w(min_w: f64, max_w: f64, power_fraction: f64) -> f64 {
    (max_w * power_fraction).clamp(min_w, max_w)
}
