//! The control plane's brain: batches, the queue, work-unit leasing and exactly-once
//! result recording.
//!
//! [`ControlCore`] is a deterministic state machine. Commands that need an answer
//! (`submit`, `lease`, `report`, ...) are methods that return it at once; every change
//! that must survive a crash is also queued as [`Action::Persist`]. The shell's contract:
//! **drain [`ControlCore::poll_action`] and make every `Persist` durable before sending
//! any reply produced by the calls that came before**. Draining after many calls and
//! committing once is allowed (group commit); replying first is not.
//!
//! Timers: after any call, [`ControlCore::poll_timeout`] says when to call
//! [`ControlCore::handle_timeout`] next (lease expiry, batch deadlines).

use crate::batch::{BatchStatus, Lifecycle, TransitionError};
use crate::catalog::Catalog;
use crate::durable::{
    BatchMeta, BatchTotals, DurableOp, FileMeta, Outcome, RecordedResult, RecoveredBatch, RequestMeta,
};
use crate::ids::{AcceleratorId, BatchId, FileId, ModelId, NodeId, RequestRef, SuperNodeId, TenantId, WorkUnitId};
use crate::perf::{REFERENCE_SHAPE, length_bucket};
use crate::time::Timestamp;
use crate::usage::{DEFAULT_PUE, DEFAULT_USD_PER_KWH, Pricing, Usage};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Settings of the control core.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ControlConfig {
    /// How long a lease lives without a heartbeat from its agent.
    pub lease_ttl: Duration,
    /// How often agents should heartbeat.
    pub heartbeat_interval: Duration,
    /// Tries per request (leases that expired count) before it fails with `retries_exhausted`.
    pub max_attempts: u32,
    pub default_completion_window: Duration,
    pub max_completion_window: Duration,
    /// SLA classes a batch may name, highest priority first (see [`SlaClass`]). Work of a
    /// class is served before work of every class after it; committed classes must all
    /// come before best-effort ones.
    pub sla_classes: Vec<SlaClass>,
    /// The class of batches that name none.
    pub default_sla_class: String,
    /// How committed work is ordered within a class.
    pub queue_order: QueueOrder,
    /// The required rate each model is told to deliver plans to finish every batch within
    /// this share of the time left to its deadline (0 < x <= 1; the rest is reserve).
    pub deadline_share: f64,
    /// Placement: which registered replicas take work (see [`crate::placement`]).
    pub placement: PlacementMode,
    pub activation: crate::placement::ActivationConfig,
    /// What placement minimizes per token when it ranks replicas.
    pub placement_objective: crate::placement::PlacementObjective,
    /// Models batches may run on.
    pub models: BTreeSet<ModelId>,
    pub usd_per_kwh: f64,
    pub pue: f64,
    /// Refuse batches of committed classes whose deadline the cluster cannot meet (see
    /// [`crate::admission`]).
    pub admission: bool,
    /// Share of the estimated capacity admission counts on (0 < x <= 1).
    pub admission_headroom: f64,
    /// Tenants' shares of spare capacity (default 1): best-effort work is handed out by
    /// weighted fair queueing over the output tokens each tenant has been given.
    pub tenant_weights: BTreeMap<TenantId, f64>,
    /// Tenants' quotas (none unless configured). A limit a tenant's quota leaves unset is
    /// taken from `default_quota`.
    pub tenant_quotas: BTreeMap<TenantId, Quota>,
    /// Limits for every tenant (none by default here; the server sets
    /// [`Quota::SERVER_DEFAULT`]).
    pub default_quota: Quota,
    /// The window the throughput SLA is measured over.
    pub sla_window: Duration,
    /// How much request-body data one lease may carry, bytes (at least one request is
    /// always leased): a lease's reply must fit the transport's message limit.
    pub lease_max_bytes: u64,
    /// How long a batch is kept after it reached its final status (its record, results and
    /// errors); then it is deleted, and its usage kept in its tenant's history. `None`:
    /// kept until its tenant deletes it (the simulator's choice; the server's default is
    /// 30 days).
    pub retention: Option<Duration>,
    /// Retention for particular tenants.
    pub tenant_retention: BTreeMap<TenantId, Duration>,
    /// New batches are refused while the store has less free space than this, bytes, so
    /// that the results of running work can still be recorded.
    pub min_free_bytes: u64,
}

/// An SLA class. Its priority is its place in [`ControlConfig::sla_classes`].
///
/// A *committed* class is admission-checked: a batch is accepted only if its deadline can
/// be met without making any admitted committed batch late, and committed work is
/// ordered by deadline slack. A *best-effort* class is never refused for lack of
/// capacity; its work runs only when no work of a higher class waits, shared between
/// tenants by weight.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlaClass {
    pub name: String,
    pub committed: bool,
}

impl SlaClass {
    pub fn committed(name: &str) -> Self {
        SlaClass {
            name: name.into(),
            committed: true,
        }
    }
    pub fn best_effort(name: &str) -> Self {
        SlaClass {
            name: name.into(),
            committed: false,
        }
    }
    /// `standard` (committed) then `best-effort`.
    pub fn defaults() -> Vec<SlaClass> {
        vec![SlaClass::committed("standard"), SlaClass::best_effort("best-effort")]
    }

    /// Checks a list of classes in priority order and the default class: names unique and
    /// not empty, every committed class before every best-effort one.
    pub fn check(classes: &[SlaClass], default: &str) -> Result<(), String> {
        if classes.is_empty() {
            return Err("at least one SLA class is needed".into());
        }
        for (i, c) in classes.iter().enumerate() {
            if c.name.trim().is_empty() {
                return Err(format!("SLA class {} has an empty name", i + 1));
            }
            if classes[..i].iter().any(|o| o.name == c.name) {
                return Err(format!("SLA class '{}' is listed twice", c.name));
            }
            if c.committed && classes[..i].iter().any(|o| !o.committed) {
                return Err(format!(
                    "committed SLA class '{}' comes after a best-effort class: list classes highest priority first, committed ones before best-effort ones (best-effort work must never delay a promise)",
                    c.name
                ));
            }
        }
        if !classes.iter().any(|c| c.name == default) {
            return Err(format!(
                "the default SLA class '{default}' is not one of the classes ({})",
                join(classes.iter().map(|c| &c.name))
            ));
        }
        Ok(())
    }
}

/// Whether placement decides which replicas take work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementMode {
    /// Every registered replica takes work.
    Off,
    /// Placement decides and shows which replicas it would park, but parks none.
    Advisory,
    /// Placement parks surplus replicas: they take no work and idle.
    Active,
}

/// How committed batches of one class are ordered for leasing.
///
/// Measured on the mixed-fleet scenario overloaded (one H100 node, 3 seeds): with
/// admission on both orders kept 99.95-100% of batches on time; with admission off,
/// earliest deadline first kept 0.5-1.0 points more batches on time than least slack
/// first (which favours big batches due later), so it is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOrder {
    /// Least slack first: the batch whose pending work must start soonest to meet its
    /// deadline (deadline minus the time that work needs at the model's capacity).
    Slack,
    /// Earliest deadline first.
    Deadline,
}

/// What one tenant may have in the system.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quota {
    /// Unfinished batches at once.
    pub max_active_batches: Option<u32>,
    /// Output tokens (as asked by `max_tokens`) submitted over any hour.
    pub output_tokens_per_hour: Option<u64>,
    /// Requests of unfinished batches without a result yet.
    pub max_queued_requests: Option<u64>,
    /// Bytes the tenant's batches hold in the store: inputs of unfinished batches and
    /// results (and error records) of every batch not yet deleted.
    pub max_stored_bytes: Option<u64>,
}

impl Quota {
    /// What the control plane allows every tenant unless configured otherwise: enough
    /// for heavy use, little enough that one tenant cannot fill the control plane's
    /// memory or disk for the others.
    pub const SERVER_DEFAULT: Quota = Quota {
        max_active_batches: Some(1_000),
        output_tokens_per_hour: None,
        max_queued_requests: Some(2_000_000),
        max_stored_bytes: Some(50 << 30),
    };

    /// This quota, with each limit it leaves unset taken from `default`.
    pub fn or(self, default: Quota) -> Quota {
        Quota {
            max_active_batches: self.max_active_batches.or(default.max_active_batches),
            output_tokens_per_hour: self.output_tokens_per_hour.or(default.output_tokens_per_hour),
            max_queued_requests: self.max_queued_requests.or(default.max_queued_requests),
            max_stored_bytes: self.max_stored_bytes.or(default.max_stored_bytes),
        }
    }

    fn is_unlimited(&self) -> bool {
        *self == Quota::default()
    }
}

/// OpenAI's Batch API limits on batch metadata, which tokenfab applies too.
pub const MAX_METADATA_PAIRS: usize = 16;
pub const MAX_METADATA_KEY_CHARS: usize = 64;
pub const MAX_METADATA_VALUE_CHARS: usize = 512;

/// Checks a batch's metadata against [`MAX_METADATA_PAIRS`] and the key and value
/// lengths. The shell may call it before reading an upload, to refuse early.
pub fn check_metadata<'a>(metadata: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<(), SubmitError> {
    let mut pairs = 0;
    for (k, v) in metadata {
        pairs += 1;
        if pairs > MAX_METADATA_PAIRS {
            return Err(SubmitError::Metadata(format!(
                "more than {MAX_METADATA_PAIRS} key-value pairs; keep at most {MAX_METADATA_PAIRS}"
            )));
        }
        let shown: String = k.chars().take(40).collect();
        if k.is_empty() {
            return Err(SubmitError::Metadata("a key is empty".into()));
        }
        if k.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(SubmitError::Metadata(format!(
                "key '{shown}...' is {} characters, over the limit of {MAX_METADATA_KEY_CHARS}",
                k.chars().count()
            )));
        }
        if v.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(SubmitError::Metadata(format!(
                "the value of '{shown}' is {} characters, over the limit of {MAX_METADATA_VALUE_CHARS}",
                v.chars().count()
            )));
        }
    }
    Ok(())
}

impl Default for ControlConfig {
    /// The default policies ([`crate::policy::Policies::default`]) and deployment.
    fn default() -> Self {
        crate::policy::Policies::default().control_config()
    }
}

impl ControlConfig {
    /// The deployment settings at their defaults. The fields that come from policy hold
    /// placeholders here: [`crate::policy::Policies::control_config`] sets them.
    pub(crate) fn deployment_defaults() -> Self {
        ControlConfig {
            lease_ttl: Duration::ZERO,
            heartbeat_interval: Duration::ZERO,
            max_attempts: 0,
            sla_classes: Vec::new(),
            default_sla_class: String::new(),
            queue_order: QueueOrder::Deadline,
            deadline_share: 0.0,
            placement: PlacementMode::Off,
            activation: crate::placement::ActivationConfig::default(),
            admission: false,
            admission_headroom: 0.0,
            default_completion_window: Duration::from_secs(24 * 3600),
            max_completion_window: Duration::from_secs(7 * 24 * 3600),
            placement_objective: crate::placement::PlacementObjective::Energy,
            models: Catalog::builtin().model_ids().into_iter().collect(),
            usd_per_kwh: DEFAULT_USD_PER_KWH,
            pue: DEFAULT_PUE,
            tenant_weights: BTreeMap::new(),
            tenant_quotas: BTreeMap::new(),
            default_quota: Quota::default(),
            sla_window: Duration::from_secs(3600),
            lease_max_bytes: DEFAULT_LEASE_MAX_BYTES,
            retention: None,
            tenant_retention: BTreeMap::new(),
            min_free_bytes: 1 << 30,
        }
    }
}

/// The default [`ControlConfig::lease_max_bytes`]: far below gRPC message limits, and
/// still hundreds of typical requests per lease.
pub const DEFAULT_LEASE_MAX_BYTES: u64 = 16 << 20;

/// What a leased request adds to a lease reply beyond its body (its custom_id of at most
/// 512 bytes, ids, url, framing), bytes.
pub const LEASED_ITEM_OVERHEAD_BYTES: u64 = 640;

/// A batch that passed input validation, as the shell hands it to the core.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NewBatch {
    pub tenant: TenantId,
    pub model: ModelId,
    pub sla_class: Option<String>,
    pub completion_window: Option<Duration>,
    pub metadata: BTreeMap<String, String>,
    pub endpoint: crate::batch_input::Endpoint,
    pub input_bytes: u64,
    /// What the refused lines' errors take in the store (kept with the results).
    pub line_error_bytes: u64,
    /// The uploaded file it is created from, if any (its owner is checked by the core).
    pub input_file: Option<FileId>,
    pub lines: u32,
    pub invalid_lines: u32,
    pub requests: Vec<RequestMeta>,
    /// If the deadline cannot be met, accept the batch as best-effort instead of refusing it.
    pub best_effort_if_late: bool,
}

impl NewBatch {
    /// A batch of the valid requests of `parsed`, for `tenant` on `model`, with the
    /// server's defaults for everything the tenant did not choose.
    pub fn from_parsed(tenant: TenantId, model: ModelId, parsed: &crate::batch_input::ParsedInput) -> NewBatch {
        NewBatch {
            tenant,
            model,
            sla_class: None,
            completion_window: None,
            metadata: BTreeMap::new(),
            endpoint: parsed.endpoint,
            input_bytes: parsed.bytes,
            line_error_bytes: parsed
                .line_errors
                .iter()
                .map(crate::batch_input::LineError::stored_bytes)
                .sum(),
            input_file: None,
            lines: parsed.lines,
            invalid_lines: parsed.line_errors.len() as u32,
            requests: parsed.requests.iter().map(RequestMeta::from).collect(),
            best_effort_if_late: false,
        }
    }
}

/// A refused submission.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("unknown model '{model}': this cluster serves {served}")]
    UnknownModel { model: ModelId, served: String },
    #[error("unknown SLA class '{class}': choose one of {known}")]
    UnknownSlaClass { class: String, known: String },
    #[error("completion window {asked_s} s is too long: the most this cluster accepts is {max_s} s")]
    WindowTooLong { asked_s: u64, max_s: u64 },
    #[error("the batch has no valid request")]
    NoRequests,
    #[error("metadata: {0} (as in the OpenAI Batch API)")]
    Metadata(String),
    #[error("input file {0} not found for this tenant; upload it first (POST /v1/files)")]
    UnknownFile(FileId),
    #[error(
        "tenant '{tenant}' may have {limit} requests waiting; it has {queued} and this batch adds {asked}; submit it when more of them have finished"
    )]
    TooManyQueued {
        tenant: TenantId,
        limit: u64,
        queued: u64,
        asked: u64,
    },
    #[error(
        "tenant '{tenant}' may keep {limit} in the store; its batches hold {stored} and this one adds {asked}; delete finished batches you no longer need (tokenfab batches delete ID) and retry"
    )]
    StoredBytes {
        tenant: TenantId,
        limit: String,
        stored: String,
        asked: String,
    },
    #[error(
        "the control plane's disk is nearly full ({free} free, {min} are kept for the results of running work): new batches are refused until an operator frees space; running batches continue"
    )]
    StorageLow { free: String, min: String },
    #[error(
        "tenant '{tenant}' already has {active} unfinished batches, its quota; submit this one when one of them has finished (or cancel one)"
    )]
    TooManyBatches { tenant: TenantId, active: u32 },
    #[error(
        "tenant '{tenant}' may submit {quota} output tokens per hour: {used} were asked for in the last hour and this batch asks for {asked}; retry in {retry_in}, or split the batch"
    )]
    TokenQuota {
        tenant: TenantId,
        quota: u64,
        used: u64,
        asked: u64,
        retry_in: String,
    },
    #[error(
        "the batch cannot complete within its {window} window: with the work already committed on {model} and the capacity serving it, the earliest completion that can be promised is in {earliest_in}; ask for a completion window of at least {earliest_in}, or submit it as best-effort"
    )]
    Late {
        model: ModelId,
        window: String,
        /// The earliest deadline that would be admitted.
        earliest: Timestamp,
        earliest_in: String,
    },
    #[error(
        "the batch cannot be admitted in SLA class '{class}' on {model}: its class is served before lower ones, and its work would make batches already admitted in a lower class miss their deadlines; submit it in a lower class, later, or as best-effort"
    )]
    NoRoomInClass { model: ModelId, class: String },
}

/// A tenant command on a batch that cannot be carried out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// Also returned for another tenant's batch, so ids of others cannot be probed.
    #[error("batch {0} not found for this tenant")]
    NotFound(BatchId),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("{0} is {1}: only a finished batch can be deleted; cancel it first")]
    NotFinished(BatchId, BatchStatus),
}

/// A tenant command on a file that cannot be carried out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FileError {
    /// Also returned for another tenant's file.
    #[error("file {0} not found for this tenant")]
    NotFound(FileId),
}

/// An agent call from a node the core does not know.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("node '{0}' is not registered (the control plane may have restarted); register again")]
pub struct UnknownNode(pub NodeId);

/// Counts of a batch's requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub total: u32,
    pub completed: u32,
    pub failed: u32,
    pub invalid: u32,
}

/// A batch as queries see it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchView {
    pub meta: BatchMeta,
    pub life: Lifecycle,
    pub counts: Counts,
    pub usage: Usage,
}

/// One device of a registered node.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeDevice {
    pub index: u32,
    pub accelerator: AcceleratorId,
    pub domain: u32,
}

/// One engine replica of a registered node.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeReplica {
    pub replica: crate::ids::ReplicaId,
    pub model: ModelId,
    pub devices: Vec<u32>,
    pub max_concurrency: u32,
    /// The agent's concurrency window on the replica (0: unknown, `max_concurrency` used).
    pub window: u32,
}

/// A node announcing itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRegistration {
    pub node: NodeId,
    pub super_node: SuperNodeId,
    pub devices: Vec<NodeDevice>,
    pub replicas: Vec<NodeReplica>,
    /// What a device-hour of this node costs, where the operator says; otherwise the
    /// catalog's indicative price for its accelerator.
    pub usd_per_device_hour: Option<f64>,
}

/// One request handed to an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeasedItem {
    pub req: RequestRef,
    /// 1 for the first try.
    pub attempt: u32,
    /// Key of the prompt prefix the request shares with others, for prefix-affinity
    /// routing (see [`crate::batch_input::shared_prefix`]). The control plane does not
    /// read request bodies: it leaves this `None`, and agents fill it from the body.
    pub prefix: Option<u64>,
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LeaseGrant {
    pub unit: WorkUnitId,
    pub expires_at: Timestamp,
    pub items: Vec<LeasedItem>,
}

/// How a reported request ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ReportedOutcome {
    Final(Outcome),
    /// No answer from the engine; try again (up to `max_attempts`).
    Retryable {
        code: String,
        message: String,
    },
}

/// A finished request, as an agent reports it. `usage.cost_usd` is ignored: the core
/// prices the work itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportedResult {
    pub unit: WorkUnitId,
    pub req: RequestRef,
    pub outcome: ReportedOutcome,
    pub usage: Usage,
    /// From sending the request to the engine to its complete answer.
    pub latency: Duration,
}

/// What happened to a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReportSummary {
    pub recorded: u32,
    pub duplicates: u32,
    pub unknown: u32,
    pub requeued: u32,
    /// Results for requests the reporting node does not hold a lease on (its lease
    /// expired and the request went back on the queue, the control plane restarted, or
    /// the report is forged): not recorded.
    pub not_leased: u32,
}

/// Reply to a heartbeat.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct HeartbeatReply {
    pub unknown_units: Vec<WorkUnitId>,
    /// What each of the node's replicas should do.
    pub directives: Vec<ReplicaDirective>,
}

/// The control plane's instruction for one replica.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaDirective {
    pub replica: crate::ids::ReplicaId,
    /// Output tokens per second the replica owes so that every batch of its model finishes
    /// by its deadline (its share of the model's required rate; see
    /// [`ControlCore::required_rate`]). Its tuner keeps at least this much.
    pub owed_tokens_per_s: f64,
    /// Whether the replica should take work (placement may park it).
    pub active: bool,
}

/// One registered replica as operators see it: what it runs, what it was told, and what
/// its agent last reported (see [`ControlCore::replicas_view`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaView {
    pub node: String,
    pub replica: String,
    pub model: String,
    pub accelerator: String,
    pub devices: u32,
    pub active: bool,
    /// What placement decided (the same as `active` unless placement is advisory).
    pub placement_active: bool,
    pub window: u32,
    pub power_limit_w: Option<f64>,
    /// Output tokens/s the replica owes to deadlines (its share of the model's required
    /// rate).
    pub owed_tokens_per_s: f64,
    pub tuner_mode: String,
    pub objective: String,
    pub objective_value: f64,
    pub measured_tokens_per_s: f64,
    pub converged: bool,
    pub tuner_moves: u64,
    /// Why the tuner made its last move.
    pub reason: String,
    /// Advisory mode: the performance model's recommendation.
    pub advice: Option<AdviceView>,
}

/// What `GET /v1/tuning` answers: every replica's knobs and tuner state, how fragmented
/// the free devices are, and placement's advice.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TuningDoc {
    pub replicas: Vec<ReplicaView>,
    pub fragmentation: crate::placement::Fragmentation,
    #[serde(default)]
    pub plan: Option<PlanView>,
}

/// Placement's advice on the replica layout (see [`ControlCore::placement_plan`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanView {
    pub demand: Vec<DemandView>,
    pub replicas_now: u32,
    pub replicas_planned: u32,
    /// Replicas the plan adds and removes relative to what runs.
    pub start: Vec<PlacedView>,
    pub stop: Vec<PlacedView>,
    pub fragmentation_now: crate::placement::Fragmentation,
    pub fragmentation_planned: crate::placement::Fragmentation,
}

/// One model's demand as placement measured it, and what the plan covers of it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DemandView {
    pub model: String,
    /// Output tokens/s needed (deadlines or arrivals, whichever needs more).
    pub tokens_per_s: f64,
    /// Mean prompt and output tokens of its requests.
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// Capacity of the planned replicas at their efficient point, and demand left over.
    pub planned_tokens_per_s: f64,
    pub unmet_tokens_per_s: f64,
}

/// A replica on a device group of a node.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlacedView {
    pub model: String,
    pub node: String,
    pub devices: Vec<u32>,
}

/// A recommendation, as shown to operators.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdviceView {
    pub window: u32,
    pub power_limit_w: f64,
    pub predicted_objective: f64,
    pub current_objective: f64,
}

/// A registered replica as the control core sees it.
#[derive(Debug, Clone)]
struct Serving {
    replica: crate::ids::ReplicaId,
    /// (node, replica): placement's key for it, shared rather than copied on each refresh.
    key: std::sync::Arc<(NodeId, crate::ids::ReplicaId)>,
    model: ModelId,
    /// Its performance model, when its accelerator and model are in the catalog.
    perf: Option<crate::perf::ReplicaPerf>,
    /// The agent's concurrency window now (updated by heartbeats).
    window: u32,
    /// Output tokens/s at that window and full power for a reference request shape
    /// (512 prompt, 256 output tokens), to share work between replicas.
    cap: Option<f64>,
    active: bool,
    /// Placement's decision (in advisory mode `active` stays true).
    advised_active: bool,
    /// What the agent last reported of it.
    report: Option<ReplicaReport>,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // persist actions dominate; boxing them buys nothing
pub enum Action {
    /// Make this durable before replying to the calls that produced it.
    Persist(DurableOp),
    /// A batch's view changed (for watchers).
    BatchChanged(BatchId),
    /// The answer to a waiting lease (see [`ControlCore::lease_or_wait`]): work, or
    /// `None` when the wait ended without any. If the agent cannot be told, the shell
    /// must release the grant's items.
    LeaseReady {
        ticket: u64,
        node: NodeId,
        model: ModelId,
        grant: Option<LeaseGrant>,
    },
}

/// Running totals, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlStats {
    pub results_recorded: u64,
    pub duplicates_dropped: u64,
    pub leases_granted: u64,
    pub leases_expired: u64,
    pub requests_retried: u64,
    /// Results refused because the reporting node held no lease on the request.
    pub results_not_leased: u64,
    /// Batches deleted (retention, or by their tenant).
    pub batches_deleted: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pending,
    Leased(WorkUnitId),
    Done,
}

#[derive(Debug, Clone)]
struct Request {
    slot: Slot,
    attempts: u32,
    /// Size of its body, bytes.
    bytes: u32,
}

impl Request {
    /// A request not yet tried.
    fn pending(meta: &RequestMeta) -> Request {
        Request {
            slot: Slot::Pending,
            attempts: 0,
            bytes: meta.body_bytes,
        }
    }
}

#[derive(Debug, Clone)]
struct Batch {
    meta: BatchMeta,
    life: Lifecycle,
    /// The priority of the batch's SLA class (its index in the class list): the queue
    /// serves lower first.
    rank: u8,
    /// Of a committed class (admission-checked, ordered by slack).
    committed: bool,
    /// Output tokens per second of the model's whole capacity for requests of this
    /// batch's mean shape, by the performance model (`None` while no replica is known):
    /// turns remaining work into the time it needs, for slack ordering.
    service_rate: Option<f64>,
    /// The batch's key in its model's queue while it is queued.
    queued: Option<QueueKey>,
    /// Output tokens asked for (estimated where `max_tokens` is absent) and prompt tokens.
    output_tokens: u64,
    prompt_tokens: u64,
    /// Per valid request; emptied once the batch is final.
    requests: Vec<Request>,
    pending: VecDeque<u32>,
    leased: u32,
    completed: u32,
    failed: u32,
    usage: Usage,
    /// What its results take in the store.
    result_bytes: u64,
}

impl Batch {
    fn done(&self) -> u32 {
        self.completed + self.failed
    }
    fn view(&self) -> BatchView {
        BatchView {
            meta: self.meta.clone(),
            life: self.life.clone(),
            counts: Counts {
                total: self.meta.lines,
                completed: self.completed,
                failed: self.failed,
                invalid: self.meta.invalid_lines,
            },
            usage: self.usage,
        }
    }
    fn totals(&self) -> BatchTotals {
        BatchTotals {
            completed: self.completed,
            failed: self.failed,
            usage: self.usage,
            result_bytes: self.result_bytes,
        }
    }

    /// Bytes the batch holds in the store: its input until it is final, its results and
    /// its line errors.
    fn stored_bytes(&self) -> u64 {
        let input = if self.life.status().is_terminal() {
            0
        } else {
            self.meta.input_bytes
        };
        input + self.result_bytes + self.meta.line_error_bytes
    }
}

#[derive(Debug, Clone)]
struct Unit {
    node: NodeId,
    expires_at: Timestamp,
    items: Vec<RequestRef>,
    /// Items still leased under this unit.
    open: u32,
}

#[derive(Debug, Clone)]
struct Node {
    registration: NodeRegistration,
    /// The node's replicas.
    serving: Vec<Serving>,
    /// The node's accelerator class (of its first device).
    accelerator: AcceleratorId,
    pricing: Pricing,
    last_seen: Timestamp,
    units: BTreeSet<WorkUnitId>,
    /// The idle energy each replica had reported, to turn the cumulative counter into
    /// increments.
    idle_seen: BTreeMap<crate::ids::ReplicaId, f64>,
}

/// The control plane's state machine. See the module docs for the shell's contract.
#[derive(Debug, Clone)]
pub struct ControlCore {
    config: ControlConfig,
    batches: BTreeMap<BatchId, Batch>,
    by_tenant: BTreeSet<(TenantId, BatchId)>,
    /// Batches with pending requests, per model, in the order work is handed out (see
    /// [`queue_key`]).
    queues: BTreeMap<ModelId, BTreeSet<QueueKey>>,
    /// Non-final batches by deadline.
    deadlines: BTreeSet<(Timestamp, BatchId)>,
    units: BTreeMap<WorkUnitId, Unit>,
    unit_expiry: BTreeSet<(Timestamp, WorkUnitId)>,
    nodes: BTreeMap<NodeId, Node>,
    next_batch: u64,
    next_unit: u64,
    /// Weighted fair queueing of best-effort work: output tokens handed out per tenant,
    /// divided by its weight (the tenant's virtual time).
    tenant_vt: BTreeMap<TenantId, f64>,
    /// What the cluster delivered over the SLA window.
    sla: crate::sla::SlaMeter,
    /// Each tenant's usage over all its batches (`batches` counts those submitted).
    tenant_totals: BTreeMap<TenantId, TenantUsage>,
    /// Output tokens each tenant submitted, by time, over the last hour (for quotas).
    submitted: BTreeMap<TenantId, VecDeque<(Timestamp, u64)>>,
    /// Leases waiting for work, per model, oldest first; their deadlines; their models.
    parked: BTreeMap<ModelId, VecDeque<Parked>>,
    parked_until: BTreeSet<(Timestamp, u64)>,
    parked_model: BTreeMap<u64, ModelId>,
    actions: VecDeque<Action>,
    stats: ControlStats,
    /// Idle energy reported while no tenant had results in the SLA window: charged to
    /// nobody (the operator's), joules.
    idle_unallocated_j: f64,
    /// Idle energy charged to each tenant, by the hour it was charged in.
    tenant_idle: BTreeMap<TenantId, BTreeMap<Timestamp, IdleShare>>,
    /// Hours of tenants whose idle charge changed since it was last persisted.
    idle_dirty: BTreeSet<(TenantId, Timestamp)>,
    idle_persisted_at: Timestamp,
    /// Each model's required output rate (see [`ControlCore::required_rate`]) and the
    /// capacity of its active replicas, and when they were computed.
    required: BTreeMap<ModelId, f64>,
    capacity: BTreeMap<ModelId, ActiveCapacity>,
    required_at: Option<Timestamp>,
    /// Placement's active set (see [`crate::placement::Activation`]).
    activation: crate::placement::Activation<std::sync::Arc<(NodeId, crate::ids::ReplicaId)>>,
    /// Replica throughput and cost per token at their efficient point, by (model,
    /// accelerator, devices, request shape bucket).
    operating: OperatingPoints,
    /// Output tokens accepted per model over the last [`ARRIVAL_WINDOW`], for placement:
    /// deadlines alone leave work to the last moment while more keeps arriving.
    arrivals: VecDeque<(Timestamp, ModelId, f64)>,
    /// What placement last planned for: each model's output tokens/s (deadlines or
    /// arrivals, whichever needs more) and mean request shape.
    demand: BTreeMap<ModelId, (f64, (u32, u32))>,
    /// Final batches by when their retention ends.
    retained: BTreeSet<(Timestamp, BatchId)>,
    /// Usage of deleted batches, by tenant and the day they were created.
    history: BTreeMap<TenantId, BTreeMap<Timestamp, crate::durable::UsageHistory>>,
    /// Free space in the store as last reported by the shell, bytes (`None`: unknown).
    free_bytes: Option<u64>,
    /// Files tenants uploaded, by tenant, and when each one's retention ends.
    files: BTreeMap<FileId, FileMeta>,
    files_by_tenant: BTreeSet<(TenantId, FileId)>,
    files_retained: BTreeSet<(Timestamp, FileId)>,
    next_file: u64,
}

/// Model -> accelerator -> (devices, prompt-length bucket, output-length bucket) ->
/// (tokens/s, cost per token): nested so that a lookup borrows the names.
type OperatingPoints = BTreeMap<ModelId, BTreeMap<AcceleratorId, BTreeMap<(u32, i32, i32), (f64, f64)>>>;

/// Prompt tokens, output tokens and requests of a model's unfinished work.
type Work = (f64, f64, f64);

/// How far back placement looks at the rate work arrives.
const ARRIVAL_WINDOW: Duration = Duration::from_secs(900);

/// Required rates are recomputed at most this often.
const REQUIRED_EVERY: Duration = Duration::from_secs(1);

/// Idle-energy charges are persisted at most this often (a crash loses at most this
/// much of them).
const IDLE_PERSIST_INTERVAL: Duration = Duration::from_secs(5);
const HOUR: Duration = Duration::from_secs(3600);

/// The start of the (UTC) day `t` falls in.
fn day_of(t: Timestamp) -> Timestamp {
    let day = 24 * 3600 * 1_000_000;
    Timestamp::from_micros(t.as_micros() / day * day)
}

fn hour_of(t: Timestamp) -> Timestamp {
    let h = HOUR.as_micros() as u64;
    Timestamp::from_micros(t.as_micros() / h * h)
}

/// A lease waiting for work (see [`ControlCore::lease_or_wait`]).
#[derive(Debug, Clone)]
struct Parked {
    ticket: u64,
    node: NodeId,
    max: u32,
}

/// A tenant's metered usage over some of its batches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TenantUsage {
    pub batches: u64,
    pub requests_completed: u64,
    pub requests_failed: u64,
    /// Sum over the batches of their recorded results.
    pub usage: Usage,
    /// The tenant's share of idle device energy (energy drawn while nothing ran), joules,
    /// and its energy cost: not part of any batch (see [`ControlCore::heartbeat`]).
    pub idle_joules: f64,
    pub idle_cost_usd: f64,
}

/// What an agent's heartbeat says of one of its replicas: cumulative counters since the
/// agent started.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicaReport {
    pub replica: crate::ids::ReplicaId,
    pub window: u32,
    pub in_flight: u32,
    /// Device energy attributed to requests, joules.
    pub attributed_j: f64,
    /// Device energy drawn while nothing ran on the replica, joules.
    pub idle_j: f64,
    /// The power limit the agent set on the replica's devices, if it set one.
    pub power_limit_w: Option<f64>,
    /// The replica's tuner, if one runs (active or advisory).
    pub tuning: Option<TuningReport>,
}

/// What a replica's tuner reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TuningReport {
    pub mode: crate::tuner::TunerMode,
    /// What it maximizes, e.g. "output tokens/J".
    pub objective: String,
    /// The objective and the output tokens/s measured at the current point.
    pub objective_value: f64,
    pub measured_tokens_per_s: f64,
    pub owed_tokens_per_s: f64,
    /// Converged and holding its point.
    pub holding: bool,
    pub moves: u64,
    /// Why it made its last change.
    pub reason: String,
    /// Advisory mode: what the performance model recommends.
    pub advice: Option<crate::tuner::Advice>,
}

impl Default for TuningReport {
    /// The report of a replica whose tuner is off.
    fn default() -> Self {
        TuningReport {
            mode: crate::tuner::TunerMode::Off,
            objective: String::new(),
            objective_value: 0.0,
            measured_tokens_per_s: 0.0,
            owed_tokens_per_s: 0.0,
            holding: false,
            moves: 0,
            reason: String::new(),
            advice: None,
        }
    }
}

/// Idle energy charged to one tenant in one hour.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IdleShare {
    pub joules: f64,
    pub cost_usd: f64,
}

/// What [`ControlCore::lease_or_wait`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseAnswer {
    Granted(LeaseGrant),
    /// No work, and no time to wait.
    Empty,
    /// Parked: the answer will come as [`Action::LeaseReady`].
    Waiting,
}

impl ControlCore {
    /// An empty control plane.
    pub fn new(config: ControlConfig) -> Self {
        let sla = crate::sla::SlaMeter::new(config.sla_window);
        ControlCore {
            config,
            batches: BTreeMap::new(),
            by_tenant: BTreeSet::new(),
            queues: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            units: BTreeMap::new(),
            unit_expiry: BTreeSet::new(),
            nodes: BTreeMap::new(),
            next_batch: 1,
            next_unit: 1,
            tenant_vt: BTreeMap::new(),
            sla,
            tenant_totals: BTreeMap::new(),
            submitted: BTreeMap::new(),
            parked: BTreeMap::new(),
            parked_until: BTreeSet::new(),
            parked_model: BTreeMap::new(),
            actions: VecDeque::new(),
            stats: ControlStats::default(),
            idle_unallocated_j: 0.0,
            tenant_idle: BTreeMap::new(),
            idle_dirty: BTreeSet::new(),
            idle_persisted_at: Timestamp::ZERO,
            required: BTreeMap::new(),
            capacity: BTreeMap::new(),
            required_at: None,
            activation: crate::placement::Activation::new(),
            operating: BTreeMap::new(),
            arrivals: VecDeque::new(),
            demand: BTreeMap::new(),
            retained: BTreeSet::new(),
            history: BTreeMap::new(),
            free_bytes: None,
            files: BTreeMap::new(),
            files_by_tenant: BTreeSet::new(),
            files_retained: BTreeSet::new(),
            next_file: 1,
        }
    }

    /// Rebuilds the state from what the store read back. Leases are not durable: every
    /// request without a result is pending again. Batches whose every request has a
    /// result but whose final status was not yet written are completed now.
    pub fn recover(config: ControlConfig, batches: Vec<RecoveredBatch>, now: Timestamp) -> Self {
        let mut core = ControlCore::new(config);
        // Work-unit ids must not repeat those of before the restart: agents may still
        // hold and report old units.
        core.next_unit = now.as_micros().max(1);
        for rb in batches {
            let id = rb.meta.id;
            core.next_batch = core.next_batch.max(id.0 + 1);
            core.by_tenant.insert((rb.meta.tenant.clone(), id));
            let (output_tokens, prompt_tokens) = token_totals(&rb.requests);
            let (rank, committed) = core.class_of(&rb.meta.sla_class);
            let mut b = Batch {
                rank,
                committed,
                service_rate: None,
                queued: None,
                output_tokens,
                prompt_tokens,
                meta: rb.meta,
                life: rb.life,
                requests: Vec::new(),
                pending: VecDeque::new(),
                leased: 0,
                completed: 0,
                failed: 0,
                usage: Usage::default(),
                result_bytes: 0,
            };
            if let Some(t) = rb.totals.filter(|_| b.life.status().is_terminal()) {
                b.completed = t.completed;
                b.failed = t.failed;
                b.usage = t.usage;
                b.result_bytes = t.result_bytes;
                core.batches.insert(id, b);
                core.retain(id);
                continue;
            }
            b.requests = rb.requests.iter().map(Request::pending).collect();
            for res in rb.results {
                if let Some(r) = b.requests.get_mut(res.index as usize).filter(|r| r.slot != Slot::Done) {
                    r.slot = Slot::Done;
                    if res.succeeded {
                        b.completed += 1;
                    } else {
                        b.failed += 1;
                    }
                    b.usage += res.usage;
                    b.result_bytes += res.stored_bytes;
                }
            }
            b.pending = (0..b.requests.len() as u32)
                .filter(|&i| b.requests[i as usize].slot == Slot::Pending)
                .collect();
            let status = b.life.status();
            if status == BatchStatus::Cancelling {
                // Leases died with the old process: nothing will answer the requests that
                // were running, so they end as cancelled now.
                b.pending.clear();
            }
            let open: Vec<u32> = (0..b.requests.len() as u32)
                .filter(|&i| b.requests[i as usize].slot == Slot::Pending)
                .collect();
            core.batches.insert(id, b);
            if status.is_terminal() {
                // A final status without totals (not written by this version): keep as is.
                core.retain(id);
                continue;
            }
            if status == BatchStatus::Cancelling {
                let results: Vec<_> = open
                    .into_iter()
                    .filter_map(|i| core.finish(id, i, cancelled_outcome(), Usage::default()))
                    .collect();
                if !results.is_empty() {
                    core.actions
                        .push_back(Action::Persist(DurableOp::RecordResults(results)));
                }
            }
            core.track(id);
            core.settle(now, id);
        }
        // Usage totals from the batches as recovered.
        let mut totals: BTreeMap<TenantId, TenantUsage> = BTreeMap::new();
        for b in core.batches.values() {
            let t = totals.entry(b.meta.tenant.clone()).or_default();
            t.batches += 1;
            t.requests_completed += u64::from(b.completed);
            t.requests_failed += u64::from(b.failed);
            t.usage += b.usage;
        }
        core.tenant_totals = totals;
        // Quotas count the output tokens asked for in the last hour: rebuild that log (the
        // store keeps the requests of unfinished batches only; finished ones count the
        // tokens they used).
        let hour = Duration::from_secs(3600);
        let mut recent: Vec<(Timestamp, TenantId, u64)> = core
            .batches
            .values()
            .filter(|b| core.quota_of(&b.meta.tenant).output_tokens_per_hour.is_some())
            .filter(|b| now.since(b.life.created_at) < hour)
            // A finished batch comes back without its requests: count what it used.
            .map(|b| {
                let tokens = b.output_tokens.max(b.usage.completion_tokens);
                (b.life.created_at, b.meta.tenant.clone(), tokens)
            })
            .collect();
        recent.sort();
        for (t, tenant, tokens) in recent {
            core.submitted.entry(tenant).or_default().push_back((t, tokens));
        }
        core
    }

    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    pub fn stats(&self) -> ControlStats {
        self.stats
    }

    /// Requests waiting to be leased, over all live batches.
    pub fn pending_requests(&self) -> u64 {
        self.deadlines
            .iter()
            .map(|(_, id)| self.batches[id].pending.len() as u64)
            .sum()
    }

    /// Batches not yet in a final status.
    pub fn live_batches(&self) -> usize {
        self.deadlines.len()
    }

    /// Registered nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = (&NodeRegistration, Timestamp)> {
        self.nodes.values().map(|n| (&n.registration, n.last_seen))
    }

    // ---- commands that can add work: each then serves the leases that wait ----------

    /// Accepts a validated batch. The batch is queued at once; the shell must persist the
    /// resulting `CreateBatch` (with the bodies it holds) before acknowledging.
    pub fn submit(&mut self, now: Timestamp, new: NewBatch) -> Result<BatchView, SubmitError> {
        let r = self.submit_inner(now, new);
        self.serve_parked(now);
        r
    }

    /// A node (re)announces itself. Work it held before is released: a fresh
    /// registration means the agent holds nothing.
    pub fn register(&mut self, now: Timestamp, reg: NodeRegistration) {
        self.register_inner(now, reg);
        self.serve_parked(now);
    }

    /// Records finished requests, exactly once each (retryable failures go back on the
    /// queue).
    pub fn report(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        results: Vec<ReportedResult>,
    ) -> Result<ReportSummary, UnknownNode> {
        let r = self.report_inner(now, node, results);
        self.serve_parked(now);
        r
    }

    /// Gives back requests a node will not run.
    pub fn release(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        unit: WorkUnitId,
        items: &[RequestRef],
    ) -> Result<u32, UnknownNode> {
        let r = self.release_inner(now, node, unit, items);
        self.serve_parked(now);
        r
    }

    /// Expires leases, batches and lease waits whose time has come.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.handle_timeout_inner(now);
        while let Some(&(t, ticket)) = self.parked_until.first() {
            if t > now {
                break;
            }
            self.parked_until.pop_first();
            if let Some(model) = self.parked_model.remove(&ticket)
                && let Some(q) = self.parked.get_mut(&model)
                && let Some(i) = q.iter().position(|p| p.ticket == ticket)
            {
                let p = q.remove(i).expect("found");
                self.actions.push_back(Action::LeaseReady {
                    ticket,
                    node: p.node,
                    model,
                    grant: None,
                });
            }
        }
        self.serve_parked(now);
    }

    /// Leases work like [`ControlCore::lease`], but when there is none, waits for it until
    /// `until` (a long poll): the answer then comes later as [`Action::LeaseReady`] with
    /// this `ticket` (unique per wait, chosen by the shell), holding a grant as soon as
    /// work for the model arrives, or `None` at `until`. Waiting holds nothing: no work is
    /// set aside for a wait until it is answered.
    pub fn lease_or_wait(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        model: &ModelId,
        max: u32,
        until: Timestamp,
        ticket: u64,
    ) -> Result<LeaseAnswer, UnknownNode> {
        if let Some(grant) = self.lease(now, node, model, max)? {
            return Ok(LeaseAnswer::Granted(grant));
        }
        if until <= now {
            return Ok(LeaseAnswer::Empty);
        }
        self.parked.entry(model.clone()).or_default().push_back(Parked {
            ticket,
            node: node.clone(),
            max,
        });
        self.parked_until.insert((until, ticket));
        self.parked_model.insert(ticket, model.clone());
        Ok(LeaseAnswer::Waiting)
    }

    /// Answers every waiting lease of `node` with no work.
    fn end_waits_of(&mut self, node: &NodeId) {
        let mut ended = Vec::new();
        for (model, q) in &mut self.parked {
            q.retain(|p| {
                let mine = &p.node == node;
                if mine {
                    ended.push((p.ticket, model.clone()));
                }
                !mine
            });
        }
        self.parked.retain(|_, q| !q.is_empty());
        for (ticket, model) in ended {
            self.parked_model.remove(&ticket);
            self.parked_until.retain(|&(_, t)| t != ticket);
            self.actions.push_back(Action::LeaseReady {
                ticket,
                node: node.clone(),
                model,
                grant: None,
            });
        }
    }

    /// Hands queued work to leases that wait for it, first come first served.
    fn serve_parked(&mut self, now: Timestamp) {
        if self.parked.is_empty() {
            return;
        }
        let models: Vec<ModelId> = self
            .parked
            .iter()
            .filter(|(m, q)| !q.is_empty() && self.queues.get(*m).is_some_and(|b| !b.is_empty()))
            .map(|(m, _)| m.clone())
            .collect();
        for model in models {
            while self.queues.get(&model).is_some_and(|b| !b.is_empty()) {
                let Some(p) = self.parked.get_mut(&model).and_then(VecDeque::pop_front) else {
                    break;
                };
                self.parked_model.remove(&p.ticket);
                self.parked_until.retain(|&(_, t)| t != p.ticket);
                // A node that is no longer registered gets an empty answer.
                let grant = self.lease(now, &p.node, &model, p.max).ok().flatten();
                self.actions.push_back(Action::LeaseReady {
                    ticket: p.ticket,
                    node: p.node,
                    model: model.clone(),
                    grant,
                });
            }
            if self.parked.get(&model).is_some_and(VecDeque::is_empty) {
                self.parked.remove(&model);
            }
        }
    }

    // ---- tenant commands -------------------------------------------------------------

    /// [`ControlCore::submit`] before waiting leases are served.
    fn submit_inner(&mut self, now: Timestamp, new: NewBatch) -> Result<BatchView, SubmitError> {
        if !self.config.models.contains(&new.model) {
            return Err(SubmitError::UnknownModel {
                model: new.model,
                served: join(self.config.models.iter()),
            });
        }
        let sla_class = match new.sla_class.filter(|c| !c.is_empty()) {
            None => self.config.default_sla_class.clone(),
            Some(c) if self.config.sla_classes.iter().any(|k| k.name == c) => c,
            Some(c) => {
                return Err(SubmitError::UnknownSlaClass {
                    class: c,
                    known: join(self.config.sla_classes.iter().map(|k| &k.name)),
                });
            }
        };
        let window = new
            .completion_window
            .filter(|w| !w.is_zero())
            .unwrap_or(self.config.default_completion_window);
        if window > self.config.max_completion_window {
            return Err(SubmitError::WindowTooLong {
                asked_s: window.as_secs(),
                max_s: self.config.max_completion_window.as_secs(),
            });
        }
        if new.requests.is_empty() {
            return Err(SubmitError::NoRequests);
        }
        check_metadata(&new.metadata)?;
        if let Some(f) = new.input_file
            && self.file(&new.tenant, f).is_err()
        {
            return Err(SubmitError::UnknownFile(f));
        }
        self.check_storage()?;
        let (output_tokens, prompt_tokens) = token_totals(&new.requests);
        self.check_quota(
            now,
            &new.tenant,
            output_tokens,
            new.requests.len() as u64,
            new.input_bytes,
        )?;
        let mut sla_class = sla_class;
        let deadline = now.saturating_add(window);
        let (rank, committed) = self.class_of(&sla_class);
        if self.config.admission
            && committed
            && let Some(service_s) = self.service_s(&new.model, new.requests.len(), output_tokens, prompt_tokens)
            && let Some(earliest) = self.refusal(
                now,
                &new.model,
                crate::admission::Work {
                    rank,
                    deadline,
                    service_s,
                },
            )
        {
            let best_effort = self.config.sla_classes.iter().find(|c| !c.committed);
            match (best_effort, earliest) {
                (Some(be), _) if new.best_effort_if_late => sla_class = be.name.clone(),
                (_, Some(earliest)) => {
                    return Err(SubmitError::Late {
                        model: new.model,
                        window: crate::time::human(window),
                        earliest,
                        earliest_in: crate::time::human(earliest.since(now)),
                    });
                }
                (_, None) => {
                    return Err(SubmitError::NoRoomInClass {
                        model: new.model,
                        class: sla_class,
                    });
                }
            }
        }
        let (rank, committed) = self.class_of(&sla_class);
        let service_rate = if committed {
            let n = new.requests.len().max(1) as u64;
            self.capacity(&new.model, (prompt_tokens / n) as u32, (output_tokens / n) as u32)
        } else {
            None
        };
        let id = BatchId(self.next_batch);
        self.next_batch += 1;
        let meta = BatchMeta {
            id,
            tenant: new.tenant,
            model: new.model,
            sla_class,
            completion_window: window,
            deadline,
            metadata: new.metadata,
            endpoint: new.endpoint,
            input_bytes: new.input_bytes,
            line_error_bytes: new.line_error_bytes,
            input_file: new.input_file,
            lines: new.lines,
            invalid_lines: new.invalid_lines,
            requests: new.requests.len() as u32,
        };
        let mut life = Lifecycle::new(id, now);
        life.queue(now).expect("a new batch can be queued");
        let n = new.requests.len() as u32;
        let requests: Vec<Request> = new.requests.iter().map(Request::pending).collect();
        self.actions.push_back(Action::Persist(DurableOp::CreateBatch {
            meta: meta.clone(),
            life: life.clone(),
            requests: new.requests,
        }));
        self.by_tenant.insert((meta.tenant.clone(), id));
        self.tenant_totals.entry(meta.tenant.clone()).or_default().batches += 1;
        if self.config.placement != PlacementMode::Off {
            self.arrivals.push_back((now, meta.model.clone(), output_tokens as f64));
        }
        if self.quota_of(&meta.tenant).output_tokens_per_hour.is_some() {
            self.submitted
                .entry(meta.tenant.clone())
                .or_default()
                .push_back((now, output_tokens));
        }
        self.batches.insert(
            id,
            Batch {
                rank,
                committed,
                service_rate,
                queued: None,
                output_tokens,
                prompt_tokens,
                meta,
                life,
                requests,
                pending: (0..n).collect(),
                leased: 0,
                completed: 0,
                failed: 0,
                usage: Usage::default(),
                result_bytes: 0,
            },
        );
        if !committed {
            // A newly arrived best-effort batch (not work going back on the queue, whose
            // refund must stand).
            let (model, tenant) = (
                self.batches[&id].meta.model.clone(),
                self.batches[&id].meta.tenant.clone(),
            );
            self.activate(&model, &tenant);
        }
        self.track(id);
        self.actions.push_back(Action::BatchChanged(id));
        Ok(self.batches[&id].view())
    }

    /// Charges (or, negative, refunds) `requests` of batch `id` to its tenant's virtual
    /// time, at the batch's mean output tokens per request: best-effort work is charged
    /// when leased (agents run what they leased, even for a batch that expired meanwhile)
    /// and refunded when it goes back on the queue.
    fn charge(&mut self, id: BatchId, requests: f64) {
        let Some(b) = self.batches.get(&id).filter(|b| !b.committed) else {
            return;
        };
        let tokens = b.output_tokens as f64 * requests / f64::from(b.meta.requests.max(1));
        let weight = self
            .config
            .tenant_weights
            .get(&b.meta.tenant)
            .copied()
            .unwrap_or(1.0)
            .max(1e-6);
        *self.tenant_vt.entry(b.meta.tenant.clone()).or_default() += tokens / weight;
    }

    /// The queued batch of `model` to lease from next: the highest class with work; in a
    /// committed class the batch with the least slack; in a best-effort class the batch
    /// of the tenant with the least virtual time (weighted fair queueing), earliest
    /// deadline first within a tenant.
    fn next_to_lease(&self, model: &ModelId) -> Option<QueueKey> {
        let q = self.queues.get(model)?;
        let first = *q.first()?;
        if self.batches[&first.2].committed {
            return Some(first);
        }
        let rank = first.0;
        q.range(first..)
            .take_while(|k| k.0 == rank)
            .min_by(|a, b| {
                let vt = |k: &(u8, Timestamp, BatchId)| {
                    let tenant = &self.batches[&k.2].meta.tenant;
                    self.tenant_vt.get(tenant).copied().unwrap_or(0.0)
                };
                vt(a).total_cmp(&vt(b)).then(a.cmp(b))
            })
            .copied()
    }

    /// The limits that apply to `tenant`.
    fn quota_of(&self, tenant: &TenantId) -> Quota {
        self.config
            .tenant_quotas
            .get(tenant)
            .copied()
            .unwrap_or_default()
            .or(self.config.default_quota)
    }

    /// Refuses a batch (asking for `asked` output tokens, with `requests` requests and an
    /// input of `input_bytes`) that would take `tenant` over its quota.
    fn check_quota(
        &mut self,
        now: Timestamp,
        tenant: &TenantId,
        asked: u64,
        requests: u64,
        input_bytes: u64,
    ) -> Result<(), SubmitError> {
        let quota = self.quota_of(tenant);
        if quota.is_unlimited() {
            return Ok(());
        }
        if quota.max_queued_requests.is_some() || quota.max_stored_bytes.is_some() {
            let (mut queued, mut stored) = (0u64, 0u64);
            for (_, id) in self
                .by_tenant
                .range((tenant.clone(), BatchId(0))..=(tenant.clone(), BatchId(u64::MAX)))
            {
                let b = &self.batches[id];
                if !b.life.status().is_terminal() {
                    queued += u64::from(b.meta.requests.saturating_sub(b.done()));
                }
                stored += b.stored_bytes();
            }
            for (_, f) in self
                .files_by_tenant
                .range((tenant.clone(), FileId(0))..=(tenant.clone(), FileId(u64::MAX)))
            {
                stored += self.files[f].bytes;
            }
            if let Some(limit) = quota.max_queued_requests
                && queued + requests > limit
            {
                return Err(SubmitError::TooManyQueued {
                    tenant: tenant.clone(),
                    limit,
                    queued,
                    asked: requests,
                });
            }
            if let Some(limit) = quota.max_stored_bytes
                && stored + input_bytes > limit
            {
                return Err(SubmitError::StoredBytes {
                    tenant: tenant.clone(),
                    limit: crate::usage::human_bytes(limit),
                    stored: crate::usage::human_bytes(stored),
                    asked: crate::usage::human_bytes(input_bytes),
                });
            }
        }
        if let Some(max) = quota.max_active_batches {
            let active = self
                .deadlines
                .iter()
                .filter(|(_, id)| &self.batches[id].meta.tenant == tenant)
                .count() as u32;
            if active >= max {
                return Err(SubmitError::TooManyBatches {
                    tenant: tenant.clone(),
                    active,
                });
            }
        }
        if let Some(per_hour) = quota.output_tokens_per_hour {
            let hour = Duration::from_secs(3600);
            let log = self.submitted.entry(tenant.clone()).or_default();
            while log.front().is_some_and(|&(t, _)| now.since(t) >= hour) {
                log.pop_front();
            }
            let used: u64 = log.iter().map(|&(_, n)| n).sum();
            if used + asked > per_hour {
                // When enough of the last hour's submissions age out.
                let mut left = used + asked - per_hour.min(used + asked);
                let mut at = now;
                for &(t, n) in log.iter() {
                    at = t.saturating_add(hour);
                    left = left.saturating_sub(n);
                    if left == 0 {
                        break;
                    }
                }
                let retry_in = if asked > per_hour {
                    "never: the batch alone is over the hourly quota".to_string()
                } else {
                    crate::time::human(at.since(now))
                };
                return Err(SubmitError::TokenQuota {
                    tenant: tenant.clone(),
                    quota: per_hour,
                    used,
                    asked,
                    retry_in,
                });
            }
        }
        Ok(())
    }

    /// The priority (place in the class list) of an SLA class and whether it is committed.
    /// A class no longer configured (a batch recovered after a configuration change) goes
    /// last, as best-effort.
    fn class_of(&self, class: &str) -> (u8, bool) {
        let classes = &self.config.sla_classes;
        match classes.iter().position(|c| c.name == class) {
            Some(i) => (i.min(u8::MAX as usize) as u8, classes[i].committed),
            None => (classes.len().min(u8::MAX as usize) as u8, false),
        }
    }

    /// Where a batch goes in its model's queue: by class priority, then, for committed
    /// work, least slack first (the deadline minus the time its pending requests need at
    /// the model's capacity: the latest time they can start), for best-effort work by
    /// deadline.
    fn queue_key(b: &Batch, order: QueueOrder) -> QueueKey {
        let slack = order == QueueOrder::Slack && b.committed;
        let order = match b.service_rate.filter(|r| *r > 0.0 && slack) {
            Some(rate) => {
                let pending = b.output_tokens as f64 * b.pending.len() as f64 / f64::from(b.meta.requests.max(1));
                let need_us = (pending / rate * 1e6).min(u64::MAX as f64) as u64;
                Timestamp::from_micros(b.meta.deadline.as_micros().saturating_sub(need_us))
            }
            None => b.meta.deadline,
        };
        (b.rank, order, b.meta.id)
    }

    /// Puts a batch on its model's queue (or moves it to its current place).
    fn enqueue(&mut self, id: BatchId) {
        self.dequeue(id);
        if self.batches[&id].committed && self.batches[&id].service_rate.is_none() {
            // Admitted before any replica was known (or recovered): learn its rate now.
            let b = &self.batches[&id];
            let n = u64::from(b.meta.requests.max(1));
            let rate = self.capacity(
                &b.meta.model,
                (b.prompt_tokens / n) as u32,
                (b.output_tokens / n) as u32,
            );
            self.batches.get_mut(&id).expect("exists").service_rate = rate;
        }
        let b = self.batches.get_mut(&id).expect("exists");
        let key = Self::queue_key(b, self.config.queue_order);
        b.queued = Some(key);
        self.queues.entry(b.meta.model.clone()).or_default().insert(key);
    }

    /// Takes a batch off its model's queue.
    fn dequeue(&mut self, id: BatchId) {
        let Some(b) = self.batches.get_mut(&id) else { return };
        if let Some(key) = b.queued.take()
            && let Some(q) = self.queues.get_mut(&b.meta.model)
        {
            q.remove(&key);
        }
    }

    /// Output tokens per second all registered replicas of `model` sustain on requests of
    /// this mean shape, by the performance model; `None` if none is known.
    fn capacity(&self, model: &ModelId, prompt_mean: u32, output_mean: u32) -> Option<f64> {
        // Parked replicas count: placement brings them back as soon as work needs them.
        let c: f64 = self
            .nodes
            .values()
            .flat_map(|n| &n.serving)
            .filter(|s| &s.model == model)
            .filter_map(|s| Some(s.perf.as_ref()?.capacity(s.window, (prompt_mean, output_mean))))
            .sum();
        (c > 0.0).then_some(c)
    }

    /// Seconds of `model`'s whole capacity that `requests` requests with these token totals
    /// need.
    fn service_s(&self, model: &ModelId, requests: usize, output_tokens: u64, prompt_tokens: u64) -> Option<f64> {
        let n = requests.max(1) as u64;
        let c = self.capacity(model, (prompt_tokens / n) as u32, (output_tokens / n) as u32)?;
        Some(output_tokens as f64 / c)
    }

    /// Whether admission refuses `new` (its service in seconds of the model's capacity):
    /// `None` if admitted (or no capacity is known to judge by); otherwise the earliest
    /// deadline it would be admitted with in its class, if any.
    fn refusal(&self, now: Timestamp, model: &ModelId, new: crate::admission::Work) -> Option<Option<Timestamp>> {
        // Every unfinished batch of a committed class on this model.
        let committed: Vec<crate::admission::Work> = self
            .deadlines
            .iter()
            .map(|(_, id)| &self.batches[id])
            .filter(|b| &b.meta.model == model && b.committed)
            .filter_map(|b| {
                let total = b.meta.requests.max(1);
                let left = total.saturating_sub(b.done());
                let s = self.service_s(model, total as usize, b.output_tokens, b.prompt_tokens)?;
                Some(crate::admission::Work {
                    rank: b.rank,
                    deadline: b.meta.deadline,
                    service_s: s * f64::from(left) / f64::from(total),
                })
            })
            .collect();
        match crate::admission::check(now, &committed, new, self.config.admission_headroom) {
            crate::admission::Verdict::Admit => None,
            crate::admission::Verdict::Refuse { earliest } => Some(earliest),
        }
    }

    /// Every tenant's usage over all its batches (for metering metrics; equal to
    /// [`ControlCore::tenant_usage`] from the beginning).
    pub fn tenant_totals(&self) -> &BTreeMap<TenantId, TenantUsage> {
        &self.tenant_totals
    }

    /// What `tenant`'s batches created at or after `since` used: the sum over those
    /// batches of their recorded results (token accounting), and the idle energy charged
    /// to the tenant in the hours from `since`'s hour on.
    pub fn tenant_usage(&self, tenant: &TenantId, since: Timestamp) -> TenantUsage {
        let mut u = TenantUsage::default();
        for (_, id) in self
            .by_tenant
            .range((tenant.clone(), BatchId(0))..=(tenant.clone(), BatchId(u64::MAX)))
        {
            let b = &self.batches[id];
            if b.life.created_at < since {
                continue;
            }
            u.batches += 1;
            u.requests_completed += u64::from(b.completed);
            u.requests_failed += u64::from(b.failed);
            u.usage += b.usage;
        }
        // Deleted batches count by the day they were created.
        if let Some(days) = self.history.get(tenant) {
            for h in days.range(day_of(since)..).map(|(_, h)| h) {
                u.batches += h.batches;
                u.requests_completed += h.requests_completed;
                u.requests_failed += h.requests_failed;
                u.usage += h.usage;
            }
        }
        if let Some(hours) = self.tenant_idle.get(tenant) {
            for share in hours.range(hour_of(since)..).map(|(_, s)| s) {
                u.idle_joules += share.joules;
                u.idle_cost_usd += share.cost_usd;
            }
        }
        u
    }

    /// The throughput SLA as measured now over the SLA window (see [`crate::sla`]).
    pub fn sla_document(&self, now: Timestamp) -> crate::sla::ThroughputSla {
        use crate::sla::{SlaClassEntry, SlaPool};
        let measured = self.sla.pools(now);
        let covered = self.sla.covered_s(now);
        // Every (model, accelerator) with capacity or with results in the window.
        let mut keys: BTreeSet<(ModelId, AcceleratorId)> = measured
            .iter()
            .map(|p| (p.model.clone(), p.accelerator.clone()))
            .collect();
        for n in self.nodes.values() {
            for s in n.serving.iter().filter(|s| s.perf.is_some()) {
                keys.insert((s.model.clone(), n.accelerator.clone()));
            }
        }
        let pools = keys
            .into_iter()
            .map(|(model, accelerator)| {
                let m = measured
                    .iter()
                    .find(|p| p.model == model && p.accelerator == accelerator);
                let (requests, usage, latency) = m.map_or((0, Usage::default(), Default::default()), |p| {
                    (p.requests, p.usage, p.latency_s)
                });
                // Capacity at the window's mean request shape (a 512/256 reference before any).
                let prompt = usage.prompt_tokens.checked_div(requests).map_or(512, |p| p as u32);
                let output = usage
                    .completion_tokens
                    .checked_div(requests)
                    .map_or(256, |o| o.max(1) as u32);
                let (mut devices, mut replicas, mut capacity) = (0u32, 0u32, 0.0);
                for n in self.nodes.values().filter(|n| n.accelerator == accelerator) {
                    for s in n.serving.iter().filter(|s| s.model == model) {
                        let Some(perf) = &s.perf else { continue };
                        replicas += 1;
                        devices += perf.devices();
                        capacity += perf.capacity(s.window, (prompt, output));
                    }
                }
                let out = usage.completion_tokens as f64;
                SlaPool {
                    model: model.to_string(),
                    accelerator: accelerator.to_string(),
                    devices,
                    replicas,
                    committed_output_tokens_per_second: capacity * self.config.admission_headroom,
                    measured_output_tokens_per_second: if covered > 0.0 { out / covered } else { 0.0 },
                    requests,
                    output_tokens: usage.completion_tokens,
                    prompt_tokens: usage.prompt_tokens,
                    output_tokens_per_joule: if usage.joules > 0.0 { out / usage.joules } else { 0.0 },
                    cost_per_million_output_tokens_usd: if out > 0.0 { usage.cost_usd / out * 1e6 } else { 0.0 },
                    request_latency_seconds: latency,
                }
            })
            .collect();
        let classes = self
            .sla
            .classes(now)
            .into_iter()
            .map(|c| SlaClassEntry {
                committed: self.class_of(&c.class).1,
                attainment: if c.batches > 0 {
                    c.on_time as f64 / c.batches as f64
                } else {
                    1.0
                },
                model: c.model.to_string(),
                class: c.class,
                batches: c.batches,
                on_time: c.on_time,
                completion_seconds: c.completion_s,
            })
            .collect();
        crate::sla::ThroughputSla {
            api_version: crate::sla::API_VERSION.into(),
            kind: crate::sla::KIND.into(),
            metadata: crate::sla::SlaMetadata {
                generated_at_unix_ms: now.as_micros() / 1000,
                window_seconds: self.sla.window().as_secs_f64(),
                covered_seconds: covered,
            },
            method: crate::sla::SlaMethod::default(),
            pools,
            classes,
        }
    }

    /// One batch of `tenant`.
    pub fn batch(&self, tenant: &TenantId, id: BatchId) -> Result<BatchView, BatchError> {
        self.owned(tenant, id).map(Batch::view)
    }

    /// Any batch, whoever owns it (for the shell's own use, never for tenant queries).
    pub fn view(&self, id: BatchId) -> Option<BatchView> {
        self.batches.get(&id).map(Batch::view)
    }

    /// `tenant`'s batches, newest first, older than `before` if given.
    pub fn list(&self, tenant: &TenantId, before: Option<BatchId>, limit: usize) -> (Vec<BatchView>, bool) {
        let upper = before.unwrap_or(BatchId(u64::MAX));
        let mut it = self
            .by_tenant
            .range((tenant.clone(), BatchId(0))..(tenant.clone(), upper))
            .rev()
            .map(|(_, id)| self.batches[id].view());
        let page: Vec<BatchView> = it.by_ref().take(limit).collect();
        let more = it.next().is_some();
        (page, more)
    }

    /// Cancels a batch: pending requests end as `batch_cancelled`, leased ones finish.
    pub fn cancel(&mut self, now: Timestamp, tenant: &TenantId, id: BatchId) -> Result<BatchView, BatchError> {
        self.owned(tenant, id)?;
        let b = self.batches.get_mut(&id).expect("owned");
        b.life.cancel(now)?;
        let pending: Vec<u32> = b.pending.drain(..).collect();
        self.dequeue(id);
        self.persist_life(id, None);
        let results = pending
            .into_iter()
            .filter_map(|i| self.finish(id, i, cancelled_outcome(), Usage::default()))
            .collect::<Vec<_>>();
        if !results.is_empty() {
            self.actions
                .push_back(Action::Persist(DurableOp::RecordResults(results)));
        }
        self.settle(now, id);
        self.actions.push_back(Action::BatchChanged(id));
        Ok(self.batches[&id].view())
    }

    fn owned(&self, tenant: &TenantId, id: BatchId) -> Result<&Batch, BatchError> {
        self.batches
            .get(&id)
            .filter(|b| &b.meta.tenant == tenant)
            .ok_or(BatchError::NotFound(id))
    }

    // ---- agent commands --------------------------------------------------------------

    /// [`ControlCore::register`] before waiting leases are served.
    fn register_inner(&mut self, now: Timestamp, reg: NodeRegistration) {
        // Lease calls the node made before (re)registering belong to a process that is
        // gone or starting over: they end empty rather than take work.
        self.end_waits_of(&reg.node);
        let accelerator = reg.devices.first().map(|d| d.accelerator.clone());
        let usd_per_device_hour = reg
            .usd_per_device_hour
            .filter(|p| p.is_finite() && *p >= 0.0)
            .or_else(|| accelerator.and_then(|a| Catalog::builtin().accelerator(&a).ok().map(|a| a.price_usd_per_hour)))
            .unwrap_or(0.0);
        let pricing = Pricing {
            usd_per_device_hour,
            usd_per_kwh: self.config.usd_per_kwh,
            pue: self.config.pue,
        };
        let node = reg.node.clone();
        let serving = reg
            .replicas
            .iter()
            .map(|r| {
                let accelerator = r
                    .devices
                    .first()
                    .and_then(|first| reg.devices.iter().find(|d| d.index == *first))
                    .map(|d| &d.accelerator);
                let tp = r.devices.len() as u32;
                let perf = accelerator.and_then(|a| crate::perf::ReplicaPerf::new(&r.model, a, tp).ok());
                let window = if r.window > 0 { r.window } else { r.max_concurrency };
                let window = window.max(1);
                Serving {
                    replica: r.replica.clone(),
                    key: std::sync::Arc::new((node.clone(), r.replica.clone())),
                    model: r.model.clone(),
                    cap: perf.as_ref().map(|p| p.capacity(window, REFERENCE_SHAPE)),
                    perf,
                    window,
                    active: true,
                    advised_active: true,
                    report: None,
                }
            })
            .collect();
        let old = self.nodes.insert(
            node.clone(),
            Node {
                accelerator: reg
                    .devices
                    .first()
                    .map_or_else(|| AcceleratorId::new("unknown"), |d| d.accelerator.clone()),
                registration: reg,
                serving,
                pricing,
                last_seen: now,
                units: BTreeSet::new(),
                idle_seen: BTreeMap::new(),
            },
        );
        if let Some(old) = old {
            for unit in old.units {
                self.drop_unit(now, unit, "its agent registered again (it restarted)");
            }
        }
    }

    /// Keeps a node alive, extends the leases of the units it still holds, and takes its
    /// replicas' telemetry.
    ///
    /// Idle energy (drawn while nothing ran) is shared among the tenants in proportion to
    /// the device energy attributed to their results over the SLA window, so that the
    /// tenants' energy adds up to what the devices drew while they used the cluster. Idle
    /// energy reported when no tenant had results in the window is charged to nobody
    /// ([`ControlCore::idle_unallocated_j`]): an idle cluster is the operator's cost.
    pub fn heartbeat(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        held: &[WorkUnitId],
        replicas: &[ReplicaReport],
    ) -> Result<HeartbeatReply, UnknownNode> {
        let n = self.nodes.get_mut(node).ok_or_else(|| UnknownNode(node.clone()))?;
        n.last_seen = now;
        let mut idle = 0.0;
        for r in replicas.iter().filter(|r| r.idle_j.is_finite() && r.idle_j >= 0.0) {
            let seen = n.idle_seen.insert(r.replica.clone(), r.idle_j).unwrap_or(0.0);
            // A counter that went back means the agent restarted and counts from zero.
            idle += if r.idle_j >= seen { r.idle_j - seen } else { r.idle_j };
        }
        // The agent's windows now (its tuner may have moved them): capacity is estimated
        // at them.
        for r in replicas {
            if let Some(s) = n.serving.iter_mut().find(|s| s.replica == r.replica) {
                if r.window > 0 && r.window != s.window {
                    s.window = r.window;
                    s.cap = s.perf.as_ref().map(|p| p.capacity(s.window, REFERENCE_SHAPE));
                }
                s.report = Some(r.clone());
            }
        }
        if idle > 0.0 {
            self.share_idle(now, idle);
        }
        let directives = self.directives(node);
        let mut reply = HeartbeatReply::default();
        let expires_at = now.saturating_add(self.config.lease_ttl);
        for &u in held {
            match self.units.get_mut(&u) {
                Some(unit) if &unit.node == node => {
                    self.unit_expiry.remove(&(unit.expires_at, u));
                    unit.expires_at = expires_at;
                    self.unit_expiry.insert((expires_at, u));
                }
                _ => reply.unknown_units.push(u),
            }
        }
        reply.directives = directives;
        Ok(reply)
    }

    /// Output tokens per second `model` must produce from `now` on for every unfinished
    /// batch of it to finish by its deadline, keeping `1 - deadline_share` of each batch's
    /// remaining time in reserve: over the batches in deadline order (all classes), the largest of the
    /// remaining output tokens up to and including a batch divided by the time to its
    /// deadline. Recomputed at most every second.
    pub fn required_rate(&self, model: &ModelId) -> f64 {
        self.required.get(model).copied().unwrap_or(0.0)
    }

    /// When the periodic refresh (required rates, placement) is next due: at once once a
    /// node is known, then every [`REQUIRED_EVERY`].
    fn refresh_due(&self) -> Option<Timestamp> {
        if self.nodes.is_empty() {
            return None;
        }
        Some(
            self.required_at
                .map_or(Timestamp::ZERO, |t| t.saturating_add(REQUIRED_EVERY)),
        )
    }

    /// When idle-energy charges are next written ([`IDLE_PERSIST_INTERVAL`] after the
    /// last write, while some are waiting).
    fn idle_persist_due(&self) -> Option<Timestamp> {
        (!self.idle_dirty.is_empty()).then(|| self.idle_persisted_at.saturating_add(IDLE_PERSIST_INTERVAL))
    }

    /// Recomputes the required rates, runs placement's activation and totals the active
    /// capacity: a timer, every [`REQUIRED_EVERY`] (see [`ControlCore::poll_timeout`]).
    fn refresh(&mut self, now: Timestamp) {
        self.required_at = Some(now);
        // Per model: cumulative output tokens owed in deadline order, the rate that needs,
        // and the prompt and output tokens and requests of the unfinished work.
        let mut per_model: BTreeMap<&ModelId, (f64, f64, Work)> = BTreeMap::new();
        let share = self.config.deadline_share.clamp(0.05, 1.0);
        for (deadline, id) in &self.deadlines {
            let b = &self.batches[id];
            let total = f64::from(b.meta.requests.max(1));
            let left = f64::from(b.meta.requests.saturating_sub(b.done()));
            let (c, r, w) = per_model.entry(&b.meta.model).or_default();
            *c += b.output_tokens as f64 * left / total;
            let time = (deadline.since(now).as_secs_f64() * share).max(1.0);
            *r = r.max(*c / time);
            w.0 += b.prompt_tokens as f64 * left / total;
            w.1 += b.output_tokens as f64 * left / total;
            w.2 += left;
        }
        let rate: BTreeMap<ModelId, f64> = per_model.iter().map(|(m, (_, r, _))| ((*m).clone(), *r)).collect();
        let work: BTreeMap<ModelId, Work> = per_model.into_iter().map(|(m, (_, _, w))| (m.clone(), w)).collect();
        self.required = rate;
        if self.config.placement != PlacementMode::Off {
            self.place(now, &work);
        }
        {
            let mut capacity: BTreeMap<ModelId, ActiveCapacity> = BTreeMap::new();
            for s in self.nodes.values().flat_map(|n| &n.serving).filter(|s| s.active) {
                let c = capacity.entry(s.model.clone()).or_default();
                match s.cap {
                    Some(cap) => {
                        c.known += cap;
                        c.known_replicas += 1;
                    }
                    None => c.unknown_replicas += 1,
                }
            }
            self.capacity = capacity;
        }
    }

    /// Placement's activation: which replicas take work now.
    fn place(&mut self, now: Timestamp, work: &BTreeMap<ModelId, (f64, f64, f64)>) {
        use crate::placement::{Candidate, operating_point};
        let mut candidates = Vec::new();
        let objective = self.config.placement_objective;
        for (node_id, n) in &self.nodes {
            for s in &n.serving {
                let Some(perf) = &s.perf else { continue };
                let shape = match work.get(&s.model) {
                    Some(&(p, o, r)) if r > 0.0 => ((p / r).round() as u32, (o / r).round().max(1.0) as u32),
                    _ => REFERENCE_SHAPE,
                };
                let point = (perf.devices(), length_bucket(shape.0), length_bucket(shape.1));
                let known = self
                    .operating
                    .get(&s.model)
                    .and_then(|a| a.get(&n.accelerator))
                    .and_then(|p| p.get(&point))
                    .copied();
                let (tokens_per_s, cost_per_token) = match known {
                    Some(x) => x,
                    None => {
                        let cached: usize = self
                            .operating
                            .values()
                            .flat_map(|a| a.values())
                            .map(BTreeMap::len)
                            .sum();
                        if cached > 4096 {
                            self.operating.clear();
                        }
                        let (t, c, _) = operating_point(perf, shape, objective, n.pricing.usd_per_device_hour, 1024);
                        self.operating
                            .entry(s.model.clone())
                            .or_default()
                            .entry(n.accelerator.clone())
                            .or_default()
                            .insert(point, (t, c));
                        (t, c)
                    }
                };
                candidates.push(Candidate {
                    key: s.key.clone(),
                    model: &s.model,
                    tokens_per_s,
                    cost_per_token,
                    node: node_id,
                });
            }
        }
        while self
            .arrivals
            .front()
            .is_some_and(|(t, _, _)| now.since(*t) > ARRIVAL_WINDOW)
        {
            self.arrivals.pop_front();
        }
        // Keep up with what arrives as well as with what is due.
        let mut need = self.required.clone();
        let mut arriving: BTreeMap<&ModelId, f64> = BTreeMap::new();
        for (_, model, tokens) in &self.arrivals {
            *arriving.entry(model).or_default() += tokens;
        }
        for (model, tokens) in arriving {
            let r = need.entry(model.clone()).or_default();
            *r = r.max(tokens / ARRIVAL_WINDOW.as_secs_f64());
        }
        self.activation.update(now, &candidates, &need, &self.config.activation);
        self.demand = need
            .iter()
            .map(|(m, &r)| {
                let shape = match work.get(m) {
                    Some(&(p, o, n)) if n > 0.0 => ((p / n).round() as u32, (o / n).round().max(1.0) as u32),
                    _ => REFERENCE_SHAPE,
                };
                (m.clone(), (r, shape))
            })
            .collect();
        let enforce = self.config.placement == PlacementMode::Active;
        for n in self.nodes.values_mut() {
            for s in n.serving.iter_mut().filter(|s| s.perf.is_some()) {
                let on = self.activation.is_active(&s.key);
                s.advised_active = on;
                if enforce {
                    s.active = on;
                }
            }
        }
    }

    /// The registered fleet as placement sees it: nodes with their high-bandwidth domains,
    /// the replicas on them, and the models served.
    pub fn fleet(
        &self,
    ) -> (
        Vec<crate::placement::NodeSpec>,
        Vec<crate::placement::Placed>,
        Vec<ModelId>,
    ) {
        use crate::placement::{NodeSpec, Placed};
        let mut nodes = Vec::new();
        let mut placed = Vec::new();
        let mut models: BTreeSet<ModelId> = BTreeSet::new();
        for (id, n) in &self.nodes {
            let mut domains: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for d in &n.registration.devices {
                domains.entry(d.domain).or_default().push(d.index);
            }
            nodes.push(NodeSpec {
                node: id.clone(),
                accelerator: n.accelerator.clone(),
                domains: domains
                    .into_values()
                    .map(|mut v| {
                        v.sort_unstable();
                        v
                    })
                    .collect(),
                usd_per_device_hour: n.pricing.usd_per_device_hour,
            });
            for r in &n.registration.replicas {
                models.insert(r.model.clone());
                placed.push(Placed {
                    model: r.model.clone(),
                    node: id.clone(),
                    devices: r.devices.clone(),
                });
            }
        }
        (nodes, placed, models.into_iter().collect())
    }

    /// How fragmented the free devices of the registered nodes are, for the models this
    /// cluster serves (see [`crate::placement::fragmentation`]).
    pub fn fragmentation(&self) -> crate::placement::Fragmentation {
        let (nodes, placed, models) = self.fleet();
        crate::placement::fragmentation(&nodes, &placed, &models)
    }

    /// The replica layout placement would choose for the demand it last measured (see
    /// [`crate::placement::plan`]), next to the one the agents run. Advice only: agents
    /// start their engines from their own configuration, so carrying the plan out means
    /// starting and stopping the replicas it names there. `None` while placement is off
    /// or has measured no demand yet.
    pub fn placement_plan(&self) -> Option<PlanView> {
        use crate::placement::Demand;
        if self.demand.is_empty() {
            return None;
        }
        let (_, _, models) = self.fleet();
        let demands: Vec<Demand> = models
            .iter()
            .map(|m| {
                let (tokens_per_s, shape) = self.demand.get(m).copied().unwrap_or((0.0, REFERENCE_SHAPE));
                Demand {
                    model: m.clone(),
                    tokens_per_s,
                    shape,
                }
            })
            .collect();
        Some(self.plan_for(&demands))
    }

    /// The replica layout placement would choose on the registered fleet for `demands`.
    pub fn plan_for(&self, demands: &[crate::placement::Demand]) -> PlanView {
        use crate::placement::{PlanConfig, plan};
        let (nodes, placed, models) = self.fleet();
        let config = PlanConfig {
            objective: self.config.placement_objective,
            margin: self.config.activation.margin,
            ..PlanConfig::default()
        };
        let p = plan(&nodes, demands, &placed, &config);
        let view = |r: &crate::placement::Placed| PlacedView {
            model: r.model.to_string(),
            node: r.node.to_string(),
            devices: r.devices.clone(),
        };
        PlanView {
            demand: demands
                .iter()
                .map(|d| DemandView {
                    model: d.model.to_string(),
                    tokens_per_s: d.tokens_per_s,
                    prompt_tokens: d.shape.0,
                    output_tokens: d.shape.1,
                    planned_tokens_per_s: p.capacity.get(&d.model).copied().unwrap_or(0.0),
                    unmet_tokens_per_s: p.unmet.get(&d.model).copied().unwrap_or(0.0),
                })
                .collect(),
            replicas_now: placed.len() as u32,
            replicas_planned: p.replicas.len() as u32,
            start: p.started.iter().map(view).collect(),
            stop: p.stopped.iter().map(view).collect(),
            fragmentation_now: crate::placement::fragmentation(&nodes, &placed, &models),
            fragmentation_planned: p.fragmentation,
        }
    }

    /// The tuning document (see [`TuningDoc`]).
    pub fn tuning_doc(&self) -> TuningDoc {
        TuningDoc {
            replicas: self.replicas_view(),
            fragmentation: self.fragmentation(),
            plan: self.placement_plan(),
        }
    }

    /// Every registered replica with its directive and what its agent last reported.
    pub fn replicas_view(&self) -> Vec<ReplicaView> {
        let nodes: Vec<NodeId> = self.nodes.keys().cloned().collect();
        let mut out = Vec::new();
        for id in nodes {
            let directives = self.directives(&id);
            let n = &self.nodes[&id];
            for (s, d) in n.serving.iter().zip(directives) {
                let report = s.report.as_ref();
                let tuning = report.and_then(|r| r.tuning.as_ref());
                out.push(ReplicaView {
                    node: id.to_string(),
                    replica: s.replica.to_string(),
                    model: s.model.to_string(),
                    accelerator: n.accelerator.to_string(),
                    devices: s.perf.as_ref().map_or(0, |p| p.devices()),
                    active: s.active,
                    placement_active: s.advised_active,
                    window: s.window,
                    power_limit_w: report.and_then(|r| r.power_limit_w),
                    owed_tokens_per_s: d.owed_tokens_per_s,
                    tuner_mode: tuning.map_or("off", |t| crate::policy::Choice::name(t.mode)).into(),
                    objective: tuning.map(|t| t.objective.clone()).unwrap_or_default(),
                    objective_value: tuning.map_or(0.0, |t| t.objective_value),
                    measured_tokens_per_s: tuning.map_or(0.0, |t| t.measured_tokens_per_s),
                    converged: tuning.is_some_and(|t| t.holding),
                    tuner_moves: tuning.map_or(0, |t| t.moves),
                    reason: tuning.map(|t| t.reason.clone()).unwrap_or_default(),
                    advice: tuning.and_then(|t| t.advice.as_ref()).map(|a| AdviceView {
                        window: a.window,
                        power_limit_w: a.power_limit_w,
                        predicted_objective: a.predicted_objective,
                        current_objective: a.current_objective,
                    }),
                });
            }
        }
        out
    }

    /// What each replica of `node` should do: its share of its model's required rate, in
    /// proportion to its capacity among the model's active replicas.
    fn directives(&self, node: &NodeId) -> Vec<ReplicaDirective> {
        let Some(n) = self.nodes.get(node) else {
            return Vec::new();
        };
        let mine: Vec<(crate::ids::ReplicaId, ModelId, bool, Option<f64>)> = n
            .serving
            .iter()
            .map(|s| (s.replica.clone(), s.model.clone(), s.active, s.cap))
            .collect();
        let mut out = Vec::with_capacity(mine.len());
        for (replica, model, active, cap) in mine {
            let required = self.required_rate(&model);
            // A replica without a performance model counts as the mean of those with one
            // (or 1 if none has).
            let c = self.capacity.get(&model).copied().unwrap_or_default();
            let mean = if c.known_replicas > 0 {
                c.known / f64::from(c.known_replicas)
            } else {
                1.0
            };
            let total = c.known + mean * f64::from(c.unknown_replicas);
            let own = cap.unwrap_or(mean);
            let owed = if active && total > 0.0 {
                required * own / total
            } else {
                0.0
            };
            out.push(ReplicaDirective {
                replica,
                owed_tokens_per_s: owed,
                active,
            });
        }
        out
    }

    /// Shares `idle` joules among tenants by their attributed energy over the SLA window.
    fn share_idle(&mut self, now: Timestamp, idle: f64) {
        let shares = self.sla.tenant_energy_in_window(now);
        let total: f64 = shares.iter().map(|(_, j)| j).sum();
        if total <= 0.0 {
            self.idle_unallocated_j += idle;
            return;
        }
        let hour = hour_of(now);
        let per_joule = self.config.pue * self.config.usd_per_kwh / 3.6e6;
        for (tenant, j) in shares {
            let joules = idle * j / total;
            let share = self
                .tenant_idle
                .entry(tenant.clone())
                .or_default()
                .entry(hour)
                .or_default();
            share.joules += joules;
            share.cost_usd += joules * per_joule;
            let t = self.tenant_totals.entry(tenant.clone()).or_default();
            t.idle_joules += joules;
            t.idle_cost_usd += joules * per_joule;
            self.idle_dirty.insert((tenant, hour));
        }
    }

    /// Persists changed idle charges, at most every [`IDLE_PERSIST_INTERVAL`] unless
    /// `force`.
    fn persist_idle(&mut self, now: Timestamp, force: bool) {
        if self.idle_dirty.is_empty() || (!force && now.since(self.idle_persisted_at) < IDLE_PERSIST_INTERVAL) {
            return;
        }
        self.idle_persisted_at = now;
        for (tenant, hour) in std::mem::take(&mut self.idle_dirty) {
            let share = self.tenant_idle[&tenant][&hour];
            self.actions.push_back(Action::Persist(DurableOp::TenantIdle {
                tenant,
                hour,
                joules: share.joules,
                cost_usd: share.cost_usd,
            }));
        }
    }

    /// Idle energy charged to nobody since this control plane started (reported while no
    /// tenant had results in the SLA window), joules.
    pub fn idle_unallocated_j(&self) -> f64 {
        self.idle_unallocated_j
    }

    /// Restores the idle charges read back from the store at startup: (tenant, hour,
    /// joules, cost).
    pub fn restore_idle(&mut self, rows: impl IntoIterator<Item = (TenantId, Timestamp, f64, f64)>) {
        for (tenant, hour, joules, cost_usd) in rows {
            let share = self
                .tenant_idle
                .entry(tenant.clone())
                .or_default()
                .entry(hour)
                .or_default();
            *share = IdleShare { joules, cost_usd };
        }
        for (tenant, hours) in &self.tenant_idle {
            let t = self.tenant_totals.entry(tenant.clone()).or_default();
            t.idle_joules = hours.values().map(|s| s.joules).sum();
            t.idle_cost_usd = hours.values().map(|s| s.cost_usd).sum();
        }
    }

    /// Hands up to `max` pending requests of `model` to `node`, earliest deadline first.
    pub fn lease(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        model: &ModelId,
        max: u32,
    ) -> Result<Option<LeaseGrant>, UnknownNode> {
        if !self.nodes.contains_key(node) {
            return Err(UnknownNode(node.clone()));
        }
        let unit = WorkUnitId(self.next_unit);
        let mut items = Vec::new();
        let mut started = Vec::new();
        // Bytes of the bodies leased so far; set when the next one would not fit.
        let (mut bytes, mut full) = (0u64, false);
        while (items.len() as u32) < max && !full {
            let Some((_, _, id)) = self.next_to_lease(model) else {
                break;
            };
            let b = self.batches.get_mut(&id).expect("queued batches exist");
            // Committed work goes by slack, in large pieces (its slack grows as its
            // pending work shrinks); best-effort work in small chunks, so that tenants
            // take turns.
            let room = max - items.len() as u32;
            let take = if b.committed { room } else { room.min(BEST_EFFORT_CHUNK) };
            let mut n = 0;
            while n < take {
                let Some(&i) = b.pending.front() else {
                    break;
                };
                let cost = u64::from(b.requests[i as usize].bytes) + LEASED_ITEM_OVERHEAD_BYTES;
                if !items.is_empty() && bytes + cost > self.config.lease_max_bytes {
                    full = true;
                    break;
                }
                bytes += cost;
                b.pending.pop_front();
                let r = &mut b.requests[i as usize];
                r.slot = Slot::Leased(unit);
                r.attempts += 1;
                b.leased += 1;
                n += 1;
                items.push(LeasedItem {
                    req: RequestRef { batch: id, index: i },
                    attempt: r.attempts,
                    prefix: None,
                });
            }
            if n == 0 && full {
                // The lease is full before this batch's next request.
                break;
            }
            if b.life.status() == BatchStatus::Queued {
                b.life.start(now).expect("queued batches can start");
                started.push(id);
            }
            let drained = b.pending.is_empty();
            self.charge(id, f64::from(n));
            // Drained (or, defensively, found empty): off the queue; otherwise to its new
            // place by slack.
            if drained {
                self.dequeue(id);
            } else if self.batches[&id].committed {
                self.enqueue(id);
            }
        }
        for id in started {
            self.persist_life(id, None);
            self.actions.push_back(Action::BatchChanged(id));
        }
        if items.is_empty() {
            return Ok(None);
        }
        self.next_unit += 1;
        let expires_at = now.saturating_add(self.config.lease_ttl);
        self.units.insert(
            unit,
            Unit {
                node: node.clone(),
                expires_at,
                items: items.iter().map(|i| i.req).collect(),
                open: items.len() as u32,
            },
        );
        self.unit_expiry.insert((expires_at, unit));
        self.nodes.get_mut(node).expect("checked").units.insert(unit);
        self.stats.leases_granted += 1;
        Ok(Some(LeaseGrant {
            unit,
            expires_at,
            items,
        }))
    }

    /// [`ControlCore::report`] before waiting leases are served.
    fn report_inner(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        results: Vec<ReportedResult>,
    ) -> Result<ReportSummary, UnknownNode> {
        let pricing = self
            .nodes
            .get(node)
            .map(|n| n.pricing)
            .ok_or_else(|| UnknownNode(node.clone()))?;
        let mut summary = ReportSummary::default();
        let mut recorded = Vec::new();
        let mut touched = BTreeSet::new();
        for r in results {
            let Some(slot) = self.slot(r.req) else {
                summary.unknown += 1;
                continue;
            };
            match (slot, r.outcome) {
                (Slot::Done, _) => summary.duplicates += 1,
                (Slot::Leased(u), ReportedOutcome::Retryable { code, message })
                    if u == r.unit && self.units.get(&u).is_some_and(|x| &x.node == node) =>
                {
                    touched.insert(r.req.batch);
                    if self.retry_or_fail(now, r.req, &code, &message, &mut recorded) {
                        summary.requeued += 1;
                    } else {
                        summary.recorded += 1;
                    }
                }
                // A retryable error from a lease that is no longer current: the request
                // is pending or leased elsewhere; that lease will answer.
                (_, ReportedOutcome::Retryable { .. }) => summary.duplicates += 1,
                // Only the node holding the current lease on a request may record its
                // result: a node cannot write results into work it was not given (another
                // tenant's batch, another node's lease), and a lease that expired has been
                // handed out again (or will be).
                (Slot::Leased(u), ReportedOutcome::Final(_))
                    if u != r.unit || self.units.get(&u).is_none_or(|x| &x.node != node) =>
                {
                    summary.not_leased += 1;
                }
                (Slot::Pending, ReportedOutcome::Final(_)) => summary.not_leased += 1,
                (Slot::Leased(_), ReportedOutcome::Final(outcome)) => {
                    let mut usage = r.usage;
                    usage.cost_usd = pricing.cost_usd(usage.joules, usage.device_seconds);
                    let ok =
                        matches!(outcome, Outcome::Response { status_code, .. } if (200..300).contains(&status_code));
                    if let Some(rec) = self.finish(r.req.batch, r.req.index, outcome, usage) {
                        let tenant = &self.batches[&r.req.batch].meta.tenant;
                        self.sla.tenant_energy(now, tenant, usage.joules);
                        if ok {
                            let model = self.batches[&r.req.batch].meta.model.clone();
                            let accelerator = self.nodes[node].accelerator.clone();
                            self.sla.result(now, &model, &accelerator, usage, r.latency);
                        }
                        recorded.push(rec);
                        touched.insert(r.req.batch);
                        summary.recorded += 1;
                    }
                }
            }
        }
        self.stats.duplicates_dropped += u64::from(summary.duplicates);
        self.stats.results_not_leased += u64::from(summary.not_leased);
        if !recorded.is_empty() {
            self.actions
                .push_back(Action::Persist(DurableOp::RecordResults(recorded)));
        }
        for id in touched {
            self.settle(now, id);
            self.actions.push_back(Action::BatchChanged(id));
        }
        Ok(summary)
    }

    /// [`ControlCore::release`] before waiting leases are served.
    fn release_inner(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        unit: WorkUnitId,
        items: &[RequestRef],
    ) -> Result<u32, UnknownNode> {
        if !self.nodes.contains_key(node) {
            return Err(UnknownNode(node.clone()));
        }
        if self.units.get(&unit).is_none_or(|u| &u.node != node) {
            return Ok(0);
        }
        let mut released = 0;
        let mut touched = BTreeSet::new();
        let mut recorded = Vec::new();
        for &req in items {
            if self.slot(req) != Some(Slot::Leased(unit)) {
                continue;
            }
            touched.insert(req.batch);
            released += 1;
            let b = self.batches.get_mut(&req.batch).expect("slot exists");
            if b.life.status() == BatchStatus::Cancelling {
                // Nothing will lease it again: it ends now.
                recorded.extend(self.finish(req.batch, req.index, cancelled_outcome(), Usage::default()));
                continue;
            }
            let r = &mut b.requests[req.index as usize];
            r.slot = Slot::Pending;
            // A release is not a failed attempt.
            r.attempts = r.attempts.saturating_sub(1);
            b.leased -= 1;
            b.pending.push_front(req.index);
            self.charge(req.batch, -1.0);
            self.close_unit_item(unit);
        }
        if !recorded.is_empty() {
            self.actions
                .push_back(Action::Persist(DurableOp::RecordResults(recorded)));
        }
        for id in touched {
            self.track(id);
            self.settle(now, id);
            self.actions.push_back(Action::BatchChanged(id));
        }
        Ok(released)
    }

    // ---- time ------------------------------------------------------------------------

    /// When [`ControlCore::handle_timeout`] should next be called. The timers, all of
    /// them here: lease expiry, batch deadlines, long-poll lease waits, retention of
    /// batches and files, the periodic refresh of rates owed and placement (every
    /// second once a node is known), and the writing of idle-energy charges.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let lease = self.unit_expiry.first().map(|&(t, _)| t);
        let deadline = self.deadlines.first().map(|&(t, _)| t);
        let wait = self.parked_until.first().map(|&(t, _)| t);
        let retention = self.retained.first().map(|&(t, _)| t);
        let files = self.files_retained.first().map(|&(t, _)| t);
        [
            lease,
            deadline,
            wait,
            retention,
            files,
            self.refresh_due(),
            self.idle_persist_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// [`ControlCore::handle_timeout`] before waiting leases are served.
    fn handle_timeout_inner(&mut self, now: Timestamp) {
        while let Some(&(t, unit)) = self.unit_expiry.first() {
            if t > now {
                break;
            }
            self.stats.leases_expired += 1;
            self.drop_unit(now, unit, "its agent stopped heartbeating");
        }
        while let Some(&(t, id)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            self.expire(now, id);
        }
        while let Some(&(t, id)) = self.retained.first() {
            if t > now {
                break;
            }
            self.retained.pop_first();
            self.delete(id);
        }
        while let Some(&(t, id)) = self.files_retained.first() {
            if t > now {
                break;
            }
            self.drop_file(id);
        }
        // The periodic work: rates owed and placement, then idle-energy charges. A clock
        // that went back (`now` before the last refresh) refreshes at once.
        if self.refresh_due().is_some_and(|t| t <= now) || self.required_at.is_some_and(|t| now < t) {
            self.refresh(now);
        }
        if self.idle_persist_due().is_some_and(|t| t <= now) {
            self.persist_idle(now, false);
        }
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    // ---- internals -------------------------------------------------------------------

    fn slot(&self, req: RequestRef) -> Option<Slot> {
        let b = self.batches.get(&req.batch)?;
        if b.life.status().is_terminal() {
            // Final batches drop their per-request state; every request has its result.
            return (req.index < b.meta.requests).then_some(Slot::Done);
        }
        b.requests.get(req.index as usize).map(|r| r.slot)
    }

    /// A tenant that had no best-effort work queued starts where the busiest waiting
    /// tenants are, so that idle time does not turn into credit (start-time fair queueing).
    fn activate(&mut self, model: &ModelId, tenant: &TenantId) {
        let Some(q) = self.queues.get(model) else { return };
        let waiting: BTreeSet<&TenantId> = q
            .iter()
            .map(|k| &self.batches[&k.2])
            .filter(|b| !b.committed)
            .map(|b| &b.meta.tenant)
            .collect();
        if waiting.contains(tenant) {
            return;
        }
        let floor = waiting
            .iter()
            .map(|t| self.tenant_vt.get(*t).copied().unwrap_or(0.0))
            .min_by(f64::total_cmp);
        if let Some(floor) = floor {
            let vt = self.tenant_vt.entry(tenant.clone()).or_default();
            *vt = vt.max(floor);
        }
    }

    /// Puts a batch on its model's queue and the deadline list, as its state requires.
    fn track(&mut self, id: BatchId) {
        let b = &self.batches[&id];
        let status = b.life.status();
        if status.is_terminal() {
            return;
        }
        self.deadlines.insert((b.meta.deadline, id));
        if !b.pending.is_empty() && matches!(status, BatchStatus::Queued | BatchStatus::InProgress) {
            self.enqueue(id);
        }
    }

    /// Records the result of one request if it has none yet; returns what to persist.
    fn finish(&mut self, id: BatchId, index: u32, outcome: Outcome, usage: Usage) -> Option<RecordedResult> {
        let b = self.batches.get_mut(&id)?;
        let r = b.requests.get_mut(index as usize)?;
        let prev = r.slot;
        if prev == Slot::Done {
            return None;
        }
        r.slot = Slot::Done;
        let totals = self.tenant_totals.entry(b.meta.tenant.clone()).or_default();
        if outcome.is_success() {
            b.completed += 1;
            totals.requests_completed += 1;
        } else {
            b.failed += 1;
            totals.requests_failed += 1;
        }
        b.usage += usage;
        b.result_bytes += outcome.stored_bytes();
        totals.usage += usage;
        match prev {
            Slot::Leased(unit) => {
                b.leased -= 1;
                self.close_unit_item(unit);
            }
            Slot::Pending => {
                // Ended while pending (cancelled, expired): take it off the pending queue.
                if let Some(pos) = b.pending.iter().position(|&i| i == index) {
                    b.pending.remove(pos);
                }
            }
            Slot::Done => unreachable!(),
        }
        self.stats.results_recorded += 1;
        Some(RecordedResult {
            req: RequestRef { batch: id, index },
            outcome,
            usage,
        })
    }

    /// A retryable failure: requeue, or record the failure once attempts are used up.
    /// Returns true when requeued.
    fn retry_or_fail(
        &mut self,
        _now: Timestamp,
        req: RequestRef,
        code: &str,
        message: &str,
        out: &mut Vec<RecordedResult>,
    ) -> bool {
        let max = self.config.max_attempts;
        let b = self.batches.get_mut(&req.batch).expect("slot exists");
        let r = &mut b.requests[req.index as usize];
        if r.attempts < max && matches!(b.life.status(), BatchStatus::Queued | BatchStatus::InProgress) {
            let Slot::Leased(unit) = r.slot else {
                unreachable!("checked by caller")
            };
            r.slot = Slot::Pending;
            b.leased -= 1;
            b.pending.push_front(req.index);
            self.charge(req.batch, -1.0);
            self.close_unit_item(unit);
            self.track(req.batch);
            self.stats.requests_retried += 1;
            return true;
        }
        let attempts = r.attempts;
        let outcome = if matches!(b.life.status(), BatchStatus::Cancelling) {
            cancelled_outcome()
        } else {
            Outcome::Error {
                code: "retries_exhausted".into(),
                message: format!("no answer after {attempts} attempts; last error ({code}): {message}"),
            }
        };
        out.extend(self.finish(req.batch, req.index, outcome, Usage::default()));
        false
    }

    fn close_unit_item(&mut self, unit: WorkUnitId) {
        let Some(u) = self.units.get_mut(&unit) else {
            return;
        };
        u.open -= 1;
        if u.open == 0 {
            let u = self.units.remove(&unit).expect("present");
            self.unit_expiry.remove(&(u.expires_at, unit));
            if let Some(n) = self.nodes.get_mut(&u.node) {
                n.units.remove(&unit);
            }
        }
    }

    /// Ends a unit (lease expired, or its agent re-registered): its open requests are
    /// pending again, or fail once they have used up their attempts.
    fn drop_unit(&mut self, now: Timestamp, unit: WorkUnitId, why: &str) {
        let Some(u) = self.units.remove(&unit) else {
            return;
        };
        self.unit_expiry.remove(&(u.expires_at, unit));
        if let Some(n) = self.nodes.get_mut(&u.node) {
            n.units.remove(&unit);
        }
        let mut recorded = Vec::new();
        let mut touched = BTreeSet::new();
        for req in u.items.iter().rev() {
            if self.slot(*req) != Some(Slot::Leased(unit)) {
                continue;
            }
            let b = self.batches.get_mut(&req.batch).expect("slot exists");
            let r = &mut b.requests[req.index as usize];
            b.leased -= 1;
            touched.insert(req.batch);
            let status = b.life.status();
            if status == BatchStatus::Cancelling {
                r.slot = Slot::Pending;
                recorded.extend(self.finish(req.batch, req.index, cancelled_outcome(), Usage::default()));
            } else if r.attempts >= self.config.max_attempts {
                let attempts = r.attempts;
                r.slot = Slot::Pending;
                let outcome = Outcome::Error {
                    code: "retries_exhausted".into(),
                    message: format!("no answer after {attempts} attempts; the last lease ended because {why}"),
                };
                recorded.extend(self.finish(req.batch, req.index, outcome, Usage::default()));
            } else {
                r.slot = Slot::Pending;
                b.pending.push_front(req.index);
                self.stats.requests_retried += 1;
                self.charge(req.batch, -1.0);
            }
        }
        if !recorded.is_empty() {
            self.actions
                .push_back(Action::Persist(DurableOp::RecordResults(recorded)));
        }
        for id in touched {
            self.track(id);
            self.settle(now, id);
            self.actions.push_back(Action::BatchChanged(id));
        }
    }

    /// The completion window ended: every request without a result ends `batch_expired`.
    fn expire(&mut self, now: Timestamp, id: BatchId) {
        let Some(b) = self.batches.get_mut(&id) else {
            return;
        };
        if b.life.status().is_terminal() || b.life.expire(now).is_err() {
            return;
        }
        let open: Vec<u32> = (0..b.requests.len() as u32)
            .filter(|&i| b.requests[i as usize].slot != Slot::Done)
            .collect();
        b.pending.clear();
        self.dequeue(id);
        let results: Vec<_> = open
            .into_iter()
            .filter_map(|i| {
                let outcome = Outcome::Error {
                    code: "batch_expired".into(),
                    message: "the batch's completion window ended before this request finished".into(),
                };
                self.finish(id, i, outcome, Usage::default())
            })
            .collect();
        if !results.is_empty() {
            self.actions
                .push_back(Action::Persist(DurableOp::RecordResults(results)));
        }
        let totals = self.batches[&id].totals();
        self.persist_life(id, Some(totals));
        self.release_memory(id);
        self.actions.push_back(Action::BatchChanged(id));
    }

    /// Moves a batch on when its requests allow: all done -> completed; cancelling with
    /// nothing leased -> cancelled.
    fn settle(&mut self, now: Timestamp, id: BatchId) {
        let b = self.batches.get_mut(&id).expect("batch exists");
        let all_done = b.done() == b.meta.requests;
        let changed = match b.life.status() {
            BatchStatus::Queued | BatchStatus::InProgress if all_done => {
                b.life.finalize(now).expect("allowed");
                b.life.complete(now).expect("allowed");
                true
            }
            BatchStatus::Cancelling if b.leased == 0 => {
                b.life.cancelled(now).expect("allowed");
                true
            }
            _ => false,
        };
        if changed {
            let totals = b.totals();
            self.persist_life(id, Some(totals));
            self.release_memory(id);
        }
    }

    /// A final batch keeps only its view.
    fn release_memory(&mut self, id: BatchId) {
        let b = self.batches.get_mut(&id).expect("batch exists");
        if let Some(ended) = b.life.ended_at() {
            self.sla.batch_ended(
                ended,
                &b.meta.model,
                &b.meta.sla_class,
                b.life.created_at,
                b.meta.deadline,
                b.life.status(),
            );
        }
        b.requests = Vec::new();
        b.pending = VecDeque::new();
        self.deadlines.remove(&(b.meta.deadline, id));
        self.dequeue(id);
        self.actions.push_back(Action::Persist(DurableOp::DropInputs { id }));
        self.retain(id);
    }

    /// When a final batch's retention ends, if it does.
    fn retention_end(&self, b: &Batch) -> Option<Timestamp> {
        let keep = self
            .config
            .tenant_retention
            .get(&b.meta.tenant)
            .copied()
            .or(self.config.retention)?;
        Some(b.life.ended_at().unwrap_or(b.life.created_at).saturating_add(keep))
    }

    /// Schedules the deletion of a final batch when its retention ends.
    fn retain(&mut self, id: BatchId) {
        if let Some(end) = self.retention_end(&self.batches[&id]) {
            self.retained.insert((end, id));
        }
    }

    /// Deletes a final batch: its usage goes to its tenant's history (by the day it was
    /// created), and the store deletes everything it held.
    fn delete(&mut self, id: BatchId) {
        let Some(end) = self.batches.get(&id).map(|b| self.retention_end(b)) else {
            return;
        };
        if let Some(end) = end {
            self.retained.remove(&(end, id));
        }
        let b = self.batches.remove(&id).expect("checked");
        self.by_tenant.remove(&(b.meta.tenant.clone(), id));
        let day = day_of(b.life.created_at);
        let h = self
            .history
            .entry(b.meta.tenant.clone())
            .or_default()
            .entry(day)
            .or_default();
        h.batches += 1;
        h.requests_completed += u64::from(b.completed);
        h.requests_failed += u64::from(b.failed);
        h.usage += b.usage;
        let history = *h;
        self.actions.push_back(Action::Persist(DurableOp::TenantHistory {
            tenant: b.meta.tenant.clone(),
            day,
            history,
        }));
        self.actions.push_back(Action::Persist(DurableOp::DeleteBatch { id }));
        self.stats.batches_deleted += 1;
    }

    /// Batch ids are never handed out again, even after their batches were deleted: `next`
    /// is the first id the store has not seen (its high-water mark).
    pub fn set_next_batch(&mut self, next: u64) {
        self.next_batch = self.next_batch.max(next);
    }

    /// Leased requests whose bodies cannot be read back from the store (a damaged or
    /// missing input file) end with the error `input_lost` at once, rather than be
    /// retried: another try reads the same file.
    pub fn inputs_lost(&mut self, now: Timestamp, unit: WorkUnitId, items: &[RequestRef]) {
        let mut recorded = Vec::new();
        let mut touched = BTreeSet::new();
        for &req in items {
            if self.slot(req) != Some(Slot::Leased(unit)) {
                continue;
            }
            let outcome = Outcome::Error {
                code: "input_lost".into(),
                message: "the request's body could not be read back from the control plane's store (its input file is damaged or missing); submit it again".into(),
            };
            recorded.extend(self.finish(req.batch, req.index, outcome, Usage::default()));
            touched.insert(req.batch);
        }
        if !recorded.is_empty() {
            self.actions
                .push_back(Action::Persist(DurableOp::RecordResults(recorded)));
        }
        for id in touched {
            self.settle(now, id);
            self.actions.push_back(Action::BatchChanged(id));
        }
    }

    /// A tenant deletes one of its finished batches.
    pub fn delete_batch(&mut self, tenant: &TenantId, id: BatchId) -> Result<(), BatchError> {
        let status = self.owned(tenant, id)?.life.status();
        if !status.is_terminal() {
            return Err(BatchError::NotFinished(id, status));
        }
        self.delete(id);
        Ok(())
    }

    /// Accepts an uploaded file of `bytes` bytes (its content staged by the shell, which
    /// must persist the resulting `CreateFile` with it before acknowledging). Checked
    /// against the tenant's stored-bytes limit and the free disk space.
    pub fn add_file(
        &mut self,
        now: Timestamp,
        tenant: &TenantId,
        filename: String,
        bytes: u64,
        purpose: String,
    ) -> Result<FileMeta, SubmitError> {
        self.check_storage()?;
        self.check_quota(now, tenant, 0, 0, bytes)?;
        let meta = FileMeta {
            id: FileId(self.next_file),
            tenant: tenant.clone(),
            filename,
            bytes,
            created_at: now,
            purpose,
        };
        self.next_file += 1;
        self.actions
            .push_back(Action::Persist(DurableOp::CreateFile { meta: meta.clone() }));
        self.keep_file(meta.clone());
        Ok(meta)
    }

    fn keep_file(&mut self, meta: FileMeta) {
        if let Some(end) = self.file_expiry(&meta) {
            self.files_retained.insert((end, meta.id));
        }
        self.files_by_tenant.insert((meta.tenant.clone(), meta.id));
        self.next_file = self.next_file.max(meta.id.0 + 1);
        self.files.insert(meta.id, meta);
    }

    /// When a file's retention ends (files follow their tenant's retention, counted from
    /// the upload), if it does.
    pub fn file_expiry(&self, meta: &FileMeta) -> Option<Timestamp> {
        let keep = self
            .config
            .tenant_retention
            .get(&meta.tenant)
            .copied()
            .or(self.config.retention)?;
        Some(meta.created_at.saturating_add(keep))
    }

    /// One of `tenant`'s files.
    pub fn file(&self, tenant: &TenantId, id: FileId) -> Result<&FileMeta, FileError> {
        self.files
            .get(&id)
            .filter(|f| &f.tenant == tenant)
            .ok_or(FileError::NotFound(id))
    }

    /// `tenant`'s files after `after` (newest first, or oldest first with `ascending`).
    pub fn list_files(
        &self,
        tenant: &TenantId,
        after: Option<FileId>,
        limit: usize,
        ascending: bool,
    ) -> (Vec<FileMeta>, bool) {
        let all = self
            .files_by_tenant
            .range((tenant.clone(), FileId(0))..=(tenant.clone(), FileId(u64::MAX)))
            .map(|(_, id)| *id);
        let ids: Vec<FileId> = if ascending {
            all.filter(|id| after.is_none_or(|a| *id > a)).collect()
        } else {
            all.rev().filter(|id| after.is_none_or(|a| *id < a)).collect()
        };
        let more = ids.len() > limit;
        (
            ids.into_iter().take(limit).map(|id| self.files[&id].clone()).collect(),
            more,
        )
    }

    /// A tenant deletes one of its files (batches created from it keep their own copy).
    pub fn delete_file(&mut self, tenant: &TenantId, id: FileId) -> Result<(), FileError> {
        self.file(tenant, id)?;
        self.drop_file(id);
        Ok(())
    }

    fn drop_file(&mut self, id: FileId) {
        let Some(meta) = self.files.remove(&id) else {
            return;
        };
        if let Some(end) = self.file_expiry(&meta) {
            self.files_retained.remove(&(end, id));
        }
        self.files_by_tenant.remove(&(meta.tenant, id));
        self.actions.push_back(Action::Persist(DurableOp::DeleteFile { id }));
    }

    /// Restores the files read back from the store (after [`ControlCore::recover`]);
    /// `next` is the first file id never given out.
    pub fn restore_files(&mut self, files: impl IntoIterator<Item = FileMeta>, next: u64) {
        for f in files {
            self.keep_file(f);
        }
        self.next_file = self.next_file.max(next);
    }

    /// Restores the usage history of deleted batches (rows written by
    /// `DurableOp::TenantHistory`), after [`ControlCore::recover`].
    pub fn restore_history(
        &mut self,
        rows: impl IntoIterator<Item = (TenantId, Timestamp, crate::durable::UsageHistory)>,
    ) {
        for (tenant, day, h) in rows {
            let t = self.tenant_totals.entry(tenant.clone()).or_default();
            t.batches += h.batches;
            t.requests_completed += h.requests_completed;
            t.requests_failed += h.requests_failed;
            t.usage += h.usage;
            self.history.entry(tenant).or_default().insert(day, h);
        }
    }

    /// The store's free space, bytes, as the shell measured it: new batches are refused
    /// while it is below [`ControlConfig::min_free_bytes`].
    pub fn set_free_bytes(&mut self, free: Option<u64>) {
        self.free_bytes = free;
    }

    /// Refuses new data while the store's disk is nearly full.
    fn check_storage(&self) -> Result<(), SubmitError> {
        match self.free_bytes {
            Some(free) if free < self.config.min_free_bytes => Err(SubmitError::StorageLow {
                free: crate::usage::human_bytes(free),
                min: crate::usage::human_bytes(self.config.min_free_bytes),
            }),
            _ => Ok(()),
        }
    }

    /// Whether new batches are refused for lack of disk space.
    pub fn storage_low(&self) -> bool {
        self.free_bytes.is_some_and(|f| f < self.config.min_free_bytes)
    }

    fn persist_life(&mut self, id: BatchId, totals: Option<BatchTotals>) {
        let life = self.batches[&id].life.clone();
        self.actions
            .push_back(Action::Persist(DurableOp::UpdateBatch { id, life, totals }));
    }
}

fn cancelled_outcome() -> Outcome {
    Outcome::Error {
        code: "batch_cancelled".into(),
        message: "the batch was cancelled before this request finished".into(),
    }
}

fn join<'a>(items: impl Iterator<Item = impl std::fmt::Display + 'a>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// The capacity of a model's active replicas, at the reference request shape.
#[derive(Debug, Clone, Copy, Default)]
struct ActiveCapacity {
    /// Output tokens/s of the replicas with a performance model, and how many they are.
    known: f64,
    known_replicas: u32,
    /// Replicas without a performance model.
    unknown_replicas: u32,
}

/// A batch's place in its model's queue: (class priority, order within the class, id).
type QueueKey = (u8, Timestamp, BatchId);

/// Requests of one best-effort batch handed out before tenants are compared again.
const BEST_EFFORT_CHUNK: u32 = 8;

/// Output tokens a request without `max_tokens` is assumed to ask for, for admission.
pub const OUTPUT_TOKENS_ESTIMATE: u32 = 256;

/// (output, prompt) tokens the requests ask for.
fn token_totals(requests: &[RequestMeta]) -> (u64, u64) {
    requests.iter().fold((0, 0), |(o, p), r| {
        (
            o + u64::from(r.max_tokens.unwrap_or(OUTPUT_TOKENS_ESTIMATE)),
            p + u64::from(r.prompt_tokens_estimate),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Timestamp = Timestamp::from_micros(1_000_000);

    fn tenant(name: &str) -> TenantId {
        TenantId::from(name)
    }
    fn node(name: &str) -> NodeId {
        NodeId::from(name)
    }
    fn model() -> ModelId {
        ModelId::from("llama-3.1-8b")
    }

    fn new_batch(who: &str, n: u32) -> NewBatch {
        NewBatch {
            tenant: tenant(who),
            model: model(),
            sla_class: None,
            completion_window: Some(Duration::from_secs(3600)),
            metadata: BTreeMap::new(),
            endpoint: crate::batch_input::Endpoint::ChatCompletions,
            input_bytes: 100,
            line_error_bytes: 0,
            input_file: None,
            lines: n + 1,
            invalid_lines: 1,
            requests: (0..n)
                .map(|i| RequestMeta {
                    line: i + 1,
                    prompt_tokens_estimate: 10,
                    max_tokens: Some(16),
                    body_bytes: 40,
                })
                .collect(),
            best_effort_if_late: false,
        }
    }

    fn registration(name: &str) -> NodeRegistration {
        NodeRegistration {
            node: node(name),
            super_node: SuperNodeId::from("sn0"),
            devices: vec![NodeDevice {
                index: 0,
                accelerator: AcceleratorId::from("h100-sxm"),
                domain: 0,
            }],
            replicas: vec![],
            usd_per_device_hour: None,
        }
    }

    fn ok(unit: WorkUnitId, req: RequestRef) -> ReportedResult {
        ReportedResult {
            unit,
            req,
            outcome: ReportedOutcome::Final(Outcome::Response {
                status_code: 200,
                body: b"{}".to_vec(),
                request_id: String::new(),
            }),
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                joules: 36.0,
                device_seconds: 0.5,
                cost_usd: 99.0,
            },
            latency: Duration::ZERO,
        }
    }

    /// The next time of each kind of timer (the periodic refresh runs every second once
    /// a node is known, so tests look at the timer they mean).
    #[derive(Debug, Default, PartialEq)]
    struct Timers {
        lease: Option<Timestamp>,
        deadline: Option<Timestamp>,
        wait: Option<Timestamp>,
        retention: Option<Timestamp>,
        refresh: Option<Timestamp>,
    }

    impl Timers {
        fn without_refresh(self) -> Timers {
            Timers { refresh: None, ..self }
        }
    }

    fn timers(core: &ControlCore) -> Timers {
        Timers {
            lease: core.unit_expiry.first().map(|&(t, _)| t),
            deadline: core.deadlines.first().map(|&(t, _)| t),
            wait: core.parked_until.first().map(|&(t, _)| t),
            retention: core.retained.first().map(|&(t, _)| t),
            refresh: core.refresh_due(),
        }
    }

    fn drain(core: &mut ControlCore) -> Vec<Action> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    /// Applies persisted operations the way a store would.
    fn replay(store: &mut BTreeMap<BatchId, RecoveredBatch>, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Persist(DurableOp::CreateBatch { meta, life, requests }) => {
                    store.insert(
                        meta.id,
                        RecoveredBatch {
                            meta: meta.clone(),
                            life: life.clone(),
                            totals: None,
                            requests: requests.clone(),
                            results: vec![],
                        },
                    );
                }
                Action::Persist(DurableOp::UpdateBatch { id, life, totals }) => {
                    let b = store.get_mut(id).unwrap();
                    b.life = life.clone();
                    if totals.is_some() {
                        b.totals = *totals;
                    }
                }
                Action::Persist(DurableOp::RecordResults(rs)) => {
                    for r in rs {
                        store
                            .get_mut(&r.req.batch)
                            .unwrap()
                            .results
                            .push(crate::durable::RecoveredResult {
                                index: r.req.index,
                                succeeded: r.outcome.is_success(),
                                usage: r.usage,
                                stored_bytes: r.outcome.stored_bytes(),
                            });
                    }
                }
                Action::Persist(DurableOp::DeleteBatch { id }) => {
                    store.remove(id);
                }
                Action::Persist(
                    DurableOp::TenantIdle { .. }
                    | DurableOp::DropInputs { .. }
                    | DurableOp::TenantHistory { .. }
                    | DurableOp::CreateFile { .. }
                    | DurableOp::DeleteFile { .. },
                )
                | Action::BatchChanged(_)
                | Action::LeaseReady { .. } => {}
            }
        }
    }

    fn recorded(actions: &[Action]) -> Vec<RequestRef> {
        actions
            .iter()
            .flat_map(|a| match a {
                Action::Persist(DurableOp::RecordResults(rs)) => rs.iter().map(|r| r.req).collect(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn a_batch_runs_to_completion_with_usage_and_cost() {
        let mut core = ControlCore::new(ControlConfig::default());
        let view = core.submit(T0, new_batch("acme", 3)).unwrap();
        assert_eq!(view.life.status(), BatchStatus::Queued);
        assert_eq!(
            view.counts,
            Counts {
                total: 4,
                completed: 0,
                failed: 0,
                invalid: 1
            }
        );
        let actions = drain(&mut core);
        assert!(matches!(&actions[0], Action::Persist(DurableOp::CreateBatch { requests, .. }) if requests.len() == 3));

        core.register(T0, registration("n1"));
        let grant = core.lease(T0, &node("n1"), &model(), 2).unwrap().unwrap();
        assert_eq!(grant.items.len(), 2);
        assert_eq!(grant.expires_at, T0.saturating_add(Duration::from_secs(10)));
        assert_eq!(
            core.batch(&tenant("acme"), view.meta.id).unwrap().life.status(),
            BatchStatus::InProgress
        );
        let rest = core.lease(T0, &node("n1"), &model(), 10).unwrap().unwrap();
        assert_eq!(rest.items.len(), 1);
        assert_eq!(core.lease(T0, &node("n1"), &model(), 10).unwrap(), None, "nothing left");

        let results: Vec<_> = grant
            .items
            .iter()
            .chain(&rest.items)
            .map(|i| ok(if i.req.index < 2 { grant.unit } else { rest.unit }, i.req))
            .collect();
        let s = core.report(T0, &node("n1"), results).unwrap();
        assert_eq!(
            s,
            ReportSummary {
                recorded: 3,
                ..Default::default()
            }
        );
        let done = core.batch(&tenant("acme"), view.meta.id).unwrap();
        assert_eq!(done.life.status(), BatchStatus::Completed);
        assert_eq!(done.counts.completed, 3);
        assert_eq!(done.usage.completion_tokens, 15);
        // Cost is computed by the core from the H100 price, not taken from the agent:
        // 0.5 device-s at 2 $/h + 36 J at 0.10 $/kWh and PUE 1.2, per request.
        let per_request = 0.5 * 2.0 / 3600.0 + 36.0 * 1.2 * 0.10 / 3.6e6;
        assert!(
            (done.usage.cost_usd - 3.0 * per_request).abs() < 1e-12,
            "{}",
            done.usage.cost_usd
        );
        assert_eq!(
            timers(&core).without_refresh(),
            Timers::default(),
            "no lease and no live batch left"
        );
    }

    #[test]
    fn duplicates_are_dropped_and_expired_leases_are_leased_again() {
        let mut core = ControlCore::new(ControlConfig::default());
        let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
        core.register(T0, registration("a"));
        core.register(T0, registration("b"));
        let first = core.lease(T0, &node("a"), &model(), 10).unwrap().unwrap();
        assert_eq!(timers(&core).lease, Some(first.expires_at));
        // Agent a goes silent; its lease expires and b gets the work.
        let later = first.expires_at;
        core.handle_timeout(later);
        assert_eq!(core.stats().leases_expired, 1);
        let second = core.lease(later, &node("b"), &model(), 10).unwrap().unwrap();
        assert_eq!(second.items.iter().map(|i| i.attempt).collect::<Vec<_>>(), [2, 2]);
        // a comes back late with one result: its lease is gone, so it is not recorded
        // (b holds the lease now); b reports both.
        let s1 = core
            .report(later, &node("a"), vec![ok(first.unit, first.items[0].req)])
            .unwrap();
        assert_eq!((s1.recorded, s1.not_leased), (0, 1));
        let s2 = core
            .report(
                later,
                &node("b"),
                second.items.iter().map(|i| ok(second.unit, i.req)).collect(),
            )
            .unwrap();
        assert_eq!((s2.recorded, s2.duplicates), (2, 0));
        let again = core
            .report(later, &node("b"), vec![ok(second.unit, second.items[1].req)])
            .unwrap();
        assert_eq!(again.duplicates, 1);
        assert_eq!(core.batch(&tenant("acme"), id).unwrap().counts.completed, 2);
        let reqs = recorded(&drain(&mut core));
        assert_eq!(reqs.len(), 2);
    }

    #[test]
    fn waiting_leases_get_work_as_it_arrives_first_come_first_served() {
        let mut core = ControlCore::new(ControlConfig::default());
        core.register(T0, registration("a"));
        core.register(T0, registration("b"));
        let until = T0.saturating_add(Duration::from_secs(5));
        // Nothing queued: both wait, a first.
        for (n, ticket) in [("a", 1), ("b", 2)] {
            let answer = core.lease_or_wait(T0, &node(n), &model(), 3, until, ticket).unwrap();
            assert_eq!(answer, LeaseAnswer::Waiting);
        }
        assert_eq!(timers(&core).wait, Some(until));
        drain(&mut core);
        // Five requests arrive: a gets 3, b the other 2, at once.
        let t = T0.saturating_add(Duration::from_secs(1));
        core.submit(t, new_batch("acme", 5)).unwrap();
        let ready: Vec<(u64, NodeId, usize)> = drain(&mut core)
            .into_iter()
            .filter_map(|a| match a {
                Action::LeaseReady {
                    ticket, node, grant, ..
                } => Some((ticket, node, grant.unwrap().items.len())),
                _ => None,
            })
            .collect();
        assert_eq!(ready, [(1, node("a"), 3), (2, node("b"), 2)]);
        // A wait with nothing arriving ends empty at its deadline, and not before.
        assert_eq!(
            core.lease_or_wait(t, &node("a"), &model(), 3, until, 3).unwrap(),
            LeaseAnswer::Waiting
        );
        core.handle_timeout(T0.saturating_add(Duration::from_millis(4999)));
        assert!(!drain(&mut core).iter().any(|a| matches!(a, Action::LeaseReady { .. })));
        core.handle_timeout(until);
        let ended: Vec<_> = drain(&mut core)
            .into_iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::LeaseReady {
                        ticket: 3,
                        grant: None,
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(ended.len(), 1);
        // No time to wait: an empty answer at once; unknown nodes are refused.
        assert_eq!(
            core.lease_or_wait(until, &node("a"), &model(), 3, until, 4).unwrap(),
            LeaseAnswer::Empty
        );
        assert!(core.lease_or_wait(until, &node("zz"), &model(), 3, until, 5).is_err());
    }

    #[test]
    fn heartbeats_keep_leases_alive() {
        let mut core = ControlCore::new(ControlConfig::default());
        core.submit(T0, new_batch("acme", 1)).unwrap();
        core.register(T0, registration("a"));
        let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
        let t = T0.saturating_add(Duration::from_secs(8));
        let reply = core.heartbeat(t, &node("a"), &[g.unit, WorkUnitId(999)], &[]).unwrap();
        assert_eq!(reply.unknown_units, [WorkUnitId(999)]);
        core.handle_timeout(T0.saturating_add(Duration::from_secs(12)));
        assert_eq!(core.stats().leases_expired, 0);
        assert_eq!(timers(&core).lease, Some(t.saturating_add(Duration::from_secs(10))));
        assert_eq!(
            core.heartbeat(t, &node("zz"), &[], &[]).unwrap_err().to_string(),
            "node 'zz' is not registered (the control plane may have restarted); register again"
        );
    }

    #[test]
    fn retryable_errors_requeue_until_attempts_run_out() {
        let mut core = ControlCore::new(ControlConfig {
            max_attempts: 2,
            ..ControlConfig::default()
        });
        let id = core.submit(T0, new_batch("acme", 1)).unwrap().meta.id;
        core.register(T0, registration("a"));
        let retry = |unit, req| ReportedResult {
            unit,
            req,
            outcome: ReportedOutcome::Retryable {
                code: "engine_unavailable".into(),
                message: "connection refused".into(),
            },
            usage: Usage::default(),
            latency: Duration::ZERO,
        };
        let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
        assert_eq!(
            core.report(T0, &node("a"), vec![retry(g.unit, g.items[0].req)])
                .unwrap()
                .requeued,
            1
        );
        let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
        assert_eq!(g.items[0].attempt, 2);
        assert_eq!(
            core.report(T0, &node("a"), vec![retry(g.unit, g.items[0].req)])
                .unwrap()
                .recorded,
            1
        );
        let v = core.batch(&tenant("acme"), id).unwrap();
        assert_eq!((v.life.status(), v.counts.failed), (BatchStatus::Completed, 1));
        let actions = drain(&mut core);
        let failure = actions.iter().find_map(|a| match a {
            Action::Persist(DurableOp::RecordResults(r)) => Some(r[0].outcome.clone()),
            _ => None,
        });
        assert_eq!(
            failure,
            Some(Outcome::Error {
                code: "retries_exhausted".into(),
                message: "no answer after 2 attempts; last error (engine_unavailable): connection refused".into()
            })
        );
    }

    #[test]
    fn tenants_see_only_their_own_batches() {
        let mut core = ControlCore::new(ControlConfig::default());
        let id = core.submit(T0, new_batch("acme", 1)).unwrap().meta.id;
        assert_eq!(core.batch(&tenant("evil"), id), Err(BatchError::NotFound(id)));
        assert_eq!(
            core.cancel(T0, &tenant("evil"), id).unwrap_err().to_string(),
            "batch batch_00000001 not found for this tenant"
        );
        assert_eq!(core.list(&tenant("evil"), None, 10).0.len(), 0);
        assert_eq!(core.list(&tenant("acme"), None, 10).0.len(), 1);
        assert_eq!(
            core.batch(&tenant("acme"), id).unwrap().life.status(),
            BatchStatus::Queued,
            "untouched"
        );
    }

    #[test]
    fn listing_pages_newest_first() {
        let mut core = ControlCore::new(ControlConfig::default());
        let ids: Vec<_> = (0..5)
            .map(|_| core.submit(T0, new_batch("acme", 1)).unwrap().meta.id)
            .collect();
        core.submit(T0, new_batch("other", 1)).unwrap();
        let (page, more) = core.list(&tenant("acme"), None, 2);
        assert_eq!(page.iter().map(|v| v.meta.id).collect::<Vec<_>>(), [ids[4], ids[3]]);
        assert!(more);
        let (page, more) = core.list(&tenant("acme"), Some(ids[3]), 10);
        assert_eq!(
            page.iter().map(|v| v.meta.id).collect::<Vec<_>>(),
            [ids[2], ids[1], ids[0]]
        );
        assert!(!more);
    }

    #[test]
    fn submissions_are_checked() {
        let mut core = ControlCore::new(ControlConfig::default());
        let mut b = new_batch("acme", 1);
        b.model = ModelId::from("gpt-9");
        let e = core.submit(T0, b).unwrap_err().to_string();
        assert!(e.starts_with("unknown model 'gpt-9': this cluster serves "), "{e}");
        assert!(e.contains("llama-3.1-8b"), "{e}");
        let mut b = new_batch("acme", 1);
        b.sla_class = Some("gold".into());
        assert_eq!(
            core.submit(T0, b).unwrap_err().to_string(),
            "unknown SLA class 'gold': choose one of standard, best-effort"
        );
        let mut b = new_batch("acme", 1);
        b.completion_window = Some(Duration::from_secs(30 * 24 * 3600));
        assert!(
            core.submit(T0, b)
                .unwrap_err()
                .to_string()
                .contains("the most this cluster accepts is 604800 s")
        );
        assert!(drain(&mut core).is_empty(), "refused batches change nothing");
    }

    #[test]
    fn cancel_ends_pending_work_and_waits_for_leased_work() {
        let mut core = ControlCore::new(ControlConfig::default());
        let id = core.submit(T0, new_batch("acme", 3)).unwrap().meta.id;
        core.register(T0, registration("a"));
        let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
        let v = core.cancel(T0, &tenant("acme"), id).unwrap();
        assert_eq!((v.life.status(), v.counts.failed), (BatchStatus::Cancelling, 2));
        assert_eq!(core.lease(T0, &node("a"), &model(), 10).unwrap(), None);
        core.report(T0, &node("a"), vec![ok(g.unit, g.items[0].req)]).unwrap();
        let v = core.batch(&tenant("acme"), id).unwrap();
        assert_eq!(
            (v.life.status(), v.counts.completed, v.counts.failed),
            (BatchStatus::Cancelled, 1, 2)
        );
        let e = core.cancel(T0, &tenant("acme"), id).unwrap_err();
        assert_eq!(
            e.to_string(),
            "batch_00000001 is cancelled; it cannot become cancelling"
        );
    }

    #[test]
    fn the_deadline_expires_what_is_left() {
        let mut core = ControlCore::new(ControlConfig::default());
        let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
        core.register(T0, registration("a"));
        let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
        core.report(T0, &node("a"), vec![ok(g.unit, g.items[0].req)]).unwrap();
        let deadline = T0.saturating_add(Duration::from_secs(3600));
        assert_eq!(timers(&core).deadline, Some(deadline));
        core.handle_timeout(deadline);
        let v = core.batch(&tenant("acme"), id).unwrap();
        assert_eq!(
            (v.life.status(), v.counts.completed, v.counts.failed),
            (BatchStatus::Expired, 1, 1)
        );
    }

    #[test]
    fn classes_are_served_in_priority_order_and_committed_work_by_slack() {
        let config = ControlConfig {
            sla_classes: vec![
                SlaClass::committed("premium"),
                SlaClass::committed("standard"),
                SlaClass::best_effort("best-effort"),
            ],
            admission: false,
            ..ControlConfig::default()
        };
        let mut core = ControlCore::new(config.clone());
        core.register(T0, gpu_node("a"));
        let submit = |core: &mut ControlCore, class: &str, n: u32, window_s: u64, tokens: u32| {
            let mut b = long_batch(n, window_s);
            b.sla_class = Some(class.into());
            for r in &mut b.requests {
                r.max_tokens = Some(tokens);
            }
            core.submit(T0, b).unwrap().meta.id
        };
        let be = submit(&mut core, "best-effort", 2, 600, 100);
        let standard = submit(&mut core, "standard", 2, 600, 100);
        let premium = submit(&mut core, "premium", 2, 7200, 100);
        let g = core.lease(T0, &node("a"), &model(), 6).unwrap().unwrap();
        let order: Vec<_> = g.items.iter().map(|i| i.req.batch).collect();
        assert_eq!(
            order,
            [premium, premium, standard, standard, be, be],
            "premium first even with a later deadline; best-effort last"
        );

        // Within a class: a big batch due a little later has less slack than a small one
        // due first, so it starts first; by deadline it would wait.
        for (order, expected_first) in [(QueueOrder::Slack, 1usize), (QueueOrder::Deadline, 0)] {
            let mut core = ControlCore::new(ControlConfig {
                queue_order: order,
                ..config.clone()
            });
            core.register(T0, gpu_node("a"));
            let small_soon = submit(&mut core, "standard", 10, 3600, 100);
            let big_later = submit(&mut core, "standard", 1000, 3700, 4000);
            let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
            assert_eq!(
                g.items[0].req.batch,
                [small_soon, big_later][expected_first],
                "{order:?}"
            );
        }
    }

    #[test]
    fn class_lists_are_checked() {
        let ok = SlaClass::defaults();
        assert_eq!(SlaClass::check(&ok, "standard"), Ok(()));
        let e = SlaClass::check(&[SlaClass::best_effort("be"), SlaClass::committed("gold")], "gold").unwrap_err();
        assert!(e.contains("comes after a best-effort class"), "{e}");
        let e = SlaClass::check(&ok, "gold").unwrap_err();
        assert!(
            e.contains("'gold' is not one of the classes (standard, best-effort)"),
            "{e}"
        );
        let e = SlaClass::check(&[SlaClass::committed("a"), SlaClass::committed("a")], "a").unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn earliest_deadline_is_leased_first() {
        let mut core = ControlCore::new(ControlConfig::default());
        let mut late = new_batch("acme", 2);
        late.completion_window = Some(Duration::from_secs(7200));
        let late = core.submit(T0, late).unwrap().meta.id;
        let soon = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
        core.register(T0, registration("a"));
        let g = core.lease(T0, &node("a"), &model(), 3).unwrap().unwrap();
        let order: Vec<_> = g.items.iter().map(|i| i.req.batch).collect();
        assert_eq!(order, [soon, soon, late]);
    }

    fn gpu_node(name: &str) -> NodeRegistration {
        let mut r = registration(name);
        r.replicas.push(NodeReplica {
            replica: crate::ids::ReplicaId::from("r0"),
            model: model(),
            devices: vec![0],
            max_concurrency: 256,
            window: 64,
        });
        r
    }

    fn long_batch(n: u32, window_s: u64) -> NewBatch {
        let mut b = new_batch("acme", n);
        for r in &mut b.requests {
            r.max_tokens = Some(1000);
        }
        b.completion_window = Some(Duration::from_secs(window_s));
        b
    }

    /// Active placement: with little work one replica takes it and the others are parked;
    /// a tight deadline activates them all at once; once that work is gone they are parked
    /// again, but only after `park_after` (and once the arrival rate placement keeps up
    /// with has fallen). The plan advises stopping the surplus replicas; advisory
    /// placement only reports.
    #[test]
    fn placement_parks_surplus_replicas_and_wakes_them_for_a_tight_deadline() {
        let park_after = Duration::from_secs(60);
        let config = |mode| ControlConfig {
            admission: false,
            placement: mode,
            activation: crate::placement::ActivationConfig {
                park_after,
                ..crate::placement::ActivationConfig::default()
            },
            ..ControlConfig::default()
        };
        let at = |s: u64| T0.saturating_add(Duration::from_secs(s));
        let active = |core: &mut ControlCore, s: u64| -> (Vec<bool>, Vec<bool>) {
            core.handle_timeout(at(s));
            let view = core.replicas_view();
            (
                view.iter().map(|r| r.active).collect(),
                view.iter().map(|r| r.placement_active).collect(),
            )
        };
        let one = [true, false, false, false];
        for mode in [PlacementMode::Active, PlacementMode::Advisory] {
            let mut core = ControlCore::new(config(mode));
            for n in ["a", "b", "c", "d"] {
                core.register(T0, gpu_node(n));
            }
            // 100 requests x 1,000 tokens in 4 h: about 9 tokens/s, one replica's trickle.
            core.submit(T0, long_batch(100, 4 * 3600)).unwrap();
            let (on, advised) = active(&mut core, 2);
            assert_eq!(advised, one, "{mode:?}");
            match mode {
                PlacementMode::Active => assert_eq!(on, one, "active placement enforces"),
                _ => assert_eq!(on, [true; 4], "advisory placement changes nothing"),
            }
            let plan = core.tuning_doc().plan.expect("placement measured demand");
            assert_eq!(plan.replicas_now, 4);
            assert_eq!((plan.replicas_planned, plan.stop.len()), (1, 3), "{plan:?}");
            // A parked replica owes nothing.
            let reply = core.heartbeat(at(2), &node("b"), &[], &[]).unwrap();
            let d = &reply.directives[0];
            assert_eq!(d.active, mode != PlacementMode::Active, "{d:?}");
            if !d.active {
                assert_eq!(d.owed_tokens_per_s, 0.0);
            }

            // 20,000 requests x 1,000 tokens due in 30 min need every replica, at once.
            let big = core.submit(at(10), long_batch(20_000, 1800)).unwrap().meta.id;
            assert_eq!(active(&mut core, 12), (vec![true; 4], vec![true; 4]), "{mode:?}");
            core.cancel(at(20), &tenant("acme"), big).unwrap();
            // The arrival rate of the last 15 minutes still asks for them ...
            assert_eq!(active(&mut core, 600).1, [true; 4], "{mode:?}");
            // ... then they are surplus, but parked only after park_after ...
            let quiet = 20 + 900 + 1;
            assert_eq!(active(&mut core, quiet).1, [true; 4], "{mode:?}");
            assert_eq!(
                active(&mut core, quiet + park_after.as_secs() - 5).1,
                [true; 4],
                "{mode:?}"
            );
            // ... and then they are.
            let (on, advised) = active(&mut core, quiet + park_after.as_secs() + 1);
            assert_eq!(advised, one, "{mode:?}");
            assert_eq!(on, if mode == PlacementMode::Active { one } else { [true; 4] });
        }
    }

    #[test]
    fn admission_refuses_what_cannot_finish_in_time_and_names_the_earliest_completion() {
        let mut core = ControlCore::new(ControlConfig::default());
        core.register(T0, gpu_node("a"));
        // 10,000 requests x 1,000 output tokens on one H100 take far more than 10 minutes.
        let e = core.submit(T0, long_batch(10_000, 600)).unwrap_err();
        let SubmitError::Late { earliest, .. } = &e else {
            panic!("{e}")
        };
        assert!(*earliest > T0.saturating_add(Duration::from_secs(600)), "{e}");
        assert!(
            e.to_string().contains("earliest completion that can be promised is in"),
            "{e}"
        );
        // Asking for the time it named is admitted.
        let window = earliest.since(T0).as_secs() + 1;
        let first = core.submit(T0, long_batch(10_000, window)).unwrap();
        // The same again now has the first one ahead of it: refused, with a later time.
        let e2 = core.submit(T0, long_batch(10_000, window)).unwrap_err();
        let SubmitError::Late { earliest: later, .. } = e2 else {
            panic!("{e2}")
        };
        assert!(later > *earliest);
        // Accepted as best-effort when the tenant asks for it.
        let mut b = long_batch(10_000, window);
        b.best_effort_if_late = true;
        let be = core.submit(T0, b).unwrap();
        assert_eq!(be.meta.sla_class, "best-effort");
        // Small batches with room still get in, and best-effort work is never refused.
        core.submit(T0, long_batch(10, 3 * window)).unwrap();
        let mut b = long_batch(10_000, 60);
        b.sla_class = Some("best-effort".into());
        core.submit(T0, b).unwrap();
        // Without capacity information (no replica registered for the model) or with
        // admission off, nothing is refused.
        let mut open = ControlCore::new(ControlConfig::default());
        open.register(T0, registration("cpu"));
        open.submit(T0, long_batch(10_000, 60)).unwrap();
        let mut off = ControlCore::new(ControlConfig {
            admission: false,
            ..ControlConfig::default()
        });
        off.register(T0, gpu_node("a"));
        off.submit(T0, long_batch(10_000, 60)).unwrap();
        assert_eq!(first.meta.sla_class, "standard");
    }

    #[test]
    fn committed_work_is_leased_before_best_effort_work() {
        let mut core = ControlCore::new(ControlConfig::default());
        let mut be = new_batch("acme", 2);
        be.sla_class = Some("best-effort".into());
        be.completion_window = Some(Duration::from_secs(60));
        let be = core.submit(T0, be).unwrap().meta.id;
        let committed = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
        core.register(T0, registration("a"));
        let g = core.lease(T0, &node("a"), &model(), 3).unwrap().unwrap();
        let order: Vec<_> = g.items.iter().map(|i| i.req.batch).collect();
        assert_eq!(
            order,
            [committed, committed, be],
            "best-effort waits despite its earlier deadline"
        );
    }

    #[test]
    fn best_effort_capacity_is_shared_by_tenant_weight() {
        let mut core = ControlCore::new(ControlConfig {
            tenant_weights: [(tenant("big"), 2.0), (tenant("small"), 1.0)].into_iter().collect(),
            ..ControlConfig::default()
        });
        core.register(T0, registration("a"));
        let be = |who: &str| {
            let mut b = new_batch(who, 3000);
            b.sla_class = Some("best-effort".into());
            b
        };
        let big = core.submit(T0, be("big")).unwrap().meta.id;
        let small = core.submit(T0, be("small")).unwrap().meta.id;
        let mut count = BTreeMap::new();
        for _ in 0..30 {
            let g = core.lease(T0, &node("a"), &model(), 60).unwrap().unwrap();
            for i in g.items {
                *count.entry(i.req.batch).or_insert(0u32) += 1;
            }
        }
        let (b, s) = (count[&big], count[&small]);
        assert_eq!(b + s, 1800);
        assert!((f64::from(b) / f64::from(s) - 2.0).abs() < 0.05, "{b} : {s}");
        // A tenant arriving now starts level with the others, not with a head start.
        let late = core.submit(T0, be("late")).unwrap().meta.id;
        let g = core.lease(T0, &node("a"), &model(), 48).unwrap().unwrap();
        let late_n = g.items.iter().filter(|i| i.req.batch == late).count();
        assert!(late_n <= 24, "{late_n} of 48 went to the newcomer");
        // Committed work still comes first.
        let committed = core.submit(T0, new_batch("small", 5)).unwrap().meta.id;
        let g = core.lease(T0, &node("a"), &model(), 5).unwrap().unwrap();
        assert!(g.items.iter().all(|i| i.req.batch == committed));
    }

    #[test]
    fn quotas_bound_unfinished_batches_and_tokens_per_hour() {
        let quota = Quota {
            max_active_batches: Some(2),
            output_tokens_per_hour: Some(1000),
            ..Quota::default()
        };
        let mut core = ControlCore::new(ControlConfig {
            tenant_quotas: [(tenant("acme"), quota)].into_iter().collect(),
            ..ControlConfig::default()
        });
        // Two batches of 20 x 16 tokens; a third is one too many.
        core.submit(T0, new_batch("acme", 20)).unwrap();
        let second = core.submit(T0, new_batch("acme", 20)).unwrap().meta.id;
        let e = core.submit(T0, new_batch("acme", 20)).unwrap_err();
        assert!(matches!(e, SubmitError::TooManyBatches { active: 2, .. }), "{e}");
        // Other tenants have no quota.
        core.submit(T0, new_batch("other", 20)).unwrap();
        // With one cancelled, 640 of 1000 tokens were asked for this hour: 400 more are too many.
        core.cancel(T0, &tenant("acme"), second).unwrap();
        let e = core.submit(T0, new_batch("acme", 25)).unwrap_err();
        let SubmitError::TokenQuota { used, asked, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!((*used, *asked), (640, 400));
        assert!(e.to_string().contains("retry in 1h"), "{e}");
        // A restart does not reset the hour's count.
        let mut store = BTreeMap::new();
        replay(&mut store, &drain(&mut core));
        let config = ControlConfig {
            tenant_quotas: [(tenant("acme"), quota)].into_iter().collect(),
            ..ControlConfig::default()
        };
        let mut recovered = ControlCore::recover(config, store.into_values().collect(), T0);
        let again = recovered.submit(T0, new_batch("acme", 25)).unwrap_err();
        assert!(matches!(again, SubmitError::TokenQuota { used: 640, .. }), "{again}");
        // An hour later the first submissions have aged out.
        let later = T0.saturating_add(Duration::from_secs(3600));
        core.submit(later, new_batch("acme", 25)).unwrap();
    }

    #[test]
    fn the_sla_document_reports_what_was_delivered_over_the_window() {
        let mut core = ControlCore::new(ControlConfig::default());
        core.register(T0, gpu_node("a"));
        let id = core.submit(T0, new_batch("acme", 4)).unwrap().meta.id;
        let g = core.lease(T0, &node("a"), &model(), 4).unwrap().unwrap();
        let t = T0.saturating_add(Duration::from_secs(10));
        let results = g
            .items
            .iter()
            .map(|i| ReportedResult {
                usage: Usage {
                    prompt_tokens: 10,
                    completion_tokens: 16,
                    joules: 8.0,
                    device_seconds: 0.5,
                    cost_usd: 0.0,
                },
                latency: Duration::from_millis(200 * u64::from(i.req.index + 1)),
                ..ok(g.unit, i.req)
            })
            .collect();
        core.report(t, &node("a"), results).unwrap();
        assert_eq!(
            core.batch(&tenant("acme"), id).unwrap().life.status(),
            BatchStatus::Completed
        );
        let doc = core.sla_document(t);
        assert_eq!(
            (doc.api_version.as_str(), doc.kind.as_str()),
            ("tokenfab.io/v1", "ThroughputSLA")
        );
        assert_eq!(doc.metadata.window_seconds, 3600.0);
        let p = &doc.pools[0];
        assert_eq!((p.model.as_str(), p.accelerator.as_str()), ("llama-3.1-8b", "h100-sxm"));
        assert_eq!((p.devices, p.replicas, p.requests, p.output_tokens), (1, 1, 4, 64));
        assert!((p.output_tokens_per_joule - 2.0).abs() < 1e-12, "64 tokens / 32 J");
        assert!(p.committed_output_tokens_per_second > 0.0);
        assert!(
            (p.request_latency_seconds.p50 - 0.4).abs() < 0.001,
            "{:?}",
            p.request_latency_seconds
        );
        let c = &doc.classes[0];
        assert_eq!(
            (c.class.as_str(), c.committed, c.batches, c.on_time),
            ("standard", true, 1, 1)
        );
        assert_eq!(c.completion_seconds.p99, 10.0);
        // The document is JSON with the field names of docs/throughput-sla.schema.json.
        let json = serde_json::to_value(&doc).unwrap();
        assert!(json["pools"][0]["measuredOutputTokensPerSecond"].is_number());
        assert!(json["classes"][0]["completionSeconds"]["p99"].is_number());
    }

    #[test]
    fn tenant_totals_match_usage_by_batch_and_survive_recovery() {
        let mut core = ControlCore::new(ControlConfig::default());
        core.register(T0, registration("a"));
        let mut ops = Vec::new();
        for who in ["acme", "acme", "zeta"] {
            core.submit(T0, new_batch(who, 3)).unwrap();
        }
        let g = core.lease(T0, &node("a"), &model(), 5).unwrap().unwrap();
        let results = g.items.iter().map(|i| ok(g.unit, i.req)).collect();
        core.report(T0, &node("a"), results).unwrap();
        ops.extend(drain(&mut core));
        for who in ["acme", "zeta"] {
            assert_eq!(
                core.tenant_totals()[&tenant(who)],
                core.tenant_usage(&tenant(who), Timestamp::ZERO)
            );
        }
        assert_eq!(core.tenant_totals()[&tenant("acme")].requests_completed, 5);
        // After a restart the totals are rebuilt from what was made durable.
        let mut store = BTreeMap::new();
        replay(&mut store, &ops);
        let recovered = ControlCore::recover(ControlConfig::default(), store.into_values().collect(), T0);
        assert_eq!(recovered.tenant_totals(), core.tenant_totals());
    }

    #[test]
    fn a_node_that_registers_again_gets_no_work_on_its_old_waiting_call() {
        let mut core = ControlCore::new(ControlConfig::default());
        core.register(T0, registration("a"));
        let until = T0.saturating_add(Duration::from_secs(5));
        assert_eq!(
            core.lease_or_wait(T0, &node("a"), &model(), 4, until, 1).unwrap(),
            LeaseAnswer::Waiting
        );
        core.register(T0, registration("a"));
        core.submit(T0, new_batch("acme", 4)).unwrap();
        let ready: Vec<_> = drain(&mut core)
            .into_iter()
            .filter_map(|a| match a {
                Action::LeaseReady { ticket, grant, .. } => Some((ticket, grant.is_some())),
                _ => None,
            })
            .collect();
        assert_eq!(
            ready,
            [(1, false)],
            "the old call ends empty and nothing more is sent to it"
        );
        assert_eq!(
            timers(&core).deadline,
            Some(T0.saturating_add(Duration::from_secs(3600)))
        );
    }

    #[test]
    fn work_going_back_on_the_queue_is_refunded_to_its_tenant() {
        let mut core = ControlCore::new(ControlConfig::default());
        core.register(T0, registration("a"));
        let be = |who: &str, n| {
            let mut b = new_batch(who, n);
            b.sla_class = Some("best-effort".into());
            b
        };
        core.submit(T0, be("big", 100)).unwrap();
        core.submit(T0, be("small", 4)).unwrap();
        // A lease takes all of small's work and part of big's; big still waits.
        let g = core.lease(T0, &node("a"), &model(), 50).unwrap().unwrap();
        let vt_big = core.tenant_vt[&tenant("big")];
        assert_eq!(core.tenant_vt[&tenant("small")], 4.0 * 16.0);
        // small's requests come back (a release): its charge is refunded in full, and it is
        // not raised to the busy tenant's level as a newcomer would be.
        let small: Vec<RequestRef> = g
            .items
            .iter()
            .map(|i| i.req)
            .filter(|r| core.batches[&r.batch].meta.tenant == tenant("small"))
            .collect();
        core.release(T0, &node("a"), g.unit, &small).unwrap();
        assert_eq!(core.tenant_vt[&tenant("small")], 0.0);
        assert_eq!(core.tenant_vt[&tenant("big")], vt_big);
    }

    /// Issue 11: a node could record a result for a request that was never leased to it
    /// (a forged result in another tenant's batch came back in that tenant's download).
    #[test]
    fn only_the_node_holding_the_lease_records_a_result() {
        let mut core = ControlCore::new(ControlConfig::default());
        let victim = core.submit(T0, new_batch("victim", 3)).unwrap().meta.id;
        core.register(T0, registration("honest"));
        core.register(T0, registration("evil"));
        let grant = core.lease(T0, &node("honest"), &model(), 1).unwrap().unwrap();
        drain(&mut core);
        let leased = grant.items[0].req;
        let queued = RequestRef {
            batch: victim,
            index: 2,
        };
        // A result for queued work nobody holds, for another node's lease (under its own
        // unit or the other's), and for a request that does not exist.
        let forged = vec![
            ok(WorkUnitId(999), queued),
            ok(grant.unit, leased),
            ok(WorkUnitId(999), leased),
            ok(
                grant.unit,
                RequestRef {
                    batch: victim,
                    index: 7,
                },
            ),
        ];
        let s = core.report(T0, &node("evil"), forged).unwrap();
        assert_eq!((s.recorded, s.not_leased, s.unknown), (0, 3, 1));
        assert!(recorded(&drain(&mut core)).is_empty(), "nothing reaches the store");
        assert_eq!(core.stats().results_not_leased, 3);
        // The honest node's result is recorded, once.
        let s = core.report(T0, &node("honest"), vec![ok(grant.unit, leased)]).unwrap();
        assert_eq!(s.recorded, 1);
        assert_eq!(recorded(&drain(&mut core)), [leased]);
        assert_eq!(core.batch(&tenant("victim"), victim).unwrap().counts.completed, 1);
    }

    /// Issue 11: all bodies of a lease went into one reply, which could exceed the gRPC
    /// message limit.
    #[test]
    fn uploaded_files_belong_to_their_tenant_count_toward_its_limits_and_follow_its_retention() {
        let day = Duration::from_secs(24 * 3600);
        let mut core = ControlCore::new(ControlConfig {
            retention: Some(30 * day),
            tenant_retention: [(tenant("brief"), day)].into_iter().collect(),
            default_quota: Quota {
                max_stored_bytes: Some(1_000),
                ..Quota::default()
            },
            ..ControlConfig::default()
        });
        let f = core
            .add_file(T0, &tenant("acme"), "a.jsonl".into(), 600, "batch".into())
            .unwrap();
        assert_eq!(f.id.to_string(), "file-00000001");
        assert!(matches!(
            drain(&mut core)[..],
            [Action::Persist(DurableOp::CreateFile { ref meta })] if meta == &f
        ));
        assert_eq!(core.file(&tenant("evil"), f.id), Err(FileError::NotFound(f.id)));
        assert_eq!(core.list_files(&tenant("evil"), None, 10, false).0.len(), 0);
        assert_eq!(core.delete_file(&tenant("evil"), f.id), Err(FileError::NotFound(f.id)));
        // Files count toward the tenant's stored bytes.
        let e = core
            .add_file(T0, &tenant("acme"), "b.jsonl".into(), 500, "batch".into())
            .unwrap_err();
        assert!(
            e.to_string().starts_with("tenant 'acme' may keep 1000 B in the store"),
            "{e}"
        );
        // A batch may be made only from the tenant's own file.
        let mut b = new_batch("evil", 1);
        b.input_file = Some(f.id);
        assert_eq!(core.submit(T0, b).unwrap_err(), SubmitError::UnknownFile(f.id));
        let mut b = new_batch("acme", 1);
        b.input_file = Some(f.id);
        assert_eq!(core.submit(T0, b).unwrap().meta.input_file, Some(f.id));
        // Retention: per tenant, from the upload.
        let g = core
            .add_file(T0, &tenant("brief"), "c.jsonl".into(), 10, "batch".into())
            .unwrap();
        assert_eq!(core.file_expiry(&g), Some(T0.saturating_add(day)));
        assert_eq!(core.file_expiry(&f), Some(T0.saturating_add(30 * day)));
        drain(&mut core);
        core.handle_timeout(T0.saturating_add(day));
        assert!(drain(&mut core).contains(&Action::Persist(DurableOp::DeleteFile { id: g.id })));
        assert!(core.file(&tenant("brief"), g.id).is_err());
        assert!(core.file(&tenant("acme"), f.id).is_ok());
        // Ids are never reused, even after a restart.
        let mut again = ControlCore::new(ControlConfig::default());
        again.restore_files([f.clone()], 3);
        let h = again
            .add_file(T0, &tenant("acme"), "d".into(), 1, "batch".into())
            .unwrap();
        assert_eq!(h.id.0, 3);
    }

    #[test]
    fn requests_whose_input_cannot_be_read_end_as_input_lost() {
        let mut core = ControlCore::new(ControlConfig::default());
        let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
        core.register(T0, registration("a"));
        let g = core.lease(T0, &node("a"), &model(), 2).unwrap().unwrap();
        drain(&mut core);
        core.inputs_lost(T0, g.unit, &[g.items[0].req]);
        let actions = drain(&mut core);
        let lost: Vec<&Outcome> = actions
            .iter()
            .flat_map(|a| match a {
                Action::Persist(DurableOp::RecordResults(rs)) => rs.iter().map(|r| &r.outcome).collect(),
                _ => vec![],
            })
            .collect();
        assert!(
            matches!(lost[..], [Outcome::Error { code, .. }] if code == "input_lost"),
            "{lost:?}"
        );
        // The other request is still leased and completes; the batch ends with both.
        core.report(T0, &node("a"), vec![ok(g.unit, g.items[1].req)]).unwrap();
        let b = core.batch(&tenant("acme"), id).unwrap();
        assert_eq!(
            (b.counts.completed, b.counts.failed, b.life.status()),
            (1, 1, BatchStatus::Completed)
        );
    }

    #[test]
    fn leases_are_bounded_in_bytes_and_always_carry_one_request() {
        let mut core = ControlCore::new(ControlConfig {
            lease_max_bytes: 10_000,
            ..ControlConfig::default()
        });
        let mut big = new_batch("acme", 30);
        for r in &mut big.requests {
            r.body_bytes = 1_000_000;
        }
        let mut small = new_batch("acme", 30);
        for r in &mut small.requests {
            r.body_bytes = 2_000;
        }
        core.submit(T0, big).unwrap();
        core.register(T0, registration("a"));
        for _ in 0..3 {
            let g = core.lease(T0, &node("a"), &model(), 256).unwrap().unwrap();
            assert_eq!(g.items.len(), 1, "one request over the budget still goes alone");
        }
        let id = core
            .submit(T0.saturating_add(Duration::from_secs(1)), small)
            .unwrap()
            .meta
            .id;
        let mut leased = 0;
        while leased < 30 {
            let g = core.lease(T0, &node("a"), &model(), 256).unwrap().unwrap();
            if g.items[0].req.batch != id {
                continue;
            }
            let bytes = g.items.len() as u64 * (2_000 + LEASED_ITEM_OVERHEAD_BYTES);
            assert!(bytes <= 10_000, "{} items", g.items.len());
            assert_eq!(g.items.len().min(30 - leased), 3.min(30 - leased));
            leased += g.items.len();
        }
    }

    #[test]
    fn oversized_metadata_is_refused_with_nothing_committed() {
        let mut core = ControlCore::new(ControlConfig::default());
        let cases: [(BTreeMap<String, String>, &str); 3] = [
            (
                (0..17).map(|i| (format!("k{i}"), "v".into())).collect(),
                "metadata: more than 16 key-value pairs; keep at most 16 (as in the OpenAI Batch API)",
            ),
            (
                [("k".repeat(65), "v".into())].into_iter().collect(),
                "is 65 characters, over the limit of 64",
            ),
            (
                [("note".into(), "x".repeat(100 << 20))].into_iter().collect(),
                "metadata: the value of 'note' is 104857600 characters, over the limit of 512",
            ),
        ];
        for (metadata, message) in cases {
            let mut b = new_batch("acme", 1);
            b.metadata = metadata;
            let e = core.submit(T0, b).unwrap_err();
            assert!(e.to_string().contains(message), "{e}");
            assert!(drain(&mut core).is_empty(), "nothing to persist");
        }
        assert_eq!(core.list(&tenant("acme"), None, 10).0.len(), 0);
        let mut b = new_batch("acme", 1);
        b.metadata = (0..16).map(|i| (format!("k{i}"), "é".repeat(512))).collect();
        assert!(core.submit(T0, b).is_ok(), "16 pairs of 512 characters are allowed");
    }

    #[test]
    fn default_limits_bound_queued_requests_and_stored_bytes() {
        let mut core = ControlCore::new(ControlConfig {
            default_quota: Quota {
                max_queued_requests: Some(25),
                max_stored_bytes: Some(1_000),
                ..Quota::default()
            },
            // One tenant gets more room.
            tenant_quotas: [(
                tenant("big"),
                Quota {
                    max_queued_requests: Some(100),
                    ..Quota::default()
                },
            )]
            .into_iter()
            .collect(),
            ..ControlConfig::default()
        });
        core.submit(T0, new_batch("acme", 20)).unwrap();
        let e = core.submit(T0, new_batch("acme", 10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant 'acme' may have 25 requests waiting; it has 20 and this batch adds 10; submit it when more of them have finished"
        );
        core.submit(T0, new_batch("big", 60)).unwrap();
        // Stored bytes: inputs of unfinished batches (100 bytes each here).
        let mut other = ControlCore::new(ControlConfig {
            default_quota: Quota {
                max_stored_bytes: Some(250),
                ..Quota::default()
            },
            ..ControlConfig::default()
        });
        other.submit(T0, new_batch("acme", 1)).unwrap();
        other.submit(T0, new_batch("acme", 1)).unwrap();
        let e = other.submit(T0, new_batch("acme", 1)).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "tenant 'acme' may keep 250 B in the store; its batches hold 200 B and this one adds 100 B"
            ),
            "{e}"
        );
        assert!(
            drain(&mut core)
                .iter()
                .all(|a| !matches!(a, Action::Persist(DurableOp::CreateBatch { meta, .. }) if meta.requests == 10))
        );
    }

    #[test]
    fn finished_batches_are_deleted_when_their_retention_ends_and_their_usage_is_kept() {
        let retention = Duration::from_secs(3600);
        let mut core = ControlCore::new(ControlConfig {
            retention: Some(retention),
            ..ControlConfig::default()
        });
        core.register(T0, registration("a"));
        let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
        let g = core.lease(T0, &node("a"), &model(), 10).unwrap().unwrap();
        core.report(T0, &node("a"), g.items.iter().map(|i| ok(g.unit, i.req)).collect())
            .unwrap();
        let actions = drain(&mut core);
        assert!(
            actions.contains(&Action::Persist(DurableOp::DropInputs { id })),
            "a finished batch's inputs can go at once"
        );
        let before = core.tenant_usage(&tenant("acme"), Timestamp::ZERO);
        assert_eq!(timers(&core).retention, Some(T0.saturating_add(retention)));
        core.handle_timeout(T0.saturating_add(retention));
        let actions = drain(&mut core);
        assert!(actions.contains(&Action::Persist(DurableOp::DeleteBatch { id })));
        assert_eq!(core.batch(&tenant("acme"), id), Err(BatchError::NotFound(id)));
        assert_eq!(core.list(&tenant("acme"), None, 10).0.len(), 0);
        let after = core.tenant_usage(&tenant("acme"), Timestamp::ZERO);
        assert_eq!(after, before, "usage outlives the batch");
        // And survives a restart, through the history rows.
        let rows: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Persist(DurableOp::TenantHistory { tenant, day, history }) => {
                    Some((tenant.clone(), *day, *history))
                }
                _ => None,
            })
            .collect();
        let mut again = ControlCore::recover(ControlConfig::default(), vec![], T0);
        again.restore_history(rows);
        assert_eq!(again.tenant_usage(&tenant("acme"), Timestamp::ZERO), after);
        assert_eq!(again.tenant_totals()[&tenant("acme")].batches, 1);

        // A tenant deletes a finished batch itself; an unfinished one must be cancelled first.
        let live = core.submit(T0, new_batch("acme", 1)).unwrap().meta.id;
        assert_eq!(
            core.delete_batch(&tenant("acme"), live).unwrap_err().to_string(),
            "batch_00000002 is queued: only a finished batch can be deleted; cancel it first"
        );
        assert_eq!(
            core.delete_batch(&tenant("evil"), live),
            Err(BatchError::NotFound(live))
        );
        core.cancel(T0, &tenant("acme"), live).unwrap();
        core.delete_batch(&tenant("acme"), live).unwrap();
        assert!(drain(&mut core).contains(&Action::Persist(DurableOp::DeleteBatch { id: live })));
    }

    #[test]
    fn a_nearly_full_disk_refuses_new_batches_but_records_running_work() {
        let mut core = ControlCore::new(ControlConfig {
            min_free_bytes: 1 << 20,
            ..ControlConfig::default()
        });
        core.register(T0, registration("a"));
        let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
        let g = core.lease(T0, &node("a"), &model(), 10).unwrap().unwrap();
        core.set_free_bytes(Some(1000));
        assert!(core.storage_low());
        let e = core.submit(T0, new_batch("acme", 1)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the control plane's disk is nearly full (1000 B free, 1.0 MiB are kept"),
            "{e}"
        );
        let s = core
            .report(T0, &node("a"), g.items.iter().map(|i| ok(g.unit, i.req)).collect())
            .unwrap();
        assert_eq!(s.recorded, 2);
        assert_eq!(
            core.batch(&tenant("acme"), id).unwrap().life.status(),
            BatchStatus::Completed
        );
        core.set_free_bytes(Some(2 << 20));
        assert!(
            core.submit(T0, new_batch("acme", 1)).is_ok(),
            "accepted again once space is freed"
        );
    }

    #[test]
    fn recovery_loses_nothing_and_forgets_leases() {
        let mut core = ControlCore::new(ControlConfig::default());
        let id = core.submit(T0, new_batch("acme", 3)).unwrap().meta.id;
        core.register(T0, registration("a"));
        let g = core.lease(T0, &node("a"), &model(), 3).unwrap().unwrap();
        core.report(T0, &node("a"), vec![ok(g.unit, g.items[1].req)]).unwrap();
        // Replay the persisted operations the way a store would.
        let mut store: BTreeMap<BatchId, RecoveredBatch> = BTreeMap::new();
        replay(&mut store, &drain(&mut core));
        let mut core = ControlCore::recover(ControlConfig::default(), store.into_values().collect(), T0);
        let v = core.batch(&tenant("acme"), id).unwrap();
        assert_eq!((v.life.status(), v.counts.completed), (BatchStatus::InProgress, 1));
        core.register(T0, registration("a"));
        let g2 = core.lease(T0, &node("a"), &model(), 10).unwrap().unwrap();
        assert_eq!(g2.items.iter().map(|i| i.req.index).collect::<Vec<_>>(), [0, 2]);
        assert!(
            g2.unit != g.unit || g2.unit == WorkUnitId(1),
            "unit ids restart; results are keyed by request"
        );
        assert_eq!(
            core.submit(T0, new_batch("acme", 1)).unwrap().meta.id,
            BatchId(2),
            "ids continue"
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Lease { node: u8, max: u8 },
        ReportSome { node: u8, take: u8, retryable: bool },
        ReportStale { node: u8 },
        Heartbeat { node: u8 },
        Advance { secs: u8 },
        Reregister { node: u8 },
        Release { node: u8, take: u8 },
        Restart,
        Cancel,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..3, 1u8..20).prop_map(|(node, max)| Step::Lease { node, max }),
            (0u8..3, 1u8..20, prop::bool::weighted(0.2))
                .prop_map(|(node, take, retryable)| { Step::ReportSome { node, take, retryable } }),
            (0u8..3).prop_map(|node| Step::ReportStale { node }),
            (0u8..3).prop_map(|node| Step::Heartbeat { node }),
            (1u8..15).prop_map(|secs| Step::Advance { secs }),
            (0u8..3).prop_map(|node| Step::Reregister { node }),
            (0u8..3, 1u8..10).prop_map(|(node, take)| Step::Release { node, take }),
            Just(Step::Restart),
            Just(Step::Cancel),
        ]
    }

    #[test]
    fn the_periodic_refresh_is_a_timer_not_a_side_effect_of_reads() {
        let mut core = ControlCore::new(ControlConfig::default());
        assert_eq!(core.poll_timeout(), None, "nothing to do without nodes");
        core.register(T0, gpu_node("a"));
        core.submit(T0, long_batch(100, 600)).unwrap();
        assert_eq!(core.required_rate(&model()), 0.0, "not computed yet");
        assert!(core.poll_timeout().is_some_and(|t| t <= T0), "due at once");
        // Reads compute nothing.
        let _ = (core.tuning_doc(), core.sla_document(T0), core.replicas_view());
        assert_eq!(core.required_rate(&model()), 0.0);
        core.handle_timeout(T0);
        let rate = core.required_rate(&model());
        assert!(rate > 0.0);
        assert_eq!(timers(&core).refresh, Some(T0.saturating_add(REQUIRED_EVERY)));
        assert!(core.poll_timeout() <= timers(&core).refresh);
    }

    /// One step of the read-invariance test.
    #[derive(Debug, Clone)]
    enum Tick {
        Submit { n: u8, window_s: u16 },
        LeaseAndReport { node: u8, max: u8 },
        Heartbeat { node: u8, window: u16 },
        Advance { ms: u16 },
        Read,
    }

    fn tick() -> impl Strategy<Value = Tick> {
        prop_oneof![
            (1u8..30, 60u16..3600).prop_map(|(n, window_s)| Tick::Submit { n, window_s }),
            (0u8..2, 1u8..40).prop_map(|(node, max)| Tick::LeaseAndReport { node, max }),
            (0u8..2, 1u16..512).prop_map(|(node, window)| Tick::Heartbeat { node, window }),
            (1u16..5000).prop_map(|ms| Tick::Advance { ms }),
            Just(Tick::Read),
        ]
    }

    /// Runs `ticks` on a fresh core (placement advisory, so the periodic refresh decides
    /// things), doing every `Read` only if `reads`; everything it decided, in order.
    fn decisions(ticks: &[Tick], reads: bool) -> Vec<String> {
        let mut core = ControlCore::new(ControlConfig {
            placement: PlacementMode::Advisory,
            ..ControlConfig::default()
        });
        let nodes = [node("a"), node("b")];
        for n in &nodes {
            core.register(T0, gpu_node(n.as_str()));
        }
        let mut now = T0;
        let mut out = Vec::new();
        for t in ticks {
            match t {
                Tick::Submit { n, window_s } => {
                    let r = core.submit(now, long_batch(u32::from(*n), u64::from(*window_s)));
                    out.push(format!("{:?}", r.map(|v| v.meta.id)));
                }
                Tick::LeaseAndReport { node, max } => {
                    if let Some(g) = core
                        .lease(now, &nodes[*node as usize], &model(), u32::from(*max))
                        .unwrap()
                    {
                        let results = g.items.iter().map(|i| ok(g.unit, i.req)).collect();
                        out.push(format!("{:?}", core.report(now, &nodes[*node as usize], results)));
                    }
                }
                Tick::Heartbeat { node, window } => {
                    let report = ReplicaReport {
                        replica: crate::ids::ReplicaId::from("r0"),
                        window: u32::from(*window),
                        ..ReplicaReport::default()
                    };
                    out.push(format!(
                        "{:?}",
                        core.heartbeat(now, &nodes[*node as usize], &[], &[report])
                    ));
                }
                Tick::Advance { ms } => {
                    now = now.saturating_add(Duration::from_millis(u64::from(*ms)));
                    core.handle_timeout(now);
                }
                Tick::Read if reads => {
                    let _ = core.sla_document(now);
                    let _ = core.tuning_doc();
                    let _ = core.tenant_usage(&tenant("acme"), Timestamp::ZERO);
                    let _ = core.list(&tenant("acme"), None, 10);
                }
                Tick::Read => {}
            }
            out.extend(drain(&mut core).iter().map(|a| format!("{a:?}")));
            out.push(format!("timeout {:?}", core.poll_timeout()));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Reads (the SLA document, the tuning view a metrics scrape or `GET /v1/tuning`
        /// asks for, usage, listings) at any moment change no decision: the same inputs
        /// give the same actions, replies and timers with and without them.
        #[test]
        fn reads_at_any_moment_change_no_decision(ticks in proptest::collection::vec(tick(), 1..80)) {
            prop_assert_eq!(decisions(&ticks, false), decisions(&ticks, true));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Whatever agents do (lease, report, re-report stale results, die, come back) and
        /// whenever a tenant cancels: every request ends with exactly one recorded result,
        /// and the batch's counts agree with what was persisted.
        #[test]
        fn every_request_gets_exactly_one_result(steps in proptest::collection::vec(step(), 1..120), n in 1u32..60) {
            let mut core = ControlCore::new(ControlConfig::default());
            let id = core.submit(T0, new_batch("acme", n)).unwrap().meta.id;
            let nodes = ["a", "b", "c"].map(node);
            for nd in &nodes { core.register(T0, registration(nd.as_str())); }
            let mut now = T0;
            let mut held: Vec<Vec<LeaseGrant>> = vec![vec![]; 3];
            let mut old: Vec<(WorkUnitId, RequestRef)> = vec![];
            let mut persisted: Vec<RequestRef> = vec![];
            let mut store: BTreeMap<BatchId, RecoveredBatch> = BTreeMap::new();
            let mut cancelled = false;
            let run = |core: &mut ControlCore, persisted: &mut Vec<RequestRef>, store: &mut BTreeMap<BatchId, RecoveredBatch>| {
                let actions = drain(core);
                replay(store, &actions);
                persisted.extend(recorded(&actions));
            };
            run(&mut core, &mut persisted, &mut store);
            for s in steps.into_iter().chain((0..40).map(|_| Step::Advance { secs: 15 })) {
                match s {
                    Step::Lease { node, max } => {
                        if let Some(g) = core.lease(now, &nodes[node as usize], &model(), u32::from(max)).unwrap() {
                            held[node as usize].push(g);
                        }
                    }
                    Step::ReportSome { node, take, retryable } => {
                        let mut results = vec![];
                        for g in held[node as usize].iter_mut() {
                            while let Some(item) = g.items.pop() {
                                old.push((g.unit, item.req));
                                results.push(if retryable {
                                    ReportedResult { outcome: ReportedOutcome::Retryable { code: "x".into(), message: "y".into() }, ..ok(g.unit, item.req) }
                                } else { ok(g.unit, item.req) });
                                if results.len() >= take as usize { break; }
                            }
                        }
                        core.report(now, &nodes[node as usize], results).unwrap();
                    }
                    Step::ReportStale { node } => {
                        let results = old.iter().rev().take(5).map(|&(u, r)| ok(u, r)).collect();
                        core.report(now, &nodes[node as usize], results).unwrap();
                    }
                    Step::Heartbeat { node } => {
                        let units: Vec<_> = held[node as usize].iter().map(|g| g.unit).collect();
                        core.heartbeat(now, &nodes[node as usize], &units, &[]).unwrap();
                    }
                    Step::Advance { secs } => {
                        now = now.saturating_add(Duration::from_secs(u64::from(secs)));
                        // Agents that still hold work heartbeat only sometimes; at the end
                        // everyone reports what it holds so the batch can finish.
                        for (i, nd) in nodes.iter().enumerate() {
                            let results: Vec<_> = held[i].iter_mut().flat_map(|g| { let u = g.unit; g.items.drain(..).map(move |it| ok(u, it.req)) }).collect();
                            if secs == 15 && !results.is_empty() { core.report(now, nd, results).unwrap(); }
                        }
                        core.handle_timeout(now);
                        if secs == 15 {
                            for nd in &nodes {
                                if let Some(g) = core.lease(now, nd, &model(), 100).unwrap() {
                                    let results = g.items.iter().map(|it| ok(g.unit, it.req)).collect();
                                    core.report(now, nd, results).unwrap();
                                }
                            }
                        }
                    }
                    Step::Reregister { node } => {
                        held[node as usize].clear();
                        core.register(now, registration(nodes[node as usize].as_str()));
                    }
                    Step::Cancel => {
                        if !cancelled { cancelled = core.cancel(now, &tenant("acme"), id).is_ok(); }
                    }
                    Step::Release { node, take } => {
                        // The agent gives back queued items of its oldest unit.
                        if let Some(g) = held[node as usize].first_mut() {
                            let n = (take as usize).min(g.items.len());
                            let items: Vec<RequestRef> = g.items.drain(..n).map(|i| i.req).collect();
                            core.release(now, &nodes[node as usize], g.unit, &items).unwrap();
                        }
                    }
                    Step::Restart => {
                        // The control plane dies and comes back from what it persisted;
                        // agents keep what they held and register again.
                        core = ControlCore::recover(ControlConfig::default(), store.values().cloned().collect(), now);
                        for nd in &nodes { core.register(now, registration(nd.as_str())); }
                    }
                }
                run(&mut core, &mut persisted, &mut store);
            }
            let v = core.batch(&tenant("acme"), id).unwrap();
            prop_assert!(v.life.status().is_terminal(), "{:?}", v.life.status());
            let mut sorted = persisted.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), persisted.len(), "a request was recorded twice");
            prop_assert_eq!(persisted.len() as u32, n, "every request has a result");
            prop_assert_eq!(v.counts.completed + v.counts.failed, n);
        }
    }
}
