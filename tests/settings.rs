// The example file selects NATS and has a Kafka section: both adapters are needed.
#![cfg(all(feature = "nats", feature = "kafka", not(feature = "loom")))]
//! One TOML file configures the bus and its broker adapter (`[broker]`),
//! with environment overrides for URLs and credentials
//! (`BusConfig::load`, `eventbus::settings`); `docs/eventbus.example.toml`
//! loads as written.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use eventbus::broker::kafka::OffsetReset;
use eventbus::bus::ConfigError;
use eventbus::settings::ENV_OVERRIDES;
use eventbus::{BrokerError, BrokerKind, BusConfig, Envelope, EventBus, MemoryBroker, Secret};

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/eventbus.example.toml")
}

fn example_text() -> String {
    std::fs::read_to_string(example_path()).expect("docs/eventbus.example.toml exists")
}

/// An environment with exactly these variables.
fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |name| vars.get(name).cloned()
}

#[test]
fn the_example_file_loads_as_written() {
    let config = BusConfig::from_toml_with_env(&example_text(), env(&[])).expect("the example is valid");
    assert_eq!(config.close_timeout, Some(Duration::from_secs(30)));
    assert_eq!(config.pool.concurrency, 64);
    assert_eq!(config.pool.capacity, 10_000);
    assert_eq!(config.consumer.group, "billing");
    assert_eq!(config.consumer.retry.max_attempts, 5);
    assert_eq!(config.observability.backlog.pool.map(|t| t.threshold), Some(5000));
    assert!(config.observability.health.publish && config.observability.health.monitor);
    assert_eq!(config.broker.kind, BrokerKind::Nats);
    assert_eq!(config.broker.memory.default_partitions, 3);
    assert_eq!(config.broker.nats.url, "nats://127.0.0.1:4222");
    assert_eq!(config.broker.nats.connection_name, "billing");
    assert_eq!(config.broker.nats.max_ack_pending, 1000);
    assert_eq!(config.broker.kafka.brokers, "127.0.0.1:9092");
    assert_eq!(config.broker.kafka.client_id, "billing");
    assert_eq!(config.broker.kafka.offset_reset, OffsetReset::Earliest);
    assert!(config.broker.kafka.properties.is_empty(), "the credentials are commented out");

    // `load` reads the same file and applies the process's real environment.
    let loaded = BusConfig::load(example_path()).expect("load the example");
    let expected = BusConfig::from_toml_with_env(&example_text(), |name| std::env::var(name).ok()).unwrap();
    assert_eq!(loaded, expected);
}

#[test]
fn environment_overrides_urls_and_credentials() {
    let config = BusConfig::from_toml_with_env(
        &example_text(),
        env(&[
            ("EVENTBUS_BROKER", "kafka"),
            ("EVENTBUS_NATS_URL", "nats://nats-1:4222,nats://nats-2:4222"),
            ("EVENTBUS_NATS_USER", "billing-svc"),
            ("EVENTBUS_NATS_PASSWORD", "nats-s3cret"),
            ("EVENTBUS_KAFKA_BROKERS", "kafka-1:9093,kafka-2:9093"),
            ("EVENTBUS_KAFKA_TLS", "true"),
            ("EVENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("EVENTBUS_KAFKA_SASL_USERNAME", "billing-svc"),
            ("EVENTBUS_KAFKA_SASL_PASSWORD", "s3cret"),
        ]),
    )
    .expect("valid with the overrides");
    assert_eq!(config.broker.kind, BrokerKind::Kafka);
    assert_eq!(config.broker.nats.url, "nats://nats-1:4222,nats://nats-2:4222");
    let nats = &config.broker.nats;
    assert_eq!(nats.security.user.as_deref(), Some("billing-svc"));
    assert_eq!(nats.security.password.as_ref().map(Secret::expose), Some("nats-s3cret"));
    // A logged configuration does not show the NATS credentials.
    let shown = format!("{nats:?}");
    assert!(!shown.contains("nats-s3cret") && shown.contains("***"), "{shown}");
    assert_eq!(config.broker.kafka.brokers, "kafka-1:9093,kafka-2:9093");
    let kafka = &config.broker.kafka.security;
    assert!(kafka.tls);
    assert_eq!(kafka.sasl_mechanism.map(|m| format!("{m:?}")).as_deref(), Some("ScramSha512"));
    assert_eq!(kafka.username.as_deref(), Some("billing-svc"));
    assert_eq!(kafka.password.as_ref().map(Secret::expose), Some("s3cret"));
    assert!(!format!("{:?}", config.broker.kafka).contains("s3cret"));
    // Everything else is the file's.
    assert_eq!(config.consumer.group, "billing");
    assert_eq!(config.pool.capacity, 10_000);
    // Every variable read is listed (and documented in the example file).
    let documented = example_text();
    for (name, key) in ENV_OVERRIDES {
        assert!(documented.contains(name) && documented.contains(key), "{name} ({key}) missing from the example");
    }
}

#[test]
fn blank_environment_variables_change_nothing() {
    let blank: Vec<(&str, &str)> = ENV_OVERRIDES.iter().map(|(name, _)| (*name, "  ")).collect();
    let with_blank = BusConfig::from_toml_with_env(&example_text(), env(&blank)).unwrap();
    let without = BusConfig::from_toml_with_env(&example_text(), env(&[])).unwrap();
    assert_eq!(with_blank, without);
}

#[test]
fn a_bad_override_or_adapter_setting_is_a_typed_error_naming_the_key() {
    match BusConfig::from_toml_with_env(&example_text(), env(&[("EVENTBUS_BROKER", "rabbitmq")])) {
        Err(ConfigError::Invalid { key, reason }) => {
            assert_eq!(key, "broker.kind");
            assert!(reason.contains("rabbitmq") && reason.contains("kafka"), "{reason}");
        }
        other => panic!("expected Invalid(broker.kind), got {other:?}"),
    }
    // The selected adapter is validated with its own checks...
    let bad_nats = "[broker]\nkind = \"nats\"\n[broker.nats]\nack_wait = 10\n";
    match BusConfig::from_toml_with_env(bad_nats, env(&[])) {
        Err(ConfigError::Broker(BrokerError::Config { key, .. })) => assert_eq!(key, "nats.ack_wait"),
        other => panic!("expected Broker(Config nats.ack_wait), got {other:?}"),
    }
    // A NATS user needs its password.
    let no_password = "[broker]\nkind = \"nats\"\n";
    match BusConfig::from_toml_with_env(no_password, env(&[("EVENTBUS_NATS_USER", "billing-svc")])) {
        Err(ConfigError::Broker(BrokerError::Config { key, .. })) => {
            assert!(key.starts_with("nats.security"), "{key}")
        }
        other => panic!("expected Broker(Config nats.security.*), got {other:?}"),
    }
    let bad_kafka = "[broker]\nkind = \"kafka\"\n[broker.kafka.properties]\n\"enable.auto.commit\" = \"true\"\n";
    assert!(matches!(
        BusConfig::from_toml_with_env(bad_kafka, env(&[])),
        Err(ConfigError::Broker(BrokerError::Config { .. }))
    ));
    // ...an adapter that is not selected is not: it may stay in the file.
    let unused = bad_nats.replace("kind = \"nats\"", "kind = \"memory\"");
    assert_eq!(BusConfig::from_toml_with_env(&unused, env(&[])).unwrap().broker.kind, BrokerKind::Memory);
    match BusConfig::from_toml_with_env("[broker.memory]\ndefault_partitions = 0\n", env(&[])) {
        Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "broker.memory.default_partitions"),
        other => panic!("expected Invalid(broker.memory.default_partitions), got {other:?}"),
    }
    // Unknown keys and adapters are parse errors.
    for bad in ["[broker]\nkind = \"rabbitmq\"\n", "[broker]\nurl = \"x\"\n", "[broker.nats]\nservers = \"x\"\n"] {
        assert!(matches!(BusConfig::from_toml_with_env(bad, env(&[])), Err(ConfigError::Toml(_))), "{bad}");
    }
    // A file that cannot be read names its path.
    let missing = example_path().with_file_name("no-such-eventbus.toml");
    match BusConfig::load(&missing) {
        Err(e @ ConfigError::Read { .. }) => assert!(e.to_string().contains("no-such-eventbus.toml"), "{e}"),
        other => panic!("expected Read, got {other:?}"),
    }
}

#[test]
fn a_written_configuration_reads_back_the_same() {
    let config = BusConfig::from_toml_with_env(&example_text(), env(&[])).unwrap();
    let written = toml::to_string(&config).expect("the configuration writes as TOML");
    assert_eq!(BusConfig::from_toml(&written).expect("reads back"), config, "{written}");
}

/// A memory-broker service configured entirely by one file: the broker's
/// section configures the broker, the bus's sections the bus.
#[tokio::test]
async fn a_memory_service_runs_from_one_file() {
    let text = "[consumer]\ngroup = \"settings-memory\"\n[broker]\nkind = \"memory\"\n[broker.memory]\ndefault_partitions = 5\n";
    let config = BusConfig::from_toml_with_env(text, env(&[])).unwrap();
    assert_eq!(config.broker.kind, BrokerKind::Memory);
    let broker = MemoryBroker::new(config.broker.memory.clone());
    let bus = EventBus::builder(broker).config(config).build().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    bus.subscribe_envelope("settings-orders", move |e: Envelope| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(e.aggregate_id);
            Ok(())
        }
    })
    .await
    .unwrap();
    bus.start().await.unwrap();
    bus.publish_envelope(
        "settings-orders",
        &Envelope::new("order-1", "OrderPlaced", 1, &serde_json::json!({})).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(rx.recv().await.as_deref(), Some("order-1"));
    assert_eq!(bus.broker().partitions("settings-orders"), Some(5), "the topic has broker.memory's partitions");
    assert_eq!(bus.config().consumer.group, "settings-memory");
    bus.close().await;
}

/// A nats-server of this test's own, with JetStream and a user and password,
/// on a free loopback port; killed when dropped.
struct AuthServer {
    child: std::process::Child,
    url: String,
    _store: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_server_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nats-server")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/sbin/nats-server")]).find(|p| p.is_file())
}

fn start_auth_server(binary: &std::path::Path, user: &str, password: &str) -> AuthServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = TempDir(std::env::temp_dir().join(format!("eventbus-settings-nats-{}-{port}", std::process::id())));
    std::fs::create_dir_all(&store.0).unwrap();
    let child = std::process::Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store.0)
        .args(["--user", user, "--pass", password])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server");
    let server = AuthServer { child, url: format!("nats://127.0.0.1:{port}"), _store: store };
    // Ready when it accepts connections (bounded: 10 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nats-server did not listen on {port} within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// The NATS credentials of the environment reach the server: with them the
/// adapter connects, with a wrong password or none it is refused.
#[tokio::test]
async fn nats_credentials_from_the_environment_reach_the_server() {
    use eventbus::broker::nats::NatsBroker;
    // A test that could not run must not count as passed.
    let binary = nats_server_binary().expect(
        "nats_credentials_from_the_environment_reach_the_server: not run: no nats-server binary \
         (apt-get install nats-server; .ci/run installs it)",
    );
    let server = start_auth_server(&binary, "billing-svc", "nats-s3cret");
    let config_with = |vars: &[(&str, &str)]| {
        let mut vars = vars.to_vec();
        vars.push(("EVENTBUS_NATS_URL", server.url.as_str()));
        let mut config = BusConfig::from_toml_with_env("[broker]\nkind = \"nats\"\n", env(&vars)).unwrap();
        config.broker.nats.connect_timeout = Duration::from_secs(3);
        config.broker.nats
    };

    let good = config_with(&[("EVENTBUS_NATS_USER", "billing-svc"), ("EVENTBUS_NATS_PASSWORD", "nats-s3cret")]);
    let broker = NatsBroker::connect(good).await.expect("the right credentials connect");
    drop(broker);

    let wrong = config_with(&[("EVENTBUS_NATS_USER", "billing-svc"), ("EVENTBUS_NATS_PASSWORD", "wrong")]);
    assert!(NatsBroker::connect(wrong).await.is_err(), "a wrong password is refused");
    assert!(NatsBroker::connect(config_with(&[])).await.is_err(), "no credentials are refused");
}
