//! The history of one run: everything the checker needs, in the one order in
//! which it happened. Turmoil runs every host on one thread, so the order of
//! `record` calls is a total order consistent with causality (a message is
//! received in a later step than it was sent).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// One event of the workload: an aggregate and its version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub agg: String,
    pub version: i64,
}

impl EventId {
    pub fn new(agg: impl Into<String>, version: i64) -> Self {
        EventId { agg: agg.into(), version }
    }

    pub fn prev(&self) -> Option<EventId> {
        (self.version > 1).then(|| EventId { agg: self.agg.clone(), version: self.version - 1 })
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@v{}", self.agg, self.version)
    }
}

/// A partition as the history names it.
pub type Tp = (String, u32);

/// Where a dead-lettered message came from (its `x-dlq-*` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqInfo {
    pub origin_topic: String,
    pub origin_partition: u32,
    pub origin_offset: u64,
    pub attempts: u32,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerEnd {
    Ok,
    Failed,
    /// The handler's future was dropped before it returned (crash, aborting close).
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The nemesis did something.
    Fault(String),
    BrokerBoot {
        epoch: u64,
    },
    /// The broker stored a message (origin topic or dead letter).
    Append {
        tp: Tp,
        offset: u64,
        id: Option<EventId>,
        dlq: Option<DlqInfo>,
    },
    /// A producer got its publish acknowledged.
    Published {
        producer: u32,
        id: EventId,
        tp: Tp,
        offset: u64,
        duplicate: bool,
    },
    Join {
        client: String,
        member: u64,
    },
    Assign {
        client: String,
        member: u64,
        tp: Tp,
        start: u64,
    },
    Revoke {
        client: String,
        member: u64,
        tps: Vec<Tp>,
    },
    Release {
        client: String,
        member: u64,
        tps: Vec<Tp>,
    },
    Expire {
        client: String,
        member: u64,
    },
    Leave {
        client: String,
        member: u64,
    },
    /// A commit request reached the broker; `accepted` if it was applied.
    Commit {
        client: String,
        member: u64,
        tp: Tp,
        offset: u64,
        accepted: bool,
    },
    /// The client adapter gave partitions up as lost (session gone).
    Lost {
        client: String,
        tps: Vec<Tp>,
    },
    /// A consumer incarnation started.
    Started {
        inc: String,
    },
    Begin {
        inc: String,
        id: EventId,
        attempt: u32,
    },
    End {
        inc: String,
        id: EventId,
        end: HandlerEnd,
    },
    /// Something panicked on the simulation's thread (in any host, even if
    /// the panic was caught): always a bug, as no handler of ours panics.
    Panic {
        message: String,
    },
    /// The bus of incarnation `inc` called `on_backlog`: a backlog of
    /// `source` (`pool`, `consumer_lag`) started or recovered at `value`.
    Backlog {
        inc: String,
        source: String,
        started: bool,
        value: u64,
    },
    /// The bus of incarnation `inc` called `on_connection`: its broker
    /// connection dropped (`up: false`) or came back.
    Connection {
        inc: String,
        up: bool,
    },
    /// `bus.close()` returned on incarnation `inc`.
    /// `queued`/`in_flight`: the pool when the close began.
    Closed {
        inc: String,
        queued: usize,
        in_flight: usize,
        handed_back: usize,
        alive_tasks: usize,
        final_commit_error: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Simulated milliseconds since the start of the run.
    pub at_ms: u64,
    pub event: Event,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{:<6} {:>6}ms  {:?}", self.seq, self.at_ms, self.event)
    }
}

#[derive(Debug, Default)]
struct Inner {
    records: Vec<Record>,
    sealed: bool,
    /// Set by [`History::hold`]: records wait here, to be appended sorted.
    held: Option<Vec<(u64, Event)>>,
    /// Events handled successfully or dead-lettered (for the quiescence test).
    completed: BTreeSet<EventId>,
}

impl Inner {
    fn push(&mut self, at_ms: u64, event: Event) {
        match &event {
            Event::End { id, end: HandlerEnd::Ok, .. } => {
                self.completed.insert(id.clone());
            }
            Event::Append { id: Some(id), dlq: Some(_), .. } => {
                self.completed.insert(id.clone());
            }
            _ => {}
        }
        let seq = self.records.len() as u64;
        self.records.push(Record { seq, at_ms, event });
    }
}

/// The shared, append-only history of a run.
#[derive(Debug, Clone, Default)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
}

/// Simulated time of the calling host (0 outside a host).
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `event` at the caller's simulated time.
    pub fn record(&self, event: Event) {
        self.record_at(now_ms(), event);
    }

    pub fn record_at(&self, at_ms: u64, event: Event) {
        let mut inner = self.lock();
        if inner.sealed {
            return;
        }
        if let Some(held) = inner.held.as_mut() {
            held.push((at_ms, event));
            return;
        }
        inner.push(at_ms, event);
    }

    /// Holds what is recorded during `f` and appends it sorted (by time,
    /// then by its rendering). For things that happen at one instant in an
    /// order nothing defines: a crashed host's tasks are dropped in the
    /// order of their tokio task ids, which come from a process-wide
    /// counter, so the order of their `Aborted` ends would depend on what
    /// other simulations ran on other threads before.
    pub fn hold<R>(&self, f: impl FnOnce() -> R) -> R {
        self.lock().held = Some(Vec::new());
        let out = f();
        let mut inner = self.lock();
        let mut held = inner.held.take().unwrap_or_default();
        held.sort_by_cached_key(|(at, e)| (*at, format!("{e:?}")));
        if !inner.sealed {
            for (at, e) in held {
                inner.push(at, e);
            }
        }
        out
    }

    /// Stops recording (what happens while the simulation is torn down is not history).
    pub fn seal(&self) {
        self.lock().sealed = true;
    }

    pub fn is_completed(&self, id: &EventId) -> bool {
        self.lock().completed.contains(id)
    }

    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<Record> {
        self.lock().records.clone()
    }

    /// Whether any record satisfies `f` (without copying the history).
    pub fn any(&self, f: impl Fn(&Record) -> bool) -> bool {
        self.lock().records.iter().any(f)
    }
}

thread_local! {
    /// The history of the simulation running on this thread, for the panic hook.
    static CURRENT: RefCell<Option<History>> = const { RefCell::new(None) };
}

/// Records every panic on this thread into `history` until the guard drops.
pub fn record_panics(history: &History) -> PanicRecording {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            let location = info.location().map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
            let recorded = CURRENT.try_with(|c| c.try_borrow().ok().and_then(|h| h.clone())).ok().flatten();
            if let Some(h) = recorded {
                h.record(Event::Panic { message: format!("{message}{location}") });
            }
            previous(info);
        }));
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(history.clone()));
    PanicRecording(())
}

/// Stops [`record_panics`] on this thread when dropped.
pub struct PanicRecording(());

impl Drop for PanicRecording {
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|c| c.borrow_mut().take());
    }
}

/// What happened in a run, counted (for the runner's summary).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub appended: u64,
    pub handled: u64,
    /// Successful handlings beyond the first of an event.
    pub duplicates: u64,
    pub failed_attempts: u64,
    pub aborted: u64,
    pub dead_lettered: u64,
    pub commits: u64,
    pub rejected_commits: u64,
    pub sessions_lost: u64,
    pub expired: u64,
    pub rebalances: u64,
    pub broker_boots: u64,
    pub incarnations: u64,
    pub handed_back: u64,
    /// Handler attempts that panicked as planned (synchronous part or future).
    pub panics: u64,
    /// Dead-letter writes the broker refused (nemesis `RefuseDeadLetters`).
    pub dead_letters_refused: u64,
    /// Releases of partitions while a handler of this incarnation still ran
    /// an event of them: the consumer's revoke timeout fired.
    pub revoke_timeouts: u64,
    /// `on_backlog` calls that started a backlog.
    pub backlog_alerts: u64,
    /// `on_connection` calls: disconnections, and reconnections.
    pub disconnects: u64,
    pub reconnects: u64,
    /// Seeds run with the clients' self-release turned off.
    pub no_self_release: u64,
    /// Seeds run with a short consumer revoke timeout.
    pub short_revoke_timeout: u64,
    /// Seeds run with turmoil's random host order.
    pub random_order: u64,
}

/// Texts of the `Fault` records of a seed's nemesis switches (set at time 0).
pub const NO_SELF_RELEASE_RECORD: &str = "clients do not give partitions up at 90% of the session timeout";
pub const SHORT_REVOKE_TIMEOUT_RECORD: &str = "short consumer revoke timeout";
pub const RANDOM_ORDER_RECORD: &str = "random host order";

/// Prefixes of the `Fault` records that the counts pick up.
pub const PANIC_RECORD: &str = "planned handler panic";
pub const REFUSED_DEAD_LETTER_RECORD: &str = "refused dead letter";

impl Counts {
    pub fn of(records: &[Record]) -> Counts {
        let mut c = Counts::default();
        let mut seen = BTreeSet::new();
        // Where each event lives, and which events each incarnation is running.
        let mut home: BTreeMap<EventId, Tp> = BTreeMap::new();
        let mut running: BTreeSet<(String, EventId)> = BTreeSet::new();
        for r in records {
            match &r.event {
                Event::Append { tp, id: Some(id), dlq: None, .. } => {
                    home.entry(id.clone()).or_insert_with(|| tp.clone());
                }
                Event::Begin { inc, id, .. } => {
                    running.insert((inc.clone(), id.clone()));
                }
                Event::End { inc, id, .. } => {
                    running.remove(&(inc.clone(), id.clone()));
                }
                Event::Release { client, tps, .. }
                    if running
                        .iter()
                        .any(|(inc, id)| inc == client && home.get(id).is_some_and(|tp| tps.contains(tp))) =>
                {
                    c.revoke_timeouts += 1;
                }
                _ => {}
            }
            match &r.event {
                Event::Append { dlq: None, .. } => c.appended += 1,
                Event::Append { dlq: Some(_), .. } => c.dead_lettered += 1,
                Event::End { id, end: HandlerEnd::Ok, .. } => {
                    c.handled += 1;
                    if !seen.insert(id.clone()) {
                        c.duplicates += 1;
                    }
                }
                Event::End { end: HandlerEnd::Failed, .. } => c.failed_attempts += 1,
                Event::End { end: HandlerEnd::Aborted, .. } => c.aborted += 1,
                Event::Commit { accepted: true, .. } => c.commits += 1,
                Event::Commit { accepted: false, .. } => c.rejected_commits += 1,
                Event::Lost { .. } => c.sessions_lost += 1,
                Event::Expire { .. } => c.expired += 1,
                Event::Revoke { .. } => c.rebalances += 1,
                Event::BrokerBoot { .. } => c.broker_boots += 1,
                Event::Started { .. } => c.incarnations += 1,
                Event::Closed { handed_back, .. } => c.handed_back += *handed_back as u64,
                Event::Fault(text) if text.starts_with(PANIC_RECORD) => c.panics += 1,
                Event::Fault(text) if text.starts_with(REFUSED_DEAD_LETTER_RECORD) => c.dead_letters_refused += 1,
                Event::Fault(text) if text.starts_with(NO_SELF_RELEASE_RECORD) => c.no_self_release += 1,
                Event::Fault(text) if text.starts_with(SHORT_REVOKE_TIMEOUT_RECORD) => c.short_revoke_timeout += 1,
                Event::Fault(text) if text.starts_with(RANDOM_ORDER_RECORD) => c.random_order += 1,
                Event::Backlog { started: true, .. } => c.backlog_alerts += 1,
                Event::Connection { up: false, .. } => c.disconnects += 1,
                Event::Connection { up: true, .. } => c.reconnects += 1,
                _ => {}
            }
        }
        c
    }

    pub fn add(&mut self, o: &Counts) {
        self.appended += o.appended;
        self.handled += o.handled;
        self.duplicates += o.duplicates;
        self.failed_attempts += o.failed_attempts;
        self.aborted += o.aborted;
        self.dead_lettered += o.dead_lettered;
        self.commits += o.commits;
        self.rejected_commits += o.rejected_commits;
        self.sessions_lost += o.sessions_lost;
        self.expired += o.expired;
        self.rebalances += o.rebalances;
        self.broker_boots += o.broker_boots;
        self.incarnations += o.incarnations;
        self.handed_back += o.handed_back;
        self.panics += o.panics;
        self.dead_letters_refused += o.dead_letters_refused;
        self.revoke_timeouts += o.revoke_timeouts;
        self.backlog_alerts += o.backlog_alerts;
        self.disconnects += o.disconnects;
        self.reconnects += o.reconnects;
        self.no_self_release += o.no_self_release;
        self.short_revoke_timeout += o.short_revoke_timeout;
        self.random_order += o.random_order;
    }
}

/// FNV-1a over the rendering of every record: equal for equal histories,
/// stable across processes (unlike `std`'s randomly keyed hasher).
pub fn trace_hash(records: &[Record]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for r in records {
        for b in format!("{r}\n").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
