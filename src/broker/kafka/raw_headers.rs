//! Record headers read through librdkafka's C API, byte for byte.
//!
//! rdkafka 0.39's `BorrowedHeaders` unwraps `CStr::to_str` on every header
//! name, so a record whose header name is not UTF-8 (the C, Go and Java
//! clients can write one) panics the thread that reads it. The adapter reads
//! headers with `rd_kafka_header_get_all` instead and never panics.
//!
//! A header *value* is bytes in [`Headers`](crate::broker::Headers) already.
//! A *name* that is not UTF-8 cannot be one of its `String`s: such a record
//! is delivered with the names converted lossily (U+FFFD) and marked with
//! [`HEADER_UNDELIVERABLE`](crate::broker::HEADER_UNDELIVERABLE) =
//! `undecodable-headers` plus
//! [`HEADER_RAW_HEADERS`](crate::broker::HEADER_RAW_HEADERS), which holds
//! every original header losslessly ([`encode`]), so the consumer
//! dead-letters it (reason `undecodable-headers`) with nothing lost.

use std::ffi::{c_char, c_void, CStr};

use rdkafka::bindings as rdsys;

/// One header as the producer wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHeader {
    /// The header name's bytes (not necessarily UTF-8).
    pub name: Vec<u8>,
    /// `None`: a null value.
    pub value: Option<Vec<u8>>,
}

/// The headers of `message`, in order.
///
/// # Safety
/// `message` must point to a valid `rd_kafka_message_t` (e.g.
/// `BorrowedMessage::ptr`) for the duration of the call.
pub unsafe fn read(message: *const rdsys::rd_kafka_message_t) -> Vec<RawHeader> {
    let mut headers: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the caller guarantees the message; the headers belong to it.
    let err = unsafe { rdsys::rd_kafka_message_headers(message, &mut headers) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for idx in 0.. {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `headers` is valid while the message is; the out-pointers
        // are ours.
        let err = unsafe { rdsys::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size) };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // librdkafka stores names NUL-terminated (a name with a NUL byte in
        // it ends there: the C API cannot say more).
        // SAFETY: a valid NUL-terminated name owned by the headers.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let value = if value.is_null() {
            None
        } else {
            // SAFETY: `size` bytes at `value`, owned by the headers.
            Some(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec())
        };
        out.push(RawHeader { name, value });
    }
    out
}

/// Every header, losslessly, as one value: per header the name's length
/// (u32, big-endian) and bytes, then the value's length (i32, big-endian;
/// -1 for null) and bytes — Kafka's own header layout with fixed-width
/// lengths.
pub fn encode(headers: &[RawHeader]) -> Vec<u8> {
    let mut out = Vec::new();
    for h in headers {
        out.extend_from_slice(&(h.name.len() as u32).to_be_bytes());
        out.extend_from_slice(&h.name);
        match &h.value {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

/// The inverse of [`encode`]; `None` if `bytes` is not such an encoding.
pub fn decode(mut bytes: &[u8]) -> Option<Vec<RawHeader>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Some(head)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let n = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?) as usize;
        let name = take(&mut bytes, n)?.to_vec();
        let n = i32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?);
        let value = if n < 0 { None } else { Some(take(&mut bytes, n as usize)?.to_vec()) };
        out.push(RawHeader { name, value });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_round_trips_every_byte() {
        let headers = vec![
            RawHeader { name: b"ok".to_vec(), value: Some(b"v".to_vec()) },
            RawHeader { name: vec![0xff, 0xfe, b'x'], value: Some(vec![0xc3, 0x28]) },
            RawHeader { name: vec![], value: None },
            RawHeader { name: b"empty".to_vec(), value: Some(vec![]) },
        ];
        assert_eq!(decode(&encode(&headers)), Some(headers));
        assert_eq!(decode(&[]), Some(vec![]));
        assert_eq!(decode(&[0, 0, 0, 9, b'a']), None, "truncated");
    }
}
