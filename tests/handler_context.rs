//! The handler's [`DeliveryContext`] and typed payload decoding, on the
//! in-memory broker with the library's default configuration (only the
//! group is set): the context says what the broker stored and which attempt
//! this is; a payload that does not decode into the handler's type is
//! dead-lettered once, in its aggregate's place, without retries. The same
//! context on real brokers: `tests/nats.rs` and `tests/kafka.rs`
//! (`ordered_handler_context_matches_the_broker_positions`).
#![cfg(not(feature = "loom"))]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus::broker::memory::partition_for_key;
use eventbus::bus::BusConfig;
use eventbus::consumer::task_headers as dlq;
use eventbus::consumer::RetryConfig;
use eventbus::testing::OrderChecker;
use eventbus::{
    Broker, Delivery, DeliveryContext, Envelope, EventBus, MemoryBroker, PayloadError, PayloadErrorKind, Position,
};
use serde::Deserialize;
use tokio::sync::mpsc;

/// Library defaults, with a group of the test's own.
fn defaults(group: &str) -> BusConfig {
    let mut config = BusConfig::default();
    config.consumer.group = group.into();
    config
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The next item of `rx`; fails the test if none comes (a bound, not a
/// synchronisation: the item is the event waited for).
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect(what).expect(what)
}

const PARTITIONS: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_and_raw_contexts_equal_what_was_published() {
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", PARTITIONS).await.unwrap();
    broker.ensure_topic("notes", PARTITIONS).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(defaults("ctx-fields")).build().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Envelope, DeliveryContext)>();
    bus.subscribe_ordered("orders", move |env, ctx| {
        tx.send((env, ctx)).unwrap();
        std::future::ready(Ok(()))
    })
    .await
    .unwrap();
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<(Delivery, DeliveryContext)>();
    bus.subscribe_raw("notes", move |d, ctx| {
        raw_tx.send((d, ctx)).unwrap();
        std::future::ready(Ok(()))
    })
    .await
    .unwrap();
    bus.start().await.unwrap();

    // Envelopes of 6 aggregates, 5 versions each: half through
    // `publish_envelope`, half as raw records with the envelope's headers
    // plus custom ones (a tenant, a repeated header).
    const AGGREGATES: usize = 6;
    const VERSIONS: i64 = 5;
    let mut published: BTreeMap<(String, i64), (Envelope, Position, bool)> = BTreeMap::new();
    for v in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let id = format!("order-{a}");
            let env = Envelope::new(id.clone(), "OrderUpdated", v, &serde_json::json!({ "v": v }))
                .unwrap()
                .with_trace_id(format!("trace-{a}-{v}"))
                .with_correlation_id(format!("corr-{a}"));
            let custom = a % 2 == 1;
            let pos = if custom {
                let mut headers = env.to_headers();
                headers.push(("x-tenant".into(), format!("tenant-{a}").into_bytes()));
                headers.push(("x-tag".into(), b"one".to_vec()));
                headers.push(("x-tag".into(), b"two".to_vec()));
                bus.publish("orders", Some(id.as_bytes()), headers, env.encode().unwrap()).await.unwrap()
            } else {
                bus.publish_envelope("orders", &env).await.unwrap()
            };
            published.insert((id, v), (env, pos, custom));
        }
    }
    let raw_headers = vec![
        ("X-Trace-ID".to_string(), b"raw-trace".to_vec()),
        ("X-Correlation-ID".to_string(), b"raw-corr".to_vec()),
        ("X-Bin".to_string(), vec![0, 159, 146, 150]),
    ];
    let raw_pos =
        bus.publish("notes", Some(b"note-7"), raw_headers.clone(), b"not an envelope".to_vec()).await.unwrap();

    let mut seen: BTreeSet<(String, i64)> = BTreeSet::new();
    let mut per_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..published.len() {
        let (env, ctx) = next(&mut rx, "every envelope handled").await;
        let key = (env.aggregate_id.clone(), env.event_version);
        let (sent, pos, custom) = &published[&key];
        assert_eq!(&env, sent);
        assert_eq!(ctx.topic(), "orders");
        assert_eq!(ctx.partition(), pos.partition, "{key:?}");
        assert_eq!(ctx.partition(), partition_for_key(env.aggregate_id.as_bytes(), PARTITIONS), "the partitioner");
        assert_eq!(ctx.offset(), pos.offset, "{key:?}");
        assert_eq!(ctx.topic_partition(), eventbus::TopicPartition::new("orders", pos.partition));
        assert_eq!(ctx.key(), Some(env.aggregate_id.as_bytes()), "keyed by the aggregate ID");
        assert_eq!(ctx.aggregate_id(), Some(env.aggregate_id.as_str()));
        assert_eq!(ctx.event_type(), Some("OrderUpdated"));
        assert_eq!(ctx.trace_id(), sent.trace_id.as_deref());
        assert_eq!(ctx.correlation_id(), sent.correlation_id.as_deref());
        assert_eq!((ctx.attempt(), ctx.delivery_attempt(), ctx.max_attempts()), (1, 1, 3));
        assert!(ctx.timestamp().is_some());
        // Every header as published, in order.
        let mut expected_headers = sent.to_headers();
        if *custom {
            let a = &env.aggregate_id["order-".len()..];
            expected_headers.push(("x-tenant".into(), format!("tenant-{a}").into_bytes()));
            expected_headers.push(("x-tag".into(), b"one".to_vec()));
            expected_headers.push(("x-tag".into(), b"two".to_vec()));
            assert_eq!(ctx.header("X-Tenant"), Some(format!("tenant-{a}").as_bytes()), "case-insensitive lookup");
            assert_eq!(ctx.header("x-tag"), Some(&b"one"[..]), "the first of repeated headers");
        } else {
            assert_eq!(ctx.header("x-tenant"), None);
        }
        assert_eq!(ctx.headers(), expected_headers.as_slice());
        assert!(seen.insert(key.clone()), "{key:?} handled twice");
        per_aggregate.entry(key.0).or_default().push(ctx.offset());
    }
    assert_eq!(seen.len(), AGGREGATES * VERSIONS as usize);
    // One aggregate's events are handled in order: their offsets increase.
    for (id, offsets) in &per_aggregate {
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{id}: offsets {offsets:?} not increasing");
    }
    // Per partition, in publish order, the offsets are 0, 1, 2, ...: strictly
    // increasing, none shared.
    let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for v in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let (_, pos, _) = &published[&(format!("order-{a}"), v)];
            by_partition.entry(pos.partition).or_default().push(pos.offset);
        }
    }
    for offsets in by_partition.values() {
        assert_eq!(*offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
    }

    // The raw handler gets the same context type, with IDs from headers and key.
    let (d, ctx) = next(&mut raw_rx, "raw delivery handled").await;
    assert_eq!((ctx.topic(), ctx.partition(), ctx.offset()), ("notes", raw_pos.partition, raw_pos.offset));
    assert_eq!(ctx.partition(), partition_for_key(b"note-7", PARTITIONS));
    assert_eq!((&*d.topic, d.partition, d.offset), (ctx.topic(), ctx.partition(), ctx.offset()));
    assert_eq!(ctx.key(), Some(&b"note-7"[..]));
    assert_eq!(ctx.aggregate_id(), Some("note-7"), "named by the key");
    assert_eq!(ctx.headers(), raw_headers.as_slice());
    assert_eq!(d.headers, raw_headers);
    assert_eq!((ctx.trace_id(), ctx.correlation_id(), ctx.event_type()), (Some("raw-trace"), Some("raw-corr"), None));
    assert_eq!((ctx.attempt(), ctx.delivery_attempt()), (1, 1));
    assert_eq!(d.payload, b"not an envelope");

    let report = bus.close().await;
    assert_eq!(report.handed_back, 0);
    assert!(broker.read_topic("orders.dlq").is_empty());
}

/// What one attempt saw.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    attempt: u32,
    last: bool,
    delivery_attempt: u32,
    offset: u64,
    at: tokio::time::Instant,
}

#[tokio::test(start_paused = true)]
async fn attempt_counts_up_across_retries_of_a_failing_handler() {
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", 1).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(defaults("ctx-attempts")).build().unwrap();
    let seen: Arc<Mutex<BTreeMap<i64, Vec<Seen>>>> = Arc::default();
    let (done_tx, mut done) = mpsc::unbounded_channel::<i64>();
    {
        let seen = seen.clone();
        bus.subscribe_ordered("orders", move |env, ctx| {
            let at = tokio::time::Instant::now();
            let attempt = Seen {
                attempt: ctx.attempt(),
                last: ctx.is_last_attempt(),
                delivery_attempt: ctx.delivery_attempt(),
                offset: ctx.offset(),
                at,
            };
            seen.lock().unwrap().entry(env.event_version).or_default().push(attempt);
            // v1 fails twice then succeeds; v2 always fails; v3 succeeds.
            let result: eventbus::pool::HandlerResult = match (env.event_version, ctx.attempt()) {
                (1, 1 | 2) | (2, _) => Err(format!("fail v{} attempt {}", env.event_version, ctx.attempt()).into()),
                _ => Ok(()),
            };
            if result.is_ok() {
                done_tx.send(env.event_version).unwrap();
            }
            std::future::ready(result)
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    for v in 1..=3 {
        bus.publish_envelope("orders", &Envelope::new("agg-1", "Updated", v, &v).unwrap()).await.unwrap();
    }
    assert_eq!(next(&mut done, "v1 succeeds on its third attempt").await, 1);
    assert_eq!(next(&mut done, "v3 runs after v2's dead letter").await, 3);
    let stats = bus.consumer_stats().await.unwrap();
    bus.close().await;

    let retry = RetryConfig::default();
    let seen = seen.lock().unwrap().clone();
    for (version, offset) in [(1, 0), (2, 1)] {
        let attempts = &seen[&version];
        let numbers: Vec<(u32, bool, u32, u64)> =
            attempts.iter().map(|s| (s.attempt, s.last, s.delivery_attempt, s.offset)).collect();
        assert_eq!(numbers, [(1, false, 1, offset), (2, false, 1, offset), (3, true, 1, offset)], "v{version}");
        // Each retry waits the configured backoff after the attempt before.
        for (n, pair) in attempts.windows(2).enumerate() {
            let waited = pair[1].at - pair[0].at;
            assert!(waited >= retry.backoff(n as u32 + 1), "v{version}: retry {} after {waited:?}", n + 1);
        }
    }
    assert_eq!(seen[&3].iter().map(|s| s.attempt).collect::<Vec<_>>(), [1]);
    assert_eq!(stats.retried.load(Ordering::Relaxed), 4);
    let dead = broker.read_topic("orders.dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0].headers, dlq::DLQ_REASON), Some(dlq::REASON_HANDLER));
    assert_eq!(header(&dead[0].headers, dlq::DLQ_ATTEMPTS), Some("3"));
    assert_eq!(header(&dead[0].headers, dlq::DLQ_ERROR), Some("fail v2 attempt 3"));
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Order {
    amount: u64,
    version: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_handler_dead_letters_undecodable_payloads_once_in_their_aggregates_place() {
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", PARTITIONS).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(defaults("ctx-typed")).build().unwrap();
    let checker = Arc::new(OrderChecker::new());
    let calls = Arc::new(AtomicU64::new(0));
    // (aggregate, good version) -> undecodable events of the aggregate
    // published before it: all of them must be dead-lettered when it starts.
    let bad_before: Arc<Mutex<BTreeMap<(String, i64), usize>>> = Arc::default();
    let out_of_place: Arc<Mutex<Vec<String>>> = Arc::default();
    let (done_tx, mut done) = mpsc::unbounded_channel::<()>();
    {
        let (checker, calls, bad_before, out_of_place) =
            (checker.clone(), calls.clone(), bad_before.clone(), out_of_place.clone());
        let broker = broker.clone();
        bus.subscribe_typed("orders", move |order: Order, env: Envelope, ctx: DeliveryContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            let id = env.aggregate_id.clone();
            checker.begin(&id, order.version);
            let expected = bad_before.lock().unwrap()[&(id.clone(), order.version)];
            let dead =
                broker.read_topic("orders.dlq").iter().filter(|d| d.key.as_deref() == Some(id.as_bytes())).count();
            if dead != expected {
                out_of_place
                    .lock()
                    .unwrap()
                    .push(format!("{id} v{}: {dead} dead letters, {expected} due", order.version));
            }
            assert_eq!(order.amount, order.version as u64 * 10);
            assert_eq!(ctx.aggregate_id(), Some(id.as_str()));
            checker.complete(&id, order.version);
            done_tx.send(()).unwrap();
            std::future::ready(Ok(()))
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();

    // 20 aggregates, 10 good events each (versions 1..=10), and after every
    // third good one an event whose payload is not an `Order`, of three shapes.
    const AGGREGATES: usize = 20;
    const VERSIONS: i64 = 10;
    let bad_payloads = [
        serde_json::json!({ "amount": "lots", "version": 1 }),
        serde_json::json!({ "version": 2 }),
        serde_json::json!([1, 2, 3]),
    ];
    let mut expected = BTreeMap::new();
    let mut bad: BTreeMap<(u32, u64), Vec<u8>> = BTreeMap::new();
    let mut sent = 0;
    for v in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let id = format!("agg-{a}");
            let good =
                Envelope::new(id.clone(), "OrderPlaced", v, &serde_json::json!({ "amount": v * 10, "version": v }))
                    .unwrap();
            let due = (v - 1) / 3; // bad events of this aggregate published before good v
            bad_before.lock().unwrap().insert((id.clone(), v), due as usize);
            bus.publish_envelope("orders", &good).await.unwrap();
            sent += 1;
            if v % 3 == 0 {
                let payload = &bad_payloads[(a + v as usize) % bad_payloads.len()];
                let poison = Envelope::new(id.clone(), "OrderPlaced", v, payload).unwrap();
                let pos = bus.publish_envelope("orders", &poison).await.unwrap();
                bad.insert((pos.partition, pos.offset), poison.encode().unwrap());
                sent += 1;
            }
            expected.insert(id, v);
        }
    }
    let good = AGGREGATES as u64 * VERSIONS as u64;
    assert_eq!(sent, good as usize + bad.len());
    for _ in 0..good {
        next(&mut done, "every good event handled").await;
    }
    // Every aggregate's last undecodable event (after v9) precedes its good
    // v10, whose handler checked that it was dead-lettered: all are written.
    let stats = bus.consumer_stats().await.unwrap();
    let report = bus.close().await;
    assert_eq!(report.handed_back, 0);

    // Handled: each good event once, in order; the handler never saw a bad one.
    let r = checker.report(&expected);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!((r.handled, r.duplicates, r.violations), (good, 0, 0));
    assert_eq!(calls.load(Ordering::SeqCst), good);
    assert_eq!(
        out_of_place.lock().unwrap().clone(),
        Vec::<String>::new(),
        "dead letters out of their aggregate's place"
    );
    // Dead-lettered: each bad event exactly once, its bytes as published,
    // reason `payload`, one attempt, no retries.
    let dead = broker.read_topic("orders.dlq");
    assert_eq!(dead.len(), bad.len());
    let mut origins = BTreeMap::new();
    for d in &dead {
        let h = &d.headers;
        let origin: (u32, u64) = (
            header(h, dlq::DLQ_ORIGIN_PARTITION).unwrap().parse().unwrap(),
            header(h, dlq::DLQ_ORIGIN_OFFSET).unwrap().parse().unwrap(),
        );
        assert_eq!(Some(&d.payload), bad.get(&origin), "the dead letter of {origin:?} carries the message's bytes");
        assert_eq!(header(h, dlq::DLQ_REASON), Some(dlq::REASON_PAYLOAD));
        assert_eq!(header(h, dlq::DLQ_ATTEMPTS), Some("1"));
        assert_eq!(header(h, dlq::DLQ_ORIGIN_TOPIC), Some("orders"));
        let error = header(h, dlq::DLQ_ERROR).unwrap();
        assert!(error.contains("does not decode as") && error.contains("Order"), "{error}");
        *origins.entry(origin).or_insert(0) += 1;
    }
    assert!(origins.values().all(|n| *n == 1), "a bad event dead-lettered twice: {origins:?}");
    assert_eq!(origins.len(), bad.len());
    assert_eq!(stats.retried.load(Ordering::Relaxed), 0, "an undecodable payload is not retried");
    assert_eq!(stats.handled.load(Ordering::Relaxed), good);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), bad.len() as u64);
    assert_eq!(stats.delivered.load(Ordering::Relaxed), sent as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_handler_returning_the_payload_error_is_dead_lettered_without_retries() {
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", 1).await.unwrap();
    let bus = EventBus::builder(broker.clone()).config(defaults("ctx-payload-error")).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done) = mpsc::unbounded_channel::<i64>();
    {
        let calls = calls.clone();
        bus.subscribe_ordered("orders", move |env, _ctx| {
            calls.fetch_add(1, Ordering::SeqCst);
            let done_tx = done_tx.clone();
            async move {
                let order: Order = env.decode_payload()?;
                done_tx.send(order.version).unwrap();
                Ok::<(), eventbus::pool::HandlerError>(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    let poison = Envelope::new("agg-1", "OrderPlaced", 1, &serde_json::json!({ "amount": -1, "version": 1 })).unwrap();
    bus.publish_envelope("orders", &poison).await.unwrap();
    let good = Envelope::new("agg-1", "OrderPlaced", 2, &serde_json::json!({ "amount": 20, "version": 2 })).unwrap();
    bus.publish_envelope("orders", &good).await.unwrap();
    // The good event of the same aggregate runs only after the poison's dead letter.
    assert_eq!(next(&mut done, "the good event handled").await, 2);
    let stats = bus.consumer_stats().await.unwrap();
    bus.close().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one call for the poison event, one for the good one");
    assert_eq!(stats.retried.load(Ordering::Relaxed), 0);
    let dead = broker.read_topic("orders.dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, poison.encode().unwrap());
    assert_eq!(header(&dead[0].headers, dlq::DLQ_REASON), Some(dlq::REASON_PAYLOAD));
    assert_eq!(header(&dead[0].headers, dlq::DLQ_ATTEMPTS), Some("1"));
    assert_eq!(header(&dead[0].headers, dlq::DLQ_ORIGIN_OFFSET), Some("0"));
}

#[test]
fn decode_payload_returns_a_typed_error() {
    let shape =
        Envelope::new("agg-1", "OrderPlaced", 4, &serde_json::json!({ "amount": "lots", "version": 4 })).unwrap();
    let err: PayloadError = shape.decode_payload::<Order>().unwrap_err();
    assert_eq!(err.kind, PayloadErrorKind::WrongShape);
    assert_eq!(
        (err.type_name, err.event_type.as_str(), err.event_version),
        (std::any::type_name::<Order>(), "OrderPlaced", 4)
    );
    let text = err.to_string();
    assert!(text.starts_with("payload of OrderPlaced v4 does not decode as ") && text.contains("Order"), "{text}");
    // A base64 payload of arbitrary bytes is not JSON at all.
    let bytes = Envelope::with_payload_bytes("agg-1", "OrderPlaced", 5, vec![0xff, 0x00, 0x7b]).unwrap();
    assert_eq!(bytes.decode_payload::<Order>().unwrap_err().kind, PayloadErrorKind::NotJson);
    let ok = Envelope::new("agg-1", "OrderPlaced", 6, &serde_json::json!({ "amount": 60, "version": 6 })).unwrap();
    let order: Order = ok.decode_payload().unwrap();
    assert_eq!((order.amount, order.version), (60, 6));
}

/// The metrics of an undecodable typed payload: one failed attempt, no
/// retry, one dead letter under `reason="payload"` (`docs/operations.md`).
#[test]
fn an_undecodable_typed_payload_is_counted_under_its_own_reason() {
    use eventbus::telemetry as t;
    common::recorder::paused_with_recorder(|values| async move {
        let broker = MemoryBroker::default();
        broker.ensure_topic("orders", 1).await.unwrap();
        let bus = EventBus::builder(broker.clone()).config(defaults("ctx-metrics")).build().unwrap();
        let (done_tx, mut done) = mpsc::unbounded_channel::<i64>();
        bus.subscribe_typed("orders", move |order: Order, _env: Envelope, _ctx: DeliveryContext| {
            done_tx.send(order.version).unwrap();
            std::future::ready(Ok(()))
        })
        .await
        .unwrap();
        bus.start().await.unwrap();
        let poison = Envelope::new("agg-1", "OrderPlaced", 1, &serde_json::json!({ "amount": "x" })).unwrap();
        bus.publish_envelope("orders", &poison).await.unwrap();
        let good =
            Envelope::new("agg-1", "OrderPlaced", 2, &serde_json::json!({ "amount": 20, "version": 2 })).unwrap();
        bus.publish_envelope("orders", &good).await.unwrap();
        assert_eq!(next(&mut done, "the good event handled after the dead letter").await, 2);
        bus.close().await;
        let topic = [("topic", "orders")];
        assert_eq!(values.counter_or_zero(t::DEAD_LETTERED, &[("topic", "orders"), ("reason", "payload")]), 1);
        assert_eq!(values.counter_or_zero(t::DEAD_LETTERED, &[("topic", "orders"), ("reason", "handler")]), 0);
        assert_eq!(values.counter_or_zero(t::FAILED, &topic), 1);
        assert_eq!(values.counter_or_zero(t::RETRIED, &topic), 0);
        assert_eq!(values.counter_or_zero(t::HANDLED, &topic), 1);
    });
}

/// A broker redelivery (the first consumer closed with the event unfinished,
/// so it was never committed) starts the handler attempts again at 1, and
/// the context's `delivery_attempt` says the broker delivered it before.
#[tokio::test(start_paused = true)]
async fn a_broker_redelivery_restarts_the_attempts_and_says_so() {
    let broker = MemoryBroker::default();
    broker.ensure_topic("orders", 1).await.unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(&'static str, u32, u32, u64)>();
    let mut config = defaults("ctx-redelivery");
    config.close_timeout = Some(Duration::from_secs(1));
    let first = EventBus::builder(broker.clone()).config(config).build().unwrap();
    {
        let seen_tx = seen_tx.clone();
        // Fails its first attempt, then never finishes its second.
        first
            .subscribe_ordered("orders", move |_env, ctx| {
                seen_tx.send(("first", ctx.attempt(), ctx.delivery_attempt(), ctx.offset())).unwrap();
                let attempt = ctx.attempt();
                async move {
                    if attempt == 1 {
                        return Err("transient".into());
                    }
                    std::future::pending::<()>().await;
                    Ok(())
                }
            })
            .await
            .unwrap();
    }
    first.start().await.unwrap();
    first.publish_envelope("orders", &Envelope::new("agg-1", "Updated", 1, &1).unwrap()).await.unwrap();
    assert_eq!(next(&mut seen, "first attempt").await, ("first", 1, 1, 0));
    assert_eq!(next(&mut seen, "second attempt").await, ("first", 2, 1, 0));
    let report = first.close().await;
    assert_eq!(report.handed_back, 1, "the unfinished event is handed back uncommitted");

    let second = EventBus::builder(broker.clone()).config(defaults("ctx-redelivery")).build().unwrap();
    second
        .subscribe_ordered("orders", move |_env, ctx| {
            seen_tx.send(("second", ctx.attempt(), ctx.delivery_attempt(), ctx.offset())).unwrap();
            std::future::ready(Ok(()))
        })
        .await
        .unwrap();
    second.start().await.unwrap();
    assert_eq!(next(&mut seen, "redelivered").await, ("second", 1, 2, 0));
    second.close().await;
}
