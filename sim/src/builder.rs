//! The settings of a simulation ([`Builder`]): the bounds within which each
//! seed draws its scenario. Plain data: [`crate::scenario`] reads it to draw a
//! seed's scenario and [`crate::runner`] to run it (`Builder::run` is defined
//! there), so this module imports neither.

use std::time::Duration;

/// Settings of a simulation, builder-style like `turmoil::Builder`. Each
/// seed draws its own scenario within these bounds.
#[derive(Debug, Clone)]
pub struct Builder {
    pub seed: u64,
    /// Length of the fault window (simulated).
    pub duration: Duration,
    /// Give up waiting for quiescence after this much simulated time.
    pub max_time: Duration,
    /// Upper bound of a seed's minimum message latency.
    pub min_latency: Duration,
    /// Upper bound of a seed's maximum message latency.
    pub max_latency: Duration,
    /// Upper bound of turmoil's random link failure rate (0 = never).
    pub fail_rate: f64,
    /// Upper bound of the transient handler failure rate (a quarter of it for permanent failures).
    pub handler_fail_rate: f64,
    pub faults: bool,
    /// Share of seeds that run without any fault.
    pub fault_free_share: f64,
    pub max_faults: usize,
    pub events: usize,
    pub aggregates: usize,
    pub topics: Vec<(String, u32)>,
    pub consumers: usize,
    pub producers: usize,
    /// Concurrent publishers per producer host.
    pub lanes: usize,
    pub max_attempts: u32,
    pub tick: Duration,
    /// Some failing handler attempts panic (in the handler's synchronous
    /// part or in its future) instead of returning an error.
    pub handler_panics: bool,
    /// The nemesis may make the broker refuse dead letters for a while.
    pub dead_letter_refusals: bool,
    /// The nemesis may turn the clients' self-release off (stale commits).
    pub no_self_release: bool,
    /// The nemesis may shorten the consumers' revoke timeout below handler times.
    pub short_revoke_timeouts: bool,
    /// Half the seeds run turmoil's hosts in a random order per step.
    pub random_order: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            seed: 0,
            duration: Duration::from_secs(3),
            max_time: Duration::from_secs(60),
            min_latency: Duration::from_millis(2),
            max_latency: Duration::from_millis(15),
            fail_rate: 0.002,
            handler_fail_rate: 0.1,
            faults: true,
            fault_free_share: 0.15,
            max_faults: 6,
            events: 300,
            aggregates: 24,
            topics: vec![("orders".into(), 3), ("payments".into(), 3)],
            consumers: 3,
            producers: 2,
            lanes: 3,
            max_attempts: 3,
            tick: Duration::from_millis(1),
            handler_panics: true,
            dead_letter_refusals: true,
            no_self_release: true,
            short_revoke_timeouts: true,
            random_order: true,
        }
    }
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn seed(&mut self, seed: u64) -> &mut Self {
        self.seed = seed;
        self
    }
    pub fn duration(&mut self, d: Duration) -> &mut Self {
        self.duration = d;
        self
    }
    pub fn max_time(&mut self, d: Duration) -> &mut Self {
        self.max_time = d;
        self
    }
    pub fn latency(&mut self, min: Duration, max: Duration) -> &mut Self {
        self.min_latency = min;
        self.max_latency = max.max(min);
        self
    }
    pub fn fail_rate(&mut self, rate: f64) -> &mut Self {
        self.fail_rate = rate;
        self
    }
    pub fn handler_fail_rate(&mut self, rate: f64) -> &mut Self {
        self.handler_fail_rate = rate;
        self
    }
    pub fn faults(&mut self, on: bool) -> &mut Self {
        self.faults = on;
        self
    }
    pub fn handler_panics(&mut self, on: bool) -> &mut Self {
        self.handler_panics = on;
        self
    }
    pub fn dead_letter_refusals(&mut self, on: bool) -> &mut Self {
        self.dead_letter_refusals = on;
        self
    }
    pub fn no_self_release(&mut self, on: bool) -> &mut Self {
        self.no_self_release = on;
        self
    }
    pub fn short_revoke_timeouts(&mut self, on: bool) -> &mut Self {
        self.short_revoke_timeouts = on;
        self
    }
    pub fn random_order(&mut self, on: bool) -> &mut Self {
        self.random_order = on;
        self
    }
    pub fn events(&mut self, n: usize) -> &mut Self {
        self.events = n;
        self
    }
    pub fn consumers(&mut self, n: usize) -> &mut Self {
        self.consumers = n.max(1);
        self
    }
    pub fn producers(&mut self, n: usize) -> &mut Self {
        self.producers = n.max(1);
        self
    }
}
