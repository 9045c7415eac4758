//! Backups, restores and checks of the embedded store.
//!
//! **Backup** ([`RedbStore::backup`]) runs while the control plane serves: it reads every
//! table in one read transaction (a consistent snapshot: redb readers see the state of
//! one commit and never wait for writers) and the input files of the batches that were
//! unfinished in that snapshot (opened while the snapshot is held, so a batch that ends
//! meanwhile cannot take its file away). The output is one stream:
//!
//! ```text
//! record*   each: u32 length (little endian) + postcard-encoded [`Record`]
//! ```
//!
//! starting with a `Header`, ending with an `End` that carries the number of records
//! before it and the SHA-256 of their bytes, so a truncated or altered backup is refused
//! at restore.
//!
//! **Restore** ([`restore`]) writes a new data directory from a backup, offline.
//!
//! **Verify** ([`verify`]) reads every record of a data directory, offline, and says what
//! it cannot decode or what does not fit together; with a salvage directory it writes a
//! new store from everything that can be read, so that a damaged store loses only what is
//! damaged: unreadable results are dropped (their requests run again), requests whose
//! input is unreadable end with the error `input_lost`, records whose batch is unreadable
//! are dropped.

use crate::redb_store::{
    APPLIED, BATCHES, BatchRecord, FILES, LINE_ERRORS, META, NEXT_BATCH, NEXT_FILE, REQUESTS, RESULTS, SCHEMA_VERSION,
    StoredResult, TENANT_HISTORY, TENANT_IDLE, decode, encode, file_path, input_path, io,
};
use crate::{RedbStore, StoreError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use tokenfab_core::batch_input::{LineError, ParsedRequest};
use tokenfab_core::durable::{Outcome, UsageHistory};
use tokenfab_core::usage::Usage;

/// The backup format's version.
const FORMAT: u32 = 1;
/// Input files are carried in pieces of this size.
const INPUT_PIECE: usize = 1 << 20;
/// The largest record a reader accepts (an input piece plus framing, or a large result).
const MAX_RECORD: usize = 64 << 20;

/// One record of a backup stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Header {
        format: u32,
        schema: u64,
        created_unix_ms: u64,
    },
    Batch {
        id: u64,
        value: Vec<u8>,
    },
    Request {
        batch: u64,
        index: u32,
        value: Vec<u8>,
    },
    LineError {
        batch: u64,
        line: u32,
        value: Vec<u8>,
    },
    Result {
        batch: u64,
        index: u32,
        value: Vec<u8>,
    },
    TenantIdle {
        tenant: String,
        hour: u64,
        value: Vec<u8>,
    },
    TenantHistory {
        tenant: String,
        day: u64,
        value: Vec<u8>,
    },
    Input {
        batch: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// An uploaded file's record, and a piece of its content.
    File {
        id: u64,
        value: Vec<u8>,
    },
    FileData {
        id: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// A counter of the store (the next batch or file id).
    Meta {
        key: String,
        value: u64,
    },
    End {
        records: u64,
        sha256: [u8; 32],
    },
}

/// What a backup or a restore carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupSummary {
    pub batches: u64,
    pub requests: u64,
    pub results: u64,
    pub input_bytes: u64,
    /// Records, and bytes of the stream.
    pub records: u64,
    pub bytes: u64,
}

struct Writer<'a, W: Write> {
    out: &'a mut W,
    hash: Sha256,
    summary: BackupSummary,
}

impl<W: Write> Writer<'_, W> {
    fn put(&mut self, r: &Record) -> Result<(), StoreError> {
        let body = postcard::to_allocvec(r).map_err(io)?;
        let len = u32::try_from(body.len()).map_err(|_| io("a backup record over 4 GiB"))?;
        let mut framed = Vec::with_capacity(body.len() + 4);
        framed.extend_from_slice(&len.to_le_bytes());
        framed.extend_from_slice(&body);
        if !matches!(r, Record::End { .. }) {
            self.hash.update(&framed);
            self.summary.records += 1;
        }
        self.summary.bytes += framed.len() as u64;
        self.out
            .write_all(&framed)
            .map_err(|e| io(format!("writing the backup: {e}")))
    }
}

/// Reads records until `End`, checking the count and the digest.
struct Reader<R: Read> {
    input: R,
    hash: Sha256,
    records: u64,
}

impl<R: Read> Reader<R> {
    fn next(&mut self) -> Result<Record, StoreError> {
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len).map_err(|e| {
            StoreError::Corrupt(format!(
                "the backup ends after {} records without its end mark ({e}): it is truncated",
                self.records
            ))
        })?;
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_RECORD {
            return Err(StoreError::Corrupt(format!(
                "record {} claims {n} bytes: this is not a tokenfab backup, or it is damaged",
                self.records + 1
            )));
        }
        let mut body = vec![0u8; n];
        self.input.read_exact(&mut body).map_err(|e| {
            StoreError::Corrupt(format!(
                "record {} is cut short ({e}): the backup is truncated",
                self.records + 1
            ))
        })?;
        let r: Record = postcard::from_bytes(&body).map_err(|e| {
            StoreError::Corrupt(format!(
                "record {} does not decode ({e}): the backup is damaged",
                self.records + 1
            ))
        })?;
        if let Record::End { records, sha256 } = &r {
            let digest: [u8; 32] = self.hash.clone().finalize().into();
            if *records != self.records || *sha256 != digest {
                return Err(StoreError::Corrupt(format!(
                    "the backup's end mark does not match its content ({} records read, {records} written; digest {}): it was altered or damaged",
                    self.records,
                    if *sha256 == digest { "matches" } else { "differs" }
                )));
            }
        } else {
            self.hash.update(len);
            self.hash.update(&body);
            self.records += 1;
        }
        Ok(r)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RedbStore {
    /// Writes a consistent backup of the store to `out` while the store keeps serving.
    pub fn backup(&self, out: &mut impl Write) -> Result<BackupSummary, StoreError> {
        let db = self.db_handle()?;
        // The snapshot, and the input files of the batches unfinished in it, opened while
        // no commit may delete an input file: a batch that ends meanwhile keeps its file
        // readable through the open handle.
        let (txn, inputs) = {
            let _held = self.hold_deletions()?;
            let txn = db.begin_read().map_err(io)?;
            let mut inputs = Vec::new();
            let t = txn.open_table(BATCHES).map_err(io)?;
            for e in t.iter().map_err(io)? {
                let (k, v) = e.map_err(io)?;
                let id = k.value();
                let live =
                    decode::<BatchRecord>(v.value(), "batch record").is_ok_and(|r| !r.life.status().is_terminal());
                if !live {
                    continue;
                }
                match std::fs::File::open(input_path(self.dir(), id)) {
                    Ok(f) => inputs.push((id, f)),
                    // Left out, as the server leaves it out: `verify` reports it.
                    Err(e) => {
                        eprintln!("tokenfab-store: backup: the input of batch {id} cannot be opened ({e}); left out")
                    }
                }
            }
            let mut uploads = Vec::new();
            for e in txn.open_table(FILES).map_err(io)?.iter().map_err(io)? {
                let (k, v) = e.map_err(io)?;
                let id = k.value();
                match std::fs::File::open(file_path(self.dir(), id)) {
                    Ok(f) => uploads.push((id, v.value().to_vec(), f)),
                    Err(e) => eprintln!("tokenfab-store: backup: file {id} cannot be opened ({e}); left out"),
                }
            }
            (txn, (inputs, uploads))
        };
        let (inputs, uploads) = inputs;
        let mut w = Writer {
            out,
            hash: Sha256::new(),
            summary: BackupSummary::default(),
        };
        w.put(&Record::Header {
            format: FORMAT,
            schema: SCHEMA_VERSION,
            created_unix_ms: unix_ms(),
        })?;
        {
            let t = txn.open_table(BATCHES).map_err(io)?;
            for e in t.iter().map_err(io)? {
                let (k, v) = e.map_err(io)?;
                let id = k.value();
                w.summary.batches += 1;
                w.put(&Record::Batch {
                    id,
                    value: v.value().to_vec(),
                })?;
            }
        }
        for (table, kind) in [(REQUESTS, 0u8), (LINE_ERRORS, 1), (RESULTS, 2)] {
            let t = txn.open_table(table).map_err(io)?;
            for e in t.iter().map_err(io)? {
                let (k, v) = e.map_err(io)?;
                let (batch, n) = k.value();
                let value = v.value().to_vec();
                let r = match kind {
                    0 => {
                        w.summary.requests += 1;
                        Record::Request { batch, index: n, value }
                    }
                    1 => Record::LineError { batch, line: n, value },
                    _ => {
                        w.summary.results += 1;
                        Record::Result { batch, index: n, value }
                    }
                };
                w.put(&r)?;
            }
        }
        for (table, history) in [(TENANT_IDLE, false), (TENANT_HISTORY, true)] {
            let t = txn.open_table(table).map_err(io)?;
            for e in t.iter().map_err(io)? {
                let (k, v) = e.map_err(io)?;
                let (tenant, at) = k.value();
                let (tenant, value) = (tenant.to_string(), v.value().to_vec());
                w.put(&if history {
                    Record::TenantHistory { tenant, day: at, value }
                } else {
                    Record::TenantIdle {
                        tenant,
                        hour: at,
                        value,
                    }
                })?;
            }
        }
        // With the replicated log position (a replica's store), so that a replica that
        // installs this backup as a snapshot knows which log entries it holds.
        for key in [NEXT_BATCH, NEXT_FILE, APPLIED] {
            if let Some(next) = txn.open_table(META).map_err(io)?.get(key).map_err(io)? {
                w.put(&Record::Meta {
                    key: key.into(),
                    value: next.value(),
                })?;
            }
        }
        // The database is not needed any more: a reopen after a failed commit need not
        // wait for the inputs to stream.
        drop(txn);
        drop(db);
        let mut buf = vec![0u8; INPUT_PIECE];
        for (batch, f) in inputs {
            let mut offset = 0u64;
            loop {
                let n = f
                    .read_at(&mut buf, offset)
                    .map_err(|e| io(format!("reading the input of batch {batch}: {e}")))?;
                if n == 0 {
                    break;
                }
                w.put(&Record::Input {
                    batch,
                    offset,
                    data: buf[..n].to_vec(),
                })?;
                offset += n as u64;
                w.summary.input_bytes += n as u64;
            }
        }
        for (id, value, f) in uploads {
            w.put(&Record::File { id, value })?;
            let mut offset = 0u64;
            loop {
                let n = f
                    .read_at(&mut buf, offset)
                    .map_err(|e| io(format!("reading file {id}: {e}")))?;
                if n == 0 {
                    break;
                }
                w.put(&Record::FileData {
                    id,
                    offset,
                    data: buf[..n].to_vec(),
                })?;
                offset += n as u64;
            }
        }
        let digest: [u8; 32] = w.hash.clone().finalize().into();
        let records = w.summary.records;
        w.put(&Record::End {
            records,
            sha256: digest,
        })?;
        w.out.flush().map_err(io)?;
        Ok(w.summary)
    }
}

/// Reads a whole backup and checks its end mark (record count and digest), writing
/// nothing.
pub fn check(backup: impl Read) -> Result<BackupSummary, StoreError> {
    let mut r = Reader {
        input: std::io::BufReader::with_capacity(1 << 20, backup),
        hash: Sha256::new(),
        records: 0,
    };
    let mut s = BackupSummary::default();
    if !matches!(r.next()?, Record::Header { .. }) {
        return Err(StoreError::Corrupt("this is not a tokenfab backup (no header)".into()));
    }
    loop {
        match r.next()? {
            Record::Batch { .. } => s.batches += 1,
            Record::Request { .. } => s.requests += 1,
            Record::Result { .. } => s.results += 1,
            Record::Input { data, .. } => s.input_bytes += data.len() as u64,
            Record::End { records, .. } => {
                s.records = records;
                return Ok(s);
            }
            _ => {}
        }
    }
}

/// Writes a new data directory `dir` from a backup. `dir` must not hold a store.
///
/// The replicated log position a replica's backup carries is left out: the restored store
/// starts a new history (one node, or the first replica of a new group), whose log starts
/// at its beginning. [`restore_replica`] keeps it.
pub fn restore(backup: impl Read, dir: &Path) -> Result<BackupSummary, StoreError> {
    restore_keeping(backup, dir, false)
}

/// As [`restore`], keeping the replicated log position: a replica installing a snapshot
/// of its leader's store goes on from the leader's log after that position.
pub fn restore_replica(backup: impl Read, dir: &Path) -> Result<BackupSummary, StoreError> {
    restore_keeping(backup, dir, true)
}

fn restore_keeping(backup: impl Read, dir: &Path, log_position: bool) -> Result<BackupSummary, StoreError> {
    if dir.join("tokenfab.redb").exists() {
        return Err(StoreError::Open {
            path: dir.display().to_string(),
            cause: "it already holds a store; restore into an empty directory (nothing is overwritten)".into(),
        });
    }
    let result = restore_into(backup, dir, log_position);
    if result.is_err() {
        // Nothing half-restored is left to be mistaken for a store.
        let _ = std::fs::remove_file(dir.join("tokenfab.redb"));
        let _ = std::fs::remove_dir_all(dir.join("inputs"));
    }
    result
}

fn restore_into(backup: impl Read, dir: &Path, log_position: bool) -> Result<BackupSummary, StoreError> {
    let mut r = Reader {
        input: std::io::BufReader::with_capacity(1 << 20, backup),
        hash: Sha256::new(),
        records: 0,
    };
    match r.next()? {
        Record::Header { format, schema, .. } if format == FORMAT && schema == SCHEMA_VERSION => {}
        Record::Header { format, schema, .. } => {
            return Err(StoreError::Corrupt(format!(
                "the backup is format {format} of store schema {schema}; this tokenfab restores format {FORMAT}, schema {SCHEMA_VERSION}: use the release that wrote it"
            )));
        }
        _ => return Err(StoreError::Corrupt("this is not a tokenfab backup (no header)".into())),
    }
    drop(RedbStore::open(dir)?);
    let db = Database::create(dir.join("tokenfab.redb")).map_err(io)?;
    let mut summary = BackupSummary::default();
    let mut files: BTreeMap<u64, std::fs::File> = BTreeMap::new();
    let mut contents: BTreeMap<u64, std::fs::File> = BTreeMap::new();
    let mut txn = db.begin_write().map_err(io)?;
    txn.set_durability(Durability::Immediate).map_err(io)?;
    {
        let mut batches = txn.open_table(BATCHES).map_err(io)?;
        let mut requests = txn.open_table(REQUESTS).map_err(io)?;
        let mut line_errors = txn.open_table(LINE_ERRORS).map_err(io)?;
        let mut results = txn.open_table(RESULTS).map_err(io)?;
        let mut idle = txn.open_table(TENANT_IDLE).map_err(io)?;
        let mut history = txn.open_table(TENANT_HISTORY).map_err(io)?;
        let mut meta = txn.open_table(META).map_err(io)?;
        let mut files_t = txn.open_table(FILES).map_err(io)?;
        loop {
            match r.next()? {
                Record::File { id, value } => {
                    files_t.insert(id, value.as_slice()).map_err(io)?;
                    contents.insert(id, std::fs::File::create(file_path(dir, id)).map_err(io)?);
                }
                Record::FileData { id, offset, data } => {
                    let f = contents
                        .get(&id)
                        .ok_or_else(|| StoreError::Corrupt(format!("content of file {id} before its record")))?;
                    f.write_all_at(&data, offset).map_err(io)?;
                }
                Record::Meta { key, value } => {
                    if key != "schema" && (log_position || key != APPLIED) {
                        meta.insert(key.as_str(), value).map_err(io)?;
                    }
                }
                Record::Header { .. } => return Err(StoreError::Corrupt("a second header inside the backup".into())),
                Record::Batch { id, value } => {
                    summary.batches += 1;
                    batches.insert(id, value.as_slice()).map_err(io)?;
                }
                Record::Request { batch, index, value } => {
                    summary.requests += 1;
                    requests.insert((batch, index), value.as_slice()).map_err(io)?;
                }
                Record::LineError { batch, line, value } => {
                    line_errors.insert((batch, line), value.as_slice()).map_err(io)?;
                }
                Record::Result { batch, index, value } => {
                    summary.results += 1;
                    results.insert((batch, index), value.as_slice()).map_err(io)?;
                }
                Record::TenantIdle { tenant, hour, value } => {
                    idle.insert((tenant.as_str(), hour), value.as_slice()).map_err(io)?;
                }
                Record::TenantHistory { tenant, day, value } => {
                    history.insert((tenant.as_str(), day), value.as_slice()).map_err(io)?;
                }
                Record::Input { batch, offset, data } => {
                    let file = match files.entry(batch) {
                        std::collections::btree_map::Entry::Occupied(f) => f.into_mut(),
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert(std::fs::File::create(input_path(dir, batch)).map_err(io)?)
                        }
                    };
                    file.write_all_at(&data, offset).map_err(io)?;
                    summary.input_bytes += data.len() as u64;
                }
                Record::End { records, .. } => {
                    summary.records = records;
                    break;
                }
            }
        }
    }
    for f in files.values().chain(contents.values()) {
        f.sync_all().map_err(io)?;
    }
    std::fs::File::open(dir.join("inputs"))
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    // Only a whole, checked backup commits.
    txn.commit().map_err(io)?;
    Ok(summary)
}

/// One thing `verify` found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: a table and key, or a file.
    pub at: String,
    pub what: String,
}

/// What `verify` read and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records read per table.
    pub read: BTreeMap<&'static str, u64>,
    pub problems: Vec<Problem>,
    /// With salvage: records written to the new store per table, and requests ended as
    /// `input_lost`.
    pub salvaged: BTreeMap<&'static str, u64>,
    pub inputs_lost: u64,
}

impl VerifyReport {
    fn problem(&mut self, at: String, what: impl Into<String>) {
        self.problems.push(Problem { at, what: what.into() });
    }
}

/// Checks a data directory offline (its control plane stopped): every record must decode
/// and fit with the others, and every unfinished batch's input file must hold its
/// requests' bodies. With `salvage`, writes a new store there from what can be read.
pub fn verify(dir: &Path, salvage: Option<&Path>) -> Result<VerifyReport, StoreError> {
    let path = dir.join("tokenfab.redb");
    if !path.exists() {
        return Err(StoreError::Open {
            path: dir.display().to_string(),
            cause: "no tokenfab.redb in it: is this a data directory?".into(),
        });
    }
    // Opened for writing: after an unclean stop (kill -9, power loss) redb first repairs
    // its file, as the control plane's own start would.
    let db = Database::open(&path).map_err(|e| StoreError::Open {
        path: dir.display().to_string(),
        cause: match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                "a control plane is using it: stop it first (or take an online backup with tokenfab admin backup)"
                    .into()
            }
            other => format!("{other}; the database file is damaged beyond what can be read: restore a backup"),
        },
    })?;
    let txn = db.begin_read().map_err(io)?;
    let mut report = VerifyReport::default();
    let schema = txn
        .open_table(META)
        .map_err(io)?
        .get("schema")
        .map_err(io)?
        .map(|v| v.value());
    if schema != Some(SCHEMA_VERSION) {
        return Err(StoreError::Corrupt(format!(
            "schema version {schema:?}; this tokenfab verifies version {SCHEMA_VERSION} (open it with the server once to upgrade it)"
        )));
    }

    // Batches.
    let mut batches: BTreeMap<u64, BatchRecord> = BTreeMap::new();
    let t = txn.open_table(BATCHES).map_err(io)?;
    for e in t.iter().map_err(io)? {
        let Ok((k, v)) = e else {
            report.problem("batches".into(), "the table cannot be read to its end");
            break;
        };
        *report.read.entry("batches").or_default() += 1;
        match decode::<BatchRecord>(v.value(), "batch record") {
            Ok(rec) => {
                batches.insert(k.value(), rec);
            }
            Err(e) => report.problem(format!("batches/{}", k.value()), e.to_string()),
        }
    }
    // Requests, line errors, results.
    let mut requests: BTreeMap<(u64, u32), ParsedRequest> = BTreeMap::new();
    let mut bad_requests: BTreeSet<(u64, u32)> = BTreeSet::new();
    let mut line_errors: BTreeMap<(u64, u32), LineError> = BTreeMap::new();
    let mut results: BTreeMap<(u64, u32), StoredResult> = BTreeMap::new();
    for (table, name) in [
        (REQUESTS, "requests"),
        (LINE_ERRORS, "line_errors"),
        (RESULTS, "results"),
    ] {
        let t = txn.open_table(table).map_err(io)?;
        for e in t.iter().map_err(io)? {
            let Ok((k, v)) = e else {
                report.problem(name.into(), "the table cannot be read to its end");
                break;
            };
            *report.read.entry(name).or_default() += 1;
            let key = k.value();
            let at = format!("{name}/{}/{}", key.0, key.1);
            if !batches.contains_key(&key.0) {
                report.problem(at.clone(), "its batch is missing or unreadable");
                continue;
            }
            match name {
                "requests" => match decode::<ParsedRequest>(v.value(), "request") {
                    Ok(r) => {
                        requests.insert(key, r);
                    }
                    Err(e) => {
                        bad_requests.insert(key);
                        report.problem(at, e.to_string());
                    }
                },
                "line_errors" => match decode::<LineError>(v.value(), "line error") {
                    Ok(r) => {
                        line_errors.insert(key, r);
                    }
                    Err(e) => report.problem(at, e.to_string()),
                },
                _ => match decode::<StoredResult>(v.value(), "result") {
                    Ok(r) => {
                        results.insert(key, r);
                    }
                    Err(e) => report.problem(at, e.to_string()),
                },
            }
        }
    }
    let next_batch = txn
        .open_table(META)
        .map_err(io)?
        .get(NEXT_BATCH)
        .map_err(io)?
        .map(|v| v.value());
    let mut idle: Vec<(String, u64, (f64, f64))> = Vec::new();
    let mut history: Vec<(String, u64, UsageHistory)> = Vec::new();
    for (table, name) in [(TENANT_IDLE, "tenant_idle"), (TENANT_HISTORY, "tenant_history")] {
        let t = txn.open_table(table).map_err(io)?;
        for e in t.iter().map_err(io)? {
            let Ok((k, v)) = e else {
                report.problem(name.into(), "the table cannot be read to its end");
                break;
            };
            *report.read.entry(name).or_default() += 1;
            let (tenant, at) = k.value();
            let key = format!("{name}/{tenant}/{at}");
            if name == "tenant_idle" {
                match decode::<(f64, f64)>(v.value(), "idle charge") {
                    Ok(x) => idle.push((tenant.to_string(), at, x)),
                    Err(e) => report.problem(key, e.to_string()),
                }
            } else {
                match decode::<UsageHistory>(v.value(), "usage history") {
                    Ok(x) => history.push((tenant.to_string(), at, x)),
                    Err(e) => report.problem(key, e.to_string()),
                }
            }
        }
    }
    // Uploaded files: a readable record and all of their content.
    let mut uploads: Vec<tokenfab_core::durable::FileMeta> = Vec::new();
    for e in txn.open_table(FILES).map_err(io)?.iter().map_err(io)? {
        let Ok((k, v)) = e else {
            report.problem("files".into(), "the table cannot be read to its end");
            break;
        };
        *report.read.entry("files").or_default() += 1;
        let id = k.value();
        match decode::<tokenfab_core::durable::FileMeta>(v.value(), "file") {
            Ok(f) => match std::fs::metadata(file_path(dir, id)) {
                Ok(m) if m.len() == f.bytes => uploads.push(f),
                Ok(m) => report.problem(
                    format!("files/{id}"),
                    format!(
                        "holds {} bytes, its record says {}: it is cut short or altered",
                        m.len(),
                        f.bytes
                    ),
                ),
                Err(_) => report.problem(format!("files/{id}"), "the content of this uploaded file is missing"),
            },
            Err(e) => report.problem(format!("files/{id}"), e.to_string()),
        }
    }
    let next_file = txn
        .open_table(META)
        .map_err(io)?
        .get(NEXT_FILE)
        .map_err(io)?
        .map(|v| v.value());
    // Each unfinished batch: every request present, its body in the input file.
    let mut lost: BTreeSet<(u64, u32)> = BTreeSet::new();
    for (&id, rec) in &batches {
        if rec.life.status().is_terminal() {
            continue;
        }
        let file = std::fs::File::open(input_path(dir, id));
        let len = file.as_ref().ok().and_then(|f| f.metadata().ok()).map(|m| m.len());
        if len.is_none() {
            report.problem(
                format!("inputs/{id}.jsonl"),
                "the input file of this unfinished batch is missing",
            );
        }
        for index in 0..rec.meta.requests {
            let key = (id, index);
            if results.contains_key(&key) {
                continue;
            }
            let ok = match (requests.get(&key), &file, len) {
                (Some(r), Ok(f), Some(len)) => {
                    let end = r.body_offset + u64::from(r.body_len);
                    let mut edge = [0u8; 1];
                    end <= len
                        && r.body_len > 0
                        && f.read_exact_at(&mut edge, r.body_offset).is_ok()
                        && edge[0] == b'{'
                        && f.read_exact_at(&mut edge, end - 1).is_ok()
                        && edge[0] == b'}'
                }
                _ => false,
            };
            if !ok {
                if requests.contains_key(&key) && len.is_some() {
                    report.problem(
                        format!("inputs/{id}.jsonl"),
                        format!("the body of request {index} is not where its record says (the file is truncated or altered)"),
                    );
                } else if !requests.contains_key(&key) && !bad_requests.contains(&key) {
                    report.problem(format!("requests/{id}/{index}"), "missing");
                }
                lost.insert(key);
            }
        }
    }
    let orphans: Vec<String> = std::fs::read_dir(dir.join("inputs"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| {
                    n.strip_suffix(".jsonl")
                        .and_then(|n| n.parse::<u64>().ok())
                        .is_none_or(|id| batches.get(&id).is_none_or(|b| b.life.status().is_terminal()))
                })
                .collect()
        })
        .unwrap_or_default();
    for o in orphans {
        report.problem(
            format!("inputs/{o}"),
            "no unfinished batch owns it (it is removed when the server starts)",
        );
    }

    let Some(out) = salvage else {
        return Ok(report);
    };
    if out.join("tokenfab.redb").exists() {
        return Err(StoreError::Open {
            path: out.display().to_string(),
            cause: "it already holds a store; salvage into an empty directory".into(),
        });
    }
    drop(RedbStore::open(out)?);
    let new = Database::create(out.join("tokenfab.redb")).map_err(io)?;
    let mut w = new.begin_write().map_err(io)?;
    w.set_durability(Durability::Immediate).map_err(io)?;
    {
        let mut t_batches = w.open_table(BATCHES).map_err(io)?;
        let mut t_requests = w.open_table(REQUESTS).map_err(io)?;
        let mut t_errors = w.open_table(LINE_ERRORS).map_err(io)?;
        let mut t_results = w.open_table(RESULTS).map_err(io)?;
        let mut t_idle = w.open_table(TENANT_IDLE).map_err(io)?;
        let mut t_history = w.open_table(TENANT_HISTORY).map_err(io)?;
        // Ids are never given out again: the salvaged store starts past every id seen.
        let seen = batches.keys().next_back().map_or(0, |id| id + 1);
        w.open_table(META)
            .map_err(io)?
            .insert(NEXT_BATCH, next_batch.unwrap_or(0).max(seen))
            .map_err(io)?;
        let seen_file = uploads.iter().map(|f| f.id.0 + 1).max().unwrap_or(0);
        w.open_table(META)
            .map_err(io)?
            .insert(NEXT_FILE, next_file.unwrap_or(0).max(seen_file))
            .map_err(io)?;
        let mut t_files = w.open_table(FILES).map_err(io)?;
        for f in &uploads {
            if std::fs::copy(file_path(dir, f.id.0), file_path(out, f.id.0)).is_ok() {
                t_files.insert(f.id.0, encode(f)?.as_slice()).map_err(io)?;
                *report.salvaged.entry("files").or_default() += 1;
            }
        }
        let mut count = |t: &'static str| *report.salvaged.entry(t).or_default() += 1;
        for (&id, rec) in &batches {
            t_batches.insert(id, encode(rec)?.as_slice()).map_err(io)?;
            count("batches");
            for index in 0..rec.meta.requests {
                let key = (id, index);
                let request = requests.get(&key).cloned().unwrap_or_else(|| ParsedRequest {
                    line: 0,
                    custom_id: format!("unreadable-request-{index}"),
                    body_offset: 0,
                    body_len: 0,
                    prompt_tokens_estimate: 0,
                    max_tokens: None,
                });
                if requests.contains_key(&key) || bad_requests.contains(&key) || lost.contains(&key) {
                    t_requests.insert(key, encode(&request)?.as_slice()).map_err(io)?;
                    count("requests");
                }
                if lost.contains(&key) && !rec.life.status().is_terminal() {
                    let ended = StoredResult {
                        outcome: Outcome::Error {
                            code: "input_lost".into(),
                            message: "the request's input could not be read back from a damaged store (tokenfab admin verify --salvage); submit it again".into(),
                        },
                        usage: Usage::default(),
                    };
                    t_results.insert(key, encode(&ended)?.as_slice()).map_err(io)?;
                    report.inputs_lost += 1;
                } else if let Some(r) = results.get(&key) {
                    t_results.insert(key, encode(r)?.as_slice()).map_err(io)?;
                    count("results");
                }
            }
            if !rec.life.status().is_terminal()
                && let Ok(_) = std::fs::copy(input_path(dir, id), input_path(out, id))
            {
                count("inputs");
            }
        }
        for (key, e) in &line_errors {
            t_errors.insert(*key, encode(e)?.as_slice()).map_err(io)?;
            count("line_errors");
        }
        for (tenant, hour, x) in &idle {
            t_idle
                .insert((tenant.as_str(), *hour), encode(x)?.as_slice())
                .map_err(io)?;
            count("tenant_idle");
        }
        for (tenant, day, h) in &history {
            t_history
                .insert((tenant.as_str(), *day), encode(h)?.as_slice())
                .map_err(io)?;
            count("tenant_history");
        }
    }
    w.commit().map_err(io)?;
    Ok(report)
}

/// Compacts the store offline (its control plane stopped): space freed by deleted
/// batches and results is given back to the filesystem. Returns the file size before and
/// after, bytes.
pub fn compact(dir: &Path) -> Result<(u64, u64), StoreError> {
    let path = dir.join("tokenfab.redb");
    let size = || std::fs::metadata(&path).map(|m| m.len()).map_err(io);
    let before = size()?;
    let mut db = Database::open(&path).map_err(|e| StoreError::Open {
        path: dir.display().to_string(),
        cause: match e {
            redb::DatabaseError::DatabaseAlreadyOpen => "a control plane is using it: stop it first".into(),
            other => other.to_string(),
        },
    })?;
    while db.compact().map_err(io)? {}
    drop(db);
    Ok((before, size()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BatchInputs, Cursor, ResultKind, Store, WriteSet};
    use std::time::Duration;
    use tokenfab_core::batch_input::{InputLimits, parse_batch_input};
    use tokenfab_core::control::{
        Action, ControlConfig, ControlCore, NewBatch, NodeRegistration, ReportedOutcome, ReportedResult,
    };
    use tokenfab_core::protocol::{ControlInput, ControlReply};
    use tokenfab_core::{BatchId, ModelId, NodeId, RequestRef, SuperNodeId, TenantId, Timestamp};

    fn line(id: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"q {id}"}}],"max_tokens":8}}}}"#
        )
    }

    /// A store with a finished batch (3 results, 1 invalid line) and an unfinished one
    /// (4 requests, 1 result).
    async fn populated(dir: &Path) -> (RedbStore, BatchId, BatchId) {
        let store = RedbStore::open(dir).unwrap();
        let mut core = ControlCore::new(ControlConfig::default());
        let t0 = Timestamp::from_millis(1_700_000_000_000);
        let model = ModelId::from("llama-3.1-8b");
        let mut ids = Vec::new();
        for (n, bad) in [(3, true), (4, false)] {
            let mut text: Vec<String> = (0..n).map(|i| line(&format!("b{}-{i}", ids.len()))).collect();
            if bad {
                text.insert(1, "not json".into());
            }
            let text = text.join("\n");
            let parsed = parse_batch_input(text.as_bytes(), &model, &InputLimits::default(), false).unwrap();
            let staged = store.stage().unwrap();
            std::fs::write(staged.path(), &text).unwrap();
            let ControlReply::Submitted(submitted) = core.handle(
                t0,
                ControlInput::Submit(NewBatch {
                    completion_window: Some(Duration::from_secs(3600)),
                    ..NewBatch::from_parsed(TenantId::from("acme"), model.clone(), &parsed)
                }),
            ) else {
                unreachable!("a submission is answered as one")
            };
            let mut set = WriteSet::default();
            set.inputs.push(BatchInputs {
                batch: submitted.peek().as_ref().unwrap().meta.id,
                file: staged,
                requests: parsed.requests.into(),
                line_errors: parsed.line_errors,
            });
            while let Some(a) = core.poll_action() {
                if let Action::Persist(op) = a {
                    set.ops.push(op);
                }
            }
            store.apply(set).await.unwrap();
            let view = submitted.release(core.advance(core.handled())).expect("committed");
            ids.push(view.unwrap().meta.id);
        }
        let node = NodeId::from("n");
        core.register(
            t0,
            NodeRegistration {
                node: node.clone(),
                super_node: SuperNodeId::from("s"),
                devices: vec![],
                replicas: vec![],
                usd_per_device_hour: None,
            },
        );
        let g = core.lease(t0, &node, &model, 4).unwrap().unwrap();
        let results = g
            .items
            .iter()
            .map(|i| ReportedResult {
                unit: g.unit,
                req: i.req,
                outcome: ReportedOutcome::Final(Outcome::Response {
                    status_code: 200,
                    body: format!("{{\"answer\":\"{}\"}}", i.req.index).into_bytes(),
                    request_id: "r".into(),
                }),
                usage: Usage::default(),
                latency: Duration::ZERO,
            })
            .collect();
        let ControlReply::Reported(_) = core.handle(t0, ControlInput::Report { node, results }) else {
            unreachable!("a report is answered as one")
        };
        let mut set = WriteSet::default();
        while let Some(a) = core.poll_action() {
            if let Action::Persist(op) = a {
                set.ops.push(op);
            }
        }
        store.apply(set).await.unwrap();
        // An uploaded file too.
        let staged = store.stage().unwrap();
        std::fs::write(staged.path(), "uploaded content\n").unwrap();
        let ControlReply::FileAdded(added) = core.handle(
            t0,
            ControlInput::AddFile {
                tenant: TenantId::from("acme"),
                filename: "up.jsonl".into(),
                bytes: 17,
                purpose: "batch".into(),
            },
        ) else {
            unreachable!("an upload is answered as one")
        };
        let mut set = WriteSet::default();
        set.files.push((added.peek().as_ref().unwrap().id, staged));
        while let Some(a) = core.poll_action() {
            if let Action::Persist(op) = a {
                set.ops.push(op);
            }
        }
        store.apply(set).await.unwrap();
        (store, ids[0], ids[1])
    }

    async fn outputs(store: &RedbStore, id: BatchId) -> Vec<(u32, String)> {
        let page = store
            .results(id, ResultKind::Output, Cursor::default(), 100)
            .await
            .unwrap();
        page.rows.into_iter().map(|r| (r.line, r.custom_id)).collect()
    }

    #[tokio::test]
    async fn a_backup_restores_to_the_same_state_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, done, live) = populated(&dir.path().join("a")).await;
        let mut bytes = Vec::new();
        let s = store.backup(&mut bytes).unwrap();
        assert_eq!((s.batches, s.requests, s.results), (2, 7, 4));
        assert!(s.input_bytes > 0, "the unfinished batch's input is carried");

        let restored_dir = dir.path().join("b");
        let r = restore(bytes.as_slice(), &restored_dir).unwrap();
        assert_eq!((r.batches, r.requests, r.results), (2, 7, 4));
        let restored = RedbStore::open(&restored_dir).unwrap();
        assert_eq!(restored.load().await.unwrap(), store.load().await.unwrap());
        assert_eq!(outputs(&restored, done).await, outputs(&store, done).await);
        let refs: Vec<RequestRef> = (0..4).map(|index| RequestRef { batch: live, index }).collect();
        assert_eq!(
            restored.bodies(refs.clone()).await.unwrap(),
            store.bodies(refs).await.unwrap()
        );
        let errors = restored
            .results(done, ResultKind::Errors, Cursor::default(), 10)
            .await
            .unwrap();
        assert_eq!(errors.rows.len(), 1, "the invalid line is restored");
        let up = restored
            .file_path(tokenfab_core::FileId(1))
            .expect("the uploaded file is restored");
        assert_eq!(std::fs::read_to_string(up).unwrap(), "uploaded content\n");

        // Restoring over a store is refused; a truncated or altered backup is refused and
        // leaves nothing behind.
        let e = restore(bytes.as_slice(), &restored_dir).unwrap_err();
        assert!(e.to_string().contains("already holds a store"), "{e}");
        let cut = dir.path().join("c");
        let e = restore(&bytes[..bytes.len() - 10], &cut).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(!cut.join("tokenfab.redb").exists());
        let mut altered = bytes.clone();
        let at = altered.len() / 2;
        altered[at] ^= 0x55;
        let e = restore(altered.as_slice(), &dir.path().join("d")).unwrap_err();
        assert!(
            e.to_string().contains("damaged") || e.to_string().contains("altered"),
            "{e}"
        );
        assert_eq!(check(bytes.as_slice()).unwrap().records, s.records);
    }

    #[tokio::test]
    async fn a_replicas_log_position_is_kept_only_by_a_replica_restore() {
        let dir = tempfile::tempdir().unwrap();
        let (replica, _, _) = populated(&dir.path().join("r")).await;
        // As a replica records it: the log entry its store has applied.
        replica.apply_replicated(WriteSet::default(), 5_000, true).unwrap();
        let mut bytes = Vec::new();
        replica.backup(&mut bytes).unwrap();
        // A restore starts a new history: a new group's log begins at 1, so the old
        // position must not make its replicas skip entries.
        let fresh = dir.path().join("fresh");
        restore(bytes.as_slice(), &fresh).unwrap();
        assert_eq!(RedbStore::open(&fresh).unwrap().applied().unwrap(), 0);
        // A snapshot installed by a replica goes on from the leader's log after it.
        let snap = dir.path().join("snap");
        restore_replica(bytes.as_slice(), &snap).unwrap();
        assert_eq!(RedbStore::open(&snap).unwrap().applied().unwrap(), 5_000);
    }

    #[tokio::test]
    async fn verify_reports_damage_and_salvage_keeps_everything_readable() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (store, done, live) = populated(&data).await;
        drop(store);
        let clean = verify(&data, None).unwrap();
        assert!(clean.problems.is_empty(), "{:?}", clean.problems);
        assert_eq!(clean.read["results"], 4);

        // Damage: one result of the finished batch, one request of the unfinished one,
        // and the unfinished batch's input cut short before its last request's body.
        {
            let db = Database::create(data.join("tokenfab.redb")).unwrap();
            let w = db.begin_write().unwrap();
            {
                let mut results = w.open_table(RESULTS).unwrap();
                results.insert((done.0, 1), b"\xff\xff\xff garbage".as_slice()).unwrap();
                let mut requests = w.open_table(REQUESTS).unwrap();
                requests.insert((live.0, 1), b"\xff".as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        let input = input_path(&data, live.0);
        let len = std::fs::metadata(&input).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&input).unwrap();
        f.set_len(len - 40).unwrap();
        drop(f);

        // The server still starts: it leaves the unreadable out and says so.
        let store = RedbStore::open(&data).unwrap();
        // A lease of the cut-off request gets no body (it ends as input_lost); the others
        // of the same batch still read.
        let bodies = store
            .bodies(vec![
                RequestRef { batch: live, index: 2 },
                RequestRef { batch: live, index: 3 },
            ])
            .await
            .unwrap();
        assert!(bodies[0].is_some() && bodies[1].is_none(), "{bodies:?}");
        let loaded = store.load().await.unwrap();
        assert_eq!(
            loaded.batches.len(),
            1,
            "the finished batch loads; the damaged live one is left out"
        );
        assert_eq!(loaded.problems.len(), 1, "{:?}", loaded.problems);
        assert!(
            loaded.problems[0].contains("run tokenfab admin verify --salvage"),
            "{:?}",
            loaded.problems
        );
        drop(store);

        let out = dir.path().join("salvaged");
        let r = verify(&data, Some(&out)).unwrap();
        let at: Vec<&str> = r.problems.iter().map(|p| p.at.as_str()).collect();
        assert!(at.contains(&format!("results/{}/1", done.0).as_str()), "{at:?}");
        assert!(at.contains(&format!("requests/{}/1", live.0).as_str()), "{at:?}");
        assert!(
            r.problems
                .iter()
                .any(|p| p.what.contains("the file is truncated or altered")),
            "{:?}",
            r.problems
        );
        assert_eq!(r.inputs_lost, 2, "the unreadable request and the cut-off one");
        let salvaged = RedbStore::open(&out).unwrap();
        let loaded = salvaged.load().await.unwrap();
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        assert_eq!(loaded.batches.len(), 2);
        let live_batch = &loaded.batches[1].batch;
        assert_eq!(live_batch.requests.len(), 4);
        assert_eq!(
            live_batch.results.len(),
            3,
            "one recorded result and two input_lost ends"
        );
        // The finished batch keeps its two readable results.
        assert_eq!(outputs(&salvaged, done).await.len(), 2);
        // The salvaged store verifies clean.
        drop(salvaged);
        assert!(verify(&out, None).unwrap().problems.is_empty());
    }
}
