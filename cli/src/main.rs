//! The `eventbus` command line: `eventbus demo` runs the seed's comparison
//! scenario (5 topics × 3 partitions, ordered aggregates, rising pressure) on
//! the in-memory broker and checks the bus's contract at every level;
//! `eventbus bench` measures the same scenario on memory, Kafka and NATS.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod workload;

#[derive(Debug, Parser)]
#[command(name = "eventbus", version, about = "A verified keyed event bus")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the bench's arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the seed's comparison scenario on the in-memory broker.
    Demo(DemoArgs),
    /// Measure the seed's scenario on memory, Kafka and NATS, against the plain clients.
    Bench(bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Pressure levels (messages per level), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [500u64, 2_000, 5_000, 10_000], conflicts_with = "messages")]
    pub levels: Vec<u64>,

    /// Run a single level with this many messages.
    #[arg(long)]
    pub messages: Option<u64>,

    /// Simulated handler work in microseconds (tokio sleep; 0 = none).
    #[arg(long, default_value_t = 0)]
    pub handler_us: u64,

    /// Bus configuration file (`.toml`, `.yaml` or `.yml`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// Options every scenario command has.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Also print the results as JSON.
    #[arg(long)]
    pub json: bool,

    /// Give up on a level (of the bench: on one phase of a level) after this many seconds (reported as a failure).
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,

    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let workers = match &cli.command {
        Command::Demo(args) => args.run.workers,
        Command::Bench(args) => args.run.workers,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(w) = workers {
        builder.worker_threads(w.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot build the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
    };
    // Do not wait for abandoned blocking calls: a connect to an unreachable
    // Kafka broker, cut off by the bench's timeout, would otherwise hold the
    // exit for librdkafka's whole request timeout.
    runtime.shutdown_background();
    code
}
