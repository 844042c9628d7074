//! Deterministic simulation of the eventbus with turmoil: the production
//! consumer and pool, unchanged, against a faulty simulated Kafka-like broker.
//!
//! - [`broker`]: the broker host (log and committed offsets on a "disk"
//!   that survives its crashes; groups and sessions that do not),
//! - [`proto`]: the framed protocol between broker and clients,
//! - [`adapter`]: `SimBroker`/`SimSession`, the `eventbus::broker` traits over it,
//! - [`hosts`]: the producer and consumer hosts' software, recording handlers,
//! - [`builder`]: the bounds of a simulation ([`Builder`]),
//! - [`scenario`]: what a seed decides within them (latency, handler faults, the nemesis),
//! - [`runner`]: one seed from start to verdict, [`verdict`]: the rules a history must keep.
//!
//! `cargo run -p sim --release -- --seeds 200` sweeps seeds;
//! `cargo run -p sim --release -- --seed S` replays one. See `docs/verification.md`.

pub mod adapter;
pub mod broker;
pub mod builder;
pub mod history;
pub mod hosts;
pub mod proto;
pub mod runner;
pub mod scenario;
pub mod verdict;

pub use builder::Builder;
pub use runner::{run_seed, RunReport};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Runs `seeds` on `jobs` threads (each simulation lives on one thread),
/// calling `init` once on each thread first and `done` after every seed.
pub fn run_many(
    cfg: &Builder,
    seeds: &[u64],
    jobs: usize,
    init: impl Fn() + Sync,
    done: impl Fn(&RunReport) + Sync,
) -> Vec<RunReport> {
    let next = AtomicU64::new(0);
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1).min(seeds.len().max(1)) {
            s.spawn(|| {
                init();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&seed) = seeds.get(i) else { break };
                    let mut report = run_seed(cfg, seed);
                    done(&report);
                    if report.passed() {
                        // Keep memory flat over long sweeps.
                        report.records = Vec::new();
                    }
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(report);
                }
            });
        }
    });
    let mut reports = out.into_inner().unwrap_or_else(|p| p.into_inner());
    reports.sort_by_key(|r| r.seed);
    reports
}
