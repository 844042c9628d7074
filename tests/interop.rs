#![cfg(not(feature = "loom"))]
//! Wire interop with the seed's Go services, through a Go peer
//! (`interop/goenvelope`, stdlib only) built by these tests with `go build`.
//!
//! The peer carries the seed's envelope struct in both wire forms: `base64`
//! (a `[]byte` payload marshalled by `encoding/json`, what the seed writes)
//! and `raw` (`json.RawMessage`, the payload JSON embedded). Envelopes go
//! both ways: Go writes, we read and re-publish, Go reads and the fields are
//! compared one by one; the same through a real NATS JetStream server (the
//! peer speaks the NATS text protocol over TCP) and through librdkafka's
//! mock Kafka cluster (plain rdkafka producer/consumer on the Go side of
//! the pipe). `docs/wire.md` has the table these tests print.
//!
//! Without `go` on the PATH every test fails, saying how to install it: a
//! test that could not run must not count as passed (`.ci/run` installs
//! Debian's `golang-go`).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use eventbus::envelope::{Envelope, PayloadEncoding, GO_ZERO_TIME};
use eventbus::{BusConfig, EventBus};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------
// The Go peer.

/// The built peer binary, or why it could not be built.
fn build_peer() -> Result<Option<PathBuf>, String> {
    match Command::new("go").arg("version").output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot run `go version`: {e}")),
        Ok(out) if !out.status.success() => {
            return Err(format!(
                "`go version` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
        Ok(_) => {}
    }
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-go");
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let bin = tmp.join("goenvelope");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/goenvelope");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        // Own cache and module dirs (HOME may be unset or read-only); no
        // module is downloaded (the peer has no requirements).
        .env("GOCACHE", tmp.join("gocache"))
        .env("GOPATH", tmp.join("gopath"))
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .output()
        .map_err(|e| format!("cannot run `go build`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`go build` of {} failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Some(bin))
}

/// The Go peer, built once per test run; fails the test when `go` is absent.
fn peer(test: &str) -> &'static Path {
    static PEER: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    match PEER.get_or_init(build_peer) {
        Err(e) => panic!("interop::{test}: {e}"),
        Ok(Some(bin)) => bin.as_path(),
        Ok(None) => panic!("interop::{test}: not run: `go` is not on the PATH (apt-get install golang-go)"),
    }
}

/// The Go struct's two wire forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum GoForm {
    /// The seed: `[]byte` payload, base64 on the wire.
    Base64,
    /// `json.RawMessage` payload, embedded JSON.
    Raw,
}

impl GoForm {
    fn arg(self) -> &'static str {
        match self {
            GoForm::Base64 => "base64",
            GoForm::Raw => "raw",
        }
    }

    /// Our encoding that writes this form.
    fn ours(self) -> PayloadEncoding {
        match self {
            GoForm::Base64 => PayloadEncoding::Base64,
            GoForm::Raw => PayloadEncoding::Embedded,
        }
    }

    fn data_file(self) -> &'static str {
        match self {
            GoForm::Base64 => "seed-deab3fb-encoding-json.jsonl",
            GoForm::Raw => "raw-payload.jsonl",
        }
    }
}

/// One line of the peer's `decode` output: what Go decoded and validated.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
struct GoDecoded {
    ok: bool,
    error: String,
    aggregate_id: String,
    event_type: String,
    event_version: i64,
    timestamp: String,
    trace_id: String,
    correlation_id: String,
    payload_b64: String,
}

fn run_peer(bin: &Path, args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Go peer");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("Go peer output");
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "Go peer {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("Go peer writes UTF-8")
}

/// Go's `encode FORM`: the 20 test envelopes as Go marshals them.
fn go_encode(bin: &Path, form: GoForm) -> Vec<Vec<u8>> {
    run_peer(bin, &["encode", form.arg()], b"")
        .lines()
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// Go's `decode FORM` of each line.
fn go_decode(bin: &Path, form: GoForm, lines: &[Vec<u8>]) -> Vec<GoDecoded> {
    let mut input = Vec::new();
    for line in lines {
        // Base64 lines, so a document may hold any bytes, newlines included.
        input.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(line)
                .as_bytes(),
        );
        input.push(b'\n');
    }
    let out: Vec<GoDecoded> = run_peer(bin, &["decode-b64", form.arg()], &input)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), lines.len(), "one answer per envelope");
    out
}

/// The fields where Go's reading and ours differ (empty when they agree).
/// Go keeps the aggregate ID untrimmed and checks it trimmed; we keep it
/// trimmed, so Go's is compared trimmed.
fn field_diffs(go: &GoDecoded, ours: &Envelope) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut check = |field: &str, same: bool, detail: String| {
        if !same {
            diffs.push(format!("{field}: {detail}"));
        }
    };
    check(
        "aggregate_id",
        go.aggregate_id.trim() == ours.aggregate_id,
        format!("{:?} vs {:?}", go.aggregate_id, ours.aggregate_id),
    );
    check(
        "event_type",
        go.event_type == ours.event_type,
        format!("{:?} vs {:?}", go.event_type, ours.event_type),
    );
    check(
        "event_version",
        go.event_version == ours.event_version,
        format!("{} vs {}", go.event_version, ours.event_version),
    );
    let go_ts = OffsetDateTime::parse(&go.timestamp, &Rfc3339).ok();
    check(
        "timestamp",
        go_ts.is_some_and(|t| t == ours.timestamp && t.offset() == ours.timestamp.offset()),
        format!("{} vs {}", go.timestamp, ours.timestamp),
    );
    let opt = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
    check(
        "trace_id",
        opt(&go.trace_id) == ours.trace_id,
        format!("{:?} vs {:?}", go.trace_id, ours.trace_id),
    );
    check(
        "correlation_id",
        opt(&go.correlation_id) == ours.correlation_id,
        format!("{:?} vs {:?}", go.correlation_id, ours.correlation_id),
    );
    let go_payload = base64::engine::general_purpose::STANDARD
        .decode(&go.payload_b64)
        .unwrap();
    // Go's json.RawMessage keeps the input's whitespace; we hold an embedded
    // payload compacted (what Go's json.Marshal writes for it).
    let same_payload = go_payload == ours.payload_bytes()
        || (serde_json::from_slice::<serde::de::IgnoredAny>(&go_payload).is_ok()
            && without_json_whitespace(&go_payload) == ours.payload_bytes());
    check(
        "payload",
        same_payload,
        format!(
            "{:?} vs {:?}",
            String::from_utf8_lossy(&go_payload),
            String::from_utf8_lossy(ours.payload_bytes())
        ),
    );
    diffs
}

/// JSON text without whitespace outside strings.
fn without_json_whitespace(json: &[u8]) -> Vec<u8> {
    let (mut in_string, mut escaped) = (false, false);
    let mut out = Vec::with_capacity(json.len());
    for &b in json {
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
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        }
        out.push(b);
    }
    out
}

/// The shared test data (`tests/data/interop`, copied from the seed's Go).
fn data(form: GoForm) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/interop")
        .join(form.data_file());
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

// ---------------------------------------------------------------------------
// The round-trip table.

/// Outcomes per (direction, encoding): cases, agreements, disagreements.
#[derive(Default)]
struct Table {
    rows: BTreeMap<(String, String), (usize, usize, Vec<String>)>,
}

impl Table {
    fn record(&mut self, direction: &str, encoding: &str, case: usize, diffs: Vec<String>) {
        let row = self
            .rows
            .entry((direction.to_owned(), encoding.to_owned()))
            .or_default();
        row.0 += 1;
        if diffs.is_empty() {
            row.1 += 1;
        } else {
            row.2
                .push(format!("case {}: {}", case + 1, diffs.join("; ")));
        }
    }

    fn print(&self, title: &str) -> usize {
        let mut out = format!("\n{title}\n\n| direction | encoding | cases | agree | disagree |\n|---|---|---|---|---|\n");
        let mut disagreements = 0;
        for ((direction, encoding), (cases, agree, diffs)) in &self.rows {
            out.push_str(&format!(
                "| {direction} | {encoding} | {cases} | {agree} | {} |\n",
                diffs.len()
            ));
            disagreements += diffs.len();
        }
        for ((direction, encoding), (_, _, diffs)) in &self.rows {
            for d in diffs {
                out.push_str(&format!("  DISAGREE {direction} / {encoding}: {d}\n"));
            }
        }
        let _ = std::io::stderr().write_all(out.as_bytes());
        println!("{out}");
        disagreements
    }
}

#[test]
fn go_peer_writes_the_shared_test_data_byte_for_byte() {
    let bin = peer("go_peer_writes_the_shared_test_data_byte_for_byte");
    for form in [GoForm::Base64, GoForm::Raw] {
        let go = go_encode(bin, form);
        assert_eq!(go.len(), 20);
        assert_eq!(
            go,
            data(form),
            "{form:?}: the Go peer's output is the shared test data"
        );
    }
}

/// Go writes (both forms); we read in the matching encoding and in `auto`;
/// we re-publish in both encodings; Go reads each and every field is
/// compared. Prints the round-trip table (docs/wire.md) and fails on any
/// disagreement.
#[test]
fn envelopes_round_trip_between_go_and_us_in_both_encodings() {
    let bin = peer("envelopes_round_trip_between_go_and_us_in_both_encodings");
    let mut table = Table::default();
    for form in [GoForm::Base64, GoForm::Raw] {
        let written = go_encode(bin, form);
        let go_read = go_decode(bin, form, &written);
        assert!(
            go_read.iter().all(|d| d.ok),
            "Go reads what Go wrote: {go_read:?}"
        );
        for encoding in [form.ours(), PayloadEncoding::Auto] {
            let direction = format!("Go {} -> us", form.arg());
            let mut ours = Vec::new();
            for (i, (line, go)) in written.iter().zip(&go_read).enumerate() {
                match Envelope::decode_with(line, encoding) {
                    Ok(e) => {
                        table.record(&direction, &encoding.to_string(), i, field_diffs(go, &e));
                        ours.push(e);
                    }
                    Err(e) => table.record(
                        &direction,
                        &encoding.to_string(),
                        i,
                        vec![format!("we reject: {e}")],
                    ),
                }
            }
            // Re-publish what we read, in both forms; Go reads it back.
            for out_form in [GoForm::Base64, GoForm::Raw] {
                let direction = format!(
                    "us -> Go {} (read {} as {encoding})",
                    out_form.arg(),
                    form.arg()
                );
                let bytes: Vec<Vec<u8>> = ours
                    .iter()
                    .map(|e| e.encode_with(out_form.ours()).unwrap())
                    .collect();
                let back = go_decode(bin, out_form, &bytes);
                for (i, (go, e)) in back.iter().zip(&ours).enumerate() {
                    let diffs = if go.ok {
                        field_diffs(go, e)
                    } else {
                        vec![format!("Go rejects: {}", go.error)]
                    };
                    table.record(&direction, &out_form.ours().to_string(), i, diffs);
                }
                // What we write in the form Go wrote is byte for byte what Go wrote.
                if out_form == form {
                    assert_eq!(bytes.len(), written.len());
                    for (ours, go) in bytes.iter().zip(&written) {
                        assert_eq!(
                            serde_json::from_slice::<serde_json::Value>(ours).unwrap(),
                            serde_json::from_slice::<serde_json::Value>(go).unwrap(),
                            "same JSON as Go (bytes differ only in Go's HTML escapes)"
                        );
                    }
                }
            }
        }
    }
    let disagreements = table.print("Round trip, Go peer <-> eventbus, 20 envelopes each");
    assert_eq!(disagreements, 0, "no disagreement");
    assert_eq!(table.rows.values().map(|r| r.0).sum::<usize>(), 240);
}

/// The cross-configured cases the issue measured: a reader in the wrong
/// encoding. Not a disagreement with Go (Go fails too), but the failure
/// each side reports, so the docs can say what a wrong setting looks like.
#[test]
fn a_reader_in_the_wrong_encoding_fails_with_a_typed_error() {
    let bin = peer("a_reader_in_the_wrong_encoding_fails_with_a_typed_error");
    // Seed Go reading our embedded output: rejects 19 of 20 ([1,2,3] is read as bytes).
    let embedded: Vec<Vec<u8>> = data(GoForm::Raw);
    let seed_reads = go_decode(bin, GoForm::Base64, &embedded);
    assert_eq!(
        seed_reads.iter().filter(|d| !d.ok).count(),
        19,
        "{seed_reads:?}"
    );
    assert_eq!(
        seed_reads[1].payload_b64, "AQID",
        "[1,2,3] read as the bytes 01 02 03"
    );
    // Our base64 reader on embedded payloads: typed errors; the same array is bytes too.
    let ours: Vec<_> = embedded
        .iter()
        .map(|l| Envelope::decode_with(l, PayloadEncoding::Base64))
        .collect();
    assert_eq!(ours.iter().filter(|r| r.is_err()).count(), 19);
    assert_eq!(ours[1].as_ref().unwrap().payload_bytes(), [1, 2, 3]);
    for r in ours.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(
                r,
                eventbus::envelope::EnvelopeError::PayloadForm { .. }
                    | eventbus::envelope::EnvelopeError::InvalidBase64(_)
            ),
            "{r:?}"
        );
    }
    // Our embedded reader on the seed's base64: accepted, but the payload is a JSON string.
    let base64 = data(GoForm::Base64);
    let e = Envelope::decode_with(&base64[0], PayloadEncoding::Embedded).unwrap();
    assert_eq!(
        e.payload_as::<String>().unwrap(),
        "eyJvcmRlcklkIjoiby0xIiwiYW1vdW50IjoxMi41fQ=="
    );
}

// ---------------------------------------------------------------------------
// Reading rules, differential: every document through Go and through us.

const P_B64: &str = r#""eyJ4IjoxfQ==""#;
const P_RAW: &str = r#"{"x":1}"#;

/// Documents probing one reading rule each; `$P` is the form's ordinary
/// payload, `$T` an ordinary timestamp.
fn rule_documents() -> Vec<(&'static str, String)> {
    let base = |rest: &str| {
        format!(r#"{{"aggregate_id":"a-1","event_type":"T","event_version":1,{rest}}}"#)
    };
    let long = "x".repeat(1000);
    vec![
        ("baseline", base(r#""timestamp":"$T","payload":$P"#)),
        (
            "field names in any case",
            r#"{"AGGREGATE_ID":"a-1","Event_Type":"T","EVENT_version":1,"TimeStamp":"$T","Trace_ID":"t","CORRELATION_id":"c","Payload":$P}"#.into(),
        ),
        ("long s folds to s", r#"{"aggregate_id":"a-1","event_type":"T","event_verſion":2,"timeſtamp":"$T","payload":$P}"#.into()),
        ("last duplicate wins", base(r#""aggregate_id":"a-2","timestamp":"$T","event_version":3,"payload":$P"#)),
        ("case-variant duplicate, last wins", base(r#""AGGREGATE_ID":"a-3","timestamp":"$T","payload":$P"#)),
        ("null keeps the earlier value", base(r#""trace_id":"t-1","trace_id":null,"event_version":null,"timestamp":"$T","timestamp":null,"payload":$P"#)),
        ("missing timestamp", base(r#""payload":$P"#)),
        ("null timestamp", base(r#""timestamp":null,"payload":$P"#)),
        ("aggregate ID with spaces", r#"{"aggregate_id":"  a-1 ","event_type":"T","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
        ("aggregate ID with tab, newline, NBSP", r#"{"aggregate_id":"\t\u00a0a-1\n","event_type":"T","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
        ("blank aggregate ID", r#"{"aggregate_id":"  ","event_type":"T","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
        ("aggregate ID 257 characters", format!(r#"{{"aggregate_id":"{}","event_type":"T","event_version":1,"timestamp":"$T","payload":$P}}"#, "a".repeat(257))),
        ("aggregate ID with é", r#"{"aggregate_id":"caf\u00e9","event_type":"T","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
        ("event_type 1000 characters", format!(r#"{{"aggregate_id":"a","event_type":"{long}","event_version":1,"timestamp":"$T","payload":$P}}"#)),
        ("trace and correlation IDs 1000 characters", base(&format!(r#""trace_id":"{long}","correlation_id":"{long}","timestamp":"$T","payload":$P"#))),
        ("event_type with a control character", r#"{"aggregate_id":"a","event_type":"A\r\nB","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
        ("blank event_type", r#"{"aggregate_id":"a","event_type":" \t","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
        ("missing event_type", r#"{"aggregate_id":"a","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
        ("version 0", r#"{"aggregate_id":"a","event_type":"T","event_version":0,"timestamp":"$T","payload":$P}"#.into()),
        ("version -1", r#"{"aggregate_id":"a","event_type":"T","event_version":-1,"timestamp":"$T","payload":$P}"#.into()),
        ("version missing", r#"{"aggregate_id":"a","event_type":"T","timestamp":"$T","payload":$P}"#.into()),
        ("version as a string", r#"{"aggregate_id":"a","event_type":"T","event_version":"1","timestamp":"$T","payload":$P}"#.into()),
        ("version 1.0", r#"{"aggregate_id":"a","event_type":"T","event_version":1.0,"timestamp":"$T","payload":$P}"#.into()),
        ("version 2^63", r#"{"aggregate_id":"a","event_type":"T","event_version":9223372036854775808,"timestamp":"$T","payload":$P}"#.into()),
        ("payload missing", base(r#""timestamp":"$T""#)),
        ("payload null", base(r#""timestamp":"$T","payload":null"#)),
        ("payload empty string", base(r#""timestamp":"$T","payload":"""#)),
        ("payload base64 with a newline", base(r#""timestamp":"$T","payload":"eyJ4Ijox\nfQ==""#)),
        ("payload base64 with trailing bits", base(r#""timestamp":"$T","payload":"QR==""#)),
        ("payload base64 unpadded", base(r#""timestamp":"$T","payload":"eyJ4IjoxfQ""#)),
        ("payload base64 url alphabet", base(r#""timestamp":"$T","payload":"-_-_""#)),
        ("payload string that is base64", base(r#""timestamp":"$T","payload":"abcd""#)),
        ("payload string that is not base64", base(r#""timestamp":"$T","payload":"hello""#)),
        ("payload array of bytes", base(r#""timestamp":"$T","payload":[1,2,3]"#)),
        ("payload empty array", base(r#""timestamp":"$T","payload":[]"#)),
        ("payload array beyond a byte", base(r#""timestamp":"$T","payload":[256]"#)),
        ("payload object", base(r#""timestamp":"$T","payload":{"a":[1, 2]}"#)),
        ("payload number", base(r#""timestamp":"$T","payload":42"#)),
        ("payload boolean", base(r#""timestamp":"$T","payload":true"#)),
        ("unknown fields", base(r#""extra":{"a":[1,{"b":null}]},"event_id":"e-1","timestamp":"$T","payload":$P"#)),
        ("pretty-printed", "\n { \"aggregate_id\" : \"a\" ,\n\t\"event_type\":\"T\", \"event_version\" : 1 , \"timestamp\":\"$T\", \"payload\" : $P }\n".into()),
        ("empty trace ID", base(r#""trace_id":"","timestamp":"$T","payload":$P"#)),
        ("trace ID a number", base(r#""trace_id":5,"timestamp":"$T","payload":$P"#)),
        ("top-level array", format!("[{}]", base(r#""timestamp":"$T","payload":$P"#))),
        ("top-level null", "null".into()),
        ("top-level number", "42".into()),
        ("trailing garbage", format!("{} x", base(r#""timestamp":"$T","payload":$P"#))),
        ("timestamp with offset and nanoseconds", base(r#""timestamp":"2024-01-02T15:04:05.123456789+08:00","payload":$P"#)),
        ("timestamp with 10 fraction digits", base(r#""timestamp":"2024-01-02T15:04:05.1234567891Z","payload":$P"#)),
        ("timestamp lower-case t", base(r#""timestamp":"2024-01-02t15:04:05Z","payload":$P"#)),
        ("timestamp lower-case z", base(r#""timestamp":"2024-01-02T15:04:05z","payload":$P"#)),
        ("timestamp with a space", base(r#""timestamp":"2024-01-02 15:04:05Z","payload":$P"#)),
        ("timestamp without zone", base(r#""timestamp":"2024-01-02T15:04:05","payload":$P"#)),
        ("timestamp hour 25", base(r#""timestamp":"2024-01-02T25:04:05Z","payload":$P"#)),
        ("timestamp February 30", base(r#""timestamp":"2024-02-30T15:04:05Z","payload":$P"#)),
        ("timestamp second 60", base(r#""timestamp":"2024-12-31T23:59:60Z","payload":$P"#)),
        ("timestamp year 0000", base(r#""timestamp":"0000-01-01T00:00:00Z","payload":$P"#)),
        ("timestamp one-digit hour", base(r#""timestamp":"2024-01-02T5:04:05Z","payload":$P"#)),
        ("timestamp offset +24:00", base(r#""timestamp":"2024-01-02T15:04:05+24:00","payload":$P"#)),
        ("timestamp comma fraction", base(r#""timestamp":"2024-01-02T15:04:05,5Z","payload":$P"#)),
        ("timestamp a number", base(r#""timestamp":1704207845,"payload":$P"#)),
        ("lone surrogate in event_type", r#"{"aggregate_id":"a","event_type":"\ud800","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
        // `$X` becomes the byte 0xFF (not UTF-8).
        ("invalid UTF-8 in event_type", r#"{"aggregate_id":"a","event_type":"A$XB","event_version":1,"timestamp":"$T","payload":$P}"#.into()),
    ]
}

/// Where we deliberately read differently from Go, by document and Go form,
/// with the reason (docs/wire.md lists them).
fn deliberate_disagreements() -> BTreeMap<(&'static str, GoForm), &'static str> {
    BTreeMap::from([
        (
            ("payload null", GoForm::Raw),
            "Go's json.RawMessage holds the 4 bytes `null`; we reject a null payload (a nil pointer marshalled by a producer)",
        ),
        (
            ("lone surrogate in event_type", GoForm::Base64),
            "Go replaces an unpaired surrogate escape in a string with U+FFFD; serde_json rejects it",
        ),
        (
            ("lone surrogate in event_type", GoForm::Raw),
            "Go replaces an unpaired surrogate escape in a string with U+FFFD; serde_json rejects it",
        ),
        (
            ("invalid UTF-8 in event_type", GoForm::Base64),
            "Go replaces invalid UTF-8 in a string with U+FFFD; serde_json rejects it",
        ),
        (
            ("invalid UTF-8 in event_type", GoForm::Raw),
            "Go replaces invalid UTF-8 in a string with U+FFFD; serde_json rejects it",
        ),
    ])
}

/// Go 1.19's `time.Parse` (the Go of Debian 12, the peer here) accepts
/// these timestamps; Go 1.20 and later (`Time.UnmarshalJSON` is strict RFC
/// 3339 since 1.20) reject them, and so do we.
const GO_119_ONLY_TIMESTAMPS: [&str; 3] = [
    "timestamp one-digit hour",
    "timestamp offset +24:00",
    "timestamp comma fraction",
];

#[test]
fn reading_rules_agree_with_the_go_peer() {
    let bin = peer("reading_rules_agree_with_the_go_peer");
    let go_version = Command::new("go").arg("version").output().unwrap();
    // "go version go1.19.8 linux/amd64"
    let go_version = String::from_utf8_lossy(&go_version.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap_or("")
        .to_owned();
    let documents = rule_documents();
    let mut table = Table::default();
    let mut disagreements = BTreeMap::new();
    let mut agreed = 0;
    let mut verdicts = BTreeMap::new();
    for form in [GoForm::Base64, GoForm::Raw] {
        let payload = if form == GoForm::Base64 { P_B64 } else { P_RAW };
        let docs: Vec<Vec<u8>> = documents
            .iter()
            .map(|(_, d)| {
                let text = d
                    .replace("$P", payload)
                    .replace("$T", "2024-01-02T15:04:05.5Z");
                let mut bytes = Vec::new();
                for (i, part) in text.split("$X").enumerate() {
                    if i > 0 {
                        bytes.push(0xFF);
                    }
                    bytes.extend_from_slice(part.as_bytes());
                }
                bytes
            })
            .collect();
        let go = go_decode(bin, form, &docs);
        for (i, ((name, _), (doc, go))) in documents.iter().zip(docs.iter().zip(&go)).enumerate() {
            let ours = Envelope::decode_with(doc, form.ours());
            let diffs = match (&ours, go.ok) {
                (Ok(e), true) => field_diffs(go, e),
                (Err(_), false) => vec![],
                (Ok(_), false) => vec![format!("Go rejects ({}), we accept", go.error)],
                (Err(e), true) => vec![format!("Go accepts, we reject ({e})")],
            };
            if diffs.is_empty() {
                agreed += 1;
            } else {
                disagreements.insert((*name, form), diffs.join("; "));
            }
            let verdict = match (diffs.is_empty(), go.ok) {
                (true, true) => "both accept",
                (true, false) => "both reject",
                (false, _) => "differ",
            };
            *verdicts
                .entry((form.ours().to_string(), verdict))
                .or_insert(0usize) += 1;
            table.record(
                &format!("reading rules, Go {} vs us", form.arg()),
                &form.ours().to_string(),
                i,
                diffs,
            );
        }
    }
    table.print(&format!(
        "Reading rules: {} documents x 2 forms, Go peer {go_version}; verdicts {verdicts:?}",
        documents.len()
    ));
    let mut unexplained = Vec::new();
    let expected = deliberate_disagreements();
    for ((name, form), what) in &disagreements {
        let go_119 = GO_119_ONLY_TIMESTAMPS.contains(name) && go_version.starts_with("go1.19");
        let explained = expected.contains_key(&(*name, *form)) || go_119;
        let line = format!(
            "  {name} / {form:?}: {what}{}\n",
            if explained { " (documented)" } else { "" }
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        if !explained {
            unexplained.push(line);
        }
    }
    for key in expected.keys() {
        assert!(
            disagreements.contains_key(key),
            "documented disagreement {key:?} no longer happens: update docs/wire.md"
        );
    }
    assert!(
        unexplained.is_empty(),
        "undocumented disagreements with Go:\n{}",
        unexplained.concat()
    );
    assert!(agreed >= 2 * documents.len() - expected.len() - 2 * GO_119_ONLY_TIMESTAMPS.len());
}

// ---------------------------------------------------------------------------
// Through NATS JetStream.

#[cfg(feature = "nats")]
mod nats {
    use super::*;
    use common::scenario::unique;
    use eventbus::broker::nats::{NatsBroker, NatsConfig};
    use eventbus::Broker;

    fn nats_url() -> String {
        std::env::var("EVENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
    }

    /// `host:port` of the NATS URL, for the Go peer's socket.
    fn nats_addr() -> String {
        let url = nats_url();
        let rest = url.split("://").last().unwrap_or(&url);
        rest.rsplit('@')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned()
    }

    async fn connect() -> NatsBroker {
        let url = nats_url();
        NatsBroker::connect(NatsConfig {
            url: url.clone(),
            ..NatsConfig::default()
        })
        .await
        .unwrap_or_else(|e| {
            panic!("NATS JetStream server not reachable at {url}: {e} (.ci/run starts one)")
        })
    }

    /// A bus with library defaults, but for the group and `topic`'s encoding.
    fn config(group: &str, topic: &str, encoding: PayloadEncoding) -> BusConfig {
        let mut config = BusConfig::default();
        config.consumer.group = group.to_owned();
        config.wire.topics.insert(topic.to_owned(), encoding);
        config
    }

    /// A Go producer publishes the 20 envelopes in each form to a JetStream
    /// subject; our consumer (public API, library defaults but for the
    /// topic's encoding) handles all 20, equal field by field to what Go
    /// itself reads from the same bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn go_producer_to_our_consumer_over_nats() {
        let bin = peer("nats::go_producer_to_our_consumer_over_nats");
        for (form, encoding) in [
            (GoForm::Base64, PayloadEncoding::Base64),
            (GoForm::Raw, PayloadEncoding::Embedded),
            (GoForm::Base64, PayloadEncoding::Auto),
        ] {
            let topic = unique("interop-go2us");
            let broker = connect().await;
            broker.ensure_topic(&topic, 1).await.unwrap();
            let out = run_peer(
                bin,
                &["nats-publish", &nats_addr(), &topic, form.arg()],
                b"",
            );
            assert_eq!(out.trim(), "acked 20");
            let bus = EventBus::builder(broker)
                .config(config(&unique("g"), &topic, encoding))
                .build()
                .unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            bus.subscribe_envelope(&topic, move |e: Envelope| {
                let _ = tx.send(e);
                async { Ok(()) }
            })
            .await
            .unwrap();
            bus.start().await.unwrap();
            let written = data(form);
            let go_read = go_decode(bin, form, &written);
            let mut got = BTreeMap::new();
            while got.len() < 20 {
                let e = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                    .await
                    .expect("20 envelopes")
                    .unwrap();
                got.insert(e.aggregate_id.clone(), e);
            }
            for go in &go_read {
                let e = &got[go.aggregate_id.trim()];
                assert_eq!(
                    field_diffs(go, e),
                    Vec::<String>::new(),
                    "{form:?} as {encoding}"
                );
            }
            let stats = bus.consumer_stats().await.unwrap();
            let report = bus.close().await;
            assert_eq!(report.final_commit_error, None);
            assert_eq!(
                stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
                20
            );
            let _ = bus.broker().delete_topic(&topic).await;
        }
    }

    /// Our bus publishes the 20 envelopes in each encoding; the Go peer
    /// reads them from the stream (`$JS.API.STREAM.MSG.GET`) with the
    /// matching struct, and every field equals what we published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn our_publish_read_by_go_over_nats() {
        let bin = peer("nats::our_publish_read_by_go_over_nats");
        for form in [GoForm::Base64, GoForm::Raw] {
            let topic = unique("interop-us2go");
            let broker = connect().await;
            let stream = broker.config().stream_name(&topic);
            let bus = EventBus::builder(broker)
                .config(config(&unique("g"), &topic, form.ours()))
                .build()
                .unwrap();
            let envelopes: Vec<Envelope> = data(form)
                .iter()
                .map(|l| Envelope::decode_with(l, form.ours()).unwrap())
                .collect();
            for e in &envelopes {
                bus.publish_envelope(&topic, e).await.unwrap();
            }
            let out = run_peer(
                bin,
                &["nats-get", &nats_addr(), &stream, "1", "20", form.arg()],
                b"",
            );
            let go: Vec<GoDecoded> = out
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(go.len(), 20);
            for (go, e) in go.iter().zip(&envelopes) {
                assert!(go.ok, "Go rejects our {form:?}: {}", go.error);
                assert_eq!(field_diffs(go, e), Vec::<String>::new(), "{form:?}");
            }
            bus.close().await;
            let _ = bus.broker().delete_topic(&topic).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Through Kafka (librdkafka's mock cluster).

#[cfg(feature = "kafka")]
mod kafka {
    use super::*;
    use common::scenario::unique;
    use eventbus::broker::kafka::{KafkaBroker, KafkaConfig};
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{Message, Offset, TopicPartitionList};

    struct Mock {
        owner: BaseProducer,
        servers: String,
    }

    impl Mock {
        fn new() -> Mock {
            let owner: BaseProducer = ClientConfig::new()
                .set("test.mock.num.brokers", "1")
                .create()
                .expect("mock cluster");
            let servers = owner
                .client()
                .mock_cluster()
                .expect("mock cluster")
                .bootstrap_servers();
            // SAFETY: `owner` owns the mock cluster and outlives this call;
            // the setter only stores the value (a new group's first join
            // otherwise waits 3 s).
            unsafe {
                let cluster =
                    rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
                assert!(!cluster.is_null());
                rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
            }
            Mock { owner, servers }
        }

        /// The topic and its dead-letter topic (the mock cluster has no
        /// CreateTopics; the consumer checks the dead-letter topic at start).
        fn create_topic(&self, topic: &str) {
            let cluster = self.owner.client().mock_cluster().unwrap();
            cluster.create_topic(topic, 1, 1).expect("mock topic");
            cluster.create_topic(&format!("{topic}.dlq"), 1, 1).expect("mock dead-letter topic");
        }
    }

    fn kafka_config(servers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: servers.to_owned(),
            ..KafkaConfig::default()
        }
    }

    /// Envelopes exactly as Go wrote them (both forms), produced by a plain
    /// rdkafka producer, are handled by our consumer in the topic's
    /// encoding, equal field by field to what Go reads from the same bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn go_written_envelopes_through_kafka_to_our_consumer() {
        let bin = peer("kafka::go_written_envelopes_through_kafka_to_our_consumer");
        for (form, encoding) in [
            (GoForm::Base64, PayloadEncoding::Base64),
            (GoForm::Raw, PayloadEncoding::Embedded),
        ] {
            let mock = Mock::new();
            let topic = unique("interop-kgo2us");
            mock.create_topic(&topic);
            let written = go_encode(bin, form);
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &mock.servers)
                .create()
                .unwrap();
            for line in &written {
                // No key and no headers, like a producer that knows nothing of ours.
                producer
                    .send(BaseRecord::<(), [u8]>::to(&topic).payload(line))
                    .map_err(|(e, _)| e)
                    .unwrap();
            }
            producer.flush(Duration::from_secs(10)).unwrap();

            let broker = KafkaBroker::connect(kafka_config(&mock.servers))
                .await
                .unwrap();
            let mut config = BusConfig::default();
            config.consumer.group = unique("g");
            config.wire.topics.insert(topic.clone(), encoding);
            let bus = EventBus::builder(broker).config(config).build().unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            bus.subscribe_envelope(&topic, move |e: Envelope| {
                let _ = tx.send(e);
                async { Ok(()) }
            })
            .await
            .unwrap();
            bus.start().await.unwrap();
            let go_read = go_decode(bin, form, &written);
            let mut got = BTreeMap::new();
            while got.len() < 20 {
                let e = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                    .await
                    .expect("20 envelopes")
                    .unwrap();
                got.insert(e.aggregate_id.clone(), e);
            }
            for go in &go_read {
                assert_eq!(
                    field_diffs(go, &got[go.aggregate_id.trim()]),
                    Vec::<String>::new(),
                    "{form:?}"
                );
            }
            let report = bus.close().await;
            assert_eq!(report.final_commit_error, None);
        }
    }

    /// Our Kafka publish (both encodings), read by a plain rdkafka consumer
    /// and decoded by the Go peer with the matching struct: every field
    /// equals what we published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn our_kafka_publish_decoded_by_go() {
        let bin = peer("kafka::our_kafka_publish_decoded_by_go");
        for form in [GoForm::Base64, GoForm::Raw] {
            let mock = Mock::new();
            let topic = unique("interop-kus2go");
            mock.create_topic(&topic);
            let broker = KafkaBroker::connect(kafka_config(&mock.servers))
                .await
                .unwrap();
            let mut config = BusConfig::default();
            config.wire.payload_encoding = form.ours();
            let bus = EventBus::builder(broker).config(config).build().unwrap();
            let envelopes: Vec<Envelope> = data(form)
                .iter()
                .map(|l| Envelope::decode_with(l, form.ours()).unwrap())
                .collect();
            for e in &envelopes {
                bus.publish_envelope(&topic, e).await.unwrap();
            }
            bus.close().await;

            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &mock.servers)
                .set("group.id", unique("plain"))
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(&topic, 0, Offset::Beginning)
                .unwrap();
            consumer.assign(&assignment).unwrap();
            let lines = tokio::task::spawn_blocking(move || {
                let mut lines = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while lines.len() < 20 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "plain consumer: {} of 20 within 30 s",
                        lines.len()
                    );
                    match consumer.poll(Duration::from_millis(500)) {
                        Some(Ok(m)) => lines.push(m.payload().unwrap().to_vec()),
                        Some(Err(e)) => panic!("plain consumer: {e}"),
                        None => {}
                    }
                }
                lines
            })
            .await
            .unwrap();
            let go = go_decode(bin, form, &lines);
            for (go, e) in go.iter().zip(&envelopes) {
                assert!(go.ok, "Go rejects our {form:?}: {}", go.error);
                assert_eq!(field_diffs(go, e), Vec::<String>::new(), "{form:?}");
            }
        }
    }
}

/// `GO_ZERO_TIME` is what Go writes for its zero time, and what we read
/// for a missing timestamp (no Go needed).
#[test]
fn go_zero_time_is_year_one() {
    let e = Envelope::decode(&data(GoForm::Raw)[19]).unwrap();
    assert_eq!(e.timestamp, GO_ZERO_TIME);
}

// ---------------------------------------------------------------------------
// Configuration and the bus (no Go needed).

#[test]
fn wire_encoding_is_configured_bus_wide_with_per_topic_overrides_in_toml_and_yaml() {
    let toml = r#"
        [wire]
        payload_encoding = "auto"
        [wire.topics]
        "orders" = "base64"
        "audit.events" = "embedded"
    "#;
    let yaml = "wire:\n  payload_encoding: auto\n  topics:\n    orders: base64\n    audit.events: embedded\n";
    for config in [
        BusConfig::from_toml(toml).unwrap(),
        BusConfig::from_yaml(yaml).unwrap(),
    ] {
        assert_eq!(config.wire.encoding_for("orders"), PayloadEncoding::Base64);
        assert_eq!(
            config.wire.encoding_for("audit.events"),
            PayloadEncoding::Embedded
        );
        assert_eq!(
            config.wire.encoding_for("anything-else"),
            PayloadEncoding::Auto
        );
    }
    assert_eq!(
        BusConfig::default().wire.encoding_for("x"),
        PayloadEncoding::Embedded,
        "default: embedded"
    );
    let err = BusConfig::from_toml("[wire]\npayload_encoding = \"hex\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown variant `hex`"), "{err}");
    assert!(
        BusConfig::from_toml("[wire]\nencoding = \"base64\"\n").is_err(),
        "unknown keys are refused"
    );
}

/// Publishing writes each topic's configured form (seen raw on the broker);
/// subscribing reads it back into the same envelope; an envelope in the
/// wrong encoding for its topic is dead-lettered intact, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_publishes_and_reads_each_topics_encoding() {
    use eventbus::{Broker, MemoryBroker};
    let broker = MemoryBroker::default();
    let mut config = BusConfig::default();
    config.consumer.group = "interop-bus".into();
    config.consumer.retry.initial_backoff = Duration::from_millis(1);
    config.consumer.retry.max_backoff = Duration::from_millis(1);
    config
        .wire
        .topics
        .insert("seed".into(), PayloadEncoding::Base64);
    config
        .wire
        .topics
        .insert("auto".into(), PayloadEncoding::Auto);
    for t in ["seed", "plain", "auto"] {
        broker.ensure_topic(t, 1).await.unwrap();
    }
    let bus = EventBus::builder(broker.clone())
        .config(config)
        .build()
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for t in ["seed", "plain", "auto"] {
        let tx = tx.clone();
        bus.subscribe_envelope(t, move |e: Envelope| {
            let _ = tx.send((t, e));
            async { Ok(()) }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    let e = Envelope::new("order-1", "OrderCreated", 1, &serde_json::json!({"n": 1})).unwrap();
    // First, an embedded envelope of the same aggregate on the base64 topic:
    // dead-lettered, and (same aggregate, same partition) before the next one.
    let wrong = e.encode().unwrap();
    bus.publish("seed", Some(b"order-1"), e.to_headers(), wrong.clone())
        .await
        .unwrap();
    for t in ["seed", "plain", "auto"] {
        bus.publish_envelope(t, &e).await.unwrap();
    }
    let mut got = BTreeMap::new();
    for _ in 0..3 {
        let (t, e) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        got.insert(t, e);
    }
    assert!(got.values().all(|g| *g == e), "{got:?}");
    bus.close().await;
    let dead = broker.read_topic("seed.dlq");
    assert_eq!(dead.len(), 1, "the wrongly encoded one is dead-lettered");
    assert_eq!(dead[0].payload, wrong, "intact");
    let wire =
        |t: &str| String::from_utf8(broker.read_topic(t).last().unwrap().payload.clone()).unwrap();
    assert!(
        wire("seed").ends_with(r#""payload":"eyJuIjoxfQ=="}"#),
        "{}",
        wire("seed")
    );
    assert!(
        wire("plain").ends_with(r#""payload":{"n":1}}"#),
        "{}",
        wire("plain")
    );
    assert!(
        wire("auto").ends_with(r#""payload":{"n":1}}"#),
        "auto writes embedded: {}",
        wire("auto")
    );
}
