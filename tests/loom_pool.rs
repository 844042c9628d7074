//! Loom models of the pool core: every interleaving of the threads below is
//! explored. Run with `cargo test --release --features loom --test loom_pool`.
#![cfg(feature = "loom")]

use eventbus::pool::core::{Core, Refused};
use loom::future::block_on;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

type K = u8;

/// Explores interleavings with a bounded number of preemptions (the standard
/// loom practice: bugs almost always need few), so each model finishes in
/// seconds. `LOOM_MAX_PREEMPTIONS` overrides the bound for deeper runs.
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// Drains the core as one executor worker does, recording each message,
/// until the core is closed and empty.
fn run_worker(core: &Core<K, u32>, log: &Mutex<Vec<u32>>) {
    let mut next = block_on(core.next());
    while let Some(job) = next {
        log.lock().unwrap().push(job.msg);
        // The executor's hot path: complete and take the next under one lock.
        next = core.complete_and_take(job.key.as_ref()).or_else(|| block_on(core.next()));
    }
}

/// (1) Two submitters on one key, one worker, capacity smaller than the
/// load: the worker sees each submitter's messages in its submission order,
/// and a racing submitter never slips between them out of order.
#[test]
fn same_key_order_is_submission_order() {
    model(|| {
        let core = Arc::new(Core::<K, u32>::new(2));
        let log = Arc::new(Mutex::new(Vec::new()));
        let submitters: Vec<_> = [vec![10, 11], vec![20]]
            .into_iter()
            .map(|msgs| {
                let core = core.clone();
                thread::spawn(move || {
                    for m in msgs {
                        block_on(core.submit(Some(1), m)).expect("open core accepts");
                    }
                })
            })
            .collect();
        let worker = {
            let (core, log) = (core.clone(), log.clone());
            thread::spawn(move || run_worker(&core, &log))
        };
        for s in submitters {
            s.join().unwrap();
        }
        core.close();
        worker.join().unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3);
        let pos = |m| log.iter().position(|&x| x == m).unwrap();
        assert!(pos(10) < pos(11), "order broken: {log:?}");
    });
}

/// (1b) Two workers, one key: never two of its messages in flight at once.
#[test]
fn one_key_is_never_in_flight_twice() {
    model(|| {
        let core = Arc::new(Core::<K, u32>::new(4));
        for m in 0..3 {
            core.try_submit(Some(7), m).unwrap();
        }
        core.close();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (core, in_flight, order) = (core.clone(), in_flight.clone(), order.clone());
                thread::spawn(move || {
                    while let Some(job) = block_on(core.next()) {
                        assert_eq!(in_flight.fetch_add(1, Ordering::SeqCst), 0, "key in flight twice");
                        order.lock().unwrap().push(job.msg);
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        core.complete(job.key.as_ref());
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    });
}

/// (2) Submit racing close (drain) and abort: each message is either handled
/// or handed back (refused or returned by abort), exactly once, no panic.
#[test]
fn submit_racing_close_loses_nothing() {
    for abort in [false, true] {
        model(move || {
            let core = Arc::new(Core::<K, u32>::new(4));
            let log = Arc::new(Mutex::new(Vec::new()));
            let submitter = {
                let core = core.clone();
                thread::spawn(move || {
                    let mut refused = Vec::new();
                    for (m, key) in [(1, Some(1)), (2, Some(1)), (3, None)] {
                        match core.try_submit(key, m) {
                            Ok(()) => {}
                            Err(Refused::Closed(_, m)) => refused.push(m),
                            Err(Refused::Full(..)) => panic!("capacity 4 cannot be full"),
                        }
                    }
                    refused
                })
            };
            let closer = {
                let core = core.clone();
                thread::spawn(move || {
                    if abort {
                        core.abort().into_iter().map(|(_, m)| m).collect()
                    } else {
                        core.close();
                        Vec::new()
                    }
                })
            };
            let worker = {
                let (core, log) = (core.clone(), log.clone());
                thread::spawn(move || run_worker(&core, &log))
            };
            let mut all = submitter.join().unwrap();
            all.extend(closer.join().unwrap());
            worker.join().unwrap();
            all.extend(log.lock().unwrap().iter().copied());
            all.sort();
            assert_eq!(all, vec![1, 2, 3], "a message was lost or duplicated");
            assert_eq!(core.stats().in_flight + core.stats().queued, 0);
        });
    }
}

/// (3) Completions racing close in drain mode: every accepted message
/// completes before the workers exit.
#[test]
fn drain_completes_everything_accepted() {
    model(|| {
        let core = Arc::new(Core::<K, u32>::new(4));
        core.try_submit(Some(1), 1).unwrap();
        core.try_submit(Some(1), 2).unwrap();
        core.try_submit(Some(2), 3).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (core, log) = (core.clone(), log.clone());
                thread::spawn(move || run_worker(&core, &log))
            })
            .collect();
        core.close();
        for w in workers {
            w.join().unwrap();
        }
        let mut log = log.lock().unwrap().clone();
        log.sort();
        assert_eq!(log, vec![1, 2, 3]);
        assert_eq!(core.stats(), eventbus::pool::Stats { capacity: 4, ..Default::default() });
    });
}

/// (4) A submitter waiting for room is woken when room frees: if a wake-up
/// were lost, loom would report the waiting thread as deadlocked.
#[test]
fn waiting_submitter_is_woken() {
    model(|| {
        let core = Arc::new(Core::<K, u32>::new(1));
        core.try_submit(Some(1), 1).unwrap();
        let submitter = {
            let core = core.clone();
            thread::spawn(move || block_on(core.submit(Some(2), 2)).expect("accepted once room frees"))
        };
        let worker = {
            let core = core.clone();
            thread::spawn(move || {
                let mut seen = Vec::new();
                for _ in 0..2 {
                    let job = block_on(core.next()).expect("two messages arrive");
                    seen.push(job.msg);
                    core.complete(job.key.as_ref());
                }
                seen
            })
        };
        submitter.join().unwrap();
        assert_eq!(worker.join().unwrap(), vec![1, 2]);
    });
}

/// (4b) A submitter waiting for room is woken by close and gets its message back.
#[test]
fn waiting_submitter_is_woken_by_close() {
    model(|| {
        let core = Arc::new(Core::<K, u32>::new(1));
        core.try_submit(None, 1).unwrap();
        let submitter = {
            let core = core.clone();
            thread::spawn(move || block_on(core.submit(None, 2)))
        };
        core.close();
        match submitter.join().unwrap() {
            Err(Refused::Closed(_, 2)) => {}
            other => panic!("expected Closed with the message back, got {other:?}"),
        }
    });
}

/// Drains the core as a batching executor worker does: takes up to two ready
/// messages per lock, reports finished ones with the next take, and (if
/// `give_back`) once hands back what it took ahead, as a worker whose task
/// waits does. Records each message and checks that no key ever has two
/// messages running at once.
fn run_batch_worker(core: &Core<K, u32>, log: &Mutex<Vec<u32>>, running: &[AtomicUsize], give_back: bool) {
    let mut ahead = std::collections::VecDeque::new();
    let mut done = Vec::new();
    let mut gave_back = !give_back;
    loop {
        let job = match ahead.pop_front() {
            Some(job) => job,
            None => {
                core.complete_and_take_many(&mut done, 2, &mut ahead);
                match ahead.pop_front() {
                    Some(job) => job,
                    // `done` was reported by the take above.
                    None => match block_on(core.next()) {
                        Some(job) => job,
                        None => return,
                    },
                }
            }
        };
        if !gave_back && !ahead.is_empty() {
            gave_back = true;
            assert!(core.complete_and_give_back(&mut done, &mut ahead).is_empty(), "not aborted: requeued");
        }
        let k = usize::from(job.key.expect("keyed"));
        assert_eq!(running[k].fetch_add(1, Ordering::SeqCst), 0, "key {k} in flight twice");
        log.lock().unwrap().push(job.msg);
        running[k].fetch_sub(1, Ordering::SeqCst);
        done.push(job.key);
    }
}

/// (5) `submit_many` of a batch larger than the capacity, racing a batching
/// worker: the batch waits for room as often as needed, nothing is lost, and
/// one key's messages run in batch order.
#[test]
fn submit_many_waits_for_room_and_keeps_order() {
    model(|| {
        let core = Arc::new(Core::<K, u32>::new(2));
        let log = Arc::new(Mutex::new(Vec::new()));
        let submitter = {
            let core = core.clone();
            thread::spawn(move || {
                let batch = [(Some(1), 10), (Some(1), 11), (Some(2), 20)].into_iter().collect();
                block_on(core.submit_many(batch)).expect("open core accepts the whole batch");
            })
        };
        let worker = {
            let (core, log) = (core.clone(), log.clone());
            thread::spawn(move || {
                let running: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
                run_batch_worker(&core, &log, &running, false);
            })
        };
        submitter.join().unwrap();
        core.close();
        worker.join().unwrap();
        let log = log.lock().unwrap();
        let mut sorted = log.clone();
        sorted.sort();
        assert_eq!(sorted, vec![10, 11, 20], "lost or duplicated: {log:?}");
        let pos = |m| log.iter().position(|&x| x == m).unwrap();
        assert!(pos(10) < pos(11), "order broken: {log:?}");
    });
}

/// (6) Two batching workers, one of which gives back what it took ahead:
/// a key never has two messages in flight, its messages run in order, and
/// every message runs exactly once.
#[test]
fn batch_take_and_give_back_keep_keys_exclusive() {
    model(|| {
        let core = Arc::new(Core::<K, u32>::new(4));
        let mut batch = [(Some(1), 0), (Some(2), 1), (Some(1), 2)].into_iter().collect();
        core.try_submit_many(&mut batch).expect("room for all");
        core.close();
        let log = Arc::new(Mutex::new(Vec::new()));
        let running: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
        let workers: Vec<_> = [true, false]
            .into_iter()
            .map(|give_back| {
                let (core, log, running) = (core.clone(), log.clone(), running.clone());
                thread::spawn(move || run_batch_worker(&core, &log, &running, give_back))
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let log = log.lock().unwrap();
        let mut sorted = log.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2], "lost or duplicated: {log:?}");
        let pos = |m| log.iter().position(|&x| x == m).unwrap();
        assert!(pos(0) < pos(2), "key 1 out of order: {log:?}");
        assert_eq!(core.stats(), eventbus::pool::Stats { capacity: 4, ..Default::default() });
    });
}
