//! The production consumer on the in-memory broker: one test per rule of
//! the contract (no loss, order, no skipped commit, retries, dead letters,
//! rebalances, back-pressure, clean close).
#![cfg(not(feature = "loom"))]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fast_config, publish_versions, subscribe_checked, Progress};
use eventbus::consumer::task_headers as dlq;
use eventbus::testing::OrderChecker;
use eventbus::{Envelope, EventBus, MemoryBroker, TopicPartition};
use tokio::sync::Notify;

const TOPICS: [&str; 5] = ["orders", "payments", "shipments", "invoices", "refunds"];

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

async fn committed_all(broker: &MemoryBroker, group: &str, topics: &[&str]) -> bool {
    topics.iter().all(|t| {
        (0..broker.partitions(t).unwrap_or(0)).all(|p| {
            let tp = TopicPartition::new(*t, p);
            broker.committed(group, &tp).unwrap_or(0) == broker.end_offset(&tp)
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_loses_nothing_and_keeps_order() {
    let broker = MemoryBroker::default();
    for t in TOPICS {
        eventbus::Broker::ensure_topic(&broker, t, 3).await.unwrap();
    }
    let bus = EventBus::builder(broker.clone()).config(fast_config("seed")).build().unwrap();
    let (checker, progress) = (Arc::new(OrderChecker::new()), Arc::new(Progress::default()));
    subscribe_checked(&bus, &TOPICS, checker.clone(), progress.clone()).await;
    bus.start().await.unwrap();
    let expected = publish_versions(&bus, &TOPICS, 200, 10).await;
    progress.wait_for(2000).await;
    let report = bus.close().await;
    assert_eq!(report.handed_back, 0);
    let r = checker.report(&expected);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!((r.handled, r.duplicates), (2000, 0));
    assert!(committed_all(&broker, "seed", &TOPICS).await, "close commits every frontier");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_failing_twice_succeeds_on_retry_and_keeps_order() {
    let broker = MemoryBroker::default();
    let bus = EventBus::builder(broker.clone()).config(fast_config("retry")).build().unwrap();
    let checker = Arc::new(OrderChecker::new());
    let progress = Arc::new(Progress::default());
    let failures = Arc::new(AtomicU32::new(0));
    {
        let (checker, progress, failures) = (checker.clone(), progress.clone(), failures.clone());
        bus.subscribe_envelope("orders", move |env: Envelope| {
            let (checker, progress, failures) = (checker.clone(), progress.clone(), failures.clone());
            async move {
                checker.begin(&env.aggregate_id, env.event_version);
                if env.aggregate_id == "agg-0" && env.event_version == 1 && failures.fetch_add(1, Ordering::SeqCst) < 2
                {
                    checker.fail(&env.aggregate_id, env.event_version);
                    return Err("transient".into());
                }
                checker.complete(&env.aggregate_id, env.event_version);
                progress.bump();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    let expected = publish_versions(&bus, &["orders"], 3, 5).await;
    progress.wait_for(15).await;
    bus.close().await;
    assert_eq!(failures.load(Ordering::SeqCst), 3, "two failures, then the successful third attempt");
    let r = checker.report(&expected);
    assert!(r.is_clean(), "{r:?}");
    assert!(broker.read_topic("orders.dlq").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_goes_to_dead_letter_and_partition_moves_on() {
    let broker = MemoryBroker::default();
    eventbus::Broker::ensure_topic(&broker, "orders", 1).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(fast_config("dlq")).build().unwrap();
    let progress = Arc::new(Progress::default());
    let attempts = Arc::new(AtomicU32::new(0));
    {
        let (progress, attempts) = (progress.clone(), attempts.clone());
        bus.subscribe_envelope("orders", move |env: Envelope| {
            let (progress, attempts) = (progress.clone(), attempts.clone());
            async move {
                if env.event_version == 2 {
                    attempts.fetch_add(1, Ordering::SeqCst);
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
    publish_versions(&bus, &["orders"], 1, 4).await;
    progress.wait_for(3).await;
    bus.close().await;
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "default three attempts");
    let dead = broker.read_topic("orders.dlq");
    assert_eq!(dead.len(), 1);
    let h = &dead[0].headers;
    assert_eq!(header(h, dlq::DLQ_REASON), Some("handler"));
    assert_eq!(header(h, dlq::DLQ_ERROR), Some("poison"));
    assert_eq!(header(h, dlq::DLQ_ATTEMPTS), Some("3"));
    assert_eq!(header(h, dlq::DLQ_ORIGIN_TOPIC), Some("orders"));
    assert_eq!(header(h, dlq::DLQ_ORIGIN_OFFSET), Some("1"));
    assert_eq!(broker.committed("dlq", &TopicPartition::new("orders", 0)), Some(4), "the partition moved past it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_event_goes_to_dead_letter_with_its_decode_error() {
    let broker = MemoryBroker::default();
    eventbus::Broker::ensure_topic(&broker, "orders", 1).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(fast_config("decode")).build().unwrap();
    let progress = Arc::new(Progress::default());
    {
        let progress = progress.clone();
        bus.subscribe_envelope("orders", move |_env: Envelope| {
            let progress = progress.clone();
            async move {
                progress.bump();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    bus.publish("orders", Some(b"agg-1"), vec![], b"{not json".to_vec()).await.unwrap();
    publish_versions(&bus, &["orders"], 1, 1).await;
    progress.wait_for(1).await;
    bus.close().await;
    let dead = broker.read_topic("orders.dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, b"{not json");
    assert_eq!(header(&dead[0].headers, dlq::DLQ_REASON), Some("decode"));
    assert!(header(&dead[0].headers, dlq::DLQ_ERROR).is_some_and(|e| !e.is_empty()));
    assert_eq!(broker.committed("decode", &TopicPartition::new("orders", 0)), Some(2));
}

/// No skipped commit: with one event stuck, periodic commits stop exactly at it
/// even though everything after it completed. Paused time makes the commit
/// ticks run deterministically while the test waits.
#[tokio::test(start_paused = true)]
async fn commits_never_cover_an_incomplete_offset() {
    let broker = MemoryBroker::default();
    eventbus::Broker::ensure_topic(&broker, "orders", 1).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(fast_config("frontier")).build().unwrap();
    let progress = Arc::new(Progress::default());
    let gate = Arc::new(Notify::new());
    {
        let (progress, gate) = (progress.clone(), gate.clone());
        bus.subscribe_envelope("orders", move |env: Envelope| {
            let (progress, gate) = (progress.clone(), gate.clone());
            async move {
                if env.aggregate_id == "agg-3" && env.event_version == 1 {
                    gate.notified().await;
                }
                progress.bump();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    // agg-3 v1 is offset 3; aggregates 0..10, one version each; then agg-3 v2.
    publish_versions(&bus, &["orders"], 10, 1).await;
    progress.wait_for(9).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // virtual: many commit ticks
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(broker.committed("frontier", &tp), Some(3), "frontier stops at the stuck offset");
    gate.notify_one();
    progress.wait_for(10).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(broker.committed("frontier", &tp), Some(10));
    bus.close().await;
}

/// Subscribes "orders" with a handler that waits on `gate` at `agg-<stuck>`
/// version 1 (if any) and counts the others in `progress`.
async fn subscribe_gated(
    bus: &EventBus<MemoryBroker>,
    progress: Arc<Progress>,
    gate: Arc<Notify>,
    stuck: Option<usize>,
) {
    let stuck = stuck.map(|a| format!("agg-{a}"));
    bus.subscribe_envelope("orders", move |env: Envelope| {
        let (progress, gate, stuck) = (progress.clone(), gate.clone(), stuck.clone());
        async move {
            if stuck.as_deref() == Some(env.aggregate_id.as_str()) && env.event_version == 1 {
                gate.notified().await;
            }
            progress.bump();
            Ok(())
        }
    })
    .await
    .unwrap();
}

/// Waits (in paused time, 1 ms steps) until `group`'s commit of orders[0]
/// satisfies `ok`, failing once `limit` of virtual time has passed.
async fn wait_committed(broker: &MemoryBroker, group: &str, limit: Duration, ok: impl Fn(u64) -> bool) -> u64 {
    let tp = TopicPartition::new("orders", 0);
    let start = tokio::time::Instant::now();
    loop {
        let committed = broker.committed(group, &tp).unwrap_or(0);
        if ok(committed) {
            return committed;
        }
        assert!(start.elapsed() < limit, "commit of orders[0] is {committed} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Commits follow progress: with an interval of an hour, a frontier that
/// moved by `commit_threshold` is committed at once (virtual time barely
/// moves); what is left below the threshold waits for the interval.
#[tokio::test(start_paused = true)]
async fn a_frontier_past_the_threshold_commits_before_the_interval() {
    let broker = MemoryBroker::default();
    eventbus::Broker::ensure_topic(&broker, "orders", 1).await.unwrap();
    let mut config = fast_config("threshold");
    config.consumer.commit_interval = Duration::from_secs(3600);
    config.consumer.commit_threshold = 5;
    let bus = EventBus::builder(broker.clone()).config(config).build().unwrap();
    let progress = Arc::new(Progress::default());
    subscribe_gated(&bus, progress.clone(), Arc::new(Notify::new()), None).await;
    bus.start().await.unwrap();
    let start = tokio::time::Instant::now();
    publish_versions(&bus, &["orders"], 10, 1).await;
    progress.wait_for(10).await;
    // Whatever the completion order, a frontier of 10 leaves less than 5
    // uncommitted: the last early commit is at 6 or above.
    let committed = wait_committed(&broker, "threshold", Duration::from_secs(60), |c| c >= 6).await;
    assert!(start.elapsed() < Duration::from_secs(60), "committed without waiting for the interval");
    let stats = bus.consumer_stats().await.unwrap();
    assert!(stats.commits.load(Ordering::SeqCst) >= 1);
    if committed < 10 {
        // The rest (below the threshold) goes with the interval.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let tp = TopicPartition::new("orders", 0);
        assert_eq!(broker.committed("threshold", &tp), Some(committed), "no early commit below the threshold");
        wait_committed(&broker, "threshold", Duration::from_secs(3600), |c| c == 10).await;
    }
    bus.close().await;
}

/// The interval is still the ceiling: progress below the threshold is
/// committed when the interval elapses, not before.
#[tokio::test(start_paused = true)]
async fn the_interval_commits_progress_below_the_threshold() {
    let broker = MemoryBroker::default();
    eventbus::Broker::ensure_topic(&broker, "orders", 1).await.unwrap();
    let mut config = fast_config("ceiling");
    config.consumer.commit_interval = Duration::from_secs(10);
    config.consumer.commit_threshold = 100;
    let bus = EventBus::builder(broker.clone()).config(config).build().unwrap();
    let progress = Arc::new(Progress::default());
    subscribe_gated(&bus, progress.clone(), Arc::new(Notify::new()), None).await;
    bus.start().await.unwrap();
    let start = tokio::time::Instant::now();
    publish_versions(&bus, &["orders"], 5, 1).await;
    progress.wait_for(5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(
        broker.committed("ceiling", &tp).unwrap_or(0),
        0,
        "5 < threshold: nothing committed before the interval"
    );
    wait_committed(&broker, "ceiling", Duration::from_secs(11), |c| c == 5).await;
    assert!(start.elapsed() >= Duration::from_secs(9), "committed by the interval, {:?} in", start.elapsed());
    bus.close().await;
}

/// Threshold commits keep the frontier: they stop at a stuck offset however
/// far the events after it got, and move on at once when it completes.
#[tokio::test(start_paused = true)]
async fn threshold_commits_never_pass_a_stuck_offset() {
    let broker = MemoryBroker::default();
    eventbus::Broker::ensure_topic(&broker, "orders", 1).await.unwrap();
    let mut config = fast_config("stuck-threshold");
    config.consumer.commit_interval = Duration::from_secs(3600);
    config.consumer.commit_threshold = 2;
    let bus = EventBus::builder(broker.clone()).config(config).build().unwrap();
    let progress = Arc::new(Progress::default());
    let gate = Arc::new(Notify::new());
    subscribe_gated(&bus, progress.clone(), gate.clone(), Some(3)).await;
    bus.start().await.unwrap();
    // agg-3 v1 is offset 3.
    publish_versions(&bus, &["orders"], 10, 1).await;
    progress.wait_for(9).await;
    wait_committed(&broker, "stuck-threshold", Duration::from_secs(60), |c| c == 3).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(broker.committed("stuck-threshold", &tp), Some(3), "frontier stops at the stuck offset");
    let start = tokio::time::Instant::now();
    gate.notify_one();
    progress.wait_for(10).await;
    wait_committed(&broker, "stuck-threshold", Duration::from_secs(60), |c| c == 10).await;
    assert!(start.elapsed() < Duration::from_secs(60));
    bus.close().await;
}

/// Back-pressure: a full pool stops the consumer from reading.
#[tokio::test(start_paused = true)]
async fn full_pool_pauses_consumption() {
    let broker = MemoryBroker::default();
    let mut config = fast_config("pressure");
    config.pool.capacity = 4;
    config.pool.concurrency = 2;
    let bus = EventBus::builder(broker.clone()).config(config).build().unwrap();
    let progress = Arc::new(Progress::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    {
        let (progress, gate) = (progress.clone(), gate.clone());
        bus.subscribe_envelope("orders", move |_env: Envelope| {
            let (progress, gate) = (progress.clone(), gate.clone());
            async move {
                gate.acquire().await.unwrap().forget();
                progress.bump();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    publish_versions(&bus, &["orders"], 50, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = bus.consumer_stats().await.unwrap();
    let delivered = stats.delivered.load(Ordering::SeqCst);
    assert!(delivered <= 5, "read {delivered} events with room for 4 (+1 waiting to submit)");
    assert!(bus.pool_stats().queued + bus.pool_stats().in_flight <= 4);
    gate.add_permits(50);
    progress.wait_for(50).await;
    bus.close().await;
}

/// A second member joins mid-stream (revoke, commit, release, assign) and
/// then leaves (its partitions come back): no loss, no order violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_and_leaving_lose_nothing_and_keep_order() {
    let broker = MemoryBroker::default();
    eventbus::Broker::ensure_topic(&broker, "orders", 6).await.unwrap();
    let (checker, progress) = (Arc::new(OrderChecker::new()), Arc::new(Progress::default()));
    let a = EventBus::builder(broker.clone()).config(fast_config("group")).build().unwrap();
    subscribe_checked(&a, &["orders"], checker.clone(), progress.clone()).await;
    a.start().await.unwrap();
    let publisher = EventBus::builder(broker.clone()).build().unwrap();
    let first = publish_versions(&publisher, &["orders"], 60, 5).await;
    progress.wait_for(100).await;
    let b = EventBus::builder(broker.clone()).config(fast_config("group")).build().unwrap();
    subscribe_checked(&b, &["orders"], checker.clone(), progress.clone()).await;
    b.start().await.unwrap();
    // More events while both members share the partitions.
    let mut expected = first;
    for v in 6..=10 {
        for a_ in 0..60 {
            let id = format!("agg-{a_}");
            let env = Envelope::new(id.clone(), "Updated", v, &serde_json::json!({})).unwrap();
            publisher.publish_envelope("orders", &env).await.unwrap();
            expected.insert(id, v);
        }
    }
    progress.wait_for(400).await;
    b.close().await; // leaves mid-stream; its partitions go back to a
    progress.wait_for(600).await;
    a.close().await;
    publisher.close().await;
    let r = checker.report(&expected);
    assert!(r.is_clean(), "{r:?}");
    assert!(broker.rebalances("group") >= 3, "join and leave rebalanced");
}

/// Close with events stuck in handlers hands them back uncommitted; a
/// restarted consumer handles them: nothing lost, order kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_events_in_flight_loses_nothing() {
    let broker = MemoryBroker::default();
    eventbus::Broker::ensure_topic(&broker, "orders", 2).await.unwrap();
    let checker = Arc::new(OrderChecker::new());
    let progress = Arc::new(Progress::default());
    let mut config = fast_config("restart");
    config.close_timeout = Some(Duration::from_millis(50));
    // Each of the 20 aggregates gets one handler stuck at version 3; with
    // fewer workers than aggregates the stuck ones could take every worker
    // before another partition's versions 1 and 2 arrive, and they would
    // never run.
    config.pool.concurrency = 32;
    let first = EventBus::builder(broker.clone()).config(config.clone()).build().unwrap();
    let stuck = Arc::new(Mutex::new(0u32));
    {
        let (checker, progress, stuck) = (checker.clone(), progress.clone(), stuck.clone());
        first
            .subscribe_envelope("orders", move |env: Envelope| {
                let (checker, progress, stuck) = (checker.clone(), progress.clone(), stuck.clone());
                async move {
                    checker.begin(&env.aggregate_id, env.event_version);
                    if env.event_version >= 3 {
                        *stuck.lock().unwrap() += 1;
                        std::future::pending::<()>().await; // never finishes; close cancels it
                    }
                    checker.complete(&env.aggregate_id, env.event_version);
                    progress.bump();
                    Ok(())
                }
            })
            .await
            .unwrap();
    }
    first.start().await.unwrap();
    let expected = publish_versions(&first, &["orders"], 20, 5).await;
    progress.wait_for(40).await;
    let report = first.close().await;
    assert!(report.handed_back > 0, "stuck and queued events were handed back");
    assert!(*stuck.lock().unwrap() > 0);
    // Cancelled handlers never completed: clear their running mark for the checker.
    let restarted_checker = Arc::new(OrderChecker::new());
    for agg in expected.keys() {
        for v in 1..=2 {
            restarted_checker.begin(agg, v);
            restarted_checker.complete(agg, v);
        }
    }
    let second = EventBus::builder(broker.clone()).config(fast_config("restart")).build().unwrap();
    subscribe_checked(&second, &["orders"], restarted_checker.clone(), progress.clone()).await;
    second.start().await.unwrap();
    progress.wait_for(100).await;
    second.close().await;
    let r = restarted_checker.report(&expected);
    assert_eq!(r.violations, 0, "{r:?}");
    assert_eq!(r.missing, 0, "{r:?}");
    assert!(committed_all(&broker, "restart", &["orders"]).await);
}

/// Subscribing after start adds the topic with one rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_after_start_rebalances_once() {
    let broker = MemoryBroker::default();
    let bus = EventBus::builder(broker.clone()).config(fast_config("late")).build().unwrap();
    let (checker, progress) = (Arc::new(OrderChecker::new()), Arc::new(Progress::default()));
    subscribe_checked(&bus, &["orders", "payments"], checker.clone(), progress.clone()).await;
    bus.start().await.unwrap();
    let before = broker.rebalances("late");
    subscribe_checked(&bus, &["refunds"], checker.clone(), progress.clone()).await;
    assert_eq!(broker.rebalances("late"), before + 1);
    let expected = publish_versions(&bus, &["orders", "payments", "refunds"], 30, 3).await;
    progress.wait_for(90).await;
    bus.close().await;
    assert!(checker.report(&expected).is_clean());
}

/// After close, not one task of the bus is alive.
#[test]
fn close_leaves_no_task_alive() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let broker = MemoryBroker::default();
        let bus = EventBus::builder(broker.clone()).config(fast_config("tasks")).build().unwrap();
        let (checker, progress) = (Arc::new(OrderChecker::new()), Arc::new(Progress::default()));
        subscribe_checked(&bus, &["orders"], checker, progress.clone()).await;
        bus.start().await.unwrap();
        publish_versions(&bus, &["orders"], 50, 4).await;
        progress.wait_for(200).await;
        bus.close().await;
        assert_eq!(common::alive_tasks_after_release().await, 0);
    });
}

/// A session whose close fails (on Kafka, close commits the stored offsets
/// synchronously) reports it as the close's final commit error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_session_close_is_reported_as_the_final_commit_error() {
    let broker = MemoryBroker::default();
    let bus = EventBus::builder(broker.clone()).config(fast_config("close-fails")).build().unwrap();
    let (checker, progress) = (Arc::new(OrderChecker::new()), Arc::new(Progress::default()));
    subscribe_checked(&bus, &["orders"], checker, progress.clone()).await;
    bus.start().await.unwrap();
    publish_versions(&bus, &["orders"], 10, 2).await;
    progress.wait_for(20).await;
    broker.fail_closes([eventbus::BrokerError::Unavailable("commit at close refused".into())]);
    let report = bus.close().await;
    let error = report.final_commit_error.expect("the failed session close is reported");
    assert!(error.contains("closing the session") && error.contains("commit at close refused"), "{error}");
    assert_eq!(report.handed_back, 0);
}

#[tokio::test]
async fn configuration_errors_name_the_key() {
    let err = eventbus::BusConfig::from_toml("[pool]\nconcurrency = 0\n").unwrap_err();
    assert!(err.to_string().contains("pool.concurrency"), "{err}");
    let err = eventbus::BusConfig::from_toml("[consumer]\nbogus = 1\n").unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    let err = eventbus::BusConfig::from_toml("[consumer]\ncommit_threshold = 0\n").unwrap_err();
    assert!(err.to_string().contains("consumer.commit_threshold"), "{err}");
    let ok = eventbus::BusConfig::from_yaml("consumer:\n  group: billing\n  retry:\n    max_attempts: 5\n").unwrap();
    assert_eq!((ok.consumer.group.as_str(), ok.consumer.retry.max_attempts), ("billing", 5));
    let _ = BTreeMap::<u8, u8>::new();
}
