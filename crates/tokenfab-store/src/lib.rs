//! Durable state for the control plane, behind one trait.
//!
//! The control core ([`tokenfab_core::control`]) emits [`DurableOp`]s; the control plane
//! collects them with the request bodies and line errors of new batches into a
//! [`WriteSet`] and calls [`Store::apply`], which must return only once the whole set is
//! durable and never apply part of it. At startup [`Store::load`] reads back everything
//! needed to rebuild the core ([`tokenfab_core::control::ControlCore::recover`]).
//!
//! Backends: [`RedbStore`] (embedded, single node). Replicated backends (Raft, etcd)
//! implement the same trait and must pass [`conformance`].

pub mod conformance;
mod redb_store;

pub use redb_store::RedbStore;

use std::future::Future;
use tokenfab_core::BatchId;
use tokenfab_core::batch_input::{LineError, ParsedRequest};
use tokenfab_core::durable::{DurableOp, Outcome, RecoveredBatch};
use tokenfab_core::usage::Usage;

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

/// The inputs of a new batch, written with its `CreateBatch` operation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchInputs {
    pub batch: BatchId,
    pub requests: Vec<ParsedRequest>,
    pub line_errors: Vec<LineError>,
}

/// Everything one commit writes, atomically.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WriteSet {
    pub ops: Vec<DurableOp>,
    pub inputs: Vec<BatchInputs>,
}

impl WriteSet {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.inputs.is_empty()
    }
}

/// One batch read back at startup.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedBatch {
    pub batch: RecoveredBatch,
    /// The valid requests with their bodies; empty for batches in a final status.
    pub inputs: Vec<ParsedRequest>,
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

/// Idle energy charged to a tenant in one hour: (tenant, hour start, joules, cost in USD).
pub type IdleRow = (tokenfab_core::TenantId, tokenfab_core::Timestamp, f64, f64);

/// Durable state. Every method may be called concurrently; `apply` calls are applied in
/// the order they complete.
pub trait Store: Send + Sync + 'static {
    /// Makes the whole set durable, or none of it.
    fn apply(&self, set: WriteSet) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Everything needed to rebuild the control core, batches in id order.
    fn load(&self) -> impl Future<Output = Result<Vec<LoadedBatch>, StoreError>> + Send;
    /// The idle-energy charges written by `DurableOp::TenantIdle` (the latest per tenant
    /// and hour).
    fn idle_shares(&self) -> impl Future<Output = Result<Vec<IdleRow>, StoreError>> + Send;
    /// A page of at most `limit` rows of a batch's results, from `cursor`.
    fn results(
        &self,
        batch: BatchId,
        kind: ResultKind,
        cursor: Cursor,
        limit: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;
}
