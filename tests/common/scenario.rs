//! Helpers shared by the real-broker tests (`tests/kafka.rs`,
//! `tests/kafka_tansu.rs`, `tests/nats.rs`), generic over the broker: names,
//! tracing, the bus configuration, completion progress, checked handlers,
//! publishing, and the seed's scenario.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::bus::BusConfig;
use eventbus::consumer::ConsumerConfig;
use eventbus::pool::{HandlerResult, PoolConfig};
use eventbus::testing::OrderChecker;
use eventbus::{Broker, Delivery, Envelope, EventBus, Outbound, Position, TopicPartition};
use tokio::sync::{mpsc, watch};

/// A topic or group name with a random suffix, so reruns do not collide.
pub fn unique(prefix: &str) -> String {
    format!("ebt-{prefix}-{:08x}", rand::random::<u32>())
}

/// Logs to stderr when `RUST_LOG` is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// A large pool, commits every 100 ms, 20 s to close.
pub fn bus_config(group: &str) -> BusConfig {
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

pub fn event(agg: &str, version: i64) -> Envelope {
    Envelope::new(agg, "Updated", version, &serde_json::json!({ "v": version })).unwrap()
}

/// `env` as a broker message, keyed by `key`.
pub fn outbound(topic: &str, key: Option<&str>, env: &Envelope) -> Outbound {
    Outbound {
        topic: topic.to_string(),
        key: key.map(|k| k.as_bytes().to_vec()),
        headers: env.to_headers(),
        payload: env.encode().unwrap(),
    }
}

/// Completions per (aggregate, version), and a watch of how many distinct
/// ones completed.
#[derive(Clone)]
pub struct Progress {
    done: Arc<Mutex<BTreeMap<(String, i64), u32>>>,
    tx: Arc<watch::Sender<usize>>,
}

impl Progress {
    pub fn new() -> (Progress, watch::Receiver<usize>) {
        let (tx, rx) = watch::channel(0);
        (Progress { done: Arc::default(), tx: Arc::new(tx) }, rx)
    }

    pub fn completed(&self, agg: &str, version: i64) {
        let n = {
            let mut done = self.done.lock().unwrap();
            *done.entry((agg.to_string(), version)).or_default() += 1;
            done.len()
        };
        self.tx.send_replace(n);
    }

    /// (aggregate, version) handled more than once.
    pub fn duplicates(&self) -> Vec<(String, i64)> {
        self.done.lock().unwrap().iter().filter(|(_, n)| **n > 1).map(|(k, _)| k.clone()).collect()
    }
}

pub async fn wait_for(rx: &mut watch::Receiver<usize>, target: usize, limit: Duration, what: &str) {
    let reached = tokio::time::timeout(limit, rx.wait_for(|n| *n >= target)).await.is_ok();
    assert!(reached, "{what}: only {} of {target} events completed within {limit:?}", *rx.borrow());
}

/// What a handler run dropped before it completed (its runtime was dropped:
/// a crash) leaves in the checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Nothing: the run stays running, so a later start of the aggregate is
    /// a violation.
    StaysRunning,
    /// The run is marked failed.
    Fails,
}

/// Marks a handler run as failed in the checker if it is dropped before it
/// completed.
struct Running {
    checker: Option<Arc<OrderChecker>>,
    agg: String,
    version: i64,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(checker) = self.checker.take() {
            checker.fail(&self.agg, self.version);
        }
    }
}

/// An envelope handler that records begin/complete in the checker, with a
/// little simulated work.
pub fn checked_handler(
    checker: Arc<OrderChecker>,
    progress: Progress,
    work: Duration,
    dropped: Dropped,
) -> impl Fn(Envelope) -> futures::future::BoxFuture<'static, HandlerResult> + Send + Sync + 'static {
    move |env: Envelope| {
        let checker = checker.clone();
        let progress = progress.clone();
        Box::pin(async move {
            checker.begin(&env.aggregate_id, env.event_version);
            let mut running = Running {
                checker: (dropped == Dropped::Fails).then(|| checker.clone()),
                agg: env.aggregate_id.clone(),
                version: env.event_version,
            };
            if !work.is_zero() {
                tokio::time::sleep(work).await; // simulated handler work
            }
            running.checker = None;
            checker.complete(&env.aggregate_id, env.event_version);
            progress.completed(&env.aggregate_id, env.event_version);
            Ok(())
        })
    }
}

/// A handler that sends what it is given to `tx`.
fn forward<T: Send + 'static>(
    tx: mpsc::UnboundedSender<T>,
) -> impl Fn(T) -> std::future::Ready<HandlerResult> + Send + Sync + 'static {
    move |item| {
        tx.send(item).unwrap();
        std::future::ready(Ok(()))
    }
}

/// Subscribes `topic` with a handler that sends each envelope to the
/// returned channel.
pub async fn envelopes_to_channel<B: Broker>(bus: &EventBus<B>, topic: &str) -> mpsc::UnboundedReceiver<Envelope> {
    let (tx, rx) = mpsc::unbounded_channel();
    bus.subscribe_envelope(topic, forward(tx)).await.unwrap();
    rx
}

/// Subscribes `topic` with a raw handler that sends each delivery to the
/// returned channel.
pub async fn deliveries_to_channel<B: Broker>(bus: &EventBus<B>, topic: &str) -> mpsc::UnboundedReceiver<Delivery> {
    let (tx, rx) = mpsc::unbounded_channel();
    bus.subscribe(topic, forward(tx)).await.unwrap();
    rx
}

/// A started bus on `broker` with the envelopes of `topic` and the raw
/// deliveries of `raw_topic` sent to the returned channels.
pub async fn started_with_channels<B: Broker>(
    broker: B,
    config: BusConfig,
    topic: &str,
    raw_topic: &str,
) -> (EventBus<B>, mpsc::UnboundedReceiver<Envelope>, mpsc::UnboundedReceiver<Delivery>) {
    let bus = EventBus::builder(broker).config(config).build().unwrap();
    let env_rx = envelopes_to_channel(&bus, topic).await;
    let raw_rx = deliveries_to_channel(&bus, raw_topic).await;
    bus.start().await.unwrap();
    (bus, env_rx, raw_rx)
}

/// Subscribing after start adds `late_topic` to the running session: an
/// event published to it is delivered within `limit`. Returns its position.
pub async fn late_subscription_delivers<B: Broker>(bus: &EventBus<B>, late_topic: &str, limit: Duration) -> Position {
    let mut late_rx = envelopes_to_channel(bus, late_topic).await;
    let late = event("order-2", 1);
    let late_pos = bus.publish_envelope(late_topic, &late).await.unwrap();
    let got = recv_within(&mut late_rx, limit, "late topic delivered").await;
    assert_eq!(got, late);
    late_pos
}

/// Closes `bus`: the final commit succeeded, and the consumer delivered
/// `delivered` messages and skipped no redelivery.
pub async fn close_cleanly<B: Broker>(bus: EventBus<B>, delivered: u64) {
    let stats = bus.consumer_stats().await.unwrap();
    let report = bus.close().await;
    assert_eq!(report.final_commit_error, None);
    assert_eq!(stats.delivered.load(Ordering::Relaxed), delivered);
    assert_eq!(stats.redelivered_skipped.load(Ordering::Relaxed), 0);
}

/// The next item of `rx`, failing the test with `what` after `limit`.
pub async fn recv_within<T>(rx: &mut mpsc::UnboundedReceiver<T>, limit: Duration, what: &str) -> T {
    tokio::time::timeout(limit, rx.recv()).await.expect(what).unwrap()
}

/// Aggregates `agg{a}` spread over `topics` (a % topics), as (topic,
/// aggregate), and each one's last version.
pub fn spread_aggregates(
    topics: &[String],
    aggregates: usize,
    versions: i64,
) -> (Vec<(String, String)>, BTreeMap<String, i64>) {
    with_last_version((0..aggregates).map(|a| (topics[a % topics.len()].clone(), format!("agg{a}"))), versions)
}

/// `aggregates` aggregates `t{t}-agg{a}` on each topic, as (topic,
/// aggregate), and each one's last version.
pub fn aggregates_per_topic(
    topics: &[String],
    aggregates: usize,
    versions: i64,
) -> (Vec<(String, String)>, BTreeMap<String, i64>) {
    let pairs = topics
        .iter()
        .enumerate()
        .flat_map(|(t, topic)| (0..aggregates).map(move |a| (topic.clone(), format!("t{t}-agg{a}"))));
    with_last_version(pairs, versions)
}

fn with_last_version(
    pairs: impl Iterator<Item = (String, String)>,
    versions: i64,
) -> (Vec<(String, String)>, BTreeMap<String, i64>) {
    let pairs: Vec<(String, String)> = pairs.collect();
    let expected = pairs.iter().map(|(_, agg)| (agg.clone(), versions)).collect();
    (pairs, expected)
}

/// Where each (aggregate, version) was published.
pub type Positions = Arc<Mutex<BTreeMap<(String, i64), (TopicPartition, u64)>>>;

/// Publishes versions `from..=to` of each aggregate (one task per aggregate,
/// versions in order), retrying a failed publish up to `max_retries` times
/// per aggregate, recording positions. Returns the retries.
pub async fn publish_range<B: Broker>(
    bus: &Arc<EventBus<B>>,
    aggregates: &[(String, String)],
    from: i64,
    to: i64,
    positions: &Positions,
    max_retries: usize,
) -> usize {
    let mut tasks = Vec::new();
    for (topic, agg) in aggregates {
        let (bus, topic, agg, positions) = (bus.clone(), topic.clone(), agg.clone(), positions.clone());
        tasks.push(tokio::spawn(async move {
            let mut retries = 0;
            for v in from..=to {
                let pos: Position = loop {
                    match bus.publish_envelope(&topic, &event(&agg, v)).await {
                        Ok(p) => break p,
                        Err(e) => {
                            retries += 1;
                            assert!(retries <= max_retries, "publish keeps failing: {e}");
                        }
                    }
                };
                positions
                    .lock()
                    .unwrap()
                    .insert((agg.clone(), v), (TopicPartition::new(topic.as_str(), pos.partition), pos.offset));
            }
            retries
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    retries
}

/// The seed's scenario: `aggregates` aggregates on each of `topics`,
/// versions `1..=versions` each, published concurrently (versions of one
/// aggregate in order) to a bus with a checked handler on every topic.
pub struct Seed<'a> {
    /// Starts the summary line on stderr.
    pub label: &'a str,
    pub topics: &'a [String],
    pub aggregates: usize,
    pub versions: i64,
    /// How long all events may take to complete.
    pub limit: Duration,
    /// Publish retries allowed per aggregate.
    pub max_publish_retries: usize,
    pub dropped: Dropped,
}

impl Seed<'_> {
    /// Runs the scenario on `bus` (not started; the topics exist as far as
    /// the broker needs) and closes it. Asserts every event was handled once,
    /// in order, and the final commit succeeded. Returns each event's
    /// position.
    pub async fn run<B: Broker>(&self, bus: EventBus<B>) -> BTreeMap<(String, i64), (TopicPartition, u64)> {
        let started = Instant::now();
        let bus = Arc::new(bus);
        let checker = Arc::new(OrderChecker::new());
        let (progress, mut done) = Progress::new();
        for topic in self.topics {
            let handler = checked_handler(checker.clone(), progress.clone(), Duration::from_micros(300), self.dropped);
            bus.subscribe_envelope(topic, handler).await.unwrap();
        }
        bus.start().await.unwrap();

        let (aggregates, expected) = aggregates_per_topic(self.topics, self.aggregates, self.versions);
        let positions = Positions::default();
        publish_range(&bus, &aggregates, 1, self.versions, &positions, self.max_publish_retries).await;
        let total = self.topics.len() * self.aggregates * self.versions as usize;
        wait_for(&mut done, total, self.limit, "seed scenario").await;
        let stats = bus.consumer_stats().await.unwrap();
        let report = bus.close().await;
        let r = checker.report(&expected);
        eprintln!(
            "{}: sent {total}, handled {}, duplicates {}, violations {}, missing {}, redelivered {}, in {:?}",
            self.label,
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
        let positions = positions.lock().unwrap().clone();
        positions
    }
}

/// Events published by [`publish_traced`]: by (aggregate, version), the
/// envelope and the position the broker returned.
pub type Traced = BTreeMap<(String, i64), (Envelope, Position)>;

/// Registers an ordered handler on `topic` that forwards every envelope with
/// its delivery context.
pub async fn forward_contexts<B: Broker>(
    bus: &EventBus<B>,
    topic: &str,
) -> mpsc::UnboundedReceiver<(Envelope, eventbus::DeliveryContext)> {
    let (tx, rx) = mpsc::unbounded_channel();
    bus.subscribe_ordered(topic, move |env, ctx| {
        tx.send((env, ctx)).unwrap();
        std::future::ready(Ok(()))
    })
    .await
    .unwrap();
    rx
}

/// Publishes versions 1..=`versions` of aggregates `order-0..aggregates`, each
/// with a trace ID and a correlation ID.
pub async fn publish_traced<B: Broker>(bus: &EventBus<B>, topic: &str, aggregates: usize, versions: i64) -> Traced {
    let mut published = BTreeMap::new();
    for v in 1..=versions {
        for a in 0..aggregates {
            let id = format!("order-{a}");
            let env = event(&id, v).with_trace_id(format!("t-{a}-{v}")).with_correlation_id(format!("c-{a}"));
            let pos = bus.publish_envelope(topic, &env).await.unwrap();
            published.insert((id, v), (env, pos));
        }
    }
    published
}
