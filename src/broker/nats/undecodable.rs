//! Stored messages async-nats cannot parse, found and read around its
//! parser.
//!
//! async-nats parses every `HMSG` at the connection level. A header block
//! that is not UTF-8, or has a line without `:`, or a header name with a
//! character outside `!`..`~`, makes it drop the connection (the next pull
//! gets the same message, so it reconnects forever); a CR inside a header
//! value panics its connection task (the client is dead). Other clients
//! (nats.go writes header values as raw bytes) store such messages without
//! complaint.
//!
//! [`refusal`] replays async-nats 0.51's header parser on the bytes without
//! panicking and says why it would refuse them; it is deterministic, so a
//! message it refuses is refused by the client every time, and a message it
//! accepts is never treated as poison. [`get_stored`] reads a message with
//! JetStream's message-get API (`$JS.API.STREAM.MSG.GET.<stream>`), whose
//! reply is JSON with the headers base64-encoded: a reply the client parses.

use std::str::FromStr;

use async_nats::jetstream;
use async_nats::{HeaderName, HeaderValue, StatusCode};
use base64::Engine;

use crate::broker::BrokerError;

/// JetStream's "no message found" error code of the message-get API.
const NO_MESSAGE_FOUND: u64 = 10037;

/// Why async-nats would refuse the header block `header` of an `HMSG`
/// (`NATS/1.0[ status]\r\nname: value\r\n...\r\n\r\n`), or `None` when it
/// parses it. Mirrors `Connection::try_read_op` of async-nats 0.51; the
/// unit tests pin each rule.
pub(crate) fn refusal(header: &[u8]) -> Option<String> {
    let Ok(text) = std::str::from_utf8(header) else {
        let at = std::str::from_utf8(header).err().map(|e| e.valid_up_to()).unwrap_or(0);
        return Some(format!("header block is not UTF-8 (invalid byte at {at})"));
    };
    let mut lines = text.lines().peekable();
    let Some(version) = lines.next() else { return Some("no header version line".into()) };
    let Some(suffix) = version.strip_prefix("NATS/1.0").map(str::trim) else {
        return Some("header version line does not begin with NATS/1.0".into());
    };
    let status = suffix.split_once(' ').map(|(s, _)| s.trim()).unwrap_or(suffix);
    if !status.is_empty() && StatusCode::from_str(status).is_err() {
        return Some(format!("status {status:?} is not a status code"));
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Some(format!("header line {line:?} has no ':'"));
        };
        if HeaderName::from_str(name).is_err() {
            return Some(format!("header name {name:?} is not printable ASCII without ':'"));
        }
        let mut value = value.trim_start().to_owned();
        while let Some(v) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(v);
        }
        value.truncate(value.trim_end().len());
        // async-nats asserts this (a panic of its connection task).
        if HeaderValue::from_str(&value).is_err() {
            return Some(format!("header {name:?} has a CR or LF inside its value"));
        }
    }
    None
}

/// A message as stored in a stream, read with the message-get API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredMessage {
    pub seq: u64,
    pub subject: String,
    /// The header block as stored (empty without headers).
    pub header: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(serde::Deserialize)]
struct GetReply {
    message: Option<RawStored>,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct RawStored {
    subject: String,
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    code: usize,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// The first message of `stream` at or after sequence `seq`, `None` when
/// there is none.
pub(crate) async fn get_stored(
    js: &jetstream::Context,
    stream: &str,
    seq: u64,
) -> Result<Option<StoredMessage>, BrokerError> {
    let subject = format!("STREAM.MSG.GET.{stream}");
    for request in [serde_json::json!({ "seq": seq }), serde_json::json!({ "seq": seq, "next_by_subj": ">" })] {
        let reply: GetReply = js.request(subject.clone(), &request).await.map_err(|e| {
            super::errors::classify(
                super::errors::request_failure(&e),
                format!("reading message {seq} of stream {stream:?}: {e}"),
            )
        })?;
        if let Some(error) = reply.error {
            if error.err_code == NO_MESSAGE_FOUND {
                continue;
            }
            return Err(super::errors::classify(
                super::errors::Failure::Api { code: error.err_code, status: error.code },
                format!("reading message {seq} of stream {stream:?}: {}", error.description),
            ));
        }
        let Some(m) = reply.message else { continue };
        let decode = |field: Option<String>, what: &str| -> Result<Vec<u8>, BrokerError> {
            match field {
                None => Ok(Vec::new()),
                Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| {
                    BrokerError::Other(format!("message {seq} of stream {stream:?}: its {what} are not base64: {e}"))
                }),
            }
        };
        return Ok(Some(StoredMessage {
            seq: m.seq,
            subject: m.subject,
            header: decode(m.hdrs, "headers")?,
            payload: decode(m.data, "data")?,
        }));
    }
    Ok(None)
}

/// Deletes message `seq` of `stream` (a work-queue stream, where deleting is
/// what acknowledging does).
pub(crate) async fn delete_stored(js: &jetstream::Context, stream: &str, seq: u64) -> Result<(), BrokerError> {
    #[derive(serde::Deserialize)]
    struct Reply {
        error: Option<ApiError>,
    }
    let reply: Reply = js
        .request(format!("STREAM.MSG.DELETE.{stream}"), &serde_json::json!({ "seq": seq, "no_erase": true }))
        .await
        .map_err(|e| {
            super::errors::classify(
                super::errors::request_failure(&e),
                format!("deleting message {seq} of stream {stream:?}: {e}"),
            )
        })?;
    match reply.error {
        None => Ok(()),
        Some(e) if e.err_code == NO_MESSAGE_FOUND => Ok(()),
        Some(e) => Err(super::errors::classify(
            super::errors::Failure::Api { code: e.err_code, status: e.code },
            format!("deleting message {seq} of stream {stream:?}: {}", e.description),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::refusal;

    fn block(lines: &[&[u8]]) -> Vec<u8> {
        let mut b = b"NATS/1.0\r\n".to_vec();
        for l in lines {
            b.extend_from_slice(l);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"\r\n");
        b
    }

    #[test]
    fn accepts_what_async_nats_parses() {
        assert_eq!(refusal(&block(&[b"X-A: 1", b"Nats-Msg-Id: abc"])), None);
        assert_eq!(refusal(b"NATS/1.0 503\r\n\r\n"), None);
        assert_eq!(refusal(b"NATS/1.0 408 Request Timeout\r\n\r\n"), None);
        // Continuation lines are joined; trailing CR/whitespace trimmed.
        assert_eq!(refusal(&block(&[b"X-A: 1", b"  more"])), None);
        assert_eq!(refusal(&block(&[b"X-A: 1 \r"])), None);
        assert_eq!(refusal(&block(&[b"X-Empty:"])), None);
    }

    #[test]
    fn refuses_a_non_utf8_value() {
        assert!(refusal(&block(&[b"X-A: caf\xe9"])).unwrap().contains("not UTF-8"));
    }

    #[test]
    fn refuses_an_invalid_name() {
        assert!(refusal(&block(&[b"X A: 1"])).unwrap().contains("header name"));
        assert!(refusal(&block(&[b"no colon here"])).unwrap().contains("no ':'"));
    }

    #[test]
    fn refuses_a_cr_inside_a_value() {
        assert!(refusal(&block(&[b"X-A: a\rb"])).unwrap().contains("CR or LF"));
        // A CR that ends a continuation line is inside the joined value.
        assert!(refusal(&block(&[b"X-A: a\r", b" b"])).unwrap().contains("CR or LF"));
    }

    #[test]
    fn refuses_a_bad_version_or_status() {
        assert!(refusal(b"HTTP/1.1\r\n\r\n").is_some());
        assert!(refusal(b"NATS/1.0 abc\r\n\r\n").is_some());
        assert!(refusal(b"").is_some());
    }
}
