//! The bus's metrics on a Prometheus endpoint: a memory-broker bus handles a
//! steady stream of events (some fail once and are retried, a few always
//! fail and are dead-lettered) while `GET /metrics` serves the counters, the
//! latency histogram and the commit lag. Stops on Ctrl-C.
//!
//! ```text
//! cargo run --release --features prometheus --example observability -- 127.0.0.1:9000
//! curl -s 127.0.0.1:9000/metrics | grep eventbus_
//! ```
//!
//! The listen address is the first argument, else `EVENTBUS_METRICS_ADDR`,
//! else `127.0.0.1:9000`. See `docs/operations.md` for every metric.

use std::net::SocketAddr;
use std::time::Duration;

use eventbus::{BusConfig, Envelope, EventBus, MemoryBroker};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("EVENTBUS_METRICS_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:9000".into())
        .parse()?;
    eventbus::telemetry::install_prometheus(addr)?;
    tracing::info!("serving metrics on http://{addr}/metrics");

    let mut config = BusConfig::default();
    config.consumer.group = "observability-example".into();
    config.consumer.retry.initial_backoff = Duration::from_millis(20);
    let bus = EventBus::builder(MemoryBroker::default()).config(config).build()?;
    bus.subscribe_envelope("orders", |event: Envelope| async move {
        // Simulated work, and failures to show the retry and dead-letter counters.
        tokio::time::sleep(Duration::from_millis(event.event_version as u64 % 20)).await;
        match event.event_version {
            v if v % 97 == 0 => Err("order rejected for good".into()),
            v if v % 13 == 0 && rand::random::<bool>() => Err("transient failure".into()),
            _ => Ok(()),
        }
    })
    .await?;
    bus.start().await?;

    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut version = 0i64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                version += 1;
                let order = format!("order-{}", version % 50);
                let event = Envelope::new(order, "OrderUpdated", version, &serde_json::json!({ "n": version }))?;
                bus.publish_envelope("orders", &event).await?;
            }
        }
    }
    let report = bus.close().await;
    tracing::info!(handed_back = report.handed_back, commit_error = ?report.final_commit_error, "closed");
    Ok(())
}
