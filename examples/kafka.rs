//! The smallest real service on Kafka: configure, subscribe an envelope
//! handler, publish, shut down on Ctrl-C.
//!
//! Needs a Kafka-protocol broker (e.g. `scripts/tansu` starts tansu on
//! 127.0.0.1:9092):
//!
//! ```text
//! cargo run --example kafka -- 127.0.0.1:9092
//! ```

#[cfg(feature = "kafka")]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use eventbus::broker::kafka::{KafkaBroker, KafkaConfig};
    use eventbus::{Broker, BusConfig, Envelope, EventBus};

    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let brokers = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9092".into());

    // Configure: the bus (pool, consumer group, retries) and the adapter.
    let mut config = BusConfig::default();
    config.consumer.group = "example-service".into();
    let kafka = KafkaConfig { brokers, client_id: "example-service".into(), ..KafkaConfig::default() }
        .bounded(config.pool.capacity);
    let broker = KafkaBroker::connect(kafka).await?;
    // Three partitions: events of one order always land on the same one.
    broker.ensure_topic("orders", 3).await?;
    let bus = EventBus::builder(broker).config(config).build()?;

    // Subscribe: events of one order are handled one at a time, in order.
    bus.subscribe_envelope("orders", |event: Envelope| async move {
        tracing::info!(order = %event.aggregate_id, version = event.event_version, "handled {}", event.event_type);
        Ok(())
    })
    .await?;
    bus.start().await?;

    // Publish: each call returns once the partition leader acknowledged it.
    for version in 1..=3 {
        let event = Envelope::new("order-1", "OrderUpdated", version, &serde_json::json!({ "step": version }))?;
        let position = bus.publish_envelope("orders", &event).await?;
        tracing::info!(partition = position.partition, offset = position.offset, "published");
    }

    tracing::info!("running; press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    // Drain the pool, commit what completed, leave the group.
    let report = bus.close().await;
    tracing::info!(handed_back = report.handed_back, commit_error = ?report.final_commit_error, "closed");
    Ok(())
}

#[cfg(not(feature = "kafka"))]
fn main() {
    eprintln!("this example needs the `kafka` feature");
}
