//! `Envelope::decode` on arbitrary bytes: it returns a typed error or a valid
//! envelope, never panics; whatever decodes re-encodes canonically and
//! round-trips (`decode(encode(e)) == e`), and its aggregate ID is the one
//! extraction finds.
#![no_main]

use eventbus::envelope::{
    extract_aggregate_id, validate_aggregate_id, EnvelopeError, IdSource, MAX_ENVELOPE_BYTES,
};
use eventbus::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(e) = Envelope::decode(data) else {
        return;
    };
    assert_eq!(e.validate(), Ok(()), "decode returned an invalid envelope");
    assert_eq!(validate_aggregate_id(&e.aggregate_id), Ok(()));

    let bytes = e.encode().expect("a decoded envelope encodes");
    assert!(bytes.len() <= MAX_ENVELOPE_BYTES);
    let back = Envelope::decode(&bytes).expect("an encoded envelope decodes");
    assert_eq!(back, e, "decode(encode(e)) != e");
    // Our output is canonical: encoding again gives the same bytes.
    assert_eq!(
        back.encode().expect("re-encodes"),
        bytes,
        "encode is not canonical"
    );
    // The serde path agrees with decode.
    let via_serde: Envelope = serde_json::from_slice(&bytes).expect("serde path decodes");
    assert_eq!(via_serde, e);
    // An accepted payload is JSON (it parses, skipping values), and parsing
    // it into a `Value` never fails on depth. It may fail on content, with a
    // typed error: numbers beyond f64 (`1e400`) and unpaired UTF-16
    // surrogate escapes (`"\ud800"`) are valid JSON syntax that decode
    // accepts (Go's json.Valid does too) but `Value` cannot hold.
    e.payload_as::<serde::de::IgnoredAny>()
        .expect("an accepted payload is JSON");
    if let Err(err) = e.payload_as::<serde_json::Value>() {
        let EnvelopeError::Payload(msg) = &err else {
            panic!("payload_as failed untyped: {err:?}")
        };
        assert!(
            !msg.contains("recursion limit"),
            "accepted payload too deep for serde_json: {msg}"
        );
    }

    let id = extract_aggregate_id(data, &[], None, None).expect("a valid envelope has an ID");
    assert_eq!(
        (id.id.as_str(), id.source),
        (e.aggregate_id.as_str(), IdSource::Envelope)
    );
});
