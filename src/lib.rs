//! eventbus: publish domain events to Kafka or NATS JetStream and consume them
//! through one global keyed worker pool — per-aggregate order, cross-aggregate
//! parallelism, and guarantees that are model-checked, property-tested and simulated.

mod sync;
pub mod pool;
pub mod envelope;
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
pub use envelope::{Envelope, PayloadEncoding};
