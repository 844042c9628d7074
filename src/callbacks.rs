//! Callbacks a bus calls when something operators care about happens: a
//! backlog starts or ends, the broker connection drops or returns, health
//! messages stop or resume, a publish completes.
//!
//! Callbacks run on the bus's own tasks (the observer, the health monitor) or
//! on the publishing task, synchronously: they must be fast and must not
//! block (hand work to a channel or spawn a task). A panicking callback is
//! caught and logged; the bus carries on.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backlog::BacklogEvent;
use crate::broker::Position;
use crate::error::PublishError;

/// The broker connection dropped or came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The client lost its broker.
    Disconnected,
    /// The client reaches its broker again after `down_for`.
    Reconnected {
        /// How long the connection was down.
        down_for: Duration,
    },
}

/// Health messages stopped arriving within the window, or resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthAlert {
    /// No health message for `window`. `last_seen` is when the last one
    /// arrived (`None`: none since the monitor started).
    Missing {
        /// The configured window (`observability.health.window`).
        window: Duration,
        /// When the last health message arrived.
        last_seen: Option<SystemTime>,
    },
    /// A health message from `instance` arrived after an alert.
    Restored {
        /// The instance ID of that message.
        instance: String,
    },
}

/// The outcome of one `publish_envelope`.
#[derive(Debug)]
pub struct PublishResult<'a> {
    /// The topic published to.
    pub topic: &'a str,
    /// The envelope's aggregate ID (the message key).
    pub aggregate_id: &'a str,
    /// The envelope's event type.
    pub event_type: &'a str,
    /// The envelope's event version.
    pub event_version: i64,
    /// Where the broker stored it, or why it was not stored.
    pub result: Result<Position, &'a PublishError>,
}

impl PublishResult<'_> {
    /// The event's identity, `aggregate_id:event_type:event_version` (the
    /// envelope has no separate event ID).
    pub fn event_id(&self) -> String {
        format!("{}:{}:{}", self.aggregate_id, self.event_type, self.event_version)
    }

    /// Whether the broker stored it.
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }
}

type Callback<T> = Arc<dyn Fn(&T) + Send + Sync>;
type PublishCallback = Arc<dyn for<'a> Fn(&PublishResult<'a>) + Send + Sync>;

/// The registered callbacks; set through the `EventBusBuilder::on_*` methods.
#[derive(Clone, Default)]
pub struct Callbacks {
    pub(crate) backlog: Option<Callback<BacklogEvent>>,
    pub(crate) connection: Option<Callback<ConnectionEvent>>,
    pub(crate) health: Option<Callback<HealthAlert>>,
    pub(crate) publish_result: Option<PublishCallback>,
}

impl fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Callbacks")
            .field("backlog", &self.backlog.is_some())
            .field("connection", &self.connection.is_some())
            .field("health", &self.health.is_some())
            .field("publish_result", &self.publish_result.is_some())
            .finish()
    }
}

impl Callbacks {
    /// Called when a backlog starts or recovers (`observability.backlog`).
    pub fn on_backlog(&mut self, f: impl Fn(&BacklogEvent) + Send + Sync + 'static) {
        self.backlog = Some(Arc::new(f));
    }

    /// Called when the broker connection drops and when it comes back.
    pub fn on_connection(&mut self, f: impl Fn(&ConnectionEvent) + Send + Sync + 'static) {
        self.connection = Some(Arc::new(f));
    }

    /// Called when health messages stop arriving within the window, and when they resume.
    pub fn on_health_alert(&mut self, f: impl Fn(&HealthAlert) + Send + Sync + 'static) {
        self.health = Some(Arc::new(f));
    }

    /// Called after every `publish_envelope` (and `publish_envelope_async`) with the outcome.
    pub fn on_publish_result(&mut self, f: impl for<'a> Fn(&PublishResult<'a>) + Send + Sync + 'static) {
        self.publish_result = Some(Arc::new(f));
    }

    pub(crate) fn backlog(&self, event: &BacklogEvent) {
        call("on_backlog", self.backlog.as_deref(), event);
    }

    pub(crate) fn connection(&self, event: &ConnectionEvent) {
        call("on_connection", self.connection.as_deref(), event);
    }

    pub(crate) fn health(&self, alert: &HealthAlert) {
        call("on_health_alert", self.health.as_deref(), alert);
    }

    pub(crate) fn wants_publish_results(&self) -> bool {
        self.publish_result.is_some()
    }

    pub(crate) fn publish_result(&self, result: &PublishResult<'_>) {
        if let Some(f) = self.publish_result.as_deref() {
            if catch_unwind(AssertUnwindSafe(|| f(result))).is_err() {
                tracing::error!(callback = "on_publish_result", "callback panicked; ignored");
            }
        }
    }
}

/// Runs `f` if set; a panic is logged, never propagated into the bus's tasks.
fn call<T: ?Sized>(name: &'static str, f: Option<&(dyn Fn(&T) + Send + Sync)>, arg: &T) {
    if let Some(f) = f {
        if catch_unwind(AssertUnwindSafe(|| f(arg))).is_err() {
            tracing::error!(callback = name, "callback panicked; ignored");
        }
    }
}
