//! The agent's configuration: a TOML file (unknown keys are errors) plus flags.

use crate::core::policy::Policy;
use procfs_core::FromRead;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name, as the allocator knows it. Default: the host name.
    pub node: String,
    /// The allocator's gRPC address: `https://HOST:PORT` with `[tls]` (its
    /// certificate must be `allocator.vmscale`, whatever HOST is), or
    /// `http://` with `insecure = true`. Default `https://127.0.0.1:7070`.
    pub allocator: String,
    /// Allow plain-text links (`http://`) without `[tls]`; logs a warning at
    /// start. For tests on one machine. Default false.
    pub insecure: bool,
    /// Where VMs come from: a TOML file of `[[vm]]` entries. Default
    /// `/etc/vmscale/vms.toml`.
    pub vms_file: PathBuf,
    /// How often the VM file is checked for changes, ms. Default 1000.
    pub vms_file_interval_ms: u64,
    /// HTTP address for `/metrics`, `/state` and `/healthz` (plain text,
    /// unauthenticated: loopback unless you mean it). Default `127.0.0.1:7072`.
    pub http_listen: SocketAddr,
    /// The node's schedulable CPU in milli-vCPU; 0 reads the host's CPU count.
    pub capacity_milli_cpu: u64,
    /// The node's schedulable memory in bytes; 0 reads MemTotal.
    pub capacity_memory_bytes: u64,
    /// Where `/proc` is (for the host's capacity). Default `/proc`.
    pub proc_root: PathBuf,
    /// First reconnect delay to the allocator, ms. Default 200.
    pub allocator_retry_base_ms: u64,
    /// Longest reconnect delay to the allocator, ms. Default 10000.
    pub allocator_retry_max_ms: u64,
    /// How long to wait for a guest to release an unplugged device, ms. Default 5000.
    pub unplug_timeout_ms: u64,
    /// Per-command QMP timeout, ms. Default 10000.
    pub qmp_timeout_ms: u64,
    /// The memory backend of the DIMMs the agent plugs: `"ram"` (default),
    /// or `"memfd"` (`memory-backend-memfd,share=on`) on nodes whose VMs
    /// have a vhost-user device, such as vhost-user-vsock where the kernel
    /// has no vhost-vsock: such a device maps all guest memory, so memory
    /// that is not shared breaks it. Harmless for other VMs.
    pub dimm_backend: crate::qmp::DimmBackend,
    /// `[tls]`: the cluster CA and this node's certificate
    /// (`<node>.node.vmscale`) and key. The allocator link, the migration
    /// service and informants on TCP use it; the files are re-read for each
    /// new connection, so a renewed certificate needs no restart.
    pub tls: Option<vmscale_common::tls::TlsFiles>,
    /// The scaling policy for VMs that don't bring their own.
    pub policy: Policy,
    /// When set, VMs come from pods on this node (Kubernetes API) instead of
    /// `vms_file`, and each pod gets its VM's sizes written back as annotations.
    pub kubernetes: Option<KubernetesConfig>,
    /// Run-queue delay of vCPU threads (host eBPF), reported to the allocator.
    pub contention: crate::node::contention::ContentionConfig,
    /// Live migration (`[migration]`): where this agent takes VMs in, and
    /// how its moves out run.
    pub migration: crate::migration::settings::MigrationSettings,
}

/// The Kubernetes VM source (see `vms::kube` for the annotation contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Label key that marks a VM pod. Default `vmscale.io/autoscale`.
    #[serde(default = "default_label_key")]
    pub label_key: String,
    /// The value that key must have. Default `true`.
    #[serde(default = "default_label_value")]
    pub label_value: String,
    /// Only pods in this namespace; default all namespaces.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Each VM pod's socket directory as the agent sees it, `{uid}` for the
    /// pod's UID: its QMP socket is there and nowhere else (`vms::kube::sockets`).
    /// Default `/pods/{uid}/volumes/kubernetes.io~empty-dir/vmscale`.
    #[serde(default = "crate::vms::kube::default_pod_socket_dir")]
    pub pod_socket_dir: String,
    /// `[kubernetes.node_certificate]`: get this node's certificate from the
    /// CertificateSigningRequest API at start (and renew it) into the files
    /// `[tls]` names (`crate::node_cert`). Default none.
    #[serde(default)]
    pub node_certificate: Option<crate::node_cert::NodeCertConfig>,
    /// Rate limit and retries of the annotation write-back.
    #[serde(default)]
    pub status: crate::vms::kube::status::StatusConfig,
}

fn default_label_key() -> String {
    vmscale_contract::keys::DEFAULT_LABEL_KEY.into()
}

fn default_label_value() -> String {
    vmscale_contract::keys::DEFAULT_LABEL_VALUE.into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            allocator: "https://127.0.0.1:7070".into(),
            tls: None,
            insecure: false,
            vms_file: PathBuf::from("/etc/vmscale/vms.toml"),
            vms_file_interval_ms: 1000,
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7072)),
            capacity_milli_cpu: 0,
            capacity_memory_bytes: 0,
            proc_root: PathBuf::from("/proc"),
            allocator_retry_base_ms: 200,
            allocator_retry_max_ms: 10_000,
            unplug_timeout_ms: 5000,
            qmp_timeout_ms: 10_000,
            dimm_backend: crate::qmp::DimmBackend::Ram,
            policy: Policy::default(),
            kubernetes: None,
            contention: crate::node::contention::ContentionConfig::default(),
            migration: crate::migration::settings::MigrationSettings::default(),
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

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Rule(s));
        if self.node.is_empty() {
            return bad("node is empty and the host name could not be read; set node = \"...\"".into());
        }
        vmscale_common::tls::check_transport(self.tls.as_ref(), self.insecure)?;
        vmscale_common::tls::check_url("allocator", &self.allocator, self.tls.as_ref(), self.insecure)?;
        if self.allocator_retry_base_ms == 0 || self.allocator_retry_max_ms < self.allocator_retry_base_ms {
            return bad("allocator_retry_base_ms must be > 0 and <= allocator_retry_max_ms".into());
        }
        if self.vms_file_interval_ms == 0 || self.unplug_timeout_ms == 0 || self.qmp_timeout_ms == 0 {
            return bad("vms_file_interval_ms, unplug_timeout_ms and qmp_timeout_ms must be > 0".into());
        }
        self.contention.validate().map_err(ConfigError::Rule)?;
        self.migration.validate().map_err(|e| ConfigError::Rule(e.to_string()))?;
        if self.kubernetes.is_some() && self.migration.listen.is_some() {
            // A VM taken in would run in the agent's own pod (its cgroup and
            // memory limit) with no pod of its own for the scheduler to see.
            return bad("migration.listen cannot be set with [kubernetes] yet: a VM moved here would run \
                        inside the agent's pod; moves between Kubernetes nodes need a target VM pod"
                .into());
        }
        if let Some(k) = &self.kubernetes {
            let sockets = crate::vms::kube::sockets::PodSockets::new(&k.pod_socket_dir);
            sockets.map_err(|e| ConfigError::Rule(format!("kubernetes: {e}")))?;
            if let Some(nc) = &k.node_certificate {
                nc.validate().map_err(|e| ConfigError::Rule(format!("kubernetes: {e}")))?;
            }
        }
        self.policy.validate().map_err(|e| ConfigError::Rule(format!("policy: {e}")))
    }
}

/// The host's CPU (milli-vCPU) and memory (bytes) from `proc_root`.
pub fn host_capacity(proc_root: &Path) -> Result<(u64, u64), String> {
    let stat = std::fs::read_to_string(proc_root.join("stat"))
        .map_err(|e| format!("cannot read {}/stat: {e}", proc_root.display()))?;
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    let meminfo = std::fs::read(proc_root.join("meminfo"))
        .map_err(|e| format!("cannot read {}/meminfo: {e}", proc_root.display()))?;
    let memory = procfs_core::Meminfo::from_read(meminfo.as_slice())
        .map_err(|e| format!("cannot parse {}/meminfo: {e}", proc_root.display()))?
        .mem_total;
    Ok((u64::try_from(cpus).unwrap_or(u64::MAX).saturating_mul(1000), memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This build machine's /proc/meminfo, MemTotal changed to 2048 kB.
    const MEMINFO: &str = include_str!("testdata/meminfo");

    #[test]
    fn parses_validates_and_names_errors() {
        // A node on plain text, for the checks that are not about TLS.
        const PLAIN: &str = "node = \"n1\"\ninsecure = true\nallocator = \"http://a:1\"\n";
        let dir = std::env::temp_dir().join(format!("vmscale-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.toml");
        std::fs::write(&p, format!("{PLAIN}[policy]\nmemory_target = 0.6\n")).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!((c.node.as_str(), c.policy.memory_target), ("n1", 0.6));
        std::fs::write(&p, "node = \"n1\"\ninsecure = true\nallocator = \"127.0.0.1:7070\"\n").unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("http://"));
        assert_eq!(c.policy.polling, None, "event-driven unless asked");
        std::fs::write(&p, format!("{PLAIN}[policy.polling]\nloop_interval_ms = 2000\n")).unwrap();
        let polling = Config::load(&p).unwrap().policy.polling.unwrap();
        assert_eq!((polling.loop_interval_ms, polling.sample_average_ms), (2000, 500));
        std::fs::write(&p, format!("{PLAIN}[policy.polling]\nloop_interval_ms = 20000\n")).unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("sample_max_age_ms"));
        std::fs::write(&p, format!("{PLAIN}[policy]\nignore_pressure = [\"psi_cpu\"]\n")).unwrap();
        let psi_cpu = crate::core::pressure::PressureKind::PsiCpu;
        assert_eq!(Config::load(&p).unwrap().policy.ignore_pressure.iter().collect::<Vec<_>>(), [psi_cpu]);
        std::fs::write(&p, format!("{PLAIN}[policy]\nignore_pressure = [\"PSI_CPU\"]\n")).unwrap();
        let e = Config::load(&p).unwrap_err();
        assert!(vmscale_common::error::chain(&e).contains("no pressure kind"), "{e:?}");
        std::fs::write(&p, format!("{PLAIN}[kubernetes]\n[migration]\nlisten = \"10.0.0.2:7073\"\n"))
            .unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("inside the agent's pod"));
        std::fs::write(&p, format!("{PLAIN}[migration]\nlisten = \"0.0.0.0:7073\"\n")).unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("migration.advertise"));
        assert_eq!(c.dimm_backend, crate::qmp::DimmBackend::Ram, "private RAM unless asked");
        std::fs::write(&p, format!("{PLAIN}dimm_backend = \"memfd\"\n")).unwrap();
        assert_eq!(Config::load(&p).unwrap().dimm_backend, crate::qmp::DimmBackend::Memfd);
        std::fs::write(&p, format!("{PLAIN}dimm_backend = \"shm\"\n")).unwrap();
        let e = vmscale_common::error::chain(&Config::load(&p).unwrap_err());
        assert!(e.contains("unknown variant") && e.contains("memfd"), "{e}");
        // The transport: [tls] with https://, or insecure with http://.
        std::fs::write(&p, "node = \"n1\"\nallocator = \"http://a:1\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("set [tls]"), "{e}");
        let tls = "[tls]\nca = \"/ca.pem\"\ncert = \"/n1.pem\"\nkey = \"/n1.key\"\n";
        std::fs::write(&p, format!("node = \"n1\"\nallocator = \"https://a:1\"\n{tls}")).unwrap();
        assert_eq!(Config::load(&p).unwrap().tls.unwrap().cert, Path::new("/n1.pem"));
        std::fs::write(&p, format!("node = \"n1\"\nallocator = \"http://a:1\"\n{tls}")).unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("plain text"));
        std::fs::write(&p, "node = \"n1\"\ninsecure = true\nallocator = \"https://a:1\"\n").unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("needs a [tls]"));
        assert!(Config::default().http_listen.ip().is_loopback(), "/state on loopback unless asked");
        std::fs::write(&p, "nod = \"n1\"\n").unwrap();
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
        std::fs::write(dir.join("stat"), "cpu  1 2 3\ncpu0 1 2\ncpu1 1 2\nintr 5\n").unwrap();
        std::fs::write(dir.join("meminfo"), MEMINFO).unwrap();
        assert_eq!(host_capacity(&dir).unwrap(), (2000, 2048 * 1024));
        assert!(host_capacity(Path::new("/nonexistent")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
