//! The executor-agnostic heart of the keyed pool: per-key FIFO queues, the
//! ready queue, capacity accounting and close state, behind one mutex.
//!
//! It holds no tokio types and takes its primitives from [`crate::sync`], so
//! loom can model-check every interleaving of submit / take / complete /
//! close. Waiting (for room, for work) is expressed as plain `std::future`s
//! that register `Waker`s under the same lock that decided they must wait, so
//! a wake-up can never slip between the check and the registration.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{lock, Mutex};

/// Why the core refused a message; the message is handed back untouched.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<K, T> {
    /// Queued plus in-flight messages already equal the capacity.
    Full(Option<K>, T),
    /// `close` was called: no more intake.
    Closed(Option<K>, T),
}

/// Why [`Core::try_submit_many`] left messages in the batch (they stay there,
/// in order, untouched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchRefused {
    /// Queued plus in-flight messages reached the capacity before the batch
    /// was through; the messages before that point were accepted.
    Full,
    /// `close` was called: nothing of the batch was accepted.
    Closed,
}

/// A message taken by a worker. Report it with [`Core::complete`].
#[derive(Debug)]
pub struct Job<K, T> {
    /// The message's key (`None`: unkeyed).
    pub key: Option<K>,
    /// The message.
    pub msg: T,
}

/// Counters of a pool at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Accepted and not yet taken by a worker.
    pub queued: usize,
    /// Taken by a worker and not yet completed.
    pub in_flight: usize,
    /// Bound on `queued + in_flight`.
    pub capacity: usize,
    /// Keys that have a message queued or in flight.
    pub active_keys: usize,
}

/// Registered wakers with stable ids, so a future that is polled again
/// replaces its own waker instead of piling up entries.
struct Waiters {
    next_id: u64,
    list: VecDeque<(u64, Waker)>,
}

impl Waiters {
    fn new() -> Self {
        Waiters { next_id: 0, list: VecDeque::new() }
    }

    fn register(&mut self, slot: &mut Option<u64>, waker: &Waker) {
        if let Some(id) = *slot {
            if let Some(entry) = self.list.iter_mut().find(|(i, _)| *i == id) {
                entry.1.clone_from(waker);
                return;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.list.push_back((id, waker.clone()));
        *slot = Some(id);
    }

    fn remove(&mut self, id: u64) {
        self.list.retain(|(i, _)| *i != id);
    }

    fn take_one(&mut self) -> Option<Waker> {
        self.list.pop_front().map(|(_, w)| w)
    }

    fn take_all(&mut self) -> Vec<Waker> {
        self.list.drain(..).map(|(_, w)| w).collect()
    }
}

struct State<K, T> {
    capacity: usize,
    /// Queued plus in-flight messages; never exceeds `capacity`.
    used: usize,
    in_flight: usize,
    /// Messages that may start now: unkeyed ones, and the head of each key.
    ready: VecDeque<Job<K, T>>,
    /// A key is present while one of its messages is ready or in flight; the
    /// deque holds the messages waiting behind that one, in submission order.
    keys: HashMap<K, VecDeque<T>, ahash::RandomState>,
    closed: bool,
    aborted: bool,
    room_waiters: Waiters,
    work_waiters: Waiters,
}

/// The hasher of the key map, built in this one function. Its seeds are
/// random per map (ahash's default), on purpose: the keys are aggregate IDs
/// that anyone who can publish chooses, and fixed public seeds would let them
/// craft keys that collide. Only `abort`'s order of handing back waiting
/// messages of different keys follows the hash order; nothing is committed for
/// them and the simulator's history does not depend on it (sim/tests/determinism.rs).
fn key_hasher() -> ahash::RandomState {
    ahash::RandomState::default()
}

impl<K: Hash + Eq + Clone, T> State<K, T> {
    /// Accepts one message; the caller checked that the core is open and has
    /// room. Returns whether the message may start now (it went to `ready`).
    fn accept(&mut self, key: Option<K>, msg: T) -> bool {
        self.used += 1;
        match key {
            // One hash per submit: the entry either holds the key's queue
            // (busy: wait behind its current message) or takes the key.
            Some(k) => match self.keys.entry(k) {
                Entry::Occupied(mut busy) => {
                    busy.get_mut().push_back(msg);
                    false
                }
                Entry::Vacant(free) => {
                    let k = free.key().clone();
                    free.insert(VecDeque::new());
                    self.ready.push_back(Job { key: Some(k), msg });
                    true
                }
            },
            None => {
                self.ready.push_back(Job { key: None, msg });
                true
            }
        }
    }

    /// Ends an in-flight message of `key`: frees its slot and makes the next
    /// message of its key ready (or frees the key).
    fn release(&mut self, key: Option<K>) {
        debug_assert!(self.in_flight > 0, "complete without a message in flight");
        self.in_flight = self.in_flight.saturating_sub(1);
        self.used = self.used.saturating_sub(1);
        if let Some(k) = key {
            // Only after `abort` can a key be gone while in flight.
            match self.keys.get_mut(&k).and_then(VecDeque::pop_front) {
                Some(msg) => self.ready.push_back(Job { key: Some(k), msg }),
                None => {
                    self.keys.remove(&k);
                }
            }
        }
    }

    /// Wakers owed after messages completed or came back: every room waiter
    /// (only when there is one, so the common case allocates nothing), and
    /// `workers` idle workers for the ready messages (or every one of them
    /// once the core is closed and drained, so each sees it can exit).
    fn after_release(&mut self, workers: usize) -> (Vec<Waker>, Vec<Waker>) {
        let room = if self.room_waiters.list.is_empty() { Vec::new() } else { self.room_waiters.take_all() };
        let woken = if self.closed && self.used == 0 {
            self.work_waiters.take_all()
        } else {
            let n = workers.min(self.ready.len()).min(self.work_waiters.list.len());
            (0..n).filter_map(|_| self.work_waiters.take_one()).collect()
        };
        (room, woken)
    }
}

/// The keyed queue core. `K` is the aggregate key, `T` the message.
pub struct Core<K, T> {
    state: Mutex<State<K, T>>,
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

impl<K: Hash + Eq + Clone, T> Core<K, T> {
    /// A core that admits at most `capacity` queued plus in-flight messages.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "pool capacity must be at least 1");
        Core {
            state: Mutex::new(State {
                capacity,
                used: 0,
                in_flight: 0,
                ready: VecDeque::new(),
                keys: HashMap::with_hasher(key_hasher()),
                closed: false,
                aborted: false,
                room_waiters: Waiters::new(),
                work_waiters: Waiters::new(),
            }),
        }
    }

    /// Accepts the message if there is room, without waiting.
    pub fn try_submit(&self, key: Option<K>, msg: T) -> Result<(), Refused<K, T>> {
        self.submit_inner(key, msg, None)
    }

    /// Accepts the message, waiting (asynchronously) for room. Resolves to
    /// `Err(Refused::Closed)` if the core closes first; never to `Full`.
    pub fn submit(&self, key: Option<K>, msg: T) -> SubmitFuture<'_, K, T> {
        SubmitFuture { core: self, item: Some((key, msg)), waiter: None }
    }

    fn submit_inner(
        &self,
        key: Option<K>,
        msg: T,
        wait: Option<(&mut Option<u64>, &Waker)>,
    ) -> Result<(), Refused<K, T>> {
        let worker = {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(Refused::Closed(key, msg));
            }
            if st.used >= st.capacity {
                if let Some((slot, waker)) = wait {
                    st.room_waiters.register(slot, waker);
                }
                return Err(Refused::Full(key, msg));
            }
            if st.accept(key, msg) {
                st.work_waiters.take_one()
            } else {
                None
            }
        };
        if let Some(w) = worker {
            w.wake();
        }
        Ok(())
    }

    /// Takes the next message that may start, waiting for one. Resolves to
    /// `None` once the core is closed and everything accepted has completed
    /// (or was handed back by [`Core::abort`]): the worker should exit.
    pub fn next(&self) -> NextFuture<'_, K, T> {
        NextFuture { core: self, waiter: None }
    }

    /// Takes a ready message without waiting.
    pub fn try_next(&self) -> Option<Job<K, T>> {
        let mut st = lock(&self.state);
        let job = st.ready.pop_front()?;
        st.in_flight += 1;
        Some(job)
    }

    fn poll_next_inner(&self, slot: &mut Option<u64>, waker: &Waker) -> Poll<Option<Job<K, T>>> {
        let mut st = lock(&self.state);
        if let Some(job) = st.ready.pop_front() {
            st.in_flight += 1;
            return Poll::Ready(Some(job));
        }
        if st.closed && (st.aborted || st.used == 0) {
            return Poll::Ready(None);
        }
        st.work_waiters.register(slot, waker);
        Poll::Pending
    }

    /// Reports that the in-flight message of `key` (or an unkeyed one) has
    /// finished, freeing its slot and releasing the next message of its key.
    pub fn complete(&self, key: Option<&K>) {
        self.finish(key, false);
    }

    /// [`Core::complete`], then [`Core::try_next`], under one lock: the
    /// worker's hot path, so a busy worker takes the lock once per message.
    pub fn complete_and_take(&self, key: Option<&K>) -> Option<Job<K, T>> {
        self.finish(key, true)
    }

    fn finish(&self, key: Option<&K>, take: bool) -> Option<Job<K, T>> {
        let (job, room, workers) = {
            let mut st = lock(&self.state);
            st.release(key.cloned());
            let job = if take { st.ready.pop_front() } else { None };
            if job.is_some() {
                st.in_flight += 1;
            }
            // Whatever is still ready goes to one more worker, which passes
            // it on in turn.
            let (room, workers) = st.after_release(1);
            (job, room, workers)
        };
        wake_all(room);
        wake_all(workers);
        job
    }

    /// Accepts messages from the front of `batch`, in order, while there is
    /// room, all under one lock. `Ok` once the whole batch is in; otherwise
    /// what was not accepted stays in `batch`, in order.
    pub fn try_submit_many(&self, batch: &mut VecDeque<(Option<K>, T)>) -> Result<(), BatchRefused> {
        self.submit_batch(batch, None)
    }

    /// Accepts the whole batch, in order, waiting (asynchronously) for room
    /// as often as it runs out. Resolves to `Err(BatchRefused::Closed)` if
    /// the core closes first (never to `Full`); the messages not accepted
    /// are then in [`SubmitManyFuture::take_items`].
    pub fn submit_many(&self, batch: VecDeque<(Option<K>, T)>) -> SubmitManyFuture<'_, K, T> {
        SubmitManyFuture { core: self, batch, waiter: None }
    }

    fn submit_batch(
        &self,
        batch: &mut VecDeque<(Option<K>, T)>,
        wait: Option<(&mut Option<u64>, &Waker)>,
    ) -> Result<(), BatchRefused> {
        let (result, workers) = {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(BatchRefused::Closed);
            }
            let mut workers = Vec::new();
            while st.used < st.capacity {
                let Some((key, msg)) = batch.pop_front() else { break };
                if st.accept(key, msg) {
                    workers.extend(st.work_waiters.take_one());
                }
            }
            if batch.is_empty() {
                (Ok(()), workers)
            } else {
                if let Some((slot, waker)) = wait {
                    st.room_waiters.register(slot, waker);
                }
                (Err(BatchRefused::Full), workers)
            }
        };
        wake_all(workers);
        result
    }

    /// A worker's hot path in batches: completes the in-flight message of
    /// each key in `done` (drained; as [`Core::complete`] does), then takes
    /// up to `max` ready messages into `out`, all under one lock. The taken
    /// messages are in flight: the worker runs them in order, and gives back
    /// with [`Core::complete_and_give_back`] those it will not start soon.
    pub fn complete_and_take_many(&self, done: &mut Vec<Option<K>>, max: usize, out: &mut VecDeque<Job<K, T>>) {
        let (room, workers) = {
            let mut st = lock(&self.state);
            for key in done.drain(..) {
                st.release(key);
            }
            let n = max.min(st.ready.len());
            st.in_flight += n;
            out.extend(st.ready.drain(..n));
            st.after_release(1)
        };
        wake_all(room);
        wake_all(workers);
    }

    /// Completes the in-flight message of each key in `done` (drained), and
    /// puts `unstarted` (drained: messages taken by
    /// [`Core::complete_and_take_many`] and not started) back at the front
    /// of the ready queue, in their order, waking idle workers for them. A
    /// worker about to wait gives back what it took ahead, so no message
    /// waits behind another key's handler. After [`Core::abort`] they are
    /// not queued again: they are returned, released, for the caller to hand
    /// back unprocessed.
    pub fn complete_and_give_back(
        &self,
        done: &mut Vec<Option<K>>,
        unstarted: &mut VecDeque<Job<K, T>>,
    ) -> Vec<Job<K, T>> {
        let (dropped, room, workers) = {
            let mut st = lock(&self.state);
            for key in done.drain(..) {
                st.release(key);
            }
            let mut dropped = Vec::new();
            if st.aborted {
                for job in unstarted.drain(..) {
                    st.release(job.key.clone());
                    dropped.push(job);
                }
            } else {
                st.in_flight = st.in_flight.saturating_sub(unstarted.len());
                while let Some(job) = unstarted.pop_back() {
                    st.ready.push_front(job);
                }
            }
            let ready = st.ready.len();
            let (room, workers) = st.after_release(ready);
            (dropped, room, workers)
        };
        wake_all(room);
        wake_all(workers);
        dropped
    }

    /// Stops intake. Waiting submitters resolve to `Closed`; workers go on
    /// until everything accepted has completed (drain).
    pub fn close(&self) {
        let (room, workers) = {
            let mut st = lock(&self.state);
            st.closed = true;
            let workers = if st.used == 0 { st.work_waiters.take_all() } else { Vec::new() };
            (st.room_waiters.take_all(), workers)
        };
        wake_all(room);
        wake_all(workers);
    }

    /// Closes and removes every message not yet taken by a worker, returning
    /// them (in submission order per key) so the caller can hand them back
    /// unprocessed. In-flight messages are unaffected.
    pub fn abort(&self) -> Vec<(Option<K>, T)> {
        let (handed_back, room, workers) = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.aborted = true;
            let mut handed_back = Vec::new();
            let ready: Vec<Job<K, T>> = st.ready.drain(..).collect();
            for job in ready {
                if let Some(k) = &job.key {
                    // Its head was never taken, so nothing of this key is in flight.
                    let behind = st.keys.remove(k).unwrap_or_default();
                    handed_back.push((job.key.clone(), job.msg));
                    handed_back.extend(behind.into_iter().map(|m| (Some(k.clone()), m)));
                } else {
                    handed_back.push((None, job.msg));
                }
            }
            // Remaining keys have their head in flight: hand back what waits behind it.
            for (k, behind) in st.keys.iter_mut() {
                handed_back.extend(behind.drain(..).map(|m| (Some(k.clone()), m)));
            }
            st.used -= handed_back.len();
            (handed_back, st.room_waiters.take_all(), st.work_waiters.take_all())
        };
        wake_all(room);
        wake_all(workers);
        handed_back
    }

    /// Whether `close` (or `abort`) was called.
    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// The counters right now.
    pub fn stats(&self) -> Stats {
        let st = lock(&self.state);
        Stats {
            queued: st.used - st.in_flight,
            in_flight: st.in_flight,
            capacity: st.capacity,
            active_keys: st.keys.len(),
        }
    }

    fn forget_room_waiter(&self, id: u64) {
        lock(&self.state).room_waiters.remove(id);
    }

    fn forget_work_waiter(&self, id: u64) {
        lock(&self.state).work_waiters.remove(id);
    }
}

/// Future of [`Core::submit`].
pub struct SubmitFuture<'a, K: Hash + Eq + Clone, T> {
    core: &'a Core<K, T>,
    item: Option<(Option<K>, T)>,
    waiter: Option<u64>,
}

impl<K: Hash + Eq + Clone, T> SubmitFuture<'_, K, T> {
    /// The message, if it was not accepted (for a caller that gave up waiting).
    pub fn take_item(&mut self) -> Option<(Option<K>, T)> {
        self.item.take()
    }
}

impl<K: Hash + Eq + Clone + Unpin, T: Unpin> Future for SubmitFuture<'_, K, T> {
    type Output = Result<(), Refused<K, T>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (key, msg) = this.item.take().expect("SubmitFuture polled after completion");
        match this.core.submit_inner(key, msg, Some((&mut this.waiter, cx.waker()))) {
            Err(Refused::Full(key, msg)) => {
                this.item = Some((key, msg));
                Poll::Pending
            }
            done => Poll::Ready(done),
        }
    }
}

impl<K: Hash + Eq + Clone, T> Drop for SubmitFuture<'_, K, T> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter {
            self.core.forget_room_waiter(id);
        }
    }
}

/// Future of [`Core::submit_many`].
pub struct SubmitManyFuture<'a, K: Hash + Eq + Clone, T> {
    core: &'a Core<K, T>,
    batch: VecDeque<(Option<K>, T)>,
    waiter: Option<u64>,
}

impl<K: Hash + Eq + Clone, T> SubmitManyFuture<'_, K, T> {
    /// The messages not accepted yet, in order (for a caller that gave up
    /// waiting, or after `Closed`); the future then has nothing left to submit.
    pub fn take_items(&mut self) -> VecDeque<(Option<K>, T)> {
        std::mem::take(&mut self.batch)
    }
}

impl<K: Hash + Eq + Clone + Unpin, T: Unpin> Future for SubmitManyFuture<'_, K, T> {
    type Output = Result<(), BatchRefused>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match this.core.submit_batch(&mut this.batch, Some((&mut this.waiter, cx.waker()))) {
            Err(BatchRefused::Full) => Poll::Pending,
            done => Poll::Ready(done),
        }
    }
}

impl<K: Hash + Eq + Clone, T> Drop for SubmitManyFuture<'_, K, T> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter {
            self.core.forget_room_waiter(id);
        }
    }
}

/// Future of [`Core::next`].
pub struct NextFuture<'a, K: Hash + Eq + Clone, T> {
    core: &'a Core<K, T>,
    waiter: Option<u64>,
}

impl<K: Hash + Eq + Clone, T> Future for NextFuture<'_, K, T> {
    type Output = Option<Job<K, T>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.core.poll_next_inner(&mut this.waiter, cx.waker())
    }
}

impl<K: Hash + Eq + Clone, T> Drop for NextFuture<'_, K, T> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter {
            self.core.forget_work_waiter(id);
        }
    }
}
