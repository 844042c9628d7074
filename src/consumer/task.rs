//! What one delivery does on a pool worker: decode, run the handler with
//! in-place retries, and dead-letter it when it cannot be handled.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use tracing::field::Empty;
use tracing::Instrument;

use super::{ConsumerConfig, ConsumerStats, Handler};
use crate::broker::{Broker, BrokerError, Delivery, Outbound, REASON_TOO_LARGE, REASON_UNDECODABLE_HEADERS};
use crate::broker::{
    DLQ_ATTEMPTS, DLQ_ERROR, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION, DLQ_ORIGIN_TOPIC, DLQ_PAYLOAD_OMITTED,
    DLQ_REASON, REASON_DECODE, REASON_HANDLER, REASON_PAYLOAD,
};
use crate::context::DeliveryContext;
use crate::envelope::{aggregate_id_from, Envelope, PayloadError};
use crate::pool::{panic_message, HandlerPanicked, HandlerResult, Key, Outcome, Step, Task};
use crate::telemetry::TopicMetrics;

/// The task stopped because its partition was revoked; it did not complete.
#[derive(Debug, thiserror::Error)]
#[error("partition revoked before the event completed")]
pub struct Fenced;

pub(super) struct TaskContext<B> {
    pub broker: Arc<B>,
    pub config: Arc<ConsumerConfig>,
    pub stats: Arc<ConsumerStats>,
    pub fence: Arc<AtomicBool>,
    pub metrics: Arc<TopicMetrics>,
}

impl<B> Clone for TaskContext<B> {
    fn clone(&self) -> Self {
        TaskContext {
            broker: self.broker.clone(),
            config: self.config.clone(),
            stats: self.stats.clone(),
            fence: self.fence.clone(),
            metrics: self.metrics.clone(),
        }
    }
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
    // Envelope topics are keyed by the aggregate ID (envelope > header >
    // key); raw topics are not keyed.
    let (decoded, key) = match &handler {
        Handler::Envelope(_, encoding) => {
            let decoded = Envelope::decode_with(&delivery.payload, *encoding);
            let key = aggregate_id_from(decoded.as_ref().ok(), &delivery.headers, delivery.key.as_deref(), None)
                .map(|id| Key::from(id.id));
            (Some(decoded), key)
        }
        Handler::Raw(_) => (None, None),
    };
    let (envelope, decode_error) = match decoded {
        Some(Ok(envelope)) => (Some(envelope), None),
        Some(Err(error)) => (None, Some(error)),
        None => (None, None),
    };
    let aggregate_id = match &handler {
        Handler::Envelope(..) => key.clone(),
        // Raw topics are not keyed; name the aggregate if headers or key do.
        Handler::Raw(_) => {
            aggregate_id_from(None, &delivery.headers, delivery.key.as_deref(), None).map(|id| Key::from(id.id))
        }
    };
    let context = DeliveryContext::new(delivery, envelope, aggregate_id, ctx.config.retry.max_attempts);
    let span = handle_span(&context);
    let delivery = context.delivery();
    // The adapter could not pass the record on as its producer wrote it
    // (header bytes it cannot represent, a payload over the size limit): it
    // goes to the dead letter with what the adapter kept, in its aggregate's
    // place, and the handler never sees it.
    if let Some(reason) = delivery.undeliverable() {
        let reason = [REASON_UNDECODABLE_HEADERS, REASON_TOO_LARGE].into_iter().find(|r| *r == reason);
        let detail = delivery.undeliverable_detail().unwrap_or_default();
        let letter = DeadLetter::new(ctx, delivery, reason.unwrap_or("undeliverable"), &detail, 0);
        return Task::stepped(key, letter.publish(span), reply);
    }
    let work = match handler {
        Handler::Raw(h) => {
            let run: Run = Box::new(move |c: DeliveryContext| h(c.delivery().clone(), c));
            let job = Arc::new(Attempts { ctx, context, run, started: Instant::now() });
            attempt(job, 1, span)
        }
        // The context holds the decoded envelope; each attempt gets a copy.
        Handler::Envelope(h, _) if context.envelope().is_some() => {
            let run: Run = Box::new(move |c: DeliveryContext| {
                let envelope = c.envelope().cloned().expect("checked when the task was built");
                h(envelope, c)
            });
            let job = Arc::new(Attempts { ctx, context, run, started: Instant::now() });
            attempt(job, 1, span)
        }
        Handler::Envelope(..) => {
            let error = decode_error.map(|e| e.to_string()).unwrap_or_default();
            DeadLetter::new(ctx, delivery, REASON_DECODE, &error, 0).publish(span)
        }
    };
    Task::stepped(key, work, reply)
}

/// The `handle` span of one event: where it came from and what it is, with
/// the trace and correlation IDs of its envelope (or headers), so every log
/// line of the handler and the consumer carries them. `attempt` is the
/// number of handler attempts made, recorded once they end; each attempt
/// runs in a child `attempt` span of its own (recording the field on every
/// retry would repeat it in formatted logs).
fn handle_span(context: &DeliveryContext) -> tracing::Span {
    let span = tracing::info_span!(
        "handle",
        topic = context.topic(),
        partition = context.partition(),
        offset = context.offset(),
        delivery_attempt = context.delivery_attempt(),
        attempt = Empty,
        aggregate_id = Empty,
        event_type = Empty,
        trace_id = Empty,
        correlation_id = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    span.record("aggregate_id", context.aggregate_id());
    span.record("event_type", context.event_type());
    span.record("trace_id", context.trace_id());
    span.record("correlation_id", context.correlation_id());
    span
}

/// One attempt's call of the handler, given that attempt's context.
type Run = Box<dyn Fn(DeliveryContext) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// One event's handling, shared by its attempts (each attempt is a step of
/// the pool task; the waits between them park the task, not a worker).
struct Attempts<B> {
    ctx: TaskContext<B>,
    /// The delivery and what the handler is told about it.
    context: DeliveryContext,
    run: Run,
    started: Instant,
}

/// Calls the handler once. A panic counts as a failure wherever it happens:
/// in the call that builds the future (the synchronous part) or while the
/// future runs.
async fn run_once(run: &Run, context: DeliveryContext) -> HandlerResult {
    let future = match std::panic::catch_unwind(AssertUnwindSafe(move || run(context))) {
        Ok(future) => future,
        Err(panic) => return Err(Box::new(HandlerPanicked(panic_message(&*panic)))),
    };
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => Err(Box::new(HandlerPanicked(panic_message(&*panic)))),
    }
}

fn attempt<B: Broker>(job: Arc<Attempts<B>>, attempt: u32, span: tracing::Span) -> BoxFuture<'static, Step> {
    let outer = span.clone();
    async move {
        let ctx = &job.ctx;
        let delivery = job.context.delivery();
        let attempts = ctx.config.retry.max_attempts.max(1);
        // Revoked while queued or between attempts: the next owner redoes it.
        if ctx.fenced() {
            if attempt > 1 {
                tracing::Span::current().record("attempt", attempt - 1);
            }
            return Step::Done(Err(Box::new(Fenced)));
        }
        let result = run_once(&job.run, job.context.with_attempt(attempt))
            .instrument(tracing::info_span!("attempt", attempt))
            .await;
        match result {
            Ok(()) => {
                ConsumerStats::bump(&ctx.stats.handled);
                ctx.metrics.handled.increment(1);
                ctx.metrics.observe_handling(job.started.elapsed());
                tracing::Span::current().record("attempt", attempt);
                Step::Done(Ok(()))
            }
            Err(e) => {
                ctx.metrics.failed.increment(1);
                let error = e.to_string();
                // The payload does not decode into the handler's type: no
                // retry can change that, so it is dead-lettered at once.
                let undecodable = e.is::<PayloadError>();
                tracing::debug!(topic = %delivery.topic, offset = delivery.offset, attempt, error = %error,
                    undecodable, "handler failed");
                if attempt < attempts && !undecodable {
                    ConsumerStats::bump(&ctx.stats.retried);
                    ctx.metrics.retried.increment(1);
                    // Wait without holding a worker; the key stays held.
                    let until = tokio::time::Instant::now() + ctx.config.retry.backoff(attempt);
                    return Step::Park { until, then: self::attempt(job.clone(), attempt + 1, span) };
                }
                ctx.metrics.observe_handling(job.started.elapsed());
                tracing::Span::current().record("attempt", attempt);
                let reason = if undecodable { REASON_PAYLOAD } else { REASON_HANDLER };
                let letter = DeadLetter::new(ctx.clone(), delivery, reason, &error, attempt);
                letter.publish(span).await
            }
        }
    }
    .instrument(outer)
    .boxed()
}

/// Dead-lettered events whose dead letter has not been written yet, because
/// the broker refuses or fails it; one guard per event, counted while alive.
struct Stuck {
    stats: Arc<ConsumerStats>,
    gauge: metrics::Gauge,
}

impl Stuck {
    fn new(stats: Arc<ConsumerStats>, gauge: metrics::Gauge) -> Stuck {
        stats.dead_letters_stuck.fetch_add(1, Ordering::AcqRel);
        gauge.increment(1.0);
        Stuck { stats, gauge }
    }
}

impl Drop for Stuck {
    fn drop(&mut self) {
        self.stats.dead_letters_stuck.fetch_sub(1, Ordering::AcqRel);
        self.gauge.decrement(1.0);
    }
}

/// A dead letter being written: retried with capped backoff (parked between
/// tries) until the broker takes it or the partition is revoked. Until then
/// the event holds its key and its offset, so nothing after it of its
/// aggregate runs and the commit does not pass it.
struct DeadLetter<B> {
    ctx: TaskContext<B>,
    topic: Arc<str>,
    partition: u32,
    offset: u64,
    reason: &'static str,
    error: String,
    msg: Outbound,
    tries: u32,
    stuck: Option<Stuck>,
}

impl<B: Broker> DeadLetter<B> {
    fn new(ctx: TaskContext<B>, delivery: &Delivery, reason: &'static str, error: &str, attempts: u32) -> Self {
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
        DeadLetter {
            ctx,
            topic: delivery.topic.clone(),
            partition: delivery.partition,
            offset: delivery.offset,
            reason,
            error: error.to_string(),
            msg,
            tries: 0,
            stuck: None,
        }
    }

    /// One round of tries: ends done, fenced, or parked until the next round.
    fn publish(mut self, span: tracing::Span) -> BoxFuture<'static, Step> {
        let outer = span.clone();
        async move {
            loop {
                if self.ctx.fenced() {
                    tracing::debug!(topic = %self.topic, offset = self.offset,
                        "dead letter abandoned: partition revoked");
                    return Step::Done(Err(Box::new(Fenced)));
                }
                self.tries += 1;
                let e = match self.ctx.broker.publish(self.msg.clone()).await {
                    Ok(_) => {
                        ConsumerStats::bump(&self.ctx.stats.dead_lettered);
                        self.ctx.metrics.dead_lettered(self.reason).increment(1);
                        if self.stuck.take().is_some() {
                            tracing::warn!(topic = %self.topic, partition = self.partition, offset = self.offset,
                                tries = self.tries, "stuck dead letter written; the partition goes on");
                        }
                        tracing::warn!(topic = %self.topic, offset = self.offset, reason = self.reason,
                            error = %self.error, "event dead-lettered");
                        return Step::Done(Ok(()));
                    }
                    Err(e) => e,
                };
                self.ctx.metrics.dead_letter_failed(e.kind()).increment(1);
                // Refused for good (too large once the dead-letter headers
                // are added): the origin topic still holds the payload at the
                // position the headers name, so a dead letter without it
                // loses nothing. Only this refusal drops the payload.
                if matches!(e, BrokerError::Refused(_)) && !self.msg.payload.is_empty() {
                    tracing::warn!(error = %e, topic = %self.msg.topic,
                        "dead letter refused; retrying without the payload");
                    self.msg.payload.clear();
                    self.msg.headers.push((DLQ_PAYLOAD_OMITTED.to_string(), e.to_string().into_bytes()));
                    continue;
                }
                // Anything else: the event keeps its place (key held, offset
                // outstanding) and the write is retried with capped backoff.
                if self.stuck.is_none() {
                    let gauge = self.ctx.metrics.dead_letter_stuck.clone();
                    self.stuck = Some(Stuck::new(self.ctx.stats.clone(), gauge));
                }
                let wait = self.ctx.config.retry.backoff(self.tries);
                tracing::error!(topic = %self.topic, partition = self.partition, offset = self.offset,
                    dead_letter = %self.msg.topic, reason = self.reason, error = %e, class = ?e.class(),
                    tries = self.tries, retry_in = ?wait,
                    "dead letter cannot be written; the event keeps its place and the write is retried");
                let until = tokio::time::Instant::now() + wait;
                return Step::Park { until, then: self.publish(span) };
            }
        }
        .instrument(outer)
        .boxed()
    }
}
