#![cfg(not(feature = "loom"))]
#![cfg(feature = "kafka")]
//! The Kafka adapter against a real Kafka-protocol broker process (tansu,
//! started by `scripts/tansu`), at the address in `EVENTBUS_KAFKA_BROKERS`
//! (e.g. `127.0.0.1:9092`).
//!
//! Without `EVENTBUS_KAFKA_BROKERS` every test prints that it was not run and
//! returns; with it, an unreachable broker fails the test. Every test uses
//! topics and groups with a random suffix, so reruns do not collide.
//!
//! The crash test re-runs this test binary as a child process in the mode
//! selected by `EVENTBUS_KAFKA_CHILD` (see [`child_process_entry`]); without
//! that variable the entry returns at once.

mod common;

use common::crash_child::{replay, temp_path, ChildProc};

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::broker::kafka::{KafkaBroker, KafkaConfig};
use eventbus::bus::BusConfig;
use eventbus::checker::OrderChecker;
use eventbus::consumer::ConsumerConfig;
use eventbus::pool::PoolConfig;
use eventbus::{Broker, Envelope, EventBus, TopicPartition};
use tokio::sync::{mpsc, watch};

const BROKERS_ENV: &str = "EVENTBUS_KAFKA_BROKERS";

// ---------------------------------------------------------------------------
// Helpers.

/// The broker address, or `None` (after saying so) when the tests are not
/// to run.
fn brokers(test: &str) -> Option<String> {
    match std::env::var(BROKERS_ENV) {
        Ok(b) if !b.trim().is_empty() => Some(b),
        _ => {
            // Straight to stderr, past the test harness's capture, so CI logs
            // show which tests did not run.
            let line = format!(
                "kafka_tansu::{test}: not run: {BROKERS_ENV} is not set (start a broker with scripts/tansu and set \
                 {BROKERS_ENV}=127.0.0.1:9092)\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("ebt-{prefix}-{:08x}", rand::random::<u32>())
}

/// Logs to stderr when `RUST_LOG` is set.
fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
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

fn bus_config(group: &str) -> BusConfig {
    BusConfig {
        pool: PoolConfig { concurrency: 64, capacity: 4096, wait_timeout: Duration::from_millis(500) },
        consumer: ConsumerConfig {
            group: group.to_string(),
            commit_interval: Duration::from_millis(100),
            ..ConsumerConfig::default()
        },
        close_timeout: Some(Duration::from_secs(20)),
        ..BusConfig::default()
    }
}

fn event(agg: &str, version: i64) -> Envelope {
    Envelope::new(agg, "Updated", version, &serde_json::json!({ "v": version })).unwrap()
}

/// Counts first completions and lets a test wait for a number of them.
#[derive(Clone)]
struct Progress {
    done: Arc<Mutex<BTreeSet<(String, i64)>>>,
    tx: Arc<watch::Sender<usize>>,
}

impl Progress {
    fn new() -> (Progress, watch::Receiver<usize>) {
        let (tx, rx) = watch::channel(0);
        (Progress { done: Arc::default(), tx: Arc::new(tx) }, rx)
    }

    fn completed(&self, agg: &str, version: i64) {
        let n = {
            let mut done = self.done.lock().unwrap();
            done.insert((agg.to_string(), version));
            done.len()
        };
        self.tx.send_replace(n);
    }
}

async fn wait_for(rx: &mut watch::Receiver<usize>, target: usize, limit: Duration, what: &str) {
    let reached = tokio::time::timeout(limit, rx.wait_for(|n| *n >= target)).await.is_ok();
    assert!(reached, "{what}: only {} of {target} events completed within {limit:?}", *rx.borrow());
}

fn checked_handler(
    checker: Arc<OrderChecker>,
    progress: Progress,
    work: Duration,
) -> impl Fn(Envelope) -> futures::future::BoxFuture<'static, eventbus::pool::HandlerResult> + Send + Sync + 'static {
    move |env: Envelope| {
        let checker = checker.clone();
        let progress = progress.clone();
        Box::pin(async move {
            checker.begin(&env.aggregate_id, env.event_version);
            if !work.is_zero() {
                tokio::time::sleep(work).await; // simulated handler work
            }
            checker.complete(&env.aggregate_id, env.event_version);
            progress.completed(&env.aggregate_id, env.event_version);
            Ok(())
        })
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
    let bus = EventBus::builder(broker).config(bus_config(&group)).build().unwrap();
    let (env_tx, mut env_rx) = mpsc::unbounded_channel();
    bus.subscribe_envelope(&topic, move |env| {
        let tx = env_tx.clone();
        async move {
            tx.send(env).unwrap();
            Ok(())
        }
    })
    .await
    .unwrap();
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel();
    bus.subscribe(&raw_topic, move |d| {
        let tx = raw_tx.clone();
        async move {
            tx.send(d).unwrap();
            Ok(())
        }
    })
    .await
    .unwrap();
    bus.start().await.unwrap();

    let env = event("order-1", 1).with_trace_id("trace-1");
    let first = bus.publish_envelope(&topic, &env).await.unwrap();
    assert_eq!(first.partition, eventbus::broker::memory::partition_for_key(b"order-1", 3));
    let got = tokio::time::timeout(Duration::from_secs(30), env_rx.recv()).await.expect("envelope delivered").unwrap();
    assert_eq!(got, env);

    let headers = vec![("X-Custom".to_string(), b"v1".to_vec()), ("X-Bin".to_string(), vec![0, 255, 10])];
    let key = b"key-\x01\xff".to_vec();
    let pos = bus.publish(&raw_topic, Some(&key), headers.clone(), b"hello".to_vec()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), raw_rx.recv()).await.expect("raw delivered").unwrap();
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
    const TOPICS: usize = 5;
    const AGGREGATES: usize = 20;
    const VERSIONS: i64 = 20;
    let started = Instant::now();
    let broker = connect(&brokers).await;
    let topics: Vec<String> = (0..TOPICS).map(|i| unique(&format!("seed{i}"))).collect();
    for t in &topics {
        broker.ensure_topic(t, 3).await.unwrap();
    }
    let group = unique("g");
    let admin = broker.clone();
    let bus = Arc::new(EventBus::builder(broker).config(bus_config(&group)).build().unwrap());
    let checker = Arc::new(OrderChecker::new());
    let (progress, mut done) = Progress::new();
    for topic in &topics {
        bus.subscribe_envelope(topic, checked_handler(checker.clone(), progress.clone(), Duration::from_micros(300)))
            .await
            .unwrap();
    }
    bus.start().await.unwrap();

    let mut expected = BTreeMap::new();
    let mut publishers = Vec::new();
    for (t, topic) in topics.iter().enumerate() {
        for a in 0..AGGREGATES {
            let agg = format!("t{t}-agg{a}");
            expected.insert(agg.clone(), VERSIONS);
            let (bus, topic) = (bus.clone(), topic.clone());
            publishers.push(tokio::spawn(async move {
                let mut positions = Vec::new();
                for v in 1..=VERSIONS {
                    let pos = bus.publish_envelope(&topic, &event(&agg, v)).await.unwrap();
                    positions.push((TopicPartition::new(topic.as_str(), pos.partition), pos.offset));
                }
                positions
            }));
        }
    }
    let mut positions = Vec::new();
    for p in publishers {
        positions.extend(p.await.unwrap());
    }
    let total = TOPICS * AGGREGATES * VERSIONS as usize;
    let stats = bus.consumer_stats().await.unwrap();
    wait_for(&mut done, total, Duration::from_secs(120), "seed scenario").await;
    let report = bus.close().await;
    let r = checker.report(&expected);
    eprintln!(
        "tansu seed scenario: sent {total}, handled {}, duplicates {}, violations {}, missing {}, redelivered {}, \
         in {:?}",
        r.handled,
        r.duplicates,
        r.violations,
        r.missing,
        stats.redelivered_skipped.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.handled, total as u64);
    assert_eq!(r.duplicates, 0, "no faults, so no duplicates");
    assert_eq!(report.final_commit_error, None);
    assert_all_committed(&admin, &group, &last_offsets(&positions)).await;
}

// ---------------------------------------------------------------------------
// A consumer process killed with SIGKILL and restarted.

const CHILD_ENV: &str = "EVENTBUS_KAFKA_CHILD";

/// The child mode of this test binary (does nothing unless
/// `EVENTBUS_KAFKA_CHILD` is set): consumes `CHILD_TOPICS` as `CHILD_GROUP`
/// from `CHILD_BROKERS`, writes `B|C topic aggregate version` lines to
/// `CHILD_LOG` (one write per line, so a SIGKILL loses no written line) and
/// `DONE <aggregate> <version>` to stdout per completion; closes the bus
/// cleanly at EOF on stdin.
#[test]
fn child_process_entry() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(child_main());
}

async fn child_main() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let group = var("CHILD_GROUP");
    let topics: Vec<String> = var("CHILD_TOPICS").split(',').map(String::from).collect();
    let log =
        Arc::new(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(var("CHILD_LOG")).unwrap()));
    let broker = connect(&var("CHILD_BROKERS")).await;
    let mut cfg = bus_config(&group);
    cfg.consumer.commit_interval = Duration::from_millis(50);
    let bus = EventBus::builder(broker).config(cfg).build().unwrap();
    for topic in &topics {
        let log = log.clone();
        let topic_name = topic.clone();
        bus.subscribe_envelope(topic, move |env: Envelope| {
            let log = log.clone();
            let topic = topic_name.clone();
            async move {
                let line = |kind: &str| format!("{kind} {topic} {} {}\n", env.aggregate_id, env.event_version);
                log.lock().unwrap().write_all(line("B").as_bytes()).unwrap();
                tokio::time::sleep(Duration::from_millis(4)).await; // simulated handler work
                log.lock().unwrap().write_all(line("C").as_bytes()).unwrap();
                let mut out = std::io::stdout().lock();
                writeln!(out, "DONE {} {}", env.aggregate_id, env.event_version).unwrap();
                out.flush().unwrap();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    // Run until the parent closes stdin.
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = eof_tx.send(());
    });
    let _ = eof_rx.await;
    let report = bus.close().await;
    println!("CLOSED handed_back={} commit_error={:?}", report.handed_back, report.final_commit_error);
}

/// Starts the consumer process (see `child_process_entry`).
fn spawn_child(brokers: &str, group: &str, topics: &[String], log: &Path) -> ChildProc {
    let topics = topics.join(",");
    ChildProc::spawn(&[
        (CHILD_ENV, "1"),
        ("CHILD_BROKERS", brokers),
        ("CHILD_GROUP", group),
        ("CHILD_TOPICS", &topics),
        ("CHILD_LOG", log.to_str().expect("temp paths are UTF-8")),
    ])
}

/// Flaky against tansu 0.6 (about 1 run in 5 here: a consumer process stops
/// receiving and the test's 60 s quiet guard fires; see docs/kafka.md on
/// tansu's mid-batch fetch bug). Run it explicitly:
/// `EVENTBUS_KAFKA_BROKERS=127.0.0.1:9092 cargo test --release --test kafka_tansu -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "flaky against tansu 0.6; run with --ignored (see docs/kafka.md)"]
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
    let mut position = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for v in 1..=VERSIONS {
        for (t, topic) in topics.iter().enumerate() {
            for a in 0..AGGREGATES {
                let agg = format!("t{t}-agg{a}");
                let env = event(&agg, v);
                let msg = eventbus::Outbound {
                    topic: topic.clone(),
                    key: Some(agg.clone().into_bytes()),
                    headers: env.to_headers(),
                    payload: env.encode().unwrap(),
                };
                let pos = broker.publish(msg).await.unwrap();
                position.insert(
                    (topic.clone(), agg.clone(), v),
                    (TopicPartition::new(topic.as_str(), pos.partition), pos.offset),
                );
                expected.insert(agg, VERSIONS);
            }
        }
    }
    let total = position.len();
    let tps: Vec<TopicPartition> =
        topics.iter().flat_map(|t| (0..3).map(move |p| TopicPartition::new(t.as_str(), p))).collect();

    // First run: SIGKILL after a third of the events completed.
    let log1 = temp_path("eventbus-kafka-crash-1");
    let mut first = spawn_child(&brokers, &group, &topics, &log1);
    let mut done_first = 0;
    while done_first < total / 3 {
        first.next_done().await.expect("first consumer process exited early");
        done_first += 1;
    }
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    // Nothing commits for the group until the second process starts.
    let committed = broker.committed_offsets(&group, &tps).await.unwrap();

    // Second run until every event completed in one of the runs.
    let checker = OrderChecker::new();
    let run1 = replay(&log1, &checker);
    let mut completed: BTreeSet<(String, i64)> = run1.completed.keys().map(|(_, a, v)| (a.clone(), *v)).collect();
    let log2 = temp_path("eventbus-kafka-crash-2");
    let mut second = spawn_child(&brokers, &group, &topics, &log2);
    while completed.len() < total {
        let (agg, v) = second.next_done().await.expect("second consumer process exited early");
        completed.insert((agg, v));
    }
    drop(second.child.stdin.take()); // EOF: close cleanly
    let mut closed = None;
    while let Some(line) = second.lines.recv().await {
        if line.starts_with("CLOSED") {
            closed = Some(line);
        }
    }
    let status = second.child.wait().unwrap();
    assert!(status.success(), "second consumer process failed: {status}");
    let closed = closed.expect("the second process closed its bus");
    assert!(closed.contains("commit_error=None"), "{closed}");

    let run2 = replay(&log2, &checker);
    let r = checker.report(&expected);
    // The second process started each partition at the committed frontier:
    // it re-handled nothing below it, and everything it re-handled is above.
    let mut below = Vec::new();
    for (topic, agg, v) in &run2.began {
        let (tp, offset) = &position[&(topic.clone(), agg.clone(), *v)];
        let frontier = committed[tp].unwrap_or(0);
        if *offset < frontier {
            below.push((tp.clone(), *offset, frontier));
        }
    }
    let again = run2.completed.keys().filter(|k| run1.completed.contains_key(k)).count();
    let frontier_total: u64 = committed.values().map(|c| c.unwrap_or(0)).sum();
    eprintln!(
        "tansu crash scenario: sent {total}, handled {} (first run {}, second run {}), duplicates {} (re-handled \
         {again}), violations {}, missing {}, committed frontier at the kill {frontier_total} events, in {:?}",
        r.handled,
        run1.completed.len(),
        run2.completed.len(),
        r.duplicates,
        r.violations,
        r.missing,
        started.elapsed()
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.handled, total as u64);
    assert!(below.is_empty(), "the restarted process re-handled events below the committed frontier: {below:?}");
    assert!(frontier_total > 0, "the first process committed something before it was killed");
    // Every re-handled event lies at or above the frontier (checked above);
    // the second process committed everything when it closed.
    assert_all_committed(&broker, &group, &last_offsets(position.values())).await;
    let _ = std::fs::remove_file(&log1);
    let _ = std::fs::remove_file(&log2);
}
