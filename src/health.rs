//! The split health check and the health report.
//!
//! - The health publisher (one task per bus, `health.publish`) publishes a
//!   small envelope on the health topic every `publish_interval`: aggregate
//!   ID = the instance ID, event type `HealthCheck`, payload
//!   `{"instance_id", "sequence"}`; the envelope's timestamp is when it was sent.
//! - The health monitor (`health.monitor`) subscribes to the health topic
//!   through the bus's own consumer, so a health message proves the whole
//!   path: broker, consumer, pool, handler. When none arrives within
//!   `window`, it alerts (callback, warn event, `eventbus_healthy` = 0); the
//!   next one clears the alert.
//! - [`HealthReport`] is what `EventBus::health()` returns, for a readiness
//!   probe or a status endpoint.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::backlog::BacklogSource;
use crate::broker::{Broker, ConnectionState, Outbound};
use crate::callbacks::{Callbacks, HealthAlert};
use crate::envelope::{Envelope, EnvelopeError};
use crate::observer::{stopped, Observed};
use crate::telemetry;

/// Event type of the health publisher's envelopes.
pub const HEALTH_EVENT_TYPE: &str = "HealthCheck";

/// The `observability.health` section. Both sides are off by default.
/// Durations are milliseconds in config files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Topic the health messages go to and are read from.
    pub topic: String,
    /// Run the health publisher.
    pub publish: bool,
    #[serde(with = "crate::config::millis")]
    pub publish_interval: Duration,
    /// Run the health monitor (subscribes to `topic` in the bus's group).
    pub monitor: bool,
    /// Alert when no health message arrived for this long.
    #[serde(with = "crate::config::millis")]
    pub window: Duration,
    /// This instance's ID in health messages (an aggregate ID: ASCII
    /// letters, digits and `:_-./`); default `$HOSTNAME-<pid>` or `instance-<pid>`.
    pub instance_id: Option<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            topic: "eventbus.health".into(),
            publish: false,
            publish_interval: Duration::from_secs(5),
            monitor: false,
            window: Duration::from_secs(15),
            instance_id: None,
        }
    }
}

impl HealthConfig {
    /// The configured instance ID, or one made from the host name and pid.
    pub fn instance_id(&self) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        let pid = std::process::id();
        let host: String = std::env::var("HOSTNAME")
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .take(200)
            .collect();
        if host.is_empty() { format!("instance-{pid}") } else { format!("{host}-{pid}") }
    }
}

/// The health publisher's message.
pub fn health_envelope(instance_id: &str, sequence: u64) -> Result<Envelope, EnvelopeError> {
    let payload = serde_json::json!({ "instance_id": instance_id, "sequence": sequence });
    Envelope::new(instance_id, HEALTH_EVENT_TYPE, 1, &payload)
}

/// Backlog state of one configured source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BacklogStatus {
    pub source: BacklogSource,
    /// The latest sample; `None` before the first or while unknown.
    pub value: Option<u64>,
    pub threshold: u64,
    /// Between a `Started` and the next `Recovered`.
    pub backlogged: bool,
}

/// The health monitor's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MonitorStatus {
    /// False between an alert and the next health message.
    pub healthy: bool,
    #[serde(serialize_with = "millis")]
    pub window: Duration,
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
    pub topic: String,
    pub instance_id: String,
    /// Health messages the broker acknowledged.
    pub published: u64,
    #[serde(serialize_with = "rfc3339")]
    pub last_published: Option<SystemTime>,
    /// The error of the latest attempt, if it failed.
    pub last_error: Option<String>,
}

/// The pool's counts when the report was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    pub queued: usize,
    pub in_flight: usize,
    pub capacity: usize,
}

/// What `EventBus::health()` returns; serializes to JSON for a status endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    pub(crate) ready: bool,
    /// The broker connection as last seen (read at `build`, then watched).
    pub connection: Option<ConnectionState>,
    pub closed: bool,
    /// Disconnected → connected transitions seen.
    pub reconnects: u64,
    /// Last publish the broker acknowledged (any topic; not health messages).
    #[serde(serialize_with = "rfc3339")]
    pub last_publish: Option<SystemTime>,
    /// Last event a handler finished successfully (health messages included).
    #[serde(serialize_with = "rfc3339")]
    pub last_consume: Option<SystemTime>,
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
    let text = t.and_then(|t| {
        time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).ok()
    });
    match text {
        Some(text) => s.serialize_some(&text),
        None => s.serialize_none(),
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// The health publisher task.
pub(crate) async fn run_publisher<B: Broker>(
    broker: Arc<B>,
    obs: Arc<Observed>,
    config: HealthConfig,
    instance_id: String,
    mut stop: watch::Receiver<bool>,
) {
    // NATS needs a stream for the topic; Kafka may not auto-create it.
    tokio::select! {
        biased;
        _ = stopped(&mut stop) => return,
        r = broker.ensure_topic(&config.topic, 1) => if let Err(e) = r {
            tracing::warn!(topic = config.topic, error = %e, "health topic not ensured; publishing anyway");
        },
    }
    let mut ticker = tokio::time::interval(config.publish_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            _ = ticker.tick() => {}
        }
        sequence += 1;
        let msg = match health_envelope(&instance_id, sequence).and_then(|e| Ok((e.encode()?, e.to_headers()))) {
            Ok((payload, headers)) => Outbound {
                topic: config.topic.clone(),
                key: Some(instance_id.as_bytes().to_vec()),
                headers,
                payload,
            },
            Err(e) => {
                // Only an invalid instance ID gets here, and validate() rejects those.
                tracing::error!(error = %e, "health message cannot be built; health publisher stops");
                return;
            }
        };
        let result = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            r = broker.publish(msg) => r,
        };
        let mut st = obs.lock();
        let Some(status) = st.publisher.as_mut() else { continue };
        match result {
            Ok(_) => {
                status.published += 1;
                status.last_published = Some(SystemTime::now());
                status.last_error = None;
                if std::mem::take(&mut failing) {
                    tracing::info!(topic = config.topic, "health messages publish again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(topic = config.topic, error = %e, "health message publish failed");
                }
                status.last_error = Some(e.to_string());
            }
        }
    }
}

/// The health monitor task; `Observed::health_received` (called by the
/// health topic's handler) feeds it.
pub(crate) async fn run_monitor(
    obs: Arc<Observed>,
    callbacks: Arc<Callbacks>,
    window: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    metrics::gauge!(telemetry::HEALTHY).set(1.0);
    let mut alerted = false;
    loop {
        // Health seen before the monitor started (a message handled between
        // `start` and this task's first poll) counts too.
        let last = obs.lock().last_health.unwrap_or(started);
        let deadline = last.max(started) + window;
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            _ = obs.health_seen.notified() => {
                if std::mem::take(&mut alerted) {
                    let instance = {
                        let mut st = obs.lock();
                        let m = st.monitor.as_mut();
                        m.map(|m| { m.healthy = true; m.last_instance.clone().unwrap_or_default() }).unwrap_or_default()
                    };
                    metrics::gauge!(telemetry::HEALTHY).set(1.0);
                    tracing::info!(instance, "health messages arrive again");
                    callbacks.health(&HealthAlert::Restored { instance });
                }
            }
            _ = tokio::time::sleep_until(deadline), if !alerted => {
                alerted = true;
                let last_seen = {
                    let mut st = obs.lock();
                    st.monitor.as_mut().and_then(|m| { m.healthy = false; m.last_seen })
                };
                metrics::gauge!(telemetry::HEALTHY).set(0.0);
                tracing::warn!(window_ms = window.as_millis() as u64, "no health message within the window");
                callbacks.health(&HealthAlert::Missing { window, last_seen });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_envelope_carries_instance_and_sequence() {
        let env = health_envelope("api-1", 7).unwrap();
        let decoded = Envelope::decode(&env.encode().unwrap()).unwrap();
        assert_eq!((decoded.aggregate_id.as_str(), decoded.event_type.as_str()), ("api-1", HEALTH_EVENT_TYPE));
        let payload: serde_json::Value = decoded.payload_as().unwrap();
        assert_eq!(payload, serde_json::json!({ "instance_id": "api-1", "sequence": 7 }));
    }

    #[test]
    fn default_instance_id_is_a_valid_aggregate_id() {
        let id = HealthConfig::default().instance_id();
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
        crate::envelope::validate_aggregate_id(&id).unwrap();
        let set = HealthConfig { instance_id: Some("svc-a".into()), ..HealthConfig::default() };
        assert_eq!(set.instance_id(), "svc-a");
    }

    #[test]
    fn ready_means_open_and_not_known_disconnected() {
        assert!(HealthReport::ready_from(false, Some(ConnectionState::Connected)));
        assert!(!HealthReport::ready_from(false, Some(ConnectionState::Disconnected)));
        assert!(!HealthReport::ready_from(true, Some(ConnectionState::Connected)));
    }
}
