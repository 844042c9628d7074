#![cfg(not(feature = "loom"))]
//! Hostile input, end to end: nothing panics, nothing is lost, memory stays
//! bounded. These mirror the invariants of the cargo-fuzz targets in `fuzz/`
//! (run them with `scripts/fuzz`) under plain `cargo test`, and add the
//! limits a fuzzer rarely reaches (megabyte payloads, 100k-deep JSON,
//! thousands of headers). `docs/guarantees.md` maps each kind of bad input to
//! its typed error, where the event goes, and the test below that proves it.
//!
//! - `config_*`: `BusConfig::from_toml` / `from_yaml` return `Ok` (a config
//!   that validates) or a typed `ConfigError` for any text.
//! - `arbitrary_messages_*`: arbitrary payload, key and headers published to
//!   a one-partition topic of the memory broker, consumed by an `EventBus`
//!   with `subscribe_envelope`, followed by a valid sentinel: every message
//!   is handled once (a valid envelope, in aggregate order) or dead-lettered
//!   once to `<topic>.dlq` with `x-dlq-reason`, and after close the committed
//!   offset equals the end offset (the partition moved on).
//! - limits: > 1 MiB (`TooLarge`), deep nesting (`TooDeep`), 10k headers,
//!   invalid UTF-8 in keys and header values; allocations are counted per
//!   thread by a counting global allocator, so "bounded memory" is asserted,
//!   not assumed (the consumer runs on a current-thread runtime, so all of
//!   its work is on the test's thread).
//!
//! Property tests use a fixed seed (`PROPTEST_RNG_SEED` overrides it) and
//! honour `PROPTEST_CASES` (default 256; a consumer case, a bus run over up
//! to five messages, takes well under a millisecond in release).
//! Tests marked `#[ignore]` reproduce known library bugs (see
//! docs/guarantees.md); run them with `cargo test --test hostile_input -- --ignored`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus::broker::memory::MemorySession;
use eventbus::bus::{CloseReport, ConfigError, PublishError};
use eventbus::consumer::task_headers as dlq;
use eventbus::envelope::{
    extract_aggregate_id, validate_aggregate_id, EnvelopeError, IdSource, HEADER_AGGREGATE_ID,
    MAX_AGGREGATE_ID_LEN, MAX_ENVELOPE_BYTES, MAX_EVENT_TYPE_LEN, MAX_HEADERS_SCANNED,
    MAX_JSON_DEPTH,
};
use eventbus::pool::HandlerResult;
use eventbus::{
    Broker, BrokerError, BusConfig, Delivery, Envelope, EventBus, Headers, MemoryBroker,
    MemoryConfig, Outbound, Position, TopicPartition,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use serde_json::{json, Value};
use tokio::sync::Notify;

// ---------------------------------------------------------------- allocation counting

/// Counts the bytes each thread requests from the allocator (a realloc
/// counts its growth), an upper bound on what that thread's work can hold.
struct CountingAlloc;

thread_local! {
    static ALLOCATED: Cell<u64> = const { Cell::new(0) };
}

fn note_alloc(bytes: usize) {
    let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes as u64)));
}

// SAFETY: every call is forwarded unchanged to `System`; counting touches only
// a const-initialized thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size.saturating_sub(layout.size()));
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the bytes this thread allocated meanwhile.
fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATED.with(Cell::get);
    let r = f();
    (r, ALLOCATED.with(Cell::get) - before)
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------- proptest setup

/// Fixed seed unless `PROPTEST_RNG_SEED` is set; `PROPTEST_CASES` if set,
/// else `default_cases`; no regression files written into the tree.
fn proptest_config(default_cases: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    let rng_seed = if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
        base.rng_seed
    } else {
        RngSeed::Fixed(0x00e7_e10b_4057_11e0)
    };
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() {
        base.cases
    } else {
        default_cases
    };
    ProptestConfig {
        cases,
        rng_seed,
        failure_persistence: None,
        ..base
    }
}

// ---------------------------------------------------------------- the consumer harness

const TOPIC: &str = "hostile";
const DLQ_TOPIC: &str = "hostile.dlq";
const GROUP: &str = "hostile-test";
const SENTINEL_TYPE: &str = "HostileSentinel";
/// Not a synchronization: how long a stuck partition is given before the
/// test reports it. A healthy run handles the sentinel in microseconds.
const STUCK_AFTER: Duration = Duration::from_secs(30);

/// One message as a hostile producer publishes it, bypassing envelope checks.
#[derive(Debug, Clone)]
struct Hostile {
    key: Option<Vec<u8>>,
    headers: Headers,
    payload: Vec<u8>,
}

impl Hostile {
    fn payload(payload: impl Into<Vec<u8>>) -> Self {
        Hostile {
            key: None,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }
}

/// What a run through the consumer left behind.
struct Run {
    /// Envelopes handled successfully (sentinel included), in handling order.
    handled: Vec<Envelope>,
    dead: Vec<Delivery>,
    committed: Option<u64>,
    end: u64,
    report: CloseReport,
}

/// The valid event published behind the hostile ones (fixed, so it compares equal).
fn sentinel() -> Envelope {
    Envelope::new("sentinel", SENTINEL_TYPE, 1, &json!({"last": true}))
        .unwrap()
        .with_timestamp(time::macros::datetime!(2024-01-02 15:04:05 UTC))
}

fn bus_config() -> BusConfig {
    let mut config = BusConfig::default();
    config.consumer.group = GROUP.into();
    // Only the final commit at close matters here.
    config.consumer.commit_interval = Duration::from_secs(3600);
    config.consumer.retry.initial_backoff = Duration::from_millis(1);
    config.consumer.retry.max_backoff = Duration::from_millis(2);
    config.pool.concurrency = 4;
    config.pool.capacity = 64;
    config
}

/// A fresh current-thread runtime: everything the bus spawns runs on the
/// calling thread (which the allocation counter relies on).
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn memory_broker() -> MemoryBroker {
    MemoryBroker::new(MemoryConfig {
        default_partitions: 1,
        ..MemoryConfig::default()
    })
}

/// Publishes `inputs` to a one-partition topic, runs a bus over it whose
/// handler accepts an envelope when `check` says so (the sentinel always),
/// publishes the sentinel behind them, waits for it, closes, and collects.
async fn deliver_to<B: Broker + Clone>(
    broker: B,
    memory: &MemoryBroker,
    inputs: &[Hostile],
    config: BusConfig,
    check: impl Fn(&Envelope) -> Result<(), String> + Send + Sync + 'static,
) -> Run {
    for (i, m) in inputs.iter().enumerate() {
        let msg = Outbound {
            topic: TOPIC.into(),
            key: m.key.clone(),
            headers: m.headers.clone(),
            payload: m.payload.clone(),
        };
        let at = memory.publish(msg).await.expect("memory publish");
        assert_eq!((at.partition, at.offset), (0, i as u64));
    }
    let bus = EventBus::builder(broker)
        .config(config)
        .build()
        .expect("valid config");
    let handled = Arc::new(Mutex::new(Vec::<Envelope>::new()));
    let sentinel_seen = Arc::new(Notify::new());
    let check = Arc::new(check);
    {
        let (handled, seen) = (handled.clone(), sentinel_seen.clone());
        bus.subscribe_envelope(TOPIC, move |e: Envelope| {
            let is_sentinel = e.event_type == SENTINEL_TYPE;
            let result: HandlerResult = if is_sentinel {
                Ok(())
            } else {
                check(&e).map_err(Into::into)
            };
            if result.is_ok() {
                handled.lock().unwrap().push(e);
            }
            if is_sentinel {
                seen.notify_one();
            }
            async move { result }
        })
        .await
        .expect("subscribe");
    }
    bus.start().await.expect("start");
    let at = bus
        .publish_envelope(TOPIC, &sentinel())
        .await
        .expect("sentinel publish");
    assert_eq!(
        (at.partition, at.offset),
        (0, inputs.len() as u64),
        "one partition: the sentinel comes last"
    );
    if tokio::time::timeout(STUCK_AFTER, sentinel_seen.notified())
        .await
        .is_err()
    {
        panic!(
            "the sentinel behind {} hostile messages was not handled within {STUCK_AFTER:?}",
            inputs.len()
        );
    }
    let report = bus.close().await;
    let tp = TopicPartition::new(TOPIC, 0);
    let handled = std::mem::take(&mut *handled.lock().unwrap());
    Run {
        handled,
        dead: memory.read_topic(DLQ_TOPIC),
        committed: memory.committed(GROUP, &tp),
        end: memory.end_offset(&tp),
        report,
    }
}

async fn deliver(inputs: &[Hostile]) -> Run {
    let broker = memory_broker();
    deliver_to(broker.clone(), &broker, inputs, bus_config(), |_| Ok(())).await
}

fn last_header<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// The dead letter of the input at `offset` (found by its origin header,
/// the last one: inputs may carry forged `x-dlq-*` headers of their own).
fn dead_letter_of(run: &Run, offset: usize) -> Vec<&Delivery> {
    let offset = offset.to_string();
    run.dead
        .iter()
        .filter(|d| last_header(&d.headers, dlq::DLQ_ORIGIN_OFFSET) == Some(offset.as_bytes()))
        .collect()
}

/// The contract for a run with a handler that accepts everything: each
/// valid envelope handled exactly once, per aggregate in offset order; each
/// invalid message dead-lettered exactly once, intact, with the decode
/// error; the partition committed to its end; nothing handed back.
fn check_run(inputs: &[Hostile], run: &Run) -> Result<(), TestCaseError> {
    let n = inputs.len() as u64;
    prop_assert_eq!(
        &run.report,
        &CloseReport::default(),
        "close drained everything and committed"
    );
    prop_assert_eq!(run.end, n + 1);
    prop_assert_eq!(
        run.committed,
        Some(n + 1),
        "the committed offset after close is the end offset"
    );

    let mut expected: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
    let mut invalid = 0;
    for (offset, m) in inputs.iter().enumerate() {
        match Envelope::decode(&m.payload) {
            Ok(e) => expected.entry(e.aggregate_id.clone()).or_default().push(e),
            Err(err) => {
                invalid += 1;
                let dead = dead_letter_of(run, offset);
                prop_assert_eq!(
                    dead.len(),
                    1,
                    "offset {} must be dead-lettered exactly once",
                    offset
                );
                let d = dead[0];
                prop_assert_eq!(&d.payload, &m.payload, "the dead letter keeps the payload");
                prop_assert_eq!(&d.key, &m.key, "the dead letter keeps the key");
                prop_assert!(
                    d.headers.starts_with(&m.headers),
                    "the dead letter keeps the headers, first"
                );
                let added = &d.headers[m.headers.len()..];
                prop_assert_eq!(last_header(added, dlq::DLQ_REASON), Some(&b"decode"[..]));
                let error = err.to_string();
                prop_assert_eq!(last_header(added, dlq::DLQ_ERROR), Some(error.as_bytes()));
                prop_assert_eq!(last_header(added, dlq::DLQ_ATTEMPTS), Some(&b"0"[..]));
                prop_assert_eq!(
                    last_header(added, dlq::DLQ_ORIGIN_TOPIC),
                    Some(TOPIC.as_bytes())
                );
                prop_assert_eq!(
                    last_header(added, dlq::DLQ_ORIGIN_PARTITION),
                    Some(&b"0"[..])
                );
            }
        }
    }
    prop_assert_eq!(
        run.dead.len(),
        invalid,
        "only invalid messages are dead-lettered"
    );
    let s = sentinel();
    expected.entry(s.aggregate_id.clone()).or_default().push(s);
    let mut got: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
    for e in &run.handled {
        got.entry(e.aggregate_id.clone())
            .or_default()
            .push(e.clone());
    }
    prop_assert_eq!(
        got,
        expected,
        "per aggregate: every valid envelope once, in offset order"
    );
    Ok(())
}

// ---------------------------------------------------------------- strategies

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        "[\\[\\]{}\"\\\\ ,:]{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A few aggregates only, so runs have several events of one aggregate.
fn aggregate() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["a", "b", "order-1", "sentinel"]).prop_map(str::to_owned),
        1 => "[A-Za-z0-9:_./-]{1,40}",
    ]
}

fn valid_envelope() -> impl Strategy<Value = Envelope> {
    (
        aggregate(),
        "\\PC{1,24}".prop_filter("not blank", |s| !s.trim().is_empty()),
        1..=1000i64,
        json_value().prop_filter("not null", |v| !v.is_null()),
        prop::option::of("[0-9a-f]{8}"),
    )
        .prop_map(|(id, ty, version, payload, trace)| {
            let e = Envelope::new(id, ty, version, &payload).unwrap();
            match trace {
                Some(t) => e.with_trace_id(t),
                None => e,
            }
        })
}

/// Bytes that are sometimes envelopes, sometimes near misses, sometimes garbage.
fn payload_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => valid_envelope().prop_map(|e| e.encode().unwrap()),
        2 => (valid_envelope(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(e, i, b)| {
            let mut bytes = e.encode().unwrap();
            let i = i.index(bytes.len());
            bytes[i] = b;
            bytes
        }),
        1 => (valid_envelope(), any::<prop::sample::Index>()).prop_map(|(e, i)| {
            let mut bytes = e.encode().unwrap();
            bytes.truncate(i.index(bytes.len()));
            bytes
        }),
        1 => prop::collection::btree_map(
            prop::sample::select(vec![
                "aggregate_id", "event_type", "event_version", "timestamp", "trace_id", "correlation_id", "payload", "x",
            ]),
            json_value(),
            0..8,
        )
        .prop_map(|m| serde_json::to_vec(&m).unwrap()),
        1 => (1usize..400).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
        2 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// Keys and header values: valid IDs, near misses, invalid UTF-8, too long.
fn id_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        aggregate().prop_map(String::into_bytes),
        "[A-Za-z0-9 #.\r\n]{0,8}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..64),
        (MAX_AGGREGATE_ID_LEN + 1..MAX_AGGREGATE_ID_LEN + 64).prop_map(|n| vec![b'a'; n]),
    ]
}

fn headers() -> impl Strategy<Value = Headers> {
    let name = prop_oneof![
        Just(HEADER_AGGREGATE_ID.to_owned()),
        Just("aggregate-id".to_owned()),
        Just(dlq::DLQ_REASON.to_owned()),
        Just(dlq::DLQ_ORIGIN_OFFSET.to_owned()),
        "\\PC{0,12}",
    ];
    prop::collection::vec((name, id_ish_bytes()), 0..6)
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (prop::option::of(id_ish_bytes()), headers(), payload_bytes()).prop_map(
        |(key, headers, payload)| Hostile {
            key,
            headers,
            payload,
        },
    )
}

// ---------------------------------------------------------------- consumer properties

proptest! {
    #![proptest_config(proptest_config(256))]

    /// The `consumer_delivery` fuzz target's invariant, several messages at once.
    #[test]
    fn arbitrary_messages_end_handled_or_dead_lettered_and_the_partition_moves_on(
        inputs in prop::collection::vec(hostile(), 1..6),
    ) {
        let run = block_on(deliver(&inputs));
        check_run(&inputs, &run)?;
    }
}

// ---------------------------------------------------------------- envelope and ID properties

proptest! {
    #![proptest_config(proptest_config(256))]

    /// The `envelope_decode` fuzz target's invariant.
    #[test]
    fn decode_is_typed_and_whatever_decodes_round_trips(bytes in payload_bytes()) {
        if let Ok(e) = Envelope::decode(&bytes) {
            prop_assert_eq!(e.validate(), Ok(()));
            let again = e.encode().unwrap();
            prop_assert_eq!(Envelope::decode(&again).unwrap(), e.clone());
            prop_assert_eq!(Envelope::decode(&again).unwrap().encode().unwrap(), again);
            prop_assert!(e.payload_as::<serde::de::IgnoredAny>().is_ok());
        }
    }

    /// The `aggregate_id` fuzz target's invariant.
    #[test]
    fn extracted_ids_are_always_valid(
        payload in payload_bytes(),
        headers in headers(),
        key in prop::option::of(id_ish_bytes()),
        subject in prop::option::of("\\PC{0,40}"),
    ) {
        if let Some(id) = extract_aggregate_id(&payload, &headers, key.as_deref(), subject.as_deref()) {
            prop_assert_eq!(validate_aggregate_id(&id.id), Ok(()));
        }
    }
}

// ---------------------------------------------------------------- configuration

const CONFIG_KEYS: [&str; 11] = [
    "concurrency",
    "capacity",
    "wait_timeout",
    "group",
    "commit_interval",
    "revoke_timeout",
    "dead_letter_suffix",
    "max_attempts",
    "initial_backoff",
    "max_backoff",
    "close_timeout",
];

const CONFIG_VALUES: [&str; 18] = [
    "0",
    "1",
    "-1",
    "64",
    "9223372036854775807",
    "18446744073709551615",
    "1e3",
    "1.5",
    "nan",
    "\"\"",
    "\" \"",
    "\"g\"",
    "true",
    "[1, 2]",
    "{}",
    "~",
    "null",
    "0x10",
];

/// Keys the `Invalid` error may name.
const VALIDATED_KEYS: [&str; 6] = [
    "pool.concurrency",
    "pool.capacity",
    "consumer.retry.max_attempts",
    "consumer.group",
    "consumer.dead_letter_suffix",
    "consumer.commit_interval",
];

fn toml_doc() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "",
        "[pool]",
        "[consumer]",
        "[consumer.retry]",
        "[bogus]",
        "[[pool]]",
        "[pool",
    ]);
    let key = prop_oneof![4 => prop::sample::select(CONFIG_KEYS.to_vec()).prop_map(str::to_owned), 1 => "\\PC{0,8}"];
    let value = prop_oneof![4 => prop::sample::select(CONFIG_VALUES.to_vec()).prop_map(str::to_owned), 1 => "\\PC{0,8}"];
    let line = (section, key, value).prop_map(|(s, k, v)| {
        if s.is_empty() {
            format!("{k} = {v}")
        } else {
            format!("{s}\n{k} = {v}")
        }
    });
    prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
}

fn yaml_doc() -> impl Strategy<Value = String> {
    let parent = prop::sample::select(vec!["", "pool", "consumer", "retry", "bogus"]);
    let key = prop_oneof![4 => prop::sample::select(CONFIG_KEYS.to_vec()).prop_map(str::to_owned), 1 => "\\PC{0,8}"];
    let value = prop_oneof![
        4 => prop::sample::select(CONFIG_VALUES.to_vec()).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["&a 1", "*a", "!!binary aGk=", "{concurrency: 2}", "|\n  x", "? x"]).prop_map(str::to_owned),
        1 => "\\PC{0,8}",
    ];
    let indent = 0..3usize;
    let line = (parent, key, value, indent).prop_map(|(p, k, v, i)| {
        let pad = " ".repeat(i * 2);
        if p.is_empty() {
            format!("{pad}{k}: {v}")
        } else {
            format!("{pad}{p}:\n{pad}  {k}: {v}")
        }
    });
    prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
}

fn check_config(parsed: Result<BusConfig, ConfigError>, yaml: bool) -> Result<(), TestCaseError> {
    match parsed {
        Ok(config) => prop_assert!(
            config.validate().is_ok(),
            "accepted a config that does not validate"
        ),
        Err(ConfigError::Toml(e)) => prop_assert!(!yaml && !e.to_string().is_empty()),
        Err(ConfigError::Yaml(e)) => prop_assert!(yaml && !e.to_string().is_empty()),
        Err(ConfigError::Invalid { key, reason }) => {
            prop_assert!(VALIDATED_KEYS.contains(&key), "unexpected key {}", key);
            prop_assert!(!reason.is_empty());
        }
        Err(e @ (ConfigError::Broker(_) | ConfigError::Read { .. })) => prop_assert!(false, "no [broker] section, no file: {}", e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(256))]

    /// The `config` fuzz target's invariant: `Ok` or a typed error, for any text.
    #[test]
    fn config_parsing_never_panics_on_arbitrary_text(text in any::<String>()) {
        check_config(BusConfig::from_toml(&text), false)?;
        check_config(BusConfig::from_yaml(&text), true)?;
    }

    #[test]
    fn config_parsing_never_panics_on_config_shaped_toml(text in toml_doc()) {
        check_config(BusConfig::from_toml(&text), false)?;
    }

    #[test]
    fn config_parsing_never_panics_on_config_shaped_yaml(text in yaml_doc()) {
        check_config(BusConfig::from_yaml(&text), true)?;
    }
}

#[test]
fn config_errors_are_typed_and_name_the_key() {
    let invalid = |r: Result<BusConfig, ConfigError>| match r {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected ConfigError::Invalid, got {other:?}"),
    };
    let cases = [
        ("[pool]\nconcurrency = 0", "pool.concurrency"),
        ("[pool]\ncapacity = 0", "pool.capacity"),
        (
            "[consumer.retry]\nmax_attempts = 0",
            "consumer.retry.max_attempts",
        ),
        ("[consumer]\ngroup = \"  \"", "consumer.group"),
        (
            "[consumer]\ndead_letter_suffix = \"\"",
            "consumer.dead_letter_suffix",
        ),
        (
            "[consumer]\ncommit_interval = 0",
            "consumer.commit_interval",
        ),
    ];
    for (toml, key) in cases {
        assert_eq!(invalid(BusConfig::from_toml(toml)), key, "{toml}");
        let yaml = toml
            .replace("[consumer.retry]\n", "consumer:\n  retry:\n    ")
            .replace("[pool]\n", "pool:\n  ")
            .replace("[consumer]\n", "consumer:\n  ")
            .replace(" = ", ": ");
        assert_eq!(invalid(BusConfig::from_yaml(&yaml)), key, "{yaml}");
    }
    for bad in [
        "[pool]\nworkers = 8",
        "[pool]\nconcurrency = -1",
        "[pool]\nconcurrency = \"8\"",
        "close_timeout = 1.5",
        "[pool",
        "x",
    ] {
        assert!(
            matches!(BusConfig::from_toml(bad), Err(ConfigError::Toml(_))),
            "{bad}"
        );
    }
    for bad in [
        "pool: {workers: 8}",
        "pool: {concurrency: -1}",
        "close_timeout: 1.5",
        "pool: [",
        "pool: *nowhere",
        "- 1",
    ] {
        assert!(
            matches!(BusConfig::from_yaml(bad), Err(ConfigError::Yaml(_))),
            "{bad}"
        );
    }
    // Empty documents are the defaults; `~` means no close timeout.
    assert_eq!(BusConfig::from_toml("").unwrap(), BusConfig::default());
    assert_eq!(
        BusConfig::from_yaml("close_timeout: ~").unwrap(),
        BusConfig::default()
    );
}

/// An accepted config with extreme values (every duration u64::MAX ms, an
/// unbounded capacity) runs: subscribe, a rebalance with a revoke (which
/// computes `now + revoke_timeout`), handling, and a bounded close.
#[test]
fn accepted_config_with_extreme_durations_runs() {
    let max = u64::MAX;
    let yaml = format!(
        "close_timeout: {max}\npool: {{concurrency: 4, capacity: {max}, wait_timeout: {max}}}\n\
         consumer: {{group: extreme, commit_interval: {max}, revoke_timeout: {max},\n  \
         retry: {{max_attempts: 4294967295, initial_backoff: {max}, max_backoff: {max}}}}}\n"
    );
    let config = BusConfig::from_yaml(&yaml).expect("extreme but valid");
    assert_eq!(config.pool.capacity, usize::MAX);
    block_on(async {
        let broker = MemoryBroker::new(MemoryConfig {
            default_partitions: 2,
            ..MemoryConfig::default()
        });
        let done = Arc::new(Notify::new());
        let mut buses = Vec::new();
        for _ in 0..2 {
            let bus = EventBus::builder(broker.clone())
                .config(config.clone())
                .build()
                .unwrap();
            let done = done.clone();
            bus.subscribe_envelope(TOPIC, move |_| {
                done.notify_one();
                async { Ok(()) }
            })
            .await
            .unwrap();
            // The second member joining makes the first revoke a partition.
            bus.start().await.unwrap();
            buses.push(bus);
        }
        assert!(broker.rebalances(GROUP) == 0 && broker.rebalances("extreme") >= 2);
        for i in 0..4 {
            let e = Envelope::new(format!("agg-{i}"), "T", 1, &json!(i)).unwrap();
            buses[0].publish_envelope(TOPIC, &e).await.unwrap();
            tokio::time::timeout(STUCK_AFTER, done.notified())
                .await
                .expect("handled");
        }
        for bus in buses {
            assert_eq!(bus.close().await, CloseReport::default());
        }
    });
}

/// Was a bug (see docs/guarantees.md): `validate` set no upper bound on
/// `pool.concurrency`, so a config that parses makes `build` panic
/// ("capacity overflow" in `Pool::new`) — or, with a merely large value such
/// as 100000000, spawn that many worker tasks. Must either be rejected as
/// `ConfigError::Invalid { key: "pool.concurrency" }` or build and close.
#[test]
fn accepted_config_with_huge_concurrency_is_rejected_or_runs() {
    match BusConfig::from_toml("[pool]\nconcurrency = 9223372036854775807\n") {
        Err(ConfigError::Invalid {
            key: "pool.concurrency",
            ..
        }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(config) => block_on(async {
            let bus = EventBus::builder(MemoryBroker::default())
                .config(config)
                .build()
                .expect("accepted config builds");
            bus.close().await;
        }),
    }
}

// ---------------------------------------------------------------- huge payloads

/// A valid envelope whose encoding is exactly `size` bytes.
fn envelope_of_size(size: usize) -> Envelope {
    let mut e = Envelope::new("big-1", "Big", 1, &"").unwrap();
    let overhead = serde_json::to_vec(&e).unwrap().len() - 2;
    e.payload = format!("\"{}\"", "x".repeat(size - overhead - 2)).into_bytes();
    assert_eq!(serde_json::to_vec(&e).unwrap().len(), size);
    e
}

#[test]
fn payload_over_one_mib_is_dead_lettered_as_too_large_with_bounded_memory() {
    let size = MAX_ENVELOPE_BYTES + 1;
    let too_large = serde_json::to_vec(&envelope_of_size(size)).unwrap();
    let err = EnvelopeError::TooLarge {
        size,
        limit: MAX_ENVELOPE_BYTES,
    };
    // Rejected before parsing: no allocation at all.
    let (decoded, bytes) = allocated_by(|| Envelope::decode(&too_large));
    assert_eq!(decoded, Err(err.clone()));
    assert_eq!(
        bytes, 0,
        "a too-large envelope is rejected before anything is allocated"
    );
    let garbage = vec![b'{'; 64 * MIB as usize];
    let (decoded, bytes) = allocated_by(|| Envelope::decode(&garbage));
    assert!(matches!(decoded, Err(EnvelopeError::TooLarge { .. })));
    assert_eq!(bytes, 0);

    let inputs = [
        Hostile::payload(too_large.clone()),
        Hostile::payload(envelope_of_size(MAX_ENVELOPE_BYTES).encode().unwrap()),
    ];
    let (run, bytes) = allocated_by(|| block_on(deliver(&inputs)));
    check_run(&inputs, &run).unwrap();
    let dead = dead_letter_of(&run, 0);
    assert_eq!(
        last_header(&dead[0].headers, dlq::DLQ_ERROR),
        Some(err.to_string().as_bytes())
    );
    assert_eq!(
        run.handled.len(),
        2,
        "exactly 1 MiB is still accepted and handled"
    );
    eprintln!(
        "2 x 1 MiB through the consumer: {} KiB allocated",
        bytes / KIB
    );
    // Two ~1 MiB messages published, delivered, one dead-lettered, read back:
    // a handful of copies each, never more.
    assert!(
        bytes < 16 * MIB,
        "the run allocated {} MiB for 2 MiB of messages",
        bytes / MIB
    );
}

#[test]
fn publishing_an_envelope_over_one_mib_is_rejected_and_nothing_is_stored() {
    block_on(async {
        let broker = memory_broker();
        let bus = EventBus::builder(broker.clone())
            .config(bus_config())
            .build()
            .unwrap();
        let e = envelope_of_size(MAX_ENVELOPE_BYTES + 1);
        let err = bus.publish_envelope(TOPIC, &e).await.unwrap_err();
        assert!(
            matches!(err, PublishError::Envelope(EnvelopeError::TooLarge { size, limit }) if size == MAX_ENVELOPE_BYTES + 1 && limit == MAX_ENVELOPE_BYTES),
            "{err:?}"
        );
        assert_eq!(broker.partitions(TOPIC), None, "nothing reached the broker");
        bus.close().await;
    });
}

#[test]
fn publishing_an_invalid_envelope_is_rejected_with_its_typed_error() {
    let base = Envelope::new("order-1", "OrderCreated", 1, &json!({"amount": 12})).unwrap();
    let with = |f: &dyn Fn(&mut Envelope)| {
        let mut e = base.clone();
        f(&mut e);
        e
    };
    let deep = format!(
        "{}1{}",
        "[".repeat(MAX_JSON_DEPTH),
        "]".repeat(MAX_JSON_DEPTH)
    );
    let cases: Vec<(Envelope, EnvelopeError)> = vec![
        (
            with(&|e| e.aggregate_id = " ".into()),
            EnvelopeError::EmptyAggregateId,
        ),
        (
            with(&|e| e.aggregate_id = "a".repeat(MAX_AGGREGATE_ID_LEN + 1)),
            EnvelopeError::AggregateIdTooLong {
                len: MAX_AGGREGATE_ID_LEN + 1,
                limit: MAX_AGGREGATE_ID_LEN,
            },
        ),
        (
            with(&|e| e.aggregate_id = "a b".into()),
            EnvelopeError::InvalidAggregateIdChar {
                ch: ' ',
                position: 1,
            },
        ),
        (
            with(&|e| e.event_type = "".into()),
            EnvelopeError::EmptyEventType,
        ),
        (
            with(&|e| e.event_type = "T".repeat(MAX_EVENT_TYPE_LEN + 1)),
            EnvelopeError::FieldTooLong {
                field: "event_type",
                len: MAX_EVENT_TYPE_LEN + 1,
                limit: MAX_EVENT_TYPE_LEN,
            },
        ),
        (
            with(&|e| e.trace_id = Some("t\r\n".into())),
            EnvelopeError::ControlCharacter { field: "trace_id" },
        ),
        (
            with(&|e| e.event_version = 0),
            EnvelopeError::NonPositiveVersion(0),
        ),
        (
            with(&|e| e.payload = b"null".to_vec()),
            EnvelopeError::NullPayload,
        ),
        (
            with(&|e| e.payload = deep.clone().into_bytes()),
            EnvelopeError::TooDeep {
                limit: MAX_JSON_DEPTH,
            },
        ),
    ];
    block_on(async {
        let broker = memory_broker();
        let bus = EventBus::builder(broker.clone())
            .config(bus_config())
            .build()
            .unwrap();
        for (e, want) in cases {
            match bus.publish_envelope(TOPIC, &e).await {
                Err(PublishError::Envelope(got)) => assert_eq!(got, want),
                other => panic!("expected {want:?}, got {other:?}"),
            }
        }
        let ts = time::macros::datetime!(-0001-12-31 23:00:00 UTC);
        assert!(matches!(
            bus.publish_envelope(TOPIC, &base.clone().with_timestamp(ts))
                .await,
            Err(PublishError::Envelope(EnvelopeError::InvalidTimestamp(_)))
        ));
        assert_eq!(broker.partitions(TOPIC), None, "nothing reached the broker");
        bus.close().await;
    });
}

// ---------------------------------------------------------------- deep nesting

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn envelope_with_payload_text(payload: &str) -> Vec<u8> {
    format!(
        r#"{{"aggregate_id":"deep-1","event_type":"Deep","event_version":1,"timestamp":"2024-01-02T15:04:05Z","payload":{payload}}}"#
    )
    .into_bytes()
}

#[test]
fn deeply_nested_json_is_dead_lettered_as_too_deep_without_recursion() {
    let too_deep = EnvelopeError::TooDeep {
        limit: MAX_JSON_DEPTH,
    };
    let bracket_mib = vec![b'['; MAX_ENVELOPE_BYTES];
    let deep_payload = envelope_with_payload_text(&nested(100_000));
    let deep_unknown_field = String::from_utf8(envelope_with_payload_text("1"))
        .unwrap()
        .replace(
            r#""payload":1"#,
            &format!(
                r#""payload":1,"x":{}"#,
                "{\"a\":".repeat(50_000) + "1" + &"}".repeat(50_000)
            ),
        );
    for bytes in [
        &bracket_mib,
        &deep_payload,
        &deep_unknown_field.clone().into_bytes(),
    ] {
        // One pass over the bytes, no parser recursion, (almost) no allocation.
        let (decoded, allocated) = allocated_by(|| Envelope::decode(bytes));
        assert_eq!(decoded, Err(too_deep.clone()));
        assert!(
            allocated < KIB,
            "rejecting deep JSON allocated {allocated} bytes"
        );
    }
    // The deepest accepted payload (127 levels inside the envelope) is handled,
    // and its handler can parse it with serde_json's defaults.
    let deepest = envelope_with_payload_text(&nested(MAX_JSON_DEPTH - 1));
    let inputs = [
        Hostile::payload(bracket_mib),
        Hostile::payload(deep_payload),
        Hostile::payload(deepest),
        Hostile::payload(deep_unknown_field),
    ];
    let broker = memory_broker();
    let run = block_on(deliver_to(
        broker.clone(),
        &broker,
        &inputs,
        bus_config(),
        |e| {
            e.payload_as::<Value>()
                .map(drop)
                .map_err(|err| err.to_string())
        },
    ));
    check_run(&inputs, &run).unwrap();
    for offset in [0, 1, 3] {
        assert_eq!(
            last_header(&dead_letter_of(&run, offset)[0].headers, dlq::DLQ_ERROR),
            Some(too_deep.to_string().as_bytes())
        );
    }
}

// ---------------------------------------------------------------- many headers

#[test]
fn ten_thousand_headers_are_carried_and_scanned_only_up_to_the_limit() {
    let mut headers: Headers = (0..10_000)
        .map(|i| (format!("h{i}"), vec![0xff; 64]))
        .collect();
    headers[MAX_HEADERS_SCANNED] = (HEADER_AGGREGATE_ID.into(), b"beyond-the-limit".to_vec());
    // Extraction skips what it cannot use without copying it.
    let (found, allocated) =
        allocated_by(|| extract_aggregate_id(b"not json", &headers, Some(b"the-key"), None));
    let found = found.unwrap();
    assert_eq!(
        (found.id.as_str(), found.source),
        ("the-key", IdSource::Key)
    );
    assert!(
        allocated < KIB,
        "extraction over 10k headers allocated {allocated} bytes"
    );
    let hostile: Headers = (0..100_000)
        .map(|i| {
            (
                if i % 2 == 0 {
                    "X-Aggregate-ID"
                } else {
                    "aggregate-id"
                }
                .to_owned(),
                vec![b'a'; MAX_AGGREGATE_ID_LEN + 1 + i % 300],
            )
        })
        .collect();
    let dots = ".".repeat(100_000);
    let (found, allocated) =
        allocated_by(|| extract_aggregate_id(b"", &hostile, None, Some(&dots)));
    assert_eq!(found, None);
    assert!(
        allocated < KIB,
        "extraction over 100k hostile headers allocated {allocated} bytes"
    );

    // Through the consumer: an undecodable message with 10k headers is
    // dead-lettered with all of them; a valid one is handled.
    let valid = Envelope::new("many-headers", "T", 1, &json!(1))
        .unwrap()
        .encode()
        .unwrap();
    let inputs = [
        Hostile {
            key: Some(b"k".to_vec()),
            headers: headers.clone(),
            payload: b"garbage".to_vec(),
        },
        Hostile {
            key: None,
            headers,
            payload: valid,
        },
    ];
    let (run, allocated) = allocated_by(|| block_on(deliver(&inputs)));
    check_run(&inputs, &run).unwrap();
    assert_eq!(run.dead[0].headers.len(), 10_000 + 6);
    eprintln!(
        "10k headers through the consumer: {} KiB allocated",
        allocated / KIB
    );
    assert!(
        allocated < 32 * MIB,
        "10k headers (~700 KiB) took {} MiB",
        allocated / MIB
    );
}

// ---------------------------------------------------------------- invalid UTF-8

#[test]
fn invalid_utf8_in_keys_and_headers_is_carried_byte_for_byte() {
    let valid = Envelope::new("utf8-1", "T", 1, &json!({"k": "é"}))
        .unwrap()
        .encode()
        .unwrap();
    let bad_headers: Headers = vec![
        (HEADER_AGGREGATE_ID.into(), vec![0xc3, 0x28]),
        ("aggregate-id".into(), vec![0xff, 0xfe, 0xfd]),
        ("x-bin".into(), (0..=255u8).collect()),
        ("".into(), Vec::new()),
    ];
    let inputs = [
        // Undecodable; no usable ID anywhere (the pool runs it unkeyed).
        Hostile {
            key: Some(vec![0xff; 300]),
            headers: bad_headers.clone(),
            payload: vec![0xc0, 0xaf, b'{'],
        },
        // Valid envelope: its aggregate ID wins over the unusable key and headers.
        Hostile {
            key: Some(vec![0x80]),
            headers: bad_headers.clone(),
            payload: valid,
        },
        // Invalid UTF-8 inside the JSON.
        Hostile {
            key: Some(b"utf8-1".to_vec()),
            headers: bad_headers,
            payload: b"{\"aggregate_id\":\"\xff\"}".to_vec(),
        },
    ];
    let run = block_on(deliver(&inputs));
    check_run(&inputs, &run).unwrap();
    assert_eq!(run.dead.len(), 2);
    assert_eq!(run.handled.len(), 2);
}

// ---------------------------------------------------------------- valid JSON that Value cannot hold

/// Decode skips over the payload like serde_json's `RawValue` does, so it
/// accepts JSON that `serde_json::Value` refuses: numbers beyond f64 and
/// unpaired UTF-16 surrogate escapes (Go's `json.Valid` accepts both too).
/// Such an envelope is delivered; a handler that cannot read it fails, is
/// retried, and the event is dead-lettered with reason `handler`.
#[test]
fn payload_that_value_cannot_hold_is_delivered_and_a_failing_handler_dead_letters_it() {
    let inputs: Vec<Hostile> = [r#""\ud800""#, "1e400", r#"{"n":[-1e999]}"#]
        .iter()
        .map(|p| Hostile::payload(envelope_with_payload_text(p)))
        .collect();
    for m in &inputs {
        let e = Envelope::decode(&m.payload).unwrap();
        assert!(e.payload_as::<serde::de::IgnoredAny>().is_ok());
        assert!(matches!(
            e.payload_as::<Value>(),
            Err(EnvelopeError::Payload(_))
        ));
    }
    let broker = memory_broker();
    let run = block_on(deliver_to(
        broker.clone(),
        &broker,
        &inputs,
        bus_config(),
        |e| {
            e.payload_as::<Value>()
                .map(drop)
                .map_err(|err| err.to_string())
        },
    ));
    assert_eq!(run.report, CloseReport::default());
    assert_eq!(
        (run.committed, run.end),
        (Some(4), 4),
        "the partition moved on"
    );
    assert_eq!(run.handled, [sentinel()]);
    assert_eq!(run.dead.len(), 3);
    let attempts = bus_config().consumer.retry.max_attempts.to_string();
    for (offset, m) in inputs.iter().enumerate() {
        let dead = dead_letter_of(&run, offset);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].payload, m.payload);
        assert_eq!(
            last_header(&dead[0].headers, dlq::DLQ_REASON),
            Some(&b"handler"[..])
        );
        assert_eq!(
            last_header(&dead[0].headers, dlq::DLQ_ATTEMPTS),
            Some(attempts.as_bytes())
        );
    }
}

// ---------------------------------------------------------------- a broker with a size limit

/// The memory broker with a limit on message size (key + header names and
/// values + payload), refused like Kafka's `message.max.bytes`
/// (`MessageSizeTooLarge`) or NATS' `max_payload`: the adapters map both to
/// `BrokerError::Config`, which is not retriable.
#[derive(Clone)]
struct SizeLimitedBroker {
    inner: MemoryBroker,
    max_bytes: usize,
}

impl Broker for SizeLimitedBroker {
    type Session = MemorySession;

    async fn publish(&self, msg: Outbound) -> Result<Position, BrokerError> {
        let size = msg.payload.len()
            + msg.key.as_ref().map_or(0, Vec::len)
            + msg
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>();
        if size > self.max_bytes {
            // What the adapters map a too-large message to.
            return Err(BrokerError::Refused(format!(
                "message of {size} bytes is larger than message.max.bytes {}",
                self.max_bytes
            )));
        }
        self.inner.publish(msg).await
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<MemorySession, BrokerError> {
        self.inner.subscribe(group, topics).await
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), BrokerError> {
        self.inner.ensure_topic(topic, partitions).await
    }
}

/// Was a bug (see docs/guarantees.md): a message that fits the broker's size
/// limit but whose dead letter does not (the dead letter adds six `x-dlq-*`
/// headers) is retried forever by the consumer's dead-letter publish, which
/// ignores `BrokerError::is_retriable`. Its offset never completes, so the
/// partition's commit never moves past it, on every redelivery. Expected
/// instead: handled-or-dead-lettered (e.g. a dead letter without the
/// payload) and the partition committed to its end.
#[test]
fn message_whose_dead_letter_is_too_large_for_the_broker_does_not_stop_the_partition() {
    let memory = memory_broker();
    let limited = SizeLimitedBroker {
        inner: memory.clone(),
        max_bytes: 4096,
    };
    let inputs = [Hostile::payload(vec![b'!'; 4000])];
    let mut config = bus_config();
    // Bounded close, so the stuck event is handed back instead of hanging.
    config.close_timeout = Some(Duration::from_millis(200));
    let run = block_on(deliver_to(limited, &memory, &inputs, config, |_| Ok(())));
    assert_eq!(
        run.handled,
        [sentinel()],
        "the sentinel (another aggregate) still runs"
    );
    assert_eq!(
        run.committed,
        Some(run.end),
        "the partition stopped committing at the hostile message"
    );
    assert_eq!(
        run.report.handed_back, 0,
        "the hostile message was still being dead-lettered at close"
    );
}
