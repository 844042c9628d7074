//! Throughput of the global keyed pool against the seed's design, in one process.
//!
//! `cargo bench --bench pool` (release; about 2.5 minutes on 2 cores, most of
//! it the baseline of (b)). Environment:
//! - `POOL_BENCH_SCALE` (default 1.0) scales every message count, e.g. `0.05`
//!   for a run of a few seconds;
//! - `POOL_BENCH_RUNS` (default 3): runs per side, alternating ours/baseline;
//!   the table shows the median and the slowest and fastest run;
//! - `POOL_BENCH_ONLY=a|b`, `POOL_BENCH_SIDE=ours|seed`: one scenario or side
//!   (for profiling); `POOL_BENCH_VERBOSE=1` prints every run's wall time.
//!
//! Scenarios:
//! (a) 1,000,000 messages over 10,000 keys, trivial handler: raw scheduling cost.
//!     Baseline: the seed's pool — 256 workers, each with one bounded channel
//!     (1,000 deep), key hashed mod 256, fed as fast as it accepts.
//! (b) 200,000 messages over 1,000 keys, 1 ms async handler. Baseline: the
//!     seed's consumer — 15 partitions, each submitting one message to that pool
//!     and awaiting its result before the next. Ours: the same 15 partitions
//!     submit without waiting (per-key order is the pool's job), bounded by
//!     the pool's capacity.
//!
//! Both sides submit the seed's way (wait up to 500 ms for room, retry on
//! timeout) and use the same message shape: a boxed handler future, an
//! `Arc<str>` key and a boxed completion callback, so the difference is the
//! scheduling structure, not the payload. Timed: from the first submit until
//! every message has completed (ours: `close(None)` returned).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus::pool::{HandlerResult, Key, Outcome, Pool, PoolConfig, Rejected, SubmitError, Task};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

const PARTITIONS: usize = 15;
const SEED_WORKERS: usize = 256;
const SEED_QUEUE: usize = 1_000;
const SEED_WAIT: Duration = Duration::from_millis(500);

fn runtime() -> tokio::runtime::Runtime {
    // One worker thread per core, like a service's default runtime.
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

fn keys(n: usize) -> Arc<Vec<Key>> {
    Arc::new((0..n).map(|k| Arc::from(format!("aggregate-{k:06}"))).collect())
}

/// FNV-1a, 32 bit: the seed hashes aggregate IDs onto workers (and the bench
/// spreads keys over partitions) with a cheap hash like this.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

// --- the seed's pool -------------------------------------------------------

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

    /// The seed's ProcessMessage: hash the key onto a worker and wait up to
    /// `WaitTimeout` (500 ms) for room in its channel. A caller would retry
    /// after a timeout, so the bench does.
    async fn process(&self, msg: SeedMsg) {
        let worker = &self.senders[fnv1a(&msg.key) as usize % SEED_WORKERS];
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

// --- scenarios ---------------------------------------------------------------

async fn trivial() -> HandlerResult {
    Ok(())
}

async fn one_ms() -> HandlerResult {
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(())
}

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

/// (a) ours: one producer submits everything (waiting for room when full),
/// then closes, which drains.
fn ours_flood(n: usize, nkeys: usize, config: PoolConfig) -> Sample {
    runtime().block_on(async move {
        let keys = keys(nkeys);
        let pool = Pool::new(config);
        let done = Arc::new(AtomicUsize::new(0));
        let started = Clock::start();
        let producer = {
            let (pool, done) = (pool.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                for i in 0..n {
                    let done = Arc::clone(&done);
                    let task = Task::new(Some(keys[i % nkeys].clone()), trivial(), move |o: Outcome| {
                        assert!(o.is_ok());
                        done.fetch_add(1, Relaxed);
                    });
                    submit(&pool, task).await;
                }
                pool.close(None).await
            })
        };
        producer.await.unwrap();
        let elapsed = started.stop();
        assert_eq!(done.load(Relaxed), n);
        elapsed
    })
}

/// (a) baseline: the seed's pool fed as fast as its channels accept.
fn seed_flood(n: usize, nkeys: usize) -> Sample {
    runtime().block_on(async move {
        let keys = keys(nkeys);
        let seed = SeedPool::new();
        let done = Arc::new(AtomicUsize::new(0));
        let started = Clock::start();
        let producer = {
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                for i in 0..n {
                    let done = Arc::clone(&done);
                    let msg = SeedMsg {
                        key: keys[i % nkeys].clone(),
                        work: trivial().boxed(),
                        done: Box::new(move |r: HandlerResult| {
                            assert!(r.is_ok());
                            done.fetch_add(1, Relaxed);
                        }),
                    };
                    seed.process(msg).await;
                }
                seed.stop().await
            })
        };
        producer.await.unwrap();
        let elapsed = started.stop();
        assert_eq!(done.load(Relaxed), n);
        elapsed
    })
}

/// Message `i` goes to key `i % nkeys`, and a key always to the same partition.
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
    runtime().block_on(async move {
        let parts = partitions(n, &keys(nkeys));
        let pool = Pool::new(PoolConfig::default());
        let done = Arc::new(AtomicUsize::new(0));
        let started = Clock::start();
        let readers: Vec<_> = parts
            .into_iter()
            .map(|part| {
                let (pool, done) = (pool.clone(), Arc::clone(&done));
                tokio::spawn(async move {
                    for key in part {
                        let done = Arc::clone(&done);
                        let task = Task::new(Some(key), one_ms(), move |o: Outcome| {
                            assert!(o.is_ok());
                            done.fetch_add(1, Relaxed);
                        });
                        submit(&pool, task).await;
                    }
                })
            })
            .collect();
        for r in readers {
            r.await.unwrap();
        }
        pool.close(None).await;
        let elapsed = started.stop();
        assert_eq!(done.load(Relaxed), n);
        elapsed
    })
}

/// (b) baseline: 15 partition readers, each awaiting every message's result
/// before reading the next (the seed's ConsumeClaim).
fn seed_partitions(n: usize, nkeys: usize) -> Sample {
    runtime().block_on(async move {
        let parts = partitions(n, &keys(nkeys));
        let seed = Arc::new(SeedPool::new());
        let started = Clock::start();
        let readers: Vec<_> = parts
            .into_iter()
            .map(|part| {
                let seed = Arc::clone(&seed);
                tokio::spawn(async move {
                    let mut handled = 0;
                    for key in part {
                        let (tx, rx) = oneshot::channel();
                        let msg = SeedMsg {
                            key,
                            work: one_ms().boxed(),
                            done: Box::new(move |r| {
                                let _ = tx.send(r);
                            }),
                        };
                        seed.process(msg).await;
                        rx.await.unwrap().unwrap();
                        handled += 1;
                    }
                    handled
                })
            })
            .collect();
        let mut handled = 0;
        for r in readers {
            handled += r.await.unwrap();
        }
        let elapsed = started.stop();
        assert_eq!(handled, n);
        Arc::into_inner(seed).expect("readers are done").stop().await;
        elapsed
    })
}

// --- report ------------------------------------------------------------------

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
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

/// How long `tokio::time::sleep(1 ms)` really takes here (tokio's timer has
/// millisecond ticks and rounds deadlines up): the latency that bounds (b).
fn mean_sleep_1ms() -> Duration {
    runtime().block_on(async {
        let n = 200;
        let started = Instant::now();
        for _ in 0..n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        started.elapsed() / n
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

/// Wall and CPU time of one measured region.
struct Sample {
    wall: Duration,
    cpu: Duration,
}

struct Clock {
    wall: Instant,
    cpu: Duration,
}

impl Clock {
    fn start() -> Clock {
        Clock { wall: Instant::now(), cpu: cpu_time() }
    }

    fn stop(self) -> Sample {
        Sample { wall: self.wall.elapsed(), cpu: cpu_time().saturating_sub(self.cpu) }
    }
}

/// The runs of one side: wall time and CPU time of each.
#[derive(Default)]
struct Runs {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

impl Runs {
    fn run(&mut self, f: &mut impl FnMut() -> Sample) {
        let sample = f();
        self.wall.push(sample.wall);
        self.cpu.push(sample.cpu);
    }

    fn median(v: &[Duration]) -> Option<Duration> {
        let mut v = v.to_vec();
        v.sort();
        v.get(v.len() / 2).copied()
    }

    /// Median msgs/s, and the slowest and fastest run's msgs/s.
    fn rates(&self, n: usize) -> Option<(f64, f64, f64)> {
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let (min, max) = (self.wall.iter().min()?, self.wall.iter().max()?);
        Some((rate(Runs::median(&self.wall)?), rate(*max), rate(*min)))
    }

    /// Median CPU time per message.
    fn cpu_per_msg(&self, n: usize) -> Option<Duration> {
        Runs::median(&self.cpu).map(|c| c / n as u32)
    }
}

/// Runs both sides `runs` times, alternating, so background load on the
/// machine and the runtime's scheduling luck hit both alike.
fn measure(runs: usize, side: &str, mut ours: impl FnMut() -> Sample, mut seed: impl FnMut() -> Sample) -> (Runs, Runs) {
    let (mut o, mut b) = (Runs::default(), Runs::default());
    for _ in 0..runs {
        if side != "ours" {
            b.run(&mut seed);
        }
        if side != "seed" {
            o.run(&mut ours);
        }
    }
    if std::env::var_os("POOL_BENCH_VERBOSE").is_some() {
        eprintln!("  ours runs: {:.2?}\n  seed runs: {:.2?}", o.wall, b.wall);
    }
    (o, b)
}

struct Row {
    name: String,
    n: usize,
    ours: Runs,
    seed: Runs,
    goal: f64,
}

impl Row {
    fn print(&self) {
        let rates = |r: &Runs| match r.rates(self.n) {
            Some((median, lo, hi)) => format!("{median:.0} ({lo:.0}–{hi:.0})"),
            None => "-".to_string(),
        };
        let cpu = |r: &Runs| r.cpu_per_msg(self.n).map_or("-".to_string(), |c| format!("{:.2}", c.as_secs_f64() * 1e6));
        let (ratio, verdict) = match (self.ours.rates(self.n), self.seed.rates(self.n)) {
            (Some((o, ..)), Some((b, ..))) => {
                let ratio = o / b;
                (format!("{ratio:.2}x"), if ratio >= self.goal { "met" } else { "MISSED" })
            }
            _ => ("-".to_string(), "-"),
        };
        println!(
            "| {} | {} | {} | {ratio} | >= {}x {verdict} | {} / {} |",
            self.name,
            rates(&self.ours),
            rates(&self.seed),
            self.goal,
            cpu(&self.ours),
            cpu(&self.seed)
        );
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
    // For profiling: run one scenario ("a" | "b") and/or one side ("ours" | "seed").
    let only = std::env::var("POOL_BENCH_ONLY").unwrap_or_default();
    let side = std::env::var("POOL_BENCH_SIDE").unwrap_or_default();
    let scaled = |n: usize| ((n as f64 * scale) as usize).max(1_000);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    println!("pool bench: {cores} cores ({}), {} memory, POOL_BENCH_SCALE={scale}, median of {runs} alternating runs", cpu_model(), mem_total());
    println!("tokio multi-thread runtime, {cores} worker threads; ours = PoolConfig::default() (256 workers, capacity 256,000)");
    println!();

    let mut rows = Vec::new();
    let mut notes = Vec::new();

    if only.is_empty() || only == "a" {
        let (n, k) = (scaled(1_000_000), 10_000);
        let (ours, seed) = measure(runs, &side, || ours_flood(n, k, PoolConfig::default()), || seed_flood(n, k));
        rows.push(Row { name: format!("(a) {n} msgs / {k} keys, trivial handler"), n, ours, seed, goal: 2.0 });
    }
    if only.is_empty() || only == "b" {
        let (n, k) = (scaled(200_000), 1_000);
        let latency = mean_sleep_1ms();
        let workers = PoolConfig::default().concurrency;
        notes.push(format!(
            "(b) one `sleep(1 ms)` takes {latency:.2?} here: bound for ours = {workers} workers / latency = {:.0} msgs/s, \
             for the baseline = {PARTITIONS} partitions / latency = {:.0} msgs/s",
            workers as f64 / latency.as_secs_f64(),
            PARTITIONS as f64 / latency.as_secs_f64()
        ));
        let (ours, seed) = measure(runs, &side, || ours_partitions(n, k), || seed_partitions(n, k));
        rows.push(Row {
            name: format!("(b) {n} msgs / {k} keys, 1 ms handler, {PARTITIONS} partitions"),
            n,
            ours,
            seed,
            goal: 10.0,
        });
    }

    println!("| scenario | ours msgs/s median (slowest–fastest run) | baseline msgs/s median (slowest–fastest) | ratio of medians | goal | CPU µs/msg ours / baseline |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        row.print();
    }
    for note in notes {
        println!();
        println!("{note}");
    }
}
