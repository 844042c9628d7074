#![cfg(not(feature = "loom"))]
//! Parked tasks (`Step::Park`, issue 13 item 6): a task waiting for a time
//! holds its key and its capacity slot, not a worker; its continuation runs
//! before new work once due; `close` drains them, or hands them back after
//! its deadline; nothing is left alive after close.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus::pool::{Key, Outcome, Pool, PoolConfig, Step, Task};
use futures::FutureExt;

fn key(s: impl AsRef<str>) -> Option<Key> {
    Some(Arc::from(s.as_ref()))
}

fn config(concurrency: usize, capacity: usize) -> PoolConfig {
    PoolConfig { concurrency, capacity, wait_timeout: Duration::from_secs(5) }
}

/// A task of `key` that parks once for `wait`, then logs `label` and ends.
fn parking_task(
    key: Option<Key>,
    wait: Duration,
    label: String,
    log: Arc<Mutex<Vec<String>>>,
    replies: Arc<Mutex<Vec<String>>>,
) -> Task {
    let work = async move {
        let until = tokio::time::Instant::now() + wait;
        let then = async move {
            log.lock().unwrap().push(label);
            Step::Done(Ok(()))
        }
        .boxed();
        Step::Park { until, then }
    };
    Task::stepped(key, work, move |o: Outcome| {
        replies.lock().unwrap().push(match o {
            Outcome::Done(Ok(())) => "ok".into(),
            Outcome::Done(Err(e)) => format!("err: {e}"),
            Outcome::NotProcessed => "not processed".into(),
        })
    })
}

async fn assert_no_tasks_alive() {
    let metrics = tokio::runtime::Handle::current().metrics();
    for _ in 0..10_000 {
        if metrics.num_alive_tasks() == 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{} tasks alive after close", metrics.num_alive_tasks());
}

/// 8 keys park for an hour on 2 workers; 200 tasks of other keys all run
/// while they wait, and the second task of each parked key runs only after
/// the first one finished.
#[tokio::test(start_paused = true)]
async fn parked_tasks_hold_their_key_not_a_worker() {
    let pool = Pool::new(config(2, 1000));
    let log = Arc::new(Mutex::new(Vec::new()));
    let replies = Arc::new(Mutex::new(Vec::new()));
    let began = tokio::time::Instant::now();
    for k in 0..8 {
        let t = parking_task(
            key(format!("slow-{k}")),
            Duration::from_secs(3600),
            format!("slow-{k}/1"),
            log.clone(),
            replies.clone(),
        );
        pool.submit(t).await.unwrap();
        let log2 = log.clone();
        let second = Task::new(
            key(format!("slow-{k}")),
            async move {
                log2.lock().unwrap().push(format!("slow-{k}/2"));
                Ok(())
            },
            |_| {},
        );
        pool.submit(second).await.unwrap();
    }
    let others = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    for i in 0..200 {
        let (others, tx) = (others.clone(), tx.clone());
        let t = Task::new(
            key(format!("fast-{i}")),
            async move {
                if others.fetch_add(1, SeqCst) + 1 == 200 {
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send(tokio::time::Instant::now());
                    }
                }
                Ok(())
            },
            |_| {},
        );
        pool.submit(t).await.unwrap();
    }
    let done_at = rx.await.unwrap();
    assert!(done_at - began < Duration::from_secs(3600), "the others ran while the 8 were parked");
    assert!(log.lock().unwrap().is_empty(), "no parked task went on early, nothing ran behind them");
    assert_eq!(pool.parked(), 8);
    assert_eq!(pool.stats().in_flight, 8, "parked tasks stay in flight (capacity unchanged)");
    assert_eq!(pool.stats().active_keys, 8);
    let report = pool.close(None).await;
    assert_eq!(report.handed_back, 0);
    assert!(began.elapsed() >= Duration::from_secs(3600), "the drain waited for them");
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 16);
    for k in 0..8 {
        let first = log.iter().position(|l| *l == format!("slow-{k}/1")).unwrap();
        let second = log.iter().position(|l| *l == format!("slow-{k}/2")).unwrap();
        assert!(first < second, "key order kept across the park: {log:?}");
    }
    assert_eq!(replies.lock().unwrap().iter().filter(|r| *r == "ok").count(), 8);
    assert_no_tasks_alive().await;
}

/// `close` with a deadline hands parked tasks back (NotProcessed, once each)
/// instead of waiting for their time, and leaves no task alive.
#[tokio::test(start_paused = true)]
async fn close_with_deadline_hands_back_parked_tasks() {
    let pool = Pool::new(config(2, 100));
    let log = Arc::new(Mutex::new(Vec::new()));
    let replies = Arc::new(Mutex::new(Vec::new()));
    for k in 0..5 {
        let t = parking_task(
            key(format!("k{k}")),
            Duration::from_secs(3600),
            format!("k{k}"),
            log.clone(),
            replies.clone(),
        );
        pool.submit(t).await.unwrap();
    }
    // One more behind k0: queued, handed back too.
    let t = parking_task(key("k0"), Duration::ZERO, "k0/2".into(), log.clone(), replies.clone());
    pool.submit(t).await.unwrap();
    while pool.parked() < 5 {
        tokio::task::yield_now().await;
    }
    let began = tokio::time::Instant::now();
    let report = pool.close(Some(Duration::from_secs(1))).await;
    assert!(began.elapsed() < Duration::from_secs(2), "did not wait for the parked tasks' hour");
    assert!(report.timed_out);
    assert_eq!(report.handed_back, 6);
    assert!(log.lock().unwrap().is_empty());
    let replies = replies.lock().unwrap().clone();
    assert_eq!(replies, vec!["not processed".to_string(); 6]);
    assert_no_tasks_alive().await;
}
