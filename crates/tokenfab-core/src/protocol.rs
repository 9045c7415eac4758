//! The control core's typed input surface.
//!
//! Every call that can change what [`ControlCore`] decides is one [`ControlInput`], handed
//! to [`ControlCore::handle`] with the time it happens; its answer is one [`ControlReply`].
//! What the shell must do besides answering comes out of [`ControlCore::poll_action`], as
//! before. A core is started from what the store holds with [`ControlCore::start`] and a
//! [`ControlStart`]. Because both are plain data (serde), a shell can record what its core
//! received and `tokenfab sim replay` can feed a recording through a fresh core and check
//! that it decides the same (see the `tokenfab-record` crate).
//!
//! Reads (`batch`, `list`, `sla_document`, ...) take `&self` and are not inputs: they
//! change nothing.
//!
//! The agent core has the same shape: [`AgentInput`] through [`AgentCore::handle`], with
//! named types ([`CallFailure`], [`ReplicaIndex`]) where its methods take flags and bare
//! indexes.

use crate::agent::{AgentCore, EnergyReading, EngineReply};
use crate::control::{
    BatchError, BatchView, ControlConfig, ControlCore, FileError, HeartbeatReply, LeaseAnswer, LeaseGrant, NewBatch,
    NodeRegistration, ReplicaReport, ReportSummary, ReportedResult, SubmitError, UnknownNode,
};
use crate::durable::{FileMeta, RecoveredBatch, UsageHistory};
use crate::ids::{BatchId, FileId, ModelId, NodeId, RequestRef, TenantId, WorkUnitId};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// One thing that happens to the control core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlInput {
    /// The time [`ControlCore::poll_timeout`] asked for (or later) has come.
    Timeout,
    /// A tenant submits a batch whose input is staged.
    Submit(NewBatch),
    Cancel {
        tenant: TenantId,
        batch: BatchId,
    },
    DeleteBatch {
        tenant: TenantId,
        batch: BatchId,
    },
    /// A tenant uploaded a file of `bytes` bytes (staged by the shell).
    AddFile {
        tenant: TenantId,
        filename: String,
        bytes: u64,
        purpose: String,
    },
    DeleteFile {
        tenant: TenantId,
        file: FileId,
    },
    Register(NodeRegistration),
    Heartbeat {
        node: NodeId,
        held: Vec<WorkUnitId>,
        replicas: Vec<ReplicaReport>,
    },
    /// A lease call that does not wait.
    Lease {
        node: NodeId,
        model: ModelId,
        max: u32,
    },
    /// A lease call that may wait for work until `until` (answered later by
    /// [`crate::control::Action::LeaseReady`] with `ticket`).
    LeaseOrWait {
        node: NodeId,
        model: ModelId,
        max: u32,
        until: Timestamp,
        ticket: u64,
    },
    Report {
        node: NodeId,
        results: Vec<ReportedResult>,
    },
    /// An agent gives back leased requests it will not run.
    Release {
        node: NodeId,
        unit: WorkUnitId,
        items: Vec<RequestRef>,
    },
    /// Leased requests whose bodies the shell could not read.
    InputsLost {
        unit: WorkUnitId,
        items: Vec<RequestRef>,
    },
    /// Free space on the store's disk, as the shell measured it (`None`: unknown).
    FreeBytes(Option<u64>),
}

impl ControlInput {
    /// The input's name, for logs and divergence reports.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlInput::Timeout => "timeout",
            ControlInput::Submit(_) => "submit",
            ControlInput::Cancel { .. } => "cancel",
            ControlInput::DeleteBatch { .. } => "delete_batch",
            ControlInput::AddFile { .. } => "add_file",
            ControlInput::DeleteFile { .. } => "delete_file",
            ControlInput::Register(_) => "register",
            ControlInput::Heartbeat { .. } => "heartbeat",
            ControlInput::Lease { .. } => "lease",
            ControlInput::LeaseOrWait { .. } => "lease_or_wait",
            ControlInput::Report { .. } => "report",
            ControlInput::Release { .. } => "release",
            ControlInput::InputsLost { .. } => "inputs_lost",
            ControlInput::FreeBytes(_) => "free_bytes",
        }
    }
}

/// The core's answer to one [`ControlInput`].
///
/// An answer that tells a tenant or an agent that something is kept (a batch accepted,
/// a cancellation, a deletion, a file, recorded results) is [`Durable`]: the shell can
/// open it only with the [`Persisted`] mark that [`ControlCore::advance`] gives once the
/// store has committed the writes it depends on.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlReply {
    /// Inputs with nothing to answer (timeouts, registrations, lost inputs, free space).
    Done,
    Submitted(Durable<Result<BatchView, SubmitError>>),
    Cancelled(Durable<Result<BatchView, BatchError>>),
    BatchDeleted(Durable<Result<(), BatchError>>),
    FileAdded(Durable<Result<FileMeta, SubmitError>>),
    FileDeleted(Durable<Result<(), FileError>>),
    Heartbeat(Result<HeartbeatReply, UnknownNode>),
    Lease(Result<Option<LeaseGrant>, UnknownNode>),
    LeaseOrWait(Result<LeaseAnswer, UnknownNode>),
    Reported(Durable<Result<ReportSummary, UnknownNode>>),
    Released(Result<u32, UnknownNode>),
}

/// The number of an input [`ControlCore::handle`] applied, counted from 1 by each core.
/// The writes an input causes leave the core through [`ControlCore::poll_action`] before
/// any later input is applied, so "every write up to input N is committed" is one number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct InputSeq(pub u64);

/// An answer that must not reach its caller before the writes of its input are durable
/// (persist before reply). It opens only with a [`Persisted`] mark that covers its input:
/// the same step as raft-rs's `Ready` / `advance`, where messages that depend on the log
/// go out only after the log is persisted. A reply the shell drops (a failed commit) is
/// never answered, which is what the caller must see.
#[derive(Clone, PartialEq)]
#[must_use = "a durable reply is answered with release() once its writes are committed"]
pub struct Durable<T> {
    value: T,
    needs: InputSeq,
}

/// Proof from the core that the shell committed every write up to an input
/// ([`ControlCore::advance`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persisted(InputSeq);

impl<T> Durable<T> {
    fn of(needs: InputSeq, value: T) -> Self {
        Durable { value, needs }
    }

    /// The input whose writes must be committed first.
    pub fn needs(&self) -> InputSeq {
        self.needs
    }

    /// The answer, when `persisted` covers its input; otherwise the reply back, unopened.
    pub fn release(self, persisted: Persisted) -> Result<T, Durable<T>> {
        if persisted.0 >= self.needs {
            Ok(self.value)
        } else {
            Err(self)
        }
    }

    /// Looks at the answer without releasing it: for the flight recorder and for logs,
    /// never to tell the caller.
    pub fn peek(&self) -> &T {
        &self.value
    }
}

/// Shows the answer only, so that a recording's digest of a reply does not depend on the
/// input's number.
impl<T: std::fmt::Debug> std::fmt::Debug for Durable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

impl Persisted {
    /// Up to which input the writes are committed.
    pub fn through(&self) -> InputSeq {
        self.0
    }
}

/// Everything a core starts from: what the store holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlStart {
    pub batches: Vec<RecoveredBatch>,
    /// Idle-energy charges already written: (tenant, hour, joules, cost).
    pub idle: Vec<(TenantId, Timestamp, f64, f64)>,
    /// Usage history of deleted batches: (tenant, day, usage).
    pub history: Vec<(TenantId, Timestamp, UsageHistory)>,
    /// The lowest batch number never handed out.
    pub next_batch: u64,
    pub files: Vec<FileMeta>,
    /// The lowest file number never handed out.
    pub next_file: u64,
    pub free_bytes: Option<u64>,
}

impl ControlCore {
    /// A core rebuilt from durable state at `now`. Batches found complete are finished, so
    /// [`ControlCore::poll_action`] may have writes for the shell at once.
    pub fn start(config: ControlConfig, start: ControlStart, now: Timestamp) -> ControlCore {
        let mut core = ControlCore::recover(config, start.batches, now);
        core.restore_idle(start.idle);
        core.restore_history(start.history);
        core.set_next_batch(start.next_batch);
        core.restore_files(start.files, start.next_file);
        core.set_free_bytes(start.free_bytes);
        core
    }

    /// Applies one input at `now` and answers it. The input's writes are in
    /// [`ControlCore::poll_action`]'s queue when this returns; a [`Durable`] answer opens
    /// once the shell has committed them and called [`ControlCore::advance`].
    pub fn handle(&mut self, now: Timestamp, input: ControlInput) -> ControlReply {
        self.handled.0 += 1;
        let needs = self.handled;
        match input {
            ControlInput::Timeout => {
                self.handle_timeout(now);
                ControlReply::Done
            }
            ControlInput::Submit(new) => ControlReply::Submitted(Durable::of(needs, self.submit(now, new))),
            ControlInput::Cancel { tenant, batch } => {
                ControlReply::Cancelled(Durable::of(needs, self.cancel(now, &tenant, batch)))
            }
            ControlInput::DeleteBatch { tenant, batch } => {
                ControlReply::BatchDeleted(Durable::of(needs, self.delete_batch(&tenant, batch)))
            }
            ControlInput::AddFile {
                tenant,
                filename,
                bytes,
                purpose,
            } => ControlReply::FileAdded(Durable::of(
                needs,
                self.add_file(now, &tenant, filename, bytes, purpose),
            )),
            ControlInput::DeleteFile { tenant, file } => {
                ControlReply::FileDeleted(Durable::of(needs, self.delete_file(&tenant, file)))
            }
            ControlInput::Register(reg) => {
                self.register(now, reg);
                ControlReply::Done
            }
            ControlInput::Heartbeat { node, held, replicas } => {
                ControlReply::Heartbeat(self.heartbeat(now, &node, &held, replicas))
            }
            ControlInput::Lease { node, model, max } => ControlReply::Lease(self.lease(now, &node, &model, max)),
            ControlInput::LeaseOrWait {
                node,
                model,
                max,
                until,
                ticket,
            } => ControlReply::LeaseOrWait(self.lease_or_wait(now, &node, &model, max, until, ticket)),
            ControlInput::Report { node, results } => {
                ControlReply::Reported(Durable::of(needs, self.report(now, &node, results)))
            }
            ControlInput::Release { node, unit, items } => {
                ControlReply::Released(self.release(now, &node, unit, &items))
            }
            ControlInput::InputsLost { unit, items } => {
                self.inputs_lost(now, unit, &items);
                ControlReply::Done
            }
            ControlInput::FreeBytes(free) => {
                self.set_free_bytes(free);
                ControlReply::Done
            }
        }
    }

    /// The number of the last input applied: a shell that has taken every action so far
    /// and committed its writes may [`ControlCore::advance`] to it.
    pub fn handled(&self) -> InputSeq {
        self.handled
    }

    /// The shell has committed every write the core asked for up to input `through`
    /// (taken from [`ControlCore::handled`] after draining the actions): the mark that
    /// releases the [`Durable`] answers of those inputs. A simulator, whose store never
    /// fails, advances right after each input.
    pub fn advance(&mut self, through: InputSeq) -> Persisted {
        debug_assert!(through <= self.handled, "advance past the last input applied");
        self.persisted = self.persisted.max(through.min(self.handled));
        Persisted(self.persisted)
    }
}

/// Why a call to the control plane failed, as the agent core needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallFailure {
    /// The control plane does not know this node (it restarted, or the node's lease on
    /// its registration ended): register again.
    UnknownNode,
    /// Anything else (unreachable, overloaded, timed out): try again later.
    Unavailable,
}

/// A replica of an agent, by its position in the agent's replica list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaIndex(pub usize);

/// One thing that happens to an agent core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentInput {
    /// The time [`AgentCore::poll_timeout`] asked for (or later) has come.
    Timeout,
    /// Stop taking work and close the books ([`AgentCore::shutdown`]).
    Shutdown,
    /// Read the devices now.
    SampleNow,
    SetWindow {
        replica: ReplicaIndex,
        window: u32,
    },
    Registered {
        heartbeat_interval: std::time::Duration,
    },
    RegisterFailed,
    Leased {
        model: ModelId,
        result: Result<Option<LeaseGrant>, CallFailure>,
    },
    EngineDone {
        replica: ReplicaIndex,
        unit: WorkUnitId,
        req: RequestRef,
        reply: EngineReply,
    },
    ReportAcked,
    /// A report failed: the core sends its results again (it kept them).
    ReportFailed(CallFailure),
    PowerLimitSet {
        replica: ReplicaIndex,
        result: Result<f64, String>,
    },
    HeartbeatDone(Result<HeartbeatReply, CallFailure>),
    /// Each replica's devices read together (`None`: not every device of it answered).
    DeviceSample(Vec<Option<EnergyReading>>),
    /// Whether a replica's engine answers at all (the shell probes each engine now and
    /// then; it sends this when the answer changes). An engine that does not (e.g. no
    /// engine pod on this node behind a node-local Service) takes no work and does not
    /// count as capacity until it answers again.
    EngineProbe {
        replica: ReplicaIndex,
        reachable: bool,
    },
}

impl AgentInput {
    /// The input's name, for divergence reports.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentInput::Timeout => "timeout",
            AgentInput::Shutdown => "shutdown",
            AgentInput::SampleNow => "sample_now",
            AgentInput::SetWindow { .. } => "set_window",
            AgentInput::Registered { .. } => "registered",
            AgentInput::RegisterFailed => "register_failed",
            AgentInput::Leased { .. } => "leased",
            AgentInput::EngineDone { .. } => "engine_done",
            AgentInput::ReportAcked => "report_acked",
            AgentInput::ReportFailed(_) => "report_failed",
            AgentInput::PowerLimitSet { .. } => "power_limit_set",
            AgentInput::HeartbeatDone(_) => "heartbeat_done",
            AgentInput::DeviceSample(_) => "device_sample",
            AgentInput::EngineProbe { .. } => "engine_probe",
        }
    }
}

impl AgentCore {
    /// Applies one input at `now`; what to do next comes out of
    /// [`AgentCore::poll_action`].
    pub fn handle(&mut self, now: Timestamp, input: AgentInput) {
        match input {
            AgentInput::Timeout => self.handle_timeout(now),
            AgentInput::Shutdown => self.shutdown(now),
            AgentInput::SampleNow => self.sample_now(now),
            AgentInput::SetWindow { replica, window } => self.set_window(now, replica.0, window),
            AgentInput::Registered { heartbeat_interval } => self.registered(now, heartbeat_interval),
            AgentInput::RegisterFailed => self.register_failed(now),
            AgentInput::Leased { model, result } => self.lease_done(now, &model, result),
            AgentInput::EngineDone {
                replica,
                unit,
                req,
                reply,
            } => self.engine_done(now, replica.0, unit, req, reply),
            AgentInput::ReportAcked => self.report_acked(now),
            AgentInput::ReportFailed(failure) => self.report_failed(now, failure),
            AgentInput::PowerLimitSet { replica, result } => self.power_limit_done(now, replica.0, result),
            AgentInput::HeartbeatDone(reply) => self.heartbeat_done(now, reply),
            AgentInput::DeviceSample(readings) => self.device_sample(now, readings),
            AgentInput::EngineProbe { replica, reachable } => self.engine_probe(now, replica.0, reachable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentAction, AgentConfig, ReplicaSpec};
    use crate::ids::ReplicaId;
    use std::time::Duration;

    fn registered_agent(now: Timestamp) -> AgentCore {
        let spec = ReplicaSpec {
            id: ReplicaId::from("r0"),
            model: ModelId::from("m"),
            devices: 1,
            window: 4,
            max_concurrency: 8,
            power: None,
            accelerator: None,
        };
        let mut core = AgentCore::new(AgentConfig::default(), vec![spec], now);
        core.handle(now, AgentInput::Timeout);
        while core.poll_action().is_some() {}
        core.handle(
            now,
            AgentInput::Registered {
                heartbeat_interval: Duration::from_secs(1),
            },
        );
        while core.poll_action().is_some() {}
        core
    }

    fn registers_again(core: &mut AgentCore, now: Timestamp) -> bool {
        let later = now.saturating_add(Duration::from_secs(60));
        core.handle(later, AgentInput::Timeout);
        std::iter::from_fn(|| core.poll_action()).any(|a| matches!(a, AgentAction::Register))
    }

    #[test]
    fn a_failed_call_says_whether_the_node_must_register_again() {
        let t = Timestamp::from_micros(1_000_000);
        let mut core = registered_agent(t);
        core.handle(t, AgentInput::HeartbeatDone(Err(CallFailure::Unavailable)));
        assert!(
            !registers_again(&mut core, t),
            "an unreachable control plane is retried, not re-registered with"
        );
        let mut core = registered_agent(t);
        core.handle(t, AgentInput::HeartbeatDone(Err(CallFailure::UnknownNode)));
        assert!(
            registers_again(&mut core, t),
            "a control plane that forgot the node gets a new registration"
        );
    }
}
