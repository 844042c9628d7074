//! `extract_aggregate_id` on an arbitrary payload, headers, key and subject:
//! never panics, and any ID it returns passes `validate_aggregate_id` and is
//! the one the priority rules (envelope > header > key > subject) pick, as a
//! plainly written reference model computes them.
#![no_main]

use arbitrary::Arbitrary;
use eventbus::envelope::{
    aggregate_id_from, extract_aggregate_id, validate_aggregate_id, IdSource, HEADER_AGGREGATE_ID,
    HEADER_AGGREGATE_ID_ALT, MAX_HEADERS_SCANNED,
};
use eventbus::Envelope;
use libfuzzer_sys::fuzz_target;

/// Header names: mostly the ones extraction looks for, in any case.
#[derive(Arbitrary, Debug)]
enum Name<'a> {
    AggregateId,
    AggregateIdAlt,
    Lower(bool),
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    headers: Vec<(Name<'a>, &'a [u8])>,
    /// Put this many (0..=7) of `headers` below MAX_HEADERS_SCANNED, after
    /// filler headers, and the rest beyond it; `None`: no filler.
    straddle: Option<u8>,
    key: Option<&'a [u8]>,
    subject: Option<&'a str>,
    payload: &'a [u8],
}

fn name(n: &Name<'_>) -> String {
    match n {
        Name::AggregateId => HEADER_AGGREGATE_ID.to_owned(),
        Name::AggregateIdAlt => HEADER_AGGREGATE_ID_ALT.to_owned(),
        Name::Lower(alt) => {
            let n = if *alt {
                HEADER_AGGREGATE_ID_ALT
            } else {
                HEADER_AGGREGATE_ID
            };
            n.to_ascii_lowercase()
        }
        Name::Other(s) => (*s).to_owned(),
    }
}

fn valid(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?;
    validate_aggregate_id(s).ok()?;
    Some(s.to_owned())
}

/// The priority rules, written the plain way.
fn model(
    payload: &[u8],
    headers: &[(String, Vec<u8>)],
    key: Option<&[u8]>,
    subject: Option<&str>,
) -> Option<(String, IdSource)> {
    if let Ok(e) = Envelope::decode(payload) {
        return Some((e.aggregate_id, IdSource::Envelope));
    }
    let scanned = &headers[..headers.len().min(MAX_HEADERS_SCANNED)];
    for wanted in ["x-aggregate-id", "aggregate-id"] {
        for (k, v) in scanned {
            if k.to_ascii_lowercase() == wanted {
                if let Some(id) = valid(v) {
                    return Some((id, IdSource::Header));
                }
            }
        }
    }
    if let Some(id) = key.and_then(valid) {
        return Some((id, IdSource::Key));
    }
    let tokens: Vec<&str> = subject?.split('.').collect();
    tokens
        .iter()
        .rev()
        .find_map(|t| valid(t.as_bytes()))
        .map(|id| (id, IdSource::Subject))
}

fuzz_target!(|input: Input<'_>| {
    let filler = input
        .straddle
        .map_or(0, |below| MAX_HEADERS_SCANNED - usize::from(below % 8));
    // Empty filler headers cost no allocation.
    let mut headers: Vec<(String, Vec<u8>)> = vec![(String::new(), Vec::new()); filler];
    headers.extend(input.headers.iter().map(|(n, v)| (name(n), v.to_vec())));

    let got = extract_aggregate_id(input.payload, &headers, input.key, input.subject);
    if let Some(got) = &got {
        assert_eq!(
            validate_aggregate_id(&got.id),
            Ok(()),
            "extracted an invalid ID: {got:?}"
        );
    }
    assert_eq!(
        got.clone().map(|g| (g.id, g.source)),
        model(input.payload, &headers, input.key, input.subject),
        "extraction disagrees with the priority rules"
    );
    let decoded = Envelope::decode(input.payload).ok();
    assert_eq!(
        aggregate_id_from(decoded.as_ref(), &headers, input.key, input.subject),
        got
    );
});
