//! What a seed decides: network latency, handler behaviour, the close
//! timeout, and the nemesis' fault schedule. Everything is drawn from one
//! `SmallRng` seeded by the seed, or hashed from (seed, event), so a seed is
//! one run.

use std::fmt;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::builder::Builder;
use crate::history::EventId;

/// FNV-1a over `parts`: a stable, seedable hash for per-event decisions.
pub fn mix(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// How a handler treats one event (the same in every consumer and replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    Succeed,
    /// Fails this many times in a row, then succeeds (fewer than `max_attempts`).
    Transient(u32),
    /// Always fails: must end in the dead-letter topic.
    Permanent,
}

/// How a planned failure of one attempt shows itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// The handler's future returns an error.
    Error,
    /// The handler panics before returning its future (its synchronous part).
    PanicSync,
    /// The handler's future panics.
    PanicAsync,
}

/// Handler behaviour of a run.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub seed: u64,
    pub transient_rate: f64,
    pub permanent_rate: f64,
    pub slow_rate: f64,
    pub max_attempts: u32,
    /// Share of failing attempts that panic instead of returning an error
    /// (half in the synchronous part, half in the future).
    pub panic_rate: f64,
}

impl Behaviour {
    fn rng(&self, id: &EventId, salt: u32) -> SmallRng {
        SmallRng::seed_from_u64(mix(&[
            &self.seed.to_le_bytes(),
            id.agg.as_bytes(),
            &id.version.to_le_bytes(),
            &salt.to_le_bytes(),
        ]))
    }

    pub fn planned(&self, id: &EventId) -> Planned {
        let mut r = self.rng(id, 0);
        let x: f64 = r.gen();
        if x < self.permanent_rate {
            Planned::Permanent
        } else if x < self.permanent_rate + self.transient_rate && self.max_attempts > 1 {
            Planned::Transient(r.gen_range(1..self.max_attempts))
        } else {
            Planned::Succeed
        }
    }

    /// How failing attempt `attempt` of `id` fails.
    pub fn fail_mode(&self, id: &EventId, attempt: u32) -> FailMode {
        let mut r = self.rng(id, 0x1000 + attempt);
        if !r.gen_bool(self.panic_rate) {
            FailMode::Error
        } else if r.gen_bool(0.5) {
            FailMode::PanicSync
        } else {
            FailMode::PanicAsync
        }
    }

    /// How long attempt `attempt` of `id` takes.
    pub fn delay(&self, id: &EventId, attempt: u32) -> Duration {
        let mut r = self.rng(id, attempt);
        if r.gen_bool(self.slow_rate) {
            Duration::from_millis(r.gen_range(30..=150))
        } else {
            Duration::from_millis(r.gen_range(1..=10))
        }
    }
}

/// A host of the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Node {
    Broker,
    Consumer(usize),
    Producer(usize),
}

impl Node {
    pub fn name(self) -> String {
        match self {
            Node::Broker => crate::broker::BROKER.to_string(),
            Node::Consumer(i) => format!("consumer-{i}"),
            Node::Producer(i) => format!("producer-{i}"),
        }
    }
}

/// One thing the nemesis does at a point in simulated time.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Partition(Node, Node),
    Repair(Node, Node),
    CrashBroker,
    RestartBroker,
    CrashConsumer(usize),
    /// `bus.close()` on a consumer, mid-stream.
    CloseConsumer(usize),
    /// Start a crashed or closed consumer again (a new incarnation).
    RestartConsumer(usize),
    SetMaxLatency(Duration),
    /// The broker refuses every write to a dead-letter topic (until
    /// [`Action::AcceptDeadLetters`] or the heal).
    RefuseDeadLetters,
    AcceptDeadLetters,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Partition(a, b) => write!(f, "partition {} <-> {}", a.name(), b.name()),
            Action::Repair(a, b) => write!(f, "repair {} <-> {}", a.name(), b.name()),
            Action::CrashBroker => write!(f, "crash broker"),
            Action::RestartBroker => write!(f, "restart broker"),
            Action::CrashConsumer(i) => write!(f, "crash consumer-{i}"),
            Action::CloseConsumer(i) => write!(f, "close consumer-{i} (bus.close)"),
            Action::RestartConsumer(i) => write!(f, "restart consumer-{i}"),
            Action::SetMaxLatency(d) => write!(f, "max latency {}ms", d.as_millis()),
            Action::RefuseDeadLetters => write!(f, "broker refuses dead letters"),
            Action::AcceptDeadLetters => write!(f, "broker accepts dead letters"),
        }
    }
}

/// Everything a seed decided.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub min_latency: Duration,
    pub max_latency: Duration,
    /// turmoil's random link failure rate during the fault window.
    pub fail_rate: f64,
    pub behaviour: Behaviour,
    pub close_timeout: Option<Duration>,
    /// (aggregate, topic, last version, producer)
    pub aggregates: Vec<(String, String, i64, usize)>,
    /// Mean pause between two publishes of one producer, so publishing
    /// spans most of the fault window (in bursts).
    pub publish_gap: Duration,
    /// Concurrent publishers per producer.
    pub lanes: usize,
    /// Times at which every producer publishes a burst: shortly before each
    /// close and crash of a consumer, so it goes down with a full pool.
    pub bursts: Vec<Duration>,
    /// The nemesis' schedule, sorted by time; empty for a fault-free run.
    pub schedule: Vec<(Duration, Action)>,
    /// Whether clients give their partitions up at 90% of the session
    /// timeout (off: stale commits reach the broker and must be fenced).
    pub self_release: bool,
    /// The consumers' revoke timeout; short ones fire while handlers run.
    pub revoke_timeout: Duration,
    /// turmoil runs the hosts of each step in an order drawn from the seed.
    pub random_order: bool,
}

/// The consumers' revoke timeout when the nemesis does not shorten it.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);

impl Scenario {
    pub fn faulty(&self) -> bool {
        !self.schedule.is_empty() || self.fail_rate > 0.0 || !self.self_release || self.revoke_timeout < REVOKE_TIMEOUT
    }

    /// The nemesis' switches of this seed, as `Fault` records say them.
    pub fn switches(&self) -> Vec<String> {
        use crate::history::{NO_SELF_RELEASE_RECORD, RANDOM_ORDER_RECORD, SHORT_REVOKE_TIMEOUT_RECORD};
        let mut out = Vec::new();
        if !self.self_release {
            out.push(NO_SELF_RELEASE_RECORD.to_string());
        }
        if self.revoke_timeout < REVOKE_TIMEOUT {
            out.push(format!("{SHORT_REVOKE_TIMEOUT_RECORD}: {}ms", self.revoke_timeout.as_millis()));
        }
        if self.random_order {
            out.push(RANDOM_ORDER_RECORD.to_string());
        }
        out
    }

    pub fn events(&self) -> i64 {
        self.aggregates.iter().map(|a| a.2).sum()
    }

    pub fn generate(cfg: &Builder, seed: u64) -> Scenario {
        let mut rng = SmallRng::seed_from_u64(mix(&[b"scenario", &seed.to_le_bytes()]));
        let min_latency = Duration::from_millis(rng.gen_range(0..=cfg.min_latency.as_millis() as u64));
        let extra = rng.gen_range(0..=cfg.max_latency.saturating_sub(min_latency).as_millis() as u64);
        let max_latency = min_latency + Duration::from_millis(extra);
        let behaviour = Behaviour {
            seed,
            transient_rate: rng.gen_range(0.0..=cfg.handler_fail_rate),
            permanent_rate: rng.gen_range(0.0..=cfg.handler_fail_rate / 4.0),
            slow_rate: rng.gen_range(0.0..=0.2),
            max_attempts: cfg.max_attempts,
            // Drawn from a hash of its own, so adding it changed no other
            // draw of existing seeds.
            panic_rate: if cfg.handler_panics {
                SmallRng::seed_from_u64(mix(&[b"panics", &seed.to_le_bytes()])).gen_range(0.0..=0.6)
            } else {
                0.0
            },
        };
        let close_timeout = if rng.gen_bool(0.5) { None } else { Some(Duration::from_millis(rng.gen_range(20..=100))) };

        // Aggregates: spread over the topics and the producers.
        let mut aggregates = Vec::new();
        let per_topic = cfg.aggregates.div_ceil(cfg.topics.len().max(1));
        let mean = (cfg.events as f64 / cfg.aggregates.max(1) as f64).max(1.0);
        for (t, (topic, _)) in cfg.topics.iter().enumerate() {
            for k in 0..per_topic {
                let n = aggregates.len();
                if n >= cfg.aggregates {
                    break;
                }
                let last = rng.gen_range((mean * 0.5).max(1.0) as i64..=(mean * 1.5).ceil() as i64);
                let name = format!("{}-{k}", topic.trim_end_matches('s'));
                aggregates.push((name, topic.clone(), last, (n + t) % cfg.producers.max(1)));
            }
        }

        let mut schedule: Vec<(Duration, Action)> = Vec::new();
        let mut fail_rate = 0.0;
        let faulty = cfg.faults && !rng.gen_bool(cfg.fault_free_share);
        if faulty {
            if cfg.fail_rate > 0.0 && rng.gen_bool(0.3) {
                fail_rate = rng.gen_range(cfg.fail_rate / 10.0..=cfg.fail_rate);
            }
            let window = cfg.duration.as_millis() as u64;
            let span = |rng: &mut SmallRng| {
                let start = rng.gen_range(50..window.max(51));
                let end = (start + rng.gen_range(100..=1500)).min(window);
                (Duration::from_millis(start), Duration::from_millis(end.max(start + 1)))
            };
            let mut consumer_busy = vec![false; cfg.consumers];
            let mut broker_crashed = false;
            let n = rng.gen_range(1..=cfg.max_faults.max(1));
            for _ in 0..n {
                let roll: u32 = rng.gen_range(0..100);
                let (start, end) = span(&mut rng);
                let c = rng.gen_range(0..cfg.consumers.max(1));
                match roll {
                    0..=24 => {
                        let a = Node::Consumer(c);
                        schedule.push((start, Action::Partition(a, Node::Broker)));
                        schedule.push((end, Action::Repair(a, Node::Broker)));
                    }
                    25..=34 => {
                        let p = Node::Producer(rng.gen_range(0..cfg.producers.max(1)));
                        schedule.push((start, Action::Partition(p, Node::Broker)));
                        schedule.push((end, Action::Repair(p, Node::Broker)));
                    }
                    35..=54 if !consumer_busy[c] => {
                        consumer_busy[c] = true;
                        schedule.push((start, Action::CrashConsumer(c)));
                        schedule.push((end, Action::RestartConsumer(c)));
                    }
                    55..=79 if !consumer_busy[c] => {
                        consumer_busy[c] = true;
                        schedule.push((start, Action::CloseConsumer(c)));
                        schedule.push((end, Action::RestartConsumer(c)));
                    }
                    80..=89 if !broker_crashed => {
                        broker_crashed = true;
                        schedule.push((start, Action::CrashBroker));
                        schedule.push((end, Action::RestartBroker));
                    }
                    _ => {
                        let spike = max_latency + Duration::from_millis(rng.gen_range(20..=150));
                        schedule.push((start, Action::SetMaxLatency(spike)));
                        schedule.push((end, Action::SetMaxLatency(max_latency)));
                    }
                }
            }
            // Refused dead letters for a while, drawn from a hash of their own
            // (the draws above are unchanged for existing seeds).
            let mut dlq = SmallRng::seed_from_u64(mix(&[b"dlq-refusal", &seed.to_le_bytes()]));
            if cfg.dead_letter_refusals && dlq.gen_bool(0.3) {
                let start = dlq.gen_range(50..window.max(51));
                let end = (start + dlq.gen_range(100..=1500)).min(window).max(start + 1);
                schedule.push((Duration::from_millis(start), Action::RefuseDeadLetters));
                schedule.push((Duration::from_millis(end), Action::AcceptDeadLetters));
            }
            // Stable sort: simultaneous actions keep their drawing order.
            schedule.sort_by_key(|(t, _)| *t);
        }
        // The nemesis' switches, each drawn from a hash of its own (the draws
        // above are unchanged by them). They are faults, so only faulty
        // seeds get the first two: a fault-free run must not replay anything.
        let mut switches = SmallRng::seed_from_u64(mix(&[b"switches", &seed.to_le_bytes()]));
        let self_release = !(faulty && cfg.no_self_release && switches.gen_bool(0.4));
        let revoke_timeout = if faulty && cfg.short_revoke_timeouts && switches.gen_bool(0.35) {
            Duration::from_millis(switches.gen_range(5..=60))
        } else {
            REVOKE_TIMEOUT
        };
        let random_order = cfg.random_order && switches.gen_bool(0.5);
        let bursts: Vec<Duration> = schedule
            .iter()
            .filter(|(_, a)| matches!(a, Action::CloseConsumer(_) | Action::CrashConsumer(_)))
            .map(|(t, _)| t.saturating_sub(Duration::from_millis(rng.gen_range(100..=400))))
            .collect::<Vec<_>>();
        let mut bursts = bursts;
        bursts.sort();
        let events: i64 = aggregates.iter().map(|a| a.2).sum();
        let lanes = cfg.lanes.max(1);
        let per_producer = (events as f64 / (cfg.producers.max(1) * lanes) as f64).max(1.0);
        let publish_gap = cfg.duration.mul_f64(0.8 / per_producer);
        Scenario {
            seed,
            min_latency,
            max_latency,
            fail_rate,
            behaviour,
            close_timeout,
            aggregates,
            publish_gap,
            lanes,
            bursts,
            schedule,
            self_release,
            revoke_timeout,
            random_order,
        }
    }
}
