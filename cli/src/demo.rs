//! `eventbus demo`: the seed's Kafka-vs-NATS comparison scenario, run on the
//! in-memory broker through the real bus (consumer, commit frontier, global
//! keyed pool), with the order checker watching every handler.
//!
//! Per level: a fresh broker and bus, 5 topics × 3 partitions, aggregates =
//! messages / 10 clamped to 50..=1000, each aggregate bound to one topic and
//! its versions 1..n published in order while the bus consumes.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use eventbus::bus::ConfigError;
use eventbus::{BusConfig, MemoryBroker};
use indicatif::{MultiProgress, ProgressDrawTarget};
use serde::Serialize;

use crate::workload::{self, LevelResult, LiveParams, Machine, PARTITIONS, TOPICS};
use crate::DemoArgs;

#[derive(Debug, Serialize)]
struct Report<'a> {
    machine: &'a Machine,
    handler_us: u64,
    levels: &'a [LevelResult],
    passed: bool,
}

pub async fn run(args: DemoArgs) -> ExitCode {
    let config = match &args.config {
        Some(path) => match load_config(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => BusConfig::default(),
    };
    let levels: Vec<u64> = match args.messages {
        Some(n) => vec![n],
        None => args.levels.clone(),
    };
    if levels.is_empty() || levels.contains(&0) {
        eprintln!("error: --levels/--messages: every level needs at least 1 message");
        return ExitCode::from(2);
    }

    let machine = workload::machine_facts();
    println!("machine: {}", machine.describe());
    println!(
        "scenario: in-memory broker, {TOPICS} topics x {PARTITIONS} partitions, one global keyed pool \
         ({} workers, capacity {}), handler work {} us",
        config.pool.concurrency, config.pool.capacity, args.handler_us
    );

    let progress = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let mut results = Vec::new();
    for &messages in &levels {
        let params = LiveParams {
            messages,
            aggregates: workload::seed_aggregates(messages),
            handler: Duration::from_micros(args.handler_us),
            // One publish at a time per topic, as the seed's publisher did.
            publish_concurrency: 1,
            timeout: Duration::from_secs(args.run.timeout_secs),
            config: config.clone(),
            label: messages.to_string(),
        };
        let layout = workload::Layout::partitioned("demo.orders", TOPICS, PARTITIONS);
        let result = workload::run_live(MemoryBroker::default(), &layout, &params, &progress).await;
        results.push(result);
    }
    let _ = progress.clear();

    println!();
    print_table(&results);
    for r in &results {
        for e in &r.errors {
            println!("level {}: {e}", r.messages);
        }
        for ex in &r.violation_examples {
            println!("level {}: violation: {ex}", r.messages);
        }
    }
    let passed = results.iter().all(LevelResult::passed);
    if args.run.json {
        let report = Report { machine: &machine, handler_us: args.handler_us, levels: &results, passed };
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot serialize the report: {e}"),
        }
    }
    if passed {
        println!("result: PASS (every level: 100% handled, 0 order violations, 0 tasks alive after close)");
        ExitCode::SUCCESS
    } else {
        println!("result: FAIL");
        ExitCode::FAILURE
    }
}

fn load_config(path: &Path) -> Result<BusConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let parsed: Result<BusConfig, ConfigError> = match ext.as_deref() {
        Some("toml") => BusConfig::from_toml(&text),
        Some("yaml" | "yml") => BusConfig::from_yaml(&text),
        _ => return Err("unknown configuration format (use a .toml, .yaml or .yml file)".into()),
    };
    parsed.map_err(|e| e.to_string())
}


fn print_table(results: &[LevelResult]) {
    let header = [
        "messages", "aggs", "sent", "received", "success", "violations", "dups", "dead letters", "events/s",
        "p50 ms", "p99 ms", "tasks alive", "peak MiB",
    ];
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let mut row = vec![r.messages.to_string(), r.aggregates.to_string()];
            row.extend(r.check_cells());
            row.push(format!("{:.0}", r.throughput_eps));
            row.extend(r.end_cells());
            row
        })
        .collect();
    print!("{}", workload::render_table(&header, &rows));
}
