#![cfg(not(feature = "loom"))]
#![cfg(all(feature = "nats", feature = "kafka"))]
//! The environment overrides of `[nats.security]` and `[kafka.security]`
//! reach `connect`. One test in its own binary: it sets process environment
//! variables, which would change what every other test in a shared binary
//! connects with.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::crash_child::temp_path;
use common::scenario::{bus_config, close_cleanly, event, recv_within, started_with_channels, unique};
use eventbus::broker::kafka::{KafkaBroker, KafkaConfig};
use eventbus::broker::nats::{NatsBroker, NatsConfig};
use eventbus::broker::nats_security::NatsSecurity;
use eventbus::broker::secret::Secret;
use eventbus::BrokerError;

struct Child(std::process::Child, std::path::PathBuf);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// nats-server with JetStream and `--auth <token>`, ready.
fn token_server(token: &str) -> (Child, u16) {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = temp_path("eventbus-nats-env");
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(&bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "--auth", token, "-sd"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let child = Child(child, dir);
    let mut lines = BufReader::new(stderr).lines();
    // Blocks until the line or the server's exit (end of stderr).
    let ready = lines.by_ref().map_while(Result::ok).any(|l| l.contains("Server is ready"));
    assert!(ready, "nats-server on port {port} exited before it was ready");
    std::thread::spawn(move || lines.for_each(drop));
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_overrides_reach_connect() {
    let token = format!("envtok-{:016x}", rand::random::<u64>());
    let (_server, port) = token_server(&token);
    let url = format!("nats://127.0.0.1:{port}");
    // The file says user/password; the environment's token wins.
    let security = NatsSecurity {
        user: Some("svc".into()),
        password: Some(Secret::new("not-the-password")),
        ..NatsSecurity::default()
    };
    let config = NatsConfig { url: url.clone(), security, ..NatsConfig::default() };
    let err = NatsBroker::connect(config.clone()).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unauthorized(_)), "without the override: {err:?}");
    std::env::set_var("EVENTBUS_NATS_TOKEN", &token);
    let broker = NatsBroker::connect(config).await.expect("the environment's token");
    let (topic, raw_topic, group) = (unique("env"), unique("env-raw"), unique("g"));
    let (bus, mut env_rx, _raw_rx) = started_with_channels(broker, bus_config(&group), &topic, &raw_topic).await;
    let env = event("env-1", 1);
    bus.publish_envelope(&topic, &env).await.unwrap();
    assert_eq!(recv_within(&mut env_rx, Duration::from_secs(10), "delivered").await, env);
    close_cleanly(bus, 1).await;
    std::env::remove_var("EVENTBUS_NATS_TOKEN");

    // Kafka: the CA file named by the environment is checked before any client exists.
    std::env::set_var("EVENTBUS_KAFKA_TLS", "true");
    std::env::set_var("EVENTBUS_KAFKA_TLS_CA_FILE", "/nonexistent/eventbus-ca.pem");
    let err = KafkaBroker::new(KafkaConfig::default()).unwrap_err();
    std::env::remove_var("EVENTBUS_KAFKA_TLS");
    std::env::remove_var("EVENTBUS_KAFKA_TLS_CA_FILE");
    assert!(
        matches!(&err, BrokerError::Config { key, reason } if key == "kafka.security.ca_file"
            && reason.contains("/nonexistent/eventbus-ca.pem")),
        "{err:?}"
    );
}
