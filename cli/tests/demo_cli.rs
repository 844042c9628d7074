//! The `eventbus demo` command line, run as a user would.

use std::path::PathBuf;
use std::process::{Command, Output};

fn eventbus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eventbus")).args(args).output().expect("run the eventbus binary")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A config file in a fresh temporary directory of this test.
fn config_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eventbus-demo-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn demo_handles_every_event_in_order_at_each_level() {
    let out = eventbus(&["demo", "--levels", "500,2000", "--json"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "demo failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);

    // The table: one row per level with 100% success and 0 violations.
    for level in ["500", "2000"] {
        let row = stdout
            .lines()
            .find(|l| l.split('|').nth(1).is_some_and(|c| c.trim() == level))
            .unwrap_or_else(|| panic!("no table row for level {level}:\n{stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | messages | aggs | sent | received | success | violations | ...
        assert_eq!(cells[3], level, "sent: {row}");
        assert_eq!(cells[4], level, "received: {row}");
        assert_eq!(cells[5], "100.00%", "success: {row}");
        assert_eq!(cells[6], "0", "violations: {row}");
    }

    // The JSON report says the same, plus a clean close.
    let start = stdout.find("\n{").expect("JSON report in the output") + 1;
    let end = stdout.rfind('}').expect("end of the JSON report") + 1;
    let report: serde_json::Value = serde_json::from_str(&stdout[start..end]).expect("valid JSON report");
    let levels = report["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2);
    for (level, expected) in levels.iter().zip([500u64, 2000]) {
        assert_eq!(level["sent"], expected);
        assert_eq!(level["received"], expected);
        assert_eq!(level["success_rate"], 100.0);
        assert_eq!(level["order_violations"], 0);
        assert_eq!(level["duplicates"], 0);
        assert_eq!(level["dead_letters"], 0);
        assert_eq!(level["tasks_alive_after_close"], 0);
    }
    assert_eq!(report["passed"], true);
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
}

#[test]
fn demo_accepts_a_valid_config_file() {
    let path = config_file("ok.yaml", "pool:\n  concurrency: 8\n  capacity: 64\nconsumer:\n  group: demo-yaml\n");
    let out = eventbus(&["demo", "--messages", "500", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "demo failed:\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("8 workers, capacity 64"), "config not applied:\n{stdout}");
}

#[test]
fn an_invalid_config_value_fails_naming_the_key() {
    let path = config_file("zero.toml", "[pool]\nconcurrency = 0\n");
    let out = eventbus(&["demo", "--messages", "500", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "a bad config was accepted:\n{stdout}");
    assert!(stderr.contains("pool.concurrency"), "error does not name the key:\n{stderr}");
    assert!(stderr.contains("zero.toml"), "error does not name the file:\n{stderr}");
    assert!(!stdout.contains("| messages"), "demo ran despite the bad config:\n{stdout}");
}

#[test]
fn an_unknown_config_key_fails_naming_the_key() {
    let path = config_file("typo.toml", "[pool]\nconcurency = 8\n");
    let out = eventbus(&["demo", "--messages", "500", "--config", path.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("concurency"), "error does not name the key:\n{stderr}");
}
