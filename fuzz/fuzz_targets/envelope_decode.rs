//! `Envelope::decode_with` on arbitrary bytes, in every payload encoding: it
//! returns a typed error or a valid envelope, never panics. Whatever decodes
//! and is publishable (reading is lenient like Go: long or control-character
//! text fields, and base64 bytes that are not JSON, decode but are refused
//! on publish with a typed error) re-encodes canonically and round-trips
//! (`decode(encode(e)) == e`), and its aggregate ID is the one extraction
//! finds.
#![no_main]

use eventbus::envelope::{
    extract_aggregate_id, validate_aggregate_id, EnvelopeError, IdSource, PayloadEncoding,
    MAX_ENVELOPE_BYTES,
};
use eventbus::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for encoding in [
        PayloadEncoding::Embedded,
        PayloadEncoding::Base64,
        PayloadEncoding::Auto,
    ] {
        check(data, encoding);
    }
});

fn check(data: &[u8], encoding: PayloadEncoding) {
    let Ok(e) = Envelope::decode_with(data, encoding) else {
        return;
    };
    assert_eq!(validate_aggregate_id(&e.aggregate_id), Ok(()));
    assert!(!e.payload_bytes().is_empty(), "an accepted payload has bytes");

    // Auto writes embedded; read back what was written in the same encoding.
    let bytes = match e.encode_with(encoding) {
        Ok(bytes) => bytes,
        Err(
            EnvelopeError::FieldTooLong { .. }
            | EnvelopeError::ControlCharacter { .. }
            | EnvelopeError::TooLarge { .. },
        ) => return,
        Err(EnvelopeError::PayloadNotJson(_)) if encoding == PayloadEncoding::Auto => return,
        Err(err) => panic!("a decoded envelope fails to encode ({encoding}): {err:?}"),
    };
    assert!(bytes.len() <= MAX_ENVELOPE_BYTES);
    let back = Envelope::decode_with(&bytes, encoding).expect("an encoded envelope decodes");
    if encoding == PayloadEncoding::Auto {
        // Auto writes embedded, which need not read back the same: base64
        // bytes that are JSON are compacted, and a JSON string that is valid
        // base64 reads back as its bytes (the documented ambiguity).
        return;
    }
    assert_eq!(back, e, "decode(encode(e)) != e ({encoding})");
    assert_eq!(back.encode_with(encoding).expect("re-encodes"), bytes, "encode is not canonical");
    if encoding == PayloadEncoding::Embedded {
        // The serde path agrees with decode.
        let via_serde: Envelope = serde_json::from_slice(&bytes).expect("serde path decodes");
        assert_eq!(via_serde, e);
        // An accepted embedded payload is JSON, and parsing it into a `Value`
        // never fails on depth (it may on content: numbers beyond f64,
        // unpaired surrogate escapes — valid JSON syntax `Value` cannot hold).
        e.payload_as::<serde::de::IgnoredAny>().expect("an accepted payload is JSON");
        if let Err(err) = e.payload_as::<serde_json::Value>() {
            let EnvelopeError::Payload(msg) = &err else {
                panic!("payload_as failed untyped: {err:?}")
            };
            assert!(!msg.contains("recursion limit"), "accepted payload too deep for serde_json: {msg}");
        }
        // Extraction reads the same ID (it decodes embedded, trimmed like Go).
        let id = extract_aggregate_id(data, &[], None, None).expect("a valid envelope has an ID");
        assert_eq!((id.id.as_str(), id.source), (e.aggregate_id.as_str(), IdSource::Envelope));
    }
}
