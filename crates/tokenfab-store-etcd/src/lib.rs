//! # tokenfab-store-etcd: the control plane's commits replicated through etcd
//!
//! For sites that already run etcd. Several control-plane replicas share one etcd key
//! prefix; one of them is elected and serves, the others wait. Every commit of the elected
//! replica ([`Store::apply`]) is first appended to a log in etcd, then applied to the
//! replica's own embedded store ([`RedbStore`]), which serves every read. A replica that
//! becomes the leader first applies the log entries its embedded store has not seen, so it
//! serves exactly what was committed, whichever replica committed it.
//!
//! ```text
//! <prefix>/leader                  the elected replica's name, on its etcd lease
//! <prefix>/log/<seq, 20 digits>    one commit (a WriteSet): its operations and requests,
//!                                  inline, or its parts when it is larger than one part
//! <prefix>/part/<seq>/<n, 8 digits> parts of a commit: input files and uploaded files
//!                                  (and the commit itself when large), at most
//!                                  `part_bytes` each before compression (etcd refuses
//!                                  requests over 1.5 MiB by default)
//! ```
//!
//! Commits and parts are LZ4-compressed (results and JSONL inputs shrink several times).
//!
//! **Election and fencing.** A replica is elected by creating `<prefix>/leader` on an etcd
//! lease of `lease_ttl` seconds, kept alive while it runs. Every write it makes is a
//! transaction whose condition is that the leader key still has the create revision it
//! created: once its lease expired (it stopped, hung, or lost etcd) and another replica was
//! elected, the key is a new one and each write of the deposed replica is refused, so two
//! replicas never both commit. A deposed replica learns it at its next write or lease
//! renewal; [`EtcdStore::deposed`] then resolves, and `tokenfab server` exits (its
//! supervisor restarts it as a follower).
//!
//! **What it costs.** Every commit is one etcd transaction (plus one per part), on top of
//! the embedded store's fsync. Input files are copied into etcd: etcd's own database limit
//! (2 GiB by default, `--quota-backend-bytes`) bounds the inputs it can hold, and log
//! entries are not yet compacted (see the crate's README section in `docs/ha.md`).

pub mod testing;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokenfab_store::replicated::Commit;
use tokenfab_store::{BatchInputs, RedbStore, Store, StoreError, WriteSet};

/// How to reach etcd and who this replica is.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// etcd's client URLs, e.g. `http://10.0.0.5:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix of this cluster's control plane (e.g. `/tokenfab/prod`): replicas
    /// sharing it are one control plane.
    pub prefix: String,
    /// This replica's name (unique within the prefix; the leader key holds it).
    pub name: String,
    /// Seconds the leader's lease lasts without renewal: how long a dead leader holds the
    /// election before another replica may take over.
    pub lease_ttl_s: i64,
    /// Largest value written to etcd in one request.
    pub part_bytes: usize,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, prefix: &str, name: &str) -> Self {
        EtcdOptions {
            endpoints,
            prefix: prefix.trim_end_matches('/').to_string(),
            name: name.to_string(),
            lease_ttl_s: 3,
            part_bytes: 1 << 20,
        }
    }
}

fn etcd_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("etcd: {what}: {e}"))
}

/// A commit as the log holds it: each file as a range of `part/` keys.
type Entry = Commit<Parts>;

/// Consecutive parts of one commit's `part/` keys.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Parts {
    first: u32,
    count: u32,
    len: u64,
}

/// The value of a `log/` key. The encoded [`Entry`] is LZ4-compressed (a block with its
/// size first), as is each part.
#[derive(Debug, Serialize, Deserialize)]
enum LogValue {
    Lz4Inline(Vec<u8>),
    /// The compressed entry is in these parts.
    Lz4InParts(Parts),
}

/// The elected replica's hold on the leader key.
#[derive(Debug, Clone)]
struct Fence {
    key: Vec<u8>,
    /// The leader key's create revision: the condition of every write.
    revision: i64,
}

/// Durable state replicated through etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    local: RedbStore,
    client: etcd_client::Client,
    opts: EtcdOptions,
    fence: Fence,
    /// The next log sequence number; held through a commit (commits are serialized).
    next: tokio::sync::Mutex<u64>,
    /// The last log entry written (for `describe`, which cannot wait for `next`).
    position: std::sync::atomic::AtomicU64,
    deposed: tokio::sync::watch::Sender<Option<String>>,
    keepalive: tokio::task::JoinHandle<()>,
    /// The task that keeps this replica listed under `<prefix>/replicas`.
    presence: tokio::task::AbortHandle,
    /// A planted bug, for testing the fault tests' history checker only: acknowledge a
    /// commit once the embedded store has it, and write it to etcd a second later
    /// (`TOKENFAB_FAULT_ACK_BEFORE_REPLICATION=1`). Never set it elsewhere: a leader lost in
    /// that second loses acknowledged commits.
    fault_ack_before_replication: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.keepalive.abort();
        self.presence.abort();
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.inner.opts.prefix)
            .field("name", &self.inner.opts.name)
            .finish()
    }
}

fn log_key(prefix: &str, seq: u64) -> String {
    format!("{prefix}/log/{seq:020}")
}

fn part_key(prefix: &str, seq: u64, n: u32) -> String {
    format!("{prefix}/part/{seq:020}/{n:08}")
}

/// The embedded store fsyncs every this many commits: etcd holds each commit durably
/// already, so the copy only bounds how much of the log a restart replays.
const FSYNC_EVERY: u64 = 32;

/// What [`EtcdStore::open`] reports while it waits to be elected.
pub type Waiting = Box<dyn Fn(&str) + Send + Sync>;

impl EtcdStore {
    /// Connects to etcd, waits until this replica is elected (calling `waiting` with the
    /// current leader's name now and then), brings the embedded store in `dir` up to the
    /// log's end, and returns the store, ready to commit.
    pub async fn open(opts: EtcdOptions, dir: &Path, waiting: Waiting) -> Result<Self, StoreError> {
        if opts.name.is_empty() || opts.name.contains('/') {
            return Err(StoreError::Open {
                path: opts.prefix.clone(),
                cause: format!("replica name {:?}: give a non-empty name without '/'", opts.name),
            });
        }
        let connect = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        let client = etcd_client::Client::connect(&opts.endpoints, Some(connect))
            .await
            .map_err(|e| StoreError::Open {
                path: opts.endpoints.join(","),
                cause: format!("cannot connect to etcd: {e}"),
            })?;
        let local = tokio::task::spawn_blocking({
            let dir = dir.to_path_buf();
            move || RedbStore::open(&dir)
        })
        .await
        .map_err(|e| etcd_err("opening the embedded store", e))??;
        let presence = tokio::spawn(be_present(client.clone(), opts.clone()));
        let elected = campaign(&client, &opts, &waiting).await;
        let (fence, lease) = match elected {
            Ok(e) => e,
            Err(e) => {
                presence.abort();
                return Err(e);
            }
        };
        let (deposed, _) = tokio::sync::watch::channel(None);
        let presence_handle = presence.abort_handle();
        let keepalive = tokio::spawn({
            let (client, prefix, name, ttl, deposed) = (
                client.clone(),
                opts.prefix.clone(),
                opts.name.clone(),
                opts.lease_ttl_s,
                deposed.clone(),
            );
            async move {
                keep_alive(client, lease, ttl, &prefix, &name, deposed).await;
                presence.abort();
            }
        });
        let store = EtcdStore {
            inner: Arc::new(Inner {
                local,
                client,
                opts,
                fence,
                next: tokio::sync::Mutex::new(0),
                position: std::sync::atomic::AtomicU64::new(0),
                deposed,
                keepalive,
                presence: presence_handle,
                fault_ack_before_replication: std::env::var("TOKENFAB_FAULT_ACK_BEFORE_REPLICATION").as_deref()
                    == Ok("1"),
            }),
        };
        let next = store.catch_up().await?;
        *store.inner.next.lock().await = next;
        store
            .inner
            .position
            .store(next - 1, std::sync::atomic::Ordering::Relaxed);
        Ok(store)
    }

    /// Resolves with the reason once this replica is no longer the elected one (its lease
    /// was lost, or a write was refused because another replica was elected). It must then
    /// stop serving: its commits are refused.
    pub async fn deposed(&self) -> String {
        let mut rx = self.inner.deposed.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return "the store was closed".into();
            }
        }
    }

    /// The embedded store this replica serves reads from.
    pub fn local(&self) -> &RedbStore {
        &self.inner.local
    }

    /// The next log sequence number (entries committed so far, plus one).
    pub async fn next_seq(&self) -> u64 {
        *self.inner.next.lock().await
    }

    fn depose(&self, why: String) -> StoreError {
        self.inner.deposed.send_replace(Some(why.clone()));
        StoreError::Io(why)
    }

    /// Applies the log entries after the embedded store's last one; returns the next
    /// sequence number.
    async fn catch_up(&self) -> Result<u64, StoreError> {
        let prefix = &self.inner.opts.prefix;
        let mut kv = self.inner.client.kv_client();
        let mut next = {
            let local = self.inner.local.clone();
            tokio::task::spawn_blocking(move || local.applied())
                .await
                .map_err(|e| etcd_err("reading the applied position", e))??
                + 1
        };
        let end = format!("{prefix}/log0");
        loop {
            let page = kv
                .get(
                    log_key(prefix, next),
                    Some(GetOptions::new().with_range(end.clone()).with_limit(32)),
                )
                .await
                .map_err(|e| etcd_err("reading the log", e))?;
            if page.kvs().is_empty() {
                let local = self.inner.local.clone();
                tokio::task::spawn_blocking(move || local.sync())
                    .await
                    .map_err(|e| etcd_err("syncing the embedded store", e))??;
                return Ok(next);
            }
            for kv_pair in page.kvs() {
                let want = log_key(prefix, next);
                if kv_pair.key() != want.as_bytes() {
                    return Err(StoreError::Corrupt(format!(
                        "etcd log: expected {want}, found {}; the log has a gap",
                        String::from_utf8_lossy(kv_pair.key())
                    )));
                }
                let set = self.read_entry(next, kv_pair.value()).await?;
                let local = self.inner.local.clone();
                let seq = next;
                tokio::task::spawn_blocking(move || local.apply_replicated(set, seq, seq % FSYNC_EVERY == 0))
                    .await
                    .map_err(|e| etcd_err("applying the log", e))??;
                next += 1;
            }
            if !page.more() {
                let local = self.inner.local.clone();
                tokio::task::spawn_blocking(move || local.sync())
                    .await
                    .map_err(|e| etcd_err("syncing the embedded store", e))??;
                return Ok(next);
            }
        }
    }

    /// The WriteSet of log entry `seq` (its files staged in the embedded store).
    async fn read_entry(&self, seq: u64, value: &[u8]) -> Result<WriteSet, StoreError> {
        let corrupt = |e: postcard::Error| StoreError::Corrupt(format!("etcd log entry {seq}: {e}"));
        let compressed = match postcard::from_bytes::<LogValue>(value).map_err(corrupt)? {
            LogValue::Lz4Inline(bytes) => bytes,
            LogValue::Lz4InParts(p) => {
                let mut bytes = Vec::with_capacity(p.len as usize);
                self.read_parts(seq, p, &mut bytes).await?;
                bytes
            }
        };
        let bytes = lz4_flex::decompress_size_prepended(&compressed)
            .map_err(|e| StoreError::Corrupt(format!("etcd log entry {seq}: {e}")))?;
        let entry: Entry = postcard::from_bytes(&bytes).map_err(corrupt)?;
        let contents: Vec<Parts> = entry
            .inputs
            .iter()
            .map(|i| i.content)
            .chain(entry.files.iter().map(|f| f.1))
            .collect();
        let mut staged = Vec::with_capacity(contents.len());
        for parts in contents {
            let file = self.inner.local.stage()?;
            self.read_parts_to_file(seq, parts, file.path()).await?;
            staged.push(file);
        }
        let mut staged = staged.into_iter();
        entry.into_write_set(|_| {
            staged
                .next()
                .ok_or_else(|| StoreError::Corrupt(format!("etcd log entry {seq}: a file is missing")))
        })
    }

    async fn read_parts(&self, seq: u64, p: Parts, out: &mut impl Write) -> Result<(), StoreError> {
        let prefix = &self.inner.opts.prefix;
        let mut kv = self.inner.client.kv_client();
        let mut n = p.first;
        let end = p.first + p.count;
        while n < end {
            let page = kv
                .get(
                    part_key(prefix, seq, n),
                    Some(GetOptions::new().with_range(part_key(prefix, seq, end)).with_limit(1)),
                )
                .await
                .map_err(|e| etcd_err("reading a part", e))?;
            let Some(part) = page.kvs().first() else {
                return Err(StoreError::Corrupt(format!(
                    "etcd log entry {seq}: part {n} is missing"
                )));
            };
            let raw = lz4_flex::decompress_size_prepended(part.value())
                .map_err(|e| StoreError::Corrupt(format!("etcd log entry {seq}: part {n}: {e}")))?;
            out.write_all(&raw).map_err(|e| etcd_err("writing a part", e))?;
            n += 1;
        }
        Ok(())
    }

    async fn read_parts_to_file(&self, seq: u64, p: Parts, path: &Path) -> Result<(), StoreError> {
        let mut f = std::fs::File::create(path).map_err(|e| etcd_err("staging a file", e))?;
        self.read_parts(seq, p, &mut f).await?;
        f.sync_all().map_err(|e| etcd_err("staging a file", e))?;
        let len = f.metadata().map_err(|e| etcd_err("staging a file", e))?.len();
        if len != p.len {
            return Err(StoreError::Corrupt(format!(
                "etcd log entry {seq}: a file is {len} bytes, its entry says {}",
                p.len
            )));
        }
        Ok(())
    }

    /// One fenced write: `ops` happen only while this replica holds the election (and,
    /// for a log entry, only if the entry is new).
    async fn fenced(&self, mut when: Vec<Compare>, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        if let Some(why) = self.inner.deposed.borrow().clone() {
            return Err(StoreError::Io(why));
        }
        let fence = &self.inner.fence;
        when.push(Compare::create_revision(
            fence.key.clone(),
            CompareOp::Equal,
            fence.revision,
        ));
        let resp = self
            .inner
            .client
            .kv_client()
            .txn(Txn::new().when(when).and_then(ops))
            .await
            .map_err(|e| etcd_err("committing", e))?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(self.depose(format!(
                "this control plane ({}) is no longer the elected one: another replica holds {}; its commit was refused",
                self.inner.opts.name,
                String::from_utf8_lossy(&fence.key)
            )))
        }
    }

    /// Writes `bytes` (or the file at `path`) as parts of entry `seq` from part `*n` on.
    async fn write_parts(&self, seq: u64, n: &mut u32, mut src: impl Read) -> Result<Parts, StoreError> {
        let first = *n;
        let mut len = 0u64;
        let mut buf = vec![0u8; self.inner.opts.part_bytes];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let got = src
                    .read(&mut buf[filled..])
                    .map_err(|e| etcd_err("reading a file to replicate", e))?;
                if got == 0 {
                    break;
                }
                filled += got;
            }
            if filled == 0 {
                break;
            }
            let key = part_key(&self.inner.opts.prefix, seq, *n);
            let value = lz4_flex::compress_prepend_size(&buf[..filled]);
            self.fenced(vec![], vec![TxnOp::put(key, value, None)]).await?;
            *n += 1;
            len += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        Ok(Parts {
            first,
            count: *n - first,
            len,
        })
    }
}

/// Waits until this replica holds the leader key; returns its fence and lease.
async fn campaign(
    client: &etcd_client::Client,
    opts: &EtcdOptions,
    waiting: &Waiting,
) -> Result<(Fence, i64), StoreError> {
    let key = format!("{}/leader", opts.prefix).into_bytes();
    let mut kv = client.kv_client();
    let mut lease_client = client.lease_client();
    let mut last_told = None::<std::time::Instant>;
    loop {
        let lease = lease_client
            .grant(opts.lease_ttl_s, None)
            .await
            .map_err(|e| etcd_err("granting a lease", e))?
            .id();
        let put = TxnOp::put(
            key.clone(),
            opts.name.clone(),
            Some(PutOptions::new().with_lease(lease)),
        );
        let resp = kv
            .txn(
                Txn::new()
                    .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then(vec![put.clone()])
                    .or_else(vec![TxnOp::get(key.clone(), None)]),
            )
            .await
            .map_err(|e| etcd_err("campaigning", e))?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            return Ok((Fence { key, revision }, lease));
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| (String::from_utf8_lossy(kv.value()).to_string(), kv.create_revision())),
            _ => None,
        });
        if let Some((name, revision)) = &holder
            && name == &opts.name
        {
            // This replica held it before it restarted (a replica's embedded store admits
            // one process): take it over at once, as a new key, so that writes of the
            // previous process, were it still alive, are refused.
            let resp = kv
                .txn(
                    Txn::new()
                        .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, *revision)])
                        .and_then(vec![TxnOp::delete(key.clone(), None)]),
                )
                .await
                .map_err(|e| etcd_err("taking over the election", e))?;
            let _ = resp;
            let _ = lease_client.revoke(lease).await;
            continue;
        }
        let _ = lease_client.revoke(lease).await;
        if last_told.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            waiting(holder.as_ref().map_or("(none)", |(n, _)| n.as_str()));
            last_told = Some(std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps `<prefix>/replicas/<name>` on a lease of its own while the replica runs, waiting
/// or elected, so that `members` lists it.
async fn be_present(client: etcd_client::Client, opts: EtcdOptions) {
    let mut leases = client.lease_client();
    let Ok(grant) = leases.grant(opts.lease_ttl_s.max(1), None).await else {
        return;
    };
    let key = format!("{}/replicas/{}", opts.prefix, opts.name);
    if client
        .kv_client()
        .put(key, "", Some(PutOptions::new().with_lease(grant.id())))
        .await
        .is_err()
    {
        return;
    }
    let Ok((mut keeper, mut stream)) = leases.keep_alive(grant.id()).await else {
        return;
    };
    let every = Duration::from_millis((opts.lease_ttl_s.max(1) as u64 * 1000) / 3);
    loop {
        if keeper.keep_alive().await.is_err() || !matches!(stream.message().await, Ok(Some(_))) {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// A replica of a control plane on etcd, as `members` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// The elected one, which serves.
    pub leader: bool,
}

async fn connect(endpoints: &[String]) -> Result<etcd_client::Client, StoreError> {
    let connect = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    etcd_client::Client::connect(endpoints, Some(connect))
        .await
        .map_err(|e| StoreError::Open {
            path: endpoints.join(","),
            cause: format!("cannot connect to etcd: {e}"),
        })
}

/// The name the leader key under `prefix` holds, if a replica is elected.
async fn leader_of(kv: &mut etcd_client::KvClient, prefix: &str) -> Result<Option<String>, StoreError> {
    Ok(kv
        .get(format!("{prefix}/leader"), None)
        .await
        .map_err(|e| etcd_err("reading the leader", e))?
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).to_string()))
}

/// The replicas running on `prefix` (waiting or elected), and which one is elected (it may
/// be listed alone for a moment after it started).
pub async fn members(endpoints: &[String], prefix: &str) -> Result<Vec<Member>, StoreError> {
    let prefix = prefix.trim_end_matches('/');
    let mut kv = connect(endpoints).await?.kv_client();
    let leader = leader_of(&mut kv, prefix).await?;
    let dir = format!("{prefix}/replicas/");
    let listed = kv
        .get(dir.as_str(), Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .map_err(|e| etcd_err("reading the replicas", e))?;
    let mut out: Vec<Member> = listed
        .kvs()
        .iter()
        .map(|kv| {
            let name = String::from_utf8_lossy(&kv.key()[dir.len()..]).to_string();
            Member {
                leader: leader.as_deref() == Some(name.as_str()),
                name,
            }
        })
        .collect();
    if let Some(l) = leader
        && !out.iter().any(|m| m.name == l)
    {
        out.push(Member { name: l, leader: true });
    }
    out.sort_by(|a, b| b.leader.cmp(&a.leader).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// Asks the elected replica on `prefix` to step down (it does at its next lease renewal,
/// within a third of the lease's life, and exits; a waiting replica is elected). Returns
/// its name.
pub async fn step_down(endpoints: &[String], prefix: &str) -> Result<String, StoreError> {
    let prefix = prefix.trim_end_matches('/');
    let client = connect(endpoints).await?;
    let mut kv = client.kv_client();
    let leader = leader_of(&mut kv, prefix)
        .await?
        .ok_or_else(|| StoreError::Io(format!("no replica is elected under {prefix}")))?;
    // The request lapses after a minute, so that it cannot make a later replica of the
    // same name step down.
    let lease = client
        .lease_client()
        .grant(60, None)
        .await
        .map_err(|e| etcd_err("asking the leader to step down", e))?
        .id();
    kv.put(
        format!("{prefix}/resign"),
        leader.clone(),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .map_err(|e| etcd_err("asking the leader to step down", e))?;
    Ok(leader)
}

/// Renews the lease every third of its life; on failure, says the replica is deposed. Also
/// by its own clock: once a whole lease life has passed since the last renewal etcd
/// confirmed (the process was paused, or etcd is unreachable), the lease may have expired
/// and another replica may be elected, so the replica counts itself deposed at once rather
/// than at its next refused write.
async fn keep_alive(
    client: etcd_client::Client,
    lease: i64,
    ttl_s: i64,
    prefix: &str,
    name: &str,
    deposed: tokio::sync::watch::Sender<Option<String>>,
) {
    let resign_key = format!("{prefix}/resign");
    let ttl = Duration::from_secs(ttl_s.max(1) as u64);
    let every = ttl / 3;
    let renewed = std::sync::Mutex::new(tokio::time::Instant::now());
    let renewals = async {
        let mut lease_client = client.lease_client();
        match lease_client.keep_alive(lease).await {
            Err(e) => format!("cannot renew the election lease: {e}"),
            Ok((mut keeper, mut stream)) => loop {
                let asked = tokio::time::Instant::now();
                if let Err(e) = keeper.keep_alive().await {
                    break format!("cannot renew the election lease: {e}");
                }
                match tokio::time::timeout(every, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        if let Ok(mut t) = renewed.lock() {
                            *t = asked;
                        }
                        // Asked to step down (`tokenfab admin members --step-down`)?
                        let mut kv = client.kv_client();
                        let asked_to = kv
                            .get(resign_key.as_str(), None)
                            .await
                            .ok()
                            .and_then(|g| g.kvs().first().map(|kv| kv.value() == name.as_bytes()))
                            .unwrap_or(false);
                        if asked_to {
                            let _ = kv.delete(resign_key.as_str(), None).await;
                            // The leader key goes with the lease: another replica is elected now.
                            let _ = client.lease_client().revoke(lease).await;
                            break "asked to step down (tokenfab admin members --step-down)".to_string();
                        }
                    }
                    Ok(Ok(Some(_))) => break "the election lease expired".to_string(),
                    Ok(Ok(None)) => break "etcd closed the lease stream".to_string(),
                    Ok(Err(e)) => break format!("cannot renew the election lease: {e}"),
                    Err(_) => break "etcd did not answer a lease renewal in time".to_string(),
                }
                tokio::time::sleep(every).await;
            },
        }
    };
    let watchdog = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let since = renewed.lock().map(|t| t.elapsed()).unwrap_or(Duration::MAX);
            if since >= ttl {
                break format!(
                    "no lease renewal confirmed for {since:?} (the lease lasts {ttl:?}): another replica may be elected"
                );
            }
        }
    };
    let why = tokio::select! {
        why = renewals => why,
        why = watchdog => why,
    };
    deposed.send_replace(Some(format!("lost the election: {why}")));
}

impl EtcdStore {
    /// [`Store::apply`]: the commit to etcd first (fenced), then to the embedded store.
    async fn apply_replicated(&self, set: WriteSet) -> Result<(), StoreError> {
        let seq = self.append(&set).await?;
        // Committed: the embedded store follows. Should that fail, `reopen` applies the
        // entry from the log.
        let local = self.inner.local.clone();
        let fsync = seq % FSYNC_EVERY == 0;
        tokio::task::spawn_blocking(move || local.apply_replicated(set, seq, fsync))
            .await
            .map_err(|e| etcd_err("applying a commit", e))?
    }

    /// Writes `set` to the log (its parts, then its entry, each fenced); its number.
    async fn append(&self, set: &WriteSet) -> Result<u64, StoreError> {
        let mut next = self.inner.next.lock().await;
        let seq = *next;
        let mut n = 0u32;
        let mut contents = Vec::with_capacity(set.inputs.len() + set.files.len());
        for path in set
            .inputs
            .iter()
            .map(|i| i.file.path())
            .chain(set.files.iter().map(|f| f.1.path()))
        {
            let f = std::fs::File::open(path).map_err(|e| etcd_err("reading a file to replicate", e))?;
            contents.push(self.write_parts(seq, &mut n, f).await?);
        }
        let mut contents = contents.into_iter();
        let entry = Entry::describe(set, |_| {
            contents
                .next()
                .ok_or_else(|| etcd_err("describing a commit", "a file is missing"))
        })?;
        let bytes = postcard::to_allocvec(&entry).map_err(|e| etcd_err("encoding a commit", e))?;
        let bytes = lz4_flex::compress_prepend_size(&bytes);
        let value = if bytes.len() <= self.inner.opts.part_bytes {
            LogValue::Lz4Inline(bytes)
        } else {
            // Parts are compressed again (little gain, and one format for every part).
            LogValue::Lz4InParts(self.write_parts(seq, &mut n, bytes.as_slice()).await?)
        };
        let value = postcard::to_allocvec(&value).map_err(|e| etcd_err("encoding a commit", e))?;
        let key = log_key(&self.inner.opts.prefix, seq);
        self.fenced(
            vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
            vec![TxnOp::put(key, value, None)],
        )
        .await?;
        *next = seq + 1;
        self.inner.position.store(seq, std::sync::atomic::Ordering::Relaxed);
        Ok(seq)
    }

    /// The planted bug (see `fault_ack_before_replication`).
    async fn apply_acking_before_replication(&self, set: WriteSet) -> Result<(), StoreError> {
        let mut replay = WriteSet {
            ops: set.ops.clone(),
            ..Default::default()
        };
        for input in &set.inputs {
            let file = self.inner.local.stage()?;
            std::fs::copy(input.file.path(), file.path()).map_err(|e| etcd_err("copying an input", e))?;
            replay.inputs.push(BatchInputs {
                batch: input.batch,
                file,
                requests: input.requests.clone(),
                line_errors: input.line_errors.clone(),
            });
        }
        self.inner.local.apply(set).await?;
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = me.append(&replay).await;
        });
        Ok(())
    }
}

impl Store for EtcdStore {
    tokenfab_store::reads_from_embedded_store!(local);

    async fn apply(&self, set: WriteSet) -> Result<(), StoreError> {
        if set.is_empty() {
            return Ok(());
        }
        if self.inner.fault_ack_before_replication {
            return self.apply_acking_before_replication(set).await;
        }
        self.apply_replicated(set).await
    }

    async fn reopen(&self) -> Result<(), StoreError> {
        self.inner.local.reopen().await?;
        let _guard = self.inner.next.lock().await;
        self.catch_up().await.map(|_| ())
    }

    fn describe(&self) -> tokenfab_store::StoreInfo {
        tokenfab_store::StoreInfo {
            backend: "etcd",
            replica: Some(self.inner.opts.name.clone()),
            log_position: Some(self.inner.position.load(std::sync::atomic::Ordering::Relaxed)),
        }
    }
}
