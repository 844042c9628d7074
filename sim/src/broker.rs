//! The simulated broker: a turmoil host speaking [`crate::proto`].
//!
//! Kafka's model, like `eventbus::broker::memory`: topics with partitions
//! (keyed messages go where Kafka's murmur2 partitioner puts them), one
//! coordinator for consumer groups with generations, heartbeats (every poll
//! is one) and a session timeout, incremental rebalances with revoke before
//! assign, committed offsets fenced by ownership, and an idempotent producer.
//!
//! The log, the committed offsets and the producer sequences live in a
//! [`Disk`] outside the host (an `Arc<Mutex<_>>`), so they survive
//! `sim.crash`/`sim.bounce`; groups, sessions and in-flight requests live in
//! the host and are lost with it. Member ids carry the boot epoch, so a
//! member of a previous life is never mistaken for a new one.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use eventbus::broker::plan::{self, partition_for_key};
use eventbus::broker::TopicPartition;
use eventbus::consumer::task_headers::{
    DLQ_ATTEMPTS, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION, DLQ_ORIGIN_TOPIC, DLQ_REASON,
};
use eventbus::Envelope;
use tokio::time::Instant;
use turmoil::net::{TcpListener, TcpStream};

use crate::history::{DlqInfo, Event, EventId, History, REFUSED_DEAD_LETTER_RECORD};
use crate::proto::{
    read_frame, write_frame, ErrorKind, Request, RequestFrame, Response, ResponseFrame, WireEvent, WireMessage, WireTp,
};

/// Host name and port of the broker.
pub const BROKER: &str = "broker";
pub const PORT: u16 = 9092;

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Topics created at first boot, with their partition counts.
    pub topics: Vec<(String, u32)>,
    /// Partitions of a topic created by a publish (the dead-letter topics).
    pub default_partitions: u32,
    /// A member not heard from for this long is removed from its group.
    pub session_timeout: Duration,
    /// How often sessions are checked for expiry.
    pub expiry_check: Duration,
    /// A connection without a request for this long is closed.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Stored {
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
    pub timestamp_ms: u64,
}

/// What survives a crash of the broker host.
#[derive(Debug, Default)]
pub struct Disk {
    pub boots: u64,
    pub topics: BTreeMap<String, Vec<Vec<Stored>>>,
    /// (group, partition) → next offset to read.
    pub committed: BTreeMap<(String, WireTp), u64>,
    /// Producer id → (last sequence, its partition, its offset).
    producers: BTreeMap<u64, (u64, u32, u64)>,
    round_robin: u64,
    /// Set by the nemesis: writes carrying a dead-letter origin header are
    /// refused (an authorisation the operator has not granted yet).
    pub refuse_dead_letters: bool,
}

/// The broker's disk, shared with the checker.
#[derive(Debug, Clone, Default)]
pub struct SharedDisk(Arc<Mutex<Disk>>);

impl SharedDisk {
    pub fn lock(&self) -> MutexGuard<'_, Disk> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Member {
    client: String,
    topics: BTreeSet<String>,
    events: VecDeque<(u64, WireEvent)>,
    next_event: u64,
    revoking: BTreeSet<TopicPartition>,
    last_seen: Instant,
}

#[derive(Default)]
struct Group {
    members: BTreeMap<u64, Member>,
    owner: BTreeMap<TopicPartition, u64>,
    generation: u64,
}

/// What dies with the host.
struct Coordinator {
    epoch: u64,
    next_member: u64,
    groups: BTreeMap<String, Group>,
}

struct Broker {
    coord: RefCell<Coordinator>,
    disk: SharedDisk,
    settings: BrokerSettings,
    history: History,
}

fn tp_of(tp: &TopicPartition) -> (String, u32) {
    (tp.topic.to_string(), tp.partition)
}

/// The planner's name of a partition on the wire.
fn unwire(tp: &WireTp) -> TopicPartition {
    TopicPartition::new(tp.topic.as_str(), tp.partition)
}

fn wire(tp: &TopicPartition) -> WireTp {
    WireTp { topic: tp.topic.to_string(), partition: tp.partition }
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The software of the broker host: boots from `disk`, then serves.
pub async fn run(disk: SharedDisk, settings: BrokerSettings, history: History) -> turmoil::Result {
    let epoch = {
        let mut d = disk.lock();
        d.boots += 1;
        for (topic, partitions) in &settings.topics {
            let parts = d.topics.entry(topic.clone()).or_default();
            if parts.len() < *partitions as usize {
                parts.resize_with(*partitions as usize, Vec::new);
            }
        }
        d.boots
    };
    history.record(Event::BrokerBoot { epoch });
    let broker = Rc::new(Broker {
        coord: RefCell::new(Coordinator { epoch, next_member: 1, groups: BTreeMap::new() }),
        disk,
        settings,
        history,
    });
    let listener = TcpListener::bind(("0.0.0.0", PORT)).await?;
    let expiry = broker.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(expiry.settings.expiry_check);
        loop {
            tick.tick().await;
            expiry.expire_sessions();
        }
    });
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::task::spawn_local(broker.clone().serve(stream));
    }
}

impl Broker {
    async fn serve(self: Rc<Self>, mut stream: TcpStream) {
        loop {
            let req: RequestFrame =
                match tokio::time::timeout(self.settings.idle_timeout, read_frame(&mut stream)).await {
                    Ok(Ok(req)) => req,
                    // Idle, closed, reset or garbage: drop the connection.
                    _ => return,
                };
            let body = self.handle(req.body);
            if write_frame(&mut stream, &ResponseFrame { id: req.id, body }).await.is_err() {
                return;
            }
        }
    }

    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Produce { topic, key, headers, payload, producer } => {
                self.produce(topic, key, headers, payload, producer)
            }
            Request::EnsureTopic { topic, partitions } => {
                if partitions == 0 {
                    return Response::Error {
                        kind: ErrorKind::Config,
                        message: "partitions must be at least 1".into(),
                    };
                }
                self.create_topic(&topic, partitions);
                Response::Ok
            }
            Request::Join { group, topics, client, previous } => self.join(group, topics, client, previous),
            Request::Poll { group, member, ack_events, fetch, max } => {
                self.poll(&group, member, ack_events, fetch, max)
            }
            Request::Commit { group, member, offsets } => self.commit(&group, member, offsets),
            Request::Release { group, member, partitions } => self.release(&group, member, partitions),
            Request::SetTopics { group, member, topics } => self.set_topics(&group, member, topics),
            Request::Lag { group, topics } => {
                let d = self.disk.lock();
                let mut partitions = Vec::new();
                for topic in topics {
                    let Some(logs) = d.topics.get(&topic) else { continue };
                    for (p, log) in logs.iter().enumerate() {
                        let tp = WireTp { topic: topic.clone(), partition: p as u32 };
                        let committed = d.committed.get(&(group.clone(), tp.clone())).copied().unwrap_or(0);
                        partitions.push((tp, log.len() as u64, committed));
                    }
                }
                Response::Lag { partitions }
            }
            Request::Leave { group, member } => {
                let mut coord = self.coord.borrow_mut();
                if let Some(g) = coord.groups.get_mut(&group) {
                    if let Some(m) = g.members.remove(&member) {
                        g.owner.retain(|_, o| *o != member);
                        self.history.record(Event::Leave { client: m.client, member });
                        self.rebalance(&group, g);
                    }
                }
                Response::Ok
            }
        }
    }

    /// Creates or grows `topic`; rebalances every group if it changed.
    fn create_topic(&self, topic: &str, partitions: u32) {
        let grew = {
            let mut d = self.disk.lock();
            let parts = d.topics.entry(topic.to_string()).or_default();
            let grew = parts.len() < partitions as usize;
            if grew {
                parts.resize_with(partitions as usize, Vec::new);
            }
            grew
        };
        if grew {
            let mut coord = self.coord.borrow_mut();
            for (name, g) in coord.groups.iter_mut() {
                self.rebalance(name, g);
            }
        }
    }

    fn produce(
        &self,
        topic: String,
        key: Option<Vec<u8>>,
        headers: Vec<(String, Vec<u8>)>,
        payload: Vec<u8>,
        producer: Option<(u64, u64)>,
    ) -> Response {
        if self.disk.lock().refuse_dead_letters && header(&headers, DLQ_ORIGIN_TOPIC).is_some() {
            let origin = header(&headers, DLQ_ORIGIN_OFFSET).unwrap_or("?");
            self.history
                .record(Event::Fault(format!("{REFUSED_DEAD_LETTER_RECORD} to {topic} (origin offset {origin})")));
            return Response::Error {
                kind: ErrorKind::Other,
                message: format!("not authorized to write to {topic} (simulated refusal)"),
            };
        }
        if !self.disk.lock().topics.contains_key(&topic) {
            self.create_topic(&topic, self.settings.default_partitions.max(1));
        }
        let mut d = self.disk.lock();
        if let Some((pid, seq)) = producer {
            if let Some(&(last, partition, offset)) = d.producers.get(&pid) {
                if seq <= last {
                    return Response::Produced { partition, offset, duplicate: true };
                }
            }
        }
        let n = d.topics[&topic].len() as u32;
        let partition = match &key {
            Some(k) => partition_for_key(k, n),
            None => {
                d.round_robin += 1;
                (d.round_robin % u64::from(n)) as u32
            }
        };
        let id = Envelope::decode(&payload).ok().map(|e| EventId::new(e.aggregate_id, e.event_version));
        let dlq = header(&headers, DLQ_ORIGIN_TOPIC).map(|origin| DlqInfo {
            origin_topic: origin.to_string(),
            origin_partition: header(&headers, DLQ_ORIGIN_PARTITION).and_then(|s| s.parse().ok()).unwrap_or(u32::MAX),
            origin_offset: header(&headers, DLQ_ORIGIN_OFFSET).and_then(|s| s.parse().ok()).unwrap_or(u64::MAX),
            attempts: header(&headers, DLQ_ATTEMPTS).and_then(|s| s.parse().ok()).unwrap_or(0),
            reason: header(&headers, DLQ_REASON).unwrap_or("").to_string(),
        });
        let timestamp_ms = turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64);
        let log = &mut d.topics.get_mut(&topic).expect("created above")[partition as usize];
        log.push(Stored { key, headers, payload, timestamp_ms });
        let offset = log.len() as u64 - 1;
        if let Some((pid, seq)) = producer {
            d.producers.insert(pid, (seq, partition, offset));
        }
        drop(d);
        self.history.record(Event::Append { tp: (topic, partition), offset, id, dlq });
        Response::Produced { partition, offset, duplicate: false }
    }

    fn join(&self, group: String, topics: Vec<String>, client: String, previous: Option<u64>) -> Response {
        for t in &topics {
            if !self.disk.lock().topics.contains_key(t) {
                self.create_topic(t, self.settings.default_partitions.max(1));
            }
        }
        let mut coord = self.coord.borrow_mut();
        let member = (coord.epoch << 32) | coord.next_member;
        coord.next_member += 1;
        let g = coord.groups.entry(group.clone()).or_default();
        if let Some(prev) = previous {
            if let Some(m) = g.members.remove(&prev) {
                g.owner.retain(|_, o| *o != prev);
                self.history.record(Event::Leave { client: m.client, member: prev });
            }
        }
        g.members.insert(
            member,
            Member {
                client: client.clone(),
                topics: topics.into_iter().collect(),
                events: VecDeque::new(),
                next_event: 1,
                revoking: BTreeSet::new(),
                last_seen: Instant::now(),
            },
        );
        self.history.record(Event::Join { client, member });
        self.rebalance(&group, g);
        Response::Joined { member, generation: g.generation }
    }

    fn poll(&self, group: &str, member: u64, ack: u64, fetch: Vec<(WireTp, u64)>, max: u32) -> Response {
        let mut coord = self.coord.borrow_mut();
        let Some(g) = coord.groups.get_mut(group) else { return Response::UnknownMember };
        let generation = g.generation;
        let Some(m) = g.members.get_mut(&member) else { return Response::UnknownMember };
        m.last_seen = Instant::now();
        m.events.retain(|(seq, _)| *seq > ack);
        let events: Vec<(u64, WireEvent)> = m.events.iter().cloned().collect();
        let servable: Vec<(WireTp, u64)> = fetch
            .into_iter()
            .filter(|(tp, _)| g.owner.get(&unwire(tp)) == Some(&member) && !m.revoking.contains(&unwire(tp)))
            .collect();
        let mut messages = Vec::new();
        if !servable.is_empty() {
            let per = (max as usize / servable.len()).max(1);
            let d = self.disk.lock();
            for (tp, pos) in servable {
                let Some(log) = d.topics.get(&tp.topic).and_then(|p| p.get(tp.partition as usize)) else { continue };
                for (offset, s) in log.iter().enumerate().skip(pos as usize).take(per) {
                    messages.push(WireMessage {
                        tp: tp.clone(),
                        offset: offset as u64,
                        key: s.key.clone(),
                        headers: s.headers.clone(),
                        payload: s.payload.clone(),
                        timestamp_ms: s.timestamp_ms,
                    });
                }
            }
        }
        Response::Polled { generation, events, messages }
    }

    fn commit(&self, group: &str, member: u64, offsets: Vec<(WireTp, u64)>) -> Response {
        let mut coord = self.coord.borrow_mut();
        // A member the group no longer knows (expired, left, or of a previous
        // boot) commits nothing: fenced like a non-owner.
        let fenced = |offsets: &[(WireTp, u64)]| {
            for (tp, offset) in offsets {
                self.history.record(Event::Commit {
                    client: format!("gone member {member}"),
                    member,
                    tp: (tp.topic.clone(), tp.partition),
                    offset: *offset,
                    accepted: false,
                });
            }
            Response::UnknownMember
        };
        let Some(g) = coord.groups.get_mut(group) else { return fenced(&offsets) };
        let Some(m) = g.members.get_mut(&member) else { return fenced(&offsets) };
        m.last_seen = Instant::now();
        let client = m.client.clone();
        // Fencing: only the current owner may commit a partition.
        let rejected = offsets.iter().find(|(tp, _)| g.owner.get(&unwire(tp)) != Some(&member)).cloned();
        for (tp, offset) in &offsets {
            self.history.record(Event::Commit {
                client: client.clone(),
                member,
                tp: (tp.topic.clone(), tp.partition),
                offset: *offset,
                accepted: rejected.is_none(),
            });
        }
        if let Some((tp, _)) = rejected {
            return Response::Error {
                kind: ErrorKind::CommitRejected,
                message: format!("{}[{}] not owned by member {member}", tp.topic, tp.partition),
            };
        }
        let mut d = self.disk.lock();
        for (tp, offset) in offsets {
            d.committed.insert((group.to_string(), tp), offset);
        }
        Response::Ok
    }

    fn release(&self, group: &str, member: u64, partitions: Vec<WireTp>) -> Response {
        let mut coord = self.coord.borrow_mut();
        let Some(g) = coord.groups.get_mut(group) else { return Response::UnknownMember };
        let Some(m) = g.members.get_mut(&member) else { return Response::UnknownMember };
        m.last_seen = Instant::now();
        let mut released = Vec::new();
        for tp in partitions.iter().map(unwire) {
            if m.revoking.remove(&tp) && g.owner.get(&tp) == Some(&member) {
                g.owner.remove(&tp);
                released.push(tp_of(&tp));
            }
        }
        if !released.is_empty() {
            self.history.record(Event::Release { client: m.client.clone(), member, tps: released });
        }
        self.rebalance(group, g);
        Response::Ok
    }

    fn set_topics(&self, group: &str, member: u64, topics: Vec<String>) -> Response {
        for t in &topics {
            if !self.disk.lock().topics.contains_key(t) {
                self.create_topic(t, self.settings.default_partitions.max(1));
            }
        }
        let mut coord = self.coord.borrow_mut();
        let Some(g) = coord.groups.get_mut(group) else { return Response::UnknownMember };
        let Some(m) = g.members.get_mut(&member) else { return Response::UnknownMember };
        m.last_seen = Instant::now();
        m.topics = topics.into_iter().collect();
        self.rebalance(group, g);
        Response::Ok
    }

    fn expire_sessions(&self) {
        let now = Instant::now();
        let mut coord = self.coord.borrow_mut();
        for (name, g) in coord.groups.iter_mut() {
            let expired: Vec<u64> = g
                .members
                .iter()
                .filter(|(_, m)| now.duration_since(m.last_seen) > self.settings.session_timeout)
                .map(|(id, _)| *id)
                .collect();
            if expired.is_empty() {
                continue;
            }
            for id in expired {
                let m = g.members.remove(&id).expect("listed above");
                g.owner.retain(|_, o| *o != id);
                self.history.record(Event::Expire { client: m.client, member: id });
            }
            self.rebalance(name, g);
        }
    }

    /// Moves `g` toward its target assignment (the library's planner,
    /// shared with `MemoryBroker`): revokes what must move, assigns what is
    /// free (revoke before assign).
    fn rebalance(&self, name: &str, g: &mut Group) {
        let d = self.disk.lock();
        let plan = plan::plan(
            g.members.iter().map(|(id, m)| (*id, &m.topics)),
            |t| d.topics.get(t).map_or(0, |p| p.len() as u32),
            &g.owner,
            |id, tp| g.members.get(&id).is_some_and(|m| m.revoking.contains(tp)),
        );
        if plan.is_empty() {
            return;
        }
        for (id, tps) in plan.revoke {
            let m = g.members.get_mut(&id).expect("owners are members");
            m.revoking.extend(tps.iter().cloned());
            self.history.record(Event::Revoke {
                client: m.client.clone(),
                member: id,
                tps: tps.iter().map(tp_of).collect(),
            });
            let seq = m.next_event;
            m.next_event += 1;
            m.events.push_back((seq, WireEvent::Revoked(tps.iter().map(wire).collect())));
        }
        for (id, tps) in plan.assign {
            let m = g.members.get_mut(&id).expect("targets are members");
            let mut assigned = Vec::new();
            for tp in tps {
                g.owner.insert(tp.clone(), id);
                let start = d.committed.get(&(name.to_string(), wire(&tp))).copied().unwrap_or(0);
                self.history.record(Event::Assign { client: m.client.clone(), member: id, tp: tp_of(&tp), start });
                assigned.push((wire(&tp), start));
            }
            let seq = m.next_event;
            m.next_event += 1;
            m.events.push_back((seq, WireEvent::Assigned(assigned)));
        }
        g.generation += 1;
    }
}
