//! Metering and admission: tenants' quotas and limits, charging work to tenants' fair-share
//! accounts, and the capacity estimates admission control checks a new batch against.

use super::*;

impl ControlCore {
    /// Charges (or, negative, refunds) `requests` of batch `id` to its tenant's virtual
    /// time, at the batch's mean output tokens per request: best-effort work is charged
    /// when leased (agents run what they leased, even for a batch that expired meanwhile)
    /// and refunded when it goes back on the queue.
    pub(super) fn charge(&mut self, id: BatchId, requests: f64) {
        let Some(b) = self.batches.get(&id).filter(|b| !b.committed) else {
            return;
        };
        let tokens = b.output_tokens as f64 * requests / f64::from(b.meta.requests.max(1));
        let weight = self
            .config
            .tenant_weights
            .get(&b.meta.tenant)
            .copied()
            .unwrap_or(1.0)
            .max(1e-6);
        *self.tenant_vt.entry(b.meta.tenant.clone()).or_default() += tokens / weight;
    }

    /// The limits that apply to `tenant`.
    pub(super) fn quota_of(&self, tenant: &TenantId) -> Quota {
        self.config
            .tenant_quotas
            .get(tenant)
            .copied()
            .unwrap_or_default()
            .or(self.config.default_quota)
    }

    /// Refuses a batch (asking for `asked` output tokens, with `requests` requests and an
    /// input of `input_bytes`) that would take `tenant` over its quota.
    pub(super) fn check_quota(
        &mut self,
        now: Timestamp,
        tenant: &TenantId,
        asked: u64,
        requests: u64,
        input_bytes: u64,
    ) -> Result<(), SubmitError> {
        let quota = self.quota_of(tenant);
        if quota.is_unlimited() {
            return Ok(());
        }
        if quota.max_queued_requests.is_some() || quota.max_stored_bytes.is_some() {
            let (mut queued, mut stored) = (0u64, 0u64);
            for (_, id) in self
                .by_tenant
                .range((tenant.clone(), BatchId(0))..=(tenant.clone(), BatchId(u64::MAX)))
            {
                let b = &self.batches[id];
                if !b.life.status().is_terminal() {
                    queued += u64::from(b.meta.requests.saturating_sub(b.done()));
                }
                stored += b.stored_bytes();
            }
            for (_, f) in self
                .files_by_tenant
                .range((tenant.clone(), FileId(0))..=(tenant.clone(), FileId(u64::MAX)))
            {
                stored += self.files[f].bytes;
            }
            if let Some(limit) = quota.max_queued_requests
                && queued + requests > limit
            {
                return Err(SubmitError::TooManyQueued {
                    tenant: tenant.clone(),
                    limit,
                    queued,
                    asked: requests,
                });
            }
            if let Some(limit) = quota.max_stored_bytes
                && stored + input_bytes > limit
            {
                return Err(SubmitError::StoredBytes {
                    tenant: tenant.clone(),
                    limit: crate::usage::human_bytes(limit),
                    stored: crate::usage::human_bytes(stored),
                    asked: crate::usage::human_bytes(input_bytes),
                });
            }
        }
        if let Some(max) = quota.max_active_batches {
            let active = self
                .deadlines
                .iter()
                .filter(|(_, id)| &self.batches[id].meta.tenant == tenant)
                .count() as u32;
            if active >= max {
                return Err(SubmitError::TooManyBatches {
                    tenant: tenant.clone(),
                    active,
                });
            }
        }
        if let Some(per_hour) = quota.output_tokens_per_hour {
            let hour = Duration::from_secs(3600);
            let log = self.submitted.entry(tenant.clone()).or_default();
            while log.front().is_some_and(|&(t, _)| now.since(t) >= hour) {
                log.pop_front();
            }
            let used: u64 = log.iter().map(|&(_, n)| n).sum();
            if used + asked > per_hour {
                // When enough of the last hour's submissions age out.
                let mut left = used + asked - per_hour.min(used + asked);
                let mut at = now;
                for &(t, n) in log.iter() {
                    at = t.saturating_add(hour);
                    left = left.saturating_sub(n);
                    if left == 0 {
                        break;
                    }
                }
                let retry_in = if asked > per_hour {
                    "never: the batch alone is over the hourly quota".to_string()
                } else {
                    crate::time::human(at.since(now))
                };
                return Err(SubmitError::TokenQuota {
                    tenant: tenant.clone(),
                    quota: per_hour,
                    used,
                    asked,
                    retry_in,
                });
            }
        }
        Ok(())
    }

    /// Output tokens per second all registered replicas of `model` sustain on requests of
    /// this mean shape, by their beliefs (profile or performance model) corrected by their
    /// recalibration, conservatively while it is uncertain; `None` if none is known.
    pub(super) fn capacity(&self, model: &ModelId, prompt_mean: u32, output_mean: u32) -> Option<f64> {
        let shape = (prompt_mean, output_mean);
        let version = self.capacity_version;
        let mut memo = self.capacity_memo.lock();
        if let Some((m, s, v, c)) = &memo.last
            && m == model
            && *s == shape
            && *v == version
        {
            return *c;
        }
        if !matches!(&memo.groups, Some((m, v, _)) if m == model && *v == version) {
            memo.groups = Some((model.clone(), version, self.capacity_groups(model)));
        }
        let groups = &memo.groups.as_ref().expect("formed above").2;
        let c: f64 = groups.iter().map(|g| g.perf.capacity(g.window, shape) * g.weight).sum();
        let c = (c > 0.0).then_some(c);
        memo.last = Some((model.clone(), shape, version, c));
        c
    }

    /// The registered reachable replicas of `model` with a performance model, grouped by
    /// curve and window. Parked replicas count: placement brings them back as soon as
    /// work needs them.
    fn capacity_groups(&self, model: &ModelId) -> Vec<super::CapacityGroup> {
        let mut groups: Vec<super::CapacityGroup> = Vec::new();
        for s in self
            .nodes
            .values()
            .flat_map(|n| &n.serving)
            .filter(|s| &s.model == model && !s.unreachable())
        {
            let Some(perf) = &s.perf else { continue };
            match groups.iter_mut().find(|g| g.window == s.window && &g.perf == perf) {
                Some(g) => g.weight += 1.0 / s.cap_time,
                None => groups.push(super::CapacityGroup {
                    perf: perf.clone(),
                    window: s.window,
                    weight: 1.0 / s.cap_time,
                }),
            }
        }
        groups
    }

    /// Seconds of `model`'s whole capacity that `requests` requests with these token totals
    /// need.
    pub(super) fn service_s(
        &self,
        model: &ModelId,
        requests: usize,
        output_tokens: u64,
        prompt_tokens: u64,
    ) -> Option<f64> {
        let n = requests.max(1) as u64;
        let c = self.capacity(model, (prompt_tokens / n) as u32, (output_tokens / n) as u32)?;
        Some(output_tokens as f64 / c)
    }

    /// Seconds of its model's capacity all requests of batch `id` need, and the share of
    /// them still to finish.
    fn full_service_s(&self, id: BatchId) -> (Option<f64>, f64) {
        let b = &self.batches[&id];
        let total = b.meta.requests.max(1);
        let left = f64::from(total.saturating_sub(b.done())) / f64::from(total);
        let full = self.service_s(&b.meta.model, total as usize, b.output_tokens, b.prompt_tokens);
        (full, left)
    }

    /// The share of batch `id`'s requests still to finish.
    fn left_share(&self, id: BatchId) -> f64 {
        let b = &self.batches[&id];
        let total = b.meta.requests.max(1);
        f64::from(total.saturating_sub(b.done())) / f64::from(total)
    }

    /// Enters an unfinished committed batch in its model's admission book (once).
    pub(super) fn book(&mut self, id: BatchId) {
        let b = &self.batches[&id];
        if !b.committed || b.booked.is_some() {
            return;
        }
        let (model, deadline) = (b.meta.model.clone(), b.meta.deadline);
        self.freshen_book(&model);
        let (full_s, left) = self.full_service_s(id);
        let counted_s = full_s.unwrap_or(0.0) * left;
        let version = self.capacity_version;
        let book = self.books.entry(model).or_default();
        book.version = version;
        book.batches.insert((deadline, id));
        book.upper_s += counted_s;
        self.batches.get_mut(&id).expect("exists").booked = Some(Booked { full_s, counted_s });
    }

    /// Takes a batch out of its model's admission book, if it is in it.
    pub(super) fn unbook(&mut self, id: BatchId) {
        let Some(b) = self.batches.get_mut(&id) else { return };
        let Some(booked) = b.booked.take() else { return };
        if let Some(book) = self.books.get_mut(&b.meta.model) {
            book.batches.remove(&(b.meta.deadline, id));
            book.upper_s = if book.batches.is_empty() {
                0.0
            } else {
                (book.upper_s - booked.counted_s).max(0.0)
            };
        }
    }

    /// Recomputes the service times in `model`'s book if capacity changed since.
    fn freshen_book(&mut self, model: &ModelId) {
        if self
            .books
            .get(model)
            .is_some_and(|k| k.version != self.capacity_version)
        {
            self.recount_book(model, true);
        }
    }

    /// Recounts each booked batch of `model` with its remaining work; with
    /// `recompute_rates` at the capacity now (after a capacity change), otherwise at the
    /// service time it was booked with.
    pub(super) fn recount_book(&mut self, model: &ModelId, recompute_rates: bool) {
        let Some(book) = self.books.get(model) else { return };
        let ids: Vec<BatchId> = book.batches.iter().map(|&(_, id)| id).collect();
        let mut upper = 0.0;
        for id in ids {
            let (full_s, left) = if recompute_rates {
                self.full_service_s(id)
            } else {
                (self.batches[&id].booked.and_then(|k| k.full_s), self.left_share(id))
            };
            let counted_s = full_s.unwrap_or(0.0) * left;
            upper += counted_s;
            self.batches.get_mut(&id).expect("exists").booked = Some(Booked { full_s, counted_s });
        }
        let version = self.capacity_version;
        let book = self.books.get_mut(model).expect("exists");
        book.upper_s = upper;
        if recompute_rates {
            book.version = version;
        }
    }

    /// Whether admission refuses `new` (its service in seconds of the model's capacity):
    /// `None` if admitted (or no capacity is known to judge by); otherwise the earliest
    /// deadline it would be admitted with in its class, if any.
    ///
    /// Each booked batch's service time is computed once per capacity change, not per
    /// call, and when all the booked work and the new batch fit before the earliest
    /// deadline the answer is known without ordering anything (the full check would
    /// admit it too), so a stream of small batches costs little per batch.
    pub(super) fn refusal(
        &mut self,
        now: Timestamp,
        model: &ModelId,
        new: crate::admission::Work,
    ) -> Option<Option<Timestamp>> {
        self.freshen_book(model);
        let empty = AdmissionBook::default();
        let book = self.books.get(model).unwrap_or(&empty);
        let h = crate::admission::derated(1.0, self.config.admission_headroom);
        let earliest = book.batches.first().map_or(new.deadline, |&(t, _)| t.min(new.deadline));
        // 1e-9: the running sum's rounding must not decide.
        let all_done = now.saturating_add(crate::time::secs((book.upper_s * (1.0 + 1e-9) + new.service_s) / h));
        if all_done <= earliest {
            return None;
        }
        // Every unfinished batch of a committed class on this model.
        let committed: Vec<crate::admission::Work> = book
            .batches
            .iter()
            .filter_map(|&(deadline, id)| {
                let b = &self.batches[&id];
                Some(crate::admission::Work {
                    rank: b.rank,
                    deadline,
                    service_s: b.booked?.full_s? * self.left_share(id),
                })
            })
            .collect();
        match crate::admission::check(now, &committed, new, self.config.admission_headroom) {
            crate::admission::Verdict::Admit => None,
            crate::admission::Verdict::Refuse { earliest } => Some(earliest),
        }
    }
}
