//! Durable state for the control plane, behind one trait.
//!
//! The control core ([`tokenfab_core::control`]) emits
//! [`DurableOp`](tokenfab_core::durable::DurableOp)s; the control plane collects them with
//! the input files and line errors of new batches into a [`WriteSet`] and calls
//! [`Store::apply`], which must return only once the whole set is durable and never apply
//! part of it. At startup [`Store::load`] reads back everything needed to rebuild the core
//! ([`tokenfab_core::control::ControlCore::recover`]), without request bodies: those stay
//! in each batch's input file and are read when they are leased ([`Store::bodies`]), so
//! the control plane's memory does not grow with the work it holds.
//!
//! Backends: [`RedbStore`] (embedded, single node). Replicated backends (Raft, etcd)
//! implement the same trait and must pass [`conformance`].

pub mod backup;
pub mod conformance;
mod migrate;
mod redb_store;
pub mod replicated;

pub use redb_store::RedbStore;

use std::future::Future;
use std::path::{Path, PathBuf};
use tokenfab_core::batch_input::{Endpoint, LineError, ParsedRequest};
use tokenfab_core::durable::{Outcome, RecoveredBatch, UsageHistory};
use tokenfab_core::usage::Usage;
use tokenfab_core::{BatchId, RequestRef};

pub use bytes::Bytes;

/// A store that cannot do what was asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the data directory {path}: {cause}")]
    Open { path: String, cause: String },
    #[error("the durable store failed: {0}; the change was not applied, retry later")]
    Io(String),
    #[error("the durable store holds data this version cannot read: {0}")]
    Corrupt(String),
}

/// A batch's input file while it is written, on the store's own filesystem, before the
/// batch is committed. Deleted when dropped, unless a commit took it.
#[derive(Debug)]
pub struct StagedInput {
    path: PathBuf,
    armed: bool,
}

impl StagedInput {
    fn new(path: PathBuf) -> Self {
        StagedInput { path, armed: true }
    }

    /// Where to write the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file now belongs to the store.
    fn take(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for StagedInput {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The inputs of a new batch, written with its `CreateBatch` operation: the input file
/// (request bodies stay in it, located by each request's `body_offset` and `body_len`),
/// the valid requests and the refused lines.
#[derive(Debug)]
pub struct BatchInputs {
    pub batch: BatchId,
    pub file: StagedInput,
    /// Shared: the control plane reads bodies of a batch whose commit is under way.
    pub requests: std::sync::Arc<Vec<ParsedRequest>>,
    pub line_errors: Vec<LineError>,
}

/// Everything one commit writes, atomically.
#[derive(Debug, Default)]
pub struct WriteSet {
    pub ops: Vec<tokenfab_core::durable::DurableOp>,
    pub inputs: Vec<BatchInputs>,
    /// The contents of uploaded files created in this commit (`DurableOp::CreateFile`).
    pub files: Vec<(tokenfab_core::FileId, StagedInput)>,
}

impl WriteSet {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.inputs.is_empty() && self.files.is_empty()
    }
}

/// One batch read back at startup (request bodies are not read: leases read them).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedBatch {
    pub batch: RecoveredBatch,
}

/// What [`Store::load`] read back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Loaded {
    pub batches: Vec<LoadedBatch>,
    /// Records that could not be read and were left out, for operators.
    pub problems: Vec<String>,
    /// The first batch id never given out (ids are not reused, even after deletion).
    pub next_batch: u64,
    /// Files tenants uploaded, and the first file id never given out.
    pub files: Vec<tokenfab_core::durable::FileMeta>,
    pub next_file: u64,
}

/// A leased request's body and what the agent needs with it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedBody {
    pub req: RequestRef,
    pub custom_id: String,
    pub endpoint: Endpoint,
    pub body: Bytes,
}

/// Bodies closer together than this in an input file are read with one read.
const READ_GAP: u64 = 64 * 1024;

/// Reads the bodies of `wanted` (each: its position in `items` and `out`, and how its
/// line was parsed) from `file`, the input they were parsed from, into `out`. Runs of
/// bodies close together are read at once; in a damaged file, what can be read is read
/// body by body, and a body that cannot be read stays `None`. Used by the store for
/// committed batches and by the control plane for a batch whose commit is under way
/// (its staged input, already parsed).
pub fn read_bodies(
    file: &std::fs::File,
    endpoint: Endpoint,
    items: &[RequestRef],
    mut wanted: Vec<(usize, &ParsedRequest)>,
    out: &mut [Option<LeasedBody>],
) {
    use std::os::unix::fs::FileExt;
    wanted.sort_by_key(|(_, r)| r.body_offset);
    let body = |pos: usize, r: &ParsedRequest, bytes: Bytes| LeasedBody {
        req: items[pos],
        custom_id: r.custom_id.clone(),
        endpoint,
        body: bytes,
    };
    let mut start = 0;
    while start < wanted.len() {
        let from = wanted[start].1.body_offset;
        let mut end = start + 1;
        let mut to = from + u64::from(wanted[start].1.body_len);
        while end < wanted.len() && wanted[end].1.body_offset <= to + READ_GAP {
            to = to.max(wanted[end].1.body_offset + u64::from(wanted[end].1.body_len));
            end += 1;
        }
        let mut buf = vec![0u8; (to - from) as usize];
        let run = &wanted[start..end];
        if file.read_exact_at(&mut buf, from).is_ok() {
            let buf = Bytes::from(buf);
            for &(pos, r) in run {
                let at = (r.body_offset - from) as usize;
                out[pos] = Some(body(pos, r, buf.slice(at..at + r.body_len as usize)));
            }
        } else {
            for &(pos, r) in run {
                let mut bytes = vec![0u8; r.body_len as usize];
                match file.read_exact_at(&mut bytes, r.body_offset) {
                    Ok(()) => out[pos] = Some(body(pos, r, Bytes::from(bytes))),
                    Err(e) => tracing_warn(&format!(
                        "cannot read request {} of batch {} from its input: {e}",
                        items[pos].index, items[pos].batch
                    )),
                }
            }
        }
        start = end;
    }
}

/// The store has no logging of its own: problems it can work around go to stderr.
pub(crate) fn tracing_warn(message: &str) {
    eprintln!("tokenfab-store: {message}");
}

/// Which results to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultKind {
    /// Successful (2xx) engine responses.
    Output,
    /// Invalid lines, non-2xx responses and requests that ended in an error.
    Errors,
}

/// What a result row holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    Recorded(Outcome),
    Invalid(LineError),
}

/// One row of a batch's output or error file.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub line: u32,
    pub custom_id: String,
    pub outcome: RowOutcome,
    pub usage: Usage,
}

/// Where a page of results ends, to ask for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Next request index to read.
    pub index: u32,
    /// Next input line whose validation error to read.
    pub line: u32,
}

/// A page of results in input-line order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub rows: Vec<ResultRow>,
    /// Set when more rows may follow.
    pub next: Option<Cursor>,
}

/// What a store is, for `/healthz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoreInfo {
    /// `embedded`, `etcd` or `raft`.
    pub backend: &'static str,
    /// This replica's name, for a replicated backend.
    pub replica: Option<String>,
    /// The last entry of the replicated log this replica has applied.
    pub log_position: Option<u64>,
}

impl StoreInfo {
    /// What a commit waits for before it is acknowledged, in words (the SLA document's
    /// method names it).
    pub fn durability(&self) -> String {
        let replica = self.replica.as_deref().unwrap_or("?");
        match self.backend {
            "raft" => format!(
                "raft: a commit is acknowledged once a majority of the control plane's replicas hold it in their Raft log (fsynced) and the serving replica ({replica}) has applied it to its store; the loss of a minority of replicas loses nothing"
            ),
            "etcd" => format!(
                "etcd: a commit is acknowledged once etcd has committed it (a majority of etcd's members) and the elected replica ({replica}) has applied it to its store; the loss of a replica loses nothing"
            ),
            _ => "embedded: a commit is acknowledged once it is fsynced to the control plane's own store (one replica): the loss of its disk loses what the last backup does not hold".into(),
        }
    }
}

/// Idle energy charged to a tenant in one hour: (tenant, hour start, joules, cost in USD).
pub type IdleRow = (tokenfab_core::TenantId, tokenfab_core::Timestamp, f64, f64);

/// Usage of a tenant's deleted batches created on one day: (tenant, day start, usage).
pub type HistoryRow = (tokenfab_core::TenantId, tokenfab_core::Timestamp, UsageHistory);

/// Durable state. Every method may be called concurrently; `apply` calls are applied in
/// the order they complete.
pub trait Store: Send + Sync + 'static {
    /// A new, empty place to write a batch's input file to, before the batch is
    /// committed (`apply` then keeps it, atomically with the batch).
    fn stage(&self) -> Result<StagedInput, StoreError>;
    /// Makes the whole set durable, or none of it. After a failure, call `reopen` before
    /// anything else: what is durable is what the store holds.
    fn apply(&self, set: WriteSet) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Brings the store back to its durable state after a failed `apply` (for example a
    /// full disk), so that the caller can rebuild from `load` and go on.
    fn reopen(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Everything needed to rebuild the control core, batches in id order. Records that
    /// cannot be read are left out and reported, not fatal.
    fn load(&self) -> impl Future<Output = Result<Loaded, StoreError>> + Send;
    /// The idle-energy charges written by `DurableOp::TenantIdle` (the latest per tenant
    /// and hour).
    fn idle_shares(&self) -> impl Future<Output = Result<Vec<IdleRow>, StoreError>> + Send;
    /// The usage of deleted batches written by `DurableOp::TenantHistory`.
    fn history(&self) -> impl Future<Output = Result<Vec<HistoryRow>, StoreError>> + Send;
    /// The bodies of leased requests, in the order asked; `None` for a request whose batch
    /// no longer holds its input (it ended, or was deleted).
    fn bodies(
        &self,
        items: Vec<RequestRef>,
    ) -> impl Future<Output = Result<Vec<Option<LeasedBody>>, StoreError>> + Send;
    /// A page of at most `limit` rows of a batch's results, from `cursor`.
    fn results(
        &self,
        batch: BatchId,
        kind: ResultKind,
        cursor: Cursor,
        limit: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;
    /// Free space where the store writes, bytes (`None` where it cannot be measured).
    fn free_bytes(&self) -> Option<u64>;
    /// Whether this replica may answer now (`Err` says why not): a replicated store's
    /// leader answers only while it is sure no other replica can have been elected (its
    /// lease), so that no read returns a state older than a write another leader
    /// acknowledged. One node always may.
    fn may_serve(&self) -> Result<(), String> {
        Ok(())
    }
    /// What the store is (backend, replica, log position).
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            backend: "embedded",
            replica: None,
            log_position: None,
        }
    }
    /// Where an uploaded file's content is, while it exists (readers open it: an open
    /// file stays readable when the file is deleted meanwhile).
    fn file_path(&self, id: tokenfab_core::FileId) -> Option<PathBuf>;
    /// Writes a consistent backup ([`backup`]) to `out` while the store keeps serving.
    fn backup(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> impl Future<Output = Result<backup::BackupSummary, StoreError>> + Send;
}
