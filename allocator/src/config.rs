//! The allocator's configuration: a TOML file (unknown keys are an error) with
//! every threshold documented here, and command-line flags that override it.

use crate::core::endpoint::EndpointScheme;
use crate::core::limits::Limits;
use crate::core::order_ids::MIN_KEY_BYTES;
use crate::core::units::Resources;
use crate::core::CoreConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC address agents connect to.
    pub listen: SocketAddr,
    /// HTTP address for `/metrics` (Prometheus), `/state` (JSON) and
    /// `/healthz`. Default `127.0.0.1:7071`: `/state` lists every node, VM
    /// and order, so it is open only on loopback unless `http_tls` is set
    /// (or, for tests, `insecure`).
    pub http_listen: SocketAddr,
    /// Serve `http_listen` over TLS with required client certificates
    /// signed by the cluster CA (the `[tls]` files). Default false.
    pub http_tls: bool,
    /// Plain-text gRPC without `[tls]`, and `http_listen` beyond loopback
    /// without `http_tls`: for tests on one machine. Default false.
    pub insecure: bool,
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
    /// After a round run early (a denied or partial request wakes the
    /// planner), the next waits at least this long, in milliseconds, so a
    /// storm of denials costs one round, not thousands. Default 50; at most
    /// `plan_interval_ms` takes effect.
    pub plan_min_gap_ms: u64,
    /// A migration not finished after this many milliseconds fails. Default 600000.
    pub order_timeout_ms: u64,
    /// Moves planned per round across the cluster. Default 16.
    pub max_moves_per_round: usize,
    /// A node whose worst VM's run-queue delay p99 is at least this, in µs,
    /// is contended: it takes a VM only when no calm node has room. Default
    /// 5000: 5 ms of waiting per wake-up is already felt in a database's tail
    /// latency, and far above what a calm host shows (tens of µs).
    pub contended_p99_us: u64,
    /// After a VM's move fails it is not planned again for this long, in ms,
    /// so a broken target or network is not hammered with moves. Default 5000.
    pub move_retry_base_ms: u64,
    /// The wait doubles after each further failure in a row up to this, in
    /// ms. Default 300000 (5 minutes).
    pub move_retry_max_ms: u64,
    /// How long a new session may take to send its hello, in milliseconds. Default 10000.
    pub hello_timeout_ms: u64,
    /// Messages queued towards one agent before the session is considered stuck. Default 4096.
    pub session_queue: usize,
    /// `[tls]`: the cluster CA and the allocator's certificate
    /// (`allocator.vmscale`). Agents must then present their node's
    /// certificate (`<node>.node.vmscale`), and may register only as it.
    pub tls: Option<vmscale_common::tls::TlsFiles>,
    /// A file holding the cluster's order key: at least 32 bytes, e.g.
    /// `head -c 32 /dev/urandom` (the harnesses make one; in Kubernetes a
    /// Secret mounted as a file). Migration order ids are signed with it, so
    /// that a restarted allocator adopts the moves its agents report and no
    /// others (`core/order_ids.rs`); every replica must have the same key.
    /// Unset: a key of this run's own, and after a restart the moves under
    /// way are not adopted (their VMs count as not moving). The daemon reads
    /// it at start ([`Config::read_files`]); `validate` reads no files.
    pub order_key: Option<PathBuf>,
    /// `[limits]`: bounds on what agents can make the allocator keep (nodes,
    /// VMs per node, open orders, reasons); keys and defaults in
    /// `core/limits.rs`.
    pub limits: Limits,
    /// Set when the allocator runs in a Kubernetes cluster: leader election on
    /// a Lease, node capacity from the cluster. Unset: one allocator, capacity
    /// as each agent reports it.
    pub kubernetes: Option<KubernetesConfig>,
}

/// `[kubernetes]`: see `crate::leader` and `crate::capacity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Name of the `coordination.k8s.io/v1` Lease the replicas elect a leader
    /// on. Default `vmscale-allocator`; RBAC names it too (deploy/).
    pub lease_name: String,
    /// The Lease's namespace. Default: `$POD_NAMESPACE`, else `vmscale-system`.
    pub lease_namespace: Option<String>,
    /// A holder that has not renewed for this long loses the Lease, ms.
    /// Default 10000: a standby takes over 10-12 s after a leader dies
    /// (immediately when it shuts down cleanly and hands the Lease back).
    pub lease_duration_ms: u64,
    /// How often the leader renews and a standby checks, ms. Default 2000.
    pub renew_interval_ms: u64,
    /// A leader that could not renew for this long stops serving (before
    /// the Lease runs out, so two leaders never serve at once), ms. Default 7000.
    pub renew_deadline_ms: u64,
    /// Take each node's capacity from its Node's allocatable resources less
    /// the requests of pods that are not autoscaled VMs. Default true.
    pub capacity_from_nodes: bool,
    /// The label that marks an autoscaled VM pod (as the agent's). Default `vmscale.io/autoscale`.
    pub autoscale_label_key: String,
    /// Its value. Default `true`.
    pub autoscale_label_value: String,
    /// Set (with `capacity_from_nodes`): a node's migration endpoint is its
    /// Node's InternalIP and this port (`https://IP:PORT` with `[tls]`), from
    /// the API server, whatever its agent reports; the agent only says
    /// whether it takes VMs in. Unset: the agent's endpoint, checked.
    /// Default unset.
    pub migration_port: Option<u16>,
    /// `[kubernetes.node_certs]`: sign the agents' node certificates (the
    /// CSR API's signer `vmscale.io/node`, `crate::node_certs`). Default none.
    pub node_certs: Option<crate::node_certs::NodeCertsConfig>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            lease_name: "vmscale-allocator".into(),
            lease_namespace: None,
            lease_duration_ms: 10_000,
            renew_interval_ms: 2_000,
            renew_deadline_ms: 7_000,
            capacity_from_nodes: true,
            autoscale_label_key: vmscale_contract::keys::DEFAULT_LABEL_KEY.into(),
            autoscale_label_value: vmscale_contract::keys::DEFAULT_LABEL_VALUE.into(),
            migration_port: None,
            node_certs: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 7070)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            http_tls: false,
            tls: None,
            insecure: false,
            watermark: 0.9,
            system_reserve_milli_cpu: 0,
            system_reserve_memory_bytes: 0,
            plan_interval_ms: 1000,
            plan_min_gap_ms: 50,
            order_timeout_ms: 600_000,
            max_moves_per_round: 16,
            contended_p99_us: 5_000,
            move_retry_base_ms: 5_000,
            move_retry_max_ms: 300_000,
            hello_timeout_ms: 10_000,
            session_queue: 4096,
            order_key: None,
            limits: Limits::default(),
            kubernetes: None,
        }
    }
}

pub use vmscale_common::config::ConfigError;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let c: Config = vmscale_common::config::load(path)?;
        c.validate()?;
        Ok(c)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let c: Config = vmscale_common::config::parse(text, origin)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, value: String, reason: &str| Err(ConfigError::invalid(field, value, reason));
        if !(self.watermark > 0.0 && self.watermark <= 1.0) {
            return bad("watermark", self.watermark.to_string(), "must be in (0, 1]");
        }
        if self.plan_interval_ms == 0 {
            return bad("plan_interval_ms", "0".into(), "must be at least 1");
        }
        if self.plan_min_gap_ms == 0 {
            return bad("plan_min_gap_ms", "0".into(), "must be at least 1");
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
        self.limits.validate().map_err(ConfigError::Rule)?;
        if self.order_key.as_deref().is_some_and(|p| !p.is_absolute()) {
            return bad("order_key", format!("{:?}", self.order_key), "must be an absolute path");
        }
        if self.contended_p99_us == 0 {
            return bad(
                "contended_p99_us",
                "0".into(),
                "must be at least 1 (µs); 0 would make every node contended",
            );
        }
        if self.move_retry_base_ms == 0 {
            return bad("move_retry_base_ms", "0".into(), "must be at least 1");
        }
        if self.move_retry_max_ms < self.move_retry_base_ms {
            return bad(
                "move_retry_max_ms",
                self.move_retry_max_ms.to_string(),
                "must be at least move_retry_base_ms",
            );
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
        if let Some(k) = &self.kubernetes {
            k.validate()?;
        }
        self.validate_transport()
    }

    /// `[tls]` or `insecure`; `http_tls` only with `[tls]`; `/state` open
    /// beyond loopback only when insecure.
    fn validate_transport(&self) -> Result<(), ConfigError> {
        vmscale_common::tls::check_transport(self.tls.as_ref(), self.insecure)?;
        if self.http_tls && self.tls.is_none() {
            return Err(ConfigError::Rule("http_tls = true needs a [tls] section".into()));
        }
        if !self.http_tls && !self.insecure && !self.http_listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "http_listen",
                self.http_listen,
                "is not loopback, and /state would be open to anyone: set http_tls = true (client \
                 certificates) or listen on 127.0.0.1",
            ));
        }
        Ok(())
    }

    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            system_reserve: Resources::new(self.system_reserve_milli_cpu, self.system_reserve_memory_bytes),
            watermark: self.watermark,
            order_timeout_ms: self.order_timeout_ms,
            max_moves_per_round: self.max_moves_per_round,
            contended_p99_us: self.contended_p99_us,
            move_retry_base_ms: self.move_retry_base_ms,
            move_retry_max_ms: self.move_retry_max_ms,
            limits: self.limits.clone(),
            known_nodes_only: self.kubernetes.as_ref().is_some_and(|k| k.capacity_from_nodes),
            endpoints_from_cluster: self.kubernetes.as_ref().is_some_and(|k| k.migration_port.is_some()),
            // The agents' links run TLS exactly when the allocator's does.
            endpoint_scheme: if self.tls.is_some() { EndpointScheme::Https } else { EndpointScheme::Http },
        }
    }
}

impl Config {
    /// Reads the files the config names that the daemon needs before it
    /// serves, so that a missing or short one stops it at start with the
    /// reason: the order key (the TLS files are read by `crate::server`).
    pub fn read_files(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.order_key {
            read_order_key(p)?;
        }
        Ok(())
    }
}

/// The order key in `path` (see [`Config::order_key`]).
pub fn read_order_key(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bad = |reason: String| ConfigError::invalid("order_key", path.display(), reason);
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    // A key is a few dozen bytes; a large file is the wrong file.
    if meta.len() > MAX_ORDER_KEY_BYTES {
        return Err(bad(format!(
            "is {} bytes; a key has {MIN_KEY_BYTES} to {MAX_ORDER_KEY_BYTES}",
            meta.len()
        )));
    }
    let key = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    if key.len() < MIN_KEY_BYTES {
        return Err(bad(format!(
            "holds {} bytes; a key needs at least {MIN_KEY_BYTES} (e.g. head -c 32 /dev/urandom > FILE)",
            key.len()
        )));
    }
    Ok(key)
}

/// Longest order key file taken.
const MAX_ORDER_KEY_BYTES: u64 = 4096;

/// Makes an order key file at `path` (32 random bytes, readable by its
/// owner only) unless one is there: for the harnesses and the demo, whose
/// allocators must keep one key across restarts. Kubernetes mounts a Secret.
pub fn ensure_order_key(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key: [u8; MIN_KEY_BYTES] = rand::random();
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut f) => {
            f.write_all(&key)?;
            f.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl KubernetesConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, value: String, reason: &str| Err(ConfigError::invalid(field, value, reason));
        let dns = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !dns(&self.lease_name) {
            return bad("kubernetes.lease_name", self.lease_name.clone(), "must be a DNS label");
        }
        if self.migration_port == Some(0) {
            return bad("kubernetes.migration_port", "0".into(), "must be a port from 1 to 65535");
        }
        if self.migration_port.is_some() && !self.capacity_from_nodes {
            return bad(
                "kubernetes.migration_port",
                format!("{:?}", self.migration_port),
                "needs capacity_from_nodes = true (the Node watch gives the addresses)",
            );
        }
        if let Some(ns) = self.lease_namespace.as_deref().filter(|ns| !dns(ns)) {
            return bad("kubernetes.lease_namespace", ns.to_owned(), "must be a DNS label");
        }
        if self.renew_interval_ms == 0 {
            return bad("kubernetes.renew_interval_ms", "0".into(), "must be at least 1");
        }
        // The leader must give up before the Lease runs out, and retry at
        // least once before giving up.
        if !(self.renew_interval_ms < self.renew_deadline_ms
            && self.renew_deadline_ms < self.lease_duration_ms)
        {
            return bad(
                "kubernetes.renew_deadline_ms",
                format!(
                    "renew_interval_ms {} / renew_deadline_ms {} / lease_duration_ms {}",
                    self.renew_interval_ms, self.renew_deadline_ms, self.lease_duration_ms
                ),
                "must be renew_interval_ms < renew_deadline_ms < lease_duration_ms",
            );
        }
        let label_ok = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if self.autoscale_label_key.is_empty()
            || !label_ok(&self.autoscale_label_key)
            || !label_ok(&self.autoscale_label_value)
            || self.autoscale_label_value.contains('/')
        {
            return bad(
                "kubernetes.autoscale_label_key",
                format!("{}={}", self.autoscale_label_key, self.autoscale_label_value),
                "must be a label key and value",
            );
        }
        if let Some(nc) = &self.node_certs {
            nc.validate().map_err(|e| ConfigError::Rule(format!("kubernetes.{e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_but_a_transport_must_be_chosen() {
        let e = Config::parse("", "t").unwrap_err();
        assert!(e.to_string().contains("set [tls]"), "{e}");
        let c = Config::parse("insecure = true", "t").unwrap();
        assert_eq!(c, Config { insecure: true, ..Config::default() });
        assert!(c.http_listen.ip().is_loopback(), "/state is on loopback unless asked");
    }

    #[test]
    fn tls_section_and_http_listener() {
        let tls = "[tls]\nca = \"/c\"\ncert = \"/a\"\nkey = \"/k\"\n";
        let c = Config::parse(tls, "t").unwrap();
        assert_eq!(c.tls.unwrap().cert, Path::new("/a"));
        let e = Config::parse(&format!("http_listen = \"0.0.0.0:7071\"\n{tls}"), "t").unwrap_err();
        assert!(e.to_string().contains("http_tls = true"), "{e}");
        assert!(
            Config::parse(&format!("http_listen = \"0.0.0.0:7071\"\nhttp_tls = true\n{tls}"), "t").is_ok()
        );
        let e = Config::parse("http_tls = true\ninsecure = true", "t").unwrap_err();
        assert!(e.to_string().contains("needs a [tls]"), "{e}");
        assert!(Config::parse("http_listen = \"0.0.0.0:7071\"\ninsecure = true", "t").is_ok());
        assert!(Config::parse(&format!("{tls}crt = 1"), "t").is_err(), "unknown keys in [tls]");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = Config::parse("watermrk = 0.8", "t").unwrap_err();
        assert!(format!("{:#}", anyhow::Error::from(e)).contains("unknown field"));
        let e = Config::parse("watermark = 1.5", "t").unwrap_err();
        assert!(e.to_string().contains("(0, 1]"), "{e}");
        let e = Config::parse("system_reserve_memory_bytes = 9223372036854775807", "t").unwrap_err();
        assert!(e.to_string().contains("units"), "{e}");
        let e = Config::parse("plan_min_gap_ms = 0", "t").unwrap_err();
        assert!(e.to_string().contains("plan_min_gap_ms"), "{e}");
        let e = Config::parse("contended_p99_us = 0", "t").unwrap_err();
        assert!(e.to_string().contains("contended_p99_us"), "{e}");
        let e = Config::parse("move_retry_base_ms = 10000\nmove_retry_max_ms = 5000", "t").unwrap_err();
        assert!(e.to_string().contains("move_retry_max_ms"), "{e}");
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            "insecure = true\nwatermark = 0.8\nlisten = \"127.0.0.1:9000\"\nplan_interval_ms = 250",
            "t",
        )
        .unwrap();
        assert_eq!(c.watermark, 0.8);
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.core().watermark, 0.8);
        let c = Config::parse(
            "insecure = true\ncontended_p99_us = 2000\nmove_retry_base_ms = 100\nmove_retry_max_ms = 400",
            "t",
        )
        .unwrap();
        assert_eq!(c.core().contended_p99_us, 2000);
        assert_eq!([1, 2, 3, 4].map(|n| c.core().move_retry_wait_ms(n)), [100, 200, 400, 400]);
    }

    #[test]
    fn kubernetes_section() {
        let c = Config::parse("insecure = true\n[kubernetes]\nlease_name = \"x\"", "t").unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.lease_name, "x");
        assert_eq!(k.lease_duration_ms, 10_000);
        let e = Config::parse("[kubernetes]\nrenew_deadline_ms = 20000", "t").unwrap_err();
        assert!(e.to_string().contains("renew_deadline_ms"), "{e}");
        assert!(Config::parse("[kubernetes]\nlease = \"x\"", "t").is_err());
        let c = Config::parse("insecure = true\n[kubernetes]\nmigration_port = 7073", "t").unwrap();
        assert!(c.core().endpoints_from_cluster && c.core().known_nodes_only);
        assert!(!Config::parse("insecure = true\n[kubernetes]", "t").unwrap().core().endpoints_from_cluster);
        let e = Config::parse("insecure = true\n[kubernetes]\nmigration_port = 0", "t").unwrap_err();
        assert!(e.to_string().contains("migration_port"), "{e}");
        let no_nodes = "insecure = true\n[kubernetes]\nmigration_port = 1\ncapacity_from_nodes = false";
        assert!(Config::parse(no_nodes, "t").unwrap_err().to_string().contains("capacity_from_nodes"));
        assert!(Config::parse("[kubernetes]\nlease_name = \"A_b\"", "t").is_err());
    }

    #[test]
    fn limits_and_the_order_key() {
        let c = Config::parse("insecure = true\n[limits]\nmax_vms_per_node = 10", "t").unwrap();
        assert_eq!(c.core().limits.max_vms_per_node, 10);
        assert_eq!(c.core().limits.max_open_orders, Limits::default().max_open_orders);
        let e = Config::parse("insecure = true\n[limits]\nmax_nodes = 0", "t").unwrap_err();
        assert!(e.to_string().contains("limits.max_nodes"), "{e}");
        assert!(Config::parse("insecure = true\n[limits]\nmax_node = 1", "t").is_err(), "unknown key");

        let e = Config::parse("insecure = true\norder_key = \"key\"", "t").unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        // The file is read when the daemon starts, not when the config is
        // checked (the deploy's configs name files of the cluster).
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("order.key");
        let with_key = format!("insecure = true\norder_key = {:?}", key.display().to_string());
        let c = Config::parse(&with_key, "t").unwrap();
        let e = c.read_files().unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        std::fs::write(&key, b"short").unwrap();
        let e = c.read_files().unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
        std::fs::write(&key, [7u8; 32]).unwrap();
        c.read_files().unwrap();
        assert_eq!(read_order_key(c.order_key.as_deref().unwrap()).unwrap(), [7u8; 32]);
        // A harness's key: made once, then kept.
        let made = dir.path().join("made.key");
        ensure_order_key(&made).unwrap();
        let first = read_order_key(&made).unwrap();
        ensure_order_key(&made).unwrap();
        assert_eq!(read_order_key(&made).unwrap(), first);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&made).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/allocator.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/allocator.toml"));
    }
}
