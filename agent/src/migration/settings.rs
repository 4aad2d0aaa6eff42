//! The `[migration]` section of the agent's config: whether and where this
//! agent takes VMs in, and how its moves out run.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::template::Template;
use crate::qmp::migrate::{ConfigError as TransferError, MigrationConfig};

/// A `[migration]` setting that cannot work; the message names the setting
/// and what would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(
        "migration.listen = {0} is a wildcard address: set migration.advertise (the URL other agents dial) \
         and migration.stream_address (this node's address for the stream)"
    )]
    WildcardListen(SocketAddr),
    #[error("migration.advertise = {0:?} must be an http:// or https:// URL")]
    AdvertiseNotUrl(String),
    #[error("migration.advertise needs migration.listen")]
    AdvertiseWithoutListen,
    #[error("migration.confirm_grace_ms must be above zero")]
    NoConfirmGrace,
    #[error("migration.tap_prefix = {0:?} must be 1-{MAX_TAP_PREFIX} of [A-Za-z0-9_-]")]
    TapPrefix(String),
    #[error("migration.{0} must be an absolute path")]
    RelativeDir(&'static str),
    #[error("migration.tombstone_max_age_days must be 1..=36500")]
    TombstoneAge,
}

/// Leaves room in the 15 bytes of a tap's name.
const MAX_TAP_PREFIX: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationSettings {
    /// Where this agent's MigrationTarget gRPC service listens. None: the
    /// agent takes no VMs in (it may still move its own away).
    pub listen: Option<SocketAddr>,
    /// The URL other agents dial, e.g. `http://10.0.0.2:7073`. Default
    /// `http://<listen>`; required when `listen` is a wildcard address.
    pub advertise: Option<String>,
    /// The address incoming QEMUs listen on for the migration stream.
    /// Default: `listen`'s address.
    pub stream_address: Option<IpAddr>,
    /// The QEMU binary that runs VMs moved here. Default `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Incoming QEMUs' sockets, logs and pid files, and the records of VMs
    /// taken in (read back after a restart). Default `/var/lib/vmscale/migration`.
    pub state_dir: PathBuf,
    /// Bandwidth, downtime limit, timeout and capabilities of moves out.
    pub transfer: MigrationConfig,
    /// How long a target waits for the source's confirm after the order's
    /// transfer timeout before it kills an incoming QEMU by itself, ms.
    /// Default 30000.
    pub confirm_grace_ms: u64,
    /// Run incoming QEMUs with `-sandbox on,...` (QEMU's seccomp filter).
    /// Default true.
    pub sandbox: bool,
    /// Where the kernels and initrds of VMs booted directly are, on this
    /// node: a moving VM's files are named relative to it. Default none (such
    /// VMs neither leave nor come).
    pub image_dir: Option<PathBuf>,
    /// Where the VMs' disk files are, on this node. Default none.
    pub disk_dir: Option<PathBuf>,
    /// Where the VMs' vhost-user vsock sockets are, on this node. Default none.
    pub vsock_dir: Option<PathBuf>,
    /// The taps a VM taken in may use start with this. Default `vm`.
    pub tap_prefix: String,
    /// Whether a VM taken in may have the read-only 9p share of the host's
    /// root (test guests run host programs through it). Default false.
    pub host_root_share: bool,
    /// QEMU's own TLS on the migration stream (`tls-creds-x509`, the
    /// target's `tls-authz` naming the order's source node). Default: on
    /// when the agent has `[tls]`. On without `[tls]`, moves fail.
    pub tls: Option<bool>,
    /// How long the target remembers an order whose guest was confirmed
    /// here (so that it never tells the source "none" for it), days.
    /// Default 30.
    pub tombstone_max_age_days: u64,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        Self {
            listen: None,
            advertise: None,
            stream_address: None,
            qemu: PathBuf::from("qemu-system-x86_64"),
            state_dir: PathBuf::from("/var/lib/vmscale/migration"),
            transfer: MigrationConfig::default(),
            confirm_grace_ms: 30_000,
            sandbox: true,
            image_dir: None,
            disk_dir: None,
            vsock_dir: None,
            tap_prefix: "vm".to_owned(),
            host_root_share: false,
            tombstone_max_age_days: 30,
            tls: None,
        }
    }
}

impl MigrationSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.transfer.validate()?;
        if let Some(l) = self.listen {
            if l.ip().is_unspecified() && (self.advertise.is_none() || self.stream_address.is_none()) {
                return Err(SettingsError::WildcardListen(l));
            }
        }
        if let Some(a) = &self.advertise {
            if !(a.starts_with("http://") || a.starts_with("https://")) {
                return Err(SettingsError::AdvertiseNotUrl(a.clone()));
            }
            if self.listen.is_none() {
                return Err(SettingsError::AdvertiseWithoutListen);
            }
        }
        if self.confirm_grace_ms == 0 {
            return Err(SettingsError::NoConfirmGrace);
        }
        if !super::machine::is_plain_name(&self.tap_prefix, MAX_TAP_PREFIX) || self.tap_prefix.contains('.') {
            return Err(SettingsError::TapPrefix(self.tap_prefix.clone()));
        }
        if !(1..=36_500).contains(&self.tombstone_max_age_days) {
            return Err(SettingsError::TombstoneAge);
        }
        for (name, dir) in
            [("image_dir", &self.image_dir), ("disk_dir", &self.disk_dir), ("vsock_dir", &self.vsock_dir)]
        {
            if dir.as_ref().is_some_and(|d| !d.is_absolute()) {
                return Err(SettingsError::RelativeDir(name));
            }
        }
        Ok(())
    }

    /// What this node puts on the command line of the QEMUs it takes VMs in
    /// with, and where it finds the files their specs name.
    pub fn template(&self) -> Template {
        Template {
            sandbox: self.sandbox,
            image_dir: self.image_dir.clone(),
            disk_dir: self.disk_dir.clone(),
            vsock_dir: self.vsock_dir.clone(),
            tap_prefix: self.tap_prefix.clone(),
            host_root_share: self.host_root_share,
        }
    }

    /// What the hello tells the allocator: empty when no VMs are taken in;
    /// by default `https://<listen>` for an agent with `[tls]` (`tls`),
    /// `http://<listen>` for one without.
    pub fn endpoint_for(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        match (self.listen, &self.advertise) {
            (None, _) => String::new(),
            (Some(_), Some(a)) => a.clone(),
            (Some(l), None) => format!("{scheme}://{l}"),
        }
    }

    /// Whether streams go over QEMU's TLS, for an agent with (`has_tls`)
    /// or without `[tls]`.
    pub fn stream_tls(&self, has_tls: bool) -> bool {
        self.tls.unwrap_or(has_tls)
    }

    /// The address incoming QEMUs listen on.
    pub fn stream_ip(&self) -> Option<IpAddr> {
        self.stream_address.or(self.listen.map(|l| l.ip()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> MigrationSettings {
        #[allow(clippy::unwrap_used)]
        toml::from_str(s).unwrap()
    }

    #[test]
    fn no_listen_means_no_endpoint() {
        let s = MigrationSettings::default();
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.endpoint_for(false), "");
        assert_eq!(s.stream_ip(), None);
    }

    #[test]
    fn endpoint_and_stream_address_follow_listen() {
        let s = parse("listen = \"10.0.0.2:7073\"\n[transfer]\ndowntime_limit_ms = 100\n");
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.endpoint_for(false), "http://10.0.0.2:7073");
        assert_eq!(s.endpoint_for(true), "https://10.0.0.2:7073");
        assert_eq!(s.stream_ip(), Some("10.0.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert_eq!(s.transfer.downtime_limit_ms, 100);
    }

    #[test]
    fn a_wildcard_listen_needs_what_others_dial() {
        let e = parse("listen = \"0.0.0.0:7073\"").validate().unwrap_err();
        assert!(e.to_string().contains("migration.advertise"), "{e}");
        let ok = parse(
            "listen = \"0.0.0.0:7073\"\nadvertise = \"http://10.0.0.2:7073\"\nstream_address = \"10.0.0.2\"",
        );
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.endpoint_for(false), "http://10.0.0.2:7073");
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse("listen = \"10.0.0.2:7073\"\nadvertise = \"10.0.0.2:7073\"").validate().unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let e = parse("confirm_grace_ms = 0").validate().unwrap_err();
        assert_eq!(e, SettingsError::NoConfirmGrace);
        let e = parse("[transfer]\nmax_bandwidth_bytes_per_s = 0").validate().unwrap_err();
        assert_eq!(e.to_string(), "migration max_bandwidth_bytes_per_s must be above zero");
        assert!(toml::from_str::<MigrationSettings>("lissen = \"x\"").is_err());
        let e = parse("tap_prefix = \"vm,script=x\"").validate().unwrap_err();
        assert!(e.to_string().contains("migration.tap_prefix"), "{e}");
        let e = parse("disk_dir = \"disks\"").validate().unwrap_err();
        assert_eq!(e, SettingsError::RelativeDir("disk_dir"));
    }
}
