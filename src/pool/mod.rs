//! The global keyed worker pool, shared by every topic of a bus.
//!
//! Messages with the same key run one at a time in submission order; messages
//! of different keys (and unkeyed ones) run in parallel on `concurrency`
//! workers. A worker is never tied to a key, so a slow aggregate holds one
//! worker, not every aggregate that hashes next to it. Queued plus in-flight
//! messages are bounded by `capacity`; submitters wait for room up to
//! `wait_timeout`, then get [`SubmitError::QueueFull`].
//!
//! A batch of tasks can be submitted under one lock ([`Pool::submit_many`]).
//! A worker takes ready tasks in batches too: one at first, doubling up to
//! 32 while its tasks finish without waiting, and it reports the tasks it
//! finished with its next take. So for a moment a finished task can still
//! count as in flight, and a task taken ahead of running as in flight too.
//! As soon as one of its tasks waits (or a parked task is due), the worker
//! reports what finished and gives back what it took ahead, so no task waits
//! behind another key's handler. A handler that blocks its thread without
//! waiting (CPU-bound work in an async handler) still holds the tasks its
//! worker took ahead until it returns: run such work on
//! `tokio::task::spawn_blocking`.
//!
//! `core` holds the queues and is model-checked by loom; this module is
//! the tokio executor on top of it.

// The loom models (`tests/loom_pool.rs`, feature `loom`) and the property
// tests (`tests/pool_props.rs`, feature `testing`) drive the core directly;
// it is not service API.
#[cfg(any(feature = "loom", feature = "testing"))]
#[doc(hidden)]
#[allow(rustdoc::private_intra_doc_links)] // to `crate::sync`, private
pub mod core;
#[cfg(not(any(feature = "loom", feature = "testing")))]
#[allow(dead_code)] // parts only the models and property tests call
mod core;

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::future::{BoxFuture, Shared as SharedFuture};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use self::core::Stats;
use self::core::{BatchRefused, Core, Job, Refused};

/// The aggregate key that orders messages.
pub type Key = Arc<str>;

/// What a handler may fail with.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// How a submitted task ended, as reported to its submitter.
#[derive(Debug)]
pub enum Outcome {
    /// The handler ran to the end (a panic is reported as [`HandlerPanicked`]).
    Done(HandlerResult),
    /// The task was accepted but never finished: it was handed back on close
    /// or cancelled by an aborting close. Its position must not be committed.
    NotProcessed,
}

impl Outcome {
    /// Whether the handler ran and succeeded.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Done(Ok(())))
    }
}

/// A handler panicked; the worker caught it and survives.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
pub struct HandlerPanicked(pub String);

/// Why a submit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No room within the wait: the capacity was reached.
    #[error("pool queue full: {capacity} messages queued or in flight, no room within {waited:?}")]
    QueueFull {
        /// The pool's capacity (queued plus in-flight tasks).
        capacity: usize,
        /// How long the submit waited for room.
        waited: Duration,
    },
    /// The pool was closed: it takes no more tasks.
    #[error("pool closed")]
    Closed,
}

/// A refused task, handed back so the caller may retry or drop it (dropping
/// it reports [`Outcome::NotProcessed`] to its reply).
pub struct Rejected {
    /// Why the task was refused.
    pub error: SubmitError,
    /// The task, untouched.
    pub task: Task,
}

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected").field("error", &self.error).finish_non_exhaustive()
    }
}

/// A batch not (wholly) accepted: the tasks that were not, in their order,
/// handed back with the reason. The ones before them were accepted. Dropping
/// a handed-back task reports [`Outcome::NotProcessed`] to its reply.
pub struct RejectedBatch {
    /// Why the rest of the batch was refused.
    pub error: SubmitError,
    /// The tasks not accepted, in submission order.
    pub tasks: Vec<Task>,
}

impl fmt::Debug for RejectedBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectedBatch").field("error", &self.error).field("tasks", &self.tasks.len()).finish()
    }
}

/// Pool settings. Defaults follow the seed: 256 workers, room for 256×1000
/// messages, 500 ms wait for room.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Messages handled at the same time (worker tasks).
    pub concurrency: usize,
    /// Bound on queued plus in-flight messages.
    pub capacity: usize,
    /// How long `submit` waits for room before `QueueFull`.
    #[serde(with = "crate::config::millis")]
    pub wait_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { concurrency: 256, capacity: 256 * 1000, wait_timeout: Duration::from_millis(500) }
    }
}

type ReplyFn = Box<dyn FnOnce(Outcome) + Send + 'static>;

/// Calls its reply exactly once: with the result, or with `NotProcessed`
/// when dropped unanswered (handed back, cancelled, refused and dropped).
struct Reply(Option<ReplyFn>);

impl Reply {
    fn send(mut self, outcome: Outcome) {
        if let Some(f) = self.0.take() {
            f(outcome);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Outcome::NotProcessed);
        }
    }
}

/// What one run of a task's work ends with: its result, or a wait.
pub enum Step {
    /// The task is finished; its key is released.
    Done(HandlerResult),
    /// The task waits until `until`, then goes on with `then`. The worker is
    /// freed meanwhile; the key stays held (later tasks of the key wait) and
    /// the task still counts against the capacity. When the time comes, the
    /// continuation runs on the next free worker, before any new task.
    Park {
        /// When the task goes on.
        until: tokio::time::Instant,
        /// What it goes on with.
        then: BoxFuture<'static, Step>,
    },
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Done(r) => f.debug_tuple("Done").field(r).finish(),
            Step::Park { until, .. } => f.debug_struct("Park").field("until", until).finish_non_exhaustive(),
        }
    }
}

/// One unit of work: the handler's future, its key, and where its outcome goes.
pub struct Task {
    key: Option<Key>,
    work: BoxFuture<'static, Step>,
    reply: Reply,
}

impl Task {
    /// `work` runs on a worker once every earlier task of `key` has finished;
    /// `reply` receives its outcome exactly once.
    pub fn new<F, R>(key: Option<Key>, work: F, reply: R) -> Task
    where
        F: Future<Output = HandlerResult> + Send + 'static,
        R: FnOnce(Outcome) + Send + 'static,
    {
        Task::stepped(key, work.map(Step::Done), reply)
    }

    /// Like [`Task::new`], for work that may [park](Step::Park): wait for a
    /// time without holding a worker.
    pub fn stepped<F, R>(key: Option<Key>, work: F, reply: R) -> Task
    where
        F: Future<Output = Step> + Send + 'static,
        R: FnOnce(Outcome) + Send + 'static,
    {
        #[cfg(feature = "planted-bugs")]
        let key = key.filter(|_| !crate::planted::active(crate::planted::Bug::IgnoreKey));
        Task { key, work: work.boxed(), reply: Reply(Some(Box::new(reply))) }
    }

    /// The key the task is ordered by (`None`: unkeyed).
    pub fn key(&self) -> Option<&Key> {
        self.key.as_ref()
    }
}

/// What `close` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrainReport {
    /// Tasks handed back unprocessed because the deadline passed first
    /// (queued ones plus cancelled in-flight ones).
    pub handed_back: usize,
    /// Whether the deadline passed before the pool drained.
    pub timed_out: bool,
}

struct Shared {
    /// Workers hold only the core, never `Shared`: otherwise they would keep
    /// `Shared` alive and its `Drop` (abort on last handle) could never run.
    core: Arc<Core<Key, Task>>,
    parked: Arc<Parked>,
    config: PoolConfig,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The task that moves parked tasks whose time has come to the ready list.
    timer: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The one close, once started: later and concurrent calls await it.
    closing: std::sync::Mutex<Option<SharedFuture<BoxFuture<'static, DrainReport>>>>,
}

/// The global keyed worker pool. Cloning shares the same pool.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("stats", &self.stats()).finish()
    }
}

impl Pool {
    /// Starts the workers on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime, or with a zero concurrency or capacity.
    pub fn new(config: PoolConfig) -> Pool {
        assert!(config.concurrency > 0, "pool concurrency must be at least 1");
        let shared = Arc::new(Shared {
            core: Arc::new(Core::new(config.capacity)),
            parked: Arc::new(Parked::default()),
            config,
            workers: std::sync::Mutex::new(Vec::new()),
            timer: std::sync::Mutex::new(None),
            closing: std::sync::Mutex::new(None),
        });
        let workers = (0..shared.config.concurrency)
            .map(|_| tokio::spawn(worker(Arc::clone(&shared.core), Arc::clone(&shared.parked))))
            .collect();
        *shared.workers.lock().unwrap_or_else(|p| p.into_inner()) = workers;
        *shared.timer.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::spawn(timer(Arc::clone(&shared.parked))));
        Pool { shared }
    }

    /// The settings the pool was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// Accepts `task`, waiting up to the configured `wait_timeout` for room.
    pub async fn submit(&self, task: Task) -> Result<(), Rejected> {
        self.submit_timeout(task, self.shared.config.wait_timeout).await
    }

    /// Accepts `task`, waiting as long as it takes for room. This is how a
    /// consumer applies back-pressure: while it waits, it reads nothing.
    pub async fn submit_wait(&self, task: Task) -> Result<(), Rejected> {
        let key = task.key.clone();
        self.shared.core.submit(key, task).await.map_err(|refused| refused_to_rejected(refused, Duration::MAX, 0))
    }

    /// Accepts `task`, waiting up to `wait` for room.
    pub async fn submit_timeout(&self, task: Task, wait: Duration) -> Result<(), Rejected> {
        let key = task.key.clone();
        let capacity = self.shared.config.capacity;
        // Room right now (the common case): no timer is set up.
        let task = match self.shared.core.try_submit(key, task) {
            Ok(()) => return Ok(()),
            Err(Refused::Full(_, task)) => task,
            Err(refused) => return Err(refused_to_rejected(refused, wait, capacity)),
        };
        let key = task.key.clone();
        let mut submit = self.shared.core.submit(key, task);
        match tokio::time::timeout(wait, &mut submit).await {
            Ok(result) => result.map_err(|r| refused_to_rejected(r, wait, capacity)),
            Err(_elapsed) => match submit.take_item() {
                Some((_, task)) => Err(Rejected { error: SubmitError::QueueFull { capacity, waited: wait }, task }),
                None => Ok(()),
            },
        }
    }

    /// Accepts `tasks` in order, as [`Pool::submit`] would one by one, but
    /// taking the pool's lock once per run of room instead of once per task.
    /// Waits up to the configured `wait_timeout` in all for room; then the
    /// tasks not accepted are handed back, in order, with
    /// [`SubmitError::QueueFull`] (the ones before them were accepted).
    pub async fn submit_many(&self, tasks: Vec<Task>) -> Result<(), RejectedBatch> {
        self.submit_many_timeout(tasks, self.shared.config.wait_timeout).await
    }

    /// [`Pool::submit_many`], waiting up to `wait` in all for room.
    pub async fn submit_many_timeout(&self, tasks: Vec<Task>, wait: Duration) -> Result<(), RejectedBatch> {
        let capacity = self.shared.config.capacity;
        let mut batch = keyed(tasks);
        match self.shared.core.try_submit_many(&mut batch) {
            Ok(()) => return Ok(()),
            Err(BatchRefused::Full) => {}
            Err(BatchRefused::Closed) => return Err(rejected_batch(SubmitError::Closed, batch)),
        }
        let mut submit = self.shared.core.submit_many(batch);
        let error = match tokio::time::timeout(wait, &mut submit).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_closed)) => SubmitError::Closed,
            Err(_elapsed) => SubmitError::QueueFull { capacity, waited: wait },
        };
        let rest = submit.take_items();
        if rest.is_empty() {
            // Accepted in the same instant the wait ran out.
            return Ok(());
        }
        Err(rejected_batch(error, rest))
    }

    /// [`Pool::submit_many`], waiting as long as it takes for room (how a
    /// consumer applies back-pressure to a fetched batch).
    pub async fn submit_many_wait(&self, tasks: Vec<Task>) -> Result<(), RejectedBatch> {
        let mut submit = self.shared.core.submit_many(keyed(tasks));
        match (&mut submit).await {
            Ok(()) => Ok(()),
            Err(_closed) => Err(rejected_batch(SubmitError::Closed, submit.take_items())),
        }
    }

    /// Accepts, in order and under one lock, as many of `tasks` as there is
    /// room for right now; the rest are handed back with
    /// [`SubmitError::QueueFull`] (or all of them with `Closed`).
    pub fn try_submit_many(&self, tasks: Vec<Task>) -> Result<(), RejectedBatch> {
        let mut batch = keyed(tasks);
        match self.shared.core.try_submit_many(&mut batch) {
            Ok(()) => Ok(()),
            Err(BatchRefused::Full) => Err(rejected_batch(
                SubmitError::QueueFull { capacity: self.shared.config.capacity, waited: Duration::ZERO },
                batch,
            )),
            Err(BatchRefused::Closed) => Err(rejected_batch(SubmitError::Closed, batch)),
        }
    }

    /// Accepts `task` only if there is room right now.
    pub fn try_submit(&self, task: Task) -> Result<(), Rejected> {
        let key = task.key.clone();
        let capacity = self.shared.config.capacity;
        self.shared.core.try_submit(key, task).map_err(|r| refused_to_rejected(r, Duration::ZERO, capacity))
    }

    /// Runs `work` under `key` and waits for its outcome.
    pub async fn run<F>(&self, key: Option<Key>, work: F) -> Result<Outcome, SubmitError>
    where
        F: Future<Output = HandlerResult> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = Task::new(key, work, move |outcome| {
            let _ = tx.send(outcome);
        });
        self.submit(task).await.map_err(|r| r.error)?;
        Ok(rx.await.unwrap_or(Outcome::NotProcessed))
    }

    /// Queued, in-flight and active-key counts right now. A task taken by a
    /// worker ahead of running it, or finished and not yet reported by its
    /// worker (see the module documentation), counts as in flight.
    pub fn stats(&self) -> Stats {
        self.shared.core.stats()
    }

    /// Tasks parked right now (waiting for their time, or ready to go on);
    /// they count as in flight in [`Pool::stats`].
    pub fn parked(&self) -> usize {
        self.shared.parked.len()
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.shared.core.is_closed()
    }

    /// Stops intake, then drains: every accepted task runs to its end.
    /// When `deadline` is given and passes first, queued tasks are handed
    /// back and in-flight ones cancelled, each reported `NotProcessed`.
    /// When this returns, no worker task of the pool is alive.
    ///
    /// The drain runs in a task of its own, so it finishes even if this
    /// future is dropped midway; every call (concurrent or later) waits for
    /// that one drain and gets its report. The first call's deadline counts.
    pub async fn close(&self, deadline: Option<Duration>) -> DrainReport {
        let closing = {
            let mut slot = self.shared.closing.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| {
                #[cfg(feature = "planted-bugs")]
                if crate::planted::active(crate::planted::Bug::DropQueuedOnClose) {
                    for (_, task) in self.shared.core.abort() {
                        task.reply.send(Outcome::Done(Ok(())));
                    }
                }
                // Intake stops before the first await: a submit racing with
                // `close` either got in before or is refused.
                self.shared.core.close();
                let workers = std::mem::take(&mut *self.shared.workers.lock().unwrap_or_else(|p| p.into_inner()));
                let timer = self.shared.timer.lock().unwrap_or_else(|p| p.into_inner()).take();
                let parked = Arc::clone(&self.shared.parked);
                let drain = tokio::spawn(drain(Arc::clone(&self.shared.core), parked, workers, timer, deadline));
                async move {
                    match drain.await {
                        Ok(report) => report,
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        // Cancelled: the runtime is shutting down and took the workers with it.
                        Err(_) => DrainReport { handed_back: 0, timed_out: true },
                    }
                }
                .boxed()
                .shared()
            })
            .clone()
        };
        closing.await
    }
}

/// Waits for `workers` to finish the accepted tasks; after `deadline`, hands
/// back the queued and parked ones and cancels the rest.
async fn drain(
    core: Arc<Core<Key, Task>>,
    parked: Arc<Parked>,
    mut workers: Vec<JoinHandle<()>>,
    timer: Option<JoinHandle<()>>,
    deadline: Option<Duration>,
) -> DrainReport {
    let mut report = DrainReport::default();
    // Handles joined so far: a JoinHandle must not be awaited again
    // after it completed, so the abort path only joins the rest.
    let mut joined = 0;
    let drained = async {
        for handle in workers.iter_mut() {
            let _ = handle.await;
            joined += 1;
        }
    };
    let finished = match deadline {
        None => {
            drained.await;
            true
        }
        Some(limit) => tokio::time::timeout(limit, drained).await.is_ok(),
    };
    if !finished {
        report.timed_out = true;
        let queued = core.abort();
        let in_flight = core.stats().in_flight;
        report.handed_back = queued.len() + in_flight;
        // Dropping each handed-back task reports NotProcessed to its submitter.
        drop(queued);
        let remaining = &mut workers[joined..];
        for handle in remaining.iter() {
            handle.abort();
        }
        for handle in remaining.iter_mut() {
            let _ = handle.await;
        }
    }
    // Parked tasks are in flight for the core (counted above); dropping
    // them reports NotProcessed. After a drain there are none.
    drop(parked.take_all());
    if let Some(timer) = timer {
        timer.abort();
        let _ = timer.await;
    }
    report
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Last handle gone without close: stop the workers rather than leak them.
        let handles = self.workers.get_mut().unwrap_or_else(|p| p.into_inner());
        for handle in handles.drain(..) {
            handle.abort();
        }
        if let Some(timer) = self.timer.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            timer.abort();
        }
    }
}

/// The core's form of a batch: each task with its key.
fn keyed(tasks: Vec<Task>) -> std::collections::VecDeque<(Option<Key>, Task)> {
    tasks.into_iter().map(|task| (task.key.clone(), task)).collect()
}

fn rejected_batch(error: SubmitError, batch: std::collections::VecDeque<(Option<Key>, Task)>) -> RejectedBatch {
    RejectedBatch { error, tasks: batch.into_iter().map(|(_, task)| task).collect() }
}

fn refused_to_rejected(refused: Refused<Key, Task>, waited: Duration, capacity: usize) -> Rejected {
    match refused {
        Refused::Full(_, task) => Rejected { error: SubmitError::QueueFull { capacity, waited }, task },
        Refused::Closed(_, task) => Rejected { error: SubmitError::Closed, task },
    }
}

/// Tasks that parked (see [`Step::Park`]): asleep until their time, then
/// ready for the next free worker, which takes them before new tasks.
#[derive(Default)]
struct Parked {
    state: std::sync::Mutex<ParkedState>,
    /// `state.ready.len()`, readable without the lock (workers check it
    /// after every task).
    ready_len: AtomicUsize,
    /// A parked task became ready.
    ready: tokio::sync::Notify,
    /// A task parked (the timer may have to wake earlier).
    parked: tokio::sync::Notify,
}

#[derive(Default)]
struct ParkedState {
    next_id: u64,
    sleeping: std::collections::BTreeMap<(tokio::time::Instant, u64), Task>,
    ready: std::collections::VecDeque<Task>,
}

impl Parked {
    fn lock(&self) -> std::sync::MutexGuard<'_, ParkedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn park(&self, until: tokio::time::Instant, task: Task) {
        {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id += 1;
            st.sleeping.insert((until, id), task);
        }
        self.parked.notify_one();
    }

    fn take_ready(&self) -> Option<Task> {
        let mut st = self.lock();
        let task = st.ready.pop_front();
        self.ready_len.store(st.ready.len(), Ordering::Release);
        task
    }

    /// Whether a parked task is ready to go on.
    fn has_ready(&self) -> bool {
        self.ready_len.load(Ordering::Acquire) > 0
    }

    /// Moves the tasks whose time has come to the ready list; returns the
    /// next wake-up time.
    fn wake_due(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let (woken, next) = {
            let mut st = self.lock();
            let mut woken = 0;
            while let Some(entry) = st.sleeping.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let task = entry.remove();
                st.ready.push_back(task);
                woken += 1;
            }
            self.ready_len.store(st.ready.len(), Ordering::Release);
            (woken, st.sleeping.keys().next().map(|k| k.0))
        };
        for _ in 0..woken {
            self.ready.notify_one();
        }
        next
    }

    fn len(&self) -> usize {
        let st = self.lock();
        st.sleeping.len() + st.ready.len()
    }

    fn take_all(&self) -> Vec<Task> {
        let mut st = self.lock();
        let mut all: Vec<Task> = std::mem::take(&mut st.sleeping).into_values().collect();
        all.extend(st.ready.drain(..));
        self.ready_len.store(0, Ordering::Release);
        all
    }
}

/// Moves parked tasks to the ready list when their time comes. It holds no
/// task: dropping or aborting it loses nothing.
async fn timer(parked: Arc<Parked>) {
    loop {
        let notified = parked.parked.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match parked.wake_due(tokio::time::Instant::now()) {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// The next task for a worker: a parked one whose time came (first), or a
/// new one from the core. `None` once the core is drained or aborted.
enum Work {
    Resumed(Task),
    New(Task),
}

async fn next_work(core: &Core<Key, Task>, parked: &Parked) -> Option<Work> {
    loop {
        let notified = parked.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(task) = parked.take_ready() {
            return Some(Work::Resumed(task));
        }
        tokio::select! {
            biased;
            _ = &mut notified => continue,
            job = core.next() => return job.map(|job| Work::New(job.msg)),
        }
    }
}

/// Most ready tasks a worker takes under one lock. It takes more than one
/// only while its tasks finish without waiting (then a batch costs
/// microseconds), and gives back what it took ahead as soon as one waits.
const MAX_BATCH: usize = 32;

/// A worker's tasks between two visits to the core: taken ahead and not
/// started, and finished but not yet reported to the core (their keys are
/// still held; they are reported with the next visit, before any wait).
struct Batch {
    ahead: VecDeque<Job<Key, Task>>,
    done: Vec<Option<Key>>,
    /// How many to take at the next visit: doubles while tasks finish
    /// without waiting, back to 1 when one waits.
    size: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch { ahead: VecDeque::new(), done: Vec::new(), size: 1 }
    }

    /// Reports what finished and hands back what was taken ahead, so that
    /// no task waits behind this worker's next wait.
    fn give_back(&mut self, core: &Core<Key, Task>) {
        if !self.ahead.is_empty() || !self.done.is_empty() {
            // After an abort the core returns the tasks instead of queuing
            // them again; dropping them reports them unprocessed.
            drop(core.complete_and_give_back(&mut self.done, &mut self.ahead));
        }
    }

    /// The worker's next task: a parked one whose time came (first), one
    /// taken ahead, or new ones from the core (reporting what finished
    /// under the same lock); waits when there is none.
    async fn next(&mut self, core: &Core<Key, Task>, parked: &Parked) -> Option<Work> {
        if parked.has_ready() {
            self.give_back(core);
            return next_work(core, parked).await;
        }
        if let Some(job) = self.ahead.pop_front() {
            return Some(Work::New(job.msg));
        }
        core.complete_and_take_many(&mut self.done, self.size, &mut self.ahead);
        self.size = (self.size * 2).min(MAX_BATCH);
        match self.ahead.pop_front() {
            Some(job) => Some(Work::New(job.msg)),
            None => next_work(core, parked).await,
        }
    }
}

async fn worker(core: Arc<Core<Key, Task>>, parked: Arc<Parked>) {
    let mut batch = Batch::new();
    let mut next = next_work(&core, &parked).await;
    while let Some(work) = next {
        let (Work::Resumed(task) | Work::New(task)) = work;
        let Task { key, work, reply } = task;
        let span =
            tracing::debug_span!("pool.handle", key = key.as_deref().unwrap_or(""), outcome = tracing::field::Empty);
        let mut run = std::pin::pin!(AssertUnwindSafe(work).catch_unwind().instrument(span.clone()));
        let step = match std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await {
            Poll::Ready(step) => step,
            Poll::Pending => {
                // The task waits: nothing this worker took ahead may wait
                // behind it, and nothing it finished may stay held.
                batch.size = 1;
                batch.give_back(&core);
                run.await
            }
        };
        let result = match step {
            Ok(Step::Park { until, then }) => {
                // The key stays held and the slot counted: not completed.
                span.record("outcome", "parked");
                parked.park(until, Task { key, work: then, reply });
                next = batch.next(&core, &parked).await;
                continue;
            }
            Ok(Step::Done(r)) => r,
            Err(panic) => Err(Box::new(HandlerPanicked(panic_message(&*panic))) as HandlerError),
        };
        span.record("outcome", if result.is_ok() { "ok" } else { "error" });
        reply.send(Outcome::Done(result));
        batch.done.push(key);
        next = batch.next(&core, &parked).await;
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
