//! Leases: handing queued requests to agents in work units (at once or after a long-poll
//! wait), their expiry, and what happens to a leased request afterwards: a result
//! recorded from the lease holder, a retry, a release back to the queue, or an end
//! (attempts used up, input lost).

use super::*;

impl ControlCore {
    /// Leases work like [`ControlCore::lease`], but when there is none, waits for it until
    /// `until` (a long poll): the answer then comes later as [`Action::LeaseReady`] with
    /// this `ticket` (unique per wait, chosen by the shell), holding a grant as soon as
    /// work for the model arrives, or `None` at `until`. Waiting holds nothing: no work is
    /// set aside for a wait until it is answered.
    pub fn lease_or_wait(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        model: &ModelId,
        max: u32,
        until: Timestamp,
        ticket: u64,
    ) -> Result<LeaseAnswer, UnknownNode> {
        if let Some(grant) = self.lease(now, node, model, max)? {
            return Ok(LeaseAnswer::Granted(grant));
        }
        if until <= now {
            return Ok(LeaseAnswer::Empty);
        }
        let wait = index::Parked {
            ticket,
            node: node.clone(),
            max,
        };
        self.waits.park(model, wait, until);
        Ok(LeaseAnswer::Waiting)
    }

    /// Answers every waiting lease of `node` with no work.
    pub(super) fn end_waits_of(&mut self, node: &NodeId) {
        for (ticket, model) in self.waits.take_node(node) {
            self.actions.push_back(Action::LeaseReady {
                ticket,
                node: node.clone(),
                model,
                grant: None,
            });
        }
    }

    /// Hands queued work to leases that wait for it, first come first served.
    pub(super) fn serve_parked(&mut self, now: Timestamp) {
        if self.waits.is_empty() {
            return;
        }
        let models: Vec<ModelId> = self
            .waits
            .models()
            .filter(|m| self.queues.get(*m).is_some_and(|b| !b.is_empty()))
            .cloned()
            .collect();
        for model in models {
            while self.queues.get(&model).is_some_and(|b| !b.is_empty()) {
                let Some(p) = self.waits.pop(&model) else {
                    break;
                };
                // A node that is no longer registered gets an empty answer.
                let grant = self.lease(now, &p.node, &model, p.max).ok().flatten();
                self.actions.push_back(Action::LeaseReady {
                    ticket: p.ticket,
                    node: p.node,
                    model: model.clone(),
                    grant,
                });
            }
        }
    }

    /// Hands up to `max` pending requests of `model` to `node`, earliest deadline first.
    pub fn lease(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        model: &ModelId,
        max: u32,
    ) -> Result<Option<LeaseGrant>, UnknownNode> {
        // Any call from a node shows it is alive.
        let n = self.nodes.get_mut(node).ok_or_else(|| UnknownNode(node.clone()))?;
        n.last_seen = n.last_seen.max(now);
        let unit = WorkUnitId(self.next_unit);
        let mut items = Vec::new();
        let mut started = Vec::new();
        // Bytes of the bodies leased so far; set when the next one would not fit.
        let (mut bytes, mut full) = (0u64, false);
        while (items.len() as u32) < max && !full {
            let Some((_, _, id)) = self.next_to_lease(model) else {
                break;
            };
            let b = self.batches.get_mut(&id).expect("queued batches exist");
            // Committed work goes by slack, in large pieces (its slack grows as its
            // pending work shrinks); best-effort work in small chunks, so that tenants
            // take turns.
            let room = max - items.len() as u32;
            let take = if b.committed { room } else { room.min(BEST_EFFORT_CHUNK) };
            let mut n = 0;
            while n < take {
                let Some(&i) = b.pending.front() else {
                    break;
                };
                let cost = u64::from(b.requests[i as usize].bytes) + LEASED_ITEM_OVERHEAD_BYTES;
                if !items.is_empty() && bytes + cost > self.config.lease_max_bytes {
                    full = true;
                    break;
                }
                bytes += cost;
                b.pending.pop_front();
                let r = &mut b.requests[i as usize];
                r.slot = Slot::Leased(unit);
                r.attempts += 1;
                b.leased += 1;
                n += 1;
                items.push(LeasedItem {
                    req: RequestRef { batch: id, index: i },
                    attempt: r.attempts,
                    prefix: None,
                });
            }
            if n == 0 && full {
                // The lease is full before this batch's next request.
                break;
            }
            if b.life.status() == BatchStatus::Queued {
                b.life.start(now).expect("queued batches can start");
                started.push(id);
            }
            let drained = b.pending.is_empty();
            self.charge(id, f64::from(n));
            // Drained (or, defensively, found empty): off the queue; otherwise to its new
            // place by slack.
            if drained {
                self.dequeue(id);
            } else if self.batches[&id].committed {
                self.enqueue(id);
            }
        }
        for id in started {
            self.persist_life(id, None);
            self.actions.push_back(Action::BatchChanged(id));
        }
        if items.is_empty() {
            return Ok(None);
        }
        self.next_unit += 1;
        let expires_at = now.saturating_add(self.config.lease_ttl);
        self.units.insert(
            unit,
            index::Unit {
                node: node.clone(),
                expires_at,
                items: items.iter().map(|i| i.req).collect(),
                open: items.len() as u32,
            },
        );
        self.stats.leases_granted += 1;
        Ok(Some(LeaseGrant {
            unit,
            expires_at,
            items,
        }))
    }

    /// [`ControlCore::report`] before waiting leases are served.
    pub(super) fn report_inner(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        results: Vec<ReportedResult>,
    ) -> Result<ReportSummary, UnknownNode> {
        let n = self.nodes.get_mut(node).ok_or_else(|| UnknownNode(node.clone()))?;
        n.last_seen = n.last_seen.max(now);
        let pricing = n.pricing;
        let mut summary = ReportSummary::default();
        let mut recorded = Vec::new();
        let mut touched = BTreeSet::new();
        for r in results {
            let Some(slot) = self.slot(r.req) else {
                summary.unknown += 1;
                continue;
            };
            match (slot, r.outcome) {
                (Slot::Done, _) => summary.duplicates += 1,
                (Slot::Leased(u), ReportedOutcome::Retryable { code, message })
                    if u == r.unit && self.units.held_by(&u, node) =>
                {
                    touched.insert(r.req.batch);
                    match self.requeue_or_end(
                        r.req,
                        u,
                        LeaseEnd::Failed {
                            code: &code,
                            message: &message,
                        },
                    ) {
                        Fate::Requeued => summary.requeued += 1,
                        Fate::Ended(rec) => {
                            recorded.push(rec);
                            summary.recorded += 1;
                        }
                    }
                }
                // A retryable error from a lease that is no longer current: the request
                // is pending or leased elsewhere; that lease will answer.
                (_, ReportedOutcome::Retryable { .. }) => summary.duplicates += 1,
                // Only the node holding the current lease on a request may record its
                // result: a node cannot write results into work it was not given (another
                // tenant's batch, another node's lease), and a lease that expired has been
                // handed out again (or will be).
                (Slot::Leased(u), ReportedOutcome::Final(_)) if u != r.unit || !self.units.held_by(&u, node) => {
                    summary.not_leased += 1;
                }
                (Slot::Pending, ReportedOutcome::Final(_)) => summary.not_leased += 1,
                (Slot::Leased(_), ReportedOutcome::Final(outcome)) => {
                    let mut usage = r.usage;
                    usage.cost_usd = pricing.cost_usd(usage.joules, usage.device_seconds);
                    let ok =
                        matches!(outcome, Outcome::Response { status_code, .. } if (200..300).contains(&status_code));
                    if let Some(rec) = self.finish(r.req.batch, r.req.index, outcome, usage) {
                        let tenant = &self.batches[&r.req.batch].meta.tenant;
                        self.sla.tenant_energy(now, tenant, usage.joules);
                        if ok {
                            let model = &self.batches[&r.req.batch].meta.model;
                            let accelerator = &self.nodes[node].accelerator;
                            self.sla.result(now, model, accelerator, usage, r.latency);
                        }
                        recorded.push(rec);
                        touched.insert(r.req.batch);
                        summary.recorded += 1;
                    }
                }
            }
        }
        self.stats.duplicates_dropped += u64::from(summary.duplicates);
        self.stats.results_not_leased += u64::from(summary.not_leased);
        self.conclude(now, recorded, touched, false);
        Ok(summary)
    }

    /// [`ControlCore::release`] before waiting leases are served.
    pub(super) fn release_inner(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        unit: WorkUnitId,
        items: &[RequestRef],
    ) -> Result<u32, UnknownNode> {
        if !self.nodes.contains_key(node) {
            return Err(UnknownNode(node.clone()));
        }
        if !self.units.held_by(&unit, node) {
            return Ok(0);
        }
        let mut released = 0;
        let mut touched = BTreeSet::new();
        let mut recorded = Vec::new();
        for &req in items {
            if self.slot(req) != Some(Slot::Leased(unit)) {
                continue;
            }
            touched.insert(req.batch);
            released += 1;
            if let Fate::Ended(rec) = self.requeue_or_end(req, unit, LeaseEnd::Released) {
                recorded.push(rec);
            }
        }
        self.conclude(now, recorded, touched, true);
        Ok(released)
    }

    /// The one place where a leased request's lease ends without a result: the request
    /// goes back to the front of its batch's queue, or, when it cannot be tried again
    /// (its batch is being cancelled, or it has used up its attempts), it ends with the
    /// reason. The caller persists what ended and settles the batch ([`Self::conclude`]).
    pub(super) fn requeue_or_end(&mut self, req: RequestRef, unit: WorkUnitId, end: LeaseEnd<'_>) -> Fate {
        let max = self.config.max_attempts;
        let b = self.batches.get_mut(&req.batch).expect("slot exists");
        let r = &mut b.requests[req.index as usize];
        debug_assert_eq!(r.slot, Slot::Leased(unit), "only a leased request's lease can end");
        let status = b.life.status();
        let active = matches!(status, BatchStatus::Queued | BatchStatus::InProgress);
        // A release hands the request back unstarted: not a failed attempt.
        let again = active && (matches!(end, LeaseEnd::Released) || r.attempts < max);
        if again {
            r.slot = Slot::Pending;
            if matches!(end, LeaseEnd::Released) {
                r.attempts = r.attempts.saturating_sub(1);
            } else {
                self.stats.requests_retried += 1;
            }
            b.leased -= 1;
            b.pending.push_front(req.index);
            self.charge(req.batch, -1.0);
            self.close_unit_item(unit);
            self.track(req.batch);
            return Fate::Requeued;
        }
        let attempts = r.attempts;
        let outcome = match end {
            _ if status == BatchStatus::Cancelling => cancelled_outcome(),
            LeaseEnd::Failed { code, message } => Outcome::Error {
                code: "retries_exhausted".into(),
                message: format!("no answer after {attempts} attempts; last error ({code}): {message}"),
            },
            LeaseEnd::Lost { why } => Outcome::Error {
                code: "retries_exhausted".into(),
                message: format!("no answer after {attempts} attempts; the last lease ended because {why}"),
            },
            LeaseEnd::Released => unreachable!("a released request of a live batch is always requeued"),
        };
        Fate::Ended(
            self.finish(req.batch, req.index, outcome, Usage::default())
                .expect("a leased request has no result yet"),
        )
    }

    /// After requests ended or went back to their queues: persist the results, put each
    /// touched batch back in its place in the queue if `retrack` (a release or a lost
    /// lease, which may change a batch's service order), move it on (completed,
    /// cancelled) and say that it changed.
    pub(super) fn conclude(
        &mut self,
        now: Timestamp,
        recorded: Vec<RecordedResult>,
        touched: BTreeSet<BatchId>,
        retrack: bool,
    ) {
        self.persist_results(recorded);
        for id in touched {
            if retrack {
                self.track(id);
            }
            self.settle(now, id);
            self.actions.push_back(Action::BatchChanged(id));
        }
    }

    pub(super) fn close_unit_item(&mut self, unit: WorkUnitId) {
        self.units.close_item(unit);
    }

    /// Ends a unit (lease expired, or its agent re-registered): its open requests are
    /// pending again, or fail once they have used up their attempts.
    pub(super) fn drop_unit(&mut self, now: Timestamp, unit: WorkUnitId, why: &str) {
        if self.units.get(&unit).is_none() {
            return;
        }
        let mut recorded = Vec::new();
        let mut touched = BTreeSet::new();
        // Back to front, so that the requests go back to their queues in leased order.
        for req in self.units.take_items(unit).into_iter().rev() {
            if self.slot(req) != Some(Slot::Leased(unit)) {
                continue;
            }
            touched.insert(req.batch);
            if let Fate::Ended(rec) = self.requeue_or_end(req, unit, LeaseEnd::Lost { why }) {
                recorded.push(rec);
            }
        }
        // Closing its last open request took it out already; this covers a unit with none.
        self.units.remove(unit);
        self.conclude(now, recorded, touched, true);
    }

    /// Leased requests whose bodies cannot be read back from the store (a damaged or
    /// missing input file) end with the error `input_lost` at once, rather than be
    /// retried: another try reads the same file.
    pub fn inputs_lost(&mut self, now: Timestamp, unit: WorkUnitId, items: &[RequestRef]) {
        let mut recorded = Vec::new();
        let mut touched = BTreeSet::new();
        for &req in items {
            if self.slot(req) != Some(Slot::Leased(unit)) {
                continue;
            }
            let outcome = Outcome::Error {
                code: "input_lost".into(),
                message: "the request's body could not be read back from the control plane's store (its input file is damaged or missing); submit it again".into(),
            };
            recorded.extend(self.finish(req.batch, req.index, outcome, Usage::default()));
            touched.insert(req.batch);
        }
        self.conclude(now, recorded, touched, false);
    }
}

/// Why a leased request's lease ended without a result ([`ControlCore::requeue_or_end`]).
pub(super) enum LeaseEnd<'a> {
    /// The agent handed it back unstarted.
    Released,
    /// The agent reported a retryable error.
    Failed { code: &'a str, message: &'a str },
    /// The lease ended on the control plane's side: it expired, or its agent registered
    /// again.
    Lost { why: &'a str },
}

/// What became of a request whose lease ended.
pub(super) enum Fate {
    /// Pending again, at the front of its batch.
    Requeued,
    /// Ended, with this result to persist.
    Ended(RecordedResult),
}
