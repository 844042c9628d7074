//! What a handler knows about the event it handles: where it came from
//! (topic, partition, offset), its key and headers, which attempt this is,
//! and its trace and correlation IDs — one [`DeliveryContext`], given to
//! ordered, typed and raw handlers alike (`docs/handlers.md`).

use std::sync::Arc;
use std::time::SystemTime;

use crate::broker::{Delivery, TopicPartition};
use crate::envelope::{aggregate_id_from, Envelope, HEADER_CORRELATION_ID, HEADER_EVENT_TYPE, HEADER_TRACE_ID};

/// Where an event came from and which attempt at handling it this is.
///
/// The consumer builds one per delivery, before the handler's first
/// attempt, and gives each attempt a copy with its [`attempt`] number; the
/// copies share the delivery (cloning is cheap). Fields:
///
/// - [`topic`], [`partition`], [`offset`]: the broker's position of the
///   message (Kafka offset; for JetStream, partition 0 and the stream
///   sequence), the same numbers `publish` returned in its
///   [`Position`](crate::Position);
/// - [`key`]: the message key as published (`publish_envelope` keys by the
///   aggregate ID); [`aggregate_id`]: the aggregate the consumer orders by;
/// - [`headers`]: every header, in order, as delivered;
/// - [`attempt`]: this consumer's handler attempt, 1-based, +1 per in-place
///   retry, at most [`max_attempts`]; [`delivery_attempt`]: the broker's
///   redelivery count;
/// - [`trace_id`], [`correlation_id`], [`event_type`]: from the envelope, or
///   from the `X-Trace-ID` / `X-Correlation-ID` / `X-Event-Type` headers.
///
/// [`topic`]: DeliveryContext::topic
/// [`partition`]: DeliveryContext::partition
/// [`offset`]: DeliveryContext::offset
/// [`key`]: DeliveryContext::key
/// [`aggregate_id`]: DeliveryContext::aggregate_id
/// [`headers`]: DeliveryContext::headers
/// [`attempt`]: DeliveryContext::attempt
/// [`max_attempts`]: DeliveryContext::max_attempts
/// [`delivery_attempt`]: DeliveryContext::delivery_attempt
/// [`trace_id`]: DeliveryContext::trace_id
/// [`correlation_id`]: DeliveryContext::correlation_id
/// [`event_type`]: DeliveryContext::event_type
#[derive(Debug, Clone)]
pub struct DeliveryContext {
    shared: Arc<Shared>,
    attempt: u32,
}

#[derive(Debug)]
struct Shared {
    delivery: Delivery,
    aggregate_id: Option<Arc<str>>,
    /// The decoded envelope, on ordered topics.
    envelope: Option<Envelope>,
    max_attempts: u32,
}

impl DeliveryContext {
    /// The context of `delivery` as a raw handler sees it on its first
    /// attempt of `max_attempts` (`consumer.retry.max_attempts`): the
    /// aggregate ID and the trace IDs come from the headers and the key. For
    /// testing handlers (with [`with_attempt`](Self::with_attempt) for a
    /// retry); the consumer builds its own.
    pub fn from_delivery(delivery: Delivery, max_attempts: u32) -> Self {
        let id = aggregate_id_from(None, &delivery.headers, delivery.key.as_deref(), None);
        Self::new(delivery, None, id.map(|id| id.id.into()), max_attempts)
    }

    /// The consumer's context: `envelope` is the decoded envelope of an
    /// ordered topic, `aggregate_id` the key it orders by (or, on a raw
    /// topic, the aggregate the headers or key name).
    pub(crate) fn new(
        delivery: Delivery,
        envelope: Option<Envelope>,
        aggregate_id: Option<Arc<str>>,
        max_attempts: u32,
    ) -> Self {
        let shared = Shared { delivery, aggregate_id, envelope, max_attempts: max_attempts.max(1) };
        DeliveryContext { shared: Arc::new(shared), attempt: 1 }
    }

    /// The same context at handler attempt `attempt` (1-based).
    #[must_use]
    pub fn with_attempt(&self, attempt: u32) -> Self {
        DeliveryContext { shared: self.shared.clone(), attempt: attempt.max(1) }
    }

    /// The delivery this context describes (payload included).
    pub(crate) fn delivery(&self) -> &Delivery {
        &self.shared.delivery
    }

    /// The decoded envelope, on ordered topics.
    pub(crate) fn envelope(&self) -> Option<&Envelope> {
        self.shared.envelope.as_ref()
    }

    /// The topic the message was read from (for JetStream, the stream).
    pub fn topic(&self) -> &str {
        &self.shared.delivery.topic
    }

    /// The partition the message was read from; always 0 on JetStream (a
    /// stream is one partition).
    pub fn partition(&self) -> u32 {
        self.shared.delivery.partition
    }

    /// The message's position in its partition: the Kafka offset or the
    /// JetStream stream sequence, as `publish` returned it.
    pub fn offset(&self) -> u64 {
        self.shared.delivery.offset
    }

    /// Topic and partition together.
    pub fn topic_partition(&self) -> TopicPartition {
        self.shared.delivery.topic_partition()
    }

    /// The message key as published, if it had one (`publish_envelope` keys
    /// by the aggregate ID).
    pub fn key(&self) -> Option<&[u8]> {
        self.shared.delivery.key.as_deref()
    }

    /// The aggregate the event belongs to: on ordered topics the key the
    /// consumer orders by (the envelope's `aggregate_id`); on raw topics the
    /// `X-Aggregate-ID` header or the key, when one is a valid aggregate ID
    /// (raw handlers are not ordered by it).
    pub fn aggregate_id(&self) -> Option<&str> {
        self.shared.aggregate_id.as_deref()
    }

    /// Every header of the message, in order, names as delivered (the
    /// envelope's metadata headers included).
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.shared.delivery.headers
    }

    /// The value of the first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.shared.delivery.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    /// A header's value as non-empty UTF-8 text.
    fn header_text(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok()).filter(|s| !s.is_empty())
    }

    /// When the broker stored the message, if it says.
    pub fn timestamp(&self) -> Option<SystemTime> {
        self.shared.delivery.timestamp
    }

    /// This handler attempt in this consumer, 1-based: 1 on the first call
    /// for the delivery, +1 on each in-place retry after a failure or panic,
    /// at most [`max_attempts`](Self::max_attempts). It starts again at 1
    /// when the broker redelivers the message (after a rebalance or a
    /// restart); [`delivery_attempt`](Self::delivery_attempt) tells those apart.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// `consumer.retry.max_attempts`: after a failure of this attempt, the
    /// event is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.shared.max_attempts
    }

    /// Whether this is the last attempt before the dead letter.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.shared.max_attempts
    }

    /// The broker's delivery count of the message ([`Delivery::attempt`]):
    /// 1 on its first delivery, higher when the broker knows it redelivers
    /// (JetStream's delivery count; 2 for an offset a Kafka or memory
    /// session hands out again).
    pub fn delivery_attempt(&self) -> u32 {
        self.shared.delivery.attempt
    }

    /// The event type: the envelope's, or the `X-Event-Type` header.
    pub fn event_type(&self) -> Option<&str> {
        match &self.shared.envelope {
            Some(e) => Some(e.event_type.as_str()),
            None => self.header_text(HEADER_EVENT_TYPE),
        }
    }

    /// The trace ID: the envelope's `trace_id`, or else the `X-Trace-ID`
    /// header; `None` when neither is set (an empty one counts as unset).
    pub fn trace_id(&self) -> Option<&str> {
        let envelope = self.shared.envelope.as_ref().and_then(|e| e.trace_id.as_deref()).filter(|s| !s.is_empty());
        envelope.or_else(|| self.header_text(HEADER_TRACE_ID))
    }

    /// The correlation ID: the envelope's `correlation_id`, or else the
    /// `X-Correlation-ID` header; `None` when neither is set.
    pub fn correlation_id(&self) -> Option<&str> {
        let envelope =
            self.shared.envelope.as_ref().and_then(|e| e.correlation_id.as_deref()).filter(|s| !s.is_empty());
        envelope.or_else(|| self.header_text(HEADER_CORRELATION_ID))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(headers: Vec<(&str, &[u8])>, key: Option<&[u8]>) -> Delivery {
        Delivery {
            topic: "orders".into(),
            partition: 2,
            offset: 7,
            key: key.map(<[u8]>::to_vec),
            headers: headers.into_iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect(),
            payload: b"{}".to_vec(),
            timestamp: None,
            attempt: 3,
        }
    }

    #[test]
    fn raw_context_reads_ids_from_headers_and_key() {
        let d = delivery(
            vec![("x-trace-id", b"t-1"), ("X-Correlation-ID", b""), ("X-Event-Type", b"Paid")],
            Some(b"agg-1"),
        );
        let c = DeliveryContext::from_delivery(d, 3);
        assert_eq!((c.topic(), c.partition(), c.offset(), c.delivery_attempt()), ("orders", 2, 7, 3));
        assert_eq!(c.trace_id(), Some("t-1"), "header names are case-insensitive");
        assert_eq!(c.correlation_id(), None, "an empty header counts as unset");
        assert_eq!(c.event_type(), Some("Paid"));
        assert_eq!(c.aggregate_id(), Some("agg-1"), "from the key");
        assert_eq!((c.attempt(), c.max_attempts(), c.is_last_attempt()), (1, 3, false));
        assert!(c.with_attempt(3).is_last_attempt());
    }

    #[test]
    fn envelope_ids_win_over_headers_and_attempts_share_the_delivery() {
        let d = delivery(vec![("X-Trace-ID", b"from-header"), ("X-Correlation-ID", b"c-header")], None);
        let e = Envelope::new("agg-2", "Created", 1, &1).unwrap().with_trace_id("from-envelope");
        let c = DeliveryContext::new(d, Some(e), Some("agg-2".into()), 3);
        assert_eq!(c.trace_id(), Some("from-envelope"));
        assert_eq!(c.correlation_id(), Some("c-header"), "the envelope has none: the header's");
        assert_eq!(c.event_type(), Some("Created"));
        let third = c.with_attempt(3);
        assert_eq!((c.attempt(), third.attempt(), third.is_last_attempt()), (1, 3, true));
        assert!(Arc::ptr_eq(&c.shared, &third.shared));
    }
}
