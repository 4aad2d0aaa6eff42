//! The allocator's configuration: a TOML file (unknown keys are an error) with
//! every threshold documented here, and command-line flags that override it.

use crate::core::units::Resources;
use crate::core::CoreConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC address agents connect to.
    pub listen: SocketAddr,
    /// HTTP address for `/metrics` (Prometheus), `/state` (JSON) and `/healthz`.
    pub http_listen: SocketAddr,
    /// Fraction of a node's usable capacity (after the system reserve) above
    /// which the planner moves VMs away. Default 0.9.
    pub watermark: f64,
    /// CPU kept back on every node for the host, in milli-vCPU. Default 0.
    pub system_reserve_milli_cpu: u64,
    /// Memory kept back on every node for the host, in bytes. Default 0.
    pub system_reserve_memory_bytes: u64,
    /// How often the planner runs, in milliseconds (it also runs right after a
    /// denied or partial request). Default 1000.
    pub plan_interval_ms: u64,
    /// A migration not finished after this many milliseconds fails. Default 600000.
    pub order_timeout_ms: u64,
    /// Moves planned per round across the cluster. Default 16.
    pub max_moves_per_round: usize,
    /// How long a new session may take to send its hello, in milliseconds. Default 10000.
    pub hello_timeout_ms: u64,
    /// Messages queued towards one agent before the session is considered stuck. Default 4096.
    pub session_queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 7070)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 7071)),
            watermark: 0.9,
            system_reserve_milli_cpu: 0,
            system_reserve_memory_bytes: 0,
            plan_interval_ms: 1000,
            order_timeout_ms: 600_000,
            max_moves_per_round: 16,
            hello_timeout_ms: 10_000,
            session_queue: 4096,
        }
    }
}

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
    Invalid { field: &'static str, value: String, reason: &'static str },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.to_owned(), source: Box::new(e) })?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: String, reason| Err(ConfigError::Invalid { field, value, reason });
        if !(self.watermark > 0.0 && self.watermark <= 1.0) {
            return bad("watermark", self.watermark.to_string(), "must be in (0, 1]");
        }
        if self.plan_interval_ms == 0 {
            return bad("plan_interval_ms", "0".into(), "must be at least 1");
        }
        if self.order_timeout_ms == 0 {
            return bad("order_timeout_ms", "0".into(), "must be at least 1");
        }
        if self.hello_timeout_ms == 0 {
            return bad("hello_timeout_ms", "0".into(), "must be at least 1");
        }
        if self.session_queue == 0 {
            return bad("session_queue", "0".into(), "must be at least 1");
        }
        if Resources::new(self.system_reserve_milli_cpu, self.system_reserve_memory_bytes)
            .checked("system reserve")
            .is_err()
        {
            return bad(
                "system_reserve",
                format!("{} mCPU, {} bytes", self.system_reserve_milli_cpu, self.system_reserve_memory_bytes),
                "beyond any machine; check the units (milli-vCPU, bytes)",
            );
        }
        Ok(())
    }

    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            system_reserve: Resources::new(self.system_reserve_milli_cpu, self.system_reserve_memory_bytes),
            watermark: self.watermark,
            order_timeout_ms: self.order_timeout_ms,
            max_moves_per_round: self.max_moves_per_round,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("", "t").unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = Config::parse("watermrk = 0.8", "t").unwrap_err();
        assert!(format!("{:#}", anyhow::Error::from(e)).contains("unknown field"));
        let e = Config::parse("watermark = 1.5", "t").unwrap_err();
        assert!(e.to_string().contains("(0, 1]"), "{e}");
        let e = Config::parse("system_reserve_memory_bytes = 9223372036854775807", "t").unwrap_err();
        assert!(e.to_string().contains("units"), "{e}");
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse("watermark = 0.8\nlisten = \"127.0.0.1:9000\"\nplan_interval_ms = 250", "t")
            .unwrap();
        assert_eq!(c.watermark, 0.8);
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.core().watermark, 0.8);
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/allocator.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/allocator.toml"));
    }
}
