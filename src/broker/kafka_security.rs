//! TLS and SASL of the Kafka adapter: [`KafkaSecurity`] (the
//! `[kafka.security]` section of [`KafkaConfig`]), its environment
//! overrides, its mapping onto librdkafka properties, and the redaction of
//! secret properties (typed or raw) in `Debug`, `Display` and errors. See
//! `docs/security.md`.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::watch;

use super::kafka::KafkaConfig;
use super::secret::{Secret, REDACTED};
use super::BrokerError;

/// Environment variables that override [`KafkaSecurity`] fields when the
/// broker is created, as (variable, field).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("EVENTBUS_KAFKA_TLS", "tls"),
    ("EVENTBUS_KAFKA_TLS_CA_FILE", "ca_file"),
    ("EVENTBUS_KAFKA_TLS_CERT_FILE", "cert_file"),
    ("EVENTBUS_KAFKA_TLS_KEY_FILE", "key_file"),
    ("EVENTBUS_KAFKA_TLS_KEY_PASSWORD", "key_password"),
    ("EVENTBUS_KAFKA_SASL_MECHANISM", "sasl_mechanism"),
    ("EVENTBUS_KAFKA_SASL_USERNAME", "username"),
    ("EVENTBUS_KAFKA_SASL_PASSWORD", "password"),
];

/// SASL mechanisms (`sasl.mechanism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum SaslMechanism {
    /// `plain`: user name and password in clear (use it over TLS only).
    #[serde(rename = "plain", alias = "PLAIN")]
    Plain,
    /// `scram-sha-256`: salted challenge-response, SHA-256.
    #[serde(rename = "scram-sha-256", alias = "SCRAM-SHA-256")]
    ScramSha256,
    /// `scram-sha-512`: salted challenge-response, SHA-512.
    #[serde(rename = "scram-sha-512", alias = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    fn parse(s: &str) -> Option<SaslMechanism> {
        match s.to_ascii_uppercase().as_str() {
            "PLAIN" => Some(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Some(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Some(SaslMechanism::ScramSha512),
            _ => None,
        }
    }
}

/// TLS and SASL settings of every Kafka client of the broker. When any is
/// set, the librdkafka properties it maps onto (`security.protocol`,
/// `ssl.*`, `sasl.*`) may not also be given in the raw `properties` maps.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// Connect over TLS (`security.protocol` = `ssl` or `sasl_ssl`).
    pub tls: bool,
    /// PEM CA certificate(s) that signed the brokers' (`ssl.ca.location`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (`ssl.certificate.location`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (`ssl.key.location`).
    pub key_file: Option<PathBuf>,
    /// Password of an encrypted `key_file` (`ssl.key.password`).
    pub key_password: Option<Secret>,
    /// Check that the broker's certificate names the host connected to
    /// (`ssl.endpoint.identification.algorithm` = `https`, else `none`).
    pub verify_hostname: bool,
    /// SASL mechanism (`sasl.mechanism`); with `username` and `password`.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// `sasl.username`.
    pub username: Option<String>,
    /// `sasl.password`.
    pub password: Option<Secret>,
}

impl Default for KafkaSecurity {
    fn default() -> Self {
        KafkaSecurity {
            tls: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_password: None,
            verify_hostname: true,
            sasl_mechanism: None,
            username: None,
            password: None,
        }
    }
}

fn config_error(field: &str, reason: impl Into<String>) -> BrokerError {
    BrokerError::Config { key: format!("kafka.security.{field}"), reason: reason.into() }
}

/// Whether librdkafka property `name` holds a secret (its value is never
/// shown, whether set by [`KafkaSecurity`] or in a raw `properties` map).
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "passphrase", "jaas", "oauthbearer.config"].iter().any(|w| name.contains(w))
        || name.ends_with("key.pem")
        || name == "ssl_key"
}

/// `value` of property `name`, or [`REDACTED`] when the property is secret.
pub fn shown<'a>(name: &str, value: &'a str) -> &'a str {
    if is_secret_property(name) {
        REDACTED
    } else {
        value
    }
}

impl KafkaSecurity {
    /// Whether anything is set (an empty section leaves the raw properties
    /// in charge, as before it existed).
    pub fn is_set(&self) -> bool {
        *self != KafkaSecurity::default()
    }

    /// `security.protocol` of these settings, `None` when nothing is set.
    pub fn protocol(&self) -> Option<&'static str> {
        match (self.tls, self.sasl_mechanism.is_some()) {
            (false, false) if !self.is_set() => None,
            (false, false) => Some("plaintext"),
            (true, false) => Some("ssl"),
            (false, true) => Some("sasl_plaintext"),
            (true, true) => Some("sasl_ssl"),
        }
    }

    /// This configuration with [`ENV_OVERRIDES`] applied from the process
    /// environment.
    pub fn with_env_overrides(self) -> Result<KafkaSecurity, BrokerError> {
        self.with_overrides_from(|var| std::env::var(var).ok())
    }

    /// This configuration with [`ENV_OVERRIDES`] applied from `lookup`; an
    /// empty variable counts as unset.
    pub fn with_overrides_from(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<KafkaSecurity, BrokerError> {
        let get = |var: &str| lookup(var).filter(|v| !v.is_empty());
        if let Some(v) = get("EVENTBUS_KAFKA_TLS") {
            self.tls = match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(config_error("tls", format!("EVENTBUS_KAFKA_TLS={v:?} is not a boolean (true/false)")))
                }
            };
        }
        if let Some(v) = get("EVENTBUS_KAFKA_TLS_CA_FILE") {
            self.ca_file = Some(v.into());
        }
        if let Some(v) = get("EVENTBUS_KAFKA_TLS_CERT_FILE") {
            self.cert_file = Some(v.into());
        }
        if let Some(v) = get("EVENTBUS_KAFKA_TLS_KEY_FILE") {
            self.key_file = Some(v.into());
        }
        if let Some(v) = get("EVENTBUS_KAFKA_TLS_KEY_PASSWORD") {
            self.key_password = Some(Secret::new(v));
        }
        if let Some(v) = get("EVENTBUS_KAFKA_SASL_MECHANISM") {
            self.sasl_mechanism = Some(SaslMechanism::parse(&v).ok_or_else(|| {
                config_error(
                    "sasl_mechanism",
                    format!("EVENTBUS_KAFKA_SASL_MECHANISM={v:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
                )
            })?);
        }
        if let Some(v) = get("EVENTBUS_KAFKA_SASL_USERNAME") {
            self.username = Some(v);
        }
        if let Some(v) = get("EVENTBUS_KAFKA_SASL_PASSWORD") {
            self.password = Some(Secret::new(v));
        }
        Ok(self)
    }

    /// Rejects combinations that cannot work. Reads no file.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if !self.tls {
            for (field, set) in [
                ("ca_file", self.ca_file.is_some()),
                ("cert_file", self.cert_file.is_some()),
                ("key_file", self.key_file.is_some()),
                ("key_password", self.key_password.is_some()),
            ] {
                if set {
                    return Err(config_error(field, "is set but kafka.security.tls is false"));
                }
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return Err(config_error("key_file", "cert_file is set but key_file is not")),
            (None, Some(_)) => return Err(config_error("cert_file", "key_file is set but cert_file is not")),
            _ => {}
        }
        if self.key_password.is_some() && self.key_file.is_none() {
            return Err(config_error("key_password", "is set but key_file is not"));
        }
        match (&self.sasl_mechanism, &self.username, &self.password) {
            (Some(_), Some(user), Some(password)) => {
                if user.is_empty() {
                    return Err(config_error("username", "must not be empty"));
                }
                if password.is_empty() {
                    return Err(config_error("password", "must not be empty"));
                }
            }
            (Some(m), None, _) => {
                return Err(config_error("username", format!("sasl_mechanism {} needs a username", m.as_str())))
            }
            (Some(m), _, None) => {
                return Err(config_error("password", format!("sasl_mechanism {} needs a password", m.as_str())))
            }
            (None, Some(_), _) | (None, _, Some(_)) => {
                return Err(config_error(
                    "sasl_mechanism",
                    "username/password are set but sasl_mechanism is not (plain, scram-sha-256, scram-sha-512)",
                ))
            }
            (None, None, None) => {}
        }
        Ok(())
    }

    /// The librdkafka properties these settings set, as (property, value,
    /// configuration key). Values of secret properties are secrets: pass
    /// them to librdkafka only.
    pub fn properties(&self) -> Vec<(&'static str, String, &'static str)> {
        let mut out = Vec::new();
        let Some(protocol) = self.protocol() else { return out };
        out.push(("security.protocol", protocol.to_string(), "kafka.security"));
        let path = |p: &PathBuf| p.display().to_string();
        if self.tls {
            if let Some(p) = &self.ca_file {
                out.push(("ssl.ca.location", path(p), "kafka.security.ca_file"));
            }
            if let Some(p) = &self.cert_file {
                out.push(("ssl.certificate.location", path(p), "kafka.security.cert_file"));
            }
            if let Some(p) = &self.key_file {
                out.push(("ssl.key.location", path(p), "kafka.security.key_file"));
            }
            if let Some(s) = &self.key_password {
                out.push(("ssl.key.password", s.expose().to_string(), "kafka.security.key_password"));
            }
            let check = if self.verify_hostname { "https" } else { "none" };
            out.push(("ssl.endpoint.identification.algorithm", check.to_string(), "kafka.security.verify_hostname"));
        }
        if let Some(m) = self.sasl_mechanism {
            out.push(("sasl.mechanism", m.as_str().to_string(), "kafka.security.sasl_mechanism"));
            if let Some(u) = &self.username {
                out.push(("sasl.username", u.clone(), "kafka.security.username"));
            }
            if let Some(s) = &self.password {
                out.push(("sasl.password", s.expose().to_string(), "kafka.security.password"));
            }
        }
        out
    }

    /// Readies `config` for creating clients: applies the environment
    /// overrides to its security section, validates it, refuses raw
    /// properties that the section also sets, and checks that the TLS files
    /// can be read. Errors name the key; none shows a secret.
    pub fn prepare(mut config: KafkaConfig) -> Result<KafkaConfig, BrokerError> {
        config.security = config.security.with_env_overrides()?;
        let security = &config.security;
        security.validate()?;
        if security.is_set() {
            for (section, map) in [
                ("properties", &config.properties),
                ("producer_properties", &config.producer_properties),
                ("consumer_properties", &config.consumer_properties),
            ] {
                for key in map.keys() {
                    let typed = key == "security.protocol" || key.starts_with("ssl.") || key.starts_with("sasl.");
                    if typed {
                        return Err(BrokerError::Config {
                            key: format!("kafka.{section}.{key}"),
                            reason: "kafka.security sets TLS and SASL: give this setting there, or leave \
                                     kafka.security empty and set every security property here"
                                .into(),
                        });
                    }
                }
            }
        }
        for (field, path) in
            [("ca_file", &security.ca_file), ("cert_file", &security.cert_file), ("key_file", &security.key_file)]
        {
            if let Some(path) = path {
                if let Err(e) = std::fs::File::open(path) {
                    return Err(config_error(field, format!("cannot read {}: {e}", path.display())));
                }
            }
        }
        Ok(config)
    }

    /// The typed error of a failed first metadata request, when it is a
    /// security failure: refused credentials are
    /// [`BrokerError::Unauthorized`], a failed TLS handshake is
    /// [`BrokerError::Config`] naming `kafka.security`.
    pub fn connect_error(&self, brokers: &str, e: &KafkaError) -> Option<BrokerError> {
        let code = e.rdkafka_error_code()?;
        classify(code, brokers, self)
    }
}

/// The typed error of librdkafka error `code` on a connection to `brokers`,
/// when it is a security failure.
pub fn classify(code: RDKafkaErrorCode, brokers: &str, security: &KafkaSecurity) -> Option<BrokerError> {
    use RDKafkaErrorCode as C;
    match code {
        C::Authentication | C::SaslAuthenticationFailed => Some(BrokerError::Unauthorized(format!(
            "Kafka at {brokers} refused the SASL credentials ({}{}): {code}",
            security.sasl_mechanism.map_or("no mechanism", SaslMechanism::as_str),
            security.username.as_ref().map(|u| format!(" as {u}")).unwrap_or_default(),
        ))),
        C::UnsupportedSASLMechanism | C::IllegalSASLState => Some(config_error(
            "sasl_mechanism",
            format!("Kafka at {brokers} does not accept this SASL mechanism: {code}"),
        )),
        C::SSL => Some(BrokerError::Config {
            key: "kafka.security".into(),
            reason: format!("TLS handshake with Kafka at {brokers} failed ({code}): check tls, ca_file, cert_file"),
        }),
        C::TopicAuthorizationFailed | C::GroupAuthorizationFailed | C::ClusterAuthorizationFailed => {
            Some(BrokerError::Unauthorized(format!("Kafka at {brokers}: {code}")))
        }
        _ => None,
    }
}

/// The first security failure (TLS handshake, SASL authentication) a
/// client reported through its error callback. librdkafka retries such a
/// connection quietly and a metadata request only times out, so
/// [`KafkaBroker::connect`](super::kafka::KafkaBroker::connect) watches this
/// to fail at once with the reason. Cloning shares it.
#[derive(Clone, Default)]
pub struct SecurityFailures {
    first: Arc<watch::Sender<Option<(RDKafkaErrorCode, String)>>>,
}

impl SecurityFailures {
    /// Called from the client context's error callback; keeps the first
    /// security failure.
    pub fn observe(&self, error: &KafkaError, reason: &str) {
        use RDKafkaErrorCode as C;
        let Some(mut code) = error.rdkafka_error_code() else { return };
        // A failed handshake is often reported as a transport failure first.
        if code == C::BrokerTransportFailure {
            if reason.contains("SSL handshake failed") {
                code = C::SSL;
            } else if reason.contains("SASL authentication error") {
                code = C::Authentication;
            }
        }
        if matches!(
            code,
            C::SSL
                | C::Authentication
                | C::SaslAuthenticationFailed
                | C::UnsupportedSASLMechanism
                | C::IllegalSASLState
        ) {
            self.first.send_if_modified(|first| {
                let new = first.is_none();
                if new {
                    *first = Some((code, reason.to_string()));
                }
                new
            });
        }
    }

    /// Runs `work` (the first metadata request) unless a security failure
    /// is reported first, which is returned typed instead.
    pub async fn guard<T>(
        &self,
        brokers: &str,
        security: &KafkaSecurity,
        work: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let mut rx = self.first.subscribe();
        let failure = async move {
            let (code, reason) = rx.wait_for(Option::is_some).await.ok()?.clone()?;
            Some(classify_failure(code, &reason, brokers, security))
        };
        tokio::select! {
            result = work => result,
            Some(e) = failure => Err(e),
        }
    }
}

fn classify_failure(code: RDKafkaErrorCode, reason: &str, brokers: &str, security: &KafkaSecurity) -> BrokerError {
    // librdkafka reports a broker without SASL (or without the mechanism)
    // as an authentication failure too: that is a configuration mismatch.
    if reason.contains("not supported by broker") || reason.contains("Unsupported SASL mechanism") {
        let key = if security.sasl_mechanism.is_some() {
            "kafka.security.sasl_mechanism"
        } else {
            "kafka.properties.sasl.mechanism"
        };
        return BrokerError::Config {
            key: key.into(),
            reason: format!("Kafka at {brokers} does not accept this SASL configuration: {reason}"),
        };
    }
    match classify(code, brokers, security) {
        Some(BrokerError::Unauthorized(m)) => BrokerError::Unauthorized(format!("{m}: {reason}")),
        Some(BrokerError::Config { key, reason: r }) => BrokerError::Config { key, reason: format!("{r}: {reason}") },
        Some(other) => other,
        None => BrokerError::Unavailable(format!("Kafka at {brokers}: {code}: {reason}")),
    }
}

/// Like the derived `Debug`, but secret values (typed or in a raw
/// properties map) print as `***`. Built from the serialized form, so a
/// field added to [`KafkaConfig`] shows up without touching this.
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Json(serde_json::Value);
        impl fmt::Debug for Json {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
        let mut value = match serde_json::to_value(self) {
            Ok(v) => v,
            Err(_) => return f.debug_struct("KafkaConfig").finish_non_exhaustive(),
        };
        redact(&mut value);
        let mut s = f.debug_struct("KafkaConfig");
        if let serde_json::Value::Object(fields) = value {
            for (name, v) in fields {
                s.field(&name, &Json(v));
            }
        }
        s.finish()
    }
}

/// Replaces the values of secret-named keys, at any depth.
fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if v.is_string() && is_secret_property(k) {
                    *v = serde_json::Value::String(REDACTED.into());
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// One line for logs: the brokers and the security protocol. Never a secret.
impl fmt::Display for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.brokers, self.security)
    }
}

impl fmt::Display for KafkaSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol() {
            None => f.write_str("security from raw properties")?,
            Some(p) => f.write_str(p)?,
        }
        if self.cert_file.is_some() {
            f.write_str(", client certificate")?;
        }
        if let Some(m) = self.sasl_mechanism {
            write!(f, ", {}", m.as_str())?;
            if let Some(u) = &self.username {
                write!(f, " as {u}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    fn props(s: &KafkaSecurity) -> BTreeMap<&'static str, String> {
        s.properties().into_iter().map(|(p, v, _)| (p, v)).collect()
    }

    #[test]
    fn maps_onto_librdkafka_properties() {
        let s: KafkaSecurity = toml::from_str(
            "tls = true\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n\
             key_password = \"kp\"\nsasl_mechanism = \"scram-sha-512\"\nusername = \"svc\"\npassword = \"pw\"",
        )
        .unwrap();
        s.validate().unwrap();
        let p = props(&s);
        assert_eq!(p["security.protocol"], "sasl_ssl");
        assert_eq!(p["ssl.ca.location"], "/ca.pem");
        assert_eq!(p["ssl.certificate.location"], "/c.pem");
        assert_eq!(p["ssl.key.location"], "/k.pem");
        assert_eq!(p["ssl.key.password"], "kp");
        assert_eq!(p["ssl.endpoint.identification.algorithm"], "https");
        assert_eq!(p["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(p["sasl.username"], "svc");
        assert_eq!(p["sasl.password"], "pw");
        assert_eq!(s.to_string(), "sasl_ssl, client certificate, SCRAM-SHA-512 as svc");

        let plain = KafkaSecurity {
            sasl_mechanism: Some(SaslMechanism::Plain),
            username: Some("u".into()),
            password: Some(Secret::new("p")),
            ..KafkaSecurity::default()
        };
        let p = props(&plain);
        assert_eq!((p["security.protocol"].as_str(), p["sasl.mechanism"].as_str()), ("sasl_plaintext", "PLAIN"));
        assert!(!p.contains_key("ssl.endpoint.identification.algorithm"));
        let tls = KafkaSecurity { tls: true, verify_hostname: false, ..KafkaSecurity::default() };
        let p = props(&tls);
        assert_eq!((p["security.protocol"].as_str(), p.len()), ("ssl", 2));
        assert_eq!(p["ssl.endpoint.identification.algorithm"], "none");
        assert!(KafkaSecurity::default().properties().is_empty());
        let s: KafkaSecurity = toml::from_str("sasl_mechanism = \"SCRAM-SHA-256\"").unwrap();
        assert_eq!(s.sasl_mechanism, Some(SaslMechanism::ScramSha256));
        assert!(toml::from_str::<KafkaSecurity>("sasl_mechanism = \"gssapi\"").is_err());
    }

    #[test]
    fn rejects_incomplete_settings_naming_the_key() {
        let key = |s: KafkaSecurity| match s.validate() {
            Err(BrokerError::Config { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let d = KafkaSecurity::default;
        assert_eq!(key(KafkaSecurity { ca_file: Some("/ca".into()), ..d() }), "kafka.security.ca_file");
        assert_eq!(key(KafkaSecurity { tls: true, cert_file: Some("/c".into()), ..d() }), "kafka.security.key_file");
        let no_user =
            KafkaSecurity { sasl_mechanism: Some(SaslMechanism::Plain), password: Some(Secret::new("p")), ..d() };
        assert_eq!(key(no_user), "kafka.security.username");
        let no_mech = KafkaSecurity { username: Some("u".into()), password: Some(Secret::new("p")), ..d() };
        assert_eq!(key(no_mech), "kafka.security.sasl_mechanism");
    }

    #[test]
    fn environment_overrides() {
        let map: HashMap<&str, &str> = [
            ("EVENTBUS_KAFKA_TLS", "true"),
            ("EVENTBUS_KAFKA_TLS_CA_FILE", "/ca.pem"),
            ("EVENTBUS_KAFKA_TLS_CERT_FILE", "/c.pem"),
            ("EVENTBUS_KAFKA_TLS_KEY_FILE", "/k.pem"),
            ("EVENTBUS_KAFKA_TLS_KEY_PASSWORD", "kp"),
            ("EVENTBUS_KAFKA_SASL_MECHANISM", "scram-sha-256"),
            ("EVENTBUS_KAFKA_SASL_USERNAME", "u"),
            ("EVENTBUS_KAFKA_SASL_PASSWORD", "pw"),
        ]
        .into();
        assert_eq!(map.len(), ENV_OVERRIDES.len());
        let s = KafkaSecurity::default().with_overrides_from(|k| map.get(k).map(|v| v.to_string())).unwrap();
        let p = props(&s);
        assert_eq!(p["security.protocol"], "sasl_ssl");
        assert_eq!(p["ssl.ca.location"], "/ca.pem");
        assert_eq!(p["ssl.certificate.location"], "/c.pem");
        assert_eq!(p["ssl.key.location"], "/k.pem");
        assert_eq!(p["ssl.key.password"], "kp");
        assert_eq!(p["sasl.mechanism"], "SCRAM-SHA-256");
        assert_eq!((p["sasl.username"].as_str(), p["sasl.password"].as_str()), ("u", "pw"));
        let err = KafkaSecurity::default()
            .with_overrides_from(|k| (k == "EVENTBUS_KAFKA_SASL_MECHANISM").then(|| "GSSAPI".to_string()))
            .unwrap_err();
        assert!(matches!(err, BrokerError::Config { ref key, .. } if key == "kafka.security.sasl_mechanism"));
    }

    #[test]
    fn secret_properties_are_recognised() {
        for p in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.jaas.config",
        ] {
            assert!(is_secret_property(p), "{p}");
            assert_eq!(shown(p, "v"), REDACTED);
        }
        for p in ["sasl.username", "ssl.ca.location", "security.protocol", "ssl.key.location"] {
            assert!(!is_secret_property(p), "{p}");
        }
    }
}
