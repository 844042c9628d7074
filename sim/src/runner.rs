//! Runs one seed: builds the turmoil simulation (broker, consumers,
//! producers), plays the nemesis' schedule, heals, waits for quiescence,
//! closes every consumer, and checks the history.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::adapter::ClientConfig;
use crate::broker::{self, BrokerSettings};
use crate::builder::Builder;
use crate::history::{trace_hash, Counts, Event, Record};
use crate::hosts::{consumer_bus_config, consumer_host, producer_client, Ctl, World, GROUP};
use crate::proto::WireTp;
use crate::scenario::{Action, Node, Scenario};
use crate::verdict::{check, CheckContext, Violation};

impl Builder {
    /// Runs the configured seed.
    pub fn run(&self) -> RunReport {
        run_seed(self, self.seed)
    }
}

/// The outcome of one seed.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// Hash of the full history: equal for equal runs.
    pub trace_hash: u64,
    pub records: Vec<Record>,
    pub sim_time: Duration,
    pub wall_time: Duration,
    pub events: i64,
    pub faulty: bool,
    pub schedule: Vec<(Duration, Action)>,
    /// The nemesis' switches of the seed (`Scenario::switches`).
    pub switches: Vec<String>,
    pub counts: Counts,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The records leading up to `v` that concern what it is about.
    pub fn trace_tail(&self, v: &Violation, n: usize) -> Vec<&Record> {
        let upto = v.at.map_or(self.records.len(), |a| a as usize + 1).min(self.records.len());
        let related: Vec<&Record> = self.records[..upto]
            .iter()
            .filter(|r| {
                let text = format!("{:?}", r.event);
                v.focus.iter().any(|f| text.contains(f.as_str())) || matches!(r.event, Event::Fault(_))
            })
            .collect();
        let pick = if related.len() >= 3 { related } else { self.records[..upto].iter().collect() };
        pick[pick.len().saturating_sub(n)..].to_vec()
    }

    pub fn replay_command(&self) -> String {
        format!("cargo run -p sim --release -- --seed {}", self.seed)
    }

    /// A failure, as the runner prints it.
    pub fn failure_text(&self) -> String {
        let mut s = String::new();
        for v in &self.violations {
            s.push_str(&format!("seed {}: {v}\n", self.seed));
        }
        if let Some(v) = self.violations.first() {
            s.push_str("  trace tail:\n");
            for r in self.trace_tail(v, 14) {
                s.push_str(&format!("    {r}\n"));
            }
        }
        s.push_str(&format!("  replay: {}\n", self.replay_command()));
        s
    }
}

/// The simulation's fixed epoch (2024-01-01T00:00:00Z): no real clock anywhere.
pub fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    Running,
    Crashed,
    Closing,
}

/// Runs `seed` with the bounds of `cfg`.
pub fn run_seed(cfg: &Builder, seed: u64) -> RunReport {
    let started = Instant::now();
    let scenario = Scenario::generate(cfg, seed);
    let topics: Vec<String> = cfg.topics.iter().map(|t| t.0.clone()).collect();
    let client = ClientConfig { self_release: scenario.self_release, ..ClientConfig::default() };
    let bus = consumer_bus_config(cfg.max_attempts, scenario.close_timeout, scenario.revoke_timeout);
    let world = Arc::new(World::new(scenario.clone(), topics.clone(), cfg.consumers, client.clone(), bus));
    let history = world.history.clone();
    let _panics = crate::history::record_panics(&history);
    let settings = BrokerSettings {
        topics: cfg.topics.clone(),
        default_partitions: 1,
        session_timeout: client.session_timeout,
        expiry_check: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(5),
    };

    let mut builder = turmoil::Builder::new();
    if scenario.random_order {
        builder.enable_random_order();
    }
    let mut sim = builder
        .rng_seed(seed)
        .epoch(epoch())
        .tick_duration(cfg.tick)
        .simulation_duration(cfg.max_time + Duration::from_secs(30))
        .min_message_latency(scenario.min_latency)
        .max_message_latency(scenario.max_latency)
        .fail_rate(0.0)
        .build();

    {
        let (disk, settings, history) = (world.disk.clone(), settings.clone(), history.clone());
        sim.host(broker::BROKER, move || broker::run(disk.clone(), settings.clone(), history.clone()));
    }
    for i in 0..cfg.consumers {
        let w = world.clone();
        sim.host(Node::Consumer(i).name(), move || consumer_host(w.clone(), i));
    }
    for p in 0..cfg.producers {
        sim.client(Node::Producer(p).name(), producer_client(world.clone(), p));
    }
    for switch in scenario.switches() {
        history.record_at(0, Event::Fault(switch));
    }
    if scenario.fail_rate > 0.0 {
        sim.set_fail_rate(scenario.fail_rate);
        history.record_at(0, Event::Fault(format!("random link failures at rate {:.4}", scenario.fail_rate)));
    }

    let mut violations: Vec<Violation> = Vec::new();
    let mut schedule = scenario.schedule.clone().into_iter().peekable();
    let mut consumers = vec![Up::Running; cfg.consumers];
    let mut restart_wanted = vec![false; cfg.consumers];
    let mut broker_up = true;
    let mut healed = false;
    let mut partitions: BTreeSet<(Node, Node)> = BTreeSet::new();
    let mut next_check = Duration::ZERO;
    let fail = |violations: &mut Vec<Violation>, rule: &'static str, message: String| {
        violations.push(Violation { rule, message, at: None, focus: vec![] });
    };

    // Phase 1: faults, then heal, then run until quiescent.
    loop {
        let now = sim.elapsed();
        while schedule.peek().is_some_and(|(t, _)| *t <= now) {
            let (_, action) = schedule.next().expect("peeked");
            let ms = now.as_millis() as u64;
            let applied = match &action {
                Action::Partition(a, b) => {
                    sim.partition(a.name(), b.name());
                    partitions.insert((*a, *b));
                    true
                }
                Action::Repair(a, b) => {
                    sim.repair(a.name(), b.name());
                    partitions.remove(&(*a, *b));
                    true
                }
                Action::CrashBroker if broker_up => {
                    history.hold(|| sim.crash(broker::BROKER));
                    broker_up = false;
                    true
                }
                Action::RestartBroker if !broker_up => {
                    history.hold(|| sim.bounce(broker::BROKER));
                    broker_up = true;
                    true
                }
                Action::CrashConsumer(i) if consumers[*i] == Up::Running => {
                    history.hold(|| sim.crash(Node::Consumer(*i).name()));
                    consumers[*i] = Up::Crashed;
                    true
                }
                Action::CloseConsumer(i) if consumers[*i] == Up::Running => {
                    world.ctl[*i].send_replace(Ctl::CloseBusy);
                    consumers[*i] = Up::Closing;
                    true
                }
                Action::RestartConsumer(i) => {
                    restart_wanted[*i] = true;
                    false
                }
                Action::SetMaxLatency(d) => {
                    sim.set_max_message_latency(*d);
                    true
                }
                Action::RefuseDeadLetters => {
                    world.disk.lock().refuse_dead_letters = true;
                    true
                }
                Action::AcceptDeadLetters => {
                    world.disk.lock().refuse_dead_letters = false;
                    true
                }
                _ => false,
            };
            if applied {
                history.record_at(ms, Event::Fault(action.to_string()));
            }
        }
        if !healed && now >= cfg.duration {
            healed = true;
            history
                .record_at(now.as_millis() as u64, Event::Fault("heal: network repaired, every host restarted".into()));
            for (a, b) in std::mem::take(&mut partitions) {
                sim.repair(a.name(), b.name());
            }
            sim.set_fail_rate(0.0);
            sim.set_max_message_latency(scenario.max_latency);
            world.disk.lock().refuse_dead_letters = false;
            if !broker_up {
                history.hold(|| sim.bounce(broker::BROKER));
                broker_up = true;
            }
            restart_wanted.iter_mut().for_each(|r| *r = true);
        }
        // Restart consumers that are down (a closing one once its close returned).
        for i in 0..cfg.consumers {
            if !restart_wanted[i] {
                continue;
            }
            let name = Node::Consumer(i).name();
            let ready = match consumers[i] {
                Up::Running => {
                    restart_wanted[i] = false;
                    false
                }
                Up::Crashed => true,
                Up::Closing => !sim.is_host_running(name.as_str()),
            };
            if ready {
                world.ctl[i].send_replace(Ctl::Run);
                history.hold(|| sim.bounce(name.as_str()));
                consumers[i] = Up::Running;
                restart_wanted[i] = false;
                history.record_at(now.as_millis() as u64, Event::Fault(format!("restart consumer-{i}")));
            }
        }
        if let Err(e) = sim.step() {
            fail(&mut violations, "host-error", e.to_string());
            break;
        }
        let now = sim.elapsed();
        if healed && now >= next_check {
            next_check = now + Duration::from_millis(20);
            if quiescent(&world, cfg) {
                break;
            }
        }
        if now > cfg.max_time {
            fail(
                &mut violations,
                "liveness",
                format!("not quiescent after {:?}: {}", cfg.max_time, progress(&world, cfg)),
            );
            break;
        }
    }

    // Phase 2: close every consumer and wait for the closes to return.
    if violations.is_empty() {
        for (i, up) in consumers.iter().enumerate() {
            if *up == Up::Running {
                world.ctl[i].send_replace(Ctl::Close);
            }
        }
        let deadline = sim.elapsed() + Duration::from_secs(10);
        loop {
            let running: Vec<String> = (0..cfg.consumers)
                .map(|i| Node::Consumer(i).name())
                .filter(|n| sim.is_host_running(n.as_str()))
                .collect();
            if running.is_empty() {
                break;
            }
            if sim.elapsed() > deadline {
                fail(&mut violations, "close", format!("bus.close() did not return within 10s on {running:?}"));
                break;
            }
            if let Err(e) = sim.step() {
                fail(&mut violations, "host-error", e.to_string());
                break;
            }
        }
    }
    let sim_time = sim.elapsed();
    history.seal();
    let records = history.snapshot();
    let ctx = CheckContext {
        origin_topics: topics.iter().cloned().collect(),
        behaviour: &scenario.behaviour,
        faulty: scenario.faulty(),
    };
    let found = check(&records, &ctx);
    // Liveness failures explain themselves; the history check adds detail.
    violations.extend(found);
    drop(sim);
    RunReport {
        seed,
        trace_hash: trace_hash(&records),
        counts: Counts::of(&records),
        records,
        violations,
        sim_time,
        wall_time: started.elapsed(),
        events: scenario.events(),
        faulty: scenario.faulty(),
        switches: scenario.switches(),
        schedule: scenario.schedule,
    }
}

/// Producers are done and every origin partition is committed to its end:
/// nothing will be delivered again, so whatever is not handled by now is lost
/// (the checker says so).
fn quiescent(world: &World, cfg: &Builder) -> bool {
    if world.producers_done.load(Ordering::Relaxed) < cfg.producers {
        return false;
    }
    let disk = world.disk.lock();
    for (topic, _) in &cfg.topics {
        let Some(parts) = disk.topics.get(topic) else { return false };
        for (p, log) in parts.iter().enumerate() {
            let tp = WireTp { topic: topic.clone(), partition: p as u32 };
            if disk.committed.get(&(GROUP.to_string(), tp)).copied().unwrap_or(0) != log.len() as u64 {
                return false;
            }
        }
    }
    true
}

/// What is still missing, for a liveness failure.
fn progress(world: &World, cfg: &Builder) -> String {
    let disk = world.disk.lock();
    let mut parts = vec![format!("producers done {}/{}", world.producers_done.load(Ordering::Relaxed), cfg.producers)];
    for (topic, _) in &cfg.topics {
        if let Some(logs) = disk.topics.get(topic) {
            for (p, log) in logs.iter().enumerate() {
                let tp = WireTp { topic: topic.clone(), partition: p as u32 };
                let committed = disk.committed.get(&(GROUP.to_string(), tp)).copied().unwrap_or(0);
                if committed != log.len() as u64 {
                    parts.push(format!("{topic}[{p}] committed {committed}/{}", log.len()));
                }
            }
        }
    }
    parts.join(", ")
}
