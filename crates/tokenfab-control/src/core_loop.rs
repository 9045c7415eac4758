//! The one task that owns the control core.
//!
//! RPC handlers send [`Command`]s; the loop applies every command waiting in the channel
//! to the core, collects what the core asks to persist into one [`WriteSet`], commits it
//! (one fsync for the whole round: group commit) and only then sends the replies. While a
//! commit runs, new commands queue up and form the next round, so the commit rate adapts
//! to the load.
//!
//! Replies that acknowledge something durable (a batch, results, a cancel) and reads
//! (so nobody sees state a crash could take back) wait for the commit. Agent traffic that
//! carries nothing durable (register, heartbeat, lease, release) is answered at once:
//! leases are not durable, and a lease of work whose batch then failed to commit only
//! causes an engine call whose result is later dropped as unknown (duplicate engine calls
//! are allowed; duplicate results are not). Without this, every lease would wait for one
//! or two fsyncs, and lease supply would cap end-to-end throughput.
//!
//! If the store fails, the loop stops without replying: pending callers get UNAVAILABLE
//! and the server exits, and a restart rebuilds the state from what is durable. The
//! in-memory state is never trusted past a failed commit.

use crate::metrics::Metrics;
use prost::bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokenfab_core::batch_input::{LineError, ParsedRequest};
use tokenfab_core::control::{
    Action, BatchError, BatchView, ControlCore, HeartbeatReply, LeaseAnswer, LeaseGrant, NewBatch, NodeRegistration,
    ReplicaReport, ReportSummary, ReportedResult, SubmitError, UnknownNode,
};
use tokenfab_core::durable::DurableOp;
use tokenfab_core::{BatchId, ModelId, NodeId, RequestRef, TenantId, Timestamp, WorkUnitId};
use tokenfab_proto::v1 as pb;
use tokenfab_store::{BatchInputs, Store, StoreError, WriteSet};
use tokio::sync::{mpsc, oneshot, watch};

type Reply<T> = oneshot::Sender<T>;

pub enum Command {
    Submit {
        new: NewBatch,
        requests: Vec<ParsedRequest>,
        line_errors: Vec<LineError>,
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
    /// The throughput SLA document as measured now.
    Sla {
        reply: Reply<tokenfab_core::sla::ThroughputSla>,
    },
    /// Every replica: its directive and its tuner's last report.
    Tuning {
        reply: Reply<tokenfab_core::control::TuningDoc>,
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
    Watch {
        tenant: TenantId,
        id: BatchId,
        reply: Reply<Result<watch::Receiver<BatchView>, BatchError>>,
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
}

/// What a lease hands out for each request: everything but the scheduling metadata.
struct CachedInput {
    custom_id: String,
    url: &'static str,
    body: Bytes,
}

fn cache(requests: &[ParsedRequest]) -> Arc<Vec<CachedInput>> {
    Arc::new(
        requests
            .iter()
            .map(|r| CachedInput {
                custom_id: r.custom_id.clone(),
                url: r.endpoint.path(),
                body: Bytes::from(r.body.clone()),
            })
            .collect(),
    )
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

type Replies = Vec<Box<dyn FnOnce() + Send>>;

/// Changes waiting for the next commit, and the replies that depend on it.
#[derive(Default)]
struct Round {
    set: WriteSet,
    replies: Replies,
    changed: Vec<BatchId>,
}

struct InFlight {
    handle: tokio::task::JoinHandle<Result<(), StoreError>>,
    replies: Replies,
    changed: Vec<BatchId>,
    started: std::time::Instant,
}

enum Event {
    Command(Option<Command>),
    Timer,
    Committed(Result<Result<(), StoreError>, tokio::task::JoinError>),
}

pub struct CoreLoop<S> {
    core: ControlCore,
    store: S,
    bodies: HashMap<BatchId, Arc<Vec<CachedInput>>>,
    watchers: HashMap<BatchId, watch::Sender<BatchView>>,
    metrics: Arc<Metrics>,
    /// Lease calls waiting for work, by ticket.
    waiting: HashMap<u64, Reply<LeaseReply>>,
    next_ticket: u64,
    /// When the SLA metrics were last refreshed.
    sla_observed: std::time::Instant,
}

/// How often the metering and SLA metrics are refreshed (agents' heartbeats wake the loop
/// at least every second).
const SLA_METRICS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The answer to a lease call.
pub type LeaseReply = Result<Option<pb::WorkUnit>, UnknownNode>;

impl<S: Store> CoreLoop<S> {
    /// Rebuilds the core from the store.
    pub async fn recover(
        store: S,
        config: tokenfab_core::control::ControlConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let loaded = store.load().await?;
        let mut bodies = HashMap::new();
        let mut batches = Vec::with_capacity(loaded.len());
        for l in loaded {
            if !l.inputs.is_empty() {
                bodies.insert(l.batch.meta.id, cache(&l.inputs));
            }
            batches.push(l.batch);
        }
        let recovered = batches.len();
        let mut core = ControlCore::recover(config, batches, now());
        core.restore_idle(store.idle_shares().await?);
        // Completing batches found whole during recovery must be written too.
        let mut set = WriteSet::default();
        while let Some(a) = core.poll_action() {
            if let Action::Persist(op) = a {
                set.ops.push(op);
            }
        }
        store.apply(set).await?;
        tracing::info!(batches = recovered, "recovered durable state");
        Ok(CoreLoop {
            core,
            store,
            bodies,
            watchers: HashMap::new(),
            metrics,
            waiting: HashMap::new(),
            next_ticket: 0,
            sla_observed: std::time::Instant::now()
                .checked_sub(SLA_METRICS_EVERY)
                .unwrap_or_else(std::time::Instant::now),
        })
    }

    /// Runs until the channel closes (shutdown) or the store fails.
    ///
    /// Commits are pipelined: while one commit is in flight the loop keeps applying
    /// commands; their changes and deferred replies form the next commit, which starts
    /// when the one in flight is done. Commits stay in order, and a round with nothing to
    /// persist still waits behind the commit in flight before its replies go out.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), StoreError>
    where
        S: Clone,
    {
        let mut next = Round::default();
        let mut inflight: Option<InFlight> = None;
        let mut closed = false;
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
                    self.core.handle_timeout(now);
                    let mut inputs = HashMap::new();
                    for cmd in round {
                        self.apply(now, cmd, &mut inputs, &mut next.replies);
                    }
                    self.collect(&mut next, inputs);
                }
                Event::Command(None) => closed = true,
                Event::Timer => {
                    self.core.handle_timeout(now());
                    self.collect(&mut next, HashMap::new());
                }
                Event::Committed(r) => {
                    let done = inflight.take().expect("a commit was in flight");
                    r.map_err(|e| StoreError::Io(format!("commit task failed: {e}")))??;
                    self.metrics.commits.inc();
                    self.metrics
                        .commit_seconds
                        .observe(done.started.elapsed().as_secs_f64());
                    for reply in done.replies {
                        reply();
                    }
                    self.publish(done.changed);
                }
            }
            if inflight.is_none() {
                let round = std::mem::take(&mut next);
                if !round.set.is_empty() {
                    let store = self.store.clone();
                    let set = round.set;
                    inflight = Some(InFlight {
                        handle: tokio::spawn(async move { store.apply(set).await }),
                        replies: round.replies,
                        changed: round.changed,
                        started: std::time::Instant::now(),
                    });
                } else {
                    // Nothing to persist and nothing in flight: all state is durable.
                    for reply in round.replies {
                        reply();
                    }
                    self.publish(round.changed);
                }
            }
            self.metrics.observe_core(&self.core.stats());
            // Metering and SLA figures are refreshed for the metrics every few seconds,
            // not on every round.
            if self.sla_observed.elapsed() >= SLA_METRICS_EVERY {
                self.sla_observed = std::time::Instant::now();
                self.metrics
                    .observe_tenants(self.core.tenant_totals(), self.core.idle_unallocated_j());
                self.metrics
                    .observe_replicas(&self.core.replicas_view(now()), self.core.fragmentation());
                self.metrics.observe_sla(&self.core.sla_document(now()));
            }
            if closed && inflight.is_none() {
                return Ok(());
            }
        }
    }

    /// Moves what the core asks for into `round`: operations to persist (with the inputs
    /// of new batches) and batches whose view changed.
    fn collect(&mut self, round: &mut Round, mut inputs: HashMap<BatchId, (Vec<ParsedRequest>, Vec<LineError>)>) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::Persist(op) => {
                    if let DurableOp::CreateBatch { meta, .. } = &op
                        && let Some((requests, line_errors)) = inputs.remove(&meta.id)
                    {
                        round.set.inputs.push(BatchInputs {
                            batch: meta.id,
                            requests,
                            line_errors,
                        });
                    }
                    round.set.ops.push(op);
                }
                Action::BatchChanged(id) => round.changed.push(id),
                Action::LeaseReady {
                    ticket, node, grant, ..
                } => {
                    let Some(reply) = self.waiting.remove(&ticket) else {
                        continue;
                    };
                    let Some(grant) = grant else {
                        let _ = reply.send(Ok(None));
                        continue;
                    };
                    let (unit, items) = (grant.unit, grant.items.iter().map(|i| i.req).collect::<Vec<_>>());
                    if reply.send(Ok(Some(self.work_unit(grant)))).is_err() {
                        // The agent hung up while it waited: its work goes back on the queue.
                        let _ = self.core.release(now(), &node, unit, &items);
                    }
                }
            }
        }
    }

    fn apply(
        &mut self,
        now: Timestamp,
        cmd: Command,
        inputs: &mut HashMap<BatchId, (Vec<ParsedRequest>, Vec<LineError>)>,
        replies: &mut Replies,
    ) {
        fn later<T: Send + 'static>(replies: &mut Replies, tx: Reply<T>, v: T) {
            replies.push(Box::new(move || {
                let _ = tx.send(v);
            }));
        }
        match cmd {
            Command::Submit {
                new,
                requests,
                line_errors,
                reply,
            } => {
                let r = self.core.submit(now, new);
                if let Ok(v) = &r {
                    self.bodies.insert(v.meta.id, cache(&requests));
                    inputs.insert(v.meta.id, (requests, line_errors));
                    // Counted once durable, like the acknowledgement.
                    let metrics = self.metrics.clone();
                    replies.push(Box::new(move || {
                        metrics.batches_submitted.inc();
                    }));
                }
                later(replies, reply, r);
            }
            // Reads are answered after the round's commit too, so nobody sees state that
            // a crash could still take back.
            Command::Get { tenant, id, reply } => {
                let r = self.core.batch(&tenant, id);
                later(replies, reply, r);
            }
            Command::Sla { reply } => {
                let _ = reply.send(self.core.sla_document(now));
            }
            Command::Tuning { reply } => {
                let _ = reply.send(self.core.tuning_doc(now));
            }
            Command::Usage { tenant, since, reply } => {
                let r = self.core.tenant_usage(&tenant, since);
                later(replies, reply, r);
            }
            Command::List {
                tenant,
                before,
                limit,
                reply,
            } => {
                let r = self.core.list(&tenant, before, limit);
                later(replies, reply, r);
            }
            Command::Cancel { tenant, id, reply } => {
                let r = self.core.cancel(now, &tenant, id);
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
                later(replies, reply, r);
            }
            Command::Register { registration, reply } => {
                tracing::info!(node = %registration.node, devices = registration.devices.len(), replicas = registration.replicas.len(), "node registered");
                self.core.register(now, registration);
                let _ = reply.send(());
            }
            Command::Heartbeat {
                node,
                held,
                replicas,
                reply,
            } => {
                let _ = reply.send(self.core.heartbeat(now, &node, &held, &replicas));
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
                match self.core.lease_or_wait(now, &node, &model, max, until, ticket) {
                    Ok(LeaseAnswer::Granted(g)) => {
                        let _ = reply.send(Ok(Some(self.work_unit(g))));
                    }
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
                let r = self.core.report(now, &node, results);
                later(replies, reply, r);
            }
            Command::Release {
                node,
                unit,
                items,
                reply,
            } => {
                let _ = reply.send(self.core.release(now, &node, unit, &items));
            }
        }
    }

    fn work_unit(&self, g: LeaseGrant) -> pb::WorkUnit {
        let items = g
            .items
            .iter()
            .filter_map(|item| {
                let input = self.bodies.get(&item.req.batch)?.get(item.req.index as usize)?;
                Some(pb::WorkItem {
                    batch: item.req.batch.0,
                    index: item.req.index,
                    custom_id: input.custom_id.clone(),
                    url: input.url.to_string(),
                    body: input.body.clone(),
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

    /// Sends fresh views to watchers, and drops what final batches no longer need.
    fn publish(&mut self, mut changed: Vec<BatchId>) {
        changed.sort_unstable();
        changed.dedup();
        for id in changed {
            let view = self.core.view(id);
            let Some(view) = view else { continue };
            let terminal = view.life.status().is_terminal();
            if let Some(w) = self.watchers.get(&id) {
                w.send_replace(view);
                if terminal || w.receiver_count() == 0 {
                    self.watchers.remove(&id);
                }
            }
            if terminal {
                self.bodies.remove(&id);
            }
        }
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
