#![cfg(not(feature = "loom"))]
#![cfg(feature = "kafka")]
//! The Kafka adapter against a real Kafka-protocol broker process (tansu,
//! started by `scripts/tansu`), at the address in `EVENTBUS_KAFKA_BROKERS`
//! (e.g. `127.0.0.1:9092`).
//!
//! Without `EVENTBUS_KAFKA_BROKERS` every test fails, saying it was not run
//! and how to start the broker (a test that could not run must not count as
//! passed; `.ci/run` starts tansu and sets it); with it, an unreachable
//! broker fails the test. Every test uses
//! topics and groups with a random suffix, so reruns do not collide.
//!
//! The crash test re-runs this test binary as a child process in the mode
//! selected by `EVENTBUS_KAFKA_CHILD` (see [`child_process_entry`]); without
//! that variable the entry returns at once.

mod common;
#[path = "common/foreign_kafka.rs"]
mod foreign_kafka;

use common::crash_child::{self, publish_all, Crash};
use common::scenario::{bus_config, event, init_tracing, recv_within, started_with_channels, unique, Dropped, Seed};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eventbus::broker::kafka::{KafkaBroker, KafkaConfig};
use eventbus::{Broker, EventBus, TopicPartition};

const BROKERS_ENV: &str = "EVENTBUS_KAFKA_BROKERS";

// ---------------------------------------------------------------------------
// Helpers.

/// The broker address. Without it the test fails loudly: a test that could
/// not run must not count as passed. (`Option` so the call sites stay as
/// they are; it is always `Some`.)
fn brokers(test: &str) -> Option<String> {
    match std::env::var(BROKERS_ENV) {
        Ok(b) if !b.trim().is_empty() => Some(b),
        _ => panic!(
            "kafka_tansu::{test}: not run: {BROKERS_ENV} is not set (start a broker with scripts/tansu and set \
             {BROKERS_ENV}=127.0.0.1:9092; .ci/run does both)"
        ),
    }
}

fn kafka_config(brokers: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.to_string(),
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(500),
        max_poll_interval: Duration::from_secs(60),
        fetch_max_wait: Duration::from_millis(50),
        linger: Duration::from_millis(1),
        request_timeout: Duration::from_secs(10),
        revoke_timeout: Duration::from_secs(20),
        // Stored offsets reach the broker as often as the crash child
        // commits (50 ms), so its kill finds a frontier committed.
        auto_commit_interval: Duration::from_millis(50),
        replication_factor: 1,
        // tansu 0.6 answers a Fetch at an offset inside a record batch with
        // nothing of that batch, so a consumer resuming mid-batch (from a
        // commit or after a pause) would skip the rest of it. One record per
        // batch keeps every offset a batch start. Kafka does not need this.
        producer_properties: BTreeMap::from([("batch.num.messages".to_string(), "1".to_string())]),
        ..KafkaConfig::default()
    }
}

/// Connects or fails the test with what to do about it.
async fn connect(brokers: &str) -> KafkaBroker {
    init_tracing();
    match KafkaBroker::connect(kafka_config(brokers)).await {
        Ok(b) => b,
        Err(e) => panic!(
            "Kafka broker not reachable at {brokers} ({BROKERS_ENV}): {e}. Start one with scripts/tansu, or unset \
             {BROKERS_ENV} to skip these tests."
        ),
    }
}

/// Asserts that the group committed everything: each partition's committed
/// offset (read by a separate consumer) is one past the last offset a
/// publish was acknowledged with (tansu's ListOffsets can lag behind).
async fn assert_all_committed(broker: &KafkaBroker, group: &str, published: &BTreeMap<TopicPartition, u64>) {
    let tps: Vec<TopicPartition> = published.keys().cloned().collect();
    let committed = broker.committed_offsets(group, &tps).await.unwrap();
    for (tp, last) in published {
        assert_eq!(committed[tp], Some(last + 1), "{tp}: committed offset vs last published offset {last}");
    }
}

/// The highest published offset per partition.
fn last_offsets<'a>(positions: impl IntoIterator<Item = &'a (TopicPartition, u64)>) -> BTreeMap<TopicPartition, u64> {
    let mut last = BTreeMap::new();
    for (tp, o) in positions {
        let e = last.entry(tp.clone()).or_insert(*o);
        *e = (*e).max(*o);
    }
    last
}

// ---------------------------------------------------------------------------
// Round trip, with topics created through the admin API.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_the_bus() {
    let Some(brokers) = brokers("round_trip_through_the_bus") else { return };
    let broker = connect(&brokers).await;
    let (topic, raw_topic) = (unique("rt"), unique("rt-raw"));
    let group = unique("g");
    assert_eq!(broker.partitions(&topic).await.unwrap(), None);
    broker.ensure_topic(&topic, 3).await.unwrap();
    assert_eq!(broker.partitions(&topic).await.unwrap(), Some(3));
    broker.ensure_topic(&topic, 3).await.unwrap(); // already there
    broker.ensure_topic(&raw_topic, 1).await.unwrap();

    let admin = broker.clone();
    let (bus, mut env_rx, mut raw_rx) = started_with_channels(broker, bus_config(&group), &topic, &raw_topic).await;

    let env = event("order-1", 1).with_trace_id("trace-1");
    let first = bus.publish_envelope(&topic, &env).await.unwrap();
    assert_eq!(first.partition, eventbus::broker::memory::partition_for_key(b"order-1", 3));
    let got = recv_within(&mut env_rx, Duration::from_secs(30), "envelope delivered").await;
    assert_eq!(got, env);

    let headers = vec![("X-Custom".to_string(), b"v1".to_vec()), ("X-Bin".to_string(), vec![0, 255, 10])];
    let key = b"key-\x01\xff".to_vec();
    let pos = bus.publish(&raw_topic, Some(&key), headers.clone(), b"hello".to_vec()).await.unwrap();
    let d = recv_within(&mut raw_rx, Duration::from_secs(30), "raw delivered").await;
    assert_eq!((d.partition, d.offset), (pos.partition, pos.offset));
    assert_eq!((d.payload.as_slice(), d.key.as_deref()), (&b"hello"[..], Some(key.as_slice())));
    assert_eq!(d.headers, headers);

    let report = bus.close().await;
    assert_eq!(report.final_commit_error, None);
    let tps = [TopicPartition::new(topic.as_str(), first.partition), TopicPartition::new(raw_topic.as_str(), 0)];
    let committed = admin.committed_offsets(&group, &tps).await.unwrap();
    assert_eq!(committed[&tps[0]], Some(first.offset + 1));
    assert_eq!(committed[&tps[1]], Some(pos.offset + 1));
}

// ---------------------------------------------------------------------------
// The seed's scenario: 5 topics x 3 partitions, versions in order.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_five_topics_three_partitions() {
    let Some(brokers) = brokers("seed_scenario_five_topics_three_partitions") else { return };
    let broker = connect(&brokers).await;
    let topics: Vec<String> = (0..5).map(|i| unique(&format!("seed{i}"))).collect();
    for t in &topics {
        broker.ensure_topic(t, 3).await.unwrap();
    }
    let group = unique("g");
    let admin = broker.clone();
    let bus = EventBus::builder(broker).config(bus_config(&group)).build().unwrap();
    let seed = Seed {
        label: "tansu seed scenario",
        topics: &topics,
        aggregates: 20,
        versions: 20,
        limit: Duration::from_secs(120),
        max_publish_retries: 0,
        dropped: Dropped::StaysRunning,
    };
    let positions = seed.run(bus).await;
    assert_all_committed(&admin, &group, &last_offsets(positions.values())).await;
}

// ---------------------------------------------------------------------------
// A consumer process killed with SIGKILL and restarted.

const CHILD_ENV: &str = "EVENTBUS_KAFKA_CHILD";

/// The child mode of this test binary (does nothing unless
/// `EVENTBUS_KAFKA_CHILD` is set; see [`crash_child::entry`]): a consumer of
/// the broker at `CHILD_ADDRESS`.
#[test]
fn child_process_entry() {
    crash_child::entry(CHILD_ENV, |brokers| async move { connect(&brokers).await });
}

/// A consumer process killed with SIGKILL mid-stream and restarted: the
/// restart resumes at the committed frontier, loses nothing, keeps order,
/// and re-handles only events above the frontier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_process_killed_and_restarted_resumes_from_the_committed_frontier() {
    let Some(brokers) = brokers("consumer_process_killed_and_restarted_resumes_from_the_committed_frontier") else {
        return;
    };
    const AGGREGATES: usize = 20;
    const VERSIONS: i64 = 30;
    let started = Instant::now();
    let topics = vec![unique("crash-a"), unique("crash-b")];
    let group = unique("g");
    let broker = connect(&brokers).await;
    for t in &topics {
        broker.ensure_topic(t, 3).await.unwrap();
    }

    // Publish everything first, remembering each event's position.
    let (published, expected) = publish_all(&broker, &topics, AGGREGATES, VERSIONS).await;
    let position: BTreeMap<_, _> = published
        .into_iter()
        .map(|((topic, agg, v), pos)| {
            let tp = TopicPartition::new(topic.as_str(), pos.partition);
            ((topic, agg, v), (tp, pos.offset))
        })
        .collect();
    let total = position.len();
    let tps: Vec<TopicPartition> =
        topics.iter().flat_map(|t| (0..3).map(move |p| TopicPartition::new(t.as_str(), p))).collect();

    // First run: SIGKILL after a third of the events completed. Nothing
    // commits for the group until the second process starts.
    let crash =
        Crash { child_env: CHILD_ENV, address: &brokers, group: &group, topics: &topics, logs: "eventbus-kafka-crash" };
    let (committed, runs) =
        crash.run(total, &expected, async || broker.committed_offsets(&group, &tps).await.unwrap()).await;
    // The second process started each partition at the committed frontier:
    // it re-handled nothing below it, and everything it re-handled is above.
    let mut below = Vec::new();
    for (topic, agg, v) in &runs.second.began {
        let (tp, offset) = &position[&(topic.clone(), agg.clone(), *v)];
        let frontier = committed[tp].unwrap_or(0);
        if *offset < frontier {
            below.push((tp.clone(), *offset, frontier));
        }
    }
    let frontier_total: u64 = committed.values().map(|c| c.unwrap_or(0)).sum();
    let at_kill = format!("committed frontier at the kill {frontier_total} events");
    runs.check("tansu crash scenario", total, &at_kill, started);
    assert!(below.is_empty(), "the restarted process re-handled events below the committed frontier: {below:?}");
    assert!(frontier_total > 0, "the first process committed something before it was killed");
    // Every re-handled event lies at or above the frontier (checked above);
    // the second process committed everything when it closed.
    assert_all_committed(&broker, &group, &last_offsets(position.values())).await;
    runs.remove_logs();
}

// ---------------------------------------------------------------------------
// Issue 13.

/// A foreign producer writes a header name that is not UTF-8 among good
/// envelopes (see `foreign_kafka::header_bytes_scenario`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_header_bytes_are_delivered_without_a_panic() {
    let Some(brokers) = brokers("foreign_header_bytes_are_delivered_without_a_panic") else { return };
    let broker = connect(&brokers).await;
    let topic = unique("foreign");
    broker.ensure_topic(&topic, 1).await.unwrap();
    broker.ensure_dead_letter_topic(&topic, &format!("{topic}.dlq")).await.unwrap();
    foreign_kafka::header_bytes_scenario(&brokers, broker, &topic, "kafka (tansu)").await;
}

/// Item 4: the dead-letter topic is created through the admin API (broker
/// auto-create is not needed) with the source's partition count; a name
/// Kafka cannot hold is a typed configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topic_is_created_like_its_source() {
    let Some(brokers) = brokers("dead_letter_topic_is_created_like_its_source") else { return };
    let broker = connect(&brokers).await;
    let topic = unique("dlsrc");
    let dlq = format!("{topic}.dlq");
    broker.ensure_topic(&topic, 3).await.unwrap();
    assert_eq!(broker.partitions(&dlq).await.unwrap(), None);
    broker.ensure_dead_letter_topic(&topic, &dlq).await.unwrap();
    assert_eq!(broker.partitions(&dlq).await.unwrap(), Some(3));
    broker.ensure_dead_letter_topic(&topic, &dlq).await.unwrap(); // idempotent
    let long = "x".repeat(246);
    let err = broker.ensure_dead_letter_topic(&long, &format!("{long}.dlq")).await.unwrap_err();
    assert!(matches!(err, eventbus::BrokerError::Config { ref key, .. } if key == "kafka.topic"), "{err:?}");
}
