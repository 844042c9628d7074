//! Issue 13, items 3, 4 and 6 on the memory broker: handler panics (in the
//! synchronous part of the handler or in its future), dead letters the broker
//! does not take, and waits that must not hold a pool worker.
//!
//! Each test records what happened per aggregate and checks the contract:
//! every event ends handled or dead-lettered exactly once, an aggregate's
//! next event starts only after the previous one ended (so after its dead
//! letter was written), the commit never passes an event that has not ended.
#![cfg(not(feature = "loom"))]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use common::recorder::{paused_with_recorder, until};
use common::{fast_config, publish_versions, Progress};
use eventbus::bus::SubscribeError;
use eventbus::consumer::task_headers as dlq;
use eventbus::consumer::ConsumerError;
use eventbus::pool::HandlerResult;
use eventbus::telemetry as t;
use eventbus::{Broker, BrokerError, BusConfig, Envelope, EventBus, MemoryBroker, TopicPartition};
use futures::future::BoxFuture;
use futures::FutureExt;

const INTENTIONAL_PANIC: &str = "intentional test panic";

fn quiet_intentional_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !msg.contains(INTENTIONAL_PANIC) {
                default(info);
            }
        }));
    });
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    headers.iter().rev().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// What the handlers saw, in order: (aggregate, version, attempt outcome).
#[derive(Default)]
struct Log {
    entries: Mutex<Vec<(String, i64, &'static str)>>,
}

impl Log {
    fn push(&self, agg: &str, version: i64, what: &'static str) {
        self.entries.lock().unwrap().push((agg.to_string(), version, what));
    }

    fn of(&self, agg: &str) -> Vec<(i64, &'static str)> {
        self.entries.lock().unwrap().iter().filter(|(a, _, _)| a == agg).map(|(_, v, w)| (*v, *w)).collect()
    }

    /// Versions handled successfully, per aggregate, in handling order.
    fn handled(&self) -> BTreeMap<String, Vec<i64>> {
        let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (a, v, w) in self.entries.lock().unwrap().iter() {
            if *w == "ok" {
                out.entry(a.clone()).or_default().push(*v);
            }
        }
        out
    }
}

/// Item 3: a handler that panics in its synchronous part (the call that
/// builds the future panics) or inside its future is retried, then
/// dead-lettered; the aggregate's next event starts only after that, every
/// other event is handled, and the partition commits to its end.
#[tokio::test(start_paused = true)]
async fn handler_panics_sync_or_async_are_retried_then_dead_lettered_in_order() {
    quiet_intentional_panics();
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", 1).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(fast_config("panics")).build().unwrap();
    let log = Arc::new(Log::default());
    let progress = Arc::new(Progress::default());
    {
        let (log, progress, broker) = (log.clone(), progress.clone(), broker.clone());
        bus.subscribe_envelope("orders", move |env: Envelope| -> BoxFuture<'static, HandlerResult> {
            let (agg, v) = (env.aggregate_id.clone(), env.event_version);
            // The aggregate's v3 starts only once v2's dead letter is stored.
            let dead =
                broker.read_topic("orders.dlq").iter().filter(|d| d.key.as_deref() == Some(agg.as_bytes())).count();
            log.push(&agg, v, if dead > 0 { "start-after-dlq" } else { "start" });
            if agg == "agg-0" && v == 2 {
                log.push(&agg, v, "sync-panic");
                panic!("{INTENTIONAL_PANIC}: synchronous part");
            }
            let (log, progress) = (log.clone(), progress.clone());
            async move {
                if agg == "agg-1" && v == 2 {
                    log.push(&agg, v, "async-panic");
                    tokio::task::yield_now().await;
                    panic!("{INTENTIONAL_PANIC}: inside the future");
                }
                log.push(&agg, v, "ok");
                progress.bump();
                Ok(())
            }
            .boxed()
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    publish_versions(&bus, &["orders"], 4, 3).await;
    // 12 events: 10 handled, 2 dead-lettered.
    progress.wait_for(10).await;
    let tp = TopicPartition::new("orders", 0);
    until(Duration::from_secs(5), || broker.committed("panics", &tp) == Some(12)).await;
    let report = bus.close().await;
    assert_eq!(report.handed_back, 0);

    let dead = broker.read_topic("orders.dlq");
    assert_eq!(dead.len(), 2, "one dead letter per panicking event");
    for d in &dead {
        assert_eq!(header(&d.headers, dlq::DLQ_REASON), Some("handler"));
        assert_eq!(header(&d.headers, dlq::DLQ_ATTEMPTS), Some("3"));
        assert!(header(&d.headers, dlq::DLQ_ERROR).is_some_and(|e| e.contains("handler panicked")), "{d:?}");
    }
    let keys: Vec<&[u8]> = dead.iter().map(|d| d.key.as_deref().unwrap()).collect();
    assert!(keys.contains(&&b"agg-0"[..]) && keys.contains(&&b"agg-1"[..]));
    // Three attempts each, then the next version, which saw the dead letter.
    assert_eq!(
        log.of("agg-0"),
        vec![
            (1, "start"),
            (1, "ok"),
            (2, "start"),
            (2, "sync-panic"),
            (2, "start"),
            (2, "sync-panic"),
            (2, "start"),
            (2, "sync-panic"),
            (3, "start-after-dlq"),
            (3, "ok"),
        ]
    );
    assert_eq!(log.of("agg-1").iter().filter(|(_, w)| *w == "async-panic").count(), 3);
    assert_eq!(log.of("agg-1").last(), Some(&(3, "ok")));
    assert!(log.of("agg-1").contains(&(3, "start-after-dlq")));
    let handled = log.handled();
    assert_eq!(handled["agg-0"], vec![1, 3]);
    assert_eq!(handled["agg-1"], vec![1, 3]);
    assert_eq!(handled["agg-2"], vec![1, 2, 3]);
    assert_eq!(handled["agg-3"], vec![1, 2, 3]);
    println!("sync/async panics: sent 12, handled 10, dead-lettered 2, duplicates 0");
}

/// Item 4: subscribing creates each topic's dead-letter topic with the
/// source's partition count (at start and for a topic added later), unless
/// `consumer.create_dead_letter_topics = false`; a dead-letter topic the
/// broker refuses fails the subscribe with a typed error.
#[tokio::test(start_paused = true)]
async fn subscribing_creates_dead_letter_topics_or_fails_typed() {
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", 4).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(fast_config("dlq-create")).build().unwrap();
    bus.subscribe_envelope("orders", |_e: Envelope| async { Ok(()) }).await.unwrap();
    assert_eq!(broker.partitions("orders.dlq"), None, "created at subscribe (start), not at registration");
    bus.start().await.unwrap();
    assert_eq!(broker.partitions("orders.dlq"), Some(4), "same partition count as the source");
    broker.ensure_topic("payments", 2).await.unwrap();
    bus.subscribe_envelope("payments", |_e: Envelope| async { Ok(()) }).await.unwrap();
    assert_eq!(broker.partitions("payments.dlq"), Some(2), "a topic added after start gets its dead letter too");
    // Refused dead-letter topic for a topic added later: a typed error, and
    // the topic is not subscribed.
    broker.fail_ensure_topic("refunds.dlq", Some(BrokerError::Unauthorized("no create on refunds.dlq".into())));
    let err = bus.subscribe_envelope("refunds", |_e: Envelope| async { Ok(()) }).await.unwrap_err();
    match err {
        SubscribeError::Consumer(ConsumerError::DeadLetterTopic { topic, dead_letter, error }) => {
            assert_eq!((topic.as_str(), dead_letter.as_str()), ("refunds", "refunds.dlq"));
            assert!(matches!(error, BrokerError::Unauthorized(_)), "{error:?}");
        }
        other => panic!("expected a dead-letter-topic error, got {other:?}"),
    }
    bus.close().await;

    // At start: the whole start fails, typed.
    let bus = EventBus::builder(broker.clone()).config(fast_config("dlq-refused")).build().unwrap();
    bus.subscribe_envelope("refunds", |_e: Envelope| async { Ok(()) }).await.unwrap();
    let err = bus.start().await.unwrap_err();
    assert!(
        matches!(&err, SubscribeError::Consumer(ConsumerError::DeadLetterTopic { dead_letter, .. })
            if dead_letter == "refunds.dlq"),
        "{err:?}"
    );
    assert_eq!(broker.members("dlq-refused"), 0, "nothing joined the group");
    bus.close().await;

    // Configured off: nothing is created, the subscribe goes through.
    let mut config = fast_config("dlq-off");
    config.consumer.create_dead_letter_topics = false;
    let bus = EventBus::builder(broker.clone()).config(config).build().unwrap();
    bus.subscribe_envelope("shipments", |_e: Envelope| async { Ok(()) }).await.unwrap();
    bus.start().await.unwrap();
    assert_eq!(broker.partitions("shipments.dlq"), None);
    bus.close().await;
}

/// Config for the stuck-dead-letter tests: one attempt, so the poison event
/// goes to the dead letter at once.
fn stuck_config(group: &str) -> BusConfig {
    let mut config = fast_config(group);
    config.consumer.retry.max_attempts = 1;
    config.consumer.retry.initial_backoff = Duration::from_millis(100);
    config.consumer.retry.max_backoff = Duration::from_secs(2);
    config
}

/// Subscribes "orders" with a handler that fails agg-0 v1 for good and logs
/// everything else.
async fn subscribe_poisoned(bus: &EventBus<MemoryBroker>, log: Arc<Log>, progress: Arc<Progress>) {
    bus.subscribe_envelope("orders", move |env: Envelope| {
        let (log, progress) = (log.clone(), progress.clone());
        async move {
            if env.aggregate_id == "agg-0" && env.event_version == 1 {
                log.push(&env.aggregate_id, env.event_version, "poison");
                return Err("poison".into());
            }
            log.push(&env.aggregate_id, env.event_version, "ok");
            progress.bump();
            Ok(())
        }
    })
    .await
    .unwrap();
}

/// Item 4: a dead letter the broker refuses (not authorised) keeps the event
/// in place: agg-0's later events wait, the commit stops at it, `health()` is
/// not ready, the stuck gauge is 1 and failed writes are counted by error
/// kind, while every other aggregate flows. Once the broker takes it, the
/// dead letter is written once, agg-0 goes on in order and the partition
/// commits to its end.
#[test]
fn refused_dead_letter_keeps_the_event_in_place_until_written() {
    paused_with_recorder(|values| async move {
        let broker = MemoryBroker::default();
        broker.ensure_topic("orders", 1).await.unwrap();
        let bus = EventBus::builder(broker.clone()).config(stuck_config("stuck")).build().unwrap();
        let (log, progress) = (Arc::new(Log::default()), Arc::new(Progress::default()));
        subscribe_poisoned(&bus, log.clone(), progress.clone()).await;
        bus.start().await.unwrap();
        broker.fail_publishes("orders.dlq", Some(BrokerError::Unauthorized("write denied on orders.dlq".into())));
        // agg-0..agg-9, 3 versions each: offset 0 is agg-0 v1 (poison).
        publish_versions(&bus, &["orders"], 10, 3).await;
        // Everything but agg-0 flows: 27 events.
        progress.wait_for(27).await;
        // Let a minute of (virtual) retries pass.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(log.of("agg-0"), vec![(1, "poison")], "agg-0's later events wait");
        let tp = TopicPartition::new("orders", 0);
        assert_eq!(broker.committed("stuck", &tp), Some(0), "the commit does not pass the stuck event");
        let health = bus.health();
        assert!(!health.ready(), "not ready while a dead letter is stuck: {health:?}");
        assert_eq!(health.dead_letters_stuck, 1);
        assert_eq!(values.gauge_or_zero(t::DEAD_LETTER_STUCK, &[("topic", "orders")]), 1.0);
        let failed = values.counter_or_zero(t::DEAD_LETTER_FAILED, &[("topic", "orders"), ("error", "unauthorized")]);
        // Capped backoff 100 ms .. 2 s: about 35 tries in 60 s, not a hot loop.
        assert!((5..=60).contains(&failed), "{failed} failed writes in 60 s");
        assert!(broker.read_topic("orders.dlq").is_empty());

        broker.fail_publishes("orders.dlq", None);
        progress.wait_for(29).await;
        until(Duration::from_secs(10), || broker.committed("stuck", &tp) == Some(30)).await;
        assert_eq!(log.of("agg-0"), vec![(1, "poison"), (2, "ok"), (3, "ok")]);
        let dead = broker.read_topic("orders.dlq");
        assert_eq!(dead.len(), 1, "written once");
        assert_eq!(header(&dead[0].headers, dlq::DLQ_ORIGIN_OFFSET), Some("0"));
        assert!(!dead[0].payload.is_empty(), "the payload is kept (only a Refused write drops it)");
        let health = bus.health();
        assert!(health.ready(), "{health:?}");
        assert_eq!(health.dead_letters_stuck, 0);
        assert_eq!(values.gauge_or_zero(t::DEAD_LETTER_STUCK, &[("topic", "orders")]), 0.0);
        let report = bus.close().await;
        assert_eq!(report.handed_back, 0);
        println!("refused dead letter: sent 30, handled 29, dead-lettered 1, duplicates 0, failed writes {failed}");
    });
}

/// Item 4: `close` with its timeout hands a stuck dead letter back instead
/// of hanging; it stays uncommitted, and the next consumer dead-letters it
/// (once) when the broker takes it.
#[tokio::test(start_paused = true)]
async fn close_hands_back_a_stuck_dead_letter() {
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", 1).await.unwrap();
    let mut config = stuck_config("handback");
    config.close_timeout = Some(Duration::from_millis(500));
    let bus = EventBus::builder(broker.clone()).config(config.clone()).build().unwrap();
    let (log, progress) = (Arc::new(Log::default()), Arc::new(Progress::default()));
    subscribe_poisoned(&bus, log.clone(), progress.clone()).await;
    bus.start().await.unwrap();
    broker.fail_publishes("orders.dlq", Some(BrokerError::Other("unmapped broker error".into())));
    publish_versions(&bus, &["orders"], 5, 2).await;
    progress.wait_for(8).await;
    let report = tokio::time::timeout(Duration::from_secs(5), bus.close()).await.expect("close does not hang");
    assert_eq!(report.handed_back, 2, "the stuck event and agg-0 v2 behind it");
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(broker.committed("handback", &tp), Some(0));
    assert!(broker.read_topic("orders.dlq").is_empty());

    broker.fail_publishes("orders.dlq", None);
    let bus = EventBus::builder(broker.clone()).config(config).build().unwrap();
    subscribe_poisoned(&bus, log.clone(), progress.clone()).await;
    bus.start().await.unwrap();
    // Redelivered from offset 0: 8 duplicates of handled events, agg-0 v2 new.
    progress.wait_for(8 + 8 + 1).await;
    until(Duration::from_secs(10), || broker.committed("handback", &tp) == Some(10)).await;
    bus.close().await;
    assert_eq!(broker.read_topic("orders.dlq").len(), 1);
    assert_eq!(log.of("agg-0"), vec![(1, "poison"), (1, "poison"), (2, "ok")]);
    println!("stuck dead letter at close: sent 10, handled 9 (+8 redelivered), dead-lettered 1, handed back 2");
}

/// Item 6: waiting does not hold a worker. 16 aggregates fail every attempt
/// with an hour of backoff between attempts, on 4 workers; the 200 events of
/// the other aggregates all complete while the 16 are still waiting (their
/// keys held, their first attempt made), then the 16 end in the dead letter.
#[tokio::test(start_paused = true)]
async fn failing_aggregates_waiting_for_retries_do_not_hold_workers() {
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", 4).await.unwrap();
    let mut config = fast_config("parked");
    config.pool.concurrency = 4;
    // Few commit ticks over the simulated hours.
    config.consumer.commit_interval = Duration::from_secs(1);
    config.consumer.retry.max_attempts = 3;
    config.consumer.retry.initial_backoff = Duration::from_secs(3600);
    config.consumer.retry.max_backoff = Duration::from_secs(3600);
    let bus = EventBus::builder(broker.clone()).config(config).build().unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let progress = Arc::new(Progress::default());
    {
        let (attempts, progress) = (attempts.clone(), progress.clone());
        bus.subscribe_envelope("orders", move |env: Envelope| {
            let (attempts, progress) = (attempts.clone(), progress.clone());
            async move {
                if env.aggregate_id.starts_with("bad-") {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    return Err("always fails".into());
                }
                progress.bump();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    let started = tokio::time::Instant::now();
    for i in 0..16 {
        let env = Envelope::new(format!("bad-{i}"), "Failed", 1, &serde_json::json!({})).unwrap();
        bus.publish_envelope("orders", &env).await.unwrap();
    }
    publish_versions(&bus, &["orders"], 100, 2).await;
    progress.wait_for(200).await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3600), "the others finished before any retry was due ({waited:?})");
    assert_eq!(attempts.load(Ordering::SeqCst), 16, "each failing aggregate made its first attempt only");
    let stats = bus.pool_stats();
    assert_eq!(stats.in_flight, 16, "the 16 hold their keys (counted in flight) without holding a worker");
    // Then, after their two retries (virtual hours), all 16 are dead-lettered.
    tokio::time::sleep(Duration::from_secs(2 * 3600 + 60)).await;
    assert_eq!(broker.read_topic("orders.dlq").len(), 16);
    assert_eq!(attempts.load(Ordering::SeqCst), 48);
    let report = bus.close().await;
    assert_eq!(report.handed_back, 0);
    println!("parked retries: sent 216, handled 200, dead-lettered 16, duplicates 0; others done after {waited:?}");
}
