//! eventbus: publish domain events to Kafka or NATS JetStream and consume them
//! through one global keyed worker pool — per-aggregate order, cross-aggregate
//! parallelism, and guarantees that are model-checked, property-tested and simulated.

pub mod sync;
pub mod pool;
pub mod envelope;
