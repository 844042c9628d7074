//! The seam between the consumer and a broker: what Kafka and JetStream have
//! in common, and nothing broker-specific. The in-memory broker, the
//! simulator's adapter, rdkafka and async-nats each implement it, so the one
//! production consumer runs unchanged on all of them.

pub mod memory;
pub mod plan;
pub mod secret;
#[cfg(feature = "nats")] pub mod nats;
#[cfg(feature = "nats")] pub mod nats_security;
#[cfg(feature = "kafka")] pub mod kafka;
#[cfg(feature = "kafka")] pub mod kafka_security;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

/// Message headers, in order; names may repeat.
pub type Headers = Vec<(String, Vec<u8>)>;

/// One partition of one topic. For JetStream, a stream is one partition (0)
/// and offsets are stream sequences.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition (0 on NATS).
    pub partition: u32,
}

impl TopicPartition {
    /// `topic[partition]`.
    pub fn new(topic: impl Into<Arc<str>>, partition: u32) -> Self {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The topic (NATS: the stream's subject).
    pub topic: String,
    /// The message key: picks the partition (Kafka); `None` spreads messages.
    pub key: Option<Vec<u8>>,
    /// Header name/value pairs, in order.
    pub headers: Headers,
    /// The message body.
    pub payload: Vec<u8>,
}

/// Where the broker stored a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The partition it landed in (0 on NATS).
    pub partition: u32,
    /// Kafka offset or JetStream stream sequence.
    pub offset: u64,
    /// The broker recognised a retried publish and did not store it twice.
    pub duplicate: bool,
}

/// A message as the consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The topic it was read from.
    pub topic: Arc<str>,
    /// The partition it was read from (0 on NATS).
    pub partition: u32,
    /// Kafka offset or JetStream stream sequence.
    pub offset: u64,
    /// The message key, as published.
    pub key: Option<Vec<u8>>,
    /// Header name/value pairs, as published (adapters may add the reserved `x-eventbus-*` ones).
    pub headers: Headers,
    /// The message body.
    pub payload: Vec<u8>,
    /// When the broker stored it, if it says.
    pub timestamp: Option<SystemTime>,
    /// 1 on first delivery; higher when the broker knows it redelivers.
    pub attempt: u32,
}

impl Delivery {
    /// The topic and partition it was read from.
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition { topic: self.topic.clone(), partition: self.partition }
    }

    /// The dead-letter reason an adapter marked this delivery with (see
    /// [`HEADER_UNDELIVERABLE`]): the consumer dead-letters it with that
    /// reason and [`Delivery::undeliverable_detail`] as the error, without
    /// running the handler. `None` for an ordinary delivery.
    pub fn undeliverable(&self) -> Option<&str> {
        self.header(HEADER_UNDELIVERABLE).map(|v| std::str::from_utf8(v).unwrap_or("undeliverable"))
    }

    /// What the adapter said about an undeliverable delivery.
    pub fn undeliverable_detail(&self) -> Option<String> {
        self.header(HEADER_UNDELIVERABLE_DETAIL).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The last header named `name`.
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

/// Set (last) by an adapter on a delivery it cannot pass on as the producer
/// wrote it; the value is the dead-letter reason ([`REASON_UNDECODABLE_HEADERS`],
/// [`REASON_TOO_LARGE`]). Reserved: a record a producer wrote with this
/// header is dead-lettered too.
pub const HEADER_UNDELIVERABLE: &str = "x-eventbus-undeliverable";
/// What the adapter said about an undeliverable delivery (the dead letter's error).
pub const HEADER_UNDELIVERABLE_DETAIL: &str = "x-eventbus-undeliverable-detail";
/// Every header of the record as the producer wrote it, losslessly (Kafka:
/// `broker::kafka::raw_headers::encode`), on a delivery whose header names
/// could not all be delivered as text.
pub const HEADER_RAW_HEADERS: &str = "x-eventbus-raw-headers";
/// Dead-letter reason: a header name is not UTF-8.
pub const REASON_UNDECODABLE_HEADERS: &str = "undecodable-headers";
/// Dead-letter reason: the payload is larger than the adapter copies; the
/// delivery carries no payload (it stays at the origin position).
pub const REASON_TOO_LARGE: &str = "too-large";
/// Dead-letter reason: the bytes are not a valid envelope (`x-dlq-attempts: 0`).
pub const REASON_DECODE: &str = "decode";
/// Dead-letter reason: the handler failed (or panicked) on every attempt
/// (`x-dlq-attempts: <max_attempts>`).
pub const REASON_HANDLER: &str = "handler";
/// Dead-letter reason: the handler returned a
/// [`PayloadError`](crate::envelope::PayloadError), a payload that does not
/// decode into the handler's type: dead-lettered at once, not retried
/// (`x-dlq-attempts`: the attempt that returned it, 1 for `subscribe_typed`).
pub const REASON_PAYLOAD: &str = "payload";

/// Dead-letter header: the error of the last attempt (handler error, decode
/// error, or what the adapter said about an undeliverable delivery).
pub const DLQ_ERROR: &str = "x-dlq-error";
/// Dead-letter header: why the event was dead-lettered: [`REASON_HANDLER`]
/// (every attempt failed), [`REASON_DECODE`] (not a valid envelope),
/// [`REASON_PAYLOAD`] (the payload is not the handler's type),
/// [`REASON_UNDECODABLE_HEADERS`] or [`REASON_TOO_LARGE`].
pub const DLQ_REASON: &str = "x-dlq-reason";
/// Dead-letter header: handler attempts made, in decimal (0 when the handler never ran).
pub const DLQ_ATTEMPTS: &str = "x-dlq-attempts";
/// Dead-letter header: the topic the event was read from.
pub const DLQ_ORIGIN_TOPIC: &str = "x-dlq-origin-topic";
/// Dead-letter header: the partition it was read from, in decimal.
pub const DLQ_ORIGIN_PARTITION: &str = "x-dlq-origin-partition";
/// Dead-letter header: its offset (NATS: stream sequence) in that partition, in decimal.
pub const DLQ_ORIGIN_OFFSET: &str = "x-dlq-origin-offset";
/// Dead-letter header, set when the broker refused the dead letter with its
/// payload; the value is the broker's error. The payload stays at the origin position.
pub const DLQ_PAYLOAD_OMITTED: &str = "x-dlq-payload-omitted";

/// What a consumer session yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A message of an assigned partition.
    Message(Delivery),
    /// These partitions are now ours; delivery starts at their committed offset.
    Assigned(Vec<TopicPartition>),
    /// These partitions are being taken away. The consumer finishes or fences
    /// their work, commits, then calls [`Session::release`]; the broker gives
    /// them to another member only after that (revoke before assign).
    Revoked(Vec<TopicPartition>),
    /// These partitions were taken away without asking (session expired):
    /// another member may already own them, so nothing may be committed.
    Lost(Vec<TopicPartition>),
}

/// Whether a broker client currently reaches its broker; readiness probes and
/// reconnect callbacks watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// The client reaches its broker.
    Connected,
    /// The client has lost its broker (and is reconnecting).
    Disconnected,
}

/// How far a consumer group is behind one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: TopicPartition,
    /// The offset the next published message will get (Kafka's high
    /// watermark; JetStream's last sequence + 1).
    pub end_offset: u64,
    /// The group's committed offset (next to read); 0 when nothing is committed.
    pub committed: u64,
}

impl PartitionLag {
    /// Messages published but not yet committed by the group.
    pub fn lag(&self) -> u64 {
        self.end_offset.saturating_sub(self.committed)
    }
}

/// What a caller can do about a [`BrokerError`].
///
/// The table is [`BrokerError::class`]; `tests/error_classes.rs` holds one
/// test per class. No caller retries any class forever without a capped
/// backoff, a metric and a log line naming what is stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Trying the same call again later may succeed (the broker is down or
    /// slow, a stream is full for now).
    Retriable,
    /// The same call will fail again until an operator changes something
    /// (no such topic, not authorised, message too large, bad config).
    Permanent,
    /// The session cannot go on; the caller must rebuild it.
    Fatal,
}

/// Broker failures, typed by what the caller can do about them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker cannot be reached now; retriable.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker did not answer in time; retriable.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The topic does not exist (and the adapter does not create it here).
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// A setting of the adapter is invalid.
    #[error("invalid configuration {key}: {reason}")]
    Config {
        /// The setting, dotted (`kafka.session_timeout`).
        key: String,
        /// What it must be.
        reason: String,
    },
    /// The broker refused a commit (e.g. the partition is no longer this member's).
    #[error("commit rejected for {partition}: {reason}")]
    CommitRejected {
        /// The partition, as `topic[partition]`.
        partition: String,
        /// What the broker said.
        reason: String,
    },
    /// The broker refused the credentials or the operation (authentication
    /// or authorisation).
    #[error("not authorized: {0}")]
    Unauthorized(String),
    /// The broker refused this message for good (too large, invalid).
    #[error("message refused: {0}")]
    Refused(String),
    /// The broker has no room for now (a full stream with `discard = new`,
    /// a quota); may clear as retention removes old data.
    #[error("broker full: {0}")]
    Full(String),
    /// The session's client died (e.g. its poll thread); rebuild the session.
    #[error("session failed: {0}")]
    SessionFailed(String),
    /// The session (or the client) was closed.
    #[error("session closed")]
    Closed,
    /// An error no other variant describes; treated as permanent so nothing
    /// retries it without bound.
    #[error("{0}")]
    Other(String),
}

impl BrokerError {
    /// The error's class: the one table every caller consults.
    pub fn class(&self) -> ErrorClass {
        match self {
            BrokerError::Unavailable(_) | BrokerError::Timeout(_) | BrokerError::Full(_) => ErrorClass::Retriable,
            BrokerError::UnknownTopic(_)
            | BrokerError::Config { .. }
            | BrokerError::CommitRejected { .. }
            | BrokerError::Unauthorized(_)
            | BrokerError::Refused(_)
            | BrokerError::Other(_) => ErrorClass::Permanent,
            BrokerError::SessionFailed(_) | BrokerError::Closed => ErrorClass::Fatal,
        }
    }

    /// Whether trying the same call again later may succeed.
    pub fn is_retriable(&self) -> bool {
        self.class() == ErrorClass::Retriable
    }

    /// A short, stable name of the variant, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            BrokerError::Unavailable(_) => "unavailable",
            BrokerError::Timeout(_) => "timeout",
            BrokerError::UnknownTopic(_) => "unknown_topic",
            BrokerError::Config { .. } => "config",
            BrokerError::CommitRejected { .. } => "commit_rejected",
            BrokerError::Unauthorized(_) => "unauthorized",
            BrokerError::Refused(_) => "refused",
            BrokerError::Full(_) => "full",
            BrokerError::SessionFailed(_) => "session_failed",
            BrokerError::Closed => "closed",
            BrokerError::Other(_) => "other",
        }
    }
}

/// A broker connection: publishes, and opens consumer group sessions.
pub trait Broker: Send + Sync + 'static {
    /// The consumer group session [`Broker::subscribe`] opens.
    type Session: Session;

    /// Publishes one message and returns once the broker acknowledged it.
    fn publish(&self, msg: Outbound) -> impl Future<Output = Result<Position, BrokerError>> + Send;

    /// Joins consumer group `group` for `topics` (one join for all of them).
    fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> impl Future<Output = Result<Self::Session, BrokerError>> + Send;

    /// Makes sure `topic` exists with at least `partitions` partitions.
    fn ensure_topic(&self, topic: &str, partitions: u32) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Makes sure the dead-letter topic `dead_letter` of `source` exists and
    /// can hold what the consumer writes there (Kafka: as many partitions as
    /// the source; NATS: its own stream). Called when a topic is subscribed,
    /// so a name the broker cannot hold fails the subscribe, not the first
    /// poison event. The default makes a one-partition topic.
    fn ensure_dead_letter_topic(
        &self,
        source: &str,
        dead_letter: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        let _ = source;
        self.ensure_topic(dead_letter, 1)
    }

    /// Watches whether the client reaches its broker. The default suits a
    /// broker that cannot disconnect (in-process): always connected.
    fn connection_state(&self) -> tokio::sync::watch::Receiver<ConnectionState> {
        tokio::sync::watch::channel(ConnectionState::Connected).1
    }

    /// How many delivered messages of one partition a member may hold
    /// uncommitted before the broker stops delivering more (JetStream's
    /// `max_ack_pending`); `None` when the broker sets no such bound (Kafka,
    /// the memory broker). The consumer commits a partition early once it
    /// holds half of this uncommitted
    /// ([`ConsumerConfig::commit_threshold`](crate::consumer::ConsumerConfig::commit_threshold)).
    fn delivery_window(&self) -> Option<u64> {
        None
    }

    /// The group's lag on every partition of `topics`, read from the broker
    /// (end offset and committed offset), for metrics and backlog alerts.
    fn consumer_lag(
        &self,
        group: &str,
        topics: &[String],
    ) -> impl Future<Output = Result<Vec<PartitionLag>, BrokerError>> + Send {
        let _ = (group, topics);
        async { Err(BrokerError::Other("this broker does not report consumer lag".into())) }
    }
}

/// One member's view of a consumer group.
pub trait Session: Send + 'static {
    /// The next message or assignment change. Must be cancel-safe: dropping
    /// the future before it resolves loses nothing.
    fn next(&mut self) -> impl Future<Output = Result<SessionEvent, BrokerError>> + Send;

    /// Records that everything below `next_offset` of each partition is
    /// processed (Kafka's "next offset to read"; JetStream acks each message
    /// below it).
    fn commit(
        &mut self,
        offsets: &[(TopicPartition, u64)],
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Hands revoked partitions back to the group (after their final commit).
    fn release(&mut self, partitions: &[TopicPartition]) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Changes the subscribed topics: one rebalance, whatever the number.
    fn set_topics(&mut self, topics: &[String]) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Leaves the group. Uncommitted work is redelivered to the next owner.
    fn close(self) -> impl Future<Output = Result<(), BrokerError>> + Send;
}
