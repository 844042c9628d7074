//! The configuration `eventbus bench` runs with: the library's defaults
//! (`BusConfig::default()`, `KafkaConfig::default()`, `NatsConfig::default()`)
//! unless a flag says otherwise, and a record of what was overridden, for the
//! printed header and the JSON report.

use std::collections::BTreeMap;
use std::time::Duration;

use eventbus::bus::BusConfig;
use serde::Serialize;
use serde_json::{json, Value};

use super::BenchArgs;

/// One setting a flag changed: the value run with and the library's default.
#[derive(Debug, Clone, Serialize)]
pub struct Override {
    pub value: Value,
    pub library_default: Value,
    /// The flag that set it.
    pub flag: String,
}

/// What the bench ran with. Keys are the configuration's own
/// (`consumer.commit_interval_ms`, `pool.concurrency`, `kafka.max_buffered`, ...).
#[derive(Debug, Clone, Serialize)]
pub struct EffectiveConfig {
    /// Every performance-relevant setting, as run (defaults and overrides alike).
    pub values: BTreeMap<String, Value>,
    /// The settings a flag changed from the library's default (empty: the defaults).
    pub overridden: BTreeMap<String, Override>,
    /// What the bench sets on the broker clients regardless of flags, and why
    /// (none of it is a throughput knob).
    pub bench_settings: BTreeMap<String, String>,
    /// Publishes in flight per topic (the bench's load generator, not the library).
    pub publish_concurrency: usize,
}

impl EffectiveConfig {
    /// One line for the printed header.
    pub fn describe(&self) -> String {
        let values: Vec<String> = self.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let overridden = if self.overridden.is_empty() {
            "none (library defaults)".to_string()
        } else {
            self.overridden
                .iter()
                .map(|(k, o)| format!("{k}={} (default {}, {})", o.value, o.library_default, o.flag))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!("config: {}\noverridden: {overridden}", values.join(" "))
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Applies a flag to a setting: records the value run with, and the override
/// when the flag was given.
struct Recorder<'a>(&'a mut EffectiveConfig);

impl Recorder<'_> {
    fn set<T: Serialize + Copy>(&mut self, key: &str, default: T, flag: Option<(&str, T)>) -> T {
        let value = flag.map_or(default, |(_, v)| v);
        self.0.values.insert(key.into(), json!(value));
        if let Some((name, v)) = flag {
            self.0
                .overridden
                .insert(key.into(), Override { value: json!(v), library_default: json!(default), flag: name.into() });
        }
        value
    }
}

/// The bus configuration of the run and the record of it. Broker settings
/// are recorded here too (from the same flags [`kafka_config`] and
/// [`nats_config`] apply), whether or not that broker runs.
pub fn bus_config(args: &BenchArgs) -> (BusConfig, EffectiveConfig) {
    let mut config = BusConfig::default();
    let mut effective = EffectiveConfig {
        values: BTreeMap::new(),
        overridden: BTreeMap::new(),
        bench_settings: BTreeMap::new(),
        publish_concurrency: args.publish_concurrency,
    };
    let mut r = Recorder(&mut effective);
    let interval = r.set(
        "consumer.commit_interval_ms",
        ms(config.consumer.commit_interval),
        args.commit_interval_ms.map(|v| ("--commit-interval-ms", v.max(1))),
    );
    config.consumer.commit_interval = Duration::from_millis(interval);
    config.pool.concurrency =
        r.set("pool.concurrency", config.pool.concurrency, args.pool_workers.map(|v| ("--pool-workers", v.max(1))));
    config.pool.capacity =
        r.set("pool.capacity", config.pool.capacity, args.pool_capacity.map(|v| ("--pool-capacity", v.max(1))));
    r.set("pool.wait_timeout_ms", ms(config.pool.wait_timeout), None);
    r.set("consumer.commit_threshold", config.consumer.commit_threshold, None);
    #[cfg(feature = "kafka")]
    {
        let k = kafka_config(args, &config, "");
        let d = eventbus::broker::kafka::KafkaConfig::default();
        r.set("kafka.max_buffered", d.max_buffered, args.read_ahead.map(|v| ("--read-ahead", v.max(1))));
        // What `bounded` leaves of it (the pool's capacity caps it).
        r.0.values.insert("kafka.max_buffered".into(), json!(k.max_buffered));
        r.set(
            "kafka.fetch_max_wait_ms",
            ms(d.fetch_max_wait),
            args.kafka_fetch_wait_ms.map(|v| ("--kafka-fetch-wait-ms", v)),
        );
        r.set("kafka.linger_ms", ms(d.linger), args.kafka_linger_ms.map(|v| ("--kafka-linger-ms", v)));
        r.set("kafka.auto_commit_interval_ms", ms(d.auto_commit_interval), None);
        for (key, why) in [
            ("kafka.session_timeout_ms", "6000: a run's groups come and go; a member left behind is noticed sooner"),
            ("kafka.heartbeat_interval_ms", "500: below the 6 s session timeout"),
            ("kafka.request_timeout_ms", "at least 10 s or --connect-timeout-secs"),
            ("kafka.replication_factor", "1: a single-broker test cluster"),
        ] {
            r.0.bench_settings.insert(key.into(), why.into());
        }
        if !args.kafka_batching {
            r.0.bench_settings.insert(
                "kafka.producer_properties.batch.num.messages".into(),
                "1: tansu 0.6 skips the rest of a batch when a fetch starts inside it (--kafka-batching lifts it)"
                    .into(),
            );
        }
    }
    #[cfg(feature = "nats")]
    {
        let n = nats_config(args, &config, "");
        let d = eventbus::broker::nats::NatsConfig::default();
        r.set(
            "nats.max_ack_pending",
            d.max_ack_pending,
            args.read_ahead.map(|v| ("--read-ahead", i64::try_from(v.max(1)).unwrap_or(i64::MAX))),
        );
        r.0.values.insert("nats.max_ack_pending".into(), json!(n.max_ack_pending));
        r.set("nats.pull_batch", d.pull_batch, None);
        r.0.bench_settings.insert("nats.connect_timeout_ms".into(), "--connect-timeout-secs".into());
    }
    (config, effective)
}

/// The Kafka adapter's configuration: the library's defaults, the flags,
/// and the bench's fixed connection settings ([`EffectiveConfig::bench_settings`]).
#[cfg(feature = "kafka")]
pub fn kafka_config(args: &BenchArgs, bus: &BusConfig, address: &str) -> eventbus::broker::kafka::KafkaConfig {
    use eventbus::broker::kafka::KafkaConfig;
    let timeout = Duration::from_secs(args.connect_timeout_secs.max(1));
    let d = KafkaConfig::default();
    let mut config = KafkaConfig {
        brokers: address.into(),
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(500),
        fetch_max_wait: args.kafka_fetch_wait_ms.map_or(d.fetch_max_wait, Duration::from_millis),
        linger: args.kafka_linger_ms.map_or(d.linger, Duration::from_millis),
        // Also bounds commits and admin calls during the run, so not the
        // connect timeout; the connect is cut by the bench's own timeout.
        request_timeout: timeout.max(Duration::from_secs(10)),
        replication_factor: 1,
        max_buffered: args.read_ahead.map_or(d.max_buffered, |v| v.max(1)),
        ..d
    }
    .bounded(bus.pool.capacity);
    if !args.kafka_batching {
        config.producer_properties.insert("batch.num.messages".into(), "1".into());
    }
    config
}

/// The NATS adapter's configuration: the library's defaults and the flags.
#[cfg(feature = "nats")]
pub fn nats_config(args: &BenchArgs, bus: &BusConfig, address: &str) -> eventbus::broker::nats::NatsConfig {
    use eventbus::broker::nats::NatsConfig;
    let d = NatsConfig::default();
    NatsConfig {
        url: address.into(),
        connect_timeout: Duration::from_secs(args.connect_timeout_secs.max(1)),
        max_ack_pending: args.read_ahead.map_or(d.max_ack_pending, |v| i64::try_from(v.max(1)).unwrap_or(i64::MAX)),
        ..d
    }
    .bounded(bus.pool.capacity)
}
