//! A history checker for fault tests: every operation the clients saw (submissions and
//! their acknowledgements, reads of a batch, the results read back at the end), with when
//! it was invoked and when it returned, checked against what a single correct control
//! plane allows:
//! - no acknowledged write lost: a batch whose submission was acknowledged is found by
//!   every read that starts after the acknowledgement, and has all its results at the end;
//! - no result recorded twice: the results of a batch name each request at most once, and
//!   the completed count never exceeds the batch's size;
//! - no stale read: a read that starts after another read (or the acknowledgement) of the
//!   same batch returned never sees fewer completed requests than that one did (the count
//!   only grows on a single control plane).
//!
//! Operations that did not return (a call that failed or timed out) count as not
//! acknowledged: they may or may not have happened.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone)]
pub enum Op {
    /// A submission acknowledged with batch `id` of `requests` requests.
    Submitted { id: String, requests: u32 },
    /// A read of batch `id`: `None` if it was not found, else its completed count.
    Read { id: String, completed: Option<u32> },
    /// The results read back for batch `id`, by custom id.
    Results { id: String, custom_ids: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Event {
    pub invoked: Instant,
    pub returned: Instant,
    pub op: Op,
}

/// The operations the clients saw, from any number of tasks.
#[derive(Default)]
pub struct History {
    events: Mutex<Vec<Event>>,
}

impl History {
    pub fn record(&self, invoked: Instant, op: Op) {
        self.events.lock().unwrap().push(Event {
            invoked,
            returned: Instant::now(),
            op,
        });
    }

    pub fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// What the history breaks, one line each (empty: it is one a single correct control
    /// plane could produce).
    pub fn check(&self) -> Vec<String> {
        check(&self.events.lock().unwrap())
    }
}

pub fn check(events: &[Event]) -> Vec<String> {
    let mut bad = Vec::new();
    let mut acked: BTreeMap<&str, (Instant, u32)> = BTreeMap::new();
    for e in events {
        if let Op::Submitted { id, requests } = &e.op
            && acked.insert(id, (e.returned, *requests)).is_some()
        {
            bad.push(format!("batch {id} was acknowledged twice"));
        }
    }
    // Reads, per batch, in the order they returned.
    let mut reads: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        if let Op::Read { id, .. } = &e.op {
            reads.entry(id).or_default().push(e);
        }
    }
    for (id, rs) in &mut reads {
        rs.sort_by_key(|e| e.returned);
        let ack = acked.get(id);
        // The highest count seen by a read that returned before each read began.
        for (i, r) in rs.iter().enumerate() {
            let Op::Read { completed, .. } = &r.op else {
                unreachable!()
            };
            match (completed, ack) {
                (None, Some((at, _))) if r.invoked > *at => bad.push(format!(
                    "batch {id}: acknowledged, then not found by a read that began {:?} later (a lost write)",
                    r.invoked - *at
                )),
                (Some(c), Some((_, n))) if c > n => bad.push(format!(
                    "batch {id}: {c} completed of {n} requests (a result counted twice)"
                )),
                _ => {}
            }
            let Some(seen) = completed else { continue };
            for earlier in &rs[..i] {
                if let Op::Read {
                    completed: Some(before),
                    ..
                } = &earlier.op
                    && earlier.returned < r.invoked
                    && before > seen
                {
                    bad.push(format!(
                        "batch {id}: a read saw {seen} completed after an earlier read had returned {before} (a stale read)"
                    ));
                    break;
                }
            }
        }
    }
    let mut with_results = BTreeSet::new();
    for e in events {
        if let Op::Results { id, custom_ids } = &e.op {
            with_results.insert(id.as_str());
            let unique: BTreeSet<&String> = custom_ids.iter().collect();
            if unique.len() != custom_ids.len() {
                bad.push(format!(
                    "batch {id}: {} results for {} requests (a result recorded twice)",
                    custom_ids.len(),
                    unique.len()
                ));
            }
            if let Some((_, n)) = acked.get(id.as_str())
                && unique.len() != *n as usize
            {
                bad.push(format!("batch {id}: {} of {n} results at the end", unique.len()));
            }
        }
    }
    for id in acked.keys() {
        if !with_results.contains(id) {
            bad.push(format!(
                "batch {id}: acknowledged, but its results were never read back"
            ));
        }
    }
    bad
}
