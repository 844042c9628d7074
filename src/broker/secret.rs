//! [`Secret`]: a password, token or key password that never shows up in
//! `Debug`, `Display`, logs or serialized configuration.
//!
//! In a config file a secret is written as a plain string, or read from an
//! environment variable or a file when the configuration is loaded:
//!
//! ```toml
//! password = "s3cret"                       # inline (serializes back as "***")
//! password = { env = "NATS_PASSWORD" }      # from the environment
//! password = { file = "/run/secrets/nats" } # from a file (trailing newline trimmed)
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// A secret string. `Debug` and `Display` print `***`; serializing writes
/// `{ env = "VAR" }` / `{ file = "PATH" }` for a secret read from there and
/// `"***"` for an inline one, so a dumped configuration never holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    source: Source,
}

#[derive(Clone, PartialEq, Eq)]
enum Source {
    Inline,
    Env(String),
    File(PathBuf),
}

/// What `Debug` and `Display` print instead of a secret.
pub const REDACTED: &str = "***";

impl Secret {
    /// A secret given inline.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret { value: value.into(), source: Source::Inline }
    }

    /// The value of environment variable `var`. The error names the variable,
    /// never a value.
    pub fn from_env(var: &str) -> Result<Secret, String> {
        match std::env::var(var) {
            Ok(value) => Ok(Secret { value, source: Source::Env(var.to_string()) }),
            Err(std::env::VarError::NotPresent) => Err(format!("environment variable {var} is not set")),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!("environment variable {var} is not UTF-8")),
        }
    }

    /// The content of file `path`, without its trailing line break. The error
    /// names the file, never its content.
    pub fn from_file(path: &Path) -> Result<Secret, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Secret {
                value: text.trim_end_matches(['\r', '\n']).to_string(),
                source: Source::File(path.to_path_buf()),
            }),
            Err(e) => Err(format!("cannot read secret file {}: {e}", path.display())),
        }
    }

    /// The secret itself: only to hand it to the client library.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
enum Repr {
    Inline(String),
    Env { env: String },
    File { file: PathBuf },
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.source {
            Source::Inline => s.serialize_str(REDACTED),
            Source::Env(var) => Repr::Env { env: var.clone() }.serialize(s),
            Source::File(path) => Repr::File { file: path.clone() }.serialize(s),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        // Untagged enums report "did not match any variant" with no detail;
        // the shapes are few, so say them.
        let repr = Repr::deserialize(d).map_err(|_| {
            serde::de::Error::custom("a secret is a string, { env = \"VARIABLE\" } or { file = \"PATH\" }")
        })?;
        match repr {
            Repr::Inline(value) => Ok(Secret::new(value)),
            Repr::Env { env } => Secret::from_env(&env).map_err(serde::de::Error::custom),
            Repr::File { file } => Secret::from_file(&file).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    struct C {
        password: Secret,
    }

    #[test]
    fn formatting_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s} {s:#?}"), "*** *** ***");
        let c = C { password: s };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(toml::to_string(&c).unwrap().trim(), "password = \"***\"");
        assert_eq!(c.password.expose(), "hunter2");
    }

    #[test]
    fn reads_inline_env_and_file_forms() {
        let c: C = toml::from_str("password = \"p1\"").unwrap();
        assert_eq!(c.password.expose(), "p1");
        // PATH is set in every test environment; its value is not a secret.
        let c: C = toml::from_str("password = { env = \"PATH\" }").unwrap();
        assert_eq!(c.password.expose(), std::env::var("PATH").unwrap());
        assert_eq!(toml::to_string(&c).unwrap().trim(), "[password]\nenv = \"PATH\"");
        let path = std::env::temp_dir().join(format!("eventbus-secret-{}", std::process::id()));
        std::fs::write(&path, "from-file\n").unwrap();
        let c: C = toml::from_str(&format!("password = {{ file = {:?} }}", path.display().to_string())).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(c.password.expose(), "from-file");
    }

    #[test]
    fn errors_name_the_source_not_a_value() {
        let e = toml::from_str::<C>("password = { env = \"EVENTBUS_TEST_SURELY_UNSET_VAR\" }").unwrap_err();
        assert!(e.to_string().contains("EVENTBUS_TEST_SURELY_UNSET_VAR is not set"), "{e}");
        let e = toml::from_str::<C>("password = 3").unwrap_err();
        assert!(e.to_string().contains("a secret is a string"), "{e}");
        let e = toml::from_str::<C>("password = { file = \"/nonexistent/eventbus\" }").unwrap_err();
        assert!(e.to_string().contains("cannot read secret file /nonexistent/eventbus"), "{e}");
    }
}
