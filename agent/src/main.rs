//! `vmscale-agent`: the thin binary over the library.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use vmscale_agent::allocator_link::LinkConfig;
use vmscale_agent::config::{host_capacity, Config};
use vmscale_agent::core::policy::Size;
use vmscale_agent::node::{NodeConfig, NodeHandles};
use vmscale_agent::vms::file::FileSource;
use vmscale_agent::vms::kube::status::{KubeStatusWriter, StatusReporter};
use vmscale_agent::vms::kube::{KubeSource, KubeSourceConfig};

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
    /// Allocator URL, e.g. http://127.0.0.1:7070 (overrides the file).
    #[arg(long)]
    allocator: Option<String>,
    /// VM list file (overrides the file).
    #[arg(long)]
    vms: Option<PathBuf>,
    /// HTTP address for /metrics, /state, /healthz (overrides the file).
    #[arg(long)]
    http_listen: Option<std::net::SocketAddr>,
    /// Log filter.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tracing_subscriber::fmt().with_env_filter(a.log.as_str()).with_writer(std::io::stderr).init();
    let mut c = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(v) = a.node {
        c.node = v;
    }
    if let Some(v) = a.allocator {
        c.allocator = v;
    }
    if let Some(v) = a.vms {
        c.vms_file = v;
    }
    if let Some(v) = a.http_listen {
        c.http_listen = v;
    }
    c.validate()?;
    let (host_cpu, host_mem) = host_capacity(&c.proc_root).map_err(anyhow::Error::msg)?;
    let capacity = Size::new(
        if c.capacity_milli_cpu > 0 { c.capacity_milli_cpu } else { host_cpu },
        if c.capacity_memory_bytes > 0 { c.capacity_memory_bytes } else { host_mem },
    );

    let cancel = CancellationToken::new();
    let (vms, reporter) = match &c.kubernetes {
        None => {
            let interval = Duration::from_millis(c.vms_file_interval_ms);
            let vms = FileSource { path: c.vms_file.clone(), interval }
                .start(cancel.clone())
                .context("cannot start the VM source")?;
            (vms, None)
        }
        Some(k) => {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            let source = KubeSource {
                config: KubeSourceConfig {
                    node_name: c.node.clone(),
                    label_key: k.label_key.clone(),
                    label_value: k.label_value.clone(),
                    namespace: k.namespace.clone(),
                },
            };
            let out = source.start(client.clone(), cancel.clone())?;
            let writer = KubeStatusWriter::new(client);
            let reporter = StatusReporter::start(writer, out.pods.clone(), k.status.clone(), cancel.clone());
            (out.vms, Some(reporter))
        }
    };
    let (session_tx, session_rx) = tokio::sync::watch::channel(None);
    let handles = NodeHandles {
        metrics: Arc::default(),
        status: Arc::default(),
        registry: Arc::default(),
        session: session_rx,
        reporter,
    };
    let http = tokio::net::TcpListener::bind(c.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", c.http_listen))?;
    tokio::spawn(vmscale_agent::http::serve(http, handles.clone(), cancel.clone()));
    let cfg = NodeConfig {
        link: LinkConfig {
            addr: c.allocator.clone(),
            node: c.node.clone(),
            capacity,
            migration_endpoint: c.migration.endpoint(),
            retry_base: Duration::from_millis(c.allocator_retry_base_ms),
            retry_max: Duration::from_millis(c.allocator_retry_max_ms),
        },
        policy: c.policy.clone(),
        qmp: vmscale_agent::qmp::ClientConfig {
            command_timeout: Duration::from_millis(c.qmp_timeout_ms),
            ..Default::default()
        },
        unplug_timeout: Duration::from_millis(c.unplug_timeout_ms),
        contention: c.contention.clone(),
        proc_root: c.proc_root.clone(),
        migration: c.migration.clone(),
    };
    tracing::info!(node = %c.node, allocator = %c.allocator, ?capacity, "agent starting");
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    vmscale_agent::node::run(cfg, vms, handles, session_tx, cancel).await;
    Ok(())
}
