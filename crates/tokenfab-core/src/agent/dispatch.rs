//! Dispatch: which replica runs which queued request next (least loaded, round robin, or
//! prefix affinity), and what an engine's answer becomes (a result, or a retryable error
//! that rests the replica).

use super::*;

impl AgentCore {
    /// An engine call returned.
    pub fn engine_done(
        &mut self,
        now: Timestamp,
        replica: usize,
        unit: WorkUnitId,
        req: RequestRef,
        reply: EngineReply,
    ) {
        let latency = self.dispatched_at.remove(&req).map_or(Duration::ZERO, |t| now.since(t));
        let r = &mut self.replicas[replica];
        r.in_flight -= 1;
        r.stats.latency_sum_s += latency.as_secs_f64();
        let (outcome, usage) = match reply {
            EngineReply::Answered { status_code, .. } if EngineReply::is_retryable_status(status_code) => {
                r.stats.errors += 1;
                let code = format!("engine_http_{status_code}");
                let message = format!("replica {} answered HTTP {status_code}", r.spec.id);
                mark_unhealthy(r, now);
                (ReportedOutcome::Retryable { code, message }, Usage::default())
            }
            EngineReply::Answered {
                status_code,
                body,
                request_id,
                prompt_tokens,
                completion_tokens,
            } => {
                r.backoff = self.config.replica_backoff;
                r.stats.requests_done += 1;
                r.stats.prompt_tokens += prompt_tokens;
                r.stats.completion_tokens += completion_tokens;
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    ..Usage::default()
                };
                (
                    ReportedOutcome::Final(Outcome::Response {
                        status_code,
                        body,
                        request_id,
                    }),
                    usage,
                )
            }
            EngineReply::Unreachable { code, message } => {
                r.stats.errors += 1;
                mark_unhealthy(r, now);
                (
                    ReportedOutcome::Retryable {
                        code,
                        message: format!("replica {}: {message}", r.spec.id),
                    },
                    Usage::default(),
                )
            }
        };
        r.finished.push((
            ReportedResult {
                unit,
                req,
                outcome,
                usage,
                latency,
            },
            unit,
        ));
        self.pump(now);
    }

    pub(super) fn dispatch(&mut self, now: Timestamp) {
        loop {
            // Among active, healthy replicas with room and work queued for their model:
            // the one with the most free room relative to its window, or the next in turn.
            let n = self.replicas.len();
            let mut best: Option<(usize, f64)> = None;
            for k in 0..n {
                let i = match self.config.routing {
                    Routing::PrefixAffinity | Routing::LeastLoaded => k,
                    Routing::RoundRobin => (self.next_replica + k) % n,
                };
                let r = &self.replicas[i];
                if !r.active || !r.reachable || r.in_flight >= r.window || r.healthy_at > now {
                    continue;
                }
                if self.models[r.model].queue.is_empty() {
                    continue;
                }
                let load = f64::from(r.in_flight) / f64::from(r.window);
                if best.is_none_or(|(_, l)| load < l) {
                    best = Some((i, load));
                }
                if self.config.routing == Routing::RoundRobin {
                    break;
                }
            }
            let Some((i, _)) = best else { break };
            let pick = if self.config.routing == Routing::PrefixAffinity {
                self.affine_item(now, i)
            } else {
                0
            };
            self.next_replica = (i + 1) % n;
            if self.rest_holds_work(now) {
                break;
            }
            let r = &mut self.replicas[i];
            let (unit, item) = self.models[r.model].queue.remove(pick).expect("picked from the queue");
            r.in_flight += 1;
            self.dispatched_at.insert(item.req, now);
            self.actions.push_back(AgentAction::Dispatch { replica: i, unit, item });
        }
    }

    /// Prefix affinity: which queued request (index into its model's queue) replica `i`
    /// takes. Among the first [`AFFINITY_LOOKAHEAD`], the first that has no shared prefix,
    /// whose prefix was first sent to `i`, whose prefix is new (it is then `i`'s from now
    /// on), or whose prefix's replica can no longer take work; if every one of them belongs
    /// to another replica, the oldest (no replica idles while work waits).
    fn affine_item(&mut self, now: Timestamp, i: usize) -> usize {
        let m = self.replicas[i].model;
        for (k, (_, item)) in self.models[m].queue.iter().take(AFFINITY_LOOKAHEAD).enumerate() {
            let Some(prefix) = item.prefix else { return k };
            match self.prefix_home.get(&prefix) {
                Some(&h) if h == i => return k,
                Some(&h) => {
                    let r = &self.replicas[h];
                    if r.model != m || !r.active || !r.reachable || r.healthy_at > now {
                        self.prefix_home.insert(prefix, i);
                        return k;
                    }
                }
                None => {
                    if self.prefix_home.len() >= MAX_PREFIX_HOMES {
                        self.prefix_home.clear();
                    }
                    self.prefix_home.insert(prefix, i);
                    return k;
                }
            }
        }
        0
    }
}

fn mark_unhealthy(r: &mut Replica, now: Timestamp) {
    r.healthy_at = now.saturating_add(r.backoff);
    r.backoff = (r.backoff * 2).min(Duration::from_secs(30));
}
