//! The one task that owns the control core.
//!
//! RPC handlers send [`Command`]s; the loop applies every command waiting in the channel
//! to the core, collects what the core asks to persist into one [`WriteSet`], commits it
//! (one fsync for the whole round: group commit) and only then sends the replies that
//! promise durability. While a commit runs, new commands queue up and form the next
//! round, so the commit rate adapts to the load.
//!
//! Only replies that acknowledge something durable (a batch, results, a cancel, a
//! deletion) wait for the commit. A read (get, list, watch, usage) is answered at once
//! from the core's state unless a batch it shows changed in a round not yet committed;
//! then it waits for that commit, so that nobody sees a state a crash could take back
//! (a batch shown completed has all its results in the store). No tenant waits behind a
//! commit that does not touch its own batches.
//! Agent traffic that carries nothing durable (register, heartbeat, lease, release) is
//! answered at once too: leases are not durable, and a lease of work whose batch then
//! failed to commit only causes an engine call whose result is refused (duplicate engine
//! calls are allowed; duplicate results are not).
//!
//! Request bodies are not held here: a lease's bodies are read from the store by a task
//! of their own, off this loop, and sent to the agent from there; if the agent is gone,
//! or the bodies cannot be read, the lease is released. A batch is queued (and can be
//! leased) as soon as the core accepts it, before its commit: a lease of such a batch
//! waits for that commit (and only that one) before its bodies are read.
//!
//! If a commit fails (a full disk, an I/O error), the replies that depended on it are
//! dropped (their callers get UNAVAILABLE and retry), the store is reopened and the core
//! rebuilt from what is durable: the in-memory state is never trusted past a failed
//! commit, and the control plane keeps serving once the store works again.

use crate::health::Health;
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokenfab_core::FileId;
use tokenfab_core::batch_input::{Endpoint, LineError, ParsedRequest};
use tokenfab_core::control::{
    Action, BatchError, BatchView, ControlConfig, ControlCore, FileError, HeartbeatReply, LeaseAnswer, LeaseGrant,
    NewBatch, NodeRegistration, ReplicaReport, ReportSummary, ReportedResult, SubmitError, UnknownNode,
};
use tokenfab_core::durable::DurableOp;
use tokenfab_core::durable::FileMeta;
use tokenfab_core::protocol::{ControlInput, ControlReply, ControlStart, Durable, InputSeq, Persisted};
use tokenfab_core::{BatchId, ModelId, NodeId, RequestRef, TenantId, Timestamp, WorkUnitId};
use tokenfab_proto::v1 as pb;
use tokenfab_record::Recorder;
use tokenfab_store::{BatchInputs, LeasedBody, StagedInput, Store, StoreError, WriteSet};
use tokio::sync::{mpsc, oneshot, watch};

type Reply<T> = oneshot::Sender<T>;

/// A file and when its retention ends.
pub type FileView = (FileMeta, Option<Timestamp>);
/// A page of files, and whether more follow.
pub type FilePage = (Vec<FileView>, bool);

/// A new batch's input, parsed: the file (in the store's staging area) and what the
/// parser found in it.
#[derive(Debug)]
pub struct Inputs {
    pub file: StagedInput,
    /// The staged file, open for reading (it stays readable when the commit moves it).
    pub reader: Arc<std::fs::File>,
    pub requests: Arc<Vec<ParsedRequest>>,
    pub line_errors: Vec<LineError>,
}

pub enum Command {
    Submit {
        new: NewBatch,
        inputs: Inputs,
        reply: Reply<Result<BatchView, SubmitError>>,
    },
    Get {
        tenant: TenantId,
        id: BatchId,
        reply: Reply<Result<BatchView, BatchError>>,
    },
    Usage {
        tenant: TenantId,
        since: Timestamp,
        reply: Reply<tokenfab_core::control::TenantUsage>,
    },
    List {
        tenant: TenantId,
        before: Option<BatchId>,
        limit: usize,
        reply: Reply<(Vec<BatchView>, bool)>,
    },
    Cancel {
        tenant: TenantId,
        id: BatchId,
        reply: Reply<Result<BatchView, BatchError>>,
    },
    Delete {
        tenant: TenantId,
        id: BatchId,
        reply: Reply<Result<(), BatchError>>,
    },
    Watch {
        tenant: TenantId,
        id: BatchId,
        reply: Reply<Result<watch::Receiver<BatchView>, BatchError>>,
    },
    /// An uploaded file, its content staged.
    AddFile {
        tenant: TenantId,
        filename: String,
        purpose: String,
        content: StagedInput,
        bytes: u64,
        reply: Reply<Result<FileMeta, SubmitError>>,
    },
    GetFile {
        tenant: TenantId,
        id: FileId,
        reply: Reply<Result<FileView, FileError>>,
    },
    ListFiles {
        tenant: TenantId,
        after: Option<FileId>,
        limit: usize,
        ascending: bool,
        reply: Reply<FilePage>,
    },
    DeleteFile {
        tenant: TenantId,
        id: FileId,
        reply: Reply<Result<(), FileError>>,
    },
    Register {
        registration: NodeRegistration,
        reply: Reply<()>,
    },
    Heartbeat {
        node: NodeId,
        held: Vec<WorkUnitId>,
        replicas: Vec<ReplicaReport>,
        reply: Reply<Result<HeartbeatReply, UnknownNode>>,
    },
    Lease {
        node: NodeId,
        model: ModelId,
        max: u32,
        /// How long to wait for work if there is none (a long poll).
        wait: std::time::Duration,
        reply: Reply<LeaseReply>,
    },
    Report {
        node: NodeId,
        results: Vec<ReportedResult>,
        reply: Reply<Result<ReportSummary, UnknownNode>>,
    },
    Release {
        node: NodeId,
        unit: WorkUnitId,
        items: Vec<RequestRef>,
        reply: Reply<Result<u32, UnknownNode>>,
    },
    /// A grant that could not be handed over (the agent hung up): its requests go back on
    /// the queue.
    ReleaseGrant {
        node: NodeId,
        unit: WorkUnitId,
        items: Vec<RequestRef>,
    },
    /// Leased requests whose bodies the store could not read back: they end as
    /// `input_lost`.
    InputsLost { unit: WorkUnitId, items: Vec<RequestRef> },
}

/// Unix time in microseconds: the control plane's `now`.
pub fn now() -> Timestamp {
    let us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    Timestamp::from_micros(us)
}

/// The most commands applied in one round before committing.
const MAX_ROUND: usize = 4096;

/// What to do once a round's writes are committed: answer the callers whose
/// [`Durable`] replies the mark opens.
type Replies = Vec<Box<dyn FnOnce(Persisted) + Send>>;

/// The input of a batch whose commit is under way, as parsed at submission.
#[derive(Clone)]
struct Fresh {
    /// The round that commits it.
    seq: u64,
    file: Arc<std::fs::File>,
    endpoint: Endpoint,
    requests: Arc<Vec<ParsedRequest>>,
}

impl Fresh {
    /// The bodies of `refs` that belong to batches in `fresh` (the others stay `None`).
    fn read(fresh: &HashMap<BatchId, Fresh>, refs: &[RequestRef]) -> Vec<Option<LeasedBody>> {
        let mut out = vec![None; refs.len()];
        for (batch, f) in fresh {
            let wanted: Vec<(usize, &ParsedRequest)> = refs
                .iter()
                .enumerate()
                .filter(|(_, r)| r.batch == *batch)
                .filter_map(|(pos, r)| Some((pos, f.requests.get(r.index as usize)?)))
                .collect();
            tokenfab_store::read_bodies(&f.file, f.endpoint, refs, wanted, &mut out);
        }
        out
    }
}

/// Changes waiting for the next commit, and the replies that depend on it.
#[derive(Default)]
struct Round {
    set: WriteSet,
    replies: Replies,
    changed: Vec<BatchId>,
    /// The last input whose actions the round holds.
    through: InputSeq,
}

struct InFlight {
    /// The round's sequence number.
    seq: u64,
    /// The last input whose writes it commits.
    through: InputSeq,
    handle: tokio::task::JoinHandle<Result<(), StoreError>>,
    replies: Replies,
    changed: Vec<BatchId>,
    started: std::time::Instant,
}

#[allow(clippy::large_enum_variant)] // one lives on the stack at a time; boxing buys nothing
enum Event {
    Command(Option<Command>),
    Timer,
    Committed(Result<Result<(), StoreError>, tokio::task::JoinError>),
    Housekeeping,
}

/// The documents the HTTP endpoints and `SlaService` serve, computed by the loop at most
/// once a second, only while somebody asks: reading them never reaches the core.
#[derive(Clone)]
pub struct Views {
    pub sla: Arc<tokenfab_core::sla::ThroughputSla>,
    pub tuning: Arc<tokenfab_core::control::TuningDoc>,
    pub at: std::time::Instant,
}

/// Where readers find [`Views`] and ask for fresher ones.
pub struct ViewBoard {
    pub rx: watch::Receiver<Views>,
    wanted: std::sync::atomic::AtomicBool,
}

impl ViewBoard {
    /// Views computed after this call began (so a reader sees every change acknowledged
    /// before it asked): the loop computes them at its next housekeeping tick, at most
    /// once a second however many readers wait. Waits at most two seconds, then answers
    /// the latest views there are.
    pub async fn fresh(&self) -> Views {
        let asked = std::time::Instant::now();
        let mut rx = self.rx.clone();
        if rx.borrow_and_update().at >= asked {
            return rx.borrow().clone();
        }
        self.wanted.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|v| v.at >= asked)).await;
        rx.borrow().clone()
    }
}

pub struct CoreLoop<S> {
    core: ControlCore,
    config: ControlConfig,
    store: S,
    /// Inputs of batches the core accepted this round, until their commit takes them.
    inputs: HashMap<BatchId, BatchInputs>,
    /// Contents of files the core accepted this round, until their commit takes them.
    files: HashMap<FileId, StagedInput>,
    watchers: HashMap<BatchId, watch::Sender<BatchView>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    views: watch::Sender<Views>,
    board: Arc<ViewBoard>,
    /// For lease tasks to give back what they could not hand over.
    commands: mpsc::WeakSender<Command>,
    /// Lease calls waiting for work, by ticket.
    waiting: HashMap<u64, Reply<LeaseReply>>,
    next_ticket: u64,
    /// The sequence number the round being collected will commit as.
    next_seq: u64,
    /// Batches created in rounds not yet committed: leases read their bodies from the
    /// staged input instead of waiting for the commit.
    fresh: HashMap<BatchId, Fresh>,
    /// Batches changed in rounds not yet committed, with the last such round's number:
    /// reads that show them wait for it.
    dirty: HashMap<BatchId, u64>,
    /// When the metering and SLA metrics were last refreshed.
    sla_observed: std::time::Instant,
    /// The flight recorder (`--record`): every input the core receives.
    recorder: Option<Recorder>,
}

/// How often the metering and SLA metrics are refreshed.
const SLA_METRICS_EVERY: Duration = Duration::from_secs(5);
/// How often free disk space is measured, health updated and wanted views computed.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// The answer to a lease call.
pub type LeaseReply = Result<Option<pb::WorkUnit>, UnknownNode>;

/// Everything the core asks the shell to do now, recorded (and the recording flushed:
/// this ends a round) when the flight recorder is on.
fn take_actions(core: &mut ControlCore, recorder: &mut Option<Recorder>) -> Vec<Action> {
    let actions: Vec<Action> = std::iter::from_fn(|| core.poll_action()).collect();
    if let Some(r) = recorder.as_mut() {
        r.actions(&actions);
        r.flush();
    }
    actions
}

/// Rebuilds a core from what the store holds, and writes what recovery completes. With a
/// flight recorder, the core's start is a new segment of the recording.
async fn rebuild<S: Store>(
    store: &S,
    config: &ControlConfig,
    recorder: &mut Option<Recorder>,
) -> Result<(ControlCore, Vec<String>), StoreError> {
    let loaded = store.load().await?;
    for p in &loaded.problems {
        tracing::error!("{p}");
    }
    let recovered = loaded.batches.len();
    let start = ControlStart {
        batches: loaded.batches.into_iter().map(|l| l.batch).collect(),
        idle: store.idle_shares().await?,
        history: store.history().await?,
        next_batch: loaded.next_batch,
        files: loaded.files,
        next_file: loaded.next_file,
        free_bytes: store.free_bytes(),
    };
    let at = now();
    if let Some(r) = recorder.as_mut() {
        r.start(at, config, &start);
    }
    let mut core = ControlCore::start(config.clone(), start, at);
    // Completing batches found whole during recovery must be written too.
    let mut set = WriteSet::default();
    for a in take_actions(&mut core, recorder) {
        if let Action::Persist(op) = a {
            set.ops.push(op);
        }
    }
    store.apply(set).await?;
    tracing::info!(
        batches = recovered,
        unreadable = loaded.problems.len(),
        "recovered durable state"
    );
    Ok((core, loaded.problems))
}

impl<S: Store + Clone> CoreLoop<S> {
    /// Rebuilds the core from the store.
    pub async fn recover(
        store: S,
        config: ControlConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        commands: mpsc::WeakSender<Command>,
        mut recorder: Option<Recorder>,
    ) -> Result<(Self, Arc<ViewBoard>), StoreError> {
        let (core, problems) = rebuild(&store, &config, &mut recorder).await?;
        health.unreadable(problems);
        let first = Views {
            sla: Arc::new(with_durability(core.sla_document(now()), &store.describe())),
            tuning: Arc::new(core.tuning_doc()),
            at: std::time::Instant::now(),
        };
        let (views, rx) = watch::channel(first);
        let board = Arc::new(ViewBoard {
            rx,
            wanted: std::sync::atomic::AtomicBool::new(false),
        });
        let me = CoreLoop {
            core,
            config,
            store,
            inputs: HashMap::new(),
            files: HashMap::new(),
            watchers: HashMap::new(),
            metrics,
            health,
            views,
            board: board.clone(),
            commands,
            waiting: HashMap::new(),
            next_ticket: 0,
            next_seq: 1,
            fresh: HashMap::new(),
            dirty: HashMap::new(),
            sla_observed: std::time::Instant::now()
                .checked_sub(SLA_METRICS_EVERY)
                .unwrap_or_else(std::time::Instant::now),
            recorder,
        };
        Ok((me, board))
    }

    /// Runs until the channel closes (shutdown).
    ///
    /// Commits are pipelined: while one commit is in flight the loop keeps applying
    /// commands; their changes and deferred replies form the next commit, which starts
    /// when the one in flight is done. Commits stay in order, and a round with nothing to
    /// persist still waits behind the commit in flight before its replies go out.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), StoreError> {
        let mut next = Round::default();
        let mut inflight: Option<InFlight> = None;
        let mut closed = false;
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.core.poll_timeout();
            let event = tokio::select! {
                cmd = rx.recv(), if !closed => Event::Command(cmd),
                _ = sleep_until_unix(wake) => Event::Timer,
                r = async {
                    match inflight.as_mut() {
                        Some(c) => (&mut c.handle).await,
                        None => std::future::pending().await,
                    }
                } => Event::Committed(r),
                _ = housekeeping.tick() => Event::Housekeeping,
            };
            match event {
                Event::Command(Some(first)) => {
                    let mut round = vec![first];
                    while round.len() < MAX_ROUND {
                        match rx.try_recv() {
                            Ok(c) => round.push(c),
                            Err(_) => break,
                        }
                    }
                    let now = now();
                    self.call(now, ControlInput::Timeout);
                    for cmd in round {
                        self.apply(now, cmd, &mut next.replies);
                    }
                    self.collect(&mut next);
                }
                Event::Command(None) => closed = true,
                Event::Timer => {
                    self.call(now(), ControlInput::Timeout);
                    self.collect(&mut next);
                }
                Event::Housekeeping => self.housekeeping(),
                Event::Committed(r) => {
                    let done = inflight.take().expect("a commit was in flight");
                    let r = r.unwrap_or_else(|e| Err(StoreError::Io(format!("commit task failed: {e}"))));
                    match r {
                        Ok(()) => {
                            self.fresh.retain(|_, f| f.seq > done.seq);
                            self.dirty.retain(|_, s| *s > done.seq);
                            self.metrics.commits.inc();
                            self.metrics
                                .commit_seconds
                                .observe(done.started.elapsed().as_secs_f64());
                            let persisted = self.core.advance(done.through);
                            for reply in done.replies {
                                reply(persisted);
                            }
                            self.publish(done.changed);
                        }
                        Err(e) => {
                            // Neither the failed round nor the one built on it is
                            // durable: their callers are not answered (UNAVAILABLE).
                            drop(done);
                            next = Round::default();
                            self.recover_in_place(e, &mut rx).await;
                        }
                    }
                }
            }
            if inflight.is_none() {
                let round = std::mem::take(&mut next);
                if !round.set.is_empty() {
                    let store = self.store.clone();
                    let set = round.set;
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    inflight = Some(InFlight {
                        seq,
                        through: round.through,
                        handle: tokio::spawn(async move { store.apply(set).await }),
                        replies: round.replies,
                        changed: round.changed,
                        started: std::time::Instant::now(),
                    });
                } else {
                    // Nothing to persist and nothing in flight: all state is durable.
                    let persisted = self.core.advance(round.through);
                    for reply in round.replies {
                        reply(persisted);
                    }
                    self.publish(round.changed);
                }
            }
            self.metrics.observe_core(&self.core.stats());
            if closed && inflight.is_none() {
                return Ok(());
            }
        }
    }

    /// After a failed commit: reopens the store and rebuilds the core from what is
    /// durable, retrying until that works. Commands that arrive meanwhile are not
    /// answered (UNAVAILABLE: retry).
    async fn recover_in_place(&mut self, error: StoreError, rx: &mut mpsc::Receiver<Command>) {
        tracing::error!(error = %error, "a commit failed; nothing of it was acknowledged. Reopening the store and rebuilding from durable state");
        self.metrics.store_failures.inc();
        self.health.store_failed(&error.to_string());
        self.waiting.clear();
        self.inputs.clear();
        self.files.clear();
        self.fresh.clear();
        self.dirty.clear();
        let mut backoff = Duration::from_millis(200);
        loop {
            while rx.try_recv().is_ok() {}
            let attempt = async {
                self.store.reopen().await?;
                rebuild(&self.store, &self.config, &mut self.recorder).await
            };
            match attempt.await {
                Ok((core, problems)) => {
                    self.core = core;
                    self.health.unreadable(problems);
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?backoff, "the store is not usable yet");
                    self.health.store_failed(&e.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.health.store_recovered();
        tracing::info!("the store works again; serving");
        let watched: Vec<BatchId> = self.watchers.keys().copied().collect();
        self.publish(watched);
    }

    /// Once a second: free disk space into the core, health, metrics, and the views
    /// somebody asked for.
    fn housekeeping(&mut self) {
        let free = self.store.free_bytes();
        self.call(now(), ControlInput::FreeBytes(free));
        let low = self.core.storage_low();
        self.health.disk(free, self.config.min_free_bytes, low);
        self.metrics.observe_disk(free, low);
        let info = self.store.describe();
        self.metrics.observe_store(&info);
        self.health.store_info(info.clone());
        let t = now();
        let wanted = self.board.wanted.swap(false, std::sync::atomic::Ordering::Relaxed);
        let metrics_due = self.sla_observed.elapsed() >= SLA_METRICS_EVERY;
        if wanted || metrics_due {
            let views = Views {
                sla: Arc::new(with_durability(self.core.sla_document(t), &info)),
                tuning: Arc::new(self.core.tuning_doc()),
                at: std::time::Instant::now(),
            };
            if metrics_due {
                self.sla_observed = std::time::Instant::now();
                self.metrics
                    .observe_tenants(self.core.tenant_totals(), self.core.idle_unallocated_j());
                self.metrics
                    .observe_replicas(&views.tuning.replicas, views.tuning.fragmentation);
                self.metrics.observe_sla(&views.sla);
            }
            self.views.send_replace(views);
        }
    }

    /// Moves what the core asks for into `round`: operations to persist (with the inputs
    /// of new batches), batches whose view changed, and answers to waiting leases.
    fn collect(&mut self, round: &mut Round) {
        round.through = self.core.handled();
        for a in take_actions(&mut self.core, &mut self.recorder) {
            match a {
                Action::Persist(op) => {
                    if let DurableOp::CreateBatch { meta, .. } = &op
                        && let Some(inputs) = self.inputs.remove(&meta.id)
                    {
                        round.set.inputs.push(inputs);
                    }
                    if let DurableOp::CreateFile { meta } = &op
                        && let Some(content) = self.files.remove(&meta.id)
                    {
                        round.set.files.push((meta.id, content));
                    }
                    round.set.ops.push(op);
                }
                Action::BatchChanged(id) => {
                    self.dirty.insert(id, self.next_seq);
                    round.changed.push(id);
                }
                Action::LeaseReady {
                    ticket, node, grant, ..
                } => {
                    let Some(reply) = self.waiting.remove(&ticket) else {
                        continue;
                    };
                    match grant {
                        Some(grant) => self.hand_over(node, grant, reply),
                        None => {
                            let _ = reply.send(Ok(None));
                        }
                    }
                }
            }
        }
    }

    /// Hands one input to the core (and to the flight recorder, with the core's reply).
    fn call(&mut self, now: Timestamp, input: ControlInput) -> ControlReply {
        let recorded = self.recorder.as_ref().and_then(|r| r.prepare(&input));
        let reply = self.core.handle(now, input);
        if let Some(r) = self.recorder.as_mut() {
            r.input(now, recorded, &reply);
        }
        reply
    }

    fn apply(&mut self, now: Timestamp, cmd: Command, replies: &mut Replies) {
        /// Answers once the round's commit opens the reply.
        fn later<T: Send + 'static>(replies: &mut Replies, tx: Reply<T>, v: Durable<T>) {
            replies.push(Box::new(move |persisted| match v.release(persisted) {
                Ok(v) => {
                    let _ = tx.send(v);
                }
                // Cannot happen while rounds commit in order; if it did, the caller is
                // not answered (UNAVAILABLE) rather than told something not yet durable.
                Err(v) => tracing::error!(
                    needs = v.needs().0,
                    committed = persisted.through().0,
                    "a reply came up before the writes it promises were committed; not answered"
                ),
            }));
        }
        match cmd {
            Command::Submit { new, inputs, reply } => {
                let ControlReply::Submitted(r) = self.call(now, ControlInput::Submit(new)) else {
                    unreachable!("a submission is answered as one")
                };
                if let Ok(v) = r.peek() {
                    let id = v.meta.id;
                    // Leasable at once: until this round commits, leases read its bodies
                    // from the staged input.
                    self.fresh.insert(
                        id,
                        Fresh {
                            seq: self.next_seq,
                            file: inputs.reader,
                            endpoint: v.meta.endpoint,
                            requests: inputs.requests.clone(),
                        },
                    );
                    self.inputs.insert(
                        id,
                        BatchInputs {
                            batch: id,
                            file: inputs.file,
                            requests: inputs.requests,
                            line_errors: inputs.line_errors,
                        },
                    );
                    // Counted once durable, like the acknowledgement.
                    let metrics = self.metrics.clone();
                    replies.push(Box::new(move |_| {
                        metrics.batches_submitted.inc();
                    }));
                }
                // A refused batch's staged input is deleted with `inputs` here.
                later(replies, reply, r);
            }
            // Reads are answered at once, unless what they show is not yet durable.
            Command::Get { tenant, id, reply } => {
                let r = self.core.batch(&tenant, id);
                self.answer_read(replies, reply, r, &[id]);
            }
            Command::Usage { tenant, since, reply } => {
                let r = self.core.tenant_usage(&tenant, since);
                let dirty: Vec<BatchId> = self
                    .dirty
                    .keys()
                    .copied()
                    .filter(|id| self.core.batch(&tenant, *id).is_ok())
                    .collect();
                self.answer_read(replies, reply, r, &dirty);
            }
            Command::List {
                tenant,
                before,
                limit,
                reply,
            } => {
                let r = self.core.list(&tenant, before, limit);
                let shown: Vec<BatchId> = r.0.iter().map(|v| v.meta.id).collect();
                self.answer_read(replies, reply, r, &shown);
            }
            Command::Cancel { tenant, id, reply } => {
                let ControlReply::Cancelled(r) = self.call(now, ControlInput::Cancel { tenant, batch: id }) else {
                    unreachable!("a cancellation is answered as one")
                };
                later(replies, reply, r);
            }
            Command::Delete { tenant, id, reply } => {
                let ControlReply::BatchDeleted(r) = self.call(now, ControlInput::DeleteBatch { tenant, batch: id })
                else {
                    unreachable!("a deletion is answered as one")
                };
                if r.peek().is_ok() {
                    // Its watchers see no more changes.
                    self.watchers.remove(&id);
                }
                later(replies, reply, r);
            }
            Command::Watch { tenant, id, reply } => {
                let r = self.core.batch(&tenant, id).map(|view| {
                    if view.life.status().is_terminal() {
                        // Nothing will change: a receiver whose sender is already gone
                        // yields this one view and ends.
                        watch::channel(view).1
                    } else {
                        self.watchers
                            .entry(id)
                            .or_insert_with(|| watch::channel(view.clone()).0)
                            .subscribe()
                    }
                });
                self.answer_read(replies, reply, r, &[id]);
            }
            Command::AddFile {
                tenant,
                filename,
                purpose,
                content,
                bytes,
                reply,
            } => {
                let input = ControlInput::AddFile {
                    tenant,
                    filename,
                    bytes,
                    purpose,
                };
                let ControlReply::FileAdded(r) = self.call(now, input) else {
                    unreachable!("an upload is answered as one")
                };
                if let Ok(meta) = r.peek() {
                    self.files.insert(meta.id, content);
                }
                later(replies, reply, r);
            }
            Command::GetFile { tenant, id, reply } => {
                let r = self
                    .core
                    .file(&tenant, id)
                    .map(|f| (f.clone(), self.core.file_expiry(f)));
                let _ = reply.send(r);
            }
            Command::ListFiles {
                tenant,
                after,
                limit,
                ascending,
                reply,
            } => {
                let (files, more) = self.core.list_files(&tenant, after, limit, ascending);
                let files = files
                    .into_iter()
                    .map(|f| {
                        let expires = self.core.file_expiry(&f);
                        (f, expires)
                    })
                    .collect();
                let _ = reply.send((files, more));
            }
            Command::DeleteFile { tenant, id, reply } => {
                let ControlReply::FileDeleted(r) = self.call(now, ControlInput::DeleteFile { tenant, file: id }) else {
                    unreachable!("a deletion is answered as one")
                };
                later(replies, reply, r);
            }
            Command::Register { registration, reply } => {
                tracing::info!(node = %registration.node, devices = registration.devices.len(), replicas = registration.replicas.len(), "node registered");
                self.call(now, ControlInput::Register(registration));
                let _ = reply.send(());
            }
            Command::Heartbeat {
                node,
                held,
                replicas,
                reply,
            } => {
                let ControlReply::Heartbeat(r) = self.call(now, ControlInput::Heartbeat { node, held, replicas })
                else {
                    unreachable!("a heartbeat is answered as one")
                };
                let _ = reply.send(r);
            }
            Command::Lease {
                node,
                model,
                max,
                wait,
                reply,
            } => {
                self.next_ticket += 1;
                let ticket = self.next_ticket;
                let until = now.saturating_add(wait);
                let input = ControlInput::LeaseOrWait {
                    node: node.clone(),
                    model,
                    max,
                    until,
                    ticket,
                };
                let ControlReply::LeaseOrWait(r) = self.call(now, input) else {
                    unreachable!("a lease is answered as one")
                };
                match r {
                    Ok(LeaseAnswer::Granted(g)) => self.hand_over(node, g, reply),
                    Ok(LeaseAnswer::Empty) => {
                        let _ = reply.send(Ok(None));
                    }
                    Ok(LeaseAnswer::Waiting) => {
                        self.waiting.insert(ticket, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Report { node, results, reply } => {
                let ControlReply::Reported(r) = self.call(
                    now,
                    ControlInput::Report {
                        node: node.clone(),
                        results,
                    },
                ) else {
                    unreachable!("a report is answered as one")
                };
                if let Ok(s) = r.peek()
                    && s.not_leased > 0
                {
                    tracing::warn!(node = %node, refused = s.not_leased, "results for requests the node holds no lease on were not recorded");
                }
                later(replies, reply, r);
            }
            Command::Release {
                node,
                unit,
                items,
                reply,
            } => {
                let ControlReply::Released(r) = self.call(now, ControlInput::Release { node, unit, items }) else {
                    unreachable!("a release is answered as one")
                };
                let _ = reply.send(r);
            }
            Command::ReleaseGrant { node, unit, items } => {
                self.call(now, ControlInput::Release { node, unit, items });
            }
            Command::InputsLost { unit, items } => {
                tracing::error!(
                    unit = unit.0,
                    requests = items.len(),
                    "request bodies could not be read back from the store; those requests end as input_lost (run tokenfab admin verify)"
                );
                self.call(now, ControlInput::InputsLost { unit, items });
            }
        }
    }

    /// Answers a read at once, or, when one of the batches it shows changed in a round
    /// not yet committed, once that round is durable.
    fn answer_read<T: Send + 'static>(&self, replies: &mut Replies, tx: Reply<T>, v: T, shows: &[BatchId]) {
        if shows.iter().any(|id| self.dirty.contains_key(id)) {
            replies.push(Box::new(move |_| {
                let _ = tx.send(v);
            }));
        } else {
            let _ = tx.send(v);
        }
    }

    /// Reads a grant's bodies and answers the lease call, off the loop: from the store,
    /// or, for a batch whose commit is under way, from its staged input (a lease does not
    /// wait for the commit; if that commit fails the core is rebuilt without the batch,
    /// and results for the lease are refused as not leased). A grant that cannot be
    /// handed over goes back on the queue.
    fn hand_over(&self, node: NodeId, grant: LeaseGrant, reply: Reply<LeaseReply>) {
        let store = self.store.clone();
        let commands = self.commands.clone();
        let fresh: HashMap<BatchId, Fresh> = grant
            .items
            .iter()
            .filter_map(|i| Some((i.req.batch, self.fresh.get(&i.req.batch)?.clone())))
            .collect();
        tokio::spawn(async move {
            let refs: Vec<RequestRef> = grant.items.iter().map(|i| i.req).collect();
            let staged: Vec<bool> = refs.iter().map(|r| fresh.contains_key(&r.batch)).collect();
            let stored: Vec<RequestRef> = refs
                .iter()
                .zip(&staged)
                .filter(|(_, s)| !**s)
                .map(|(r, _)| *r)
                .collect();
            let from_store = if stored.is_empty() {
                Vec::new()
            } else {
                match store.bodies(stored).await {
                    Ok(bodies) => bodies,
                    Err(e) => {
                        // Not released (it would be leased again at once): the lease
                        // expires and its requests are tried again, attempts counted.
                        tracing::error!(error = %e, unit = grant.unit.0, "cannot read the bodies of a lease; it will expire and be retried");
                        let _ = reply.send(Ok(None));
                        return;
                    }
                }
            };
            let mut bodies = if fresh.is_empty() {
                vec![None; refs.len()]
            } else {
                let (n, refs) = (refs.len(), refs.clone());
                tokio::task::spawn_blocking(move || Fresh::read(&fresh, &refs))
                    .await
                    .unwrap_or_else(|_| vec![None; n])
            };
            let mut from_store = from_store.into_iter();
            for (slot, _) in bodies.iter_mut().zip(&staged).filter(|(_, s)| !**s) {
                *slot = from_store.next().flatten();
            }
            let lost: Vec<RequestRef> = refs
                .iter()
                .zip(&bodies)
                .filter(|(_, b)| b.is_none())
                .map(|(r, _)| *r)
                .collect();
            let sent = reply.send(Ok(Some(work_unit(&grant, bodies)))).is_ok();
            let Some(tx) = commands.upgrade() else { return };
            if !lost.is_empty() {
                let _ = tx
                    .send(Command::InputsLost {
                        unit: grant.unit,
                        items: lost,
                    })
                    .await;
            }
            if !sent {
                let _ = tx
                    .send(Command::ReleaseGrant {
                        node,
                        unit: grant.unit,
                        items: refs,
                    })
                    .await;
            }
        });
    }

    /// Sends fresh views to watchers, and drops the watchers of final batches.
    fn publish(&mut self, mut changed: Vec<BatchId>) {
        changed.sort_unstable();
        changed.dedup();
        for id in changed {
            let Some(w) = self.watchers.get(&id) else {
                continue;
            };
            let Some(view) = self.core.view(id) else {
                self.watchers.remove(&id);
                continue;
            };
            let terminal = view.life.status().is_terminal();
            w.send_replace(view);
            if terminal || w.receiver_count() == 0 {
                self.watchers.remove(&id);
            }
        }
    }
}

fn work_unit(g: &LeaseGrant, bodies: Vec<Option<tokenfab_store::LeasedBody>>) -> pb::WorkUnit {
    let items = g
        .items
        .iter()
        .zip(bodies)
        .filter_map(|(item, body)| {
            let body = body?;
            Some(pb::WorkItem {
                batch: item.req.batch.0,
                index: item.req.index,
                custom_id: body.custom_id,
                url: body.endpoint.path().to_string(),
                body: body.body,
                attempt: item.attempt,
            })
        })
        .collect();
    pb::WorkUnit {
        unit_id: g.unit.0,
        expires_at_unix_ms: g.expires_at.as_millis() as i64,
        items,
    }
}

async fn sleep_until_unix(t: Option<Timestamp>) {
    match t {
        Some(t) => {
            let wait = Duration::from_micros(t.as_micros().saturating_sub(now().as_micros()));
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

/// The SLA document with its method naming this control plane's store.
fn with_durability(
    mut doc: tokenfab_core::sla::ThroughputSla,
    store: &tokenfab_store::StoreInfo,
) -> tokenfab_core::sla::ThroughputSla {
    doc.method.durability = store.durability();
    doc
}
