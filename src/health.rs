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
//!   probe or a status endpoint (defined in [`crate::status`], re-exported here).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::broker::{Broker, Outbound};
use crate::callbacks::{Callbacks, HealthAlert};
use crate::envelope::{Envelope, EnvelopeError};
use crate::observer::{stopped, Observed};
use crate::telemetry;

pub use crate::observer::HealthConfig;
pub use crate::status::{BacklogStatus, HealthReport, MonitorStatus, PoolStatus, PublisherStatus};

/// Event type of the health publisher's envelopes.
pub const HEALTH_EVENT_TYPE: &str = "HealthCheck";

/// The health publisher's message.
pub fn health_envelope(instance_id: &str, sequence: u64) -> Result<Envelope, EnvelopeError> {
    let payload = serde_json::json!({ "instance_id": instance_id, "sequence": sequence });
    Envelope::new(instance_id, HEALTH_EVENT_TYPE, 1, &payload)
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
}
