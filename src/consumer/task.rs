//! What one delivery does on a pool worker: decode, run the handler with
//! in-place retries, and dead-letter it when it cannot be handled.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use tracing::field::Empty;
use tracing::Instrument;

use super::{ConsumerConfig, ConsumerStats, Handler};
use crate::broker::{Broker, Delivery, Outbound};
use crate::envelope::{aggregate_id_from, Envelope, HEADER_CORRELATION_ID, HEADER_EVENT_TYPE, HEADER_TRACE_ID};
use crate::pool::{panic_message, HandlerError, HandlerPanicked, HandlerResult, Key, Outcome, Task};
use crate::telemetry::TopicMetrics;

/// Dead-letter headers: why, after how many attempts, and where it came from.
pub const DLQ_ERROR: &str = "x-dlq-error";
pub const DLQ_REASON: &str = "x-dlq-reason";
pub const DLQ_ATTEMPTS: &str = "x-dlq-attempts";
pub const DLQ_ORIGIN_TOPIC: &str = "x-dlq-origin-topic";
pub const DLQ_ORIGIN_PARTITION: &str = "x-dlq-origin-partition";
pub const DLQ_ORIGIN_OFFSET: &str = "x-dlq-origin-offset";
/// Set when the broker refused the dead letter with its payload; the value
/// is the broker's error. The payload stays at the origin position.
pub const DLQ_PAYLOAD_OMITTED: &str = "x-dlq-payload-omitted";

/// The task stopped because its partition was revoked; it did not complete.
#[derive(Debug, thiserror::Error)]
#[error("partition revoked before the event completed")]
pub struct Fenced;

/// The broker refused the dead letter for good, even without its payload:
/// the event is left uncommitted and is redelivered.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter topic refused the event: {0}")]
pub struct DeadLetterRefused(pub crate::broker::BrokerError);

pub(super) struct TaskContext<B> {
    pub broker: Arc<B>,
    pub config: Arc<ConsumerConfig>,
    pub stats: Arc<ConsumerStats>,
    pub fence: Arc<AtomicBool>,
    pub metrics: Arc<TopicMetrics>,
}

impl<B> TaskContext<B> {
    fn fenced(&self) -> bool {
        self.fence.load(Ordering::Acquire)
    }
}

/// Builds the pool task for `delivery`: its key is the aggregate ID
/// (envelope > header > key) for envelope topics, none for raw topics.
pub(super) fn build<B: Broker>(
    ctx: TaskContext<B>,
    handler: Handler,
    delivery: Delivery,
    reply: impl FnOnce(Outcome) + Send + 'static,
) -> Task {
    match handler {
        Handler::Raw(h) => {
            let span = handle_span(&delivery, None, None);
            let work = async move {
                let run = {
                    let delivery = delivery.clone();
                    move || h(delivery.clone())
                };
                handle_with_retries(&ctx, &delivery, run).await
            };
            Task::new(None, work.instrument(span), reply)
        }
        Handler::Envelope(h, encoding) => {
            let decoded = Envelope::decode_with(&delivery.payload, encoding);
            let key = aggregate_id_from(decoded.as_ref().ok(), &delivery.headers, delivery.key.as_deref(), None)
                .map(|id| Key::from(id.id));
            let span = handle_span(&delivery, decoded.as_ref().ok(), key.as_deref());
            let work = async move {
                match decoded {
                    Ok(envelope) => handle_with_retries(&ctx, &delivery, move || h(envelope.clone())).await,
                    Err(e) => {
                        if ctx.fenced() {
                            return Err(Box::new(Fenced) as HandlerError);
                        }
                        dead_letter(&ctx, &delivery, "decode", &e.to_string(), 0).await
                    }
                }
            };
            Task::new(key, work.instrument(span), reply)
        }
    }
}

/// The `handle` span of one event: where it came from and what it is, with
/// the trace and correlation IDs of its envelope (or headers), so every log
/// line of the handler and the consumer carries them. `attempt` is the
/// number of handler attempts made, recorded once they end; each attempt
/// runs in a child `attempt` span of its own (recording the field on every
/// retry would repeat it in formatted logs).
fn handle_span(delivery: &Delivery, envelope: Option<&Envelope>, key: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "handle",
        topic = &*delivery.topic,
        partition = delivery.partition,
        offset = delivery.offset,
        delivery_attempt = delivery.attempt,
        attempt = Empty,
        aggregate_id = Empty,
        event_type = Empty,
        trace_id = Empty,
        correlation_id = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    match key {
        Some(id) => span.record("aggregate_id", id),
        // Raw topics are not keyed; name the aggregate if headers or key do.
        None => {
            let id = aggregate_id_from(None, &delivery.headers, delivery.key.as_deref(), None);
            span.record("aggregate_id", id.as_ref().map(|id| id.id.as_str()))
        }
    };
    match envelope {
        Some(e) => {
            span.record("event_type", e.event_type.as_str());
            span.record("trace_id", e.trace_id.as_deref().filter(|s| !s.is_empty()));
            span.record("correlation_id", e.correlation_id.as_deref().filter(|s| !s.is_empty()));
        }
        None => {
            let header = |name: &str| {
                delivery
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
                    .filter(|s| !s.is_empty())
            };
            span.record("event_type", header(HEADER_EVENT_TYPE));
            span.record("trace_id", header(HEADER_TRACE_ID));
            span.record("correlation_id", header(HEADER_CORRELATION_ID));
        }
    }
    span
}

async fn handle_with_retries<B, F, Fut>(ctx: &TaskContext<B>, delivery: &Delivery, run: F) -> HandlerResult
where
    B: Broker,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = HandlerResult>,
{
    let retry = &ctx.config.retry;
    let attempts = retry.max_attempts.max(1);
    let mut last_error = String::new();
    let started = Instant::now();
    for attempt in 1..=attempts {
        // Revoked while queued or between attempts: the next owner redoes it.
        if ctx.fenced() {
            if attempt > 1 {
                tracing::Span::current().record("attempt", attempt - 1);
            }
            return Err(Box::new(Fenced));
        }
        let run = AssertUnwindSafe(run()).catch_unwind().instrument(tracing::info_span!("attempt", attempt));
        let result = match run.await {
            Ok(r) => r,
            Err(panic) => Err(Box::new(HandlerPanicked(panic_message(&*panic))) as HandlerError),
        };
        match result {
            Ok(()) => {
                ConsumerStats::bump(&ctx.stats.handled);
                ctx.metrics.handled.increment(1);
                ctx.metrics.observe_handling(started.elapsed());
                tracing::Span::current().record("attempt", attempt);
                return Ok(());
            }
            Err(e) => {
                ctx.metrics.failed.increment(1);
                last_error = e.to_string();
                tracing::debug!(topic = %delivery.topic, offset = delivery.offset, attempt, error = %last_error, "handler failed");
                if attempt < attempts {
                    ConsumerStats::bump(&ctx.stats.retried);
                    ctx.metrics.retried.increment(1);
                    tokio::time::sleep(retry.backoff(attempt)).await;
                }
            }
        }
    }
    ctx.metrics.observe_handling(started.elapsed());
    tracing::Span::current().record("attempt", attempts);
    dead_letter(ctx, delivery, "handler", &last_error, attempts).await
}

/// Publishes `delivery` to its dead-letter topic, retrying until the broker
/// takes it: only then does the event count as complete.
async fn dead_letter<B: Broker>(
    ctx: &TaskContext<B>,
    delivery: &Delivery,
    reason: &str,
    error: &str,
    attempts: u32,
) -> HandlerResult {
    let mut headers = delivery.headers.clone();
    headers.extend([
        (DLQ_REASON.to_string(), reason.as_bytes().to_vec()),
        (DLQ_ERROR.to_string(), error.as_bytes().to_vec()),
        (DLQ_ATTEMPTS.to_string(), attempts.to_string().into_bytes()),
        (DLQ_ORIGIN_TOPIC.to_string(), delivery.topic.as_bytes().to_vec()),
        (DLQ_ORIGIN_PARTITION.to_string(), delivery.partition.to_string().into_bytes()),
        (DLQ_ORIGIN_OFFSET.to_string(), delivery.offset.to_string().into_bytes()),
    ]);
    let msg = Outbound {
        topic: format!("{}{}", delivery.topic, ctx.config.dead_letter_suffix),
        key: delivery.key.clone(),
        headers,
        payload: delivery.payload.clone(),
    };
    let mut msg = msg;
    let mut attempt = 1;
    loop {
        match ctx.broker.publish(msg.clone()).await {
            Ok(_) => {
                ConsumerStats::bump(&ctx.stats.dead_lettered);
                ctx.metrics.dead_lettered(reason).increment(1);
                tracing::warn!(topic = %delivery.topic, offset = delivery.offset, reason, error, "event dead-lettered");
                return Ok(());
            }
            Err(e) if ctx.fenced() => {
                tracing::debug!(error = %e, "dead-letter publish abandoned: partition revoked");
                return Err(Box::new(Fenced));
            }
            // Refused for good (e.g. too large once the dead-letter headers
            // are added): the origin topic still holds the payload at the
            // position the headers name, so a dead letter without it loses
            // nothing.
            Err(e) if !e.is_retriable() && !msg.payload.is_empty() => {
                tracing::warn!(error = %e, topic = %msg.topic, "dead letter refused; retrying without the payload");
                msg.payload.clear();
                msg.headers.push((DLQ_PAYLOAD_OMITTED.to_string(), e.to_string().into_bytes()));
            }
            Err(e) if !e.is_retriable() => {
                tracing::error!(error = %e, topic = %msg.topic, "dead letter refused; event left uncommitted");
                return Err(Box::new(DeadLetterRefused(e)));
            }
            Err(e) => {
                tracing::warn!(error = %e, topic = %msg.topic, "dead-letter publish failed; retrying");
                tokio::time::sleep(ctx.config.retry.backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
}
