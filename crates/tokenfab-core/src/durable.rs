//! What the control plane must make durable, as data: the core emits these operations
//! and a store (embedded, Raft or etcd) applies them atomically before any reply that
//! depends on them is sent.

use crate::batch::Lifecycle;
use crate::ids::{BatchId, FileId, ModelId, RequestRef, TenantId};
use crate::time::Timestamp;
use crate::usage::Usage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// A batch's identity and options; never changes after submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchMeta {
    pub id: BatchId,
    pub tenant: TenantId,
    pub model: ModelId,
    pub sla_class: String,
    pub completion_window: Duration,
    pub deadline: Timestamp,
    pub metadata: BTreeMap<String, String>,
    /// The endpoint every request of the batch targets.
    pub endpoint: crate::batch_input::Endpoint,
    pub input_bytes: u64,
    /// What the refused lines' errors take in the store.
    pub line_error_bytes: u64,
    /// The uploaded file the batch was created from (OpenAI-compatible API), if any.
    pub input_file: Option<FileId>,
    /// Non-blank lines of the input file.
    pub lines: u32,
    /// Lines refused by validation.
    pub invalid_lines: u32,
    /// Valid requests (= lines - invalid_lines).
    pub requests: u32,
}

/// What the scheduler needs to know of one request (the body stays with the shell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMeta {
    /// 1-based line in the input file.
    pub line: u32,
    pub prompt_tokens_estimate: u32,
    pub max_tokens: Option<u32>,
    /// Size of the request body: leases are bounded in bytes as well as in requests.
    pub body_bytes: u32,
}

impl From<&crate::batch_input::ParsedRequest> for RequestMeta {
    fn from(r: &crate::batch_input::ParsedRequest) -> Self {
        RequestMeta {
            line: r.line,
            prompt_tokens_estimate: r.prompt_tokens_estimate,
            max_tokens: r.max_tokens,
            body_bytes: r.body_len,
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// The engine answered (any HTTP status).
    Response {
        status_code: u16,
        body: Vec<u8>,
        request_id: String,
    },
    /// No answer: retries exhausted, batch expired or cancelled.
    Error { code: String, message: String },
}

impl Outcome {
    /// True for a 2xx engine response: the request goes to the output; anything else
    /// goes to the error output.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Response { status_code, .. } if (200..300).contains(status_code))
    }

    /// Roughly what storing it takes, bytes (for tenants' stored-bytes limits).
    pub fn stored_bytes(&self) -> u64 {
        let payload = match self {
            Outcome::Response { body, request_id, .. } => body.len() + request_id.len(),
            Outcome::Error { code, message } => code.len() + message.len(),
        };
        payload as u64 + RESULT_OVERHEAD_BYTES
    }
}

/// What a stored result takes beyond its payload (keys, usage, encoding), bytes.
pub const RESULT_OVERHEAD_BYTES: u64 = 64;

/// A result recorded exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedResult {
    pub req: RequestRef,
    pub outcome: Outcome,
    pub usage: Usage,
}

/// Counts and usage of a batch, stored when it reaches a final status so recovery need
/// not re-read its results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchTotals {
    pub completed: u32,
    pub failed: u32,
    pub usage: Usage,
    /// What its results take in the store (see [`Outcome::stored_bytes`]).
    pub result_bytes: u64,
}

/// One atomic change to durable state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DurableOp {
    /// A new batch. The shell writes the request bodies and line errors it holds for
    /// this batch in the same transaction.
    CreateBatch {
        meta: BatchMeta,
        life: Lifecycle,
        requests: Vec<RequestMeta>,
    },
    /// The batch's lifecycle changed; `totals` is set once it is final.
    UpdateBatch {
        id: BatchId,
        life: Lifecycle,
        totals: Option<BatchTotals>,
    },
    /// Results recorded now. Each request appears at most once across all operations ever.
    RecordResults(Vec<RecordedResult>),
    /// The idle energy charged to `tenant` in the hour starting at `hour` is now `joules`
    /// (costing `cost_usd`): replaces what was stored for that tenant and hour.
    TenantIdle {
        tenant: TenantId,
        hour: Timestamp,
        joules: f64,
        cost_usd: f64,
    },
    /// The batch reached a final status: its request bodies (the input file) are no longer
    /// needed. The store may delete them once this is committed.
    DropInputs { id: BatchId },
    /// The batch is deleted (its retention ended, or its tenant deleted it): its record,
    /// requests, line errors, results and input. Its usage was added to its tenant's
    /// history in the same commit.
    DeleteBatch { id: BatchId },
    /// A file a tenant uploaded (OpenAI-compatible Files API). The shell writes its
    /// content, staged before, in the same transaction.
    CreateFile { meta: FileMeta },
    /// The file is deleted (its tenant deleted it, or its retention ended).
    DeleteFile { id: FileId },
    /// The usage of deleted batches created on the day starting at `day`, for `tenant`,
    /// is now `usage` (replaces what was stored for that tenant and day).
    TenantHistory {
        tenant: TenantId,
        day: Timestamp,
        history: UsageHistory,
    },
}

/// A file a tenant uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: FileId,
    pub tenant: TenantId,
    /// The name the tenant gave it.
    pub filename: String,
    pub bytes: u64,
    pub created_at: Timestamp,
    /// What it is for (`batch`: a batch input file).
    pub purpose: String,
}

/// What deleted batches of one tenant and day used: kept after the batches are gone, for
/// metering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageHistory {
    pub batches: u64,
    pub requests_completed: u64,
    pub requests_failed: u64,
    pub usage: Usage,
}

/// A batch as read back from durable state at startup.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecoveredBatch {
    pub meta: BatchMeta,
    pub life: Lifecycle,
    /// Set for batches in a final status (their requests and results are not loaded).
    pub totals: Option<BatchTotals>,
    pub requests: Vec<RequestMeta>,
    /// Every recorded result.
    pub results: Vec<RecoveredResult>,
}

/// What recovery needs of a recorded result.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecoveredResult {
    pub index: u32,
    pub succeeded: bool,
    pub usage: Usage,
    /// See [`Outcome::stored_bytes`].
    pub stored_bytes: u64,
}
