#![cfg(not(feature = "loom"))]
#![cfg(feature = "nats")]
//! TLS and authentication against nats-servers this test starts itself
//! (`NATS_SERVER_BIN`, default `/usr/sbin/nats-server`), each on a spare
//! loopback port with a config file and a JetStream store in a temporary
//! directory; the child is killed on drop. Certificates are made with the
//! `openssl` CLI when the test runs (a CA, a server certificate for
//! 127.0.0.1/localhost, a client certificate, and an unrelated CA); NKeys and
//! the operator/account/user JWT chain are made with the `nkeys` crate.
//!
//! For every method: the full publish/consume round trip through an
//! [`EventBus`] passes, a wrong secret fails `connect` at once with the
//! typed error, and nothing secret appears in the captured tracing output
//! (every level, span events included), the metric labels, the health
//! report, `{:?}`/`{}` of the configuration, or an error text.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use common::crash_child::temp_path;
use common::pki::Pki;
use common::scenario::{bus_config, close_cleanly, event, recv_within, started_with_channels, unique};
use eventbus::broker::nats::{NatsBroker, NatsConfig};
use eventbus::broker::nats_security::NatsSecurity;
use eventbus::broker::secret::Secret;
use eventbus::BrokerError;

// ---------------------------------------------------------------------------
// Capture of everything the process logs and every metric label.

fn snapshotter() -> &'static metrics_util::debugging::Snapshotter {
    static SNAP: OnceLock<metrics_util::debugging::Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        common::capture::install();
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only metrics recorder of this test binary");
        snapshotter
    })
}

/// Installs the capture (once per test binary).
fn capture() {
    snapshotter();
}

/// Every metric key and label seen so far, as text.
fn metric_labels() -> String {
    let mut out = String::new();
    for (key, _, _, _) in snapshotter().snapshot().into_vec() {
        out.push_str(&format!("{:?}\n", key.key()));
    }
    out
}

/// Fails if any of `secrets` is in the captured log, the metric labels or
/// `texts` (formatted configurations, errors, health reports). Returns the
/// number of bytes checked.
fn assert_no_secret(secrets: &[&str], texts: &[String]) -> usize {
    let log = common::capture::log_text();
    let labels = metric_labels();
    let mut checked = log.len() + labels.len();
    for secret in secrets {
        assert!(secret.len() >= 8, "a planted secret must be distinctive");
        assert!(!log.contains(secret), "a secret is in the tracing output");
        assert!(!labels.contains(secret), "a secret is in a metric label");
        for t in texts {
            assert!(!t.contains(secret), "a secret is in a formatted value: {t}");
        }
    }
    checked += texts.iter().map(String::len).sum::<usize>();
    assert!(log.contains("NATS connected"), "the capture saw the adapter's own log lines");
    checked
}

/// `{:?}`, `{:#?}` and `{}` of `config`, and its serialized form when the
/// URL holds no credentials (a URL is serialized as given; one with
/// credentials is refused by `connect`).
fn formatted(config: &NatsConfig) -> Vec<String> {
    let mut texts = vec![format!("{config:?}"), format!("{config:#?}"), format!("{config}")];
    if !config.url.contains('@') {
        texts.push(toml::to_string(config).unwrap());
    }
    texts
}

// ---------------------------------------------------------------------------
// nats-server with a config file.

struct Server {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl Server {
    /// Starts nats-server with JetStream and `extra` config, waiting for
    /// its "Server is ready" line.
    async fn start(extra: &str) -> Server {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = temp_path("eventbus-nats-secure");
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("server.conf");
        std::fs::write(
            &conf,
            format!("listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{extra}\n", dir.join("js")),
        )
        .unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("-c").arg(&conf);
        let child = common::nats_server::start_and_wait_ready(cmd, port).await;
        Server { child: Some(child), dir, port }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_block(pki: &Pki, verify: bool) -> String {
    format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: {verify}, timeout: 2 }}",
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    )
}

fn config(url: String, security: NatsSecurity) -> NatsConfig {
    NatsConfig { url, security, ..NatsConfig::default() }
}

/// A distinctive secret value.
fn secret(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

// ---------------------------------------------------------------------------
// The checks.

/// Connects with `config` and runs the round trip through an EventBus: an
/// envelope and a raw message published and handled, then a clean close.
/// Returns the formatted health report, config and broker.
async fn round_trip(config: NatsConfig, label: &str) -> Vec<String> {
    let mut texts = formatted(&config);
    let broker = NatsBroker::connect(config).await.unwrap_or_else(|e| panic!("{label}: connect failed: {e}"));
    texts.push(format!("{broker:?}"));
    let (topic, raw_topic, group) = (unique("sec"), unique("sec-raw"), unique("g"));
    let (bus, mut env_rx, mut raw_rx) = started_with_channels(broker, bus_config(&group), &topic, &raw_topic).await;
    let env = event("secure-1", 1);
    bus.publish_envelope(&topic, &env).await.unwrap_or_else(|e| panic!("{label}: publish: {e}"));
    assert_eq!(recv_within(&mut env_rx, Duration::from_secs(10), "envelope delivered").await, env, "{label}");
    let pos = bus.publish(&raw_topic, Some(b"k"), vec![], b"raw".to_vec()).await.unwrap();
    let d = recv_within(&mut raw_rx, Duration::from_secs(10), "raw delivered").await;
    assert_eq!((d.offset, d.payload.as_slice()), (pos.offset, &b"raw"[..]), "{label}");
    let health = bus.health();
    texts.push(format!("{health:?}"));
    texts.push(serde_json::to_string(&health).unwrap());
    close_cleanly(bus, 2).await;
    texts
}

/// Connect fails within a second (no reconnect loop, no timeout), and the
/// error, formatted, is returned with the check that it matches `expected`.
async fn fails_fast(config: NatsConfig, expected: impl Fn(&BrokerError) -> bool, label: &str) -> Vec<String> {
    let mut texts = formatted(&config);
    let started = Instant::now();
    let err = match NatsBroker::connect(config).await {
        Ok(_) => panic!("{label}: connect succeeded"),
        Err(e) => e,
    };
    let took = started.elapsed();
    assert!(expected(&err), "{label}: unexpected error {err:?}");
    assert!(took < Duration::from_secs(1), "{label}: failing took {took:?} (connect_timeout is 5 s)");
    eprintln!("{label}: failed in {took:?} with {err}");
    texts.push(format!("{err:?}"));
    texts.push(err.to_string());
    texts
}

fn config_key(key: &'static str) -> impl Fn(&BrokerError) -> bool {
    move |e| matches!(e, BrokerError::Config { key: k, .. } if k == key)
}

fn unauthorized(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Unauthorized(_))
}

// ---------------------------------------------------------------------------
// TLS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip_and_untrusted_server() {
    capture();
    let pki = Pki::new();
    let server = Server::start(&tls_block(&pki, false)).await;
    let tls = NatsSecurity { ca_file: Some(pki.path("ca.pem")), ..NatsSecurity::default() };
    // The server requires TLS: a nats:// URL is upgraded, a tls:// URL demands it.
    round_trip(config(server.url("nats"), tls.clone()), "TLS, nats:// URL").await;
    round_trip(config(server.url("tls"), tls), "TLS, tls:// URL").await;
    // A plain-text client (no CA: the system roots) cannot trust the server.
    fails_fast(config(server.url("nats"), NatsSecurity::default()), config_key("nats.security.ca_file"), "plain").await;
    let rogue = NatsSecurity { ca_file: Some(pki.path("rogue-ca.pem")), ..NatsSecurity::default() };
    fails_fast(config(server.url("tls"), rogue), config_key("nats.security.ca_file"), "unknown CA").await;
    let missing = NatsSecurity { ca_file: Some(pki.path("absent.pem")), ..NatsSecurity::default() };
    let texts = fails_fast(config(server.url("tls"), missing), config_key("nats.security.ca_file"), "missing CA").await;
    assert!(texts.last().unwrap().contains("absent.pem"), "the error names the file: {texts:?}");
    let not_pem = NatsSecurity { ca_file: Some(pki.path("server.ext")), ..NatsSecurity::default() };
    fails_fast(config(server.url("tls"), not_pem), config_key("nats.security.ca_file"), "CA not PEM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_round_trip_and_refused_client() {
    capture();
    let pki = Pki::new();
    let server = Server::start(&tls_block(&pki, true)).await;
    let ca = Some(pki.path("ca.pem"));
    let mtls = NatsSecurity {
        ca_file: ca.clone(),
        cert_file: Some(pki.path("client.pem")),
        key_file: Some(pki.path("client.key")),
        ..NatsSecurity::default()
    };
    round_trip(config(server.url("tls"), mtls), "mutual TLS").await;
    let no_cert = NatsSecurity { ca_file: ca.clone(), ..NatsSecurity::default() };
    fails_fast(config(server.url("tls"), no_cert), config_key("nats.security.cert_file"), "no client cert").await;
    let rogue = NatsSecurity {
        ca_file: ca.clone(),
        cert_file: Some(pki.path("rogue-client.pem")),
        key_file: Some(pki.path("rogue-client.key")),
        ..NatsSecurity::default()
    };
    fails_fast(config(server.url("tls"), rogue), config_key("nats.security.cert_file"), "untrusted client cert").await;
    let bad_key = NatsSecurity {
        ca_file: ca,
        cert_file: Some(pki.path("client.pem")),
        key_file: Some(pki.path("client.pem")),
        ..NatsSecurity::default()
    };
    fails_fast(config(server.url("tls"), bad_key), config_key("nats.security.key_file"), "key file without key").await;
}

// ---------------------------------------------------------------------------
// Authentication.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_over_tls_round_trip_and_wrong_token() {
    capture();
    let pki = Pki::new();
    let token = secret("tok");
    let wrong = secret("badtok");
    let server = Server::start(&format!("{}\nauthorization {{ token: {token:?} }}", tls_block(&pki, false))).await;
    let ca = Some(pki.path("ca.pem"));
    let good = NatsSecurity { ca_file: ca.clone(), token: Some(Secret::new(&token)), ..NatsSecurity::default() };
    let mut texts = round_trip(config(server.url("tls"), good), "token").await;
    let bad = NatsSecurity { ca_file: ca.clone(), token: Some(Secret::new(&wrong)), ..NatsSecurity::default() };
    texts.extend(fails_fast(config(server.url("tls"), bad), unauthorized, "wrong token").await);
    let none = NatsSecurity { ca_file: ca, ..NatsSecurity::default() };
    texts.extend(fails_fast(config(server.url("tls"), none), unauthorized, "no token").await);
    // A token in the URL is refused before anything is sent or logged.
    let in_url = format!("tls://{token}@127.0.0.1:{}", server.port);
    texts.extend(fails_fast(config(in_url, NatsSecurity::default()), config_key("nats.url"), "token in URL").await);
    let bytes = assert_no_secret(&[&token, &wrong], &texts);
    eprintln!("token: {bytes} bytes of logs, labels and formatted values checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_round_trip_and_wrong_password() {
    capture();
    let password = secret("pw");
    let wrong = secret("badpw");
    let server =
        Server::start(&format!("authorization {{ users = [ {{ user: \"svc\", password: {password:?} }} ] }}")).await;
    let user =
        |p: &str| NatsSecurity { user: Some("svc".into()), password: Some(Secret::new(p)), ..NatsSecurity::default() };
    let mut texts = round_trip(config(server.url("nats"), user(&password)), "user/password").await;
    texts.extend(fails_fast(config(server.url("nats"), user(&wrong)), unauthorized, "wrong password").await);
    let in_url = format!("nats://svc:{password}@127.0.0.1:{}", server.port);
    texts.extend(fails_fast(config(in_url, NatsSecurity::default()), config_key("nats.url"), "password in URL").await);
    let bytes = assert_no_secret(&[&password, &wrong], &texts);
    eprintln!("user/password: {bytes} bytes checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_round_trip_and_wrong_seed() {
    capture();
    let dir = temp_path("eventbus-nkey");
    std::fs::create_dir_all(&dir).unwrap();
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let (seed, other_seed) = (user.seed().unwrap(), other.seed().unwrap());
    std::fs::write(dir.join("user.nk"), format!("{seed}\n")).unwrap();
    std::fs::write(dir.join("other.nk"), &other_seed).unwrap();
    std::fs::write(dir.join("garbage.nk"), "not a seed").unwrap();
    let server = Server::start(&format!("authorization {{ users = [ {{ nkey: {:?} }} ] }}", user.public_key())).await;
    let nkey = |f: &str| NatsSecurity { nkey_seed_file: Some(dir.join(f)), ..NatsSecurity::default() };
    let mut texts = round_trip(config(server.url("nats"), nkey("user.nk")), "nkey").await;
    texts.extend(fails_fast(config(server.url("nats"), nkey("other.nk")), unauthorized, "unknown nkey").await);
    let key = config_key("nats.security.nkey_seed_file");
    texts.extend(fails_fast(config(server.url("nats"), nkey("absent.nk")), &key, "missing seed file").await);
    texts.extend(fails_fast(config(server.url("nats"), nkey("garbage.nk")), &key, "not a seed").await);
    let bytes = assert_no_secret(&[&seed, &other_seed], &texts);
    eprintln!("nkey: {bytes} bytes checked");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// Credentials (operator mode: operator, account and user JWTs).

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT (nats-io/jwt v2) with `nats` claims for `subject`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{:032X}", rand::random::<u128>()),
        "iat": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", b64(&signature))
}

fn account_jwt(operator: &nkeys::KeyPair, account: &nkeys::KeyPair) -> String {
    let limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1,
        "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let nats = serde_json::json!({ "limits": limits, "type": "account", "version": 2 });
    account_jwt_of(operator, account, "eventbus-account", nats)
}

fn account_jwt_of(operator: &nkeys::KeyPair, account: &nkeys::KeyPair, name: &str, nats: serde_json::Value) -> String {
    jwt(operator, &account.public_key(), name, nats)
}

fn creds(account: &nkeys::KeyPair, user: &nkeys::KeyPair) -> String {
    let nats = serde_json::json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2,
    });
    let user_jwt = jwt(account, &user.public_key(), "eventbus-user", nats);
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_round_trip_and_wrong_credentials() {
    capture();
    let dir = temp_path("eventbus-creds");
    std::fs::create_dir_all(&dir).unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "eventbus-operator",
        serde_json::json!({ "type": "operator", "version": 2 }),
    );
    let account_jwt = account_jwt(&operator, &account);
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = account_jwt_of(&operator, &system, "SYS", serde_json::json!({ "type": "account", "version": 2 }));
    let user = nkeys::KeyPair::new_user();
    std::fs::write(dir.join("user.creds"), creds(&account, &user)).unwrap();
    // A user of an account the server does not know.
    let stranger = nkeys::KeyPair::new_user();
    std::fs::write(dir.join("stranger.creds"), creds(&nkeys::KeyPair::new_account(), &stranger)).unwrap();
    std::fs::write(dir.join("garbage.creds"), "no JWT here").unwrap();
    let server = Server::start(&format!(
        "operator: {operator_jwt:?}\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{ {}: {account_jwt:?}, {}: {system_jwt:?} }}",
        system.public_key(),
        account.public_key(),
        system.public_key(),
    ))
    .await;
    let creds = |f: &str| NatsSecurity { credentials_file: Some(dir.join(f)), ..NatsSecurity::default() };
    let mut texts = round_trip(config(server.url("nats"), creds("user.creds")), "credentials").await;
    texts
        .extend(fails_fast(config(server.url("nats"), creds("stranger.creds")), unauthorized, "unknown account").await);
    let key = config_key("nats.security.credentials_file");
    texts.extend(fails_fast(config(server.url("nats"), creds("absent.creds")), &key, "missing creds").await);
    texts.extend(fails_fast(config(server.url("nats"), creds("garbage.creds")), &key, "not a creds file").await);
    let (seed, stranger_seed) = (user.seed().unwrap(), stranger.seed().unwrap());
    let bytes = assert_no_secret(&[&seed, &stranger_seed], &texts);
    eprintln!("credentials: {bytes} bytes checked");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// Configuration files and the environment.

#[test]
fn security_section_parses_and_formats_without_secrets() {
    let password = secret("cfgpw");
    let text = format!(
        "url = \"tls://nats.internal:4222\"\n[security]\nca_file = \"/etc/ca.pem\"\nuser = \"svc\"\n\
         password = {password:?}\n"
    );
    let config: NatsConfig = toml::from_str(&text).unwrap();
    config.validate().unwrap();
    assert_eq!(config.security.password.as_ref().unwrap().expose(), password);
    let texts = formatted(&config);
    for t in &texts {
        assert!(!t.contains(&password), "{t}");
    }
    assert_eq!(texts[2], "tls://nats.internal:4222 (TLS, auth: user/password as svc)");
}
