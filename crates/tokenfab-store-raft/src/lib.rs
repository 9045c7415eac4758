//! # tokenfab-store-raft: the control plane's commits replicated by Raft among its replicas
//!
//! Three (or five) control-plane replicas form one Raft group (tikv's `raft` crate) over
//! their own gRPC peer port ([`transport`]). Every commit of the leader ([`Store::apply`])
//! becomes log entries; once a majority holds them durably, every replica applies them to
//! its own embedded store ([`RedbStore`]), which serves every read. Only the leader
//! serves: [`RaftStore::open`] returns once this replica leads and has applied every
//! entry committed before its term, so the control core it starts sees everything any
//! earlier leader acknowledged. A replica that stops leading ([`RaftStore::deposed`])
//! must stop serving; `tokenfab server` then exits and its supervisor restarts it as a
//! follower.
//!
//! **The log.** One commit is one or more entries: its files (batch inputs, uploaded
//! files), and the commit itself when large, go first as `Part` entries of at most
//! `part_bytes` each (LZ4-compressed), then one `Commit` entry that describes the commit
//! and refers to its parts. A leader proposes one commit's entries together and one
//! commit at a time, so a commit's parts lie between the commit before it and itself.
//! Parts whose commit never came (their leader died) are dropped when the next commit's
//! parts or its `Commit` entry arrive.
//!
//! **Durability.** The Raft log and hard state are in `raft.redb` beside the embedded
//! store; each batch of new entries is written with one fsync before this replica
//! acknowledges them to the leader. The embedded store fsyncs every
//! [`FSYNC_EVERY`] commits (its applied position is kept with its data): after a crash
//! the replica applies again, from the log, what its embedded store had not made durable.
//!
//! **Compaction and snapshots.** Once `compact_every` entries were applied, the replica
//! makes its embedded store durable and drops the log up to its position (less
//! `keep_entries`, kept for followers a little behind). A follower that needs dropped
//! entries is sent a snapshot: a small message naming the leader and the index of the
//! leader's last applied commit; the follower fetches the leader's store as a backup stream
//! (the format of `tokenfab admin backup`, which carries the log position it holds) over
//! the peer port, restores it beside its own, moves it in, and goes on from the log after
//! it.
//!
//! **Peer TLS.** With `tls`, the peer port speaks mutual TLS: each replica presents its
//! certificate and accepts only peers whose certificates the same CA signed.
//!
//! **Members.** `peers` is the group a new data directory starts with. A member is added
//! or removed at run time by the leader ([`change_members`]; one change at a time, Raft's
//! single-server changes): the change and the new member's URL are a log entry, applied by
//! every member to Raft's configuration, its links and `raft.redb`, which from then on
//! holds the members (they win over `peers` at a restart). A member to be added starts
//! first with `peers` naming every member and itself. A removed member stops: when it
//! applies its removal, or when, without a leader, another member lists the members
//! without it.
//!
//! **Reads.** The leader answers only under a lease ([`Store::may_serve`]): until an
//! election timeout less two ticks after a majority last answered it, the earliest another
//! leader could be elected (assuming messages arrive within two ticks and clocks run at
//! nearly the same rate). It also counts itself deposed when a watchdog thread finds the
//! process did not run for an election timeout.
//!
//! **Not yet.** Joint-consensus changes (several members at once), ReadIndex reads.

pub mod transport;

pub use transport::PeerTls;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Message, Snapshot, SnapshotMetadata};
use raft::storage::MemStorage;
use raft::{StateRole, Storage as _};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokenfab_store::replicated::Commit;
use tokenfab_store::{RedbStore, StagedInput, Store, StoreError, WriteSet};
use tokio::sync::{mpsc, oneshot, watch};

/// Who this replica is and who its peers are.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    /// This replica's Raft id (a key of `peers`).
    pub id: u64,
    /// Its name, for logs and `admin members`.
    pub name: String,
    /// Every member's peer URL by Raft id, this replica's own included
    /// (`http://10.0.0.5:7400`).
    pub peers: BTreeMap<u64, String>,
    /// Where this replica's peer port listens (default: the port of its own peer URL on
    /// every address).
    pub listen: SocketAddr,
    /// One Raft tick.
    pub tick: Duration,
    /// Ticks without a leader's heartbeat before a follower campaigns (randomized up to
    /// twice this, as Raft does).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Largest file piece in one log entry, before compression.
    pub part_bytes: usize,
    /// The log is compacted once this many entries were applied since the last compaction
    /// (the embedded store is made durable first): the log on disk and its copy in memory
    /// stay bounded. A follower that needs compacted entries installs a snapshot of the
    /// leader's store instead.
    pub compact_every: u64,
    /// Entries kept behind the compaction point, so that a follower a little behind
    /// catches up from the log rather than by snapshot.
    pub keep_entries: u64,
    /// Mutual TLS on the peer port (every peer URL is then https://).
    pub tls: Option<transport::PeerTls>,
}

impl RaftOptions {
    /// Options for replica `id` of the group `peers`, with the defaults: 50 ms ticks, an
    /// election after 10 to 20 ticks (0.5 to 1 s) of silence, heartbeats every 2 ticks,
    /// 1 MiB parts.
    pub fn new(id: u64, name: &str, peers: BTreeMap<u64, String>) -> Result<Self, StoreError> {
        let bad = |cause: String| StoreError::Open {
            path: "--raft-peers".into(),
            cause,
        };
        let own = peers.get(&id).ok_or_else(|| {
            bad(format!(
                "this replica's id {id} is not among the peers ({}); give every member, this one included, as ID=URL",
                peers.keys().map(u64::to_string).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let port = own
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .ok_or_else(|| bad(format!("peer URL {own:?} has no port (want http://HOST:PORT)")))?;
        Ok(RaftOptions {
            id,
            name: name.to_string(),
            peers,
            listen: SocketAddr::from(([0, 0, 0, 0], port)),
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            part_bytes: 1 << 20,
            compact_every: 10_000,
            keep_entries: 1_000,
            tls: None,
        })
    }

    /// Parses `ID=URL,ID=URL,...` (`1=http://cp-0:7400,2=http://cp-1:7400`).
    pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, String> {
        let mut peers = BTreeMap::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, url) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: want ID=URL, e.g. 1=http://cp-0:7400"))?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|&i| i > 0)
                .ok_or_else(|| format!("{item:?}: the id must be a whole number from 1"))?;
            let url = url.trim();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("{item:?}: the URL must start with http:// or https://"));
            }
            if peers.insert(id, url.to_string()).is_some() {
                return Err(format!("id {id} is given twice"));
            }
        }
        if peers.is_empty() {
            return Err("no peers given; want ID=URL[,ID=URL...]".into());
        }
        Ok(peers)
    }

    /// Peer URLs are https:// with TLS and http:// without: a mix would never connect.
    fn check_urls(&self) -> Result<(), StoreError> {
        let want = if self.tls.is_some() { "https://" } else { "http://" };
        match self.peers.iter().find(|(_, u)| !u.starts_with(want)) {
            None => Ok(()),
            Some((id, url)) => Err(StoreError::Open {
                path: "--raft-peers".into(),
                cause: format!(
                    "peer {id} is {url}, but {}: give every peer as {want}HOST:PORT",
                    if self.tls.is_some() {
                        "the peer port uses mutual TLS (--raft-tls-*)"
                    } else {
                        "the peer port is plain gRPC (give --raft-tls-cert, --raft-tls-key and --raft-tls-ca for TLS)"
                    }
                ),
            }),
        }
    }

    fn election_timeout(&self) -> Duration {
        self.tick * u32::try_from(self.election_ticks).unwrap_or(u32::MAX)
    }
}

/// The embedded store fsyncs every this many commits; the Raft log holds each commit
/// durably already, so this only bounds how much of the log a restart applies again.
pub const FSYNC_EVERY: u64 = 32;

/// What a replica knows of its group, as [`RaftStore::status`] and the peer `Status` call
/// report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStatus {
    pub id: u64,
    pub name: String,
    /// The replica believed to lead (0: none known).
    pub leader: u64,
    pub term: u64,
    pub role: &'static str,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<u64>,
    /// The term in which this replica leads and serves (it applied every entry committed
    /// before its term).
    pub serving: Option<u64>,
    /// Why the replica stopped (its log or store failed, or it was paused).
    pub failed: Option<String>,
    /// Snapshots installed since it started, and the first log index it holds.
    pub snapshots_installed: u64,
    pub first_index: u64,
}

fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

fn io(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("raft: {what}: {e}"))
}

// ----------------------------------------------------------------------------------------
// The log's entries

/// A file of a commit, by its number among the commit's parts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct FileRef {
    file: u32,
    len: u64,
}

/// The file number that holds a commit's own description when it does not fit inline.
const COMMIT_FILE: u32 = u32::MAX;

/// The data of one normal log entry (postcard).
#[derive(Debug, Serialize, Deserialize)]
enum LogEntry {
    /// The next piece of file `file` of commit `nonce`, LZ4-compressed.
    Part { nonce: u64, file: u32, data: Vec<u8> },
    /// Commit `nonce`: its [`Commit`] description, LZ4-compressed, inline or (when larger
    /// than a part) in file [`COMMIT_FILE`] of its parts.
    Commit { nonce: u64, inline: Option<Vec<u8>> },
}

/// Splits `set` into entries: its files' parts, then the commit.
fn encode_commit(set: &WriteSet, nonce: u64, part_bytes: usize) -> Result<Vec<Vec<u8>>, StoreError> {
    let push_parts = |entries: &mut Vec<Vec<u8>>, file: u32, src: &mut dyn Read| -> Result<u64, StoreError> {
        let mut len = 0u64;
        let mut buf = vec![0u8; part_bytes.max(1)];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let got = src
                    .read(&mut buf[filled..])
                    .map_err(|e| io("reading a file to replicate", e))?;
                if got == 0 {
                    break;
                }
                filled += got;
            }
            if filled == 0 {
                return Ok(len);
            }
            len += filled as u64;
            let data = lz4_flex::compress_prepend_size(&buf[..filled]);
            entries.push(postcard::to_allocvec(&LogEntry::Part { nonce, file, data }).map_err(|e| io("encoding", e))?);
            if filled < buf.len() {
                return Ok(len);
            }
        }
    };
    let mut entries = Vec::new();
    let mut file = 0u32;
    let commit = Commit::describe(set, |path| {
        let mut f = std::fs::File::open(path).map_err(|e| io("reading a file to replicate", e))?;
        let len = push_parts(&mut entries, file, &mut f)?;
        file += 1;
        Ok(FileRef { file: file - 1, len })
    })?;
    let bytes = postcard::to_allocvec(&commit).map_err(|e| io("encoding a commit", e))?;
    let bytes = lz4_flex::compress_prepend_size(&bytes);
    let inline = if bytes.len() <= part_bytes {
        Some(bytes)
    } else {
        push_parts(&mut entries, COMMIT_FILE, &mut bytes.as_slice())?;
        None
    };
    entries.push(postcard::to_allocvec(&LogEntry::Commit { nonce, inline }).map_err(|e| io("encoding", e))?);
    Ok(entries)
}

/// Parts received for the commit under way.
struct Staging {
    nonce: u64,
    files: BTreeMap<u32, (StagedInput, std::fs::File, u64)>,
}

// ----------------------------------------------------------------------------------------
// The persistent Raft log

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
/// The metadata of the last compaction point or installed snapshot (index, term, members).
const SNAPSHOT: &str = "snapshot";
/// Every member's peer URL, once the membership changed (postcard: `Vec<(u64, String)>`).
const PEERS: &str = "peers";

/// What `raft.redb` holds: the hard state, the members, the log's start and its entries.
type Persisted = (HardState, Option<ConfState>, Option<SnapshotMetadata>, Vec<Entry>);

type EntryTable<'t> = redb::Table<'t, u64, &'static [u8]>;
type StateTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// Removes the entries of `table` in `range`.
fn remove_entries(table: &mut EntryTable<'_>, range: impl std::ops::RangeBounds<u64>) -> Result<(), String> {
    let keys: Vec<u64> = table
        .range(range)
        .map_err(|e| e.to_string())?
        .map(|r| r.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    for k in keys {
        table.remove(k).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Stores a protobuf message under `key`.
fn put_message(state: &mut StateTable<'_>, key: &str, m: &impl protobuf::Message) -> Result<(), String> {
    let bytes = m.write_to_bytes().map_err(|e| e.to_string())?;
    state.insert(key, bytes.as_slice()).map_err(|e| e.to_string())?;
    Ok(())
}

/// The Raft log and hard state on disk (`raft.redb` in the data directory).
struct LogDb {
    db: redb::Database,
}

impl LogDb {
    fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.display().to_string(),
            cause: e.to_string(),
        };
        let db = redb::Database::create(path).map_err(|e| open_err(&e))?;
        let txn = db.begin_write().map_err(|e| open_err(&e))?;
        txn.open_table(ENTRIES).map_err(|e| open_err(&e))?;
        txn.open_table(STATE).map_err(|e| open_err(&e))?;
        txn.commit().map_err(|e| open_err(&e))?;
        Ok(LogDb { db })
    }

    fn load(&self) -> Result<Persisted, StoreError> {
        let corrupt = |e: protobuf::ProtobufError| StoreError::Corrupt(format!("raft.redb: {e}"));
        let txn = self.db.begin_read().map_err(|e| io("reading the log", e))?;
        let state = txn.open_table(STATE).map_err(|e| io("reading the log", e))?;
        let hs = match state.get(HARD_STATE).map_err(|e| io("reading the log", e))? {
            Some(v) => HardState::parse_from_bytes(v.value()).map_err(corrupt)?,
            None => HardState::default(),
        };
        let cs = match state.get(CONF_STATE).map_err(|e| io("reading the log", e))? {
            Some(v) => Some(ConfState::parse_from_bytes(v.value()).map_err(corrupt)?),
            None => None,
        };
        let snap = match state.get(SNAPSHOT).map_err(|e| io("reading the log", e))? {
            Some(v) => Some(SnapshotMetadata::parse_from_bytes(v.value()).map_err(corrupt)?),
            None => None,
        };
        let table = txn.open_table(ENTRIES).map_err(|e| io("reading the log", e))?;
        let mut entries = Vec::new();
        for row in table.iter().map_err(|e| io("reading the log", e))? {
            let (_, v) = row.map_err(|e| io("reading the log", e))?;
            entries.push(Entry::parse_from_bytes(v.value()).map_err(corrupt)?);
        }
        Ok((hs, cs, snap, entries))
    }

    /// Records a new membership: Raft's configuration and the members' URLs.
    fn set_members(&self, cs: &ConfState, peers: &BTreeMap<u64, String>) -> Result<(), StoreError> {
        let err = |e: &dyn std::fmt::Display| io("recording the members", e);
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut state = txn.open_table(STATE).map_err(|e| err(&e))?;
            put_message(&mut state, CONF_STATE, cs).map_err(|e| err(&e))?;
            let list: Vec<(u64, String)> = peers.iter().map(|(k, v)| (*k, v.clone())).collect();
            let bytes = postcard::to_allocvec(&list).map_err(|e| err(&e))?;
            state.insert(PEERS, bytes.as_slice()).map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| err(&e))
    }

    /// The members' URLs recorded by the last membership change, if any.
    fn peers(&self) -> Result<Option<BTreeMap<u64, String>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| io("reading the log", e))?;
        let state = txn.open_table(STATE).map_err(|e| io("reading the log", e))?;
        match state.get(PEERS).map_err(|e| io("reading the log", e))? {
            None => Ok(None),
            Some(v) => {
                let list: Vec<(u64, String)> = postcard::from_bytes(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("raft.redb: the members: {e}")))?;
                Ok(Some(list.into_iter().collect()))
            }
        }
    }

    /// Removes the entries up to `meta.index` and records `meta` as the log's start (after
    /// a compaction, or with every entry removed after a snapshot was installed), with
    /// the hard state when given.
    fn cut(&self, meta: &SnapshotMetadata, all: bool, hs: Option<&HardState>) -> Result<(), StoreError> {
        let err = |e: &dyn std::fmt::Display| io("compacting the log", e);
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(|e| err(&e))?;
            let upto = if all { u64::MAX } else { meta.index };
            remove_entries(&mut table, ..=upto).map_err(|e| err(&e))?;
            let mut state = txn.open_table(STATE).map_err(|e| err(&e))?;
            put_message(&mut state, SNAPSHOT, meta).map_err(|e| err(&e))?;
            if let Some(hs) = hs {
                put_message(&mut state, HARD_STATE, hs).map_err(|e| err(&e))?;
            }
        }
        txn.commit().map_err(|e| err(&e))
    }

    /// Writes new entries (replacing any from the first one's index on) and the hard
    /// state, with one fsync.
    fn persist(&self, entries: &[Entry], hs: Option<&HardState>, cs: Option<&ConfState>) -> Result<(), StoreError> {
        let err = |e: &dyn std::fmt::Display| io("writing the log", e);
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(|e| err(&e))?;
            if let Some(first) = entries.first() {
                remove_entries(&mut table, first.index..).map_err(|e| err(&e))?;
            }
            for e in entries {
                let bytes = e.write_to_bytes().map_err(|e| err(&e))?;
                table.insert(e.index, bytes.as_slice()).map_err(|e| err(&e))?;
            }
            let mut state = txn.open_table(STATE).map_err(|e| err(&e))?;
            if let Some(hs) = hs {
                put_message(&mut state, HARD_STATE, hs).map_err(|e| err(&e))?;
            }
            if let Some(cs) = cs {
                put_message(&mut state, CONF_STATE, cs).map_err(|e| err(&e))?;
            }
        }
        txn.commit().map_err(|e| err(&e))
    }
}

// ----------------------------------------------------------------------------------------
// The driver: owns the Raft node, persists, sends, applies.

enum Cmd {
    /// A commit's entries, to append in order; answered once the last one is applied
    /// here (or it is certain it will not be).
    Propose {
        entries: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Transfer {
        to: u64,
        reply: oneshot::Sender<(bool, u64)>,
    },
    /// Add (`Ok((id, url))`) or remove (`Err(id)`) a member; answered `None` when this
    /// replica does not lead, else once the change is applied (or failed).
    ChangeMembers {
        change: Result<(u64, String), u64>,
        reply: oneshot::Sender<Option<oneshot::Receiver<Result<(), StoreError>>>>,
    },
}

/// Proposals awaiting their last entry: index → (term, reply). The driver adds them, the
/// applier answers them once applied, the driver fails them when leadership is lost.
type Waiters = Arc<std::sync::Mutex<BTreeMap<u64, (u64, oneshot::Sender<Result<(), StoreError>>)>>>;

/// What the driver and the applier share.
struct Shared {
    /// The last log index applied to the embedded store.
    applied: std::sync::atomic::AtomicU64,
    waiters: Waiters,
    /// Why the applier stopped (the embedded store failed, or an entry is unreadable).
    failed: std::sync::Mutex<Option<String>>,
    /// Set by the pause watchdog: how long this process did not run.
    paused: std::sync::Mutex<Option<Duration>>,
    /// While this replica leads: until when no other replica can have been elected (see
    /// `Driver::renew_lease`).
    lease_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// The last `Commit` entry applied (the embedded store's own position): a snapshot of
    /// the store is at this index.
    applied_commit: std::sync::atomic::AtomicU64,
    /// The log may be compacted up to this index (the embedded store is durable there).
    compactable: std::sync::atomic::AtomicU64,
    snapshots_installed: std::sync::atomic::AtomicU64,
}

/// The Raft log as raft-rs reads it: the in-memory copy of `raft.redb`, except that a
/// snapshot is the embedded store at its last applied commit (fetched by the follower
/// from this replica's peer port), not the commit index.
#[derive(Clone)]
struct LogStorage {
    mem: MemStorage,
    shared: Arc<Shared>,
    id: u64,
}

impl raft::Storage for LogStorage {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let unavailable = raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        let index = self.shared.applied_commit.load(std::sync::atomic::Ordering::Acquire);
        if index < request_index || index == 0 {
            return Err(unavailable);
        }
        let term = self.mem.term(index).map_err(|_| unavailable)?;
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.mem.initial_state()?.conf_state);
        // Where the follower fetches the store from: this replica.
        snap.data = self.id.to_le_bytes().to_vec().into();
        Ok(snap)
    }
}

/// What the applier is handed, in log order.
enum ApplyMsg {
    Entries(Vec<Entry>),
    /// Replace the embedded store with the leader's at `index` or later, fetched from `url`.
    Install {
        index: u64,
        url: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

struct Driver {
    node: raft::RawNode<LogStorage>,
    log: Arc<LogDb>,
    opts: RaftOptions,
    /// Messages to each peer, sent by its link task.
    links: BTreeMap<u64, (mpsc::Sender<Message>, tokio::task::AbortHandle)>,
    /// Every member's peer URL (changes with the membership; kept in raft.redb).
    peers: BTreeMap<u64, String>,
    /// Committed entries, in order, to the applier.
    to_apply: mpsc::UnboundedSender<ApplyMsg>,
    /// The index the log was last compacted to.
    compacted: u64,
    shared: Arc<Shared>,
    /// The index of the entry that opened this replica's term as leader.
    leader_start: Option<(u64, u64)>,
    status: watch::Sender<GroupStatus>,
    /// While leading: when each peer last answered a heartbeat or append of this term.
    acks: BTreeMap<u64, std::time::Instant>,
}

/// Applies committed entries to the embedded store, in order, away from the driver (so
/// that a large commit never delays heartbeats), and answers the proposals waiting on them.
struct Applier {
    local: RedbStore,
    dir: PathBuf,
    tls: Option<transport::PeerTls>,
    name: String,
    compact_every: u64,
    keep_entries: u64,
    /// The last index the log may be compacted to, as last told to the driver.
    compactable: u64,
    /// Entries up to this index are in the embedded store already (restart).
    skip_through: u64,
    commits_applied: u64,
    staging: Staging,
    shared: Arc<Shared>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        for (_, h) in self.links.values() {
            h.abort();
        }
    }
}

impl Driver {
    /// The in-memory copy of the log raft-rs reads.
    fn mem(&self) -> &MemStorage {
        &self.node.raft.raft_log.store.mem
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    fn applied(&self) -> u64 {
        self.shared.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    fn serving_term(&self) -> Option<u64> {
        match self.leader_start {
            Some((term, start)) if self.is_leader() && term == self.node.raft.term && self.applied() >= start => {
                Some(term)
            }
            _ => None,
        }
    }

    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Message>,
        mut cmds: mpsc::Receiver<Cmd>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.opts.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.node.tick();
                }
                m = inbox.recv() => match m {
                    Some(m) => self.step(m),
                    None => return,
                },
                c = cmds.recv() => match c {
                    Some(c) => self.command(c),
                    None => return,
                },
                _ = stop.changed() => return,
            }
            while let Ok(m) = inbox.try_recv() {
                self.step(m);
            }
            let paused = self.shared.paused.lock().ok().and_then(|mut p| p.take());
            if let Some(gap) = paused
                && self.is_leader()
            {
                // The process did not run (SIGSTOP, a stalled VM) for as long as followers
                // wait before electing another leader: another may lead now. Stop leading
                // before anything else is done.
                let term = self.node.raft.term;
                self.node.raft.become_follower(term, raft::INVALID_ID);
                self.fail_waiters(&format!(
                    "this replica did not run for {gap:?}, an election timeout; it no longer leads"
                ));
            }
            while let Ok(c) = cmds.try_recv() {
                self.command(c);
            }
            let failed = self.shared.failed.lock().ok().and_then(|f| f.clone());
            if let Some(why) = failed {
                self.fail_waiters(&why);
                self.status.send_modify(|s| s.failed = Some(why));
                return;
            }
            let ready = match self.on_ready().await {
                Ok(()) => self.compact().await,
                Err(e) => Err(e),
            };
            if let Err(e) = ready {
                let why = format!("replica {} stopped: {e}", self.opts.name);
                self.fail_waiters(&why);
                self.status.send_modify(|s| s.failed = Some(why));
                return;
            }
            self.publish();
        }
    }

    fn step(&mut self, m: Message) {
        if m.to != self.opts.id {
            return;
        }
        if self.is_leader()
            && m.term == self.node.raft.term
            && matches!(
                m.get_msg_type(),
                raft::prelude::MessageType::MsgHeartbeatResponse | raft::prelude::MessageType::MsgAppendResponse
            )
        {
            self.acks.insert(m.from, std::time::Instant::now());
        }
        // Errors are messages from unknown peers or stale terms; Raft drops them.
        let _ = self.node.step(m);
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Propose { entries, reply } => {
                if self.serving_term().is_none() {
                    let _ = reply.send(Err(self.not_leading()));
                    return;
                }
                for data in entries {
                    if let Err(e) = self.node.propose(vec![], data) {
                        let _ = reply.send(Err(io("proposing", e)));
                        return;
                    }
                }
                let index = self.node.raft.raft_log.last_index();
                if let Ok(mut w) = self.shared.waiters.lock() {
                    w.insert(index, (self.node.raft.term, reply));
                }
            }
            Cmd::ChangeMembers { change, reply } => {
                if self.serving_term().is_none() {
                    let _ = reply.send(None);
                    return;
                }
                let mut cc = raft::prelude::ConfChange::default();
                let context = match &change {
                    Ok((id, url)) => {
                        cc.node_id = *id;
                        cc.set_change_type(raft::prelude::ConfChangeType::AddNode);
                        // The new member's URL travels in the change itself.
                        cc.context = url.clone().into_bytes().into();
                        Vec::new()
                    }
                    Err(id) => {
                        cc.node_id = *id;
                        cc.set_change_type(raft::prelude::ConfChangeType::RemoveNode);
                        Vec::new()
                    }
                };
                let (done, answer) = oneshot::channel();
                match self.node.propose_conf_change(context, cc) {
                    Ok(()) => {
                        let index = self.node.raft.raft_log.last_index();
                        if let Ok(mut w) = self.shared.waiters.lock() {
                            w.insert(index, (self.node.raft.term, done));
                        }
                    }
                    Err(e) => {
                        let _ = done.send(Err(io("changing the members", e)));
                    }
                }
                let _ = reply.send(Some(answer));
            }
            Cmd::Transfer { to, reply } => {
                if self.is_leader() {
                    self.node.transfer_leader(to);
                    let _ = reply.send((true, self.opts.id));
                } else {
                    let _ = reply.send((false, self.node.raft.leader_id));
                }
            }
        }
    }

    fn not_leading(&self) -> StoreError {
        StoreError::Io(format!(
            "replica {} does not lead the Raft group (term {}); its commit was refused",
            self.opts.name, self.node.raft.term
        ))
    }

    fn fail_waiters(&mut self, why: &str) {
        let waiting = self
            .shared
            .waiters
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        for (_, (_, reply)) in waiting {
            let _ = reply.send(Err(StoreError::Io(format!(
                "{why}; the commit may or may not be in the log"
            ))));
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            match self.links.get(&to).map(|(l, _)| l) {
                Some(link) => {
                    if link.try_send(m).is_err() {
                        self.node.report_unreachable(to);
                    }
                }
                None => self.node.report_unreachable(to),
            }
        }
    }

    async fn on_ready(&mut self) -> Result<(), StoreError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        self.send(ready.take_messages());
        if *ready.snapshot() != Snapshot::default() {
            self.install(ready.snapshot().clone()).await?;
        }
        self.apply(ready.take_committed_entries()).await?;
        let entries = ready.entries().clone();
        let hs = ready.hs().cloned();
        if !entries.is_empty() || hs.is_some() {
            let log = self.log.clone();
            let (e2, h2) = (entries.clone(), hs.clone());
            tokio::task::spawn_blocking(move || log.persist(&e2, h2.as_ref(), None))
                .await
                .map_err(|e| io("writing the log", e))??;
            let store = self.mem().clone();
            let mut w = store.wl();
            w.append(&entries).map_err(|e| io("appending to the log", e))?;
            if let Some(hs) = hs {
                w.set_hardstate(hs);
            }
        }
        self.send(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.mem().wl().mut_hard_state().set_commit(commit);
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries()).await?;
        self.node.advance_apply();
        Ok(())
    }

    async fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in entries
            .iter()
            .filter(|e| e.get_entry_type() == EntryType::EntryConfChange)
        {
            self.apply_conf_change(e).await?;
        }
        self.to_apply
            .send(ApplyMsg::Entries(entries))
            .map_err(|_| io("applying", "the applier has stopped"))
    }

    /// A committed membership change: Raft's configuration, the peers' URLs (kept in
    /// raft.redb), and the links to them follow it.
    async fn apply_conf_change(&mut self, e: &Entry) -> Result<(), StoreError> {
        let cc = raft::prelude::ConfChange::parse_from_bytes(&e.data)
            .map_err(|err| StoreError::Corrupt(format!("raft log entry {}: {err}", e.index)))?;
        let cs = self
            .node
            .apply_conf_change(&cc)
            .map_err(|err| io("changing the members", err))?;
        let id = cc.node_id;
        match cc.get_change_type() {
            raft::prelude::ConfChangeType::RemoveNode => {
                self.peers.remove(&id);
                if let Some((_, h)) = self.links.remove(&id) {
                    h.abort();
                }
            }
            _ => {
                let url = String::from_utf8_lossy(&cc.context).to_string();
                if id != self.opts.id && !url.is_empty() {
                    self.peers.insert(id, url.clone());
                    if !self.links.contains_key(&id) {
                        let (tx, rx) = mpsc::channel(1024);
                        let h = tokio::spawn(transport::link(url, self.opts.tls.clone(), rx)).abort_handle();
                        self.links.insert(id, (tx, h));
                    }
                }
            }
        }
        let log = self.log.clone();
        let (cs2, peers) = (cs.clone(), self.peers.clone());
        tokio::task::spawn_blocking(move || log.set_members(&cs2, &peers))
            .await
            .map_err(|err| io("changing the members", err))??;
        self.mem().wl().set_conf_state(cs);
        if cc.get_change_type() == raft::prelude::ConfChangeType::RemoveNode && id == self.opts.id {
            return Err(StoreError::Io(format!(
                "replica {} was removed from the group; it stops (start it again only with a new, empty data directory after adding it back)",
                self.opts.name
            )));
        }
        Ok(())
    }

    /// A snapshot from the leader: the applier replaces the embedded store with the
    /// leader's (after the entries before it), then the log restarts after it. In this
    /// order, so that a crash in between leaves the old log and store, never a log that
    /// starts after a store that is older.
    async fn install(&mut self, snap: Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata().clone();
        let from = <[u8; 8]>::try_from(&snap.data[..]).map(u64::from_le_bytes).unwrap_or(0);
        let url = self
            .peers
            .get(&from)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("a snapshot from unknown replica {from}")))?;
        let (reply, done) = oneshot::channel();
        self.to_apply
            .send(ApplyMsg::Install {
                index: meta.index,
                url,
                reply,
            })
            .map_err(|_| io("installing a snapshot", "the applier has stopped"))?;
        done.await
            .map_err(|_| io("installing a snapshot", "the applier has stopped"))??;
        let mut hs = self
            .node
            .raft
            .raft_log
            .store
            .mem
            .initial_state()
            .map_err(|e| io("installing a snapshot", e))?
            .hard_state;
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        let log = self.log.clone();
        let (m2, h2) = (meta.clone(), hs);
        tokio::task::spawn_blocking(move || log.cut(&m2, true, Some(&h2)))
            .await
            .map_err(|e| io("installing a snapshot", e))??;
        self.mem()
            .wl()
            .apply_snapshot(snap)
            .map_err(|e| io("installing a snapshot", e))?;
        self.compacted = meta.index;
        Ok(())
    }

    /// Compacts the log up to what the applier says the embedded store holds durably.
    async fn compact(&mut self) -> Result<(), StoreError> {
        let upto = self.shared.compactable.load(std::sync::atomic::Ordering::Acquire);
        if upto <= self.compacted {
            return Ok(());
        }
        let mem = self.mem().clone();
        let term = match mem.term(upto) {
            Ok(t) => t,
            // Already gone (a snapshot was installed past it).
            Err(_) => return Ok(()),
        };
        let mut meta = SnapshotMetadata {
            index: upto,
            term,
            ..Default::default()
        };
        meta.set_conf_state(mem.initial_state().map_err(|e| io("compacting the log", e))?.conf_state);
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.cut(&meta, false, None))
            .await
            .map_err(|e| io("compacting the log", e))??;
        mem.wl().compact(upto + 1).map_err(|e| io("compacting the log", e))?;
        self.compacted = upto;
        Ok(())
    }
}

impl Applier {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ApplyMsg>) {
        while let Some(msg) = rx.recv().await {
            let done = match msg {
                ApplyMsg::Entries(entries) => match self.apply_entries(entries).await {
                    Ok(()) => self.allow_compaction().await,
                    Err(e) => Err(e),
                },
                ApplyMsg::Install { index, url, reply } => {
                    let r = self.install(index, &url).await;
                    let failed = r.as_ref().err().map(|e| e.to_string());
                    let _ = reply.send(r);
                    match failed {
                        Some(e) => Err(StoreError::Io(e)),
                        None => Ok(()),
                    }
                }
            };
            if let Err(e) = done {
                if let Ok(mut f) = self.shared.failed.lock() {
                    *f = Some(format!("replica {} stopped: {e}", self.name));
                }
                return;
            }
        }
    }

    /// Once `compact_every` entries were applied since the last compaction point, makes
    /// the embedded store durable and lets the driver compact the log up to its position
    /// less `keep_entries`.
    async fn allow_compaction(&mut self) -> Result<(), StoreError> {
        let at = self.shared.applied_commit.load(std::sync::atomic::Ordering::Acquire);
        let upto = at.saturating_sub(self.keep_entries);
        if upto < self.compactable + self.compact_every.max(1) {
            return Ok(());
        }
        let local = self.local.clone();
        tokio::task::spawn_blocking(move || local.sync())
            .await
            .map_err(|e| io("syncing the embedded store", e))??;
        self.compactable = upto;
        self.shared
            .compactable
            .store(upto, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Replaces the embedded store with the leader's, fetched from `url` (a backup stream
    /// of a store that has applied at least `index`), restored beside it and moved in.
    async fn install(&mut self, index: u64, url: &str) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let incoming = self.dir.join("snapshot-incoming");
        let file = self.dir.join("snapshot-incoming.backup");
        let _ = std::fs::remove_dir_all(&incoming);
        let bytes = transport::fetch_snapshot(url, self.tls.as_ref(), index, &file).await?;
        let (f2, i2) = (file.clone(), incoming.clone());
        tokio::task::spawn_blocking(move || {
            let reader = std::fs::File::open(&f2).map_err(|e| io("reading the snapshot", e))?;
            std::fs::create_dir_all(&i2).map_err(|e| io("restoring the snapshot", e))?;
            tokenfab_store::backup::restore_replica(reader, &i2)
        })
        .await
        .map_err(|e| io("restoring the snapshot", e))??;
        let (local, i3) = (self.local.clone(), incoming.clone());
        let holds = tokio::task::spawn_blocking(move || {
            local.replace_with(&i3)?;
            local.applied()
        })
        .await
        .map_err(|e| io("installing the snapshot", e))??;
        let _ = std::fs::remove_dir_all(&incoming);
        let _ = std::fs::remove_file(&file);
        if holds < index {
            return Err(StoreError::Corrupt(format!(
                "the snapshot from {url} holds the log up to entry {holds}, not {index}"
            )));
        }
        self.skip_through = holds;
        self.staging = Staging {
            nonce: 0,
            files: BTreeMap::new(),
        };
        self.shared.applied.store(index, std::sync::atomic::Ordering::Release);
        self.shared
            .applied_commit
            .store(holds, std::sync::atomic::Ordering::Release);
        self.compactable = index;
        self.shared
            .snapshots_installed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "replica {}: installed a snapshot of {} bytes from {url} (log entry {holds}) in {:?}",
            self.name,
            bytes,
            started.elapsed()
        );
        Ok(())
    }

    async fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        for e in entries {
            let (index, term) = (e.index, e.term);
            if index > self.skip_through {
                match e.get_entry_type() {
                    EntryType::EntryNormal if !e.data.is_empty() => self.apply_data(index, &e.data).await?,
                    EntryType::EntryNormal => {}
                    // Membership changes are the driver's (it applied them before handing
                    // the entries over).
                    EntryType::EntryConfChange => {}
                    EntryType::EntryConfChangeV2 => {
                        return Err(StoreError::Corrupt(format!(
                            "raft log entry {index} is a joint membership change, which this build does not make"
                        )));
                    }
                }
            }
            self.shared.applied.store(index, std::sync::atomic::Ordering::Release);
            let waiter = self.shared.waiters.lock().ok().and_then(|mut w| w.remove(&index));
            if let Some((want_term, reply)) = waiter {
                let _ = reply.send(if want_term == term {
                    Ok(())
                } else {
                    Err(StoreError::Io(format!(
                        "replica {} lost the leadership before its commit was replicated; the commit was not made",
                        self.name
                    )))
                });
            }
        }
        Ok(())
    }

    async fn apply_data(&mut self, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("raft log entry {index}: {what}"));
        let entry: LogEntry = postcard::from_bytes(data).map_err(|e| corrupt(&e.to_string()))?;
        match entry {
            LogEntry::Part { nonce, file, data } => {
                if self.staging.nonce != nonce {
                    self.staging = Staging {
                        nonce,
                        files: BTreeMap::new(),
                    };
                }
                let raw = lz4_flex::decompress_size_prepended(&data).map_err(|e| corrupt(&e.to_string()))?;
                if !self.staging.files.contains_key(&file) {
                    let staged = self.local.stage()?;
                    let f = std::fs::File::create(staged.path()).map_err(|e| io("staging a file", e))?;
                    self.staging.files.insert(file, (staged, f, 0));
                }
                let Some((_, f, len)) = self.staging.files.get_mut(&file) else {
                    return Err(corrupt("a staged file vanished"));
                };
                f.write_all(&raw).map_err(|e| io("staging a file", e))?;
                *len += raw.len() as u64;
                Ok(())
            }
            LogEntry::Commit { nonce, inline } => {
                let mut staging = std::mem::replace(
                    &mut self.staging,
                    Staging {
                        nonce: 0,
                        files: BTreeMap::new(),
                    },
                );
                if staging.nonce != nonce {
                    staging.files.clear();
                }
                let compressed = match inline {
                    Some(b) => b,
                    None => {
                        let (staged, _, _) = staging
                            .files
                            .remove(&COMMIT_FILE)
                            .ok_or_else(|| corrupt("the commit's own parts are missing"))?;
                        std::fs::read(staged.path()).map_err(|e| io("reading a staged commit", e))?
                    }
                };
                let bytes = lz4_flex::decompress_size_prepended(&compressed).map_err(|e| corrupt(&e.to_string()))?;
                let commit: Commit<FileRef> = postcard::from_bytes(&bytes).map_err(|e| corrupt(&e.to_string()))?;
                let set = commit.into_write_set(|r| {
                    let (staged, f, len) = match staging.files.remove(&r.file) {
                        Some(s) => s,
                        // An empty file has no parts.
                        None if r.len == 0 => {
                            let staged = self.local.stage()?;
                            let f = std::fs::File::create(staged.path()).map_err(|e| io("staging a file", e))?;
                            (staged, f, 0)
                        }
                        None => return Err(corrupt(&format!("file {} of the commit has no parts", r.file))),
                    };
                    if len != r.len {
                        return Err(corrupt(&format!(
                            "file {} is {len} bytes, its commit says {}",
                            r.file, r.len
                        )));
                    }
                    f.sync_all().map_err(|e| io("staging a file", e))?;
                    Ok(staged)
                })?;
                self.commits_applied += 1;
                let fsync = self.commits_applied.is_multiple_of(FSYNC_EVERY);
                let local = self.local.clone();
                tokio::task::spawn_blocking(move || local.apply_replicated(set, index, fsync))
                    .await
                    .map_err(|e| io("applying a commit", e))??;
                self.shared
                    .applied_commit
                    .store(index, std::sync::atomic::Ordering::Release);
                Ok(())
            }
        }
    }
}

impl Driver {
    /// The leader's lease: a follower elects another leader only after an election timeout
    /// (at least `election_ticks` ticks) without hearing from this one. So once a majority
    /// (this replica included) answered a heartbeat or append at time T, no other leader
    /// can exist before T + the election timeout, less a margin of two ticks for the
    /// messages' travel and the clocks' drift: until then this replica may answer reads.
    fn renew_lease(&mut self) {
        let until = if self.is_leader() {
            let voters: Vec<u64> = self.node.raft.prs().conf().voters().ids().iter().collect();
            let quorum = voters.len() / 2 + 1;
            let mut heard: Vec<std::time::Instant> = voters
                .iter()
                .filter(|&&v| v != self.opts.id)
                .filter_map(|v| self.acks.get(v).copied())
                .collect();
            heard.sort_unstable_by(|a, b| b.cmp(a));
            let lease = self.opts.election_timeout().saturating_sub(self.opts.tick * 2);
            match quorum.checked_sub(2) {
                // One voter: no other can be elected.
                None => Some(std::time::Instant::now() + lease),
                Some(i) => heard.get(i).map(|t| *t + lease),
            }
        } else {
            self.acks.clear();
            None
        };
        if let Ok(mut l) = self.shared.lease_until.lock() {
            *l = until;
        }
    }

    fn publish(&mut self) {
        self.renew_lease();
        let raft = &self.node.raft;
        if raft.state == StateRole::Leader {
            if self.leader_start.is_none_or(|(t, _)| t != raft.term) {
                self.leader_start = Some((raft.term, raft.raft_log.last_index()));
            }
        } else {
            self.leader_start = None;
            if self.shared.waiters.lock().is_ok_and(|w| !w.is_empty()) {
                let why = format!("replica {} no longer leads (term {})", self.opts.name, raft.term);
                self.fail_waiters(&why);
            }
        }
        let raft = &self.node.raft;
        let mut voters: Vec<u64> = raft.prs().conf().voters().ids().iter().collect();
        voters.sort_unstable();
        let next = GroupStatus {
            id: self.opts.id,
            name: self.opts.name.clone(),
            leader: raft.leader_id,
            term: raft.term,
            role: role_name(raft.state),
            commit: raft.raft_log.committed,
            applied: self.applied(),
            voters,
            serving: self.serving_term(),
            failed: None,
            snapshots_installed: self
                .shared
                .snapshots_installed
                .load(std::sync::atomic::Ordering::Relaxed),
            first_index: raft.raft_log.first_index(),
        };
        self.status.send_if_modified(|s| {
            if *s == next {
                false
            } else {
                *s = next;
                true
            }
        });
    }
}

/// A thread that wakes every 50 ms and, when it finds that it did not run for `timeout`
/// (the whole process was stopped or starved), tells the driver, which then stops leading.
/// A thread of its own, so that a busy runtime is not taken for a pause.
fn watch_for_pauses(shared: &Arc<Shared>, timeout: Duration, stop: watch::Receiver<bool>) {
    let shared = Arc::downgrade(shared);
    let _ = std::thread::Builder::new()
        .name("raft-pause-watch".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(50));
                if *stop.borrow() {
                    return;
                }
                let Some(shared) = shared.upgrade() else { return };
                let gap = last.elapsed();
                last = std::time::Instant::now();
                if gap >= timeout
                    && let Ok(mut p) = shared.paused.lock()
                {
                    *p = Some(gap);
                }
            }
        });
}

// ----------------------------------------------------------------------------------------
// The store

/// Durable state replicated by Raft. Cheap to clone.
#[derive(Clone)]
pub struct RaftStore {
    inner: Arc<Inner>,
}

struct Inner {
    local: RedbStore,
    opts: RaftOptions,
    cmds: mpsc::Sender<Cmd>,
    status: watch::Receiver<GroupStatus>,
    /// The term this replica serves in (set when `open` returns).
    term: u64,
    /// Held through a commit: one commit's entries at a time.
    commit: tokio::sync::Mutex<u64>,
    shared: Arc<Shared>,
    _tasks: Tasks,
}

/// Stops the driver, the peer server and the links when dropped.
struct Tasks {
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::AbortHandle>,
    /// The peer port's handle on the embedded store, let go of at once.
    store_slot: Arc<std::sync::Mutex<Option<RedbStore>>>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        if let Ok(mut s) = self.store_slot.lock() {
            *s = None;
        }
        let _ = self.stop.send(true);
        for h in &self.handles {
            h.abort();
        }
    }
}

impl std::fmt::Debug for RaftStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStore")
            .field("id", &self.inner.opts.id)
            .field("name", &self.inner.opts.name)
            .finish()
    }
}

/// What [`RaftStore::open`] reports while it waits to lead: the leader's id, and the id
/// with its peer URL (`2 (http://cp-1:7400)`); 0 and empty while none is known.
pub type Waiting = Box<dyn Fn(u64, &str) + Send + Sync>;

/// Opens a database, retrying for a few seconds while a store of an earlier `open` in
/// this process still holds it (its tasks end just after it is dropped).
async fn open_retrying<T: Send + 'static>(
    what: impl Fn() -> Result<T, StoreError> + Send + Sync + 'static,
) -> Result<T, StoreError> {
    let what = Arc::new(what);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let w = what.clone();
        match tokio::task::spawn_blocking(move || w())
            .await
            .map_err(|e| io("opening", e))?
        {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl RaftStore {
    /// Starts this replica in `dir` (its embedded store and `raft.redb`), joins the group,
    /// and returns once this replica leads and has applied every entry committed before
    /// its term. Until then it follows: it applies the leader's commits to its embedded
    /// store and calls `waiting` now and then.
    pub async fn open(opts: RaftOptions, dir: &Path, waiting: Waiting) -> Result<Self, StoreError> {
        opts.check_urls()?;
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            cause: e.to_string(),
        })?;
        let local = open_retrying({
            let dir = dir.to_path_buf();
            move || RedbStore::open(&dir)
        })
        .await?;
        let log = Arc::new(
            open_retrying({
                let path = dir.join("raft.redb");
                move || LogDb::open(&path)
            })
            .await?,
        );
        let (mut hs, cs, snap, entries) = {
            let log = log.clone();
            tokio::task::spawn_blocking(move || log.load())
                .await
                .map_err(|e| io("reading the log", e))??
        };
        // After a membership change, raft.redb holds the members: they win over --raft-peers.
        let recorded = {
            let l = log.clone();
            tokio::task::spawn_blocking(move || l.peers())
                .await
                .map_err(|e| io("reading the log", e))??
        };
        let changed = recorded.is_some();
        let peers = match recorded {
            Some(mut p) => {
                if let Some(own) = opts.peers.get(&opts.id) {
                    p.entry(opts.id).or_insert_with(|| own.clone());
                }
                p
            }
            None => opts.peers.clone(),
        };
        let peer_ids: Vec<u64> = opts.peers.keys().copied().collect();
        let cs = match cs {
            Some(cs) => cs,
            None => {
                let cs = ConfState::from((peer_ids.clone(), vec![]));
                let l = log.clone();
                let c2 = cs.clone();
                tokio::task::spawn_blocking(move || l.persist(&[], None, Some(&c2)))
                    .await
                    .map_err(|e| io("writing the log", e))??;
                cs
            }
        };
        let mut voters = cs.voters.clone();
        voters.sort_unstable();
        if voters != peer_ids && !changed {
            return Err(StoreError::Open {
                path: dir.join("raft.redb").display().to_string(),
                cause: format!(
                    "this data directory belongs to a group of members {voters:?}, but --raft-peers names {peer_ids:?}; give the same members (change them with `tokenfab admin members --add/--remove`)"
                ),
            });
        }
        let mut local_applied = {
            let l = local.clone();
            tokio::task::spawn_blocking(move || l.applied())
                .await
                .map_err(|e| io("reading the applied position", e))??
        };
        // A store that holds data while the Raft log is new (a group started from a
        // restored backup): that state is in no log entry, so the log starts after it, at a
        // snapshot point (index 1); a member that joins installs a snapshot of it rather
        // than replaying a log that lacks it.
        let mut snap = snap;
        if snap.is_none() && entries.is_empty() && hs == HardState::default() && local_applied == 0 {
            let held = Store::load(&local).await?;
            if !held.batches.is_empty() || !held.files.is_empty() || held.next_batch > 1 || held.next_file > 1 {
                let l = local.clone();
                tokio::task::spawn_blocking(move || l.apply_replicated(WriteSet::default(), 1, true))
                    .await
                    .map_err(|e| io("starting the log after the restored store", e))??;
                let mut meta = SnapshotMetadata {
                    index: 1,
                    term: 1,
                    ..Default::default()
                };
                meta.set_conf_state(cs.clone());
                hs.term = 1;
                hs.commit = 1;
                let (l, m2, h2) = (log.clone(), meta.clone(), hs.clone());
                tokio::task::spawn_blocking(move || l.cut(&m2, true, Some(&h2)))
                    .await
                    .map_err(|e| io("starting the log after the restored store", e))??;
                snap = Some(meta);
                local_applied = 1;
            }
        }
        let mem = MemStorage::new_with_conf_state(cs.clone());
        {
            let mut w = mem.wl();
            if let Some(meta) = &snap {
                // The log starts after its last compaction point (or installed snapshot).
                let mut s = Snapshot::default();
                *s.mut_metadata() = meta.clone();
                s.mut_metadata().set_conf_state(cs);
                w.apply_snapshot(s).map_err(|e| io("reading the log", e))?;
                hs.commit = hs.commit.max(meta.index);
            }
            w.append(&entries).map_err(|e| io("reading the log", e))?;
            w.set_hardstate(hs.clone());
        }
        let shared = Arc::new(Shared {
            applied: std::sync::atomic::AtomicU64::new(local_applied.min(hs.commit)),
            waiters: Arc::default(),
            failed: std::sync::Mutex::new(None),
            paused: std::sync::Mutex::new(None),
            lease_until: std::sync::Mutex::new(None),
            applied_commit: std::sync::atomic::AtomicU64::new(local_applied),
            compactable: std::sync::atomic::AtomicU64::new(0),
            snapshots_installed: std::sync::atomic::AtomicU64::new(0),
        });
        let storage = LogStorage {
            mem,
            shared: shared.clone(),
            id: opts.id,
        };
        let compacted = snap.as_ref().map_or(0, |m| m.index);
        let config = raft::Config {
            id: opts.id,
            election_tick: opts.election_ticks,
            heartbeat_tick: opts.heartbeat_ticks,
            applied: local_applied.min(hs.commit),
            max_size_per_msg: 4 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate().map_err(|e| StoreError::Open {
            path: "raft options".into(),
            cause: e.to_string(),
        })?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = raft::RawNode::new(&config, storage, &logger).map_err(|e| StoreError::Open {
            path: dir.join("raft.redb").display().to_string(),
            cause: e.to_string(),
        })?;

        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Tasks {
            stop,
            handles: Vec::new(),
            store_slot: Arc::new(std::sync::Mutex::new(Some(local.clone()))),
        };
        let (inbox_tx, inbox) = mpsc::channel(4096);
        let (cmds, cmds_rx) = mpsc::channel(256);
        let (status_tx, status) = watch::channel(GroupStatus {
            id: opts.id,
            name: opts.name.clone(),
            ..Default::default()
        });
        let server = transport::serve(
            opts.listen,
            transport::Peer {
                id: opts.id,
                inbox: inbox_tx,
                status: status.clone(),
                cmds: cmds.clone(),
                local: tasks.store_slot.clone(),
                shared: shared.clone(),
            },
            opts.tls.as_ref(),
            stop_rx.clone(),
        )
        .await?;
        tasks.handles.push(server.abort_handle());
        let mut links = BTreeMap::new();
        for (&id, url) in &peers {
            if id == opts.id {
                continue;
            }
            let (tx, rx) = mpsc::channel(1024);
            let handle = tokio::spawn(transport::link(url.clone(), opts.tls.clone(), rx)).abort_handle();
            links.insert(id, (tx, handle));
        }
        let (to_apply, apply_rx) = mpsc::unbounded_channel();
        let applier = Applier {
            local: local.clone(),
            dir: dir.to_path_buf(),
            tls: opts.tls.clone(),
            name: opts.name.clone(),
            compact_every: opts.compact_every,
            keep_entries: opts.keep_entries,
            compactable: compacted,
            skip_through: local_applied,
            commits_applied: 0,
            staging: Staging {
                nonce: 0,
                files: BTreeMap::new(),
            },
            shared: shared.clone(),
        };
        tasks.handles.push(tokio::spawn(applier.run(apply_rx)).abort_handle());
        watch_for_pauses(&shared, opts.election_timeout(), stop_rx.clone());
        let driver = Driver {
            node,
            log,
            opts: opts.clone(),
            links,
            peers: peers.clone(),
            to_apply,
            compacted,
            shared: shared.clone(),
            leader_start: None,
            status: status_tx,
            acks: BTreeMap::new(),
        };
        tasks
            .handles
            .push(tokio::spawn(driver.run(inbox, cmds_rx, stop_rx)).abort_handle());

        // Follow until this replica leads and serves.
        let mut rx = status.clone();
        let mut last_told: Option<(tokio::time::Instant, u64)> = None;
        let mut leaderless_since: Option<tokio::time::Instant> = None;
        let term = loop {
            // Without a leader for a while: was this replica removed from the group? A
            // removed member is not sent the change that removed it; the others say so.
            let leader = rx.borrow().leader;
            match (leader, leaderless_since) {
                (0, None) => leaderless_since = Some(tokio::time::Instant::now()),
                (0, Some(t)) if t.elapsed() > opts.election_timeout() * 4 => {
                    leaderless_since = Some(tokio::time::Instant::now());
                    if let Some(by) = removed_by(&peers, opts.id, opts.tls.as_ref()).await {
                        return Err(StoreError::Io(format!(
                            "replica {} was removed from the group (replica {by} lists the members without it); it stops (start it again only with a new, empty data directory after adding it back)",
                            opts.name
                        )));
                    }
                }
                (0, Some(_)) => {}
                _ => leaderless_since = None,
            }
            {
                let s = rx.borrow_and_update();
                if let Some(why) = &s.failed {
                    return Err(StoreError::Io(why.clone()));
                }
                if let Some(term) = s.serving {
                    break term;
                }
                let changed = last_told.is_none_or(|(t, l)| l != s.leader || t.elapsed() > Duration::from_secs(10));
                if changed {
                    let name = if s.leader == 0 {
                        String::new()
                    } else {
                        format!("{} ({})", s.leader, peers.get(&s.leader).map_or("", String::as_str))
                    };
                    waiting(s.leader, &name);
                    last_told = Some((tokio::time::Instant::now(), s.leader));
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        };
        Ok(RaftStore {
            inner: Arc::new(Inner {
                local,
                opts,
                cmds,
                status,
                term,
                commit: tokio::sync::Mutex::new(0),
                shared,
                _tasks: tasks,
            }),
        })
    }

    /// Resolves with the reason once this replica no longer leads in the term it serves
    /// in (another replica was elected, it was paused for an election timeout, or its
    /// log or store failed). It must then stop serving: its commits are refused.
    pub async fn deposed(&self) -> String {
        let mut rx = self.inner.status.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                if let Some(why) = &s.failed {
                    return why.clone();
                }
                if s.serving != Some(self.inner.term) {
                    return format!(
                        "replica {} no longer leads the Raft group (it led in term {}; now term {}, leader {})",
                        self.inner.opts.name, self.inner.term, s.term, s.leader
                    );
                }
            }
            if rx.changed().await.is_err() {
                return "the store was closed".into();
            }
        }
    }

    /// What this replica knows of its group now.
    pub fn status(&self) -> GroupStatus {
        self.inner.status.borrow().clone()
    }

    /// The embedded store this replica serves reads from.
    pub fn local(&self) -> &RedbStore {
        &self.inner.local
    }
}

impl Store for RaftStore {
    tokenfab_store::reads_from_embedded_store!(local);

    async fn apply(&self, set: WriteSet) -> Result<(), StoreError> {
        if set.is_empty() {
            return Ok(());
        }
        let mut counter = self.inner.commit.lock().await;
        *counter += 1;
        // Unique among this group's commits: the term, and the commit's number in it.
        let nonce = (self.inner.term << 32) | (*counter & 0xffff_ffff);
        let part_bytes = self.inner.opts.part_bytes;
        let entries = tokio::task::block_in_place(|| encode_commit(&set, nonce, part_bytes))?;
        drop(set);
        let (reply, answer) = oneshot::channel();
        self.inner
            .cmds
            .send(Cmd::Propose { entries, reply })
            .await
            .map_err(|_| io("committing", "the replica has stopped"))?;
        answer
            .await
            .map_err(|_| io("committing", "the replica stopped before the commit was replicated"))?
    }

    async fn reopen(&self) -> Result<(), StoreError> {
        self.inner.local.reopen().await
    }

    fn may_serve(&self) -> Result<(), String> {
        let s = self.inner.status.borrow();
        if s.serving != Some(self.inner.term) {
            return Err(format!("replica {} no longer leads", self.inner.opts.name));
        }
        drop(s);
        let until = self.inner.shared.lease_until.lock().ok().and_then(|l| *l);
        match until {
            Some(t) if std::time::Instant::now() < t => Ok(()),
            _ => Err(format!(
                "replica {} has not heard from a majority of the group within its lease; another may lead now",
                self.inner.opts.name
            )),
        }
    }

    fn describe(&self) -> tokenfab_store::StoreInfo {
        tokenfab_store::StoreInfo {
            backend: "raft",
            replica: Some(self.inner.opts.name.clone()),
            log_position: Some(self.inner.status.borrow().applied),
        }
    }
}

/// Asks each of `peers` what it knows (`tokenfab admin members`): one row per peer, `Err`
/// with the reason for a peer that did not answer.
pub async fn members(
    peers: &BTreeMap<u64, String>,
    tls: Option<&transport::PeerTls>,
) -> Vec<(u64, String, Result<GroupStatus, String>)> {
    let mut out = Vec::new();
    for (&id, url) in peers {
        out.push((id, url.clone(), transport::status(url, tls).await));
    }
    out
}

/// The id of a member that leads or follows a leader and whose members do not include
/// `me`, if one answers: `me` was removed.
async fn removed_by(peers: &BTreeMap<u64, String>, me: u64, tls: Option<&transport::PeerTls>) -> Option<u64> {
    for (&id, url) in peers.iter().filter(|(id, _)| **id != me) {
        if let Ok(s) = transport::status(url, tls).await
            && s.leader != 0
            && !s.voters.is_empty()
            && !s.voters.contains(&me)
        {
            return Some(id);
        }
    }
    None
}

/// Asks the leader among `peers` to add member `id` at `url` (`Ok`) or remove member `id`
/// (`Err`); returns the leader's id once the change is committed and applied there.
pub async fn change_members(
    peers: &BTreeMap<u64, String>,
    change: Result<(u64, String), u64>,
    tls: Option<&transport::PeerTls>,
) -> Result<u64, String> {
    let mut last = String::from("no member answered");
    for url in peers.values() {
        match transport::change_members(url, &change, tls).await {
            Ok((true, leader, e)) if e.is_empty() => return Ok(leader),
            Ok((true, _, e)) => return Err(e),
            Ok((false, _, _)) => last = "the members answered, but none leads now (an election is under way?)".into(),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Asks the leader among `peers` to hand leadership to `to`; returns the leader's id.
pub async fn transfer_leader(
    peers: &BTreeMap<u64, String>,
    to: u64,
    tls: Option<&transport::PeerTls>,
) -> Result<u64, String> {
    if !peers.contains_key(&to) {
        return Err(format!(
            "{to} is not a member (members: {:?})",
            peers.keys().collect::<Vec<_>>()
        ));
    }
    let mut last = String::from("no member answered");
    for url in peers.values() {
        match transport::transfer(url, to, tls).await {
            Ok((true, leader)) => return Ok(leader),
            Ok((false, _)) => last = "the members answered, but none leads now (an election is under way?)".into(),
            Err(e) => last = e,
        }
    }
    Err(last)
}
