//! The queue of each model: batches in service order (SLA class rank; committed classes by
//! deadline or slack, `queue_order`; best-effort classes by weighted fair queueing between
//! tenants, on per-tenant virtual time), and what is leased next.

use super::*;

impl ControlCore {
    /// The queued batch of `model` to lease from next: the highest class with work; in a
    /// committed class the batch with the least slack; in a best-effort class the batch
    /// of the tenant with the least virtual time (weighted fair queueing), earliest
    /// deadline first within a tenant.
    pub(super) fn next_to_lease(&self, model: &ModelId) -> Option<QueueKey> {
        let q = self.queues.get(model)?;
        let first = *q.first()?;
        if self.batches[&first.2].committed {
            return Some(first);
        }
        let rank = first.0;
        q.range(first..)
            .take_while(|k| k.0 == rank)
            .min_by(|a, b| {
                let vt = |k: &(u8, Timestamp, BatchId)| {
                    let tenant = &self.batches[&k.2].meta.tenant;
                    self.tenant_vt.get(tenant).copied().unwrap_or(0.0)
                };
                vt(a).total_cmp(&vt(b)).then(a.cmp(b))
            })
            .copied()
    }

    /// The priority (place in the class list) of an SLA class and whether it is committed.
    /// A class no longer configured (a batch recovered after a configuration change) goes
    /// last, as best-effort.
    pub(super) fn class_of(&self, class: &str) -> (u8, bool) {
        let classes = &self.config.sla_classes;
        match classes.iter().position(|c| c.name == class) {
            Some(i) => (i.min(u8::MAX as usize) as u8, classes[i].committed),
            None => (classes.len().min(u8::MAX as usize) as u8, false),
        }
    }

    /// Where a batch goes in its model's queue: by class priority, then, for committed
    /// work, least slack first (the deadline minus the time its pending requests need at
    /// the model's capacity: the latest time they can start), for best-effort work by
    /// deadline.
    pub(super) fn queue_key(b: &Batch, order: QueueOrder) -> QueueKey {
        let slack = order == QueueOrder::Slack && b.committed;
        let order = match b.service_rate.filter(|r| *r > 0.0 && slack) {
            Some(rate) => {
                let pending = b.output_tokens as f64 * b.pending.len() as f64 / f64::from(b.meta.requests.max(1));
                let need_us = (pending / rate * 1e6).min(u64::MAX as f64) as u64;
                Timestamp::from_micros(b.meta.deadline.as_micros().saturating_sub(need_us))
            }
            None => b.meta.deadline,
        };
        (b.rank, order, b.meta.id)
    }

    /// Puts a batch on its model's queue (or moves it to its current place).
    pub(super) fn enqueue(&mut self, id: BatchId) {
        self.dequeue(id);
        if self.batches[&id].committed && self.batches[&id].service_rate.is_none() {
            // Admitted before any replica was known (or recovered): learn its rate now.
            let b = &self.batches[&id];
            let n = u64::from(b.meta.requests.max(1));
            let rate = self.capacity(
                &b.meta.model,
                (b.prompt_tokens / n) as u32,
                (b.output_tokens / n) as u32,
            );
            self.batches.get_mut(&id).expect("exists").service_rate = rate;
        }
        let b = self.batches.get_mut(&id).expect("exists");
        let key = Self::queue_key(b, self.config.queue_order);
        b.queued = Some(key);
        self.queues.entry(b.meta.model.clone()).or_default().insert(key);
    }

    /// Takes a batch off its model's queue.
    pub(super) fn dequeue(&mut self, id: BatchId) {
        let Some(b) = self.batches.get_mut(&id) else { return };
        if let Some(key) = b.queued.take()
            && let Some(q) = self.queues.get_mut(&b.meta.model)
        {
            q.remove(&key);
        }
    }

    /// A tenant that had no best-effort work queued starts where the busiest waiting
    /// tenants are, so that idle time does not turn into credit (start-time fair queueing).
    pub(super) fn activate(&mut self, model: &ModelId, tenant: &TenantId) {
        let Some(q) = self.queues.get(model) else { return };
        let waiting: BTreeSet<&TenantId> = q
            .iter()
            .map(|k| &self.batches[&k.2])
            .filter(|b| !b.committed)
            .map(|b| &b.meta.tenant)
            .collect();
        if waiting.contains(tenant) {
            return;
        }
        let floor = waiting
            .iter()
            .map(|t| self.tenant_vt.get(*t).copied().unwrap_or(0.0))
            .min_by(f64::total_cmp);
        if let Some(floor) = floor {
            let vt = self.tenant_vt.entry(tenant.clone()).or_default();
            *vt = vt.max(floor);
        }
    }
}
