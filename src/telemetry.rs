//! Names of the metrics the bus records through the `metrics` façade, in one
//! place so code, dashboards and `docs/operations.md` agree (defined below
//! the broker adapters, which record some of them too, and re-exported here).
//! Users install the exporter they want (Prometheus behind the `prometheus`
//! feature); with none installed, recording costs a few atomic loads.
//!
//! Labels: `topic` on per-topic metrics, `topic` + `partition` on
//! per-partition ones.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};
use tracing::field::Empty;
use tracing::Instrument;

use crate::broker::{Broker, BrokerError, Outbound, Position, TopicPartition};
use crate::envelope::Envelope;

pub use crate::metric_names::*;

/// Registers a description and unit for every metric with the installed
/// recorder (exporters show them as `# HELP`). Call it after installing one;
/// `install_prometheus` (feature `prometheus`) does.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PUBLISHED, Unit::Count, "Messages the broker acknowledged");
    describe_counter!(PUBLISH_FAILED, Unit::Count, "Publishes that failed, by error kind");
    describe_counter!(HANDLED, Unit::Count, "Events a handler finished successfully");
    describe_counter!(FAILED, Unit::Count, "Handler attempts that failed");
    describe_counter!(RETRIED, Unit::Count, "Handler attempts repeated after a failure");
    describe_counter!(DEAD_LETTERED, Unit::Count, "Events sent to the dead-letter topic, by reason");
    describe_gauge!(DEAD_LETTER_STUCK, Unit::Count, "Events whose dead letter the broker does not take yet");
    describe_counter!(DEAD_LETTER_FAILED, Unit::Count, "Dead-letter writes that failed, by error kind");
    describe_counter!(SESSION_ERRORS, Unit::Count, "Errors of the consumer group session, by error kind");
    describe_counter!(SESSION_REBUILDS, Unit::Count, "Consumer group sessions rebuilt after a fatal error");
    describe_counter!(DUPLICATES, Unit::Count, "Broker redeliveries of offsets already dispatched");
    describe_histogram!(HANDLE_SECONDS, Unit::Seconds, "Handler latency per event, retries included");
    describe_gauge!(POOL_QUEUED, Unit::Count, "Tasks waiting in the global pool");
    describe_gauge!(POOL_IN_FLIGHT, Unit::Count, "Tasks running in the global pool");
    describe_gauge!(POOL_CAPACITY, Unit::Count, "Queue capacity of the global pool");
    describe_gauge!(COMMIT_LAG, Unit::Count, "Events handled but not yet committed, per partition");
    describe_gauge!(CONSUMER_LAG, Unit::Count, "Broker end offset minus the group's committed offset");
    describe_counter!(COMMIT_ERRORS, Unit::Count, "Commits that failed");
    describe_counter!(REBALANCES, Unit::Count, "Assignment changes (assigned, revoked or lost)");
    describe_counter!(RECONNECTS, Unit::Count, "Broker connection re-established after a loss");
    describe_gauge!(CONNECTED, "1 while the broker is reachable, 0 while not");
    describe_gauge!(BACKLOG, "1 while a backlog alert is active");
    describe_gauge!(HEALTHY, "1 while health messages arrive within the window");
}

/// Bucket bounds (seconds) of [`HANDLE_SECONDS`] in the Prometheus exporter.
pub const HANDLE_SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Installs the Prometheus exporter as the global recorder, serving
/// `GET /metrics` on `addr`, with [`HANDLE_SECONDS`] as a bucketed histogram,
/// and registers the descriptions. Inside a tokio runtime the listener runs
/// on it; outside, on a thread of its own.
#[cfg(feature = "prometheus")]
pub fn install_prometheus(addr: std::net::SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(HANDLE_SECONDS.to_string()), HANDLE_SECONDS_BUCKETS)?
        .install()?;
    describe();
    Ok(())
}

/// The `error` label of [`PUBLISH_FAILED`].
pub fn broker_error_kind(e: &BrokerError) -> &'static str {
    e.kind()
}

/// Counts a publish that failed before reaching the broker (e.g. an
/// envelope that does not encode).
pub(crate) fn publish_failed(topic: &str, kind: &'static str) {
    metrics::counter!(PUBLISH_FAILED, "topic" => topic.to_string(), "error" => kind).increment(1);
}

/// Publishes `msg` inside a `publish` span (topic, partition, offset, and the
/// envelope's aggregate ID, event type, trace and correlation IDs) and counts
/// the result.
pub(crate) async fn publish<B: Broker>(
    broker: &B,
    msg: Outbound,
    envelope: Option<&Envelope>,
) -> Result<Position, BrokerError> {
    let span = tracing::info_span!(
        "publish",
        topic = %msg.topic,
        partition = Empty,
        offset = Empty,
        aggregate_id = Empty,
        event_type = Empty,
        trace_id = Empty,
        correlation_id = Empty,
    );
    if let Some(e) = envelope.filter(|_| !span.is_disabled()) {
        span.record("aggregate_id", e.aggregate_id.as_str());
        span.record("event_type", e.event_type.as_str());
        span.record("trace_id", e.trace_id.as_deref().filter(|s| !s.is_empty()));
        span.record("correlation_id", e.correlation_id.as_deref().filter(|s| !s.is_empty()));
    }
    // The label needs an owned topic; the message moves into the broker.
    let topic = msg.topic.clone();
    let result = broker.publish(msg).instrument(span.clone()).await;
    match &result {
        Ok(position) => {
            span.record("partition", position.partition);
            span.record("offset", position.offset);
            metrics::counter!(PUBLISHED, "topic" => topic).increment(1);
        }
        Err(e) => publish_failed(&topic, broker_error_kind(e)),
    }
    result
}

/// The consumer's metric handles of one topic, registered once (when a
/// partition of it is assigned) so that recording an event is an atomic
/// update, not a label lookup.
#[derive(Debug)]
pub(crate) struct TopicMetrics {
    pub handled: Counter,
    pub failed: Counter,
    pub retried: Counter,
    pub dead_lettered_handler: Counter,
    pub dead_lettered_decode: Counter,
    pub duplicates: Counter,
    pub handle_seconds: Histogram,
    pub dead_letter_stuck: Gauge,
    topic: String,
}

impl TopicMetrics {
    pub fn new(topic: &str) -> TopicMetrics {
        let t = || ("topic", topic.to_string());
        let dead =
            |reason: &'static str| metrics::counter!(DEAD_LETTERED, "topic" => topic.to_string(), "reason" => reason);
        TopicMetrics {
            handled: metrics::counter!(HANDLED, &[t()]),
            failed: metrics::counter!(FAILED, &[t()]),
            retried: metrics::counter!(RETRIED, &[t()]),
            dead_lettered_handler: dead("handler"),
            dead_lettered_decode: dead("decode"),
            duplicates: metrics::counter!(DUPLICATES, &[t()]),
            handle_seconds: metrics::histogram!(HANDLE_SECONDS, &[t()]),
            dead_letter_stuck: metrics::gauge!(DEAD_LETTER_STUCK, &[t()]),
            topic: topic.to_string(),
        }
    }

    pub fn dead_lettered(&self, reason: &'static str) -> Counter {
        match reason {
            "decode" => self.dead_lettered_decode.clone(),
            "handler" => self.dead_lettered_handler.clone(),
            // An adapter's reason (`undecodable-headers`, `too-large`): rare,
            // looked up when it happens.
            other => metrics::counter!(DEAD_LETTERED, "topic" => self.topic.clone(), "reason" => other),
        }
    }

    /// [`DEAD_LETTER_FAILED`] for one error kind (looked up on the failure
    /// path only).
    pub fn dead_letter_failed(&self, kind: &'static str) -> Counter {
        metrics::counter!(DEAD_LETTER_FAILED, "topic" => self.topic.clone(), "error" => kind)
    }

    pub fn observe_handling(&self, took: Duration) {
        self.handle_seconds.record(took.as_secs_f64());
    }
}

/// The [`COMMIT_LAG`] gauge of one partition.
pub(crate) fn commit_lag(tp: &TopicPartition) -> Gauge {
    metrics::gauge!(COMMIT_LAG, "topic" => tp.topic.to_string(), "partition" => tp.partition.to_string())
}

/// The consumer's unlabelled counters.
#[derive(Debug)]
pub(crate) struct ConsumerMetrics {
    pub commit_errors: Counter,
    pub rebalances: Counter,
    pub session_rebuilds: Counter,
}

impl ConsumerMetrics {
    pub fn new() -> ConsumerMetrics {
        ConsumerMetrics {
            commit_errors: metrics::counter!(COMMIT_ERRORS),
            rebalances: metrics::counter!(REBALANCES),
            session_rebuilds: metrics::counter!(SESSION_REBUILDS),
        }
    }

    /// [`SESSION_ERRORS`] for one error kind.
    pub fn session_error(&self, kind: &'static str) -> Counter {
        metrics::counter!(SESSION_ERRORS, "error" => kind)
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// Each dead-letter reason is counted under its own label: the
    /// consumer's (`handler`, `decode`) and the adapters'
    /// (`undecodable-headers`, `too-large`).
    #[test]
    fn dead_letters_are_counted_by_their_reason() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let m = TopicMetrics::new("orders");
            for reason in
                ["handler", "decode", crate::broker::REASON_UNDECODABLE_HEADERS, crate::broker::REASON_TOO_LARGE]
            {
                m.dead_lettered(reason).increment(1);
            }
            m.dead_lettered(crate::broker::REASON_TOO_LARGE).increment(1);
        });
        let mut counts: Vec<(String, u64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, _, _, _)| k.key().name() == DEAD_LETTERED)
            .map(|(k, _, _, v)| {
                let reason = k.key().labels().find(|l| l.key() == "reason").unwrap().value().to_string();
                let DebugValue::Counter(n) = v else { panic!("a counter") };
                (reason, n)
            })
            .collect();
        counts.sort();
        let expected = [("decode", 1), ("handler", 1), ("too-large", 2), ("undecodable-headers", 1)];
        assert_eq!(counts, expected.map(|(r, n)| (r.to_string(), n)));
    }
}
