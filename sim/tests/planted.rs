//! Teeth: plant a known bug in the production code (runtime switches in
//! `eventbus::planted`, compiled in by this crate's dev-dependency only) and
//! require the simulation to catch it within a bounded number of seeds.

use eventbus::planted::{plant, Bug};
use sim::Builder;

/// Runs seeds 0.. with `bug` planted until one fails with one of `rules`;
/// returns how many seeds that took.
fn seeds_to_catch(bug: Bug, rules: &[&str], limit: u64) -> u64 {
    let _planted = plant(bug);
    let cfg = Builder::new();
    for seed in 0..limit {
        let report = sim::run_seed(&cfg, seed);
        if let Some(v) = report.violations.iter().find(|v| rules.contains(&v.rule)) {
            let n = seed + 1;
            println!("{bug:?} caught after {n} seed(s): seed {seed} {v}");
            print!("{}", report.failure_text());
            return n;
        }
    }
    panic!("{bug:?} was not caught within {limit} seeds");
}

#[test]
fn commit_of_the_max_handled_offset_is_caught() {
    let n = seeds_to_catch(Bug::CommitMaxHandled, &["skipped-commit", "lost"], 20);
    assert!(n <= 20);
}

#[test]
fn concurrent_handling_of_one_aggregate_is_caught() {
    let n = seeds_to_catch(Bug::IgnoreKey, &["order", "concurrent"], 20);
    assert!(n <= 20);
}

#[test]
fn commit_before_the_handler_completes_is_caught() {
    let n = seeds_to_catch(Bug::CommitBeforeComplete, &["skipped-commit", "lost"], 20);
    assert!(n <= 20);
}

#[test]
fn dropping_queued_events_on_close_is_caught() {
    let n = seeds_to_catch(Bug::DropQueuedOnClose, &["lost", "skipped-commit"], 100);
    assert!(n <= 100);
}

/// How often each planted bug is caught over many seeds (for
/// docs/verification.md): `cargo test -p sim --release --test planted -- --ignored --nocapture`.
#[test]
#[ignore = "statistics, not a check"]
fn catch_rates() {
    let seeds: u64 = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let cfg = Builder::new();
    for bug in Bug::ALL {
        let _planted = plant(bug);
        let mut caught = 0;
        let mut first = None;
        let mut rules = std::collections::BTreeMap::new();
        for seed in 0..seeds {
            let report = sim::run_seed(&cfg, seed);
            if !report.passed() {
                caught += 1;
                first.get_or_insert(seed);
                *rules.entry(report.violations[0].rule).or_insert(0) += 1;
            }
        }
        println!("{bug:?}: caught in {caught}/{seeds} seeds, first at seed {first:?}, first rule per seed {rules:?}");
    }
}
