//! A foreign Kafka producer: librdkafka's C API (through rdkafka-sys)
//! writing records whose header names and values are arbitrary bytes, as
//! producers in C, Go or Java can. rdkafka's Rust API cannot write a header
//! name that is not UTF-8, so this goes around it.
//!
//! Used by `tests/kafka.rs` and `tests/kafka_tansu.rs` (as
//! `#[path = "common/foreign_kafka.rs"] mod foreign_kafka;`, so the other
//! test binaries, built without rdkafka, do not see it).

use std::ffi::{c_char, c_void, CString};
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use eventbus::broker::kafka::KafkaBroker;
use eventbus::bus::BusConfig;
use eventbus::{Envelope, EventBus, TopicPartition};
use tokio::sync::watch;

use crate::common::scenario::{event, unique};

/// One record as a foreign producer writes it.
pub struct RawRecord<'a> {
    pub partition: i32,
    pub key: Option<&'a [u8]>,
    /// (name, value); `None` is a null value.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub payload: &'a [u8],
}

pub struct ForeignProducer {
    producer: BaseProducer,
}

fn vu(vtype: rdsys::rd_kafka_vtype_t, u: rdsys::rd_kafka_vu_s__bindgen_ty_1) -> rdsys::rd_kafka_vu_t {
    rdsys::rd_kafka_vu_t { vtype, u }
}

impl ForeignProducer {
    pub fn new(brokers: &str) -> ForeignProducer {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "0")
            // tansu 0.6 needs one record per batch (see kafka_tansu.rs).
            .set("batch.num.messages", "1")
            .create()
            .expect("foreign producer");
        ForeignProducer { producer }
    }

    /// Writes `record` to `topic` through `rd_kafka_produceva` and waits
    /// until it is acknowledged (records are written one at a time, so in
    /// order).
    pub fn send(&self, topic: &str, record: &RawRecord<'_>) {
        use rdsys::rd_kafka_vtype_t as V;
        let rk = self.producer.client().native_ptr();
        let topic_c = CString::new(topic).unwrap();
        // SAFETY: every pointer handed to librdkafka outlives the call
        // (RD_KAFKA_MSG_F_COPY copies key and value; header names and values
        // are copied by rd_kafka_header_add); the headers list is owned by
        // librdkafka once produceva succeeds and destroyed here otherwise.
        unsafe {
            let headers = rdsys::rd_kafka_headers_new(record.headers.len());
            for (name, value) in &record.headers {
                let (v, n) = match value {
                    Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
                    None => (std::ptr::null(), 0),
                };
                let err =
                    rdsys::rd_kafka_header_add(headers, name.as_ptr().cast::<c_char>(), name.len() as isize, v, n);
                assert_eq!(err, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
            }
            let mut vus = vec![
                vu(V::RD_KAFKA_VTYPE_TOPIC, rdsys::rd_kafka_vu_s__bindgen_ty_1 { cstr: topic_c.as_ptr() }),
                vu(V::RD_KAFKA_VTYPE_PARTITION, rdsys::rd_kafka_vu_s__bindgen_ty_1 { i32_: record.partition }),
                vu(
                    V::RD_KAFKA_VTYPE_VALUE,
                    rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                        mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                            ptr: record.payload.as_ptr() as *mut c_void,
                            size: record.payload.len(),
                        },
                    },
                ),
                vu(V::RD_KAFKA_VTYPE_MSGFLAGS, rdsys::rd_kafka_vu_s__bindgen_ty_1 { i: rdsys::RD_KAFKA_MSG_F_COPY }),
                vu(V::RD_KAFKA_VTYPE_HEADERS, rdsys::rd_kafka_vu_s__bindgen_ty_1 { headers }),
            ];
            if let Some(key) = record.key {
                vus.push(vu(
                    V::RD_KAFKA_VTYPE_KEY,
                    rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                        mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                            ptr: key.as_ptr() as *mut c_void,
                            size: key.len(),
                        },
                    },
                ));
            }
            let error = rdsys::rd_kafka_produceva(rk, vus.as_ptr(), vus.len());
            if !error.is_null() {
                let code = rdsys::rd_kafka_error_code(error);
                rdsys::rd_kafka_error_destroy(error);
                rdsys::rd_kafka_headers_destroy(headers);
                panic!("foreign produce to {topic}: {code:?}");
            }
        }
        self.producer.flush(Duration::from_secs(20)).expect("foreign producer flush");
    }
}

/// Every record of `topic` (all `partitions`), read from the beginning with
/// a plain consumer that joins no group.
pub fn read_topic(servers: &str, topic: &str, partitions: i32) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut left = 0i64;
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
        left += high;
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (out.len() as i64) < left {
        assert!(Instant::now() < deadline, "read {} of {left} records of {topic}", out.len());
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.unwrap().detach());
        }
    }
    out
}

pub fn header<'a>(m: &'a rdkafka::message::OwnedMessage, name: &str) -> Option<&'a [u8]> {
    use rdkafka::message::{Headers, Message};
    let h = m.headers()?;
    (0..h.count()).rev().map(|i| h.get(i)).find(|h| h.key == name).and_then(|h| h.value)
}

/// The foreign-producer scenario of issue 13 on the broker at `servers`
/// (`topic` with one partition and its `.dlq` exist): 25 good envelopes of
/// one aggregate (two with header values that are not UTF-8 or null) and,
/// after the tenth, one record whose header *name* is not UTF-8. Consumed
/// with the public API and the library's defaults: every good event handled
/// once, in order; the bad record handled or dead-lettered exactly once (a
/// dead letter carries reason `undecodable-headers`, the original header
/// bytes, payload and key); no poll thread died; everything committed.
pub async fn header_bytes_scenario(servers: &str, broker: KafkaBroker, topic: &str, label: &str) {
    use eventbus::broker::kafka::raw_headers;
    let dlq = format!("{topic}.dlq");
    let foreign = ForeignProducer::new(servers);
    let send_good = |version: i64, extra: Vec<(Vec<u8>, Option<Vec<u8>>)>| {
        let env = event("good", version);
        let mut headers: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            env.to_headers().into_iter().map(|(n, v)| (n.into_bytes(), Some(v))).collect();
        headers.extend(extra);
        let payload = env.encode().unwrap();
        foreign.send(topic, &RawRecord { partition: 0, key: Some(b"good"), headers, payload: &payload });
    };
    // 1..=10 good; 4 and 7 carry header values that are not UTF-8 (and a
    // null value): ordinary deliveries.
    for v in 1..=10 {
        let extra = match v {
            4 => vec![(b"x-bin".to_vec(), Some(vec![0xff, 0xfe, 0x00, 0xc3, 0x28]))],
            7 => vec![(b"x-null".to_vec(), None)],
            _ => vec![],
        };
        send_good(v, extra);
    }
    // The poison: a header name that is not UTF-8 (and a value that is not).
    let bad_headers =
        vec![(b"x-ok".to_vec(), Some(b"fine".to_vec())), (vec![b'x', b'-', 0xff, 0xfe], Some(vec![0xc3, 0x28, 0xa0]))];
    let bad_env = event("poison", 1);
    let bad_payload = bad_env.encode().unwrap();
    foreign.send(
        topic,
        &RawRecord { partition: 0, key: Some(b"poison"), headers: bad_headers.clone(), payload: &bad_payload },
    );
    for v in 11..=20 {
        send_good(v, vec![]);
    }

    let group = unique("g");
    let admin = broker.clone();
    // The library's defaults but the group.
    let config = BusConfig {
        consumer: eventbus::consumer::ConsumerConfig { group: group.clone(), ..Default::default() },
        ..BusConfig::default()
    };
    let bus = EventBus::builder(broker).config(config).build().unwrap();
    let handled: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let (tx, mut count) = watch::channel(0usize);
    {
        let handled = handled.clone();
        bus.subscribe_envelope(topic, move |env: Envelope| {
            let mut h = handled.lock().unwrap();
            h.push((env.aggregate_id.clone(), env.event_version));
            tx.send_replace(h.len());
            async { Ok(()) }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    let dead_letters = || async { admin.end_offset(&TopicPartition::new(dlq.as_str(), 0)).await.unwrap() as usize };
    // 20 good ones, and the poison dead-lettered (the loop also ends if it were handled, so the asserts below say which).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = *count.borrow_and_update();
        let poison_done = handled.lock().unwrap().iter().any(|(a, _)| a == "poison") || dead_letters().await >= 1;
        if n >= 20 + usize::from(handled.lock().unwrap().iter().any(|(a, _)| a == "poison")) && poison_done {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} handled within 60 s");
        let _ = tokio::time::timeout(Duration::from_millis(200), count.changed()).await;
    }
    // The consumer is alive: more good events after the poison are handled.
    for v in 21..=25 {
        send_good(v, vec![]);
    }
    let expect_total = |poison_handled: bool| 25 + usize::from(poison_handled);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let poison_handled = handled.lock().unwrap().iter().any(|(a, _)| a == "poison");
        if *count.borrow_and_update() >= expect_total(poison_handled) {
            break;
        }
        assert!(Instant::now() < deadline, "events after the poison not handled");
        let _ = tokio::time::timeout(Duration::from_millis(200), count.changed()).await;
    }
    let close = bus.close().await;
    let handled = handled.lock().unwrap().clone();
    let good: Vec<i64> = handled.iter().filter(|(a, _)| a == "good").map(|(_, v)| *v).collect();
    let poison_handled = handled.iter().filter(|(a, _)| a == "poison").count();
    let dlq_records = read_topic(servers, &dlq, 1);
    let kstats = admin.stats();
    eprintln!(
        "{label}: foreign header bytes: sent 26 (25 good, 1 with a non-UTF-8 header name), good handled {}, poison \
         handled {poison_handled}, dead-lettered {}, duplicates {}, session failures {}, undecodable seen {}",
        good.len(),
        dlq_records.len(),
        good.len() - good.iter().collect::<BTreeSet<_>>().len(),
        kstats.session_failures.load(Ordering::Relaxed),
        kstats.undecodable_headers.load(Ordering::Relaxed),
    );
    assert_eq!(good, (1..=25).collect::<Vec<_>>(), "every good event once, in order");
    // The adapter marks the record; the consumer dead-letters it in its
    // aggregate's place and never runs the handler on it.
    assert_eq!(poison_handled, 0, "the poison never reaches the handler");
    assert_eq!(dlq_records.len(), 1, "the poison dead-lettered once");
    assert_eq!(kstats.session_failures.load(Ordering::Relaxed), 0, "no poll thread died");
    assert_eq!(kstats.undecodable_headers.load(Ordering::Relaxed), 1);
    assert_eq!(close.final_commit_error, None);
    if let Some(d) = dlq_records.first() {
        use rdkafka::Message;
        assert_eq!(header(d, eventbus::broker::HEADER_UNDELIVERABLE), Some(&b"undecodable-headers"[..]));
        assert_eq!(header(d, eventbus::consumer::task_headers::DLQ_REASON), Some(&b"undecodable-headers"[..]));
        let raw = raw_headers::decode(header(d, eventbus::broker::HEADER_RAW_HEADERS).unwrap()).unwrap();
        let raw: Vec<_> = raw.into_iter().map(|h| (h.name, h.value)).collect();
        assert_eq!(raw, bad_headers, "the original header bytes, losslessly");
        assert_eq!(d.payload(), Some(bad_payload.as_slice()));
        assert_eq!(d.key(), Some(&b"poison"[..]), "the dead letter keeps the origin's key");
    }
    let tp = TopicPartition::new(topic, 0);
    let committed = admin.committed_offsets(&group, std::slice::from_ref(&tp)).await.unwrap()[&tp];
    assert_eq!(committed, Some(admin.end_offset(&tp).await.unwrap()), "everything committed");
}
