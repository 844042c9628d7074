//! eventbus: publish domain events to Kafka or NATS JetStream and consume them
//! through one global keyed worker pool — per-aggregate order, cross-aggregate
//! parallelism, and guarantees that are model-checked, property-tested and simulated.
//!
//! # Using it
//!
//! A service configures a bus over a broker, subscribes a handler per topic,
//! starts consuming, publishes, and closes the bus when it stops. On the
//! in-memory broker (Kafka and NATS are the same, with
//! `broker::kafka::KafkaBroker` (feature `kafka`) or `broker::nats::NatsBroker`
//! (feature `nats`) in place of [`MemoryBroker`]):
//!
//! ```
//! use eventbus::{BusConfig, Envelope, EventBus, MemoryBroker};
//!
//! # // Under `--features loom` the pool's primitives are loom's, which run
//! # // only inside a loom model (tests/loom_pool.rs): the example is skipped.
//! # #[cfg(feature = "loom")] fn main() {}
//! # #[cfg(not(feature = "loom"))]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Configure: the bus from TOML (a file: `BusConfig::load(path)`, with
//! // environment overrides), the broker adapter in code here.
//! let config = BusConfig::from_toml(
//!     r#"
//!     close_timeout = 5000          # ms; then unfinished events are handed back
//!     [pool]
//!     concurrency = 8               # workers shared by every topic
//!     capacity = 1000               # queued + in flight
//!     [consumer]
//!     group = "billing"
//!     "#,
//! )?;
//! let bus = EventBus::builder(MemoryBroker::default()).config(config).build()?;
//!
//! // Subscribe: the events of one aggregate arrive one at a time, in order;
//! // an error is retried, then dead-lettered.
//! let (seen, mut handled) = tokio::sync::mpsc::unbounded_channel();
//! bus.subscribe_envelope("orders", move |event: Envelope| {
//!     let seen = seen.clone();
//!     async move {
//!         seen.send((event.aggregate_id, event.event_version))?;
//!         Ok(())
//!     }
//! })
//! .await?;
//!
//! // Start: one consumer-group join for every subscribed topic.
//! bus.start().await?;
//!
//! // Publish: keyed by the aggregate ID; returns once the broker acknowledged.
//! for version in 1..=3 {
//!     let event = Envelope::new("order-42", "OrderUpdated", version, &serde_json::json!({ "step": version }))?;
//!     bus.publish_envelope("orders", &event).await?;
//! }
//! for version in 1..=3 {
//!     assert_eq!(handled.recv().await, Some(("order-42".to_string(), version)));
//! }
//!
//! // Close: stop reading, drain the pool, commit, leave the group. When it
//! // returns, no task of the bus is alive.
//! let report = bus.close().await;
//! assert_eq!(report.handed_back, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Where things are
//!
//! - [`EventBus`] and [`BusConfig`] ([`bus`]); the `[broker]` section of a
//!   configuration file and its environment overrides ([`settings`]).
//! - [`Envelope`], the wire format ([`envelope`], `docs/wire.md`).
//! - The [`Broker`] trait and its adapters ([`broker`]): [`MemoryBroker`],
//!   `broker::nats` (feature `nats`), `broker::kafka` (feature `kafka`).
//! - The consumer's settings, retries and dead letters ([`consumer`]); the
//!   keyed worker pool ([`pool`]).
//! - Errors ([`error`]), the health report and the close report ([`status`]),
//!   callbacks ([`callbacks`]), the observer, backlog alerts and the health
//!   check ([`observer`], [`backlog`], [`health`]), metric names
//!   ([`telemetry`]).
//! - Test support, not service API: `eventbus::testing` (feature
//!   `testing`), an order checker for handlers' tests.
//!
//! # Features
//!
//! `nats`, `kafka` (default): the adapters. `prometheus`: the Prometheus
//! exporter ([`telemetry`]). `yaml`: YAML configuration files. `testing`: the
//! order checker `eventbus::testing::OrderChecker`. `loom`: the pool core's
//! model-checked primitives, for `cargo test --features loom --release --test
//! loom_pool` only.

#![warn(missing_docs)]

mod sync;
pub mod pool;
pub mod envelope;
pub mod context;
mod config;
pub mod broker;
pub mod consumer;
pub mod error;
pub mod backlog;
pub mod status;
pub mod callbacks;
pub mod health;
pub mod observer;
pub mod bus;
pub mod settings;
#[cfg(feature = "testing")]
pub mod testing;
pub mod telemetry;
mod metric_names;
#[cfg(feature = "planted-bugs")]
pub mod planted;

pub use broker::memory::{MemoryBroker, MemoryConfig};
pub use broker::{
    Broker, BrokerError, ConnectionState, ErrorClass, Delivery, Headers, Outbound, PartitionLag, Position, Session, SessionEvent,
    TopicPartition,
};
pub use backlog::{BacklogEvent, BacklogSource};
pub use bus::{BusConfig, EventBus};
pub use error::{ConfigError, PublishError, SubscribeError};
pub use status::CloseReport;
pub use broker::secret::Secret;
pub use settings::{BrokerConfig, BrokerKind};
pub use callbacks::{Callbacks, ConnectionEvent, HealthAlert, PublishResult};
pub use health::HealthReport;
pub use context::DeliveryContext;
pub use envelope::{Envelope, PayloadEncoding, PayloadError, PayloadErrorKind};
