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

mod files;
mod fleet;
mod index;
mod leases;
mod metering;
mod queue;
mod views;

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
    pub placement_objective: crate::objective::Objective,
    /// Models batches may run on.
    pub models: BTreeSet<ModelId>,
    pub usd_per_kwh: f64,
    pub pue: f64,
    /// Refuse batches of committed classes whose deadline the cluster cannot meet (see
    /// [`crate::admission`]).
    pub admission: bool,
    /// Share of the estimated capacity admission counts on (0 < x <= 1).
    pub admission_headroom: f64,
    /// Measured engine profiles: the curve admission and the owed rates believe for the
    /// replicas they describe (the performance model for the others).
    #[serde(default)]
    pub profiles: crate::profile::Profiles,
    /// How far a replica's belief may be off before it reported a measurement (see
    /// [`crate::recal::RecalConfig::prior_error`]).
    #[serde(default)]
    pub belief_prior_error: f64,
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
            placement_objective: crate::objective::Objective::TokensPerJoule,
            models: Catalog::builtin().model_ids().into_iter().collect(),
            usd_per_kwh: DEFAULT_USD_PER_KWH,
            pue: DEFAULT_PUE,
            profiles: crate::profile::Profiles::default(),
            belief_prior_error: crate::recal::RecalConfig::default().prior_error,
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

/// Whether a cluster serving `served` takes batches for `model`: the first check of a
/// submission (shells run it before staging an upload, so a wrong model costs no upload).
pub fn check_model(served: &BTreeSet<ModelId>, model: &ModelId) -> Result<(), SubmitError> {
    if served.contains(model) {
        Ok(())
    } else {
        Err(SubmitError::UnknownModel {
            model: model.clone(),
            served: join(served.iter()),
        })
    }
}

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
    /// Whether the replica's belief about itself is a profile (`profile (measured)`,
    /// `profile (model)`) or the performance model (`model`); empty when it has none.
    #[serde(default)]
    pub belief: String,
    /// How the replica's belief is corrected by what it measured, as the control plane
    /// counts on it (the prior until the agent reports).
    #[serde(default)]
    pub calibration: Option<crate::recal::Correction>,
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
    /// (512 prompt, 256 output tokens), to share work between replicas; corrected by the
    /// replica's recalibration.
    cap: Option<f64>,
    /// The replica's recalibration as last reported (the prior until then).
    calibration: crate::recal::Correction,
    /// The step-time factor admission divides the replica's believed capacity by: the
    /// recalibration's conservative time, moved only when that changes by more than 1%
    /// (each move recomputes admission's estimates).
    cap_time: f64,
    active: bool,
    /// Placement's decision (in advisory mode `active` stays true).
    advised_active: bool,
    /// What the agent last reported of it.
    report: Option<ReplicaReport>,
}

impl Serving {
    /// Its agent reported that its engine does not answer.
    fn unreachable(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.unreachable)
    }
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
    /// Nodes forgotten after their agent fell silent (see [`NODE_SILENCE_LEASES`]).
    pub nodes_forgotten: u64,
}

/// A node whose agent has not heartbeated for this many lease lifetimes (30 s with the
/// default 10 s lease) is forgotten: its replicas no longer count as capacity.
pub const NODE_SILENCE_LEASES: u32 = 3;

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
    /// Admission's view of it while it is unfinished and committed (`None` otherwise).
    booked: Option<Booked>,
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

/// Replicas of one model with the same curve and window: a capacity is then one curve
/// evaluation per group instead of one per replica (each replica's term is the curve's
/// capacity divided by its own step-time factor, so the group's is the curve's capacity
/// times the sum of their reciprocals).
#[derive(Debug, Clone)]
struct CapacityGroup {
    perf: crate::perf::ReplicaPerf,
    window: u32,
    /// Σ 1 / `cap_time` over the group's replicas.
    weight: f64,
}

/// (model, shape, capacity version, capacity).
type CapacityAnswer = (ModelId, (u32, u32), u64, Option<f64>);

#[derive(Debug, Clone, Default)]
struct CapacityMemoState {
    /// (model, capacity version) the groups were formed at, and the groups.
    groups: Option<(ModelId, u64, Vec<CapacityGroup>)>,
    /// The last capacity computed.
    last: Option<CapacityAnswer>,
}

/// What [`ControlCore::capacity`] computed last, and the replica groups it sums over;
/// both valid for one capacity version.
#[derive(Debug, Default)]
struct CapacityMemo(std::sync::Mutex<CapacityMemoState>);

impl CapacityMemo {
    fn lock(&self) -> std::sync::MutexGuard<'_, CapacityMemoState> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Clone for CapacityMemo {
    fn clone(&self) -> Self {
        CapacityMemo(std::sync::Mutex::new(self.lock().clone()))
    }
}

/// A batch in its model's [`AdmissionBook`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Booked {
    /// Seconds of the model's capacity all its requests need, at the book's capacity
    /// version (`None` while no capacity is known).
    full_s: Option<f64>,
    /// What it adds to [`AdmissionBook::upper_s`].
    counted_s: f64,
}

/// The committed unfinished batches of one model, as admission control sees them.
#[derive(Debug, Clone, Default)]
struct AdmissionBook {
    /// By deadline.
    batches: BTreeSet<(Timestamp, BatchId)>,
    /// At least the seconds of the model's capacity their remaining requests need: each
    /// batch is counted with its remaining work when booked (or at the last
    /// [`ControlCore::refresh`]) and taken out when it ends. When all of it, and a new
    /// batch, fit before the earliest deadline, admission needs no closer look.
    upper_s: f64,
    /// The [`ControlCore::capacity_version`] the batches' service times were computed at.
    version: u64,
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
    /// The idle energy each replica had reported, to turn the cumulative counter into
    /// increments.
    idle_seen: BTreeMap<crate::ids::ReplicaId, f64>,
}

/// The control plane's state machine. See the module docs for the shell's contract.
#[derive(Debug, Clone)]
pub struct ControlCore {
    config: ControlConfig,
    /// The last input [`ControlCore::handle`] applied, and the last whose writes the
    /// shell said are committed (see [`crate::protocol::Durable`]).
    pub(crate) handled: crate::protocol::InputSeq,
    pub(crate) persisted: crate::protocol::InputSeq,
    batches: BTreeMap<BatchId, Batch>,
    by_tenant: BTreeSet<(TenantId, BatchId)>,
    /// Batches with pending requests, per model, in the order work is handed out (see
    /// [`queue_key`]).
    queues: BTreeMap<ModelId, BTreeSet<QueueKey>>,
    /// Non-final batches by deadline.
    deadlines: BTreeSet<(Timestamp, BatchId)>,
    /// Per model, the committed unfinished batches admission checks new ones against.
    books: BTreeMap<ModelId, AdmissionBook>,
    /// Bumped whenever an input of [`ControlCore::capacity`] changes (a replica registers,
    /// its window moves, its recalibration moves by more than 1%): admission's estimates
    /// of batches' service times are then recomputed.
    capacity_version: u64,
    /// The last [`ControlCore::capacity`] answer (model, shape, capacity version): a new
    /// batch asks for it up to three times.
    capacity_memo: CapacityMemo,
    /// Work units out on lease (by id, expiry and node).
    units: index::Units,
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
    /// Lease calls waiting for work (by model, end and ticket).
    waits: index::Waits,
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
    /// Output tokens accepted per model and second over the last [`ARRIVAL_WINDOW`], for
    /// placement: deadlines alone leave work to the last moment while more keeps arriving.
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
    /// How the replica's belief about itself is corrected by what it measured (absent
    /// when it has no belief).
    #[serde(default)]
    pub calibration: Option<crate::recal::Correction>,
    /// Its engine does not answer (see [`crate::protocol::AgentInput::EngineProbe`]): it
    /// takes no work and does not count as capacity.
    #[serde(default)]
    pub unreachable: bool,
}

/// What a replica's tuner reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TuningReport {
    pub mode: crate::tuner::TunerMode,
    /// What it maximizes, e.g. "output tokens/J". (Mostly fixed text: sent with every
    /// heartbeat, so not copied when it need not be.)
    pub objective: std::borrow::Cow<'static, str>,
    /// The objective and the output tokens/s measured at the current point.
    pub objective_value: f64,
    pub measured_tokens_per_s: f64,
    pub owed_tokens_per_s: f64,
    /// Converged and holding its point.
    pub holding: bool,
    pub moves: u64,
    /// Why it made its last change.
    pub reason: std::borrow::Cow<'static, str>,
    /// Advisory mode: what the performance model recommends.
    pub advice: Option<crate::tuner::Advice>,
}

impl Default for TuningReport {
    /// The report of a replica whose tuner is off.
    fn default() -> Self {
        TuningReport {
            mode: crate::tuner::TunerMode::Off,
            objective: "".into(),
            objective_value: 0.0,
            measured_tokens_per_s: 0.0,
            owed_tokens_per_s: 0.0,
            holding: false,
            moves: 0,
            reason: "".into(),
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
            handled: Default::default(),
            persisted: Default::default(),
            batches: BTreeMap::new(),
            by_tenant: BTreeSet::new(),
            queues: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            books: BTreeMap::new(),
            capacity_version: 0,
            capacity_memo: Default::default(),
            units: index::Units::default(),
            nodes: BTreeMap::new(),
            next_batch: 1,
            next_unit: 1,
            tenant_vt: BTreeMap::new(),
            sla,
            tenant_totals: BTreeMap::new(),
            submitted: BTreeMap::new(),
            waits: index::Waits::default(),
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
                booked: None,
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
                core.persist_results(results);
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
    pub(crate) fn submit(&mut self, now: Timestamp, new: NewBatch) -> Result<BatchView, SubmitError> {
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
    pub(crate) fn report(
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
        while let Some((p, model)) = self.waits.take_ended(now) {
            self.actions.push_back(Action::LeaseReady {
                ticket: p.ticket,
                node: p.node,
                model,
                grant: None,
            });
        }
        self.serve_parked(now);
    }

    // ---- tenant commands -------------------------------------------------------------

    /// [`ControlCore::submit`] before waiting leases are served.
    fn submit_inner(&mut self, now: Timestamp, new: NewBatch) -> Result<BatchView, SubmitError> {
        check_model(&self.config.models, &new.model)?;
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
            // Summed per model and second: bounded by the window, not by the batches.
            let second = Timestamp::from_millis(now.as_millis() / 1000 * 1000);
            let same = self
                .arrivals
                .iter_mut()
                .rev()
                .take_while(|(t, _, _)| *t == second)
                .find(|(_, m, _)| *m == meta.model);
            match same {
                Some((_, _, tokens)) => *tokens += output_tokens as f64,
                None => self
                    .arrivals
                    .push_back((second, meta.model.clone(), output_tokens as f64)),
            }
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
                booked: None,
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

    /// Cancels a batch: pending requests end as `batch_cancelled`, leased ones finish.
    pub(crate) fn cancel(&mut self, now: Timestamp, tenant: &TenantId, id: BatchId) -> Result<BatchView, BatchError> {
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
        self.persist_results(results);
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

    // ---- time ------------------------------------------------------------------------

    /// When [`ControlCore::handle_timeout`] should next be called. The timers, all of
    /// them here: lease expiry, batch deadlines, long-poll lease waits, retention of
    /// batches and files, the periodic refresh of rates owed and placement (every
    /// second once a node is known), and the writing of idle-energy charges.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let lease = self.units.first_expiring().map(|(t, _)| t);
        let deadline = self.deadlines.first().map(|&(t, _)| t);
        let wait = self.waits.next_end();
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
        while let Some((t, unit)) = self.units.first_expiring() {
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
            self.unbook(id);
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

    /// Puts a batch on its model's queue and the deadline list, as its state requires.
    fn track(&mut self, id: BatchId) {
        let b = &self.batches[&id];
        let status = b.life.status();
        if status.is_terminal() {
            return;
        }
        self.deadlines.insert((b.meta.deadline, id));
        self.book(id);
        let b = &self.batches[&id];
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
        self.persist_results(results);
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
        self.unbook(id);
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
        let key = (b.meta.tenant, id);
        self.by_tenant.remove(&key);
        let tenant = key.0;
        let day = day_of(b.life.created_at);
        if !self.history.contains_key(&tenant) {
            self.history.insert(tenant.clone(), BTreeMap::new());
        }
        let h = self
            .history
            .get_mut(&tenant)
            .expect("inserted above")
            .entry(day)
            .or_default();
        h.batches += 1;
        h.requests_completed += u64::from(b.completed);
        h.requests_failed += u64::from(b.failed);
        h.usage += b.usage;
        let history = *h;
        self.actions
            .push_back(Action::Persist(DurableOp::TenantHistory { tenant, day, history }));
        self.actions.push_back(Action::Persist(DurableOp::DeleteBatch { id }));
        self.stats.batches_deleted += 1;
    }

    /// Batch ids are never handed out again, even after their batches were deleted: `next`
    /// is the first id the store has not seen (its high-water mark).
    pub fn set_next_batch(&mut self, next: u64) {
        self.next_batch = self.next_batch.max(next);
    }

    /// A tenant deletes one of its finished batches.
    pub(crate) fn delete_batch(&mut self, tenant: &TenantId, id: BatchId) -> Result<(), BatchError> {
        let status = self.owned(tenant, id)?.life.status();
        if !status.is_terminal() {
            return Err(BatchError::NotFinished(id, status));
        }
        self.delete(id);
        Ok(())
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

    /// Persists newly recorded results (nothing when there are none).
    fn persist_results(&mut self, results: Vec<RecordedResult>) {
        if !results.is_empty() {
            self.actions
                .push_back(Action::Persist(DurableOp::RecordResults(results)));
        }
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
mod tests;
