#![cfg(not(feature = "loom"))]
#![cfg(feature = "nats")]
//! The NATS JetStream adapter against a real nats-server (with `-js`).
//!
//! The shared server is at `EVENTBUS_NATS_URL` (default
//! `nats://127.0.0.1:4222`); a test fails with a clear message when it is not
//! reachable. Every test uses topics (streams) and groups with a random
//! suffix, and deletes its streams at the end, so reruns do not collide.
//! The server-restart test starts its own `nats-server` (`NATS_SERVER_BIN`,
//! default `/usr/sbin/nats-server`) on a spare port with a temporary store.
//!
//! The crash test re-runs this test binary as a child process in the mode
//! selected by `EVENTBUS_NATS_CHILD` (see [`child_process_entry`]); without
//! that variable the entry returns at once.

mod common;

use common::crash_child::{self, publish_all, temp_path, Crash};
use common::scenario::{
    bus_config, checked_handler, close_cleanly, event, init_tracing, late_subscription_delivers, outbound, recv_within,
    started_with_channels, unique, wait_for, Dropped, Progress, Seed,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus::broker::nats::{NatsBroker, NatsConfig};
use eventbus::consumer::RetryConfig;
use eventbus::testing::OrderChecker;
use eventbus::{Broker, Envelope, EventBus};
use tokio::sync::{mpsc, watch};

// ---------------------------------------------------------------------------
// Helpers.

fn nats_url() -> String {
    std::env::var("EVENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn nats_config(url: &str) -> NatsConfig {
    NatsConfig { url: url.to_string(), ..NatsConfig::default() }
}

/// Connects or fails the test with what to do about it.
async fn connect(config: NatsConfig) -> NatsBroker {
    init_tracing();
    let url = config.url.clone();
    match NatsBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => {
            let ci = if std::env::var_os("CI").is_some() { " (CI: .ci/run must start it)" } else { "" };
            panic!(
                "NATS JetStream server not reachable at {url}: {e}{ci}. Start one with `start-stop-daemon --start \
                 --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd \
                 /var/lib/nats-server`, or point EVENTBUS_NATS_URL at one."
            )
        }
    }
}

async fn cleanup(broker: &NatsBroker, topics: &[String]) {
    for t in topics {
        let _ = broker.delete_topic(t).await;
        let _ = broker.delete_topic(&format!("{t}.dlq")).await;
    }
}

// ---------------------------------------------------------------------------
// Round trip.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_the_bus() {
    let topic = unique("rt");
    let raw_topic = unique("rt-raw");
    let group = unique("g");
    let broker = connect(nats_config(&nats_url())).await;
    let admin = broker.clone();
    let (bus, mut env_rx, mut raw_rx) = started_with_channels(broker, bus_config(&group), &topic, &raw_topic).await;

    let env = event("order-1", 1).with_trace_id("trace-1");
    let first = bus.publish_envelope(&topic, &env).await.unwrap();
    assert_eq!(first.partition, 0);
    assert!(!first.duplicate);
    // A retried publish of the same envelope is stored once.
    let again = bus.publish_envelope(&topic, &env).await.unwrap();
    assert!(again.duplicate, "the retried publish was stored twice");
    assert_eq!(again.offset, first.offset);
    let got = recv_within(&mut env_rx, Duration::from_secs(10), "envelope delivered").await;
    assert_eq!(got, env);

    let headers = vec![("X-Custom".to_string(), b"v1".to_vec()), ("X-Multi".to_string(), b"a\nb".to_vec())];
    let pos = bus.publish(&raw_topic, Some(b"key-\x01\xff"), headers, b"hello".to_vec()).await.unwrap();
    let d = recv_within(&mut raw_rx, Duration::from_secs(10), "raw delivered").await;
    assert_eq!((d.partition, d.offset, d.attempt), (0, pos.offset, 1));
    assert_eq!(d.payload, b"hello");
    assert_eq!(d.key.as_deref(), Some(&b"key-\x01\xff"[..]));
    let header = |n: &str| d.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(header("X-Custom"), Some(b"v1".to_vec()));
    assert_eq!(header("X-Multi"), Some(b"a b".to_vec()), "multi-line header values become one line");
    assert!(d.timestamp.is_some());

    let late_topic = unique("rt-late");
    late_subscription_delivers(&bus, &late_topic, Duration::from_secs(10)).await;

    close_cleanly(bus, 3).await;
    // The final commit acknowledged both, with confirmation.
    assert_eq!(admin.ack_floor(&group, &topic).await.unwrap(), Some(first.offset));
    assert_eq!(admin.ack_floor(&group, &raw_topic).await.unwrap(), Some(pos.offset));
    assert_eq!(admin.ack_floor(&group, &late_topic).await.unwrap(), Some(1));
    cleanup(&admin, &[topic, raw_topic, late_topic]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_names_the_key() {
    let config = NatsConfig {
        ack_wait: Duration::from_secs(1),
        progress_interval: Duration::from_secs(2),
        ..nats_config(&nats_url())
    };
    match NatsBroker::connect(config).await {
        Err(eventbus::BrokerError::Config { key, .. }) => assert_eq!(key, "nats.progress_interval"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    let broker = connect(nats_config(&nats_url())).await;
    let err = broker.ensure_topic("a.*", 1).await.unwrap_err();
    assert!(matches!(err, eventbus::BrokerError::Config { ref key, .. } if key == "nats.topic"), "{err:?}");
    let err = broker.ensure_topic(&unique("p"), 3).await.unwrap_err();
    assert!(matches!(err, eventbus::BrokerError::Config { ref key, .. } if key == "partitions"), "{err:?}");
    let existing =
        NatsConfig { strategy: eventbus::broker::nats::StreamStrategy::Existing, ..nats_config(&nats_url()) };
    let broker = connect(existing).await;
    let err = broker.ensure_topic(&unique("missing"), 1).await.unwrap_err();
    assert!(matches!(err, eventbus::BrokerError::UnknownTopic(_)), "{err:?}");
}

// ---------------------------------------------------------------------------
// The seed's scenario: 5 topics, many aggregates, versions in order.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_five_topics_no_loss_no_order_violation() {
    let topics: Vec<String> = (0..5).map(|i| unique(&format!("seed{i}"))).collect();
    let group = unique("g");
    let broker = connect(nats_config(&nats_url())).await;
    let admin = broker.clone();
    let bus = EventBus::builder(broker).config(bus_config(&group)).build().unwrap();
    let seed = Seed {
        label: "nats seed scenario",
        topics: &topics,
        aggregates: 40,
        versions: 25,
        limit: Duration::from_secs(120),
        max_publish_retries: 0,
        dropped: Dropped::StaysRunning,
    };
    seed.run(bus).await;
    cleanup(&admin, &topics).await;
}

// ---------------------------------------------------------------------------
// Retries longer than ack_wait: progress acks keep redeliveries away.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_retries_beyond_ack_wait_are_not_overtaken_by_redelivery() {
    let topic = unique("retry");
    let group = unique("g");
    let config = NatsConfig {
        ack_wait: Duration::from_millis(1000),
        progress_interval: Duration::from_millis(250),
        ..nats_config(&nats_url())
    };
    let broker = connect(config).await;
    let admin = broker.clone();
    let mut bus_cfg = bus_config(&group);
    // Fails at t=0 and t=0.7 s, succeeds at t=2.1 s: twice the ack wait.
    bus_cfg.consumer.retry = RetryConfig {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(700),
        max_backoff: Duration::from_secs(5),
    };
    let bus = EventBus::builder(broker).config(bus_cfg).build().unwrap();
    let checker = Arc::new(OrderChecker::new());
    let (progress, mut done) = Progress::new();
    let attempts = Arc::new(AtomicUsize::new(0));
    {
        let checker = checker.clone();
        let attempts = attempts.clone();
        bus.subscribe_envelope(&topic, move |env: Envelope| {
            let checker = checker.clone();
            let progress = progress.clone();
            let attempts = attempts.clone();
            async move {
                checker.begin(&env.aggregate_id, env.event_version);
                if env.aggregate_id == "slow" && env.event_version == 1 && attempts.fetch_add(1, Ordering::SeqCst) < 2 {
                    checker.fail(&env.aggregate_id, env.event_version);
                    return Err("simulated failure".into());
                }
                checker.complete(&env.aggregate_id, env.event_version);
                progress.completed(&env.aggregate_id, env.event_version);
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    let mut expected = BTreeMap::new();
    for agg in ["slow", "other-1", "other-2"] {
        expected.insert(agg.to_string(), 5);
    }
    // Interleave aggregates, so the stream has newer messages behind the failing one.
    for v in 1..=5 {
        for agg in ["slow", "other-1", "other-2"] {
            bus.publish_envelope(&topic, &event(agg, v)).await.unwrap();
        }
    }
    let started = Instant::now();
    wait_for(&mut done, 15, Duration::from_secs(30), "retry scenario").await;
    let elapsed = started.elapsed();
    let stats = bus.consumer_stats().await.unwrap();
    bus.close().await;
    let r = checker.report(&expected);
    let redelivered = stats.redelivered_skipped.load(Ordering::Relaxed);
    eprintln!(
        "retry scenario: sent 15, handled {}, duplicates {}, violations {}, missing {}, attempts of slow v1 {}, \
         retried {}, redelivered {redelivered}, took {elapsed:?}",
        r.handled,
        r.duplicates,
        r.violations,
        r.missing,
        attempts.load(Ordering::SeqCst),
        stats.retried.load(Ordering::Relaxed)
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!((r.handled, r.duplicates), (15, 0));
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "failed twice, then succeeded");
    assert!(elapsed >= Duration::from_millis(2000), "the retries outlasted ack_wait ({elapsed:?})");
    assert_eq!(redelivered, 0, "progress acks kept the server from redelivering the held messages");
    assert_eq!(admin.ack_floor(&group, &topic).await.unwrap(), Some(15));
    cleanup(&admin, &[topic]).await;
}

// ---------------------------------------------------------------------------
// Durable generations: a crash between creating the new one and deleting the
// old one leaves two; the next session resumes from the newest.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_start_resumes_from_the_newest_durable_generation() {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use futures::StreamExt;
    let topic = unique("gens");
    let group = unique("g");
    let broker = connect(nats_config(&nats_url())).await;
    for v in 1..=5 {
        broker.publish(outbound(&topic, None, &event("agg", v))).await.unwrap();
    }
    let stream = broker.jetstream().get_stream(broker.config().stream_name(&topic)).await.unwrap();
    let base = NatsBroker::durable_base(&group, &topic);
    for (gen, start) in [(1, DeliverPolicy::All), (2, DeliverPolicy::ByStartSequence { start_sequence: 4 })] {
        let name = format!("{base}_g{gen}");
        let config = pull::Config {
            durable_name: Some(name),
            deliver_policy: start,
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        };
        stream.create_consumer(config).await.unwrap();
    }
    // Generation 2 resumes at 4: its ack floor is 3.
    assert_eq!(broker.ack_floor(&group, &topic).await.unwrap(), Some(3));

    let bus = EventBus::builder(broker.clone()).config(bus_config(&group)).build().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    bus.subscribe_envelope(&topic, move |env: Envelope| {
        let tx = tx.clone();
        async move {
            tx.send(env.event_version).unwrap();
            Ok(())
        }
    })
    .await
    .unwrap();
    bus.start().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("delivered").unwrap());
    }
    bus.close().await;
    assert_eq!(got, vec![4, 5], "resumed from the newest generation's ack floor");
    let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
    assert_eq!(names, vec![format!("{base}_g3")], "older generations deleted");
    assert_eq!(broker.ack_floor(&group, &topic).await.unwrap(), Some(5));
    cleanup(&broker, &[topic]).await;
}

// ---------------------------------------------------------------------------
// Dead letters: `<topic>.dlq` gets its own stream (not the origin's).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_event_goes_to_its_own_dead_letter_stream() {
    let topic = unique("dlq");
    let group = unique("g");
    let broker = connect(nats_config(&nats_url())).await;
    let admin = broker.clone();
    let mut cfg = bus_config(&group);
    cfg.consumer.retry = RetryConfig {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(10),
    };
    let bus = EventBus::builder(broker).config(cfg).build().unwrap();
    let (progress, mut done) = Progress::new();
    bus.subscribe_envelope(&topic, move |env: Envelope| {
        let progress = progress.clone();
        async move {
            if env.aggregate_id == "bad" && env.event_version == 1 {
                return Err("poison".into());
            }
            progress.completed(&env.aggregate_id, env.event_version);
            Ok(())
        }
    })
    .await
    .unwrap();
    bus.start().await.unwrap();
    let poison = bus.publish_envelope(&topic, &event("bad", 1)).await.unwrap();
    bus.publish_envelope(&topic, &event("bad", 2)).await.unwrap();
    bus.publish_envelope(&topic, &event("good", 1)).await.unwrap();
    wait_for(&mut done, 2, Duration::from_secs(30), "dead-letter scenario").await;
    let stats = bus.consumer_stats().await.unwrap();
    bus.close().await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    // The origin stream holds only the three events; the dead letter has its own.
    let js = admin.jetstream();
    let mut origin = js.get_stream(admin.config().stream_name(&topic)).await.unwrap();
    assert_eq!(origin.info().await.unwrap().state.messages, 3);
    let dlq = js.get_stream(admin.config().stream_name(&format!("{topic}.dlq"))).await.unwrap();
    let dead = dlq.get_raw_message(1).await.unwrap();
    let header = |n: &str| dead.headers.get(n).map(|v| v.as_str().to_string());
    assert_eq!(header("x-dlq-reason").as_deref(), Some("handler"));
    assert_eq!(header("x-dlq-origin-offset"), Some(poison.offset.to_string()));
    assert_eq!(Envelope::decode(&dead.payload).unwrap().aggregate_id, "bad");
    assert_eq!(admin.ack_floor(&group, &topic).await.unwrap(), Some(3));
    cleanup(&admin, &[topic]).await;
}

// ---------------------------------------------------------------------------
// A consumer process killed with SIGKILL and restarted.

const CHILD_ENV: &str = "EVENTBUS_NATS_CHILD";

/// The child mode of this test binary (does nothing unless
/// `EVENTBUS_NATS_CHILD` is set; see [`crash_child::entry`]): a consumer of
/// the server at `CHILD_ADDRESS`.
#[test]
fn child_process_entry() {
    crash_child::entry(CHILD_ENV, |url| async move { connect(nats_config(&url)).await });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_process_killed_and_restarted_loses_nothing_and_keeps_order() {
    const AGGREGATES: usize = 20;
    const VERSIONS: i64 = 30;
    let started = Instant::now();
    let url = nats_url();
    let topics = vec![unique("crash-a"), unique("crash-b")];
    let group = unique("g");
    let broker = connect(nats_config(&url)).await;

    // Publish everything first, remembering each event's stream sequence.
    let (published, expected) = publish_all(&broker, &topics, AGGREGATES, VERSIONS).await;
    let seq_of: BTreeMap<_, u64> = published.into_iter().map(|(k, pos)| (k, pos.offset)).collect();
    let total = seq_of.len();

    // First run: SIGKILL after a third of the events completed; then the
    // ack floors it left.
    let crash =
        Crash { child_env: CHILD_ENV, address: &url, group: &group, topics: &topics, logs: "eventbus-nats-crash" };
    let (floors, runs) = crash
        .run(total, &expected, async || {
            let mut floors = BTreeMap::new();
            for topic in &topics {
                floors.insert(topic.clone(), broker.ack_floor(&group, topic).await.unwrap().unwrap_or(0));
            }
            floors
        })
        .await;
    // Duplicates: events of the first run handled again; all above the floor.
    let mut below_floor = Vec::new();
    for (topic, agg, v) in &runs.second.began {
        let seq = seq_of[&(topic.clone(), agg.clone(), *v)];
        if seq <= floors[topic] {
            below_floor.push((topic.clone(), agg.clone(), *v, seq));
        }
    }
    runs.check("nats crash scenario", total, &format!("ack floors at kill {floors:?}"), started);
    assert!(
        below_floor.is_empty(),
        "the restarted process re-handled events at or below the ack floor: {below_floor:?}"
    );
    runs.remove_logs();
    cleanup(&broker, &topics).await;
}

// ---------------------------------------------------------------------------
// nats-server restarted mid-stream.

struct Server {
    child: Option<Child>,
    dir: PathBuf,
}

impl Server {
    fn bin() -> String {
        std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into())
    }

    fn spare_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Starts nats-server and waits for its "Server is ready" log line.
    async fn start(port: u16, dir: &Path) -> Server {
        let mut cmd = Command::new(Self::bin());
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]).arg(dir);
        let child = common::nats_server::start_and_wait_ready(cmd, port).await;
        Server { child: Some(child), dir: dir.to_path_buf() }
    }

    /// SIGKILL, then wait for the exit.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_stream_resumes_without_loss() {
    const AGGREGATES: usize = 20;
    const VERSIONS: i64 = 40;
    let started = Instant::now();
    let port = Server::spare_port();
    let dir = temp_path("eventbus-nats-store");
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = Server::start(port, &dir).await;
    let url = format!("nats://127.0.0.1:{port}");
    let topics = vec![unique("restart-a"), unique("restart-b")];
    let group = unique("g");
    let config =
        NatsConfig { ack_wait: Duration::from_secs(5), request_timeout: Duration::from_secs(2), ..nats_config(&url) };
    let broker = connect(config).await;
    let nats_stats = broker.stats().clone();
    let bus = Arc::new(EventBus::builder(broker).config(bus_config(&group)).build().unwrap());
    let checker = Arc::new(OrderChecker::new());
    let (progress, mut done) = Progress::new();
    for topic in &topics {
        let handler = |work| checked_handler(checker.clone(), progress.clone(), work, Dropped::StaysRunning);
        let (fast, slow) = (handler(Duration::from_millis(2)), handler(Duration::from_millis(100)));
        // One slow aggregate keeps messages held (queued in the pool) across
        // the restart, so the new durable generation redelivers them.
        bus.subscribe_envelope(
            topic,
            move |env: Envelope| if env.aggregate_id == "t0-agg0" { slow(env) } else { fast(env) },
        )
        .await
        .unwrap();
    }
    bus.start().await.unwrap();

    // Publishers keep going through the outage: a failed publish is retried
    // (Nats-Msg-Id makes a retry of a stored one a duplicate, not a copy).
    let publish_failures = Arc::new(AtomicUsize::new(0));
    let (pace_tx, pace_rx) = watch::channel(false);
    let mut expected = BTreeMap::new();
    let mut publishers = Vec::new();
    for (t, topic) in topics.iter().enumerate() {
        for a in 0..AGGREGATES {
            let agg = format!("t{t}-agg{a}");
            expected.insert(agg.clone(), VERSIONS);
            let bus = bus.clone();
            let topic = topic.clone();
            let failures = publish_failures.clone();
            let mut pace = pace_rx.clone();
            publishers.push(tokio::spawn(async move {
                for v in 1..=VERSIONS {
                    // The second half is published from the outage on.
                    if v == VERSIONS / 2 + 1 {
                        pace.wait_for(|go| *go).await.unwrap();
                    }
                    let env = event(&agg, v);
                    while let Err(e) = bus.publish_envelope(&topic, &env).await {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "publish failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await; // publish retry backoff during the outage
                    }
                }
            }));
        }
    }
    let total = topics.len() * AGGREGATES * VERSIONS as usize;
    // Kill the server while the consumer is in the middle of the first half.
    wait_for(&mut done, total / 4, Duration::from_secs(60), "before the restart").await;
    server.kill().await;
    let handled_at_kill = *done.borrow();
    pace_tx.send_replace(true);
    let mut server = Server::start(port, &dir).await;
    for p in publishers {
        p.await.unwrap();
    }
    wait_for(&mut done, total, Duration::from_secs(120), "after the restart").await;
    let stats = bus.consumer_stats().await.unwrap();
    let report = bus.close().await;
    let r = checker.report(&expected);
    eprintln!(
        "server restart: sent {total}, handled {}, duplicates {}, violations {}, missing {}, handled at kill \
         {handled_at_kill}, publish retries {}, redelivered {}, connects {}, re-anchors {}, lost deliveries {}, \
         re-acked {}, in {:?}",
        r.handled,
        r.duplicates,
        r.violations,
        r.missing,
        publish_failures.load(Ordering::Relaxed),
        stats.redelivered_skipped.load(Ordering::Relaxed),
        nats_stats.connects.load(Ordering::Relaxed),
        nats_stats.reanchors.load(Ordering::Relaxed),
        nats_stats.lost_deliveries.load(Ordering::Relaxed),
        nats_stats.reacked.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.handled, total as u64);
    assert_eq!(report.final_commit_error, None);
    assert!(nats_stats.connects.load(Ordering::Relaxed) >= 2, "the client reconnected");
    assert!(nats_stats.reanchors.load(Ordering::Relaxed) >= 1, "the sessions re-anchored after the reconnect");
    server.kill().await;
    let _ = std::fs::remove_dir_all(&server.dir);
}

// ---------------------------------------------------------------------------
// Consumer lag and connection state, read from the server.

async fn next_message(session: &mut eventbus::broker::nats::NatsSession) -> eventbus::Delivery {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), eventbus::Session::next(session))
            .await
            .expect("a session event within 10 s")
            .unwrap();
        if let eventbus::SessionEvent::Message(d) = ev {
            return d;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_is_the_stream_end_minus_the_ack_floor() {
    let topic = unique("lag");
    let group = unique("g");
    let broker = connect(nats_config(&nats_url())).await;
    broker.ensure_topic(&topic, 1).await.unwrap();
    for i in 0..10u8 {
        let msg = eventbus::Outbound { topic: topic.clone(), key: None, headers: Vec::new(), payload: vec![i] };
        broker.publish(msg).await.unwrap();
    }
    let tp = eventbus::TopicPartition::new(topic.as_str(), 0);
    let lag = |committed| vec![eventbus::PartitionLag { partition: tp.clone(), end_offset: 11, committed }];
    let topics = [topic.clone(), unique("no-such-stream")];
    // No durable yet: all ten stored messages are lag; a topic without a
    // stream has no entry.
    assert_eq!(broker.consumer_lag(&group, &topics).await.unwrap(), lag(1));

    let mut session = broker.subscribe(&group, std::slice::from_ref(&topic)).await.unwrap();
    for seq in 1..=10 {
        assert_eq!(next_message(&mut session).await.offset, seq);
    }
    assert_eq!(broker.consumer_lag(&group, &topics).await.unwrap(), lag(1), "read, but nothing acknowledged");
    eventbus::Session::commit(&mut session, &[(tp.clone(), 5)]).await.unwrap();
    let lags = broker.consumer_lag(&group, &topics).await.unwrap();
    assert_eq!(lags, lag(5));
    assert_eq!(lags[0].lag(), 6);
    eventbus::Session::commit(&mut session, &[(tp.clone(), 11)]).await.unwrap();
    assert_eq!(broker.consumer_lag(&group, &topics).await.unwrap()[0].lag(), 0);
    eventbus::Session::close(session).await.unwrap();
    cleanup(&broker, &[topic]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_follows_a_server_restart() {
    let port = Server::spare_port();
    let dir = temp_path("eventbus-nats-conn");
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = Server::start(port, &dir).await;
    let broker = connect(nats_config(&format!("nats://127.0.0.1:{port}"))).await;
    let mut state = broker.connection_state();
    assert_eq!(*state.borrow(), eventbus::ConnectionState::Connected);
    let limit = Duration::from_secs(30);
    server.kill().await;
    let down = tokio::time::timeout(limit, state.wait_for(|s| *s == eventbus::ConnectionState::Disconnected)).await;
    assert!(down.map(|r| r.is_ok()).unwrap_or(false), "no Disconnected within {limit:?} of killing the server");
    let mut server = Server::start(port, &dir).await;
    let up = tokio::time::timeout(limit, state.wait_for(|s| *s == eventbus::ConnectionState::Connected)).await;
    assert!(up.map(|r| r.is_ok()).unwrap_or(false), "no Connected within {limit:?} of restarting the server");
    server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Dead-letter streams: created at subscribe time even with `strategy =
// existing`; names NATS cannot hold are rejected with a typed error.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_streams_are_created_even_with_strategy_existing_and_bad_names_are_rejected() {
    use eventbus::broker::nats::StreamStrategy;
    let topic = unique("dls");
    let dlq = format!("{topic}.dlq");
    let creator = connect(nats_config(&nats_url())).await;
    creator.ensure_topic(&topic, 1).await.unwrap();
    let existing = connect(NatsConfig { strategy: StreamStrategy::Existing, ..nats_config(&nats_url()) }).await;
    // The topic's stream exists; its dead-letter stream does not, and is made.
    existing.ensure_dead_letter_topic(&topic, &dlq).await.unwrap();
    let js = existing.jetstream();
    let mut stream = js.get_stream(existing.config().stream_name(&dlq)).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.subjects, vec![dlq.clone()]);
    assert_eq!(info.config.max_messages, -1);
    assert_eq!(info.config.duplicate_window, existing.config().dead_letter_duplicate_window);
    // Configured not to: a missing one is an unknown topic.
    let hands_off = connect(NatsConfig {
        strategy: StreamStrategy::Existing,
        create_dead_letter_streams: false,
        ..nats_config(&nats_url())
    })
    .await;
    let err = hands_off.ensure_dead_letter_topic(&topic, &format!("{topic}-other-dlq")).await.unwrap_err();
    assert!(matches!(err, eventbus::BrokerError::UnknownTopic(_)), "{err:?}");
    // Names the server cannot hold.
    for bad in [format!("{topic} dlq"), format!("{topic}.*"), format!("{topic}..dlq"), topic.clone(), "x".repeat(300)] {
        let err = existing.ensure_dead_letter_topic(&topic, &bad).await.unwrap_err();
        assert!(
            matches!(err, eventbus::BrokerError::Config { ref key, .. } if key == "consumer.dead_letter_suffix"),
            "{bad:?}: {err:?}"
        );
    }
    let wild = connect(NatsConfig { wildcard_subjects: true, ..nats_config(&nats_url()) }).await;
    let err = wild.ensure_dead_letter_topic(&topic, &dlq).await.unwrap_err();
    assert!(
        matches!(err, eventbus::BrokerError::Config { .. }),
        "a '.' suffix falls into the wildcard stream: {err:?}"
    );
    cleanup(&creator, &[topic]).await;
}

// ---------------------------------------------------------------------------
// Error mapping against the server: a full stream with `discard = new`, a
// message over max_payload.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_is_full_and_an_oversized_message_is_refused() {
    use eventbus::broker::nats::Discard;
    let topic = unique("full");
    let broker = connect(NatsConfig { discard: Discard::New, max_msgs: 2, ..nats_config(&nats_url()) }).await;
    let msg = |n: u8| eventbus::Outbound { topic: topic.clone(), key: None, headers: Vec::new(), payload: vec![n] };
    broker.publish(msg(1)).await.unwrap();
    broker.publish(msg(2)).await.unwrap();
    let err = broker.publish(msg(3)).await.unwrap_err();
    assert!(matches!(err, eventbus::BrokerError::Full(_)), "{err:?}");
    assert!(err.is_retriable());
    let max = broker.client().max_payload();
    let huge = eventbus::Outbound { topic: topic.clone(), key: None, headers: Vec::new(), payload: vec![0; max + 1] };
    let err = broker.publish(huge).await.unwrap_err();
    assert!(matches!(err, eventbus::BrokerError::Refused(_)), "{err:?}");
    cleanup(&broker, &[topic]).await;
}

// ---------------------------------------------------------------------------
// The handler's context.

/// An ordered handler's [`eventbus::DeliveryContext`] names the stream,
/// partition 0 and the stream sequence the server returned for each publish
/// (and its key, headers and trace IDs); a raw handler gets the same
/// context type. The memory-broker version is `tests/handler_context.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_handler_context_matches_the_broker_positions() {
    let (topic, raw_topic, group) = (unique("ctx"), unique("ctx-raw"), unique("g"));
    let broker = connect(nats_config(&nats_url())).await;
    let admin = broker.clone();
    let bus = EventBus::builder(broker).config(bus_config(&group)).build().unwrap();
    let mut rx = common::scenario::forward_contexts(&bus, &topic).await;
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<eventbus::DeliveryContext>();
    bus.subscribe_raw(&raw_topic, move |_delivery, ctx| {
        raw_tx.send(ctx).unwrap();
        std::future::ready(Ok(()))
    })
    .await
    .unwrap();
    bus.start().await.unwrap();
    let published = common::scenario::publish_traced(&bus, &topic, 4, 3).await;
    let mut offsets = Vec::new();
    for _ in 0..published.len() {
        let (env, ctx) = recv_within(&mut rx, Duration::from_secs(20), "every event handled").await;
        let (sent, pos) = &published[&(env.aggregate_id.clone(), env.event_version)];
        assert_eq!(&env, sent);
        assert_eq!((ctx.topic(), ctx.partition(), ctx.offset()), (topic.as_str(), 0, pos.offset));
        assert_eq!(ctx.key(), Some(env.aggregate_id.as_bytes()));
        assert_eq!((ctx.trace_id(), ctx.correlation_id()), (sent.trace_id.as_deref(), sent.correlation_id.as_deref()));
        for (name, value) in sent.to_headers() {
            assert_eq!(ctx.header(&name), Some(value.as_slice()), "header {name}");
        }
        assert_eq!((ctx.attempt(), ctx.delivery_attempt()), (1, 1));
        offsets.push(ctx.offset());
    }
    // The stream's sequences: 1..=n, each once.
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=published.len() as u64).collect::<Vec<_>>());
    let headers = vec![("X-Trace-ID".to_string(), b"raw-trace".to_vec())];
    let pos = bus.publish(&raw_topic, Some(b"note-1"), headers, b"ping".to_vec()).await.unwrap();
    let ctx = recv_within(&mut raw_rx, Duration::from_secs(20), "raw delivered").await;
    assert_eq!((ctx.topic(), ctx.partition(), ctx.offset()), (raw_topic.as_str(), 0, pos.offset));
    assert_eq!((ctx.key(), ctx.trace_id()), (Some(&b"note-1"[..]), Some("raw-trace")));
    close_cleanly(bus, published.len() as u64 + 1).await;
    cleanup(&admin, &[topic, raw_topic]).await;
}
