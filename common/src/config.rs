//! Reading a daemon's TOML config file. Each daemon's `Config` derives
//! `Deserialize` with `deny_unknown_fields` and has its own `validate()`;
//! this is the part they all share: reading, parsing, and errors that name
//! the file (and, through `toml`'s error, the line and key).

use serde::de::DeserializeOwned;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config value {field} = {value} is invalid: {reason}")]
    Invalid { field: String, value: String, reason: String },
    /// A rule across fields (or a section's own check), in a sentence that
    /// names the keys and the fix.
    #[error("config: {0}")]
    Rule(String),
}

impl ConfigError {
    /// A value that parsed but makes no sense; `reason` says what would.
    pub fn invalid(field: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { field: field.into(), value: value.to_string(), reason: reason.into() }
    }
}

/// Reads and parses `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses `text`; `origin` names it in errors.
pub fn parse<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), source: Box::new(e) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Small {
        #[allow(dead_code)]
        watermark: f64,
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = parse::<Small>("watermak = 0.9", "allocator.toml").unwrap_err();
        let text = crate::error::chain(&e);
        assert!(text.contains("allocator.toml") && text.contains("watermak"), "{text}");
        let e = load::<Small>(Path::new("/nonexistent/agent.toml")).unwrap_err();
        assert!(crate::error::chain(&e).contains("/nonexistent/agent.toml"));
    }
}
