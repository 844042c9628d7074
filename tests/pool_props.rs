#![cfg(not(feature = "loom"))]
//! Property tests of the keyed pool against a sequential reference model.
//!
//! 1. `core_matches_reference_model` drives `pool::core::Core` directly
//!    (deterministic, single-threaded) with random operation sequences —
//!    single and batched submits, single and batched takes, giving back what
//!    was taken ahead — and compares every answer with a model of per-key
//!    FIFO queues, an in-flight set and a capacity.
//! 2. `executor_replies_once_in_key_order` runs random task sequences through
//!    a real `Pool` on a current-thread runtime (submitted one by one or in
//!    batches with `submit_many_wait`) and closes it.
//!
//! Runs are deterministic: a fixed RNG seed and case count, both overridable
//! with `PROPTEST_RNG_SEED` and `PROPTEST_CASES` (e.g. `PROPTEST_CASES=20000`
//! for a long soak). Failure persistence is off so CI never writes files.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use eventbus::pool::core::{BatchRefused, Core, Refused, Stats};
use eventbus::pool::{DrainReport, HandlerPanicked, Key, Outcome, Pool, PoolConfig, Task};
use futures::FutureExt;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};

/// The fixed default seed; `PROPTEST_RNG_SEED` overrides it.
const SEED: u64 = 0x00e7_e27b_0500_0001;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, rng_seed: RngSeed::Fixed(SEED), failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------
// 1. The core against a sequential model
// ---------------------------------------------------------------------------

type K = u8;

#[derive(Debug, Clone)]
enum Op {
    Submit(Option<K>),
    /// A worker takes the next ready message (if fewer than `workers` are busy).
    Start,
    /// The in-flight message at this index (modulo their number) completes.
    Complete(usize),
    Close,
    Abort,
    /// `try_submit_many` of these keys, in order.
    SubmitMany(Vec<Option<K>>),
    /// A worker takes up to this many ready messages under one lock
    /// (`complete_and_take_many`), as a batch taken ahead, not started.
    TakeMany(usize),
    /// The worker starts the messages it took ahead.
    StartAhead,
    /// The worker gives back the messages it took ahead (`complete_and_give_back`).
    GiveBack,
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop_oneof![1 => Just(None), 4 => (0u8..4).prop_map(Some)];
    prop_oneof![
        10 => key.clone().prop_map(Op::Submit),
        7 => Just(Op::Start),
        7 => any::<usize>().prop_map(Op::Complete),
        3 => prop::collection::vec(key, 0..6).prop_map(Op::SubmitMany),
        3 => (1usize..5).prop_map(Op::TakeMany),
        2 => Just(Op::StartAhead),
        2 => Just(Op::GiveBack),
    ]
}

/// An operation sequence with, at random places, at most one `Close` and at
/// most one `Abort` (half the cases stay open until the final close).
fn ops() -> impl Strategy<Value = Vec<Op>> {
    let at = prop::option::weighted(0.5, any::<prop::sample::Index>());
    (prop::collection::vec(op(), 0..150), at.clone(), at).prop_map(|(mut ops, close, abort)| {
        for (at, stop) in [(close, Op::Close), (abort, Op::Abort)] {
            if let Some(at) = at {
                let at = at.index(ops.len() + 1);
                ops.insert(at, stop);
            }
        }
        ops
    })
}

/// The sequential reference: what a keyed pool must do, written naively.
#[derive(Debug, Default)]
struct Model {
    capacity: usize,
    closed: bool,
    aborted: bool,
    /// Accepted, not yet started, per key in submission order.
    queued: BTreeMap<Option<K>, VecDeque<u32>>,
    in_flight: Vec<(Option<K>, u32)>,
}

impl Model {
    fn used(&self) -> usize {
        self.queued_len() + self.in_flight.len()
    }

    fn queued_len(&self) -> usize {
        self.queued.values().map(VecDeque::len).sum()
    }

    fn key_in_flight(&self, k: &Option<K>) -> bool {
        k.is_some() && self.in_flight.iter().any(|(f, _)| f == k)
    }

    /// How many messages may start now (what the core's ready queue holds):
    /// every unkeyed one, and the head of each key with nothing in flight.
    fn ready_count(&self) -> usize {
        self.queued
            .iter()
            .map(|(k, q)| match k {
                None => q.len(),
                Some(_) if !q.is_empty() && !self.key_in_flight(k) => 1,
                Some(_) => 0,
            })
            .sum()
    }

    /// Whether some message may start now: an unkeyed one, or the head of a
    /// key that has nothing in flight.
    fn startable(&self) -> bool {
        self.queued.iter().any(|(k, q)| !q.is_empty() && !self.key_in_flight(k))
    }

    fn stats(&self) -> Stats {
        let mut keys: HashSet<K> = self.in_flight.iter().filter_map(|(k, _)| *k).collect();
        keys.extend(self.queued.iter().filter(|(_, q)| !q.is_empty()).filter_map(|(k, _)| *k));
        Stats {
            queued: self.queued_len(),
            in_flight: self.in_flight.len(),
            capacity: self.capacity,
            active_keys: keys.len(),
        }
    }
}

/// What happened to each accepted message, for the final accounting.
#[derive(Debug, Default)]
struct Ledger {
    accepted: Vec<(Option<K>, u32)>,
    started: HashMap<u32, usize>,
    handed_back: HashMap<u32, usize>,
    /// Per key, message ids in the order they started.
    start_order: HashMap<Option<K>, Vec<u32>>,
}

struct Harness {
    core: Core<K, u32>,
    model: Model,
    ledger: Ledger,
    workers: usize,
    next_msg: u32,
    /// Taken by `TakeMany` and not started: in flight for the core and the
    /// model, not yet in the ledger.
    ahead: VecDeque<eventbus::pool::core::Job<K, u32>>,
}

impl Harness {
    fn new(capacity: usize, workers: usize) -> Self {
        Harness {
            core: Core::new(capacity),
            model: Model { capacity, ..Model::default() },
            ledger: Ledger::default(),
            workers,
            next_msg: 0,
            ahead: VecDeque::new(),
        }
    }

    fn submit(&mut self, key: Option<K>) -> Result<(), TestCaseError> {
        let msg = self.next_msg;
        self.next_msg += 1;
        let got = self.core.try_submit(key, msg);
        if self.model.closed {
            prop_assert_eq!(got, Err(Refused::Closed(key, msg)), "submit after close must be refused Closed");
        } else if self.model.used() >= self.model.capacity {
            prop_assert_eq!(got, Err(Refused::Full(key, msg)), "model is at capacity");
        } else {
            prop_assert_eq!(got, Ok(()), "model has room: {:?}", self.model.stats());
            self.model.queued.entry(key).or_default().push_back(msg);
            self.ledger.accepted.push((key, msg));
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(), TestCaseError> {
        if self.model.in_flight.len() >= self.workers {
            return Ok(()); // every worker is busy
        }
        let startable = self.model.startable();
        let Some(job) = self.core.try_next() else {
            prop_assert!(!startable, "try_next returned nothing though a message may start: {:?}", self.model);
            return Ok(());
        };
        self.took(job.key, job.msg)?;
        self.started(job.key, job.msg);
        Ok(())
    }

    /// Checks a message the core handed to a worker and marks it in flight.
    fn took(&mut self, key: Option<K>, msg: u32) -> Result<(), TestCaseError> {
        prop_assert!(
            self.model.startable(),
            "core handed out {:?} though nothing may start: {:?}",
            (key, msg),
            self.model
        );
        prop_assert!(!self.model.key_in_flight(&key), "core handed out key {:?} which is in flight", key);
        let queue = self.model.queued.get_mut(&key);
        let head = queue.and_then(|q| {
            if key.is_some() {
                // Keyed: exactly the head of its key's FIFO.
                if q.front() == Some(&msg) {
                    q.pop_front()
                } else {
                    None
                }
            } else {
                // Unkeyed messages carry no order promise: any queued one.
                let pos = q.iter().position(|m| *m == msg)?;
                q.remove(pos)
            }
        });
        prop_assert_eq!(head, Some(msg), "key {:?} started out of submission order: {:?}", key, self.model);
        self.model.in_flight.push((key, msg));
        Ok(())
    }

    fn started(&mut self, key: Option<K>, msg: u32) {
        *self.ledger.started.entry(msg).or_default() += 1;
        self.ledger.start_order.entry(key).or_default().push(msg);
    }

    fn submit_many(&mut self, keys: &[Option<K>]) -> Result<(), TestCaseError> {
        let mut batch: VecDeque<(Option<K>, u32)> = keys
            .iter()
            .map(|k| {
                self.next_msg += 1;
                (*k, self.next_msg - 1)
            })
            .collect();
        let all = batch.clone();
        let got = self.core.try_submit_many(&mut batch);
        if self.model.closed {
            prop_assert_eq!(got, Err(BatchRefused::Closed), "submit after close must be refused Closed");
            prop_assert_eq!(batch, all, "a refused batch is handed back whole");
            return Ok(());
        }
        let room = self.model.capacity - self.model.used();
        let accepted = room.min(all.len());
        let expected = if accepted == all.len() { Ok(()) } else { Err(BatchRefused::Full) };
        prop_assert_eq!(got, expected, "room for {} of {}", room, all.len());
        prop_assert_eq!(
            batch.iter().copied().collect::<Vec<_>>(),
            all.iter().skip(accepted).copied().collect::<Vec<_>>()
        );
        for &(key, msg) in all.iter().take(accepted) {
            self.model.queued.entry(key).or_default().push_back(msg);
            self.ledger.accepted.push((key, msg));
        }
        Ok(())
    }

    fn take_many(&mut self, n: usize) -> Result<(), TestCaseError> {
        let n = n.min(self.workers.saturating_sub(self.model.in_flight.len()));
        if n == 0 {
            return Ok(());
        }
        let ready = self.model.ready_count();
        let mut out = VecDeque::new();
        self.core.complete_and_take_many(&mut Vec::new(), n, &mut out);
        prop_assert_eq!(out.len(), n.min(ready), "took {} of {} ready, asked {}", out.len(), ready, n);
        for job in out {
            self.took(job.key, job.msg)?;
            self.ahead.push_back(job);
        }
        Ok(())
    }

    fn start_ahead(&mut self) {
        for job in std::mem::take(&mut self.ahead) {
            self.started(job.key, job.msg);
        }
    }

    fn give_back(&mut self) -> Result<(), TestCaseError> {
        if self.ahead.is_empty() {
            return Ok(());
        }
        let given: Vec<(Option<K>, u32)> = self.ahead.iter().map(|j| (j.key, j.msg)).collect();
        let dropped = self.core.complete_and_give_back(&mut Vec::new(), &mut self.ahead);
        prop_assert!(self.ahead.is_empty());
        for &(key, msg) in &given {
            let pos = self.model.in_flight.iter().position(|f| *f == (key, msg)).expect("taken ahead is in flight");
            self.model.in_flight.remove(pos);
        }
        if self.model.aborted {
            // After an abort nothing is queued again: handed back to the caller.
            let got: Vec<(Option<K>, u32)> = dropped.iter().map(|j| (j.key, j.msg)).collect();
            prop_assert_eq!(got, given.clone(), "after abort, given-back messages come back to the caller");
            for (_, m) in given {
                *self.ledger.handed_back.entry(m).or_default() += 1;
            }
        } else {
            prop_assert!(dropped.is_empty(), "before abort, given-back messages are queued again");
            // Back at the head of their keys, in their order.
            for &(key, msg) in given.iter().rev() {
                self.model.queued.entry(key).or_default().push_front(msg);
            }
        }
        Ok(())
    }

    fn complete(&mut self, i: usize) {
        // Only a started message completes (not one taken ahead).
        let started: Vec<usize> = (0..self.model.in_flight.len())
            .filter(|&at| !self.ahead.iter().any(|j| (j.key, j.msg) == self.model.in_flight[at]))
            .collect();
        if started.is_empty() {
            return;
        }
        let (key, _msg) = self.model.in_flight.remove(started[i % started.len()]);
        self.core.complete(key.as_ref());
    }

    fn close(&mut self) {
        self.core.close();
        self.model.closed = true;
    }

    fn abort(&mut self) -> Result<(), TestCaseError> {
        let handed_back = self.core.abort();
        self.model.closed = true;
        self.model.aborted = true;
        // Exactly the not-yet-started messages, each key's in submission order.
        let mut got: BTreeMap<Option<K>, VecDeque<u32>> = BTreeMap::new();
        for (k, m) in handed_back {
            got.entry(k).or_default().push_back(m);
            *self.ledger.handed_back.entry(m).or_default() += 1;
        }
        let mut expected = std::mem::take(&mut self.model.queued);
        expected.retain(|_, q| !q.is_empty());
        prop_assert_eq!(got, expected, "abort must hand back exactly the queued messages");
        Ok(())
    }

    fn check_stats(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.core.stats(), self.model.stats());
        prop_assert_eq!(self.core.is_closed(), self.model.closed);
        let s = self.core.stats();
        prop_assert!(s.queued + s.in_flight <= s.capacity, "{:?}", s);
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Submit(k) => self.submit(*k)?,
            Op::Start => self.start()?,
            Op::Complete(i) => self.complete(*i),
            Op::Close => self.close(),
            Op::Abort => self.abort()?,
            Op::SubmitMany(keys) => self.submit_many(keys)?,
            Op::TakeMany(n) => self.take_many(*n)?,
            Op::StartAhead => self.start_ahead(),
            Op::GiveBack => self.give_back()?,
        }
        self.check_stats()
    }

    /// Close, then let the workers run everything that is left.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        self.apply(&Op::StartAhead)?;
        self.apply(&Op::Close)?;
        self.submit(Some(0))?; // refused: closed
        while !self.model.in_flight.is_empty() || self.model.startable() {
            self.apply(&Op::Start)?;
            self.apply(&Op::Complete(0))?;
        }
        prop_assert!(self.core.try_next().is_none());
        prop_assert_eq!(self.core.stats(), Stats { capacity: self.model.capacity, ..Stats::default() });
        // Closed and drained: a waiting worker is told to exit.
        prop_assert!(matches!(self.core.next().now_or_never(), Some(None)), "next() must resolve to None");

        for (k, m) in &self.ledger.accepted {
            let started = self.ledger.started.get(m).copied().unwrap_or(0);
            let handed = self.ledger.handed_back.get(m).copied().unwrap_or(0);
            prop_assert_eq!(
                (started, handed),
                if started > 0 { (1, 0) } else { (0, 1) },
                "message {} of key {:?}: started {} times, handed back {} times",
                m,
                k,
                started,
                handed
            );
        }
        let accepted: HashSet<u32> = self.ledger.accepted.iter().map(|(_, m)| *m).collect();
        prop_assert!(self.ledger.started.keys().chain(self.ledger.handed_back.keys()).all(|m| accepted.contains(m)));
        // Per key, start order is submission order (minus what was handed back).
        for (k, order) in &self.ledger.start_order {
            if k.is_none() {
                continue;
            }
            let submitted: Vec<u32> = self
                .ledger
                .accepted
                .iter()
                .filter(|(key, m)| key == k && self.ledger.started.contains_key(m))
                .map(|(_, m)| *m)
                .collect();
            prop_assert_eq!(order, &submitted, "key {:?} started out of submission order", k);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(config(4_000))]

    #[test]
    fn core_matches_reference_model(
        capacity in 1usize..8,
        workers in 1usize..5,
        ops in ops(),
    ) {
        let mut h = Harness::new(capacity, workers);
        h.check_stats()?;
        for op in &ops {
            h.apply(op)?;
        }
        h.finish()?;
    }
}

// ---------------------------------------------------------------------------
// 2. The tokio executor: replies and per-key order
// ---------------------------------------------------------------------------

const INTENTIONAL_PANIC: &str = "intentional property-test panic";

/// Keep the intentional handler panics out of the output; report all others.
fn quiet_intentional_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !msg.contains(INTENTIONAL_PANIC) {
                default(info);
            }
        }));
    });
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Behavior {
    Ok,
    Fail,
    Panic,
}

fn behavior() -> impl Strategy<Value = Behavior> {
    prop_oneof![6 => Just(Behavior::Ok), 2 => Just(Behavior::Fail), 1 => Just(Behavior::Panic)]
}

#[derive(Debug, Clone)]
struct Spec {
    /// `None` is unkeyed; otherwise one of three keys.
    key: Option<u8>,
    behavior: Behavior,
    /// Yields before finishing, so handlers of different keys interleave.
    yields: u8,
}

fn spec() -> impl Strategy<Value = Spec> {
    let key = prop_oneof![1 => Just(None), 4 => (0u8..3).prop_map(Some)];
    (key, behavior(), 0u8..3).prop_map(|(key, behavior, yields)| Spec { key, behavior, yields })
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Start(usize),
    End(usize),
}

/// Handler starts and ends, with the task's key, in the order they happened.
type Log = Vec<(Option<u8>, Event)>;

/// Submits `specs` one by one (`chunk` 1) or `chunk` at a time with `submit_many_wait`.
fn run_on_pool(specs: &[Spec], concurrency: usize, capacity: usize, chunk: usize) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let log: Arc<Mutex<Log>> = Arc::default();
    let replies: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(vec![Vec::new(); specs.len()]));
    let handled = Arc::new(AtomicUsize::new(0));
    let report = rt.block_on(async {
        let pool = Pool::new(PoolConfig { concurrency, capacity, wait_timeout: Duration::from_secs(5) });
        let mut batch = Vec::new();
        for (i, s) in specs.iter().cloned().enumerate() {
            let (log, handled) = (Arc::clone(&log), Arc::clone(&handled));
            let work = async move {
                log.lock().unwrap().push((s.key, Event::Start(i)));
                handled.fetch_add(1, SeqCst);
                for _ in 0..s.yields {
                    tokio::task::yield_now().await;
                }
                log.lock().unwrap().push((s.key, Event::End(i)));
                match s.behavior {
                    Behavior::Ok => Ok(()),
                    Behavior::Fail => Err(format!("failed #{i}").into()),
                    Behavior::Panic => panic!("{INTENTIONAL_PANIC} #{i}"),
                }
            };
            let replies = Arc::clone(&replies);
            let reply = move |outcome: Outcome| {
                let text = match outcome {
                    Outcome::Done(Ok(())) => "ok".to_string(),
                    Outcome::Done(Err(e)) => match e.downcast_ref::<HandlerPanicked>() {
                        Some(p) => format!("panicked: {}", p.0),
                        None => format!("err: {e}"),
                    },
                    Outcome::NotProcessed => "not processed".to_string(),
                };
                replies.lock().unwrap()[i].push(text);
            };
            let key: Option<Key> = s.key.map(|k| Arc::from(format!("key-{k}")));
            let task = Task::new(key, work, reply);
            if chunk <= 1 {
                pool.submit_wait(task).await.map_err(|r| r.error).expect("open pool accepts");
            } else {
                batch.push(task);
                if batch.len() == chunk || i + 1 == specs.len() {
                    let tasks = std::mem::take(&mut batch);
                    pool.submit_many_wait(tasks).await.map_err(|r| r.error).expect("open pool accepts");
                }
            }
        }
        pool.close(None).await
    });
    prop_assert_eq!(report, DrainReport { handed_back: 0, timed_out: false });
    prop_assert_eq!(handled.load(SeqCst), specs.len(), "every task handled exactly once");

    let replies = replies.lock().unwrap();
    for (i, s) in specs.iter().enumerate() {
        let expected = match s.behavior {
            Behavior::Ok => "ok".to_string(),
            Behavior::Fail => format!("err: failed #{i}"),
            Behavior::Panic => format!("panicked: {INTENTIONAL_PANIC} #{i}"),
        };
        prop_assert_eq!(&replies[i], &vec![expected], "reply of task {} ({:?})", i, s);
    }

    // Per key: Start(a) End(a) Start(b) End(b) ... with a < b < ... in
    // submission order, i.e. one at a time and in order.
    let log = log.lock().unwrap();
    for k in 0u8..3 {
        let events: Vec<Event> = log.iter().filter(|(key, _)| *key == Some(k)).map(|(_, e)| e.clone()).collect();
        let expected: Vec<Event> = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.key == Some(k))
            .flat_map(|(i, _)| [Event::Start(i), Event::End(i)])
            .collect();
        prop_assert_eq!(events, expected, "key {} handled out of order or overlapping", k);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn executor_replies_once_in_key_order(
        specs in prop::collection::vec(spec(), 0..60),
        concurrency in 1usize..5,
        capacity in 1usize..12,
        chunk in 1usize..6,
    ) {
        quiet_intentional_panics();
        run_on_pool(&specs, concurrency, capacity, chunk)?;
    }
}
