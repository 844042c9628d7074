//! The event envelope: wire format, validation, limits and aggregate ID extraction.
//!
//! The JSON wire format is the one the Go seed library writes with
//! `encoding/json`, so Go and Rust services interoperate in both directions:
//!
//! ```json
//! {"aggregate_id":"order-1","event_type":"OrderCreated","event_version":1,
//!  "timestamp":"2024-01-02T15:04:05.123456789+08:00","trace_id":"t-1",
//!  "correlation_id":"c-1","payload":{"amount":12}}
//! ```
//!
//! (one line on the wire, no spaces). `trace_id` and `correlation_id` are
//! omitted when empty (Go's `omitempty`); `timestamp` is Go's `RFC3339Nano`
//! (trailing zeros of the fraction trimmed, `Z` for a zero offset); `payload`
//! is embedded JSON (Go's `json.RawMessage`), compacted like Go compacts it.
//!
//! Known, harmless differences from Go's bytes: Go escapes `<`, `>`, `&`,
//! U+2028 and U+2029 inside strings (`\u003c` …) and we write them as is; both
//! sides decode either form to the same value.
//!
//! Untrusted bytes go through [`Envelope::decode`], which checks the size and
//! nesting limits before parsing and validates the result.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer};
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

/// Longest event type, in characters.
pub const MAX_EVENT_TYPE_LEN: usize = 256;

/// Longest trace ID, in characters.
pub const MAX_TRACE_ID_LEN: usize = 256;

/// Longest correlation ID, in characters.
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

/// Why an envelope (or an aggregate ID) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The aggregate ID is empty or only whitespace.
    #[error("aggregate ID is empty")]
    EmptyAggregateId,
    /// The aggregate ID is longer than [`MAX_AGGREGATE_ID_LEN`] characters.
    #[error("aggregate ID is {len} characters long, the limit is {limit}")]
    AggregateIdTooLong { len: usize, limit: usize },
    /// The aggregate ID contains a character outside `A-Z a-z 0-9 : _ - . /`.
    #[error(
        "aggregate ID contains {ch:?} at position {position}; allowed are A-Z a-z 0-9 : _ - . /"
    )]
    InvalidAggregateIdChar { ch: char, position: usize },
    /// The event type is empty or only whitespace.
    #[error("event type is empty")]
    EmptyEventType,
    /// A text field (`event_type`, `trace_id`, `correlation_id`) is too long.
    #[error("{field} is {len} characters long, the limit is {limit}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    /// A text field that is copied into message headers contains a control
    /// character (CR/LF would break NATS header framing).
    #[error("{field} contains a control character")]
    ControlCharacter { field: &'static str },
    /// The event version is zero or negative.
    #[error("event version must be positive, got {0}")]
    NonPositiveVersion(i64),
    /// The payload is missing, empty or only whitespace.
    #[error("payload is empty")]
    EmptyPayload,
    /// The payload is JSON `null`.
    #[error("payload is JSON null")]
    NullPayload,
    /// The timestamp cannot be written as RFC 3339 the way Go writes it.
    #[error("invalid timestamp: {0}")]
    InvalidTimestamp(String),
    /// The encoded envelope exceeds [`MAX_ENVELOPE_BYTES`].
    #[error("envelope is {size} bytes, the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The JSON nests deeper than [`MAX_JSON_DEPTH`] levels.
    #[error("JSON nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    /// The bytes are not a JSON envelope; carries serde_json's message.
    #[error("invalid envelope JSON: {0}")]
    Decode(String),
    /// Serializing the envelope or its payload failed.
    #[error("cannot encode envelope: {0}")]
    Encode(String),
    /// The payload does not deserialize into the requested type.
    #[error("payload does not match the requested type: {0}")]
    Payload(String),
}

/// A domain event in the seed's envelope.
///
/// Equality compares the timestamp's instant *and* offset (they are written
/// differently on the wire), treats an empty `trace_id`/`correlation_id` like
/// `None` (both are omitted on the wire) and compares the payload by its raw
/// JSON text.
///
/// Deserializing with serde validates (like [`Envelope::decode`]) but does not
/// apply the size limit: use `decode` for untrusted bytes. Deserializing needs
/// serde_json's deserializer, because the payload is a [`RawValue`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "WireEnvelope")]
pub struct Envelope {
    /// Key for per-aggregate ordering; see [`validate_aggregate_id`].
    pub aggregate_id: String,
    /// Event name, e.g. `OrderCreated`; at most [`MAX_EVENT_TYPE_LEN`] characters.
    pub event_type: String,
    /// Schema version of the payload; positive.
    pub event_version: i64,
    /// When the event happened; written as Go's `RFC3339Nano`.
    #[serde(serialize_with = "serialize_timestamp")]
    pub timestamp: OffsetDateTime,
    /// Optional trace ID; omitted from the JSON when `None` or empty.
    #[serde(skip_serializing_if = "is_none_or_empty")]
    pub trace_id: Option<String>,
    /// Optional correlation ID; omitted from the JSON when `None` or empty.
    #[serde(skip_serializing_if = "is_none_or_empty")]
    pub correlation_id: Option<String>,
    /// The event body, embedded as JSON text (Go's `json.RawMessage`).
    ///
    /// Must not be JSON `null`: an event without data is almost certainly a
    /// producer bug (a nil pointer marshalled by Go), and rejecting it here
    /// beats failing later in a handler. Go's seed only rejects an empty one.
    pub payload: Box<RawValue>,
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
            && self.payload.get() == other.payload.get()
    }
}

impl Envelope {
    /// Builds and validates an envelope stamped with the current UTC time.
    pub fn new(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: i64,
        payload: &impl Serialize,
    ) -> Result<Envelope, EnvelopeError> {
        let payload = serde_json::value::to_raw_value(payload)
            .map_err(|e| EnvelopeError::Encode(e.to_string()))?;
        let envelope = Envelope {
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version,
            timestamp: OffsetDateTime::now_utc(),
            trace_id: None,
            correlation_id: None,
            payload,
        };
        envelope.validate()?;
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

    /// Deserializes the payload into `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, EnvelopeError> {
        serde_json::from_str(self.payload.get()).map_err(|e| EnvelopeError::Payload(e.to_string()))
    }

    /// Checks every field; see [`EnvelopeError`] for the rules.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
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
        validate_payload(&self.payload)
    }

    /// Validates and writes the envelope as compact JSON (Go's field order).
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        // Never put on the wire what a consumer would reject.
        self.validate()?;
        let bytes = serde_json::to_vec(self).map_err(|e| EnvelopeError::Encode(e.to_string()))?;
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Parses and validates untrusted bytes. Size ([`MAX_ENVELOPE_BYTES`]) and
    /// nesting ([`MAX_JSON_DEPTH`]) are checked before the JSON is parsed.
    ///
    /// Unknown fields are ignored (forward compatibility, like Go); a missing
    /// `aggregate_id`, `event_type`, `event_version` or `payload` is reported as
    /// the matching validation error; `null` or `""` trace/correlation IDs
    /// decode as `None`.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
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
        // serde's derived struct visitor would also accept a JSON array; Go does not.
        if bytes.iter().find(|b| !is_json_whitespace(**b)) == Some(&b'[') {
            return Err(EnvelopeError::Decode(
                "expected a JSON object, found an array".into(),
            ));
        }
        let wire: WireEnvelope =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Decode(e.to_string()))?;
        Envelope::try_from(wire)
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

/// Checks an aggregate ID: not empty or blank, at most [`MAX_AGGREGATE_ID_LEN`]
/// characters, only `A-Z a-z 0-9 : _ - . /`. IDs are used as is, never trimmed.
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
    pub id: String,
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

fn validate_payload(payload: &RawValue) -> Result<(), EnvelopeError> {
    let raw = payload
        .get()
        .trim_matches(|c: char| c.is_ascii() && is_json_whitespace(c as u8));
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

/// Parses RFC 3339; rejects the non-`T` separators the `time` crate tolerates.
fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, String> {
    if !matches!(s.as_bytes().get(10), Some(b'T' | b't')) {
        return Err(format!("{s:?} is not an RFC 3339 timestamp"));
    }
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 timestamp: {e}"))
}

fn serialize_timestamp<S: Serializer>(ts: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let text = format_go_rfc3339_nano(*ts).map_err(ser::Error::custom)?;
    s.serialize_str(&text)
}

fn is_none_or_empty(v: &Option<String>) -> bool {
    non_empty(v).is_none()
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// What the JSON holds before validation. Zero values for missing fields, like
/// Go, so a missing field surfaces as the matching typed validation error.
#[derive(Deserialize)]
#[serde(rename = "Envelope")]
struct WireEnvelope {
    #[serde(default)]
    aggregate_id: String,
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    event_version: i64,
    #[serde(deserialize_with = "deserialize_timestamp")]
    timestamp: OffsetDateTime,
    #[serde(default, deserialize_with = "deserialize_opt_text")]
    trace_id: Option<String>,
    #[serde(default, deserialize_with = "deserialize_opt_text")]
    correlation_id: Option<String>,
    #[serde(default, deserialize_with = "deserialize_payload")]
    payload: Option<Box<RawValue>>,
}

impl TryFrom<WireEnvelope> for Envelope {
    type Error = EnvelopeError;

    fn try_from(w: WireEnvelope) -> Result<Self, Self::Error> {
        let envelope = Envelope {
            aggregate_id: w.aggregate_id,
            event_type: w.event_type,
            event_version: w.event_version,
            timestamp: w.timestamp,
            trace_id: w.trace_id,
            correlation_id: w.correlation_id,
            payload: w.payload.ok_or(EnvelopeError::EmptyPayload)?,
        };
        envelope.validate()?;
        Ok(envelope)
    }
}

fn deserialize_timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
    let text = String::deserialize(d)?;
    parse_rfc3339(&text).map_err(de::Error::custom)
}

/// `null` and `""` both mean "absent", as with Go's `string` + `omitempty`.
fn deserialize_opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

/// Takes the payload's raw text (`null` included, unlike `Option`'s default)
/// and compacts it, as Go's `json.Marshal` compacts a `RawMessage`.
fn deserialize_payload<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    let raw = Box::<RawValue>::deserialize(d)?;
    match compact_json(raw.get()) {
        None => Ok(Some(raw)),
        Some(compact) => RawValue::from_string(compact)
            .map(Some)
            .map_err(de::Error::custom),
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
