#![cfg(not(feature = "loom"))]
//! Tests of the tokio executor of the global keyed pool (`eventbus::pool`).
//!
//! Each test builds its own runtime, so the runtime's task metrics count only
//! the tasks of that test: after `close` (or after the last handle is dropped)
//! the tests assert that no task is alive any more.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use eventbus::pool::{
    DrainReport, HandlerPanicked, HandlerResult, Key, Outcome, Pool, PoolConfig, Rejected, SubmitError, Task,
};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::{oneshot, Notify, Semaphore};

/// Upper bound for waits that must finish; reaching it means the test failed
/// (it is a hang guard, never a synchronization).
const HANG_GUARD: Duration = Duration::from_secs(60);

fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn config(concurrency: usize, capacity: usize) -> PoolConfig {
    PoolConfig { concurrency, capacity, wait_timeout: Duration::from_secs(5) }
}

fn key(s: impl AsRef<str>) -> Option<Key> {
    Some(Arc::from(s.as_ref()))
}

/// Handlers of some tests panic on purpose; keep their messages out of the
/// test output while leaving every other panic (a failing assert) visible.
const INTENTIONAL_PANIC: &str = "intentional test panic";

fn quiet_intentional_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !msg.contains(INTENTIONAL_PANIC) {
                default(info);
            }
        }));
    });
}

/// Asserts that no task is alive on the current runtime.
///
/// Our own code spawns nothing but the pool's workers, and `close` awaits
/// their `JoinHandle`s. tokio, however, wakes a `JoinHandle` *before* it
/// removes the finished task from the runtime's task list
/// (`runtime/task/harness.rs`: `wake_join()` then `release()`), and on a
/// multi-thread runtime that removal runs on a worker thread. The count may
/// therefore lag the join by a few instructions; we re-read it (yielding,
/// bounded) instead of asserting a racy snapshot. Tasks that are genuinely
/// alive (a leaked or never-aborted worker) keep the count up and fail.
async fn assert_no_tasks_alive() {
    let handle = tokio::runtime::Handle::current();
    let started = Instant::now();
    loop {
        let alive = handle.metrics().num_alive_tasks();
        if alive == 0 {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{alive} tasks still alive");
        tokio::task::yield_now().await;
    }
}

/// Waits (yielding, bounded by the hang guard) until `cond` holds.
///
/// The pool calls a task's reply *before* it releases the task's key in the
/// core (so replies of one key arrive in order), hence a submitter that has
/// seen a reply may still briefly see that task in flight in `stats()`. Tests
/// that assert an exact snapshot first wait for the pool to settle.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < HANG_GUARD, "timed out waiting until {what}");
        tokio::task::yield_now().await;
    }
}

/// Records, per task index, every call of its reply.
#[derive(Default)]
struct Replies {
    calls: Mutex<HashMap<usize, Vec<String>>>,
    count: AtomicUsize,
    notify: Notify,
}

impl Replies {
    fn describe(outcome: &Outcome) -> String {
        match outcome {
            Outcome::Done(Ok(())) => "ok".to_string(),
            Outcome::Done(Err(e)) if e.downcast_ref::<HandlerPanicked>().is_some() => format!("panicked: {e}"),
            Outcome::Done(Err(e)) => format!("err: {e}"),
            Outcome::NotProcessed => "not processed".to_string(),
        }
    }

    /// The reply closure for task `i`.
    fn reply(self: &Arc<Self>, i: usize) -> impl FnOnce(Outcome) + Send + 'static {
        let this = Arc::clone(self);
        move |outcome| {
            this.calls.lock().unwrap().entry(i).or_default().push(Replies::describe(&outcome));
            this.count.fetch_add(1, SeqCst);
            this.notify.notify_waiters();
        }
    }

    /// Waits until at least `n` replies were called.
    async fn wait_for(&self, n: usize) {
        tokio::time::timeout(HANG_GUARD, async {
            loop {
                let notified = self.notify.notified();
                if self.count.load(SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("only {} of {n} replies arrived", self.count.load(SeqCst)));
    }

    /// The single outcome of task `i`; fails if its reply ran zero or several times.
    fn only(&self, i: usize) -> String {
        let calls = self.calls.lock().unwrap();
        let got = calls.get(&i).cloned().unwrap_or_default();
        assert_eq!(got.len(), 1, "reply of task {i} called {} times: {got:?}", got.len());
        got[0].clone()
    }

    fn total(&self) -> usize {
        self.count.load(SeqCst)
    }
}

fn ok_task(k: Option<Key>, replies: &Arc<Replies>, i: usize) -> Task {
    Task::new(k, async { Ok(()) }, replies.reply(i))
}

/// 100k messages over 1,000 keys, submitted in per-key version order with
/// random simulated work: every handler finds the previous version of its key
/// completed, every message completes Ok exactly once, and close leaves no task.
#[test]
fn per_key_order_100k_messages_1000_keys() {
    const KEYS: usize = 1_000;
    const VERSIONS: u32 = 100;
    const TOTAL: usize = KEYS * VERSIONS as usize;

    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(64, 4_096));
        let keys: Vec<Key> = (0..KEYS).map(|k| Arc::from(format!("aggregate-{k}"))).collect();
        // Per-key state, touched only inside the handlers of that key, which
        // the pool runs one at a time: last completed version (0 = none).
        let last_completed: Arc<Vec<AtomicU32>> = Arc::new((0..KEYS).map(|_| AtomicU32::new(0)).collect());
        let violations = Arc::new(AtomicUsize::new(0));
        let handled: Arc<Vec<AtomicU32>> = Arc::new((0..TOTAL).map(|_| AtomicU32::new(0)).collect());
        let replies = Arc::new(Replies::default());

        // A random interleaving of the keys that keeps each key's versions in order.
        let mut rng = SmallRng::seed_from_u64(0x5eed_0001);
        let mut order: Vec<usize> = (0..TOTAL).map(|i| i % KEYS).collect();
        order.shuffle(&mut rng);
        let mut next_version = vec![0u32; KEYS];

        let started = Instant::now();
        for (i, &k) in order.iter().enumerate() {
            next_version[k] += 1;
            let version = next_version[k];
            let delay = rng.gen_range(0..100u32);
            let sleep_us = rng.gen_range(0..=200u64);
            let (last_completed, violations, handled) =
                (Arc::clone(&last_completed), Arc::clone(&violations), Arc::clone(&handled));
            let work = async move {
                if last_completed[k].load(SeqCst) != version - 1 {
                    violations.fetch_add(1, SeqCst);
                }
                handled[i].fetch_add(1, SeqCst);
                match delay {
                    0..=84 => {}
                    85..=92 => {
                        for _ in 0..=(delay % 3) {
                            tokio::task::yield_now().await;
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_micros(sleep_us)).await,
                }
                last_completed[k].store(version, SeqCst);
                Ok(())
            };
            pool.submit_wait(Task::new(Some(keys[k].clone()), work, replies.reply(i))).await.unwrap();
        }
        replies.wait_for(TOTAL).await;
        let elapsed = started.elapsed();

        assert_eq!(violations.load(SeqCst), 0, "order violations");
        for i in 0..TOTAL {
            assert_eq!(handled[i].load(SeqCst), 1, "message {i} handled a wrong number of times");
            assert_eq!(replies.only(i), "ok", "message {i}");
        }
        assert_eq!(replies.total(), TOTAL);
        for (k, last) in last_completed.iter().enumerate() {
            assert_eq!(last.load(SeqCst), VERSIONS, "key {k} did not reach its last version");
        }

        let report = pool.close(None).await;
        assert_eq!(report, DrainReport { handed_back: 0, timed_out: false });
        drop(pool);
        assert_no_tasks_alive().await;
        eprintln!("100k messages over 1,000 keys handled in {elapsed:?}");
    });
}

/// A key whose handler never finishes holds one worker only: 1,000 messages
/// of other keys complete meanwhile; the stuck key's followers wait behind it.
#[test]
fn stuck_key_does_not_block_other_keys() {
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(4, 10_000));
        let replies = Arc::new(Replies::default());
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let stuck = Task::new(
            key("stuck"),
            async move {
                let _ = started_tx.send(());
                release_rx.await.expect("the test holds the sender");
                Ok(())
            },
            replies.reply(0),
        );
        pool.submit(stuck).await.unwrap();
        started_rx.await.unwrap();
        // Three followers of the stuck key, queued behind it.
        let followers_run = Arc::new(AtomicUsize::new(0));
        for i in 1..=3 {
            let followers_run = Arc::clone(&followers_run);
            let work = async move {
                followers_run.fetch_add(1, SeqCst);
                Ok(())
            };
            pool.submit(Task::new(key("stuck"), work, replies.reply(i))).await.unwrap();
        }
        // 1,000 messages of 100 other keys.
        for i in 4..1_004 {
            pool.submit(ok_task(key(format!("other-{}", i % 100)), &replies, i)).await.unwrap();
        }
        replies.wait_for(1_000).await;
        for i in 4..1_004 {
            assert_eq!(replies.only(i), "ok");
        }
        assert_eq!(replies.total(), 1_000, "nothing of the stuck key may have completed");
        assert_eq!(followers_run.load(SeqCst), 0, "a follower overtook the stuck message");
        wait_until("only the stuck message is in flight", || pool.stats().in_flight == 1).await;
        let stats = pool.stats();
        assert_eq!((stats.in_flight, stats.queued, stats.active_keys), (1, 3, 1), "{stats:?}");

        release_tx.send(()).unwrap();
        replies.wait_for(1_004).await;
        for i in 0..4 {
            assert_eq!(replies.only(i), "ok");
        }
        assert_eq!(followers_run.load(SeqCst), 3);
        assert_eq!(pool.close(None).await, DrainReport::default());
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// With many more workers than keys, each key still has at most one message
/// in flight; different keys do run concurrently (so the check has teeth).
#[test]
fn at_most_one_in_flight_per_key() {
    const KEYS: usize = 16;
    const PER_KEY: usize = 500;
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(64, 1_024));
        let in_flight: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
        let total_in_flight = Arc::new(AtomicUsize::new(0));
        let max_total = Arc::new(AtomicUsize::new(0));
        let violations = Arc::new(AtomicUsize::new(0));
        let replies = Arc::new(Replies::default());
        for i in 0..KEYS * PER_KEY {
            let k = i % KEYS;
            let (in_flight, total_in_flight, max_total, violations) =
                (Arc::clone(&in_flight), Arc::clone(&total_in_flight), Arc::clone(&max_total), Arc::clone(&violations));
            let work = async move {
                if in_flight[k].fetch_add(1, SeqCst) != 0 {
                    violations.fetch_add(1, SeqCst);
                }
                let now = total_in_flight.fetch_add(1, SeqCst) + 1;
                max_total.fetch_max(now, SeqCst);
                for _ in 0..(i % 4) {
                    tokio::task::yield_now().await;
                }
                total_in_flight.fetch_sub(1, SeqCst);
                in_flight[k].fetch_sub(1, SeqCst);
                Ok(())
            };
            pool.submit_wait(Task::new(key(format!("k{k}")), work, replies.reply(i))).await.unwrap();
        }
        replies.wait_for(KEYS * PER_KEY).await;
        assert_eq!(violations.load(SeqCst), 0, "two messages of one key were in flight together");
        assert!(max_total.load(SeqCst) >= 2, "no two keys ever ran concurrently: the check proved nothing");
        assert_eq!(pool.close(None).await, DrainReport::default());
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// Capacity 10 with held handlers: 10 submits are accepted, the 11th times
/// out with `QueueFull` and gets its task back; a waiting `submit_wait` is
/// accepted as soon as one handler finishes.
#[test]
fn capacity_bounds_queued_plus_in_flight() {
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(4, 10));
        let gate = Arc::new(Semaphore::new(0));
        let replies = Arc::new(Replies::default());
        let held = |i: usize| {
            let gate = Arc::clone(&gate);
            let work = async move {
                gate.acquire().await.unwrap().forget();
                Ok(())
            };
            Task::new(key(format!("k{}", i % 6)), work, replies.reply(i))
        };
        for i in 0..10 {
            pool.submit_timeout(held(i), Duration::from_millis(50)).await.unwrap();
            let s = pool.stats();
            assert_eq!(s.queued + s.in_flight, i + 1, "{s:?}");
        }

        let Err(Rejected { error, task }) = pool.submit_timeout(held(10), Duration::from_millis(50)).await else {
            panic!("the 11th submit was accepted beyond capacity 10");
        };
        assert_eq!(error, SubmitError::QueueFull { capacity: 10, waited: Duration::from_millis(50) });
        assert_eq!(task.key().map(|k| &**k), Some("k4"), "the refused task is handed back");
        let Err(Rejected { error, task }) = pool.try_submit(task) else {
            panic!("try_submit accepted beyond capacity");
        };
        assert!(matches!(error, SubmitError::QueueFull { capacity: 10, .. }), "{error:?}");
        let s = pool.stats();
        assert_eq!((s.queued + s.in_flight, s.capacity), (10, 10), "{s:?}");
        assert_eq!(replies.total(), 0, "a refused task's reply must not run while it is handed back");

        // The handed-back task waits for room...
        {
            let mut waiting = pin!(pool.submit_wait(task));
            assert!(futures::poll!(waiting.as_mut()).is_pending(), "submit_wait accepted while full");
            // ...and is accepted once one handler finishes.
            gate.add_permits(1);
            tokio::time::timeout(HANG_GUARD, waiting).await.expect("submit_wait not accepted after a release").unwrap();
        }
        let s = pool.stats();
        assert!(s.queued + s.in_flight <= 10, "{s:?}");

        gate.add_permits(100);
        replies.wait_for(11).await;
        for i in 0..11 {
            assert_eq!(replies.only(i), "ok");
        }
        assert_eq!(pool.close(None).await, DrainReport::default());
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// A batch is accepted in order as far as there is room: `try_submit_many`
/// hands back the rest, in order, with `QueueFull`; `submit_many_timeout`
/// waits for room and hands back what still did not fit; `submit_many_wait`
/// takes the rest as room frees; after close the whole batch comes back with
/// `Closed`. Every task is replied to once, and one key's tasks run in batch
/// order.
#[test]
fn submit_many_accepts_in_order_and_hands_back_the_rest() {
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(2, 4));
        let gate = Arc::new(Semaphore::new(0));
        let replies = Arc::new(Replies::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = |i: usize| {
            let (gate, order) = (Arc::clone(&gate), Arc::clone(&order));
            let work = async move {
                gate.acquire().await.unwrap().forget();
                order.lock().unwrap().push(i);
                Ok(())
            };
            // Two keys: even and odd indexes.
            Task::new(key(format!("k{}", i % 2)), work, replies.reply(i))
        };
        let keys_of = |tasks: &[Task]| -> Vec<String> {
            tasks.iter().map(|t| t.key().map(|k| k.to_string()).unwrap_or_default()).collect()
        };

        let Err(rejected) = pool.try_submit_many((0..6).map(held).collect()) else {
            panic!("6 tasks accepted with capacity 4");
        };
        assert_eq!(rejected.error, SubmitError::QueueFull { capacity: 4, waited: Duration::ZERO });
        assert_eq!(keys_of(&rejected.tasks), ["k0", "k1"], "tasks 4 and 5 handed back, in order");
        let s = pool.stats();
        assert_eq!(s.queued + s.in_flight, 4, "{s:?}");

        let Err(again) = pool.submit_many_timeout(rejected.tasks, Duration::from_millis(50)).await else {
            panic!("accepted beyond capacity");
        };
        assert_eq!(again.error, SubmitError::QueueFull { capacity: 4, waited: Duration::from_millis(50) });
        assert_eq!(again.tasks.len(), 2);
        assert_eq!(replies.total(), 0, "handed-back tasks are not replied to while held");

        // Waits for room: accepted as the held handlers finish.
        let waiting = {
            let pool = pool.clone();
            let mut tasks = again.tasks;
            tasks.push(held(6));
            tokio::spawn(async move { pool.submit_many_wait(tasks).await.map_err(|r| r.error) })
        };
        gate.add_permits(100);
        tokio::time::timeout(HANG_GUARD, waiting).await.expect("submit_many_wait never accepted").unwrap().unwrap();
        replies.wait_for(7).await;
        for i in 0..7 {
            assert_eq!(replies.only(i), "ok");
        }
        let order = order.lock().unwrap().clone();
        for k in 0..2 {
            let of_key: Vec<usize> = order.iter().copied().filter(|i| i % 2 == k).collect();
            let mut sorted = of_key.clone();
            sorted.sort();
            assert_eq!(of_key, sorted, "key k{k} ran out of batch order: {order:?}");
        }

        assert_eq!(pool.close(None).await, DrainReport::default());
        let Err(closed) = pool.submit_many((7..9).map(held).collect()).await else {
            panic!("a closed pool accepted a batch");
        };
        assert_eq!((&closed.error, closed.tasks.len()), (&SubmitError::Closed, 2));
        drop(closed);
        replies.wait_for(9).await;
        assert_eq!((replies.only(7), replies.only(8)), ("not processed".into(), "not processed".into()));
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// Under load with a small capacity, `stats()` never shows more queued plus
/// in-flight messages than the capacity, seen by the submitter and by handlers.
#[test]
fn stats_never_exceed_capacity_under_load() {
    const CAPACITY: usize = 10;
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(8, CAPACITY));
        let over = Arc::new(AtomicUsize::new(0));
        let max_used = Arc::new(AtomicUsize::new(0));
        let replies = Arc::new(Replies::default());
        let check = |s: eventbus::pool::Stats, over: &AtomicUsize, max_used: &AtomicUsize| {
            max_used.fetch_max(s.queued + s.in_flight, SeqCst);
            if s.queued + s.in_flight > s.capacity || s.capacity != CAPACITY {
                over.fetch_add(1, SeqCst);
            }
        };
        for i in 0..2_000 {
            let (p, o, m) = (pool.clone(), Arc::clone(&over), Arc::clone(&max_used));
            let work = async move {
                check(p.stats(), &o, &m);
                for _ in 0..(i % 3) {
                    tokio::task::yield_now().await;
                }
                check(p.stats(), &o, &m);
                Ok(())
            };
            pool.submit_wait(Task::new(key(format!("k{}", i % 20)), work, replies.reply(i))).await.unwrap();
            check(pool.stats(), &over, &max_used);
        }
        replies.wait_for(2_000).await;
        assert_eq!(over.load(SeqCst), 0, "stats showed more than the capacity");
        assert_eq!(max_used.load(SeqCst), CAPACITY, "the load never filled the pool: the check proved nothing");
        assert_eq!(pool.close(None).await, DrainReport::default());
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// A panicking handler is reported as `HandlerPanicked`; the single worker
/// survives and handles later messages of the same key and of other keys.
#[test]
fn panicking_handler_is_reported_and_pool_survives() {
    quiet_intentional_panics();
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(1, 100));
        let replies = Arc::new(Replies::default());
        let panicking = |i: usize, k: &str| {
            Task::new(
                key(k),
                async move {
                    if std::hint::black_box(true) {
                        panic!("{INTENTIONAL_PANIC} #{i}");
                    }
                    Ok(())
                },
                replies.reply(i),
            )
        };
        // Queued together: the panic must not disturb what waits behind it.
        pool.submit(panicking(0, "a")).await.unwrap();
        pool.submit(ok_task(key("a"), &replies, 1)).await.unwrap();
        pool.submit(ok_task(key("b"), &replies, 2)).await.unwrap();
        pool.submit(panicking(3, "b")).await.unwrap();
        pool.submit(ok_task(None, &replies, 4)).await.unwrap();
        replies.wait_for(5).await;
        assert_eq!(replies.only(0), format!("panicked: handler panicked: {INTENTIONAL_PANIC} #0"));
        assert_eq!(replies.only(1), "ok");
        assert_eq!(replies.only(2), "ok");
        assert_eq!(replies.only(3), format!("panicked: handler panicked: {INTENTIONAL_PANIC} #3"));
        assert_eq!(replies.only(4), "ok");

        // And through `run`, one at a time.
        let outcome = pool
            .run(key("a"), async {
                if std::hint::black_box(true) {
                    panic!("{INTENTIONAL_PANIC} via run");
                }
                Ok(())
            })
            .await
            .unwrap();
        match outcome {
            Outcome::Done(Err(e)) => {
                let panicked = e.downcast_ref::<HandlerPanicked>().expect("a HandlerPanicked error");
                assert_eq!(panicked.0, format!("{INTENTIONAL_PANIC} via run"));
            }
            other => panic!("expected HandlerPanicked, got {other:?}"),
        }
        assert!(pool.run(key("a"), async { Ok(()) }).await.unwrap().is_ok());
        assert!(pool.run(key("c"), async { Ok(()) }).await.unwrap().is_ok());
        assert_eq!(pool.close(None).await, DrainReport::default());
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// A handler's error reaches its submitter, through `run` and through a reply.
#[test]
fn failed_handler_result_reaches_submitter() {
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(2, 100));
        let outcome = pool.run(key("order-7"), async { Err("validation failed: 42".into()) }).await.unwrap();
        match outcome {
            Outcome::Done(Err(e)) => {
                assert_eq!(e.to_string(), "validation failed: 42");
                assert!(e.downcast_ref::<HandlerPanicked>().is_none());
            }
            other => panic!("expected the handler's error, got {other:?}"),
        }
        let replies = Arc::new(Replies::default());
        let failing: std::future::Ready<HandlerResult> = std::future::ready(Err("no such account".into()));
        pool.submit(Task::new(None, failing, replies.reply(0))).await.unwrap();
        replies.wait_for(1).await;
        assert_eq!(replies.only(0), "err: no such account");
        // The failure does not stop the key.
        assert!(pool.run(key("order-7"), async { Ok(()) }).await.unwrap().is_ok());
        assert_eq!(pool.close(None).await, DrainReport::default());
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// `close(None)` with many queued messages runs every one of them to the end;
/// submits during and after close are refused with `Closed`.
#[test]
fn close_drains_every_queued_message() {
    const N: usize = 2_000;
    multi_thread_runtime().block_on(async {
        let (pool, gate, replies) = gated_pool(2, 10_000, N).await;
        // Handlers are held: at most `concurrency` messages left the queue.
        let s = pool.stats();
        assert_eq!(s.queued + s.in_flight, N);
        assert!(s.queued >= N - 2, "{s:?}");

        let refused = Arc::new(Replies::default());
        let (report, ()) = tokio::join!(pool.close(None), async {
            // `close` was polled first, so intake is already stopped.
            assert!(pool.is_closed());
            let Err(Rejected { error, task }) = pool.submit(ok_task(key("late"), &refused, 0)).await else {
                panic!("submit accepted during close");
            };
            assert_eq!(error, SubmitError::Closed);
            drop(task); // a refused task dropped by its submitter reports NotProcessed
            gate.add_permits(N);
        });
        assert_eq!(report, DrainReport { handed_back: 0, timed_out: false });
        // close returned: every accepted message has been handled.
        assert_eq!(replies.total(), N);
        for i in 0..N {
            assert_eq!(replies.only(i), "ok", "message {i}");
        }
        assert_eq!(refused.only(0), "not processed");

        let Err(Rejected { error, .. }) = pool.try_submit(ok_task(None, &refused, 1)) else {
            panic!("try_submit accepted after close");
        };
        assert_eq!(error, SubmitError::Closed);
        assert_eq!(pool.run(key("late"), async { Ok(()) }).await.unwrap_err(), SubmitError::Closed);
        let s = pool.stats();
        assert_eq!((s.queued, s.in_flight, s.active_keys), (0, 0, 0), "{s:?}");
        assert_no_tasks_alive().await;
    });
}

/// `close(Some(100ms))` with handlers stuck forever: it times out, hands back
/// the queued and the stuck messages (each reply called exactly once, with
/// `NotProcessed`), keeps the outcome of what finished, and leaves no task.
#[test]
fn close_with_deadline_hands_back_stuck_and_queued() {
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(4, 1_000));
        let replies = Arc::new(Replies::default());
        let started = Arc::new(Semaphore::new(0));
        // Finished before close: their outcome stands.
        for i in 0..5 {
            pool.submit(ok_task(key("fast"), &replies, i)).await.unwrap();
        }
        replies.wait_for(5).await;
        // Three keys stuck forever, holding three of the four workers.
        let stuck = |i: usize, k: &str| {
            let started = Arc::clone(&started);
            let work = async move {
                started.add_permits(1);
                std::future::pending::<()>().await;
                Ok(())
            };
            Task::new(key(k), work, replies.reply(i))
        };
        let mut next = 5;
        for k in ["s0", "s1", "s2"] {
            pool.submit(stuck(next, k)).await.unwrap();
            next += 1;
        }
        tokio::time::timeout(HANG_GUARD, started.acquire_many(3)).await.unwrap().unwrap().forget();
        // Queued behind the stuck keys: never ready, so the free worker stays idle.
        for i in 0..12 {
            let k = ["s0", "s1", "s2"][i % 3];
            pool.submit(ok_task(key(k), &replies, next)).await.unwrap();
            next += 1;
        }
        wait_until("the last fast message has left", || pool.stats().in_flight == 3).await;
        let s = pool.stats();
        assert_eq!((s.in_flight, s.queued, s.active_keys), (3, 12, 3), "{s:?}");

        let started_close = Instant::now();
        let report = pool.close(Some(Duration::from_millis(100))).await;
        assert!(started_close.elapsed() >= Duration::from_millis(100));
        assert_eq!(report, DrainReport { handed_back: 15, timed_out: true });
        // When close returns, every reply has been called exactly once.
        assert_eq!(replies.total(), next);
        for i in 0..5 {
            assert_eq!(replies.only(i), "ok");
        }
        for i in 5..next {
            assert_eq!(replies.only(i), "not processed", "task {i}");
        }
        assert!(matches!(
            pool.try_submit(ok_task(None, &replies, 999)),
            Err(Rejected { error: SubmitError::Closed, .. })
        ));
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// Dropping the last `Pool` handle without `close` stops the workers (none
/// leak) and reports every unfinished task `NotProcessed`.
#[test]
fn dropping_last_handle_aborts_workers() {
    multi_thread_runtime().block_on(async {
        let pool = Pool::new(config(8, 100));
        let replies = Arc::new(Replies::default());
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let work = async move {
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
            Ok(())
        };
        pool.submit(Task::new(key("stuck"), work, replies.reply(0))).await.unwrap();
        started_rx.await.unwrap();
        for i in 1..4 {
            pool.submit(ok_task(key("stuck"), &replies, i)).await.unwrap();
        }
        let second_handle = pool.clone();
        drop(pool);
        assert_eq!(second_handle.stats().in_flight, 1, "one handle left: the pool keeps running");
        drop(second_handle);

        replies.wait_for(4).await;
        for i in 0..4 {
            assert_eq!(replies.only(i), "not processed", "task {i}");
        }
        assert_no_tasks_alive().await;
    });
}

/// A pool holding `n` accepted tasks over a few keys, each waiting for one
/// permit of the returned gate before it finishes Ok.
async fn gated_pool(concurrency: usize, capacity: usize, n: usize) -> (Pool, Arc<Semaphore>, Arc<Replies>) {
    let pool = Pool::new(config(concurrency, capacity));
    let gate = Arc::new(Semaphore::new(0));
    let replies = Arc::new(Replies::default());
    for i in 0..n {
        let gate = Arc::clone(&gate);
        let work = async move {
            gate.acquire().await.unwrap().forget();
            Ok(())
        };
        pool.submit(Task::new(key(format!("k{}", i % 7)), work, replies.reply(i))).await.unwrap();
    }
    (pool, gate, replies)
}

/// Concurrent `close` calls share one drain: the second one does not return
/// before every accepted task ran, and both get the same report.
#[test]
fn concurrent_closes_wait_for_the_same_drain() {
    const N: usize = 200;
    multi_thread_runtime().block_on(async {
        let (pool, gate, replies) = gated_pool(4, 1_000, N).await;
        let closed_after = |report: DrainReport| (report, replies.total());
        let (first, second, ()) = tokio::join!(
            async { closed_after(pool.close(None).await) },
            // Polled after the first call took the workers.
            async { closed_after(pool.close(Some(Duration::from_millis(1))).await) },
            async {
                assert_eq!(replies.total(), 0, "nothing ran before the gate opened");
                gate.add_permits(N);
            }
        );
        let drained = DrainReport { handed_back: 0, timed_out: false };
        assert_eq!(first, (drained, N));
        assert_eq!(second, (drained, N), "the second close waited for the drain (the first call's deadline counts)");
        for i in 0..N {
            assert_eq!(replies.only(i), "ok", "task {i}");
        }
        drop(pool);
        assert_no_tasks_alive().await;
    });
}

/// A `close` future dropped midway does not abandon the drain: it goes on,
/// and a later `close` waits for it and reports it.
#[test]
fn dropped_close_future_still_drains() {
    const N: usize = 200;
    multi_thread_runtime().block_on(async {
        let (pool, gate, replies) = gated_pool(4, 1_000, N).await;
        let mut abandoned = Box::pin(pool.close(None));
        assert!(futures::poll!(abandoned.as_mut()).is_pending(), "the gate is shut, so the drain cannot be done");
        drop(abandoned);
        assert!(pool.is_closed());
        assert_eq!(replies.total(), 0);

        let (report, ()) = tokio::join!(pool.close(None), async { gate.add_permits(N) });
        assert_eq!(report, DrainReport { handed_back: 0, timed_out: false });
        assert_eq!(replies.total(), N, "close returned only after the drain");
        for i in 0..N {
            assert_eq!(replies.only(i), "ok", "task {i}");
        }
        drop(pool);
        assert_no_tasks_alive().await;
    });
}
