//! Consumers that read an already-published backlog and time it: our bus,
//! and the seed's per-partition consume-and-wait consumer rebuilt on the
//! broker trait. The raw clients (`raw.rs`) report through the same [`Tally`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::{Broker, BusConfig, Delivery, Envelope, EventBus, Session, SessionEvent, TopicPartition};
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant as Deadline;

/// How fast a consumer went through a backlog.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Drain {
    pub handled: u64,
    /// From the first handled message to the last: group joins and the
    /// first fetch do not count.
    pub elapsed_ms: f64,
    pub eps: f64,
}

/// Counts handled messages and remembers the first and last.
pub struct Tally {
    span: Mutex<(Option<Instant>, Option<Instant>)>,
    count: watch::Sender<u64>,
    bar: ProgressBar,
}

impl Tally {
    pub fn new(bar: ProgressBar) -> Arc<Tally> {
        Arc::new(Tally { span: Mutex::new((None, None)), count: watch::Sender::new(0), bar })
    }

    pub fn hit(&self) {
        let now = Instant::now();
        {
            let mut span = self.span.lock().unwrap_or_else(|p| p.into_inner());
            span.0.get_or_insert(now);
            span.1 = Some(now);
        }
        self.count.send_modify(|n| *n += 1);
        self.bar.inc(1);
    }

    /// Waits until `expected` messages were handled; false at the deadline.
    pub async fn wait(&self, expected: u64, deadline: Deadline) -> bool {
        let mut rx = self.count.subscribe();
        let reached = tokio::time::timeout_at(deadline, rx.wait_for(|&n| n >= expected)).await.is_ok();
        reached
    }

    pub fn count(&self) -> u64 {
        *self.count.borrow()
    }

    /// The rate over first..last; with one message or none there is no span.
    pub fn drain(&self) -> Drain {
        let handled = self.count();
        let (first, last) = *self.span.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = match (first, last) {
            (Some(f), Some(l)) => l.saturating_duration_since(f),
            _ => Duration::ZERO,
        };
        let eps = if handled > 1 && !elapsed.is_zero() { (handled - 1) as f64 / elapsed.as_secs_f64() } else { 0.0 };
        self.bar.finish_and_clear();
        Drain { handled, elapsed_ms: elapsed.as_secs_f64() * 1e3, eps }
    }
}

/// A read-back that failed leaves no bar drawn.
impl Drop for Tally {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// What a read-back reads and how: `topics` from the start, each message
/// handled by sleeping `handler` (if not zero), until `expected` were handled.
pub struct Backlog<'a> {
    pub topics: &'a [String],
    pub handler: Duration,
    pub expected: u64,
    pub deadline: Deadline,
}

/// The message did not arrive in time: how many did.
pub fn shortfall(what: &str, tally: &Tally, expected: u64) -> String {
    format!("{what}: timed out with {} of {expected} messages handled", tally.count())
}

/// Our bus, in the new group of `config`, reads the backlog.
pub async fn ours<B: Broker>(
    broker: B,
    config: &BusConfig,
    backlog: Backlog<'_>,
    bar: ProgressBar,
) -> Result<Drain, String> {
    let Backlog { topics, handler, expected, deadline } = backlog;
    let bus = EventBus::builder(broker).config(config.clone()).build().map_err(|e| format!("build: {e}"))?;
    let tally = Tally::new(bar);
    for t in topics {
        let tally = tally.clone();
        bus.subscribe_envelope(t, move |_env: Envelope| {
            let tally = tally.clone();
            async move {
                if !handler.is_zero() {
                    tokio::time::sleep(handler).await;
                }
                tally.hit();
                Ok(())
            }
        })
        .await
        .map_err(|e| format!("subscribe {t}: {e}"))?;
    }
    bus.start().await.map_err(|e| format!("start: {e}"))?;
    let done = tally.wait(expected, deadline).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), bus.close()).await;
    if !done {
        return Err(shortfall("our bus", &tally, expected));
    }
    Ok(tally.drain())
}

/// The seed's consumer, re-expressed: one lane per partition that hands one
/// message to the handler and waits for it before taking the next, so a
/// partition never has two messages in flight whatever the worker count.
pub async fn sequential<B: Broker>(
    broker: &B,
    group: &str,
    backlog: Backlog<'_>,
    bar: ProgressBar,
) -> Result<Drain, String> {
    let Backlog { topics, handler, expected, deadline } = backlog;
    let mut session = broker.subscribe(group, topics).await.map_err(|e| format!("subscribe: {e}"))?;
    let tally = Tally::new(bar);
    let mut lanes: HashMap<TopicPartition, mpsc::UnboundedSender<Delivery>> = HashMap::new();
    let mut workers = Vec::new();
    // Lanes report what they finished; the loop commits it, like the seed's
    // MarkMessage plus the client's periodic commit. Without commits a broker
    // that bounds unacknowledged messages (JetStream's max_ack_pending) stops
    // delivering.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(TopicPartition, u64)>();
    let mut done = tally.count.subscribe();
    let outcome = loop {
        let event = tokio::select! {
            e = session.next() => e,
            Some(first) = done_rx.recv() => {
                let mut next: HashMap<TopicPartition, u64> = HashMap::new();
                let mut finished = Some(first);
                while let Some((tp, offset)) = finished {
                    let n = next.entry(tp).or_default();
                    *n = (*n).max(offset + 1);
                    finished = done_rx.try_recv().ok();
                }
                let offsets: Vec<(TopicPartition, u64)> = next.into_iter().collect();
                if let Err(e) = session.commit(&offsets).await {
                    tracing::debug!(error = %e, "sequential consumer: commit failed");
                }
                continue;
            }
            _ = done.wait_for(|&n| n >= expected) => break Ok(()),
            _ = tokio::time::sleep_until(deadline) => break Err(shortfall("sequential consumer", &tally, expected)),
        };
        match event {
            Ok(SessionEvent::Message(d)) => {
                let lane = lanes.entry(d.topic_partition()).or_insert_with(|| {
                    let (tx, mut rx) = mpsc::unbounded_channel::<Delivery>();
                    let (tally, done_tx) = (tally.clone(), done_tx.clone());
                    workers.push(tokio::spawn(async move {
                        while let Some(d) = rx.recv().await {
                            if !handler.is_zero() {
                                tokio::time::sleep(handler).await;
                            }
                            tally.hit();
                            let _ = done_tx.send((d.topic_partition(), d.offset));
                        }
                    }));
                    tx
                });
                let _ = lane.send(d);
            }
            Ok(SessionEvent::Revoked(parts) | SessionEvent::Lost(parts)) => {
                if let Err(e) = session.release(&parts).await {
                    break Err(format!("release: {e}"));
                }
            }
            Ok(SessionEvent::Assigned(_)) => {}
            Err(e) => break Err(format!("session: {e}")),
        }
    };
    drop(lanes);
    for w in &workers {
        w.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), session.close()).await;
    outcome.map(|()| tally.drain())
}
