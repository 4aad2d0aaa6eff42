//! The informant's configuration: a TOML file (unknown keys are an error),
//! every threshold documented here with its unit and default, and
//! command-line flags in `main.rs` that override it.

use crate::watermark;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the agent connects: `tcp:HOST:PORT` (or just `HOST:PORT`),
    /// `vsock:PORT` (any CID) or `vsock:CID:PORT`. Default `vsock:7072`.
    /// On vsock only the host (CID 2) is served; on TCP only agents with a
    /// node certificate (`[tls]`), or anyone when `insecure = true`.
    pub listen: ListenAddr,
    /// `[tls]`: the cluster CA and this informant's certificate
    /// (`informant.vmscale`), for TCP. Clients must present a node's
    /// certificate (`<node>.node.vmscale`, any node: VMs move).
    pub tls: Option<vmscale_common::tls::TlsFiles>,
    /// Serve TCP in plain text to anyone who reaches it; logs a warning at
    /// start. For test guests. Default false.
    pub insecure: bool,
    /// procfs mount point. Default `/proc`.
    pub proc_root: PathBuf,
    /// sysfs mount point (CPUs under `devices/system/cpu`, memory blocks under
    /// `devices/system/memory`). Default `/sys`.
    pub sys_root: PathBuf,
    /// The workload's cgroup v2 directory (e.g. `/sys/fs/cgroup/workload`),
    /// for `memory.events`, `memory.stat` and `memory.pressure`. Default none:
    /// the cgroup sources are off and memory in use is guest-wide.
    pub workload_cgroup: Option<PathBuf>,
    /// Who scales CPUs down. Default `hotplug`.
    pub cpu_mode: CpuMode,
    /// Period of the sampler, milliseconds. Default 1000.
    pub sample_interval_ms: u64,
    /// Use (MemTotal - MemAvailable) as a fraction of MemTotal past which one
    /// `usage_watermark` event is sent at once, before the kernel shows any
    /// pressure; 0 turns it off. Match the agent's `memory_target`.
    /// Default 0.9.
    pub watermark: f64,
    /// The shortest time between two reads of `/proc/meminfo` for the
    /// watermark, milliseconds: how often use is checked close to it.
    /// Default 10.
    pub watermark_check_ms: u64,
    /// The fastest growth of use the watermark's reads keep up with, MiB/s:
    /// far from the watermark they come only as often as use could reach it
    /// at this rate (at most every `watermark_tuning.max_interval_ms`, 250).
    /// Default 4096.
    pub watermark_max_ramp_mib_per_s: u64,
    /// How far ahead of use reaching the watermark its event goes, at the
    /// rate use grew over the last half second, milliseconds; longer when
    /// memory took longer to arrive after one of the last 8 events (up to
    /// 1 s; these figures are `watermark_tuning`'s defaults), and at most
    /// `watermark_tuning.max_lead_ms`. 0: the event goes when use reaches
    /// the watermark, nothing learned. Default 100.
    pub watermark_lead_ms: u64,
    /// The watermark's finer thresholds (`[watermark_tuning]`): the
    /// re-arm margin, the longest wait between reads, the spans the growth
    /// rate and chunks are measured over, the learned lead's bounds, the
    /// slowest arrival learned and how many are remembered. Each field,
    /// with its unit, bounds and default, is documented on
    /// `watermark::Tuning`. Default: all defaults.
    pub watermark_tuning: watermark::Tuning,
    /// How often `memory.events` is re-read when inotify is unavailable,
    /// milliseconds. Default 1000.
    pub events_poll_ms: u64,
    /// Whether to load the eBPF programs (reclaim, kswapd, OOM victim). Without
    /// BTF, CAP_BPF or tracefs the informant runs without them. Default true.
    pub ebpf: bool,
    /// Events buffered between the sources and the fan-out. Default 4096.
    pub event_queue: usize,
    /// Events buffered towards the subscribed agent; past that, events are
    /// dropped and counted, never blocking the sources. Default 1024.
    pub subscriber_queue: usize,
    /// How long NotifyUpscale waits for new CPUs and memory blocks to appear
    /// and come online before it answers, milliseconds. Default 3000.
    pub upscale_wait_ms: u64,
    pub psi: PsiConfig,
    pub downscale: DownscaleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::Vsock { cid: VSOCK_CID_ANY, port: 7072 },
            tls: None,
            insecure: false,
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            workload_cgroup: None,
            cpu_mode: CpuMode::Hotplug,
            sample_interval_ms: 1000,
            watermark: 0.9,
            watermark_check_ms: 10,
            watermark_max_ramp_mib_per_s: 4096,
            watermark_lead_ms: 100,
            watermark_tuning: watermark::Tuning::default(),
            events_poll_ms: 1000,
            ebpf: true,
            event_queue: 4096,
            subscriber_queue: 1024,
            upscale_wait_ms: 3000,
            psi: PsiConfig::default(),
            downscale: DownscaleConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuMode {
    /// The agent hot-unplugs vCPUs over QMP; the informant only onlines new ones.
    Hotplug,
    /// All vCPUs are present from boot; the informant takes CPUs offline on an
    /// approved downscale and online on an upscale (needed under TCG, where
    /// vCPU unplug corrupts QEMU).
    Sysfs,
}

/// PSI triggers. Each fires at most once per window when the stall time
/// inside the window passes its threshold.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PsiConfig {
    /// `/proc/pressure/memory`.
    pub memory: TriggerConfig,
    /// `/proc/pressure/cpu`.
    pub cpu: TriggerConfig,
    /// The workload cgroup's `memory.pressure` (needs `workload_cgroup`).
    pub cgroup_memory: TriggerConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TriggerConfig {
    /// Default true.
    pub enabled: bool,
    /// Count `full` stalls (every task stalled) rather than `some` (at least
    /// one task stalled). Default false.
    pub full: bool,
    /// Stall time inside the window that fires the trigger, microseconds.
    /// Default 50000 (50 ms).
    pub stall_us: u64,
    /// Window, microseconds, 500000 to 10000000. Without CAP_SYS_RESOURCE the
    /// kernel only accepts multiples of 2 s; the informant then widens the
    /// window to the next multiple of 2 s and scales `stall_us` with it, and
    /// says so in its log and handshake. Default 500000 (500 ms).
    pub window_us: u64,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        TriggerConfig { enabled: true, full: false, stall_us: 50_000, window_us: 500_000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownscaleConfig {
    /// Memory kept free on top of what is in use when judging whether a
    /// memory target fits, bytes. Default 268435456 (256 MiB).
    pub memory_buffer_bytes: u64,
    /// A downscale is denied when the newest sample is older than this,
    /// milliseconds. Must exceed `sample_interval_ms`. Default 5000.
    pub max_stats_age_ms: u64,
    /// A downscale is denied for this long after pressure on the resource it
    /// shrinks, milliseconds. Default 60000.
    pub pressure_cooldown_ms: u64,
}

impl Default for DownscaleConfig {
    fn default() -> Self {
        DownscaleConfig {
            memory_buffer_bytes: 256 * MIB,
            max_stats_age_ms: 5000,
            pressure_cooldown_ms: 60_000,
        }
    }
}

/// Where the gRPC server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ListenAddr {
    Tcp(SocketAddr),
    /// `cid` is `u32::MAX` (VMADDR_CID_ANY) unless given.
    Vsock {
        cid: u32,
        port: u32,
    },
}

pub const VSOCK_CID_ANY: u32 = u32::MAX;

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let tcp = |a: &str| {
            a.parse().map(ListenAddr::Tcp).map_err(|_| {
                format!("`{s}` is not a listen address; use tcp:HOST:PORT, vsock:PORT or vsock:CID:PORT")
            })
        };
        if let Some(rest) = s.strip_prefix("vsock:") {
            let num = |v: &str, what: &str| {
                v.parse::<u32>().map_err(|_| format!("`{s}`: vsock {what} `{v}` is not a number"))
            };
            return match rest.split_once(':') {
                Some((cid, port)) => {
                    Ok(ListenAddr::Vsock { cid: num(cid, "CID")?, port: num(port, "port")? })
                }
                None => Ok(ListenAddr::Vsock { cid: VSOCK_CID_ANY, port: num(rest, "port")? }),
            };
        }
        tcp(s.strip_prefix("tcp:").unwrap_or(s))
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Vsock { cid: VSOCK_CID_ANY, port } => write!(f, "vsock:{port}"),
            ListenAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
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
        let bad =
            |field, value: &dyn fmt::Display, reason: &str| Err(ConfigError::invalid(field, value, reason));
        if !(0.0..=1.0).contains(&self.watermark) {
            return bad("watermark", &self.watermark, "must be between 0 (off) and 1");
        }
        if self.watermark_max_ramp_mib_per_s == 0 || self.watermark_max_ramp_mib_per_s > 1 << 20 {
            return bad(
                "watermark_max_ramp_mib_per_s",
                &self.watermark_max_ramp_mib_per_s,
                "must be between 1 and 1048576 MiB/s",
            );
        }
        // The section's own checks, in one place; its errors name the key
        // with the section in front.
        self.watermark_tuning.validate().map_err(|e| match e {
            ConfigError::Invalid { field, value, reason } => {
                ConfigError::Invalid { field: format!("watermark_tuning.{field}"), value, reason }
            }
            other => other,
        })?;
        let max_lead_ms = self.watermark_tuning.max_lead_ms;
        if self.watermark_lead_ms > max_lead_ms {
            return bad(
                "watermark_lead_ms",
                &self.watermark_lead_ms,
                &format!("must be at most {max_lead_ms} (watermark_tuning.max_lead_ms); 0 turns it off"),
            );
        }
        if self.watermark_check_ms < 1 {
            return bad("watermark_check_ms", &self.watermark_check_ms, "must be at least 1");
        }
        if self.sample_interval_ms < 10 {
            return bad("sample_interval_ms", &self.sample_interval_ms, "must be at least 10");
        }
        if self.events_poll_ms < 10 {
            return bad("events_poll_ms", &self.events_poll_ms, "must be at least 10");
        }
        if self.event_queue == 0 {
            return bad("event_queue", &0, "must be at least 1");
        }
        if self.subscriber_queue == 0 {
            return bad("subscriber_queue", &0, "must be at least 1");
        }
        for (field, p) in [("proc_root", &self.proc_root), ("sys_root", &self.sys_root)] {
            if p.as_os_str().is_empty() {
                return bad(field, &"\"\"", "must name a directory");
            }
        }
        for (field, t) in [
            ("psi.memory", &self.psi.memory),
            ("psi.cpu", &self.psi.cpu),
            ("psi.cgroup_memory", &self.psi.cgroup_memory),
        ] {
            if !(500_000..=10_000_000).contains(&t.window_us) {
                return bad(
                    field,
                    &t.window_us,
                    "window_us must be within 500000..=10000000 (0.5 s to 10 s)",
                );
            }
            if t.stall_us == 0 || t.stall_us > t.window_us {
                return bad(field, &t.stall_us, "stall_us must be above 0 and at most window_us");
            }
        }
        let d = &self.downscale;
        if d.max_stats_age_ms <= self.sample_interval_ms {
            return bad(
                "downscale.max_stats_age_ms",
                &d.max_stats_age_ms,
                "must exceed sample_interval_ms, or every other request finds stale stats",
            );
        }
        if d.memory_buffer_bytes > 1 << 40 {
            return bad(
                "downscale.memory_buffer_bytes",
                &d.memory_buffer_bytes,
                "above 1 TiB; the unit is bytes",
            );
        }
        if matches!(self.listen, ListenAddr::Tcp(_)) {
            vmscale_common::tls::check_transport(self.tls.as_ref(), self.insecure).map_err(|_| {
                ConfigError::Rule(format!(
                    "listen = {} is TCP: set [tls] (ca, cert, key: the informant.vmscale certificate) for \
                     mutual TLS, or insecure = true for plain text; or listen on vsock",
                    self.listen
                ))
            })?;
        }
        Ok(())
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
    fn values_are_read() {
        let c = Config::parse(
            "listen = \"vsock:7072\"\nworkload_cgroup = \"/sys/fs/cgroup/pg\"\ncpu_mode = \"sysfs\"\n\
             [psi.memory]\nwindow_us = 2000000\nstall_us = 150000\n\
             [downscale]\nmemory_buffer_bytes = 1024\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.listen, ListenAddr::Vsock { cid: VSOCK_CID_ANY, port: 7072 });
        assert_eq!(c.workload_cgroup.as_deref(), Some(Path::new("/sys/fs/cgroup/pg")));
        assert_eq!(c.cpu_mode, CpuMode::Sysfs);
        assert_eq!(c.psi.memory.window_us, 2_000_000);
        assert!(c.psi.cpu.enabled);
        assert_eq!(c.downscale.memory_buffer_bytes, 1024);
        assert_eq!(c.downscale.max_stats_age_ms, 5000);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let chain = |e: ConfigError| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s += &format!(": {x}");
                src = x.source();
            }
            s
        };
        let e = Config::parse("sample_intervl_ms = 5", "t").unwrap_err();
        assert!(chain(e).contains("unknown field"));
        let e = Config::parse("[psi.cpu]\nwindow = 5", "t").unwrap_err();
        assert!(chain(e).contains("unknown field"));
        let e = Config::parse("[psi.memory]\nwindow_us = 100", "t").unwrap_err();
        assert!(e.to_string().contains("0.5 s to 10 s"), "{e}");
        let e = Config::parse("[psi.memory]\nstall_us = 600000", "t").unwrap_err();
        assert!(e.to_string().contains("at most window_us"), "{e}");
        let e = Config::parse("sample_interval_ms = 6000", "t").unwrap_err();
        assert!(e.to_string().contains("stale"), "{e}");
        let e = Config::parse("watermark_lead_ms = 5000", "t").unwrap_err();
        assert!(e.to_string().contains("at most 1000"), "{e}");
        assert_eq!(Config::parse("watermark_lead_ms = 0", "t").unwrap().watermark_lead_ms, 0);
        let e = Config::parse("listen = \"vsock:x\"", "t").unwrap_err();
        assert!(chain(e).contains("not a number"));
    }

    #[test]
    fn the_watermark_tuning_is_a_section_of_its_own() {
        let c = Config::parse("[watermark_tuning]\nmax_lead_ms = 3000\narrivals = 2\n", "t").unwrap();
        assert_eq!(c.watermark_tuning.max_lead_ms, 3000);
        assert_eq!(c.watermark_tuning.arrivals, 2);
        assert_eq!(c.watermark_tuning.rate_window_ms, watermark::Tuning::default().rate_window_ms);
        // Its bound on the configured lead follows it.
        let c = Config::parse("watermark_lead_ms = 2000\n[watermark_tuning]\nmax_lead_ms = 3000\n", "t");
        assert_eq!(c.unwrap().watermark_lead_ms, 2000);
        let e = Config::parse("watermark_lead_ms = 2000\n[watermark_tuning]\nmax_lead_ms = 1500\n", "t");
        assert!(e.unwrap_err().to_string().contains("at most 1500 (watermark_tuning.max_lead_ms)"));

        let e = Config::parse("[watermark_tuning]\nmax_lead = 3000\n", "t").unwrap_err();
        let mut chain = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            chain += &format!(": {x}");
            src = x.source();
        }
        assert!(chain.contains("unknown field") && chain.contains("max_lead"), "{chain}");
        let e = Config::parse("[watermark_tuning]\nmin_lead_ms = 900\nmax_lead_ms = 800\n", "t").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("watermark_tuning.min_lead_ms = 900") && e.contains("at most max_lead_ms"), "{e}");
    }

    #[test]
    fn listen_addresses_round_trip() {
        for s in ["tcp:127.0.0.1:7072", "vsock:7072", "vsock:3:7072", "tcp:[::1]:1"] {
            assert_eq!(s.parse::<ListenAddr>().unwrap().to_string(), s);
        }
        assert_eq!("127.0.0.1:9".parse::<ListenAddr>().unwrap().to_string(), "tcp:127.0.0.1:9");
        assert!("localhost".parse::<ListenAddr>().unwrap_err().contains("vsock:PORT"));
    }

    #[test]
    fn the_deployed_example_parses() {
        let c = Config::parse(include_str!("../../deploy/informant.toml"), "deploy/informant.toml").unwrap();
        assert_eq!(c.listen, ListenAddr::Vsock { cid: VSOCK_CID_ANY, port: 7072 });
        assert_eq!(c.downscale, DownscaleConfig::default());
        assert_eq!(c.psi.memory, TriggerConfig::default());
        // "defaults shown": the watermark's keys too.
        let d = Config::default();
        assert_eq!(
            (c.watermark, c.watermark_check_ms, c.watermark_max_ramp_mib_per_s, c.watermark_lead_ms),
            (d.watermark, d.watermark_check_ms, d.watermark_max_ramp_mib_per_s, d.watermark_lead_ms)
        );
        // The tuning's section is there commented out, with the defaults.
        let text = include_str!("../../deploy/informant.toml");
        let section: String = text
            .lines()
            .skip_while(|l| *l != "# [watermark_tuning]")
            .map_while(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(section.lines().count(), 10, "the header and every field: {section}");
        let c = Config::parse(&section, "deploy/informant.toml [watermark_tuning]").unwrap();
        assert_eq!(c.watermark_tuning, watermark::Tuning::default());
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/informant.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/informant.toml"));
    }
}
