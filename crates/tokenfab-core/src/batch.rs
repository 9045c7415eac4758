//! The batch lifecycle: statuses and the only transitions allowed between them.
//!
//! ```text
//! validating -> queued -> in_progress -> finalizing -> completed
//! validating | queued | in_progress -> failed
//! queued | in_progress | finalizing -> expired
//! validating | queued | in_progress -> cancelling -> cancelled
//! ```

use crate::ids::BatchId;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BatchStatus {
    Validating,
    Queued,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    /// Final statuses: nothing about the batch changes any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchStatus::Completed | BatchStatus::Failed | BatchStatus::Expired | BatchStatus::Cancelled
        )
    }

    /// The name tenants see (as in the OpenAI Batch API).
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Queued => "queued",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{batch} is {from}; it cannot become {to}")]
pub struct TransitionError {
    pub batch: BatchId,
    pub from: BatchStatus,
    pub to: BatchStatus,
}

/// A batch's status and when each status was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lifecycle {
    batch: BatchId,
    status: BatchStatus,
    pub created_at: Timestamp,
    pub queued_at: Option<Timestamp>,
    pub in_progress_at: Option<Timestamp>,
    pub finalizing_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    pub failed_at: Option<Timestamp>,
    pub expired_at: Option<Timestamp>,
    pub cancelling_at: Option<Timestamp>,
    pub cancelled_at: Option<Timestamp>,
    pub failure_reason: Option<String>,
}

impl Lifecycle {
    /// A new batch, validating.
    pub fn new(batch: BatchId, now: Timestamp) -> Self {
        Lifecycle {
            batch,
            status: BatchStatus::Validating,
            created_at: now,
            queued_at: None,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            failure_reason: None,
        }
    }

    pub fn status(&self) -> BatchStatus {
        self.status
    }

    pub fn batch(&self) -> BatchId {
        self.batch
    }

    /// When the batch reached its final status, if it has.
    pub fn ended_at(&self) -> Option<Timestamp> {
        self.completed_at
            .or(self.failed_at)
            .or(self.expired_at)
            .or(self.cancelled_at)
    }

    fn go(&mut self, allowed: &[BatchStatus], to: BatchStatus) -> Result<(), TransitionError> {
        if allowed.contains(&self.status) {
            self.status = to;
            Ok(())
        } else {
            Err(TransitionError {
                batch: self.batch,
                from: self.status,
                to,
            })
        }
    }

    /// Validation passed: the batch waits for capacity.
    pub fn queue(&mut self, now: Timestamp) -> Result<(), TransitionError> {
        self.go(&[BatchStatus::Validating], BatchStatus::Queued)?;
        self.queued_at = Some(now);
        Ok(())
    }

    /// The first request was handed to an agent.
    pub fn start(&mut self, now: Timestamp) -> Result<(), TransitionError> {
        self.go(&[BatchStatus::Queued], BatchStatus::InProgress)?;
        self.in_progress_at = Some(now);
        Ok(())
    }

    /// Every request has a result.
    pub fn finalize(&mut self, now: Timestamp) -> Result<(), TransitionError> {
        self.go(&[BatchStatus::Queued, BatchStatus::InProgress], BatchStatus::Finalizing)?;
        self.finalizing_at = Some(now);
        Ok(())
    }

    /// The books are closed.
    pub fn complete(&mut self, now: Timestamp) -> Result<(), TransitionError> {
        self.go(&[BatchStatus::Finalizing], BatchStatus::Completed)?;
        self.completed_at = Some(now);
        Ok(())
    }

    /// The batch cannot run at all.
    pub fn fail(&mut self, now: Timestamp, reason: impl Into<String>) -> Result<(), TransitionError> {
        self.go(
            &[BatchStatus::Validating, BatchStatus::Queued, BatchStatus::InProgress],
            BatchStatus::Failed,
        )?;
        self.failed_at = Some(now);
        self.failure_reason = Some(reason.into());
        Ok(())
    }

    /// The completion window passed before every request had a result.
    pub fn expire(&mut self, now: Timestamp) -> Result<(), TransitionError> {
        self.go(
            &[BatchStatus::Queued, BatchStatus::InProgress, BatchStatus::Finalizing],
            BatchStatus::Expired,
        )?;
        self.expired_at = Some(now);
        Ok(())
    }

    /// The tenant asked to cancel.
    pub fn cancel(&mut self, now: Timestamp) -> Result<(), TransitionError> {
        self.go(
            &[BatchStatus::Validating, BatchStatus::Queued, BatchStatus::InProgress],
            BatchStatus::Cancelling,
        )?;
        self.cancelling_at = Some(now);
        Ok(())
    }

    /// Requests that were running when the cancel came have finished.
    pub fn cancelled(&mut self, now: Timestamp) -> Result<(), TransitionError> {
        self.go(&[BatchStatus::Cancelling], BatchStatus::Cancelled)?;
        self.cancelled_at = Some(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BatchStatus::*;
    use proptest::prelude::*;

    #[test]
    fn happy_path_records_every_timestamp() {
        let mut l = Lifecycle::new(BatchId(1), Timestamp::from_micros(1));
        l.queue(Timestamp::from_micros(2)).unwrap();
        l.start(Timestamp::from_micros(3)).unwrap();
        l.finalize(Timestamp::from_micros(4)).unwrap();
        l.complete(Timestamp::from_micros(5)).unwrap();
        assert_eq!(l.status(), Completed);
        assert_eq!(l.ended_at(), Some(Timestamp::from_micros(5)));
        assert_eq!(l.in_progress_at, Some(Timestamp::from_micros(3)));
    }

    #[test]
    fn refused_transitions_say_what_and_leave_the_state_alone() {
        let mut l = Lifecycle::new(BatchId(7), Timestamp::ZERO);
        l.queue(Timestamp::ZERO).unwrap();
        l.cancel(Timestamp::ZERO).unwrap();
        l.cancelled(Timestamp::ZERO).unwrap();
        let before = l.clone();
        let e = l.cancel(Timestamp::from_micros(9)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "batch_00000007 is cancelled; it cannot become cancelling"
        );
        assert_eq!(l, before);
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Queue,
        Start,
        Finalize,
        Complete,
        Fail,
        Expire,
        Cancel,
        Cancelled,
    }

    fn apply(l: &mut Lifecycle, op: Op, now: Timestamp) -> Result<(), TransitionError> {
        match op {
            Op::Queue => l.queue(now),
            Op::Start => l.start(now),
            Op::Finalize => l.finalize(now),
            Op::Complete => l.complete(now),
            Op::Fail => l.fail(now, "x"),
            Op::Expire => l.expire(now),
            Op::Cancel => l.cancel(now),
            Op::Cancelled => l.cancelled(now),
        }
    }

    proptest! {
        /// Whatever sequence of operations is tried: a terminal status never changes, and
        /// only the transitions in the module docs ever happen.
        #[test]
        fn only_documented_transitions_happen(ops in proptest::collection::vec(0u8..8, 0..30)) {
            let allowed = [
                (Validating, Queued), (Queued, InProgress), (InProgress, Finalizing), (Queued, Finalizing),
                (Finalizing, Completed), (Validating, Failed), (Queued, Failed), (InProgress, Failed),
                (Queued, Expired), (InProgress, Expired), (Finalizing, Expired),
                (Validating, Cancelling), (Queued, Cancelling), (InProgress, Cancelling), (Cancelling, Cancelled),
            ];
            let mut l = Lifecycle::new(BatchId(1), Timestamp::ZERO);
            for (i, o) in ops.into_iter().enumerate() {
                let op = [Op::Queue, Op::Start, Op::Finalize, Op::Complete, Op::Fail, Op::Expire, Op::Cancel, Op::Cancelled][o as usize];
                let from = l.status();
                let ok = apply(&mut l, op, Timestamp::from_micros(i as u64)).is_ok();
                if ok {
                    prop_assert!(allowed.contains(&(from, l.status())), "{from:?} -> {:?}", l.status());
                    prop_assert!(!from.is_terminal());
                } else {
                    prop_assert_eq!(from, l.status());
                }
            }
        }
    }
}
