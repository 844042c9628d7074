//! Helpers shared by the tests: the memory-broker ones here, the real-broker
//! ones in [`scenario`], the SIGKILL harness in [`crash_child`].
#![allow(dead_code)]

pub mod capture;
pub mod crash_child;
pub mod nats_server;
pub mod pki;
pub mod recorder;
pub mod scenario;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventbus::testing::OrderChecker;
use eventbus::{BusConfig, Envelope, EventBus, MemoryBroker};
use tokio::sync::Notify;

/// Counts handled events and wakes waiters at each one.
#[derive(Default)]
pub struct Progress {
    pub handled: AtomicU64,
    pub notify: Notify,
}

impl Progress {
    pub fn bump(&self) {
        self.handled.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn get(&self) -> u64 {
        self.handled.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` events were handled.
    pub async fn wait_for(&self, n: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() >= n {
                return;
            }
            notified.await;
        }
    }
}

pub fn fast_config(group: &str) -> BusConfig {
    let mut config = BusConfig::default();
    config.consumer.group = group.into();
    config.consumer.commit_interval = Duration::from_millis(10);
    config.consumer.retry.initial_backoff = Duration::from_millis(1);
    config.consumer.retry.max_backoff = Duration::from_millis(5);
    config.pool.concurrency = 16;
    config.pool.capacity = 1000;
    config
}

/// Publishes versions 1..=versions of each aggregate, in order.
pub async fn publish_versions(
    bus: &EventBus<MemoryBroker>,
    topics: &[&str],
    aggregates: usize,
    versions: i64,
) -> BTreeMap<String, i64> {
    let mut expected = BTreeMap::new();
    for v in 1..=versions {
        for a in 0..aggregates {
            let id = format!("agg-{a}");
            let topic = topics[a % topics.len()];
            let env = Envelope::new(id.clone(), "Updated", v, &serde_json::json!({"n": v})).unwrap();
            bus.publish_envelope(topic, &env).await.unwrap();
            expected.insert(id, v);
        }
    }
    expected
}

/// Subscribes `topics` with a handler that records into `checker` and `progress`.
pub async fn subscribe_checked(
    bus: &EventBus<MemoryBroker>,
    topics: &[&str],
    checker: Arc<OrderChecker>,
    progress: Arc<Progress>,
) {
    for topic in topics {
        let (checker, progress) = (checker.clone(), progress.clone());
        bus.subscribe_envelope(topic, move |env: Envelope| {
            let (checker, progress) = (checker.clone(), progress.clone());
            async move {
                checker.begin(&env.aggregate_id, env.event_version);
                tokio::task::yield_now().await;
                checker.complete(&env.aggregate_id, env.event_version);
                progress.bump();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
}

/// Tasks of the current runtime still alive, once every task of ours has
/// been joined. tokio wakes a `JoinHandle` a moment before it drops the
/// finished task from its count (on the thread that ran it), so re-read the
/// count for up to 5 s, letting other threads run; a task that is really
/// alive stays counted and is returned.
pub async fn alive_tasks_after_release() -> usize {
    let metrics = tokio::runtime::Handle::current().metrics();
    let started = std::time::Instant::now();
    while metrics.num_alive_tasks() > 0 && started.elapsed() < Duration::from_secs(5) {
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
    metrics.num_alive_tasks()
}
