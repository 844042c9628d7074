//! Test support, not service API (feature `testing`): [`OrderChecker`], the
//! per-aggregate order checker of the crate's tests and of `eventbus demo` /
//! `eventbus bench` (the `eventbus-cli` crate), for users' tests of their
//! handlers too. The simulator in `sim/` does not use it: it has its own
//! checker (`sim/src/verdict.rs`), over the history it records.
//!
//! Every read and update of an aggregate's state happens under one lock in
//! one call, so the checker cannot invent violations the way the seed's
//! read-then-write checker did. Vocabulary follows Jepsen's Kafka checker.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
struct Aggregate {
    /// Highest version that completed.
    max_completed: i64,
    /// Version whose handler is running now.
    running: Option<i64>,
    /// Completions per version.
    completions: BTreeMap<i64, u32>,
}

/// Counts of a checked history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderReport {
    /// Aggregates seen.
    pub aggregates: usize,
    /// Distinct (aggregate, version) pairs that completed.
    pub handled: u64,
    /// Completions beyond the first of a version (redeliveries).
    pub duplicates: u64,
    /// A version started before its predecessor completed, or while another
    /// version of the aggregate was running.
    pub violations: u64,
    /// Expected versions that never completed.
    pub missing: u64,
    /// The first few violations, for the failure message.
    pub examples: Vec<String>,
}

impl OrderReport {
    /// No violation and nothing missing (duplicates are allowed: delivery is at least once).
    pub fn is_clean(&self) -> bool {
        self.violations == 0 && self.missing == 0
    }
}

/// Records handler starts and completions per aggregate; versions start at 1.
#[derive(Debug, Default)]
pub struct OrderChecker {
    state: Mutex<(BTreeMap<String, Aggregate>, u64, Vec<String>)>,
}

impl OrderChecker {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handler starts on `version` of `aggregate`. A replay of an already
    /// completed version is allowed (after a crash or rebalance); starting
    /// a version whose predecessor has not completed, or while another
    /// version runs, is a violation.
    pub fn begin(&self, aggregate: &str, version: i64) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (aggs, violations, examples) = &mut *guard;
        let agg = aggs.entry(aggregate.to_string()).or_default();
        let mut problem = None;
        if let Some(running) = agg.running {
            problem = Some(format!("{aggregate}: v{version} started while v{running} was running"));
        } else if version > agg.max_completed + 1 {
            problem = Some(format!("{aggregate}: v{version} started before v{} completed", version - 1));
        }
        agg.running = Some(version);
        if let Some(p) = problem {
            *violations += 1;
            if examples.len() < 10 {
                examples.push(p);
            }
        }
    }

    /// The handler of `version` completed successfully.
    pub fn complete(&self, aggregate: &str, version: i64) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let agg = guard.0.entry(aggregate.to_string()).or_default();
        if agg.running == Some(version) {
            agg.running = None;
        }
        agg.max_completed = agg.max_completed.max(version);
        *agg.completions.entry(version).or_default() += 1;
    }

    /// The handler of `version` returned an error (it may be retried).
    pub fn fail(&self, aggregate: &str, version: i64) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let agg = guard.0.entry(aggregate.to_string()).or_default();
        if agg.running == Some(version) {
            agg.running = None;
        }
    }

    /// A version that will never be handled (it went to the dead letter):
    /// it counts as done for ordering and for `missing`.
    pub fn skip(&self, aggregate: &str, version: i64) {
        self.complete(aggregate, version);
    }

    /// Checks the history against `expected[aggregate] = last version`.
    pub fn report(&self, expected: &BTreeMap<String, i64>) -> OrderReport {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (aggs, violations, examples) = &*guard;
        let mut report = OrderReport { violations: *violations, examples: examples.clone(), ..Default::default() };
        report.aggregates = aggs.len();
        for agg in aggs.values() {
            for &n in agg.completions.values() {
                report.handled += 1;
                report.duplicates += u64::from(n - 1);
            }
        }
        for (name, &last) in expected {
            let done = aggs.get(name).map(|a| &a.completions);
            for v in 1..=last {
                if !done.is_some_and(|d| d.contains_key(&v)) {
                    report.missing += 1;
                }
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_history_is_clean() {
        let c = OrderChecker::new();
        for v in 1..=3 {
            c.begin("a", v);
            c.complete("a", v);
        }
        let r = c.report(&BTreeMap::from([("a".to_string(), 3)]));
        assert!(r.is_clean());
        assert_eq!((r.handled, r.duplicates), (3, 0));
    }

    #[test]
    fn out_of_order_and_concurrent_starts_are_violations() {
        let c = OrderChecker::new();
        c.begin("a", 2); // before v1 completed
        c.complete("a", 2);
        c.begin("b", 1);
        c.begin("b", 2); // while v1 runs
        assert_eq!(c.report(&BTreeMap::new()).violations, 2);
    }

    #[test]
    fn replay_after_commit_is_a_duplicate_not_a_violation() {
        let c = OrderChecker::new();
        for v in [1, 2, 3, 2, 3, 4] {
            c.begin("a", v);
            c.complete("a", v);
        }
        let r = c.report(&BTreeMap::from([("a".to_string(), 5)]));
        assert_eq!((r.violations, r.duplicates, r.missing), (0, 2, 1));
    }

    #[test]
    fn a_failed_attempt_then_retry_is_in_order() {
        let c = OrderChecker::new();
        c.begin("a", 1);
        c.fail("a", 1);
        c.begin("a", 1);
        c.complete("a", 1);
        assert!(c.report(&BTreeMap::from([("a".to_string(), 1)])).is_clean());
    }
}
