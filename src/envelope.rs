//! The event envelope: wire format, payload encodings, the reading rules of
//! the seed's Go services, validation, limits and aggregate ID extraction.
//!
//! One envelope is one compact JSON object (see `docs/wire.md`):
//!
//! ```json
//! {"aggregate_id":"order-1","event_type":"OrderCreated","event_version":1,
//!  "timestamp":"2024-01-02T15:04:05.123456789+08:00","trace_id":"t-1",
//!  "correlation_id":"c-1","payload":{"amount":12}}
//! ```
//!
//! `trace_id` and `correlation_id` are omitted when empty (Go's `omitempty`);
//! `timestamp` is Go's `RFC3339Nano` (trailing zeros of the fraction trimmed,
//! `Z` for a zero offset).
//!
//! The payload is a byte string ([`Envelope::payload_bytes`]), written in one
//! of two forms ([`PayloadEncoding`]) — both are in the wild:
//!
//! - **embedded**: the payload JSON as is (`"payload":{"amount":12}`), what Go
//!   writes with `json.RawMessage` or jsoniter, compacted like Go compacts it;
//! - **base64**: a JSON string holding the standard, padded base64 of the
//!   bytes (`"payload":"eyJhbW91bnQiOjEyfQ=="`), what the seed itself writes:
//!   its `RawMessage` is a plain `[]byte` marshalled by `encoding/json`.
//!
//! Reading can also be **auto** (embedded JSON kept as is; a JSON string that
//! is valid padded standard base64 is decoded to its bytes), with one
//! ambiguity: a genuine JSON string payload that happens to be valid base64
//! (`"abcd"`) is read as bytes. Configure the explicit encoding to avoid it.
//!
//! Reading ([`Envelope::decode`], [`Envelope::decode_with`]) accepts what the
//! seed's Go decoder (`encoding/json` + `Validate`) accepts — field names in
//! any case, the last of duplicated keys, a missing or `null` timestamp as
//! `0001-01-01T00:00:00Z`, an aggregate ID with surrounding spaces (trimmed),
//! `event_type`/`trace_id`/`correlation_id` of any length — and rejects what
//! it rejects, each with a typed [`EnvelopeError`]; the size and depth limits
//! are checked before parsing. Writing ([`Envelope::encode_with`]) is strict:
//! it only produces what Go reads, and [`Envelope::validate`] adds our limits.
//!
//! Known, harmless differences from Go's bytes: Go escapes `<`, `>`, `&`,
//! U+2028 and U+2029 inside strings (`\u003c` …) and we write them as is; both
//! sides decode either form to the same value.

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{self, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Largest encoded envelope accepted by [`Envelope::decode`] and produced by
/// [`Envelope::encode`]: 1 MiB (Kafka's default `message.max.bytes` and NATS'
/// default `max_payload` are both about this size). Checked before parsing.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// Deepest JSON nesting accepted in an envelope document, the envelope object
/// itself counting as level 1. It leaves the payload 127 levels, exactly what
/// serde_json's default recursion limit (128) parses, so
/// [`Envelope::payload_as`] never fails on depth for an accepted envelope.
/// (serde_json skips over a `RawValue` without counting depth, so we count.)
pub const MAX_JSON_DEPTH: usize = 128;

/// Longest aggregate ID, in characters (all allowed characters are ASCII, so
/// also in bytes).
pub const MAX_AGGREGATE_ID_LEN: usize = 256;

/// Longest event type we write, in characters (reading has no limit, like Go).
pub const MAX_EVENT_TYPE_LEN: usize = 256;

/// Longest trace ID we write, in characters (reading has no limit, like Go).
pub const MAX_TRACE_ID_LEN: usize = 256;

/// Longest correlation ID we write, in characters (reading has no limit, like Go).
pub const MAX_CORRELATION_ID_LEN: usize = 256;

/// Aggregate ID extraction looks at only the first this-many headers of a
/// message; later headers are ignored, so a hostile message cannot make the
/// consumer scan without bound.
pub const MAX_HEADERS_SCANNED: usize = 1024;

/// Header carrying the aggregate ID (matched case-insensitively); set on publish.
pub const HEADER_AGGREGATE_ID: &str = "X-Aggregate-ID";
/// Alternative aggregate ID header, consulted after [`HEADER_AGGREGATE_ID`].
pub const HEADER_AGGREGATE_ID_ALT: &str = "Aggregate-ID";
/// Header carrying the event type; set on publish.
pub const HEADER_EVENT_TYPE: &str = "X-Event-Type";
/// Header carrying the event version as a decimal number; set on publish.
pub const HEADER_EVENT_VERSION: &str = "X-Event-Version";
/// Header carrying the trace ID, when there is one; set on publish.
pub const HEADER_TRACE_ID: &str = "X-Trace-ID";
/// Header carrying the correlation ID, when there is one; set on publish.
pub const HEADER_CORRELATION_ID: &str = "X-Correlation-ID";

/// How the `payload` field is written and read (`docs/wire.md`).
///
/// In configuration: `"embedded"`, `"base64"` or `"auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    /// The payload JSON embedded as is (Go's `json.RawMessage`, jsoniter).
    /// Writing needs payload bytes that are JSON; reading takes any JSON
    /// value but `null`.
    #[default]
    Embedded,
    /// A JSON string with the standard, padded base64 of the payload bytes
    /// (the seed: a `[]byte` marshalled by `encoding/json`). Reading also
    /// takes what Go's `[]byte` decoder takes: `\r`/`\n` inside the string
    /// are skipped, and a JSON array of byte values is those bytes.
    Base64,
    /// Reading only: a JSON string that is valid base64 is decoded (as
    /// [`PayloadEncoding::Base64`]), anything else is embedded JSON.
    /// Ambiguous for a genuine JSON string payload that is valid base64
    /// (`"abcd"`): it is read as bytes. Writing with `Auto` writes embedded
    /// (the form every Go version and every reader mode reads back as JSON).
    Auto,
}

impl fmt::Display for PayloadEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PayloadEncoding::Embedded => "embedded",
            PayloadEncoding::Base64 => "base64",
            PayloadEncoding::Auto => "auto",
        })
    }
}

/// Why an envelope (or an aggregate ID) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The aggregate ID is empty or only whitespace.
    #[error("aggregate ID is empty")]
    EmptyAggregateId,
    /// The aggregate ID is longer than [`MAX_AGGREGATE_ID_LEN`] characters.
    #[error("aggregate ID is {len} characters long, the limit is {limit}")]
    AggregateIdTooLong {
        /// Its length in characters.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The aggregate ID contains a character outside `A-Z a-z 0-9 : _ - . /`.
    #[error(
        "aggregate ID contains {ch:?} at position {position}; allowed are A-Z a-z 0-9 : _ - . /"
    )]
    InvalidAggregateIdChar {
        /// The character.
        ch: char,
        /// Its position, in characters from 0.
        position: usize,
    },
    /// The event type is empty or only whitespace.
    #[error("event type is empty")]
    EmptyEventType,
    /// A text field (`event_type`, `trace_id`, `correlation_id`) is too long
    /// to publish (reading has no length limit).
    #[error("{field} is {len} characters long, the limit is {limit}")]
    FieldTooLong {
        /// The field's name.
        field: &'static str,
        /// Its length in characters.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A text field that is copied into message headers contains a control
    /// character (CR/LF would break NATS header framing); checked on publish.
    #[error("{field} contains a control character")]
    ControlCharacter {
        /// The field's name.
        field: &'static str,
    },
    /// The event version is zero or negative.
    #[error("event version must be positive, got {0}")]
    NonPositiveVersion(i64),
    /// The payload is missing or has no bytes (`""` in base64, Go's
    /// "payload is required"), or embedded JSON that is only whitespace.
    #[error("payload is empty")]
    EmptyPayload,
    /// The payload is JSON `null`.
    #[error("payload is JSON null")]
    NullPayload,
    /// Base64 reading: the payload is a JSON string that is not standard,
    /// padded base64 (Go: `illegal base64 data`).
    #[error("payload is not valid base64: {0}")]
    InvalidBase64(String),
    /// The payload's JSON type does not fit the encoding: base64 reading
    /// found an object, number or boolean (Go: `cannot unmarshal object into
    /// Go struct field Envelope.payload`).
    #[error("payload is a JSON {found}, which the {encoding} encoding cannot hold")]
    PayloadForm {
        /// The encoding read with.
        encoding: PayloadEncoding,
        /// The JSON type found (`object`, `number`, ...).
        found: &'static str,
    },
    /// Embedded writing: the payload bytes are not JSON (read them with
    /// [`Envelope::payload_bytes`]; publish them base64).
    #[error("payload bytes are not JSON and cannot be embedded: {0}")]
    PayloadNotJson(String),
    /// The timestamp is not RFC 3339 as Go reads it, or cannot be written as
    /// Go writes it.
    #[error("invalid timestamp: {0}")]
    InvalidTimestamp(String),
    /// The encoded envelope exceeds [`MAX_ENVELOPE_BYTES`].
    #[error("envelope is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The JSON nests deeper than [`MAX_JSON_DEPTH`] levels.
    #[error("JSON nests deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// The bytes are not a JSON envelope; carries serde_json's message.
    #[error("invalid envelope JSON: {0}")]
    Decode(String),
    /// Serializing the envelope or its payload failed.
    #[error("cannot encode envelope: {0}")]
    Encode(String),
    /// The payload does not deserialize into the requested type (this
    /// includes payload bytes that are not JSON at all).
    #[error("payload does not match the requested type: {0}")]
    Payload(String),
}

/// Why an envelope's payload did not decode into the type a handler asked
/// for ([`Envelope::decode_payload`]). Retrying cannot fix it: a handler that
/// returns it (as `subscribe_typed` does for its decode, or through `?`) has
/// its event dead-lettered at once with `x-dlq-reason: payload`, without the
/// retries a failing handler gets (`docs/handlers.md`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload of {event_type} v{event_version} does not decode as {type_name}: {message}")]
pub struct PayloadError {
    /// The Rust type the payload was decoded into (`std::any::type_name`).
    pub type_name: &'static str,
    /// The envelope's event type.
    pub event_type: String,
    /// The envelope's event version.
    pub event_version: i64,
    /// Whether the bytes are not JSON, or JSON of another shape.
    pub kind: PayloadErrorKind,
    /// serde_json's message (with line and column).
    pub message: String,
}

/// What was wrong with a payload that did not decode ([`PayloadError::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PayloadErrorKind {
    /// The payload bytes are not (complete) JSON, e.g. a base64 payload of
    /// arbitrary bytes.
    NotJson,
    /// The payload is JSON, but not of the requested type's shape (a
    /// missing field, a string where a number belongs, ...).
    WrongShape,
}

/// A domain event in the seed's envelope.
///
/// Equality compares the timestamp's instant *and* offset (they are written
/// differently on the wire), treats an empty `trace_id`/`correlation_id` like
/// `None` (both are omitted on the wire) and compares the payload bytes.
///
/// Serialize writes the embedded form; Deserialize reads embedded (with the
/// Go reading rules) and validates the fields read, but does not apply the
/// size limit: use [`Envelope::decode`] for untrusted bytes. Both need
/// serde_json, because the payload is embedded as a [`RawValue`].
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Key for per-aggregate ordering; see [`validate_aggregate_id`]. Read
    /// trimmed of surrounding whitespace (Go checks it trimmed).
    pub aggregate_id: String,
    /// Event name, e.g. `OrderCreated`; written with at most [`MAX_EVENT_TYPE_LEN`] characters.
    pub event_type: String,
    /// Schema version of the payload; positive.
    pub event_version: i64,
    /// When the event happened; written as Go's `RFC3339Nano`. Go's zero
    /// time (`0001-01-01T00:00:00Z`) when the wire had none.
    pub timestamp: OffsetDateTime,
    /// Optional trace ID; omitted from the JSON when `None` or empty.
    pub trace_id: Option<String>,
    /// Optional correlation ID; omitted from the JSON when `None` or empty.
    pub correlation_id: Option<String>,
    /// The event body as bytes, whatever the wire form: the JSON text of an
    /// embedded payload (compacted), or the decoded bytes of a base64 one.
    ///
    /// Embedded, it must be JSON and not `null`: an event without data is
    /// almost certainly a producer bug (a nil pointer marshalled by Go).
    pub payload: Vec<u8>,
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.aggregate_id == other.aggregate_id
            && self.event_type == other.event_type
            && self.event_version == other.event_version
            && self.timestamp == other.timestamp
            && self.timestamp.offset() == other.timestamp.offset()
            && non_empty(&self.trace_id) == non_empty(&other.trace_id)
            && non_empty(&self.correlation_id) == non_empty(&other.correlation_id)
            && self.payload == other.payload
    }
}

/// Go's zero `time.Time`, `0001-01-01T00:00:00Z`: the timestamp of an
/// envelope read without one (missing or `null`).
pub const GO_ZERO_TIME: OffsetDateTime = match time::Date::from_calendar_date(1, time::Month::January, 1) {
    Ok(date) => date.midnight().assume_utc(),
    Err(_) => panic!("0001-01-01 is a valid date"),
};

/// The engine Go's `base64.StdEncoding` is: standard alphabet, padding
/// required, non-zero trailing bits tolerated.
const GO_STD_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical)
        .with_decode_allow_trailing_bits(true),
);

impl Envelope {
    /// Builds and validates an envelope with a JSON payload, stamped with
    /// the current UTC time.
    pub fn new(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: i64,
        payload: &impl Serialize,
    ) -> Result<Envelope, EnvelopeError> {
        let payload =
            serde_json::to_vec(payload).map_err(|e| EnvelopeError::Encode(e.to_string()))?;
        let envelope =
            Envelope::with_payload_bytes(aggregate_id, event_type, event_version, payload)?;
        envelope.validate()?;
        Ok(envelope)
    }

    /// Builds an envelope with raw payload bytes, stamped with the current
    /// UTC time, and validates it for base64 (publish bytes that are not
    /// JSON with [`PayloadEncoding::Base64`]; embedded encoding refuses them).
    pub fn with_payload_bytes(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: i64,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Envelope, EnvelopeError> {
        let envelope = Envelope {
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version,
            timestamp: OffsetDateTime::now_utc(),
            trace_id: None,
            correlation_id: None,
            payload: payload.into(),
        };
        envelope.validate_for(PayloadEncoding::Base64)?;
        Ok(envelope)
    }

    /// Sets the trace ID; an empty one means none. Checked by `validate`/`encode`.
    #[must_use]
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = Some(trace_id.into()).filter(|s| !s.is_empty());
        self
    }

    /// Sets the correlation ID; an empty one means none. Checked by `validate`/`encode`.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into()).filter(|s| !s.is_empty());
        self
    }

    /// Sets the timestamp (its offset is kept on the wire). Checked by `validate`/`encode`.
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: OffsetDateTime) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// The payload bytes, whatever the wire form (embedded JSON text, or the
    /// decoded base64 bytes).
    pub fn payload_bytes(&self) -> &[u8] {
        &self.payload
    }

    /// Deserializes the payload bytes as JSON into `T`. Payload bytes that
    /// are not JSON (a base64 payload of arbitrary bytes) fail with
    /// [`EnvelopeError::Payload`], as does JSON of another shape.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, EnvelopeError> {
        serde_json::from_slice(&self.payload).map_err(|e| EnvelopeError::Payload(e.to_string()))
    }

    /// Deserializes the payload bytes as JSON into `T`, with a typed error
    /// naming the type, the event and what was wrong. A handler that returns
    /// this error (e.g. with `?`) has its event dead-lettered once, with
    /// `x-dlq-reason: payload` and no retries.
    pub fn decode_payload<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        serde_json::from_slice(&self.payload).map_err(|e| PayloadError {
            type_name: std::any::type_name::<T>(),
            event_type: self.event_type.clone(),
            event_version: self.event_version,
            kind: match e.classify() {
                serde_json::error::Category::Data => PayloadErrorKind::WrongShape,
                _ => PayloadErrorKind::NotJson,
            },
            message: e.to_string(),
        })
    }

    /// Checks every field for publishing embedded (the default encoding):
    /// `validate_for(PayloadEncoding::Embedded)`.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        self.validate_for(PayloadEncoding::Embedded)
    }

    /// Checks every field for publishing in `encoding`: the reading rules
    /// plus our limits (text lengths, no control characters in text copied
    /// to headers, a timestamp Go can write); embedded (and `Auto`, which
    /// writes embedded) also needs payload bytes that are JSON, not `null`,
    /// within the depth limit. Base64 takes any non-empty bytes.
    pub fn validate_for(&self, encoding: PayloadEncoding) -> Result<(), EnvelopeError> {
        validate_aggregate_id(&self.aggregate_id)?;
        if self.event_type.trim().is_empty() {
            return Err(EnvelopeError::EmptyEventType);
        }
        validate_text("event_type", &self.event_type, MAX_EVENT_TYPE_LEN)?;
        if self.event_version <= 0 {
            return Err(EnvelopeError::NonPositiveVersion(self.event_version));
        }
        check_timestamp(self.timestamp)?;
        if let Some(id) = &self.trace_id {
            validate_text("trace_id", id, MAX_TRACE_ID_LEN)?;
        }
        if let Some(id) = &self.correlation_id {
            validate_text("correlation_id", id, MAX_CORRELATION_ID_LEN)?;
        }
        if self.payload.is_empty() {
            return Err(EnvelopeError::EmptyPayload);
        }
        if encoding != PayloadEncoding::Base64 {
            embeddable(&self.payload)?;
        }
        Ok(())
    }

    /// Validates and writes the envelope as compact JSON (Go's field order)
    /// with an embedded payload: `encode_with(PayloadEncoding::Embedded)`.
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        self.encode_with(PayloadEncoding::Embedded)
    }

    /// Validates and writes the envelope as compact JSON (Go's field order)
    /// with the payload in `encoding` (`Auto` writes embedded). Never puts on
    /// the wire what a consumer in that encoding, or Go, would reject.
    pub fn encode_with(&self, encoding: PayloadEncoding) -> Result<Vec<u8>, EnvelopeError> {
        self.validate_for(encoding)?;
        let encoded;
        let payload = match encoding {
            PayloadEncoding::Embedded | PayloadEncoding::Auto => {
                WirePayload::Embedded(embeddable(&self.payload)?)
            }
            PayloadEncoding::Base64 => {
                encoded = GO_STD_BASE64.encode(&self.payload);
                WirePayload::Base64(&encoded)
            }
        };
        let bytes = serde_json::to_vec(&self.wire_out(payload))
            .map_err(|e| EnvelopeError::Encode(e.to_string()))?;
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        Ok(bytes)
    }

    fn wire_out<'a>(&'a self, payload: WirePayload<'a>) -> WireOut<'a> {
        WireOut {
            aggregate_id: &self.aggregate_id,
            event_type: &self.event_type,
            event_version: self.event_version,
            timestamp: self.timestamp,
            trace_id: non_empty(&self.trace_id),
            correlation_id: non_empty(&self.correlation_id),
            payload,
        }
    }

    /// Parses and validates untrusted bytes with an embedded payload:
    /// `decode_with(bytes, PayloadEncoding::Embedded)`.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        Envelope::decode_with(bytes, PayloadEncoding::Embedded)
    }

    /// Parses untrusted bytes with Go's reading rules (`docs/wire.md`) and
    /// the payload in `encoding`, and validates them like the seed's Go
    /// `Validate`. Size ([`MAX_ENVELOPE_BYTES`]) and nesting
    /// ([`MAX_JSON_DEPTH`]) are checked before the JSON is parsed.
    ///
    /// Unknown fields are ignored (forward compatibility, like Go); a missing
    /// `aggregate_id`, `event_type`, `event_version` or `payload` is reported
    /// as the matching validation error; `null` or `""` trace/correlation IDs
    /// decode as `None`.
    pub fn decode_with(bytes: &[u8], encoding: PayloadEncoding) -> Result<Envelope, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        if json_depth_exceeds(bytes, MAX_JSON_DEPTH) {
            return Err(EnvelopeError::TooDeep {
                limit: MAX_JSON_DEPTH,
            });
        }
        let wire: WireEnvelope =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Decode(e.to_string()))?;
        wire.into_envelope(encoding)
    }

    /// Headers to set when publishing, so consumers (and tools that never read
    /// the payload) can route and filter: aggregate ID, event type, version,
    /// and trace/correlation IDs when present.
    pub fn to_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut headers = vec![
            (
                HEADER_AGGREGATE_ID.to_owned(),
                self.aggregate_id.clone().into_bytes(),
            ),
            (
                HEADER_EVENT_TYPE.to_owned(),
                self.event_type.clone().into_bytes(),
            ),
            (
                HEADER_EVENT_VERSION.to_owned(),
                self.event_version.to_string().into_bytes(),
            ),
        ];
        if let Some(id) = non_empty(&self.trace_id) {
            headers.push((HEADER_TRACE_ID.to_owned(), id.as_bytes().to_vec()));
        }
        if let Some(id) = non_empty(&self.correlation_id) {
            headers.push((HEADER_CORRELATION_ID.to_owned(), id.as_bytes().to_vec()));
        }
        headers
    }
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let payload = embeddable(&self.payload).map_err(ser::Error::custom)?;
        self.wire_out(WirePayload::Embedded(payload)).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WireEnvelope::deserialize(d)?
            .into_envelope(PayloadEncoding::Embedded)
            .map_err(de::Error::custom)
    }
}

/// The payload bytes as embeddable JSON text: compact, valid, not `null`,
/// within the depth limit.
fn embeddable(payload: &[u8]) -> Result<Box<RawValue>, EnvelopeError> {
    if payload.iter().all(|b| is_json_whitespace(*b)) {
        return Err(EnvelopeError::EmptyPayload);
    }
    let text =
        std::str::from_utf8(payload).map_err(|e| EnvelopeError::PayloadNotJson(e.to_string()))?;
    let raw: Box<RawValue> =
        serde_json::from_str(text).map_err(|e| EnvelopeError::PayloadNotJson(e.to_string()))?;
    let raw = compact_raw(raw).map_err(|e| EnvelopeError::PayloadNotJson(e.to_string()))?;
    check_embedded(raw.get())?;
    Ok(raw)
}

/// The embedded form's rules, on compact JSON text.
fn check_embedded(raw: &str) -> Result<(), EnvelopeError> {
    if raw.is_empty() {
        return Err(EnvelopeError::EmptyPayload);
    }
    if raw == "null" {
        return Err(EnvelopeError::NullPayload);
    }
    // The envelope object is one level, so the payload gets one less.
    if json_depth_exceeds(raw.as_bytes(), MAX_JSON_DEPTH - 1) {
        return Err(EnvelopeError::TooDeep {
            limit: MAX_JSON_DEPTH,
        });
    }
    Ok(())
}

/// Checks an aggregate ID: not empty or blank, at most [`MAX_AGGREGATE_ID_LEN`]
/// characters, only `A-Z a-z 0-9 : _ - . /`. The ID is checked as is; reading
/// trims it first (Go's rule), extraction never trims.
pub fn validate_aggregate_id(id: &str) -> Result<(), EnvelopeError> {
    if id.trim().is_empty() {
        return Err(EnvelopeError::EmptyAggregateId);
    }
    let len = id.chars().count();
    if len > MAX_AGGREGATE_ID_LEN {
        return Err(EnvelopeError::AggregateIdTooLong {
            len,
            limit: MAX_AGGREGATE_ID_LEN,
        });
    }
    match id.chars().enumerate().find(|(_, c)| !is_id_char(*c)) {
        Some((position, ch)) => Err(EnvelopeError::InvalidAggregateIdChar { ch, position }),
        None => Ok(()),
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-' | '.' | '/')
}

/// Where an aggregate ID was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdSource {
    /// The `aggregate_id` of a valid envelope in the payload.
    Envelope,
    /// The [`HEADER_AGGREGATE_ID`] or [`HEADER_AGGREGATE_ID_ALT`] header.
    Header,
    /// The message key (Kafka).
    Key,
    /// A token of the subject (NATS).
    Subject,
}

impl fmt::Display for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdSource::Envelope => "envelope",
            IdSource::Header => "header",
            IdSource::Key => "key",
            IdSource::Subject => "subject",
        })
    }
}

/// An aggregate ID that passed [`validate_aggregate_id`], and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExtractedId {
    /// The aggregate ID.
    pub id: String,
    /// Where it was found.
    pub source: IdSource,
}

/// Finds a message's aggregate ID in the seed's priority order:
///
/// 1. a valid envelope in `payload` (it decodes and validates);
/// 2. the first valid `X-Aggregate-ID` header, then the first valid
///    `Aggregate-ID` header (names case-insensitive, values UTF-8), among the
///    first [`MAX_HEADERS_SCANNED`] headers;
/// 3. the message key, if it is UTF-8;
/// 4. when `subject` is given (NATS), the last `.`-separated token that is a
///    valid ID (so an ID containing `.` cannot come from a subject).
///
/// Every candidate must pass [`validate_aggregate_id`]; invalid ones are
/// skipped. Returns `None` when nothing qualifies. Never panics.
pub fn extract_aggregate_id(
    payload: &[u8],
    headers: &[(String, Vec<u8>)],
    key: Option<&[u8]>,
    subject: Option<&str>,
) -> Option<ExtractedId> {
    let envelope = Envelope::decode(payload).ok();
    aggregate_id_from(envelope.as_ref(), headers, key, subject)
}

/// [`extract_aggregate_id`] for a consumer that already decoded the payload
/// (pass the result of [`Envelope::decode`], or `None` if it failed), so it is
/// not parsed twice. Only the envelope's `aggregate_id` is re-checked here.
pub fn aggregate_id_from(
    envelope: Option<&Envelope>,
    headers: &[(String, Vec<u8>)],
    key: Option<&[u8]>,
    subject: Option<&str>,
) -> Option<ExtractedId> {
    let found = |source| move |id: String| ExtractedId { id, source };
    envelope
        .and_then(|e| candidate(e.aggregate_id.as_bytes()))
        .map(found(IdSource::Envelope))
        .or_else(|| header_id(headers).map(found(IdSource::Header)))
        .or_else(|| key.and_then(candidate).map(found(IdSource::Key)))
        .or_else(|| {
            subject
                .and_then(|s| s.rsplit('.').find_map(|t| candidate(t.as_bytes())))
                .map(found(IdSource::Subject))
        })
}

fn header_id(headers: &[(String, Vec<u8>)]) -> Option<String> {
    let scanned = &headers[..headers.len().min(MAX_HEADERS_SCANNED)];
    [HEADER_AGGREGATE_ID, HEADER_AGGREGATE_ID_ALT]
        .iter()
        .find_map(|name| {
            scanned
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .find_map(|(_, v)| candidate(v))
        })
}

/// A valid aggregate ID from raw bytes, or `None`.
fn candidate(bytes: &[u8]) -> Option<String> {
    // Valid IDs are ASCII, so anything longer is rejected without scanning it.
    if bytes.len() > MAX_AGGREGATE_ID_LEN {
        return None;
    }
    let id = std::str::from_utf8(bytes).ok()?;
    validate_aggregate_id(id).ok()?;
    Some(id.to_owned())
}

fn validate_text(field: &'static str, value: &str, limit: usize) -> Result<(), EnvelopeError> {
    let len = value.chars().count();
    if len > limit {
        return Err(EnvelopeError::FieldTooLong { field, len, limit });
    }
    if value.chars().any(char::is_control) {
        return Err(EnvelopeError::ControlCharacter { field });
    }
    Ok(())
}

/// Go can only write years 0..=9999 and offsets of whole minutes under 24 h.
fn check_timestamp(ts: OffsetDateTime) -> Result<(), EnvelopeError> {
    let (h, _, s) = ts.offset().as_hms();
    if !(0..=9999).contains(&ts.year()) {
        return Err(EnvelopeError::InvalidTimestamp(format!(
            "year {} is outside 0..=9999",
            ts.year()
        )));
    }
    if s != 0 || h.unsigned_abs() > 23 {
        return Err(EnvelopeError::InvalidTimestamp(format!(
            "offset {} is not whole minutes within ±23:59",
            ts.offset()
        )));
    }
    Ok(())
}

/// Formats like Go's `time.RFC3339Nano` (what `time.Time` marshals to).
fn format_go_rfc3339_nano(ts: OffsetDateTime) -> Result<String, EnvelopeError> {
    use std::fmt::Write as _;
    check_timestamp(ts)?;
    let mut out = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        ts.year(),
        u8::from(ts.month()),
        ts.day(),
        ts.hour(),
        ts.minute(),
        ts.second()
    );
    let nanos = ts.nanosecond();
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    let offset = ts.offset();
    if offset.is_utc() {
        out.push('Z');
    } else {
        let (h, m, _) = offset.as_hms();
        let sign = if offset.is_negative() { '-' } else { '+' };
        // Writing to a String cannot fail.
        let _ = write!(out, "{sign}{:02}:{:02}", h.unsigned_abs(), m.unsigned_abs());
    }
    Ok(out)
}

/// Parses RFC 3339 as Go's `time.Time` does (Go 1.20 and later, strict):
/// only an upper-case `T` separator and `Z` (the `time` crate also takes
/// `t`, `z` and a space), no leap second.
fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, String> {
    if s.as_bytes().get(10) != Some(&b'T') || s.contains('z') {
        return Err(format!("{s:?} is not an RFC 3339 timestamp"));
    }
    // The `time` crate reads a leap second (`23:59:60`); Go rejects second 60.
    if s.get(17..19) == Some("60") {
        return Err(format!(
            "{s:?} is not an RFC 3339 timestamp: second out of range"
        ));
    }
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 timestamp: {e}"))
}

fn serialize_timestamp<S: Serializer>(ts: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let text = format_go_rfc3339_nano(*ts).map_err(ser::Error::custom)?;
    s.serialize_str(&text)
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// What we write, in Go's field order.
#[derive(Serialize)]
struct WireOut<'a> {
    aggregate_id: &'a str,
    event_type: &'a str,
    event_version: i64,
    #[serde(serialize_with = "serialize_timestamp")]
    timestamp: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    payload: WirePayload<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WirePayload<'a> {
    Embedded(Box<RawValue>),
    Base64(&'a str),
}

/// What the JSON holds before validation, read like Go's `encoding/json`
/// reads the seed's struct: field names matched case-insensitively (Go's
/// folding, so `ſ` and the Kelvin sign match `s` and `k`), the last of
/// duplicated keys wins, `null` leaves a field as it was (Go's rule for
/// strings, numbers and `time.Time`), unknown fields are skipped. Zero values
/// for missing fields, like Go, so a missing field surfaces as the matching
/// typed validation error. The payload is kept as raw text (`null`
/// included) and interpreted by [`WireEnvelope::into_envelope`].
#[derive(Default)]
struct WireEnvelope {
    aggregate_id: String,
    event_type: String,
    event_version: i64,
    timestamp: Option<OffsetDateTime>,
    trace_id: String,
    correlation_id: String,
    payload: Option<Box<RawValue>>,
}

#[derive(Clone, Copy)]
enum Field {
    AggregateId,
    EventType,
    EventVersion,
    Timestamp,
    TraceId,
    CorrelationId,
    Payload,
}

const FIELDS: [(&str, Field); 7] = [
    ("aggregate_id", Field::AggregateId),
    ("event_type", Field::EventType),
    ("event_version", Field::EventVersion),
    ("timestamp", Field::Timestamp),
    ("trace_id", Field::TraceId),
    ("correlation_id", Field::CorrelationId),
    ("payload", Field::Payload),
];

/// Go's `encoding/json` key match for an ASCII field name (`equalFoldRight`
/// of Go 1.19, the same result as `bytes.EqualFold` for these names): ASCII
/// letters in any case, plus U+017F (ſ) for `s` and U+212A (Kelvin) for `k`.
fn go_key_matches(name: &str, key: &str) -> bool {
    let mut key = key.chars();
    for n in name.chars() {
        let Some(k) = key.next() else { return false };
        let same = k.eq_ignore_ascii_case(&n)
            || (n == 's' && k == '\u{17F}')
            || (n == 'k' && k == '\u{212A}');
        if !same {
            return false;
        }
    }
    key.next().is_none()
}

fn field_of(key: &str) -> Option<Field> {
    FIELDS
        .iter()
        .find(|(name, _)| go_key_matches(name, key))
        .map(|(_, f)| *f)
}

impl<'de> Deserialize<'de> for WireEnvelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(WireVisitor)
    }
}

struct WireVisitor;

impl<'de> Visitor<'de> for WireVisitor {
    type Value = WireEnvelope;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an envelope JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireEnvelope, A::Error> {
        let mut w = WireEnvelope::default();
        while let Some(key) = map.next_key::<String>()? {
            let Some(field) = field_of(&key) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            // `null` is a no-op for Go's string, int64 and time.Time fields.
            match field {
                Field::AggregateId => set(&mut w.aggregate_id, map.next_value()?),
                Field::EventType => set(&mut w.event_type, map.next_value()?),
                Field::EventVersion => set(&mut w.event_version, map.next_value()?),
                Field::TraceId => set(&mut w.trace_id, map.next_value()?),
                Field::CorrelationId => set(&mut w.correlation_id, map.next_value()?),
                Field::Timestamp => {
                    if let Some(text) = map.next_value::<Option<String>>()? {
                        w.timestamp = Some(parse_rfc3339(&text).map_err(de::Error::custom)?);
                    }
                }
                Field::Payload => w.payload = Some(map.next_value()?),
            }
        }
        Ok(w)
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

impl WireEnvelope {
    /// Applies the seed's `Validate` (aggregate ID checked trimmed, event
    /// type not blank, version positive, payload not empty) and reads the
    /// payload in `encoding`.
    fn into_envelope(self, encoding: PayloadEncoding) -> Result<Envelope, EnvelopeError> {
        let aggregate_id = self.aggregate_id.trim();
        validate_aggregate_id(aggregate_id)?;
        if self.event_type.trim().is_empty() {
            return Err(EnvelopeError::EmptyEventType);
        }
        if self.event_version <= 0 {
            return Err(EnvelopeError::NonPositiveVersion(self.event_version));
        }
        let raw = self.payload.ok_or(EnvelopeError::EmptyPayload)?;
        let payload = read_payload(raw, encoding)?;
        Ok(Envelope {
            aggregate_id: aggregate_id.to_owned(),
            event_type: self.event_type,
            event_version: self.event_version,
            timestamp: self.timestamp.unwrap_or(GO_ZERO_TIME),
            trace_id: Some(self.trace_id).filter(|s| !s.is_empty()),
            correlation_id: Some(self.correlation_id).filter(|s| !s.is_empty()),
            payload,
        })
    }
}

/// The JSON type of raw, valid JSON text, by its first byte.
fn json_kind(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}

/// The payload bytes of the payload's raw JSON text, read in `encoding`.
fn read_payload(raw: Box<RawValue>, encoding: PayloadEncoding) -> Result<Vec<u8>, EnvelopeError> {
    let kind = json_kind(raw.get());
    match (encoding, kind) {
        (PayloadEncoding::Base64, "null") => Err(EnvelopeError::EmptyPayload),
        (PayloadEncoding::Base64 | PayloadEncoding::Auto, "string") => {
            let text: String = serde_json::from_str(raw.get())
                .map_err(|e| EnvelopeError::Decode(e.to_string()))?;
            match (go_base64_decode(&text), encoding) {
                (Ok(bytes), _) if bytes.is_empty() => Err(EnvelopeError::EmptyPayload),
                (Ok(bytes), _) => Ok(bytes),
                (Err(e), PayloadEncoding::Base64) => Err(EnvelopeError::InvalidBase64(e)),
                (Err(_), _) => embedded_bytes(raw),
            }
        }
        (PayloadEncoding::Base64, "array") => {
            // Go's []byte decoder takes a JSON array of byte values too.
            let bytes: Vec<u8> =
                serde_json::from_str(raw.get()).map_err(|_| EnvelopeError::PayloadForm {
                    encoding,
                    found: "array",
                })?;
            if bytes.is_empty() {
                return Err(EnvelopeError::EmptyPayload);
            }
            Ok(bytes)
        }
        (PayloadEncoding::Base64, found) => Err(EnvelopeError::PayloadForm { encoding, found }),
        _ => embedded_bytes(raw),
    }
}

fn embedded_bytes(raw: Box<RawValue>) -> Result<Vec<u8>, EnvelopeError> {
    let raw = compact_raw(raw).map_err(|e| EnvelopeError::Decode(e.to_string()))?;
    check_embedded(raw.get())?;
    Ok(raw.get().as_bytes().to_vec())
}

/// Go's `base64.StdEncoding.DecodeString`: `\r` and `\n` are skipped,
/// padding is required, non-zero trailing bits are tolerated.
fn go_base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let decoded = if text.contains(['\r', '\n']) {
        GO_STD_BASE64.decode(text.replace(['\r', '\n'], ""))
    } else {
        GO_STD_BASE64.decode(text)
    };
    decoded.map_err(|e| e.to_string())
}

/// Compacts raw JSON text, as Go's `json.Marshal` compacts a `RawMessage`.
fn compact_raw(raw: Box<RawValue>) -> Result<Box<RawValue>, serde_json::Error> {
    match compact_json(raw.get()) {
        None => Ok(raw),
        Some(compact) => RawValue::from_string(compact),
    }
}

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Removes insignificant whitespace from valid JSON text; `None` if there is none.
fn compact_json(json: &str) -> Option<String> {
    let bytes = json.as_bytes();
    let mut in_string = false;
    let mut escaped = false;
    let mut out: Option<Vec<u8>> = None;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_json_whitespace(b) {
            // First whitespace: copy what came before it, then skip whitespace from here on.
            out.get_or_insert_with(|| bytes[..i].to_vec());
            continue;
        }
        if let Some(out) = out.as_mut() {
            out.push(b);
        }
    }
    // Only ASCII whitespace was removed, so the text is still UTF-8.
    out.and_then(|v| String::from_utf8(v).ok())
}

/// Whether `bytes` nests arrays/objects deeper than `limit`, counting only
/// brackets outside strings. Exact for valid JSON; for garbage it just yields
/// some answer, and the parser reports the garbage. One pass, no recursion.
fn json_depth_exceeds(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{datetime, offset};

    #[test]
    fn go_timestamp_format_trims_fraction_and_writes_z() {
        let cases = [
            (datetime!(2024-01-02 15:04:05 UTC), "2024-01-02T15:04:05Z"),
            (
                datetime!(2024-01-02 15:04:05.1 UTC),
                "2024-01-02T15:04:05.1Z",
            ),
            (
                datetime!(2024-01-02 15:04:05.000000001 UTC),
                "2024-01-02T15:04:05.000000001Z",
            ),
            (
                datetime!(2024-01-02 15:04:05.12345 +08:00),
                "2024-01-02T15:04:05.12345+08:00",
            ),
            (
                datetime!(2024-01-02 15:04:05 -03:30),
                "2024-01-02T15:04:05-03:30",
            ),
            (datetime!(0000-01-01 00:00:00 UTC), "0000-01-01T00:00:00Z"),
        ];
        for (ts, want) in cases {
            assert_eq!(format_go_rfc3339_nano(ts).unwrap(), want);
            let back = parse_rfc3339(want).unwrap();
            assert_eq!((back, back.offset()), (ts, ts.offset()));
        }
    }

    #[test]
    fn unrepresentable_timestamps_are_rejected() {
        let ts = datetime!(2024-01-02 15:04:05 UTC);
        assert!(
            format_go_rfc3339_nano(ts.to_offset(time::UtcOffset::from_hms(1, 2, 3).unwrap()))
                .is_err()
        );
        assert!(format_go_rfc3339_nano(datetime!(-0001-12-31 23:00:00 UTC)).is_err());
        assert!(format_go_rfc3339_nano(ts.to_offset(offset!(+23:59))).is_ok());
        assert!(parse_rfc3339("2024-01-02 15:04:05Z").is_err());
        assert!(parse_rfc3339("2024-01-02X15:04:05Z").is_err());
        assert!(parse_rfc3339("").is_err());
    }

    #[test]
    fn compact_keeps_strings_and_drops_whitespace() {
        assert_eq!(compact_json("{\"a\":1}"), None);
        assert_eq!(
            compact_json("{ \"a b\" : [1, \"x \\\" y\"],\n\t\"c\":null }").as_deref(),
            Some("{\"a b\":[1,\"x \\\" y\"],\"c\":null}")
        );
    }

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert!(!json_depth_exceeds(b"1", 0));
        assert!(json_depth_exceeds(b"[]", 0));
        assert!(!json_depth_exceeds(b"[[]]", 2));
        assert!(json_depth_exceeds(b"[[[]]]", 2));
        assert!(!json_depth_exceeds(br#"["[[[[\"[[["]"#, 1));
        assert!(!json_depth_exceeds(br#"[{},{},[]]"#, 2));
    }

    #[test]
    fn serde_json_parses_exactly_the_depth_we_allow() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_JSON_DEPTH - 1)).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_JSON_DEPTH)).is_err());
    }
}
