//! The state reports of a bus: [`HealthReport`] (what `EventBus::health()`
//! returns, with the pool, backlog, health monitor and publisher states it is
//! made of) and [`CloseReport`] (what `EventBus::close()` did).
//!
//! Plain data, below the tasks that fill them in (the observer, the health
//! tasks, the bus), so none of those imports another for a type
//! (`docs/architecture.md`, "Module layers"). The old paths
//! (`eventbus::health::HealthReport`, `eventbus::bus::CloseReport`, ...)
//! re-export them.

use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

use crate::backlog::BacklogSource;
use crate::broker::ConnectionState;

/// Backlog state of one configured source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BacklogStatus {
    /// What is measured: the pool's queue or the consumer lag.
    pub source: BacklogSource,
    /// The latest sample; `None` before the first or while unknown.
    pub value: Option<u64>,
    /// The configured threshold (`observability.backlog`).
    pub threshold: u64,
    /// Between a `Started` and the next `Recovered`.
    pub backlogged: bool,
}

/// The health monitor's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MonitorStatus {
    /// False between an alert and the next health message.
    pub healthy: bool,
    /// Alert when no health message arrived for this long (milliseconds in JSON).
    #[serde(serialize_with = "millis")]
    pub window: Duration,
    /// When the last health message arrived (RFC 3339 in JSON); `None` before the first.
    #[serde(serialize_with = "rfc3339")]
    pub last_seen: Option<SystemTime>,
    /// Instance ID of the last health message.
    pub last_instance: Option<String>,
    /// Health messages received.
    pub received: u64,
}

/// The health publisher's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublisherStatus {
    /// The health topic.
    pub topic: String,
    /// This instance's ID in its health messages.
    pub instance_id: String,
    /// Health messages the broker acknowledged.
    pub published: u64,
    /// When the broker last acknowledged one (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub last_published: Option<SystemTime>,
    /// The error of the latest attempt, if it failed.
    pub last_error: Option<String>,
}

/// The pool's counts when the report was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// Tasks waiting for a worker (or for their aggregate's previous event).
    pub queued: usize,
    /// Tasks a worker runs now, or parked (retry backoff) holding their slot.
    pub in_flight: usize,
    /// The bound on queued + in flight (`pool.capacity`).
    pub capacity: usize,
}

/// What `EventBus::health()` returns; serializes to JSON for a status endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    pub(crate) ready: bool,
    /// The broker connection as last seen (read at `build`, then watched).
    pub connection: Option<ConnectionState>,
    /// `close` has begun.
    pub closed: bool,
    /// Disconnected → connected transitions seen.
    pub reconnects: u64,
    /// Last publish the broker acknowledged (any topic; not health messages).
    #[serde(serialize_with = "rfc3339")]
    pub last_publish: Option<SystemTime>,
    /// Last event a handler finished successfully (health messages included).
    #[serde(serialize_with = "rfc3339")]
    pub last_consume: Option<SystemTime>,
    /// The global pool's counts.
    pub pool: PoolStatus,
    /// The group's total lag on its subscribed topics at the last sample;
    /// `None` if not sampled yet, nothing is subscribed, or unknown.
    pub consumer_lag: Option<u64>,
    /// Why the lag is unknown, when the broker could not report it.
    pub consumer_lag_error: Option<String>,
    /// One entry per source with a configured threshold.
    pub backlog: Vec<BacklogStatus>,
    /// `None` when the monitor is off or the bus is not started.
    pub health_monitor: Option<MonitorStatus>,
    /// `None` when the publisher is off.
    pub health_publisher: Option<PublisherStatus>,
    /// Events whose dead letter the broker does not take yet; each holds its
    /// aggregate and its partition's commit. Not ready while any is stuck.
    pub dead_letters_stuck: u64,
    /// The consumer's group session failed and is being rebuilt: not ready.
    pub consumer_session_down: bool,
}

impl HealthReport {
    /// For a readiness probe: the bus is open, its broker reachable, its
    /// consumer session up and no dead letter stuck. Backlog and health
    /// alerts are not part of it: taking a lagging or unmonitored instance
    /// out of rotation does not help it catch up.
    pub fn ready(&self) -> bool {
        self.ready
    }

    pub(crate) fn ready_from(closed: bool, connection: Option<ConnectionState>) -> bool {
        !closed && connection != Some(ConnectionState::Disconnected)
    }

    /// Whether any configured backlog source is backlogged.
    pub fn backlogged(&self) -> bool {
        self.backlog.iter().any(|b| b.backlogged)
    }
}

fn rfc3339<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    let text =
        t.and_then(|t| time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).ok());
    match text {
        Some(text) => s.serialize_some(&text),
        None => s.serialize_none(),
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// What `EventBus::close` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Accepted events handed back unprocessed (uncommitted; redelivered).
    pub handed_back: usize,
    /// Why the final commit of the consumer's frontiers failed, or closing
    /// the broker session (which commits the stored offsets on Kafka), if
    /// either did (those events are redelivered to the group's next member).
    pub final_commit_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_means_open_and_not_known_disconnected() {
        assert!(HealthReport::ready_from(false, Some(ConnectionState::Connected)));
        assert!(!HealthReport::ready_from(false, Some(ConnectionState::Disconnected)));
        assert!(!HealthReport::ready_from(true, Some(ConnectionState::Connected)));
    }
}
