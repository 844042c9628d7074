//! The names of the bus's metrics, public as `eventbus::telemetry::*`.
//!
//! On the ground floor (`docs/architecture.md`, "Module layers"): the broker
//! adapters count what they dead-letter themselves, and [`crate::telemetry`],
//! which instruments publishing through a broker, sits above them.

/// Counter: messages the broker acknowledged (`topic`).
pub const PUBLISHED: &str = "eventbus_published_total";
/// Counter: publishes that failed (`topic`, `error` = kind).
pub const PUBLISH_FAILED: &str = "eventbus_publish_failed_total";
/// Counter: events a handler finished successfully (`topic`).
pub const HANDLED: &str = "eventbus_handled_total";
/// Counter: handler attempts that failed (`topic`).
pub const FAILED: &str = "eventbus_handler_failed_total";
/// Counter: handler attempts repeated after a failure (`topic`).
pub const RETRIED: &str = "eventbus_retried_total";
/// Counter: events sent to the dead-letter topic (`topic` = origin, `reason`).
pub const DEAD_LETTERED: &str = "eventbus_dead_lettered_total";
/// Gauge: events whose dead letter the broker does not take yet; each holds
/// its aggregate and its partition's commit until the write goes through (`topic`).
pub const DEAD_LETTER_STUCK: &str = "eventbus_dead_letter_stuck";
/// Counter: dead-letter writes that failed (`topic` = origin, `error` = kind).
pub const DEAD_LETTER_FAILED: &str = "eventbus_dead_letter_failed_total";
/// Counter: errors of the consumer's group session (`error` = kind).
pub const SESSION_ERRORS: &str = "eventbus_session_errors_total";
/// Counter: consumer group sessions rebuilt after a fatal session error.
pub const SESSION_REBUILDS: &str = "eventbus_session_rebuilds_total";
/// Counter: broker redeliveries of offsets already dispatched (`topic`).
pub const DUPLICATES: &str = "eventbus_duplicates_total";
/// Histogram, seconds: handler latency per event, retries included (`topic`).
pub const HANDLE_SECONDS: &str = "eventbus_handle_seconds";
/// Gauge: tasks waiting in the global pool.
pub const POOL_QUEUED: &str = "eventbus_pool_queued";
/// Gauge: tasks running in the global pool.
pub const POOL_IN_FLIGHT: &str = "eventbus_pool_in_flight";
/// Gauge: the pool's queue capacity.
pub const POOL_CAPACITY: &str = "eventbus_pool_capacity";
/// Gauge: events handled but not yet committed (`topic`, `partition`).
pub const COMMIT_LAG: &str = "eventbus_commit_lag";
/// Gauge: broker end offset minus the group's committed offset (`topic`, `partition`).
pub const CONSUMER_LAG: &str = "eventbus_consumer_lag";
/// Counter: commits that failed.
pub const COMMIT_ERRORS: &str = "eventbus_commit_errors_total";
/// Counter: assignment changes (assigned, revoked or lost).
pub const REBALANCES: &str = "eventbus_rebalances_total";
/// Counter: the broker connection came back after being lost.
pub const RECONNECTS: &str = "eventbus_reconnects_total";
/// Gauge: 1 while the broker is reachable, 0 while not.
pub const CONNECTED: &str = "eventbus_connected";
/// Gauge: 1 while a backlog alert is active (`source` = `pool` or `consumer_lag`).
pub const BACKLOG: &str = "eventbus_backlog";
/// Gauge: 1 while health messages arrive within the window, 0 after an alert.
pub const HEALTHY: &str = "eventbus_healthy";
