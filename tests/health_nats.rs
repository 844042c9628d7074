#![cfg(not(feature = "loom"))]
#![cfg(feature = "nats")]
//! The split health check against a real nats-server (JetStream) at
//! `EVENTBUS_NATS_URL` (default `nats://127.0.0.1:4222`): health messages
//! from one bus reach another bus's monitor through the stream, and the
//! monitor alerts once they stop. The topic has a random suffix and its
//! stream is deleted at the end.

use std::time::Duration;

use eventbus::broker::nats::{NatsBroker, NatsConfig};
use eventbus::health::HealthConfig;
use eventbus::observer::ObservabilityConfig;
use eventbus::{EventBus, HealthAlert};
use tokio::sync::mpsc;

fn nats_url() -> String {
    std::env::var("EVENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn connect() -> NatsBroker {
    let url = nats_url();
    match NatsBroker::connect(NatsConfig { url: url.clone(), ..NatsConfig::default() }).await {
        Ok(b) => b,
        Err(e) => panic!("NATS JetStream server not reachable at {url}: {e} (see tests/nats.rs for how to start one)"),
    }
}

fn observability(topic: &str, publish: bool, monitor: bool, instance: &str) -> ObservabilityConfig {
    ObservabilityConfig {
        observe_interval: Duration::from_millis(200),
        health: HealthConfig {
            topic: topic.into(),
            publish,
            publish_interval: Duration::from_millis(200),
            monitor,
            window: Duration::from_secs(2),
            instance_id: Some(instance.into()),
        },
        ..ObservabilityConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_messages_cross_jetstream_and_their_absence_alerts() {
    let topic = format!("ebt-health-{:08x}", rand::random::<u32>());
    let publisher = EventBus::builder(connect().await)
        .group(format!("{topic}-publisher"))
        .observability(observability(&topic, true, false, "nats-pub"))
        .build()
        .unwrap();
    let (tx, mut alerts) = mpsc::unbounded_channel();
    let monitor = EventBus::builder(connect().await)
        .group(format!("{topic}-monitor"))
        .observability(observability(&topic, false, true, "nats-monitor"))
        .on_health_alert(move |a| {
            let _ = tx.send(a.clone());
        })
        .build()
        .unwrap();
    monitor.start().await.unwrap();

    // Bounded wait for three health messages through the stream.
    let received = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let status = monitor.health().health_monitor.unwrap();
            if status.received >= 3 {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let status = received.await.expect("3 health messages within 20 s");
    assert_eq!(status.last_instance.as_deref(), Some("nats-pub"));
    let sent = publisher.health().health_publisher.unwrap();
    assert!(sent.published >= 3 && sent.last_error.is_none(), "{sent:?}");
    // A slow first message may have raised an alert; if so it was cleared.
    while let Ok(alert) = alerts.try_recv() {
        assert!(matches!(alert, HealthAlert::Missing { .. } | HealthAlert::Restored { .. }));
    }
    assert!(monitor.health().health_monitor.unwrap().healthy);

    publisher.close().await;
    let alert = tokio::time::timeout(Duration::from_secs(10), alerts.recv()).await.expect("alert within 10 s");
    match alert {
        Some(HealthAlert::Missing { window, last_seen }) => {
            assert_eq!(window, Duration::from_secs(2));
            assert!(last_seen.is_some());
        }
        other => panic!("expected a Missing alert, got {other:?}"),
    }
    assert!(!monitor.health().health_monitor.unwrap().healthy);
    monitor.close().await;
    let _ = monitor.broker().delete_topic(&topic).await;
}
