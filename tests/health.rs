//! Health check, backlog alerts and callbacks on the memory broker.
//!
//! Each test runs on a current-thread runtime with paused time (the clock
//! jumps to the next timer whenever every task is idle), so windows and
//! intervals of seconds take no real time and every duration is exact.
//! Callbacks send into channels; tests wait on those, never on a sleep. The
//! metrics recorder is thread-local to the test (`metrics::with_local_recorder`).
#![cfg(not(feature = "loom"))]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::fast_config;
use eventbus::backlog::BacklogThreshold;
use eventbus::broker::memory::{partition_for_key, MemorySession};
use eventbus::health::HealthConfig;
use eventbus::observer::{BacklogConfig, ObservabilityConfig};
use eventbus::telemetry as t;
use eventbus::{
    BacklogEvent, BacklogSource, Broker, BrokerError, BusConfig, ConnectionEvent, ConnectionState, Envelope, EventBus,
    HealthAlert, MemoryBroker, Outbound, Position, TopicPartition,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

/// Runs `test` on a paused current-thread runtime with a recorder of its own.
/// Its clock moves only when every task waits, straight to the next timer:
/// a `sleep` in such a test advances virtual time through every timer before
/// it (an outage's length, samples of the observer), deterministically; it
/// never waits for another thread.
fn paused<F: Future<Output = ()>>(test: impl FnOnce(Snapshotter) -> F) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    metrics::with_local_recorder(&recorder, || rt.block_on(test(snapshotter)));
}

/// One snapshot of the recorder. Taking it resets counters and gauges to
/// 0, so each check takes one and reads every value it needs from it.
struct Snap(Vec<(metrics_util::CompositeKey, Option<metrics::Unit>, Option<metrics::SharedString>, DebugValue)>);

impl Snap {
    fn take(s: &Snapshotter) -> Snap {
        Snap(s.snapshot().into_vec())
    }

    /// A gauge's or counter's value, `None` if never recorded.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.iter().find_map(|(k, _, _, v)| {
            let key = k.key();
            let mut have: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
            let mut want = labels.to_vec();
            have.sort_unstable();
            want.sort_unstable();
            if key.name() != name || have != want {
                return None;
            }
            match v {
                DebugValue::Gauge(g) => Some(g.into_inner()),
                DebugValue::Counter(c) => Some(*c as f64),
                DebugValue::Histogram(_) => None,
            }
        })
    }
}

/// The next event a callback sent, within a minute of virtual time.
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
        Ok(Some(v)) => v,
        Ok(None) => panic!("{what}: channel closed"),
        Err(_) => panic!("{what}: nothing within 60 s"),
    }
}

fn threshold(threshold: u64, for_ms: u64) -> BacklogThreshold {
    BacklogThreshold { threshold, for_duration: Duration::from_millis(for_ms), recover_for: Duration::ZERO }
}

/// Subscribes `topic` with handlers that each wait for one permit of the
/// returned gate.
async fn subscribe_gated<B: Broker>(bus: &EventBus<B>, topic: &str) -> Arc<Semaphore> {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    bus.subscribe_envelope(topic, move |_| {
        let g = g.clone();
        async move {
            g.acquire().await.unwrap().forget();
            Ok(())
        }
    })
    .await
    .unwrap();
    gate
}

fn observability(backlog: BacklogConfig) -> ObservabilityConfig {
    ObservabilityConfig { observe_interval: Duration::from_millis(100), backlog, health: HealthConfig::default() }
}

fn event(aggregate: &str, version: i64) -> Envelope {
    Envelope::new(aggregate, "Updated", version, &serde_json::json!({ "v": version })).unwrap()
}

#[test]
fn pool_backlog_starts_after_its_duration_and_recovers_when_drained() {
    paused(|metrics| async move {
        let mut config = fast_config("pool-backlog");
        config.pool.concurrency = 1;
        config.pool.capacity = 10;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bus = EventBus::builder(MemoryBroker::default())
            .config(config)
            .observability(observability(BacklogConfig { pool: Some(threshold(2, 300)), consumer_lag: None }))
            .on_backlog(move |e| {
                let _ = tx.send((*e, Instant::now()));
            })
            .build()
            .unwrap();
        // Handlers wait at the gate: one runs (concurrency 1), five queue.
        let gate = subscribe_gated(&bus, "orders").await;
        bus.start().await.unwrap();
        let published = Instant::now();
        for a in 0..6 {
            bus.publish_envelope("orders", &event(&format!("agg-{a}"), 1)).await.unwrap();
        }

        let (started, at) = next(&mut rx, "backlog start").await;
        assert_eq!(started, BacklogEvent::Started { source: BacklogSource::Pool, value: 5, threshold: 2 });
        // Above for 300 ms, seen at 100 ms samples: detected after 300..=400 ms.
        let waited = at - published;
        assert!(waited >= Duration::from_millis(300) && waited <= Duration::from_millis(400), "{waited:?}");
        let report = bus.health();
        assert_eq!((report.pool.queued, report.pool.in_flight, report.pool.capacity), (5, 1, 10));
        assert_eq!(report.backlog.len(), 1);
        assert_eq!((report.backlog[0].value, report.backlog[0].backlogged), (Some(5), true));
        assert!(report.backlogged() && report.ready());
        let snap = Snap::take(&metrics);
        assert_eq!(snap.get(t::BACKLOG, &[("source", "pool")]), Some(1.0));
        assert_eq!(snap.get(t::POOL_QUEUED, &[]), Some(5.0));
        assert_eq!(snap.get(t::POOL_IN_FLIGHT, &[]), Some(1.0));
        assert_eq!(snap.get(t::POOL_CAPACITY, &[]), Some(10.0));

        gate.add_permits(6);
        let (recovered, _) = next(&mut rx, "backlog recovery").await;
        assert_eq!(recovered, BacklogEvent::Recovered { source: BacklogSource::Pool, value: 0, threshold: 2 });
        let snap = Snap::take(&metrics);
        assert_eq!(snap.get(t::BACKLOG, &[("source", "pool")]), Some(0.0));
        assert_eq!(snap.get(t::POOL_QUEUED, &[]), Some(0.0));
        assert!(!bus.health().backlogged());
        bus.close().await;
        assert!(rx.try_recv().is_err(), "no event after the recovery");
    });
}

#[test]
fn consumer_lag_is_what_was_published_and_recovers_once_consumed() {
    paused(|metrics| async move {
        let broker = MemoryBroker::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bus = EventBus::builder(broker.clone())
            .config(fast_config("lagging"))
            .observability(observability(BacklogConfig { pool: None, consumer_lag: Some(threshold(5, 0)) }))
            .on_backlog(move |e| {
                let _ = tx.send(*e);
            })
            .build()
            .unwrap();
        bus.subscribe_envelope("orders", |_| async { Ok(()) }).await.unwrap();
        // Published, not consumed yet (not started): the lag is exactly 7.
        for a in 0..7 {
            bus.publish_envelope("orders", &event(&format!("agg-{a}"), 1)).await.unwrap();
        }
        let started = next(&mut rx, "lag backlog").await;
        assert_eq!(started, BacklogEvent::Started { source: BacklogSource::ConsumerLag, value: 7, threshold: 5 });
        assert_eq!(bus.health().consumer_lag, Some(7));
        let snap = Snap::take(&metrics);
        let mut per_partition = 0;
        for p in 0..3 {
            let end = broker.end_offset(&TopicPartition::new("orders", p));
            let gauge = snap.get(t::CONSUMER_LAG, &[("topic", "orders"), ("partition", &p.to_string())]);
            assert_eq!(gauge, Some(end as f64), "partition {p}");
            per_partition += end;
        }
        assert_eq!(per_partition, 7);

        bus.start().await.unwrap();
        let recovered = next(&mut rx, "lag recovery").await;
        assert_eq!(recovered, BacklogEvent::Recovered { source: BacklogSource::ConsumerLag, value: 0, threshold: 5 });
        assert_eq!(bus.health().consumer_lag, Some(0));
        bus.close().await;
    });
}

fn health_config(publish: bool, monitor: bool, instance: &str) -> ObservabilityConfig {
    ObservabilityConfig {
        observe_interval: Duration::from_millis(100),
        backlog: BacklogConfig::default(),
        health: HealthConfig {
            topic: "eventbus.health".into(),
            publish,
            publish_interval: Duration::from_millis(200),
            monitor,
            window: Duration::from_millis(1000),
            instance_id: Some(instance.into()),
        },
    }
}

fn health_publisher(broker: &MemoryBroker, instance: &str) -> EventBus<MemoryBroker> {
    let config = fast_config("publisher");
    let observability = health_config(true, false, instance);
    EventBus::builder(broker.clone()).config(config).observability(observability).build().unwrap()
}

#[test]
fn health_alert_fires_when_the_publisher_stops_and_clears_when_it_resumes() {
    paused(|metrics| async move {
        let broker = MemoryBroker::default();
        let window = Duration::from_millis(1000);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let monitor = EventBus::builder(broker.clone())
            .config(fast_config("monitor"))
            .observability(health_config(false, true, "monitor-1"))
            .on_health_alert(move |a| {
                let _ = tx.send((a.clone(), Instant::now()));
            })
            .build()
            .unwrap();
        monitor.start().await.unwrap();
        let started = Instant::now();

        // Nothing published yet: an alert one window after the monitor started.
        let (alert, at) = next(&mut rx, "first alert").await;
        assert_eq!(alert, HealthAlert::Missing { window, last_seen: None });
        assert_eq!(at - started, window);
        assert_eq!(Snap::take(&metrics).get(t::HEALTHY, &[]), Some(0.0));
        let report = monitor.health();
        assert!(!report.health_monitor.as_ref().unwrap().healthy);
        assert!(report.ready(), "a health alert does not make the bus unready");

        let publisher = health_publisher(&broker, "pub-a");
        let (alert, _) = next(&mut rx, "restored by pub-a").await;
        assert_eq!(alert, HealthAlert::Restored { instance: "pub-a".into() });
        assert_eq!(Snap::take(&metrics).get(t::HEALTHY, &[]), Some(1.0));
        // 5.1 s of virtual time with messages every 200 ms (26 of them): no alert.
        tokio::time::sleep(window * 5 + Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "no alert while health messages arrive");
        let report = monitor.health();
        let status = report.health_monitor.unwrap();
        assert!(status.healthy && status.last_seen.is_some());
        assert_eq!(status.last_instance.as_deref(), Some("pub-a"));
        let sent = publisher.health().health_publisher.unwrap();
        assert_eq!((sent.topic.as_str(), sent.instance_id.as_str()), ("eventbus.health", "pub-a"));
        assert_eq!(sent.last_error, None);
        assert_eq!((sent.published, status.received), (26, 26));

        publisher.close().await;
        let stopped = Instant::now();
        let (alert, at) = next(&mut rx, "alert after pub-a stopped").await;
        assert!(matches!(alert, HealthAlert::Missing { window: w, last_seen: Some(_) } if w == window), "{alert:?}");
        // The last message was at most one publish interval before the stop.
        let silent = at - stopped;
        assert!(silent >= window - Duration::from_millis(200) && silent <= window, "{silent:?}");
        assert_eq!(Snap::take(&metrics).get(t::HEALTHY, &[]), Some(0.0));

        let publisher = health_publisher(&broker, "pub-b");
        let (alert, _) = next(&mut rx, "restored by pub-b").await;
        assert_eq!(alert, HealthAlert::Restored { instance: "pub-b".into() });
        assert!(monitor.health().health_monitor.unwrap().healthy);
        publisher.close().await;
        monitor.close().await;
        assert!(rx.try_recv().is_err(), "exactly four alerts");
    });
}

#[test]
fn connection_loss_and_return_call_back_count_and_gate_readiness() {
    paused(|metrics| async move {
        let broker = MemoryBroker::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bus = EventBus::builder(broker.clone())
            .config(fast_config("conn"))
            .observability(observability(BacklogConfig::default()))
            .on_connection(move |e| {
                let _ = tx.send(*e);
            })
            .build()
            .unwrap();
        assert_eq!(bus.health().connection, Some(ConnectionState::Connected));
        tokio::task::yield_now().await; // the observer's first run records the gauge
        assert_eq!(Snap::take(&metrics).get(t::CONNECTED, &[]), Some(1.0));

        broker.set_connection_state(ConnectionState::Disconnected);
        assert_eq!(next(&mut rx, "disconnect").await, ConnectionEvent::Disconnected);
        let report = bus.health();
        assert_eq!((report.connection, report.ready()), (Some(ConnectionState::Disconnected), false));
        assert_eq!(Snap::take(&metrics).get(t::CONNECTED, &[]), Some(0.0));

        tokio::time::sleep(Duration::from_secs(3)).await; // the outage
        broker.set_connection_state(ConnectionState::Connected);
        assert_eq!(next(&mut rx, "reconnect").await, ConnectionEvent::Reconnected { down_for: Duration::from_secs(3) });
        let report = bus.health();
        assert_eq!((report.connection, report.ready(), report.reconnects), (Some(ConnectionState::Connected), true, 1));
        let snap = Snap::take(&metrics);
        assert_eq!((snap.get(t::CONNECTED, &[]), snap.get(t::RECONNECTS, &[])), (Some(1.0), Some(1.0)));
        bus.close().await;
        assert!(!bus.health().ready(), "a closed bus is not ready");
    });
}

#[test]
fn a_panicking_callback_does_not_stop_the_observer() {
    paused(|_| async move {
        let broker = MemoryBroker::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bus = EventBus::builder(broker.clone())
            .config(fast_config("panics"))
            .observability(observability(BacklogConfig::default()))
            .on_connection(move |e| {
                let _ = tx.send(*e);
                assert!(*e != ConnectionEvent::Disconnected, "a buggy callback panics");
            })
            .build()
            .unwrap();
        broker.set_connection_state(ConnectionState::Disconnected);
        assert_eq!(next(&mut rx, "disconnect").await, ConnectionEvent::Disconnected);
        tokio::time::sleep(Duration::from_secs(1)).await;
        broker.set_connection_state(ConnectionState::Connected);
        assert_eq!(next(&mut rx, "reconnect").await, ConnectionEvent::Reconnected { down_for: Duration::from_secs(1) });
        assert_eq!(bus.health().reconnects, 1);
        bus.close().await;
    });
}

type Outcome = (String, String, String, Result<Position, String>);

#[test]
fn publish_results_report_success_failure_and_background_publishes() {
    paused(|_| async move {
        let broker = MemoryBroker::default();
        let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
        let bus = Arc::new(
            EventBus::builder(broker.clone())
                .config(fast_config("results"))
                .on_publish_result(move |r| {
                    let result = r.result.map_err(|e| e.to_string());
                    let _ = tx.send((r.event_id(), r.topic.into(), r.aggregate_id.into(), result));
                })
                .build()
                .unwrap(),
        );
        assert_eq!(bus.health().last_publish, None);
        let partition = partition_for_key(b"order-1", 3);
        let position = bus.publish_envelope("orders", &event("order-1", 1)).await.unwrap();
        assert_eq!(position, Position { partition, offset: 0, duplicate: false });
        let ok = next(&mut rx, "success").await;
        assert_eq!(ok, ("order-1:Updated:1".into(), "orders".into(), "order-1".into(), Ok(position)));
        let last_publish = bus.health().last_publish;
        assert!(last_publish.is_some());

        broker.set_connection_state(ConnectionState::Disconnected);
        assert!(bus.publish_envelope("orders", &event("order-1", 2)).await.is_err());
        let failed = next(&mut rx, "failure").await;
        let error = "broker unavailable: memory broker: simulated disconnection".to_string();
        assert_eq!(failed, ("order-1:Updated:2".into(), "orders".into(), "order-1".into(), Err(error)));
        assert_eq!(bus.health().last_publish, last_publish, "a failed publish is not a successful one");

        broker.set_connection_state(ConnectionState::Connected);
        bus.publish_envelope_async("orders", event("order-1", 3));
        let background = next(&mut rx, "background publish").await;
        let stored = Position { partition, offset: 1, duplicate: false };
        assert_eq!(background, ("order-1:Updated:3".into(), "orders".into(), "order-1".into(), Ok(stored)));

        bus.publish_envelope_async("orders", event("order-1", 4));
        bus.close().await; // waits for the background publish
        assert_eq!(next(&mut rx, "drained by close").await.3, Ok(Position { partition, offset: 2, duplicate: false }));
        bus.publish_envelope_async("orders", event("order-1", 5));
        assert_eq!(next(&mut rx, "after close").await.3, Err("bus closed".into()));
        assert_eq!(broker.end_offset(&TopicPartition::new("orders", partition)), 3);
    });
}

#[test]
fn health_report_serializes_what_the_bus_knows() {
    paused(|_| async move {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bus = EventBus::builder(MemoryBroker::default())
            .config(fast_config("report"))
            .observability(observability(BacklogConfig {
                pool: Some(threshold(100, 0)),
                consumer_lag: Some(threshold(50, 0)),
            }))
            .build()
            .unwrap();
        bus.subscribe_envelope("orders", move |e: Envelope| {
            let _ = tx.send(e.event_version);
            async { Ok(()) }
        })
        .await
        .unwrap();
        let fresh = serde_json::to_value(bus.health()).unwrap();
        assert_eq!((fresh["last_publish"].is_null(), fresh["last_consume"].is_null()), (true, true));
        bus.start().await.unwrap();
        bus.publish_envelope("orders", &event("order-9", 1)).await.unwrap();
        assert_eq!(next(&mut rx, "handled").await, 1);
        // Wait for the observer's sample that sees the commit (commits every
        // 10 ms, samples every 100 ms of virtual time).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let report = loop {
            let report = serde_json::to_value(bus.health()).unwrap();
            if report["consumer_lag"] == 0 && report["last_consume"].is_string() {
                break report;
            }
            assert!(tokio::time::Instant::now() < deadline, "no sample of the commit: {report}");
            tokio::time::sleep(Duration::from_millis(10)).await; // polling interval of the condition
        };
        assert_eq!(report["ready"], true);
        assert_eq!(report["connection"], "connected");
        assert_eq!((report["closed"].clone(), report["reconnects"].clone()), (false.into(), 0.into()));
        assert!(report["last_publish"].as_str().is_some_and(|t| t.ends_with('Z')), "{report}");
        assert!(report["last_consume"].as_str().is_some(), "{report}");
        assert_eq!(report["pool"], serde_json::json!({ "queued": 0, "in_flight": 0, "capacity": 1000 }));
        assert_eq!(report["consumer_lag"], 0);
        assert!(report["consumer_lag_error"].is_null());
        let backlog = serde_json::json!([
            { "source": "pool", "value": 0, "threshold": 100, "backlogged": false },
            { "source": "consumer_lag", "value": 0, "threshold": 50, "backlogged": false },
        ]);
        assert_eq!(report["backlog"], backlog);
        assert!(report["health_monitor"].is_null() && report["health_publisher"].is_null());

        bus.close().await;
        let closed = bus.health();
        assert_eq!((closed.closed, closed.ready()), (true, false));
    });
}

/// A broker that cannot report consumer lag (the trait's default).
#[derive(Clone, Default)]
struct NoLag(MemoryBroker);

impl Broker for NoLag {
    type Session = MemorySession;

    async fn publish(&self, msg: Outbound) -> Result<Position, BrokerError> {
        self.0.publish(msg).await
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<MemorySession, BrokerError> {
        self.0.subscribe(group, topics).await
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        self.0.ensure_topic(topic, partitions).await
    }
}

#[test]
fn unknown_lag_is_reported_and_the_observer_keeps_going() {
    paused(|_| async move {
        let mut config = fast_config("nolag");
        config.pool.concurrency = 1;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let backlog = BacklogConfig { pool: Some(threshold(0, 500)), consumer_lag: Some(threshold(0, 0)) };
        let bus = EventBus::builder(NoLag::default())
            .config(config)
            .observability(observability(backlog))
            .on_backlog(move |e| {
                let _ = tx.send(*e);
            })
            .build()
            .unwrap();
        let gate = subscribe_gated(&bus, "orders").await;
        bus.start().await.unwrap();
        bus.publish_envelope("orders", &event("a", 1)).await.unwrap();
        bus.publish_envelope("orders", &event("b", 1)).await.unwrap();
        // Five samples later, each with a lag error: the pool alert still comes.
        assert_eq!(next(&mut rx, "pool backlog").await, BacklogEvent::Started {
            source: BacklogSource::Pool,
            value: 1,
            threshold: 0,
        });
        let report = bus.health();
        assert_eq!(report.consumer_lag, None);
        assert_eq!(report.consumer_lag_error.as_deref(), Some("this broker does not report consumer lag"));
        let lag = report.backlog.iter().find(|b| b.source == BacklogSource::ConsumerLag).unwrap();
        assert_eq!((lag.value, lag.backlogged), (None, false));
        gate.add_permits(2);
        assert!(matches!(next(&mut rx, "pool recovery").await, BacklogEvent::Recovered { value: 0, .. }));
        bus.close().await;
    });
}

#[test]
fn configuration_errors_name_the_key() {
    let key = |text: &str| match ObservabilityConfig::from_toml(text) {
        Err(eventbus::bus::ConfigError::Invalid { key, .. }) => key.to_string(),
        other => format!("{other:?}"),
    };
    assert_eq!(key("observe_interval = 0"), "observability.observe_interval");
    assert_eq!(
        key("[health]\npublish = true\nmonitor = true\npublish_interval = 1000\nwindow = 1000"),
        "observability.health.window"
    );
    assert_eq!(key("[health]\npublish = true\npublish_interval = 0"), "observability.health.publish_interval");
    assert_eq!(key("[health]\nmonitor = true\ntopic = \" \""), "observability.health.topic");
    assert_eq!(key("[health]\npublish = true\ninstance_id = \"bad id\""), "observability.health.instance_id");
    let err = ObservabilityConfig::from_toml("[backlog.pool]\nthreshold = 5\nbogus = 1").unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");

    let text = "observe_interval = 250\n[backlog.consumer_lag]\nthreshold = 10000\nfor_duration = 60000\n\
                [health]\nmonitor = true\nwindow = 30000\n";
    let config = ObservabilityConfig::from_toml(text).unwrap();
    assert_eq!(config.observe_interval, Duration::from_millis(250));
    assert_eq!(config.backlog.consumer_lag, Some(BacklogThreshold {
        threshold: 10_000,
        for_duration: Duration::from_secs(60),
        recover_for: Duration::ZERO,
    }));
    assert_eq!(config.backlog.pool, None);
    let health = &config.health;
    assert_eq!((health.monitor, health.publish, health.window), (true, false, Duration::from_secs(30)));
    let yaml = ObservabilityConfig::from_yaml("backlog:\n  pool:\n    threshold: 3\n").unwrap();
    assert_eq!(yaml.backlog.pool.map(|t| t.threshold), Some(3));
}

/// One bus configuration file holds the observability section too, and its
/// errors name the full key.
#[test]
fn bus_config_file_carries_the_observability_section() {
    let text = "[consumer]\ngroup = \"billing\"\n[observability]\nobserve_interval = 250\n\
                [observability.backlog.pool]\nthreshold = 7\n";
    let config = BusConfig::from_toml(text).unwrap();
    assert_eq!(config.consumer.group, "billing");
    assert_eq!(config.observability.observe_interval, Duration::from_millis(250));
    assert_eq!(config.observability.backlog.pool.map(|t| t.threshold), Some(7));
    match BusConfig::from_toml("[observability.health]\npublish = true\npublish_interval = 0") {
        Err(eventbus::bus::ConfigError::Invalid { key, .. }) => assert_eq!(key, "observability.health.publish_interval"),
        other => panic!("expected the key to be named, got {other:?}"),
    }
}

#[test]
fn close_leaves_no_observer_or_health_task_alive() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut health = health_config(true, true, "self-check");
        health.observe_interval = Duration::from_millis(5);
        health.health.publish_interval = Duration::from_millis(5);
        health.health.window = Duration::from_millis(50);
        health.backlog = BacklogConfig { pool: Some(threshold(0, 0)), consumer_lag: Some(threshold(0, 0)) };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bus = Arc::new(
            EventBus::builder(MemoryBroker::default())
                .config(BusConfig { close_timeout: Some(Duration::from_secs(5)), ..fast_config("tasks") })
                .observability(health)
                .on_publish_result(move |r| {
                    let _ = tx.send(r.is_ok());
                })
                .build()
                .unwrap(),
        );
        bus.subscribe_envelope("orders", |_| async { Ok(()) }).await.unwrap();
        bus.start().await.unwrap();
        bus.publish_envelope_async("orders", event("a", 1));
        assert!(next(&mut rx, "background publish").await);
        // Wait (bounded) until the monitor has seen its own health messages.
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while bus.health().health_monitor.is_none_or(|m| m.received == 0) {
                tokio::task::yield_now().await;
            }
        });
        seen.await.expect("health message consumed within 10 s");
        bus.close().await;
        assert_eq!(common::alive_tasks_after_release().await, 0);
    });
}

#[test]
fn dropping_the_bus_without_close_stops_its_tasks() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut observability = health_config(true, false, "dropped");
        observability.observe_interval = Duration::from_millis(5);
        let bus = EventBus::builder(MemoryBroker::default()).config(fast_config("dropped")).observability(observability);
        let bus = bus.build().unwrap();
        bus.publish_envelope("orders", &event("a", 1)).await.unwrap();
        drop(bus); // the observer and the health publisher see their stop channel close
        assert_eq!(common::alive_tasks_after_release().await, 0);
    });
}
