//! `BusConfig::from_toml` / `from_yaml` on arbitrary text: `Ok` with a
//! configuration that validates, or a typed `ConfigError`; never a panic.
//! An accepted configuration survives a write-and-read round trip.
#![no_main]

use eventbus::bus::ConfigError;
use eventbus::BusConfig;
use libfuzzer_sys::fuzz_target;

fn check(parsed: Result<BusConfig, ConfigError>, format: &str) -> Option<BusConfig> {
    match parsed {
        Ok(config) => {
            config
                .validate()
                .unwrap_or_else(|e| panic!("{format}: accepted an invalid config: {e}"));
            Some(config)
        }
        Err(e) => {
            // Every error renders, and names what is wrong.
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Some(config) = check(BusConfig::from_toml(text), "toml") {
        let written = toml::to_string(&config).expect("an accepted config writes as TOML");
        let again = BusConfig::from_toml(&written).expect("written TOML reads back");
        assert_eq!(
            again, config,
            "TOML round trip changed the config:\n{written}"
        );
    }
    if let Some(config) = check(BusConfig::from_yaml(text), "yaml") {
        let written = yaml_serde::to_string(&config).expect("an accepted config writes as YAML");
        let again = BusConfig::from_yaml(&written).expect("written YAML reads back");
        assert_eq!(
            again, config,
            "YAML round trip changed the config:\n{written}"
        );
    }
});
