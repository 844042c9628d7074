//! The plain clients, as an application without the bus would use them:
//! rdkafka's `StreamConsumer` and an async-nats pull consumer, each decoding
//! the envelope and counting inline (the same trivial handler as ours).

use std::sync::Arc;
use std::time::Duration;

use eventbus::Envelope;
use futures::StreamExt;
use indicatif::ProgressBar;
use tokio::time::Instant as Deadline;

use super::drain::{shortfall, Drain, Tally};

/// A fresh group of rdkafka's `StreamConsumer` reads `topics` from the
/// beginning, fetching like our consumer (`fetch_wait`); librdkafka commits
/// in the background (its defaults).
#[cfg(feature = "kafka")]
pub async fn kafka(
    brokers: &str,
    group: &str,
    fetch_wait: Duration,
    topics: &[String],
    expected: u64,
    deadline: Deadline,
    bar: ProgressBar,
) -> Result<Drain, String> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::{ClientConfig, Message};

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", fetch_wait.as_millis().to_string())
        .create()
        .map_err(|e| format!("raw rdkafka consumer: {e}"))?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(|e| format!("raw rdkafka subscribe: {e}"))?;
    let tally = Tally::new(bar);
    while tally.count() < expected {
        let msg = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(format!("raw rdkafka: {e}")),
            Err(_) => return Err(shortfall("raw rdkafka consumer", &tally, expected)),
        };
        handle(msg.payload().unwrap_or_default(), &tally)?;
    }
    Ok(tally.drain())
}

/// Deletes `topics` with a plain admin client (the bench's own clean-up).
#[cfg(feature = "kafka")]
pub async fn kafka_delete_topics(brokers: &str, topics: &[String]) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::ClientConfig;

    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().map_err(|e| e.to_string())?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin.delete_topics(&names, &options).await.map_err(|e| e.to_string())?;
    let failed: Vec<String> = results.into_iter().filter_map(|r| r.err()).map(|(t, e)| format!("{t}: {e}")).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join(", "))
    }
}

/// One ephemeral pull consumer per stream (explicit acks, from the first
/// message), one task each, acking every message after the handler.
#[cfg(feature = "nats")]
pub async fn nats(
    js: &async_nats::jetstream::Context,
    streams: &[String],
    expected: u64,
    deadline: Deadline,
    bar: ProgressBar,
) -> Result<Drain, String> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};

    // Every consumer and pull first, then the tasks: the clock starts at the
    // first message, so setting up one stream must not overlap another's reading.
    let mut pulls = Vec::new();
    for name in streams {
        let stream = js.get_stream(name).await.map_err(|e| format!("raw NATS: stream {name}: {e}"))?;
        let consumer = stream
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("raw NATS: consumer on {name}: {e}"))?;
        pulls.push((name.clone(), consumer));
    }
    let tally = Tally::new(bar);
    let mut tasks = Vec::new();
    for (name, consumer) in pulls {
        let mut messages = consumer.messages().await.map_err(|e| format!("raw NATS: pull on {name}: {e}"))?;
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let m = m.map_err(|e| format!("raw NATS: {name}: {e}"))?;
                handle(&m.payload, &tally)?;
                m.ack().await.map_err(|e| format!("raw NATS: ack on {name}: {e}"))?;
            }
            Ok::<(), String>(())
        }));
    }
    let done = tally.wait(expected, deadline).await;
    let mut error = None;
    for t in tasks {
        t.abort();
        if let Ok(Err(e)) = t.await {
            error.get_or_insert(e);
        }
    }
    match (done, error) {
        (true, _) => Ok(tally.drain()),
        (false, Some(e)) => Err(e),
        (false, None) => Err(shortfall("raw NATS consumer", &tally, expected)),
    }
}

fn handle(payload: &[u8], tally: &Arc<Tally>) -> Result<(), String> {
    Envelope::decode(payload).map_err(|e| format!("raw consumer: not an envelope: {e}"))?;
    tally.hit();
    Ok(())
}
