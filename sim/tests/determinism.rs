//! Same seed, same run: the full history of a faulty seed hashes the same
//! twice in this process and in two fresh processes (the `sim` binary's
//! replay), and differs from another seed's.
//!
//! In-process repeats share whatever a process draws once (std's and ahash's
//! random hash keys, tokio's per-thread rngs); separate processes draw them
//! anew, so an unbiased `select!` or a randomly keyed map that is iterated
//! somewhere on the simulated path shows up as a different hash there.

use std::process::Command;

use sim::scenario::{Action, Scenario};
use sim::Builder;

/// The first seed whose schedule crashes the broker, takes a consumer down
/// and partitions the network: the richest kind of run.
fn rich_seed(cfg: &Builder) -> u64 {
    (0..1000)
        .find(|&seed| {
            let s = Scenario::generate(cfg, seed);
            let has = |f: &dyn Fn(&Action) -> bool| s.schedule.iter().any(|(_, a)| f(a));
            has(&|a| matches!(a, Action::CrashBroker))
                && has(&|a| matches!(a, Action::CloseConsumer(_) | Action::CrashConsumer(_)))
                && has(&|a| matches!(a, Action::Partition(..)))
        })
        .expect("some seed has every kind of fault")
}

#[test]
fn same_seed_same_history() {
    let cfg = Builder::new();
    let seed = rich_seed(&cfg);
    let a = sim::run_seed(&cfg, seed);
    let b = sim::run_seed(&cfg, seed);
    assert!(a.passed(), "{}", a.failure_text());
    assert!(a.records.len() > 500, "a real run: {} records", a.records.len());
    assert_eq!(a.records.len(), b.records.len(), "seed {seed}: history lengths differ");
    if let Some(i) = (0..a.records.len()).find(|&i| a.records[i] != b.records[i]) {
        panic!("seed {seed}: histories diverge at record {i}:\n  {}\n  {}", a.records[i], b.records[i]);
    }
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.sim_time, b.sim_time);
    println!("seed {seed}: {} records, trace hash {:016x}, {:?}", a.records.len(), a.trace_hash, a.counts);

    let other = sim::run_seed(&cfg, seed + 1);
    assert_ne!(a.trace_hash, other.trace_hash, "different seeds, different runs");
}

/// Runs the `sim` binary with `args`; returns its output, which must be a success.
fn sim_binary(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sim")).args(args).output().expect("the sim binary runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "sim {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// Every `trace hash H` of an output, with the word before it (the seed in a sweep).
fn hashes(text: &str) -> Vec<u64> {
    text.split("trace hash ")
        .skip(1)
        .map(|rest| {
            let hex = rest.split_whitespace().next().unwrap_or("");
            u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("trace hash {hex:?}: {e}"))
        })
        .collect()
}

/// The trace hash the `sim` binary prints when it replays `seed`.
fn replay_hash(seed: u64) -> u64 {
    let text = sim_binary(&["--seed", &seed.to_string()]);
    *hashes(&text).first().unwrap_or_else(|| panic!("no trace hash in the replay's output:\n{text}"))
}

#[test]
fn same_seed_same_hash_in_fresh_processes() {
    let cfg = Builder::new();
    let seed = rich_seed(&cfg);
    let here = sim::run_seed(&cfg, seed);
    assert!(here.passed(), "{}", here.failure_text());
    let first = replay_hash(seed);
    let second = replay_hash(seed);
    assert_eq!(first, second, "seed {seed}: two processes, two histories");
    assert_eq!(first, here.trace_hash, "seed {seed}: the replay command reproduces the test's run");
}

/// A sweep of 24 seeds, in two processes on two threads each (so seeds run
/// on different threads in each) and here on one: equal hashes, seed by seed.
#[test]
fn sweeps_agree_across_processes_and_threads() {
    let seeds: Vec<u64> = (0..24).collect();
    let here: Vec<u64> =
        sim::run_many(&Builder::new(), &seeds, 1, || {}, |_| {}).iter().map(|r| r.trace_hash).collect();
    for _ in 0..2 {
        let text = sim_binary(&["--seeds", "24", "--jobs", "2", "--hashes"]);
        assert_eq!(hashes(&text), here, "a sweep in a fresh process differs:\n{text}");
    }
}
