//! One configuration file for the bus and its broker adapter.
//!
//! A TOML file holds the bus's sections (`[pool]`, `[consumer]`,
//! `[observability]`, `close_timeout`) and a `[broker]` section that selects
//! the adapter (`kind = "memory" | "nats" | "kafka"`) with each adapter's
//! settings below it (`[broker.memory]`, `[broker.nats]`, `[broker.kafka]`).
//! [`BusConfig::load`](crate::BusConfig::load) reads the file, applies the
//! environment overrides of [`ENV_OVERRIDES`] (URLs and credentials stay out
//! of the file) and validates the bus and the selected adapter. `docs/eventbus.example.toml`
//! is a complete example (loaded by `tests/settings.rs`).

use std::fmt;

use serde::{Deserialize, Serialize};

#[cfg(feature = "kafka")]
use crate::broker::kafka::KafkaConfig;
use crate::broker::memory::MemoryConfig;
#[cfg(feature = "nats")]
use crate::broker::nats::NatsConfig;
use crate::error::ConfigError;

/// Which broker adapter a configuration selects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerKind {
    /// [`crate::MemoryBroker`], in process (tests, demos, single-process tools).
    #[default]
    Memory,
    /// [`crate::broker::nats::NatsBroker`] (feature `nats`).
    #[cfg(feature = "nats")]
    Nats,
    /// [`crate::broker::kafka::KafkaBroker`] (feature `kafka`).
    #[cfg(feature = "kafka")]
    Kafka,
}

/// The `[broker]` section of a [`BusConfig`](crate::BusConfig): the selected adapter and the
/// settings of each adapter. Only the selected adapter's settings are used
/// and validated; the others may stay in the file (e.g. for switching with
/// `EVENTBUS_BROKER`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// The selected adapter (`memory` by default; `EVENTBUS_BROKER` overrides it).
    pub kind: BrokerKind,
    /// `[broker.memory]`: the in-memory broker's settings.
    pub memory: MemoryConfig,
    /// `[broker.nats]`: the NATS JetStream adapter's settings (`docs/nats.md`).
    #[cfg(feature = "nats")]
    pub nats: NatsConfig,
    /// `[broker.kafka]`: the Kafka adapter's settings (`docs/kafka.md`).
    #[cfg(feature = "kafka")]
    pub kafka: KafkaConfig,
}

impl BrokerConfig {
    /// Validates the selected adapter's settings (the adapters' own checks,
    /// which their `connect` runs too).
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.kind {
            BrokerKind::Memory => {
                if self.memory.default_partitions == 0 {
                    return Err(ConfigError::Invalid {
                        key: "broker.memory.default_partitions",
                        reason: "must be at least 1".into(),
                    });
                }
                Ok(())
            }
            #[cfg(feature = "nats")]
            BrokerKind::Nats => Ok(self.nats.validate()?),
            #[cfg(feature = "kafka")]
            BrokerKind::Kafka => Ok(self.kafka.validate()?),
        }
    }
}

/// `EVENTBUS_BROKER`: `memory`, `nats` or `kafka`; overrides `broker.kind`.
pub const ENV_BROKER: &str = "EVENTBUS_BROKER";
/// `EVENTBUS_NATS_URL`: overrides `broker.nats.url` (comma-separated server URLs).
pub const ENV_NATS_URL: &str = "EVENTBUS_NATS_URL";
/// `EVENTBUS_KAFKA_BROKERS`: overrides `broker.kafka.brokers` (`host:port`, comma-separated).
pub const ENV_KAFKA_BROKERS: &str = "EVENTBUS_KAFKA_BROKERS";

/// Every environment variable [`BusConfig::apply_env`](crate::BusConfig::apply_env) reads, with the key it
/// overrides. A variable that is unset or blank changes nothing. The Kafka
/// ones apply whether or not the `kafka` feature is built (they then have no
/// section to go to and are ignored), likewise the NATS one.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    (ENV_BROKER, "broker.kind"),
    (ENV_NATS_URL, "broker.nats.url"),
    (ENV_KAFKA_BROKERS, "broker.kafka.brokers"),
];

impl BrokerConfig {
    /// Overrides `broker.kind` and the adapters' URLs and credentials with
    /// the variables of [`ENV_OVERRIDES`] (and the security sections' own,
    /// `docs/security.md`) that are set and not blank. Only an unknown
    /// `EVENTBUS_BROKER` is an error. [`BusConfig::apply_env`](crate::BusConfig::apply_env) calls it.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let var = |name: &str| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(kind) = var(ENV_BROKER) {
            self.kind = parse_kind(&kind)?;
        }
        // Credentials, TLS files and SASL settings: the security sections'
        // own variables (`docs/security.md`), applied here so a loaded file
        // shows what will connect (and again at connect, for configs built
        // in code).
        #[cfg(feature = "nats")]
        {
            let nats = &mut self.nats;
            if let Some(url) = var(ENV_NATS_URL) {
                nats.url = url;
            }
            nats.security = nats.security.clone().with_overrides_from(&env).map_err(ConfigError::Broker)?;
        }
        #[cfg(feature = "kafka")]
        {
            let kafka = &mut self.kafka;
            if let Some(brokers) = var(ENV_KAFKA_BROKERS) {
                kafka.brokers = brokers;
            }
            kafka.security = kafka.security.clone().with_overrides_from(&env).map_err(ConfigError::Broker)?;
        }
        Ok(())
    }
}

fn parse_kind(text: &str) -> Result<BrokerKind, ConfigError> {
    match text.to_ascii_lowercase().as_str() {
        "memory" => Ok(BrokerKind::Memory),
        #[cfg(feature = "nats")]
        "nats" => Ok(BrokerKind::Nats),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(BrokerKind::Kafka),
        other => Err(ConfigError::Invalid {
            key: "broker.kind",
            reason: format!("{ENV_BROKER}={other:?} is not an adapter of this build ({})", KINDS.join(", ")),
        }),
    }
}

/// The adapters this build has.
const KINDS: &[&str] = &[
    "memory",
    #[cfg(feature = "nats")]
    "nats",
    #[cfg(feature = "kafka")]
    "kafka",
];

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BrokerKind::Memory => "memory",
            #[cfg(feature = "nats")]
            BrokerKind::Nats => "nats",
            #[cfg(feature = "kafka")]
            BrokerKind::Kafka => "kafka",
        })
    }
}

