//! `eventbus bench --soak N`: N events over many aggregates, published in
//! order while one bus (the run's configuration, the library's defaults
//! unless overridden) consumes them, with resident memory sampled every
//! second and at every 1% of events handled.
//!
//! The order check is the rule of `eventbus::testing::OrderChecker` (a
//! version starts only after its predecessor completed, never while another
//! version of the aggregate runs), kept as two numbers per aggregate so the
//! harness itself does not grow with the event count (the checker of the
//! levels keeps every handled version).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::{Broker, BusConfig, Envelope, EventBus};
use indicatif::{MultiProgress, ProgressBar};
use serde::Serialize;
use tokio::sync::watch;

use crate::workload::{self, Layout};

/// Fraction of the events after which the run counts as warmed up.
const WARM_UP: f64 = 0.10;
/// Growth after warm-up still called flat: this many MiB or this share of
/// the warm RSS, whichever is larger.
const FLAT_MIB: f64 = 16.0;
const FLAT_SHARE: f64 = 0.10;

/// The JSON report of `eventbus bench --soak` (`soak.json`).
#[derive(Debug, Serialize)]
pub struct SoakRun {
    pub machine: workload::Machine,
    pub started_at: String,
    pub load_average_start: Option<f64>,
    pub load_average_end: Option<f64>,
    /// The configuration run with: the library's defaults unless overridden.
    pub config: super::settings::EffectiveConfig,
    pub soaks: Vec<SoakReport>,
    pub passed: bool,
}

/// One resident-memory sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_s: f64,
    pub published: u64,
    pub handled: u64,
    pub rss_mib: f64,
}

/// What a soak measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    pub broker: String,
    pub events: u64,
    pub aggregates: u64,
    pub sent: u64,
    pub received: u64,
    pub order_violations: u64,
    pub violation_examples: Vec<String>,
    pub duplicates: u64,
    pub missing: u64,
    pub elapsed_s: f64,
    pub throughput_eps: f64,
    /// RSS once the bus consumed the probes, before the first event.
    pub rss_start_mib: Option<f64>,
    /// The highest RSS sampled during warm-up (until 10% of the events were handled).
    pub rss_warm_mib: Option<f64>,
    pub rss_peak_mib: Option<f64>,
    /// RSS once every event was handled, before `close`.
    pub rss_end_mib: Option<f64>,
    /// Least-squares slope of RSS over events handled, after warm-up, in
    /// bytes per event (the memory broker's log included).
    pub slope_bytes_per_event: Option<f64>,
    /// Bytes the memory broker's log holds per event, estimated: payload,
    /// key and header bytes, 88 per stored record, 48 per header and 16 per
    /// allocation (glibc's chunk header and rounding). 0 on an out-of-process broker.
    pub log_bytes_per_event: f64,
    /// `rss_end - rss_warm - log growth over the same events`.
    pub growth_after_warm_up_mib: Option<f64>,
    /// The growth limit called flat: max(16 MiB, 10% of the warm RSS).
    pub flat_tolerance_mib: Option<f64>,
    pub flat: Option<bool>,
    /// Most events published (acknowledged) and not yet handled at once
    /// (the broker's backlog included).
    pub peak_in_flight: u64,
    /// Most events the bus held at once: delivered to it (read from the
    /// broker and dispatched to the pool, `ConsumerStats::delivered`) and
    /// not yet handled.
    pub peak_held: u64,
    /// `(max over samples of (rss - log bytes so far) - rss_start) / peak_held`:
    /// the memory above the idle bus per event it holds.
    pub bytes_per_in_flight_event: Option<f64>,
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
    pub passed: bool,
}

fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

#[derive(Default, Clone, Copy)]
struct Agg {
    running: i64,
    max_completed: i64,
}

#[derive(Default)]
struct Check {
    aggs: Vec<Agg>,
    received: u64,
    duplicates: u64,
    violations: u64,
    examples: Vec<String>,
}

struct Shared {
    check: Mutex<Check>,
    handled: AtomicU64,
    published: ProgressBar,
    peak_in_flight: AtomicU64,
    peak_held: AtomicU64,
    stats: std::sync::OnceLock<Arc<eventbus::consumer::ConsumerStats>>,
    probes: watch::Sender<usize>,
    samples: Mutex<Vec<Sample>>,
    step: u64,
    started: Mutex<Option<Instant>>,
    done: watch::Sender<u64>,
    bar: ProgressBar,
}

impl Shared {
    fn sample(&self) {
        let at = (*lock(&self.started)).map_or(0.0, |s| s.elapsed().as_secs_f64());
        if let Some(rss) = rss_mib() {
            let s = Sample {
                at_s: at,
                published: self.published.position(),
                handled: self.handled.load(Ordering::Relaxed),
                rss_mib: rss,
            };
            lock(&self.samples).push(s);
        }
    }

    fn probe_count(&self) -> u64 {
        *self.probes.borrow() as u64
    }

    fn handle(&self, env: &Envelope) {
        if env.event_type == workload::PROBE {
            self.probes.send_modify(|n| *n += 1);
            return;
        }
        let Some(i) = env.aggregate_id.strip_prefix("order-").and_then(|n| n.parse::<usize>().ok()) else {
            let mut c = lock(&self.check);
            c.violations += 1;
            c.examples.push(format!("unknown aggregate {}", env.aggregate_id));
            return;
        };
        let v = env.event_version;
        let new = {
            let mut c = lock(&self.check);
            let Some(a) = c.aggs.get(i).copied() else { return };
            let mut problem = None;
            if a.running != 0 {
                problem = Some(format!("{}: v{v} started while v{} was running", env.aggregate_id, a.running));
            } else if v > a.max_completed + 1 {
                problem = Some(format!("{}: v{v} started before v{} completed", env.aggregate_id, v - 1));
            }
            if let Some(p) = problem {
                c.violations += 1;
                if c.examples.len() < 10 {
                    c.examples.push(p);
                }
            }
            // The handler is trivial: begin and complete under one lock.
            let new = v > a.max_completed;
            if new {
                c.received += 1;
            } else {
                c.duplicates += 1;
            }
            c.aggs[i] = Agg { running: 0, max_completed: a.max_completed.max(v) };
            new
        };
        if new {
            let handled = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
            let in_flight = self.published.position().saturating_sub(handled);
            self.peak_in_flight.fetch_max(in_flight, Ordering::Relaxed);
            if let Some(stats) = self.stats.get() {
                // Probes are delivered too, and this event counts as delivered.
                let held = stats.delivered.load(Ordering::Relaxed).saturating_sub(handled + self.probe_count());
                self.peak_held.fetch_max(held, Ordering::Relaxed);
            }
            self.bar.inc(1);
            if handled % self.step == 0 {
                self.sample();
            }
            self.done.send_replace(handled);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the soak on `broker`: `layout`'s topics must be new.
#[allow(clippy::too_many_arguments)]
pub async fn run<B: Broker + Clone>(
    broker: B,
    name: &str,
    layout: &Layout,
    events: u64,
    aggregates: u64,
    config: &BusConfig,
    publish_concurrency: usize,
    timeout: Duration,
    progress: &MultiProgress,
) -> SoakReport {
    let versions = workload::plan(events, aggregates);
    let mut report =
        SoakReport { broker: name.into(), events, aggregates: versions.len() as u64, ..SoakReport::default() };
    for t in &layout.topics {
        if let Err(e) = broker.ensure_topic(t, layout.partitions).await {
            report.errors.push(format!("ensure_topic {t}: {e}"));
            return report;
        }
    }
    let bus = match EventBus::builder(broker).config(config.clone()).build() {
        Ok(bus) => Arc::new(bus),
        Err(e) => {
            report.errors.push(format!("build: {e}"));
            return report;
        }
    };
    let pub_bar = progress.add(ProgressBar::new(events).with_style(workload::bar_style()));
    pub_bar.set_prefix(format!("{name} soak published"));
    let bar = progress.add(ProgressBar::new(events).with_style(workload::bar_style()));
    bar.set_prefix(format!("{name} soak handled"));
    let (probes, mut probes_rx) = watch::channel(0usize);
    let (done, mut done_rx) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        check: Mutex::new(Check { aggs: vec![Agg::default(); versions.len()], ..Check::default() }),
        handled: AtomicU64::new(0),
        published: pub_bar.clone(),
        peak_in_flight: AtomicU64::new(0),
        peak_held: AtomicU64::new(0),
        stats: std::sync::OnceLock::new(),
        probes,
        samples: Mutex::new(Vec::new()),
        step: (events / 100).max(1),
        started: Mutex::new(None),
        done,
        bar: bar.clone(),
    });
    for t in &layout.topics {
        let shared = shared.clone();
        let sub = bus
            .subscribe_envelope(t, move |env: Envelope| {
                let shared = shared.clone();
                async move {
                    shared.handle(&env);
                    Ok(())
                }
            })
            .await;
        if let Err(e) = sub {
            report.errors.push(format!("subscribe {t}: {e}"));
        }
    }
    if let Err(e) = bus.start().await {
        report.errors.push(format!("start: {e}"));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    if report.errors.is_empty() {
        if let Err(e) = workload::probe(&bus, &layout.topics, &mut probes_rx, deadline).await {
            report.errors.push(e);
        }
    }
    if !report.errors.is_empty() {
        bus.close().await;
        return report;
    }

    if let Some(stats) = bus.consumer_stats().await {
        let _ = shared.stats.set(stats);
    }
    *lock(&shared.started) = Some(Instant::now());
    shared.sample();
    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                shared.sample();
            }
        })
    };
    let started = Instant::now();
    let publishing =
        workload::publish_in_order(bus.clone(), layout, &versions, publish_concurrency, pub_bar.clone(), false);
    match tokio::time::timeout_at(deadline, publishing).await {
        Ok((sent, _, errors)) => {
            report.sent = sent;
            report.errors.extend(errors);
        }
        Err(_) => {
            report.sent = pub_bar.position();
            report.errors.push(format!("timed out after {timeout:?} while publishing"));
        }
    }
    let expected = report.sent;
    if report.errors.is_empty()
        && tokio::time::timeout_at(deadline, done_rx.wait_for(|&n| n >= expected)).await.is_err()
    {
        report.errors.push(format!(
            "timed out after {timeout:?}: {} of {expected} events handled",
            shared.handled.load(Ordering::Relaxed)
        ));
    }
    let elapsed = started.elapsed();
    shared.sample();
    ticker.abort();
    let close = bus.close().await;
    if let Some(e) = close.final_commit_error {
        report.errors.push(format!("close: {e}"));
    }
    pub_bar.finish_and_clear();
    bar.finish_and_clear();

    {
        let c = lock(&shared.check);
        report.received = c.received;
        report.duplicates = c.duplicates;
        report.order_violations = c.violations;
        report.violation_examples = c.examples.clone();
        report.missing =
            c.aggs.iter().zip(&versions).map(|(a, &n)| (n as i64 - a.max_completed).max(0) as u64).sum::<u64>();
    }
    report.elapsed_s = elapsed.as_secs_f64();
    report.throughput_eps = workload::per_second(report.received, elapsed);
    report.peak_in_flight = shared.peak_in_flight.load(Ordering::Relaxed);
    report.peak_held = shared.peak_held.load(Ordering::Relaxed);
    report.samples = std::mem::take(&mut *lock(&shared.samples));
    report.samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    report.passed = report.errors.is_empty()
        && report.sent == events
        && report.received == report.sent
        && report.order_violations == 0
        && report.missing == 0;
    report
}

/// The memory figures of a finished run, from its samples and the bytes
/// its broker's log holds in this process (`None`: out of process).
pub fn summarize(report: &mut SoakReport, log_bytes: Option<u64>) {
    let samples = std::mem::take(&mut report.samples);
    report.log_bytes_per_event =
        log_bytes.map_or(0.0, |b| if report.sent == 0 { 0.0 } else { b as f64 / report.sent as f64 });
    const MIB: f64 = 1024.0 * 1024.0;
    let log_mib = |published: u64| published as f64 * report.log_bytes_per_event / MIB;
    report.rss_start_mib = samples.first().map(|s| s.rss_mib);
    report.rss_end_mib = samples.last().map(|s| s.rss_mib);
    report.rss_peak_mib = samples.iter().map(|s| s.rss_mib).reduce(f64::max);
    let warm_at = (report.events as f64 * WARM_UP).ceil() as u64;
    let warm = samples.iter().position(|s| s.handled >= warm_at);
    if let (Some(w), Some(end)) = (warm, samples.last()) {
        // The highest RSS of the warm-up (allocators keep what they reached),
        // and the log as it was at that sample.
        let ws = samples[..=w].iter().max_by(|a, b| a.rss_mib.total_cmp(&b.rss_mib)).unwrap_or(&samples[w]);
        report.rss_warm_mib = Some(ws.rss_mib);
        let growth = end.rss_mib - ws.rss_mib - (log_mib(end.published) - log_mib(ws.published));
        let tolerance = FLAT_MIB.max(FLAT_SHARE * ws.rss_mib);
        report.growth_after_warm_up_mib = Some(growth);
        report.flat_tolerance_mib = Some(tolerance);
        report.flat = Some(growth <= tolerance);
        let after = &samples[w..];
        if after.len() >= 2 {
            let n = after.len() as f64;
            let mx = after.iter().map(|s| s.handled as f64).sum::<f64>() / n;
            let my = after.iter().map(|s| s.rss_mib * MIB).sum::<f64>() / n;
            let sxy: f64 = after.iter().map(|s| (s.handled as f64 - mx) * (s.rss_mib * MIB - my)).sum();
            let sxx: f64 = after.iter().map(|s| (s.handled as f64 - mx).powi(2)).sum();
            report.slope_bytes_per_event = (sxx > 0.0).then(|| sxy / sxx);
        }
    }
    if let Some(start) = report.rss_start_mib {
        let excess = samples.iter().map(|s| s.rss_mib - log_mib(s.published)).reduce(f64::max).unwrap_or(start);
        report.bytes_per_in_flight_event =
            (report.peak_held > 0).then(|| (excess - start).max(0.0) * MIB / report.peak_held as f64);
    }
    report.samples = samples;
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The soak table.
pub fn print(reports: &[SoakReport]) {
    let header = [
        "broker",
        "events",
        "aggs",
        "sent",
        "handled",
        "violations",
        "dups",
        "e2e/s",
        "RSS start MiB",
        "RSS warm MiB",
        "RSS peak MiB",
        "RSS end MiB",
        "slope B/event",
        "log B/event",
        "growth MiB",
        "flat",
        "peak in flight",
        "peak held",
        "B/held event",
    ];
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.broker.clone(),
                r.events.to_string(),
                r.aggregates.to_string(),
                r.sent.to_string(),
                r.received.to_string(),
                r.order_violations.to_string(),
                r.duplicates.to_string(),
                format!("{:.0}", r.throughput_eps),
                opt(r.rss_start_mib, 1),
                opt(r.rss_warm_mib, 1),
                opt(r.rss_peak_mib, 1),
                opt(r.rss_end_mib, 1),
                opt(r.slope_bytes_per_event, 1),
                format!("{:.1}", r.log_bytes_per_event),
                opt(r.growth_after_warm_up_mib, 1),
                r.flat.map_or("-".into(), |f| if f { "yes".into() } else { "no".into() }),
                r.peak_in_flight.to_string(),
                r.peak_held.to_string(),
                opt(r.bytes_per_in_flight_event, 0),
            ]
        })
        .collect();
    println!("\nsoak (RSS sampled every second and at every 1% handled; growth = end - warm - log growth):");
    print!("{}", workload::render_table(&header, &rows));
    for r in reports {
        for e in r.errors.iter().chain(&r.violation_examples) {
            println!("{}: soak: {e}", r.broker);
        }
    }
}
