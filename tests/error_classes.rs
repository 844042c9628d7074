//! Issue 13, item 5: every broker error has a class (`BrokerError::class`),
//! and the consumer reacts to each class the same way wherever it meets it:
//!
//! - retriable: capped exponential backoff, then the same call again;
//! - permanent: the same backoff, plus a metric and an error log; never
//!   given up when giving up would lose data (a dead letter stays in place);
//! - fatal: the session is rebuilt (rejoin through the broker, everything of
//!   the old session fenced as lost), `health()` not ready meanwhile.
//!
//! One test per class, on the memory broker with injected failures and a
//! paused clock.
#![cfg(not(feature = "loom"))]

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::recorder::{paused_with_recorder, until};
use common::{fast_config, publish_versions, Progress};
use eventbus::telemetry as t;
use eventbus::{Broker, BrokerError, Envelope, ErrorClass, EventBus, MemoryBroker, TopicPartition};

/// Handled (aggregate, version) pairs, in handling order.
type Seen = Arc<Mutex<Vec<(String, i64)>>>;

async fn subscribe_recording(bus: &EventBus<MemoryBroker>, topic: &str, seen: Seen, progress: Arc<Progress>) {
    bus.subscribe_envelope(topic, move |env: Envelope| {
        let (seen, progress) = (seen.clone(), progress.clone());
        async move {
            if env.aggregate_id == "poison" {
                return Err("poison".into());
            }
            seen.lock().unwrap().push((env.aggregate_id.clone(), env.event_version));
            progress.bump();
            Ok(())
        }
    })
    .await
    .unwrap();
}

/// Per aggregate, versions must rise (duplicates may repeat a suffix, never
/// go below what came before them in a fresh run: we check every version is
/// seen and the first occurrences are in order). Returns the duplicates.
fn check_order(seen: &[(String, i64)], aggregates: usize, versions: i64) -> usize {
    let mut duplicates = 0;
    for a in 0..aggregates {
        let id = format!("agg-{a}");
        let vs: Vec<i64> = seen.iter().filter(|(x, _)| *x == id).map(|(_, v)| *v).collect();
        let mut next = 1;
        for v in &vs {
            if *v == next {
                next += 1;
            } else {
                assert!(*v < next, "{id}: version {v} before {next} in {vs:?}");
                duplicates += 1;
            }
        }
        assert_eq!(next, versions + 1, "{id}: every version handled: {vs:?}");
    }
    duplicates
}

/// The table itself: each variant's class, and the metric label of its kind.
#[test]
fn class_table_covers_every_variant() {
    let s = || "x".to_string();
    let table = [
        (BrokerError::Unavailable(s()), ErrorClass::Retriable, "unavailable"),
        (BrokerError::Timeout(s()), ErrorClass::Retriable, "timeout"),
        (BrokerError::Full(s()), ErrorClass::Retriable, "full"),
        (BrokerError::UnknownTopic(s()), ErrorClass::Permanent, "unknown_topic"),
        (BrokerError::Config { key: s(), reason: s() }, ErrorClass::Permanent, "config"),
        (BrokerError::CommitRejected { partition: s(), reason: s() }, ErrorClass::Permanent, "commit_rejected"),
        (BrokerError::Unauthorized(s()), ErrorClass::Permanent, "unauthorized"),
        (BrokerError::Refused(s()), ErrorClass::Permanent, "refused"),
        (BrokerError::Other(s()), ErrorClass::Permanent, "other"),
        (BrokerError::SessionFailed(s()), ErrorClass::Fatal, "session_failed"),
        (BrokerError::Closed, ErrorClass::Fatal, "closed"),
    ];
    for (error, class, kind) in table {
        assert_eq!(error.class(), class, "{error:?}");
        assert_eq!(error.kind(), kind, "{error:?}");
        assert_eq!(error.is_retriable(), class == ErrorClass::Retriable, "{error:?}");
    }
}

/// Retriable: session errors (unavailable, timeout, full) are retried after
/// a doubling backoff (100 ms, 200 ms, 400 ms, ...) and counted by kind; a
/// retriable dead-letter failure is retried until it lands. Nothing is lost,
/// order holds, and the partition commits to its end.
#[test]
fn retriable_errors_back_off_and_the_consumer_goes_on() {
    paused_with_recorder(|values| async move {
        let broker = MemoryBroker::default();
        broker.ensure_topic("orders", 2).await.unwrap();
        let bus = EventBus::builder(broker.clone()).config(fast_config("retriable")).build().unwrap();
        let (seen, progress) = (Seen::default(), Arc::new(Progress::default()));
        subscribe_recording(&bus, "orders", seen.clone(), progress.clone()).await;
        bus.start().await.unwrap();
        // Let the assignment happen, then fail the next five `next` calls.
        until(Duration::from_secs(1), || broker.members("retriable") == 1).await;
        tokio::task::yield_now().await;
        broker.fail_publishes("orders.dlq", Some(BrokerError::Unavailable("dlq leader moving".into())));
        let began = tokio::time::Instant::now();
        broker.fail_session_next([
            BrokerError::Unavailable("down".into()),
            BrokerError::Timeout("slow".into()),
            BrokerError::Full("quota".into()),
            BrokerError::Unavailable("down".into()),
            BrokerError::Unavailable("down".into()),
        ]);
        publish_versions(&bus, &["orders"], 10, 5).await;
        let poison = Envelope::new("poison", "Bad", 1, &serde_json::json!({})).unwrap();
        bus.publish_envelope("orders", &poison).await.unwrap();
        progress.wait_for(50).await;
        let took = began.elapsed();
        assert!(took >= Duration::from_millis(100 + 200 + 400 + 800 + 1600), "backed off: {took:?}");
        assert!(took < Duration::from_secs(10), "and no longer than the capped backoff: {took:?}");
        let stats = bus.consumer_stats().await.unwrap();
        assert_eq!(stats.session_errors.load(Ordering::SeqCst), 5);
        assert_eq!(values.counter_or_zero(t::SESSION_ERRORS, &[("error", "unavailable")]), 3);
        assert_eq!(values.counter_or_zero(t::SESSION_ERRORS, &[("error", "timeout")]), 1);
        assert_eq!(values.counter_or_zero(t::SESSION_ERRORS, &[("error", "full")]), 1);
        // The poison event's dead letter waits for the broker (two refused
        // writes at least), then lands.
        let failed = || values.counter_or_zero(t::DEAD_LETTER_FAILED, &[("topic", "orders"), ("error", "unavailable")]);
        until(Duration::from_secs(10), || failed() >= 2).await;
        assert!(broker.read_topic("orders.dlq").is_empty());
        broker.fail_publishes("orders.dlq", None);
        until(Duration::from_secs(10), || broker.read_topic("orders.dlq").len() == 1).await;
        let ends: Vec<(TopicPartition, u64)> =
            (0..2).map(|p| TopicPartition::new("orders", p)).map(|tp| (tp.clone(), broker.end_offset(&tp))).collect();
        until(Duration::from_secs(5), || ends.iter().all(|(tp, end)| broker.committed("retriable", tp) == Some(*end)))
            .await;
        assert_eq!(bus.close().await.handed_back, 0);
        let duplicates = check_order(&seen.lock().unwrap(), 10, 5);
        assert_eq!(duplicates, 0);
        println!("retriable: sent 51, handled 50, dead-lettered 1, duplicates 0, session errors 5, took {took:?}");
    });
}

/// Permanent: session errors no backoff can fix by itself (`Other`) and
/// refused commits are retried with backoff (commits at the next interval,
/// keeping the frontier), counted by kind; nothing is given up: the consumer
/// goes on and commits to the end once the broker accepts.
#[test]
fn permanent_errors_back_off_are_counted_and_nothing_is_given_up() {
    paused_with_recorder(|values| async move {
        let broker = MemoryBroker::default();
        broker.ensure_topic("orders", 1).await.unwrap();
        let bus = EventBus::builder(broker.clone()).config(fast_config("permanent")).build().unwrap();
        let (seen, progress) = (Seen::default(), Arc::new(Progress::default()));
        subscribe_recording(&bus, "orders", seen.clone(), progress.clone()).await;
        bus.start().await.unwrap();
        until(Duration::from_secs(1), || broker.members("permanent") == 1).await;
        tokio::task::yield_now().await;
        let began = tokio::time::Instant::now();
        broker.fail_session_next([
            BrokerError::Other("unmapped code 42".into()),
            BrokerError::Unauthorized("acl changed".into()),
            BrokerError::Other("unmapped code 42".into()),
        ]);
        broker.fail_commits([
            BrokerError::CommitRejected { partition: "orders[0]".into(), reason: "injected".into() },
            BrokerError::Other("unmapped".into()),
        ]);
        publish_versions(&bus, &["orders"], 5, 4).await;
        progress.wait_for(20).await;
        assert!(began.elapsed() >= Duration::from_millis(100 + 200 + 400), "backed off: {:?}", began.elapsed());
        let tp = TopicPartition::new("orders", 0);
        until(Duration::from_secs(5), || broker.committed("permanent", &tp) == Some(20)).await;
        let stats = bus.consumer_stats().await.unwrap();
        assert_eq!(stats.session_errors.load(Ordering::SeqCst), 3);
        assert_eq!(stats.commit_errors.load(Ordering::SeqCst), 2, "each refused commit counted, then retried");
        assert_eq!(values.counter_or_zero(t::SESSION_ERRORS, &[("error", "other")]), 2);
        assert_eq!(values.counter_or_zero(t::SESSION_ERRORS, &[("error", "unauthorized")]), 1);
        assert_eq!(values.counter_or_zero(t::COMMIT_ERRORS, &[]), 2);
        assert!(bus.health().ready());
        assert_eq!(bus.close().await.handed_back, 0);
        assert_eq!(check_order(&seen.lock().unwrap(), 5, 4), 0);
        println!("permanent: sent 20, handled 20, dead-lettered 0, duplicates 0, session errors 3, commit errors 2");
    });
}

/// Fatal: a failed session (`SessionFailed`) is rebuilt: the consumer
/// rejoins through the broker (here after three failed joins, with backoff),
/// fences everything of the old session as lost, and `health()` is not
/// ready until the new session is up. Nothing is lost, order holds; the
/// events handled but not committed before the failure are redelivered
/// (counted as duplicates).
#[test]
fn fatal_session_error_rebuilds_the_session() {
    paused_with_recorder(|values| async move {
        let broker = MemoryBroker::default();
        broker.ensure_topic("orders", 2).await.unwrap();
        let mut config = fast_config("fatal");
        // Commit rarely, so the failure finds handled, uncommitted events.
        config.consumer.commit_interval = Duration::from_secs(3600);
        let bus = EventBus::builder(broker.clone()).config(config).build().unwrap();
        let (seen, progress) = (Seen::default(), Arc::new(Progress::default()));
        subscribe_recording(&bus, "orders", seen.clone(), progress.clone()).await;
        bus.start().await.unwrap();
        publish_versions(&bus, &["orders"], 10, 3).await;
        progress.wait_for(30).await;
        assert!(bus.health().ready());

        broker.fail_subscribes([
            BrokerError::Unavailable("coordinator moving".into()),
            BrokerError::Unavailable("coordinator moving".into()),
            BrokerError::Unavailable("coordinator moving".into()),
        ]);
        broker.fail_session_next([BrokerError::SessionFailed("poll thread died".into())]);
        until(Duration::from_secs(1), || bus.health().consumer_session_down).await;
        let health = bus.health();
        assert!(!health.ready(), "not ready while the session is rebuilt: {health:?}");
        assert_eq!(broker.members("fatal"), 0, "the dead session left the group");
        until(Duration::from_secs(5), || !bus.health().consumer_session_down).await;
        assert!(bus.health().ready());
        assert_eq!(broker.members("fatal"), 1);
        let stats = bus.consumer_stats().await.unwrap();
        assert_eq!(stats.session_rebuilds.load(Ordering::SeqCst), 1);
        assert_eq!(values.counter_or_zero(t::SESSION_REBUILDS, &[]), 1);
        assert_eq!(values.counter_or_zero(t::SESSION_ERRORS, &[("error", "session_failed")]), 1);
        assert_eq!(values.counter_or_zero(t::SESSION_ERRORS, &[("error", "unavailable")]), 3);

        // The new session goes on: more events, all handled in order.
        let mut expected = 3;
        for v in 4..=5 {
            for a in 0..10 {
                let env = Envelope::new(format!("agg-{a}"), "Updated", v, &serde_json::json!({})).unwrap();
                bus.publish_envelope("orders", &env).await.unwrap();
            }
            expected = v;
        }
        // 30 redelivered (nothing was committed) + 20 new.
        progress.wait_for(80).await;
        assert_eq!(bus.close().await.handed_back, 0);
        for p in 0..2 {
            let tp = TopicPartition::new("orders", p);
            assert_eq!(broker.committed("fatal", &tp), Some(broker.end_offset(&tp)), "{tp}");
        }
        let duplicates = check_order(&seen.lock().unwrap(), 10, expected);
        assert_eq!(duplicates, 30, "the uncommitted events of the lost session, once each");
        println!("fatal: sent 50, handled 50 (+{duplicates} redelivered), dead-lettered 0, rebuilds 1");
    });
}
