//! The Kafka session's assignment bookkeeping, without I/O: rebalance
//! callbacks (the poll thread) and the consumer's calls (`next`, `commit`,
//! `release`) go in, decisions come out.
//!
//! Every assignment of a partition gets a new **epoch**. The poll thread
//! knows the epoch librdkafka currently holds (`owned`) and the epoch of a
//! revoke waiting for its release (`revoking`); the consumer's side knows the
//! epoch of the last [`SessionEvent::Assigned`](crate::SessionEvent) it took
//! from `next` (`seen`). The consumer's calls carry no epoch, but they always
//! refer to what it has seen, so:
//!
//! * a commit of a partition goes through only if the assignment the
//!   consumer has seen is the one librdkafka still holds: a late commit of an
//!   old assignment (after its revoke timed out, maybe after the partition
//!   came back under a new epoch the consumer has not seen yet) is rejected
//!   instead of writing the old frontier over the next owner's commit;
//! * a release clears only the revoke of the epoch the consumer has seen: a
//!   late release of an old revoke does not end a newer revoke's wait;
//! * a revoke that ends (released or timed out) disowns the partition, then
//!   waits for the commits already in flight for it, so none lands after the
//!   partition was handed on.

use std::collections::BTreeMap;

use crate::broker::TopicPartition;

/// The number of one assignment of one partition to this member.
pub type Epoch = u64;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Assignments {
    last_epoch: Epoch,
    /// What librdkafka holds: partition → epoch of its assignment.
    owned: BTreeMap<TopicPartition, Epoch>,
    /// Revokes handed to the consumer and not yet released: partition →
    /// epoch of the assignment being revoked.
    revoking: BTreeMap<TopicPartition, Epoch>,
    /// The assignment the consumer last took from `next`, per partition.
    seen: BTreeMap<TopicPartition, Epoch>,
    /// Commits started and not finished, per partition.
    committing: BTreeMap<TopicPartition, usize>,
}

/// A commit split by [`Assignments::begin_commit`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CommitDecision {
    /// Partitions (with their offsets) that may be committed now; pass them
    /// to [`Assignments::end_commit`] when the commit returns.
    pub allowed: Vec<(TopicPartition, u64)>,
    /// Partitions whose commit is refused: not assigned any more, or the
    /// consumer has not seen their current assignment yet.
    pub rejected: Vec<(TopicPartition, u64)>,
}

impl Assignments {
    /// Poll thread: librdkafka assigned `tps`. Returns the assignment's epoch
    /// (one per assign; carried by the `Assigned` event).
    pub fn assign(&mut self, tps: &[TopicPartition]) -> Epoch {
        self.last_epoch += 1;
        for tp in tps {
            self.owned.insert(tp.clone(), self.last_epoch);
        }
        self.last_epoch
    }

    /// Consumer side: `next` hands out `Assigned(tps)` of `epoch`.
    pub fn seen_assigned(&mut self, tps: &[TopicPartition], epoch: Epoch) {
        for tp in tps {
            self.seen.insert(tp.clone(), epoch);
        }
    }

    /// Consumer side: `next` hands out `Lost(tps)`.
    pub fn seen_lost(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.seen.remove(tp);
        }
    }

    /// Poll thread: librdkafka revokes `tps`. Returns the partitions (with
    /// their epochs) whose release is to be waited for; partitions not owned
    /// are left out.
    pub fn begin_revoke(&mut self, tps: &[TopicPartition]) -> Vec<(TopicPartition, Epoch)> {
        let mut waiting = Vec::with_capacity(tps.len());
        for tp in tps {
            if let Some(&epoch) = self.owned.get(tp) {
                self.revoking.insert(tp.clone(), epoch);
                waiting.push((tp.clone(), epoch));
            }
        }
        waiting
    }

    /// Whether any of the revoke's partitions still waits for its release.
    pub fn awaiting_release(&self, revoke: &[(TopicPartition, Epoch)]) -> bool {
        revoke.iter().any(|(tp, e)| self.revoking.get(tp) == Some(e))
    }

    /// Consumer side: `release(tps)`. Clears the revokes of the epochs the
    /// consumer has seen; returns whether one was cleared (wake the waiter).
    pub fn release(&mut self, tps: &[TopicPartition]) -> bool {
        let mut cleared = false;
        for tp in tps {
            let seen = self.seen.get(tp);
            if seen.is_some() && self.revoking.get(tp) == seen {
                self.revoking.remove(tp);
                self.seen.remove(tp);
                cleared = true;
            }
        }
        cleared
    }

    /// Poll thread: the revoke ended (released, timed out or stopping).
    /// Disowns its partitions (only the epochs revoked), so no new commit of
    /// them starts.
    pub fn end_revoke(&mut self, revoke: &[(TopicPartition, Epoch)]) {
        for (tp, epoch) in revoke {
            if self.revoking.get(tp) == Some(epoch) {
                self.revoking.remove(tp);
            }
            if self.owned.get(tp) == Some(epoch) {
                self.owned.remove(tp);
            }
        }
    }

    /// Poll thread: the partitions are gone without a revoke (lost, or the
    /// session is leaving). Returns those that were owned.
    pub fn disown(&mut self, tps: &[TopicPartition]) -> Vec<TopicPartition> {
        let mut gone = Vec::new();
        for tp in tps {
            self.revoking.remove(tp);
            if self.owned.remove(tp).is_some() {
                gone.push(tp.clone());
            }
        }
        gone
    }

    /// Poll thread: the whole assignment is gone (rebalance error).
    pub fn disown_all(&mut self) -> Vec<TopicPartition> {
        self.revoking.clear();
        std::mem::take(&mut self.owned).into_keys().collect()
    }

    /// Consumer side: which of `offsets` may be committed (see the module
    /// documentation). The allowed ones count as in flight until
    /// [`Assignments::end_commit`].
    pub fn begin_commit(&mut self, offsets: &[(TopicPartition, u64)]) -> CommitDecision {
        let mut decision = CommitDecision::default();
        for (tp, offset) in offsets {
            let current = self.owned.get(tp);
            if current.is_some() && current == self.seen.get(tp) {
                *self.committing.entry(tp.clone()).or_default() += 1;
                decision.allowed.push((tp.clone(), *offset));
            } else {
                decision.rejected.push((tp.clone(), *offset));
            }
        }
        decision
    }

    /// Consumer side: the commit of `allowed` returned (either way).
    pub fn end_commit(&mut self, allowed: &[(TopicPartition, u64)]) {
        for (tp, _) in allowed {
            if let Some(n) = self.committing.get_mut(tp) {
                *n -= 1;
                if *n == 0 {
                    self.committing.remove(tp);
                }
            }
        }
    }

    /// Whether `tp` waits for the consumer's release (its final commit must
    /// reach the broker before the revoke ends).
    pub fn is_revoking(&self, tp: &TopicPartition) -> bool {
        self.revoking.contains_key(tp)
    }

    /// Whether a commit of any of the revoke's partitions is in flight.
    pub fn committing(&self, revoke: &[(TopicPartition, Epoch)]) -> bool {
        revoke.iter().any(|(tp, _)| self.committing.contains_key(tp))
    }

    /// The partitions librdkafka holds.
    pub fn owned(&self) -> Vec<TopicPartition> {
        self.owned.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: u32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    fn allowed(a: &mut Assignments, p: u32, offset: u64) -> bool {
        let d = a.begin_commit(&[(tp(p), offset)]);
        a.end_commit(&d.allowed);
        !d.allowed.is_empty()
    }

    #[test]
    fn the_normal_cycle_commits_until_the_revoke_ends() {
        let mut a = Assignments::default();
        let e = a.assign(&[tp(0), tp(1)]);
        assert!(!allowed(&mut a, 0, 5), "the consumer has not seen the assignment yet");
        a.seen_assigned(&[tp(0), tp(1)], e);
        assert!(allowed(&mut a, 0, 5));
        let revoke = a.begin_revoke(&[tp(0)]);
        assert_eq!(revoke, vec![(tp(0), e)]);
        assert!(a.awaiting_release(&revoke));
        assert!(allowed(&mut a, 0, 7), "the revoke's final commit");
        assert!(a.release(&[tp(0)]));
        assert!(!a.awaiting_release(&revoke));
        a.end_revoke(&revoke);
        assert!(!allowed(&mut a, 0, 8), "revoked");
        assert!(allowed(&mut a, 1, 3), "the other partition stays");
        assert_eq!(a.owned(), vec![tp(1)]);
    }

    #[test]
    fn a_late_commit_after_a_timed_out_revoke_is_rejected_even_when_the_partition_came_back() {
        let mut a = Assignments::default();
        let e1 = a.assign(&[tp(0)]);
        a.seen_assigned(&[tp(0)], e1);
        let revoke = a.begin_revoke(&[tp(0)]);
        // No release: the revoke times out, the partition goes elsewhere.
        a.end_revoke(&revoke);
        assert!(!allowed(&mut a, 0, 50));
        // It comes back; the consumer is still busy with the old revoke.
        let e2 = a.assign(&[tp(0)]);
        assert_ne!(e1, e2);
        assert!(!allowed(&mut a, 0, 50), "the old frontier must not overwrite the other owner's commit");
        // The consumer takes the new assignment: its commits count again.
        a.seen_assigned(&[tp(0)], e2);
        assert!(allowed(&mut a, 0, 120));
    }

    #[test]
    fn a_late_release_does_not_clear_a_newer_revoke() {
        let mut a = Assignments::default();
        let e1 = a.assign(&[tp(0)]);
        a.seen_assigned(&[tp(0)], e1);
        let old = a.begin_revoke(&[tp(0)]);
        a.end_revoke(&old); // timed out
        let e2 = a.assign(&[tp(0)]);
        let new = a.begin_revoke(&[tp(0)]);
        assert_eq!(new, vec![(tp(0), e2)]);
        // The consumer releases the old revoke late; it has not seen e2.
        assert!(!a.release(&[tp(0)]));
        assert!(a.awaiting_release(&new), "the newer revoke still waits");
        a.seen_assigned(&[tp(0)], e2);
        assert!(a.release(&[tp(0)]));
        assert!(!a.awaiting_release(&new));
    }

    #[test]
    fn a_newer_assignment_survives_the_end_of_an_older_revoke() {
        let mut a = Assignments::default();
        let e1 = a.assign(&[tp(0)]);
        let old = a.begin_revoke(&[tp(0)]);
        let e2 = a.assign(&[tp(0)]);
        a.end_revoke(&old);
        assert_eq!(a.owned(), vec![tp(0)], "the revoke of e1 does not disown e2");
        a.seen_assigned(&[tp(0)], e2);
        assert!(allowed(&mut a, 0, 1));
        let _ = e1;
    }

    #[test]
    fn lost_partitions_reject_commits() {
        let mut a = Assignments::default();
        let e = a.assign(&[tp(0), tp(1)]);
        a.seen_assigned(&[tp(0), tp(1)], e);
        assert_eq!(a.disown(&[tp(0)]), vec![tp(0)]);
        a.seen_lost(&[tp(0)]);
        assert!(!allowed(&mut a, 0, 1));
        assert_eq!(a.disown_all(), vec![tp(1)]);
        assert!(!allowed(&mut a, 1, 1));
        assert!(a.owned().is_empty());
    }

    #[test]
    fn commits_in_flight_are_visible_to_the_revoke() {
        let mut a = Assignments::default();
        let e = a.assign(&[tp(0), tp(1)]);
        a.seen_assigned(&[tp(0), tp(1)], e);
        let d = a.begin_commit(&[(tp(0), 4), (tp(1), 2)]);
        assert_eq!(d.allowed.len(), 2);
        let revoke = a.begin_revoke(&[tp(0)]);
        a.end_revoke(&revoke);
        assert!(a.committing(&revoke), "the revoke waits for the commit already sent");
        a.end_commit(&d.allowed);
        assert!(!a.committing(&revoke));
    }

    #[test]
    fn a_commit_splits_allowed_and_rejected() {
        let mut a = Assignments::default();
        let e = a.assign(&[tp(0)]);
        a.seen_assigned(&[tp(0)], e);
        let d = a.begin_commit(&[(tp(0), 4), (tp(9), 2)]);
        assert_eq!(d.allowed, vec![(tp(0), 4)]);
        assert_eq!(d.rejected, vec![(tp(9), 2)]);
        a.end_commit(&d.allowed);
    }
}
