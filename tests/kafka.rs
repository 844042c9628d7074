#![cfg(not(feature = "loom"))]
#![cfg(feature = "kafka")]
//! The Kafka adapter against librdkafka's built-in mock cluster
//! (`rdkafka::mocking`): a real Kafka protocol broker in process, with
//! balanced consumer groups, offset commits and broker down/up. Needs no
//! external process, so these always run.
//!
//! Every test has its own mock cluster. The mock does not implement the
//! CreateTopics admin API, so topics are created through the mock's own API
//! (`ensure_topic` then finds them); `tests/kafka_tansu.rs` covers creation.

mod common;
#[path = "common/foreign_kafka.rs"]
mod foreign_kafka;

use common::scenario::{
    checked_handler, close_cleanly, event, init_tracing, late_subscription_delivers, publish_range, recv_within,
    spread_aggregates, started_with_channels, unique, wait_for, Dropped, Positions, Progress, Seed,
};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::broker::kafka::{KafkaBroker, KafkaConfig, KafkaSession, RebalanceStrategy};
use eventbus::bus::BusConfig;
use eventbus::pool::PoolConfig;
use eventbus::testing::OrderChecker;
use eventbus::{Broker, BrokerError, Envelope, EventBus, Outbound, Position, Session, SessionEvent, TopicPartition};
use foreign_kafka::{header, read_topic};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use tokio::sync::watch;

// ---------------------------------------------------------------------------
// The mock cluster.

/// A librdkafka mock cluster, owned by an idle producer handle.
struct Mock {
    owner: BaseProducer,
    servers: String,
}

impl Mock {
    fn new(brokers: i32) -> Mock {
        let owner: BaseProducer =
            ClientConfig::new().set("test.mock.num.brokers", brokers.to_string()).create().expect("mock cluster");
        let servers = owner.client().mock_cluster().expect("mock cluster").bootstrap_servers();
        // SAFETY: `owner` owns the mock cluster and outlives this call; the
        // setter only stores the value. A new group's first join otherwise
        // waits 3 s (the broker's group.initial.rebalance.delay.ms).
        unsafe {
            let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
            assert!(!cluster.is_null());
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
        }
        Mock { owner, servers }
    }

    /// Creates `topic` and its dead-letter topic `<topic>.dlq` with as many
    /// partitions (the mock has no CreateTopics, so
    /// `ensure_dead_letter_topic` could not create it).
    fn create_topic(&self, topic: &str, partitions: i32) {
        let cluster = self.owner.client().mock_cluster().unwrap();
        cluster.create_topic(topic, partitions, 1).expect("mock topic");
        cluster.create_topic(&format!("{topic}.dlq"), partitions, 1).expect("mock dead-letter topic");
    }

    fn broker_down(&self, id: i32) {
        self.owner.client().mock_cluster().unwrap().broker_down(id).expect("broker down");
    }

    fn broker_up(&self, id: i32) {
        self.owner.client().mock_cluster().unwrap().broker_up(id).expect("broker up");
    }
}

// ---------------------------------------------------------------------------
// Helpers.

/// Short group timings: the mock rebalances `session_timeout - 1 s` after a
/// member joins or leaves.
fn kafka_config(servers: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: servers.to_string(),
        session_timeout: Duration::from_millis(2500),
        heartbeat_interval: Duration::from_millis(200),
        max_poll_interval: Duration::from_secs(30),
        fetch_max_wait: Duration::from_millis(20),
        linger: Duration::from_millis(1),
        request_timeout: Duration::from_secs(10),
        revoke_timeout: Duration::from_secs(10),
        // librdkafka's debug contexts, e.g. EVENTBUS_KAFKA_DEBUG=cgrp,fetch
        consumer_properties: std::env::var("EVENTBUS_KAFKA_DEBUG")
            .map(|d| BTreeMap::from([("debug".to_string(), d)]))
            .unwrap_or_default(),
        producer_properties: std::env::var("EVENTBUS_KAFKA_PRODUCER_DEBUG")
            .map(|d| BTreeMap::from([("debug".to_string(), d)]))
            .unwrap_or_default(),
        ..KafkaConfig::default()
    }
}

/// The shared bus configuration, committing every 50 ms, with 5 s for a
/// revoked partition's work.
fn bus_config(group: &str) -> BusConfig {
    let mut config = common::scenario::bus_config(group);
    config.consumer.commit_interval = Duration::from_millis(50);
    config.consumer.revoke_timeout = Duration::from_secs(5);
    // The mock cannot create topics (no CreateTopics API), so the consumer
    // must not create the dead-letter topics at subscribe time here; a
    // dead letter's first write creates its topic (auto-create).
    config.consumer.create_dead_letter_topics = false;
    config
}

/// The handler of these tests: a run dropped with its runtime (a crash) is
/// marked failed in the checker.
fn handler(
    checker: &Arc<OrderChecker>,
    progress: &Progress,
    work: Duration,
) -> impl Fn(Envelope) -> futures::future::BoxFuture<'static, eventbus::pool::HandlerResult> + Send + Sync + 'static {
    checked_handler(checker.clone(), progress.clone(), work, Dropped::Fails)
}

/// Publishes versions `from..=to` of each aggregate, retrying a failed
/// publish up to 99 times per aggregate. Returns the retries.
async fn publish<B: Broker>(
    bus: &Arc<EventBus<B>>,
    aggregates: &[(String, String)],
    from: i64,
    to: i64,
    positions: &Positions,
) -> usize {
    publish_range(bus, aggregates, from, to, positions, 99).await
}

/// Asserts that the group committed everything: each partition's committed
/// offset (read by a separate consumer) is its end offset.
async fn assert_all_committed(broker: &KafkaBroker, group: &str, topics: &[String], partitions: u32) {
    let tps: Vec<TopicPartition> =
        topics.iter().flat_map(|t| (0..partitions).map(move |p| TopicPartition::new(t.as_str(), p))).collect();
    let committed = broker.committed_offsets(group, &tps).await.unwrap();
    for tp in &tps {
        let end = broker.end_offset(tp).await.unwrap();
        let c = committed[tp];
        assert!(end == 0 || c == Some(end), "{tp}: committed {c:?}, end offset {end}");
    }
}

// ---------------------------------------------------------------------------
// A broker wrapper that records what the sessions committed and owned.

/// What every member of a group did, shared by their wrappers.
#[derive(Default)]
struct Ledger {
    /// Last successful commit per partition, by any member.
    commits: BTreeMap<TopicPartition, u64>,
    /// Partitions a member started reading below the group's last commit
    /// (a duplicate from before the last commit): (partition, first offset,
    /// last commit).
    below_commit: Vec<(TopicPartition, u64, u64)>,
    /// Assignments whose first message was checked.
    starts_checked: u64,
}

impl Ledger {
    /// How the group's assignments started so far.
    fn starts(ledger: &Mutex<Ledger>) -> Starts {
        let l = ledger.lock().unwrap();
        Starts { below_commit: l.below_commit.clone(), checked: l.starts_checked }
    }
}

/// How the assignments of a group started, from the [`Ledger`].
struct Starts {
    below_commit: Vec<(TopicPartition, u64, u64)>,
    checked: u64,
}

impl Starts {
    /// Assignments resumed at or above the group's last commit.
    fn at_or_above(&self) -> u64 {
        self.checked - self.below_commit.len() as u64
    }

    /// Every assignment checked started at (not below) the group's last
    /// commit of its partition, and there was at least one.
    fn assert_none_below(&self) {
        assert!(self.below_commit.is_empty(), "resumed below the last commit: {:?}", self.below_commit);
        assert!(self.checked >= 1);
    }
}

/// What one member did.
#[derive(Default)]
struct Record {
    /// Partitions assigned and not revoked or lost.
    owned: BTreeSet<TopicPartition>,
    /// Last commit of the group when each partition was assigned, until its
    /// first message arrives.
    start_floor: BTreeMap<TopicPartition, u64>,
}

/// Counts of assignment events a session passed to the consumer.
#[derive(Debug, Clone, Copy, Default)]
struct Changes {
    assigned: u64,
    lost: u64,
    /// Messages below the committed offsets (sum over the partitions this
    /// session committed).
    committed: u64,
}

#[derive(Clone)]
struct Recorded {
    inner: KafkaBroker,
    ledger: Arc<Mutex<Ledger>>,
    record: Arc<Mutex<Record>>,
    changes: Arc<watch::Sender<Changes>>,
}

impl Recorded {
    fn new(inner: KafkaBroker, ledger: &Arc<Mutex<Ledger>>) -> Recorded {
        Recorded {
            inner,
            ledger: ledger.clone(),
            record: Arc::default(),
            changes: Arc::new(watch::channel(Changes::default()).0),
        }
    }
}

struct RecordedSession {
    inner: KafkaSession,
    ledger: Arc<Mutex<Ledger>>,
    record: Arc<Mutex<Record>>,
    changes: Arc<watch::Sender<Changes>>,
}

impl Broker for Recorded {
    type Session = RecordedSession;

    async fn publish(&self, msg: Outbound) -> Result<Position, BrokerError> {
        self.inner.publish(msg).await
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<RecordedSession, BrokerError> {
        let inner = self.inner.subscribe(group, topics).await?;
        Ok(RecordedSession {
            inner,
            ledger: self.ledger.clone(),
            record: self.record.clone(),
            changes: self.changes.clone(),
        })
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        self.inner.ensure_topic(topic, partitions).await
    }
}

impl Session for RecordedSession {
    async fn next(&mut self) -> Result<SessionEvent, BrokerError> {
        let ev = self.inner.next().await?;
        let mut ledger = self.ledger.lock().unwrap();
        let mut r = self.record.lock().unwrap();
        match &ev {
            SessionEvent::Assigned(tps) => {
                for tp in tps {
                    r.owned.insert(tp.clone());
                    let floor = ledger.commits.get(tp).copied().unwrap_or(0);
                    r.start_floor.insert(tp.clone(), floor);
                }
                self.changes.send_modify(|c| c.assigned += 1);
            }
            SessionEvent::Revoked(tps) => {
                for tp in tps {
                    r.owned.remove(tp);
                    r.start_floor.remove(tp);
                }
            }
            SessionEvent::Lost(tps) => {
                for tp in tps {
                    r.owned.remove(tp);
                    r.start_floor.remove(tp);
                }
                self.changes.send_modify(|c| c.lost += 1);
            }
            SessionEvent::Message(d) => {
                if let Some(floor) = r.start_floor.remove(&d.topic_partition()) {
                    ledger.starts_checked += 1;
                    if d.offset < floor {
                        ledger.below_commit.push((d.topic_partition(), d.offset, floor));
                    }
                }
            }
        }
        Ok(ev)
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<(), BrokerError> {
        self.inner.commit(offsets).await?;
        // Offsets are stored and committed in the background: the ledger
        // holds what the broker confirmed (what a crash keeps).
        let confirmed = self.inner.confirmed_commits();
        let mut ledger = self.ledger.lock().unwrap();
        for (tp, _) in offsets {
            if let Some(o) = confirmed.get(tp) {
                ledger.commits.insert(tp.clone(), *o);
            }
        }
        let committed = ledger.commits.values().sum();
        self.changes.send_modify(|c| c.committed = committed);
        Ok(())
    }

    async fn release(&mut self, partitions: &[TopicPartition]) -> Result<(), BrokerError> {
        self.inner.release(partitions).await
    }

    async fn set_topics(&mut self, topics: &[String]) -> Result<(), BrokerError> {
        self.inner.set_topics(topics).await
    }

    async fn close(self) -> Result<(), BrokerError> {
        self.inner.close().await
    }
}

// ---------------------------------------------------------------------------
// Round trip.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_the_bus() {
    init_tracing();
    let mock = Mock::new(1);
    let (topic, raw_topic, late_topic) = (unique("rt"), unique("rt-raw"), unique("rt-late"));
    for t in [&topic, &raw_topic, &late_topic] {
        mock.create_topic(t, 3);
    }
    let group = unique("g");
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    // The topics exist with enough partitions: nothing to create.
    broker.ensure_topic(&topic, 3).await.unwrap();
    broker.ensure_topic(&raw_topic, 2).await.unwrap();
    assert_eq!(broker.partitions(&topic).await.unwrap(), Some(3));
    assert_eq!(broker.partitions(&unique("missing")).await.unwrap(), None, "looking up does not create");
    let err = broker.ensure_topic(&topic, 0).await.unwrap_err();
    assert!(matches!(err, BrokerError::Config { ref key, .. } if key == "partitions"), "{err:?}");
    let err = broker.ensure_topic("bad/topic", 1).await.unwrap_err();
    assert!(matches!(err, BrokerError::Config { ref key, .. } if key == "kafka.topic"), "{err:?}");

    let admin = broker.clone();
    let (bus, mut env_rx, mut raw_rx) = started_with_channels(broker, bus_config(&group), &topic, &raw_topic).await;

    let env = event("order-1", 1).with_trace_id("trace-1");
    let first = bus.publish_envelope(&topic, &env).await.unwrap();
    assert!(!first.duplicate);
    // Keys are partitioned with murmur2, like the Java client and the memory broker.
    assert_eq!(first.partition, eventbus::broker::memory::partition_for_key(b"order-1", 3));
    let got = recv_within(&mut env_rx, Duration::from_secs(20), "envelope delivered").await;
    assert_eq!(got, env);

    // Raw bytes: binary key, binary and repeated headers, in order.
    let headers = vec![
        ("X-Custom".to_string(), b"v1".to_vec()),
        ("X-Bin".to_string(), vec![0, 159, 146, 150, 10]),
        ("X-Custom".to_string(), b"v2".to_vec()),
    ];
    let key = b"key-\x01\xff".to_vec();
    let pos = bus.publish(&raw_topic, Some(&key), headers.clone(), b"hello".to_vec()).await.unwrap();
    let d = recv_within(&mut raw_rx, Duration::from_secs(20), "raw delivered").await;
    assert_eq!((d.partition, d.offset, d.attempt), (pos.partition, pos.offset, 1));
    assert_eq!(&*d.topic, raw_topic.as_str());
    assert_eq!(d.payload, b"hello");
    assert_eq!(d.key, Some(key));
    assert_eq!(d.headers, headers);
    let age = d.timestamp.expect("timestamp").elapsed().unwrap_or_default();
    assert!(age < Duration::from_secs(60), "timestamp is the produce time ({age:?} ago)");

    let late_pos = late_subscription_delivers(&bus, &late_topic, Duration::from_secs(20)).await;

    close_cleanly(bus, 3).await;
    // The final commits, read back by a separate consumer of the group.
    let tps = [
        TopicPartition::new(topic.as_str(), first.partition),
        TopicPartition::new(raw_topic.as_str(), pos.partition),
        TopicPartition::new(late_topic.as_str(), late_pos.partition),
    ];
    let committed = admin.committed_offsets(&group, &tps).await.unwrap();
    assert_eq!(committed[&tps[0]], Some(first.offset + 1));
    assert_eq!(committed[&tps[1]], Some(pos.offset + 1));
    assert_eq!(committed[&tps[2]], Some(late_pos.offset + 1));
    let kstats = admin.stats();
    assert!(kstats.commits.load(Ordering::Relaxed) >= 1);
    assert_eq!(kstats.revoke_timeouts.load(Ordering::Relaxed), 0);
}

// ---------------------------------------------------------------------------
// Configuration errors.

fn config_key(r: Result<KafkaBroker, BrokerError>) -> String {
    match r {
        Err(BrokerError::Config { key, reason }) => {
            assert!(!reason.is_empty());
            key
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_names_the_key() {
    let base = || kafka_config("127.0.0.1:9");
    let props = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    // Checked by the adapter.
    let cfg = KafkaConfig { heartbeat_interval: Duration::from_secs(5), ..base() };
    assert_eq!(config_key(KafkaBroker::new(cfg)), "kafka.heartbeat_interval");
    let cfg = KafkaConfig { consumer_properties: props("enable.auto.commit", "true"), ..base() };
    assert_eq!(config_key(KafkaBroker::new(cfg)), "kafka.consumer_properties.enable.auto.commit");
    let cfg = KafkaConfig { producer_properties: props("acks", "1"), ..base() };
    assert_eq!(config_key(KafkaBroker::new(cfg)), "kafka.producer_properties.acks");
    // Checked by librdkafka when the clients are created.
    let cfg = KafkaConfig { properties: props("no.such.property", "1"), ..base() };
    assert_eq!(config_key(KafkaBroker::new(cfg)), "kafka.properties.no.such.property");
    let cfg = KafkaConfig { properties: props("socket.timeout.ms", "soon"), ..base() };
    assert_eq!(config_key(KafkaBroker::new(cfg)), "kafka.properties.socket.timeout.ms");
    let cfg = KafkaConfig { properties: props("security.protocol", "carrier_pigeon"), ..base() };
    assert_eq!(config_key(KafkaBroker::new(cfg)), "kafka.properties.security.protocol");
    let cfg = KafkaConfig { fetch_max_bytes: 1000, ..base() };
    assert_eq!(config_key(KafkaBroker::new(cfg)), "kafka.fetch_max_bytes");
    let cfg = KafkaConfig { session_timeout: Duration::from_secs(3600), ..base() };
    assert_eq!(config_key(KafkaBroker::new(cfg)), "kafka.session_timeout");
    // A config file's values.
    let cfg: KafkaConfig = toml::from_str("brokers = \"127.0.0.1:9\"\nisolation_level = \"read_uncommitted\"").unwrap();
    KafkaBroker::new(cfg).unwrap();

    // Nobody listens: `connect` fails with a retriable error in time.
    let cfg = KafkaConfig { request_timeout: Duration::from_millis(1500), ..base() };
    let started = Instant::now();
    let err = KafkaBroker::connect(cfg).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_) | BrokerError::Timeout(_)), "{err:?}");
    assert!(err.is_retriable());
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// The seed's scenario: 5 topics x 3 partitions, versions in order.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_five_topics_three_partitions() {
    init_tracing();
    const TOPICS: usize = 5;
    let mock = Mock::new(3);
    let topics: Vec<String> = (0..TOPICS).map(|i| unique(&format!("seed{i}"))).collect();
    for t in &topics {
        mock.create_topic(t, 3);
    }
    let group = unique("g");
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    let admin = broker.clone();
    let bus = EventBus::builder(broker).config(bus_config(&group)).build().unwrap();
    let seed = Seed {
        label: "kafka seed scenario",
        topics: &topics,
        aggregates: 40,
        versions: 25,
        limit: Duration::from_secs(60),
        max_publish_retries: 99,
        dropped: Dropped::Fails,
    };
    let positions = seed.run(bus).await;
    // Every partition was used (keys spread by murmur2) and fully committed.
    let used: BTreeSet<TopicPartition> = positions.values().map(|(tp, _)| tp.clone()).collect();
    assert_eq!(used.len(), TOPICS * 3);
    assert_all_committed(&admin, &group, &topics, 3).await;
}

// ---------------------------------------------------------------------------
// Rebalance both ways: a second member joins, then crashes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_member_joins_then_crashes_mid_stream_eager() {
    second_member_joins_then_crashes(RebalanceStrategy::RoundRobin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_member_joins_then_crashes_mid_stream_cooperative() {
    second_member_joins_then_crashes(RebalanceStrategy::CooperativeSticky).await;
}

async fn second_member_joins_then_crashes(strategy: RebalanceStrategy) {
    init_tracing();
    const AGGREGATES: usize = 60;
    const VERSIONS: i64 = 30;
    let started = Instant::now();
    let mock = Mock::new(1);
    let topics: Vec<String> = (0..3).map(|i| unique(&format!("reb{i}"))).collect();
    for t in &topics {
        mock.create_topic(t, 3);
    }
    let group = unique("g");
    let config = KafkaConfig { rebalance_strategy: strategy, ..kafka_config(&mock.servers) };
    let checker = Arc::new(OrderChecker::new());
    let (progress, mut done) = Progress::new();
    let work = Duration::from_millis(5);

    // Member 1, on this runtime.
    let broker1 = KafkaBroker::connect(config.clone()).await.unwrap();
    let admin = broker1.clone();
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let recorded1 = Recorded::new(broker1, &ledger);
    let record1 = recorded1.record.clone();
    let bus1 = Arc::new(EventBus::builder(recorded1).config(bus_config(&group)).build().unwrap());
    for topic in &topics {
        bus1.subscribe_envelope(topic, handler(&checker, &progress, work)).await.unwrap();
    }
    bus1.start().await.unwrap();

    let (aggregates, expected) = spread_aggregates(&topics, AGGREGATES, VERSIONS);
    let total = AGGREGATES * VERSIONS as usize;
    let positions = Positions::default();
    // A third of the stream, for member 1 alone.
    publish(&bus1, &aggregates, 1, VERSIONS / 3, &positions).await;
    wait_for(&mut done, total / 6, Duration::from_secs(30), "member 1 alone").await;

    // Member 2 joins, on a runtime of its own (so it can be killed).
    let rt2 = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let record2: Arc<Mutex<Record>> = Arc::default();
    let (changes2_tx, mut changes2) = watch::channel(Changes::default());
    let changes2_tx = Arc::new(changes2_tx);
    let (progress2, mut done2) = Progress::new();
    {
        let (config, group, topics, record2, checker, progress, progress2, ledger) = (
            config.clone(),
            group.clone(),
            topics.clone(),
            record2.clone(),
            checker.clone(),
            progress.clone(),
            progress2.clone(),
            ledger.clone(),
        );
        rt2.spawn(async move {
            let broker2 = KafkaBroker::connect(config).await.unwrap();
            let recorded2 = Recorded { record: record2, changes: changes2_tx, ..Recorded::new(broker2, &ledger) };
            let bus2 = EventBus::builder(recorded2).config(bus_config(&group)).build().unwrap();
            for topic in &topics {
                let inner = handler(&checker, &progress, work);
                let progress2 = progress2.clone();
                bus2.subscribe_envelope(topic, move |env: Envelope| {
                    let (agg, v) = (env.aggregate_id.clone(), env.event_version);
                    let run = inner(env);
                    let progress2 = progress2.clone();
                    async move {
                        let r = run.await;
                        progress2.completed(&agg, v);
                        r
                    }
                })
                .await
                .unwrap();
            }
            bus2.start().await.unwrap();
            // Lives until its runtime is dropped.
            std::future::pending::<()>().await;
            drop(bus2);
        });
    }
    // The join rebalance is done once member 2 got partitions; then the
    // rest of the stream comes.
    let joined = tokio::time::timeout(Duration::from_secs(30), changes2.wait_for(|c| c.assigned >= 1)).await.is_ok();
    assert!(joined, "member 2 never got partitions");
    let rest = {
        let (bus, aggregates, positions) = (bus1.clone(), aggregates.clone(), positions.clone());
        tokio::spawn(async move { publish(&bus, &aggregates, VERSIONS / 3 + 1, VERSIONS, &positions).await })
    };
    // Member 2 got partitions (the join rebalance is done) and works on them.
    wait_for(&mut done2, 150, Duration::from_secs(30), "member 2 after joining").await;
    let owned1 = record1.lock().unwrap().owned.clone();
    let owned2 = record2.lock().unwrap().owned.clone();
    assert!(!owned1.is_empty() && !owned2.is_empty(), "both members own partitions: {owned1:?} / {owned2:?}");
    assert!(owned1.is_disjoint(&owned2));

    // Crash member 2: its runtime is dropped with handlers running and work
    // queued; its session leaves without committing.
    tokio::task::spawn_blocking(move || drop(rt2)).await.unwrap();
    let crash_owned = record2.lock().unwrap().owned.clone();
    let handled_at_crash = *done.borrow();
    let retries = rest.await.unwrap();
    wait_for(&mut done, total, Duration::from_secs(60), "after member 2 crashed").await;
    let owned_after = record1.lock().unwrap().owned.clone();
    let report = bus1.close().await;

    let r = checker.report(&expected);
    let positions = positions.lock().unwrap().clone();
    let dups = progress.duplicates();
    let crashed_dups = dups.iter().filter(|k| crash_owned.contains(&positions[*k].0)).count();
    let starts = Ledger::starts(&ledger);
    let kstats = admin.stats();
    eprintln!(
        "kafka rebalance {strategy:?} (join, then crash): sent {total}, handled {}, duplicates {} ({crashed_dups} in the {} \
         partitions of the crashed member, the rest re-handled after revokes fenced queued work), violations {}, \
         missing {}, handled at crash {handled_at_crash}, assignments resumed at or above the group's last commit \
         {}/{}, publish retries {retries}, member 1 revokes {} assigns {}, in {:?}",
        r.handled,
        r.duplicates,
        crash_owned.len(),
        r.violations,
        r.missing,
        starts.at_or_above(),
        starts.checked,
        kstats.revoked.load(Ordering::Relaxed),
        kstats.assigned.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.handled, total as u64);
    // Duplicates only after the last commit: every new owner of a partition
    // started at (not below) the group's last commit of it.
    starts.assert_none_below();
    assert_eq!(report.final_commit_error, None);
    // Member 1 owned everything again after the crash, and committed it all.
    assert_eq!(owned_after.len(), topics.len() * 3, "{owned_after:?}");
    if strategy == RebalanceStrategy::CooperativeSticky {
        // Only the partitions that moved to member 2 were revoked.
        assert!(kstats.revoked.load(Ordering::Relaxed) >= 1, "revoked on the join");
    } else {
        assert!(kstats.revoked.load(Ordering::Relaxed) >= 2, "revoked on the join and on the crash");
    }
    assert_eq!(kstats.revoke_timeouts.load(Ordering::Relaxed), 0);
    assert_all_committed(&admin, &group, &topics, 3).await;
}

// ---------------------------------------------------------------------------
// The broker goes down mid-stream and comes back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_then_up_mid_stream() {
    init_tracing();
    const AGGREGATES: usize = 40;
    const VERSIONS: i64 = 30;
    let started = Instant::now();
    let mock = Mock::new(1);
    let topics: Vec<String> = (0..2).map(|i| unique(&format!("down{i}"))).collect();
    for t in &topics {
        mock.create_topic(t, 3);
    }
    let group = unique("g");
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    let admin = broker.clone();
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let recorded = Recorded::new(broker, &ledger);
    let mut changes = recorded.changes.subscribe();
    let bus = Arc::new(EventBus::builder(recorded).config(bus_config(&group)).build().unwrap());
    let checker = Arc::new(OrderChecker::new());
    let (progress, mut done) = Progress::new();
    for topic in &topics {
        bus.subscribe_envelope(topic, handler(&checker, &progress, Duration::from_millis(10))).await.unwrap();
    }
    bus.start().await.unwrap();

    let (aggregates, expected) = spread_aggregates(&topics, AGGREGATES, VERSIONS);
    let total = AGGREGATES * VERSIONS as usize;
    let positions = Positions::default();
    publish(&bus, &aggregates, 1, VERSIONS / 2, &positions).await;
    // Half of the first half handled and committed; the rest in the pool.
    // Read from the broker: the session stores offsets and librdkafka
    // commits them in the background.
    let tps: Vec<TopicPartition> =
        topics.iter().flat_map(|t| (0..3).map(move |p| TopicPartition::new(t.as_str(), p))).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let committed_at_down = loop {
        let read = admin.committed_offsets(&group, &tps).await.unwrap();
        let committed: u64 = read.values().map(|o| o.unwrap_or(0)).sum();
        if committed >= total as u64 / 4 {
            break committed;
        }
        assert!(Instant::now() < deadline, "a quarter was not committed in time ({committed})");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the broker's state
    };

    // Down: the second half is published into the outage (the idempotent
    // producer retries until the broker is back).
    mock.broker_down(1);
    let kstats = admin.stats().clone();
    let rest = {
        let (bus, aggregates, positions) = (bus.clone(), aggregates.clone(), positions.clone());
        tokio::spawn(async move { publish(&bus, &aggregates, VERSIONS / 2 + 1, VERSIONS, &positions).await })
    };
    // Stay down until the member noticed: its session timed out and the
    // consumer was told its assignment was lost.
    let noticed = tokio::time::timeout(Duration::from_secs(30), changes.wait_for(|c| c.lost >= 1)).await.is_ok();
    assert!(noticed, "the outage was never noticed");
    let handled_in_outage = *done.borrow();
    mock.broker_up(1);
    let retries = rest.await.unwrap();
    wait_for(&mut done, total, Duration::from_secs(60), "after the broker came back").await;
    let stats = bus.consumer_stats().await.unwrap();
    let report = bus.close().await;

    let r = checker.report(&expected);
    let starts = Ledger::starts(&ledger);
    eprintln!(
        "kafka broker down/up: sent {total}, handled {}, duplicates {}, violations {}, missing {}, handled when \
         lost {handled_in_outage}, committed when the broker went down {committed_at_down}, assignments resumed at or above the last commit {}/{}, lost {}, consumer errors \
         {}, publish retries {retries}, redelivered {}, in {:?}",
        r.handled,
        r.duplicates,
        r.violations,
        r.missing,
        starts.at_or_above(),
        starts.checked,
        kstats.lost.load(Ordering::Relaxed),
        kstats.consumer_errors.load(Ordering::Relaxed),
        stats.redelivered_skipped.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.handled, total as u64);
    starts.assert_none_below();
    assert_eq!(report.final_commit_error, None);
    assert_all_committed(&admin, &group, &topics, 3).await;
}

// ---------------------------------------------------------------------------
// Back-pressure: a full pool pauses the partitions instead of buffering.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_pauses_partitions_and_resumes() {
    init_tracing();
    const AGGREGATES: usize = 30;
    const VERSIONS: i64 = 12;
    let started = Instant::now();
    let mock = Mock::new(1);
    let topic = unique("bp");
    mock.create_topic(&topic, 3);
    let group = unique("g");
    let mut bus_cfg = bus_config(&group);
    bus_cfg.pool = PoolConfig { concurrency: 4, capacity: 64, wait_timeout: Duration::from_millis(500) };
    // Read-ahead bounded by the pool: at most 64 messages wait between the
    // poll thread and the consumer.
    let kcfg = KafkaConfig { max_buffered: 1000, ..kafka_config(&mock.servers) }.bounded(bus_cfg.pool.capacity);
    assert_eq!(kcfg.max_buffered, 64);
    let broker = KafkaBroker::connect(kcfg).await.unwrap();
    let admin = broker.clone();
    let bus = Arc::new(EventBus::builder(broker).config(bus_cfg).build().unwrap());
    let checker = Arc::new(OrderChecker::new());
    let (progress, mut done) = Progress::new();
    bus.subscribe_envelope(&topic, handler(&checker, &progress, Duration::from_millis(1))).await.unwrap();
    let (aggregates, expected) = spread_aggregates(std::slice::from_ref(&topic), AGGREGATES, VERSIONS);
    // Everything is there before the consumer starts: it reads far faster
    // than 4 workers handle.
    publish(&bus, &aggregates, 1, VERSIONS, &Positions::default()).await;
    bus.start().await.unwrap();
    let total = AGGREGATES * VERSIONS as usize;
    wait_for(&mut done, total, Duration::from_secs(60), "back-pressure").await;
    bus.close().await;
    let r = checker.report(&expected);
    let kstats = admin.stats();
    let (pauses, resumes) = (kstats.pauses.load(Ordering::Relaxed), kstats.resumes.load(Ordering::Relaxed));
    eprintln!(
        "kafka back-pressure: sent {total}, handled {}, duplicates {}, violations {}, pauses {pauses}, resumes \
         {resumes}, fetched {}, in {:?}",
        r.handled,
        r.duplicates,
        r.violations,
        kstats.fetched.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!((r.handled, r.duplicates), (total as u64, 0));
    assert!(pauses >= 1 && resumes >= 1, "pauses {pauses}, resumes {resumes}");
    // A pause drops what librdkafka had prefetched and refetches it later:
    // nothing is handed out twice.
    assert_eq!(kstats.fetched.load(Ordering::Relaxed), total as u64);
    assert_all_committed(&admin, &group, &[topic], 3).await;
}

// ---------------------------------------------------------------------------
// Consumer lag and connection state, read from the (mock) broker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_is_the_high_watermark_minus_the_committed_offset() {
    init_tracing();
    let mock = Mock::new(1);
    let topic = unique("lag");
    mock.create_topic(&topic, 2);
    let group = unique("g");
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    let mut ends = [0u64; 2];
    for i in 0..10 {
        let key = Some(format!("key-{i}").into_bytes());
        let msg = Outbound { topic: topic.clone(), key, headers: vec![], payload: vec![] };
        let pos = broker.publish(msg).await.unwrap();
        ends[pos.partition as usize] += 1;
    }
    assert!(ends.iter().all(|n| *n >= 2), "keys spread over both partitions: {ends:?}");
    let tp = |p: u32| TopicPartition::new(topic.as_str(), p);
    let lag = |committed: [u64; 2]| {
        (0..2u32)
            .map(|p| {
                let (end_offset, committed) = (ends[p as usize], committed[p as usize]);
                eventbus::PartitionLag { partition: tp(p), end_offset, committed }
            })
            .collect::<Vec<_>>()
    };
    let topics = [topic.clone(), unique("no-such-topic")];
    // Nothing committed: every message is lag; a missing topic has no entry.
    assert_eq!(broker.consumer_lag(&group, &topics).await.unwrap(), lag([0, 0]));

    let mut session = broker.subscribe(&group, std::slice::from_ref(&topic)).await.unwrap();
    let mut read = 0;
    while read < 10 {
        let ev = tokio::time::timeout(Duration::from_secs(30), session.next()).await.expect("an event within 30 s");
        if let SessionEvent::Message(_) = ev.unwrap() {
            read += 1;
        }
    }
    session.commit(&[(tp(0), 1), (tp(1), ends[1])]).await.unwrap();
    // Stored: librdkafka commits it within `auto_commit_interval`.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lags = loop {
        let lags = broker.consumer_lag(&group, &topics).await.unwrap();
        if lags == lag([1, ends[1]]) || Instant::now() > deadline {
            break lags;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the broker's state
    };
    assert_eq!(lags, lag([1, ends[1]]));
    assert_eq!(lags.iter().map(eventbus::PartitionLag::lag).collect::<Vec<_>>(), vec![ends[0] - 1, 0]);
    session.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_follows_the_broker_going_down_and_up() {
    init_tracing();
    let mock = Mock::new(1);
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    let mut state = broker.connection_state();
    assert_eq!(*state.borrow(), eventbus::ConnectionState::Connected);
    let limit = Duration::from_secs(30);
    mock.broker_down(1);
    let down = tokio::time::timeout(limit, state.wait_for(|s| *s == eventbus::ConnectionState::Disconnected)).await;
    assert!(down.map(|r| r.is_ok()).unwrap_or(false), "no Disconnected within {limit:?} of the broker going down");
    mock.broker_up(1);
    let up = tokio::time::timeout(limit, state.wait_for(|s| *s == eventbus::ConnectionState::Connected)).await;
    assert!(up.map(|r| r.is_ok()).unwrap_or(false), "no Connected within {limit:?} of the broker coming back");
}

// ---------------------------------------------------------------------------
// Issue 13: foreign header bytes, a dead poll thread, epoch fencing, dead
// letters, size limits.

/// A foreign producer (librdkafka's C API) writes records with header names
/// and values that are not UTF-8 among good envelopes; see
/// [`foreign_kafka::header_bytes_scenario`]. Never a panic, the session
/// stays up, every good event is handled once in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_header_bytes_are_delivered_without_a_panic() {
    init_tracing();
    let mock = Mock::new(1);
    let topic = unique("foreign");
    mock.create_topic(&topic, 1);
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    foreign_kafka::header_bytes_scenario(&mock.servers, broker, &topic, "kafka (mock cluster)").await;
}

/// The delivery itself, at the session: the record with a non-UTF-8 header
/// name arrives marked, with every original header byte; the record after
/// it arrives too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_delivered_marked_with_its_raw_bytes() {
    use eventbus::broker::kafka::raw_headers;
    init_tracing();
    let mock = Mock::new(1);
    let topic = unique("rawhdr");
    mock.create_topic(&topic, 1);
    let foreign = foreign_kafka::ForeignProducer::new(&mock.servers);
    let bad = vec![(vec![0xc0, 0xaf], Some(vec![1, 2, 3])), (b"x-null".to_vec(), None)];
    foreign.send(&topic, &foreign_kafka::RawRecord { partition: 0, key: None, headers: bad.clone(), payload: b"p1" });
    let good = vec![(b"x-v".to_vec(), Some(vec![0xff]))];
    foreign.send(&topic, &foreign_kafka::RawRecord { partition: 0, key: None, headers: good, payload: b"p2" });
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    let mut session = broker.subscribe(&unique("g"), std::slice::from_ref(&topic)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(30), session.next()).await.expect("an event").unwrap();
        if let SessionEvent::Message(d) = ev {
            got.push(d);
        }
    }
    let (first, second) = (&got[0], &got[1]);
    assert_eq!(first.payload, b"p1");
    assert_eq!(first.undeliverable(), Some(eventbus::broker::REASON_UNDECODABLE_HEADERS));
    assert_eq!(first.headers[0], ("\u{fffd}\u{fffd}".to_string(), vec![1, 2, 3]));
    assert_eq!(first.headers[1], ("x-null".to_string(), vec![]));
    let raw = &first.headers.iter().find(|(n, _)| n == eventbus::broker::HEADER_RAW_HEADERS).unwrap().1;
    let raw: Vec<_> = raw_headers::decode(raw).unwrap().into_iter().map(|h| (h.name, h.value)).collect();
    assert_eq!(raw, bad);
    assert_eq!(second.payload, b"p2");
    assert_eq!(second.undeliverable(), None);
    assert_eq!(second.headers, vec![("x-v".to_string(), vec![0xff])]);
    assert_eq!(broker.stats().session_failures.load(Ordering::Relaxed), 0);
    session.close().await.unwrap();
}

/// A payload above `max_payload_bytes` is not copied: the delivery comes
/// without it, marked `too-large` with the size, and the next record
/// arrives as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_delivered_marked_without_being_copied() {
    init_tracing();
    let mock = Mock::new(1);
    let topic = unique("big");
    mock.create_topic(&topic, 1);
    let broker =
        KafkaBroker::connect(KafkaConfig { max_payload_bytes: 1000, ..kafka_config(&mock.servers) }).await.unwrap();
    for payload in [vec![7u8; 5000], vec![1u8; 1000]] {
        broker.publish(Outbound { topic: topic.clone(), key: None, headers: vec![], payload }).await.unwrap();
    }
    let mut session = broker.subscribe(&unique("g"), std::slice::from_ref(&topic)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(30), session.next()).await.expect("an event").unwrap();
        if let SessionEvent::Message(d) = ev {
            got.push(d);
        }
    }
    assert!(got[0].payload.is_empty(), "not copied");
    assert_eq!(got[0].undeliverable(), Some(eventbus::broker::REASON_TOO_LARGE));
    let detail = got[0].undeliverable_detail().unwrap();
    assert!(detail.contains("5000") && detail.contains("1000"), "{detail}");
    assert_eq!(got[1].payload, vec![1u8; 1000], "at the limit: delivered");
    assert_eq!(got[1].undeliverable(), None);
    assert_eq!(broker.stats().oversized.load(Ordering::Relaxed), 1);
    session.close().await.unwrap();
}

/// A poll thread that dies (here a planted panic) fails the session at
/// once: `next` returns `SessionFailed` (Fatal) on this and every later
/// call instead of waiting forever, and the connection state reports a
/// disconnect until the failed session is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_poll_thread_fails_the_session_at_once() {
    init_tracing();
    let mock = Mock::new(1);
    let topic = unique("dead");
    mock.create_topic(&topic, 1);
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    let mut state = broker.connection_state();
    let mut session = broker.subscribe(&unique("g"), std::slice::from_ref(&topic)).await.unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), session.next()).await.expect("assigned").unwrap();
        if matches!(ev, SessionEvent::Assigned(_)) {
            break;
        }
    }
    session.inject_poll_thread_panic();
    for _ in 0..2 {
        let err = tokio::time::timeout(Duration::from_secs(10), session.next())
            .await
            .expect("next() returns instead of waiting forever")
            .unwrap_err();
        assert!(matches!(err, BrokerError::SessionFailed(ref m) if m.contains("panicked")), "{err:?}");
        assert_eq!(err.class(), eventbus::broker::ErrorClass::Fatal);
    }
    assert_eq!(broker.stats().session_failures.load(Ordering::Relaxed), 1);
    let down = tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == eventbus::ConnectionState::Disconnected),
    )
    .await
    .map(|r| r.is_ok());
    assert_eq!(down, Ok(true), "the connection state reports the dead session");
    drop(session);
    let up =
        tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| *s == eventbus::ConnectionState::Connected))
            .await
            .map(|r| r.is_ok());
    assert_eq!(up, Ok(true), "connected again once the failed session is gone");
    // A new session works.
    let session = broker.subscribe(&unique("g"), std::slice::from_ref(&topic)).await.unwrap();
    session.close().await.unwrap();
}

/// Item 4: the dead-letter topic of a source is checked at subscribe time:
/// a name Kafka cannot hold is a typed configuration error, an existing one
/// is used. (The mock cluster has no CreateTopics; creation with the
/// source's partition count is `kafka_tansu::dead_letter_topic_is_created_like_its_source`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topic_names_are_checked() {
    init_tracing();
    let mock = Mock::new(1);
    let topic = unique("dl");
    mock.create_topic(&topic, 3);
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    broker.ensure_dead_letter_topic(&topic, &format!("{topic}.dlq")).await.unwrap();
    let long = "x".repeat(246);
    let err = broker.ensure_dead_letter_topic(&long, &format!("{long}.dlq")).await.unwrap_err();
    assert!(matches!(err, BrokerError::Config { ref key, .. } if key == "kafka.topic"), "{err:?}");
    let err = broker.ensure_dead_letter_topic(&topic, "bad/dlq").await.unwrap_err();
    assert!(matches!(err, BrokerError::Config { ref key, .. } if key == "kafka.topic"), "{err:?}");
}

/// The next session event within 30 s.
async fn next_event(session: &mut KafkaSession) -> SessionEvent {
    tokio::time::timeout(Duration::from_secs(30), session.next()).await.expect("an event within 30 s").unwrap()
}

/// Until `session` hands out an `Assigned` that contains `tp`.
async fn until_assigned(session: &mut KafkaSession, tp: &TopicPartition) {
    loop {
        if let SessionEvent::Assigned(tps) = next_event(session).await {
            if tps.contains(tp) {
                return;
            }
        }
    }
}

/// Item 7: the assignment bookkeeping is fenced by epoch. Member A's revoke
/// of a partition times out (A never releases it), B takes the partition and
/// commits 100, B leaves, and the partition comes back to A under a new
/// assignment that A has not taken from `next` yet. A's late commit of the
/// old assignment's frontier (40) is rejected and B's 100 stays; A's late
/// release changes nothing; once A took the new assignment its commits
/// count again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_of_an_old_assignment_does_not_overwrite_the_next_owner() {
    init_tracing();
    let mock = Mock::new(1);
    let topic = unique("epoch");
    mock.create_topic(&topic, 2);
    let group = unique("g");
    let cfg = KafkaConfig { revoke_timeout: Duration::from_secs(1), ..kafka_config(&mock.servers) };
    let a_broker = KafkaBroker::connect(cfg.clone()).await.unwrap();
    let b_broker = KafkaBroker::connect(cfg).await.unwrap();
    let topics = std::slice::from_ref(&topic);
    let mut a = a_broker.subscribe(&group, topics).await.unwrap();
    let mut owned = BTreeSet::new();
    while owned.len() < 2 {
        if let SessionEvent::Assigned(tps) = next_event(&mut a).await {
            owned.extend(tps);
        }
    }
    let mut b = b_broker.subscribe(&group, topics).await.unwrap();
    let moved = loop {
        if let SessionEvent::Revoked(tps) = next_event(&mut a).await {
            break tps;
        }
    };
    assert_eq!(moved.len(), 1, "cooperative-sticky moves one of two partitions");
    let tp = moved[0].clone();
    // A does not release: the revoke times out, B gets the partition.
    until_assigned(&mut b, &tp).await;
    assert_eq!(a_broker.stats().revoke_timeouts.load(Ordering::Relaxed), 1);
    b.commit(&[(tp.clone(), 100)]).await.unwrap();
    b.close().await.unwrap();
    // The partition comes back to A; A has not read that assignment yet.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.assignment().contains(&tp) {
        assert!(Instant::now() < deadline, "{tp} not reassigned to A within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling librdkafka's state
    }
    let err = a.commit(&[(tp.clone(), 40)]).await.unwrap_err();
    assert!(matches!(err, BrokerError::CommitRejected { .. }), "{err:?}");
    let read = a_broker.committed_offsets(&group, std::slice::from_ref(&tp)).await.unwrap();
    assert_eq!(read[&tp], Some(100), "B's commit stands");
    a.release(std::slice::from_ref(&tp)).await.unwrap(); // late, for the old revoke: no effect
    until_assigned(&mut a, &tp).await;
    a.commit(&[(tp.clone(), 120)]).await.unwrap();
    // Stored: librdkafka commits it within `auto_commit_interval`.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = a_broker.committed_offsets(&group, std::slice::from_ref(&tp)).await.unwrap();
        if read[&tp] == Some(120) {
            break;
        }
        assert!(Instant::now() < deadline, "the new assignment's commit never reached the broker: {read:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the broker's state
    }
    a.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Item 8: dead letters across a crash.

/// Selects the dead-lettering consumer process mode of this test binary.
const DLQ_CHILD_ENV: &str = "EVENTBUS_KAFKA_DLQ_CHILD";

/// The child process of `dead_letters_across_a_crash` (does nothing unless
/// `EVENTBUS_KAFKA_DLQ_CHILD` is set): consumes `CHILD_TOPICS` as
/// `CHILD_GROUP` from the mock cluster at `CHILD_ADDRESS` with a handler
/// that works 20 ms and fails (one attempt), so every event is
/// dead-lettered; commits every 100 ms; closes its bus at EOF on stdin.
#[test]
fn child_process_entry() {
    if std::env::var_os(DLQ_CHILD_ENV).is_none() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let broker = KafkaBroker::connect(kafka_config(&var("CHILD_ADDRESS"))).await.unwrap();
        let mut config = BusConfig {
            consumer: eventbus::consumer::ConsumerConfig { group: var("CHILD_GROUP"), ..Default::default() },
            ..BusConfig::default()
        };
        config.consumer.retry.max_attempts = 1;
        config.consumer.commit_interval = Duration::from_millis(100);
        let bus = EventBus::builder(broker).config(config).build().unwrap();
        for topic in var("CHILD_TOPICS").split(',') {
            bus.subscribe_envelope(topic, |_env: Envelope| async {
                tokio::time::sleep(Duration::from_millis(20)).await; // simulated handler work
                Err("poison".into())
            })
            .await
            .unwrap();
        }
        bus.start().await.unwrap();
        common::crash_child::run_until_stdin_closes(bus).await;
    });
}

/// (origin topic, partition, offset) of each dead letter in `records`.
fn origins(records: &[rdkafka::message::OwnedMessage]) -> BTreeMap<(String, u32, u64), u32> {
    use eventbus::consumer::task_headers::{DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION, DLQ_ORIGIN_TOPIC};
    let text = |m, name| String::from_utf8(header(m, name).expect(name).to_vec()).unwrap();
    let mut out = BTreeMap::new();
    for m in records {
        let origin = (
            text(m, DLQ_ORIGIN_TOPIC),
            text(m, DLQ_ORIGIN_PARTITION).parse().unwrap(),
            text(m, DLQ_ORIGIN_OFFSET).parse().unwrap(),
        );
        *out.entry(origin).or_default() += 1;
    }
    out
}

/// A consumer process that dead-letters every event is killed with SIGKILL
/// mid-stream and restarted. Every poison event has a dead letter, each
/// with its origin's key and its (x-dlq-origin-topic, partition, offset)
/// identity; events dead-lettered after the last commit before the kill are
/// dead-lettered again by the next process (Kafka stores the second copy:
/// consumers of the dead-letter topic de-duplicate by that identity). The
/// copies are bounded by what was uncommitted at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_across_a_crash() {
    use rdkafka::Message;
    init_tracing();
    const EVENTS: usize = 300;
    let started = Instant::now();
    let mock = Mock::new(1);
    let topic = unique("dlcrash");
    let dlq = format!("{topic}.dlq");
    mock.create_topic(&topic, 3);
    let group = unique("g");
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    for i in 0..EVENTS {
        let agg = format!("agg-{}", i % 30);
        broker
            .publish(common::scenario::outbound(&topic, Some(&agg), &event(&agg, (i / 30 + 1) as i64)))
            .await
            .unwrap();
    }
    let tps: Vec<TopicPartition> = (0..3).map(|p| TopicPartition::new(topic.as_str(), p)).collect();
    let dlq_tps: Vec<TopicPartition> = (0..3).map(|p| TopicPartition::new(dlq.as_str(), p)).collect();
    let dead_letters = || async {
        let mut n = 0;
        for tp in &dlq_tps {
            n += broker.end_offset(tp).await.unwrap();
        }
        n as usize
    };
    let spawn = || {
        common::crash_child::ChildProc::spawn(&[
            (DLQ_CHILD_ENV, "1"),
            ("CHILD_ADDRESS", &mock.servers),
            ("CHILD_GROUP", &group),
            ("CHILD_TOPICS", &topic),
        ])
    };
    // First process: killed once a third of the events are dead-lettered
    // and it committed at least once.
    let mut first = spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    let committed_some =
        || async { broker.committed_offsets(&group, &tps).await.unwrap().values().any(|c| c.unwrap_or(0) > 0) };
    while dead_letters().await < EVENTS / 3 || !committed_some().await {
        assert!(Instant::now() < deadline, "the first process dead-lettered too little in 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await; // polling the broker's end offsets
    }
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    let at_kill = dead_letters().await;
    let committed_at_kill = broker.committed_offsets(&group, &tps).await.unwrap();
    // Second process: until every origin has its dead letter and the group
    // committed everything.
    let mut second = spawn();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let committed = broker.committed_offsets(&group, &tps).await.unwrap();
        let mut all = true;
        for tp in &tps {
            all &= committed[tp] == Some(broker.end_offset(tp).await.unwrap());
        }
        if all {
            break;
        }
        assert!(Instant::now() < deadline, "the second process did not commit everything in 90 s: {committed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling the committed offsets
    }
    drop(second.child.stdin.take());
    let status = second.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let records = read_topic(&mock.servers, &dlq, 3);
    let per_origin = origins(&records);
    let copies: usize = per_origin.values().map(|n| *n as usize - 1).sum();
    let most = per_origin.values().max().copied().unwrap_or(0);
    let uncommitted_at_kill: u64 = tps
        .iter()
        .map(|tp| {
            let end = per_origin.keys().filter(|(t, p, _)| *t == topic && *p == tp.partition).count() as u64;
            end - committed_at_kill[tp].unwrap_or(0)
        })
        .sum();
    eprintln!(
        "kafka dead letters across a SIGKILL: sent {EVENTS} poison events, dead letters {} ({} at the kill), \
         distinct origins {}, second copies {copies} (at most {most} per origin), uncommitted at the kill \
         {uncommitted_at_kill}, in {:?}",
        records.len(),
        at_kill,
        per_origin.len(),
        started.elapsed()
    );
    assert_eq!(per_origin.len(), EVENTS, "every poison event has a dead letter");
    assert!(most <= 2, "at most one second copy per origin (one crash)");
    // Only events the killed process had not committed are dead-lettered again.
    for ((t, p, offset), n) in &per_origin {
        assert_eq!(t, &topic);
        if *n > 1 {
            let floor = committed_at_kill[&TopicPartition::new(topic.as_str(), *p)].unwrap_or(0);
            assert!(*offset >= floor, "{t}[{p}]@{offset} dead-lettered twice although committed ({floor})");
        }
    }
    assert!(copies as u64 <= uncommitted_at_kill);
    // Each dead letter keeps its origin's key.
    for m in &records {
        let key = std::str::from_utf8(m.key().expect("a key")).unwrap();
        assert!(key.starts_with("agg-"), "{key}");
    }
}

// ---------------------------------------------------------------------------
// The handler's context.

/// An ordered handler's [`eventbus::DeliveryContext`] names the topic,
/// partition and offset the broker returned for each publish (and its key,
/// headers and trace IDs); the memory-broker version of this check is
/// `tests/handler_context.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_handler_context_matches_the_broker_positions() {
    init_tracing();
    let mock = Mock::new(1);
    let topic = unique("ctx");
    mock.create_topic(&topic, 3);
    let group = unique("g");
    let broker = KafkaBroker::connect(kafka_config(&mock.servers)).await.unwrap();
    let bus = EventBus::builder(broker).config(bus_config(&group)).build().unwrap();
    let mut rx = common::scenario::forward_contexts(&bus, &topic).await;
    bus.start().await.unwrap();
    let published = common::scenario::publish_traced(&bus, &topic, 6, 3).await;
    for ((id, _), (_, pos)) in &published {
        assert_eq!(pos.partition, eventbus::broker::memory::partition_for_key(id.as_bytes(), 3));
    }
    let mut per_partition: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for _ in 0..published.len() {
        let (env, ctx) = recv_within(&mut rx, Duration::from_secs(30), "every event handled").await;
        let (sent, pos) = &published[&(env.aggregate_id.clone(), env.event_version)];
        assert_eq!(&env, sent);
        assert_eq!((ctx.topic(), ctx.partition(), ctx.offset()), (topic.as_str(), pos.partition, pos.offset));
        assert_eq!(ctx.key(), Some(env.aggregate_id.as_bytes()));
        assert_eq!((ctx.trace_id(), ctx.correlation_id()), (sent.trace_id.as_deref(), sent.correlation_id.as_deref()));
        assert_eq!(ctx.headers(), sent.to_headers().as_slice());
        assert_eq!((ctx.attempt(), ctx.delivery_attempt()), (1, 1));
        assert!(per_partition.entry(ctx.partition()).or_default().insert(ctx.offset()), "an offset twice");
    }
    // Each partition's offsets are the broker's 0..n, none shared.
    for (p, offsets) in &per_partition {
        assert_eq!(offsets.iter().copied().collect::<Vec<_>>(), (0..offsets.len() as u64).collect::<Vec<_>>(), "{p}");
    }
    close_cleanly(bus, published.len() as u64).await;
}
