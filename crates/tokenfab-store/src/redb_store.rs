//! The embedded single-node store: one redb file and one directory of input files in the
//! data directory.
//!
//! ```text
//! <data dir>/tokenfab.redb        the tables below
//! <data dir>/inputs/<batch>.jsonl  each unfinished batch's input file, as uploaded
//! <data dir>/uploads/              input files being written, before their batch commits
//! ```
//!
//! Tables (values are postcard-encoded tokenfab-core types):
//! - `batches`: batch id -> [`BatchRecord`] (meta, lifecycle, totals once final)
//! - `requests`: (batch, request index) -> [`ParsedRequest`] (line, custom_id, where its
//!   body is in the input file)
//! - `line_errors`: (batch, line) -> [`LineError`]
//! - `results`: (batch, request index) -> [`StoredResult`]
//! - `tenant_idle`: (tenant, hour start in Unix µs) -> (joules, cost in USD) of idle energy
//!   charged to the tenant in that hour
//! - `tenant_history`: (tenant, day start in Unix µs) -> [`UsageHistory`] of its deleted
//!   batches
//!
//! Every [`Store::apply`] is one write transaction committed with `Durability::Immediate`
//! (fsync), so a returned `apply` survives `kill -9` and power loss. A new batch's input
//! file is written and fsynced by the shell, moved into `inputs/` (and the directory
//! fsynced) before the transaction that creates the batch commits; files of batches that
//! did not commit are removed when the store opens. Input files of final batches are
//! deleted after the commit that ends them.

use crate::{
    BatchInputs, Cursor, HistoryRow, IdleRow, LeasedBody, Loaded, LoadedBatch, Page, ResultKind, ResultRow, RowOutcome,
    StagedInput, Store, StoreError, WriteSet, tracing_warn,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokenfab_core::batch::Lifecycle;
use tokenfab_core::batch_input::{LineError, ParsedRequest};
use tokenfab_core::durable::{
    BatchMeta, BatchTotals, DurableOp, Outcome, RecoveredBatch, RecoveredResult, RequestMeta, UsageHistory,
};
use tokenfab_core::usage::Usage;
use tokenfab_core::{BatchId, RequestRef, TenantId, Timestamp};

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
pub(crate) const REQUESTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("requests");
pub(crate) const LINE_ERRORS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("line_errors");
pub(crate) const RESULTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("results");
pub(crate) const TENANT_IDLE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("tenant_idle");
pub(crate) const TENANT_HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("tenant_history");
pub(crate) const FILES: TableDefinition<u64, &[u8]> = TableDefinition::new("files");

/// Bumped whenever the encoding of a table changes; [`crate::migrate`] upgrades older
/// stores.
pub(crate) const SCHEMA_VERSION: u64 = 2;

/// The `meta` key of the first batch id not yet given out.
pub(crate) const NEXT_BATCH: &str = "next_batch";
/// The `meta` key of the first file id not yet given out.
pub(crate) const NEXT_FILE: &str = "next_file";
/// The `meta` key of the last entry of a replicated log applied here (replicated
/// backends keep their log elsewhere and this store as its materialized state).
pub(crate) const APPLIED: &str = "replicated_applied";

/// Input files kept open for leases.
const OPEN_FILES: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BatchRecord {
    pub meta: BatchMeta,
    pub life: Lifecycle,
    pub totals: Option<BatchTotals>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredResult {
    pub outcome: Outcome,
    pub usage: Usage,
}

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` only while it is being reopened.
    db: RwLock<Option<Arc<Database>>>,
    dir: PathBuf,
    open_inputs: Mutex<HashMap<u64, Arc<File>>>,
    next_upload: AtomicU64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("dir", &self.inner.dir).finish()
    }
}

pub(crate) fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(io)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn input_path(dir: &Path, batch: u64) -> PathBuf {
    dir.join("inputs").join(format!("{batch}.jsonl"))
}

pub(crate) fn file_path(dir: &Path, file: u64) -> PathBuf {
    dir.join("files").join(format!("{file}"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`, creating the directory if needed, upgrading
    /// a store written by an older version, and removing input files no batch owns.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open_err = |cause: String| StoreError::Open {
            path: dir.display().to_string(),
            cause,
        };
        for sub in ["inputs", "uploads", "files"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| open_err(e.to_string()))?;
        }
        let db = open_db(dir)?;
        let store = RedbStore {
            inner: Arc::new(Inner {
                db: RwLock::new(Some(Arc::new(db))),
                dir: dir.to_path_buf(),
                open_inputs: Mutex::new(HashMap::new()),
                next_upload: AtomicU64::new(0),
            }),
        };
        store.check_schema()?;
        // At startup no upload is in progress: every staged file is a leftover.
        for e in std::fs::read_dir(dir.join("uploads")).map_err(io)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        store.remove_strays()?;
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The open database (for a backup).
    pub(crate) fn db_handle(&self) -> Result<Arc<Database>, StoreError> {
        self.db()
    }

    /// Holds off the deletion of input files (which commits that end batches make) while
    /// the guard lives: a backup takes its snapshot and opens the inputs under it.
    pub(crate) fn hold_deletions(&self) -> Result<std::sync::MutexGuard<'_, HashMap<u64, Arc<File>>>, StoreError> {
        self.inner.open_inputs.lock().map_err(|_| io("lock poisoned"))
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.inner
            .db
            .read()
            .map_err(|_| io("store lock poisoned"))?
            .clone()
            .ok_or_else(|| io("the store is being reopened"))
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_write().map_err(io)?;
        let found = {
            let meta = txn.open_table(META).map_err(io)?;
            meta.get("schema").map_err(io)?.map(|v| v.value())
        };
        match found {
            None => {
                let mut meta = txn.open_table(META).map_err(io)?;
                // A new store, or one from before the schema was recorded: the tables
                // below decide (a v1 store always recorded its version).
                meta.insert("schema", SCHEMA_VERSION).map_err(io)?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(1) => {
                drop(txn);
                crate::migrate::v1_to_v2(&db, &self.inner.dir)?;
                return self.check_schema();
            }
            Some(v) => {
                return Err(StoreError::Corrupt(format!(
                    "schema version {v}, this tokenfab reads version {SCHEMA_VERSION}; use a matching tokenfab release"
                )));
            }
        }
        // Create every table so readers never meet a missing one.
        txn.open_table(BATCHES).map_err(io)?;
        txn.open_table(REQUESTS).map_err(io)?;
        txn.open_table(LINE_ERRORS).map_err(io)?;
        txn.open_table(RESULTS).map_err(io)?;
        txn.open_table(TENANT_IDLE).map_err(io)?;
        txn.open_table(TENANT_HISTORY).map_err(io)?;
        txn.open_table(FILES).map_err(io)?;
        txn.commit().map_err(io)
    }

    /// Removes input files of batches that did not commit or have ended. (Uploads in
    /// progress are left alone: their handlers own them.)
    fn remove_strays(&self) -> Result<(), StoreError> {
        let dir = &self.inner.dir;
        let db = self.db()?;
        let txn = db.begin_read().map_err(io)?;
        let batches = txn.open_table(BATCHES).map_err(io)?;
        for e in std::fs::read_dir(dir.join("inputs")).map_err(io)?.flatten() {
            let name = e.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok());
            let live = match id {
                Some(id) => match batches.get(id).map_err(io)? {
                    // An unreadable record may be of an unfinished batch: keep its input
                    // for `tokenfab admin verify --salvage`.
                    Some(v) => decode::<BatchRecord>(v.value(), "batch record")
                        .map_or(true, |rec| !rec.life.status().is_terminal()),
                    None => false,
                },
                None => false,
            };
            if !live {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let files = txn.open_table(FILES).map_err(io)?;
        for e in std::fs::read_dir(dir.join("files")).map_err(io)?.flatten() {
            let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
            let owned = match id {
                Some(id) => files.get(id).map_err(io)?.is_some(),
                None => false,
            };
            if !owned {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Applies `set`, the replicated log's entry `seq`, and records `seq` as applied in
    /// the same transaction: after a crash, [`RedbStore::applied`] says where to go on.
    /// Without `fsync`, the commit becomes durable with a later one that has it (the log
    /// holds the entry, so a crash costs only its replay).
    pub fn apply_replicated(&self, set: WriteSet, seq: u64, fsync: bool) -> Result<(), StoreError> {
        self.apply_blocking_at(
            set,
            Some(seq),
            if fsync { Durability::Immediate } else { Durability::None },
        )
    }

    /// Makes every commit so far durable (one fsync).
    pub fn sync(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        txn.commit().map_err(io)
    }

    /// The last replicated log entry applied here (0: none).
    pub fn applied(&self) -> Result<u64, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(io)?;
        let meta = txn.open_table(META).map_err(io)?;
        Ok(meta.get(APPLIED).map_err(io)?.map_or(0, |v| v.value()))
    }

    fn apply_blocking(&self, set: WriteSet) -> Result<(), StoreError> {
        self.apply_blocking_at(set, None, Durability::Immediate)
    }

    fn apply_blocking_at(&self, set: WriteSet, seq: Option<u64>, durability: Durability) -> Result<(), StoreError> {
        let db = self.db()?;
        let dir = &self.inner.dir;
        // Input files first: in place (and the directory entry durable) before the
        // transaction that makes their batches exist.
        let mut inputs = Vec::with_capacity(set.inputs.len());
        for BatchInputs {
            batch,
            file,
            requests,
            line_errors,
        } in set.inputs
        {
            let staged = file.take();
            std::fs::rename(&staged, input_path(dir, batch.0)).map_err(|e| {
                let _ = std::fs::remove_file(&staged);
                io(format!("cannot move the input of {batch} into place: {e}"))
            })?;
            inputs.push((batch, requests, line_errors));
        }
        if !inputs.is_empty() {
            sync_dir(&dir.join("inputs"))?;
        }
        for (id, staged) in set.files {
            let staged = staged.take();
            std::fs::rename(&staged, file_path(dir, id.0)).map_err(|e| {
                let _ = std::fs::remove_file(&staged);
                io(format!("cannot move the content of {id} into place: {e}"))
            })?;
            sync_dir(&dir.join("files"))?;
        }
        let mut dropped_files = Vec::new();
        let mut dropped = Vec::new();
        let mut txn = db.begin_write().map_err(io)?;
        txn.set_durability(durability).map_err(io)?;
        {
            let mut batches = txn.open_table(BATCHES).map_err(io)?;
            let mut requests_t = txn.open_table(REQUESTS).map_err(io)?;
            let mut line_errors_t = txn.open_table(LINE_ERRORS).map_err(io)?;
            let mut results = txn.open_table(RESULTS).map_err(io)?;
            let mut tenant_idle = txn.open_table(TENANT_IDLE).map_err(io)?;
            let mut tenant_history = txn.open_table(TENANT_HISTORY).map_err(io)?;
            let mut meta_t = txn.open_table(META).map_err(io)?;
            let mut files_t = txn.open_table(FILES).map_err(io)?;
            for (batch, requests, errs) in &inputs {
                for (i, r) in requests.iter().enumerate() {
                    requests_t
                        .insert((batch.0, i as u32), encode(r)?.as_slice())
                        .map_err(io)?;
                }
                for e in errs {
                    line_errors_t
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
                        // Batch ids are never given out twice, even once deleted.
                        let next = meta_t.get(NEXT_BATCH).map_err(io)?.map_or(0, |v| v.value());
                        if id + 1 > next {
                            meta_t.insert(NEXT_BATCH, id + 1).map_err(io)?;
                        }
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
                    DurableOp::TenantHistory { tenant, day, history } => {
                        tenant_history
                            .insert((tenant.as_str(), day.as_micros()), encode(&history)?.as_slice())
                            .map_err(io)?;
                    }
                    DurableOp::DropInputs { id } => dropped.push(id.0),
                    DurableOp::CreateFile { meta } => {
                        let next = meta_t.get(NEXT_FILE).map_err(io)?.map_or(0, |v| v.value());
                        if meta.id.0 + 1 > next {
                            meta_t.insert(NEXT_FILE, meta.id.0 + 1).map_err(io)?;
                        }
                        files_t.insert(meta.id.0, encode(&meta)?.as_slice()).map_err(io)?;
                    }
                    DurableOp::DeleteFile { id } => {
                        files_t.remove(id.0).map_err(io)?;
                        dropped_files.push(id.0);
                    }
                    DurableOp::DeleteBatch { id } => {
                        let range = (id.0, 0)..=(id.0, u32::MAX);
                        batches.remove(id.0).map_err(io)?;
                        requests_t.retain_in(range.clone(), |_, _| false).map_err(io)?;
                        line_errors_t.retain_in(range.clone(), |_, _| false).map_err(io)?;
                        results.retain_in(range, |_, _| false).map_err(io)?;
                        dropped.push(id.0);
                    }
                }
            }
            if let Some(seq) = seq {
                meta_t.insert(APPLIED, seq).map_err(io)?;
            }
        }
        txn.commit().map_err(io)?;
        // The commit says these inputs are no longer needed: a crash before they are
        // removed leaves files that the next open removes.
        if !dropped.is_empty() || !dropped_files.is_empty() {
            let mut open = self.inner.open_inputs.lock().map_err(|_| io("lock poisoned"))?;
            for id in dropped {
                open.remove(&id);
                if let Err(e) = std::fs::remove_file(input_path(dir, id))
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing_warn(&format!("cannot delete the input file of batch {id}: {e}"));
                }
            }
            for id in dropped_files {
                let _ = std::fs::remove_file(file_path(dir, id));
            }
            drop(open);
        }
        Ok(())
    }

    /// Reads everything recovery needs. A record that does not decode is skipped and
    /// reported, not fatal: an unreadable batch record or request leaves its batch out
    /// (the rest of the store serves on; `tokenfab admin verify --salvage` recovers what
    /// can be read); an unreadable result leaves its request to run again.
    fn load_blocking(&self) -> Result<Loaded, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(io)?;
        let batches = txn.open_table(BATCHES).map_err(io)?;
        let requests = txn.open_table(REQUESTS).map_err(io)?;
        let results = txn.open_table(RESULTS).map_err(io)?;
        let mut out = Vec::new();
        let mut problems = Vec::new();
        let next_batch = txn
            .open_table(META)
            .map_err(io)?
            .get(NEXT_BATCH)
            .map_err(io)?
            .map_or(0, |v| v.value());
        'batches: for entry in batches.iter().map_err(io)? {
            let (k, v) = entry.map_err(io)?;
            let rec: BatchRecord = match decode(v.value(), "batch record") {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("batch {} is left out: {e}", BatchId(k.value())));
                    continue;
                }
            };
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
            };
            if !is_final {
                for e in requests.range((id, 0)..=(id, u32::MAX)).map_err(io)? {
                    let (k, v) = e.map_err(io)?;
                    match decode::<ParsedRequest>(v.value(), "request") {
                        Ok(r) => loaded.batch.requests.push(RequestMeta::from(&r)),
                        Err(e) => {
                            problems.push(format!(
                                "batch {} is left out: request {}: {e}; run tokenfab admin verify --salvage",
                                BatchId(id),
                                k.value().1
                            ));
                            continue 'batches;
                        }
                    }
                }
                for e in results.range((id, 0)..=(id, u32::MAX)).map_err(io)? {
                    let (k, v) = e.map_err(io)?;
                    let r: StoredResult = match decode(v.value(), "result") {
                        Ok(r) => r,
                        Err(e) => {
                            problems.push(format!(
                                "the result of {} request {} is unreadable ({e}); the request runs again",
                                BatchId(id),
                                k.value().1
                            ));
                            continue;
                        }
                    };
                    loaded.batch.results.push(RecoveredResult {
                        index: k.value().1,
                        succeeded: r.outcome.is_success(),
                        usage: r.usage,
                        stored_bytes: r.outcome.stored_bytes(),
                    });
                }
            }
            out.push(loaded);
        }
        let meta = txn.open_table(META).map_err(io)?;
        let next_file = meta.get(NEXT_FILE).map_err(io)?.map_or(0, |v| v.value());
        let mut files = Vec::new();
        for e in txn.open_table(FILES).map_err(io)?.iter().map_err(io)? {
            let (k, v) = e.map_err(io)?;
            match decode::<tokenfab_core::durable::FileMeta>(v.value(), "file") {
                Ok(f) => files.push(f),
                Err(e) => problems.push(format!("file {} is left out: {e}", tokenfab_core::FileId(k.value()))),
            }
        }
        Ok(Loaded {
            batches: out,
            problems,
            next_batch,
            files,
            next_file,
        })
    }

    fn idle_blocking(&self) -> Result<Vec<IdleRow>, StoreError> {
        let db = self.db()?;
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

    fn history_blocking(&self) -> Result<Vec<HistoryRow>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(io)?;
        let table = txn.open_table(TENANT_HISTORY).map_err(io)?;
        let mut out = Vec::new();
        for e in table.iter().map_err(io)? {
            let (k, v) = e.map_err(io)?;
            let (tenant, day) = k.value();
            let h: UsageHistory = decode(v.value(), "usage history")?;
            out.push((TenantId::new(tenant.to_string()), Timestamp::from_micros(day), h));
        }
        Ok(out)
    }

    /// The open input file of `batch`, or `None` once it is gone.
    fn input(&self, batch: u64) -> Result<Option<Arc<File>>, StoreError> {
        let mut open = self.inner.open_inputs.lock().map_err(|_| io("lock poisoned"))?;
        if let Some(f) = open.get(&batch) {
            return Ok(Some(f.clone()));
        }
        let f = match File::open(input_path(&self.inner.dir, batch)) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("cannot open the input of batch {batch}: {e}"))),
        };
        if open.len() >= OPEN_FILES {
            open.clear();
        }
        open.insert(batch, f.clone());
        Ok(Some(f))
    }

    fn bodies_blocking(&self, items: Vec<RequestRef>) -> Result<Vec<Option<LeasedBody>>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(io)?;
        let batches = txn.open_table(BATCHES).map_err(io)?;
        let requests = txn.open_table(REQUESTS).map_err(io)?;
        let mut out: Vec<Option<LeasedBody>> = vec![None; items.len()];
        let mut by_batch: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (pos, item) in items.iter().enumerate() {
            by_batch.entry(item.batch.0).or_default().push(pos);
        }
        for (batch, positions) in by_batch {
            let Some(rec) = batches.get(batch).map_err(io)? else {
                continue;
            };
            // A batch whose input cannot be read leaves its requests without bodies (the
            // caller ends them as `input_lost`); the other batches of the lease go on.
            let Ok(endpoint) = decode::<BatchRecord>(rec.value(), "batch record").map(|r| r.meta.endpoint) else {
                continue;
            };
            let file = match self.input(batch) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    tracing_warn(&e.to_string());
                    continue;
                }
            };
            let mut found: Vec<(usize, ParsedRequest)> = Vec::with_capacity(positions.len());
            for pos in positions {
                if let Some(v) = requests.get((batch, items[pos].index)).map_err(io)?
                    && let Ok(r) = decode(v.value(), "request")
                {
                    found.push((pos, r));
                }
            }
            let wanted: Vec<(usize, &ParsedRequest)> = found.iter().map(|(pos, r)| (*pos, r)).collect();
            crate::read_bodies(&file, endpoint, &items, wanted, &mut out);
        }
        Ok(out)
    }

    fn results_blocking(
        &self,
        batch: BatchId,
        kind: ResultKind,
        cursor: Cursor,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(io)?;
        let requests = txn.open_table(REQUESTS).map_err(io)?;
        let results = txn.open_table(RESULTS).map_err(io)?;
        let id = batch.0;
        let limit = limit.max(1);
        // Recorded results from `cursor.index`, filtered by kind, joined with their request.
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
            let request: ParsedRequest = match requests.get((id, index)).map_err(io)? {
                Some(v) => decode(v.value(), "request")?,
                None => {
                    return Err(StoreError::Corrupt(format!("result without request: {batch} #{index}")));
                }
            };
            recorded.push((
                index,
                ResultRow {
                    line: request.line,
                    custom_id: request.custom_id,
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

    /// Replaces everything this store holds with the store in `from` (a data directory
    /// written by [`crate::backup::restore`] on the same filesystem), moved into place: a
    /// replica installing a snapshot of its leader's store. `from` is left empty.
    pub fn replace_with(&self, from: &Path) -> Result<(), StoreError> {
        let mut slot = self.inner.db.write().map_err(|_| io("store lock poisoned"))?;
        Self::close(&mut slot)?;
        let dir = &self.inner.dir;
        for name in ["tokenfab.redb", "inputs", "files"] {
            let (old, new) = (dir.join(name), from.join(name));
            if old.is_dir() {
                std::fs::remove_dir_all(&old).map_err(io)?;
            } else if old.exists() {
                std::fs::remove_file(&old).map_err(io)?;
            }
            if new.exists() {
                std::fs::rename(&new, &old).map_err(io)?;
            } else if name != "tokenfab.redb" {
                std::fs::create_dir_all(&old).map_err(io)?;
            }
        }
        sync_dir(dir)?;
        self.inner.open_inputs.lock().map_err(|_| io("lock poisoned"))?.clear();
        *slot = Some(Arc::new(open_db(dir)?));
        Ok(())
    }

    /// Takes the database out of `slot` and closes it, once no reader holds it.
    fn close(slot: &mut Option<Arc<Database>>) -> Result<(), StoreError> {
        if let Some(mut db) = slot.take() {
            // Readers hold the database only for the length of one call.
            let started = std::time::Instant::now();
            loop {
                match Arc::try_unwrap(db) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) => {
                        if started.elapsed() > std::time::Duration::from_secs(30) {
                            *slot = Some(still_shared);
                            return Err(io("cannot close the store: it is still in use after 30 s"));
                        }
                        db = still_shared;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        }
        Ok(())
    }

    /// Closes the database and opens it again (redb refuses every transaction after an
    /// I/O error until then; opening checks and repairs the file).
    fn reopen_blocking(&self) -> Result<(), StoreError> {
        let mut slot = self.inner.db.write().map_err(|_| io("store lock poisoned"))?;
        Self::close(&mut slot)?;
        self.inner.open_inputs.lock().map_err(|_| io("lock poisoned"))?.clear();
        *slot = Some(Arc::new(open_db(&self.inner.dir)?));
        drop(slot);
        // Inputs moved into place for a batch whose commit failed belong to nobody.
        self.remove_strays()
    }
}

fn open_db(dir: &Path) -> Result<Database, StoreError> {
    let path = dir.join("tokenfab.redb");
    Database::create(&path).map_err(|e| StoreError::Open {
        path: dir.display().to_string(),
        cause: match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                "another tokenfab server is already using it; stop that server or choose another --data-dir".into()
            }
            other => other.to_string(),
        },
    })
}

/// Runs a blocking store call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    store: &RedbStore,
    f: impl FnOnce(RedbStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(store)).await.map_err(io)?
}

impl Store for RedbStore {
    fn stage(&self) -> Result<StagedInput, StoreError> {
        let n = self.inner.next_upload.fetch_add(1, Ordering::Relaxed);
        Ok(StagedInput::new(
            self.inner
                .dir
                .join("uploads")
                .join(format!("{}-{n}.part", std::process::id())),
        ))
    }

    async fn apply(&self, set: WriteSet) -> Result<(), StoreError> {
        if set.is_empty() {
            return Ok(());
        }
        blocking(self, move |s| s.apply_blocking(set)).await
    }

    async fn reopen(&self) -> Result<(), StoreError> {
        blocking(self, |s| s.reopen_blocking()).await
    }

    async fn load(&self) -> Result<Loaded, StoreError> {
        blocking(self, |s| s.load_blocking()).await
    }

    async fn idle_shares(&self) -> Result<Vec<IdleRow>, StoreError> {
        blocking(self, |s| s.idle_blocking()).await
    }

    async fn history(&self) -> Result<Vec<HistoryRow>, StoreError> {
        blocking(self, |s| s.history_blocking()).await
    }

    async fn bodies(&self, items: Vec<RequestRef>) -> Result<Vec<Option<LeasedBody>>, StoreError> {
        blocking(self, move |s| s.bodies_blocking(items)).await
    }

    async fn results(
        &self,
        batch: BatchId,
        kind: ResultKind,
        cursor: Cursor,
        limit: usize,
    ) -> Result<Page, StoreError> {
        blocking(self, move |s| s.results_blocking(batch, kind, cursor, limit)).await
    }

    async fn backup(&self, out: Box<dyn std::io::Write + Send>) -> Result<crate::backup::BackupSummary, StoreError> {
        blocking(self, move |s| {
            let mut out = out;
            RedbStore::backup(&s, &mut out)
        })
        .await
    }

    fn file_path(&self, id: tokenfab_core::FileId) -> Option<PathBuf> {
        let p = file_path(&self.inner.dir, id.0);
        p.exists().then_some(p)
    }

    fn free_bytes(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.inner.dir).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
}
