//! The Prometheus exporter (feature `prometheus`): a bus handles known
//! events, and `GET /metrics` (plain HTTP over a TCP stream) reports them.
//! One test in its own binary, since the exporter is the process-wide
//! recorder.
#![cfg(not(feature = "loom"))]
#![cfg(feature = "prometheus")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{fast_config, Progress};
use eventbus::{Envelope, EventBus, MemoryBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` from `addr`, returning the body; retries the connection
/// (bounded) until the listener is up.
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "metrics listener not up yet");
                tokio::time::sleep(Duration::from_millis(20)).await; // connect retry interval
            }
            Err(e) => panic!("cannot connect to the metrics listener at {addr}: {e}"),
        }
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response))
        .await
        .expect("response within 10 s")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_handled_events() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    eventbus::telemetry::install_prometheus(addr).unwrap();

    let bus = EventBus::builder(MemoryBroker::default()).config(fast_config("prom")).build().unwrap();
    let progress = Arc::new(Progress::default());
    {
        let progress = progress.clone();
        bus.subscribe_envelope("orders", move |env: Envelope| {
            let progress = progress.clone();
            async move {
                if env.event_version == 5 {
                    return Err("poison".into());
                }
                progress.bump();
                Ok(())
            }
        })
        .await
        .unwrap();
    }
    bus.start().await.unwrap();
    for v in 1..=5 {
        for a in 0..5 {
            let env = Envelope::new(format!("agg-{a}"), "Updated", v, &serde_json::json!({})).unwrap();
            bus.publish_envelope("orders", &env).await.unwrap();
        }
    }
    tokio::time::timeout(Duration::from_secs(10), progress.wait_for(20)).await.expect("20 events handled");
    let report = bus.close().await;
    assert_eq!(report.final_commit_error, None);

    let body = get(addr, "/metrics").await;
    assert!(body.contains("# HELP eventbus_handled_total Events a handler finished successfully"), "{body}");
    assert_eq!(sample(&body, r#"eventbus_handled_total{topic="orders"}"#), Some(20.0), "{body}");
    assert_eq!(sample(&body, r#"eventbus_published_total{topic="orders"}"#), Some(25.0), "{body}");
    assert_eq!(sample(&body, r#"eventbus_dead_lettered_total{topic="orders",reason="handler"}"#), Some(5.0), "{body}");
    assert_eq!(sample(&body, r#"eventbus_handler_failed_total{topic="orders"}"#), Some(15.0), "{body}");
    assert_eq!(sample(&body, r#"eventbus_handle_seconds_count{topic="orders"}"#), Some(25.0), "{body}");
    assert_eq!(sample(&body, r#"eventbus_handle_seconds_bucket{topic="orders",le="+Inf"}"#), Some(25.0), "{body}");
    for p in 0..3 {
        let series = format!(r#"eventbus_commit_lag{{topic="orders",partition="{p}"}}"#);
        assert_eq!(sample(&body, &series), Some(0.0), "{body}");
    }
}
