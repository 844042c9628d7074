//! The rebalance planner and the key partitioner shared by the brokers that
//! run in-process: [`MemoryBroker`](crate::MemoryBroker) and the simulator's
//! broker (`sim/src/broker.rs`). Both are free of I/O, clocks and
//! randomness: they take the group's state and return what to do, so the
//! two brokers (and their tests) cannot drift apart.
//!
//! The real adapters do not plan: with Kafka the group coordinator and
//! librdkafka's assignor decide the assignment, and librdkafka picks the
//! partition of a keyed message itself (`partitioner`, by default
//! `murmur2_random`: [`partition_for_key`] for keyed messages, so a key lands
//! on the same partition here and on a Kafka cluster — `tests/kafka.rs`
//! checks it against the librdkafka mock cluster, and the unit tests below
//! check [`murmur2`] against Kafka's reference values); a JetStream stream is
//! one partition.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::TopicPartition;

/// Kafka's murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`), so
/// keys land on the partitions Kafka's default partitioner would choose.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition Kafka's default partitioner picks for `key` among
/// `partitions` (which must be at least 1).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// What one rebalance step does to a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<M> {
    /// The assignment the group moves toward: every partition of every
    /// subscribed topic, with exactly one owner, a member subscribed to it.
    pub target: BTreeMap<TopicPartition, M>,
    /// Partitions each owner must now be asked to give up: it owns them, they
    /// belong to someone else in `target` (or to nobody), and it has not been
    /// asked yet. They stay owned until released (revoke before assign).
    pub revoke: BTreeMap<M, Vec<TopicPartition>>,
    /// Partitions nobody owns, handed to their target owner now.
    pub assign: BTreeMap<M, Vec<TopicPartition>>,
}

impl<M> Plan<M> {
    /// Nothing to revoke and nothing to assign: the group is where it should be
    /// (or waits for releases).
    pub fn is_empty(&self) -> bool {
        self.revoke.is_empty() && self.assign.is_empty()
    }
}

/// Plans a rebalance of one group.
///
/// - `members`: each member and the topics it subscribes to (any order);
/// - `partitions`: a topic's partition count (0 if it does not exist);
/// - `owner`: the current owner of each owned partition;
/// - `revoking`: whether the member was already asked to give the partition up.
///
/// The target spreads each topic's partitions evenly over its subscribers
/// (counts differ by at most one); it is **sticky**: a partition stays with
/// its current owner (unless that owner is releasing it) whenever the even
/// spread allows, so a membership change moves as few partitions as the even
/// spread needs. Where the spread leaves a choice, the extra partition of an
/// uneven topic goes to the member with the fewest partitions so far over all
/// topics, then the lowest id. Deterministic: equal input, equal plan.
pub fn plan<'a, M: Ord + Copy>(
    members: impl IntoIterator<Item = (M, &'a BTreeSet<String>)>,
    partitions: impl Fn(&str) -> u32,
    owner: &BTreeMap<TopicPartition, M>,
    revoking: impl Fn(M, &TopicPartition) -> bool,
) -> Plan<M> {
    let members: BTreeMap<M, &BTreeSet<String>> = members.into_iter().collect();
    let topics: BTreeSet<&String> = members.values().flat_map(|t| t.iter()).collect();
    let mut target: BTreeMap<TopicPartition, M> = BTreeMap::new();
    // Partitions targeted to each member so far, over all topics.
    let mut load: BTreeMap<M, usize> = members.keys().map(|m| (*m, 0)).collect();
    for topic in topics {
        let n = partitions(topic);
        if n == 0 {
            continue;
        }
        let name: Arc<str> = topic.as_str().into();
        let eligible: Vec<M> = members.iter().filter(|(_, t)| t.contains(topic)).map(|(m, _)| *m).collect();
        let k = eligible.len();
        let (base, mut extra) = (n as usize / k, n as usize % k);
        // What each eligible member owns of this topic and keeps unless the spread forbids it.
        let mut sticky: BTreeMap<M, Vec<u32>> = eligible.iter().map(|m| (*m, Vec::new())).collect();
        for p in 0..n {
            let tp = TopicPartition { topic: name.clone(), partition: p };
            if let Some(&o) = owner.get(&tp) {
                if let Some(list) = sticky.get_mut(&o) {
                    if !revoking(o, &tp) {
                        list.push(p);
                    }
                }
            }
        }
        // Quotas: `base` each; the `extra` partitions go first to members that
        // already own more than `base` (so they keep them), then to the least loaded.
        let mut quota: BTreeMap<M, usize> = eligible.iter().map(|m| (*m, base)).collect();
        for m in &eligible {
            if extra > 0 && sticky[m].len() > base {
                *quota.get_mut(m).expect("eligible") += 1;
                extra -= 1;
            }
        }
        if extra > 0 {
            let mut rest: Vec<M> = eligible.iter().copied().filter(|m| quota[m] == base).collect();
            rest.sort_by_key(|m| (load[m], *m));
            for m in rest.into_iter().take(extra) {
                *quota.get_mut(&m).expect("eligible") += 1;
            }
        }
        // Keep what the quotas allow, then fill the quotas from what is left.
        let mut count: BTreeMap<M, usize> = eligible.iter().map(|m| (*m, 0)).collect();
        let mut kept: BTreeSet<u32> = BTreeSet::new();
        for (m, list) in &sticky {
            for &p in list.iter().take(quota[m]) {
                kept.insert(p);
                target.insert(TopicPartition { topic: name.clone(), partition: p }, *m);
            }
            *count.get_mut(m).expect("eligible") = list.len().min(quota[m]);
        }
        for p in (0..n).filter(|p| !kept.contains(p)) {
            let m = *eligible
                .iter()
                .filter(|m| count[m] < quota[m])
                .min_by_key(|m| (count[m], **m))
                .expect("the quotas add up to the partition count");
            *count.get_mut(&m).expect("eligible") += 1;
            target.insert(TopicPartition { topic: name.clone(), partition: p }, m);
        }
        for (m, c) in count {
            *load.get_mut(&m).expect("member") += c;
        }
    }
    let mut revoke: BTreeMap<M, Vec<TopicPartition>> = BTreeMap::new();
    for (tp, o) in owner {
        if target.get(tp) != Some(o) && !revoking(*o, tp) {
            revoke.entry(*o).or_default().push(tp.clone());
        }
    }
    let mut assign: BTreeMap<M, Vec<TopicPartition>> = BTreeMap::new();
    for (tp, m) in &target {
        if !owner.contains_key(tp) {
            assign.entry(*m).or_default().push(tp.clone());
        }
    }
    Plan { target, revoke, assign }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Reference values of Kafka's Utils.murmur2 (org.apache.kafka.common.utils).
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32, -58897971);
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn partition_for_key_is_in_range() {
        for n in 1..20 {
            for k in 0..200u32 {
                assert!(partition_for_key(&k.to_le_bytes(), n) < n);
            }
        }
        assert_eq!(partition_for_key(b"order-1", 0), 0, "no partitions is treated as one");
    }

    fn topics(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn tp(topic: &str, p: u32) -> TopicPartition {
        TopicPartition::new(topic, p)
    }

    /// A group: subscriptions, owners and outstanding revokes.
    #[derive(Debug, Clone, Default)]
    struct Group {
        members: BTreeMap<u32, BTreeSet<String>>,
        owner: BTreeMap<TopicPartition, u32>,
        revoking: BTreeSet<(u32, TopicPartition)>,
    }

    impl Group {
        fn plan(&self, parts: &BTreeMap<String, u32>) -> Plan<u32> {
            plan(
                self.members.iter().map(|(m, t)| (*m, t)),
                |t| parts.get(t).copied().unwrap_or(0),
                &self.owner,
                |m, tp| self.revoking.contains(&(m, tp.clone())),
            )
        }

        /// Applies a plan as the brokers do: revokes are recorded, free partitions assigned.
        fn apply(&mut self, plan: &Plan<u32>) {
            for (m, tps) in &plan.revoke {
                for tp in tps {
                    assert_eq!(self.owner.get(tp), Some(m), "only an owner is asked to revoke");
                    assert!(self.revoking.insert((*m, tp.clone())), "{tp} revoked twice");
                }
            }
            for (m, tps) in &plan.assign {
                for tp in tps {
                    assert!(self.owner.insert(tp.clone(), *m).is_none(), "{tp} assigned while owned");
                }
            }
        }

        /// Every asked owner releases; members that left lose what they owned.
        fn release_all(&mut self) {
            for (m, tp) in std::mem::take(&mut self.revoking) {
                if self.owner.get(&tp) == Some(&m) {
                    self.owner.remove(&tp);
                }
            }
        }

        fn leave(&mut self, m: u32) {
            self.members.remove(&m);
            self.owner.retain(|_, o| *o != m);
            self.revoking.retain(|(o, _)| *o != m);
        }

        /// Plans, applies and releases until nothing moves; returns the plans' revokes.
        fn settle(&mut self, parts: &BTreeMap<String, u32>) -> usize {
            let mut revoked = 0;
            for _ in 0..10 {
                let p = self.plan(parts);
                if p.is_empty() {
                    assert!(self.revoking.is_empty());
                    return revoked;
                }
                revoked += p.revoke.values().map(Vec::len).sum::<usize>();
                self.apply(&p);
                self.release_all();
            }
            panic!("no fixpoint after 10 rounds: {self:?}");
        }
    }

    /// Every partition of every subscribed topic has one owner, subscribed to
    /// it, and each topic is spread evenly (counts differ by at most one).
    fn assert_balanced(g: &Group, parts: &BTreeMap<String, u32>) {
        for (topic, &n) in parts {
            let eligible: Vec<u32> = g.members.iter().filter(|(_, t)| t.contains(topic)).map(|(m, _)| *m).collect();
            let owned: Vec<(&TopicPartition, &u32)> = g.owner.iter().filter(|(tp, _)| &*tp.topic == topic).collect();
            if eligible.is_empty() {
                assert!(owned.is_empty(), "{topic} owned without subscribers");
                continue;
            }
            assert_eq!(owned.len(), n as usize, "every partition of {topic} owned: {g:?}");
            let mut counts: BTreeMap<u32, usize> = eligible.iter().map(|m| (*m, 0)).collect();
            for (tp, m) in owned {
                assert!(tp.partition < n);
                *counts.get_mut(m).unwrap_or_else(|| panic!("{tp} owned by {m}, not subscribed")) += 1;
            }
            let (lo, hi) = (counts.values().min().unwrap(), counts.values().max().unwrap());
            assert!(hi - lo <= 1, "{topic} spread unevenly: {counts:?}");
        }
    }

    #[test]
    fn fresh_group_is_spread_evenly_over_topics() {
        let parts: BTreeMap<String, u32> = [("orders".into(), 3), ("payments".into(), 3)].into();
        let mut g = Group::default();
        g.members.insert(1, topics(&["orders", "payments"]));
        g.members.insert(2, topics(&["orders", "payments"]));
        assert_eq!(g.settle(&parts), 0);
        assert_balanced(&g, &parts);
        // The uneven extra of the second topic goes to the member that got fewer in the first.
        let total = |m: u32| g.owner.values().filter(|o| **o == m).count();
        assert_eq!((total(1), total(2)), (3, 3));
    }

    #[test]
    fn a_joining_member_takes_only_what_the_spread_needs() {
        let parts: BTreeMap<String, u32> = [("orders".into(), 6)].into();
        let mut g = Group::default();
        g.members.insert(1, topics(&["orders"]));
        g.settle(&parts);
        assert_eq!(g.owner.values().filter(|o| **o == 1).count(), 6);
        g.members.insert(2, topics(&["orders"]));
        let before = g.owner.clone();
        assert_eq!(g.settle(&parts), 3, "three partitions move, no more");
        assert_balanced(&g, &parts);
        let stayed = before.iter().filter(|(tp, m)| g.owner.get(*tp) == Some(*m)).count();
        assert_eq!(stayed, 3);
        // A member leaving: its partitions go to the others, nothing else moves.
        g.members.insert(3, topics(&["orders"]));
        g.settle(&parts);
        let before = g.owner.clone();
        g.leave(2);
        assert_eq!(g.settle(&parts), 0, "only the leaver's partitions move");
        assert_balanced(&g, &parts);
        for (tp, m) in &before {
            if *m != 2 {
                assert_eq!(g.owner.get(tp), Some(m), "{tp} stayed with {m}");
            }
        }
    }

    #[test]
    fn a_releasing_owner_is_not_sticky_and_is_not_asked_twice() {
        let parts: BTreeMap<String, u32> = [("orders".into(), 2)].into();
        let mut g = Group::default();
        g.members.insert(1, topics(&["orders"]));
        g.settle(&parts);
        g.members.insert(2, topics(&["orders"]));
        let p = g.plan(&parts);
        assert_eq!(p.revoke, BTreeMap::from([(1, vec![tp("orders", 1)])]));
        assert!(p.assign.is_empty(), "revoke before assign");
        g.apply(&p);
        // Until the release arrives, planning again asks nothing new.
        assert!(g.plan(&parts).is_empty());
        g.release_all();
        assert_eq!(g.plan(&parts).assign, BTreeMap::from([(2, vec![tp("orders", 1)])]));
    }

    #[test]
    fn unsubscribed_topics_are_revoked_and_unknown_topics_ignored() {
        let parts: BTreeMap<String, u32> = [("orders".into(), 2)].into();
        let mut g = Group::default();
        g.members.insert(1, topics(&["orders", "missing"]));
        g.settle(&parts);
        assert_eq!(g.owner.len(), 2);
        g.members.insert(1, topics(&[]));
        let p = g.plan(&parts);
        assert!(p.target.is_empty());
        assert_eq!(p.revoke[&1].len(), 2);
    }

    /// The most partitions a topic's owners can keep under an even spread:
    /// each keeps up to `base`, and `extra` of those owning more keep one more.
    fn max_keepable(g: &Group, topic: &str, n: u32) -> usize {
        let eligible: Vec<u32> = g.members.iter().filter(|(_, t)| t.contains(topic)).map(|(m, _)| *m).collect();
        if eligible.is_empty() {
            return 0;
        }
        let (base, extra) = (n as usize / eligible.len(), n as usize % eligible.len());
        let sticky =
            |m: &u32| g.owner.iter().filter(|(tp, o)| &*tp.topic == topic && tp.partition < n && *o == m).count();
        let kept: usize = eligible.iter().map(|m| sticky(m).min(base)).sum();
        kept + extra.min(eligible.iter().filter(|m| sticky(m) > base).count())
    }

    #[derive(Debug, Clone)]
    enum Change {
        Join(u32, Vec<bool>),
        Leave(u32),
        Subscribe(u32, Vec<bool>),
        Grow(usize, u32),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (0..6u32, prop::collection::vec(any::<bool>(), 3)).prop_map(|(m, t)| Change::Join(m, t)),
            (0..6u32).prop_map(Change::Leave),
            (0..6u32, prop::collection::vec(any::<bool>(), 3)).prop_map(|(m, t)| Change::Subscribe(m, t)),
            (0..3usize, 1..4u32).prop_map(|(t, n)| Change::Grow(t, n)),
        ]
    }

    proptest! {
        /// Any sequence of joins, leaves, subscription changes and topic
        /// growth: after each settles, every partition is owned once by a
        /// subscriber, each topic is spread evenly, the plan is a fixpoint,
        /// and the first round moved no more partitions than the spread needs.
        #[test]
        fn plans_stay_even_sticky_and_exclusive(changes in prop::collection::vec(change(), 1..25)) {
            let names = ["a", "b", "c"];
            let mut parts: BTreeMap<String, u32> = names.iter().map(|n| (n.to_string(), 2)).collect();
            let mut g = Group::default();
            let pick = |t: &[bool]| -> BTreeSet<String> {
                names.iter().zip(t).filter(|(_, on)| **on).map(|(n, _)| n.to_string()).collect()
            };
            for c in changes {
                match c {
                    Change::Join(m, t) => { g.leave(m); g.members.insert(m, pick(&t)); }
                    Change::Leave(m) => g.leave(m),
                    Change::Subscribe(m, t) => if g.members.contains_key(&m) { g.members.insert(m, pick(&t)); },
                    Change::Grow(t, n) => *parts.get_mut(names[t]).unwrap() += n,
                }
                // The first round revokes exactly what an even spread cannot keep.
                let p = g.plan(&parts);
                let owned_ok: usize = parts.iter().map(|(t, n)| max_keepable(&g, t, *n)).sum();
                let kept = g.owner.iter().filter(|(tp, o)| p.target.get(*tp) == Some(*o)).count();
                prop_assert_eq!(kept, owned_ok, "sticky: kept {} of what could be kept {}", kept, owned_ok);
                g.settle(&parts);
                assert_balanced(&g, &parts);
                prop_assert!(g.plan(&parts).is_empty());
            }
        }
    }
}
