//! The production consumer, written once and generic over [`Broker`]: the
//! memory broker, the simulator, Kafka and NATS all run this code.
//!
//! One group session covers every subscribed topic. Each delivery becomes a
//! pool task keyed by its aggregate ID, so a partition has many events in
//! flight at once (the seed awaited them one by one) while each aggregate
//! stays in order. Completions come back over a channel and advance the
//! partition's `Frontier` (`frontier.rs`); only frontiers are committed.

mod frontier;
mod task;

/// Header names of dead-letter messages and the `x-dlq-reason` values
/// (defined in [`crate::broker`], where the adapters that write dead letters
/// themselves find them too).
pub mod task_headers {
    pub use crate::broker::{
        DLQ_ATTEMPTS, DLQ_ERROR, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION, DLQ_ORIGIN_TOPIC, DLQ_PAYLOAD_OMITTED,
        DLQ_REASON, REASON_DECODE, REASON_HANDLER, REASON_PAYLOAD, REASON_TOO_LARGE, REASON_UNDECODABLE_HEADERS,
    };
}

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::broker::{Broker, BrokerError, Delivery, ErrorClass, Session, SessionEvent, TopicPartition};
use crate::context::DeliveryContext;
use crate::envelope::Envelope;
use crate::pool::{HandlerResult, Outcome, Pool, Rejected, SubmitError};
use crate::telemetry::{self, ConsumerMetrics, TopicMetrics};
pub(crate) use frontier::Frontier;

/// Handles decoded, validated envelopes of one topic, in aggregate order,
/// with each attempt's [`DeliveryContext`].
pub type EnvelopeHandler = Arc<dyn Fn(Envelope, DeliveryContext) -> BoxFuture<'static, HandlerResult> + Send + Sync>;
/// Handles raw deliveries of one topic, in any order, with each attempt's
/// [`DeliveryContext`].
pub type RawHandler = Arc<dyn Fn(Delivery, DeliveryContext) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// The handler registered for a topic.
#[derive(Clone)]
pub enum Handler {
    /// Keyed by aggregate ID and ordered; undecodable events go to the dead
    /// letter. Decoded with the topic's payload encoding.
    Envelope(EnvelopeHandler, crate::envelope::PayloadEncoding),
    /// Unordered, for notifications.
    Raw(RawHandler),
}

/// Retry policy for failing handlers: in place, while later events of the
/// same aggregate wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts before the event goes to the dead letter (at least 1).
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles after each further one.
    #[serde(with = "crate::config::millis")]
    pub initial_backoff: Duration,
    /// Cap of the doubling wait.
    #[serde(with = "crate::config::millis")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryConfig {
    /// Backoff after failed attempt `attempt` (1-based): doubling, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Consumer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Consumer group shared by every subscribed topic.
    pub group: String,
    /// The longest a completed event waits for its commit: every interval,
    /// each partition whose frontier advanced is committed. A ceiling only:
    /// a partition is committed earlier once its frontier moved by
    /// [`commit_threshold`](Self::commit_threshold) offsets.
    #[serde(with = "crate::config::millis")]
    pub commit_interval: Duration,
    /// Commits a partition as soon as its frontier moved this many offsets
    /// past its last commit, without waiting for `commit_interval` (at least
    /// 1). A partition is also committed early once the messages it holds
    /// uncommitted reach half the broker's delivery window
    /// ([`Broker::delivery_window`], JetStream's `max_ack_pending`), so the
    /// broker never stops delivering for want of a commit. The frontier is
    /// kept: nothing past an event that has not completed is committed.
    pub commit_threshold: u64,
    /// How long a revoke waits for the partition's running handlers.
    #[serde(with = "crate::config::millis")]
    pub revoke_timeout: Duration,
    /// Retries of a failing handler, before the dead letter.
    pub retry: RetryConfig,
    /// Dead-letter topic = origin topic + this suffix.
    pub dead_letter_suffix: String,
    /// Create each subscribed topic's dead-letter topic when subscribing
    /// (`Broker::ensure_dead_letter_topic`), so a dead-letter name the broker
    /// cannot hold fails the subscribe, not the first poison event. Turn off
    /// where the dead-letter topics are provisioned by other means.
    pub create_dead_letter_topics: bool,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group: "eventbus".into(),
            commit_interval: Duration::from_secs(1),
            commit_threshold: 500,
            revoke_timeout: Duration::from_secs(30),
            retry: RetryConfig::default(),
            dead_letter_suffix: ".dlq".into(),
            create_dead_letter_topics: true,
        }
    }
}

/// Counters of a consumer, readable while it runs.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Deliveries read from the broker and dispatched to the pool.
    pub delivered: AtomicU64,
    /// Events a handler finished successfully.
    pub handled: AtomicU64,
    /// Handler attempts repeated after a failure.
    pub retried: AtomicU64,
    /// Events written to their dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Broker redeliveries of offsets already dispatched in this assignment.
    pub redelivered_skipped: AtomicU64,
    /// Completions dropped because their partition was revoked meanwhile.
    pub fenced: AtomicU64,
    /// Commits the broker accepted.
    pub commits: AtomicU64,
    /// Commits that failed (retried at the next interval).
    pub commit_errors: AtomicU64,
    /// Assignment changes (assigned, revoked or lost).
    pub rebalances: AtomicU64,
    /// Events whose dead letter the broker does not take yet (a gauge): each
    /// holds its aggregate and its partition's commit. Not ready while > 0.
    pub dead_letters_stuck: AtomicU64,
    /// Errors of the group session (`next`), of any class.
    pub session_errors: AtomicU64,
    /// Sessions rebuilt after a fatal session error.
    pub session_rebuilds: AtomicU64,
    /// Set while the session is being rebuilt: not ready.
    pub session_down: AtomicBool,
}

impl ConsumerStats {
    /// Whether the consumer can make progress now: its session is up and no
    /// dead letter is stuck.
    pub fn ready(&self) -> bool {
        !self.session_down.load(Ordering::Acquire) && self.dead_letters_stuck.load(Ordering::Acquire) == 0
    }
}

impl ConsumerStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the consumer did when it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// Tasks handed back unprocessed by the pool's close (redelivered later).
    pub handed_back: usize,
    /// The final commit, or closing the session (which commits what was
    /// stored, on Kafka), failed; the uncommitted work will be redelivered.
    pub final_commit_error: Option<String>,
}

/// Why the consumer could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// Joining the consumer group failed.
    #[error("joining the consumer group failed: {0}")]
    Subscribe(BrokerError),
    /// The dead-letter topic of a subscribed topic could not be created (or
    /// its name is one the broker cannot hold).
    #[error("dead-letter topic {dead_letter} of {topic} could not be created: {error}")]
    DeadLetterTopic {
        /// The subscribed topic.
        topic: String,
        /// Its dead-letter topic.
        dead_letter: String,
        /// Why it could not be created.
        error: BrokerError,
    },
    /// The consumer's task ended abnormally (it panicked or was cancelled).
    #[error("consumer task failed: {0}")]
    Task(String),
}

/// Result of one task, sent back to the consumer loop.
struct Completion {
    tp: TopicPartition,
    epoch: u64,
    offset: u64,
    outcome: Outcome,
}

struct PartitionState {
    epoch: u64,
    frontier: Frontier,
    /// Set on revoke/lost/close: queued tasks of this assignment skip their handler.
    fence: Arc<AtomicBool>,
    last_committed: Option<u64>,
    metrics: Arc<TopicMetrics>,
    /// `eventbus_commit_lag` of this partition, set whenever it changes.
    commit_lag: metrics::Gauge,
}

impl PartitionState {
    fn publish_commit_lag(&self) {
        self.commit_lag.set(self.frontier.handled_uncommitted() as f64);
    }
}

enum Control {
    AddTopic(String, Handler, oneshot::Sender<Result<(), ConsumerError>>),
    Shutdown(Option<Duration>),
}

/// Why the consumer's inner loop stopped.
enum Exit {
    Shutdown(Option<Duration>),
    /// The session failed for good: rebuild it.
    SessionFailed,
}

/// Capped exponential backoff for broker errors the consumer retries
/// (session errors, session rebuilds): 100 ms doubling up to 10 s.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The same doubling-and-cap rule as the handler retries ([`RetryConfig::backoff`]).
    const RULE: RetryConfig = RetryConfig {
        max_attempts: 1,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(10),
    };

    fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Self::RULE.backoff(self.failures)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Creates the dead-letter topic of each of `topics` unless configured not to.
async fn ensure_dead_letter_topics<B: Broker>(
    broker: &B,
    config: &ConsumerConfig,
    topics: &[String],
) -> Result<(), ConsumerError> {
    if !config.create_dead_letter_topics {
        return Ok(());
    }
    for topic in topics {
        let dead_letter = format!("{topic}{}", config.dead_letter_suffix);
        if let Err(error) = broker.ensure_dead_letter_topic(topic, &dead_letter).await {
            tracing::error!(topic, dead_letter, %error, "creating the dead-letter topic failed; not subscribing");
            return Err(ConsumerError::DeadLetterTopic { topic: topic.clone(), dead_letter, error });
        }
    }
    Ok(())
}

/// A running consumer. Dropping it without `shutdown` stops it the same way
/// (with no deadline for the drain).
pub struct ConsumerHandle {
    control: mpsc::UnboundedSender<Control>,
    join: Option<JoinHandle<Result<ConsumerReport, ConsumerError>>>,
    stats: Arc<ConsumerStats>,
}

impl ConsumerHandle {
    /// The consumer's counters.
    pub fn stats(&self) -> &Arc<ConsumerStats> {
        &self.stats
    }

    /// Adds a topic to the running session (after creating its dead-letter
    /// topic): one rebalance.
    pub async fn add_topic(&self, topic: String, handler: Handler) -> Result<(), ConsumerError> {
        let closed = || ConsumerError::Subscribe(BrokerError::Closed);
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::AddTopic(topic, handler, tx)).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Stops intake, closes the pool (drain, or hand back after `deadline`),
    /// commits the final frontiers and leaves the group.
    pub async fn shutdown(mut self, deadline: Option<Duration>) -> Result<ConsumerReport, ConsumerError> {
        let _ = self.control.send(Control::Shutdown(deadline));
        let join = self.join.take().expect("joined once");
        join.await.map_err(|e| ConsumerError::Task(e.to_string()))?
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Shutdown(None));
    }
}

/// Starts the consumer: joins `config.group` for every topic in `handlers`
/// with one session, then dispatches into `pool` until shut down.
pub async fn start<B: Broker>(
    broker: Arc<B>,
    pool: Pool,
    config: ConsumerConfig,
    handlers: BTreeMap<String, Handler>,
) -> Result<ConsumerHandle, ConsumerError> {
    let topics: Vec<String> = handlers.keys().cloned().collect();
    ensure_dead_letter_topics(&*broker, &config, &topics).await?;
    let session = broker.subscribe(&config.group, &topics).await.map_err(ConsumerError::Subscribe)?;
    let stats = Arc::new(ConsumerStats::default());
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    // Half the broker's window: room for what arrives while the commit runs.
    let window_trigger = broker.delivery_window().map(|w| (w / 2).max(1));
    let consumer = Consumer {
        window_trigger,
        due: BTreeSet::new(),
        early_commits_held: false,
        broker,
        pool,
        config: Arc::new(config),
        handlers,
        partitions: BTreeMap::new(),
        next_epoch: 1,
        done_tx,
        stats: stats.clone(),
        topic_metrics: BTreeMap::new(),
        metrics: ConsumerMetrics::new(),
    };
    let join = tokio::spawn(consumer.run(session, control_rx, done_rx));
    Ok(ConsumerHandle { control: control_tx, join: Some(join), stats })
}

struct Consumer<B: Broker> {
    broker: Arc<B>,
    pool: Pool,
    config: Arc<ConsumerConfig>,
    handlers: BTreeMap<String, Handler>,
    partitions: BTreeMap<TopicPartition, PartitionState>,
    next_epoch: u64,
    done_tx: mpsc::UnboundedSender<Completion>,
    stats: Arc<ConsumerStats>,
    /// Metric handles per topic, registered at its first assignment.
    topic_metrics: BTreeMap<Arc<str>, Arc<TopicMetrics>>,
    metrics: ConsumerMetrics,
    /// Uncommitted messages of a partition that make its commit due (half
    /// the broker's delivery window), if the broker has one.
    window_trigger: Option<u64>,
    /// Partitions whose frontier crossed a commit trigger since their last
    /// commit (see [`ConsumerConfig::commit_threshold`]).
    due: BTreeSet<TopicPartition>,
    /// A commit failed: early commits wait for the next interval, so a
    /// failing broker is retried at `commit_interval`, never per completion.
    early_commits_held: bool,
}

/// Completions handled in one turn before due commits are sent.
const COMPLETION_BATCH: usize = 256;

type PendingSubmit = BoxFuture<'static, Result<(), Rejected>>;

impl<B: Broker> Consumer<B> {
    async fn run(
        mut self,
        session: B::Session,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut done: mpsc::UnboundedReceiver<Completion>,
    ) -> Result<ConsumerReport, ConsumerError> {
        let mut tick = tokio::time::interval(self.config.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A delivery waiting for room in the pool: while it waits, nothing
        // more is read (back-pressure instead of an unbounded buffer).
        let mut pending: Option<PendingSubmit> = None;
        let mut session = Some(session);
        let deadline = loop {
            let current = match session.as_mut() {
                Some(s) => s,
                None => match self.rebuild(&mut control, &mut done).await {
                    Ok(s) => session.insert(s),
                    Err(deadline) => break deadline,
                },
            };
            match self.serve(current, &mut control, &mut done, &mut tick, &mut pending).await {
                Exit::Shutdown(deadline) => break deadline,
                Exit::SessionFailed => {
                    // Everything of the old session is fenced as lost: its
                    // partitions may already be someone else's.
                    let all: Vec<TopicPartition> = self.partitions.keys().cloned().collect();
                    if !all.is_empty() {
                        self.lose(all);
                    }
                    self.stats.session_down.store(true, Ordering::Release);
                    drop(session.take());
                }
            }
        };
        // Close: stop intake, let the pool drain (or hand back after the
        // deadline), account for every task, commit, leave the group.
        drop(pending);
        let close = self.pool.close(deadline).await;
        while let Ok(c) = done.try_recv() {
            self.on_completion(c);
        }
        let mut report = ConsumerReport { handed_back: close.handed_back, final_commit_error: None };
        if let Some(mut session) = session {
            let all: Vec<TopicPartition> = self.partitions.keys().cloned().collect();
            if let Err(e) = self.commit(&mut session, Some(&all)).await {
                report.final_commit_error = Some(e.to_string());
            }
            // Closing a session can commit too (Kafka commits the stored
            // offsets synchronously there): its failure is the final commit's.
            if let Err(e) = session.close().await {
                tracing::warn!(error = %e, "closing the session failed");
                report.final_commit_error.get_or_insert_with(|| format!("closing the session: {e}"));
            }
        }
        Ok(report)
    }

    /// Runs one session until shutdown or a fatal session error.
    async fn serve(
        &mut self,
        session: &mut B::Session,
        control: &mut mpsc::UnboundedReceiver<Control>,
        done: &mut mpsc::UnboundedReceiver<Completion>,
        tick: &mut tokio::time::Interval,
        pending: &mut Option<PendingSubmit>,
    ) -> Exit {
        // After a session error, `next` is not called again before this.
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut backoff = Backoff::default();
        loop {
            tokio::select! {
                biased;
                Some(c) = done.recv() => {
                    self.on_completion(c);
                    for _ in 1..COMPLETION_BATCH {
                        match done.try_recv() {
                            Ok(c) => self.on_completion(c),
                            Err(_) => break,
                        }
                    }
                    if !self.due.is_empty() && !self.early_commits_held {
                        let due: Vec<TopicPartition> = std::mem::take(&mut self.due).into_iter().collect();
                        if let Err(e) = self.commit(session, Some(&due)).await {
                            if e.class() == ErrorClass::Fatal {
                                return Exit::SessionFailed;
                            }
                            self.early_commits_held = true;
                        }
                    }
                }
                cmd = control.recv() => match cmd {
                    Some(Control::AddTopic(topic, handler, reply)) => {
                        let _ = reply.send(self.add_topic(session, topic, handler).await);
                    }
                    Some(Control::Shutdown(deadline)) => return Exit::Shutdown(deadline),
                    None => return Exit::Shutdown(None),
                },
                _ = tick.tick() => {
                    self.due.clear();
                    self.early_commits_held = false;
                    if let Err(e) = self.commit(session, None).await {
                        if e.class() == ErrorClass::Fatal {
                            return Exit::SessionFailed;
                        }
                        self.early_commits_held = true;
                    }
                }
                submitted = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                    *pending = None;
                    if let Err(rejected) = submitted {
                        if rejected.error == SubmitError::Closed {
                            tracing::warn!("pool closed under the consumer; stopping");
                            return Exit::Shutdown(None);
                        }
                    }
                }
                _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    retry_at = None;
                }
                event = session.next(), if pending.is_none() && retry_at.is_none() => match event {
                    Ok(event) => {
                        backoff.reset();
                        match event {
                            SessionEvent::Message(d) => *pending = self.dispatch(d),
                            SessionEvent::Assigned(tps) => self.assign(tps),
                            SessionEvent::Revoked(tps) => self.revoke(session, done, tps).await,
                            SessionEvent::Lost(tps) => self.lose(tps),
                        }
                    }
                    Err(e) => {
                        ConsumerStats::bump(&self.stats.session_errors);
                        self.metrics.session_error(e.kind()).increment(1);
                        match e.class() {
                            ErrorClass::Fatal => {
                                tracing::error!(error = %e, "consumer session failed; rebuilding it");
                                return Exit::SessionFailed;
                            }
                            ErrorClass::Retriable => {
                                let wait = backoff.next();
                                tracing::warn!(error = %e, retry_in = ?wait, "consumer session error; retrying");
                                retry_at = Some(tokio::time::Instant::now() + wait);
                            }
                            ErrorClass::Permanent => {
                                let wait = backoff.next();
                                tracing::error!(error = %e, retry_in = ?wait,
                                    "consumer session error that will not clear by itself; retrying with backoff");
                                retry_at = Some(tokio::time::Instant::now() + wait);
                            }
                        }
                    }
                },
            }
        }
    }

    /// Creates the dead-letter topic of `topic`, then adds it to the session.
    async fn add_topic(
        &mut self,
        session: &mut B::Session,
        topic: String,
        handler: Handler,
    ) -> Result<(), ConsumerError> {
        ensure_dead_letter_topics(&*self.broker, &self.config, std::slice::from_ref(&topic)).await?;
        self.handlers.insert(topic.clone(), handler);
        let topics: Vec<String> = self.handlers.keys().cloned().collect();
        if let Err(e) = session.set_topics(&topics).await {
            self.handlers.remove(&topic);
            return Err(ConsumerError::Subscribe(e));
        }
        Ok(())
    }

    /// Joins the group again after a fatal session error, with capped
    /// backoff, while completions and control messages are still served.
    /// `Err(deadline)` when shut down meanwhile.
    async fn rebuild(
        &mut self,
        control: &mut mpsc::UnboundedReceiver<Control>,
        done: &mut mpsc::UnboundedReceiver<Completion>,
    ) -> Result<B::Session, Option<Duration>> {
        let mut backoff = Backoff::default();
        loop {
            let topics: Vec<String> = self.handlers.keys().cloned().collect();
            match self.broker.subscribe(&self.config.group, &topics).await {
                Ok(session) => {
                    ConsumerStats::bump(&self.stats.session_rebuilds);
                    self.metrics.session_rebuilds.increment(1);
                    self.stats.session_down.store(false, Ordering::Release);
                    tracing::info!("consumer session rebuilt");
                    return Ok(session);
                }
                Err(e) => {
                    ConsumerStats::bump(&self.stats.session_errors);
                    self.metrics.session_error(e.kind()).increment(1);
                    let wait = backoff.next();
                    tracing::error!(error = %e, class = ?e.class(), retry_in = ?wait,
                        "rejoining the consumer group failed");
                    let until = tokio::time::Instant::now() + wait;
                    loop {
                        tokio::select! {
                            biased;
                            Some(c) = done.recv() => self.on_completion(c),
                            cmd = control.recv() => match cmd {
                                Some(Control::AddTopic(topic, handler, reply)) => {
                                    let topics = std::slice::from_ref(&topic);
                                    let result = ensure_dead_letter_topics(&*self.broker, &self.config, topics).await;
                                    if result.is_ok() {
                                        // The next join subscribes it.
                                        self.handlers.insert(topic, handler);
                                    }
                                    let _ = reply.send(result);
                                }
                                Some(Control::Shutdown(deadline)) => return Err(deadline),
                                None => return Err(None),
                            },
                            _ = tokio::time::sleep_until(until) => break,
                        }
                    }
                }
            }
        }
    }

    fn assign(&mut self, tps: Vec<TopicPartition>) {
        ConsumerStats::bump(&self.stats.rebalances);
        self.metrics.rebalances.increment(1);
        for tp in tps {
            tracing::debug!(partition = %tp, "assigned");
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            let metrics =
                self.topic_metrics.entry(tp.topic.clone()).or_insert_with(|| Arc::new(TopicMetrics::new(&tp.topic)));
            let state = PartitionState {
                epoch,
                frontier: Frontier::new(),
                fence: Arc::new(AtomicBool::new(false)),
                last_committed: None,
                metrics: metrics.clone(),
                commit_lag: telemetry::commit_lag(&tp),
            };
            state.publish_commit_lag();
            if let Some(old) = self.partitions.insert(tp, state) {
                old.fence.store(true, Ordering::Release);
            }
        }
    }

    /// Revoke: fence queued work, wait (bounded) for running handlers,
    /// commit the frontier, then release the partitions.
    async fn revoke(
        &mut self,
        session: &mut B::Session,
        done: &mut mpsc::UnboundedReceiver<Completion>,
        tps: Vec<TopicPartition>,
    ) {
        ConsumerStats::bump(&self.stats.rebalances);
        self.metrics.rebalances.increment(1);
        for tp in &tps {
            if let Some(p) = self.partitions.get(tp) {
                p.fence.store(true, Ordering::Release);
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.revoke_timeout;
        while tps.iter().any(|tp| self.partitions.get(tp).is_some_and(|p| p.frontier.in_flight() > 0)) {
            tokio::select! {
                // Deterministic: a completion that is ready wins over the deadline.
                biased;
                Some(c) = done.recv() => self.on_completion(c),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(?tps, "revoke timed out waiting for running handlers; their results will be fenced");
                    break;
                }
            }
        }
        let _ = self.commit(session, Some(&tps)).await;
        for tp in &tps {
            if let Some(p) = self.partitions.remove(tp) {
                // No longer ours: the next owner redoes what was not committed.
                p.commit_lag.set(0.0);
            }
        }
        if let Err(e) = session.release(&tps).await {
            tracing::warn!(error = %e, "releasing revoked partitions failed");
        }
    }

    fn lose(&mut self, tps: Vec<TopicPartition>) {
        ConsumerStats::bump(&self.stats.rebalances);
        self.metrics.rebalances.increment(1);
        for tp in tps {
            tracing::warn!(partition = %tp, "partition lost; its uncommitted work will be redelivered elsewhere");
            if let Some(p) = self.partitions.remove(&tp) {
                p.fence.store(true, Ordering::Release);
                p.commit_lag.set(0.0);
            }
        }
    }

    /// Turns a delivery into a pool task. Returns the submit still waiting
    /// for room, if the pool is full.
    fn dispatch(&mut self, delivery: Delivery) -> Option<PendingSubmit> {
        let tp = delivery.topic_partition();
        let Some(state) = self.partitions.get_mut(&tp) else {
            // Arrived after its partition was revoked; the next owner reads it.
            return None;
        };
        if state.frontier.seen(delivery.offset) {
            ConsumerStats::bump(&self.stats.redelivered_skipped);
            state.metrics.duplicates.increment(1);
            return None;
        }
        let Some(handler) = self.handlers.get(&*delivery.topic).cloned() else {
            // Never commit past it: hold the frontier so it is redelivered.
            tracing::warn!(topic = %delivery.topic, "delivery for a topic without handler; left uncommitted");
            state.frontier.dispatched(delivery.offset);
            state.frontier.abandoned(delivery.offset);
            return None;
        };
        ConsumerStats::bump(&self.stats.delivered);
        state.frontier.dispatched(delivery.offset);
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::Bug::CommitBeforeComplete) {
            state.frontier.completed(delivery.offset);
        }
        let (epoch, offset) = (state.epoch, delivery.offset);
        let done = self.done_tx.clone();
        let reply_tp = tp.clone();
        let reply = move |outcome: Outcome| {
            let _ = done.send(Completion { tp: reply_tp, epoch, offset, outcome });
        };
        let ctx = task::TaskContext {
            broker: self.broker.clone(),
            config: self.config.clone(),
            stats: self.stats.clone(),
            fence: state.fence.clone(),
            metrics: state.metrics.clone(),
        };
        let task = task::build(ctx, handler, delivery, reply);
        match self.pool.try_submit(task) {
            Ok(()) => None,
            Err(Rejected { error: SubmitError::QueueFull { .. }, task }) => {
                let pool = self.pool.clone();
                Some(async move { pool.submit_wait(task).await }.boxed())
            }
            Err(rejected) => {
                // Closed: dropping the task reports it unprocessed.
                drop(rejected);
                None
            }
        }
    }

    fn on_completion(&mut self, c: Completion) {
        let Some(state) = self.partitions.get_mut(&c.tp).filter(|s| s.epoch == c.epoch) else {
            ConsumerStats::bump(&self.stats.fenced);
            return;
        };
        match c.outcome {
            Outcome::Done(Ok(())) => {
                state.frontier.completed(c.offset);
                state.publish_commit_lag();
                let committable = state.frontier.committable();
                let window_full = self.window_trigger.is_some_and(|w| state.frontier.uncommitted() >= w);
                if committable >= self.config.commit_threshold || (window_full && committable > 0) {
                    self.due.insert(c.tp);
                }
            }
            Outcome::Done(Err(e)) => {
                tracing::debug!(partition = %c.tp, offset = c.offset, error = %e, "event not completed; frontier held");
                state.frontier.abandoned(c.offset);
            }
            Outcome::NotProcessed => state.frontier.abandoned(c.offset),
        }
    }

    /// Commits advanced frontiers (of `only`, or of every partition).
    async fn commit(&mut self, session: &mut B::Session, only: Option<&[TopicPartition]>) -> Result<(), BrokerError> {
        let mut offsets = Vec::new();
        for (tp, state) in &self.partitions {
            if only.is_some_and(|o| !o.contains(tp)) {
                continue;
            }
            if let Some(point) = state.frontier.commit_point() {
                if state.last_committed.is_none_or(|last| point > last) {
                    offsets.push((tp.clone(), point));
                }
            }
        }
        if offsets.is_empty() {
            return Ok(());
        }
        match session.commit(&offsets).await {
            Ok(()) => {
                ConsumerStats::bump(&self.stats.commits);
                for (tp, point) in offsets {
                    if let Some(state) = self.partitions.get_mut(&tp) {
                        state.last_committed = Some(point);
                        state.frontier.committed(point);
                        state.publish_commit_lag();
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Retried at the next tick (`commit_interval`, never a hot
                // loop); the frontier is kept, so nothing is skipped.
                ConsumerStats::bump(&self.stats.commit_errors);
                self.metrics.commit_errors.increment(1);
                match e.class() {
                    ErrorClass::Retriable => tracing::warn!(error = %e, "commit failed; will retry"),
                    ErrorClass::Permanent => {
                        tracing::error!(error = %e, kind = e.kind(), "commit refused; will retry at the next interval")
                    }
                    ErrorClass::Fatal => tracing::error!(error = %e, "commit failed: the session is gone"),
                }
                Err(e)
            }
        }
    }
}
