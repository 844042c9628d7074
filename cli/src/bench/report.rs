//! What `eventbus bench` measured: the JSON report, the terminal tables and
//! the files of the report folder.

use std::path::Path;

use serde::Serialize;

use super::chart::{self, Series};
use super::drain::Drain;
use crate::workload::{render_table, LevelResult, Machine};

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    /// 1-minute load average when the run started and ended.
    pub load_average_start: Option<f64>,
    pub load_average_end: Option<f64>,
    pub started_at: String,
    /// The configuration run with: the library's defaults unless overridden.
    pub config: super::settings::EffectiveConfig,
    pub brokers: Vec<BrokerReport>,
    pub passed: bool,
}

#[derive(Debug, Serialize)]
pub struct BrokerReport {
    pub broker: String,
    pub address: Option<String>,
    pub levels: Vec<LevelReport>,
    pub parallelism: Option<Parallelism>,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LevelReport {
    #[serde(flatten)]
    pub live: LevelResult,
    /// The same topics read again from the start by a new group of our bus
    /// and by the plain client, trivial handler (Kafka and NATS only): the
    /// median run of each side, and every run's rate.
    pub ours_drain: Option<Drain>,
    pub raw_drain: Option<Drain>,
    pub ours_runs_eps: Vec<f64>,
    pub raw_runs_eps: Vec<f64>,
    pub ours_vs_raw: Option<f64>,
    pub load_average: Option<f64>,
}

/// Ours against the seed's per-partition consume-and-wait, slow handler.
#[derive(Debug, Serialize)]
pub struct Parallelism {
    pub messages: u64,
    pub aggregates: u64,
    pub partitions: u32,
    pub handler_ms: f64,
    pub ours: Option<Drain>,
    pub sequential: Option<Drain>,
    pub ratio: Option<f64>,
    pub errors: Vec<String>,
    pub load_average: Option<f64>,
}

impl BrokerReport {
    pub fn passed(&self) -> bool {
        self.errors.is_empty()
            && self.levels.iter().all(|l| l.live.passed())
            && self.parallelism.as_ref().is_none_or(|p| p.errors.is_empty())
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// "slowest–fastest" of some runs' rates.
fn spread(runs: &[f64]) -> String {
    let lo = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = runs.iter().copied().fold(0.0_f64, f64::max);
    if runs.is_empty() {
        "-".into()
    } else {
        format!("{lo:.0}-{hi:.0}")
    }
}

pub fn print_tables(report: &BenchReport) {
    let header = [
        "broker", "messages", "sent", "handled", "success", "violations", "dups", "dead", "pub/s", "e2e/s",
        "pub p50 ms", "pub p99 ms", "e2e p50 ms", "e2e p99 ms", "tasks alive", "peak MiB", "ours/raw", "load",
    ];
    let mut rows = Vec::new();
    for b in &report.brokers {
        for l in &b.levels {
            let r = &l.live;
            let mut row = vec![b.broker.clone(), r.messages.to_string()];
            row.extend(r.check_cells());
            row.extend([
                format!("{:.0}", r.publish_eps),
                format!("{:.0}", r.throughput_eps),
                format!("{:.2}", r.publish_p50_ms),
                format!("{:.2}", r.publish_p99_ms),
            ]);
            row.extend(r.end_cells());
            row.extend([opt(l.ours_vs_raw, 2), opt(l.load_average, 2)]);
            rows.push(row);
        }
    }
    print!("{}", render_table(&header, &rows));

    let drains: Vec<Vec<String>> = report
        .brokers
        .iter()
        .flat_map(|b| b.levels.iter().map(move |l| (b, l)))
        .filter(|(_, l)| l.ours_drain.is_some() || l.raw_drain.is_some())
        .map(|(b, l)| {
            vec![
                b.broker.clone(),
                l.live.messages.to_string(),
                opt(l.ours_drain.as_ref().map(|d| d.eps), 0),
                spread(&l.ours_runs_eps),
                opt(l.raw_drain.as_ref().map(|d| d.eps), 0),
                spread(&l.raw_runs_eps),
                opt(l.ours_vs_raw, 2),
            ]
        })
        .collect();
    if !drains.is_empty() {
        println!("\nbacklog read by a new group, trivial handler, median of the runs (goal: ours/raw >= 0.8):");
        let header = ["broker", "messages", "ours msgs/s", "ours runs", "raw client msgs/s", "raw runs", "ours/raw"];
        print!("{}", render_table(&header, &drains));
    }

    let par: Vec<Vec<String>> = report
        .brokers
        .iter()
        .filter_map(|b| b.parallelism.as_ref().map(|p| (b, p)))
        .map(|(b, p)| {
            vec![
                b.broker.clone(),
                p.messages.to_string(),
                p.aggregates.to_string(),
                p.partitions.to_string(),
                format!("{:.1}", p.handler_ms),
                opt(p.ours.as_ref().map(|d| d.eps), 0),
                opt(p.sequential.as_ref().map(|d| d.eps), 0),
                opt(p.ratio, 1),
                opt(p.load_average, 2),
            ]
        })
        .collect();
    if !par.is_empty() {
        println!("\nkey-level parallelism, 1 ms handler (goal: ours/sequential >= 20x):");
        let header = [
            "broker", "messages", "aggs", "partitions", "handler ms", "ours msgs/s", "sequential msgs/s", "ratio",
            "load",
        ];
        print!("{}", render_table(&header, &par));
    }
}

/// Writes `report.json` and the charts into `dir`; returns the files written.
pub fn write_files(report: &BenchReport, dir: &Path) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("report folder {}: {e}", dir.display()))?;
    let json = serde_json::to_value(report).map_err(|e| format!("serializing the report: {e}"))?;
    let json_path = dir.join("report.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| format!("serializing the report: {e}"))?;
    std::fs::write(&json_path, text).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let mut written = vec![json_path.display().to_string()];
    written.extend(draw_charts(&json, dir)?);
    Ok(written)
}

/// Draws the charts of a report (as written to `report.json`) into `dir`.
/// Read from the JSON, so an earlier run's report can be charted again.
pub fn draw_charts(report: &serde_json::Value, dir: &Path) -> Result<Vec<String>, String> {
    let brokers = report["brokers"].as_array().ok_or("the report has no \"brokers\" list")?;
    let series = |field: &str| -> Vec<Series> {
        brokers
            .iter()
            .filter_map(|b| {
                let levels = b["levels"].as_array().filter(|l| !l.is_empty())?;
                let points =
                    levels.iter().filter_map(|l| Some((l["messages"].as_f64()?, l[field].as_f64()?))).collect();
                Some(Series { name: b["broker"].as_str().unwrap_or("?").to_string(), points })
            })
            .collect()
    };
    let charts = [
        ("throughput.svg", "End-to-end throughput by pressure level", "events/s", series("throughput_eps")),
        (
            "publish_throughput.svg",
            "Publish throughput by pressure level",
            "acknowledged publishes/s",
            series("publish_eps"),
        ),
        ("latency_p99.svg", "End-to-end p99 latency by pressure level", "ms", series("latency_p99_ms")),
    ];
    let mut written = Vec::new();
    for (file, title, y, s) in charts {
        let path = dir.join(file);
        chart::line_chart(&path, title, y, &s)?;
        written.push(path.display().to_string());
    }
    Ok(written)
}
