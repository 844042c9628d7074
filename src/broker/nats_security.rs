//! TLS and authentication of the NATS adapter: [`NatsSecurity`] (the
//! `[nats.security]` section of [`NatsConfig`]), its environment overrides,
//! how it is applied to async-nats' `ConnectOptions`, and how a failed
//! connect is reported. See `docs/security.md`.
//!
//! Nothing secret (token, password, NKey seed, credentials) is ever part of a
//! `Debug`/`Display` output, a log line or an error text: secrets are
//! [`Secret`]s, seeds and credentials stay in their files (only the paths are
//! configured), and a server URL with credentials in it is refused, because
//! URLs are logged.

use std::fmt;
use std::path::{Path, PathBuf};

use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::{ConnectErrorKind, ConnectOptions};

use super::nats::NatsConfig;
use super::secret::Secret;
use super::BrokerError;

/// Environment variables that override [`NatsSecurity`] fields when
/// [`NatsBroker::connect`](super::nats::NatsBroker::connect) runs, as
/// (variable, field).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("EVENTBUS_NATS_TOKEN", "token"),
    ("EVENTBUS_NATS_USER", "user"),
    ("EVENTBUS_NATS_PASSWORD", "password"),
    ("EVENTBUS_NATS_NKEY_SEED_FILE", "nkey_seed_file"),
    ("EVENTBUS_NATS_CREDS_FILE", "credentials_file"),
    ("EVENTBUS_NATS_TLS_CA_FILE", "ca_file"),
    ("EVENTBUS_NATS_TLS_CERT_FILE", "cert_file"),
    ("EVENTBUS_NATS_TLS_KEY_FILE", "key_file"),
    ("EVENTBUS_NATS_TLS_REQUIRED", "tls_required"),
];

/// TLS and authentication settings of a NATS connection. At most one
/// authentication method (token, user and password, NKey seed file,
/// credentials file) may be set.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSecurity {
    /// Connect over TLS even if the server does not ask for it (`tls://`
    /// URLs imply it; a server that requires TLS gets it anyway).
    pub tls_required: bool,
    /// PEM file of the CA(s) that signed the server's certificate; replaces
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Authentication token.
    pub token: Option<Secret>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<Secret>,
    /// File holding a user NKey seed (`SU...`); the server gets the public
    /// key and a signed nonce, never the seed.
    pub nkey_seed_file: Option<PathBuf>,
    /// Credentials file (`.creds`: user JWT and NKey seed) for servers in
    /// operator (decentralised JWT) mode.
    pub credentials_file: Option<PathBuf>,
}

fn config_error(field: &str, reason: impl Into<String>) -> BrokerError {
    let key = if field.is_empty() { "nats.security".to_string() } else { format!("nats.security.{field}") };
    BrokerError::Config { key, reason: reason.into() }
}

/// The authentication method a [`NatsSecurity`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsAuth {
    /// No authentication.
    None,
    /// A token (`token`).
    Token,
    /// User name and password (`user`, `password`).
    UserPassword,
    /// An NKey seed file (`nkey_seed_file`).
    NKey,
    /// A credentials file (`credentials_file`).
    Credentials,
}

impl NatsAuth {
    /// Its name in logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::Token => "token",
            NatsAuth::UserPassword => "user/password",
            NatsAuth::NKey => "nkey",
            NatsAuth::Credentials => "credentials",
        }
    }

    /// The field that holds this method's secret (for error keys).
    fn field(self) -> &'static str {
        match self {
            NatsAuth::None => "",
            NatsAuth::Token => "token",
            NatsAuth::UserPassword => "password",
            NatsAuth::NKey => "nkey_seed_file",
            NatsAuth::Credentials => "credentials_file",
        }
    }
}

impl NatsSecurity {
    /// The configured authentication method (the first one set; `validate`
    /// rejects more than one).
    pub fn auth(&self) -> NatsAuth {
        if self.token.is_some() {
            NatsAuth::Token
        } else if self.user.is_some() || self.password.is_some() {
            NatsAuth::UserPassword
        } else if self.nkey_seed_file.is_some() {
            NatsAuth::NKey
        } else if self.credentials_file.is_some() {
            NatsAuth::Credentials
        } else {
            NatsAuth::None
        }
    }

    /// Whether TLS is configured (a CA, a client certificate, or required).
    pub fn tls(&self) -> bool {
        self.tls_required || self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// This configuration with [`ENV_OVERRIDES`] applied from the process
    /// environment.
    pub fn with_env_overrides(self) -> Result<NatsSecurity, BrokerError> {
        self.with_overrides_from(|var| std::env::var(var).ok())
    }

    /// This configuration with [`ENV_OVERRIDES`] applied from `lookup`. A set
    /// authentication variable replaces the configured method (a token in
    /// the environment wins over a password in the file); an empty variable
    /// counts as unset.
    pub fn with_overrides_from(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<NatsSecurity, BrokerError> {
        let get = |var: &str| lookup(var).filter(|v| !v.is_empty());
        let clear_auth = |s: &mut NatsSecurity| {
            s.token = None;
            s.user = None;
            s.password = None;
            s.nkey_seed_file = None;
            s.credentials_file = None;
        };
        if let Some(token) = get("EVENTBUS_NATS_TOKEN") {
            clear_auth(&mut self);
            self.token = Some(Secret::new(token));
        }
        let user = get("EVENTBUS_NATS_USER");
        let password = get("EVENTBUS_NATS_PASSWORD");
        if user.is_some() || password.is_some() {
            let (old_user, old_password) = (self.user.take(), self.password.take());
            clear_auth(&mut self);
            self.user = user.or(old_user);
            self.password = password.map(Secret::new).or(old_password);
        }
        if let Some(path) = get("EVENTBUS_NATS_NKEY_SEED_FILE") {
            clear_auth(&mut self);
            self.nkey_seed_file = Some(path.into());
        }
        if let Some(path) = get("EVENTBUS_NATS_CREDS_FILE") {
            clear_auth(&mut self);
            self.credentials_file = Some(path.into());
        }
        if let Some(path) = get("EVENTBUS_NATS_TLS_CA_FILE") {
            self.ca_file = Some(path.into());
        }
        if let Some(path) = get("EVENTBUS_NATS_TLS_CERT_FILE") {
            self.cert_file = Some(path.into());
        }
        if let Some(path) = get("EVENTBUS_NATS_TLS_KEY_FILE") {
            self.key_file = Some(path.into());
        }
        if let Some(v) = get("EVENTBUS_NATS_TLS_REQUIRED") {
            self.tls_required = match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(config_error(
                        "tls_required",
                        format!("EVENTBUS_NATS_TLS_REQUIRED={v:?} is not a boolean (true/false)"),
                    ))
                }
            };
        }
        Ok(self)
    }

    /// Rejects combinations that cannot work, and server URLs with
    /// credentials in them (URLs are logged). Reads no file.
    pub fn validate(&self, url: &str) -> Result<(), BrokerError> {
        for server in url.split(',') {
            let rest = server.trim().split_once("://").map_or(server.trim(), |(_, rest)| rest);
            let authority = rest.split(['/', '?']).next().unwrap_or("");
            if authority.contains('@') {
                // Not echoing the URL: it holds the secret.
                return Err(BrokerError::Config {
                    key: "nats.url".into(),
                    reason: "credentials in the server URL would be logged; set nats.security.token or \
                             nats.security.user/password (or EVENTBUS_NATS_TOKEN, EVENTBUS_NATS_USER, \
                             EVENTBUS_NATS_PASSWORD) instead"
                        .into(),
                });
            }
        }
        let methods = [
            self.token.is_some(),
            self.user.is_some() || self.password.is_some(),
            self.nkey_seed_file.is_some(),
            self.credentials_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(config_error(
                "",
                "set one authentication method: token, user/password, nkey_seed_file or credentials_file",
            ));
        }
        match (&self.user, &self.password) {
            (Some(_), None) => return Err(config_error("password", "user is set but password is not")),
            (None, Some(_)) => return Err(config_error("user", "password is set but user is not")),
            (Some(user), Some(password)) => {
                if user.is_empty() {
                    return Err(config_error("user", "must not be empty"));
                }
                if password.is_empty() {
                    return Err(config_error("password", "must not be empty"));
                }
            }
            (None, None) => {}
        }
        if self.token.as_ref().is_some_and(Secret::is_empty) {
            return Err(config_error("token", "must not be empty"));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return Err(config_error("key_file", "cert_file is set but key_file is not")),
            (None, Some(_)) => return Err(config_error("cert_file", "key_file is set but cert_file is not")),
            _ => {}
        }
        Ok(())
    }

    /// Applies the environment overrides, validates, reads and checks every
    /// configured file, and sets the result on `options`. A missing or
    /// malformed file fails here with [`BrokerError::Config`] naming the key.
    pub async fn apply(&self, options: ConnectOptions, url: &str) -> Result<ConnectOptions, BrokerError> {
        let this = self.clone().with_env_overrides()?;
        this.validate(url)?;
        let this2 = this.clone();
        let checked = tokio::task::spawn_blocking(move || this2.read_files())
            .await
            .map_err(|e| BrokerError::Other(format!("reading NATS security files: {e}")))??;
        let mut options = options;
        if let Some(ca) = &this.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&this.cert_file, &this.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let tls_url = url.split(',').any(|u| u.trim().to_ascii_lowercase().starts_with("tls://"));
        if this.tls_required || tls_url {
            options = options.require_tls(true);
        }
        if let Some(token) = &this.token {
            options = options.token(token.expose().to_string());
        }
        if let (Some(user), Some(password)) = (&this.user, &this.password) {
            options = options.user_and_password(user.clone(), password.expose().to_string());
        }
        match checked {
            Files::NKey(seed) => options = options.nkey(seed.expose().to_string()),
            Files::Credentials(creds) => {
                options = options.credentials(creds.expose()).map_err(|_| {
                    config_error("credentials_file", "is not a credentials file (a user JWT and an NKey seed)")
                })?;
            }
            Files::None => {}
        }
        Ok(options)
    }

    /// Reads the TLS files, the seed and the credentials (blocking).
    fn read_files(&self) -> Result<Files, BrokerError> {
        let read = |field: &str, path: &Path| {
            std::fs::read(path).map_err(|e| config_error(field, format!("cannot read {}: {e}", path.display())))
        };
        if let Some(ca) = &self.ca_file {
            let pem = read("ca_file", ca)?;
            let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| config_error("ca_file", format!("{} is not a PEM certificate file: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(config_error("ca_file", format!("{} holds no PEM certificate", ca.display())));
            }
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            let pem = read("cert_file", cert)?;
            let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| {
                config_error("cert_file", format!("{} is not a PEM certificate file: {e}", cert.display()))
            })?;
            if certs.is_empty() {
                return Err(config_error("cert_file", format!("{} holds no PEM certificate", cert.display())));
            }
            let pem = read("key_file", key)?;
            // The parser's message could quote the file: not passed on.
            PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|_| config_error("key_file", format!("{} holds no PEM private key", key.display())))?;
        }
        if let Some(path) = &self.nkey_seed_file {
            let seed = Secret::from_file(path).map_err(|reason| config_error("nkey_seed_file", reason))?;
            let seed = Secret::new(seed.expose().trim());
            match nkeys::KeyPair::from_seed(seed.expose()) {
                Ok(pair) if pair.public_key().starts_with('U') => return Ok(Files::NKey(seed)),
                Ok(_) => {
                    return Err(config_error(
                        "nkey_seed_file",
                        format!("{} holds an NKey seed that is not a user seed (SU...)", path.display()),
                    ))
                }
                Err(_) => {
                    return Err(config_error(
                        "nkey_seed_file",
                        format!("{} does not hold an NKey seed (SU...)", path.display()),
                    ))
                }
            }
        }
        if let Some(path) = &self.credentials_file {
            // Read as is: the parser needs the line break after the last marker.
            let creds = std::fs::read_to_string(path)
                .map_err(|e| config_error("credentials_file", format!("cannot read {}: {e}", path.display())))?;
            return Ok(Files::Credentials(Secret::new(creds)));
        }
        Ok(Files::None)
    }

    /// The typed error of a failed first connect to `url`. Credentials the
    /// server refused are [`BrokerError::Unauthorized`]; TLS that cannot be
    /// set up or fails the handshake is [`BrokerError::Config`] naming the
    /// key to fix; an unreachable server is [`BrokerError::Unavailable`].
    pub fn connect_error(&self, url: &str, e: &async_nats::ConnectError) -> BrokerError {
        let auth = self.auth();
        let at = format!("NATS at {url}");
        match e.kind() {
            ConnectErrorKind::AuthorizationViolation => BrokerError::Unauthorized(format!(
                "{at} refused the connection (authorization violation); authentication method: {}",
                auth.as_str()
            )),
            ConnectErrorKind::Authentication => config_error(
                auth.field(),
                format!("signing the server's nonce failed: the {} key is not usable", auth.as_str()),
            ),
            ConnectErrorKind::TimedOut => BrokerError::Timeout(format!("{at}: connect timed out")),
            ConnectErrorKind::ServerParse => {
                BrokerError::Config { key: "nats.url".into(), reason: format!("not a NATS server URL list: {e}") }
            }
            ConnectErrorKind::Dns | ConnectErrorKind::MaxReconnects => {
                BrokerError::Unavailable(format!("cannot connect to {at}: {e}"))
            }
            ConnectErrorKind::Tls => match tls_error(e) {
                Some(tls) => tls_failure(&at, tls),
                None => config_error("", format!("TLS setup for {at} failed: {e}")),
            },
            ConnectErrorKind::Io => match tls_error(e) {
                Some(tls) => tls_failure(&at, tls),
                None => BrokerError::Unavailable(format!("cannot connect to {at}: {e}")),
            },
        }
    }
}

/// What `read_files` found that goes into the options.
enum Files {
    None,
    NKey(Secret),
    Credentials(Secret),
}

/// The rustls error behind a connect error, if any.
fn tls_error(e: &async_nats::ConnectError) -> Option<&async_nats::rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(tls) = err.downcast_ref::<async_nats::rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|inner| inner.downcast_ref::<async_nats::rustls::Error>()) {
                return Some(tls);
            }
        }
        source = err.source();
    }
    None
}

fn tls_failure(at: &str, tls: &async_nats::rustls::Error) -> BrokerError {
    use async_nats::rustls::Error as E;
    match tls {
        E::InvalidCertificate(why) => config_error(
            "ca_file",
            format!(
                "{at}: the server's TLS certificate is not trusted ({why:?}); set ca_file to the CA that signed it"
            ),
        ),
        E::AlertReceived(alert) => config_error(
            "cert_file",
            format!("{at} refused the TLS handshake ({alert:?}); does it require a client certificate?"),
        ),
        other => config_error("", format!("{at}: TLS handshake failed: {other}")),
    }
}

/// `url` with the user information of every server (`user:password@`,
/// `token@`) replaced by `***@`. [`NatsSecurity::validate`] refuses such
/// URLs; this keeps them out of a log line written before that.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|server| {
            let (scheme, rest) = match server.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), server),
            };
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}***{}", &rest[at..]),
                None => server.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Like the derived `Debug`, but a URL's credentials print as `***` (and the
/// [`Secret`]s of `security` as `***`). Built from the serialized form, so
/// a field added to [`NatsConfig`] shows up without touching this.
impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Json(serde_json::Value);
        impl fmt::Debug for Json {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
        let mut s = f.debug_struct("NatsConfig");
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(self) {
            for (name, value) in fields {
                let value = match (name.as_str(), value) {
                    ("url", serde_json::Value::String(url)) => serde_json::Value::String(redact_url(&url)),
                    (_, value) => value,
                };
                s.field(&name, &Json(value));
            }
        }
        s.finish()
    }
}

/// One line for logs: the URL(s), whether TLS is on, the authentication
/// method. Never a secret.
impl fmt::Display for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", redact_url(&self.url), self.security)
    }
}

impl fmt::Display for NatsSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tls = match (self.tls(), self.cert_file.is_some()) {
            (_, true) => "mutual TLS",
            (true, false) => "TLS",
            (false, false) => "TLS if the server asks",
        };
        write!(f, "{tls}, auth: {}", self.auth().as_str())?;
        if let Some(user) = &self.user {
            write!(f, " as {user}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn parses_the_section() {
        let s: NatsSecurity = toml::from_str(
            "tls_required = true\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n\
             user = \"svc\"\npassword = \"pw\"",
        )
        .unwrap();
        assert!(s.tls_required);
        assert_eq!(s.auth(), NatsAuth::UserPassword);
        assert_eq!(s.password.as_ref().unwrap().expose(), "pw");
        assert!(s.validate("tls://127.0.0.1:4222").is_ok());
        assert!(toml::from_str::<NatsSecurity>("passwd = \"x\"").is_err());
        assert_eq!(s.to_string(), "mutual TLS, auth: user/password as svc");
    }

    #[test]
    fn rejects_conflicts_and_credentials_in_urls() {
        let key = |s: &NatsSecurity, url: &str| match s.validate(url) {
            Err(BrokerError::Config { key, reason }) => {
                assert!(!reason.contains("hunter2"), "{reason}");
                key
            }
            other => panic!("{other:?}"),
        };
        let base = NatsSecurity::default();
        assert_eq!(key(&base, "nats://a:4222,nats://u:hunter2@b:4222"), "nats.url");
        assert_eq!(key(&base, "hunter2@b:4222"), "nats.url");
        let two = NatsSecurity { token: Some(Secret::new("t")), nkey_seed_file: Some("/s".into()), ..base.clone() };
        assert_eq!(key(&two, "nats://h"), "nats.security");
        let user_only = NatsSecurity { user: Some("u".into()), ..base.clone() };
        assert_eq!(key(&user_only, "nats://h"), "nats.security.password");
        let cert_only = NatsSecurity { cert_file: Some("/c".into()), ..base.clone() };
        assert_eq!(key(&cert_only, "nats://h"), "nats.security.key_file");
        let empty = NatsSecurity { token: Some(Secret::new("")), ..base };
        assert_eq!(key(&empty, "nats://h"), "nats.security.token");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("nats://u:p@h:4222,tls://tok@h2:4222/x,h3:4222"),
            "nats://***@h:4222,tls://***@h2:4222/x,h3:4222"
        );
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        let config = NatsConfig { url: "nats://svc:hunter2@h:4222".into(), ..NatsConfig::default() };
        for text in [format!("{config:?}"), format!("{config:#?}"), config.to_string()] {
            assert!(!text.contains("hunter2") && text.contains("***@h:4222"), "{text}");
        }
    }

    #[test]
    fn environment_overrides_replace_the_method() {
        let file = NatsSecurity { user: Some("u".into()), password: Some(Secret::new("p")), ..Default::default() };
        let s = file.clone().with_overrides_from(env(&[("EVENTBUS_NATS_TOKEN", "tok")])).unwrap();
        assert_eq!((s.auth(), s.token.unwrap().expose()), (NatsAuth::Token, "tok"));
        assert!(s.user.is_none() && s.password.is_none());
        let s = file.clone().with_overrides_from(env(&[("EVENTBUS_NATS_PASSWORD", "p2")])).unwrap();
        assert_eq!((s.user.as_deref(), s.password.unwrap().expose()), (Some("u"), "p2"));
        let s = file
            .clone()
            .with_overrides_from(env(&[
                ("EVENTBUS_NATS_CREDS_FILE", "/c.creds"),
                ("EVENTBUS_NATS_TLS_CA_FILE", "/ca.pem"),
                ("EVENTBUS_NATS_TLS_CERT_FILE", "/cert.pem"),
                ("EVENTBUS_NATS_TLS_KEY_FILE", "/key.pem"),
                ("EVENTBUS_NATS_TLS_REQUIRED", "yes"),
            ]))
            .unwrap();
        assert_eq!(s.auth(), NatsAuth::Credentials);
        assert_eq!(s.credentials_file.as_deref(), Some(Path::new("/c.creds")));
        assert_eq!(s.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(s.cert_file.as_deref(), Some(Path::new("/cert.pem")));
        assert_eq!(s.key_file.as_deref(), Some(Path::new("/key.pem")));
        assert!(s.tls_required);
        let s = file.clone().with_overrides_from(env(&[("EVENTBUS_NATS_NKEY_SEED_FILE", "/seed")])).unwrap();
        assert_eq!(s.auth(), NatsAuth::NKey);
        // Empty counts as unset.
        assert_eq!(file.clone().with_overrides_from(env(&[("EVENTBUS_NATS_TOKEN", "")])).unwrap(), file);
        let err = file.with_overrides_from(env(&[("EVENTBUS_NATS_TLS_REQUIRED", "maybe")])).unwrap_err();
        assert!(matches!(err, BrokerError::Config { ref key, .. } if key == "nats.security.tls_required"), "{err}");
        // Every documented variable is handled above.
        assert_eq!(ENV_OVERRIDES.len(), 9);
    }
}
