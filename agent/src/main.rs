//! `vmscale-agent`: the thin binary over the library. It reads its flags and
//! config, then runs [`vmscale_agent::daemon::run`] until SIGTERM or Ctrl-C.

use clap::Parser;
use std::path::PathBuf;
use vmscale_agent::config::Config;

/// The node agent: one scaling loop per VM, a permit from the allocator before
/// any growth, vCPU and memory hotplug over QMP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file (see agent/src/config.rs for every key).
    #[arg(long, env = "VMSCALE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name (overrides the file).
    #[arg(long, env = "VMSCALE_NODE")]
    node: Option<String>,
    /// Allocator URL, e.g. https://allocator:7070 (overrides the file).
    #[arg(long)]
    allocator: Option<String>,
    /// VM list file (overrides the file).
    #[arg(long)]
    vms: Option<PathBuf>,
    /// HTTP address for /metrics, /state, /healthz (overrides the file).
    #[arg(long)]
    http_listen: Option<std::net::SocketAddr>,
    /// Allow plain-text links (http://) without [tls] (sets the file's
    /// `insecure`): for tests and benchmarks on one machine.
    #[arg(long)]
    insecure: bool,
    /// Log filter.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

impl Args {
    /// The config file (or the defaults) with the flags laid over it.
    fn config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        c.node = self.node.unwrap_or(c.node);
        c.allocator = self.allocator.unwrap_or(c.allocator);
        c.vms_file = self.vms.unwrap_or(c.vms_file);
        c.http_listen = self.http_listen.unwrap_or(c.http_listen);
        c.insecure |= self.insecure;
        Ok(c)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tracing_subscriber::fmt().with_env_filter(a.log.as_str()).with_writer(std::io::stderr).init();
    let c = a.config()?;
    // A DaemonSet rollout sends SIGTERM: the loops end before the grace
    // period runs out, instead of being killed mid-operation.
    let cancel = vmscale_common::shutdown::on_signal();
    vmscale_agent::daemon::run(c, cancel).await?;
    Ok(())
}
