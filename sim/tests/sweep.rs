//! The seed sweep CI runs: `SIM_SEEDS` seeds (default 500) must all pass.
//! A longer sweep: `SIM_SEEDS=5000 cargo test -p sim --release --test sweep -- --nocapture`
//! (`SIM_SEED_START` moves the range).

use std::time::{Duration, Instant};

use sim::Builder;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

#[test]
fn seed_sweep() {
    let n = env("SIM_SEEDS", 500);
    let start = env("SIM_SEED_START", 0);
    let seeds: Vec<u64> = (start..start + n).collect();
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cfg = Builder::new();
    let began = Instant::now();
    let reports = sim::run_many(&cfg, &seeds, jobs, || {}, |_| {});
    let wall = began.elapsed();
    let sim: Duration = reports.iter().map(|r| r.sim_time).sum();
    let busy: Duration = reports.iter().map(|r| r.wall_time).sum();
    let mut counts = sim::history::Counts::default();
    reports.iter().for_each(|r| counts.add(&r.counts));
    println!(
        "{} seeds in {:.1}s on {jobs} threads: {:.0} seeds/min, {:.0}x simulated/wall per thread; {} faulty; {counts:?}",
        reports.len(),
        wall.as_secs_f64(),
        reports.len() as f64 * 60.0 / wall.as_secs_f64(),
        sim.as_secs_f64() / busy.as_secs_f64().max(1e-9),
        reports.iter().filter(|r| r.faulty).count(),
    );
    let failures: Vec<String> = reports.iter().filter(|r| !r.passed()).map(|r| r.failure_text()).collect();
    assert!(failures.is_empty(), "{} of {n} seeds failed:\n{}", failures.len(), failures.join("\n"));
    // The faults must bite: replays happened, sessions were lost, events were
    // dead-lettered, handlers panicked, dead letters were refused for a while
    // (and still landed: the checker finds no lost event).
    assert!(counts.duplicates > 0 && counts.sessions_lost > 0 && counts.dead_lettered > 0, "{counts:?}");
    assert!(counts.panics > 0 && counts.dead_letters_refused > 0, "{counts:?}");
    // The nemesis' switches bite too: with self-release off, stale commits
    // reach the broker and are fenced (and the checker still finds nothing);
    // short revoke timeouts fire while handlers run; the bus's backlog and
    // connection alerts fire on the simulated adapter's lag and link state.
    let stale: u64 = reports.iter().filter(|r| r.counts.no_self_release > 0).map(|r| r.counts.rejected_commits).sum();
    assert!(counts.no_self_release > 0 && stale > 0, "no fenced stale commit: {counts:?}");
    assert!(counts.short_revoke_timeout > 0 && counts.revoke_timeouts > 0, "{counts:?}");
    assert!(counts.random_order > 0 && counts.random_order < reports.len() as u64, "{counts:?}");
    assert!(counts.backlog_alerts > 0 && counts.disconnects > 0 && counts.reconnects > 0, "{counts:?}");
}

#[test]
fn fault_free_runs_have_no_duplicates() {
    let mut cfg = Builder::new();
    cfg.faults(false);
    for seed in 0..10 {
        let r = sim::run_seed(&cfg, seed);
        assert!(r.passed(), "{}", r.failure_text());
        assert!(!r.faulty);
        assert_eq!(r.counts.duplicates, 0, "seed {seed}: {:?}", r.counts);
        assert_eq!(r.counts.appended as i64, r.events, "seed {seed}: every publish stored once");
    }
}
