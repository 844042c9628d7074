//! The software of the client hosts: producers publishing envelopes with
//! per-aggregate versions 1..n, and consumers running the production
//! `EventBus` (pool + consumer, unchanged) over [`SimBroker`], with
//! handlers that record what they do and misbehave as the seed planned.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus::backlog::{BacklogEvent, BacklogThreshold};
use eventbus::bus::BusConfig;
use eventbus::consumer::{ConsumerConfig, RetryConfig};
use eventbus::observer::{BacklogConfig, ObservabilityConfig};
use eventbus::pool::{HandlerError, PoolConfig};
use eventbus::ConnectionEvent;
use eventbus::{Envelope, EventBus};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::adapter::{ClientConfig, SimBroker};
use crate::broker::SharedDisk;
use crate::history::{Event, EventId, HandlerEnd, History, PANIC_RECORD};
use crate::scenario::{mix, Behaviour, FailMode, Planned, Scenario};

/// Consumer group of every consumer host.
pub const GROUP: &str = "sim";

/// What the orchestrator wants a consumer host to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctl {
    Run,
    /// Close when work is queued in the pool (or after a while): mid-stream.
    CloseBusy,
    Close,
}

/// State shared by the orchestrator and every host of one run.
pub struct World {
    pub scenario: Scenario,
    pub topics: Vec<String>,
    pub history: History,
    pub disk: SharedDisk,
    pub client: ClientConfig,
    pub bus: BusConfig,
    pub ctl: Vec<watch::Sender<Ctl>>,
    incarnations: Vec<AtomicU32>,
    pub producers_done: AtomicUsize,
}

impl World {
    pub fn new(
        scenario: Scenario,
        topics: Vec<String>,
        consumers: usize,
        client: ClientConfig,
        bus: BusConfig,
    ) -> World {
        World {
            scenario,
            topics,
            history: History::new(),
            disk: SharedDisk::default(),
            client,
            bus,
            ctl: (0..consumers).map(|_| watch::channel(Ctl::Run).0).collect(),
            incarnations: (0..consumers).map(|_| AtomicU32::new(0)).collect(),
            producers_done: AtomicUsize::new(0),
        }
    }
}

/// The bus configuration of the consumers: a small pool, so back-pressure
/// and queued work are part of every run; the observer samples the pool and
/// the group's lag often, with low thresholds, so backlog alerts fire.
pub fn consumer_bus_config(max_attempts: u32, close_timeout: Option<Duration>, revoke_timeout: Duration) -> BusConfig {
    let threshold = |threshold| BacklogThreshold {
        threshold,
        for_duration: Duration::from_millis(200),
        recover_for: Duration::ZERO,
    };
    BusConfig {
        pool: PoolConfig { concurrency: 3, capacity: 16, wait_timeout: Duration::from_millis(500) },
        consumer: ConsumerConfig {
            group: GROUP.into(),
            commit_interval: Duration::from_millis(100),
            commit_threshold: ConsumerConfig::default().commit_threshold,
            revoke_timeout,
            retry: RetryConfig {
                max_attempts,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(40),
            },
            dead_letter_suffix: ".dlq".into(),
            // The simulated broker creates a dead-letter topic on its first
            // write; creating it at subscribe time is tested on the memory
            // broker (tests/handler_faults.rs).
            create_dead_letter_topics: false,
        },
        close_timeout,
        observability: ObservabilityConfig {
            observe_interval: Duration::from_millis(100),
            backlog: BacklogConfig { pool: Some(threshold(8)), consumer_lag: Some(threshold(40)) },
            ..ObservabilityConfig::default()
        },
        ..BusConfig::default()
    }
}

/// Records the end of a handler run; a run dropped before it ended
/// (crash, aborting close) is recorded as aborted.
struct EndGuard {
    history: History,
    inc: Arc<str>,
    id: Option<EventId>,
}

impl EndGuard {
    fn end(mut self, end: HandlerEnd) {
        if let Some(id) = self.id.take() {
            self.history.record(Event::End { inc: self.inc.to_string(), id, end });
        }
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.history.record(Event::End { inc: self.inc.to_string(), id, end: HandlerEnd::Aborted });
        }
    }
}

#[derive(Debug, Clone)]
struct PlannedFailure;

impl std::fmt::Display for PlannedFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("planned handler failure")
    }
}

impl std::error::Error for PlannedFailure {}

#[derive(Clone)]
struct HandlerCtx {
    inc: Arc<str>,
    history: History,
    behaviour: Arc<Behaviour>,
    /// Consecutive failures per event on this incarnation.
    failures: Arc<Mutex<BTreeMap<EventId, u32>>>,
}

/// Text of the planned panics; the panic hook keeps them out of the output.
const PLANNED_PANIC: &str = "sim: planned handler panic";

fn quiet_planned_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let planned = info.payload().downcast_ref::<&str>().is_some_and(|s| s.contains(PLANNED_PANIC))
                || info.payload().downcast_ref::<String>().is_some_and(|s| s.contains(PLANNED_PANIC));
            if !planned {
                default(info);
            }
        }));
    });
}

impl HandlerCtx {
    /// The handler as registered: its synchronous part records the attempt
    /// and may panic (as planned) before any future exists.
    fn call(&self, env: Envelope) -> futures::future::BoxFuture<'static, Result<(), HandlerError>> {
        use futures::FutureExt;
        let id = EventId::new(env.aggregate_id.clone(), env.event_version);
        let failed = self.failures.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied().unwrap_or(0);
        let attempt = failed + 1;
        self.history.record(Event::Begin { inc: self.inc.to_string(), id: id.clone(), attempt });
        let guard = EndGuard { history: self.history.clone(), inc: self.inc.clone(), id: Some(id.clone()) };
        let fail = match self.behaviour.planned(&id) {
            Planned::Succeed => false,
            Planned::Transient(k) => failed < k,
            Planned::Permanent => true,
        };
        let mode = if fail { self.behaviour.fail_mode(&id, attempt) } else { FailMode::Error };
        if fail && mode == FailMode::PanicSync {
            self.history.record(Event::Fault(format!("{PANIC_RECORD} (synchronous part) {id:?} attempt {attempt}")));
            self.failures.lock().unwrap_or_else(|p| p.into_inner()).insert(id, attempt);
            guard.end(HandlerEnd::Failed);
            std::panic::panic_any(PLANNED_PANIC);
        }
        self.clone().handle(id, attempt, fail, mode, guard).boxed()
    }

    async fn handle(
        self,
        id: EventId,
        attempt: u32,
        fail: bool,
        mode: FailMode,
        guard: EndGuard,
    ) -> Result<(), HandlerError> {
        tokio::time::sleep(self.behaviour.delay(&id, attempt)).await;
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if fail {
            let panic =
                (mode == FailMode::PanicAsync).then(|| format!("{PANIC_RECORD} (future) {id:?} attempt {attempt}"));
            failures.insert(id, attempt);
            drop(failures);
            guard.end(HandlerEnd::Failed);
            if let Some(text) = panic {
                self.history.record(Event::Fault(text));
                std::panic::panic_any(PLANNED_PANIC);
            }
            Err(Box::new(PlannedFailure))
        } else {
            failures.remove(&id);
            drop(failures);
            guard.end(HandlerEnd::Ok);
            Ok(())
        }
    }
}

/// The software of consumer host `i`: one incarnation per (re)start.
pub async fn consumer_host(world: Arc<World>, i: usize) -> turmoil::Result {
    let n = world.incarnations[i].fetch_add(1, Ordering::Relaxed) + 1;
    let inc: Arc<str> = format!("c{i}.{n}").into();
    world.history.record(Event::Started { inc: inc.to_string() });
    let broker = SimBroker::new(world.client.clone(), inc.to_string(), world.history.clone(), None);
    let (backlog, connection) = (world.history.clone(), world.history.clone());
    let (backlog_inc, connection_inc) = (inc.to_string(), inc.to_string());
    let bus = EventBus::builder(broker)
        .config(world.bus.clone())
        .on_backlog(move |e| {
            let (started, source, value) = match *e {
                BacklogEvent::Started { source, value, .. } => (true, source, value),
                BacklogEvent::Recovered { source, value, .. } => (false, source, value),
            };
            let source = source.as_str().to_string();
            backlog.record(Event::Backlog { inc: backlog_inc.clone(), source, started, value });
        })
        .on_connection(move |e| {
            let up = matches!(e, ConnectionEvent::Reconnected { .. });
            connection.record(Event::Connection { inc: connection_inc.clone(), up });
        })
        .build()?;
    quiet_planned_panics();
    let ctx = HandlerCtx {
        inc: inc.clone(),
        history: world.history.clone(),
        behaviour: Arc::new(world.scenario.behaviour.clone()),
        failures: Arc::default(),
    };
    for topic in &world.topics {
        let ctx = ctx.clone();
        bus.subscribe_envelope(topic, move |env| ctx.call(env)).await?;
    }
    bus.start().await?;
    let mut ctl = world.ctl[i].subscribe();
    let busy = matches!(*ctl.wait_for(|c| *c != Ctl::Run).await?, Ctl::CloseBusy);
    if busy {
        // The nemesis aims at a pool with queued work: that is what a close must not lose.
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while bus.pool_stats().queued == 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let pool = bus.pool_stats();
    let report = bus.close().await;
    let alive_tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    world.history.record(Event::Closed {
        inc: inc.to_string(),
        queued: pool.queued,
        in_flight: pool.in_flight,
        handed_back: report.handed_back,
        alive_tasks,
        final_commit_error: report.final_commit_error,
    });
    Ok(())
}

/// Simulated wall-clock time, for envelope timestamps.
fn sim_timestamp() -> time::OffsetDateTime {
    let since = turmoil::since_epoch().unwrap_or_default();
    time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(since.as_millis() as i64)
}

/// The software of producer `p`: `lanes` concurrent publishers, each with
/// its own idempotent connection and its own aggregates, publishing
/// versions 1..n one at a time, interleaving aggregates, retrying until
/// acknowledged.
pub async fn producer_client(world: Arc<World>, p: usize) -> turmoil::Result {
    let lanes = world.scenario.lanes.max(1);
    let mine: Vec<(String, String, i64)> = world
        .scenario
        .aggregates
        .iter()
        .filter(|a| a.3 == p)
        .map(|(agg, topic, last, _)| (agg.clone(), topic.clone(), *last))
        .collect();
    let runs = (0..lanes).map(|lane| {
        let todo: Vec<(String, String, i64)> = mine.iter().skip(lane).step_by(lanes).cloned().collect();
        producer_lane(world.clone(), p, lane, todo)
    });
    futures::future::try_join_all(runs).await?;
    world.producers_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn producer_lane(world: Arc<World>, p: usize, lane: usize, mine: Vec<(String, String, i64)>) -> turmoil::Result {
    let history = world.history.clone();
    let id = (p * 16 + lane + 1) as u64;
    let broker = SimBroker::new(world.client.clone(), format!("p{p}.{lane}"), history.clone(), Some(id));
    let config =
        BusConfig { pool: PoolConfig { concurrency: 1, capacity: 1, ..PoolConfig::default() }, ..BusConfig::default() };
    let bus = EventBus::builder(broker).config(config).build()?;
    let mut rng = SmallRng::seed_from_u64(mix(&[b"producer", &world.scenario.seed.to_le_bytes(), &id.to_le_bytes()]));
    // (aggregate, topic, next version, last version)
    let mut todo: Vec<(String, String, i64, i64)> =
        mine.into_iter().map(|(agg, topic, last)| (agg, topic, 1, last)).collect();
    let gap = world.scenario.publish_gap.as_micros() as u64;
    let mut burst = 0u32;
    let mut bursts = world.scenario.bursts.iter().peekable();
    while !todo.is_empty() {
        if bursts.next_if(|t| **t <= turmoil::sim_elapsed().unwrap_or_default()).is_some() {
            burst = burst.max(20);
        }
        let k = rng.gen_range(0..todo.len());
        let (agg, topic, version, last) = todo[k].clone();
        let env = Envelope::new(agg.clone(), "sim.Updated", version, &serde_json::json!({ "v": version }))?
            .with_timestamp(sim_timestamp());
        loop {
            match bus.publish_envelope(&topic, &env).await {
                Ok(pos) => {
                    history.record(Event::Published {
                        producer: id as u32,
                        id: EventId::new(agg.clone(), version),
                        tp: (topic.clone(), pos.partition),
                        offset: pos.offset,
                        duplicate: pos.duplicate,
                    });
                    break;
                }
                Err(eventbus::bus::PublishError::Broker(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if version == last {
            todo.swap_remove(k);
        } else {
            todo[k].2 += 1;
        }
        // Bursts fill the consumers' pools; pauses spread the rest over the fault window.
        if burst > 0 {
            burst -= 1;
        } else if rng.gen_bool(0.08) {
            burst = rng.gen_range(5..=20);
        } else {
            tokio::time::sleep(Duration::from_micros(rng.gen_range(0..=gap * 2 + gap / 2))).await;
        }
    }
    drop(bus);
    Ok(())
}
