#![cfg(not(feature = "loom"))]
#![cfg(feature = "kafka")]
//! TLS and SASL of the Kafka adapter.
//!
//! * Without a broker: the typed `[kafka.security]` section fails fast on
//!   missing files and conflicting raw properties, naming the key.
//! * On the librdkafka mock cluster (which speaks neither TLS nor SASL): a
//!   client configured for TLS or SASL fails `connect` with a typed error,
//!   and no secret reaches the captured librdkafka debug log (`debug = all`),
//!   `{:?}`/`{}` of the configuration or an error text.
//! * Against a TLS listener whose certificate no configured CA signed
//!   (`openssl s_server`, certificates made at test time): a typed error.
//! * Against tansu started with `--cert/--key --authentication` (see
//!   `docs/security.md`), when `EVENTBUS_KAFKA_SECURE_BROKERS` is set: the
//!   round trip over SASL_SSL, and a wrong password refused. Without the
//!   variable that test says it was not run.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::capture::log_text;
use common::crash_child::temp_path;
use common::pki::Pki;
use common::scenario::{bus_config, close_cleanly, event, recv_within, started_with_channels, unique};
use eventbus::broker::kafka::{KafkaBroker, KafkaConfig};
use eventbus::broker::kafka_security::{KafkaSecurity, SaslMechanism};
use eventbus::broker::secret::Secret;
use eventbus::BrokerError;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

// ---------------------------------------------------------------------------
// Capture of everything logged (librdkafka's log goes to tracing).

fn capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(common::capture::install);
}

fn secret(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn formatted(config: &KafkaConfig) -> Vec<String> {
    vec![format!("{config:?}"), format!("{config:#?}"), format!("{config}")]
}

fn assert_absent(secrets: &[&str], texts: &[String]) {
    for s in secrets {
        for t in texts {
            assert!(!t.contains(s), "a secret is in: {t}");
        }
    }
}

struct Mock {
    _owner: BaseProducer,
    servers: String,
}

impl Mock {
    fn new() -> Mock {
        let owner: BaseProducer = ClientConfig::new().set("test.mock.num.brokers", "1").create().expect("mock cluster");
        let servers = owner.client().mock_cluster().expect("mock cluster").bootstrap_servers();
        Mock { _owner: owner, servers }
    }
}

fn base(brokers: &str) -> KafkaConfig {
    KafkaConfig { brokers: brokers.to_string(), request_timeout: Duration::from_secs(10), ..KafkaConfig::default() }
}

fn config_key(e: &BrokerError) -> &str {
    match e {
        BrokerError::Config { key, .. } => key,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Without a broker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tls_files_fail_fast_naming_the_key() {
    let dir = temp_path("eventbus-kafka-tls");
    for (field, security) in [
        ("ca_file", KafkaSecurity { tls: true, ca_file: Some(dir.join("ca.pem")), ..KafkaSecurity::default() }),
        (
            "cert_file",
            KafkaSecurity {
                tls: true,
                cert_file: Some(dir.join("c.pem")),
                key_file: Some(dir.join("k.pem")),
                ..KafkaSecurity::default()
            },
        ),
    ] {
        let started = Instant::now();
        let err = KafkaBroker::connect(KafkaConfig { security, ..base("127.0.0.1:9") }).await.unwrap_err();
        assert_eq!(config_key(&err), format!("kafka.security.{field}"), "{err}");
        assert!(err.to_string().contains(&dir.display().to_string()), "names the file: {err}");
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_security_properties_conflict_with_the_typed_section() {
    let password = secret("rawpw");
    let security = KafkaSecurity {
        sasl_mechanism: Some(SaslMechanism::ScramSha256),
        username: Some("svc".into()),
        password: Some(Secret::new("typed-password")),
        ..KafkaSecurity::default()
    };
    let config = KafkaConfig {
        security,
        producer_properties: BTreeMap::from([("sasl.password".to_string(), password.clone())]),
        ..base("127.0.0.1:9")
    };
    let err = KafkaBroker::new(config.clone()).unwrap_err();
    assert_eq!(config_key(&err), "kafka.producer_properties.sasl.password");
    let mut texts = formatted(&config);
    texts.push(format!("{err:?}"));
    assert_absent(&[&password, "typed-password"], &texts);
    // A property librdkafka rejects, named like a secret: its value is not echoed.
    let config =
        KafkaConfig { properties: BTreeMap::from([("x.password".to_string(), password.clone())]), ..base("h:9") };
    let err = KafkaBroker::new(config).unwrap_err();
    assert_eq!(config_key(&err), "kafka.properties.x.password", "{err}");
    assert_absent(&[&password], &[format!("{err:?}"), err.to_string()]);
}

#[test]
fn security_section_parses_and_formats_without_secrets() {
    let password = secret("cfgpw");
    let key_password = secret("keypw");
    let text = format!(
        "brokers = \"kafka-1:9093\"\n[security]\ntls = true\nca_file = \"/etc/ca.pem\"\ncert_file = \"/etc/c.pem\"\n\
         key_file = \"/etc/k.pem\"\nkey_password = {key_password:?}\nsasl_mechanism = \"scram-sha-512\"\n\
         username = \"svc\"\npassword = {password:?}\n[properties]\n\"sasl.oauthbearer.client.secret\" = {password:?}\n"
    );
    let config: KafkaConfig = toml::from_str(&text).unwrap();
    config.validate().unwrap();
    let texts = formatted(&config);
    assert_absent(&[&password, &key_password], &texts);
    assert!(texts[0].contains("\"sasl.oauthbearer.client.secret\":\"***\""), "{}", texts[0]);
    assert!(texts[0].contains("brokers: \"kafka-1:9093\""), "{}", texts[0]);
    assert_eq!(texts[2], "kafka-1:9093 (sasl_ssl, client certificate, SCRAM-SHA-512 as svc)");
}

// ---------------------------------------------------------------------------
// The mock cluster.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_and_tls_against_a_plain_broker_fail_typed_without_leaking() {
    capture();
    let mock = Mock::new();
    let password = secret("saslpw");
    let raw_password = secret("rawsaslpw");
    let debug = BTreeMap::from([("debug".to_string(), "all".to_string())]);
    let mut texts = Vec::new();

    let typed = KafkaConfig {
        security: KafkaSecurity {
            sasl_mechanism: Some(SaslMechanism::Plain),
            username: Some("svc".into()),
            password: Some(Secret::new(&password)),
            ..KafkaSecurity::default()
        },
        properties: debug.clone(),
        ..base(&mock.servers)
    };
    let raw = KafkaConfig {
        properties: BTreeMap::from([
            ("debug".to_string(), "all".to_string()),
            ("security.protocol".to_string(), "sasl_plaintext".to_string()),
            ("sasl.mechanism".to_string(), "SCRAM-SHA-256".to_string()),
            ("sasl.username".to_string(), "svc".to_string()),
            ("sasl.password".to_string(), raw_password.clone()),
        ]),
        ..base(&mock.servers)
    };
    let tls = KafkaConfig {
        security: KafkaSecurity { tls: true, ..KafkaSecurity::default() },
        properties: debug,
        ..base(&mock.servers)
    };
    for (label, config, key) in [
        ("typed SASL", typed, "kafka.security.sasl_mechanism"),
        ("raw SASL", raw, "kafka.properties.sasl.mechanism"),
        ("TLS", tls, "kafka.security"),
    ] {
        texts.extend(formatted(&config));
        let started = Instant::now();
        let result = KafkaBroker::connect(config).await;
        let took = started.elapsed();
        let err = result.err().unwrap_or_else(|| panic!("{label}: connected to a broker without SASL/TLS"));
        eprintln!("{label}: {err:?} after {took:?}");
        assert_eq!(config_key(&err), key, "{label}");
        // Not the metadata timeout (request_timeout is 10 s).
        assert!(took < Duration::from_secs(5), "{label}: took {took:?}");
        texts.push(format!("{err:?}"));
        texts.push(err.to_string());
    }
    let log = log_text();
    assert!(log.contains("librdkafka"), "the capture saw librdkafka's debug log");
    texts.push(log);
    assert_absent(&[&password, &raw_password], &texts);
}

// ---------------------------------------------------------------------------
// tansu with TLS and SASL.

const SECURE_ENV: &str = "EVENTBUS_KAFKA_SECURE_BROKERS";

/// The secured tansu's settings, or `None` (after saying so).
fn secure_broker(test: &str) -> Option<KafkaConfig> {
    // Ignored unless asked for: asked for without a broker is a failure.
    let brokers = match std::env::var(SECURE_ENV) {
        Ok(b) if !b.trim().is_empty() => b,
        _ => panic!(
            "kafka_security::{test}: {SECURE_ENV} is not set (a Kafka broker with TLS and a SCRAM user, see \
             docs/security.md)"
        ),
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{SECURE_ENV} is set but {name} is not"));
    let mechanism = std::env::var("EVENTBUS_KAFKA_SECURE_MECHANISM").unwrap_or_else(|_| "SCRAM-SHA-512".into());
    let mechanism = match mechanism.as_str() {
        "SCRAM-SHA-256" => SaslMechanism::ScramSha256,
        "PLAIN" => SaslMechanism::Plain,
        _ => SaslMechanism::ScramSha512,
    };
    Some(KafkaConfig {
        brokers,
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(500),
        max_poll_interval: Duration::from_secs(60),
        fetch_max_wait: Duration::from_millis(50),
        request_timeout: Duration::from_secs(10),
        revoke_timeout: Duration::from_secs(20),
        replication_factor: 1,
        producer_properties: BTreeMap::from([("batch.num.messages".to_string(), "1".to_string())]),
        security: KafkaSecurity {
            tls: true,
            ca_file: Some(PathBuf::from(var("EVENTBUS_KAFKA_SECURE_CA_FILE"))),
            sasl_mechanism: Some(mechanism),
            username: Some(var("EVENTBUS_KAFKA_SECURE_USER")),
            password: Some(Secret::new(var("EVENTBUS_KAFKA_SECURE_PASSWORD"))),
            ..KafkaSecurity::default()
        },
        ..KafkaConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker with TLS and SCRAM users (EVENTBUS_KAFKA_SECURE_*); tansu 0.6 serves neither \
            (docs/security.md)"]
async fn tansu_round_trip_over_sasl_ssl_and_wrong_password() {
    let Some(config) = secure_broker("tansu_round_trip_over_sasl_ssl_and_wrong_password") else { return };
    capture();
    let password = config.security.password.as_ref().unwrap().expose().to_string();
    let broker = KafkaBroker::connect(config.clone()).await.unwrap();
    let (topic, raw_topic, group) = (unique("sec"), unique("sec-raw"), unique("g"));
    let (bus, mut env_rx, mut raw_rx) = started_with_channels(broker, bus_config(&group), &topic, &raw_topic).await;
    let env = event("secure-1", 1);
    bus.publish_envelope(&topic, &env).await.unwrap();
    assert_eq!(recv_within(&mut env_rx, Duration::from_secs(30), "envelope delivered").await, env);
    let pos = bus.publish(&raw_topic, Some(b"k"), vec![], b"raw".to_vec()).await.unwrap();
    let d = recv_within(&mut raw_rx, Duration::from_secs(30), "raw delivered").await;
    assert_eq!(d.offset, pos.offset);
    close_cleanly(bus, 2).await;

    let wrong = secret("wrongpw");
    let mut bad = config;
    bad.security.password = Some(Secret::new(&wrong));
    let started = Instant::now();
    let err = KafkaBroker::connect(bad).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unauthorized(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_absent(&[&password, &wrong], &[log_text(), format!("{err:?}")]);
}

// ---------------------------------------------------------------------------
// A TLS listener with a certificate no configured CA signed.

struct SServer(Child);

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_broker_certificate_fails_typed() {
    capture();
    // A server certificate signed by "ca", checked against an unrelated CA.
    let pki = Pki::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            "server.pem",
            "-key",
            "server.key",
        ])
        .current_dir(&pki.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let _server = SServer(child);
    // Wait until it accepts connections (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = KafkaConfig {
        security: KafkaSecurity { tls: true, ca_file: Some(pki.path("rogue-ca.pem")), ..KafkaSecurity::default() },
        ..base(&format!("127.0.0.1:{port}"))
    };
    let started = Instant::now();
    let err = KafkaBroker::connect(config).await.unwrap_err();
    eprintln!("untrusted certificate: {err:?} after {:?}", started.elapsed());
    assert_eq!(config_key(&err), "kafka.security", "{err}");
    assert!(err.to_string().contains("certificate verify failed"), "{err}");
    // Not the metadata timeout (request_timeout is 10 s).
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}
