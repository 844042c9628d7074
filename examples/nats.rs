//! The smallest real service on NATS JetStream: configure, subscribe an
//! envelope handler, publish, shut down on Ctrl-C.
//!
//! Needs a nats-server with JetStream (`nats-server -js`):
//!
//! ```text
//! cargo run --example nats -- nats://127.0.0.1:4222
//! ```

#[cfg(feature = "nats")]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use eventbus::broker::nats::{NatsBroker, NatsConfig};
    use eventbus::{BusConfig, Envelope, EventBus};

    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let url = std::env::args().nth(1).unwrap_or_else(|| "nats://127.0.0.1:4222".into());

    // Configure: the bus (pool, consumer group, retries) and the adapter.
    let mut config = BusConfig::default();
    config.consumer.group = "example-service".into();
    let nats = NatsConfig { url, ..NatsConfig::default() }.bounded(config.pool.capacity);
    let bus = EventBus::builder(NatsBroker::connect(nats).await?).config(config).build()?;

    // Subscribe: events of one order are handled one at a time, in order.
    bus.subscribe_envelope("orders", |event: Envelope| async move {
        tracing::info!(order = %event.aggregate_id, version = event.event_version, "handled {}", event.event_type);
        Ok(())
    })
    .await?;
    bus.start().await?;

    // Publish: each call returns once JetStream stored the event.
    for version in 1..=3 {
        let event = Envelope::new("order-1", "OrderUpdated", version, &serde_json::json!({ "step": version }))?;
        let position = bus.publish_envelope("orders", &event).await?;
        tracing::info!(seq = position.offset, "published");
    }

    tracing::info!("running; press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    // Drain the pool, acknowledge what completed, leave the group.
    let report = bus.close().await;
    tracing::info!(handed_back = report.handed_back, commit_error = ?report.final_commit_error, "closed");
    Ok(())
}

#[cfg(not(feature = "nats"))]
fn main() {
    eprintln!("this example needs the `nats` feature");
}
