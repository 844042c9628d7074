//! The NATS JetStream adapter, on async-nats.
//!
//! # Mapping
//!
//! * A topic is a JetStream stream (named from the topic, see
//!   [`NatsConfig::stream_name`]) that stores the subject `<topic>` (and
//!   `<topic>.>` with [`NatsConfig::wildcard_subjects`]). A stream is one
//!   partition (0); offsets are stream sequences.
//! * A consumer group is one durable pull consumer per topic with explicit
//!   acks. Its name is derived from the group and the topic plus a
//!   *generation* suffix (`<group>_<topic>_g<N>`), see below.
//! * [`Session::commit`] of `next` acks every held message of the stream
//!   with a sequence below `next`, with ack confirmation (`+ACK` as a
//!   request, the "double ack"). The consumer only ever commits a contiguous
//!   prefix of completed events, so the durable's ack floor is exactly the
//!   committed frontier.
//!
//! # Per-aggregate order across redelivery
//!
//! JetStream redelivers a message whose ack timed out (or that was nak'd)
//! *after* newer ones, which would let event *n+1* of an aggregate overtake
//! event *n*. The adapter never lets that happen:
//!
//! * while a message is held (queued in the session, in the pool, or being
//!   retried in place) it is progress-acked (`+WPI`) every
//!   [`NatsConfig::progress_interval`], so the server does not redeliver it;
//! * a redelivery of a message the session already passed on is passed on
//!   again with the same offset, and the consumer skips it (its frontier has
//!   seen that offset);
//! * the session tracks the next stream sequence it expects and the
//!   consumer (delivery) sequence of every delivery. A jump in the delivery
//!   sequence means a delivery was lost on the wire (a reconnect, a server
//!   restart); if a later stream sequence then arrives before the expected
//!   one, or the client reconnected, or the pull stream failed, the session
//!   *re-anchors*: it creates the next generation of the durable starting
//!   at its lowest uncommitted sequence (`DeliverPolicy::ByStartSequence`),
//!   then deletes the old one. Everything is redelivered in stream order;
//!   what the consumer already saw is skipped.
//! * on session start the same re-anchoring resumes from the durable's ack
//!   floor + 1, so a restarted process handles what its predecessor left
//!   unacknowledged in stream order, before anything newer (instead of the
//!   server redelivering it after `ack_wait`, behind newer messages). It
//!   also drops pull requests a crashed predecessor left behind.
//!
//! Generations make re-anchoring crash-safe: the new durable exists before
//! the old one is deleted; a session start picks the highest generation
//! (which has the highest ack floor) and deletes the others.
//!
//! The guarantee holds for **one active session per group and topic**: two
//! processes sharing a durable would re-anchor it under each other. Scale
//! out with more topics (partitioned subjects, one stream each), one member
//! per topic. See `docs/nats.md`.

mod errors;
mod undecodable;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, HeaderName, HeaderValue, Subject};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::nats_security::NatsSecurity;
use super::{
    Broker, BrokerError, ConnectionState, Delivery, Headers, Outbound, PartitionLag, Position, Session, SessionEvent,
    TopicPartition,
};
use super::{
    DLQ_ATTEMPTS, DLQ_ERROR, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION, DLQ_ORIGIN_TOPIC, DLQ_PAYLOAD_OMITTED, DLQ_REASON,
};
use crate::envelope::{extract_aggregate_id, Envelope, HEADER_AGGREGATE_ID};
use errors::{classify, Failure};

/// Header carrying [`Outbound::key`] when it is single-line UTF-8 text.
pub const HEADER_KEY: &str = "X-Eventbus-Key";
/// Header carrying [`Outbound::key`] as lowercase hex when it is not text.
pub const HEADER_KEY_HEX: &str = "X-Eventbus-Key-Hex";
/// JetStream's de-duplication header.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Dead-letter reason of a stored message async-nats cannot parse.
pub const REASON_UNDECODABLE_HEADERS: &str = "undecodable-headers";
/// Dead-letter header holding the origin message's header block as stored,
/// base64 (standard alphabet, padded).
pub const HEADER_RAW_HEADERS: &str = "x-dlq-raw-headers";
/// Dead-letter header holding the origin message's subject.
pub const HEADER_ORIGIN_SUBJECT: &str = "x-dlq-origin-subject";
/// The dead-letter suffix assumed for a topic whose dead-letter topic the
/// consumer did not announce (see [`Broker::ensure_dead_letter_topic`]).
pub const DEFAULT_DEAD_LETTER_SUFFIX: &str = ".dlq";
/// Longest stream name the adapter creates (nats-server limits names only by
/// the 255-byte filename limit of its file store; this leaves room).
pub const MAX_STREAM_NAME: usize = 200;

/// What happens to a topic's stream when the adapter needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStrategy {
    /// Create the stream if missing; update an existing one whose settings
    /// differ from the configuration.
    #[default]
    CreateOrUpdate,
    /// Create the stream if missing; leave an existing one as it is.
    CreateOnly,
    /// Never create or change streams; a missing one is an error
    /// ([`BrokerError::UnknownTopic`]).
    Existing,
}

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk: survives a server restart.
    #[default]
    File,
    /// In the server's memory: lost when it restarts.
    Memory,
}

/// When a stream drops messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Keep messages until a limit (age, bytes, count) drops them.
    #[default]
    Limits,
    /// Keep messages while a consumer has not acknowledged them.
    Interest,
    /// Drop a message once acknowledged (one group per stream).
    WorkQueue,
}

/// What a full stream does with a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// Drop the oldest messages.
    #[default]
    Old,
    /// Refuse the publish.
    New,
}

/// Which `Nats-Msg-Id` a publish carries, so that a retried publish is
/// stored once (within the stream's duplicate window). A `Nats-Msg-Id`
/// header given by the caller always wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dedup {
    /// Envelopes get `<aggregate_id>:<event_type>:<event_version>:<hash of
    /// the encoded envelope>` (the hash covers the timestamp, so two distinct
    /// events with the same schema version differ); other payloads get none.
    #[default]
    Envelope,
    /// Like `envelope`, and other payloads get a hash of topic, key and
    /// payload: identical raw messages within the window are stored once.
    EnvelopeOrPayload,
    /// No message IDs.
    Off,
}

/// Where a group that has no durable yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// Everything still in the stream (like the memory broker).
    #[default]
    All,
    /// Only messages published after the group's first session started.
    New,
}

/// Settings of a [`NatsBroker`]. Durations are whole milliseconds in config
/// files.
// `Debug` (credentials in URLs redacted) and `Display` are in `nats_security`.
#[derive(Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Connection name shown by the server.
    pub connection_name: String,
    /// Prefix of stream names derived from topics.
    pub stream_prefix: String,
    /// Explicit stream name per topic (overrides the derived name).
    pub streams: BTreeMap<String, String>,
    /// Store `<topic>.>` in the topic's stream too (for publishers that put
    /// an aggregate or partition in the subject). The consumer then reads
    /// them as the topic. With it, a dead-letter suffix starting with `.`
    /// would fall into the origin stream: use e.g. `-dlq`.
    pub wildcard_subjects: bool,
    /// Whether the adapter creates or updates a topic's stream.
    pub strategy: StreamStrategy,
    /// Where created streams keep their messages.
    pub storage: Storage,
    /// When created streams drop messages.
    pub retention: Retention,
    /// Oldest message kept; 0 = no limit.
    #[serde(with = "crate::config::millis")]
    pub max_age: Duration,
    /// Largest stream size in bytes; -1 = no limit.
    pub max_bytes: i64,
    /// Most messages kept; -1 = no limit.
    pub max_msgs: i64,
    /// Copies of each created stream in a cluster (1 on a single server).
    pub replicas: usize,
    /// What a full stream does with a new message.
    pub discard: Discard,
    /// De-duplication window of `Nats-Msg-Id`; 0 = the server's (2 min).
    #[serde(with = "crate::config::millis")]
    pub duplicate_window: Duration,
    /// Which `Nats-Msg-Id` a publish carries (de-duplication of retried publishes).
    pub dedup: Dedup,
    /// Where a group without a durable starts reading.
    pub start_from: StartFrom,
    /// How long the server waits for an ack before redelivering. Held
    /// messages are progress-acked well within it.
    #[serde(with = "crate::config::millis")]
    pub ack_wait: Duration,
    /// Delivered-but-unacknowledged messages per durable. Every one of them
    /// is held by the session (and usually queued in the pool), so keep it at
    /// most the pool capacity: see [`NatsConfig::bounded`].
    pub max_ack_pending: i64,
    /// Progress-ack period of held messages; 0 = a third of `ack_wait`.
    #[serde(with = "crate::config::millis")]
    pub progress_interval: Duration,
    /// How long an ack confirmation may take before it is retried.
    #[serde(with = "crate::config::millis")]
    pub ack_timeout: Duration,
    /// Messages asked for by one pull request (at most `max_ack_pending`).
    pub pull_batch: usize,
    /// Lifetime of one pull request.
    #[serde(with = "crate::config::millis")]
    pub pull_expires: Duration,
    /// How long `connect` waits for the first server to answer.
    #[serde(with = "crate::config::millis")]
    pub connect_timeout: Duration,
    /// Bound on JetStream API requests and publish acks.
    #[serde(with = "crate::config::millis")]
    pub request_timeout: Duration,
    /// Longest pause between reconnect attempts.
    #[serde(with = "crate::config::millis")]
    pub max_reconnect_delay: Duration,
    /// TLS and authentication (`[nats.security]`, see `docs/security.md`).
    pub security: NatsSecurity,
    /// Create a topic's dead-letter stream when the topic is subscribed, even
    /// with `strategy = "existing"` (see `docs/nats.md`); false leaves it to
    /// the operator (a missing one fails the subscribe).
    pub create_dead_letter_streams: bool,
    /// De-duplication window of the dead-letter streams the adapter creates:
    /// a dead letter written again within it (after a crash) is stored once.
    #[serde(with = "crate::config::millis")]
    pub dead_letter_duplicate_window: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            connection_name: "eventbus".into(),
            stream_prefix: String::new(),
            streams: BTreeMap::new(),
            wildcard_subjects: false,
            strategy: StreamStrategy::CreateOrUpdate,
            storage: Storage::File,
            retention: Retention::Limits,
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_msgs: -1,
            replicas: 1,
            discard: Discard::Old,
            duplicate_window: Duration::ZERO,
            dedup: Dedup::Envelope,
            start_from: StartFrom::All,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            progress_interval: Duration::ZERO,
            ack_timeout: Duration::from_secs(5),
            pull_batch: 256,
            pull_expires: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(2),
            security: NatsSecurity::default(),
            create_dead_letter_streams: true,
            dead_letter_duplicate_window: Duration::from_secs(3600),
        }
    }
}

fn config_error(key: &str, reason: impl Into<String>) -> BrokerError {
    BrokerError::Config { key: format!("nats.{key}"), reason: reason.into() }
}

impl NatsConfig {
    /// Caps `max_ack_pending` (and so the messages a session holds) at
    /// `capacity` (at least 1); pass the bus's `pool.capacity`, so a session
    /// holds no more than the pool can.
    #[must_use]
    pub fn bounded(mut self, capacity: usize) -> Self {
        let cap = i64::try_from(capacity).unwrap_or(i64::MAX).max(1);
        self.max_ack_pending = self.max_ack_pending.min(cap);
        self
    }

    /// The effective progress-ack period.
    pub fn progress_period(&self) -> Duration {
        if self.progress_interval.is_zero() {
            (self.ack_wait / 3).max(Duration::from_millis(10))
        } else {
            self.progress_interval
        }
    }

    /// The stream holding `topic`.
    pub fn stream_name(&self, topic: &str) -> String {
        match self.streams.get(topic) {
            Some(name) => name.clone(),
            None => format!("{}{}", self.stream_prefix, sanitize(topic)),
        }
    }

    /// Rejects values the adapter cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if self.url.trim().is_empty() {
            return Err(config_error("url", "must not be empty"));
        }
        self.security.validate(&self.url)?;
        if self.ack_wait < Duration::from_millis(100) {
            return Err(config_error("ack_wait", "must be at least 100 ms"));
        }
        if self.progress_period() >= self.ack_wait {
            return Err(config_error(
                "progress_interval",
                format!(
                    "{:?} is not shorter than ack_wait {:?}: held messages would be redelivered",
                    self.progress_period(),
                    self.ack_wait
                ),
            ));
        }
        if self.max_ack_pending < 1 {
            return Err(config_error("max_ack_pending", "must be at least 1"));
        }
        if self.pull_batch == 0 {
            return Err(config_error("pull_batch", "must be at least 1"));
        }
        if self.pull_expires < Duration::from_millis(200) {
            return Err(config_error("pull_expires", "must be at least 200 ms"));
        }
        if self.ack_timeout.is_zero() {
            return Err(config_error("ack_timeout", "must be positive"));
        }
        if self.request_timeout.is_zero() {
            return Err(config_error("request_timeout", "must be positive"));
        }
        if self.connect_timeout.is_zero() {
            return Err(config_error("connect_timeout", "must be positive"));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(config_error("replicas", "must be between 1 and 5"));
        }
        if self.max_bytes < -1 || self.max_bytes == 0 {
            return Err(config_error("max_bytes", "must be positive or -1 (no limit)"));
        }
        if self.max_msgs < -1 || self.max_msgs == 0 {
            return Err(config_error("max_msgs", "must be positive or -1 (no limit)"));
        }
        if !self.stream_prefix.chars().all(name_char) {
            return Err(config_error("stream_prefix", "may only contain A-Z a-z 0-9 - _"));
        }
        let mut seen = HashSet::new();
        for (topic, stream) in &self.streams {
            validate_topic(topic).map_err(|reason| config_error(&format!("streams.{topic}"), reason))?;
            if stream.is_empty() || !stream.chars().all(name_char) {
                return Err(config_error(
                    &format!("streams.{topic}"),
                    format!("stream name {stream:?} may only contain A-Z a-z 0-9 - _"),
                ));
            }
            if !seen.insert(stream) {
                return Err(config_error(
                    &format!("streams.{topic}"),
                    format!("stream {stream:?} is mapped from two topics; each topic needs its own stream"),
                ));
            }
        }
        Ok(())
    }

    fn stream_config(&self, name: &str, topic: &str) -> stream::Config {
        let mut subjects = vec![topic.to_string()];
        if self.wildcard_subjects {
            subjects.push(format!("{topic}.>"));
        }
        stream::Config {
            name: name.to_string(),
            subjects,
            description: Some(format!("eventbus topic {topic}")),
            storage: match self.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            retention: match self.retention {
                Retention::Limits => stream::RetentionPolicy::Limits,
                Retention::Interest => stream::RetentionPolicy::Interest,
                Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
            },
            discard: match self.discard {
                Discard::Old => stream::DiscardPolicy::Old,
                Discard::New => stream::DiscardPolicy::New,
            },
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            max_messages: self.max_msgs,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        }
    }
}

impl NatsConfig {
    /// The stream of a dead-letter topic: its own subject only, limits
    /// retention with no age, size or count limit (dead letters wait for an
    /// operator; `discard = old` never applies), the topic streams' storage
    /// and replicas, and [`NatsConfig::dead_letter_duplicate_window`] as
    /// its `Nats-Msg-Id` window.
    pub fn dead_letter_stream_config(&self, name: &str, topic: &str) -> stream::Config {
        stream::Config {
            name: name.to_string(),
            subjects: vec![topic.to_string()],
            description: Some(format!("eventbus dead letters {topic}")),
            storage: match self.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_messages: -1,
            num_replicas: self.replicas,
            duplicate_window: self.dead_letter_duplicate_window,
            ..Default::default()
        }
    }
}

/// Rejects a dead-letter topic NATS cannot hold for `source`.
fn validate_dead_letter_name(config: &NatsConfig, source: &str, dead_letter: &str) -> Result<(), BrokerError> {
    let key = "consumer.dead_letter_suffix";
    let bad = |reason: String| BrokerError::Config { key: key.into(), reason };
    validate_topic(dead_letter).map_err(|r| bad(format!("dead-letter topic of {source:?}: {r}")))?;
    if dead_letter == source {
        return Err(bad(format!("the dead-letter topic of {source:?} is the topic itself")));
    }
    let name = config.stream_name(dead_letter);
    if name.len() > MAX_STREAM_NAME {
        return Err(bad(format!(
            "the stream name {name:?} of dead-letter topic {dead_letter:?} is {} bytes, more than {MAX_STREAM_NAME}",
            name.len()
        )));
    }
    if name == config.stream_name(source) {
        return Err(bad(format!(
            "dead-letter topic {dead_letter:?} maps to the stream {name:?} of its source {source:?}; use another suffix"
        )));
    }
    if config.wildcard_subjects && subject_matches(&format!("{source}.>"), dead_letter) {
        return Err(bad(format!(
            "with wildcard_subjects, dead-letter topic {dead_letter:?} falls into the stream of {source:?} \
             (subject {source}.>); use a suffix that does not start with '.', e.g. \"-dlq\""
        )));
    }
    Ok(())
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Stream and consumer names: `A-Z a-z 0-9 - _`, anything else becomes `_`.
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if name_char(c) { c } else { '_' }).collect()
}

/// A topic is published as the NATS subject of the same name.
fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic must not be empty".into());
    }
    for token in topic.split('.') {
        if token.is_empty() {
            return Err(format!("topic {topic:?} has an empty subject token (leading, trailing or double '.')"));
        }
        if token.contains(['*', '>']) || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("topic {topic:?} is not a literal NATS subject (no '*', '>' or whitespace)"));
        }
    }
    Ok(())
}

/// Whether NATS subject `pattern` (with `*` and `>` wildcards) covers `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut subject = subject.split('.');
    loop {
        match (pattern.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// FNV-1a, 128 bits: stable across processes and Rust versions, for message IDs.
fn fnv128(parts: &[&[u8]]) -> u128 {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for part in parts {
        for &b in *part {
            h ^= u128::from(b);
            h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
        // Separate parts, so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    h
}

fn header_text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok().filter(|s| !s.contains(['\r', '\n']))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Builds the NATS headers of an outbound message.
fn outbound_headers(config: &NatsConfig, msg: &Outbound) -> Result<HeaderMap, BrokerError> {
    let mut headers = HeaderMap::new();
    let mut has_msg_id = false;
    let mut has_aggregate = false;
    for (name, value) in &msg.headers {
        let header_name: HeaderName = name
            .parse()
            .map_err(|e| config_error("headers", format!("header name {name:?} is not valid in NATS: {e}")))?;
        // Values must be one line of text: other bytes are replaced (the
        // dead-letter error header may carry a multi-line message).
        let text = String::from_utf8_lossy(value).replace(['\r', '\n'], " ");
        let header_value: HeaderValue =
            text.parse().map_err(|e| config_error("headers", format!("header {name:?}: {e}")))?;
        has_msg_id |= name.eq_ignore_ascii_case(HEADER_MSG_ID);
        has_aggregate |= name.eq_ignore_ascii_case(HEADER_AGGREGATE_ID);
        headers.append(header_name, header_value);
    }
    if let Some(key) = &msg.key {
        match header_text(key) {
            Some(text) => headers.insert(HEADER_KEY, text),
            None => headers.insert(HEADER_KEY_HEX, hex(key).as_str()),
        }
    }
    let envelope = Envelope::decode(&msg.payload).ok();
    if !has_aggregate {
        let id = match &envelope {
            Some(e) => Some(e.aggregate_id.clone()),
            None => extract_aggregate_id(&msg.payload, &msg.headers, msg.key.as_deref(), None).map(|x| x.id),
        };
        if let Some(id) = id {
            headers.insert(HEADER_AGGREGATE_ID, id.as_str());
        }
    }
    if !has_msg_id {
        let header = |name: &str| {
            msg.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).and_then(|(_, v)| header_text(v))
        };
        let origin = match (header(DLQ_ORIGIN_TOPIC), header(DLQ_ORIGIN_PARTITION), header(DLQ_ORIGIN_OFFSET)) {
            (Some(t), Some(p), Some(o)) => Some(format!("dlq:{t}:{p}:{o}")),
            _ => None,
        };
        let id = match (&envelope, config.dedup) {
            (_, Dedup::Off) => None,
            // A dead letter: one per origin position, however often it is
            // written (a consumer that crashed while dead-lettering).
            _ if origin.is_some() => origin,
            (Some(e), _) => Some(format!(
                "{}:{}:{}:{:032x}",
                e.aggregate_id,
                e.event_type,
                e.event_version,
                fnv128(&[&msg.payload])
            )),
            (None, Dedup::EnvelopeOrPayload) => {
                let key = msg.key.as_deref().unwrap_or_default();
                Some(format!("raw:{:032x}", fnv128(&[msg.topic.as_bytes(), key, &msg.payload])))
            }
            (None, _) => None,
        };
        if let Some(id) = id {
            // An event type may hold characters a header cannot.
            let id = id.replace(['\r', '\n'], " ");
            headers.insert(HEADER_MSG_ID, id.as_str());
        }
    }
    Ok(headers)
}

/// Converts a delivered JetStream message.
fn to_delivery(
    topic: &Arc<str>,
    sseq: u64,
    attempt: u32,
    published: SystemTime,
    msg: &async_nats::Message,
) -> Delivery {
    let mut headers: Headers = Vec::new();
    let mut key = None;
    if let Some(map) = &msg.headers {
        let mut names: Vec<_> = map.iter().collect();
        // NATS keeps headers in a hash map: sort by name for a stable order.
        names.sort_by(|a, b| AsRef::<str>::as_ref(a.0).cmp(AsRef::<str>::as_ref(b.0)));
        for (name, values) in names {
            let name: &str = name.as_ref();
            for value in values {
                if name == HEADER_KEY {
                    key = Some(value.as_str().as_bytes().to_vec());
                } else if name == HEADER_KEY_HEX {
                    key = unhex(value.as_str());
                }
                headers.push((name.to_string(), value.as_str().as_bytes().to_vec()));
            }
        }
    }
    Delivery {
        topic: topic.clone(),
        partition: 0,
        offset: sseq,
        key,
        headers,
        payload: msg.payload.to_vec(),
        timestamp: Some(published),
        attempt,
    }
}

// ---------------------------------------------------------------------------
// Error mapping.

const STREAM_NOT_FOUND: u64 = 10059;
const CONSUMER_NOT_FOUND: u64 = 10014;
const STREAM_SUBJECT_OVERLAP: u64 = 10065;
const STREAM_NAME_IN_USE: u64 = 10058;

fn create_stream_error(stream: &str, topic: &str, e: jetstream::context::CreateStreamError) -> BrokerError {
    use jetstream::context::CreateStreamErrorKind as K;
    let code = match e.kind() {
        K::JetStream(api) => Some(api.error_code().0),
        _ => None,
    };
    match (e.kind(), code) {
        (_, Some(STREAM_SUBJECT_OVERLAP)) => config_error(
            &format!("streams.{topic}"),
            format!(
                "subject {topic:?} of stream {stream:?} overlaps another stream's subjects ({e}); \
                 with wildcard_subjects a dead-letter suffix must not start with '.'"
            ),
        ),
        (_, Some(STREAM_NAME_IN_USE)) => config_error(
            &format!("streams.{topic}"),
            format!("stream {stream:?} exists with another configuration: {e}"),
        ),
        (K::TimedOut, _) => BrokerError::Timeout(format!("creating stream {stream:?}: {e}")),
        (K::JetStreamUnavailable, _) => {
            BrokerError::Unavailable(format!("creating stream {stream:?}: JetStream not available ({e})"))
        }
        (K::InvalidStreamName | K::EmptyStreamName, _) => {
            config_error(&format!("streams.{topic}"), format!("invalid stream name {stream:?}: {e}"))
        }
        _ => match classify(errors::create_stream_failure(&e), format!("creating stream {stream:?}: {e}")) {
            BrokerError::Other(why) if matches!(e.kind(), K::JetStream(_)) => {
                config_error(&format!("streams.{topic}"), format!("stream {stream:?} rejected: {why}"))
            }
            other => other,
        },
    }
}

fn consumer_error(what: &str, e: &stream::ConsumerError) -> BrokerError {
    classify(errors::consumer_failure(e), format!("{what}: {e}"))
}

fn consumer_info_error(what: &str, e: &jetstream::context::ConsumerInfoError) -> BrokerError {
    classify(errors::consumer_info_failure(e), format!("{what}: {e}"))
}

// ---------------------------------------------------------------------------
// The broker.

/// Counters of a [`NatsBroker`] and its sessions.
#[derive(Debug, Default)]
pub struct NatsStats {
    /// Connections established (the first one and every reconnect, of every
    /// client the broker made).
    pub connects: AtomicU64,
    /// Connections lost.
    pub disconnects: AtomicU64,
    /// Clients replaced after their connection task died (async-nats panics
    /// on some malformed messages); each is also a connect.
    pub client_restarts: AtomicU64,
    /// Stored messages async-nats cannot parse, found and dead-lettered by
    /// the adapter (counted per detection; the dead-letter stream stores one
    /// per origin message).
    pub undecodable: AtomicU64,
    /// Durable generations created (one per session start and topic, plus
    /// one per re-anchoring).
    pub generations: AtomicU64,
    /// Re-anchorings after a reconnect, a failed pull or a delivery gap.
    pub reanchors: AtomicU64,
    /// Deliveries found lost on the wire (a jump in the delivery sequence).
    pub lost_deliveries: AtomicU64,
    /// Redeliveries of already committed messages, acknowledged again.
    pub reacked: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One async-nats client and its JetStream context. Replaced as a whole when
/// the client dies (`epoch` counts them).
#[derive(Clone)]
struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    epoch: u64,
}

/// A connection shorter than this counts as flapping: the next reconnect
/// waits longer (see [`reconnect_delay`]).
const FLAP_WINDOW: Duration = Duration::from_secs(1);

/// What every client of a broker reports to.
struct Hooks {
    stats: Arc<NatsStats>,
    /// Bumped on every (re)connect; sessions re-anchor on a change.
    connects_tx: Arc<watch::Sender<u64>>,
    /// Follows the client's Connected / Disconnected events.
    connection: Arc<watch::Sender<ConnectionState>>,
    /// When the current connection was established, and how many short
    /// connections in a row there were.
    flap: Arc<Mutex<(Option<Instant>, u32)>>,
    /// Receives a client's epoch when its connection task has ended.
    deaths: mpsc::UnboundedSender<u64>,
}

/// The pause before reconnect attempt `attempts` (1 = the first after a
/// loss): 10 ms doubling per attempt and per short-lived connection before
/// it (`flaps`), capped at `max`. async-nats restarts its attempt count at
/// every successful connect, so without `flaps` a server that drops each
/// new connection at once (a message the client cannot parse) would be
/// reconnected to every 10 ms forever.
fn reconnect_delay(attempts: usize, flaps: u32, max: Duration) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX).saturating_add(flaps).min(16);
    Duration::from_millis(10u64.saturating_mul(2u64.saturating_pow(exp))).min(max)
}

/// Sends its client's epoch when dropped: the event callback owns it, and
/// async-nats drops the callback when the client's connection task ended
/// (the client was dropped, or the task panicked).
struct DeathGuard {
    epoch: u64,
    deaths: mpsc::UnboundedSender<u64>,
}

impl Drop for DeathGuard {
    fn drop(&mut self) {
        let _ = self.deaths.send(self.epoch);
    }
}

/// Connects one client (epoch `epoch`) reporting to `hooks`.
async fn open_client(config: &NatsConfig, hooks: &Hooks, epoch: u64) -> Result<Conn, BrokerError> {
    let url = config.url.clone();
    let max_delay = config.max_reconnect_delay;
    let flap = hooks.flap.clone();
    let guard = Arc::new(DeathGuard { epoch, deaths: hooks.deaths.clone() });
    let options = async_nats::ConnectOptions::new()
        .name(&config.connection_name)
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| {
            let mut flap = flap.lock().unwrap_or_else(|p| p.into_inner());
            if attempts <= 1 {
                // The first attempt after a loss: was that connection short?
                let short = flap.0.take().is_some_and(|at| at.elapsed() < FLAP_WINDOW);
                flap.1 = if short { flap.1.saturating_add(1) } else { 0 };
            }
            reconnect_delay(attempts, flap.1, max_delay)
        })
        .event_callback({
            let url = url.clone();
            let stats = hooks.stats.clone();
            let connection = hooks.connection.clone();
            let connects_tx = hooks.connects_tx.clone();
            let flap = hooks.flap.clone();
            move |event| {
                let _owned_by_the_callback = &guard;
                let connects_tx = connects_tx.clone();
                let url = url.clone();
                let stats = stats.clone();
                let connection = connection.clone();
                let flap = flap.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            bump(&stats.connects);
                            flap.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(Instant::now());
                            tracing::info!(%url, "NATS connected");
                            connects_tx.send_modify(|n| *n += 1);
                            connection.send_replace(ConnectionState::Connected);
                        }
                        async_nats::Event::Disconnected => {
                            bump(&stats.disconnects);
                            tracing::warn!(%url, "NATS disconnected; reconnecting");
                            connection.send_replace(ConnectionState::Disconnected);
                        }
                        async_nats::Event::ServerError(e) => tracing::warn!(%url, error = %e, "NATS server error"),
                        async_nats::Event::ClientError(e) => tracing::warn!(%url, error = %e, "NATS client error"),
                        other => tracing::info!(%url, event = %other, "NATS connection event"),
                    }
                }
            }
        });
    // TLS and authentication (`docs/security.md`): for the first client and
    // for every replacement of a dead one.
    let options = config.security.apply(options, &url).await?;
    let client = match tokio::time::timeout(config.connect_timeout, options.connect(url.as_str())).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return Err(config.security.connect_error(&url, &e)),
        Err(_) => {
            return Err(BrokerError::Unavailable(format!(
                "cannot connect to NATS at {url}: no answer within {:?}",
                config.connect_timeout
            )))
        }
    };
    // The Connected event of the first connect may come before or after
    // this; count the start of the connection here too.
    hooks.flap.lock().unwrap_or_else(|p| p.into_inner()).0.get_or_insert_with(Instant::now);
    let js = jetstream::ContextBuilder::new().timeout(config.request_timeout).build(client.clone());
    Ok(Conn { client, js, epoch })
}

struct Inner {
    config: NatsConfig,
    stats: Arc<NatsStats>,
    /// The current client; replaced when it dies.
    conn: RwLock<Conn>,
    hooks: Hooks,
    /// Topics whose stream is known to exist.
    ensured: Mutex<HashSet<String>>,
    /// Dead-letter topic of each source topic, as the consumer announced it
    /// ([`Broker::ensure_dead_letter_topic`]).
    dead_letters: Mutex<HashMap<String, String>>,
    /// Bumped on every (re)connect; sessions re-anchor on a change.
    connects: watch::Receiver<u64>,
    /// Follows the client's Connected / Disconnected events.
    connection: Arc<watch::Sender<ConnectionState>>,
}

impl Inner {
    fn conn(&self) -> Conn {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the current client is connected (and alive).
    fn connected(&self) -> bool {
        *self.connection.borrow() == ConnectionState::Connected
            && self.conn().client.connection_state() == async_nats::connection::State::Connected
    }

    /// The dead-letter topic of `topic`.
    fn dead_letter_of(&self, topic: &str) -> String {
        self.dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .cloned()
            .unwrap_or_else(|| format!("{topic}{DEFAULT_DEAD_LETTER_SUFFIX}"))
    }
}

/// Replaces a broker's client whose connection task died (async-nats
/// panics on a header value with a CR inside), with capped backoff. Ends
/// with the broker.
async fn supervise(inner: Weak<Inner>, mut deaths: mpsc::UnboundedReceiver<u64>) {
    while let Some(epoch) = deaths.recv().await {
        let Some(strong) = inner.upgrade() else { return };
        if strong.conn().epoch != epoch {
            continue; // an old client, already replaced
        }
        tracing::error!(
            url = %strong.config.url,
            "the NATS client's connection task ended (a message it could not parse?); starting a new client"
        );
        strong.hooks.connection.send_replace(ConnectionState::Disconnected);
        bump(&strong.stats.disconnects);
        drop(strong);
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            let Some(strong) = inner.upgrade() else { return };
            let flaps = strong.hooks.flap.lock().unwrap_or_else(|p| p.into_inner()).1;
            let delay = reconnect_delay(attempt, flaps.saturating_add(1), strong.config.max_reconnect_delay);
            drop(strong);
            tokio::time::sleep(delay).await;
            let Some(strong) = inner.upgrade() else { return };
            match open_client(&strong.config, &strong.hooks, epoch + 1).await {
                Ok(conn) => {
                    *strong.conn.write().unwrap_or_else(|p| p.into_inner()) = conn;
                    bump(&strong.stats.client_restarts);
                    // Sessions re-anchor on the new client (its Connected
                    // event may have fired before it was installed).
                    strong.hooks.connects_tx.send_modify(|n| *n += 1);
                    strong.hooks.connection.send_replace(ConnectionState::Connected);
                    break;
                }
                Err(e) => tracing::warn!(error = %e, attempt, "starting a new NATS client failed; retrying"),
            }
        }
    }
}

/// A connection to a NATS server with JetStream. Cloning shares it.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl NatsBroker {
    /// Validates `config` and connects. The client reconnects on its own
    /// forever after a successful connect, with capped exponential backoff
    /// that also grows while connections keep dropping right after they
    /// were made; a client whose connection task died is replaced. Both are
    /// logged and counted ([`NatsStats`]).
    pub async fn connect(config: NatsConfig) -> Result<NatsBroker, BrokerError> {
        config.validate()?;
        let (connects_tx, connects) = watch::channel(0u64);
        let (deaths_tx, deaths) = mpsc::unbounded_channel();
        let hooks = Hooks {
            stats: Arc::new(NatsStats::default()),
            connects_tx: Arc::new(connects_tx),
            // Connected once `connect` returns; the client's events move it.
            connection: Arc::new(watch::Sender::new(ConnectionState::Connected)),
            flap: Arc::new(Mutex::new((None, 0))),
            deaths: deaths_tx,
        };
        let conn = open_client(&config, &hooks, 0).await?;
        let url = config.url.clone();
        // Fail early, with a clear message, when the server has no JetStream.
        // (Asked raw: async-nats' account type expects fields of newer servers.)
        let no_js = |why: String| {
            BrokerError::Unavailable(format!("NATS at {url} has no usable JetStream (start it with -js): {why}"))
        };
        match conn.js.request::<_, _, serde_json::Value>("INFO", &serde_json::json!({})).await {
            Ok(info) => {
                if let Some(error) = info.get("error") {
                    return Err(no_js(error.to_string()));
                }
            }
            Err(e) => return Err(no_js(e.to_string())),
        }
        let inner = Arc::new(Inner {
            stats: hooks.stats.clone(),
            connection: hooks.connection.clone(),
            config,
            conn: RwLock::new(conn),
            hooks,
            ensured: Mutex::new(HashSet::new()),
            dead_letters: Mutex::new(HashMap::new()),
            connects,
        });
        tokio::spawn(supervise(Arc::downgrade(&inner), deaths));
        Ok(NatsBroker { inner })
    }

    /// The configuration it was connected with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// Connection and durable counters.
    pub fn stats(&self) -> &Arc<NatsStats> {
        &self.inner.stats
    }

    /// The current client (replaced if its connection task dies).
    pub fn client(&self) -> async_nats::Client {
        self.inner.conn().client
    }

    /// The JetStream context of the current client (for tools and tests).
    pub fn jetstream(&self) -> jetstream::Context {
        self.inner.conn().js
    }

    /// The durable name prefix of `group` on `topic` (names end in `_g<N>`).
    pub fn durable_base(group: &str, topic: &str) -> String {
        format!("{}_{}", sanitize(group), sanitize(topic))
    }

    /// The ack floor (stream sequence below which everything is
    /// acknowledged) of `group` on `topic`: `None` if the group has no
    /// durable there yet.
    pub async fn ack_floor(&self, group: &str, topic: &str) -> Result<Option<u64>, BrokerError> {
        let stream_name = self.inner.config.stream_name(topic);
        let stream =
            self.jetstream().get_stream_no_info(&stream_name).await.map_err(|e| BrokerError::Other(e.to_string()))?;
        let base = Self::durable_base(group, topic);
        let gens = list_generations(&stream, &stream_name, &base).await?;
        let Some(&gen) = gens.last() else { return Ok(None) };
        let name = generation_name(&base, gen);
        let info =
            stream.consumer_info(&name).await.map_err(|e| consumer_info_error(&format!("durable {name}"), &e))?;
        Ok(Some(resume_floor(&info)))
    }

    /// Deletes `topic`'s stream and its durables (tests, tools).
    pub async fn delete_topic(&self, topic: &str) -> Result<(), BrokerError> {
        let name = self.inner.config.stream_name(topic);
        self.inner.ensured.lock().unwrap_or_else(|p| p.into_inner()).remove(topic);
        match self.jetstream().delete_stream(&name).await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                jetstream::context::DeleteStreamErrorKind::JetStream(api) if api.error_code().0 == STREAM_NOT_FOUND => {
                    Ok(())
                }
                _ => Err(BrokerError::Other(format!("deleting stream {name}: {e}"))),
            },
        }
    }

    async fn ensure(&self, topic: &str) -> Result<(), BrokerError> {
        self.ensure_stream(topic, false).await
    }

    /// Makes sure the stream of `topic` exists: a topic's per
    /// [`NatsConfig::strategy`]; a dead-letter topic's (`dead_letter`) is
    /// created with [`NatsConfig::dead_letter_stream_config`] whatever the
    /// strategy (unless `create_dead_letter_streams` is off), and an existing
    /// one is left as it is.
    async fn ensure_stream(&self, topic: &str, dead_letter: bool) -> Result<(), BrokerError> {
        if self.inner.ensured.lock().unwrap_or_else(|p| p.into_inner()).contains(topic) {
            return Ok(());
        }
        validate_topic(topic).map_err(|r| config_error("topic", r))?;
        let cfg = &self.inner.config;
        let name = cfg.stream_name(topic);
        let desired =
            if dead_letter { cfg.dead_letter_stream_config(&name, topic) } else { cfg.stream_config(&name, topic) };
        let strategy = match (dead_letter, cfg.create_dead_letter_streams) {
            (false, _) => cfg.strategy,
            (true, true) => StreamStrategy::CreateOnly,
            (true, false) => StreamStrategy::Existing,
        };
        let js = self.jetstream();
        match js.get_stream(&name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| BrokerError::Other(format!("stream {name}: {e}")))?;
                let current = info.config.clone();
                if !current.subjects.iter().any(|s| subject_matches(s, topic)) {
                    return Err(config_error(
                        &format!("streams.{topic}"),
                        format!(
                            "stream {name:?} exists with subjects {:?}, not {topic:?} (two topics map to one \
                             stream name?); set nats.streams.{topic} to another stream",
                            current.subjects
                        ),
                    ));
                }
                let own = current.subjects.iter().any(|s| s == topic);
                if strategy == StreamStrategy::CreateOrUpdate && own {
                    let mut wanted = current.clone();
                    wanted.subjects = desired.subjects.clone();
                    wanted.storage = desired.storage;
                    wanted.retention = desired.retention;
                    wanted.discard = desired.discard;
                    wanted.max_age = desired.max_age;
                    wanted.max_bytes = desired.max_bytes;
                    wanted.max_messages = desired.max_messages;
                    wanted.num_replicas = desired.num_replicas;
                    if !desired.duplicate_window.is_zero() {
                        wanted.duplicate_window = desired.duplicate_window;
                    }
                    if wanted != current {
                        tracing::info!(stream = %name, "updating stream configuration");
                        js.update_stream(&wanted).await.map_err(|e| create_stream_error(&name, topic, e))?;
                    }
                }
            }
            Err(e) => {
                let missing = matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(api) if api.error_code().0 == STREAM_NOT_FOUND);
                if !missing {
                    return Err(classify(errors::get_stream_failure(&e), format!("looking up stream {name}: {e}")));
                }
                if strategy == StreamStrategy::Existing {
                    let why = if dead_letter {
                        "nats.create_dead_letter_streams is false"
                    } else {
                        "nats.strategy is \"existing\""
                    };
                    return Err(BrokerError::UnknownTopic(format!(
                        "{topic} (stream {name:?} does not exist and {why})"
                    )));
                }
                tracing::info!(stream = %name, topic, "creating stream");
                match js.create_stream(desired).await {
                    Ok(_) => {}
                    // Created concurrently by someone else: fine if it holds our subject.
                    Err(e) if matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(ref api) if api.error_code().0 == STREAM_NAME_IN_USE) =>
                    {
                        let info = js.get_stream(&name).await.map_err(|e| BrokerError::Other(e.to_string()))?;
                        if !info.cached_info().config.subjects.iter().any(|s| subject_matches(s, topic)) {
                            return Err(create_stream_error(&name, topic, e));
                        }
                    }
                    Err(e) => return Err(create_stream_error(&name, topic, e)),
                }
            }
        }
        self.inner.ensured.lock().unwrap_or_else(|p| p.into_inner()).insert(topic.to_string());
        Ok(())
    }

    async fn publish_once(
        &self,
        topic: &str,
        payload: bytes::Bytes,
        headers: HeaderMap,
    ) -> Result<Position, (BrokerError, bool)> {
        let publish = jetstream::message::PublishMessage::build().payload(payload).headers(headers);
        let map = |e: jetstream::context::PublishError| {
            let failure = match errors::publish_failure(&e) {
                // Whatever it was, the connection is down: retriable.
                Failure::Unknown if !self.inner.connected() => Failure::Connection,
                f => f,
            };
            // No stream took the subject: it may have been deleted under us.
            let missing = failure == Failure::NoResponders;
            let what = if missing {
                format!("no JetStream stream took subject {topic:?} (stream missing, or JetStream unavailable)")
            } else {
                format!("publish to {topic:?}: {e}")
            };
            (classify(failure, what), missing)
        };
        let ack = self.jetstream().send_publish(topic.to_string(), publish).await.map_err(map)?.await.map_err(map)?;
        Ok(Position { partition: 0, offset: ack.sequence, duplicate: ack.duplicate })
    }
}

/// The bytes a header map takes on the wire (`NATS/1.0\r\n`, `name: value\r\n`
/// each, `\r\n`).
fn header_wire_len(headers: &HeaderMap) -> usize {
    let mut n = 12;
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for v in values {
            n += name.len() + v.as_str().len() + 4;
        }
    }
    n
}

impl Broker for NatsBroker {
    type Session = NatsSession;

    async fn publish(&self, msg: Outbound) -> Result<Position, BrokerError> {
        validate_topic(&msg.topic).map_err(|r| config_error("topic", r))?;
        let headers = outbound_headers(&self.inner.config, &msg)?;
        // Refuse what the server would refuse before anything is copied.
        let max = self.inner.conn().client.max_payload();
        let size = msg.payload.len() + header_wire_len(&headers);
        if max > 0 && size > max {
            return Err(classify(
                Failure::TooLarge,
                format!(
                    "message to {:?} is {size} bytes with its headers; the server's max_payload is {max}",
                    msg.topic
                ),
            ));
        }
        let Outbound { topic, payload, .. } = msg;
        let payload = bytes::Bytes::from(payload); // moved, not copied; retries share it
        let auto_create = self.inner.config.strategy != StreamStrategy::Existing;
        if auto_create {
            self.ensure(&topic).await?;
        }
        match self.publish_once(&topic, payload.clone(), headers.clone()).await {
            Ok(p) => Ok(p),
            Err((e, stream_missing)) => {
                if !stream_missing {
                    return Err(e);
                }
                self.inner.ensured.lock().unwrap_or_else(|p| p.into_inner()).remove(&topic);
                if !auto_create {
                    return Err(BrokerError::UnknownTopic(topic));
                }
                // The stream was deleted under us: create it and try once more.
                self.ensure(&topic).await?;
                self.publish_once(&topic, payload, headers).await.map_err(|(e, _)| e)
            }
        }
    }

    /// Records `dead_letter` as `source`'s dead-letter topic (the adapter
    /// dead-letters messages it cannot parse there) and makes sure its
    /// stream exists: created with [`NatsConfig::dead_letter_stream_config`]
    /// even with `strategy = "existing"`, unless
    /// [`NatsConfig::create_dead_letter_streams`] is false. A name NATS
    /// cannot hold (not a literal subject, a stream name too long) is a
    /// [`BrokerError::Config`].
    async fn ensure_dead_letter_topic(&self, source: &str, dead_letter: &str) -> Result<(), BrokerError> {
        validate_dead_letter_name(&self.inner.config, source, dead_letter)?;
        self.inner
            .dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(source.to_string(), dead_letter.to_string());
        self.ensure_stream(dead_letter, true).await
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<NatsSession, BrokerError> {
        if group.trim().is_empty() {
            return Err(BrokerError::Config { key: "consumer.group".into(), reason: "must not be empty".into() });
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut session = NatsSession {
            broker: self.clone(),
            group: group.to_string(),
            events_tx,
            events_rx,
            topics: BTreeMap::new(),
        };
        session.add_topics(topics).await?;
        Ok(session)
    }

    /// `max_ack_pending`: the server stops delivering to a consumer holding
    /// that many messages unacknowledged.
    fn delivery_window(&self) -> Option<u64> {
        u64::try_from(self.inner.config.max_ack_pending).ok()
    }

    fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.connection.subscribe()
    }

    /// Per topic (one stream, partition 0): the end offset is the stream's
    /// last sequence plus one, the committed offset the group durable's ack
    /// floor plus one (its newest generation). Without a durable yet,
    /// everything still stored is lag (committed = the stream's first
    /// sequence). Topics without a stream are left out.
    async fn consumer_lag(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, BrokerError> {
        let mut lags = Vec::with_capacity(topics.len());
        for topic in topics {
            let name = self.inner.config.stream_name(topic);
            let stream = match self.jetstream().get_stream(&name).await {
                Ok(stream) => stream,
                Err(e) => match e.kind() {
                    jetstream::context::GetStreamErrorKind::JetStream(api)
                        if api.error_code().0 == STREAM_NOT_FOUND =>
                    {
                        continue
                    }
                    _ => return Err(BrokerError::Unavailable(format!("stream {name} of topic {topic}: {e}"))),
                },
            };
            let state = stream.cached_info().state.clone();
            let base = Self::durable_base(group, topic);
            let committed = match list_generations(&stream, &name, &base).await?.last() {
                Some(&gen) => {
                    let durable = generation_name(&base, gen);
                    let info = stream
                        .consumer_info(&durable)
                        .await
                        .map_err(|e| consumer_info_error(&format!("durable {durable} of topic {topic}"), &e))?;
                    resume_floor(&info) + 1
                }
                None => state.first_sequence.max(1),
            };
            let partition = TopicPartition::new(topic.as_str(), 0);
            lags.push(PartitionLag { partition, end_offset: state.last_sequence + 1, committed });
        }
        Ok(lags)
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        match partitions {
            0 => Err(BrokerError::Config { key: "partitions".into(), reason: "must be at least 1".into() }),
            1 => self.ensure(topic).await,
            n => Err(BrokerError::Config {
                key: "partitions".into(),
                reason: format!(
                    "a JetStream stream is one partition, {n} were asked for topic {topic:?}; \
                     partition with more topics (subjects) instead"
                ),
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// Durable generations.

/// The stream sequence below which a durable generation has processed
/// everything. The server reports an ack floor of 0 until the generation's
/// first ack (nats-server 2.9), although it started at `opt_start_seq`: then
/// everything below the start counts (the generation that created it had
/// committed it).
fn resume_floor(info: &consumer::Info) -> u64 {
    if info.ack_floor.consumer_sequence > 0 {
        return info.ack_floor.stream_sequence;
    }
    match info.config.deliver_policy {
        consumer::DeliverPolicy::ByStartSequence { start_sequence } => start_sequence.saturating_sub(1),
        _ => info.ack_floor.stream_sequence,
    }
}

fn generation_name(base: &str, gen: u64) -> String {
    format!("{base}_g{gen}")
}

/// Generations of `base` present on `stream`, ascending.
async fn list_generations<I>(
    stream: &stream::Stream<I>,
    stream_name: &str,
    base: &str,
) -> Result<Vec<u64>, BrokerError> {
    let prefix = format!("{base}_g");
    let mut names = stream.consumer_names();
    let mut gens = Vec::new();
    while let Some(name) = names.next().await {
        let name =
            name.map_err(|e| BrokerError::Unavailable(format!("listing durables of stream {stream_name}: {e}")))?;
        if let Some(rest) = name.strip_prefix(&prefix) {
            if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(g) = rest.parse() {
                    gens.push(g);
                }
            }
        }
    }
    gens.sort_unstable();
    Ok(gens)
}

// ---------------------------------------------------------------------------
// The order bookkeeping of one durable.

/// What to do with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// New and in stream order: hold it and pass it on.
    Pass,
    /// A redelivery of a held message: pass it on again (the consumer skips
    /// an offset it has seen); its ack handle is refreshed.
    Redelivery,
    /// A redelivery of a committed message: acknowledge it again, do not
    /// pass it on.
    Reack,
    /// A later sequence arrived after a lost delivery: the lost one may be
    /// missing in between, so the durable must be re-anchored.
    Gap,
    /// A redelivery of a sequence that was never passed on (cannot happen
    /// unless the server misbehaves): left unacknowledged.
    Stray,
}

/// The order bookkeeping of one durable, apart from the I/O so that it can
/// be tested on its own. `A` is an ack handle (the reply subject).
#[derive(Debug)]
struct Ledger<A> {
    /// Passed on, not yet committed: stream seq → ack handle (`None` while it
    /// belongs to a deleted generation, until the current one redelivers).
    held: BTreeMap<u64, Option<A>>,
    /// Committed, ack not yet confirmed.
    to_ack: BTreeMap<u64, A>,
    /// Everything below it is processed (the consumer's commit point).
    committed: u64,
    /// The next stream sequence to pass on.
    next_expected: u64,
    /// Delivery (consumer) sequence of the last delivery of this generation.
    last_dseq: u64,
    /// A delivery of this generation was lost.
    suspect: bool,
}

impl<A> Ledger<A> {
    /// A ledger whose first generation delivers from `first` on, with
    /// everything below `committed` processed.
    fn new(first: u64, committed: u64) -> Self {
        Ledger {
            held: BTreeMap::new(),
            to_ack: BTreeMap::new(),
            committed,
            next_expected: first.max(1),
            last_dseq: 0,
            suspect: false,
        }
    }

    /// Classifies a delivery of stream sequence `sseq` with delivery
    /// sequence `dseq`; also says whether a lost delivery was detected.
    fn on_delivery(&mut self, sseq: u64, dseq: u64, ack: A) -> (Verdict, bool) {
        // Each delivery of a generation (redeliveries too) has the next
        // delivery sequence; a jump means one never reached us.
        let lost = dseq != self.last_dseq + 1;
        self.suspect |= lost;
        self.last_dseq = dseq;
        let verdict = if sseq < self.next_expected {
            if sseq < self.committed {
                self.to_ack.insert(sseq, ack);
                Verdict::Reack
            } else if let Some(slot) = self.held.get_mut(&sseq) {
                *slot = Some(ack);
                Verdict::Redelivery
            } else {
                Verdict::Stray
            }
        } else if sseq == self.next_expected || !self.suspect {
            // A higher sequence without a lost delivery: the ones between
            // were deleted from the stream (limits), nothing to wait for.
            self.held.insert(sseq, Some(ack));
            self.next_expected = sseq + 1;
            Verdict::Pass
        } else {
            Verdict::Gap
        };
        (verdict, lost)
    }

    /// Everything below `next` is processed: its held messages are to be
    /// acknowledged.
    fn commit(&mut self, next: u64) {
        if next <= self.committed {
            return;
        }
        self.committed = next;
        let rest = self.held.split_off(&next);
        for (seq, ack) in std::mem::replace(&mut self.held, rest) {
            // A message of a deleted generation is redelivered by the
            // current one, and acknowledged then (it is below `committed`).
            if let Some(ack) = ack {
                self.to_ack.insert(seq, ack);
            }
        }
    }

    /// Where a new generation must start: the lowest uncommitted sequence
    /// passed on, or the next one to pass on.
    fn restart_point(&self) -> u64 {
        self.held.keys().next().copied().unwrap_or(self.next_expected).min(self.next_expected).max(1)
    }

    /// A new generation delivers from [`Ledger::restart_point`]: acks of the
    /// old one are void (held messages come again, committed ones lie below
    /// the new start), delivery sequences restart.
    fn new_generation(&mut self) {
        for ack in self.held.values_mut() {
            *ack = None;
        }
        self.to_ack.clear();
        self.last_dseq = 0;
        self.suspect = false;
    }

    /// Ack handles of held messages, for progress acks.
    fn held_acks(&self) -> impl Iterator<Item = &A> {
        self.held.values().flatten()
    }
}

// ---------------------------------------------------------------------------
// The session.

enum Command {
    /// Everything below this stream sequence is processed.
    Commit(u64),
    /// Flush acknowledgements and stop.
    Close(oneshot::Sender<()>),
}

struct TopicHandle {
    commands: mpsc::UnboundedSender<Command>,
    join: JoinHandle<()>,
}

/// One member's view of a consumer group on JetStream: a durable pull
/// consumer per topic, each driven by a background task; `next` only reads
/// a channel, so it is cancel-safe. Dropping it stops the tasks without
/// acknowledging anything more (like a crashed process).
pub struct NatsSession {
    broker: NatsBroker,
    group: String,
    events_tx: mpsc::UnboundedSender<SessionEvent>,
    events_rx: mpsc::UnboundedReceiver<SessionEvent>,
    topics: BTreeMap<String, TopicHandle>,
}

impl NatsSession {
    async fn add_topics(&mut self, topics: &[String]) -> Result<(), BrokerError> {
        let mut actors: Vec<TopicActor> = Vec::new();
        for topic in topics {
            if self.topics.contains_key(topic) || actors.iter().any(|a| &*a.topic == topic.as_str()) {
                continue;
            }
            self.broker.ensure(topic).await?;
            actors.push(TopicActor::open(&self.broker, &self.group, topic).await?);
        }
        if actors.is_empty() {
            return Ok(());
        }
        // Assignment first, then the messages of the assigned partitions.
        let tps = actors.iter().map(|a| TopicPartition::new(a.topic.clone(), 0)).collect();
        let _ = self.events_tx.send(SessionEvent::Assigned(tps));
        for actor in actors {
            let (commands, rx) = mpsc::unbounded_channel();
            let topic = actor.topic.to_string();
            let join = tokio::spawn(actor.run(rx, self.events_tx.clone()));
            self.topics.insert(topic, TopicHandle { commands, join });
        }
        Ok(())
    }

    async fn stop_topics(&mut self, topics: &[String]) {
        let mut waits = Vec::new();
        for topic in topics {
            if let Some(handle) = self.topics.remove(topic) {
                let (tx, rx) = oneshot::channel();
                if handle.commands.send(Command::Close(tx)).is_ok() {
                    waits.push((handle, rx));
                } else {
                    handle.join.abort();
                }
            }
        }
        for (handle, rx) in waits {
            let _ = rx.await;
            let _ = handle.join.await;
        }
    }
}

impl Session for NatsSession {
    async fn next(&mut self) -> Result<SessionEvent, BrokerError> {
        // The session holds a sender itself, so the channel never closes.
        self.events_rx.recv().await.ok_or(BrokerError::Closed)
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<(), BrokerError> {
        for (tp, next) in offsets {
            let Some(handle) = self.topics.get(&*tp.topic).filter(|_| tp.partition == 0) else {
                return Err(BrokerError::CommitRejected {
                    partition: tp.to_string(),
                    reason: "not assigned to this session".into(),
                });
            };
            if handle.commands.send(Command::Commit(*next)).is_err() {
                return Err(BrokerError::CommitRejected {
                    partition: tp.to_string(),
                    reason: "its consumer task stopped".into(),
                });
            }
        }
        Ok(())
    }

    async fn release(&mut self, partitions: &[TopicPartition]) -> Result<(), BrokerError> {
        let topics: Vec<String> = partitions.iter().map(|tp| tp.topic.to_string()).collect();
        self.stop_topics(&topics).await;
        Ok(())
    }

    async fn set_topics(&mut self, topics: &[String]) -> Result<(), BrokerError> {
        let removed: Vec<TopicPartition> =
            self.topics.keys().filter(|t| !topics.contains(t)).map(|t| TopicPartition::new(t.as_str(), 0)).collect();
        if !removed.is_empty() {
            // The consumer commits them and calls `release`, which stops them.
            let _ = self.events_tx.send(SessionEvent::Revoked(removed));
        }
        self.add_topics(topics).await
    }

    async fn close(mut self) -> Result<(), BrokerError> {
        let topics: Vec<String> = self.topics.keys().cloned().collect();
        self.stop_topics(&topics).await;
        Ok(())
    }
}

impl Drop for NatsSession {
    fn drop(&mut self) {
        for handle in self.topics.values() {
            handle.join.abort();
        }
    }
}

/// Drives the durable of one topic: pulls, holds, progress-acks, acks on
/// commit, and re-anchors after lost deliveries.
struct TopicActor {
    inner: Arc<Inner>,
    topic: Arc<str>,
    stream: stream::Stream<()>,
    stream_name: String,
    base: String,
    gen: u64,
    consumer_name: String,
    messages: Option<consumer::pull::Stream>,
    ledger: Ledger<Subject>,
    /// Changes on every (re)connect of the client.
    connects: watch::Receiver<u64>,
    /// When to try re-anchoring again (after a failure).
    reanchor_at: Option<Instant>,
    reanchor_backoff: Duration,
    /// Confirmed acknowledgements on their way; deliveries go on meanwhile.
    acking: Option<AckTask>,
    /// A stored message the client cannot parse, being stepped over.
    quarantine: Option<Quarantine>,
}

/// A stored message async-nats cannot parse (see `undecodable`): the
/// durable stops pulling, the message is dead-lettered by the adapter, and
/// once everything before it is committed a new durable generation starts
/// right after it. The client never receives it again.
struct Quarantine {
    message: undecodable::StoredMessage,
    reason: String,
    dead_lettered: bool,
}

/// A batch of acknowledgements being confirmed, in a task of its own so the
/// actor needs no lock to poll it; aborted if the actor goes away.
struct AckTask(JoinHandle<AckBatch>);

impl Drop for AckTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AckTask {
    async fn join(&mut self) -> Option<AckBatch> {
        (&mut self.0).await.ok()
    }
}

/// The outcome of one batch of confirmed acknowledgements: per stream
/// sequence, whether the server answered (`Ok(false)`: nobody answers on the
/// subject any more, its durable generation is gone).
struct AckBatch {
    gen: u64,
    results: Vec<(u64, Result<bool, String>)>,
}

impl TopicActor {
    /// Opens the group's durable on `topic`: resumes from the ack floor of
    /// the newest generation in a fresh generation, or creates the first.
    async fn open(broker: &NatsBroker, group: &str, topic: &str) -> Result<TopicActor, BrokerError> {
        let inner = broker.inner.clone();
        let stream_name = inner.config.stream_name(topic);
        let stream = inner
            .conn()
            .js
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|e| config_error(&format!("streams.{topic}"), format!("stream {stream_name:?}: {e}")))?;
        let base = NatsBroker::durable_base(group, topic);
        // A reconnect from here on re-anchors what is opened now.
        let mut connects = inner.connects.clone();
        connects.mark_unchanged();
        let gens = list_generations(&stream, &stream_name, &base).await?;
        let mut actor = TopicActor {
            inner,
            topic: topic.into(),
            stream,
            stream_name,
            base,
            gen: gens.last().copied().unwrap_or(0),
            consumer_name: String::new(),
            messages: None,
            ledger: Ledger::new(1, 0),
            connects,
            reanchor_at: None,
            reanchor_backoff: Duration::from_millis(50),
            acking: None,
            quarantine: None,
        };
        let mut committed = 0;
        let start = match gens.last() {
            Some(&gen) => {
                let name = generation_name(&actor.base, gen);
                let info = actor
                    .stream
                    .consumer_info(&name)
                    .await
                    .map_err(|e| consumer_info_error(&format!("durable {name} of topic {topic}"), &e))?;
                let floor = resume_floor(&info);
                if info.num_waiting > 0 {
                    tracing::warn!(
                        topic,
                        durable = %name,
                        waiting = info.num_waiting,
                        "the durable has waiting pull requests: a crashed predecessor left them (harmless, they \
                         go with its generation), or another instance of this group is running (not supported: \
                         one active instance per group and topic)"
                    );
                }
                tracing::info!(
                    topic,
                    durable = %name,
                    ack_floor = floor,
                    delivered = info.delivered.stream_sequence,
                    unacked = info.num_ack_pending,
                    "resuming the group from the ack floor in a new durable generation"
                );
                committed = floor + 1;
                consumer::DeliverPolicy::ByStartSequence { start_sequence: floor + 1 }
            }
            None => match actor.inner.config.start_from {
                StartFrom::All => consumer::DeliverPolicy::All,
                // As a start sequence, so that a restart before the first
                // ack knows where this generation began (see `resume_floor`).
                StartFrom::New => {
                    let info = actor
                        .inner
                        .conn()
                        .js
                        .get_stream(&actor.stream_name)
                        .await
                        .map_err(|e| BrokerError::Unavailable(format!("stream {}: {e}", actor.stream_name)))?;
                    let last = info.cached_info().state.last_sequence;
                    consumer::DeliverPolicy::ByStartSequence { start_sequence: last + 1 }
                }
            },
        };
        let first = actor.create_generation(start, &gens).await?;
        actor.ledger = Ledger::new(first, committed);
        Ok(actor)
    }

    fn consumer_config(&self, name: &str, deliver_policy: consumer::DeliverPolicy) -> consumer::pull::Config {
        let cfg = &self.inner.config;
        consumer::pull::Config {
            durable_name: Some(name.to_string()),
            name: Some(name.to_string()),
            description: Some(format!("eventbus durable of topic {}", self.topic)),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: cfg.ack_wait,
            max_ack_pending: cfg.max_ack_pending,
            replay_policy: consumer::ReplayPolicy::Instant,
            ..Default::default()
        }
    }

    /// Creates generation `gen + 1` delivering from `start`, deletes the
    /// generations in `old`, and starts pulling from the new one. Returns
    /// the first stream sequence the new generation delivers (at the
    /// earliest).
    async fn create_generation(&mut self, start: consumer::DeliverPolicy, old: &[u64]) -> Result<u64, BrokerError> {
        let gen = self.gen + 1;
        let name = generation_name(&self.base, gen);
        let work_queue = self.inner.config.retention == Retention::WorkQueue;
        // A work queue allows one consumer and keeps exactly the unacked
        // messages: delete first, then read everything left, in order.
        let start = if work_queue {
            self.delete_generations(old).await;
            consumer::DeliverPolicy::All
        } else {
            start
        };
        let config = self.consumer_config(&name, start);
        let created: consumer::PullConsumer = self
            .stream
            .create_consumer(config)
            .await
            .map_err(|e| consumer_error(&format!("creating durable {name} of topic {}", self.topic), &e))?;
        bump(&self.inner.stats.generations);
        let info = created.cached_info();
        let first = info.delivered.stream_sequence + 1;
        tracing::debug!(topic = %self.topic, durable = %name, first, "durable generation created");
        if !work_queue {
            self.delete_generations(old).await;
        }
        let cfg = &self.inner.config;
        let batch = cfg.pull_batch.min(usize::try_from(cfg.max_ack_pending).unwrap_or(usize::MAX)).max(1);
        let heartbeat = (cfg.pull_expires / 2).min(Duration::from_secs(5));
        let messages = created
            .stream()
            .max_messages_per_batch(batch)
            .expires(cfg.pull_expires)
            .heartbeat(heartbeat)
            .messages()
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!("pulling from durable {name} of topic {}: {e}", self.topic))
            })?;
        self.gen = gen;
        self.consumer_name = name;
        self.messages = Some(messages);
        self.ledger.new_generation();
        Ok(first)
    }

    async fn delete_generations(&self, gens: &[u64]) {
        for &g in gens {
            let name = generation_name(&self.base, g);
            match self.stream.delete_consumer(&name).await {
                Ok(_) => tracing::debug!(topic = %self.topic, durable = %name, "old durable generation deleted"),
                Err(e) => {
                    let gone = matches!(e.kind(), stream::ConsumerErrorKind::JetStream(ref api) if api.error_code().0 == CONSUMER_NOT_FOUND);
                    if !gone {
                        // Harmless: the next session start deletes it.
                        tracing::warn!(topic = %self.topic, durable = %name, error = %e, "deleting an old durable generation failed");
                    }
                }
            }
        }
    }

    /// Moves the durable to a new generation starting at the lowest
    /// uncommitted sequence; on failure, tries again later. First looks at
    /// the next sequence to pass on: if the client cannot parse that stored
    /// message (the likely reason the connection or the pull broke), it is
    /// quarantined instead (see [`Quarantine`]).
    async fn reanchor(&mut self, why: &str) {
        self.messages = None;
        // The client may have been replaced: use the current one.
        if let Ok(stream) = self.inner.conn().js.get_stream_no_info(&self.stream_name).await {
            self.stream = stream;
        }
        let result = self.step_or_reanchor(why).await;
        match result {
            Ok(()) => {
                self.reanchor_at = None;
                self.reanchor_backoff = Duration::from_millis(50);
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, retry_in = ?self.reanchor_backoff, "re-anchoring failed; retrying");
                self.messages = None;
                self.reanchor_at = Some(Instant::now() + self.reanchor_backoff);
                self.reanchor_backoff = (self.reanchor_backoff * 2).min(Duration::from_secs(2));
            }
        }
    }

    async fn step_or_reanchor(&mut self, why: &str) -> Result<(), BrokerError> {
        if self.quarantine.is_none() {
            self.probe().await?;
        }
        let start = match &mut self.quarantine {
            None => self.ledger.restart_point(),
            Some(q) => {
                let seq = q.message.seq;
                if !q.dead_lettered {
                    let (message, reason) = (q.message.clone(), q.reason.clone());
                    self.dead_letter_undecodable(&message, &reason).await?;
                    if let Some(q) = &mut self.quarantine {
                        q.dead_lettered = true;
                    }
                    // Nothing at or above it was passed on; the next to pass is after it.
                    self.ledger.next_expected = self.ledger.next_expected.max(seq + 1);
                }
                if self.ledger.committed < seq && !self.ledger.held.is_empty() {
                    // Events before it are still being handled: wait for
                    // their commit (a `Commit` command calls this again).
                    tracing::debug!(topic = %self.topic, seq, committed = self.ledger.committed, "waiting for the events before the undecodable message");
                    return Ok(());
                }
                if self.inner.config.retention == Retention::WorkQueue {
                    // A work queue keeps what is unacknowledged: delete it.
                    undecodable::delete_stored(&self.inner.conn().js, &self.stream_name, seq).await?;
                }
                self.ledger.committed = self.ledger.committed.max(seq + 1);
                seq + 1
            }
        };
        bump(&self.inner.stats.reanchors);
        tracing::info!(topic = %self.topic, durable = %self.consumer_name, start, reason = why, "re-anchoring the durable");
        let gens = list_generations(&self.stream, &self.stream_name, &self.base).await?;
        self.gen = self.gen.max(gens.last().copied().unwrap_or(0));
        self.create_generation(consumer::DeliverPolicy::ByStartSequence { start_sequence: start }, &gens).await?;
        if let Some(q) = self.quarantine.take() {
            tracing::info!(topic = %self.topic, seq = q.message.seq, start, "stepped over the undecodable message");
        }
        Ok(())
    }

    /// Reads the first stored message at or after the next sequence to pass
    /// on and quarantines it if the client cannot parse it.
    async fn probe(&mut self) -> Result<(), BrokerError> {
        let next = self.ledger.next_expected;
        let Some(message) = undecodable::get_stored(&self.inner.conn().js, &self.stream_name, next).await? else {
            return Ok(());
        };
        if message.header.is_empty() {
            return Ok(());
        }
        if let Some(reason) = undecodable::refusal(&message.header) {
            bump(&self.inner.stats.undecodable);
            tracing::error!(
                topic = %self.topic,
                seq = message.seq,
                reason = %reason,
                "a stored message has headers the NATS client cannot parse; dead-lettering it and moving past it"
            );
            self.quarantine = Some(Quarantine { message, reason, dead_lettered: false });
            // The short connections before this had a known cause, now
            // removed: the next loss starts the backoff afresh.
            self.inner.hooks.flap.lock().unwrap_or_else(|p| p.into_inner()).1 = 0;
        }
        Ok(())
    }

    /// Writes `message` to the topic's dead-letter topic with its bytes and
    /// the standard dead-letter headers; `Nats-Msg-Id` (from its origin)
    /// keeps a repeated write (after a crash) to one stored copy.
    async fn dead_letter_undecodable(
        &self,
        message: &undecodable::StoredMessage,
        reason: &str,
    ) -> Result<(), BrokerError> {
        use base64::Engine;
        let broker = NatsBroker { inner: self.inner.clone() };
        let dead_letter = self.inner.dead_letter_of(&self.topic);
        broker.ensure_stream(&dead_letter, true).await?;
        let mut headers: Headers = vec![
            (DLQ_REASON.into(), REASON_UNDECODABLE_HEADERS.as_bytes().to_vec()),
            (DLQ_ERROR.into(), format!("the NATS client cannot parse its headers: {reason}").into_bytes()),
            (DLQ_ATTEMPTS.into(), b"0".to_vec()),
            (DLQ_ORIGIN_TOPIC.into(), self.topic.as_bytes().to_vec()),
            (DLQ_ORIGIN_PARTITION.into(), b"0".to_vec()),
            (DLQ_ORIGIN_OFFSET.into(), message.seq.to_string().into_bytes()),
            (HEADER_ORIGIN_SUBJECT.into(), message.subject.as_bytes().to_vec()),
        ];
        let raw = base64::engine::general_purpose::STANDARD.encode(&message.header);
        let mut full = headers.clone();
        full.push((HEADER_RAW_HEADERS.into(), raw.into_bytes()));
        let outbound =
            Outbound { topic: dead_letter.clone(), key: None, headers: full, payload: message.payload.clone() };
        let result = match broker.publish(outbound).await {
            Err(BrokerError::Refused(why)) => {
                // Too large with its bytes: the dead letter says so; the
                // message itself stays in the origin stream at its sequence.
                headers.push((DLQ_PAYLOAD_OMITTED.into(), why.into_bytes()));
                broker.publish(Outbound { topic: dead_letter.clone(), key: None, headers, payload: Vec::new() }).await
            }
            other => other,
        };
        match result {
            Ok(position) => {
                metrics::counter!(
                    crate::metric_names::DEAD_LETTERED,
                    "topic" => self.topic.to_string(),
                    "reason" => REASON_UNDECODABLE_HEADERS
                )
                .increment(u64::from(!position.duplicate));
                tracing::warn!(
                    topic = %self.topic,
                    partition = 0,
                    offset = message.seq,
                    dead_letter = %dead_letter,
                    duplicate = position.duplicate,
                    reason = REASON_UNDECODABLE_HEADERS,
                    "dead-lettered a message the NATS client cannot parse"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    topic = %self.topic,
                    partition = 0,
                    offset = message.seq,
                    dead_letter = %dead_letter,
                    reason = REASON_UNDECODABLE_HEADERS,
                    error = %e,
                    "cannot write the dead letter of an undecodable message; the topic waits and retries"
                );
                Err(e)
            }
        }
    }

    fn connected(&self) -> bool {
        self.inner.connected()
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::UnboundedSender<SessionEvent>,
    ) {
        let mut watching_connects = true;
        let mut progress = tokio::time::interval(self.inner.config.progress_period());
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(Command::Commit(next)) => {
                        self.ledger.commit(next);
                        self.start_acks();
                        if self.quarantine.as_ref().is_some_and(|q| q.dead_lettered) && self.reanchor_at.is_none() {
                            self.reanchor("stepping over an undecodable message").await;
                        }
                    }
                    Some(Command::Close(done)) => {
                        self.flush_acks().await;
                        let _ = done.send(());
                        break;
                    }
                    None => break,
                },
                changed = self.connects.changed(), if watching_connects => {
                    if changed.is_err() {
                        watching_connects = false;
                        continue;
                    }
                    // What the client parsed before the connection broke is
                    // passed on first, so the probe looks right behind it.
                    if !self.drain_buffered(&events).await {
                        break;
                    }
                    // Deliveries in flight during the outage may be lost.
                    self.reanchor("reconnected").await;
                }
                _ = async { tokio::time::sleep_until(self.reanchor_at.expect("guarded")).await }, if self.reanchor_at.is_some() => {
                    self.reanchor("retry").await;
                }
                _ = progress.tick() => {
                    self.progress().await;
                    self.start_acks();
                }
                batch = async { self.acking.as_mut().expect("guarded").join().await }, if self.acking.is_some() => {
                    self.acking = None;
                    if batch.is_some_and(|b| self.finish_acks(b)) {
                        // Commits that arrived meanwhile.
                        self.start_acks();
                    }
                }
                item = async { self.messages.as_mut().expect("guarded").next().await }, if self.messages.is_some() => match item {
                    Some(Ok(msg)) => {
                        if !self.on_message(msg, &events).await {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(topic = %self.topic, durable = %self.consumer_name, error = %e, "pulling messages failed");
                        self.messages = None;
                        self.reanchor_at = Some(Instant::now() + self.reanchor_backoff);
                    }
                    None => {
                        tracing::warn!(topic = %self.topic, durable = %self.consumer_name, "message stream ended");
                        self.messages = None;
                        self.reanchor_at = Some(Instant::now() + self.reanchor_backoff);
                    }
                },
            }
        }
    }

    /// Handles the deliveries the old pull already holds; false when the
    /// session is gone.
    async fn drain_buffered(&mut self, events: &mpsc::UnboundedSender<SessionEvent>) -> bool {
        use futures::FutureExt;
        while let Some(messages) = self.messages.as_mut() {
            match messages.next().now_or_never() {
                Some(Some(Ok(msg))) => {
                    if !self.on_message(msg, events).await {
                        return false;
                    }
                }
                _ => break,
            }
        }
        true
    }

    /// Handles one delivery; false when the session is gone.
    async fn on_message(&mut self, msg: jetstream::Message, events: &mpsc::UnboundedSender<SessionEvent>) -> bool {
        let (sseq, dseq, delivered, published, consumer_name) = match msg.info() {
            Ok(i) => (i.stream_sequence, i.consumer_sequence, i.delivered, i.published, i.consumer.to_string()),
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "delivery without JetStream metadata ignored");
                return true;
            }
        };
        if consumer_name != self.consumer_name {
            return true; // a late delivery of a deleted generation
        }
        let Some(subject) = msg.message.reply.clone() else { return true };
        let (verdict, lost) = self.ledger.on_delivery(sseq, dseq, subject);
        if lost {
            bump(&self.inner.stats.lost_deliveries);
            tracing::debug!(topic = %self.topic, seq = sseq, delivery = dseq, "a delivery was lost on the wire");
        }
        match verdict {
            Verdict::Pass | Verdict::Redelivery => {}
            Verdict::Reack => {
                bump(&self.inner.stats.reacked);
                return true;
            }
            Verdict::Stray => {
                tracing::error!(topic = %self.topic, seq = sseq, "redelivery of a sequence never passed on; left unacknowledged");
                return true;
            }
            Verdict::Gap => {
                tracing::warn!(
                    topic = %self.topic,
                    expected = self.ledger.next_expected,
                    got = sseq,
                    "delivery gap after a lost delivery; re-anchoring so order is kept"
                );
                self.reanchor("delivery gap").await;
                return true;
            }
        }
        let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        let published = SystemTime::from(published);
        let delivery = to_delivery(&self.topic, sseq, attempt, published, &msg.message);
        events.send(SessionEvent::Message(delivery)).is_ok()
    }

    /// Acknowledges committed messages with confirmation, then returns
    /// (on close); failures stay queued.
    async fn flush_acks(&mut self) {
        if let Some(mut task) = self.acking.take() {
            if let Some(batch) = task.join().await {
                self.finish_acks(batch);
            }
        }
        self.start_acks();
        if let Some(mut task) = self.acking.take() {
            if let Some(batch) = task.join().await {
                self.finish_acks(batch);
            }
        }
    }

    /// Starts confirming the acknowledgements of committed messages, unless
    /// a batch is already on its way (its completion starts the next).
    fn start_acks(&mut self) {
        if self.acking.is_some() || self.ledger.to_ack.is_empty() || !self.connected() {
            return;
        }
        let client = self.inner.conn().client;
        let timeout = self.inner.config.ack_timeout;
        let gen = self.gen;
        let batch: Vec<(u64, Subject)> = self.ledger.to_ack.iter().map(|(s, subj)| (*s, subj.clone())).collect();
        self.acking = Some(AckTask(tokio::spawn(async move {
            let results = futures::stream::iter(batch)
                .map(|(seq, subject)| {
                    let client = client.clone();
                    async move {
                        let ack: bytes::Bytes = jetstream::AckKind::Ack.into();
                        let r = match tokio::time::timeout(timeout, client.request(subject, ack)).await {
                            Ok(Ok(_)) => Ok(true),
                            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(false),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("ack confirmation timed out".into()),
                        };
                        (seq, r)
                    }
                })
                .buffer_unordered(128)
                .collect()
                .await;
            AckBatch { gen, results }
        })));
    }

    /// Drops confirmed acknowledgements from the queue; true when every one
    /// of the batch was confirmed (so more may be started right away).
    fn finish_acks(&mut self, batch: AckBatch) -> bool {
        if batch.gen != self.gen {
            // A new generation voided these handles (`Ledger::new_generation`).
            return true;
        }
        let mut failed = 0usize;
        let mut last_error = String::new();
        for (seq, result) in batch.results {
            match result {
                Ok(_) => {
                    self.ledger.to_ack.remove(&seq);
                }
                Err(e) => {
                    failed += 1;
                    last_error = e;
                }
            }
        }
        if failed > 0 {
            tracing::warn!(topic = %self.topic, failed, error = %last_error, "acknowledgements not confirmed; retrying");
        }
        failed == 0
    }

    /// Tells the server that held messages are still being worked on.
    async fn progress(&mut self) {
        if !self.connected() {
            return;
        }
        let wpi: bytes::Bytes = jetstream::AckKind::Progress.into();
        let client = self.inner.conn().client;
        for subject in self.ledger.held_acks() {
            if let Err(e) = client.publish(subject.clone(), wpi.clone()).await {
                tracing::debug!(topic = %self.topic, error = %e, "progress ack failed");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_passes_in_order_and_acks_the_committed_prefix() {
        let mut l: Ledger<u32> = Ledger::new(1, 0);
        for s in 1..=3 {
            assert_eq!(l.on_delivery(s, s, s as u32), (Verdict::Pass, false));
        }
        l.commit(3);
        assert_eq!(l.to_ack.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(l.held.keys().copied().collect::<Vec<_>>(), vec![3]);
        assert_eq!(l.restart_point(), 3);
        // A redelivery of a committed message is acknowledged again, not passed.
        assert_eq!(l.on_delivery(1, 4, 10), (Verdict::Reack, false));
        assert_eq!(l.to_ack[&1], 10);
        // A redelivery of a held one refreshes its handle and is passed on.
        assert_eq!(l.on_delivery(3, 5, 11), (Verdict::Redelivery, false));
        assert_eq!(l.held_acks().copied().collect::<Vec<_>>(), vec![11]);
        l.commit(4);
        assert_eq!(l.restart_point(), 4);
    }

    #[test]
    fn ledger_skips_deleted_sequences_but_not_lost_deliveries() {
        let mut l: Ledger<u32> = Ledger::new(1, 0);
        assert_eq!(l.on_delivery(1, 1, 0).0, Verdict::Pass);
        // Sequence 2 was deleted from the stream: no delivery lost.
        assert_eq!(l.on_delivery(3, 2, 0), (Verdict::Pass, false));
        // Delivery 3 (sequence 4) was lost on the wire: 5 must not pass.
        assert_eq!(l.on_delivery(5, 4, 0), (Verdict::Gap, true));
        assert_eq!(l.restart_point(), 1);
        l.commit(4);
        assert_eq!(l.restart_point(), 4);
        l.new_generation();
        assert!(l.to_ack.is_empty());
        assert_eq!(l.on_delivery(4, 1, 0), (Verdict::Pass, false));
        assert_eq!(l.on_delivery(5, 2, 0), (Verdict::Pass, false));
    }

    #[test]
    fn ledger_after_a_lost_delivery_still_takes_the_next_in_order() {
        let mut l: Ledger<u32> = Ledger::new(1, 0);
        assert_eq!(l.on_delivery(1, 1, 0).0, Verdict::Pass);
        // The lost delivery 2 was a redelivery: sequence 2 comes in order.
        assert_eq!(l.on_delivery(2, 3, 0), (Verdict::Pass, true));
        // But from now on a jump is suspicious (the loss may hide a sequence).
        assert_eq!(l.on_delivery(4, 4, 0), (Verdict::Gap, false));
    }

    #[test]
    fn ledger_new_generation_voids_old_handles() {
        let mut l: Ledger<u32> = Ledger::new(10, 10);
        assert_eq!(l.on_delivery(10, 1, 1).0, Verdict::Pass);
        assert_eq!(l.on_delivery(11, 2, 2).0, Verdict::Pass);
        l.new_generation();
        assert_eq!(l.held_acks().count(), 0, "no progress acks to a deleted generation");
        l.commit(11);
        assert!(l.to_ack.is_empty(), "stale handles are not acked");
        // The new generation redelivers 10: below the commit point, re-acked.
        assert_eq!(l.on_delivery(10, 1, 3), (Verdict::Reack, false));
        assert_eq!(l.on_delivery(11, 2, 4), (Verdict::Redelivery, false));
        assert_eq!(l.held_acks().copied().collect::<Vec<_>>(), vec![4]);
        // Something below the resume point that was never passed on.
        let mut l: Ledger<u32> = Ledger::new(1, 0);
        assert_eq!(l.on_delivery(3, 1, 0).0, Verdict::Pass);
        assert_eq!(l.on_delivery(2, 2, 0).0, Verdict::Stray);
    }

    proptest::proptest! {
        /// Against a model server that loses deliveries on the wire and
        /// redelivers later (behind newer messages), with deleted sequences
        /// and random commits: the ledger passes each existing sequence
        /// exactly once as new, in ascending order, never skipping one.
        #[test]
        fn ledger_passes_every_sequence_once_in_order(
            n in 1u64..60,
            deleted in proptest::collection::btree_set(1u64..60, 0..10),
            steps in proptest::collection::vec((0u8..100, 0u8..100), 1..400),
        ) {
            let exists = |s: &u64| !deleted.contains(s);
            let mut l: Ledger<u64> = Ledger::new(1, 0);
            // The server: first deliveries in order, then lost ones later.
            let mut fresh: std::collections::VecDeque<u64> = (1..=n).filter(exists).collect();
            let mut redeliver: Vec<u64> = Vec::new();
            let mut dseq = 0;
            let mut passed = Vec::new();
            let mut steps = steps.into_iter().chain(std::iter::repeat((99, 99)));
            let mut guard = 0;
            while !fresh.is_empty() || !redeliver.is_empty() {
                guard += 1;
                proptest::prop_assert!(guard < 100_000);
                let (pick, fate) = steps.next().unwrap();
                let seq = if !redeliver.is_empty() && (fresh.is_empty() || pick < 30) {
                    redeliver.remove(usize::from(pick) % redeliver.len())
                } else {
                    fresh.pop_front().unwrap()
                };
                dseq += 1;
                if fate < 15 && guard < 2_000 {
                    redeliver.push(seq); // lost on the wire
                    continue;
                }
                match l.on_delivery(seq, dseq, dseq).0 {
                    Verdict::Pass => passed.push(seq),
                    Verdict::Redelivery | Verdict::Reack => {}
                    Verdict::Stray => proptest::prop_assert!(false, "stray {}", seq),
                    Verdict::Gap => {
                        // Re-anchor: a new generation from the restart point.
                        let start = l.restart_point();
                        l.new_generation();
                        fresh = (start..=n).filter(exists).collect();
                        redeliver.clear();
                        dseq = 0;
                    }
                }
                if fate > 90 {
                    // The consumer completed everything passed so far.
                    l.commit(l.next_expected);
                }
            }
            let expected: Vec<u64> = (1..=n).filter(exists).collect();
            proptest::prop_assert_eq!(passed, expected);
        }
    }

    #[test]
    fn reconnects_back_off_per_attempt_and_per_short_connection_with_a_cap() {
        let max = Duration::from_secs(2);
        assert_eq!(reconnect_delay(1, 0, max), Duration::from_millis(10));
        assert_eq!(reconnect_delay(3, 0, max), Duration::from_millis(40));
        // A connection that dropped right after it was made: each one in a
        // row doubles the first attempt's pause.
        assert_eq!(reconnect_delay(1, 1, max), Duration::from_millis(20));
        assert_eq!(reconnect_delay(1, 5, max), Duration::from_millis(320));
        assert_eq!(reconnect_delay(1, 1000, max), max);
        assert_eq!(reconnect_delay(usize::MAX, u32::MAX, max), max);
        // Flapping forever: at most one reconnect per `max` after the ramp.
        let ramp: Duration = (0..20).map(|f| reconnect_delay(1, f, max)).sum();
        assert!(ramp >= Duration::from_secs(20), "{ramp:?}");
    }

    #[test]
    fn dead_letters_carry_a_message_id_from_their_origin() {
        let cfg = NatsConfig::default();
        let env = Envelope::new("order-1", "Created", 3, &serde_json::json!({"a": 1})).unwrap();
        let origin = |offset: &str| Outbound {
            topic: "orders.dlq".into(),
            key: None,
            headers: vec![
                (DLQ_ERROR.into(), format!("attempt {offset}").into_bytes()),
                (DLQ_ORIGIN_TOPIC.into(), b"orders".to_vec()),
                (DLQ_ORIGIN_PARTITION.into(), b"0".to_vec()),
                (DLQ_ORIGIN_OFFSET.into(), offset.as_bytes().to_vec()),
            ],
            payload: env.encode().unwrap(),
        };
        let id = |m: &Outbound| outbound_headers(&cfg, m).unwrap().get(HEADER_MSG_ID).unwrap().as_str().to_string();
        assert_eq!(id(&origin("7")), "dlq:orders:0:7");
        assert_ne!(id(&origin("7")), id(&origin("8")));
        let off = NatsConfig { dedup: Dedup::Off, ..NatsConfig::default() };
        assert!(outbound_headers(&off, &origin("7")).unwrap().get(HEADER_MSG_ID).is_none());
    }

    #[test]
    fn dead_letter_names_nats_cannot_hold_are_config_errors() {
        let cfg = NatsConfig::default();
        assert!(validate_dead_letter_name(&cfg, "orders", "orders.dlq").is_ok());
        assert!(validate_dead_letter_name(&cfg, "orders", "orders-dlq").is_ok());
        for bad in ["orders dlq", "orders.*", "orders.>", "orders..dlq", "orders", ""] {
            let err = validate_dead_letter_name(&cfg, "orders", bad).unwrap_err();
            assert!(
                matches!(err, BrokerError::Config { ref key, .. } if key == "consumer.dead_letter_suffix"),
                "{bad:?}"
            );
        }
        let long = format!("{}.dlq", "o".repeat(MAX_STREAM_NAME));
        assert!(validate_dead_letter_name(&cfg, "orders", &long).is_err());
        // `orders.dlq` and `orders_dlq` share a stream name.
        let cfg2 = NatsConfig::default();
        assert!(validate_dead_letter_name(&cfg2, "orders_dlq", "orders.dlq").is_err());
        let wild = NatsConfig { wildcard_subjects: true, ..NatsConfig::default() };
        assert!(validate_dead_letter_name(&wild, "orders", "orders.dlq").is_err());
        assert!(validate_dead_letter_name(&wild, "orders", "orders-dlq").is_ok());
    }

    #[test]
    fn names_are_sanitized() {
        let cfg = NatsConfig::default();
        assert_eq!(cfg.stream_name("orders.dlq"), "orders_dlq");
        assert_eq!(NatsBroker::durable_base("billing svc", "orders"), "billing_svc_orders");
        assert_eq!(generation_name("g_t", 3), "g_t_g3");
    }

    #[test]
    fn subject_patterns() {
        assert!(subject_matches("orders", "orders"));
        assert!(subject_matches("orders.>", "orders.eu"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("*.eu", "orders.eu"));
        assert!(!subject_matches("orders", "orders.eu"));
        assert!(!subject_matches("orders.*", "orders.eu.x"));
    }

    #[test]
    fn topics_must_be_literal_subjects() {
        assert!(validate_topic("orders").is_ok());
        assert!(validate_topic("orders.eu").is_ok());
        for bad in ["", ".a", "a.", "a..b", "a.*", "a.>", "a b"] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        let cfg = NatsConfig { progress_interval: Duration::from_secs(40), ..NatsConfig::default() };
        assert!(matches!(cfg.validate(), Err(BrokerError::Config { key, .. }) if key == "nats.progress_interval"));
        let cfg = NatsConfig { max_ack_pending: 0, ..NatsConfig::default() };
        assert!(matches!(cfg.validate(), Err(BrokerError::Config { key, .. }) if key == "nats.max_ack_pending"));
        let cfg = NatsConfig {
            streams: BTreeMap::from([("a".into(), "S".into()), ("b".into(), "S".into())]),
            ..NatsConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(BrokerError::Config { key, .. }) if key == "nats.streams.b"));
        assert!(NatsConfig::default().validate().is_ok());
    }

    #[test]
    fn config_deserializes_with_defaults() {
        let cfg: NatsConfig = toml::from_str("url = \"nats://h:4222\"\nack_wait = 2000\nstorage = \"memory\"").unwrap();
        assert_eq!(cfg.url, "nats://h:4222");
        assert_eq!(cfg.ack_wait, Duration::from_secs(2));
        assert_eq!(cfg.storage, Storage::Memory);
        assert_eq!(cfg.max_ack_pending, 1000);
        assert!(toml::from_str::<NatsConfig>("nope = 1").is_err());
    }

    #[test]
    fn envelope_publishes_carry_a_stable_message_id() {
        let env = Envelope::new("order-1", "Created", 3, &serde_json::json!({"a": 1})).unwrap();
        let msg = Outbound {
            topic: "orders".into(),
            key: Some(b"order-1".to_vec()),
            headers: env.to_headers(),
            payload: env.encode().unwrap(),
        };
        let cfg = NatsConfig::default();
        let a = outbound_headers(&cfg, &msg).unwrap();
        let b = outbound_headers(&cfg, &msg).unwrap();
        let id = a.get(HEADER_MSG_ID).unwrap().as_str().to_string();
        assert!(id.starts_with("order-1:Created:3:"), "{id}");
        assert_eq!(b.get(HEADER_MSG_ID).unwrap().as_str(), id);
        assert_eq!(a.get(HEADER_KEY).unwrap().as_str(), "order-1");
        let raw = Outbound { topic: "t".into(), key: Some(vec![0, 255]), headers: vec![], payload: b"x".to_vec() };
        let h = outbound_headers(&cfg, &raw).unwrap();
        assert!(h.get(HEADER_MSG_ID).is_none());
        assert_eq!(h.get(HEADER_KEY_HEX).unwrap().as_str(), "00ff");
        assert_eq!(unhex("00ff"), Some(vec![0, 255]));
        let cfg = NatsConfig { dedup: Dedup::EnvelopeOrPayload, ..NatsConfig::default() };
        assert!(outbound_headers(&cfg, &raw).unwrap().get(HEADER_MSG_ID).is_some());
    }
}
