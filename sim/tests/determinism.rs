//! Same seed, same run: the full history of a faulty seed hashes the same
//! twice, and differs from another seed's.

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
