//! The lease indexes, each kept in step by the one type that owns it: work units out on
//! lease (by id, by expiry, by node) and lease calls waiting for work (by model in arrival
//! order, by end, by ticket). Nothing else touches their fields, so an index cannot fall
//! out of step with another.

use super::*;

/// A unit of work out on lease.
#[derive(Debug, Clone)]
pub(super) struct Unit {
    pub(super) node: NodeId,
    pub(super) expires_at: Timestamp,
    pub(super) items: Vec<RequestRef>,
    /// Items still leased under this unit.
    pub(super) open: u32,
}

/// Work units out on lease.
#[derive(Debug, Clone, Default)]
pub(super) struct Units {
    by_id: BTreeMap<WorkUnitId, Unit>,
    by_expiry: BTreeSet<(Timestamp, WorkUnitId)>,
    by_node: BTreeMap<NodeId, BTreeSet<WorkUnitId>>,
}

impl Units {
    pub(super) fn insert(&mut self, id: WorkUnitId, unit: Unit) {
        self.by_expiry.insert((unit.expires_at, id));
        self.by_node.entry(unit.node.clone()).or_default().insert(id);
        self.by_id.insert(id, unit);
    }

    pub(super) fn get(&self, id: &WorkUnitId) -> Option<&Unit> {
        self.by_id.get(id)
    }

    /// Whether `id` is out on lease to `node`.
    pub(super) fn held_by(&self, id: &WorkUnitId, node: &NodeId) -> bool {
        self.by_id.get(id).is_some_and(|u| &u.node == node)
    }

    /// One of the unit's items is no longer leased; the unit goes with its last one.
    pub(super) fn close_item(&mut self, id: WorkUnitId) {
        let Some(u) = self.by_id.get_mut(&id) else {
            return;
        };
        u.open -= 1;
        if u.open == 0 {
            self.remove(id);
        }
    }

    pub(super) fn remove(&mut self, id: WorkUnitId) -> Option<Unit> {
        let u = self.by_id.remove(&id)?;
        self.by_expiry.remove(&(u.expires_at, id));
        if let Some(of_node) = self.by_node.get_mut(&u.node) {
            of_node.remove(&id);
            if of_node.is_empty() {
                self.by_node.remove(&u.node);
            }
        }
        Some(u)
    }

    /// Takes the requests out of unit `id` (its count of open items stays).
    pub(super) fn take_items(&mut self, id: WorkUnitId) -> Vec<RequestRef> {
        self.by_id
            .get_mut(&id)
            .map(|u| std::mem::take(&mut u.items))
            .unwrap_or_default()
    }

    /// Extends `id`'s lease to `expires_at` if `node` holds it; false otherwise.
    pub(super) fn renew(&mut self, id: WorkUnitId, node: &NodeId, expires_at: Timestamp) -> bool {
        match self.by_id.get_mut(&id) {
            Some(u) if &u.node == node => {
                self.by_expiry.remove(&(u.expires_at, id));
                u.expires_at = expires_at;
                self.by_expiry.insert((expires_at, id));
                true
            }
            _ => false,
        }
    }

    /// The unit whose lease ends first, and when.
    pub(super) fn first_expiring(&self) -> Option<(Timestamp, WorkUnitId)> {
        self.by_expiry.first().copied()
    }

    /// The units `node` holds, in id order.
    pub(super) fn of_node(&self, node: &NodeId) -> Vec<WorkUnitId> {
        self.by_node
            .get(node)
            .map(|u| u.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// A lease call waiting for work.
#[derive(Debug, Clone)]
pub(super) struct Parked {
    pub(super) ticket: u64,
    pub(super) node: NodeId,
    pub(super) max: u32,
}

/// Lease calls waiting for work (long polls).
#[derive(Debug, Clone, Default)]
pub(super) struct Waits {
    /// Per model, oldest first.
    by_model: BTreeMap<ModelId, VecDeque<Parked>>,
    by_end: BTreeSet<(Timestamp, u64)>,
    by_ticket: BTreeMap<u64, (ModelId, Timestamp)>,
}

impl Waits {
    /// Adds a waiting call. A ticket already waiting (a shell that reuses tickets) is
    /// replaced: the earlier call is dropped unanswered.
    pub(super) fn park(&mut self, model: &ModelId, wait: Parked, until: Timestamp) {
        self.forget(wait.ticket);
        self.by_end.insert((until, wait.ticket));
        self.by_ticket.insert(wait.ticket, (model.clone(), until));
        self.by_model.entry(model.clone()).or_default().push_back(wait);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_ticket.is_empty()
    }

    /// When the first wait ends.
    pub(super) fn next_end(&self) -> Option<Timestamp> {
        self.by_end.first().map(|&(t, _)| t)
    }

    /// The models that calls wait for.
    pub(super) fn models(&self) -> impl Iterator<Item = &ModelId> {
        self.by_model.keys()
    }

    /// Takes the oldest call waiting for `model`.
    pub(super) fn pop(&mut self, model: &ModelId) -> Option<Parked> {
        let q = self.by_model.get_mut(model)?;
        let p = q.pop_front()?;
        if q.is_empty() {
            self.by_model.remove(model);
        }
        if let Some((_, until)) = self.by_ticket.remove(&p.ticket) {
            self.by_end.remove(&(until, p.ticket));
        }
        Some(p)
    }

    /// Takes every call `node` has waiting: (ticket, model), by model.
    pub(super) fn take_node(&mut self, node: &NodeId) -> Vec<(u64, ModelId)> {
        let mut ended = Vec::new();
        for (model, q) in &mut self.by_model {
            q.retain(|p| {
                let mine = &p.node == node;
                if mine {
                    ended.push((p.ticket, model.clone()));
                }
                !mine
            });
        }
        self.by_model.retain(|_, q| !q.is_empty());
        for (ticket, _) in &ended {
            if let Some((_, until)) = self.by_ticket.remove(ticket) {
                self.by_end.remove(&(until, *ticket));
            }
        }
        ended
    }

    /// Takes `ticket` out of every index.
    fn forget(&mut self, ticket: u64) {
        let Some((model, until)) = self.by_ticket.remove(&ticket) else {
            return;
        };
        self.by_end.remove(&(until, ticket));
        if let Some(q) = self.by_model.get_mut(&model) {
            q.retain(|p| p.ticket != ticket);
            if q.is_empty() {
                self.by_model.remove(&model);
            }
        }
    }

    /// Takes the call whose wait ends first if it ends by `now`.
    pub(super) fn take_ended(&mut self, now: Timestamp) -> Option<(Parked, ModelId)> {
        let &(until, ticket) = self.by_end.first().filter(|(t, _)| *t <= now)?;
        self.by_end.remove(&(until, ticket));
        let (model, _) = self.by_ticket.remove(&ticket).expect("indexed together");
        let q = self.by_model.get_mut(&model).expect("indexed together");
        let i = q.iter().position(|p| p.ticket == ticket).expect("indexed together");
        let p = q.remove(i).expect("found");
        if q.is_empty() {
            self.by_model.remove(&model);
        }
        Some((p, model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl Units {
        fn check(&self) {
            assert_eq!(self.by_expiry.len(), self.by_id.len());
            for (id, u) in &self.by_id {
                assert!(self.by_expiry.contains(&(u.expires_at, *id)));
                assert!(self.by_node[&u.node].contains(id));
            }
            let indexed: usize = self.by_node.values().map(BTreeSet::len).sum();
            assert_eq!(indexed, self.by_id.len());
            assert!(self.by_node.values().all(|s| !s.is_empty()));
        }
    }

    impl Waits {
        fn check(&self) {
            let queued: usize = self.by_model.values().map(VecDeque::len).sum();
            assert_eq!(
                (queued, self.by_end.len()),
                (self.by_ticket.len(), self.by_ticket.len())
            );
            for (model, q) in &self.by_model {
                assert!(!q.is_empty());
                for p in q {
                    let (m, until) = &self.by_ticket[&p.ticket];
                    assert_eq!(m, model);
                    assert!(self.by_end.contains(&(*until, p.ticket)));
                }
            }
        }
    }

    proptest! {
        /// Whatever happens to leases and waits, their indexes stay in step.
        #[test]
        fn indexes_stay_in_step(ops in proptest::collection::vec((0u8..6, 0u64..8, 0u64..4, 0u64..50), 1..80)) {
            let (mut units, mut waits) = (Units::default(), Waits::default());
            let node = |n: u64| NodeId::new(format!("n{n}"));
            let model = |m: u64| ModelId::new(format!("m{m}"));
            let at = Timestamp::from_micros;
            for (i, (op, a, b, t)) in ops.into_iter().enumerate() {
                let id = WorkUnitId(a);
                match op {
                    0 => {
                        units.remove(id);
                        units.insert(id, Unit { node: node(b), expires_at: at(t), items: vec![], open: 1 + (t % 3) as u32 });
                    }
                    1 => units.close_item(id),
                    2 => {
                        let held = units.held_by(&id, &node(b));
                        prop_assert_eq!(units.renew(id, &node(b), at(t)), held);
                    }
                    // Tickets are reused now and then (a confused shell).
                    3 => waits.park(&model(b), Parked { ticket: i as u64 % 7, node: node(a % 3), max: 1 }, at(t)),
                    4 => {
                        // Nothing ended by `now` means every wait ends later.
                        if waits.take_ended(at(t)).is_none() {
                            prop_assert!(waits.next_end().is_none_or(|e| e > at(t)));
                        }
                        let _ = waits.pop(&model(b));
                    }
                    _ => {
                        for (ticket, _) in waits.take_node(&node(a % 3)) {
                            prop_assert!(ticket < 7);
                        }
                    }
                }
                units.check();
                waits.check();
            }
        }
    }
}
