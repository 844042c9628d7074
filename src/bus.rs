//! The façade users hold: a builder over a broker, publish, subscribe, close.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use tokio::task::{JoinHandle, JoinSet};

use crate::backlog::BacklogEvent;
use crate::broker::{Broker, Delivery, Headers, Outbound, Position};
use crate::callbacks::{Callbacks, ConnectionEvent, HealthAlert, PublishResult};
use crate::consumer::{self, ConsumerConfig, ConsumerHandle, ConsumerStats, Handler};
use crate::context::DeliveryContext;
use crate::envelope::{Envelope, PayloadEncoding};
use crate::health::{self, HealthReport, MonitorStatus, PoolStatus, PublisherStatus};
use crate::observer::{ObservabilityConfig, Observed, Observer};
use crate::pool::{HandlerResult, Pool, PoolConfig, Stats};
use crate::settings::BrokerConfig;

pub use crate::error::{ConfigError, PublishError, SubscribeError};
pub use crate::status::CloseReport;

/// Everything a bus is configured with; deserializable from TOML (and YAML
/// with the `yaml` feature). Durations are in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// The global keyed worker pool: workers, capacity, submit wait (`[pool]`).
    pub pool: PoolConfig,
    /// The consumer group, commits, retries and dead letters (`[consumer]`).
    pub consumer: ConsumerConfig,
    /// Bound on `close`: after it, unfinished events are handed back
    /// uncommitted (redelivered later). `None` drains fully.
    #[serde(with = "optional_millis")]
    pub close_timeout: Option<Duration>,
    /// Observer interval, backlog thresholds and the health check (`docs/health.md`).
    pub observability: ObservabilityConfig,
    /// How envelope payloads are written and read (`docs/wire.md`).
    pub wire: WireConfig,
    /// The broker adapter and its settings (`[broker]`; see [`crate::settings`]).
    pub broker: BrokerConfig,
}

/// The envelope payload encoding, bus-wide with per-topic overrides
/// (`docs/wire.md`):
///
/// ```toml
/// [wire]
/// payload_encoding = "embedded"   # embedded | base64 | auto
/// [wire.topics]
/// "orders" = "base64"             # a topic shared with seed-era Go services
/// ```
///
/// `publish_envelope` writes a topic's encoding (`auto` writes embedded);
/// `subscribe_envelope` reads it. The health topic is always embedded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireConfig {
    /// The encoding of every topic not in `topics`; default `embedded`.
    pub payload_encoding: PayloadEncoding,
    /// Per-topic overrides, by exact topic name.
    pub topics: BTreeMap<String, PayloadEncoding>,
}

impl WireConfig {
    /// The payload encoding of `topic`.
    pub fn encoding_for(&self, topic: &str) -> PayloadEncoding {
        self.topics.get(topic).copied().unwrap_or(self.payload_encoding)
    }
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

impl BusConfig {
    /// Reads a TOML configuration (no environment overrides; see
    /// [`BusConfig::load`]) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: BusConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML configuration file, applies the environment overrides
    /// ([`ENV_OVERRIDES`](crate::settings::ENV_OVERRIDES)) and validates the
    /// bus and the selected adapter (`docs/eventbus.example.toml`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml_with_env(&text, |name| std::env::var(name).ok())
    }

    /// Like [`BusConfig::load`] on text, with the environment given as a
    /// lookup (`|name| std::env::var(name).ok()` for the real one).
    pub fn from_toml_with_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config: BusConfig = toml::from_str(text)?;
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    /// Overrides the keys of [`ENV_OVERRIDES`](crate::settings::ENV_OVERRIDES)
    /// with the variables that are set (and not blank): the `[broker]`
    /// section's [`BrokerConfig::apply_env`]. Only an unknown
    /// `EVENTBUS_BROKER` is an error.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        self.broker.apply_env(env)
    }

    /// Reads a YAML configuration (feature `yaml`) and validates it.
    #[cfg(feature = "yaml")]
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: BusConfig = yaml_serde::from_str(text)?;
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
        if self.consumer.commit_threshold == 0 {
            return invalid("consumer.commit_threshold", "must be at least 1");
        }
        self.observability.validate()?;
        self.broker.validate()
    }
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
    callbacks: Callbacks,
}

impl<B: Broker> EventBusBuilder<B> {
    /// Replaces the whole configuration (the broker adapter's section is not
    /// used by the bus: the broker is already built).
    pub fn config(mut self, config: BusConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the consumer group (`consumer.group`).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.config.consumer.group = group.into();
        self
    }

    /// Observer interval, backlog thresholds and the health check (`docs/health.md`).
    pub fn observability(mut self, config: ObservabilityConfig) -> Self {
        self.config.observability = config;
        self
    }

    /// Replaces every callback at once.
    pub fn callbacks(mut self, callbacks: Callbacks) -> Self {
        self.callbacks = callbacks;
        self
    }

    /// Called when a backlog starts or recovers (`observability.backlog`).
    /// Callbacks run on the bus's tasks: keep them fast and non-blocking.
    pub fn on_backlog(mut self, f: impl Fn(&BacklogEvent) + Send + Sync + 'static) -> Self {
        self.callbacks.on_backlog(f);
        self
    }

    /// Called when the broker connection drops and when it comes back.
    pub fn on_connection(mut self, f: impl Fn(&ConnectionEvent) + Send + Sync + 'static) -> Self {
        self.callbacks.on_connection(f);
        self
    }

    /// Called when health messages stop arriving within the window, and when they resume.
    pub fn on_health_alert(mut self, f: impl Fn(&HealthAlert) + Send + Sync + 'static) -> Self {
        self.callbacks.on_health_alert(f);
        self
    }

    /// Called after every `publish_envelope` (and `publish_envelope_async`),
    /// on the publishing task, with the outcome.
    pub fn on_publish_result(mut self, f: impl for<'a> Fn(&PublishResult<'a>) + Send + Sync + 'static) -> Self {
        self.callbacks.on_publish_result(f);
        self
    }

    /// Starts the pool, the observer and the health publisher (needs a tokio runtime).
    pub fn build(self) -> Result<EventBus<B>, ConfigError> {
        self.config.validate()?;
        let pool = Pool::new(self.config.pool.clone());
        let broker = Arc::new(self.broker);
        let obs = Arc::new(Observed::new(&self.config.observability));
        // Known from the start, so `health()` right after `build` is accurate.
        let initial = *broker.connection_state().borrow();
        obs.lock().connection = Some(initial);
        let callbacks = Arc::new(self.callbacks);
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        let observer = Observer {
            broker: broker.clone(),
            pool: pool.clone(),
            obs: obs.clone(),
            callbacks: callbacks.clone(),
            config: self.config.observability.clone(),
            group: self.config.consumer.group.clone(),
            initial,
        };
        tasks.push(tokio::spawn(observer.run(stop.subscribe())));
        let health = &self.config.observability.health;
        if health.publish {
            let instance_id = health.instance_id();
            obs.lock().publisher = Some(PublisherStatus {
                topic: health.topic.clone(),
                instance_id: instance_id.clone(),
                published: 0,
                last_published: None,
                last_error: None,
            });
            let (broker, obs, config) = (broker.clone(), obs.clone(), health.clone());
            tasks.push(tokio::spawn(health::run_publisher(broker, obs, config, instance_id, stop.subscribe())));
        }
        let mut handlers = BTreeMap::new();
        if health.monitor {
            // The monitor reads the health topic through the bus's own consumer.
            let seen = obs.clone();
            // The health publisher writes embedded, whatever the topic settings.
            let handler: Handler = Handler::Envelope(
                Arc::new(move |e: Envelope, _: DeliveryContext| {
                    seen.health_received(&e.aggregate_id);
                    futures::future::ready(Ok(())).boxed()
                }),
                PayloadEncoding::Embedded,
            );
            handlers.insert(health.topic.clone(), handler);
            obs.add_topic(&health.topic);
        }
        Ok(EventBus {
            broker,
            pool,
            config: self.config,
            consumer: Mutex::new(ConsumerState::Registered(handlers)),
            consumer_stats: std::sync::Mutex::new(None),
            obs,
            callbacks,
            stop,
            tasks: std::sync::Mutex::new(tasks),
            async_publishes: std::sync::Mutex::new(JoinSet::new()),
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
    /// The running consumer's counters, readable without the async lock
    /// (`health()` is synchronous).
    consumer_stats: std::sync::Mutex<Option<Arc<ConsumerStats>>>,
    obs: Arc<Observed>,
    callbacks: Arc<Callbacks>,
    /// Tells the observer and health tasks to stop; dropping it does too.
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    async_publishes: std::sync::Mutex<JoinSet<()>>,
}

impl<B: Broker> EventBus<B> {
    /// Starts building a bus over `broker`, with the default configuration.
    pub fn builder(broker: B) -> EventBusBuilder<B> {
        EventBusBuilder {
            broker,
            config: BusConfig::default(),
            callbacks: Callbacks::default(),
        }
    }

    /// The broker adapter the bus runs on.
    pub fn broker(&self) -> &B {
        &self.broker
    }

    /// The configuration the bus was built with.
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// The `observability` section of the configuration.
    pub fn observability(&self) -> &ObservabilityConfig {
        &self.config.observability
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
        let result = self.publish_once(topic, key, headers, payload).await;
        if result.is_ok() {
            self.obs.published();
        }
        result
    }

    async fn publish_once(
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
    /// also in headers, its payload in the topic's encoding (`wire` in
    /// [`BusConfig`]); the `on_publish_result` callback sees the outcome.
    pub async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<Position, PublishError> {
        let result = self.publish_envelope_once(topic, envelope).await;
        if result.is_ok() {
            self.obs.published();
        }
        self.report_publish(topic, envelope, &result);
        result
    }

    fn report_publish(&self, topic: &str, envelope: &Envelope, result: &Result<Position, PublishError>) {
        if self.callbacks.wants_publish_results() {
            self.callbacks.publish_result(&PublishResult {
                topic,
                aggregate_id: &envelope.aggregate_id,
                event_type: &envelope.event_type,
                event_version: envelope.event_version,
                result: result.as_ref().copied(),
            });
        }
    }

    /// Publishes in the background and returns at once; the outcome goes
    /// only to the `on_publish_result` callback. `close` waits for these
    /// publishes; after `close`, the callback gets `PublishError::Closed`.
    pub fn publish_envelope_async(self: &Arc<Self>, topic: impl Into<String>, envelope: Envelope) {
        let topic = topic.into();
        let mut publishes = self.async_publishes.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock `close` takes to collect them: none slips past it.
        if self.obs.is_closed() {
            drop(publishes);
            self.report_publish(&topic, &envelope, &Err(PublishError::Closed));
            return;
        }
        while publishes.try_join_next().is_some() {}
        let bus = self.clone();
        publishes.spawn(async move {
            let _ = bus.publish_envelope(&topic, &envelope).await;
        });
    }

    async fn publish_envelope_once(&self, topic: &str, envelope: &Envelope) -> Result<Position, PublishError> {
        let payload = envelope.encode_with(self.config.wire.encoding_for(topic)).inspect_err(|_| crate::telemetry::publish_failed(topic, "envelope"))?;
        let key = Some(envelope.aggregate_id.as_bytes().to_vec());
        let msg = Outbound { topic: topic.to_string(), key, headers: envelope.to_headers(), payload };
        Ok(crate::telemetry::publish(&*self.broker, msg, Some(envelope)).await?)
    }

    /// Registers an ordered envelope handler for `topic`: events of one
    /// aggregate are handled one at a time, in order. Payloads are read in
    /// the topic's encoding (`wire` in [`BusConfig`]). The same as
    /// [`subscribe_ordered`](Self::subscribe_ordered) for a handler that
    /// does not need the [`DeliveryContext`].
    pub async fn subscribe_envelope<F, Fut>(&self, topic: &str, handler: F) -> Result<(), SubscribeError>
    where
        F: Fn(Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.subscribe_ordered(topic, move |envelope, _| handler(envelope)).await
    }

    /// Registers an ordered envelope handler for `topic` that also sees
    /// where each event came from: events of one aggregate are handled one
    /// at a time, in order, each with its [`DeliveryContext`] (topic,
    /// partition, offset, key, headers, attempt, trace and correlation IDs).
    /// A failing handler is retried in place (`consumer.retry`) with
    /// [`DeliveryContext::attempt`] counting up, then dead-lettered; one that
    /// returns a [`PayloadError`](crate::PayloadError) is dead-lettered at
    /// once (`docs/handlers.md`). Bytes that are not an envelope never reach
    /// it (dead letter, `x-dlq-reason: decode`).
    pub async fn subscribe_ordered<F, Fut>(&self, topic: &str, handler: F) -> Result<(), SubscribeError>
    where
        F: Fn(Envelope, DeliveryContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let obs = self.obs.clone();
        let encoding = self.config.wire.encoding_for(topic);
        let handler = Handler::Envelope(
            Arc::new(move |e, context| stamp_consumed(obs.clone(), handler(e, context)).boxed()),
            encoding,
        );
        self.register(topic, handler).await
    }

    /// Registers an ordered handler for `topic` whose events' payloads are
    /// JSON of type `T`: like [`subscribe_ordered`](Self::subscribe_ordered),
    /// with the payload decoded ([`Envelope::decode_payload`]) before the
    /// handler is called with it, the envelope and the context. A payload
    /// that does not decode as `T` is never given to the handler: it is
    /// dead-lettered once, with its bytes as received, `x-dlq-reason:
    /// payload`, the [`PayloadError`](crate::PayloadError) as `x-dlq-error`
    /// and no retries, in its aggregate's place (later events of that
    /// aggregate wait for it; other aggregates do not).
    ///
    /// ```
    /// use eventbus::{DeliveryContext, Envelope, EventBus, MemoryBroker};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct OrderPlaced {
    ///     amount: u64,
    /// }
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = EventBus::builder(MemoryBroker::default()).group("billing").build()?;
    /// bus.subscribe_typed("orders", |order: OrderPlaced, envelope: Envelope, ctx: DeliveryContext| async move {
    ///     println!(
    ///         "{} of {}: {} at {}[{}]@{}, attempt {}, trace {:?}",
    ///         order.amount,
    ///         envelope.aggregate_id,
    ///         envelope.event_type,
    ///         ctx.topic(),
    ///         ctx.partition(),
    ///         ctx.offset(),
    ///         ctx.attempt(),
    ///         ctx.trace_id(),
    ///     );
    ///     Ok(())
    /// })
    /// .await?;
    /// bus.start().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe_typed<T, F, Fut>(&self, topic: &str, handler: F) -> Result<(), SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(T, Envelope, DeliveryContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.subscribe_ordered(topic, move |envelope: Envelope, context| match envelope.decode_payload::<T>() {
            Ok(payload) => handler(payload, envelope, context).left_future(),
            Err(e) => futures::future::ready(HandlerResult::Err(e.into())).right_future(),
        })
        .await
    }

    /// Registers an unordered raw handler for `topic` (notifications). The
    /// same as [`subscribe_raw`](Self::subscribe_raw) for a handler that
    /// does not need the [`DeliveryContext`].
    pub async fn subscribe<F, Fut>(&self, topic: &str, handler: F) -> Result<(), SubscribeError>
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.subscribe_raw(topic, move |delivery, _| handler(delivery)).await
    }

    /// Registers an unordered raw handler for `topic` (notifications) that
    /// gets each delivery with its [`DeliveryContext`]: the same context
    /// type ordered handlers get, its IDs read from the headers and key.
    /// Retries and dead letters as for ordered handlers.
    pub async fn subscribe_raw<F, Fut>(&self, topic: &str, handler: F) -> Result<(), SubscribeError>
    where
        F: Fn(Delivery, DeliveryContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let obs = self.obs.clone();
        let handler =
            Handler::Raw(Arc::new(move |d, context| stamp_consumed(obs.clone(), handler(d, context)).boxed()));
        self.register(topic, handler).await
    }

    async fn register(&self, topic: &str, handler: Handler) -> Result<(), SubscribeError> {
        let mut state = self.consumer.lock().await;
        match &mut *state {
            ConsumerState::Registered(handlers) => {
                if handlers.contains_key(topic) {
                    return Err(SubscribeError::Duplicate(topic.to_string()));
                }
                handlers.insert(topic.to_string(), handler);
                self.obs.add_topic(topic);
                Ok(())
            }
            // Subscribing after start: one rebalance for the new topic.
            ConsumerState::Running(consumer) => {
                consumer.add_topic(topic.to_string(), handler).await?;
                self.obs.add_topic(topic);
                Ok(())
            }
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
        *self.consumer_stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.stats().clone());
        *state = ConsumerState::Running(handle);
        let health = &self.config.observability.health;
        if health.monitor {
            self.obs.lock().monitor = Some(MonitorStatus {
                healthy: true,
                window: health.window,
                last_seen: None,
                last_instance: None,
                received: 0,
            });
            let (obs, callbacks) = (self.obs.clone(), self.callbacks.clone());
            let monitor = tokio::spawn(health::run_monitor(obs, callbacks, health.window, self.stop.subscribe()));
            self.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(monitor);
        }
        Ok(())
    }

    /// Connection, last publish and consume, backlog and health-check state,
    /// for a readiness probe ([`HealthReport::ready`]) or a status endpoint.
    pub fn health(&self) -> HealthReport {
        let stats = self.pool.stats();
        let closed = self.obs.is_closed();
        let consumer = self.consumer_stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let dead_letters_stuck =
            consumer.as_ref().map_or(0, |c| c.dead_letters_stuck.load(std::sync::atomic::Ordering::Acquire));
        let consumer_session_down =
            consumer.as_ref().is_some_and(|c| c.session_down.load(std::sync::atomic::Ordering::Acquire));
        let st = self.obs.lock();
        HealthReport {
            ready: HealthReport::ready_from(closed, st.connection) && dead_letters_stuck == 0 && !consumer_session_down,
            dead_letters_stuck,
            consumer_session_down,
            connection: st.connection,
            closed,
            reconnects: self.obs.reconnects(),
            last_publish: self.obs.last_publish(),
            last_consume: self.obs.last_consume(),
            pool: PoolStatus { queued: stats.queued, in_flight: stats.in_flight, capacity: stats.capacity },
            consumer_lag: st.consumer_lag,
            consumer_lag_error: st.consumer_lag_error.clone(),
            backlog: st.backlog.values().cloned().collect(),
            health_monitor: st.monitor.clone(),
            health_publisher: st.publisher.clone(),
        }
    }

    /// Stops intake, drains the pool (or hands events back after
    /// `close_timeout`), commits the final frontiers and leaves the group.
    /// When it returns, no task of the bus is alive.
    pub async fn close(&self) -> CloseReport {
        let state = std::mem::replace(&mut *self.consumer.lock().await, ConsumerState::Closed);
        // After the consumer state is Closed, `start` spawns no monitor; after
        // the flag, `publish_envelope_async` spawns nothing.
        let mut publishes = {
            let mut publishes = self.async_publishes.lock().unwrap_or_else(|p| p.into_inner());
            self.obs.set_closed();
            std::mem::take(&mut *publishes)
        };
        // A panicked background publish is not close's failure: go on.
        while publishes.join_next().await.is_some() {}
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
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

/// Runs a handler's future and records a success as the last consume.
async fn stamp_consumed(obs: Arc<Observed>, work: impl Future<Output = HandlerResult>) -> HandlerResult {
    let result = work.await;
    if result.is_ok() {
        obs.consumed();
    }
    result
}
