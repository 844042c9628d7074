//! The bus's metrics on the memory broker, read from a recorder of the test's
//! own.
//!
//! Each test has its own recorder, installed thread-locally
//! (`metrics::with_local_recorder`) around a current-thread runtime: every
//! handle the bus registers is registered from that thread, so tests running
//! in parallel cannot see each other's numbers, and every count is exact.
//! The recorder is a `metrics_util` registry read without resetting it
//! (`DebuggingRecorder` snapshots drain counters and gauges, so a test could
//! not poll a gauge).
#![cfg(not(feature = "loom"))]

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fast_config, Progress};
use eventbus::broker::memory::MemorySession;
use eventbus::telemetry as t;
use eventbus::{
    Broker, BrokerError, Delivery, Envelope, EventBus, MemoryBroker, Outbound, PartitionLag, Position, Session,
    SessionEvent, TopicPartition,
};
use common::recorder::{key, run_with_recorder, Values};
use tokio::sync::Notify;

/// Runs `test` on a current-thread runtime with a recorder of its own.
fn with_recorder<F: Future<Output = ()>>(test: impl FnOnce(Values) -> F) {
    run_with_recorder(false, test)
}

impl Values {
    /// Label order matters to `Key` equality: pass labels in the order the
    /// bus registers them (`topic` first).
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let handles = self.0.get_counter_handles();
        let c = handles.get(&key(name, labels)).unwrap_or_else(|| panic!("no counter {name} {labels:?}"));
        c.load(Ordering::SeqCst)
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let handles = self.0.get_gauge_handles();
        let g = handles.get(&key(name, labels)).unwrap_or_else(|| panic!("no gauge {name} {labels:?}"));
        f64::from_bits(g.load(Ordering::SeqCst))
    }

    fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        let handles = self.0.get_histogram_handles();
        handles.get(&key(name, labels)).unwrap_or_else(|| panic!("no histogram {name} {labels:?}")).data().len()
    }

    /// Counter series of `name` (any labels).
    fn counter_series(&self, name: &str) -> usize {
        self.0.get_counter_handles().keys().filter(|k| k.name() == name).count()
    }
}

/// Waits (bounded) until `cond` holds.
async fn wait_until(values: &Values, what: &str, cond: impl Fn(&Values) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if cond(values) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not reached within 10 s");
        tokio::time::sleep(Duration::from_millis(2)).await; // polling interval of the condition
    }
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f).await.unwrap_or_else(|_| panic!("{what}: timed out"))
}

fn event(agg: &str, version: i64) -> Envelope {
    Envelope::new(agg, "Updated", version, &serde_json::json!({ "v": version })).unwrap()
}

// ---------------------------------------------------------------------------
// A memory broker with planted faults: a topic that refuses publishes, one
// redelivery of a chosen event within its assignment, failing commits.

const REFUSED: &str = "refused";

#[derive(Clone)]
struct Faulty {
    inner: MemoryBroker,
    /// (aggregate, version) delivered twice in a row.
    repeat: (&'static str, i64),
    /// Commits to fail before they succeed.
    failing_commits: Arc<AtomicU32>,
}

struct FaultySession {
    inner: MemorySession,
    repeat: Option<(&'static str, i64)>,
    again: Option<Delivery>,
    failing_commits: Arc<AtomicU32>,
}

impl Broker for Faulty {
    type Session = FaultySession;

    async fn publish(&self, msg: Outbound) -> Result<Position, BrokerError> {
        if msg.topic == REFUSED {
            return Err(BrokerError::Unavailable("planted".into()));
        }
        self.inner.publish(msg).await
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<FaultySession, BrokerError> {
        Ok(FaultySession {
            inner: self.inner.subscribe(group, topics).await?,
            repeat: Some(self.repeat),
            again: None,
            failing_commits: self.failing_commits.clone(),
        })
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        self.inner.ensure_topic(topic, partitions).await
    }
}

impl Session for FaultySession {
    async fn next(&mut self) -> Result<SessionEvent, BrokerError> {
        if let Some(d) = self.again.take() {
            return Ok(SessionEvent::Message(Delivery { attempt: d.attempt + 1, ..d }));
        }
        let ev = self.inner.next().await?;
        if let (SessionEvent::Message(d), Some((agg, version))) = (&ev, self.repeat) {
            if Envelope::decode(&d.payload).is_ok_and(|e| e.aggregate_id == agg && e.event_version == version) {
                self.repeat = None;
                self.again = Some(d.clone());
            }
        }
        Ok(ev)
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<(), BrokerError> {
        let failing = self.failing_commits.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(BrokerError::Unavailable("planted commit failure".into()));
        }
        self.inner.commit(offsets).await
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

/// 20 aggregates × 5 versions on one topic of 3 partitions, plus one
/// undecodable message: two events fail once, one always fails (dead
/// letter), one is redelivered, the first commit fails, one publish is
/// refused and one envelope is invalid. Every number is known.
#[test]
fn a_known_workload_gives_exact_counts() {
    with_recorder(|values| async move {
        const TOPIC: &str = "orders";
        let memory = MemoryBroker::default();
        memory.ensure_topic(TOPIC, 3).await.unwrap();
        let broker =
            Faulty { inner: memory.clone(), repeat: ("agg-0", 1), failing_commits: Arc::new(AtomicU32::new(1)) };
        let bus = EventBus::builder(broker).config(fast_config("metrics")).build().unwrap();
        let progress = Arc::new(Progress::default());
        let failed_once: Arc<Mutex<BTreeSet<(String, i64)>>> = Arc::default();
        {
            let (progress, failed_once) = (progress.clone(), failed_once.clone());
            bus.subscribe_envelope(TOPIC, move |env: Envelope| {
                let (progress, failed_once) = (progress.clone(), failed_once.clone());
                async move {
                    let id = (env.aggregate_id.clone(), env.event_version);
                    let flaky = id == ("agg-1".into(), 2) || id == ("agg-2".into(), 3);
                    if flaky && failed_once.lock().unwrap().insert(id.clone()) {
                        return Err("transient".into());
                    }
                    if id == ("agg-3".into(), 4) {
                        return Err("poison".into());
                    }
                    progress.bump();
                    Ok(())
                }
            })
            .await
            .unwrap();
        }
        bus.start().await.unwrap();
        for v in 1..=5 {
            for a in 0..20 {
                bus.publish_envelope(TOPIC, &event(&format!("agg-{a}"), v)).await.unwrap();
            }
        }
        bus.publish(TOPIC, Some(b"agg-99"), Vec::new(), b"not an envelope".to_vec()).await.unwrap();
        assert!(bus.publish(REFUSED, None, Vec::new(), b"x".to_vec()).await.is_err());
        let mut invalid = event("agg-0", 6);
        invalid.event_version = 0;
        assert!(bus.publish_envelope(TOPIC, &invalid).await.is_err());

        bounded("handled", progress.wait_for(99)).await;
        let dlq = format!("{TOPIC}.dlq");
        wait_until(&values, "two dead letters", |s| {
            s.counter(t::DEAD_LETTERED, &[("topic", TOPIC), ("reason", "handler")])
                + s.counter(t::DEAD_LETTERED, &[("topic", TOPIC), ("reason", "decode")])
                == 2
        })
        .await;
        let report = bus.close().await;
        assert_eq!(report.final_commit_error, None);
        assert_eq!(memory.read_topic(&dlq).len(), 2);

        let s = &values;
        let topic = [("topic", TOPIC)];
        assert_eq!(s.counter(t::PUBLISHED, &topic), 101);
        assert_eq!(s.counter(t::PUBLISH_FAILED, &[("topic", REFUSED), ("error", "unavailable")]), 1);
        assert_eq!(s.counter(t::PUBLISH_FAILED, &[("topic", TOPIC), ("error", "envelope")]), 1);
        assert_eq!(s.counter_series(t::PUBLISH_FAILED), 2);
        assert_eq!(s.counter(t::HANDLED, &topic), 99, "100 events, one of them poison");
        assert_eq!(s.counter(t::FAILED, &topic), 2 + 3, "two fail once, the poison three times");
        assert_eq!(s.counter(t::RETRIED, &topic), 2 + 2);
        assert_eq!(s.counter(t::DEAD_LETTERED, &[("topic", TOPIC), ("reason", "handler")]), 1);
        assert_eq!(s.counter(t::DEAD_LETTERED, &[("topic", TOPIC), ("reason", "decode")]), 1);
        assert_eq!(s.counter(t::DUPLICATES, &topic), 1);
        assert_eq!(s.histogram_count(t::HANDLE_SECONDS, &topic), 100, "every event whose handler ran, once");
        assert_eq!(s.counter(t::COMMIT_ERRORS, &[]), 1);
        assert_eq!(s.counter(t::REBALANCES, &[]), 1, "one assignment");
        for p in ["0", "1", "2"] {
            assert_eq!(s.gauge(t::COMMIT_LAG, &[("topic", TOPIC), ("partition", p)]), 0.0, "partition {p}");
        }

        // The broker's view: everything (100 events and the undecodable one)
        // committed.
        let lag = memory.consumer_lag("metrics", &[TOPIC.to_string()]).await.unwrap();
        assert_eq!(lag.len(), 3);
        assert_eq!(lag.iter().map(|l| l.end_offset).sum::<u64>(), 101);
        assert!(lag.iter().all(|l| l.lag() == 0), "{lag:?}");
    });
}

/// A stuck event holds the frontier: the events after it are handled but
/// not committed, and the gauge says how many; once it completes, the
/// commit covers them and the gauge returns to 0.
#[test]
fn commit_lag_counts_handled_events_behind_a_stuck_one() {
    with_recorder(|values| async move {
        const TOPIC: &str = "stuck";
        let broker = MemoryBroker::default();
        broker.ensure_topic(TOPIC, 1).await.unwrap();
        let bus = EventBus::builder(broker.clone()).config(fast_config("lag")).build().unwrap();
        let release = Arc::new(Notify::new());
        let progress = Arc::new(Progress::default());
        {
            let (release, progress) = (release.clone(), progress.clone());
            bus.subscribe_envelope(TOPIC, move |env: Envelope| {
                let (release, progress) = (release.clone(), progress.clone());
                async move {
                    if env.aggregate_id == "agg-0" {
                        release.notified().await;
                    }
                    progress.bump();
                    Ok(())
                }
            })
            .await
            .unwrap();
        }
        bus.start().await.unwrap();
        for a in 0..10 {
            bus.publish_envelope(TOPIC, &event(&format!("agg-{a}"), 1)).await.unwrap();
        }
        let labels = [("topic", TOPIC), ("partition", "0")];
        bounded("nine handled", progress.wait_for(9)).await;
        wait_until(&values, "commit lag 9", |s| s.gauge(t::COMMIT_LAG, &labels) == 9.0).await;
        assert_eq!(broker.committed("lag", &TopicPartition::new(TOPIC, 0)).unwrap_or(0), 0);
        let lag = broker.consumer_lag("lag", &[TOPIC.to_string()]).await.unwrap();
        assert_eq!(lag, vec![PartitionLag { partition: TopicPartition::new(TOPIC, 0), end_offset: 10, committed: 0 }]);

        release.notify_one();
        bounded("all handled", progress.wait_for(10)).await;
        wait_until(&values, "commit lag 0", |s| s.gauge(t::COMMIT_LAG, &labels) == 0.0).await;
        assert_eq!(broker.committed("lag", &TopicPartition::new(TOPIC, 0)), Some(10));
        bus.close().await;
        assert_eq!(broker.consumer_lag("lag", &[TOPIC.to_string()]).await.unwrap()[0].lag(), 0);
    });
}

/// The memory broker's consumer lag from a known state: a session that
/// read and committed part of each partition.
#[test]
fn memory_broker_consumer_lag_from_a_known_state() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let broker = MemoryBroker::default();
        broker.ensure_topic("a", 2).await.unwrap();
        for i in 0..10u8 {
            let msg = Outbound { topic: "a".into(), key: Some(vec![b'k', i]), headers: Vec::new(), payload: vec![i] };
            broker.publish(msg).await.unwrap();
        }
        let ends: Vec<u64> = (0..2).map(|p| broker.end_offset(&TopicPartition::new("a", p))).collect();
        assert_eq!(ends.iter().sum::<u64>(), 10);
        // Nothing committed: the whole partition is lag; an unknown topic has none.
        let lag = broker.consumer_lag("g", &["a".to_string(), "missing".to_string()]).await.unwrap();
        assert_eq!(lag.iter().map(|l| (l.partition.partition, l.end_offset, l.committed)).collect::<Vec<_>>(), vec![
            (0, ends[0], 0),
            (1, ends[1], 0)
        ]);
        let mut session = broker.subscribe("g", &["a".to_string()]).await.unwrap();
        let commit = vec![(TopicPartition::new("a", 0), 1), (TopicPartition::new("a", 1), ends[1])];
        // Commit once the assignment arrived (only the owner may commit).
        loop {
            if let SessionEvent::Assigned(_) = bounded("assignment", session.next()).await.unwrap() {
                break;
            }
        }
        session.commit(&commit).await.unwrap();
        let lag = broker.consumer_lag("g", &["a".to_string()]).await.unwrap();
        assert_eq!(lag.iter().map(PartitionLag::lag).collect::<Vec<_>>(), vec![ends[0] - 1, 0]);
        session.close().await.unwrap();
    });
}
