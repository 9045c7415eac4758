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
    /// this mean shape, by the performance model; `None` if none is known.
    pub(super) fn capacity(&self, model: &ModelId, prompt_mean: u32, output_mean: u32) -> Option<f64> {
        // Parked replicas count: placement brings them back as soon as work needs them.
        let c: f64 = self
            .nodes
            .values()
            .flat_map(|n| &n.serving)
            .filter(|s| &s.model == model)
            .filter_map(|s| Some(s.perf.as_ref()?.capacity(s.window, (prompt_mean, output_mean))))
            .sum();
        (c > 0.0).then_some(c)
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

    /// Whether admission refuses `new` (its service in seconds of the model's capacity):
    /// `None` if admitted (or no capacity is known to judge by); otherwise the earliest
    /// deadline it would be admitted with in its class, if any.
    pub(super) fn refusal(
        &self,
        now: Timestamp,
        model: &ModelId,
        new: crate::admission::Work,
    ) -> Option<Option<Timestamp>> {
        // Every unfinished batch of a committed class on this model.
        let committed: Vec<crate::admission::Work> = self
            .deadlines
            .iter()
            .map(|(_, id)| &self.batches[id])
            .filter(|b| &b.meta.model == model && b.committed)
            .filter_map(|b| {
                let total = b.meta.requests.max(1);
                let left = total.saturating_sub(b.done());
                let s = self.service_s(model, total as usize, b.output_tokens, b.prompt_tokens)?;
                Some(crate::admission::Work {
                    rank: b.rank,
                    deadline: b.meta.deadline,
                    service_s: s * f64::from(left) / f64::from(total),
                })
            })
            .collect();
        match crate::admission::check(now, &committed, new, self.config.admission_headroom) {
            crate::admission::Verdict::Admit => None,
            crate::admission::Verdict::Refuse { earliest } => Some(earliest),
        }
    }
}
