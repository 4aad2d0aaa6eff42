//! `vmscale-informant`: the thin binary over the library.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use vmscale_informant::config::{Config, CpuMode, ListenAddr};

/// The in-VM informant: streams memory and CPU pressure to the node agent,
/// approves or denies downscales, onlines new CPUs and memory.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file (see informant/src/config.rs for every key).
    #[arg(long, env = "VMSCALE_INFORMANT_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address: tcp:HOST:PORT, vsock:PORT or vsock:CID:PORT (overrides the file).
    #[arg(long)]
    listen: Option<ListenAddr>,
    /// Serve a TCP listen address in plain text to anyone (sets the file's
    /// `insecure`): for test guests only.
    #[arg(long)]
    insecure: bool,
    /// The workload's cgroup v2 directory (overrides the file).
    #[arg(long)]
    workload_cgroup: Option<PathBuf>,
    /// Who scales CPUs down: hotplug (the agent, over QMP) or sysfs (this informant).
    #[arg(long, value_parser = parse_cpu_mode)]
    cpu_mode: Option<CpuMode>,
    /// Sampler period in milliseconds (overrides the file).
    #[arg(long)]
    sample_interval_ms: Option<u64>,
    /// Least lead of the usage watermark's event ahead of the line, ms (longer when memory was
    /// slower to arrive); 0: at the line (overrides the file).
    #[arg(long)]
    watermark_lead_ms: Option<u64>,
    /// How long after pressure a downscale is denied, ms (overrides the file's
    /// `downscale.pressure_cooldown_ms`).
    #[arg(long)]
    pressure_cooldown_ms: Option<u64>,
    /// Do not load the eBPF programs.
    #[arg(long)]
    no_ebpf: bool,
    /// procfs mount point (overrides the file).
    #[arg(long)]
    proc_root: Option<PathBuf>,
    /// sysfs mount point (overrides the file).
    #[arg(long)]
    sys_root: Option<PathBuf>,
    /// Log filter, e.g. `info` or `vmscale_informant=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

fn parse_cpu_mode(s: &str) -> Result<CpuMode, String> {
    match s {
        "hotplug" => Ok(CpuMode::Hotplug),
        "sysfs" => Ok(CpuMode::Sysfs),
        _ => Err(format!("`{s}` is not a CPU mode; use hotplug or sysfs")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(args.log.as_str()).init();
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    config.insecure |= args.insecure;
    if let Some(a) = args.listen {
        config.listen = a;
    }
    if let Some(c) = args.workload_cgroup {
        config.workload_cgroup = Some(c);
    }
    if let Some(m) = args.cpu_mode {
        config.cpu_mode = m;
    }
    if let Some(ms) = args.sample_interval_ms {
        config.sample_interval_ms = ms;
    }
    if let Some(ms) = args.watermark_lead_ms {
        config.watermark_lead_ms = ms;
    }
    if let Some(ms) = args.pressure_cooldown_ms {
        config.downscale.pressure_cooldown_ms = ms;
    }
    if args.no_ebpf {
        config.ebpf = false;
    }
    if let Some(p) = args.proc_root {
        config.proc_root = p;
    }
    if let Some(p) = args.sys_root {
        config.sys_root = p;
    }
    config.validate()?;

    // One thread does it: the informant waits on the kernel almost all the
    // time, and a single thread keeps its memory small.
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start tokio")?;
    rt.block_on(async { vmscale_informant::run(config, vmscale_common::shutdown::on_signal()).await })?;
    Ok(())
}
