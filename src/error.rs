//! The errors of the bus's configuration, publish and subscribe.
//!
//! They live below the façade ([`crate::bus`]) so that the modules it is
//! built from (callbacks, observer, settings) name them without importing
//! the façade (`docs/architecture.md`, "Module layers"). The old paths
//! (`eventbus::bus::ConfigError`, ...) re-export them.

use crate::broker::BrokerError;
use crate::consumer::ConsumerError;
use crate::envelope::EnvelopeError;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid TOML, or does not match the configuration's keys and types.
    #[error("invalid TOML configuration: {0}")]
    Toml(#[from] toml::de::Error),
    /// The text is not valid YAML, or does not match the configuration's keys and types (feature `yaml`).
    #[cfg(feature = "yaml")]
    #[error("invalid YAML configuration: {0}")]
    Yaml(#[from] yaml_serde::Error),
    /// A value the bus cannot run with.
    #[error("invalid configuration {key}: {reason}")]
    Invalid {
        /// The key, dotted from the file's root (`pool.concurrency`).
        key: &'static str,
        /// What the value must be.
        reason: String,
    },
    /// The selected broker adapter's settings are invalid (`BrokerError::Config`, naming the key).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file, as given.
        path: String,
        /// Why reading it failed.
        source: std::io::Error,
    },
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The envelope does not encode (invalid aggregate ID, payload, ...); nothing was sent.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The broker did not acknowledge the message.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The bus is closed (an async publish after `close`).
    #[error("bus closed")]
    Closed,
}

/// Why a subscribe (or `start`) failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The topic already has a handler on this bus.
    #[error("topic {0} already has a handler")]
    Duplicate(String),
    /// The broker refused the subscription.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The consumer could not take the topic (e.g. its dead-letter topic cannot be created).
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The bus is closed.
    #[error("bus closed")]
    Closed,
}
