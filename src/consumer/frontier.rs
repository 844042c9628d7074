//! The commit frontier of one partition: the highest offset below which every
//! dispatched event has completed.
//!
//! rust-rdkafka's at-least-once example stores an offset only after its
//! message was processed, one at a time. Here many events of a partition are
//! in flight at once and complete out of order, so the frontier is the lowest
//! offset still outstanding (or that finished without completing); it never
//! passes an event that has not completed.

use std::collections::{BTreeSet, VecDeque};

/// The commit point of one partition: the lowest offset still outstanding
/// (dispatched and not completed), or one past the highest dispatched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    /// Dispatched, not yet finished.
    outstanding: BTreeSet<u64>,
    /// Lowest offset that finished without completing (handed back, fenced,
    /// failed for good): the frontier may never pass it in this assignment.
    blocked: Option<u64>,
    /// One past the highest dispatched offset.
    next: Option<u64>,
    /// Dispatched offsets not yet covered by a commit, as rising half-open
    /// runs: one run while offsets are contiguous, so counting the handled
    /// but uncommitted events costs no memory per event.
    uncommitted: VecDeque<(u64, u64)>,
    /// Events in `uncommitted`.
    uncommitted_len: u64,
    /// Events that finished without completing (never committed in this
    /// assignment).
    abandoned: u64,
    #[cfg(feature = "planted-bugs")]
    max_completed: Option<u64>,
}

impl Frontier {
    /// A partition with nothing dispatched yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `offset` was already dispatched in this assignment (a broker
    /// redelivery of something we hold or completed).
    pub fn seen(&self, offset: u64) -> bool {
        self.next.is_some_and(|n| offset < n)
    }

    /// Records a dispatched event. Offsets must rise (gaps are fine).
    pub fn dispatched(&mut self, offset: u64) {
        debug_assert!(!self.seen(offset), "offsets are dispatched in rising order");
        self.outstanding.insert(offset);
        self.next = Some(offset + 1);
        match self.uncommitted.back_mut() {
            Some((_, end)) if *end == offset => *end += 1,
            _ => self.uncommitted.push_back((offset, offset + 1)),
        }
        self.uncommitted_len += 1;
    }

    /// The event at `offset` completed (handled, or dead-lettered).
    pub fn completed(&mut self, offset: u64) {
        #[cfg(feature = "planted-bugs")]
        {
            self.max_completed = self.max_completed.max(Some(offset));
        }
        self.outstanding.remove(&offset);
    }

    /// The event at `offset` finished without completing.
    pub fn abandoned(&mut self, offset: u64) {
        if self.outstanding.remove(&offset) {
            self.blocked = Some(self.blocked.map_or(offset, |b| b.min(offset)));
            self.abandoned += 1;
        }
    }

    /// Events dispatched and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    /// Records a successful commit of `point` (a value of
    /// [`commit_point`](Self::commit_point)): what lies below it is no longer
    /// handled-but-uncommitted.
    pub fn committed(&mut self, point: u64) {
        while let Some((start, end)) = self.uncommitted.front_mut() {
            if *end <= point {
                self.uncommitted_len -= *end - *start;
                self.uncommitted.pop_front();
            } else {
                if *start < point {
                    self.uncommitted_len -= point - *start;
                    *start = point;
                }
                break;
            }
        }
    }

    /// Events completed (handled or dead-lettered) whose offsets no commit
    /// covers yet: the `eventbus_commit_lag` gauge.
    pub fn handled_uncommitted(&self) -> u64 {
        // Below the commit point everything completed, so what is neither
        // outstanding nor abandoned in `uncommitted` completed above it.
        self.uncommitted_len.saturating_sub(self.outstanding.len() as u64).saturating_sub(self.abandoned)
    }

    /// How far the commit point is past the last commit, in offsets (gaps
    /// count): what a commit now would move the partition's committed offset.
    pub fn committable(&self) -> u64 {
        match (self.uncommitted.front(), self.commit_point()) {
            (Some(&(start, _)), Some(point)) => point.saturating_sub(start),
            _ => 0,
        }
    }

    /// Events dispatched and not yet covered by a commit (in flight, handled
    /// or abandoned): what a broker with a delivery window counts against it.
    pub fn uncommitted(&self) -> u64 {
        self.uncommitted_len
    }

    /// Whether an abandoned event holds the frontier back.
    #[cfg(test)]
    pub fn is_blocked(&self) -> bool {
        self.blocked.is_some()
    }

    /// The offset to commit (Kafka's next-to-read): everything below it has
    /// completed. `None` until something was dispatched.
    pub fn commit_point(&self) -> Option<u64> {
        let next = self.next?;
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::Bug::CommitMaxHandled) {
            return self.max_completed.map(|m| m + 1);
        }
        let mut point = next;
        if let Some(&first) = self.outstanding.first() {
            point = point.min(first);
        }
        if let Some(b) = self.blocked {
            point = point.min(b);
        }
        Some(point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_completion_commits_only_the_contiguous_prefix() {
        let mut f = Frontier::new();
        for o in [10, 11, 12, 13] {
            f.dispatched(o);
        }
        assert_eq!(f.commit_point(), Some(10));
        f.completed(12);
        f.completed(11);
        assert_eq!(f.commit_point(), Some(10));
        f.completed(10);
        assert_eq!(f.commit_point(), Some(13));
        f.completed(13);
        assert_eq!(f.commit_point(), Some(14));
    }

    #[test]
    fn an_abandoned_event_blocks_the_frontier() {
        let mut f = Frontier::new();
        for o in 0..4 {
            f.dispatched(o);
        }
        f.completed(0);
        f.abandoned(1);
        f.completed(2);
        f.completed(3);
        assert_eq!(f.commit_point(), Some(1));
        assert!(f.is_blocked());
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn handled_uncommitted_counts_completions_until_their_commit() {
        let mut f = Frontier::new();
        // A gap (11 missing) makes a second run.
        for o in [10, 12, 13, 14, 15] {
            f.dispatched(o);
        }
        assert_eq!(f.handled_uncommitted(), 0);
        f.completed(13);
        f.completed(14);
        assert_eq!(f.handled_uncommitted(), 2);
        assert_eq!(f.commit_point(), Some(10));
        f.completed(10);
        assert_eq!(f.commit_point(), Some(12));
        f.committed(12);
        assert_eq!(f.handled_uncommitted(), 2, "13 and 14 are above the commit");
        f.completed(12);
        f.abandoned(15);
        assert_eq!(f.handled_uncommitted(), 3);
        assert_eq!(f.commit_point(), Some(15));
        f.committed(15);
        assert_eq!(f.handled_uncommitted(), 0, "15 was abandoned, not handled");
    }

    proptest! {
        /// No skipped commit: whatever the completion order, the commit point
        /// never covers an offset that has not completed.
        #[test]
        fn commit_point_never_covers_an_incomplete_offset(
            gaps in proptest::collection::vec(1u64..4, 1..60),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..80),
            abandon_every in 0usize..10,
        ) {
            let mut f = Frontier::new();
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in gaps { o += g; offsets.push(o); f.dispatched(o); }
            let mut pending = offsets.clone();
            let mut completed = BTreeSet::new();
            let mut last_commit = 0;
            for (i, idx) in order.into_iter().enumerate() {
                if pending.is_empty() { break; }
                let off = pending.remove(idx.index(pending.len()));
                if abandon_every > 0 && i % abandon_every == 0 { f.abandoned(off); } else { f.completed(off); completed.insert(off); }
                let point = f.commit_point().unwrap();
                for &x in offsets.iter().filter(|&&x| x < point) {
                    prop_assert!(completed.contains(&x), "commit point {} covers incomplete {}", point, x);
                }
                if i % 3 == 0 {
                    f.committed(point);
                    last_commit = point;
                }
                let uncommitted = completed.iter().filter(|&&x| x >= last_commit).count() as u64;
                prop_assert_eq!(f.handled_uncommitted(), uncommitted);
            }
        }
    }
}
