//! The seed's comparison workload, shared by `eventbus demo` and `eventbus bench`:
//! 5 topics × 3 partitions, aggregates = messages / 10 clamped to 50..=1000,
//! each aggregate bound to one topic and its versions 1..n published in order
//! while one bus consumes, with the order checker watching every handler.
//! Generic over the broker, so the same code runs on memory, Kafka and NATS.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::testing::OrderChecker;
use eventbus::{Broker, BusConfig, Envelope, EventBus};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

pub const TOPICS: usize = 5;
pub const PARTITIONS: u32 = 3;
/// Bound on `close`: a close that takes longer is reported, not waited for.
const CLOSE_LIMIT: Duration = Duration::from_secs(60);
/// Event type of the probes that show the consumer is assigned and reading.
pub const PROBE: &str = "BenchProbe";

/// Where the workload's topics live on a broker.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The broker's topics, in logical-topic order.
    pub topics: Vec<String>,
    /// Partitions of each broker topic.
    pub partitions: u32,
    /// Broker topics per logical topic: 1 with native partitions; on a broker
    /// whose topics are single-partition (a JetStream stream), each logical
    /// partition is a topic of its own.
    per_logical: usize,
}

impl Layout {
    /// `logical` topics named `{prefix}.{t}`, each with `partitions` partitions.
    pub fn partitioned(prefix: &str, logical: usize, partitions: u32) -> Layout {
        Layout { topics: (0..logical).map(|t| format!("{prefix}.{t}")).collect(), partitions, per_logical: 1 }
    }

    /// The same shape on single-partition topics: `{prefix}.{t}-p{p}`.
    pub fn split(prefix: &str, logical: usize, partitions: u32) -> Layout {
        let topics = (0..logical).flat_map(|t| (0..partitions).map(move |p| format!("{prefix}.{t}-p{p}"))).collect();
        Layout { topics, partitions: 1, per_logical: partitions.max(1) as usize }
    }

    pub fn logical_topics(&self) -> usize {
        self.topics.len() / self.per_logical
    }

    /// The broker topic of aggregate `i`: logical topic `i % logical`, and
    /// on split layouts a partition-topic spread over the rest of `i`.
    pub fn topic_of(&self, i: usize) -> usize {
        let logical = self.logical_topics().max(1);
        (i % logical) * self.per_logical + (i / logical) % self.per_logical
    }
}

/// Versions per aggregate: `messages` spread over `aggregates` as evenly as possible.
pub fn plan(messages: u64, aggregates: u64) -> Vec<u64> {
    let aggregates = aggregates.clamp(1, messages.max(1));
    let (base, extra) = (messages / aggregates, messages % aggregates);
    (0..aggregates).map(|i| base + u64::from(i < extra)).collect()
}

/// The seed's rule: aggregates = messages / 10, clamped to 50..=1000.
pub fn seed_aggregates(messages: u64) -> u64 {
    (messages / 10).clamp(50, 1000)
}

pub fn aggregate_name(i: usize) -> String {
    format!("order-{i:05}")
}

pub fn expected_versions(versions: &[u64]) -> BTreeMap<String, i64> {
    versions.iter().enumerate().map(|(i, &n)| (aggregate_name(i), n as i64)).collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub runtime_workers: usize,
    pub memory_total_mib: Option<u64>,
    pub cpu_model: Option<String>,
    pub os: String,
}

impl Machine {
    pub fn describe(&self) -> String {
        format!(
            "{} cores, {} runtime workers, {} memory{}",
            self.cores,
            self.runtime_workers,
            self.memory_total_mib.map_or("unknown".into(), |m| format!("{:.1} GiB", m as f64 / 1024.0)),
            self.cpu_model.as_deref().map_or(String::new(), |m| format!(", {m}")),
        )
    }
}

pub fn machine_facts() -> Machine {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string());
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        runtime_workers: tokio::runtime::Handle::current().metrics().num_workers(),
        memory_total_mib: kib_field(&meminfo, "MemTotal:").map(|kib| kib / 1024),
        cpu_model,
        os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
    }
}

/// The 1-minute load average (`/proc/loadavg`), to put next to figures.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resets the kernel's peak-RSS counter (VmHWM) so each level reports its own
/// peak; best effort (Linux ≥ 4.0).
pub fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(kib_field(&status, "VmHWM:")? as f64 / 1024.0)
}

/// The `p`th percentile of sorted microseconds, in milliseconds.
pub fn percentile(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    sorted_us[rank.clamp(1, sorted_us.len()) - 1] as f64 / 1e3
}

/// Alive tasks of this runtime beyond `baseline` once `close` returned.
/// Tokio wakes a task's `JoinHandle` before the finishing worker thread
/// removes the task from the runtime's task list (`Harness::complete`:
/// wake_join, then release), so a count read right after the join can still
/// include the task `close` just joined — observed as one extra task for up
/// to ~10 ms on a loaded 2-core machine. Tokio offers no notification for
/// that release, so re-read (yielding, bounded to 1 s) until the bookkeeping
/// settles; a task that is really still alive keeps the count up.
/// `baseline` covers tasks that are not the bus's (a NATS client's own).
pub async fn alive_tasks_after_close(baseline: usize) -> usize {
    let metrics = tokio::runtime::Handle::current().metrics();
    let give_up = Instant::now() + Duration::from_secs(1);
    loop {
        let n = metrics.num_alive_tasks().saturating_sub(baseline);
        if n == 0 || Instant::now() >= give_up {
            return n;
        }
        tokio::task::yield_now().await;
    }
}

/// A right-aligned text table, `| a | b |` rows.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(String::len).chain([header[c].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<&str>| {
        let cells: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}")).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut out = line(header.to_vec());
    out.push_str(&format!("|{}|\n", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|")));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>24} [{bar:40}] {pos:>6}/{len:6} {rate:>10} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        // indicatif's own {per_sec} prints a dozen decimals.
        .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", state.per_sec());
        })
        .progress_chars("=> ")
}

/// One level of the live scenario: what to run.
#[derive(Debug, Clone)]
pub struct LiveParams {
    pub messages: u64,
    pub aggregates: u64,
    pub handler: Duration,
    /// Publishes in flight per logical topic (each aggregate still one at a time).
    pub publish_concurrency: usize,
    pub timeout: Duration,
    pub config: BusConfig,
    /// Label of the progress bars.
    pub label: String,
}

/// One level of the live scenario: what happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LevelResult {
    pub messages: u64,
    pub aggregates: u64,
    pub sent: u64,
    pub received: u64,
    pub success_rate: f64,
    pub order_violations: u64,
    pub violation_examples: Vec<String>,
    pub duplicates: u64,
    pub missing: u64,
    pub dead_letters: u64,
    /// Events handled per second, from the first publish to the last first-time handling.
    pub throughput_eps: f64,
    /// Acknowledged publishes per second, from the first publish to the last ack.
    pub publish_eps: f64,
    pub elapsed_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub publish_p50_ms: f64,
    pub publish_p99_ms: f64,
    pub tasks_alive_after_close: usize,
    pub handed_back: usize,
    pub close_error: Option<String>,
    pub peak_memory_mib: Option<f64>,
    pub timed_out: bool,
    pub errors: Vec<String>,
}

impl LevelResult {
    /// sent, handled, success, violations, duplicates, dead letters.
    pub fn check_cells(&self) -> Vec<String> {
        vec![
            self.sent.to_string(),
            self.received.to_string(),
            format!("{:.2}%", self.success_rate),
            self.order_violations.to_string(),
            self.duplicates.to_string(),
            self.dead_letters.to_string(),
        ]
    }

    /// End-to-end p50 and p99, tasks alive after close, peak memory.
    pub fn end_cells(&self) -> Vec<String> {
        vec![
            format!("{:.2}", self.latency_p50_ms),
            format!("{:.2}", self.latency_p99_ms),
            self.tasks_alive_after_close.to_string(),
            self.peak_memory_mib.map_or("-".into(), |m| format!("{m:.1}")),
        ]
    }

    pub fn passed(&self) -> bool {
        self.sent == self.messages
            && self.received == self.sent
            && self.order_violations == 0
            && self.tasks_alive_after_close == 0
            && !self.timed_out
            && self.errors.is_empty()
    }
}

/// What the handlers of the live scenario share.
struct Recorder {
    checker: OrderChecker,
    /// Distinct (aggregate, version) pairs handled, for the completion signal.
    seen: Mutex<HashSet<(String, i64)>>,
    handled: watch::Sender<u64>,
    probes: watch::Sender<usize>,
    latencies_us: Mutex<Vec<u64>>,
    last_handled: Mutex<Option<Instant>>,
    handler: Duration,
    bar: ProgressBar,
}

impl Recorder {
    async fn handle(&self, env: Envelope) {
        if env.event_type == PROBE {
            self.probes.send_modify(|n| *n += 1);
            return;
        }
        let agg = env.aggregate_id.as_str();
        let version = env.event_version;
        self.checker.begin(agg, version);
        if !self.handler.is_zero() {
            tokio::time::sleep(self.handler).await;
        }
        self.checker.complete(agg, version);
        let latency = (OffsetDateTime::now_utc() - env.timestamp).whole_microseconds().max(0) as u64;
        lock(&self.latencies_us).push(latency);
        let first = lock(&self.seen).insert((env.aggregate_id, version));
        if first {
            *lock(&self.last_handled) = Some(Instant::now());
            self.handled.send_modify(|n| *n += 1);
            self.bar.inc(1);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Publishes every aggregate's versions in order: round `v` publishes version
/// `v` of each aggregate, up to `concurrency` at once per logical topic, and a
/// round starts only when the previous one is acknowledged, so version `v+1`
/// of an aggregate is never sent before version `v` was accepted.
/// Returns the sent count per logical topic and the publish latencies (µs).
pub async fn publish_in_order<B: Broker>(
    bus: Arc<EventBus<B>>,
    layout: &Layout,
    versions: &[u64],
    concurrency: usize,
    bar: ProgressBar,
    keep_latencies: bool,
) -> (u64, Vec<u64>, Vec<String>) {
    let logical = layout.logical_topics().max(1);
    let mut publishers = AbortOnDrop(Vec::new());
    for t in 0..logical {
        let mine: Vec<(String, String, u64)> = versions
            .iter()
            .enumerate()
            .filter(|(i, _)| i % logical == t)
            .map(|(i, &n)| (aggregate_name(i), layout.topics[layout.topic_of(i)].clone(), n))
            .collect();
        let bus = bus.clone();
        let bar = bar.clone();
        let concurrency = concurrency.max(1);
        publishers.0.push(tokio::spawn(async move {
            let (mut sent, mut latencies) = (0u64, Vec::new());
            let max = mine.iter().map(|(_, _, n)| *n).max().unwrap_or(0);
            for v in 1..=max {
                // Collected first: a lazy iterator of closures held across the
                // await makes the task's future not provably `Send`.
                let round: Vec<_> = mine
                    .iter()
                    .filter(|(_, _, n)| v <= *n)
                    .map(|(agg, topic, _)| {
                        let (bus, bar, agg, topic) = (bus.clone(), bar.clone(), agg.clone(), topic.clone());
                        async move {
                            let payload = serde_json::json!({ "order_id": agg, "seq": v, "amount_cents": v * 100 });
                            let env = Envelope::new(agg.as_str(), "OrderUpdated", v as i64, &payload)
                                .map_err(|e| format!("envelope {agg} v{v}: {e}"))?;
                            let at = Instant::now();
                            bus.publish_envelope(&topic, &env).await.map_err(|e| format!("publish {agg} v{v}: {e}"))?;
                            bar.inc(1);
                            Ok::<u64, String>(at.elapsed().as_micros() as u64)
                        }
                    })
                    .collect();
                let results: Vec<Result<u64, String>> =
                    futures::stream::iter(round).buffer_unordered(concurrency).collect().await;
                let mut failed = None;
                for r in results {
                    match r {
                        Ok(us) => {
                            sent += 1;
                            if keep_latencies {
                                latencies.push(us);
                            }
                        }
                        Err(e) => failed = failed.or(Some(e)),
                    }
                }
                // A failed publish leaves its aggregate with a gap: stop this topic.
                if failed.is_some() {
                    return (sent, latencies, failed);
                }
            }
            (sent, latencies, None)
        }));
    }
    let (mut sent, mut latencies, mut errors) = (0, Vec::new(), Vec::new());
    for p in publishers.0.iter_mut() {
        match p.await {
            Ok((n, lat, err)) => {
                sent += n;
                latencies.extend(lat);
                errors.extend(err);
            }
            Err(e) => errors.push(format!("publisher task: {e}")),
        }
    }
    (sent, latencies, errors)
}

/// Runs one level of the seed's scenario on `broker`: a fresh bus consumes
/// `layout`'s topics while the workload is published, and the order checker
/// and counters produce the level's result. `layout`'s topics must be new.
pub async fn run_live<B: Broker>(
    broker: B,
    layout: &Layout,
    params: &LiveParams,
    progress: &MultiProgress,
) -> LevelResult {
    reset_peak_memory();
    let versions = plan(params.messages, params.aggregates);
    let mut result =
        LevelResult { messages: params.messages, aggregates: versions.len() as u64, ..LevelResult::default() };
    let pub_bar = progress.add(ProgressBar::new(params.messages).with_style(bar_style()));
    pub_bar.set_prefix(format!("{} published", params.label));
    let handled_bar = progress.add(ProgressBar::new(params.messages).with_style(bar_style()));
    handled_bar.set_prefix(format!("{} handled", params.label));

    let tasks_before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    for t in &layout.topics {
        if let Err(e) = broker.ensure_topic(t, layout.partitions).await {
            result.errors.push(format!("ensure_topic {t}: {e}"));
            return result;
        }
    }
    let bus = match EventBus::builder(broker).config(params.config.clone()).build() {
        Ok(bus) => Arc::new(bus),
        Err(e) => {
            result.errors.push(format!("build: {e}"));
            return result;
        }
    };
    let (handled_tx, mut handled_rx) = watch::channel(0u64);
    let (probes_tx, mut probes_rx) = watch::channel(0usize);
    let recorder = Arc::new(Recorder {
        checker: OrderChecker::new(),
        seen: Mutex::new(HashSet::with_capacity(params.messages as usize)),
        handled: handled_tx,
        probes: probes_tx,
        latencies_us: Mutex::new(Vec::with_capacity(params.messages as usize)),
        last_handled: Mutex::new(None),
        handler: params.handler,
        bar: handled_bar.clone(),
    });
    for t in &layout.topics {
        let recorder = recorder.clone();
        let sub = bus
            .subscribe_envelope(t, move |env: Envelope| {
                let recorder = recorder.clone();
                async move {
                    recorder.handle(env).await;
                    Ok(())
                }
            })
            .await;
        if let Err(e) = sub {
            result.errors.push(format!("subscribe {t}: {e}"));
        }
    }
    if let Err(e) = bus.start().await {
        result.errors.push(format!("start: {e}"));
    }
    let deadline = tokio::time::Instant::now() + params.timeout;
    // One probe per topic, waited for: the clock starts once the group is
    // joined and every topic is being read, so a broker's join time does not
    // count as latency.
    if result.errors.is_empty() {
        if let Err(e) = probe(&bus, &layout.topics, &mut probes_rx, deadline).await {
            result.errors.push(e);
        }
    }

    let started = Instant::now();
    let mut publish_end = started;
    let mut publish_latencies = Vec::new();
    if result.errors.is_empty() {
        let publishing =
            publish_in_order(bus.clone(), layout, &versions, params.publish_concurrency, pub_bar.clone(), true);
        match tokio::time::timeout_at(deadline, publishing).await {
            Ok((sent, latencies, errors)) => {
                publish_end = Instant::now();
                result.sent = sent;
                publish_latencies = latencies;
                result.errors.extend(errors);
            }
            Err(_) => {
                // The bar counts acknowledged publishes: what was sent before the cut.
                result.sent = pub_bar.position();
                result.timed_out = true;
                result.errors.push(format!("timed out after {:?} while publishing", params.timeout));
            }
        }
        let expected = result.sent;
        if !result.timed_out
            && tokio::time::timeout_at(deadline, handled_rx.wait_for(|&n| n >= expected)).await.is_err()
        {
            result.timed_out = true;
            result.errors.push(format!(
                "timed out after {:?}: {} of {expected} events handled",
                params.timeout,
                *handled_rx.borrow()
            ));
        }
    }
    let end = (*lock(&recorder.last_handled)).unwrap_or_else(Instant::now);
    let stats = bus.consumer_stats().await;

    match tokio::time::timeout(CLOSE_LIMIT, bus.close()).await {
        Ok(report) => {
            result.handed_back = report.handed_back;
            result.close_error = report.final_commit_error;
            if let Some(e) = &result.close_error {
                result.errors.push(format!("close: {e}"));
            }
        }
        Err(_) => result.errors.push(format!("close did not return within {}s", CLOSE_LIMIT.as_secs())),
    }
    drop(bus);
    result.tasks_alive_after_close = alive_tasks_after_close(tasks_before).await;
    pub_bar.finish_and_clear();
    handled_bar.finish_and_clear();

    let report = recorder.checker.report(&expected_versions(&versions));
    result.received = report.handled;
    result.order_violations = report.violations;
    result.violation_examples = report.examples;
    result.duplicates = report.duplicates;
    result.missing = report.missing;
    result.success_rate = if result.sent == 0 { 0.0 } else { 100.0 * result.received as f64 / result.sent as f64 };
    result.dead_letters = stats.map_or(0, |s| s.dead_lettered.load(Ordering::Relaxed));

    let elapsed = end.saturating_duration_since(started);
    result.elapsed_ms = elapsed.as_secs_f64() * 1e3;
    result.throughput_eps = per_second(result.received, elapsed);
    result.publish_eps = per_second(result.sent, publish_end.saturating_duration_since(started));
    let mut lat = std::mem::take(&mut *lock(&recorder.latencies_us));
    lat.sort_unstable();
    result.latency_p50_ms = percentile(&lat, 50.0);
    result.latency_p99_ms = percentile(&lat, 99.0);
    result.latency_max_ms = lat.last().map_or(0.0, |&us| us as f64 / 1e3);
    publish_latencies.sort_unstable();
    result.publish_p50_ms = percentile(&publish_latencies, 50.0);
    result.publish_p99_ms = percentile(&publish_latencies, 99.0);
    result.peak_memory_mib = peak_memory_mib();
    result
}

/// Aborts the tasks when dropped: a publish phase cut off by its timeout
/// does not leave publishers running.
struct AbortOnDrop<T>(Vec<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

pub fn per_second(n: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        n as f64 / elapsed.as_secs_f64()
    }
}

/// Publishes one probe per topic and waits until the consumer saw them all.
pub async fn probe<B: Broker>(
    bus: &EventBus<B>,
    topics: &[String],
    seen: &mut watch::Receiver<usize>,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    for (i, t) in topics.iter().enumerate() {
        let env = Envelope::new(format!("probe-{i}").as_str(), PROBE, 1, &serde_json::json!({}))
            .map_err(|e| format!("probe envelope: {e}"))?;
        match tokio::time::timeout_at(deadline, bus.publish_envelope(t, &env)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("publish probe to {t}: {e}")),
            Err(_) => return Err(format!("publish probe to {t}: no ack before the level's timeout")),
        }
    }
    let n = topics.len();
    match tokio::time::timeout_at(deadline, seen.wait_for(|&s| s >= n)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("the consumer did not read the probes of {n} topics before the level's timeout")),
    }
}
