//! The `eventbus bench` command line on the memory broker, run as a user
//! would. It checks what the bench reports and writes, never its timings.

use std::path::PathBuf;
use std::process::{Command, Output};

fn eventbus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eventbus")).args(args).output().expect("run the eventbus binary")
}

fn report_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eventbus-bench-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn bench_on_memory_reports_every_event_in_order_and_writes_the_charts() {
    let dir = report_dir("memory");
    let out =
        eventbus(&["bench", "--brokers", "memory", "--levels", "500", "--json", "--report-dir", dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);

    // The JSON printed last, and the same report in the folder.
    let start = stdout.find("\n{").expect("JSON report in the output") + 1;
    let end = stdout.rfind('}').expect("end of the JSON report") + 1;
    let printed: serde_json::Value = serde_json::from_str(&stdout[start..end]).expect("valid JSON report");
    let file = std::fs::read_to_string(dir.join("report.json")).expect("report.json written");
    let written: serde_json::Value = serde_json::from_str(&file).expect("report.json is valid JSON");
    for report in [&printed, &written] {
        assert_eq!(report["passed"], true);
        assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
        let brokers = report["brokers"].as_array().expect("brokers");
        assert_eq!(brokers.len(), 1);
        assert_eq!(brokers[0]["broker"], "memory");
        let levels = brokers[0]["levels"].as_array().expect("levels");
        assert_eq!(levels.len(), 1);
        let level = &levels[0];
        assert_eq!(level["messages"], 500);
        assert_eq!(level["sent"], 500);
        assert_eq!(level["received"], level["sent"], "sent != handled: {level}");
        assert_eq!(level["order_violations"], 0);
        assert_eq!(level["duplicates"], 0);
        assert_eq!(level["dead_letters"], 0);
        assert_eq!(level["tasks_alive_after_close"], 0);
        // No flag given: the library's defaults, recorded as run with.
        assert_recorded_defaults(&report["config"]);
        assert_eq!(report["config"]["overridden"], serde_json::json!({}), "{}", report["config"]);
        // The parallelism run handled everything on both sides.
        let par = &brokers[0]["parallelism"];
        assert!(par["messages"].as_u64().unwrap() > 0, "{par}");
        assert_eq!(par["ours"]["handled"], par["messages"], "{par}");
        assert_eq!(par["sequential"]["handled"], par["messages"], "{par}");
    }

    assert_charts(&dir);

    // The charts can be drawn again from the written report alone.
    let again = report_dir("replot");
    let report = dir.join("report.json");
    let out = eventbus(&["bench", "--replot", report.to_str().unwrap(), "--report-dir", again.to_str().unwrap()]);
    assert!(out.status.success(), "replot failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_charts(&again);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&again);
}

/// The recorded values are the library's own defaults, read from the library.
fn assert_recorded_defaults(config: &serde_json::Value) {
    let bus = eventbus::BusConfig::default();
    let values = &config["values"];
    assert_eq!(values["pool.concurrency"], bus.pool.concurrency as u64, "{config}");
    assert_eq!(values["pool.capacity"], bus.pool.capacity as u64, "{config}");
    if config["overridden"].get("consumer.commit_interval_ms").is_none() {
        assert_eq!(values["consumer.commit_interval_ms"], bus.consumer.commit_interval.as_millis() as u64, "{config}");
    }
    #[cfg(feature = "kafka")]
    {
        let kafka = eventbus::broker::kafka::KafkaConfig::default();
        assert_eq!(values["kafka.max_buffered"], kafka.max_buffered.min(bus.pool.capacity) as u64, "{config}");
        assert_eq!(values["kafka.fetch_max_wait_ms"], kafka.fetch_max_wait.as_millis() as u64, "{config}");
        assert_eq!(values["kafka.linger_ms"], kafka.linger.as_millis() as u64, "{config}");
    }
    #[cfg(feature = "nats")]
    {
        let nats = eventbus::broker::nats::NatsConfig::default();
        assert_eq!(values["nats.max_ack_pending"], nats.max_ack_pending, "{config}");
    }
}

/// A short soak on memory, with one setting overridden: every figure is
/// reported, everything sent is handled in order, and the override is recorded.
#[test]
fn a_soak_reports_memory_figures_and_every_event_in_order() {
    let dir = report_dir("soak");
    let out = eventbus(&[
        "bench",
        "--brokers",
        "memory",
        "--soak",
        "20000",
        "--commit-interval-ms",
        "7",
        "--report-dir",
        dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(stdout.contains("overridden: consumer.commit_interval_ms=7 (default "), "stdout:\n{stdout}");
    let file = std::fs::read_to_string(dir.join("soak.json")).expect("soak.json written");
    let report: serde_json::Value = serde_json::from_str(&file).expect("soak.json is valid JSON");
    assert_eq!(report["passed"], true, "{report}");
    let config = &report["config"];
    assert_eq!(config["values"]["consumer.commit_interval_ms"], 7, "{config}");
    let over = &config["overridden"]["consumer.commit_interval_ms"];
    assert_eq!(over["value"], 7, "{config}");
    assert_eq!(over["flag"], "--commit-interval-ms", "{config}");
    let default_ms = eventbus::BusConfig::default().consumer.commit_interval.as_millis() as u64;
    assert_eq!(over["library_default"], default_ms, "{config}");
    assert_eq!(config["overridden"].as_object().unwrap().len(), 1, "only the flag given is overridden: {config}");
    assert_recorded_defaults(config);

    let soak = &report["soaks"][0];
    assert_eq!(soak["broker"], "memory");
    assert_eq!(soak["events"], 20000);
    assert_eq!(soak["sent"], 20000, "{soak}");
    assert_eq!(soak["received"], soak["sent"], "{soak}");
    assert_eq!(soak["order_violations"], 0, "{soak}");
    assert_eq!(soak["missing"], 0, "{soak}");
    for field in ["rss_start_mib", "rss_warm_mib", "rss_peak_mib", "rss_end_mib", "growth_after_warm_up_mib"] {
        assert!(soak[field].as_f64().is_some_and(|v| v.is_finite()), "{field} missing: {soak}");
    }
    assert!(soak["rss_peak_mib"].as_f64() >= soak["rss_warm_mib"].as_f64(), "{soak}");
    assert!(soak["flat"].is_boolean(), "{soak}");
    // The memory broker's log is counted: each event's envelope is stored.
    assert!(soak["log_bytes_per_event"].as_f64().unwrap() > 0.0, "{soak}");
    assert!(soak["peak_in_flight"].as_u64().unwrap() > 0, "{soak}");
    assert!(soak["bytes_per_in_flight_event"].as_f64().is_some(), "{soak}");
    // Sampled at every 1% handled at least.
    let samples = soak["samples"].as_array().expect("samples");
    assert!(samples.len() >= 100, "{} samples", samples.len());
    assert_eq!(samples.last().unwrap()["handled"], 20000);
    let _ = std::fs::remove_dir_all(&dir);
}

fn assert_charts(dir: &std::path::Path) {
    for chart in ["throughput.svg", "publish_throughput.svg", "latency_p99.svg"] {
        let svg = std::fs::read_to_string(dir.join(chart)).unwrap_or_else(|e| panic!("{chart}: {e}"));
        assert!(svg.trim_start().starts_with("<svg"), "{chart} is not an SVG: {}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"), "{chart} is cut short");
        assert!(svg.contains("memory"), "{chart} has no line labelled memory");
    }
}

#[cfg(feature = "nats")]
#[test]
fn an_unreachable_broker_is_a_clear_error_naming_it() {
    let dir = report_dir("unreachable");
    // Port 1 on loopback: nothing listens there, the connect is refused at once.
    let out = eventbus(&[
        "bench",
        "--brokers",
        "nats",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--connect-timeout-secs",
        "2",
        "--report-dir",
        dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("broker nats is not reachable at nats://127.0.0.1:1"), "stderr:\n{stderr}");
    assert!(!dir.exists(), "a report was written although nothing ran");
}
