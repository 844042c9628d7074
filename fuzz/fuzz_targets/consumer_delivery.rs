//! Arbitrary bytes (payload, key, headers) through the production consumer on
//! the memory broker: the message is handled (when it is a valid envelope) or
//! lands in `<topic>.dlq` with an `x-dlq-reason` header, never both, never
//! neither; a valid sentinel published after it on the same partition is
//! handled; and after close the committed offset equals the end offset (the
//! partition moved on).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use eventbus::broker::Outbound;
use eventbus::consumer::task_headers as dlq;
use eventbus::envelope::HEADER_AGGREGATE_ID;
use eventbus::{Broker, BusConfig, Envelope, EventBus, MemoryBroker, MemoryConfig, TopicPartition};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

const TOPIC: &str = "hostile";
const DLQ_TOPIC: &str = "hostile.dlq";
const GROUP: &str = "fuzz";
const SENTINEL_TYPE: &str = "FuzzSentinel";
/// Not a synchronization: only how long a stuck partition is given before
/// the target reports it (the sentinel is normally handled in microseconds).
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Header names: mostly ones the consumer reads or writes.
#[derive(Arbitrary, Debug)]
enum Name<'a> {
    AggregateId,
    DlqReason,
    DlqOriginOffset,
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    key: Option<&'a [u8]>,
    headers: Vec<(Name<'a>, &'a [u8])>,
    payload: &'a [u8],
}

/// One current-thread runtime for the whole process: a bus per input runs
/// on it, so nothing of one input outlives its `block_on`.
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fn last<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

fn config() -> BusConfig {
    let mut config = BusConfig::default();
    config.consumer.group = GROUP.into();
    config.consumer.commit_interval = Duration::from_secs(3600);
    config.consumer.retry.initial_backoff = Duration::from_millis(1);
    config.consumer.retry.max_backoff = Duration::from_millis(1);
    config.pool.concurrency = 2;
    config.pool.capacity = 8;
    config
}

fuzz_target!(|input: Input<'_>| {
    let headers: Vec<(String, Vec<u8>)> = input
        .headers
        .iter()
        .map(|(n, v)| {
            let n = match n {
                Name::AggregateId => HEADER_AGGREGATE_ID,
                Name::DlqReason => dlq::DLQ_REASON,
                Name::DlqOriginOffset => dlq::DLQ_ORIGIN_OFFSET,
                Name::Other(s) => s,
            };
            (n.to_owned(), v.to_vec())
        })
        .collect();
    let key = input.key.map(<[u8]>::to_vec);
    let payload = input.payload.to_vec();
    let decoded = Envelope::decode(&payload);

    runtime().block_on(async {
        let broker = MemoryBroker::new(MemoryConfig { default_partitions: 1, ..MemoryConfig::default() });
        let hostile = Outbound { topic: TOPIC.into(), key: key.clone(), headers: headers.clone(), payload: payload.clone() };
        let at = broker.publish(hostile).await.expect("memory publish");
        assert_eq!((at.partition, at.offset), (0, 0));

        let bus = EventBus::builder(broker.clone()).config(config()).build().expect("valid config");
        let handled = Arc::new(Mutex::new(Vec::<Envelope>::new()));
        let sentinel_seen = Arc::new(Notify::new());
        {
            let (handled, seen) = (handled.clone(), sentinel_seen.clone());
            bus.subscribe_envelope(TOPIC, move |e: Envelope| {
                let is_sentinel = e.event_type == SENTINEL_TYPE;
                handled.lock().unwrap().push(e);
                if is_sentinel {
                    seen.notify_one();
                }
                async { Ok(()) }
            })
            .await
            .expect("subscribe");
        }
        bus.start().await.expect("start");

        let sentinel = Envelope::new("sentinel", SENTINEL_TYPE, 1, &serde_json::json!({"last": true})).unwrap();
        let at = bus.publish_envelope(TOPIC, &sentinel).await.expect("sentinel publish");
        assert_eq!((at.partition, at.offset), (0, 1), "one partition: the sentinel follows the input");
        if tokio::time::timeout(STUCK_AFTER, sentinel_seen.notified()).await.is_err() {
            panic!("partition stopped moving: the sentinel behind the input was not handled in {STUCK_AFTER:?}");
        }

        let report = bus.close().await;
        assert_eq!(report.handed_back, 0, "a draining close hands nothing back");
        assert_eq!(report.final_commit_error, None);
        let tp = TopicPartition::new(TOPIC, 0);
        assert_eq!(broker.end_offset(&tp), 2);
        assert_eq!(broker.committed(GROUP, &tp), Some(2), "committed offset after close must be the end offset");

        let handled = std::mem::take(&mut *handled.lock().unwrap());
        let dead = broker.read_topic(DLQ_TOPIC);
        match decoded {
            Ok(e) => {
                // Handled exactly once, and never dead-lettered.
                assert!(dead.is_empty(), "a valid envelope was dead-lettered: {dead:?}");
                assert_eq!(handled.len(), 2, "expected the input and the sentinel once each: {handled:?}");
                if e.aggregate_id == sentinel.aggregate_id && e != sentinel {
                    // Same aggregate: handled in partition order.
                    assert_eq!(handled, [e, sentinel]);
                } else {
                    assert!(handled.contains(&e), "the valid input was not handled");
                    assert!(handled.contains(&sentinel));
                }
            }
            Err(err) => {
                assert_eq!(handled, [sentinel], "only the sentinel is handled");
                assert_eq!(dead.len(), 1, "the invalid input must be dead-lettered exactly once");
                let d = &dead[0];
                assert_eq!(d.payload, payload, "dead letter keeps the payload");
                assert_eq!(d.key, key, "dead letter keeps the key");
                assert!(d.headers.starts_with(&headers), "dead letter keeps the original headers first");
                let h = &d.headers[headers.len()..];
                assert_eq!(last(h, dlq::DLQ_REASON), Some(&b"decode"[..]));
                assert_eq!(last(h, dlq::DLQ_ERROR), Some(err.to_string().as_bytes()));
                assert_eq!(last(h, dlq::DLQ_ORIGIN_TOPIC), Some(TOPIC.as_bytes()));
                assert_eq!(last(h, dlq::DLQ_ORIGIN_PARTITION), Some(&b"0"[..]));
                assert_eq!(last(h, dlq::DLQ_ORIGIN_OFFSET), Some(&b"0"[..]));
                assert_eq!(last(h, dlq::DLQ_ATTEMPTS), Some(&b"0"[..]));
            }
        }
    });
});
