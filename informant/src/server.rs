//! Binds the listener (TCP or vsock), starts the sources and the fan-out, and
//! serves gRPC until the shutdown token fires. Takes a bound listener so
//! tests run on port 0. On vsock only the host's connections are served
//! (`peer.rs`); on TCP only agents with a node's certificate (mutual TLS,
//! `[tls]`), or anyone when the config says `insecure = true`.

use crate::config::{Config, ConfigError, ListenAddr};
use crate::hub::Hub;
use crate::peer;
use crate::service::InformantService;
use crate::source_set::start_sources;
use futures::Stream;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};
use vmscale_common::tls::{describe_peer, peer_identities, Identity, Tls, RELOAD_INTERVAL};
use vmscale_proto::informant::informant_server::InformantServer;

/// Calls served at once on one connection (the agent makes one or two).
const MAX_CALLS_PER_CONNECTION: usize = 8;
/// HTTP/2 streams a peer may open on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Request headers, bytes (gRPC's are a few hundred).
const MAX_HEADER_BYTES: u32 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up TLS")]
    Tls(#[from] vmscale_common::tls::TlsError),
    #[error("gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
}

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Vsock(VsockListener),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, RunError> {
        let bind_err = |source| RunError::Bind { addr: addr.to_string(), source };
        match *addr {
            ListenAddr::Tcp(a) => TcpListener::bind(a).await.map(Listener::Tcp).map_err(bind_err),
            ListenAddr::Vsock { cid, port } => {
                VsockListener::bind(VsockAddr::new(cid, port)).map(Listener::Vsock).map_err(bind_err)
            }
        }
    }

    /// Where it is bound, as `tcp:...` or `vsock:CID:PORT`.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => {
                l.local_addr().map_or_else(|e| format!("tcp:? ({e})"), |a| format!("tcp:{a}"))
            }
            Listener::Vsock(l) => l
                .local_addr()
                .map_or_else(|e| format!("vsock:? ({e})"), |a| format!("vsock:{}:{}", a.cid(), a.port())),
        }
    }
}

/// Validates the config, binds its listener and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    config.validate()?;
    let listener = Listener::bind(&config.listen).await?;
    serve(config, listener, shutdown).await
}

/// Serves on `listener` until `shutdown`; sources that cannot start are
/// reported, never fatal. Returns once every task has stopped.
pub async fn serve(config: Config, listener: Listener, shutdown: CancellationToken) -> Result<(), RunError> {
    config.validate()?;
    let tls = match &listener {
        Listener::Tcp(_) => tcp_tls(&config, &shutdown)?,
        Listener::Vsock(_) => None,
    };
    let inner = shutdown.child_token();
    let (sources, statuses) = start_sources(&config);
    let hub = Hub::new(config.subscriber_queue);
    let (tx, rx) = mpsc::channel(config.event_queue);
    let mut tasks = vec![tokio::spawn(hub.clone().run(rx, inner.clone()))];
    tasks.extend(sources.into_iter().map(|s| s.spawn(tx.clone(), inner.clone())));
    drop(tx);

    let up: Vec<&str> = statuses.iter().filter(|s| s.available).map(|s| s.name.as_str()).collect();
    info!(listen = %listener.local_addr(), sources = ?up, "informant serving");
    let service = InformantServer::with_interceptor(
        InformantService::new(&config, hub.clone(), statuses, shutdown.clone()),
        only_agents(tls.is_some()),
    );
    // One agent calls at a time, a few calls at once: bound what a peer may
    // open (its messages are bounded by tonic's 4 MiB default).
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_BYTES))
        .add_service(service);
    let stop = shutdown.clone().cancelled_owned();
    let result = match (listener, tls) {
        (Listener::Tcp(l), Some(tls)) => {
            router
                .serve_with_incoming_shutdown(vmscale_common::tls::incoming(l, tls.rustls_server()), stop)
                .await
        }
        (Listener::Tcp(l), None) => {
            router.serve_with_incoming_shutdown(TcpIncoming::from(l).with_nodelay(Some(true)), stop).await
        }
        (Listener::Vsock(l), _) => router.serve_with_incoming_shutdown(host_connections(l), stop).await,
    };
    inner.cancel();
    for t in tasks {
        let _ = t.await;
    }
    info!(delivered = hub.delivered_total(), dropped = hub.dropped_total(), "informant stopped");
    result.map_err(RunError::Grpc)
}

/// TLS for a TCP listener: the `[tls]` files (polled for renewal until
/// `shutdown`), or none when the config says `insecure`, or an error: a TCP
/// listener is never served in plain text by accident, whatever the config
/// names as its listen address.
fn tcp_tls(config: &Config, shutdown: &CancellationToken) -> Result<Option<Tls>, RunError> {
    match (&config.tls, config.insecure) {
        (Some(files), _) => {
            let tls = Tls::load(files)?;
            tokio::spawn(tls.clone().keep_fresh(RELOAD_INTERVAL, shutdown.clone()));
            Ok(Some(tls))
        }
        (None, true) => {
            vmscale_common::tls::warn_insecure("informant");
            Ok(None)
        }
        (None, false) => Err(RunError::Config(ConfigError::Rule(
            "a TCP listener needs [tls] (mutual TLS) or insecure = true (plain text)".into(),
        ))),
    }
}

/// With TLS, lets through only callers whose certificate names a node (any
/// node: a VM moves between nodes, and each node's agent dials it).
fn only_agents(
    tls: bool,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req| {
        if !tls || is_agent(&peer_identities(&req)) {
            return Ok(req);
        }
        Err(tonic::Status::permission_denied(format!(
            "{} may not call the informant: only an agent may, with its node's certificate \
             (<node>.node.vmscale)",
            describe_peer(&req)
        )))
    }
}

/// Whether a certificate's identities include a node's.
fn is_agent(ids: &[Identity]) -> bool {
    ids.iter().any(|i| matches!(i, Identity::Node(_)))
}

/// The listener's connections from the host; any other peer's is closed at
/// once (dropped before a byte is read) with a warning naming its CID.
/// Accept errors pass on to tonic, which logs them and goes on accepting.
fn host_connections(l: VsockListener) -> impl Stream<Item = std::io::Result<VsockStream>> {
    futures::stream::unfold(l, |l| async move {
        loop {
            match l.accept().await {
                Ok((stream, from)) => match peer::host_only(from.cid()) {
                    Ok(()) => {
                        // One per agent (re)connection: rare, and it shows
                        // which CID the transport gives the host.
                        info!(cid = from.cid(), port = from.port(), "vsock connection from the host");
                        return Some((Ok(stream), l));
                    }
                    Err(e) => {
                        warn!(cid = from.cid(), port = from.port(), "{e}");
                        drop(stream);
                    }
                },
                Err(e) => return Some((Err(e), l)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_node_identities_are_agents() {
        let node = Identity::Node("a".into());
        let table: [(&[Identity], bool); 5] = [
            (&[], false),
            (&[Identity::Allocator], false),
            (&[Identity::Informant], false),
            (&[Identity::Scheduler, node.clone()], true),
            (std::slice::from_ref(&node), true),
        ];
        for (ids, ok) in table {
            assert_eq!(is_agent(ids), ok, "{ids:?}");
        }
    }

    #[test]
    fn plain_tcp_needs_insecure() {
        let c = Config { listen: ListenAddr::Tcp(([127, 0, 0, 1], 0).into()), ..Config::default() };
        let e = vmscale_common::error::chain(&tcp_tls(&c, &CancellationToken::new()).unwrap_err());
        assert!(e.contains("insecure = true"), "{e}");
        let c = Config { insecure: true, ..c };
        assert!(tcp_tls(&c, &CancellationToken::new()).unwrap().is_none());
        // A config that says vsock but a TCP listener: still refused.
        let c = Config::default();
        assert!(tcp_tls(&c, &CancellationToken::new()).is_err());
    }
}
