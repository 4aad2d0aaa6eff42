//! `vmscale-allocator`: the thin binary over the library.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use vmscale_allocator::config::Config;

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
    /// Watermark fraction in (0, 1] (overrides the file).
    #[arg(long)]
    watermark: Option<f64>,
    /// Log filter, e.g. `info` or `vmscale_allocator=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(args.log.as_str()).with_writer(std::io::stderr).init();
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
    if let Some(w) = args.watermark {
        config.watermark = w;
    }
    config.validate()?;

    let grpc = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.listen))?;
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    vmscale_allocator::server::run(config, grpc, http, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
