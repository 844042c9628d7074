//! The observer: one task per bus that every `observe_interval` samples the
//! pool and the group's consumer lag into gauges and backlog detectors, and
//! watches the broker connection. Also the state it shares with the bus, the
//! health tasks and the handler wrappers, from which `EventBus::health()`
//! builds its report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, MissedTickBehavior};

use crate::backlog::{BacklogEvent, BacklogSource, BacklogThreshold, Detector};
use crate::broker::{Broker, ConnectionState};
use crate::callbacks::{Callbacks, ConnectionEvent};
use crate::error::ConfigError;
use crate::pool::Pool;
use crate::status::{BacklogStatus, MonitorStatus, PublisherStatus};
use crate::telemetry;

/// The `observability` section of [`crate::BusConfig`]. Durations are
/// milliseconds in config files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// How often the observer samples the pool and the consumer lag.
    #[serde(with = "crate::config::millis")]
    pub observe_interval: Duration,
    /// Backlog alert thresholds (`observability.backlog`).
    pub backlog: BacklogConfig,
    /// The split health check (`observability.health`, `docs/health.md`).
    pub health: HealthConfig,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        ObservabilityConfig {
            observe_interval: Duration::from_secs(5),
            backlog: BacklogConfig::default(),
            health: HealthConfig::default(),
        }
    }
}

impl ObservabilityConfig {
    /// Reads the section from TOML (the keys below `[observability]`) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: ObservabilityConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the section from YAML (feature `yaml`) and validates it.
    #[cfg(feature = "yaml")]
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: ObservabilityConfig = yaml_serde::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects values the observer cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        if self.observe_interval.is_zero() {
            return invalid("observability.observe_interval", "must be positive");
        }
        let health = &self.health;
        if !health.publish && !health.monitor {
            return Ok(());
        }
        if health.topic.trim().is_empty() {
            return invalid("observability.health.topic", "must not be empty");
        }
        if health.publish && health.publish_interval.is_zero() {
            return invalid("observability.health.publish_interval", "must be positive");
        }
        if health.monitor && health.window.is_zero() {
            return invalid("observability.health.window", "must be positive");
        }
        if health.publish && health.monitor && health.window <= health.publish_interval {
            return invalid(
                "observability.health.window",
                "must be longer than publish_interval (it would alert between two messages)",
            );
        }
        if let Err(e) = crate::envelope::validate_aggregate_id(&health.instance_id()) {
            return invalid("observability.health.instance_id", &e.to_string());
        }
        Ok(())
    }
}

/// Backlog alerts per source; a source without a threshold never alerts
/// (its value is still recorded as a gauge).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BacklogConfig {
    /// On the pool's queued tasks.
    pub pool: Option<BacklogThreshold>,
    /// On the group's total lag over its subscribed topics.
    pub consumer_lag: Option<BacklogThreshold>,
}

/// The `observability.health` section. Both sides are off by default.
/// Durations are milliseconds in config files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Topic the health messages go to and are read from.
    pub topic: String,
    /// Run the health publisher.
    pub publish: bool,
    /// How often the publisher sends one.
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
        if host.is_empty() {
            format!("instance-{pid}")
        } else {
            format!("{host}-{pid}")
        }
    }
}

/// Milliseconds since the epoch in an atomic; 0 means never.
#[derive(Default)]
struct Stamp(AtomicU64);

impl Stamp {
    fn set_now(&self) {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis().max(1) as u64);
        self.0.store(ms, Ordering::Relaxed);
    }

    fn get(&self) -> Option<SystemTime> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }
}

/// What the observer, the health tasks and the bus know; read by `health()`.
pub(crate) struct Observed {
    last_publish: Stamp,
    last_consume: Stamp,
    reconnects: AtomicU64,
    closed: AtomicBool,
    /// Woken at each health message the monitor's handler receives.
    pub(crate) health_seen: Notify,
    state: Mutex<State>,
}

#[derive(Default)]
pub(crate) struct State {
    pub connection: Option<ConnectionState>,
    pub topics: Vec<String>,
    pub consumer_lag: Option<u64>,
    pub consumer_lag_error: Option<String>,
    pub backlog: BTreeMap<BacklogSource, BacklogStatus>,
    pub monitor: Option<MonitorStatus>,
    /// When (monotonic) the last health message arrived, for the monitor's window.
    pub last_health: Option<Instant>,
    pub publisher: Option<PublisherStatus>,
}

impl Observed {
    pub(crate) fn new(config: &ObservabilityConfig) -> Self {
        let mut state = State::default();
        for (source, threshold) in configured(&config.backlog) {
            let status = BacklogStatus { source, value: None, threshold: threshold.threshold, backlogged: false };
            state.backlog.insert(source, status);
        }
        Observed {
            last_publish: Stamp::default(),
            last_consume: Stamp::default(),
            reconnects: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            health_seen: Notify::new(),
            state: Mutex::new(state),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn published(&self) {
        self.last_publish.set_now();
    }

    pub(crate) fn consumed(&self) {
        self.last_consume.set_now();
    }

    pub(crate) fn last_publish(&self) -> Option<SystemTime> {
        self.last_publish.get()
    }

    pub(crate) fn last_consume(&self) -> Option<SystemTime> {
        self.last_consume.get()
    }

    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    pub(crate) fn set_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn add_topic(&self, topic: &str) {
        let mut st = self.lock();
        if !st.topics.iter().any(|t| t == topic) {
            st.topics.push(topic.to_string());
        }
    }

    /// A health message from `instance` arrived (called by the monitor's handler).
    pub(crate) fn health_received(&self, instance: &str) {
        self.consumed();
        {
            let mut st = self.lock();
            st.last_health = Some(Instant::now());
            if let Some(m) = &mut st.monitor {
                m.last_seen = Some(SystemTime::now());
                m.last_instance = Some(instance.to_string());
                m.received += 1;
            }
        }
        // A stored permit if the monitor is not waiting right now: not lost.
        self.health_seen.notify_one();
    }
}

fn configured(config: &BacklogConfig) -> impl Iterator<Item = (BacklogSource, &BacklogThreshold)> {
    let pool = config.pool.as_ref().map(|t| (BacklogSource::Pool, t));
    let lag = config.consumer_lag.as_ref().map(|t| (BacklogSource::ConsumerLag, t));
    pool.into_iter().chain(lag)
}

/// Resolves once the bus asks its tasks to stop (or is dropped).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Records a backlog event everywhere it goes: gauge, log, report, callback.
pub(crate) fn report_backlog(obs: &Observed, callbacks: &Callbacks, event: &BacklogEvent) {
    let source = event.source();
    let started = matches!(event, BacklogEvent::Started { .. });
    metrics::gauge!(telemetry::BACKLOG, "source" => source.as_str()).set(if started { 1.0 } else { 0.0 });
    match *event {
        BacklogEvent::Started { value, threshold, .. } => {
            tracing::warn!(source = source.as_str(), value, threshold, "backlog started")
        }
        BacklogEvent::Recovered { value, threshold, .. } => {
            tracing::info!(source = source.as_str(), value, threshold, "backlog recovered")
        }
    }
    if let Some(status) = obs.lock().backlog.get_mut(&source) {
        status.backlogged = started;
    }
    callbacks.backlog(event);
}

pub(crate) struct Observer<B> {
    pub broker: Arc<B>,
    pub pool: Pool,
    pub obs: Arc<Observed>,
    pub callbacks: Arc<Callbacks>,
    pub config: ObservabilityConfig,
    pub group: String,
    /// The connection state `build` saw: a change before this task first
    /// runs is still a transition.
    pub initial: ConnectionState,
}

impl<B: Broker> Observer<B> {
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut detectors: Vec<Detector> =
            configured(&self.config.backlog).map(|(source, t)| Detector::new(source, t.clone())).collect();
        for d in &detectors {
            metrics::gauge!(telemetry::BACKLOG, "source" => d.source().as_str()).set(0.0);
        }
        let mut connection = self.broker.connection_state();
        let mut link = Link { state: self.initial, down_since: None };
        self.record_connection(self.initial);
        let current = *connection.borrow_and_update();
        self.on_connection(&mut link, current);
        let mut watching = true;
        let mut lag_error_logged = false;
        let mut ticker = tokio::time::interval(self.config.observe_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return,
                changed = connection.changed(), if watching => match changed {
                    Ok(()) => {
                        let state = *connection.borrow_and_update();
                        self.on_connection(&mut link, state);
                    }
                    // The broker dropped its sender: its state can no longer change.
                    Err(_) => watching = false,
                },
                _ = ticker.tick() => {
                    let lag = tokio::select! {
                        biased;
                        _ = stopped(&mut stop) => return,
                        lag = self.sample_lag(&mut lag_error_logged) => lag,
                    };
                    self.sample(&mut detectors, lag);
                }
            }
        }
    }

    fn record_connection(&self, state: ConnectionState) {
        metrics::gauge!(telemetry::CONNECTED).set(if state == ConnectionState::Connected { 1.0 } else { 0.0 });
        self.obs.lock().connection = Some(state);
    }

    fn on_connection(&self, link: &mut Link, state: ConnectionState) {
        if state == link.state {
            return;
        }
        link.state = state;
        self.record_connection(state);
        match state {
            ConnectionState::Disconnected => {
                link.down_since = Some(Instant::now());
                tracing::warn!("broker connection lost");
                self.callbacks.connection(&ConnectionEvent::Disconnected);
            }
            // The first connection of a client that started disconnected is not a reconnect.
            ConnectionState::Connected => {
                if let Some(since) = link.down_since.take() {
                    let down_for = since.elapsed();
                    self.obs.reconnects.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(telemetry::RECONNECTS).increment(1);
                    tracing::info!(down_ms = down_for.as_millis() as u64, "broker connection restored");
                    self.callbacks.connection(&ConnectionEvent::Reconnected { down_for });
                }
            }
        }
    }

    /// Total lag over the subscribed topics; `None` when unknown (nothing
    /// subscribed, or the broker cannot tell).
    async fn sample_lag(&self, error_logged: &mut bool) -> Option<u64> {
        let topics = self.obs.lock().topics.clone();
        if topics.is_empty() {
            return None;
        }
        match self.broker.consumer_lag(&self.group, &topics).await {
            Ok(lags) => {
                *error_logged = false;
                let mut total = 0u64;
                for l in &lags {
                    let lag = l.lag();
                    total = total.saturating_add(lag);
                    metrics::gauge!(
                        telemetry::CONSUMER_LAG,
                        "topic" => l.partition.topic.to_string(),
                        "partition" => l.partition.partition.to_string()
                    )
                    .set(lag as f64);
                }
                let mut st = self.obs.lock();
                st.consumer_lag = Some(total);
                st.consumer_lag_error = None;
                Some(total)
            }
            Err(e) => {
                // Once per error streak: a broker without lag support would log every interval.
                if !*error_logged {
                    tracing::warn!(error = %e, "consumer lag unavailable; lag backlog detection paused");
                    *error_logged = true;
                }
                let mut st = self.obs.lock();
                st.consumer_lag = None;
                st.consumer_lag_error = Some(e.to_string());
                None
            }
        }
    }

    fn sample(&self, detectors: &mut [Detector], lag: Option<u64>) {
        let stats = self.pool.stats();
        metrics::gauge!(telemetry::POOL_QUEUED).set(stats.queued as f64);
        metrics::gauge!(telemetry::POOL_IN_FLIGHT).set(stats.in_flight as f64);
        metrics::gauge!(telemetry::POOL_CAPACITY).set(stats.capacity as f64);
        let now = Instant::now();
        for d in detectors {
            let value = match d.source() {
                BacklogSource::Pool => Some(stats.queued as u64),
                BacklogSource::ConsumerLag => lag,
            };
            let Some(value) = value else {
                // Unknown: keep the detector's state, report the value as unknown.
                if let Some(s) = self.obs.lock().backlog.get_mut(&d.source()) {
                    s.value = None;
                }
                continue;
            };
            let event = d.observe(value, now);
            if let Some(s) = self.obs.lock().backlog.get_mut(&d.source()) {
                s.value = Some(value);
            }
            if let Some(event) = event {
                report_backlog(&self.obs, &self.callbacks, &event);
            }
        }
    }
}

struct Link {
    state: ConnectionState,
    down_since: Option<Instant>,
}
