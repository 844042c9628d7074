//! How async-nats and JetStream failures become [`BrokerError`]s: one table,
//! [`classify`], with a unit test per row. The error types of async-nats
//! differ per call; `*_failure` reduce each to a [`Failure`] first.

use async_nats::jetstream;

use crate::broker::BrokerError;

/// JetStream API error codes the table names (nats-server `errors.json`).
pub(crate) mod code {
    /// Consumer not found.
    pub const CONSUMER_NOT_FOUND: u64 = 10014;
    /// Insufficient resources (account or server storage).
    pub const INSUFFICIENT_RESOURCES: u64 = 10023;
    /// Maximum number of streams reached (account limit).
    pub const MAX_STREAMS: u64 = 10027;
    /// Insufficient memory resources.
    pub const MEMORY_EXCEEDED: u64 = 10028;
    /// JetStream not enabled for the account.
    pub const NOT_ENABLED_FOR_ACCOUNT: u64 = 10039;
    /// Insufficient storage resources.
    pub const STORAGE_EXCEEDED: u64 = 10047;
    /// Stream configuration invalid.
    pub const STREAM_INVALID_CONFIG: u64 = 10052;
    /// Message size exceeds the stream's `max_msg_size`.
    pub const MESSAGE_TOO_LARGE: u64 = 10054;
    /// Stream name already in use with a different configuration.
    pub const STREAM_NAME_IN_USE: u64 = 10058;
    /// Stream not found.
    pub const STREAM_NOT_FOUND: u64 = 10059;
    /// Subjects overlap with an existing stream.
    pub const STREAM_SUBJECT_OVERLAP: u64 = 10065;
    /// JetStream not enabled.
    pub const NOT_ENABLED: u64 = 10076;
    /// Store failed: "maximum messages exceeded", "maximum bytes exceeded",
    /// "maximum messages per subject exceeded" (a full stream with
    /// `discard = new`).
    pub const STORE_FAILED: u64 = 10077;
    /// Header size exceeds the 64 KiB maximum.
    pub const HEADER_TOO_LARGE: u64 = 10097;
    /// Stream offline.
    pub const STREAM_OFFLINE: u64 = 10118;
    /// JetStream cluster not available.
    pub const CLUSTER_NOT_AVAILABLE: u64 = 10008;
}

/// A failure, reduced to what decides its [`BrokerError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A JetStream API error: its `err_code` and HTTP-like status.
    Api { code: u64, status: usize },
    /// No answer in time.
    TimedOut,
    /// Nobody answers on the subject (JetStream off, or no stream for a
    /// publish's subject).
    NoResponders,
    /// The connection is down or broke during the call; the client
    /// reconnects.
    Connection,
    /// The message is larger than the server's `max_payload`.
    TooLarge,
    /// The server refused the credentials or the operation
    /// (authorization / permissions violation).
    Denied,
    /// Anything else.
    Unknown,
}

/// The table.
pub(crate) fn classify(failure: Failure, what: String) -> BrokerError {
    use code::*;
    match failure {
        Failure::Api { code: STREAM_NOT_FOUND, .. } => BrokerError::UnknownTopic(what),
        Failure::Api { code: STORE_FAILED | INSUFFICIENT_RESOURCES | STORAGE_EXCEEDED | MEMORY_EXCEEDED, .. } => {
            BrokerError::Full(what)
        }
        Failure::Api { code: MESSAGE_TOO_LARGE | HEADER_TOO_LARGE, .. } => BrokerError::Refused(what),
        Failure::Api {
            code: STREAM_NAME_IN_USE | STREAM_SUBJECT_OVERLAP | STREAM_INVALID_CONFIG | MAX_STREAMS,
            ..
        } => BrokerError::Config { key: "nats.streams".into(), reason: what },
        Failure::Api {
            code: NOT_ENABLED | NOT_ENABLED_FOR_ACCOUNT | STREAM_OFFLINE | CLUSTER_NOT_AVAILABLE, ..
        } => BrokerError::Unavailable(what),
        Failure::Api { code: CONSUMER_NOT_FOUND, .. } => BrokerError::SessionFailed(what),
        Failure::Api { status: 401 | 403, .. } | Failure::Denied => BrokerError::Unauthorized(what),
        Failure::Api { status: 503, .. } => BrokerError::Unavailable(what),
        Failure::Api { status: 408, .. } | Failure::TimedOut => BrokerError::Timeout(what),
        Failure::NoResponders | Failure::Connection => BrokerError::Unavailable(what),
        Failure::TooLarge => BrokerError::Refused(what),
        Failure::Api { .. } | Failure::Unknown => BrokerError::Other(what),
    }
}

/// The JetStream API error an async-nats error wraps, if any.
fn api(e: &(dyn std::error::Error + 'static)) -> Option<Failure> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(js) = err.downcast_ref::<jetstream::Error>() {
            return Some(Failure::Api { code: js.error_code().0, status: js.code() });
        }
        source = err.source();
    }
    None
}

/// An error and its sources, as one text.
fn full_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// A client-level failure message that names a permissions or
/// authorization violation.
fn denied(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("permissions violation") || t.contains("authorization violation")
}

pub(crate) fn publish_failure(e: &jetstream::context::PublishError) -> Failure {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::TimedOut => Failure::TimedOut,
        K::BrokenPipe => Failure::Connection,
        K::MaxPayloadExceeded => Failure::TooLarge,
        K::StreamNotFound => Failure::NoResponders,
        // The client's own in-flight limit: clears as acks come back.
        K::MaxAckPending => Failure::Connection,
        _ => api(e).unwrap_or_else(|| {
            let text = full_text(e);
            if denied(&text) {
                Failure::Denied
            } else if text.contains("channel closed") {
                // The client's connection task is gone; the broker replaces it.
                Failure::Connection
            } else {
                Failure::Unknown
            }
        }),
    }
}

pub(crate) fn request_failure(e: &jetstream::context::RequestError) -> Failure {
    use jetstream::context::RequestErrorKind as K;
    match e.kind() {
        K::TimedOut => Failure::TimedOut,
        K::NoResponders => Failure::NoResponders,
        _ => api(e).unwrap_or(Failure::Connection),
    }
}

pub(crate) fn create_stream_failure(e: &jetstream::context::CreateStreamError) -> Failure {
    use jetstream::context::CreateStreamErrorKind as K;
    match e.kind() {
        K::TimedOut => Failure::TimedOut,
        K::JetStreamUnavailable => Failure::NoResponders,
        K::JetStream(api) => Failure::Api { code: api.error_code().0, status: api.code() },
        _ => api(e).unwrap_or(Failure::Unknown),
    }
}

pub(crate) fn consumer_failure(e: &jetstream::stream::ConsumerError) -> Failure {
    use jetstream::stream::ConsumerErrorKind as K;
    match e.kind() {
        K::TimedOut => Failure::TimedOut,
        K::Request => api(e).unwrap_or(Failure::Connection),
        K::JetStream(api) => Failure::Api { code: api.error_code().0, status: api.code() },
        _ => Failure::Unknown,
    }
}

pub(crate) fn consumer_info_failure(e: &jetstream::context::ConsumerInfoError) -> Failure {
    use jetstream::context::ConsumerInfoErrorKind as K;
    match e.kind() {
        K::TimedOut => Failure::TimedOut,
        K::NoResponders => Failure::NoResponders,
        K::Offline | K::Request => Failure::Connection,
        K::StreamNotFound => Failure::Api { code: code::STREAM_NOT_FOUND, status: 404 },
        K::JetStream(api) => Failure::Api { code: api.error_code().0, status: api.code() },
        _ => Failure::Unknown,
    }
}

pub(crate) fn get_stream_failure(e: &jetstream::context::GetStreamError) -> Failure {
    use jetstream::context::GetStreamErrorKind as K;
    match e.kind() {
        K::JetStream(api) => Failure::Api { code: api.error_code().0, status: api.code() },
        K::Request if e.to_string().contains("timed out") => Failure::TimedOut,
        K::Request => api(e).unwrap_or(Failure::Connection),
        _ => Failure::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::code::*;
    use super::*;
    use crate::broker::ErrorClass;

    fn row(f: Failure) -> BrokerError {
        classify(f, "x".into())
    }

    fn api(code: u64, status: usize) -> Failure {
        Failure::Api { code, status }
    }

    #[test]
    fn no_stream_is_an_unknown_topic() {
        assert_eq!(row(api(STREAM_NOT_FOUND, 404)), BrokerError::UnknownTopic("x".into()));
    }

    #[test]
    fn a_full_stream_with_discard_new_is_full_and_retriable() {
        for c in [STORE_FAILED, INSUFFICIENT_RESOURCES, STORAGE_EXCEEDED, MEMORY_EXCEEDED] {
            let e = row(api(c, 503));
            assert_eq!(e, BrokerError::Full("x".into()), "{c}");
            assert_eq!(e.class(), ErrorClass::Retriable);
        }
    }

    #[test]
    fn too_large_is_refused() {
        for f in [api(MESSAGE_TOO_LARGE, 400), api(HEADER_TOO_LARGE, 400), Failure::TooLarge] {
            assert_eq!(row(f), BrokerError::Refused("x".into()), "{f:?}");
        }
    }

    #[test]
    fn stream_configuration_conflicts_are_config_errors() {
        for c in [STREAM_NAME_IN_USE, STREAM_SUBJECT_OVERLAP, STREAM_INVALID_CONFIG, MAX_STREAMS] {
            assert!(matches!(row(api(c, 400)), BrokerError::Config { .. }), "{c}");
        }
    }

    #[test]
    fn jetstream_off_or_offline_is_unavailable() {
        for c in [NOT_ENABLED, NOT_ENABLED_FOR_ACCOUNT, STREAM_OFFLINE, CLUSTER_NOT_AVAILABLE] {
            assert_eq!(row(api(c, 503)), BrokerError::Unavailable("x".into()), "{c}");
        }
        assert_eq!(row(api(99_999, 503)), BrokerError::Unavailable("x".into()), "an unknown code with status 503");
    }

    #[test]
    fn a_deleted_durable_fails_the_session() {
        let e = row(api(CONSUMER_NOT_FOUND, 404));
        assert_eq!(e, BrokerError::SessionFailed("x".into()));
        assert_eq!(e.class(), ErrorClass::Fatal);
    }

    #[test]
    fn authorization_failures_are_unauthorized() {
        for f in [api(99_999, 401), api(99_999, 403), Failure::Denied] {
            assert_eq!(row(f), BrokerError::Unauthorized("x".into()), "{f:?}");
        }
        assert!(denied("nats: Permissions Violation for Publish to \"orders\""));
        assert!(denied("Authorization Violation"));
        assert!(!denied("timed out"));
    }

    #[test]
    fn timeouts_are_timeouts() {
        assert_eq!(row(Failure::TimedOut), BrokerError::Timeout("x".into()));
        assert_eq!(row(api(99_999, 408)), BrokerError::Timeout("x".into()));
    }

    #[test]
    fn a_lost_connection_or_no_responders_is_unavailable() {
        assert_eq!(row(Failure::Connection), BrokerError::Unavailable("x".into()));
        assert_eq!(row(Failure::NoResponders), BrokerError::Unavailable("x".into()));
    }

    #[test]
    fn only_unknown_codes_are_other() {
        assert_eq!(row(api(99_999, 400)), BrokerError::Other("x".into()));
        assert_eq!(row(Failure::Unknown), BrokerError::Other("x".into()));
    }
}
