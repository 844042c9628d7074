//! A consumer killed with SIGKILL and restarted, as a real process: the
//! test binary re-runs itself in child mode, logs each handler's begin (B)
//! and completion (C) to a file, and reports completions on stdout.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventbus::checker::OrderChecker;
use tokio::sync::mpsc;

pub struct ChildProc {
    pub child: Child,
    pub lines: mpsc::UnboundedReceiver<String>,
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
        ChildProc { child, lines }
    }

    /// The next `DONE` line's (aggregate, version), `None` once stdout closed.
    pub async fn next_done(&mut self) -> Option<(String, i64)> {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), self.lines.recv())
                .await
                .expect("the consumer process went quiet for 60 s")?;
            if let Some(rest) = line.strip_prefix("DONE ") {
                let (agg, v) = rest.split_once(' ').unwrap();
                return Some((agg.to_string(), v.parse().unwrap()));
            }
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()))
}
