//! A metrics recorder whose values a test can read at any time, installed
//! thread-locally around a current-thread runtime (`metrics::with_local_recorder`):
//! every handle the bus registers comes from that thread, so tests running
//! in parallel never see each other's numbers. A `metrics_util` registry read
//! without resetting it (`DebuggingRecorder` snapshots drain counters and
//! gauges, so a test could not poll a gauge).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

/// The recorder; clones share the registry.
#[derive(Clone)]
pub struct Values(pub Arc<Registry<Key, AtomicStorage>>);

impl metrics::Recorder for Values {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0.get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0.get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0.get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// The key of metric `name` with `labels`. Label order matters to `Key`
/// equality: pass labels in the order the bus registers them (`topic` first).
pub fn key(name: &str, labels: &[(&str, &str)]) -> Key {
    let labels: Vec<metrics::Label> =
        labels.iter().map(|(k, v)| metrics::Label::new(k.to_string(), v.to_string())).collect();
    Key::from_parts(name.to_string(), labels)
}

impl Values {
    pub fn new() -> Values {
        Values(Arc::new(Registry::atomic()))
    }

    /// The counter's value; 0 when the bus never registered it.
    pub fn counter_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0.get_counter_handles().get(&key(name, labels)).map_or(0, |c| c.load(Ordering::SeqCst))
    }

    /// The gauge's value; 0 when the bus never registered it.
    pub fn gauge_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0.get_gauge_handles().get(&key(name, labels)).map_or(0.0, |g| f64::from_bits(g.load(Ordering::SeqCst)))
    }
}

/// Runs `test` on a current-thread runtime with a recorder of its own;
/// `paused` starts tokio's clock paused (virtual time).
pub fn run_with_recorder<F: Future<Output = ()>>(paused: bool, test: impl FnOnce(Values) -> F) {
    let values = Values::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(paused).build().unwrap();
    metrics::with_local_recorder(&values, || rt.block_on(test(values.clone())));
}

/// [`run_with_recorder`] with the clock paused.
pub fn paused_with_recorder<F: Future<Output = ()>>(test: impl FnOnce(Values) -> F) {
    run_with_recorder(true, test)
}

/// Waits (in virtual time, paused clock) until `cond` holds, for at most `limit`.
pub async fn until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "condition not met within {limit:?} (virtual)");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
