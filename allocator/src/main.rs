//! `vmscale-allocator`: the thin binary over the library.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vmscale_allocator::capacity::VmLabel;
use vmscale_allocator::config::{Config, KubernetesConfig};
use vmscale_allocator::leader::lease::LeaseConfig;
use vmscale_allocator::leader::Timing;
use vmscale_allocator::server::Extras;
use vmscale_allocator::shared::Shared;

/// The central allocator: per-node ledgers, permits that never over-commit a
/// node, migration plans when a node passes its watermark.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file (see allocator/src/config.rs for every key).
    #[arg(long, env = "VMSCALE_ALLOCATOR_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides the file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP listen address for /metrics, /state and /healthz (overrides the file).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Serve gRPC in plain text without [tls] (sets the file's `insecure`):
    /// for tests and benchmarks on one machine.
    #[arg(long)]
    insecure: bool,
    /// Watermark fraction in (0, 1] (overrides the file).
    #[arg(long)]
    watermark: Option<f64>,
    /// This replica's identity in the leader Lease (Kubernetes mode); default: the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The Lease's namespace when the file does not set one (Kubernetes mode).
    #[arg(long, env = "POD_NAMESPACE", default_value = "vmscale-system")]
    namespace: String,
    /// Probe this allocator's HTTP listener at this path (e.g. `/readyz`) with
    /// its own certificate and exit 0 on 200, else 1: the kubelet's exec probe,
    /// since its HTTP probes have no client certificate (allocator/src/probe.rs).
    #[arg(long)]
    probe: Option<String>,
    /// Log filter, e.g. `info` or `vmscale_allocator=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(args.log.as_str()).with_writer(std::io::stderr).init();
    let config = config(&args)?;
    if let Some(path) = &args.probe {
        let status = vmscale_allocator::probe::probe(&config, path, Duration::from_secs(5)).await?;
        std::process::exit(if status == 200 { 0 } else { 1 });
    }
    if config.insecure {
        vmscale_common::tls::warn_insecure("allocator");
    }
    let grpc = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.listen))?;
    let http = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
    let shutdown = vmscale_common::shutdown::on_signal();
    match config.kubernetes.clone() {
        None => vmscale_allocator::server::run(config, grpc, http, shutdown).await?,
        Some(k) => in_kubernetes(args, config, k, (grpc, http), shutdown).await?,
    }
    Ok(())
}

/// The file's config with the flags' overrides, validated.
fn config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(a) = args.listen {
        config.listen = a;
    }
    if let Some(a) = args.http_listen {
        config.http_listen = a;
    }
    config.insecure |= args.insecure;
    if let Some(w) = args.watermark {
        config.watermark = w;
    }
    config.validate()?;
    config.read_files()?;
    Ok(config)
}

/// Kubernetes mode: serve only while holding the Lease; node capacities from
/// the cluster once leading; the scheduler extender beside `/metrics`.
async fn in_kubernetes(
    args: Args,
    config: Config,
    k: KubernetesConfig,
    (grpc, http): (TcpListener, TcpListener),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let lease = lease(args, &k)?;
    let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
    let shared = Shared::new(config, shutdown.clone());
    let election = tokio::spawn({
        let (client, stop) = (client.clone(), shutdown.clone());
        async move {
            let r = vmscale_allocator::leader::lease::run(client, lease, leader_tx, stop.clone()).await;
            stop.cancel(); // a lost lease stops the servers too
            r
        }
    });
    let label = VmLabel { key: k.autoscale_label_key.clone(), value: k.autoscale_label_value.clone() };
    let routes = vmscale_allocator::extender::http::router(shared.clone(), label.clone());
    if let Some(nc) = &k.node_certs {
        // The agents' node certificates: signed by the leader only.
        let signer =
            vmscale_allocator::node_certs::sign::Signer::load(nc).context("[kubernetes.node_certs]")?;
        let (mut leading, client, stop, user) =
            (leader_rx.clone(), client.clone(), shutdown.clone(), nc.agent_user.clone());
        tokio::spawn(async move {
            if leading.wait_for(|l| *l).await.is_ok() {
                vmscale_allocator::node_certs::watch::run(client, signer, user, stop).await;
            }
        });
    }
    if k.capacity_from_nodes {
        // Only the leader's ledger is used: watch the cluster once leading.
        let (mut leading, sh, stop) = (leader_rx.clone(), shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            if leading.wait_for(|l| *l).await.is_ok() {
                vmscale_allocator::capacity::watch::run(client, label, sh, stop).await;
            }
        });
    }
    let extras = Extras { leader: Some(leader_rx), routes: Some(routes) };
    let served = vmscale_allocator::server::serve_with(shared, grpc, http, extras).await;
    election.await.context("the leader election task panicked")??;
    served?;
    Ok(())
}

/// This replica's place in the leader election.
fn lease(args: Args, k: &KubernetesConfig) -> anyhow::Result<LeaseConfig> {
    let identity = match args.identity {
        Some(i) => i,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .context("no --identity (POD_NAME) and no host name to use instead")?,
    };
    Ok(LeaseConfig {
        namespace: k.lease_namespace.clone().unwrap_or(args.namespace),
        name: k.lease_name.clone(),
        identity,
        timing: Timing {
            lease_duration: Duration::from_millis(k.lease_duration_ms),
            renew_interval: Duration::from_millis(k.renew_interval_ms),
            renew_deadline: Duration::from_millis(k.renew_deadline_ms),
        },
    })
}
