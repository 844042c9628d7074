//! The façade users hold: a builder over a broker, publish, subscribe, close.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::broker::{Broker, BrokerError, Delivery, Headers, Outbound, Position};
use crate::consumer::{self, ConsumerConfig, ConsumerError, ConsumerHandle, ConsumerStats, Handler};
use crate::envelope::{Envelope, EnvelopeError};
use crate::pool::{HandlerResult, Pool, PoolConfig, Stats};

/// Everything a bus is configured with; deserializable from TOML, YAML or
/// environment-shaped maps. Durations are in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    pub pool: PoolConfig,
    pub consumer: ConsumerConfig,
    /// Bound on `close`: after it, unfinished events are handed back
    /// uncommitted (redelivered later). `None` drains fully.
    #[serde(with = "optional_millis")]
    pub close_timeout: Option<Duration>,
}

mod optional_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

/// Upper bound on `pool.concurrency`: each unit is a worker task.
pub const MAX_CONCURRENCY: usize = 65_536;

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid TOML configuration: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid YAML configuration: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("invalid configuration {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl BusConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: BusConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: BusConfig = serde_yaml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects values the bus cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        if self.pool.concurrency == 0 || self.pool.concurrency > MAX_CONCURRENCY {
            return invalid("pool.concurrency", &format!("must be between 1 and {MAX_CONCURRENCY}"));
        }

        if self.pool.capacity == 0 {
            return invalid("pool.capacity", "must be at least 1");
        }
        if self.consumer.retry.max_attempts == 0 {
            return invalid("consumer.retry.max_attempts", "must be at least 1");
        }
        if self.consumer.group.trim().is_empty() {
            return invalid("consumer.group", "must not be empty");
        }
        if self.consumer.dead_letter_suffix.is_empty() {
            return invalid("consumer.dead_letter_suffix", "must not be empty (the dead letter would be the topic itself)");
        }
        if self.consumer.commit_interval.is_zero() {
            return invalid("consumer.commit_interval", "must be positive");
        }
        Ok(())
    }
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("bus closed")]
    Closed,
}

/// Why a subscribe failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("topic {0} already has a handler")]
    Duplicate(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error("bus closed")]
    Closed,
}

/// What `close` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Accepted events handed back unprocessed (uncommitted; redelivered).
    pub handed_back: usize,
    pub final_commit_error: Option<String>,
}

enum ConsumerState {
    /// Handlers registered before `start`: one group join covers them all.
    Registered(BTreeMap<String, Handler>),
    Running(ConsumerHandle),
    Closed,
}

/// Builds an [`EventBus`].
pub struct EventBusBuilder<B> {
    broker: B,
    config: BusConfig,
}

impl<B: Broker> EventBusBuilder<B> {
    pub fn config(mut self, config: BusConfig) -> Self {
        self.config = config;
        self
    }

    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.config.consumer.group = group.into();
        self
    }

    /// Starts the pool (needs a tokio runtime).
    pub fn build(self) -> Result<EventBus<B>, ConfigError> {
        self.config.validate()?;
        let pool = Pool::new(self.config.pool.clone());
        Ok(EventBus {
            broker: Arc::new(self.broker),
            pool,
            config: self.config,
            consumer: Mutex::new(ConsumerState::Registered(BTreeMap::new())),
        })
    }
}

/// An event bus over one broker, with one global keyed pool and one
/// consumer group session for all its subscriptions.
pub struct EventBus<B: Broker> {
    broker: Arc<B>,
    pool: Pool,
    config: BusConfig,
    consumer: Mutex<ConsumerState>,
}

impl<B: Broker> EventBus<B> {
    pub fn builder(broker: B) -> EventBusBuilder<B> {
        EventBusBuilder { broker, config: BusConfig::default() }
    }

    pub fn broker(&self) -> &B {
        &self.broker
    }

    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// Queued / in-flight counts of the global pool.
    pub fn pool_stats(&self) -> Stats {
        self.pool.stats()
    }

    /// Consumer counters, once started.
    pub async fn consumer_stats(&self) -> Option<Arc<ConsumerStats>> {
        match &*self.consumer.lock().await {
            ConsumerState::Running(handle) => Some(handle.stats().clone()),
            _ => None,
        }
    }

    /// Publishes raw bytes; returns once the broker acknowledged.
    pub async fn publish(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        headers: Headers,
        payload: Vec<u8>,
    ) -> Result<Position, PublishError> {
        let msg = Outbound { topic: topic.to_string(), key: key.map(<[u8]>::to_vec), headers, payload };
        Ok(crate::telemetry::publish(&*self.broker, msg, None).await?)
    }

    /// Publishes an envelope, keyed by its aggregate ID, with its metadata
    /// also in headers.
    pub async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<Position, PublishError> {
        let payload = envelope.encode().inspect_err(|_| crate::telemetry::publish_failed(topic, "envelope"))?;
        let key = Some(envelope.aggregate_id.as_bytes().to_vec());
        let msg = Outbound { topic: topic.to_string(), key, headers: envelope.to_headers(), payload };
        Ok(crate::telemetry::publish(&*self.broker, msg, Some(envelope)).await?)
    }

    /// Registers an ordered envelope handler for `topic`: events of one
    /// aggregate are handled one at a time, in order.
    pub async fn subscribe_envelope<F, Fut>(&self, topic: &str, handler: F) -> Result<(), SubscribeError>
    where
        F: Fn(Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler = Handler::Envelope(Arc::new(move |e| handler(e).boxed()));
        self.register(topic, handler).await
    }

    /// Registers an unordered raw handler for `topic` (notifications).
    pub async fn subscribe<F, Fut>(&self, topic: &str, handler: F) -> Result<(), SubscribeError>
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler = Handler::Raw(Arc::new(move |d| handler(d).boxed()));
        self.register(topic, handler).await
    }

    async fn register(&self, topic: &str, handler: Handler) -> Result<(), SubscribeError> {
        let mut state = self.consumer.lock().await;
        match &mut *state {
            ConsumerState::Registered(handlers) => {
                if handlers.insert(topic.to_string(), handler).is_some() {
                    return Err(SubscribeError::Duplicate(topic.to_string()));
                }
                Ok(())
            }
            // Subscribing after start: one rebalance for the new topic.
            ConsumerState::Running(consumer) => Ok(consumer.add_topic(topic.to_string(), handler).await?),
            ConsumerState::Closed => Err(SubscribeError::Closed),
        }
    }

    /// Joins the consumer group once for every registered topic and starts
    /// consuming. Does nothing if there are no subscriptions.
    pub async fn start(&self) -> Result<(), SubscribeError> {
        let mut state = self.consumer.lock().await;
        let ConsumerState::Registered(handlers) = &mut *state else { return Ok(()) };
        if handlers.is_empty() {
            return Ok(());
        }
        let handlers = std::mem::take(handlers);
        let handle =
            consumer::start(self.broker.clone(), self.pool.clone(), self.config.consumer.clone(), handlers).await?;
        *state = ConsumerState::Running(handle);
        Ok(())
    }

    /// Stops intake, drains the pool (or hands events back after
    /// `close_timeout`), commits the final frontiers and leaves the group.
    /// When it returns, no task of the bus is alive.
    pub async fn close(&self) -> CloseReport {
        let state = std::mem::replace(&mut *self.consumer.lock().await, ConsumerState::Closed);
        let deadline = self.config.close_timeout;
        match state {
            ConsumerState::Running(handle) => match handle.shutdown(deadline).await {
                Ok(r) => CloseReport { handed_back: r.handed_back, final_commit_error: r.final_commit_error },
                Err(e) => CloseReport { handed_back: 0, final_commit_error: Some(e.to_string()) },
            },
            _ => {
                let r = self.pool.close(deadline).await;
                CloseReport { handed_back: r.handed_back, final_commit_error: None }
            }
        }
    }
}
