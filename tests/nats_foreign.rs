#![cfg(not(feature = "loom"))]
#![cfg(feature = "nats")]
//! A foreign producer against the NATS adapter: messages written through
//! the raw NATS text protocol over a TCP socket (`HPUB` with arbitrary
//! header bytes, as nats.go writes them), among good envelopes, consumed
//! with the public API and the library's defaults.
//!
//! async-nats refuses such a message when it parses the `HMSG` (a non-UTF-8
//! header block or an invalid header name drop the connection; a CR inside a
//! header value panics its connection task). Each case shows: every good
//! event handled in order, the bad one dead-lettered once with its bytes,
//! the consumer alive afterwards, and a bounded number of reconnects.
//!
//! Needs the shared nats-server at `EVENTBUS_NATS_URL` (default
//! `nats://127.0.0.1:4222`); fails with a clear message without it.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::scenario::{checked_handler, event, init_tracing, unique, wait_for, Dropped, Progress};
use eventbus::broker::nats::{NatsBroker, NatsConfig, HEADER_RAW_HEADERS, REASON_UNDECODABLE_HEADERS};
use eventbus::consumer::task_headers::{DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_TOPIC, DLQ_REASON};
use eventbus::envelope::HEADER_AGGREGATE_ID;
use eventbus::testing::OrderChecker;
use eventbus::EventBus;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn nats_url() -> String {
    std::env::var("EVENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn connect(config: NatsConfig) -> NatsBroker {
    init_tracing();
    let url = config.url.clone();
    NatsBroker::connect(config).await.unwrap_or_else(|e| {
        panic!("NATS JetStream server not reachable at {url}: {e} (see tests/nats.rs for how to start one)")
    })
}

/// A producer speaking the NATS text protocol itself: it writes whatever
/// header bytes it is given, and waits for JetStream's publish ack.
struct RawProducer {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    inbox: String,
}

impl RawProducer {
    async fn connect(url: &str) -> RawProducer {
        let addr = url.trim_start_matches("nats://").split(',').next().unwrap().to_string();
        let stream = TcpStream::connect(&addr).await.unwrap_or_else(|e| panic!("raw connect to {addr}: {e}"));
        let (read, writer) = stream.into_split();
        let mut producer = RawProducer { reader: BufReader::new(read), writer, inbox: unique("_INBOX.raw") };
        let info = producer.line().await;
        assert!(info.starts_with("INFO "), "{info}");
        let connect = r#"CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1,"name":"foreign"}"#;
        let sub = format!("{connect}\r\nSUB {} 1\r\nPING\r\n", producer.inbox);
        producer.writer.write_all(sub.as_bytes()).await.unwrap();
        loop {
            let line = producer.line().await;
            if line == "PONG" {
                break;
            }
            assert!(!line.starts_with("-ERR"), "{line}");
        }
        producer
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
            .await
            .expect("the server answers within 10 s")
            .unwrap();
        assert!(n > 0, "the server closed the raw connection");
        line.trim_end_matches("\r\n").to_string()
    }

    /// Publishes `header` (the whole header block, `NATS/1.0\r\n...\r\n\r\n`)
    /// and `payload` to `subject`; returns the stream sequence JetStream
    /// stored it at.
    async fn hpub(&mut self, subject: &str, header: &[u8], payload: &[u8]) -> u64 {
        let mut frame =
            format!("HPUB {subject} {} {} {}\r\n", self.inbox, header.len(), header.len() + payload.len()).into_bytes();
        frame.extend_from_slice(header);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.writer.write_all(&frame).await.unwrap();
        loop {
            let line = self.line().await;
            if line == "PING" {
                self.writer.write_all(b"PONG\r\n").await.unwrap();
                continue;
            }
            assert!(!line.starts_with("-ERR"), "the server refused the HPUB: {line}");
            let Some(rest) = line.strip_prefix("MSG ") else { continue };
            let len: usize = rest.rsplit(' ').next().unwrap().parse().unwrap();
            let mut body = vec![0; len + 2];
            self.reader.read_exact(&mut body).await.unwrap();
            let ack: serde_json::Value = serde_json::from_slice(&body[..len]).unwrap();
            assert!(ack.get("error").is_none(), "JetStream refused the message: {ack}");
            return ack["seq"].as_u64().unwrap_or_else(|| panic!("no sequence in the ack {ack}"));
        }
    }
}

/// A header block holding `Nats-Msg-Id` plus the given raw line.
fn header_block(raw_line: &[u8]) -> Vec<u8> {
    let mut h = b"NATS/1.0\r\n".to_vec();
    h.extend_from_slice(raw_line);
    h.extend_from_slice(b"\r\n\r\n");
    h
}

struct Outcome {
    sent: usize,
    handled: u64,
    dead_lettered: u64,
    duplicates: u64,
    reconnects: u64,
}

/// Publishes 100 good envelopes, the bad message, 100 good envelopes (10
/// aggregates, in order) and consumes them with library defaults (after
/// they were stored, or while they are published with `live`); checks
/// everything the module doc says.
async fn foreign_case(label: &str, bad_line: &[u8], live: bool) -> Outcome {
    const AGGREGATES: usize = 10;
    const VERSIONS: i64 = 20;
    let started = Instant::now();
    let topic = unique("foreign");
    let dlq = format!("{topic}.dlq");
    let group = unique("g");
    let broker = connect(NatsConfig { url: nats_url(), ..NatsConfig::default() }).await;
    let admin = broker.clone();
    let stats = broker.stats().clone();
    eventbus::Broker::ensure_topic(&broker, &topic, 1).await.unwrap();

    let bus = EventBus::builder(broker).group(group.clone()).build().unwrap();
    let checker = Arc::new(OrderChecker::new());
    let (progress, mut done) = Progress::new();
    bus.subscribe_envelope(
        &topic,
        checked_handler(checker.clone(), progress.clone(), Duration::ZERO, Dropped::StaysRunning),
    )
    .await
    .unwrap();
    if live {
        bus.start().await.unwrap();
    }

    let mut raw = RawProducer::connect(&nats_url()).await;
    let mut expected = BTreeMap::new();
    let mut bad = None;
    let bad_header = header_block(bad_line);
    let bad_payload = serde_json::to_vec(&serde_json::json!({"foreign": label})).unwrap();
    for v in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let agg = format!("agg-{a}");
            let env = event(&agg, v);
            let header = header_block(format!("{HEADER_AGGREGATE_ID}: {agg}").as_bytes());
            raw.hpub(&topic, &header, &env.encode().unwrap()).await;
            expected.insert(agg, VERSIONS);
            if v == VERSIONS / 2 && a == AGGREGATES - 1 {
                bad = Some(raw.hpub(&topic, &bad_header, &bad_payload).await);
            }
        }
    }
    let bad = bad.unwrap();
    let sent = AGGREGATES * VERSIONS as usize;
    if !live {
        bus.start().await.unwrap();
    }
    wait_for(&mut done, sent, Duration::from_secs(60), label).await;
    // Alive afterwards: one more event, published through the library.
    let after = bus.publish_envelope(&topic, &event("after", 1)).await.unwrap();
    expected.insert("after".into(), 1);
    wait_for(&mut done, sent + 1, Duration::from_secs(30), "an event published after the bad one").await;
    let report = bus.close().await;
    assert_eq!(report.final_commit_error, None);
    let r = checker.report(&expected);

    // The dead letter: once, with the bad message's bytes and origin.
    let js = admin.jetstream();
    let mut dlq_stream = js.get_stream(admin.config().stream_name(&dlq)).await.unwrap();
    let dead_lettered = dlq_stream.info().await.unwrap().state.messages;
    let dead = dlq_stream.get_raw_message(1).await.unwrap();
    let header = |n: &str| dead.headers.get(n).map(|v| v.as_str().to_string());
    let raw_headers = base64::engine::general_purpose::STANDARD.decode(header(HEADER_RAW_HEADERS).unwrap()).unwrap();
    let connects = stats.connects.load(Ordering::Relaxed);
    let out = Outcome {
        sent: sent + 2,
        handled: r.handled,
        dead_lettered,
        duplicates: r.duplicates,
        reconnects: connects.saturating_sub(1),
    };
    eprintln!(
        "{label}: sent {} (good {}, bad 1, after 1), handled {}, dead-lettered {}, duplicates {}, reconnects {}, \
         client restarts {}, quarantined {}, violations {}, missing {}, in {:?}",
        out.sent,
        sent,
        out.handled,
        out.dead_lettered,
        out.duplicates,
        out.reconnects,
        stats.client_restarts.load(Ordering::Relaxed),
        stats.undecodable.load(Ordering::Relaxed),
        r.violations,
        r.missing,
        started.elapsed()
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.handled, sent as u64 + 1);
    assert_eq!(dead_lettered, 1, "the bad message is dead-lettered once");
    assert_eq!(header(DLQ_REASON).as_deref(), Some(REASON_UNDECODABLE_HEADERS));
    assert_eq!(header(DLQ_ORIGIN_TOPIC), Some(topic.clone()));
    assert_eq!(header(DLQ_ORIGIN_OFFSET), Some(bad.to_string()));
    assert_eq!(raw_headers, bad_header, "the dead letter carries the header bytes as stored");
    assert_eq!(dead.payload.as_ref(), &bad_payload[..]);
    assert!(out.reconnects <= 3, "{} reconnects: a reconnect storm", out.reconnects);
    assert_eq!(admin.ack_floor(&group, &topic).await.unwrap(), Some(after.offset), "moved past the bad message");
    let _ = admin.delete_topic(&topic).await;
    let _ = admin.delete_topic(&dlq).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_non_utf8_header_value_is_dead_lettered_and_the_topic_flows() {
    let o = foreign_case("non-UTF-8 header value", b"X-Foreign: caf\xe9 \xff\xfe", false).await;
    assert_eq!((o.handled, o.dead_lettered, o.duplicates), (o.sent as u64 - 1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_invalid_header_name_is_dead_lettered_and_the_topic_flows() {
    let o = foreign_case("invalid header name", b"X Foreign(bad): v", false).await;
    assert_eq!((o.handled, o.dead_lettered, o.duplicates), (o.sent as u64 - 1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bad_headers_published_while_consuming_are_dead_lettered_and_the_topic_flows() {
    for (label, line) in [
        ("live: non-UTF-8 header value", &b"X-Foreign: \xff"[..]),
        ("live: invalid header name", &b"X Foreign: v"[..]),
        ("live: stray CR in a header value", &b"X-Foreign: a\rb"[..]),
    ] {
        let o = foreign_case(label, line, true).await;
        assert_eq!((o.handled, o.dead_lettered, o.duplicates), (o.sent as u64 - 1, 1, 0), "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_stray_cr_in_a_header_is_dead_lettered_and_the_topic_flows() {
    let o = foreign_case("stray CR in a header value", b"X-Foreign: a\rb", false).await;
    assert_eq!((o.handled, o.dead_lettered, o.duplicates), (o.sent as u64 - 1, 1, 0));
}

// ---------------------------------------------------------------------------
// One dead letter per origin, across a SIGKILL while dead-lettering.

const CHILD_ENV: &str = "EVENTBUS_NATS_FOREIGN_CHILD";

/// The child mode of this test binary (does nothing unless
/// `EVENTBUS_NATS_FOREIGN_CHILD` is set; see `crash_child::entry`).
#[test]
fn child_process_entry() {
    common::crash_child::entry(
        CHILD_ENV,
        |url| async move { connect(NatsConfig { url, ..NatsConfig::default() }).await },
    );
}

/// Origin offset → copies, of every message of the dead-letter stream.
async fn dead_letters_by_origin(broker: &NatsBroker, dlq: &str) -> BTreeMap<u64, u32> {
    let js = broker.jetstream();
    let mut by_origin = BTreeMap::new();
    let Ok(mut stream) = js.get_stream(broker.config().stream_name(dlq)).await else { return by_origin };
    let last = stream.info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else { continue };
        let origin: u64 = m.headers.get(DLQ_ORIGIN_OFFSET).unwrap().as_str().parse().unwrap();
        *by_origin.entry(origin).or_default() += 1;
    }
    by_origin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_while_dead_lettering_stores_one_dead_letter_per_origin() {
    const AGGREGATES: usize = 10;
    const VERSIONS: i64 = 30;
    /// One undecodable message after every this many good ones.
    const POISON_EVERY: usize = 15;
    let started = Instant::now();
    let url = nats_url();
    let topic = unique("foreign-crash");
    let dlq = format!("{topic}.dlq");
    let group = unique("g");
    let broker = connect(NatsConfig { url: url.clone(), ..NatsConfig::default() }).await;
    eventbus::Broker::ensure_topic(&broker, &topic, 1).await.unwrap();
    let mut raw = RawProducer::connect(&url).await;
    let mut expected = BTreeMap::new();
    let mut poison = Vec::new();
    let mut good = 0;
    for v in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            let agg = format!("t0-agg{a}");
            let header = header_block(format!("{HEADER_AGGREGATE_ID}: {agg}").as_bytes());
            raw.hpub(&topic, &header, &event(&agg, v).encode().unwrap()).await;
            expected.insert(agg, VERSIONS);
            good += 1;
            // Never last: the second run stops once every good event is handled.
            if good % POISON_EVERY == 0 && good < AGGREGATES * VERSIONS as usize {
                let mut line = format!("X-Foreign-{good}: ").into_bytes();
                line.push(0xff);
                let bad = header_block(&line);
                poison.push(raw.hpub(&topic, &bad, b"poison").await);
            }
        }
    }
    let crash = common::crash_child::Crash {
        child_env: CHILD_ENV,
        address: &url,
        group: &group,
        topics: std::slice::from_ref(&topic),
        logs: "eventbus-nats-foreign-crash",
    };
    let ((floor, at_kill), runs) = crash
        .run(good, &expected, async || {
            let floor = broker.ack_floor(&group, &topic).await.unwrap().unwrap_or(0);
            (floor, dead_letters_by_origin(&broker, &dlq).await)
        })
        .await;
    let after = dead_letters_by_origin(&broker, &dlq).await;
    // Dead-lettered before the kill but not stepped over (at or above the
    // ack floor): the second run found them again and wrote them again.
    let rewritten = at_kill.keys().filter(|&&seq| seq > floor).count();
    let duplicates: u32 = after.values().map(|n| n - 1).sum();
    runs.check(
        "nats foreign crash",
        good,
        &format!(
            "poison {}, dead letters at kill {}, ack floor at kill {floor}, re-dead-lettered after the restart \
             {rewritten}, dead letters {}, duplicate dead letters {duplicates}",
            poison.len(),
            at_kill.len(),
            after.len()
        ),
        started,
    );
    assert_eq!(after.keys().copied().collect::<Vec<_>>(), poison, "every undecodable message dead-lettered");
    assert!(after.values().all(|&n| n == 1), "one dead letter per origin: {after:?}");
    runs.remove_logs();
    let _ = broker.delete_topic(&topic).await;
    let _ = broker.delete_topic(&dlq).await;
}

/// The dead-letter write itself, repeated as a consumer that crashed after
/// writing it would repeat it: stored once (`Nats-Msg-Id` from the origin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_dead_letter_is_stored_once() {
    use eventbus::consumer::task_headers::{DLQ_ERROR, DLQ_ORIGIN_PARTITION};
    let topic = unique("dl-twice");
    let dlq = format!("{topic}.dlq");
    let broker = connect(NatsConfig { url: nats_url(), ..NatsConfig::default() }).await;
    eventbus::Broker::ensure_dead_letter_topic(&broker, &topic, &dlq).await.unwrap();
    let letter = |error: &str| eventbus::Outbound {
        topic: dlq.clone(),
        key: Some(b"agg-1".to_vec()),
        headers: vec![
            (DLQ_REASON.into(), b"handler".to_vec()),
            (DLQ_ERROR.into(), error.as_bytes().to_vec()),
            (DLQ_ORIGIN_TOPIC.into(), topic.as_bytes().to_vec()),
            (DLQ_ORIGIN_PARTITION.into(), b"0".to_vec()),
            (DLQ_ORIGIN_OFFSET.into(), b"42".to_vec()),
        ],
        payload: b"not an envelope".to_vec(),
    };
    let first = eventbus::Broker::publish(&broker, letter("attempt 1 failed")).await.unwrap();
    // After a crash the error text may differ; the origin does not.
    let again = eventbus::Broker::publish(&broker, letter("attempt 3 failed")).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate, "the repeated dead letter was stored twice");
    assert_eq!(again.offset, first.offset);
    // Another origin offset is another dead letter.
    let mut other = letter("x");
    other.headers[4].1 = b"43".to_vec();
    assert!(!eventbus::Broker::publish(&broker, other).await.unwrap().duplicate);
    assert_eq!(dead_letters_by_origin(&broker, &dlq).await, BTreeMap::from([(42, 1), (43, 1)]));
    let _ = broker.delete_topic(&dlq).await;
}

/// A consumer that dead-lettered an undecodable message but crashed before
/// stepping over it (an event before it never completed): the next process
/// finds the message again, writes its dead letter again, and the stream
/// keeps one. The crash is a runtime shut down with everything in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_dead_letter_and_step_over_writes_it_once() {
    let url = nats_url();
    let topic = unique("foreign-redl");
    let dlq = format!("{topic}.dlq");
    let group = unique("g");
    let admin = connect(NatsConfig { url: url.clone(), ..NatsConfig::default() }).await;
    eventbus::Broker::ensure_topic(&admin, &topic, 1).await.unwrap();
    let mut raw = RawProducer::connect(&url).await;
    let publish = async |raw: &mut RawProducer, agg: &str, v: i64| {
        let header = header_block(format!("{HEADER_AGGREGATE_ID}: {agg}").as_bytes());
        raw.hpub(&topic, &header, &event(agg, v).encode().unwrap()).await
    };
    for v in 1..=5 {
        publish(&mut raw, "a", v).await;
    }
    let bad = raw.hpub(&topic, &header_block(b"X-Foreign: \xff"), b"poison").await;
    for v in 6..=10 {
        publish(&mut raw, "a", v).await;
    }

    // First process: a/5 never completes, so the undecodable message after
    // it is dead-lettered but not stepped over.
    let (written_tx, written_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let (url, topic, group, dlq) = (url.clone(), topic.clone(), group.clone(), dlq.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
                let broker = connect(NatsConfig { url, ..NatsConfig::default() }).await;
                let stats = broker.stats().clone();
                let bus = EventBus::builder(broker.clone()).group(group).build().unwrap();
                bus.subscribe_envelope(&topic, |env: eventbus::Envelope| async move {
                    if env.event_version == 5 {
                        std::future::pending::<()>().await;
                    }
                    Ok(())
                })
                .await
                .unwrap();
                bus.start().await.unwrap();
                // The adapter counts the message once it found it; the dead
                // letter is then in the stream (it is written before the
                // step-over, which a/5 blocks).
                let mut copies = BTreeMap::new();
                while copies.is_empty() {
                    tokio::task::yield_now().await;
                    if stats.undecodable.load(Ordering::Relaxed) > 0 {
                        copies = dead_letters_by_origin(&broker, &dlq).await;
                    }
                }
                written_tx.send(copies).unwrap();
                let _ = crash_rx.await;
                // No close, no drop logic: as if the process died.
                std::mem::forget(bus);
                std::mem::forget(broker);
            });
            // Dropping the runtime cancels every task, the client's
            // connection task (and its socket) among them.
            drop(rt);
        })
    };
    let at_crash = tokio::task::spawn_blocking(move || written_rx.recv().unwrap()).await.unwrap();
    assert_eq!(at_crash, BTreeMap::from([(bad, 1)]));
    // The crash. The first process's durable's ack floor stays below the
    // bad message.
    crash_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || first.join().unwrap()).await.unwrap();
    let floor = admin.ack_floor(&group, &topic).await.unwrap().unwrap_or(0);
    assert!(floor < bad, "the first process stepped over the message (ack floor {floor}, message {bad})");

    // Second process: same group.
    let broker = connect(NatsConfig { url: url.clone(), ..NatsConfig::default() }).await;
    let stats = broker.stats().clone();
    let bus = EventBus::builder(broker).group(group.clone()).build().unwrap();
    let checker = Arc::new(OrderChecker::new());
    let (progress, mut done) = Progress::new();
    bus.subscribe_envelope(&topic, checked_handler(checker.clone(), progress, Duration::ZERO, Dropped::StaysRunning))
        .await
        .unwrap();
    bus.start().await.unwrap();
    let remaining = (10 - floor) as usize; // a/(floor+1)..a/10; the bad one is not an event
    wait_for(&mut done, remaining, Duration::from_secs(30), "the second process").await;
    bus.close().await;
    let after = dead_letters_by_origin(&admin, &dlq).await;
    eprintln!(
        "crash between dead letter and step-over: sent 11 (good 10, bad 1), ack floor at crash {floor}, handled by \
         the second process {}, found again {}, dead letters {after:?}, reconnects {}",
        *done.borrow(),
        stats.undecodable.load(Ordering::Relaxed),
        stats.connects.load(Ordering::Relaxed).saturating_sub(1)
    );
    assert_eq!(stats.undecodable.load(Ordering::Relaxed), 1, "the second process found it again");
    assert_eq!(after, BTreeMap::from([(bad, 1)]), "written twice, stored once");
    assert!(admin.ack_floor(&group, &topic).await.unwrap().unwrap() >= bad + 5);
    let _ = admin.delete_topic(&topic).await;
    let _ = admin.delete_topic(&dlq).await;
}
