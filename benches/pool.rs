//! Throughput of the global keyed pool against the seed's pool, side by side
//! in one run: the seed's actual design in Go (`benches/seedpool`, built with
//! `go build` when `go` is on the PATH) and its in-process Rust rebuild.
//!
//! `cargo bench --bench pool` (release; about 3 minutes on 2 cores, most of it
//! the seed-pattern baselines of (b)). Environment:
//! - `POOL_BENCH_SCALE` (default 1.0) scales every event count, e.g. `0.05`
//!   for a run of a few seconds;
//! - `POOL_BENCH_RUNS` (default 3): runs per side, the sides alternating; the
//!   table shows the median and the slowest and fastest run;
//! - `POOL_BENCH_ONLY=a|b`: one scenario; `POOL_BENCH_SIDE=ours|go|rust`: ours
//!   plus that baseline only (`ours` alone: no baseline, for profiling);
//! - `POOL_BENCH_GO`: the `go` command (default `go` on the PATH);
//!   `POOL_BENCH_VERBOSE=1` prints every run's wall time.
//!
//! Scenarios:
//! (a) 1,000,000 events over 10,000 keys, trivial handler: the scheduling cost
//!     of an event. Ours: one producer calls `Pool::submit` per event (as the
//!     consumer does), and, as a second row, `Pool::submit_many` per batch of
//!     500 (a fetched batch). Baselines: the seed's pool — 256 workers, each
//!     with one bounded queue of 1,000, key hashed (FNV-1a) mod 256 — fed by
//!     one producer as fast as it accepts.
//! (b) 200,000 events over 1,000 keys, a handler that waits 1 ms, spread over
//!     15 partitions by key hash. Baselines: the seed's consumer pattern —
//!     each partition submits one event to the seed's pool and waits for its
//!     result before the next (ConsumeClaim). Ours: the 15 partitions submit
//!     without waiting (per-key order is the pool's job), bounded by the
//!     pool's capacity. One more Go row: the seed's pool fed without waiting
//!     (its best case, not what its consumer does).
//!
//! The 1 ms wait costs the same wall time on both sides, and each side's mean
//! is measured and printed: Go's handler is `time.Sleep(1ms)` (about 1.1 ms);
//! ours wait on a bench-local timer thread with microsecond precision (also
//! about 1.1 ms), because `tokio::time::sleep(1 ms)` takes about 2.1 ms
//! (tokio's timer has 1 ms ticks and rounds up), which would halve our figure
//! for a reason that is not the pool's. The bench prints what tokio's sleep
//! costs too.
//!
//! Timed: from the first submit until every event has been handled (ours:
//! `close(None)` returned; the seed's pools: their workers drained and exited).
//! CPU per event: user + system time of the whole process over the timed
//! region (ours and the Rust rebuild: `/proc/self/stat`, 10 ms ticks; Go:
//! `getrusage`, reported by the Go program).

use std::collections::BinaryHeap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use eventbus::pool::{HandlerResult, Key, Outcome, Pool, PoolConfig, Rejected, SubmitError, Task};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

const PARTITIONS: usize = 15;
const SEED_WORKERS: usize = 256;
const SEED_QUEUE: usize = 1_000;
const SEED_WAIT: Duration = Duration::from_millis(500);
/// Events per `submit_many` call in the batched row of (a).
const BATCH: usize = 500;
/// The simulated work of (b)'s handler.
const WORK: Duration = Duration::from_millis(1);

fn runtime() -> tokio::runtime::Runtime {
    // One worker thread per core, like a service's default runtime.
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

fn key_name(k: usize) -> String {
    // The same names as the Go program's.
    format!("aggregate-{k:06}")
}

fn keys(n: usize) -> Arc<Vec<Key>> {
    Arc::new((0..n).map(|k| Arc::from(key_name(k))).collect())
}

/// FNV-1a, 32 bit: what the seed hashes aggregate IDs onto workers with (Go's
/// `hash/fnv` New32a); the bench spreads keys over partitions with it too.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

// --- handlers ----------------------------------------------------------------

/// Events handled in the current run (one run at a time).
static HANDLED: AtomicUsize = AtomicUsize::new(0);
/// Wall time spent in the waiting handler, and its calls, in the current run.
static HANDLER_NS: AtomicU64 = AtomicU64::new(0);
static HANDLER_CALLS: AtomicU64 = AtomicU64::new(0);

fn reset_counters() {
    HANDLED.store(0, Relaxed);
    HANDLER_NS.store(0, Relaxed);
    HANDLER_CALLS.store(0, Relaxed);
}

fn handler_mean() -> Option<Duration> {
    let calls = HANDLER_CALLS.load(Relaxed);
    (calls > 0).then(|| Duration::from_nanos(HANDLER_NS.load(Relaxed) / calls))
}

async fn trivial() -> HandlerResult {
    Ok(())
}

/// (b)'s handler: waits [`WORK`] on the precise timer and records how long
/// the wait really took.
async fn wait_1ms() -> HandlerResult {
    let start = Instant::now();
    Until::new(start + WORK).await;
    HANDLER_NS.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
    HANDLER_CALLS.fetch_add(1, Relaxed);
    Ok(())
}

/// The reply of every bench task: counts the event. It carries the event's
/// offset, as the consumer's reply does, so it is a real allocation like the
/// seed's per-message `Done` channel.
fn reply(offset: u64) -> impl FnOnce(Outcome) + Send + 'static {
    move |o: Outcome| {
        assert!(o.is_ok(), "event {offset} failed");
        HANDLED.fetch_add(1, Relaxed);
    }
}

// --- a timer with microsecond precision --------------------------------------

/// One thread that wakes futures at their deadline, waiting on a condition
/// variable with a timeout (a futex wait, as Go's timers end in): about
/// 60 µs late on Linux, where tokio's 1 ms timer wheel is 1 ms late.
struct Alarm {
    due: Mutex<BinaryHeap<Due>>,
    changed: Condvar,
}

struct Due {
    at: Instant,
    waker: Waker,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at) // earliest first in the max-heap
    }
}

fn alarm() -> &'static Alarm {
    static ALARM: OnceLock<&'static Alarm> = OnceLock::new();
    ALARM.get_or_init(|| {
        let alarm: &'static Alarm =
            Box::leak(Box::new(Alarm { due: Mutex::new(BinaryHeap::new()), changed: Condvar::new() }));
        std::thread::Builder::new().name("bench-alarm".into()).spawn(move || alarm.run()).unwrap();
        alarm
    })
}

impl Alarm {
    fn run(&self) {
        let mut due = self.due.lock().unwrap();
        loop {
            let now = Instant::now();
            let mut fired = Vec::new();
            while due.peek().is_some_and(|d| d.at <= now) {
                fired.push(due.pop().unwrap().waker);
            }
            if !fired.is_empty() {
                drop(due);
                fired.into_iter().for_each(Waker::wake);
                due = self.due.lock().unwrap();
                continue;
            }
            due = match due.peek() {
                Some(next) => {
                    let wait = next.at - now;
                    self.changed.wait_timeout(due, wait).unwrap().0
                }
                None => self.changed.wait(due).unwrap(),
            };
        }
    }

    fn register(&self, at: Instant, waker: Waker) {
        let mut due = self.due.lock().unwrap();
        let earlier = due.peek().is_none_or(|d| at < d.at);
        due.push(Due { at, waker });
        if earlier {
            self.changed.notify_one();
        }
    }
}

/// Resolves once `Instant::now()` has reached its deadline.
struct Until {
    at: Instant,
}

impl Until {
    fn new(at: Instant) -> Until {
        Until { at }
    }
}

impl Future for Until {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        // Registered on every pending poll: a stale extra wake-up is harmless.
        alarm().register(self.at, cx.waker().clone());
        Poll::Pending
    }
}

// --- the seed's pool, rebuilt in Rust ------------------------------------------

struct SeedMsg {
    #[allow(dead_code)] // carried like the seed's AggregateID; routing used it already
    key: Key,
    work: BoxFuture<'static, HandlerResult>,
    done: Box<dyn FnOnce(HandlerResult) + Send>,
}

/// The seed's KeyedWorkerPool: a fixed worker per key hash, one bounded
/// channel per worker.
struct SeedPool {
    senders: Vec<mpsc::Sender<SeedMsg>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl SeedPool {
    fn new() -> SeedPool {
        let (senders, workers) = (0..SEED_WORKERS)
            .map(|_| {
                let (tx, mut rx) = mpsc::channel::<SeedMsg>(SEED_QUEUE);
                let worker = tokio::spawn(async move {
                    while let Some(msg) = rx.recv().await {
                        let result = msg.work.await;
                        (msg.done)(result);
                    }
                });
                (tx, worker)
            })
            .unzip();
        SeedPool { senders, workers }
    }

    /// The seed's ProcessMessage: hash the key onto a worker, try to enqueue,
    /// else wait up to `WaitTimeout` (500 ms) for room. A caller retries
    /// after a timeout, so the bench does.
    async fn process(&self, msg: SeedMsg) {
        let worker = &self.senders[fnv1a(&msg.key) as usize % SEED_WORKERS];
        let msg = match worker.try_send(msg) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
            Err(mpsc::error::TrySendError::Closed(_)) => panic!("seed worker gone"),
        };
        loop {
            match tokio::time::timeout(SEED_WAIT, worker.reserve()).await {
                Ok(Ok(permit)) => return permit.send(msg),
                Ok(Err(_closed)) => panic!("seed worker gone"),
                Err(_elapsed) => continue,
            }
        }
    }

    async fn stop(self) {
        drop(self.senders);
        for w in self.workers {
            w.await.unwrap();
        }
    }
}

fn seed_msg(key: Key, work: BoxFuture<'static, HandlerResult>, offset: u64) -> SeedMsg {
    let done = reply(offset);
    SeedMsg { key, work, done: Box::new(move |r: HandlerResult| done(Outcome::Done(r))) }
}

// --- scenarios: ours -------------------------------------------------------------

/// Ours the way a consumer submits: `Pool::submit` waits up to the configured
/// `wait_timeout` (500 ms, like the seed) for room; on `QueueFull` it retries.
async fn submit(pool: &Pool, mut task: Task) {
    loop {
        match pool.submit(task).await {
            Ok(()) => return,
            Err(Rejected { error: SubmitError::QueueFull { .. }, task: back }) => task = back,
            Err(rejected) => panic!("{:?}", rejected.error),
        }
    }
}

/// `Pool::submit_many`, retrying what was not accepted.
async fn submit_many(pool: &Pool, mut tasks: Vec<Task>) {
    loop {
        match pool.submit_many(tasks).await {
            Ok(()) => return,
            Err(rejected) if matches!(rejected.error, SubmitError::QueueFull { .. }) => tasks = rejected.tasks,
            Err(rejected) => panic!("{:?}", rejected.error),
        }
    }
}

/// (a) ours: one producer submits everything (waiting for room when full),
/// one event per call or `batch` per `submit_many`, then closes, which drains.
fn ours_flood(n: usize, nkeys: usize, batch: usize) -> Sample {
    runtime().block_on(async move {
        let keys = keys(nkeys);
        let pool = Pool::new(PoolConfig::default());
        let started = Clock::start();
        let producer = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let task = |i: usize| Task::new(Some(keys[i % nkeys].clone()), trivial(), reply(i as u64));
                if batch <= 1 {
                    for i in 0..n {
                        submit(&pool, task(i)).await;
                    }
                } else {
                    for start in (0..n).step_by(batch) {
                        submit_many(&pool, (start..n.min(start + batch)).map(task).collect()).await;
                    }
                }
                pool.close(None).await
            })
        };
        producer.await.unwrap();
        started.stop(n)
    })
}

/// Event `i` goes to key `i % nkeys`, and a key always to the same partition.
fn partitions(n: usize, keys: &[Key]) -> Vec<Vec<Key>> {
    let mut parts = vec![Vec::new(); PARTITIONS];
    for i in 0..n {
        let key = &keys[i % keys.len()];
        parts[fnv1a(key) as usize % PARTITIONS].push(key.clone());
    }
    parts
}

/// (b) ours: 15 partition readers submit without waiting for results.
fn ours_partitions(n: usize, nkeys: usize) -> Sample {
    alarm();
    runtime().block_on(async move {
        let parts = partitions(n, &keys(nkeys));
        let pool = Pool::new(PoolConfig::default());
        let started = Clock::start();
        let readers: Vec<_> = parts
            .into_iter()
            .map(|part| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    for (offset, key) in part.into_iter().enumerate() {
                        submit(&pool, Task::new(Some(key), wait_1ms(), reply(offset as u64))).await;
                    }
                })
            })
            .collect();
        for r in readers {
            r.await.unwrap();
        }
        pool.close(None).await;
        started.stop(n)
    })
}

// --- scenarios: the Rust rebuild of the seed --------------------------------------

/// (a) the rebuild fed as fast as its channels accept.
fn rust_seed_flood(n: usize, nkeys: usize) -> Sample {
    runtime().block_on(async move {
        let keys = keys(nkeys);
        let seed = SeedPool::new();
        let started = Clock::start();
        let producer = tokio::spawn(async move {
            for i in 0..n {
                seed.process(seed_msg(keys[i % nkeys].clone(), trivial().boxed(), i as u64)).await;
            }
            seed.stop().await
        });
        producer.await.unwrap();
        started.stop(n)
    })
}

/// (b) the rebuild with the seed's consumer: 15 partition readers, each
/// awaiting every event's result before reading the next (ConsumeClaim).
fn rust_seed_partitions(n: usize, nkeys: usize) -> Sample {
    alarm();
    runtime().block_on(async move {
        let parts = partitions(n, &keys(nkeys));
        let seed = Arc::new(SeedPool::new());
        let started = Clock::start();
        let readers: Vec<_> = parts
            .into_iter()
            .map(|part| {
                let seed = Arc::clone(&seed);
                tokio::spawn(async move {
                    for (offset, key) in part.into_iter().enumerate() {
                        let (tx, rx) = oneshot::channel();
                        let counted = reply(offset as u64);
                        let msg = SeedMsg {
                            key,
                            work: wait_1ms().boxed(),
                            done: Box::new(move |r: HandlerResult| {
                                let ok = r.is_ok();
                                counted(Outcome::Done(r));
                                let _ = tx.send(ok);
                            }),
                        };
                        seed.process(msg).await;
                        assert!(rx.await.unwrap());
                    }
                })
            })
            .collect();
        for r in readers {
            r.await.unwrap();
        }
        Arc::into_inner(seed).expect("readers are done").stop().await;
        started.stop(n)
    })
}

// --- the seed's pool in Go ----------------------------------------------------------

/// The Go program, built for this run, or why it could not be.
fn build_go() -> Result<PathBuf, String> {
    let go = std::env::var("POOL_BENCH_GO").unwrap_or_else(|_| "go".into());
    let version = Command::new(&go)
        .arg("version")
        .output()
        .map_err(|e| format!("`{go}` not found ({e}); install Go (Debian: golang-go) or set POOL_BENCH_GO"))?;
    if !version.status.success() {
        return Err(format!("`{go} version` failed: {}", String::from_utf8_lossy(&version.stderr).trim()));
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/seedpool");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seedpool");
    let mut build = Command::new(&go);
    build.args(["build", "-o"]).arg(&out).arg(".").current_dir(&src);
    if std::env::var_os("GOCACHE").is_none() && std::env::var_os("HOME").is_none() {
        // Go needs a build cache; without $HOME it has no default.
        build.env("GOCACHE", Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-build-cache"));
    }
    let build = build
        // Standard library only: never reach for a module proxy or another toolchain.
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .output()
        .map_err(|e| format!("running `{go} build`: {e}"))?;
    if !build.status.success() {
        return Err(format!(
            "`{go} build` in {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&build.stderr).trim()
        ));
    }
    eprintln!("built {} with {}", out.display(), String::from_utf8_lossy(&version.stdout).trim());
    Ok(out)
}

/// One run of the Go program; it reports its own wall, CPU and handler times.
fn go_run(bin: &Path, args: &[String]) -> Sample {
    let out = Command::new(bin).args(args).output().expect("run the Go seed pool");
    assert!(out.status.success(), "the Go seed pool failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> f64 {
        let at = line.find(&format!("\"{name}\":")).unwrap_or_else(|| panic!("no {name} in {line}"));
        let rest = &line[at + name.len() + 3..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        rest[..end].trim().parse().unwrap_or_else(|_| panic!("bad {name} in {line}"))
    };
    let handler = field("handler_mean_ns");
    Sample {
        wall: Duration::from_nanos(field("wall_ns") as u64),
        cpu: Duration::from_nanos(field("cpu_ns") as u64),
        handler: (handler > 0.0).then(|| Duration::from_nanos(handler as u64)),
    }
}

// --- measurement ----------------------------------------------------------------------

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name"))?.split(':').nth(1).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// How long one wait of [`WORK`] takes with `tokio::time::sleep` and with the
/// bench's precise timer.
fn mean_waits() -> (Duration, Duration) {
    alarm();
    runtime().block_on(async {
        let n = 200;
        let started = Instant::now();
        for _ in 0..n {
            tokio::time::sleep(WORK).await;
        }
        let tokio_sleep = started.elapsed() / n;
        let started = Instant::now();
        for _ in 0..n {
            Until::new(Instant::now() + WORK).await;
        }
        (tokio_sleep, started.elapsed() / n)
    })
}

/// CPU time (user + system, all threads) this process has used so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// Wall and CPU time of one measured region, and the handler's mean wait.
struct Sample {
    wall: Duration,
    cpu: Duration,
    handler: Option<Duration>,
}

struct Clock {
    wall: Instant,
    cpu: Duration,
}

impl Clock {
    fn start() -> Clock {
        reset_counters();
        Clock { wall: Instant::now(), cpu: cpu_time() }
    }

    /// Ends the region; every one of the `n` events must have been handled.
    fn stop(self, n: usize) -> Sample {
        let sample =
            Sample { wall: self.wall.elapsed(), cpu: cpu_time().saturating_sub(self.cpu), handler: handler_mean() };
        assert_eq!(HANDLED.load(Relaxed), n, "events lost or handled twice");
        sample
    }
}

/// The runs of one side.
struct Side {
    name: String,
    run: Box<dyn FnMut() -> Sample>,
    samples: Vec<Sample>,
}

impl Side {
    fn new(name: impl Into<String>, run: impl FnMut() -> Sample + 'static) -> Side {
        Side { name: name.into(), run: Box::new(run), samples: Vec::new() }
    }

    fn median<T: Ord + Copy>(mut v: Vec<T>) -> Option<T> {
        v.sort();
        v.get(v.len() / 2).copied()
    }

    /// Median events/s, and the slowest and fastest run's.
    fn rates(&self, n: usize) -> Option<(f64, f64, f64)> {
        let walls: Vec<Duration> = self.samples.iter().map(|s| s.wall).collect();
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let (min, max) = (*walls.iter().min()?, *walls.iter().max()?);
        Some((rate(Side::median(walls)?), rate(max), rate(min)))
    }

    fn cpu_per_event(&self, n: usize) -> Option<Duration> {
        Side::median(self.samples.iter().map(|s| s.cpu).collect()).map(|c| c / n as u32)
    }

    fn handler(&self) -> Option<Duration> {
        Side::median(self.samples.iter().filter_map(|s| s.handler).collect())
    }
}

/// A baseline row: which side, and the goal of ours ÷ it, if any.
struct Baseline {
    side: Side,
    goal: Option<f64>,
}

/// One scenario: ours and its baselines, run `runs` times each, alternating
/// so that background load hits every side alike.
struct Scenario {
    name: String,
    n: usize,
    ours: Vec<Side>,
    baselines: Vec<Baseline>,
    /// Why a baseline is missing (e.g. no Go), printed instead of its row.
    missing: Vec<String>,
}

impl Scenario {
    fn measure(&mut self, runs: usize) {
        for _ in 0..runs {
            for b in &mut self.baselines {
                let s = (b.side.run)();
                b.side.samples.push(s);
            }
            for o in &mut self.ours {
                let s = (o.run)();
                o.samples.push(s);
            }
        }
        if std::env::var_os("POOL_BENCH_VERBOSE").is_some() {
            for side in self.ours.iter().chain(self.baselines.iter().map(|b| &b.side)) {
                let walls: Vec<Duration> = side.samples.iter().map(|s| s.wall).collect();
                eprintln!("  {} / {}: {walls:.2?}", self.name, side.name);
            }
        }
    }

    fn print(&self, verdicts: &mut Vec<String>) {
        let n = self.n;
        let cell = |side: &Side| {
            let rate = side.rates(n).map_or("-".into(), |(m, lo, hi)| format!("{m:.0} ({lo:.0}–{hi:.0})"));
            let cpu = side.cpu_per_event(n).map_or("-".into(), |c| format!("{:.2}", c.as_secs_f64() * 1e6));
            let handler = side.handler().map_or("-".into(), |h| format!("{:.3} ms", h.as_secs_f64() * 1e3));
            (rate, cpu, handler)
        };
        for ours in &self.ours {
            let (rate, cpu, handler) = cell(ours);
            println!("| {} | **{}** | {rate} | {cpu} | {handler} | | |", self.name, ours.name);
        }
        let main_ours = &self.ours[0];
        for b in &self.baselines {
            let (rate, cpu, handler) = cell(&b.side);
            let ratio = match (main_ours.rates(n), b.side.rates(n)) {
                (Some((o, ..)), Some((s, ..))) => Some(o / s),
                _ => None,
            };
            // With a waiting handler, a side whose wait took longer is slower
            // for a reason that is not the pool's: also give the ratio with
            // each side's rate scaled to the same handler wall time.
            let normalised = match (ratio, main_ours.handler(), b.side.handler()) {
                (Some(r), Some(o), Some(s)) => Some(r * o.as_secs_f64() / s.as_secs_f64()),
                _ => None,
            };
            let ratio_text = match (ratio, normalised) {
                (Some(r), Some(nr)) => format!("{r:.2}× ({nr:.2}× at equal handler time)"),
                (Some(r), None) => format!("{r:.2}×"),
                _ => "-".into(),
            };
            let goal = match (b.goal, ratio) {
                (Some(goal), Some(r)) => {
                    // Judged on the lower of the raw and the normalised ratio.
                    let judged = normalised.map_or(r, |nr| nr.min(r));
                    let verdict = if judged >= goal { "met" } else { "MISSED" };
                    verdicts.push(format!(
                        "{}: ours ÷ {} = {judged:.2}× (goal ≥ {goal}×): {verdict}",
                        self.name, b.side.name
                    ));
                    format!("≥ {goal}× {verdict}")
                }
                _ => String::new(),
            };
            println!("| {} | {} | {rate} | {cpu} | {handler} | {ratio_text} | {goal} |", self.name, b.side.name);
        }
        for why in &self.missing {
            println!("| {} | {why} | not run | | | | |", self.name);
        }
    }
}

fn main() {
    if cfg!(feature = "loom") {
        eprintln!("the pool bench needs std primitives: run it without the `loom` feature");
        return;
    }
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let scale: f64 = std::env::var("POOL_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    assert!(scale > 0.0, "POOL_BENCH_SCALE must be positive");
    let runs: usize = std::env::var("POOL_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let only = std::env::var("POOL_BENCH_ONLY").unwrap_or_default();
    let side = std::env::var("POOL_BENCH_SIDE").unwrap_or_default();
    let (with_go, with_rust) = match side.as_str() {
        "" => (true, true),
        "go" => (true, false),
        "rust" => (false, true),
        "ours" => (false, false),
        other => panic!("POOL_BENCH_SIDE must be ours, go or rust, not {other}"),
    };
    let scaled = |n: usize| ((n as f64 * scale) as usize).max(1_000);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    println!(
        "pool bench: {cores} cores ({}), {} memory, load average {} at start, POOL_BENCH_SCALE={scale}, median of {runs} alternating runs",
        cpu_model(),
        mem_total(),
        load_average()
    );
    println!("ours = PoolConfig::default() (256 workers, capacity 256,000) on a tokio multi-thread runtime with {cores} worker threads");
    let go = if with_go { Some(build_go()) } else { None };
    match &go {
        Some(Ok(_)) => println!("Go baseline: benches/seedpool (the seed's pool: 256 workers × queue 1,000, fnv32a mod 256, GOMAXPROCS = cores)"),
        Some(Err(why)) => println!("Go baseline: NOT RUN — {why}"),
        None => println!("Go baseline: not asked for (POOL_BENCH_SIDE={side})"),
    }
    println!();

    let mut scenarios = Vec::new();
    if only.is_empty() || only == "a" {
        let (n, k) = (scaled(1_000_000), 10_000);
        let mut s = Scenario {
            name: format!("(a) {n} events / {k} keys, trivial handler"),
            n,
            ours: vec![
                Side::new("ours, `submit` per event", move || ours_flood(n, k, 1)),
                Side::new(format!("ours, `submit_many` per {BATCH}"), move || ours_flood(n, k, BATCH)),
            ],
            baselines: Vec::new(),
            missing: Vec::new(),
        };
        match &go {
            Some(Ok(bin)) => {
                let (bin, args) =
                    (bin.clone(), vec!["-mode=flood".into(), format!("-events={n}"), format!("-keys={k}")]);
                s.baselines.push(Baseline {
                    side: Side::new("seed's pool in Go", move || go_run(&bin, &args)),
                    goal: Some(1.0),
                });
            }
            Some(Err(_)) => s.missing.push("seed's pool in Go (no Go, see above)".into()),
            None => {}
        }
        if with_rust {
            s.baselines.push(Baseline {
                side: Side::new("seed's pool rebuilt in Rust", move || rust_seed_flood(n, k)),
                goal: None,
            });
        }
        scenarios.push(s);
    }
    let mut notes = Vec::new();
    if only.is_empty() || only == "b" {
        let (n, k) = (scaled(200_000), 1_000);
        let (tokio_sleep, precise) = mean_waits();
        notes.push(format!(
            "(b) one wait of {WORK:?} takes {precise:.3?} on the bench's timer and {tokio_sleep:.3?} with `tokio::time::sleep` here; \
             the handler column gives each side's measured mean wait during the runs. Bounds: ours ≤ 256 workers ÷ handler time; \
             the seed's pattern ≤ {PARTITIONS} partitions ÷ handler time (however many workers its pool has)"
        ));
        let mut s = Scenario {
            name: format!("(b) {n} events / {k} keys, 1 ms handler, {PARTITIONS} partitions"),
            n,
            ours: vec![Side::new("ours, partitions submit without waiting", move || ours_partitions(n, k))],
            baselines: Vec::new(),
            missing: Vec::new(),
        };
        match &go {
            Some(Ok(bin)) => {
                let args = |wait: bool| {
                    vec![
                        "-mode=partitions".into(),
                        format!("-events={n}"),
                        format!("-keys={k}"),
                        "-handler=sleep".into(),
                        format!("-sleep={}us", WORK.as_micros()),
                        format!("-partitions={PARTITIONS}"),
                        format!("-wait={wait}"),
                    ]
                };
                let (b1, a1) = (bin.clone(), args(true));
                s.baselines.push(Baseline {
                    side: Side::new("seed's pattern in Go (each partition waits per event)", move || go_run(&b1, &a1)),
                    goal: Some(10.0),
                });
                let (b2, a2) = (bin.clone(), args(false));
                s.baselines.push(Baseline {
                    side: Side::new("seed's pool in Go fed without waiting (not its consumer)", move || {
                        go_run(&b2, &a2)
                    }),
                    goal: None,
                });
            }
            Some(Err(_)) => s.missing.push("seed's pattern in Go (no Go, see above)".into()),
            None => {}
        }
        if with_rust {
            s.baselines.push(Baseline {
                side: Side::new("seed's pattern rebuilt in Rust", move || rust_seed_partitions(n, k)),
                goal: None,
            });
        }
        scenarios.push(s);
    }

    let mut verdicts = Vec::new();
    println!("| scenario | side | events/s median (slowest–fastest run) | CPU µs/event | handler wall time | ours ÷ this | goal |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for s in &mut scenarios {
        s.measure(runs);
        s.print(&mut verdicts);
    }
    println!();
    for note in notes {
        println!("{note}");
    }
    println!("load average {} at the end", load_average());
    println!();
    println!("goals:");
    if verdicts.is_empty() {
        println!("- none judged: a baseline they are measured against was not run");
    }
    for v in verdicts {
        println!("- {v}");
    }
}
