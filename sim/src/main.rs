//! `cargo run -p sim --release -- --seeds N` runs N seeds; `--seed S` replays one.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sim::{run_many, Builder};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of the eventbus consumer against a faulty broker (turmoil)")]
struct Args {
    /// Number of seeds to run (from --start).
    #[arg(long, default_value_t = 100, env = "SIM_SEEDS")]
    seeds: u64,
    /// Replays exactly this seed (prints its schedule and verdict).
    #[arg(long)]
    seed: Option<u64>,
    /// First seed of a sweep.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Threads (default: available cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// With --seed: print the full history.
    #[arg(long)]
    trace: bool,
    /// Length of the fault window, in simulated milliseconds.
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
    /// Events published per run (about).
    #[arg(long, default_value_t = 300)]
    events: usize,
    /// Upper bound of the seeds' maximum message latency, in ms.
    #[arg(long, default_value_t = 15)]
    max_latency_ms: u64,
    /// Upper bound of turmoil's random link failure rate.
    #[arg(long, default_value_t = 0.002)]
    fail_rate: f64,
    /// Upper bound of the handlers' transient failure rate.
    #[arg(long, default_value_t = 0.1)]
    handler_fail_rate: f64,
    /// Run without network, crash and close faults.
    #[arg(long)]
    no_faults: bool,
    /// In a sweep: print every seed's trace hash (`seed S trace hash H`).
    #[arg(long)]
    hashes: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut cfg = Builder::new();
    let min_latency = cfg.min_latency;
    cfg.duration(Duration::from_millis(args.duration_ms))
        .events(args.events)
        .latency(min_latency, Duration::from_millis(args.max_latency_ms))
        .fail_rate(args.fail_rate)
        .handler_fail_rate(args.handler_fail_rate)
        .faults(!args.no_faults);

    if let Some(seed) = args.seed {
        let report = cfg.seed(seed).run();
        println!("seed {seed}: {} events, faulty: {}", report.events, report.faulty);
        for switch in &report.switches {
            println!("  switch: {switch}");
        }
        for (t, a) in &report.schedule {
            println!("  {:>6}ms  {a}", t.as_millis());
        }
        if args.trace {
            for r in &report.records {
                println!("{r}");
            }
        }
        println!(
            "simulated {:.1}s in {:.2}s wall, {} records, trace hash {:016x}",
            report.sim_time.as_secs_f64(),
            report.wall_time.as_secs_f64(),
            report.records.len(),
            report.trace_hash
        );
        println!("{:?}", report.counts);
        if report.passed() {
            println!("PASS");
            return ExitCode::SUCCESS;
        }
        print!("{}", report.failure_text());
        return ExitCode::FAILURE;
    }

    let seeds: Vec<u64> = (args.start..args.start + args.seeds).collect();
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bar = ProgressBar::new(seeds.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} seeds {msg}")
            .expect("valid template"),
    );
    let failed = AtomicUsize::new(0);
    let started = Instant::now();
    let reports = run_many(
        &cfg,
        &seeds,
        jobs,
        || {},
        |r| {
            if !r.passed() {
                let n = failed.fetch_add(1, Ordering::Relaxed) + 1;
                bar.println(r.failure_text());
                bar.set_message(format!("{n} failed"));
            }
            bar.inc(1);
        },
    );
    bar.finish();
    let wall = started.elapsed();
    let sim: Duration = reports.iter().map(|r| r.sim_time).sum();
    let cpu: Duration = reports.iter().map(|r| r.wall_time).sum();
    let failures: Vec<_> = reports.iter().filter(|r| !r.passed()).collect();
    println!(
        "{} seeds in {:.1}s on {jobs} threads: {:.0} seeds/min, {:.1}s simulated per wall second per thread, {} faulty",
        reports.len(),
        wall.as_secs_f64(),
        reports.len() as f64 / wall.as_secs_f64() * 60.0,
        sim.as_secs_f64() / cpu.as_secs_f64().max(1e-9),
        reports.iter().filter(|r| r.faulty).count(),
    );
    if args.hashes {
        for r in &reports {
            println!("seed {} trace hash {:016x}", r.seed, r.trace_hash);
        }
    }
    let mut counts = sim::history::Counts::default();
    reports.iter().for_each(|r| counts.add(&r.counts));
    println!("totals: {counts:?}");
    let mut faults: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for r in &reports {
        for (_, action) in &r.schedule {
            // "crash consumer-2" and "crash consumer-0" are one kind.
            let mut kind = String::new();
            for c in action.to_string().chars() {
                if !c.is_ascii_digit() {
                    kind.push(c);
                } else if !kind.ends_with('N') {
                    kind.push('N');
                }
            }
            *faults.entry(kind).or_default() += 1;
        }
    }
    println!("scheduled faults: {faults:?}");
    let stale = |r: &&sim::RunReport| r.counts.no_self_release > 0;
    println!(
        "without self-release: {} seeds, {} rejected commits (other seeds: {})",
        reports.iter().filter(stale).count(),
        reports.iter().filter(stale).map(|r| r.counts.rejected_commits).sum::<u64>(),
        reports.iter().filter(|r| !stale(r)).map(|r| r.counts.rejected_commits).sum::<u64>(),
    );
    if failures.is_empty() {
        println!("{} passed, 0 failed", reports.len());
        ExitCode::SUCCESS
    } else {
        println!("{} passed, {} failed", reports.len() - failures.len(), failures.len());
        for r in &failures {
            println!("  seed {}: {} -> {}", r.seed, r.violations[0], r.replay_command());
        }
        ExitCode::FAILURE
    }
}
