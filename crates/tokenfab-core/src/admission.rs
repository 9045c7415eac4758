//! Admission control: can a new batch meet its deadline, given the work already committed
//! and the capacity that serves it?
//!
//! Work is measured in seconds of the model's whole capacity (every replica serving it):
//! a batch's service time is its remaining output tokens over the capacity's output
//! tokens per second for the batch's own mean prompt and output lengths (from the
//! performance model at each replica's concurrency window). The scheduler serves committed
//! work class by class in priority order, and within a class by deadline, so the check is
//! EDF's over that order: every committed batch, in service order, must finish its work
//! and all the work ahead of it by its deadline, with capacity derated by a headroom
//! factor (the default 0.9 keeps a tenth in reserve for the error of the estimate:
//! continuous batching rarely keeps every window full). (Within a class the queue hands
//! out work least slack first; on one shared capacity that meets every deadline EDF
//! meets.)
//!
//! A new batch is admitted when it meets its own deadline and makes no batch that would
//! have met its deadline miss it, whatever that batch's class: a higher class goes first
//! only into slack that lower classes can spare. A refused batch is told the earliest
//! completion time that could be promised: the smallest deadline at which it would be
//! admitted in its class, if any.

use crate::time::{Timestamp, secs};

/// One committed batch as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Work {
    /// Priority of its class: lower is served first.
    pub rank: u8,
    pub deadline: Timestamp,
    /// Seconds of the model's whole capacity its remaining requests need.
    pub service_s: f64,
}

/// The outcome of [`check`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Admit,
    /// Not by its deadline; `earliest` is the earliest later deadline that could be
    /// admitted in the same class, `None` if none can (its work, served before every lower
    /// class, would make an admitted batch of a lower class late).
    Refuse {
        earliest: Option<Timestamp>,
    },
}

/// The capacity admission counts on out of `capacity`: derated by `headroom`, which is
/// taken within (0.001, 1].
pub fn derated(capacity: f64, headroom: f64) -> f64 {
    capacity * headroom.clamp(1e-3, 1.0)
}

/// Whether `new` can be admitted at `now` next to `committed` (in any order), with
/// `headroom` (0 < headroom <= 1) of the capacity counted on.
pub fn check(now: Timestamp, committed: &[Work], new: Work, headroom: f64) -> Verdict {
    let h = derated(1.0, headroom);
    let mut ahead: Vec<Work> = committed.to_vec();
    // Service order. Stable: batches with equal keys keep their order, and the new one
    // goes last.
    ahead.sort_by_key(|w| (w.rank, w.deadline));
    let finish = |cum: f64| now.saturating_add(secs(cum / h));
    // Where each committed batch finishes without the new one, and whether it is on time.
    let mut cum = Vec::with_capacity(ahead.len() + 1);
    cum.push(0.0);
    for w in &ahead {
        cum.push(cum.last().copied().unwrap_or(0.0) + w.service_s);
    }
    let on_time: Vec<bool> = ahead
        .iter()
        .zip(&cum[1..])
        .map(|(w, &c)| finish(c) <= w.deadline)
        .collect();
    // Batches after position `p` are delayed by the new batch's work: those that were on
    // time must stay so.
    let later_ok = |p: usize| {
        ahead[p..]
            .iter()
            .zip(&cum[p + 1..])
            .zip(&on_time[p..])
            .all(|((w, &c), &ok)| !ok || finish(c + new.service_s) <= w.deadline)
    };
    // The new batch in its own place: after every batch of a higher class, and of its
    // class with a deadline at or before its.
    let key = (new.rank, new.deadline);
    let p = ahead.partition_point(|w| (w.rank, w.deadline) <= key);
    if finish(cum[p] + new.service_s) <= new.deadline && later_ok(p) {
        return Verdict::Admit;
    }
    // The earliest later deadline that works: try each place in its class from its own on.
    let class_end = ahead.partition_point(|w| w.rank <= new.rank);
    for (p, &before) in cum.iter().enumerate().take(class_end + 1).skip(p) {
        let done = finish(before + new.service_s);
        let after = match p.checked_sub(1).map(|i| &ahead[i]) {
            Some(prev) if prev.rank == new.rank => prev.deadline,
            _ => now,
        };
        let deadline = done.max(after).max(new.deadline);
        let fits_here = ahead.get(p).is_none_or(|w| w.rank > new.rank || deadline < w.deadline);
        if fits_here && later_ok(p) {
            return Verdict::Refuse {
                earliest: Some(deadline),
            };
        }
    }
    // Every place in its class delays an on-time batch of a lower class (with one class,
    // the last place delays no batch and is always found above).
    Verdict::Refuse { earliest: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_micros(1_000_000_000);

    fn at(s: u64) -> Timestamp {
        T0.saturating_add(std::time::Duration::from_secs(s))
    }
    fn work(deadline_s: u64, service_s: f64) -> Work {
        Work {
            rank: 0,
            deadline: at(deadline_s),
            service_s,
        }
    }
    fn refuse(s: u64) -> Verdict {
        Verdict::Refuse { earliest: Some(at(s)) }
    }

    #[test]
    fn an_empty_cluster_admits_what_fits_and_names_the_earliest_time_otherwise() {
        assert_eq!(check(T0, &[], work(100, 100.0), 1.0), Verdict::Admit);
        assert_eq!(
            check(T0, &[], work(100, 90.0), 0.9),
            Verdict::Admit,
            "90 s at 90% of capacity take 100 s"
        );
        assert_eq!(check(T0, &[], work(100, 150.0), 1.0), refuse(150));
        assert_eq!(check(T0, &[], work(100, 90.0), 0.5), refuse(180));
    }

    #[test]
    fn work_ahead_counts_and_work_behind_must_stay_on_time() {
        // 60 s due at 100: a new batch of 30 s due at 80 goes first and fits.
        assert_eq!(check(T0, &[work(100, 60.0)], work(80, 30.0), 1.0), Verdict::Admit);
        // ... but 50 s due at 80 would push the committed one to 110, past its 100.
        // Behind it instead, the new batch finishes at 110.
        assert_eq!(check(T0, &[work(100, 60.0)], work(80, 50.0), 1.0), refuse(110));
        // Due after the committed batch: it waits for it.
        assert_eq!(check(T0, &[work(100, 60.0)], work(200, 50.0), 1.0), Verdict::Admit);
        assert_eq!(check(T0, &[work(100, 60.0)], work(100, 50.0), 1.0), refuse(110));
    }

    #[test]
    fn a_batch_that_is_late_anyway_does_not_block_others() {
        // The committed batch misses its deadline whatever happens (200 s due at 100).
        let late = work(100, 200.0);
        // A new batch due after it still only has to meet its own deadline.
        assert_eq!(check(T0, &[late], work(300, 50.0), 1.0), Verdict::Admit);
        assert_eq!(check(T0, &[late], work(220, 50.0), 1.0), refuse(250));
    }

    #[test]
    fn the_earliest_time_is_admitted_when_asked_for() {
        let committed = [work(50, 40.0), work(120, 30.0), work(400, 100.0)];
        let mut refused = 0;
        for (deadline, service) in [
            (60, 30.0),
            (100, 45.0),
            (130, 80.0),
            (10, 5.0),
            (500, 300.0),
            (200, 300.0),
        ] {
            if let Verdict::Refuse { earliest } = check(T0, &committed, work(deadline, service), 1.0) {
                let earliest = earliest.expect("one class: a later place always exists");
                refused += 1;
                assert!(earliest > at(deadline));
                let retry = Work {
                    rank: 0,
                    deadline: earliest,
                    service_s: service,
                };
                assert_eq!(
                    check(T0, &committed, retry, 1.0),
                    Verdict::Admit,
                    "refused ({deadline}, {service}) with earliest {earliest}, which is refused too"
                );
                let sooner = Work {
                    rank: 0,
                    deadline: Timestamp::from_micros(earliest.as_micros() - 1_000_000),
                    service_s: service,
                };
                assert_ne!(
                    check(T0, &committed, sooner, 1.0),
                    Verdict::Admit,
                    "a second sooner is admitted"
                );
            }
        }
        assert!(refused >= 3, "the cases exercise refusals: {refused}");
    }

    #[test]
    fn a_higher_class_goes_first_only_into_slack_lower_classes_can_spare() {
        let premium = |d: u64, s: f64| Work {
            rank: 0,
            deadline: at(d),
            service_s: s,
        };
        let standard = |d: u64, s: f64| Work {
            rank: 1,
            deadline: at(d),
            service_s: s,
        };
        // A standard batch of 60 s due at 100 leaves 40 s of slack.
        let admitted = [standard(100, 60.0)];
        // A premium batch is served first, even with a later deadline: 30 s fits the slack.
        assert_eq!(check(T0, &admitted, premium(500, 30.0), 1.0), Verdict::Admit);
        // 50 s does not, whatever its deadline: it would always go first.
        assert_eq!(
            check(T0, &admitted, premium(500, 50.0), 1.0),
            Verdict::Refuse { earliest: None }
        );
        // A standard batch of 50 s queues behind the admitted one in deadline order.
        assert_eq!(check(T0, &admitted, standard(500, 50.0), 1.0), Verdict::Admit);
        // Premium work already admitted is ahead of a new standard batch.
        assert_eq!(check(T0, &[premium(500, 80.0)], standard(100, 30.0), 1.0), refuse(110));
    }
}
