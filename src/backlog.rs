//! Backlog detection: a value (the pool's queue, the group's consumer lag)
//! that stays above a threshold for a while starts a backlog; one back at or
//! below it (for `recover_for`) ends it. The detector is pure: the observer
//! feeds it samples with their instant, so tests need no clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What a backlog is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BacklogSource {
    /// Tasks waiting in the global pool (`Stats::queued`).
    Pool,
    /// The group's total lag over every partition of its subscribed topics
    /// (sum of end offset − committed offset).
    ConsumerLag,
}

impl BacklogSource {
    /// The `source` label of the `eventbus_backlog` gauge.
    pub fn as_str(self) -> &'static str {
        match self {
            BacklogSource::Pool => "pool",
            BacklogSource::ConsumerLag => "consumer_lag",
        }
    }
}

/// A backlog starting or ending, as the `on_backlog` callback receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BacklogEvent {
    /// `value` stayed above `threshold` for the configured `for_duration`.
    Started {
        /// What is measured.
        source: BacklogSource,
        /// The sample that started it.
        value: u64,
        /// The configured threshold.
        threshold: u64,
    },
    /// `value` is back at or below `threshold` (for `recover_for`).
    Recovered {
        /// What is measured.
        source: BacklogSource,
        /// The sample that ended it.
        value: u64,
        /// The configured threshold.
        threshold: u64,
    },
}

impl BacklogEvent {
    /// The source it is about.
    pub fn source(&self) -> BacklogSource {
        match self {
            BacklogEvent::Started { source, .. } | BacklogEvent::Recovered { source, .. } => *source,
        }
    }
}

/// When a source counts as backlogged. Durations are milliseconds in config files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BacklogThreshold {
    /// A value above this is a backlog (once it lasts `for_duration`).
    pub threshold: u64,
    /// How long the value must stay above the threshold before `Started`.
    #[serde(with = "crate::config::millis")]
    pub for_duration: Duration,
    /// How long it must stay at or below it before `Recovered` (0: at once).
    #[serde(with = "crate::config::millis")]
    pub recover_for: Duration,
}

impl Default for BacklogThreshold {
    fn default() -> Self {
        BacklogThreshold { threshold: 1000, for_duration: Duration::from_secs(30), recover_for: Duration::ZERO }
    }
}

/// One detector per source. Samples arrive every observe interval, so both
/// durations are effectively rounded up to whole intervals.
#[derive(Debug, Clone)]
pub struct Detector {
    source: BacklogSource,
    config: BacklogThreshold,
    backlogged: bool,
    /// Since when the value has been on the other side of the threshold
    /// (above while not backlogged, at or below while backlogged).
    crossing_since: Option<Instant>,
    last_value: Option<u64>,
}

impl Detector {
    /// A detector of `source`, not backlogged.
    pub fn new(source: BacklogSource, config: BacklogThreshold) -> Self {
        Detector { source, config, backlogged: false, crossing_since: None, last_value: None }
    }

    /// The source it watches.
    pub fn source(&self) -> BacklogSource {
        self.source
    }

    /// The configured threshold.
    pub fn threshold(&self) -> u64 {
        self.config.threshold
    }

    /// Between a `Started` and the next `Recovered`.
    pub fn is_backlogged(&self) -> bool {
        self.backlogged
    }

    /// The value of the latest sample.
    pub fn last_value(&self) -> Option<u64> {
        self.last_value
    }

    /// Feeds one sample taken at `now`; returns the event it causes, if any.
    pub fn observe(&mut self, value: u64, now: Instant) -> Option<BacklogEvent> {
        self.last_value = Some(value);
        let (source, threshold) = (self.source, self.config.threshold);
        let crossing = if self.backlogged { value <= threshold } else { value > threshold };
        if !crossing {
            self.crossing_since = None;
            return None;
        }
        let since = *self.crossing_since.get_or_insert(now);
        let needed = if self.backlogged { self.config.recover_for } else { self.config.for_duration };
        if now.saturating_duration_since(since) < needed {
            return None;
        }
        self.crossing_since = None;
        self.backlogged = !self.backlogged;
        Some(if self.backlogged {
            BacklogEvent::Started { source, value, threshold }
        } else {
            BacklogEvent::Recovered { source, value, threshold }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(threshold: u64, for_ms: u64, recover_ms: u64) -> Detector {
        let config = BacklogThreshold {
            threshold,
            for_duration: Duration::from_millis(for_ms),
            recover_for: Duration::from_millis(recover_ms),
        };
        Detector::new(BacklogSource::Pool, config)
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn starts_only_after_staying_above_for_the_duration() {
        let t0 = Instant::now();
        let mut d = detector(10, 100, 0);
        assert_eq!(d.observe(11, at(t0, 0)), None);
        assert_eq!(d.observe(50, at(t0, 99)), None);
        assert_eq!(
            d.observe(12, at(t0, 100)),
            Some(BacklogEvent::Started { source: BacklogSource::Pool, value: 12, threshold: 10 })
        );
        assert!(d.is_backlogged());
        // Still above: no second `Started`.
        assert_eq!(d.observe(40, at(t0, 500)), None);
    }

    #[test]
    fn a_dip_to_the_threshold_restarts_the_wait() {
        let t0 = Instant::now();
        let mut d = detector(10, 100, 0);
        assert_eq!(d.observe(11, at(t0, 0)), None);
        assert_eq!(d.observe(10, at(t0, 60)), None); // at the threshold is not above it
        assert_eq!(d.observe(11, at(t0, 120)), None);
        assert_eq!(d.observe(11, at(t0, 219)), None);
        assert!(matches!(d.observe(11, at(t0, 220)), Some(BacklogEvent::Started { value: 11, .. })));
    }

    #[test]
    fn recovers_at_or_below_the_threshold() {
        let t0 = Instant::now();
        let mut d = detector(10, 0, 0);
        assert!(matches!(d.observe(11, t0), Some(BacklogEvent::Started { .. })));
        assert_eq!(
            d.observe(10, at(t0, 1)),
            Some(BacklogEvent::Recovered { source: BacklogSource::Pool, value: 10, threshold: 10 })
        );
        assert!(!d.is_backlogged());
        assert_eq!(d.last_value(), Some(10));
    }

    #[test]
    fn recovery_waits_for_recover_for_and_a_new_rise_resets_it() {
        let t0 = Instant::now();
        let mut d = detector(0, 0, 50);
        assert!(matches!(d.observe(3, t0), Some(BacklogEvent::Started { value: 3, threshold: 0, .. })));
        assert_eq!(d.observe(0, at(t0, 10)), None);
        assert_eq!(d.observe(1, at(t0, 40)), None); // above again: recovery restarts
        assert_eq!(d.observe(0, at(t0, 50)), None);
        assert_eq!(d.observe(0, at(t0, 99)), None);
        assert!(matches!(d.observe(0, at(t0, 100)), Some(BacklogEvent::Recovered { value: 0, .. })));
    }

    #[test]
    fn never_above_never_fires() {
        let t0 = Instant::now();
        let mut d = detector(5, 0, 0);
        for ms in 0..100 {
            assert_eq!(d.observe(ms % 6, at(t0, ms)), None);
        }
        assert!(!d.is_backlogged());
    }
}
