//! The embedded default broker: Kafka's model in process memory.
//!
//! Topics have partitions; keyed messages go to the partition Kafka's default
//! partitioner would choose (murmur2), unkeyed ones round-robin. Consumer
//! groups have members that join and leave; every membership change
//! rebalances with revoke before assign: a partition moves to its new owner
//! only after the old owner released it (or left); the moves are planned by
//! [`super::plan::plan`] (even per topic, sticky), the planner the
//! simulator's broker uses too. Each group keeps its
//! committed offsets, and a new owner resumes from them, so uncommitted work
//! is redelivered. Everything is deterministic: ordered maps, and no
//! randomness beyond the configured, seeded publish jitter.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;

use super::{
    Broker, BrokerError, ConnectionState, Delivery, Headers, Outbound, PartitionLag, Position, Session, SessionEvent,
    TopicPartition,
};

/// Settings of a [`MemoryBroker`].
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Partitions of a topic created implicitly by a publish or subscribe.
    pub default_partitions: u32,
    /// Each publish waits this long before it is stored (simulated network).
    #[serde(with = "crate::config::millis")]
    pub publish_delay: Duration,
    /// Each publish additionally waits up to this long, drawn from `seed`.
    #[serde(with = "crate::config::millis")]
    pub publish_jitter: Duration,
    /// Seed of the jitter (the same seed, the same delays).
    pub seed: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { default_partitions: 3, publish_delay: Duration::ZERO, publish_jitter: Duration::ZERO, seed: 0 }
    }
}

struct Stored {
    key: Option<Vec<u8>>,
    headers: Headers,
    payload: Vec<u8>,
    timestamp: SystemTime,
}

type MemberId = u64;

#[derive(Default)]
struct Member {
    topics: BTreeSet<String>,
    /// Assignment changes not yet taken by `next`.
    events: VecDeque<SessionEvent>,
    /// Owned partitions being fetched, with the next offset to deliver.
    fetch: BTreeMap<TopicPartition, u64>,
    /// Partitions this member was asked to release.
    revoking: BTreeSet<TopicPartition>,
    /// Round-robin start among `fetch`, so no partition starves the others.
    cursor: usize,
}

#[derive(Default)]
struct Group {
    members: BTreeMap<MemberId, Member>,
    /// Owner of each partition, from assignment until release or leave.
    owner: BTreeMap<TopicPartition, MemberId>,
    committed: BTreeMap<TopicPartition, u64>,
    /// Highest offset ever delivered + 1, to number redelivery attempts.
    delivered: BTreeMap<TopicPartition, u64>,
    rebalances: u64,
}

/// Failures injected by tests (see [`MemoryBroker::fail_publishes`] and
/// its siblings).
#[derive(Default)]
struct Faults {
    /// Publishes to these topics fail with the error, while set.
    publish: BTreeMap<String, BrokerError>,
    /// `ensure_topic` / `ensure_dead_letter_topic` of these topics fail.
    ensure: BTreeMap<String, BrokerError>,
    /// The next `Session::next` calls of any session fail with these, in order.
    session_next: VecDeque<BrokerError>,
    /// The next `Session::commit` calls fail with these, in order.
    commit: VecDeque<BrokerError>,
    /// The next `Broker::subscribe` calls fail with these, in order.
    subscribe: VecDeque<BrokerError>,
    /// The next `Session::close` calls fail with these, in order (the
    /// session still leaves its group).
    close: VecDeque<BrokerError>,
}

struct State {
    topics: BTreeMap<String, Vec<Vec<Stored>>>,
    faults: Faults,
    groups: BTreeMap<String, Group>,
    next_member: MemberId,
    round_robin: u64,
    rng: SmallRng,
}

struct Shared {
    config: MemoryConfig,
    state: Mutex<State>,
    /// Wakes sessions waiting in `next` after any change.
    changed: Notify,
    /// Reachability as set by [`MemoryBroker::set_connection_state`].
    connection: tokio::sync::watch::Sender<ConnectionState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An in-process broker. Cloning shares it.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

/// The partition Kafka's default partitioner picks for `key` (the planner's
/// partitioner, shared with the simulator: [`super::plan::partition_for_key`]).
pub use super::plan::partition_for_key;

impl MemoryBroker {
    /// An empty broker with `config`.
    pub fn new(config: MemoryConfig) -> Self {
        let rng = SmallRng::seed_from_u64(config.seed);
        MemoryBroker {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State {
                    topics: BTreeMap::new(),
                    faults: Faults::default(),
                    groups: BTreeMap::new(),
                    next_member: 1,
                    round_robin: 0,
                    rng,
                }),
                changed: Notify::new(),
                connection: tokio::sync::watch::Sender::new(ConnectionState::Connected),
            }),
        }
    }

    /// The committed offset (next to read) of `tp` in `group`.
    pub fn committed(&self, group: &str, tp: &TopicPartition) -> Option<u64> {
        self.shared.lock().groups.get(group)?.committed.get(tp).copied()
    }

    /// Number of messages stored in `tp` (its end offset).
    pub fn end_offset(&self, tp: &TopicPartition) -> u64 {
        let st = self.shared.lock();
        st.topics.get(&*tp.topic).and_then(|p| p.get(tp.partition as usize)).map_or(0, |l| l.len() as u64)
    }

    /// Partition count of `topic`, if it exists.
    pub fn partitions(&self, topic: &str) -> Option<u32> {
        self.shared.lock().topics.get(topic).map(|p| p.len() as u32)
    }

    /// Every stored message of `topic`, partition by partition (for tests,
    /// tools and reading a dead-letter topic).
    pub fn read_topic(&self, topic: &str) -> Vec<Delivery> {
        let st = self.shared.lock();
        let Some(parts) = st.topics.get(topic) else { return Vec::new() };
        let name: Arc<str> = topic.into();
        parts
            .iter()
            .enumerate()
            .flat_map(|(p, log)| {
                let name = name.clone();
                log.iter().enumerate().map(move |(o, m)| to_delivery(&name, p as u32, o as u64, m, 1))
            })
            .collect()
    }

    /// Rebalances a group has gone through.
    pub fn rebalances(&self, group: &str) -> u64 {
        self.shared.lock().groups.get(group).map_or(0, |g| g.rebalances)
    }

    /// Simulates losing (or regaining) the connection, for testing health
    /// checks and reconnect callbacks: while disconnected, publishes fail
    /// with [`BrokerError::Unavailable`]; sessions are not affected.
    pub fn set_connection_state(&self, state: ConnectionState) {
        self.shared.connection.send_replace(state);
    }

    /// Fault injection for tests: while `error` is `Some`, every publish to
    /// `topic` fails with it (nothing is stored); `None` clears it.
    pub fn fail_publishes(&self, topic: &str, error: Option<BrokerError>) {
        let mut st = self.shared.lock();
        match error {
            Some(e) => st.faults.publish.insert(topic.to_string(), e),
            None => st.faults.publish.remove(topic),
        };
    }

    /// Fault injection for tests: while `error` is `Some`, creating `topic`
    /// (`ensure_topic`, `ensure_dead_letter_topic`) fails with it.
    pub fn fail_ensure_topic(&self, topic: &str, error: Option<BrokerError>) {
        let mut st = self.shared.lock();
        match error {
            Some(e) => st.faults.ensure.insert(topic.to_string(), e),
            None => st.faults.ensure.remove(topic),
        };
    }

    /// Fault injection for tests: the next `Session::next` calls (of any
    /// session) return these errors, one each, in order. A fatal one
    /// ([`BrokerError::SessionFailed`]) also drops the member from its group,
    /// as a dead client's session expires.
    pub fn fail_session_next(&self, errors: impl IntoIterator<Item = BrokerError>) {
        self.shared.lock().faults.session_next.extend(errors);
        self.notify();
    }

    /// Fault injection for tests: the next `Session::commit` calls fail with
    /// these errors, one each, in order (nothing is committed).
    pub fn fail_commits(&self, errors: impl IntoIterator<Item = BrokerError>) {
        self.shared.lock().faults.commit.extend(errors);
    }

    /// Fault injection for tests: the next `Session::close` calls fail with
    /// these errors, one each, in order; the session still leaves its group.
    pub fn fail_closes(&self, errors: impl IntoIterator<Item = BrokerError>) {
        self.shared.lock().faults.close.extend(errors);
    }

    /// Fault injection for tests: the next `subscribe` calls fail with these
    /// errors, one each, in order.
    pub fn fail_subscribes(&self, errors: impl IntoIterator<Item = BrokerError>) {
        self.shared.lock().faults.subscribe.extend(errors);
    }

    /// Members currently in `group`.
    pub fn members(&self, group: &str) -> usize {
        self.shared.lock().groups.get(group).map_or(0, |g| g.members.len())
    }

    fn create_topic(&self, st: &mut State, topic: &str, partitions: u32) -> bool {
        let parts = st.topics.entry(topic.to_string()).or_default();
        if parts.len() >= partitions as usize {
            return false;
        }
        parts.resize_with(partitions as usize, Vec::new);
        true
    }

    fn notify(&self) {
        self.shared.changed.notify_waiters();
    }
}

fn to_delivery(topic: &Arc<str>, partition: u32, offset: u64, m: &Stored, attempt: u32) -> Delivery {
    Delivery {
        topic: topic.clone(),
        partition,
        offset,
        key: m.key.clone(),
        headers: m.headers.clone(),
        payload: m.payload.clone(),
        timestamp: Some(m.timestamp),
        attempt,
    }
}

/// Moves a group toward its target assignment ([`super::plan::plan`]):
/// revokes what must move, assigns what is free. Called after every
/// membership, topic or release change.
fn rebalance(topics: &BTreeMap<String, Vec<Vec<Stored>>>, group: &mut Group) {
    let plan = super::plan::plan(
        group.members.iter().map(|(id, m)| (*id, &m.topics)),
        |t| topics.get(t).map_or(0, |p| p.len() as u32),
        &group.owner,
        |id, tp| group.members.get(&id).is_some_and(|m| m.revoking.contains(tp)),
    );
    if plan.is_empty() {
        return;
    }
    for (id, tps) in plan.revoke {
        let member = group.members.get_mut(&id).expect("owners are members");
        for tp in &tps {
            member.revoking.insert(tp.clone());
            member.fetch.remove(tp);
        }
        member.events.push_back(SessionEvent::Revoked(tps));
    }
    for (id, tps) in plan.assign {
        let member = group.members.get_mut(&id).expect("targets are members");
        for tp in &tps {
            group.owner.insert(tp.clone(), id);
            member.fetch.insert(tp.clone(), group.committed.get(tp).copied().unwrap_or(0));
        }
        member.events.push_back(SessionEvent::Assigned(tps));
    }
    group.rebalances += 1;
}

fn rebalance_all(st: &mut State) {
    let State { topics, groups, .. } = st;
    for group in groups.values_mut() {
        rebalance(topics, group);
    }
}

impl Broker for MemoryBroker {
    type Session = MemorySession;

    async fn publish(&self, msg: Outbound) -> Result<Position, BrokerError> {
        if *self.shared.connection.borrow() == ConnectionState::Disconnected {
            return Err(BrokerError::Unavailable("memory broker: simulated disconnection".into()));
        }
        let cfg = &self.shared.config;
        if !cfg.publish_delay.is_zero() || !cfg.publish_jitter.is_zero() {
            let jitter = if cfg.publish_jitter.is_zero() {
                Duration::ZERO
            } else {
                let nanos = self.shared.lock().rng.gen_range(0..=cfg.publish_jitter.as_nanos() as u64);
                Duration::from_nanos(nanos)
            };
            tokio::time::sleep(cfg.publish_delay + jitter).await;
        }
        let position = {
            let mut st = self.shared.lock();
            if let Some(e) = st.faults.publish.get(&msg.topic) {
                return Err(e.clone());
            }
            if !st.topics.contains_key(&msg.topic) {
                self.create_topic(&mut st, &msg.topic, cfg.default_partitions.max(1));
                rebalance_all(&mut st);
            }
            let n = st.topics[&msg.topic].len() as u32;
            let partition = match &msg.key {
                Some(k) => partition_for_key(k, n),
                None => {
                    st.round_robin += 1;
                    (st.round_robin % n as u64) as u32
                }
            };
            let log = &mut st.topics.get_mut(&msg.topic).expect("created above")[partition as usize];
            log.push(Stored { key: msg.key, headers: msg.headers, payload: msg.payload, timestamp: SystemTime::now() });
            Position { partition, offset: log.len() as u64 - 1, duplicate: false }
        };
        self.notify();
        Ok(position)
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<MemorySession, BrokerError> {
        let id = {
            let mut st = self.shared.lock();
            if let Some(e) = st.faults.subscribe.pop_front() {
                return Err(e);
            }
            for t in topics {
                if !st.topics.contains_key(t) {
                    let n = self.shared.config.default_partitions.max(1);
                    self.create_topic(&mut st, t, n);
                }
            }
            let id = st.next_member;
            st.next_member += 1;
            let member = Member { topics: topics.iter().cloned().collect(), ..Member::default() };
            st.groups.entry(group.to_string()).or_default().members.insert(id, member);
            rebalance_all(&mut st);
            id
        };
        self.notify();
        Ok(MemorySession { broker: self.clone(), group: group.to_string(), id, open: true })
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        if partitions == 0 {
            return Err(BrokerError::Config { key: "partitions".into(), reason: "must be at least 1".into() });
        }
        let grew = {
            let mut st = self.shared.lock();
            if let Some(e) = st.faults.ensure.get(topic) {
                return Err(e.clone());
            }
            let grew = self.create_topic(&mut st, topic, partitions);
            if grew {
                rebalance_all(&mut st);
            }
            grew
        };
        if grew {
            self.notify();
        }
        Ok(())
    }

    /// As many partitions as `source` has (creating `source` with the
    /// default count if it does not exist yet), so a dead letter can keep
    /// its origin's partition.
    async fn ensure_dead_letter_topic(&self, source: &str, dead_letter: &str) -> Result<(), BrokerError> {
        let partitions = {
            let mut st = self.shared.lock();
            if !st.topics.contains_key(source) {
                let n = self.shared.config.default_partitions.max(1);
                self.create_topic(&mut st, source, n);
                rebalance_all(&mut st);
            }
            st.topics[source].len() as u32
        };
        self.ensure_topic(dead_letter, partitions).await
    }

    fn connection_state(&self) -> tokio::sync::watch::Receiver<ConnectionState> {
        self.shared.connection.subscribe()
    }

    async fn consumer_lag(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, BrokerError> {
        let st = self.shared.lock();
        let committed = st.groups.get(group).map(|g| &g.committed);
        let mut lags = Vec::new();
        for topic in topics {
            let Some(parts) = st.topics.get(topic) else { continue };
            let name: Arc<str> = topic.as_str().into();
            for (p, log) in parts.iter().enumerate() {
                let partition = TopicPartition { topic: name.clone(), partition: p as u32 };
                let committed = committed.and_then(|c| c.get(&partition)).copied().unwrap_or(0);
                lags.push(PartitionLag { partition, end_offset: log.len() as u64, committed });
            }
        }
        Ok(lags)
    }
}

/// A member of a consumer group on the [`MemoryBroker`]. Dropping it leaves
/// the group without committing (like a crashed process).
pub struct MemorySession {
    broker: MemoryBroker,
    group: String,
    id: MemberId,
    open: bool,
}

impl MemorySession {
    /// This member's id within its group.
    pub fn member_id(&self) -> u64 {
        self.id
    }

    fn with_member<R>(
        &self,
        f: impl FnOnce(&mut State, &str, MemberId) -> Result<R, BrokerError>,
    ) -> Result<R, BrokerError> {
        let mut st = self.broker.shared.lock();
        let present = st.groups.get(&self.group).is_some_and(|g| g.members.contains_key(&self.id));
        if !present {
            return Err(BrokerError::Closed);
        }
        f(&mut st, &self.group, self.id)
    }

    fn leave(&mut self) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        {
            let mut st = self.broker.shared.lock();
            if let Some(group) = st.groups.get_mut(&self.group) {
                group.members.remove(&self.id);
                group.owner.retain(|_, owner| *owner != self.id);
            }
            rebalance_all(&mut st);
        }
        self.broker.notify();
    }

    fn poll_event(&mut self) -> Result<Option<SessionEvent>, BrokerError> {
        let fault = self.broker.shared.lock().faults.session_next.pop_front();
        if let Some(e) = fault {
            if e.class() == super::ErrorClass::Fatal {
                // A dead client: its membership ends without a commit.
                self.leave();
            }
            return Err(e);
        }
        self.with_member(|st, group, id| {
            let State { topics, groups, .. } = st;
            let group = groups.get_mut(group).expect("checked");
            let member = group.members.get_mut(&id).expect("checked");
            if let Some(ev) = member.events.pop_front() {
                return Ok(Some(ev));
            }
            let n = member.fetch.len();
            for i in 0..n {
                let idx = (member.cursor + i) % n;
                let (tp, pos) = member.fetch.iter_mut().nth(idx).expect("index in range");
                let log = &topics[&*tp.topic][tp.partition as usize];
                if (*pos as usize) < log.len() {
                    let offset = *pos;
                    *pos += 1;
                    let tp = tp.clone();
                    member.cursor = (idx + 1) % n;
                    let high = group.delivered.entry(tp.clone()).or_insert(0);
                    let attempt = if offset < *high { 2 } else { 1 };
                    *high = (*high).max(offset + 1);
                    return Ok(Some(SessionEvent::Message(to_delivery(
                        &tp.topic,
                        tp.partition,
                        offset,
                        &log[offset as usize],
                        attempt,
                    ))));
                }
            }
            Ok(None)
        })
    }
}

impl Session for MemorySession {
    async fn next(&mut self) -> Result<SessionEvent, BrokerError> {
        let shared = self.broker.shared.clone();
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            // Register before looking, so a change between look and wait wakes us.
            notified.as_mut().enable();
            if let Some(ev) = self.poll_event()? {
                return Ok(ev);
            }
            notified.await;
        }
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<(), BrokerError> {
        self.with_member(|st, group, id| {
            if let Some(e) = st.faults.commit.pop_front() {
                return Err(e);
            }
            let group = st.groups.get_mut(group).expect("checked");
            // Fencing: only the current owner may commit a partition.
            for (tp, _) in offsets {
                if group.owner.get(tp) != Some(&id) {
                    return Err(BrokerError::CommitRejected {
                        partition: tp.to_string(),
                        reason: "not owned by this member".into(),
                    });
                }
            }
            for (tp, offset) in offsets {
                group.committed.insert(tp.clone(), *offset);
            }
            Ok(())
        })
    }

    async fn release(&mut self, partitions: &[TopicPartition]) -> Result<(), BrokerError> {
        self.with_member(|st, group_name, id| {
            let group = st.groups.get_mut(group_name).expect("checked");
            let member = group.members.get_mut(&id).expect("checked");
            for tp in partitions {
                if member.revoking.remove(tp) && group.owner.get(tp) == Some(&id) {
                    group.owner.remove(tp);
                }
            }
            rebalance_all(st);
            Ok(())
        })?;
        self.broker.notify();
        Ok(())
    }

    async fn set_topics(&mut self, topics: &[String]) -> Result<(), BrokerError> {
        self.with_member(|st, group_name, id| {
            for t in topics {
                if !st.topics.contains_key(t) {
                    let n = self.broker.shared.config.default_partitions.max(1);
                    self.broker.create_topic(st, t, n);
                }
            }
            let group = st.groups.get_mut(group_name).expect("checked");
            group.members.get_mut(&id).expect("checked").topics = topics.iter().cloned().collect();
            rebalance_all(st);
            Ok(())
        })?;
        self.broker.notify();
        Ok(())
    }

    async fn close(mut self) -> Result<(), BrokerError> {
        self.leave();
        match self.broker.shared.lock().faults.close.pop_front() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for MemorySession {
    fn drop(&mut self) {
        self.leave();
    }
}
