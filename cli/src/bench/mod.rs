//! `eventbus bench`: the seed's Kafka-vs-NATS comparison, measured. Per
//! broker and pressure level it runs the live scenario of `eventbus demo`
//! (publish while one bus consumes, order checked), then reads the same
//! topics again with a new group of our bus and with the plain client, and
//! finally pits the bus against the seed's per-partition consume-and-wait
//! consumer with a 1 ms handler. Results: tables, JSON and SVG charts.

// Without a broker feature, its arms and helpers are compiled out and what
// only they use is left unused.
#![cfg_attr(not(all(feature = "kafka", feature = "nats")), allow(unused))]

mod chart;
mod drain;
mod raw;
mod report;
mod settings;
mod soak;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use eventbus::bus::BusConfig;
use eventbus::{Broker, EventBus, MemoryBroker};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget};
use time::OffsetDateTime;

use crate::workload::{self, Layout, LiveParams, PARTITIONS, TOPICS};
use drain::{Backlog, Drain};
use report::{BenchReport, BrokerReport, LevelReport, Parallelism};

const KAFKA_ENV: &str = "EVENTBUS_KAFKA_BROKERS";
const NATS_ENV: &str = "EVENTBUS_NATS_URL";

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Brokers to measure, comma-separated: memory, kafka, nats.
    #[arg(long, value_delimiter = ',', default_values_t = [BrokerKind::Memory])]
    pub brokers: Vec<BrokerKind>,

    /// Pressure levels (messages per level), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [500u64, 2_000, 5_000, 10_000])]
    pub levels: Vec<u64>,

    /// Add the 100,000-message level.
    #[arg(long)]
    pub with_100k: bool,

    /// Kafka bootstrap servers [default: $EVENTBUS_KAFKA_BROKERS or 127.0.0.1:9092].
    #[arg(long, value_name = "ADDR")]
    pub kafka_brokers: Option<String>,

    /// Let the Kafka producer batch records. Off by default because tansu 0.6
    /// skips the rest of a batch when a fetch starts inside it (docs/kafka.md);
    /// turn it on against Apache Kafka.
    #[arg(long)]
    pub kafka_batching: bool,

    /// Kafka consumers' fetch.wait.max.ms (ours and the plain client's) [default: the library's].
    #[arg(long, value_name = "MS")]
    pub kafka_fetch_wait_ms: Option<u64>,

    /// The Kafka producer's linger.ms [default: the library's].
    #[arg(long, value_name = "MS")]
    pub kafka_linger_ms: Option<u64>,

    /// NATS server URL [default: $EVENTBUS_NATS_URL or nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,

    /// Give up connecting to a broker after this many seconds.
    #[arg(long, default_value_t = 5)]
    pub connect_timeout_secs: u64,

    /// Publishes in flight per topic (each aggregate still one at a time, in order).
    #[arg(long, default_value_t = 32)]
    pub publish_concurrency: usize,

    /// The bus's commit interval in ms [default: the library's, ConsumerConfig::default()].
    #[arg(long, value_name = "MS")]
    pub commit_interval_ms: Option<u64>,

    /// Messages read ahead of the bus per session: Kafka's max_buffered, NATS's
    /// max_ack_pending per stream [default: the library's, KafkaConfig/NatsConfig::default()].
    #[arg(long, value_name = "N")]
    pub read_ahead: Option<usize>,

    /// Workers of the bus's pool [default: the library's, PoolConfig::default()].
    #[arg(long, value_name = "N")]
    pub pool_workers: Option<usize>,

    /// Jobs the bus's pool holds [default: the library's, PoolConfig::default()].
    #[arg(long, value_name = "N")]
    pub pool_capacity: Option<usize>,

    /// Skip the read-back against the plain rdkafka / async-nats consumers.
    #[arg(long)]
    pub no_raw: bool,

    /// Read-backs per level and side (ours, plain client), alternating; the medians are compared.
    #[arg(long, default_value_t = 3)]
    pub read_back_runs: usize,

    /// Messages of the key-level parallelism run (1 ms handler, 1,000 aggregates, 3 partitions); 0 skips it.
    #[arg(long, default_value_t = 5_000)]
    pub parallel_messages: u64,

    /// Instead of the levels: publish and consume this many events in one run per
    /// broker (5 topics x 3 partitions, --soak-aggregates aggregates, in order),
    /// sampling resident memory; writes soak.json. Give it a --timeout-secs that fits.
    #[arg(long, value_name = "EVENTS")]
    pub soak: Option<u64>,

    /// Aggregates of the soak.
    #[arg(long, default_value_t = 10_000)]
    pub soak_aggregates: u64,

    /// Only draw the charts of an earlier run's report.json into --report-dir (nothing is measured).
    #[arg(long, value_name = "REPORT_JSON")]
    pub replot: Option<PathBuf>,

    /// Folder for report.json and the SVG charts.
    #[arg(long, default_value = "bench-report")]
    pub report_dir: PathBuf,

    #[command(flatten)]
    pub run: crate::RunArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    Memory,
    Kafka,
    Nats,
}

impl std::fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BrokerKind::Memory => "memory",
            BrokerKind::Kafka => "kafka",
            BrokerKind::Nats => "nats",
        })
    }
}

/// Why the bench could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--levels: every level needs at least 1 message")]
    EmptyLevel,
    #[error("broker {broker} is not reachable at {address}: {reason}")]
    Unreachable { broker: BrokerKind, address: String, reason: String },
    #[error("broker {0} is not compiled in (build with --features {0})")]
    NotCompiled(BrokerKind),
    #[error("{0}")]
    Report(String),
}

/// A connected broker, with what the bench needs beyond the trait.
enum Target {
    Memory,
    #[cfg(feature = "kafka")]
    Kafka {
        broker: eventbus::broker::kafka::KafkaBroker,
        address: String,
    },
    #[cfg(feature = "nats")]
    Nats {
        broker: eventbus::broker::nats::NatsBroker,
        address: String,
    },
}

fn from_env(flag: &Option<String>, var: &str, default: &str) -> String {
    flag.clone().or_else(|| std::env::var(var).ok().filter(|v| !v.trim().is_empty())).unwrap_or_else(|| default.into())
}

/// Connects every broker asked for before anything runs, so an unreachable
/// one fails the command at once, by name.
async fn connect(kind: BrokerKind, args: &BenchArgs, bus: &BusConfig) -> Result<Target, BenchError> {
    let timeout = Duration::from_secs(args.connect_timeout_secs.max(1));
    let unreachable =
        |address: &str, reason: String| BenchError::Unreachable { broker: kind, address: address.into(), reason };
    match kind {
        BrokerKind::Memory => Ok(Target::Memory),
        #[cfg(feature = "kafka")]
        BrokerKind::Kafka => {
            use eventbus::broker::kafka::KafkaBroker;
            let address = from_env(&args.kafka_brokers, KAFKA_ENV, "127.0.0.1:9092");
            let config = settings::kafka_config(args, bus, &address);
            let connecting = tokio::time::timeout(timeout, KafkaBroker::connect(config));
            let broker = match connecting.await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return Err(unreachable(&address, e.to_string())),
                Err(_) => return Err(unreachable(&address, format!("no answer within {timeout:?}"))),
            };
            Ok(Target::Kafka { broker, address })
        }
        #[cfg(feature = "nats")]
        BrokerKind::Nats => {
            use eventbus::broker::nats::NatsBroker;
            let address = from_env(&args.nats_url, NATS_ENV, "nats://127.0.0.1:4222");
            let config = settings::nats_config(args, bus, &address);
            match tokio::time::timeout(timeout + Duration::from_secs(1), NatsBroker::connect(config)).await {
                Ok(Ok(broker)) => Ok(Target::Nats { broker, address }),
                Ok(Err(e)) => Err(unreachable(&address, e.to_string())),
                Err(_) => Err(unreachable(&address, format!("no answer within {timeout:?}"))),
            }
        }
        #[allow(unreachable_patterns)]
        other => Err(BenchError::NotCompiled(other)),
    }
}

pub async fn run(args: BenchArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_inner(args: BenchArgs) -> Result<bool, BenchError> {
    if let Some(path) = &args.replot {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::Report(format!("{}: {e}", path.display())))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| BenchError::Report(format!("{}: {e}", path.display())))?;
        std::fs::create_dir_all(&args.report_dir)
            .map_err(|e| BenchError::Report(format!("report folder {}: {e}", args.report_dir.display())))?;
        let files = report::draw_charts(&json, &args.report_dir).map_err(BenchError::Report)?;
        println!("charts: {}", files.join(", "));
        return Ok(true);
    }
    let mut levels = args.levels.clone();
    if args.with_100k && !levels.contains(&100_000) {
        levels.push(100_000);
    }
    if levels.is_empty() || levels.contains(&0) {
        return Err(BenchError::EmptyLevel);
    }
    let mut kinds: Vec<BrokerKind> = Vec::new();
    for &k in &args.brokers {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    let (config, effective) = settings::bus_config(&args);
    let mut targets = Vec::new();
    for &kind in &kinds {
        targets.push(connect(kind, &args, &config).await?);
    }

    let machine = workload::machine_facts();
    let load_average_start = workload::load_average();
    let started_at =
        OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    println!("machine: {}", machine.describe());
    println!(
        "scenario: {TOPICS} topics x {PARTITIONS} partitions, aggregates = messages/10 (50..1000), levels {levels:?}, \
         {} publishes in flight per topic, load average {}",
        args.publish_concurrency,
        load_average_start.map_or("-".into(), |l| format!("{l:.2}")),
    );
    println!("{}", effective.describe());
    // A fresh prefix per run: reruns never see an earlier run's topics or groups.
    let run_id = format!("ebb-{:08x}", rand::random::<u32>());
    let progress = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    if let Some(events) = args.soak {
        let mut soaks = Vec::new();
        for target in &targets {
            soaks.push(run_soak(target, &run_id, events, &args, &config, &progress).await);
        }
        let _ = progress.clear();
        let passed = soaks.iter().all(|s| s.passed);
        let report = soak::SoakRun {
            machine,
            started_at,
            load_average_start,
            load_average_end: workload::load_average(),
            config: effective,
            soaks,
            passed,
        };
        soak::print(&report.soaks);
        std::fs::create_dir_all(&args.report_dir)
            .map_err(|e| BenchError::Report(format!("report folder {}: {e}", args.report_dir.display())))?;
        let path = args.report_dir.join("soak.json");
        let json = serde_json::to_string_pretty(&report).map_err(|e| BenchError::Report(e.to_string()))?;
        std::fs::write(&path, &json).map_err(|e| BenchError::Report(format!("{}: {e}", path.display())))?;
        println!("report: {}", path.display());
        if args.run.json {
            println!("{json}");
        }
        println!("result: {}", if passed { "PASS" } else { "FAIL" });
        return Ok(passed);
    }
    let mut brokers = Vec::new();
    for target in &targets {
        let report = match target {
            Target::Memory => {
                run_broker(MemoryBroker::default(), target, &run_id, &levels, &args, &config, &progress).await
            }
            #[cfg(feature = "kafka")]
            Target::Kafka { broker, .. } => {
                run_broker(broker.clone(), target, &run_id, &levels, &args, &config, &progress).await
            }
            #[cfg(feature = "nats")]
            Target::Nats { broker, .. } => {
                run_broker(broker.clone(), target, &run_id, &levels, &args, &config, &progress).await
            }
        };
        brokers.push(report);
    }
    let _ = progress.clear();

    let passed = brokers.iter().all(BrokerReport::passed);
    let report = BenchReport {
        machine,
        load_average_start,
        load_average_end: workload::load_average(),
        started_at,
        config: effective,
        brokers,
        passed,
    };
    println!();
    println!("machine: {}", report.machine.describe());
    println!("{}", report.config.describe());
    report::print_tables(&report);
    for b in &report.brokers {
        let level_errors = b.levels.iter().flat_map(|l| {
            l.live
                .errors
                .iter()
                .chain(&l.live.violation_examples)
                .map(move |e| format!("level {}: {e}", l.live.messages))
        });
        let par_errors = b.parallelism.iter().flat_map(|p| p.errors.iter().map(|e| format!("parallelism: {e}")));
        for e in b.errors.iter().cloned().chain(level_errors).chain(par_errors) {
            println!("{}: {e}", b.broker);
        }
    }
    let files = report::write_files(&report, &args.report_dir).map_err(BenchError::Report)?;
    println!("report: {}", files.join(", "));
    if args.run.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| BenchError::Report(e.to_string()))?;
        println!("{json}");
    }
    println!("result: {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

impl Target {
    fn kind(&self) -> BrokerKind {
        match self {
            Target::Memory => BrokerKind::Memory,
            #[cfg(feature = "kafka")]
            Target::Kafka { .. } => BrokerKind::Kafka,
            #[cfg(feature = "nats")]
            Target::Nats { .. } => BrokerKind::Nats,
        }
    }

    fn address(&self) -> Option<String> {
        match self {
            Target::Memory => None,
            #[cfg(feature = "kafka")]
            Target::Kafka { address, .. } => Some(address.clone()),
            #[cfg(feature = "nats")]
            Target::Nats { address, .. } => Some(address.clone()),
        }
    }

    /// `logical` topics × `partitions`; on NATS each partition is a stream.
    fn layout(&self, prefix: &str, logical: usize, partitions: u32) -> Layout {
        match self.kind() {
            BrokerKind::Nats => Layout::split(prefix, logical, partitions),
            _ => Layout::partitioned(prefix, logical, partitions),
        }
    }

    /// The plain client reads `layout`'s topics; `None` on the memory broker.
    async fn raw_drain(
        &self,
        layout: &Layout,
        group: &str,
        expected: u64,
        deadline: tokio::time::Instant,
        bar: ProgressBar,
    ) -> Option<Result<Drain, String>> {
        match self {
            Target::Memory => None,
            #[cfg(feature = "kafka")]
            Target::Kafka { broker, address } => {
                let fetch_wait = broker.config().fetch_max_wait;
                Some(raw::kafka(address, group, fetch_wait, &layout.topics, expected, deadline, bar).await)
            }
            #[cfg(feature = "nats")]
            Target::Nats { broker, .. } => {
                let streams: Vec<String> = layout.topics.iter().map(|t| broker.config().stream_name(t)).collect();
                Some(raw::nats(&broker.jetstream(), &streams, expected, deadline, bar).await)
            }
        }
    }

    /// Deletes what a level created: NATS streams (a failure is an error),
    /// Kafka topics (best effort, through a plain admin client: the adapter
    /// has no delete; a broker that refuses gets a warning). The memory
    /// broker's topics go with the process.
    async fn cleanup(&self, topics: &[String]) -> Vec<String> {
        let mut errors = Vec::new();
        match self {
            #[cfg(feature = "nats")]
            Target::Nats { broker, .. } => {
                for t in topics {
                    if let Err(e) = broker.delete_topic(t).await {
                        errors.push(format!("deleting stream of {t}: {e}"));
                    }
                }
            }
            #[cfg(feature = "kafka")]
            Target::Kafka { address, .. } => {
                if let Err(e) = raw::kafka_delete_topics(address, topics).await {
                    eprintln!("warning: kafka: topics of this level not deleted: {e}");
                }
            }
            _ => {}
        }
        errors
    }
}

fn bar(progress: &MultiProgress, len: u64, prefix: String) -> ProgressBar {
    let bar = progress.add(ProgressBar::new(len).with_style(workload::bar_style()));
    bar.set_prefix(prefix);
    bar
}

async fn run_broker<B: Broker + Clone>(
    broker: B,
    target: &Target,
    run_id: &str,
    levels: &[u64],
    args: &BenchArgs,
    config: &BusConfig,
    progress: &MultiProgress,
) -> BrokerReport {
    let kind = target.kind();
    let timeout = Duration::from_secs(args.run.timeout_secs.max(1));
    let mut report = BrokerReport {
        broker: kind.to_string(),
        address: target.address(),
        levels: Vec::new(),
        parallelism: None,
        errors: Vec::new(),
    };
    for &messages in levels {
        let prefix = format!("{run_id}-{kind}-{messages}");
        let layout = target.layout(&prefix, TOPICS, PARTITIONS);
        let mut level_config = config.clone();
        level_config.consumer.group = format!("{prefix}-live");
        let params = LiveParams {
            messages,
            aggregates: workload::seed_aggregates(messages),
            handler: Duration::ZERO,
            publish_concurrency: args.publish_concurrency,
            timeout,
            config: level_config,
            label: format!("{kind} {messages}"),
        };
        let live = workload::run_live(broker.clone(), &layout, &params, progress).await;
        let mut level = LevelReport {
            live,
            ours_drain: None,
            raw_drain: None,
            ours_runs_eps: Vec::new(),
            raw_runs_eps: Vec::new(),
            ours_vs_raw: None,
            load_average: None,
        };
        let complete = level.live.sent == messages && level.live.errors.is_empty();
        if complete && !args.no_raw && kind != BrokerKind::Memory {
            let (mut ours, mut raws) = (Vec::new(), Vec::new());
            // Ours and the plain client alternate, each run in new groups, so a
            // burst of load elsewhere hits both sides; the medians are compared.
            for run in 1..=args.read_back_runs.max(1) {
                let mut drain_config = config.clone();
                drain_config.consumer.group = format!("{prefix}-ours{run}");
                let deadline = tokio::time::Instant::now() + timeout;
                let b = bar(progress, messages, format!("{kind} {messages} ours read #{run}"));
                let backlog = Backlog { topics: &layout.topics, handler: Duration::ZERO, expected: messages, deadline };
                match drain::ours(broker.clone(), &drain_config, backlog, b).await {
                    Ok(d) => ours.push(d),
                    Err(e) => level.live.errors.push(format!("read-back by our bus: {e}")),
                }
                let deadline = tokio::time::Instant::now() + timeout;
                let b = bar(progress, messages, format!("{kind} {messages} raw read #{run}"));
                match target.raw_drain(&layout, &format!("{prefix}-raw{run}"), messages, deadline, b).await {
                    Some(Ok(d)) => raws.push(d),
                    Some(Err(e)) => level.live.errors.push(format!("read-back by the plain client: {e}")),
                    None => {}
                }
            }
            level.ours_runs_eps = ours.iter().map(|d| d.eps).collect();
            level.raw_runs_eps = raws.iter().map(|d| d.eps).collect();
            level.ours_drain = median(ours);
            level.raw_drain = median(raws);
            if let (Some(o), Some(r)) = (&level.ours_drain, &level.raw_drain) {
                level.ours_vs_raw = (r.eps > 0.0).then(|| o.eps / r.eps);
            }
        }
        level.load_average = workload::load_average();
        report.errors.extend(target.cleanup(&layout.topics).await);
        report.levels.push(level);
    }
    if args.parallel_messages > 0 {
        let p = parallelism(broker, target, run_id, args, config, progress).await;
        report.parallelism = Some(p);
    }
    report
}

/// One soak on `target`; on the memory broker the log's bytes are counted
/// from the broker afterwards, so they can be told apart from the bus's.
async fn run_soak(
    target: &Target,
    run_id: &str,
    events: u64,
    args: &BenchArgs,
    config: &BusConfig,
    progress: &MultiProgress,
) -> soak::SoakReport {
    let kind = target.kind();
    let prefix = format!("{run_id}-{kind}-soak");
    let layout = target.layout(&prefix, TOPICS, PARTITIONS);
    let mut config = config.clone();
    config.consumer.group = prefix;
    let timeout = Duration::from_secs(args.run.timeout_secs.max(1));
    let (aggs, conc) = (args.soak_aggregates, args.publish_concurrency);
    let name = kind.to_string();
    let mut report = match target {
        Target::Memory => {
            let broker = MemoryBroker::default();
            let mut r = soak::run(broker.clone(), &name, &layout, events, aggs, &config, conc, timeout, progress).await;
            let bytes: usize = layout
                .topics
                .iter()
                .map(|t| {
                    broker
                        .read_topic(t)
                        .iter()
                        .map(|d| {
                            let headers: usize = d.headers.iter().map(|(k, v)| k.len() + v.len() + 48 + 32).sum();
                            // The record (88), its payload, key and header list allocations (16 each).
                            d.payload.len() + d.key.as_ref().map_or(0, Vec::len) + headers + 88 + 3 * 16
                        })
                        .sum::<usize>()
                })
                .sum();
            soak::summarize(&mut r, Some(bytes as u64));
            r
        }
        #[cfg(feature = "kafka")]
        Target::Kafka { broker, .. } => {
            let mut r = soak::run(broker.clone(), &name, &layout, events, aggs, &config, conc, timeout, progress).await;
            soak::summarize(&mut r, None);
            r
        }
        #[cfg(feature = "nats")]
        Target::Nats { broker, .. } => {
            let mut r = soak::run(broker.clone(), &name, &layout, events, aggs, &config, conc, timeout, progress).await;
            soak::summarize(&mut r, None);
            r
        }
    };
    report.errors.extend(target.cleanup(&layout.topics).await);
    report.passed &= report.errors.is_empty();
    report
}

/// The run with the median rate (the lower middle one of an even count).
fn median(mut runs: Vec<Drain>) -> Option<Drain> {
    runs.sort_by(|a, b| a.eps.total_cmp(&b.eps));
    let mid = runs.len().checked_sub(1)? / 2;
    Some(runs.swap_remove(mid))
}

const PARALLEL_AGGREGATES: u64 = 1_000;
const PARALLEL_HANDLER: Duration = Duration::from_millis(1);

/// 1,000 aggregates on one topic of 3 partitions, published first; then the
/// seed's consume-and-wait consumer and our bus each read all of it with a
/// 1 ms handler, in new groups.
async fn parallelism<B: Broker + Clone>(
    broker: B,
    target: &Target,
    run_id: &str,
    args: &BenchArgs,
    config: &BusConfig,
    progress: &MultiProgress,
) -> Parallelism {
    let kind = target.kind();
    let messages = args.parallel_messages;
    let mut result = Parallelism {
        messages,
        aggregates: PARALLEL_AGGREGATES.min(messages),
        partitions: PARTITIONS,
        handler_ms: PARALLEL_HANDLER.as_secs_f64() * 1e3,
        ours: None,
        sequential: None,
        ratio: None,
        errors: Vec::new(),
        load_average: None,
    };
    let prefix = format!("{run_id}-{kind}-par");
    let layout = target.layout(&prefix, 1, PARTITIONS);
    let timeout = Duration::from_secs(args.run.timeout_secs.max(1));
    let published = prefill(broker.clone(), &layout, messages, args.publish_concurrency, config, progress, &kind).await;
    match published {
        Ok(()) => {
            let deadline = tokio::time::Instant::now() + timeout;
            let b = bar(progress, messages, format!("{kind} sequential 1ms"));
            let backlog = Backlog { topics: &layout.topics, handler: PARALLEL_HANDLER, expected: messages, deadline };
            match drain::sequential(&broker, &format!("{prefix}-seq"), backlog, b).await {
                Ok(d) => result.sequential = Some(d),
                Err(e) => result.errors.push(e),
            }
            let mut ours_config = config.clone();
            ours_config.consumer.group = format!("{prefix}-ours");
            let deadline = tokio::time::Instant::now() + timeout;
            let b = bar(progress, messages, format!("{kind} ours 1ms"));
            let backlog = Backlog { topics: &layout.topics, handler: PARALLEL_HANDLER, expected: messages, deadline };
            match drain::ours(broker.clone(), &ours_config, backlog, b).await {
                Ok(d) => result.ours = Some(d),
                Err(e) => result.errors.push(e),
            }
            if let (Some(o), Some(s)) = (&result.ours, &result.sequential) {
                result.ratio = (s.eps > 0.0).then(|| o.eps / s.eps);
            }
        }
        Err(e) => result.errors.push(e),
    }
    result.errors.extend(target.cleanup(&layout.topics).await);
    result.load_average = workload::load_average();
    result
}

/// Publishes the parallelism run's backlog through a bus that consumes nothing.
async fn prefill<B: Broker>(
    broker: B,
    layout: &Layout,
    messages: u64,
    concurrency: usize,
    config: &BusConfig,
    progress: &MultiProgress,
    kind: &BrokerKind,
) -> Result<(), String> {
    for t in &layout.topics {
        broker.ensure_topic(t, layout.partitions).await.map_err(|e| format!("ensure_topic {t}: {e}"))?;
    }
    let bus = std::sync::Arc::new(
        EventBus::builder(broker).config(config.clone()).build().map_err(|e| format!("build: {e}"))?,
    );
    let versions = workload::plan(messages, PARALLEL_AGGREGATES);
    let b = bar(progress, messages, format!("{kind} backlog published"));
    let (sent, _, errors) =
        workload::publish_in_order(bus.clone(), layout, &versions, concurrency, b.clone(), false).await;
    b.finish_and_clear();
    bus.close().await;
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None if sent < messages => Err(format!("published {sent} of {messages}")),
        None => Ok(()),
    }
}
