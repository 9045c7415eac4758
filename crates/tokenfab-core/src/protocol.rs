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
