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
#[derive(Debug, Clone, PartialEq)]
pub enum ControlReply {
    /// Inputs with nothing to answer (timeouts, registrations, lost inputs, free space).
    Done,
    Submitted(Result<BatchView, SubmitError>),
    Cancelled(Result<BatchView, BatchError>),
    BatchDeleted(Result<(), BatchError>),
    FileAdded(Result<FileMeta, SubmitError>),
    FileDeleted(Result<(), FileError>),
    Heartbeat(Result<HeartbeatReply, UnknownNode>),
    Lease(Result<Option<LeaseGrant>, UnknownNode>),
    LeaseOrWait(Result<LeaseAnswer, UnknownNode>),
    Reported(Result<ReportSummary, UnknownNode>),
    Released(Result<u32, UnknownNode>),
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

    /// Applies one input at `now` and answers it.
    pub fn handle(&mut self, now: Timestamp, input: ControlInput) -> ControlReply {
        match input {
            ControlInput::Timeout => {
                self.handle_timeout(now);
                ControlReply::Done
            }
            ControlInput::Submit(new) => ControlReply::Submitted(self.submit(now, new)),
            ControlInput::Cancel { tenant, batch } => ControlReply::Cancelled(self.cancel(now, &tenant, batch)),
            ControlInput::DeleteBatch { tenant, batch } => {
                ControlReply::BatchDeleted(self.delete_batch(&tenant, batch))
            }
            ControlInput::AddFile {
                tenant,
                filename,
                bytes,
                purpose,
            } => ControlReply::FileAdded(self.add_file(now, &tenant, filename, bytes, purpose)),
            ControlInput::DeleteFile { tenant, file } => ControlReply::FileDeleted(self.delete_file(&tenant, file)),
            ControlInput::Register(reg) => {
                self.register(now, reg);
                ControlReply::Done
            }
            ControlInput::Heartbeat { node, held, replicas } => {
                ControlReply::Heartbeat(self.heartbeat(now, &node, &held, &replicas))
            }
            ControlInput::Lease { node, model, max } => ControlReply::Lease(self.lease(now, &node, &model, max)),
            ControlInput::LeaseOrWait {
                node,
                model,
                max,
                until,
                ticket,
            } => ControlReply::LeaseOrWait(self.lease_or_wait(now, &node, &model, max, until, ticket)),
            ControlInput::Report { node, results } => ControlReply::Reported(self.report(now, &node, results)),
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
    /// A report failed: its results come back to be sent again.
    ReportFailed {
        results: Vec<ReportedResult>,
        failure: CallFailure,
    },
    PowerLimitSet {
        replica: ReplicaIndex,
        result: Result<f64, String>,
    },
    HeartbeatDone(Result<HeartbeatReply, CallFailure>),
    /// Each replica's devices read together (`None`: not every device of it answered).
    DeviceSample(Vec<Option<EnergyReading>>),
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
            AgentInput::ReportFailed { .. } => "report_failed",
            AgentInput::PowerLimitSet { .. } => "power_limit_set",
            AgentInput::HeartbeatDone(_) => "heartbeat_done",
            AgentInput::DeviceSample(_) => "device_sample",
        }
    }
}

impl AgentCore {
    /// Applies one input at `now`; what to do next comes out of
    /// [`AgentCore::poll_action`].
    pub fn handle(&mut self, now: Timestamp, input: AgentInput) {
        let unknown = |f: CallFailure| f == CallFailure::UnknownNode;
        match input {
            AgentInput::Timeout => self.handle_timeout(now),
            AgentInput::Shutdown => self.shutdown(now),
            AgentInput::SampleNow => self.sample_now(now),
            AgentInput::SetWindow { replica, window } => self.set_window(now, replica.0, window),
            AgentInput::Registered { heartbeat_interval } => self.registered(now, heartbeat_interval),
            AgentInput::RegisterFailed => self.register_failed(now),
            AgentInput::Leased { model, result } => self.lease_done(now, &model, result.map_err(unknown)),
            AgentInput::EngineDone {
                replica,
                unit,
                req,
                reply,
            } => self.engine_done(now, replica.0, unit, req, reply),
            AgentInput::ReportAcked => self.report_acked(now),
            AgentInput::ReportFailed { results, failure } => self.report_failed(now, results, unknown(failure)),
            AgentInput::PowerLimitSet { replica, result } => self.power_limit_done(now, replica.0, result),
            AgentInput::HeartbeatDone(reply) => self.heartbeat_done(now, reply.map_err(unknown)),
            AgentInput::DeviceSample(readings) => self.device_sample(now, readings),
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
