//! The embedded single-node store: one redb file in the data directory.
//!
//! Tables (values are postcard-encoded tokenfab-core types):
//! - `batches`: batch id -> [`BatchRecord`] (meta, lifecycle, totals once final)
//! - `inputs`: (batch, request index) -> [`ParsedRequest`] (line, custom_id, body)
//! - `line_errors`: (batch, line) -> [`LineError`]
//! - `results`: (batch, request index) -> [`StoredResult`]
//! - `tenant_idle`: (tenant, hour start in Unix µs) -> (joules, cost in USD) of idle energy
//!   charged to the tenant in that hour
//!
//! Every [`Store::apply`] is one write transaction committed with `Durability::Immediate`
//! (fsync), so a returned `apply` survives `kill -9` and power loss.

use crate::{
    BatchInputs, Cursor, IdleRow, LoadedBatch, Page, ResultKind, ResultRow, RowOutcome, Store, StoreError, WriteSet,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenfab_core::batch::Lifecycle;
use tokenfab_core::batch_input::{LineError, ParsedRequest};
use tokenfab_core::durable::{BatchMeta, BatchTotals, DurableOp, Outcome, RecoveredBatch, RequestMeta};
use tokenfab_core::usage::Usage;
use tokenfab_core::{BatchId, TenantId, Timestamp};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
const INPUTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("inputs");
const LINE_ERRORS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("line_errors");
const RESULTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("results");
const TENANT_IDLE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("tenant_idle");

/// Bumped whenever the encoding of a table changes.
const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BatchRecord {
    meta: BatchMeta,
    life: Lifecycle,
    totals: Option<BatchTotals>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredResult {
    outcome: Outcome,
    usage: Usage,
}

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.path).finish()
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(io)
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`, creating the directory if needed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open_err = |cause: String| StoreError::Open {
            path: dir.display().to_string(),
            cause,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let path = dir.join("tokenfab.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                "another tokenfab server is already using it; stop that server or choose another --data-dir".into(),
            ),
            other => open_err(other.to_string()),
        })?;
        let store = RedbStore { db: Arc::new(db), path };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut meta = txn.open_table(META).map_err(io)?;
            let found = meta.get("schema").map_err(io)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema", SCHEMA_VERSION).map_err(io)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(v) => {
                    return Err(StoreError::Corrupt(format!(
                        "schema version {v}, this tokenfab reads version {SCHEMA_VERSION}; use a matching tokenfab release"
                    )));
                }
            }
            // Create every table so readers never meet a missing one.
            txn.open_table(BATCHES).map_err(io)?;
            txn.open_table(INPUTS).map_err(io)?;
            txn.open_table(LINE_ERRORS).map_err(io)?;
            txn.open_table(RESULTS).map_err(io)?;
            txn.open_table(TENANT_IDLE).map_err(io)?;
        }
        txn.commit().map_err(io)
    }

    fn apply_blocking(db: &Database, set: WriteSet) -> Result<(), StoreError> {
        let mut txn = db.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        {
            let mut batches = txn.open_table(BATCHES).map_err(io)?;
            let mut inputs = txn.open_table(INPUTS).map_err(io)?;
            let mut line_errors = txn.open_table(LINE_ERRORS).map_err(io)?;
            let mut results = txn.open_table(RESULTS).map_err(io)?;
            let mut tenant_idle = txn.open_table(TENANT_IDLE).map_err(io)?;
            for BatchInputs {
                batch,
                requests,
                line_errors: errs,
            } in set.inputs
            {
                for (i, r) in requests.iter().enumerate() {
                    inputs.insert((batch.0, i as u32), encode(r)?.as_slice()).map_err(io)?;
                }
                for e in &errs {
                    line_errors
                        .insert((batch.0, e.line), encode(e)?.as_slice())
                        .map_err(io)?;
                }
            }
            for op in set.ops {
                match op {
                    DurableOp::CreateBatch {
                        meta,
                        life,
                        requests: _,
                    } => {
                        let id = meta.id.0;
                        let rec = BatchRecord {
                            meta,
                            life,
                            totals: None,
                        };
                        batches.insert(id, encode(&rec)?.as_slice()).map_err(io)?;
                    }
                    DurableOp::UpdateBatch { id, life, totals } => {
                        let mut rec: BatchRecord = match batches.get(id.0).map_err(io)? {
                            Some(v) => decode(v.value(), "batch record")?,
                            None => {
                                return Err(StoreError::Corrupt(format!("update of unknown batch {id}")));
                            }
                        };
                        rec.life = life;
                        if totals.is_some() {
                            rec.totals = totals;
                        }
                        batches.insert(id.0, encode(&rec)?.as_slice()).map_err(io)?;
                    }
                    DurableOp::RecordResults(rs) => {
                        for r in rs {
                            let v = StoredResult {
                                outcome: r.outcome,
                                usage: r.usage,
                            };
                            results
                                .insert((r.req.batch.0, r.req.index), encode(&v)?.as_slice())
                                .map_err(io)?;
                        }
                    }
                    DurableOp::TenantIdle {
                        tenant,
                        hour,
                        joules,
                        cost_usd,
                    } => {
                        tenant_idle
                            .insert(
                                (tenant.as_str(), hour.as_micros()),
                                encode(&(joules, cost_usd))?.as_slice(),
                            )
                            .map_err(io)?;
                    }
                }
            }
        }
        txn.commit().map_err(io)
    }

    fn load_blocking(db: &Database) -> Result<Vec<LoadedBatch>, StoreError> {
        let txn = db.begin_read().map_err(io)?;
        let batches = txn.open_table(BATCHES).map_err(io)?;
        let inputs = txn.open_table(INPUTS).map_err(io)?;
        let results = txn.open_table(RESULTS).map_err(io)?;
        let mut out = Vec::new();
        for entry in batches.iter().map_err(io)? {
            let (_, v) = entry.map_err(io)?;
            let rec: BatchRecord = decode(v.value(), "batch record")?;
            let id = rec.meta.id.0;
            let is_final = rec.life.status().is_terminal() && rec.totals.is_some();
            let mut loaded = LoadedBatch {
                batch: RecoveredBatch {
                    meta: rec.meta,
                    life: rec.life,
                    totals: rec.totals,
                    requests: Vec::new(),
                    results: Vec::new(),
                },
                inputs: Vec::new(),
            };
            if !is_final {
                for e in inputs.range((id, 0)..=(id, u32::MAX)).map_err(io)? {
                    let (_, v) = e.map_err(io)?;
                    let r: ParsedRequest = decode(v.value(), "request input")?;
                    loaded.batch.requests.push(RequestMeta::from(&r));
                    loaded.inputs.push(r);
                }
                for e in results.range((id, 0)..=(id, u32::MAX)).map_err(io)? {
                    let (k, v) = e.map_err(io)?;
                    let r: StoredResult = decode(v.value(), "result")?;
                    loaded
                        .batch
                        .results
                        .push((k.value().1, r.outcome.is_success(), r.usage));
                }
            }
            out.push(loaded);
        }
        Ok(out)
    }

    fn idle_blocking(db: &Database) -> Result<Vec<IdleRow>, StoreError> {
        let txn = db.begin_read().map_err(io)?;
        let table = txn.open_table(TENANT_IDLE).map_err(io)?;
        let mut out = Vec::new();
        for e in table.iter().map_err(io)? {
            let (k, v) = e.map_err(io)?;
            let (tenant, hour) = k.value();
            let (joules, cost_usd): (f64, f64) = decode(v.value(), "idle charge")?;
            out.push((
                TenantId::new(tenant.to_string()),
                Timestamp::from_micros(hour),
                joules,
                cost_usd,
            ));
        }
        Ok(out)
    }

    fn results_blocking(
        db: &Database,
        batch: BatchId,
        kind: ResultKind,
        cursor: Cursor,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let txn = db.begin_read().map_err(io)?;
        let inputs = txn.open_table(INPUTS).map_err(io)?;
        let results = txn.open_table(RESULTS).map_err(io)?;
        let id = batch.0;
        let limit = limit.max(1);
        // Recorded results from `cursor.index`, filtered by kind, joined with their input.
        let mut recorded = Vec::new();
        let mut next_index = cursor.index;
        let mut more_results = false;
        for e in results.range((id, cursor.index)..=(id, u32::MAX)).map_err(io)? {
            let (k, v) = e.map_err(io)?;
            let index = k.value().1;
            let r: StoredResult = decode(v.value(), "result")?;
            if r.outcome.is_success() != (kind == ResultKind::Output) {
                next_index = index + 1;
                continue;
            }
            if recorded.len() == limit {
                more_results = true;
                break;
            }
            let input: ParsedRequest = match inputs.get((id, index)).map_err(io)? {
                Some(v) => decode(v.value(), "request input")?,
                None => {
                    return Err(StoreError::Corrupt(format!("result without input: {batch} #{index}")));
                }
            };
            recorded.push((
                index,
                ResultRow {
                    line: input.line,
                    custom_id: input.custom_id,
                    outcome: RowOutcome::Recorded(r.outcome),
                    usage: r.usage,
                },
            ));
            next_index = index + 1;
        }
        if kind == ResultKind::Output {
            let next = more_results.then_some(Cursor {
                index: next_index,
                line: cursor.line,
            });
            return Ok(Page {
                rows: recorded.into_iter().map(|(_, r)| r).collect(),
                next,
            });
        }
        // Errors: merge line errors (by line) with failed results (by line).
        let line_errors = txn.open_table(LINE_ERRORS).map_err(io)?;
        let mut invalid = Vec::new();
        let mut more_invalid = false;
        for e in line_errors.range((id, cursor.line)..=(id, u32::MAX)).map_err(io)? {
            let (_, v) = e.map_err(io)?;
            if invalid.len() == limit {
                more_invalid = true;
                break;
            }
            let le: LineError = decode(v.value(), "line error")?;
            invalid.push(ResultRow {
                line: le.line,
                custom_id: le.custom_id.clone().unwrap_or_default(),
                outcome: RowOutcome::Invalid(le),
                usage: Usage::default(),
            });
        }
        let mut rows = Vec::with_capacity(limit);
        let (mut a, mut b) = (recorded.into_iter().peekable(), invalid.into_iter().peekable());
        let mut next = cursor;
        while rows.len() < limit {
            let take_recorded = match (a.peek(), b.peek()) {
                (Some((_, x)), Some(y)) => x.line < y.line,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_recorded {
                let (index, row) = a.next().expect("peeked");
                next.index = index + 1;
                rows.push(row);
            } else {
                let row = b.next().expect("peeked");
                next.line = row.line + 1;
                rows.push(row);
            }
        }
        let more = a.peek().is_some() || b.peek().is_some() || more_results || more_invalid;
        if a.peek().is_none() && !more_results {
            next.index = next_index.max(next.index);
        }
        Ok(Page {
            rows,
            next: more.then_some(next),
        })
    }
}

impl Store for RedbStore {
    async fn apply(&self, set: WriteSet) -> Result<(), StoreError> {
        if set.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Self::apply_blocking(&db, set))
            .await
            .map_err(io)?
    }

    async fn load(&self) -> Result<Vec<LoadedBatch>, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Self::load_blocking(&db))
            .await
            .map_err(io)?
    }

    async fn idle_shares(&self) -> Result<Vec<IdleRow>, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Self::idle_blocking(&db))
            .await
            .map_err(io)?
    }

    async fn results(
        &self,
        batch: BatchId,
        kind: ResultKind,
        cursor: Cursor,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Self::results_blocking(&db, batch, kind, cursor, limit))
            .await
            .map_err(io)?
    }
}
