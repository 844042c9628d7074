//! A consumer killed with SIGKILL and restarted, as a real process: the
//! test binary re-runs itself in child mode, logs each handler's begin (B)
//! and completion (C) to a file, and reports completions on stdout.
//!
//! A test file using it has a `#[test] fn child_process_entry` that calls
//! [`entry`]; [`spawn_consumer`] re-runs the binary with that test alone.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::testing::{OrderChecker, OrderReport};
use eventbus::{Broker, Envelope, EventBus, Position};
use tokio::sync::mpsc;

use super::scenario::{bus_config, event, outbound};

pub struct ChildProc {
    pub child: Child,
    pub lines: mpsc::UnboundedReceiver<String>,
    /// `DONE` lines read so far, for the message when the process goes quiet.
    done: usize,
}

impl ChildProc {
    /// Re-runs this test binary's `child_process_entry` test as a separate
    /// consumer process, with `env` telling it what to consume.
    pub fn spawn(env: &[(&str, &str)]) -> ChildProc {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["child_process_entry", "--exact", "--nocapture", "--test-threads=1"])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("re-running the test binary as the consumer process");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProc { child, lines, done: 0 }
    }

    /// The next `DONE` line's (aggregate, version), `None` once stdout closed.
    pub async fn next_done(&mut self) -> Option<(String, i64)> {
        loop {
            let Ok(line) = tokio::time::timeout(Duration::from_secs(60), self.lines.recv()).await else {
                panic!(
                    "consumer process {} went quiet for 60 s after {} completions (is the broker still up? \
                     its stderr is above; RUST_LOG=eventbus=debug shows its consumer)",
                    self.child.id(),
                    self.done
                );
            };
            let line = line?;
            if let Some(rest) = line.strip_prefix("DONE ") {
                self.done += 1;
                let (agg, v) = rest.split_once(' ').unwrap();
                return Some((agg.to_string(), v.parse().unwrap()));
            }
        }
    }
}

impl ChildProc {
    /// Waits for `n` completions of this first consumer process, then kills
    /// it with SIGKILL.
    pub async fn kill_after(mut self, n: usize) {
        for _ in 0..n {
            self.next_done().await.expect("first consumer process exited early");
        }
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// Runs this second consumer process until `completed` (the completions
    /// of both runs) holds `total` events, then closes its stdin and checks
    /// that it closed its bus cleanly and exited successfully.
    pub async fn finish(mut self, mut completed: BTreeSet<(String, i64)>, total: usize) {
        while completed.len() < total {
            let (agg, v) = self.next_done().await.expect("second consumer process exited early");
            completed.insert((agg, v));
        }
        drop(self.child.stdin.take()); // EOF: close cleanly
        let mut closed = None;
        while let Some(line) = self.lines.recv().await {
            if line.starts_with("CLOSED") {
                closed = Some(line);
            }
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "second consumer process failed: {status}");
        let closed = closed.expect("the second process closed its bus");
        assert!(closed.contains("commit_error=None"), "{closed}");
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child mode of a test binary (does nothing unless `child_env` is
/// set): consumes `CHILD_TOPICS` as `CHILD_GROUP` from the broker
/// `connect` returns for `CHILD_ADDRESS`, writes `B|C topic aggregate
/// version` lines to `CHILD_LOG` (one write per line, so a SIGKILL loses no
/// written line) and `DONE <aggregate> <version>` to stdout per completion;
/// closes the bus cleanly at EOF on stdin.
pub fn entry<B: Broker, F: Future<Output = B>>(child_env: &str, connect: impl FnOnce(String) -> F) {
    if std::env::var_os(child_env).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let broker = connect(var("CHILD_ADDRESS")).await;
        consume(broker).await;
    });
}

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"))
}

async fn consume<B: Broker>(broker: B) {
    let group = var("CHILD_GROUP");
    let topics: Vec<String> = var("CHILD_TOPICS").split(',').map(String::from).collect();
    let log =
        Arc::new(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(var("CHILD_LOG")).unwrap()));
    let mut cfg = bus_config(&group);
    cfg.consumer.commit_interval = Duration::from_millis(50);
    let bus = EventBus::builder(broker).config(cfg).build().unwrap();
    for topic in &topics {
        let log = log.clone();
        let topic_name = topic.clone();
        bus.subscribe_envelope(topic, move |env: Envelope| {
            let log = log.clone();
            let topic = topic_name.clone();
            async move {
                let line = |kind: &str| format!("{kind} {topic} {} {}\n", env.aggregate_id, env.event_version);
                log.lock().unwrap().write_all(line("B").as_bytes()).unwrap();
                tokio::time::sleep(Duration::from_millis(4)).await; // simulated handler work
                log.lock().unwrap().write_all(line("C").as_bytes()).unwrap();
                let mut out = std::io::stdout().lock();
                writeln!(out, "DONE {} {}", env.aggregate_id, env.event_version).unwrap();
                out.flush().unwrap();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    run_until_stdin_closes(bus).await;
}

/// A child's last act: runs until the parent closes stdin, then closes the
/// bus and prints `CLOSED …` with its report (a SIGKILLed child never does).
pub async fn run_until_stdin_closes<B: eventbus::Broker>(bus: eventbus::EventBus<B>) {
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = eof_tx.send(());
    });
    let _ = eof_rx.await;
    let report = bus.close().await;
    println!("CLOSED handed_back={} commit_error={:?}", report.handed_back, report.final_commit_error);
}

/// Starts the consumer process (see [`entry`]) with `child_env` set.
pub fn spawn_consumer(child_env: &str, address: &str, group: &str, topics: &[String], log: &Path) -> ChildProc {
    let topics = topics.join(",");
    ChildProc::spawn(&[
        (child_env, "1"),
        ("CHILD_ADDRESS", address),
        ("CHILD_GROUP", group),
        ("CHILD_TOPICS", &topics),
        ("CHILD_LOG", log.to_str().expect("temp paths are UTF-8")),
    ])
}

/// Publishes versions `1..=versions` of `aggregates` aggregates `t{t}-agg{a}`
/// per topic (a version of every aggregate before the next version), keyed
/// by aggregate. Returns each event's position by (topic, aggregate,
/// version), and each aggregate's last version.
pub async fn publish_all<B: Broker>(
    broker: &B,
    topics: &[String],
    aggregates: usize,
    versions: i64,
) -> (BTreeMap<(String, String, i64), Position>, BTreeMap<String, i64>) {
    let mut position = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for v in 1..=versions {
        for (t, topic) in topics.iter().enumerate() {
            for a in 0..aggregates {
                let agg = format!("t{t}-agg{a}");
                let pos = broker.publish(outbound(topic, Some(&agg), &event(&agg, v))).await.unwrap();
                position.insert((topic.clone(), agg.clone(), v), pos);
                expected.insert(agg, versions);
            }
        }
    }
    (position, expected)
}

#[derive(Default)]
pub struct LogReplay {
    /// (topic, aggregate, version) completions.
    pub completed: BTreeMap<(String, String, i64), u32>,
    pub began: Vec<(String, String, i64)>,
}

/// Feeds a child's log into the checker; a begin without completion (the
/// kill) is recorded as a failure at the end of the log.
pub fn replay(path: &Path, checker: &OrderChecker) -> LogReplay {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = LogReplay::default();
    let mut running: BTreeMap<String, i64> = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [kind, topic, agg, v] = parts[..] else { panic!("torn log line {line:?}") };
        let v: i64 = v.parse().unwrap();
        match kind {
            "B" => {
                checker.begin(agg, v);
                running.insert(agg.to_string(), v);
                out.began.push((topic.to_string(), agg.to_string(), v));
            }
            "C" => {
                checker.complete(agg, v);
                running.remove(agg);
                *out.completed.entry((topic.to_string(), agg.to_string(), v)).or_default() += 1;
            }
            _ => panic!("bad log line {line:?}"),
        }
    }
    for (agg, v) in running {
        checker.fail(&agg, v);
    }
    out
}

impl LogReplay {
    /// The (aggregate, version) completed.
    pub fn completed_events(&self) -> BTreeSet<(String, i64)> {
        self.completed.keys().map(|(_, a, v)| (a.clone(), *v)).collect()
    }

    /// How many events completed here had completed in `earlier`.
    pub fn rehandled(&self, earlier: &LogReplay) -> usize {
        self.completed.keys().filter(|k| earlier.completed.contains_key(k)).count()
    }
}

/// A consumer process killed with SIGKILL and restarted (see [`Crash::run`]).
pub struct Crash<'a> {
    /// The variable that puts the test binary in child mode.
    pub child_env: &'a str,
    /// The broker address passed to the child as `CHILD_ADDRESS`.
    pub address: &'a str,
    pub group: &'a str,
    pub topics: &'a [String],
    /// Starts the names of the two runs' temporary logs.
    pub logs: &'a str,
}

/// The two runs of a [`Crash`], their logs replayed in order into one checker.
pub struct CrashRuns {
    pub first: LogReplay,
    pub second: LogReplay,
    /// The checker's report against the expected last versions.
    pub report: OrderReport,
    logs: [PathBuf; 2],
}

impl CrashRuns {
    /// Prints a summary (`label`, then `at_kill`) and asserts that every
    /// one of the `total` events was handled, in order.
    pub fn check(&self, label: &str, total: usize, at_kill: &str, started: Instant) {
        let r = &self.report;
        eprintln!(
            "{label}: sent {total}, handled {} (first run {}, second run {}), duplicates {} (re-handled {}), \
             violations {}, missing {}, {at_kill}, in {:?}",
            r.handled,
            self.first.completed.len(),
            self.second.completed.len(),
            r.duplicates,
            self.second.rehandled(&self.first),
            r.violations,
            r.missing,
            started.elapsed()
        );
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.handled, total as u64);
    }

    pub fn remove_logs(&self) {
        for log in &self.logs {
            let _ = std::fs::remove_file(log);
        }
    }
}

impl Crash<'_> {
    /// First run: SIGKILL after a third of the `total` published events
    /// completed; then `at_kill`; then a second run until every event
    /// completed in one of the runs, closed cleanly. Returns what `at_kill`
    /// returned, and the runs checked against `expected`.
    pub async fn run<T>(
        &self,
        total: usize,
        expected: &BTreeMap<String, i64>,
        at_kill: impl AsyncFnOnce() -> T,
    ) -> (T, CrashRuns) {
        let spawn = |log: &Path| spawn_consumer(self.child_env, self.address, self.group, self.topics, log);
        let log1 = temp_path(&format!("{}-1", self.logs));
        spawn(&log1).kill_after(total / 3).await;
        let at_kill = at_kill().await;

        let checker = OrderChecker::new();
        let first = replay(&log1, &checker);
        let log2 = temp_path(&format!("{}-2", self.logs));
        spawn(&log2).finish(first.completed_events(), total).await;
        let second = replay(&log2, &checker);
        let report = checker.report(expected);
        (at_kill, CrashRuns { first, second, report, logs: [log1, log2] })
    }
}

pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()))
}
