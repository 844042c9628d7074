//! The Kafka adapter, on rdkafka (librdkafka, built from the bundled source).
//!
//! # Mapping
//!
//! * A topic is a Kafka topic; partitions and offsets are Kafka's.
//! * [`Broker::publish`] goes through one idempotent producer
//!   (`enable.idempotence=true`, `acks=all`) with the message key (the bus
//!   passes the aggregate ID) and headers, and returns once the partition
//!   leader acknowledged the write with its (partition, offset), or a typed
//!   error. Keys are partitioned with Kafka's murmur2 (like the Java client
//!   and [`MemoryBroker`](crate::MemoryBroker)) unless configured otherwise.
//! * [`Broker::ensure_topic`] reads the topic's metadata and creates it
//!   (CreateTopics) or grows it (CreatePartitions) through the admin API.
//! * A consumer group session is one librdkafka consumer (`group.id` = the
//!   bus's `consumer.group`) subscribed to every topic, on the pattern of
//!   rust-rdkafka's `at_least_once` example: `enable.auto.offset.store=false`
//!   and `enable.auto.commit=true`. [`Session::commit`] stores exactly the
//!   frontier offsets it is given (no I/O; a fenced partition's offset is
//!   not stored) and librdkafka commits the stored offsets in the background
//!   every [`KafkaConfig::auto_commit_interval`]. Synchronous commits are
//!   kept for the two moments they matter: a partition being revoked (the
//!   revoke's final commit reaches the broker before the partition is
//!   handed on) and [`Session::close`] (everything stored is committed before
//!   the member leaves). A member that dies without closing loses at most
//!   an `auto_commit_interval` of commits: that work is redelivered.
//!
//! # The poll thread
//!
//! Each session owns a dedicated OS thread that calls `poll` on the
//! consumer in a loop and forwards messages and assignment changes, in the
//! order librdkafka produced them, into a channel; [`Session::next`] reads
//! that channel, so it is cancel-safe. The thread never waits on handlers,
//! so `max.poll.interval.ms` is never exceeded while the pool is full: when
//! more than [`KafkaConfig::max_buffered`] messages wait in the channel the
//! thread pauses the assigned partitions, and [`Session::next`] resumes them
//! as soon as the channel drained to half of it (librdkafka refetches from the last message handed
//! out, so a pause neither loses nor repeats a message).
//!
//! # Rebalances
//!
//! librdkafka runs the rebalance callback on the poll thread:
//!
//! * revoke: the callback sends [`SessionEvent::Revoked`] and then blocks
//!   the poll thread until the consumer called [`Session::release`] for
//!   those partitions (after it fenced their queued work, waited for the
//!   running handlers and committed their frontier), bounded by
//!   [`KafkaConfig::revoke_timeout`]. Only then does librdkafka give the
//!   partitions up and rejoin, so the next owner starts at the committed
//!   frontier. With the eager strategies every rebalance revokes the whole
//!   assignment; with `cooperative_sticky` only the partitions that move.
//! * lost (the session timed out, the member was fenced, or the assignment
//!   was otherwise lost): [`SessionEvent::Lost`], without waiting; nothing of
//!   those partitions is committed any more.
//! * assign: [`SessionEvent::Assigned`]; messages of the new assignment come
//!   after it in the channel.
//!
//! Commits are fenced locally too: an offset of a partition that is no
//! longer assigned to the session is not committed
//! ([`BrokerError::CommitRejected`]); the broker fences commits of an old
//! group generation.

mod assignments;
pub mod raw_headers;

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, watch};

use self::assignments::{Assignments, Epoch};
use super::kafka_security::{self, KafkaSecurity};

use super::{
    Broker, BrokerError, ConnectionState, Delivery, Headers, Outbound, PartitionLag, Position, Session, SessionEvent,
    TopicPartition,
};

// ---------------------------------------------------------------------------
// Configuration.

/// Where a group without a committed offset starts reading a partition
/// (`auto.offset.reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    /// Everything still in the partition (like the memory broker).
    #[default]
    Earliest,
    /// Only messages written after the group first read the partition.
    Latest,
    /// Fail (a consumer error is logged and the partition is not read).
    Error,
}

impl OffsetReset {
    fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
            OffsetReset::Error => "error",
        }
    }
}

/// Which messages of transactional producers are read (`isolation.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationLevel {
    /// Only committed transactions (and non-transactional messages).
    #[default]
    ReadCommitted,
    /// Everything, including aborted transactions.
    ReadUncommitted,
}

impl IsolationLevel {
    fn as_str(self) -> &'static str {
        match self {
            IsolationLevel::ReadCommitted => "read_committed",
            IsolationLevel::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// How the group spreads partitions over its members
/// (`partition.assignment.strategy`). Every member of a group must use the
/// same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RebalanceStrategy {
    /// Eager: every rebalance revokes the whole assignment; each topic's
    /// partitions in ranges over the members.
    Range,
    /// Eager: every rebalance revokes the whole assignment; all subscribed
    /// partitions dealt round-robin over the members.
    RoundRobin,
    /// Incremental: a rebalance revokes only the partitions that move, the
    /// others keep running (fewer pauses and fewer redeliveries).
    #[default]
    CooperativeSticky,
}

impl RebalanceStrategy {
    fn as_str(self) -> &'static str {
        match self {
            RebalanceStrategy::Range => "range",
            RebalanceStrategy::RoundRobin => "roundrobin",
            RebalanceStrategy::CooperativeSticky => "cooperative-sticky",
        }
    }
}

/// How the producer picks the partition of a keyed message (`partitioner`).
/// Unkeyed messages go to a random partition with the `*_random` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// murmur2 of the key, as the Java client and the memory broker.
    #[default]
    Murmur2Random,
    /// murmur2 of the key; keyless messages all go to one partition
    /// (`murmur2_random` spreads them at random).
    Murmur2,
    /// CRC32 of the key, librdkafka's own default.
    ConsistentRandom,
    /// CRC32 of the key; keyless (and empty-key) messages all go to one partition.
    Consistent,
    /// FNV-1a of the key (the hash of the Go Sarama client); keyless messages spread at random.
    Fnv1aRandom,
    /// FNV-1a of the key; keyless messages all go to one partition.
    Fnv1a,
    /// Any partition, at random (no per-key order: not for keyed events).
    Random,
}

impl Partitioner {
    fn as_str(self) -> &'static str {
        match self {
            Partitioner::Murmur2Random => "murmur2_random",
            Partitioner::Murmur2 => "murmur2",
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Consistent => "consistent",
            Partitioner::Fnv1aRandom => "fnv1a_random",
            Partitioner::Fnv1a => "fnv1a",
            Partitioner::Random => "random",
        }
    }
}

/// Settings of a [`KafkaBroker`]. Durations are whole milliseconds in config
/// files. Each typed field maps onto one librdkafka property (see
/// `docs/kafka.md`); anything else (TLS, SASL, tuning) goes through
/// [`KafkaConfig::properties`].
// `Debug` (secrets redacted) and `Display` are in `kafka_security`.
#[derive(Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`, comma-separated (`bootstrap.servers`).
    pub brokers: String,
    /// `client.id`, shown in broker logs and quotas.
    pub client_id: String,
    /// A member that sends no heartbeat for this long is removed from its
    /// group and its partitions are reassigned (`session.timeout.ms`).
    #[serde(with = "crate::config::millis")]
    pub session_timeout: Duration,
    /// `heartbeat.interval.ms`; below a third of `session_timeout`.
    #[serde(with = "crate::config::millis")]
    pub heartbeat_interval: Duration,
    /// `max.poll.interval.ms`: the poll thread polls continuously, except
    /// while a revoke waits for the consumer (at most `revoke_timeout`).
    #[serde(with = "crate::config::millis")]
    pub max_poll_interval: Duration,
    /// `fetch.min.bytes`.
    pub fetch_min_bytes: u32,
    /// `fetch.max.bytes`.
    pub fetch_max_bytes: u32,
    /// `max.partition.fetch.bytes`.
    pub max_partition_fetch_bytes: u32,
    /// `fetch.wait.max.ms`.
    #[serde(with = "crate::config::millis")]
    pub fetch_max_wait: Duration,
    /// `auto.offset.reset`.
    pub offset_reset: OffsetReset,
    /// `isolation.level`.
    pub isolation_level: IsolationLevel,
    /// `partition.assignment.strategy`.
    pub rebalance_strategy: RebalanceStrategy,
    /// `partitioner`.
    pub partitioner: Partitioner,
    /// How long a publish may take, retries included, before it fails with
    /// [`BrokerError::Timeout`] (`message.timeout.ms`).
    #[serde(with = "crate::config::millis")]
    pub message_timeout: Duration,
    /// `linger.ms`: how long the producer batches.
    #[serde(with = "crate::config::millis")]
    pub linger: Duration,
    /// Replication factor of topics created by `ensure_topic`; -1 = the
    /// broker's `default.replication.factor`.
    pub replication_factor: i32,
    /// Topic configuration of topics created by `ensure_topic`
    /// (`retention.ms`, `min.insync.replicas`, ...).
    pub topic_properties: BTreeMap<String, String>,
    /// Bound on admin and metadata requests, commits and leaving the group.
    #[serde(with = "crate::config::millis")]
    pub request_timeout: Duration,
    /// How long a revoke waits for the consumer to commit and release the
    /// partitions before librdkafka gives them up anyway. Must stay below
    /// `max_poll_interval` (and cover the bus's `consumer.revoke_timeout`).
    #[serde(with = "crate::config::millis")]
    pub revoke_timeout: Duration,
    /// How often librdkafka commits the offsets the consumer stored
    /// (`auto.commit.interval.ms`); revokes and close commit at once.
    #[serde(with = "crate::config::millis")]
    pub auto_commit_interval: Duration,
    /// Messages buffered between the poll thread and the consumer before the
    /// assigned partitions are paused (see [`KafkaConfig::bounded`]).
    pub max_buffered: usize,
    /// The largest record payload the sessions copy out of librdkafka. A
    /// larger record is delivered without its payload, marked undeliverable
    /// (`too-large`), so the consumer dead-letters it; its payload stays at
    /// the origin offset. Defaults to the envelope's limit
    /// ([`MAX_ENVELOPE_BYTES`](crate::envelope::MAX_ENVELOPE_BYTES)); raise
    /// it for larger raw payloads.
    pub max_payload_bytes: usize,
    /// librdkafka properties for every client (TLS, SASL, ...), e.g.
    /// `"security.protocol" = "sasl_ssl"`.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties of the producer only.
    pub producer_properties: BTreeMap<String, String>,
    /// librdkafka properties of the group consumers only.
    pub consumer_properties: BTreeMap<String, String>,
    /// TLS and SASL (`[kafka.security]`, see `docs/security.md`).
    pub security: KafkaSecurity,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "eventbus".into(),
            session_timeout: Duration::from_secs(45),
            heartbeat_interval: Duration::from_secs(3),
            max_poll_interval: Duration::from_secs(300),
            fetch_min_bytes: 1,
            fetch_max_bytes: 52_428_800,
            max_partition_fetch_bytes: 1_048_576,
            fetch_max_wait: Duration::from_millis(500),
            offset_reset: OffsetReset::Earliest,
            isolation_level: IsolationLevel::ReadCommitted,
            rebalance_strategy: RebalanceStrategy::CooperativeSticky,
            partitioner: Partitioner::Murmur2Random,
            message_timeout: Duration::from_secs(30),
            linger: Duration::from_millis(5),
            replication_factor: -1,
            topic_properties: BTreeMap::new(),
            request_timeout: Duration::from_secs(30),
            revoke_timeout: Duration::from_secs(60),
            auto_commit_interval: Duration::from_millis(500),
            max_buffered: 1000,
            max_payload_bytes: crate::envelope::MAX_ENVELOPE_BYTES,
            properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            security: KafkaSecurity::default(),
        }
    }
}

fn config_error(key: &str, reason: impl Into<String>) -> BrokerError {
    BrokerError::Config { key: format!("kafka.{key}"), reason: reason.into() }
}

/// librdkafka properties the adapter sets itself: they cannot be passed
/// through, because the guarantees depend on them (or a typed field sets
/// them). Aliases included.
const RESERVED: &[(&str, &str)] = &[
    ("enable.auto.commit", "only completed frontiers are stored, then committed"),
    ("enable.auto.offset.store", "only completed frontiers are stored, then committed"),
    ("auto.commit.enable", "only completed frontiers are stored, then committed"),
    ("auto.commit.interval.ms", "set kafka.auto_commit_interval"),
    ("enable.idempotence", "the producer is always idempotent"),
    ("acks", "the producer always waits for acks=all"),
    ("request.required.acks", "the producer always waits for acks=all"),
    ("group.id", "the group is the bus's consumer.group"),
    ("enable.partition.eof", "the session does not report partition ends"),
    ("bootstrap.servers", "set kafka.brokers"),
    ("metadata.broker.list", "set kafka.brokers"),
    ("client.id", "set kafka.client_id"),
    ("session.timeout.ms", "set kafka.session_timeout"),
    ("heartbeat.interval.ms", "set kafka.heartbeat_interval"),
    ("max.poll.interval.ms", "set kafka.max_poll_interval"),
    ("fetch.min.bytes", "set kafka.fetch_min_bytes"),
    ("fetch.max.bytes", "set kafka.fetch_max_bytes"),
    ("max.partition.fetch.bytes", "set kafka.max_partition_fetch_bytes"),
    ("fetch.message.max.bytes", "set kafka.max_partition_fetch_bytes"),
    ("fetch.wait.max.ms", "set kafka.fetch_max_wait"),
    ("auto.offset.reset", "set kafka.offset_reset"),
    ("isolation.level", "set kafka.isolation_level"),
    ("partition.assignment.strategy", "set kafka.rebalance_strategy"),
    ("partitioner", "set kafka.partitioner"),
    ("message.timeout.ms", "set kafka.message_timeout"),
    ("delivery.timeout.ms", "set kafka.message_timeout"),
    ("linger.ms", "set kafka.linger"),
    ("queue.buffering.max.ms", "set kafka.linger"),
];

impl KafkaConfig {
    /// Caps `max_buffered` (the messages read ahead of the consumer) at
    /// `capacity` (at least 1); pass the bus's `pool.capacity`, so no more
    /// is read ahead than the pool can hold.
    #[must_use]
    pub fn bounded(mut self, capacity: usize) -> Self {
        self.max_buffered = self.max_buffered.min(capacity.max(1));
        self
    }

    /// Rejects values the adapter cannot run with, naming the key. librdkafka
    /// checks the rest when the clients are created.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(config_error("brokers", "must name at least one host:port"));
        }
        if self.session_timeout < Duration::from_millis(100) {
            return Err(config_error("session_timeout", "must be at least 100 ms"));
        }
        if self.session_timeout > self.max_poll_interval {
            return Err(config_error(
                "session_timeout",
                format!("must not exceed max_poll_interval ({:?})", self.max_poll_interval),
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.session_timeout {
            return Err(config_error(
                "heartbeat_interval",
                format!("must be positive and below session_timeout ({:?})", self.session_timeout),
            ));
        }
        if self.revoke_timeout.is_zero() || self.revoke_timeout >= self.max_poll_interval {
            return Err(config_error(
                "revoke_timeout",
                format!(
                    "must be positive and below max_poll_interval ({:?}): a revoke blocks the poll thread",
                    self.max_poll_interval
                ),
            ));
        }
        if self.request_timeout < Duration::from_millis(10) {
            return Err(config_error("request_timeout", "must be at least 10 ms"));
        }
        if self.message_timeout.is_zero() {
            return Err(config_error("message_timeout", "must be positive"));
        }
        if self.auto_commit_interval.is_zero() {
            return Err(config_error("auto_commit_interval", "must be positive"));
        }
        if self.max_buffered == 0 {
            return Err(config_error("max_buffered", "must be at least 1"));
        }
        if self.max_payload_bytes == 0 {
            return Err(config_error("max_payload_bytes", "must be at least 1"));
        }
        self.security.validate()?;
        if self.replication_factor == 0 || self.replication_factor < -1 {
            return Err(config_error("replication_factor", "must be positive, or -1 for the broker's default"));
        }
        for (section, map) in [
            ("properties", &self.properties),
            ("producer_properties", &self.producer_properties),
            ("consumer_properties", &self.consumer_properties),
        ] {
            for key in map.keys() {
                if let Some((_, why)) = RESERVED.iter().find(|(k, _)| k == key) {
                    return Err(config_error(&format!("{section}.{key}"), format!("cannot be overridden: {why}")));
                }
            }
        }
        Ok(())
    }

    fn common(&self) -> Props {
        let mut p = Props::default();
        p.set("bootstrap.servers", self.brokers.trim(), "kafka.brokers");
        p.set("client.id", &self.client_id, "kafka.client_id");
        for (property, value, key) in self.security.properties() {
            p.set(property, value, key);
        }
        p
    }

    fn pass_through(p: &mut Props, section: &str, map: &BTreeMap<String, String>) {
        for (k, v) in map {
            p.set(k, v, &format!("kafka.{section}.{k}"));
        }
    }

    fn producer_props(&self) -> Props {
        let mut p = self.common();
        // The statistics tell the connection state when brokers come back
        // (see `LogContext`); a producer property may override the interval.
        p.set("statistics.interval.ms", STATISTICS_INTERVAL_MS, "kafka");
        p.set("enable.idempotence", "true", "kafka");
        p.set("acks", "all", "kafka");
        p.set("partitioner", self.partitioner.as_str(), "kafka.partitioner");
        p.set("message.timeout.ms", millis(self.message_timeout), "kafka.message_timeout");
        p.set("linger.ms", millis(self.linger), "kafka.linger");
        Self::pass_through(&mut p, "properties", &self.properties);
        Self::pass_through(&mut p, "producer_properties", &self.producer_properties);
        p
    }

    fn admin_props(&self) -> Props {
        let mut p = self.common();
        // Looking a topic up must not create it.
        p.set("allow.auto.create.topics", "false", "kafka");
        Self::pass_through(&mut p, "properties", &self.properties);
        p
    }

    fn consumer_props(&self, group: &str) -> Props {
        let mut p = self.common();
        p.set("group.id", group, "consumer.group");
        p.set("enable.auto.commit", "true", "kafka");
        p.set("auto.commit.interval.ms", millis(self.auto_commit_interval), "kafka.auto_commit_interval");
        p.set("enable.auto.offset.store", "false", "kafka");
        p.set("enable.partition.eof", "false", "kafka");
        p.set("session.timeout.ms", millis(self.session_timeout), "kafka.session_timeout");
        p.set("heartbeat.interval.ms", millis(self.heartbeat_interval), "kafka.heartbeat_interval");
        p.set("max.poll.interval.ms", millis(self.max_poll_interval), "kafka.max_poll_interval");
        p.set("fetch.min.bytes", self.fetch_min_bytes, "kafka.fetch_min_bytes");
        p.set("fetch.max.bytes", self.fetch_max_bytes, "kafka.fetch_max_bytes");
        p.set("max.partition.fetch.bytes", self.max_partition_fetch_bytes, "kafka.max_partition_fetch_bytes");
        p.set("fetch.wait.max.ms", millis(self.fetch_max_wait), "kafka.fetch_max_wait");
        p.set("auto.offset.reset", self.offset_reset.as_str(), "kafka.offset_reset");
        p.set("isolation.level", self.isolation_level.as_str(), "kafka.isolation_level");
        p.set("partition.assignment.strategy", self.rebalance_strategy.as_str(), "kafka.rebalance_strategy");
        Self::pass_through(&mut p, "properties", &self.properties);
        Self::pass_through(&mut p, "consumer_properties", &self.consumer_properties);
        p
    }
}

/// How often the producer reports statistics, from which a lost connection
/// is seen to be back.
const STATISTICS_INTERVAL_MS: u32 = 1000;

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

/// librdkafka properties with the configuration key each came from, so a
/// rejected property is reported under the key the user wrote.
#[derive(Debug, Clone, Default)]
struct Props {
    /// (librdkafka property, value, configuration key)
    entries: Vec<(String, String, String)>,
}

impl Props {
    fn set(&mut self, property: &str, value: impl ToString, key: &str) {
        self.entries.retain(|(p, _, _)| p != property);
        self.entries.push((property.to_string(), value.to_string(), key.to_string()));
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (p, v, _) in &self.entries {
            c.set(p, v);
        }
        c.set_log_level(log_level());
        c
    }

    /// The configuration key behind a client creation error.
    fn key_of(&self, message: &str) -> String {
        // librdkafka names the offending property first in its messages
        // ("`fetch.max.bytes` must be >= `message.max.bytes`"): the property
        // we set that is named earliest wins, the longer one on a tie.
        let named = self
            .entries
            .iter()
            .filter_map(|(p, _, k)| message.find(p.as_str()).map(|at| (at, std::cmp::Reverse(p.len()), k)))
            .min()
            .map(|(_, _, k)| k.clone());
        // "No provider for SASL mechanism X" names the value, not the property.
        let sasl = || {
            message
                .contains("SASL mechanism")
                .then(|| self.entries.iter().find(|(p, _, _)| p.starts_with("sasl.mechanism")))
                .flatten()
                .map(|(_, _, k)| k.clone())
        };
        named.or_else(sasl).unwrap_or_else(|| "kafka".to_string())
    }

    fn error(&self, e: KafkaError) -> BrokerError {
        match e {
            KafkaError::ClientConfig(_, description, property, value) => {
                let key = self
                    .entries
                    .iter()
                    .find(|(p, _, _)| *p == property)
                    .map_or_else(|| format!("kafka.properties.{property}"), |(_, _, k)| k.clone());
                let value = kafka_security::shown(&property, &value);
                BrokerError::Config { key, reason: format!("{description} ({property}={value:?})") }
            }
            KafkaError::ClientCreation(message) => BrokerError::Config { key: self.key_of(&message), reason: message },
            other => BrokerError::Other(format!("creating a Kafka client: {other}")),
        }
    }
}

/// librdkafka's log level following the tracing subscriber's.
fn log_level() -> RDKafkaLogLevel {
    use tracing::level_filters::LevelFilter;
    let max = LevelFilter::current();
    if max >= LevelFilter::DEBUG {
        RDKafkaLogLevel::Debug
    } else if max >= LevelFilter::INFO {
        RDKafkaLogLevel::Info
    } else if max >= LevelFilter::WARN {
        RDKafkaLogLevel::Warning
    } else {
        RDKafkaLogLevel::Error
    }
}

/// Kafka's legal topic names.
fn validate_topic(topic: &str) -> Result<(), BrokerError> {
    if topic.is_empty() || topic.len() > 249 || topic == "." || topic == ".." {
        return Err(config_error("topic", format!("{topic:?} is not a valid Kafka topic name (1-249 characters)")));
    }
    if !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(config_error("topic", format!("{topic:?} may only contain A-Z a-z 0-9 . _ -")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Error mapping.

/// What the adapter was doing when librdkafka returned an error code: the
/// same code means something else for a commit (a group generation the
/// broker fenced) than for a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Publish,
    Commit,
    /// Metadata, admin requests, offsets and watermarks.
    Admin,
}

/// The one table from librdkafka error codes to [`BrokerError`] (and so to
/// its [`ErrorClass`](super::ErrorClass)); `what` names the call and its
/// topic or partition. Each row has its unit test (`tests::table_*`).
/// [`BrokerError::Other`] (permanent) only for codes no row names.
fn classify(op: Op, what: &str, code: RDKafkaErrorCode) -> BrokerError {
    use RDKafkaErrorCode as C;
    let text = || format!("{what}: {code}");
    match code {
        // Slow: the same call may succeed later.
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut | C::TimedOutQueue => {
            BrokerError::Timeout(text())
        }
        // Not reachable or not ready for now.
        C::AllBrokersDown
        | C::BrokerTransportFailure
        | C::Resolve
        | C::BrokerNotAvailable
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::NetworkException
        | C::CoordinatorNotAvailable
        | C::CoordinatorLoadInProgress
        | C::NotCoordinator
        | C::WaitingForCoordinator
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::ReplicaNotAvailable
        | C::KafkaStorageError
        | C::NotController
        | C::OffsetNotAvailable
        | C::PreferredLeaderNotAvailable
        | C::UnstableOffsetCommit
        | C::DestroyBroker => BrokerError::Unavailable(text()),
        // No room for now: the local producer queue, a broker quota.
        C::QueueFull | C::ThrottlingQuotaExceeded => BrokerError::Full(text()),
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => BrokerError::UnknownTopic(text()),
        // Credentials or ACLs.
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::DelegationTokenAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::Authentication => BrokerError::Unauthorized(text()),
        // This message, for good.
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidMessage
        | C::InvalidRecord
        | C::InvalidTimestamp
        | C::OffsetMetadataTooLarge => BrokerError::Refused(text()),
        C::InvalidTopic => config_error("topic", format!("{what}: topic name rejected by the broker ({code})")),
        C::InvalidReplicationFactor | C::InvalidReplicaAssignment => config_error("replication_factor", text()),
        C::InvalidConfig | C::PolicyViolation => config_error("topic_properties", text()),
        C::InvalidPartitions => BrokerError::Config { key: "partitions".into(), reason: text() },
        C::InvalidRequiredAcks => config_error("properties", text()),
        // The client itself is dead (a fatal idempotent-producer error, a
        // fenced producer, a destroyed handle): rebuild it.
        C::Fatal | C::ProducerFenced | C::InvalidProducerEpoch | C::BrokerDestroy => BrokerError::SessionFailed(text()),
        // The group moved on: the commit of an old generation is fenced.
        C::IllegalGeneration
        | C::UnknownMemberId
        | C::RebalanceInProgress
        | C::FencedInstanceId
        | C::AssignmentLost
        | C::StaleMemberEpoch
        | C::FencedMemberEpoch
        | C::Fenced
        | C::State => match op {
            Op::Commit => BrokerError::CommitRejected {
                partition: what.strip_prefix("commit of ").unwrap_or(what).to_string(),
                reason: code.to_string(),
            },
            Op::Publish | Op::Admin => BrokerError::Unavailable(text()),
        },
        _ => BrokerError::Other(text()),
    }
}

/// A [`KafkaError`] without an error code worth a row: the handle went
/// away (`Canceled`: the producer is shutting down) or something unknown.
fn kafka_error(op: Op, what: &str, e: KafkaError) -> BrokerError {
    match e {
        KafkaError::Canceled => BrokerError::Closed,
        // rdkafka reports no code for a failed admin request as a whole.
        KafkaError::AdminOp(code) => classify(op, what, code),
        e => match e.rdkafka_error_code() {
            Some(code) => classify(op, what, code),
            None => BrokerError::Other(format!("{what}: {e}")),
        },
    }
}

fn produce_error(topic: &str, e: KafkaError) -> BrokerError {
    kafka_error(Op::Publish, &format!("publish to {topic:?}"), e)
}

fn commit_error(code: RDKafkaErrorCode, partition: &str) -> BrokerError {
    classify(Op::Commit, &format!("commit of {partition}"), code)
}

fn code_error(what: &str, code: RDKafkaErrorCode) -> BrokerError {
    classify(Op::Admin, what, code)
}

fn metadata_error(what: &str, e: KafkaError) -> BrokerError {
    kafka_error(Op::Admin, what, e)
}

// ---------------------------------------------------------------------------
// Contexts: librdkafka logs and errors go to tracing.

fn log_to_tracing(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "{fac}: {message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "{fac}: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
    }
}

/// The state [`Broker::connection_state`] reports: Connected while the
/// producer reaches a broker and no session's poll thread has died.
///
/// librdkafka reports `AllBrokersDown` through the error callback when it
/// lost every broker connection, but reports no recovery; its statistics,
/// every `STATISTICS_INTERVAL_MS`, list each broker's state, and one in
/// state `UP` means it is back. A session whose poll thread died counts as
/// a disconnect until that session is closed or dropped (the consumer
/// rebuilds it), so `health()` is not ready meanwhile.
pub struct ConnectionTracker {
    state: watch::Sender<ConnectionState>,
    reachable: AtomicBool,
    dead_sessions: AtomicUsize,
}

impl ConnectionTracker {
    fn new() -> ConnectionTracker {
        // Connected until librdkafka says otherwise (it connects lazily).
        ConnectionTracker {
            state: watch::Sender::new(ConnectionState::Connected),
            reachable: AtomicBool::new(true),
            dead_sessions: AtomicUsize::new(0),
        }
    }

    fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Release);
        self.publish();
    }

    fn session_died(&self) {
        self.dead_sessions.fetch_add(1, Ordering::AcqRel);
        self.publish();
    }

    fn dead_session_gone(&self) {
        self.dead_sessions.fetch_sub(1, Ordering::AcqRel);
        self.publish();
    }

    fn publish(&self) {
        let state = if self.reachable.load(Ordering::Acquire) && self.dead_sessions.load(Ordering::Acquire) == 0 {
            ConnectionState::Connected
        } else {
            ConnectionState::Disconnected
        };
        // Only transitions notify, so watchers can count reconnects.
        let changed = self.state.send_if_modified(|s| std::mem::replace(s, state) != state);
        if changed {
            tracing::info!(?state, "kafka connection state changed");
        }
    }
}

/// Context of the producer and the admin client. The producer's also keeps
/// the [`ConnectionTracker`] up to date.
#[derive(Clone)]
pub struct LogContext {
    role: &'static str,
    connection: Option<Arc<ConnectionTracker>>,
    security: kafka_security::SecurityFailures,
}

impl LogContext {
    fn new(role: &'static str) -> LogContext {
        LogContext { role, connection: None, security: Default::default() }
    }

    fn set_reachable(&self, reachable: bool) {
        if let Some(connection) = &self.connection {
            connection.set_reachable(reachable);
        }
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(client = self.role, %error, "kafka client error: {reason}");
        self.security.observe(&error, reason);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.set_reachable(false);
        }
    }

    fn stats(&self, statistics: Statistics) {
        // librdkafka's internal and logical (coordinator) brokers are not
        // connections.
        let up =
            statistics.brokers.values().any(|b| b.state == "UP" && (b.source == "learned" || b.source == "configured"));
        if up {
            self.set_reachable(true);
        }
    }
}

/// The helper consumers (configuration check, offset reads) never join.
impl ConsumerContext for LogContext {}

// ---------------------------------------------------------------------------
// The broker.

/// Counters of a [`KafkaBroker`] and its sessions.
#[derive(Debug, Default)]
pub struct KafkaStats {
    /// Messages read by the poll threads.
    pub fetched: AtomicU64,
    /// Assignments received.
    pub assigned: AtomicU64,
    /// Revokes handed to the consumer (each waited for its release).
    pub revoked: AtomicU64,
    /// Revokes whose release did not come within `revoke_timeout`.
    pub revoke_timeouts: AtomicU64,
    /// Assignments lost (session timeout, fencing, rebalance errors).
    pub lost: AtomicU64,
    /// Times the poll thread paused its partitions (buffer full).
    pub pauses: AtomicU64,
    /// Times it resumed them.
    pub resumes: AtomicU64,
    /// Successful commits.
    pub commits: AtomicU64,
    /// Failed or (partly) rejected commits.
    pub commit_errors: AtomicU64,
    /// Consumer errors reported by librdkafka (transport, coordinator, ...).
    pub consumer_errors: AtomicU64,
    /// Sessions whose poll thread died (panic or fatal error).
    pub session_failures: AtomicU64,
    /// Records delivered without their payload: above `max_payload_bytes`.
    pub oversized: AtomicU64,
    /// Records with a header name that is not UTF-8.
    pub undecodable_headers: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer<LogContext>,
    admin: Arc<AdminClient<LogContext>>,
    stats: Arc<KafkaStats>,
    /// Kept by the producer's context and the sessions.
    connection: Arc<ConnectionTracker>,
    /// Per group, a member that never joins, for reading committed offsets
    /// (consumer lag is read periodically: create it once).
    offset_readers: Mutex<HashMap<String, Arc<BaseConsumer<LogContext>>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a consumer that has a group.id closes it and polls until
        // closed: keep that off the async worker threads.
        let readers = std::mem::take(&mut *lock(&self.offset_readers));
        if readers.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(readers))),
            Err(_) => drop(readers),
        }
    }
}

/// A Kafka cluster: one idempotent producer, one admin client, and one
/// consumer per group session. Cloning shares them.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker").field("brokers", &self.inner.config.brokers).finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// Validates `config` and creates the producer and admin client (and,
    /// to validate its settings, a consumer that is dropped again). Does not
    /// contact the cluster: librdkafka connects lazily and reconnects on its
    /// own. See [`KafkaBroker::connect`].
    pub fn new(config: KafkaConfig) -> Result<KafkaBroker, BrokerError> {
        config.validate()?;
        let config = KafkaSecurity::prepare(config)?;
        let props = config.producer_props();
        let connection = Arc::new(ConnectionTracker::new());
        // The producer connects at once (the admin client only on demand, and
        // reports no errors): its TLS/SASL failures fail `connect`.
        let failures = kafka_security::SecurityFailures::default();
        let context = LogContext {
            connection: Some(connection.clone()),
            security: failures.clone(),
            ..LogContext::new("producer")
        };
        let producer: FutureProducer<LogContext> =
            props.client_config().create_with_context(context).map_err(|e| props.error(e))?;
        let props = config.admin_props();
        let admin: AdminClient<LogContext> = props
            .client_config()
            .create_with_context(LogContext { security: failures, ..LogContext::new("admin") })
            .map_err(|e| props.error(e))?;
        // librdkafka checks consumer properties (and their combinations) when
        // a consumer is created: do it now, not at the first subscribe.
        // Without a group.id it never joins, so dropping it does not block.
        let mut props = config.consumer_props("eventbus-config-check");
        props.entries.retain(|(p, _, _)| p != "group.id");
        let check: BaseConsumer<LogContext> =
            props.client_config().create_with_context(LogContext::new("consumer")).map_err(|e| props.error(e))?;
        drop(check);
        Ok(KafkaBroker {
            inner: Arc::new(Inner {
                config,
                producer,
                admin: Arc::new(admin),
                stats: Arc::default(),
                connection,
                offset_readers: Mutex::default(),
            }),
        })
    }

    /// Like [`KafkaBroker::new`], then reads the cluster's metadata: fails
    /// with [`BrokerError::Unavailable`] or [`BrokerError::Timeout`] when no
    /// broker answers within `request_timeout`.
    pub async fn connect(config: KafkaConfig) -> Result<KafkaBroker, BrokerError> {
        let broker = KafkaBroker::new(config)?;
        let inner = broker.inner.clone();
        let brokers = inner.config.brokers.clone();
        let timeout = inner.config.request_timeout;
        let fetch = async {
            tokio::task::spawn_blocking(move || inner.admin.inner().fetch_metadata(None, timeout).map(|_| ()))
                .await
                .map_err(|e| BrokerError::Other(e.to_string()))?
                .map_err(|e| match broker.inner.config.security.connect_error(&brokers, &e) {
                    Some(typed) => typed,
                    None => match metadata_error(&format!("cannot reach Kafka at {brokers}"), e) {
                        BrokerError::Other(m) => BrokerError::Unavailable(m),
                        e => e,
                    },
                })
        };
        // A failed TLS handshake or SASL login fails now, typed, not as a timeout.
        let failures = broker.inner.admin.inner().context().security.clone();
        failures.guard(&brokers, &broker.inner.config.security, fetch).await?;
        Ok(broker)
    }

    /// The configuration it was connected with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Counters of the producer and every session.
    pub fn stats(&self) -> &Arc<KafkaStats> {
        &self.inner.stats
    }

    /// The producer (for tools and tests).
    pub fn producer(&self) -> &FutureProducer<LogContext> {
        &self.inner.producer
    }

    /// Partition count of `topic`, `None` if it does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<Option<u32>, BrokerError> {
        validate_topic(topic)?;
        let inner = self.inner.clone();
        let name = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let md = inner
                .admin
                .inner()
                .fetch_metadata(Some(&name), inner.config.request_timeout)
                .map_err(|e| metadata_error(&format!("metadata of {name:?}"), e))?;
            let Some(t) = md.topics().iter().find(|t| t.name() == name) else {
                return Ok(None);
            };
            match t.error().map(RDKafkaErrorCode::from) {
                None => Ok(Some(t.partitions().len() as u32).filter(|n| *n > 0)),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => Ok(None),
                Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
                    Err(BrokerError::Unauthorized(format!("metadata of {name:?}: not authorized")))
                }
                Some(RDKafkaErrorCode::InvalidTopic) => {
                    Err(config_error("topic", format!("{name:?} rejected by the broker")))
                }
                Some(code) => Err(code_error(&format!("metadata of {name:?}"), code)),
            }
        })
        .await
        .map_err(|e| BrokerError::Other(e.to_string()))?
    }

    /// The committed offsets (next offset to read) of `group` for `tps`, read
    /// with a separate consumer of that group that does not join it.
    pub async fn committed_offsets(
        &self,
        group: &str,
        tps: &[TopicPartition],
    ) -> Result<BTreeMap<TopicPartition, Option<u64>>, BrokerError> {
        let consumer = self.offset_reader(group)?;
        let mut tpl = TopicPartitionList::with_capacity(tps.len());
        for tp in tps {
            tpl.add_partition(&tp.topic, tp.partition as i32);
        }
        let timeout = self.inner.config.request_timeout;
        let tps = tps.to_vec();
        tokio::task::spawn_blocking(move || {
            let tpl =
                consumer.committed_offsets(tpl, timeout).map_err(|e| metadata_error("reading committed offsets", e))?;
            let mut out = BTreeMap::new();
            for tp in tps {
                let offset = tpl.find_partition(&tp.topic, tp.partition as i32).and_then(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o as u64),
                    _ => None,
                });
                out.insert(tp, offset);
            }
            Ok(out)
        })
        .await
        .map_err(|e| BrokerError::Other(e.to_string()))?
    }

    /// The cached offset-reading consumer of `group`.
    fn offset_reader(&self, group: &str) -> Result<Arc<BaseConsumer<LogContext>>, BrokerError> {
        let mut readers = lock(&self.inner.offset_readers);
        if let Some(c) = readers.get(group) {
            return Ok(c.clone());
        }
        let props = self.inner.config.consumer_props(group);
        let consumer: BaseConsumer<LogContext> =
            props.client_config().create_with_context(LogContext::new("offsets")).map_err(|e| props.error(e))?;
        let consumer = Arc::new(consumer);
        readers.insert(group.to_string(), consumer.clone());
        Ok(consumer)
    }

    /// The high watermark (next offset to be written) of `tp`.
    pub async fn end_offset(&self, tp: &TopicPartition) -> Result<u64, BrokerError> {
        let inner = self.inner.clone();
        let tp = tp.clone();
        tokio::task::spawn_blocking(move || {
            inner
                .admin
                .inner()
                .fetch_watermarks(&tp.topic, tp.partition as i32, inner.config.request_timeout)
                .map(|(_, high)| high.max(0) as u64)
                .map_err(|e| metadata_error(&format!("watermarks of {tp}"), e))
        })
        .await
        .map_err(|e| BrokerError::Other(e.to_string()))?
    }

    /// Waits (bounded by `request_timeout`) until the metadata shows `topic`
    /// with at least `partitions` partitions.
    async fn await_partitions(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        loop {
            match self.partitions(topic).await {
                Ok(Some(n)) if n >= partitions => return Ok(()),
                Ok(_) | Err(BrokerError::Unavailable(_)) if Instant::now() < deadline => {}
                Ok(n) => {
                    return Err(BrokerError::Timeout(format!(
                        "topic {topic:?} has {} partitions, not {partitions}, {:?} after creating it",
                        n.unwrap_or(0),
                        self.inner.config.request_timeout
                    )))
                }
                Err(e) => return Err(e),
            }
            // Metadata propagation: poll again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn admin_options(&self) -> AdminOptions {
        let t = self.inner.config.request_timeout;
        AdminOptions::new().request_timeout(Some(t)).operation_timeout(Some(t))
    }

    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool, BrokerError> {
        let cfg = &self.inner.config;
        let mut new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(cfg.replication_factor));
        for (k, v) in &cfg.topic_properties {
            new = new.set(k, v);
        }
        tracing::info!(topic, partitions, replication = cfg.replication_factor, "creating Kafka topic");
        let results = self
            .inner
            .admin
            .create_topics([&new], &self.admin_options())
            .await
            .map_err(|e| metadata_error(&format!("creating topic {topic:?}"), e))?;
        use RDKafkaErrorCode as C;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, C::TopicAlreadyExists)) => return Ok(false),
                Err((_, code @ C::InvalidReplicationFactor)) => {
                    return Err(config_error(
                        "replication_factor",
                        format!("{} rejected for topic {topic:?}: {code}", cfg.replication_factor),
                    ))
                }
                Err((_, code @ C::InvalidPartitions)) => {
                    return Err(BrokerError::Config {
                        key: "partitions".into(),
                        reason: format!("{partitions} rejected for topic {topic:?}: {code}"),
                    })
                }
                Err((_, code @ (C::InvalidConfig | C::PolicyViolation))) => {
                    return Err(config_error("topic_properties", format!("topic {topic:?} rejected: {code}")))
                }
                Err((_, code @ C::InvalidTopic)) => {
                    return Err(config_error("topic", format!("{topic:?} rejected: {code}")))
                }
                Err((_, code)) => return Err(code_error(&format!("creating topic {topic:?}"), code)),
            }
        }
        Ok(true)
    }

    async fn grow_topic(&self, topic: &str, from: u32, to: u32) -> Result<(), BrokerError> {
        tracing::warn!(
            topic,
            from,
            to,
            "adding partitions: keys move to other partitions, so per-key order across the change is not kept"
        );
        let results = self
            .inner
            .admin
            .create_partitions([&NewPartitions::new(topic, to as usize)], &self.admin_options())
            .await
            .map_err(|e| metadata_error(&format!("adding partitions to {topic:?}"), e))?;
        for r in results {
            if let Err((_, code)) = r {
                if code == RDKafkaErrorCode::InvalidPartitions {
                    // Grown concurrently: fine if there are enough now.
                    continue;
                }
                return Err(code_error(&format!("adding partitions to {topic:?}"), code));
            }
        }
        Ok(())
    }
}

impl Broker for KafkaBroker {
    type Session = KafkaSession;

    async fn publish(&self, msg: Outbound) -> Result<Position, BrokerError> {
        validate_topic(&msg.topic)?;
        let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len());
        for (name, value) in &msg.headers {
            headers = headers.insert(Header { key: name, value: Some(value) });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&msg.topic).payload(msg.payload.as_slice()).headers(headers);
        if let Some(key) = &msg.key {
            record = record.key(key.as_slice());
        }
        // A full local queue is waited out for as long as a delivery may take.
        match self.inner.producer.send(record, Timeout::After(self.inner.config.message_timeout)).await {
            Ok(d) => Ok(Position {
                partition: u32::try_from(d.partition).unwrap_or(0),
                offset: u64::try_from(d.offset).unwrap_or(0),
                duplicate: false,
            }),
            Err((e, _)) => Err(produce_error(&msg.topic, e)),
        }
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<KafkaSession, BrokerError> {
        if group.trim().is_empty() {
            return Err(BrokerError::Config { key: "consumer.group".into(), reason: "must not be empty".into() });
        }
        for t in topics {
            validate_topic(t)?;
        }
        KafkaSession::start(self, group, topics)
    }

    fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.connection.state.subscribe()
    }

    /// Every partition of `topics` (from the metadata; topics that do not
    /// exist are left out): its high watermark and the group's committed
    /// offset (0 when it has none), read by a consumer of the group that
    /// never joins it.
    async fn consumer_lag(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, BrokerError> {
        let mut tps = Vec::new();
        for topic in topics {
            let n = self.partitions(topic).await?.unwrap_or(0);
            tps.extend((0..n).map(|p| TopicPartition::new(topic.as_str(), p)));
        }
        if tps.is_empty() {
            return Ok(Vec::new());
        }
        let committed = self.committed_offsets(group, &tps).await?;
        let mut lags = Vec::with_capacity(tps.len());
        for tp in tps {
            let end_offset = self.end_offset(&tp).await?;
            let committed = committed.get(&tp).copied().flatten().unwrap_or(0);
            lags.push(PartitionLag { partition: tp, end_offset, committed });
        }
        Ok(lags)
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        if partitions == 0 {
            return Err(BrokerError::Config { key: "partitions".into(), reason: "must be at least 1".into() });
        }
        if i32::try_from(partitions).is_err() {
            return Err(BrokerError::Config { key: "partitions".into(), reason: "too many".into() });
        }
        validate_topic(topic)?;
        match self.partitions(topic).await? {
            Some(n) if n >= partitions => return Ok(()),
            Some(n) => self.grow_topic(topic, n, partitions).await?,
            None => {
                if !self.create_topic(topic, partitions).await? {
                    // Created concurrently: make sure it is large enough.
                    if let Some(n) = self.partitions(topic).await?.filter(|n| *n < partitions) {
                        self.grow_topic(topic, n, partitions).await?;
                    }
                }
            }
        }
        self.await_partitions(topic, partitions).await
    }

    /// Creates the dead-letter topic with as many partitions as `source`
    /// (dead letters keep the origin's key, so an aggregate's dead letters
    /// land in one partition, in order), through the admin API: it works
    /// with the broker's `auto.create.topics.enable` off. A name Kafka cannot
    /// hold (over 249 characters, or characters other than `[a-zA-Z0-9._-]`)
    /// fails with [`BrokerError::Config`] (key `kafka.topic`) before any
    /// request. An existing dead-letter topic is used as it is (with fewer
    /// partitions than the source it is not grown: a warning says so). A
    /// source that does not exist yet gets a one-partition dead-letter topic.
    async fn ensure_dead_letter_topic(&self, source: &str, dead_letter: &str) -> Result<(), BrokerError> {
        validate_topic(source)?;
        validate_topic(dead_letter).map_err(|e| match e {
            BrokerError::Config { key, reason } => {
                BrokerError::Config { key, reason: format!("dead-letter topic of {source:?}: {reason}") }
            }
            e => e,
        })?;
        let wanted = self.partitions(source).await?.unwrap_or(1);
        match self.partitions(dead_letter).await? {
            Some(n) => {
                if n < wanted {
                    tracing::warn!(
                        source,
                        dead_letter,
                        partitions = n,
                        source_partitions = wanted,
                        "the dead-letter topic has fewer partitions than its source; left as it is"
                    );
                }
                Ok(())
            }
            None => {
                self.create_topic(dead_letter, wanted).await?;
                self.await_partitions(dead_letter, 1).await
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The session.

/// What the poll thread sends to [`Session::next`]: an event, with the
/// epoch of an `Assigned` (0 otherwise).
type Sent = Result<(SessionEvent, Epoch), BrokerError>;

/// What the poll thread and the rebalance callbacks share with the session.
struct Shared {
    events: mpsc::UnboundedSender<Sent>,
    /// Messages in `events` not yet taken by `next`.
    buffered: AtomicUsize,
    /// Set by close/drop: the poll thread leaves, a revoke stops waiting.
    stop: AtomicBool,
    /// Assignments, revokes and commits, fenced by epoch; `released` is
    /// signalled whenever a release or a commit ends.
    book: Mutex<Assignments>,
    released: Condvar,
    /// The assignment is paused because the buffer is full.
    paused: AtomicBool,
    /// Held while pausing or resuming (and while a new assignment is kept
    /// paused), so `next`'s resume and the poll thread's pause never cross.
    pausing: Mutex<()>,
    /// `max_buffered / 2`: at or below it a paused assignment resumes.
    resume_at: usize,
    /// Offsets the broker confirmed committed, per partition of the current
    /// assignments (see [`KafkaSession::confirmed_commits`]).
    confirmed: Mutex<BTreeMap<TopicPartition, u64>>,
    /// Interned topic names.
    topics: Mutex<HashMap<String, Arc<str>>>,
    revoke_timeout: Duration,
    request_timeout: Duration,
    /// Payloads above this are not copied (see [`KafkaConfig::max_payload_bytes`]).
    max_payload_bytes: usize,
    stats: Arc<KafkaStats>,
    connection: Arc<ConnectionTracker>,
    /// [`ALIVE`], [`DEAD`] (the poll thread died; the tracker counts this
    /// session as a disconnect) or [`GONE`] (closed or dropped: a death
    /// after that is not counted).
    life: AtomicU8,
    /// Test-only fault: the poll thread panics at its next turn.
    inject_panic: AtomicBool,
    group: String,
}

/// [`Shared::life`] states.
const ALIVE: u8 = 0;
const DEAD: u8 = 1;
const GONE: u8 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn topic(&self, name: &str) -> Arc<str> {
        let mut topics = lock(&self.topics);
        if let Some(t) = topics.get(name) {
            return t.clone();
        }
        let t: Arc<str> = name.into();
        topics.insert(name.to_string(), t.clone());
        t
    }

    fn tps(&self, tpl: &TopicPartitionList) -> Vec<TopicPartition> {
        let mut tps: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .filter_map(|e| {
                Some(TopicPartition { topic: self.topic(e.topic()), partition: u32::try_from(e.partition()).ok()? })
            })
            .collect();
        tps.sort();
        tps.dedup();
        tps
    }

    fn send(&self, event: SessionEvent) -> bool {
        self.events.send(Ok((event, 0))).is_ok()
    }

    /// The poll thread died (`reason`): the consumer's next `next()` fails
    /// with [`BrokerError::SessionFailed`] and the connection state reports
    /// a disconnect until this session is gone.
    fn fail(&self, reason: String) {
        tracing::error!(group = %self.group, %reason, "kafka poll thread died; the session failed");
        bump(&self.stats.session_failures);
        if self.life.compare_exchange(ALIVE, DEAD, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.connection.session_died();
        }
        let _ = self.events.send(Err(BrokerError::SessionFailed(format!("group {:?}: {reason}", self.group))));
    }

    /// The session is gone: a dead poll thread no longer counts.
    fn forget(&self) {
        if self.life.swap(GONE, Ordering::AcqRel) == DEAD {
            self.connection.dead_session_gone();
        }
    }

    /// Hands a revoke to the consumer and blocks (the poll thread) until it
    /// released the partitions, the session stops, or `revoke_timeout`; then
    /// disowns them and waits (up to `request_timeout`) for commits of them
    /// already in flight, so none lands after librdkafka handed them on.
    fn revoke_and_wait(&self, tps: Vec<TopicPartition>) {
        let mut book = lock(&self.book);
        let revoke = book.begin_revoke(&tps);
        if revoke.is_empty() {
            return;
        }
        bump(&self.stats.revoked);
        if !self.send(SessionEvent::Revoked(tps.clone())) {
            book.end_revoke(&revoke);
            return;
        }
        let started = Instant::now();
        let deadline = started + self.revoke_timeout;
        while book.awaiting_release(&revoke) && !self.stop.load(Ordering::Acquire) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bump(&self.stats.revoke_timeouts);
                tracing::warn!(
                    group = %self.group,
                    partitions = ?tps,
                    timeout = ?self.revoke_timeout,
                    "revoke not released in time; giving the partitions up without the final commit"
                );
                break;
            }
            book = self.released.wait_timeout(book, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        book.end_revoke(&revoke);
        let deadline = Instant::now() + self.request_timeout;
        while book.committing(&revoke) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(group = %self.group, partitions = ?tps, "a commit of revoked partitions is still in flight");
                break;
            }
            book = self.released.wait_timeout(book, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        tracing::debug!(group = %self.group, ?tps, took = ?started.elapsed(), "revoke released");
    }
}

/// The consumer context: rebalance callbacks (on the poll thread) and logs.
pub struct SessionContext {
    shared: Arc<Shared>,
}

impl ClientContext for SessionContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        bump(&self.shared.stats.consumer_errors);
        tracing::warn!(group = %self.shared.group, %error, "kafka consumer error: {reason}");
    }
}

impl ConsumerContext for SessionContext {
    /// The result of a background commit of stored offsets.
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        let shared = &self.shared;
        match result {
            Ok(()) => {
                let mut confirmed = lock(&shared.confirmed);
                for e in offsets.elements() {
                    if let (Offset::Offset(o), Ok(())) = (e.offset(), e.error()) {
                        let (Ok(partition), Ok(o)) = (u32::try_from(e.partition()), u64::try_from(o)) else { continue };
                        confirmed.insert(TopicPartition { topic: shared.topic(e.topic()), partition }, o);
                    }
                }
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                bump(&shared.stats.commit_errors);
                tracing::warn!(group = %shared.group, error = %e, "background commit of stored offsets failed; retried at the next one");
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let shared = &self.shared;
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let tps = shared.tps(tpl);
                if tps.is_empty() {
                    return;
                }
                if shared.stop.load(Ordering::Acquire) {
                    // Leaving the group: the consumer has committed already
                    // (or is gone, like a crashed process).
                    lock(&shared.book).disown(&tps);
                    return;
                }
                if consumer.assignment_lost() {
                    bump(&shared.stats.lost);
                    tracing::warn!(group = %shared.group, ?tps, "assignment lost");
                    let gone = lock(&shared.book).disown(&tps);
                    if !gone.is_empty() {
                        shared.send(SessionEvent::Lost(gone));
                    }
                    return;
                }
                shared.revoke_and_wait(tps);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                // The assignment is dropped after this callback.
                let tps = lock(&shared.book).disown_all();
                tracing::warn!(group = %shared.group, error = %e, ?tps, "rebalance error; assignment lost");
                if !tps.is_empty() {
                    bump(&shared.stats.lost);
                    shared.send(SessionEvent::Lost(tps));
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let shared = &self.shared;
        if let Rebalance::Assign(tpl) = rebalance {
            let tps = shared.tps(tpl);
            if !tps.is_empty() {
                bump(&shared.stats.assigned);
                // The epoch is taken and the event sent under the lock, so
                // `next` sees epochs in order.
                let mut book = lock(&shared.book);
                let epoch = book.assign(&tps);
                let mut confirmed = lock(&shared.confirmed);
                for tp in &tps {
                    confirmed.remove(tp);
                }
                drop(confirmed);
                tracing::debug!(group = %shared.group, ?tps, epoch, "assigned");
                let _ = shared.events.send(Ok((SessionEvent::Assigned(tps), epoch)));
            }
        }
        // New partitions start unpaused: keep the whole assignment paused
        // while the buffer is full.
        let _pausing = lock(&shared.pausing);
        if shared.paused.load(Ordering::Acquire) {
            if let Ok(assignment) = consumer.assignment() {
                let _ = consumer.pause(&assignment);
            }
        }
    }
}

type GroupConsumer = BaseConsumer<SessionContext>;

/// One member of a consumer group on Kafka. Dropping it leaves the group
/// without committing (the poll thread closes the consumer).
pub struct KafkaSession {
    consumer: Option<Arc<GroupConsumer>>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Sent>,
    /// Resolves when the poll thread closed the consumer and exited.
    exited: Option<oneshot::Receiver<()>>,
    /// The session failed (its poll thread died): every later `next` says so.
    failed: Option<BrokerError>,
    request_timeout: Duration,
}

/// How long the poll thread blocks in one `poll` (bounds its reaction to
/// `stop` and to a drained buffer).
const POLL_INTERVAL: Duration = Duration::from_millis(50);

impl KafkaSession {
    fn start(broker: &KafkaBroker, group: &str, topics: &[String]) -> Result<KafkaSession, BrokerError> {
        let cfg = &broker.inner.config;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            events: tx,
            buffered: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            book: Mutex::new(Assignments::default()),
            released: Condvar::new(),
            paused: AtomicBool::new(false),
            pausing: Mutex::new(()),
            resume_at: cfg.max_buffered / 2,
            confirmed: Mutex::new(BTreeMap::new()),
            topics: Mutex::new(HashMap::new()),
            revoke_timeout: cfg.revoke_timeout,
            request_timeout: cfg.request_timeout,
            max_payload_bytes: cfg.max_payload_bytes,
            stats: broker.inner.stats.clone(),
            connection: broker.inner.connection.clone(),
            life: AtomicU8::new(ALIVE),
            inject_panic: AtomicBool::new(false),
            group: group.to_string(),
        });
        let props = cfg.consumer_props(group);
        let consumer: GroupConsumer = props
            .client_config()
            .create_with_context(SessionContext { shared: shared.clone() })
            .map_err(|e| props.error(e))?;
        if !topics.is_empty() {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&names).map_err(|e| BrokerError::Other(format!("subscribing to {topics:?}: {e}")))?;
        }
        let consumer = Arc::new(consumer);
        let (exited_tx, exited) = oneshot::channel();
        let poll = PollLoop {
            consumer: consumer.clone(),
            shared: shared.clone(),
            high: cfg.max_buffered,
            low: cfg.max_buffered / 2,
            delivered: HashMap::new(),
        };
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("kafka-poll-{group}"))
            .spawn(move || {
                // Any exit but a requested stop is a failed session, a panic
                // included: the consumer hears of it at once.
                let failure = match std::panic::catch_unwind(AssertUnwindSafe(|| poll.run())) {
                    Ok(PollExit::Stopped) => None,
                    Ok(PollExit::Failed(reason)) => Some(reason),
                    Err(panic) => Some(format!("poll thread panicked: {}", crate::pool::panic_message(&*panic))),
                };
                match failure {
                    // Closing anyway: nobody waits for the session's events.
                    Some(reason) if thread_shared.stop.load(Ordering::Acquire) => {
                        tracing::warn!(group = %thread_shared.group, %reason, "kafka poll thread died while closing");
                    }
                    Some(reason) => thread_shared.fail(reason),
                    None => {}
                }
                let _ = exited_tx.send(());
            })
            .map_err(|e| BrokerError::Other(format!("starting the poll thread: {e}")))?;
        tracing::debug!(group, ?topics, "kafka session started");
        Ok(KafkaSession {
            consumer: Some(consumer),
            shared,
            events: rx,
            exited: Some(exited),
            failed: None,
            request_timeout: cfg.request_timeout,
        })
    }

    /// The offsets (next to read) the broker confirmed committed for this
    /// member, per partition, since each was last assigned: what a crash of
    /// this member would keep. [`Session::commit`] stores offsets and
    /// librdkafka commits them in the background, so this trails the
    /// consumer's commits by up to [`KafkaConfig::auto_commit_interval`].
    pub fn confirmed_commits(&self) -> BTreeMap<TopicPartition, u64> {
        lock(&self.shared.confirmed).clone()
    }

    /// Partitions currently assigned to this member.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        lock(&self.shared.book).owned()
    }

    /// A test fault: the poll thread panics at its next turn, as it would on
    /// a bug in the client library. The session must then fail
    /// ([`BrokerError::SessionFailed`]) instead of going quiet.
    #[doc(hidden)]
    pub fn inject_poll_thread_panic(&self) {
        self.shared.inject_panic.store(true, Ordering::Release);
    }

    /// Resumes a paused assignment as soon as the buffer drained, instead of
    /// at the poll thread's next turn.
    fn resume(&self) {
        let Some(consumer) = self.consumer.as_ref() else { return };
        let _pausing = lock(&self.shared.pausing);
        if !self.shared.paused.load(Ordering::Acquire)
            || self.shared.buffered.load(Ordering::Acquire) > self.shared.resume_at
        {
            return;
        }
        self.shared.paused.store(false, Ordering::Release);
        if let Ok(assignment) = consumer.assignment() {
            if let Err(e) = consumer.resume(&assignment) {
                tracing::warn!(error = %e, "resuming partitions failed");
            }
        }
        bump(&self.shared.stats.resumes);
        tracing::debug!(group = %self.shared.group, "buffer drained; partitions resumed");
    }

    fn signal_stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _guard = lock(&self.shared.book);
        self.shared.released.notify_all();
    }

    fn offset_list(offsets: &[(TopicPartition, u64)]) -> Result<TopicPartitionList, BrokerError> {
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (tp, offset) in offsets {
            let offset = i64::try_from(*offset).map_err(|_| BrokerError::Other(format!("offset {offset} of {tp}")))?;
            tpl.add_partition_offset(&tp.topic, tp.partition as i32, Offset::Offset(offset))
                .map_err(|e| BrokerError::Other(format!("commit of {tp}: {e}")))?;
        }
        Ok(tpl)
    }

    /// Stores `offsets` for librdkafka's next commit (no I/O).
    fn store_owned(&self, offsets: &[(TopicPartition, u64)]) -> Result<(), BrokerError> {
        let consumer = self.consumer.as_ref().ok_or(BrokerError::Closed)?;
        let tpl = Self::offset_list(offsets)?;
        let what = || offsets.iter().map(|(tp, _)| tp.to_string()).collect::<Vec<_>>().join(",");
        match consumer.store_offsets(&tpl) {
            Ok(()) => Ok(()),
            Err(KafkaError::StoreOffset(code)) => Err(commit_error(code, &what())),
            Err(e) => Err(kafka_error(Op::Commit, &format!("storing the offsets of {}", what()), e)),
        }
    }

    /// Commits what was stored, synchronously (close).
    async fn commit_stored(&self) -> Result<(), BrokerError> {
        let Some(consumer) = self.consumer.clone() else { return Ok(()) };
        let blocking = tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync));
        match tokio::time::timeout(self.request_timeout, blocking).await {
            Err(_) => Err(BrokerError::Timeout("the final commit was not confirmed in time".into())),
            Ok(Err(e)) => Err(BrokerError::Other(format!("commit task: {e}"))),
            Ok(Ok(Ok(()))) | Ok(Ok(Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)))) => Ok(()),
            Ok(Ok(Err(KafkaError::ConsumerCommit(code)))) => Err(commit_error(code, "the stored offsets")),
            Ok(Ok(Err(e))) => Err(kafka_error(Op::Commit, "the final commit", e)),
        }
    }

    async fn commit_owned(&self, offsets: &[(TopicPartition, u64)]) -> Result<(), BrokerError> {
        let consumer = self.consumer.clone().ok_or(BrokerError::Closed)?;
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (tp, offset) in offsets {
            let offset = i64::try_from(*offset).map_err(|_| BrokerError::Other(format!("offset {offset} of {tp}")))?;
            tpl.add_partition_offset(&tp.topic, tp.partition as i32, Offset::Offset(offset))
                .map_err(|e| BrokerError::Other(format!("commit of {tp}: {e}")))?;
        }
        // A synchronous commit waits on its own reply queue, so it works
        // while the poll thread is blocked in a revoke.
        let blocking = tokio::task::spawn_blocking(move || {
            let result = consumer.commit(&tpl, CommitMode::Sync);
            (result, tpl)
        });
        let what = || offsets.iter().map(|(tp, _)| tp.to_string()).collect::<Vec<_>>().join(",");
        let (result, tpl) = match tokio::time::timeout(self.request_timeout, blocking).await {
            Err(_) => return Err(BrokerError::Timeout(format!("commit of {} not confirmed in time", what()))),
            Ok(Err(e)) => return Err(BrokerError::Other(format!("commit task: {e}"))),
            Ok(Ok(r)) => r,
        };
        match result {
            Ok(()) => {}
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => return Ok(()),
            Err(KafkaError::ConsumerCommit(code)) => return Err(commit_error(code, &what())),
            Err(e) => return Err(kafka_error(Op::Commit, &format!("commit of {}", what()), e)),
        }
        // Per-partition results.
        for e in tpl.elements() {
            if let Err(KafkaError::OffsetFetch(code) | KafkaError::ConsumerCommit(code)) = e.error() {
                return Err(commit_error(code, &format!("{}[{}]", e.topic(), e.partition())));
            }
        }
        Ok(())
    }
}

/// Why the poll loop returned.
enum PollExit {
    /// `stop` was set, or the session is gone.
    Stopped,
    /// The consumer cannot go on.
    Failed(String),
}

struct PollLoop {
    consumer: Arc<GroupConsumer>,
    shared: Arc<Shared>,
    high: usize,
    low: usize,
    /// Highest offset + 1 handed out per partition, to number redeliveries.
    delivered: HashMap<(Arc<str>, u32), u64>,
}

impl PollLoop {
    fn run(mut self) -> PollExit {
        let mut last_error: Option<(String, Instant)> = None;
        let exit = loop {
            if self.shared.stop.load(Ordering::Acquire) {
                break PollExit::Stopped;
            }
            if self.shared.inject_panic.swap(false, Ordering::AcqRel) {
                panic!("injected poll thread panic (test fault)");
            }
            let consumer = self.consumer.clone();
            match consumer.poll(POLL_INTERVAL) {
                None => {}
                Some(Ok(m)) => {
                    let delivery = self.delivery(&m);
                    drop(m);
                    bump(&self.shared.stats.fetched);
                    self.shared.buffered.fetch_add(1, Ordering::AcqRel);
                    if !self.shared.send(SessionEvent::Message(delivery)) {
                        break PollExit::Stopped; // the session is gone
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    break PollExit::Failed(format!("fatal consumer error: {code}"));
                }
                Some(Err(e)) => {
                    bump(&self.shared.stats.consumer_errors);
                    // librdkafka retries on its own; log each distinct error
                    // at most every few seconds.
                    let text = e.to_string();
                    let repeat =
                        last_error.as_ref().is_some_and(|(t, at)| *t == text && at.elapsed() < Duration::from_secs(5));
                    if !repeat {
                        tracing::warn!(group = %self.shared.group, error = %text, "kafka consumer error");
                        last_error = Some((text, Instant::now()));
                    }
                }
            }
            self.back_pressure();
        };
        // Dropping the last reference closes the consumer and leaves the
        // group (a revoke during the close does not wait: `stop` is set).
        drop(self.consumer);
        exit
    }

    fn back_pressure(&self) {
        let _pausing = lock(&self.shared.pausing);
        let buffered = self.shared.buffered.load(Ordering::Acquire);
        let paused = self.shared.paused.load(Ordering::Acquire);
        if !paused && buffered >= self.high {
            self.shared.paused.store(true, Ordering::Release);
            if let Ok(assignment) = self.consumer.assignment() {
                if let Err(e) = self.consumer.pause(&assignment) {
                    tracing::warn!(error = %e, "pausing partitions failed");
                }
            }
            bump(&self.shared.stats.pauses);
            tracing::debug!(group = %self.shared.group, buffered, "buffer full; partitions paused");
        } else if paused && buffered <= self.low {
            self.shared.paused.store(false, Ordering::Release);
            if let Ok(assignment) = self.consumer.assignment() {
                if let Err(e) = self.consumer.resume(&assignment) {
                    tracing::warn!(error = %e, "resuming partitions failed");
                }
            }
            bump(&self.shared.stats.resumes);
            tracing::debug!(group = %self.shared.group, buffered, "buffer drained; partitions resumed");
        }
    }

    fn delivery(&mut self, m: &BorrowedMessage<'_>) -> Delivery {
        let topic = self.shared.topic(m.topic());
        let partition = u32::try_from(m.partition()).unwrap_or(0);
        let offset = u64::try_from(m.offset()).unwrap_or(0);
        let high = self.delivered.entry((topic.clone(), partition)).or_insert(0);
        let attempt = if offset < *high { 2 } else { 1 };
        *high = (*high).max(offset + 1);
        // Headers through the C API: rdkafka's own accessors panic on a
        // name that is not UTF-8.
        // SAFETY: `m` is a live message for the duration of the call.
        let raw = unsafe { raw_headers::read(m.ptr()) };
        let (mut headers, undecodable) = delivered_headers(&raw);
        let timestamp = m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        // The size is checked before the payload is copied.
        let size = m.payload_len();
        let payload = if size > self.shared.max_payload_bytes {
            bump(&self.shared.stats.oversized);
            tracing::warn!(
                group = %self.shared.group,
                %topic, partition, offset, size, limit = self.shared.max_payload_bytes,
                "payload above kafka.max_payload_bytes; delivered without it, marked undeliverable"
            );
            mark_undeliverable(
                &mut headers,
                super::REASON_TOO_LARGE,
                &format!(
                    "payload of {size} bytes exceeds kafka.max_payload_bytes ({}); it stays at the origin offset",
                    self.shared.max_payload_bytes
                ),
            );
            Vec::new()
        } else {
            m.payload().map(<[u8]>::to_vec).unwrap_or_default()
        };
        if undecodable {
            bump(&self.shared.stats.undecodable_headers);
            tracing::warn!(
                group = %self.shared.group, %topic, partition, offset,
                "header name is not UTF-8; delivered marked undeliverable (undecodable-headers)"
            );
        }
        Delivery { topic, partition, offset, key: m.key().map(<[u8]>::to_vec), headers, payload, timestamp, attempt }
    }
}

/// The delivery's headers from the record's raw ones, and whether a name was
/// not UTF-8: then the names are converted lossily, and the record is
/// marked undeliverable (`undecodable-headers`) with every original header
/// in [`HEADER_RAW_HEADERS`](super::HEADER_RAW_HEADERS). A null value is
/// delivered empty.
fn delivered_headers(raw: &[raw_headers::RawHeader]) -> (Headers, bool) {
    let mut undecodable = false;
    let mut headers: Headers = raw
        .iter()
        .map(|h| {
            let name = match std::str::from_utf8(&h.name) {
                Ok(name) => name.to_string(),
                Err(_) => {
                    undecodable = true;
                    String::from_utf8_lossy(&h.name).into_owned()
                }
            };
            (name, h.value.clone().unwrap_or_default())
        })
        .collect();
    if undecodable {
        headers.push((super::HEADER_RAW_HEADERS.to_string(), raw_headers::encode(raw)));
        mark_undeliverable(&mut headers, super::REASON_UNDECODABLE_HEADERS, "a header name is not UTF-8");
    }
    (headers, undecodable)
}

/// Marks a delivery for the dead letter (see [`Delivery::undeliverable`]).
fn mark_undeliverable(headers: &mut Headers, reason: &str, detail: &str) {
    headers.push((super::HEADER_UNDELIVERABLE_DETAIL.to_string(), detail.as_bytes().to_vec()));
    headers.push((super::HEADER_UNDELIVERABLE.to_string(), reason.as_bytes().to_vec()));
}

impl Session for KafkaSession {
    async fn next(&mut self) -> Result<SessionEvent, BrokerError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.events.recv().await {
            Some(Ok((event, epoch))) => {
                match &event {
                    SessionEvent::Message(_) => {
                        let buffered = self.shared.buffered.fetch_sub(1, Ordering::AcqRel) - 1;
                        if buffered <= self.shared.resume_at && self.shared.paused.load(Ordering::Acquire) {
                            self.resume();
                        }
                    }
                    SessionEvent::Assigned(tps) => lock(&self.shared.book).seen_assigned(tps, epoch),
                    SessionEvent::Lost(tps) => lock(&self.shared.book).seen_lost(tps),
                    SessionEvent::Revoked(_) => {}
                }
                Ok(event)
            }
            Some(Err(e)) => {
                if e.class() == super::ErrorClass::Fatal {
                    self.failed = Some(e.clone());
                }
                Err(e)
            }
            None => Err(BrokerError::Closed),
        }
    }

    /// Stores the offsets of partitions this member still owns (librdkafka
    /// commits them within `auto_commit_interval`); if one of them is being
    /// revoked, commits them synchronously instead. Fenced partitions are
    /// neither stored nor committed ([`BrokerError::CommitRejected`]).
    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<(), BrokerError> {
        let (decision, stored) = {
            // The store happens under the book's lock, so no revoke ends
            // between the fence check and the store.
            let mut book = lock(&self.shared.book);
            let decision = book.begin_commit(offsets);
            if decision.allowed.is_empty() || decision.allowed.iter().any(|(tp, _)| book.is_revoking(tp)) {
                (decision, None)
            } else {
                let stored = self.store_owned(&decision.allowed);
                book.end_commit(&decision.allowed);
                (decision, Some(stored))
            }
        };
        let result = match stored {
            Some(stored) => stored,
            None if decision.allowed.is_empty() => Ok(()),
            None => {
                let result = self.commit_owned(&decision.allowed).await;
                if result.is_ok() {
                    lock(&self.shared.confirmed).extend(decision.allowed.iter().cloned());
                }
                let mut book = lock(&self.shared.book);
                book.end_commit(&decision.allowed);
                self.shared.released.notify_all();
                result
            }
        };
        let result = result.and_then(|()| match decision.rejected.first() {
            None => Ok(()),
            Some((tp, _)) => Err(BrokerError::CommitRejected {
                partition: tp.to_string(),
                reason: "not assigned to this member any more (revoked or lost), or reassigned since".into(),
            }),
        });
        match &result {
            Ok(()) => bump(&self.shared.stats.commits),
            Err(_) => bump(&self.shared.stats.commit_errors),
        }
        result
    }

    async fn release(&mut self, partitions: &[TopicPartition]) -> Result<(), BrokerError> {
        let mut book = lock(&self.shared.book);
        if book.release(partitions) {
            self.shared.released.notify_all();
        }
        Ok(())
    }

    async fn set_topics(&mut self, topics: &[String]) -> Result<(), BrokerError> {
        for t in topics {
            validate_topic(t)?;
        }
        let consumer = self.consumer.as_ref().ok_or(BrokerError::Closed)?;
        if topics.is_empty() {
            consumer.unsubscribe();
            return Ok(());
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|e| BrokerError::Other(format!("subscribing to {topics:?}: {e}")))
    }

    /// Commits everything stored synchronously, then leaves the group.
    async fn close(mut self) -> Result<(), BrokerError> {
        let committed = self.commit_stored().await;
        if let Err(e) = &committed {
            bump(&self.shared.stats.commit_errors);
            tracing::warn!(group = %self.shared.group, error = %e, "the final commit failed; leaving the group");
        }
        self.signal_stop();
        // The poll thread holds the other reference and closes the consumer
        // (leaving the group) when it exits.
        drop(self.consumer.take());
        if let Some(exited) = self.exited.take() {
            let limit = self.request_timeout + Duration::from_secs(5);
            if tokio::time::timeout(limit, exited).await.is_err() {
                return Err(BrokerError::Timeout(format!("leaving group {:?} took over {limit:?}", self.shared.group)));
            }
        }
        committed
    }
}

impl Drop for KafkaSession {
    fn drop(&mut self) {
        self.signal_stop();
        self.shared.forget();
        if let Some(consumer) = self.consumer.take() {
            // Closing a consumer blocks: never on an async worker thread.
            let _ = std::thread::Builder::new().name("kafka-close".into()).spawn(move || drop(consumer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_deserializes_with_defaults() {
        let cfg: KafkaConfig = toml::from_str(
            "brokers = \"k1:9092,k2:9092\"\nsession_timeout = 10000\nrebalance_strategy = \"round_robin\"\n\
             [properties]\n\"security.protocol\" = \"sasl_ssl\"",
        )
        .unwrap();
        assert_eq!(cfg.brokers, "k1:9092,k2:9092");
        assert_eq!(cfg.session_timeout, Duration::from_secs(10));
        assert_eq!(cfg.rebalance_strategy, RebalanceStrategy::RoundRobin);
        assert_eq!(cfg.properties["security.protocol"], "sasl_ssl");
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(3));
        assert!(toml::from_str::<KafkaConfig>("nope = 1").is_err());
    }

    #[test]
    fn consumer_properties_map_the_typed_fields() {
        let cfg = KafkaConfig { isolation_level: IsolationLevel::ReadUncommitted, ..KafkaConfig::default() };
        let p = cfg.consumer_props("g");
        let get = |k: &str| p.entries.iter().find(|(p, _, _)| p == k).map(|(_, v, _)| v.clone());
        assert_eq!(get("group.id").as_deref(), Some("g"));
        assert_eq!(get("enable.auto.commit").as_deref(), Some("true"));
        assert_eq!(get("enable.auto.offset.store").as_deref(), Some("false"));
        assert_eq!(get("isolation.level").as_deref(), Some("read_uncommitted"));
        assert_eq!(get("partition.assignment.strategy").as_deref(), Some("cooperative-sticky"));
        assert_eq!(get("session.timeout.ms").as_deref(), Some("45000"));
        let p = cfg.producer_props();
        let get = |k: &str| p.entries.iter().find(|(p, _, _)| p == k).map(|(_, v, _)| v.clone());
        assert_eq!(get("acks").as_deref(), Some("all"));
        assert_eq!(get("enable.idempotence").as_deref(), Some("true"));
        assert_eq!(get("partitioner").as_deref(), Some("murmur2_random"));
    }

    #[test]
    fn validation_names_the_key() {
        let key = |cfg: KafkaConfig| match cfg.validate() {
            Err(BrokerError::Config { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let d = KafkaConfig::default;
        assert_eq!(key(KafkaConfig { brokers: " ".into(), ..d() }), "kafka.brokers");
        assert_eq!(key(KafkaConfig { heartbeat_interval: Duration::from_secs(50), ..d() }), "kafka.heartbeat_interval");
        assert_eq!(key(KafkaConfig { revoke_timeout: Duration::from_secs(400), ..d() }), "kafka.revoke_timeout");
        assert_eq!(key(KafkaConfig { replication_factor: 0, ..d() }), "kafka.replication_factor");
        let props = BTreeMap::from([("enable.auto.commit".to_string(), "true".to_string())]);
        assert_eq!(
            key(KafkaConfig { consumer_properties: props, ..d() }),
            "kafka.consumer_properties.enable.auto.commit"
        );
        assert!(d().validate().is_ok());
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic("orders.v1_eu-2").is_ok());
        for bad in ["", ".", "..", "a b", "a/b", &"x".repeat(250)] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_errors_name_the_configuration_key() {
        let mut p = Props::default();
        p.set("fetch.max.bytes", 1, "kafka.fetch_max_bytes");
        p.set("max.bytes", 1, "kafka.other");
        let e = p.error(KafkaError::ClientCreation("`fetch.max.bytes` must be >= `message.max.bytes`".into()));
        assert!(matches!(e, BrokerError::Config { ref key, .. } if key == "kafka.fetch_max_bytes"), "{e:?}");
        p.set("sasl.mechanism", "GSSAPI", "kafka.properties.sasl.mechanism");
        let e = p.error(KafkaError::ClientCreation("No provider for SASL mechanism GSSAPI: recompile".into()));
        assert!(matches!(e, BrokerError::Config { ref key, .. } if key == "kafka.properties.sasl.mechanism"), "{e:?}");
    }

    // The error table, one test per row (`classify`).

    fn kinds(op: Op, codes: &[RDKafkaErrorCode]) -> Vec<(RDKafkaErrorCode, &'static str)> {
        codes.iter().map(|&c| (c, classify(op, "t[0]", c).kind())).collect()
    }

    fn assert_row(op: Op, codes: &[RDKafkaErrorCode], kind: &str, class: crate::broker::ErrorClass) {
        for (code, got) in kinds(op, codes) {
            assert_eq!(got, kind, "{code:?}");
            assert_eq!(classify(op, "t[0]", code).class(), class, "{code:?}");
        }
    }

    use crate::broker::ErrorClass as Class;
    use RDKafkaErrorCode as C;

    #[test]
    fn table_timeouts_are_retriable() {
        let codes = [C::MessageTimedOut, C::RequestTimedOut, C::OperationTimedOut, C::TimedOutQueue];
        assert_row(Op::Publish, &codes, "timeout", Class::Retriable);
    }

    #[test]
    fn table_unreachable_brokers_are_unavailable() {
        let codes = [
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::Resolve,
            C::LeaderNotAvailable,
            C::NotLeaderForPartition,
            C::CoordinatorLoadInProgress,
            C::NotEnoughReplicas,
            C::KafkaStorageError,
        ];
        assert_row(Op::Publish, &codes, "unavailable", Class::Retriable);
    }

    #[test]
    fn table_queue_full_and_quotas_are_full() {
        assert_row(Op::Publish, &[C::QueueFull, C::ThrottlingQuotaExceeded], "full", Class::Retriable);
    }

    #[test]
    fn table_unknown_topics() {
        let codes = [C::UnknownTopicOrPartition, C::UnknownTopic, C::UnknownPartition];
        assert_row(Op::Publish, &codes, "unknown_topic", Class::Permanent);
    }

    #[test]
    fn table_authentication_and_acls_are_unauthorized() {
        let codes = [
            C::TopicAuthorizationFailed,
            C::GroupAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::TransactionalIdAuthorizationFailed,
            C::SaslAuthenticationFailed,
            C::Authentication,
        ];
        assert_row(Op::Publish, &codes, "unauthorized", Class::Permanent);
        assert_row(Op::Commit, &codes, "unauthorized", Class::Permanent);
    }

    #[test]
    fn table_messages_the_broker_refuses() {
        let codes = [
            C::MessageSizeTooLarge,
            C::InvalidMessageSize,
            C::MessageBatchTooLarge,
            C::InvalidMessage,
            C::InvalidRecord,
            C::InvalidTimestamp,
        ];
        assert_row(Op::Publish, &codes, "refused", Class::Permanent);
    }

    #[test]
    fn table_configuration_name_the_key() {
        let key = |c| match classify(Op::Admin, "t", c) {
            BrokerError::Config { key, .. } => key,
            e => panic!("{c:?}: {e:?}"),
        };
        assert_eq!(key(C::InvalidTopic), "kafka.topic");
        assert_eq!(key(C::InvalidReplicationFactor), "kafka.replication_factor");
        assert_eq!(key(C::PolicyViolation), "kafka.topic_properties");
        assert_eq!(key(C::InvalidPartitions), "partitions");
    }

    #[test]
    fn table_a_dead_client_fails_the_session() {
        let codes = [C::Fatal, C::ProducerFenced, C::InvalidProducerEpoch, C::BrokerDestroy];
        assert_row(Op::Publish, &codes, "session_failed", Class::Fatal);
    }

    #[test]
    fn table_group_generation_errors_reject_a_commit_only() {
        let codes = [C::IllegalGeneration, C::UnknownMemberId, C::RebalanceInProgress, C::FencedInstanceId];
        assert_row(Op::Commit, &codes, "commit_rejected", Class::Permanent);
        assert_row(Op::Admin, &codes, "unavailable", Class::Retriable);
        match commit_error(C::IllegalGeneration, "t[2]") {
            BrokerError::CommitRejected { partition, .. } => assert_eq!(partition, "t[2]"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn table_only_unknown_codes_are_other() {
        assert_row(Op::Publish, &[C::UnsupportedVersion, C::Unknown], "other", Class::Permanent);
        assert_eq!(metadata_error("t", KafkaError::AdminOp(C::OperationTimedOut)).kind(), "timeout");
        assert_eq!(produce_error("t", KafkaError::Canceled), BrokerError::Closed);
        assert_eq!(produce_error("t", KafkaError::MessageProduction(C::MessageSizeTooLarge)).kind(), "refused");
    }

    #[test]
    fn headers_with_a_name_that_is_not_utf8_are_marked_with_the_raw_bytes() {
        use raw_headers::RawHeader;
        let good = vec![
            RawHeader { name: b"a".to_vec(), value: Some(vec![0xff, 0]) },
            RawHeader { name: b"n".to_vec(), value: None },
        ];
        let (headers, bad) = delivered_headers(&good);
        assert!(!bad);
        assert_eq!(headers, vec![("a".to_string(), vec![0xff, 0]), ("n".to_string(), vec![])]);
        let mut raw = good.clone();
        raw.push(RawHeader { name: vec![b'x', 0xff], value: Some(vec![0xc3, 0x28]) });
        let (headers, bad) = delivered_headers(&raw);
        assert!(bad);
        assert_eq!(headers[2], ("x\u{fffd}".to_string(), vec![0xc3, 0x28]));
        let d = Delivery {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            headers: headers.clone(),
            payload: vec![],
            timestamp: None,
            attempt: 1,
        };
        assert_eq!(d.undeliverable(), Some(crate::broker::REASON_UNDECODABLE_HEADERS));
        let encoded = &headers.iter().find(|(n, _)| n == crate::broker::HEADER_RAW_HEADERS).unwrap().1;
        assert_eq!(raw_headers::decode(encoded), Some(raw), "lossless");
    }
}
