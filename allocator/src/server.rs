//! Binds the allocator to its listeners: gRPC for agents, HTTP for operators.
//! Takes bound listeners and a shutdown token, so tests and the demo can run it
//! on port 0 and stop it when they like.
//!
//! With `[tls]` the gRPC listener speaks TLS and requires a client
//! certificate of the cluster CA (`session.rs` then binds it to the hello's
//! node), and so does the HTTP listener with `http_tls`; the certificate
//! files are polled and a renewed certificate is served without a restart
//! (`vmscale_common::tls`), so the ledger is never lost to a renewal.

use crate::config::Config;
use crate::https::{Peer, TlsListener};
use crate::session::AllocatorService;
use crate::shared::Shared;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tracing::info;
use vmscale_common::http_serve;
use vmscale_common::tls::{incoming, Tls, RELOAD_INTERVAL};
use vmscale_proto::allocator::allocator_server::AllocatorServer;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot set up TLS")]
    Tls(#[from] vmscale_common::tls::TlsError),
    #[error("gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
}

/// gRPC streams one connection may hold: an agent needs one session.
const GRPC_STREAMS_PER_CONNECTION: u32 = 4;
/// Largest gRPC message taken: a hello of `max_vms_per_node` VMs with
/// 253-byte ids is well under it.
const GRPC_MAX_MESSAGE: usize = 2 << 20;
/// Largest header block a gRPC client may send.
const GRPC_MAX_HEADERS: u32 = 16 << 10;

/// Serves until `shutdown` is cancelled, then closes every session (agents
/// are told to reconnect) and returns once both servers have stopped.
pub async fn run(
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let shared = Shared::new(config, shutdown.clone());
    serve(shared, grpc, http).await
}

/// Like [`run`], for callers that keep a handle on the shared state.
pub async fn serve(shared: Arc<Shared>, grpc: TcpListener, http: TcpListener) -> Result<(), ServerError> {
    serve_with(shared, grpc, http, Extras::default()).await
}

/// What Kubernetes mode adds to the servers.
#[derive(Debug, Default)]
pub struct Extras {
    /// True while this replica leads (`crate::leader`). Unset: always
    /// leading (one allocator). A standby answers agents with UNAVAILABLE
    /// and `/readyz` with 503, so the Service routes only to the leader.
    pub leader: Option<watch::Receiver<bool>>,
    /// More HTTP routes (the scheduler extender), served beside `/metrics`.
    pub routes: Option<axum::Router>,
}

/// Like [`serve`], with leader gating and extra routes.
pub async fn serve_with(
    shared: Arc<Shared>,
    grpc: TcpListener,
    http: TcpListener,
    extras: Extras,
) -> Result<(), ServerError> {
    let shutdown = shared.shutdown.clone();
    let tls = shared.config.tls.as_ref().map(Tls::load).transpose()?;
    if let Some(t) = &tls {
        tokio::spawn(t.clone().keep_fresh(RELOAD_INTERVAL, shutdown.clone()));
    }
    info!(grpc = ?grpc.local_addr().ok(), http = ?http.local_addr().ok(), tls = tls.is_some(), "allocator serving");
    let planner = tokio::spawn(plan_loop(shared.clone()));

    let leader = extras.leader;
    let ready = leader.clone();
    let mut app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/state", get(state))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(move || readyz(ready.clone())))
        .with_state(shared.clone());
    if let Some(routes) = extras.routes {
        app = app.merge(routes);
    }
    let http_stop = shutdown.clone();
    let http_tls = tls.as_ref().filter(|_| shared.config.http_tls).map(Tls::rustls_server);
    // Handlers learn who called from `ConnectInfo<Peer>` (https.rs); the
    // loop bounds connections and the time to send a request's head.
    let http_task = tokio::spawn(async move {
        match http_tls {
            Some(config) => http_serve::serve(TlsListener::new(http, config), app, http_stop, |p| p).await,
            None => {
                let peer = |addr| Peer { addr: Some(addr), ..Peer::default() };
                http_serve::serve(http, app, http_stop, peer).await;
            }
        }
    });

    // Streams, messages and headers bounded per connection; a session is
    // long-lived, so no per-call timeout here (the hello has its own).
    let service = InterceptedService::new(
        AllocatorServer::new(AllocatorService::new(shared.clone()))
            .max_decoding_message_size(GRPC_MAX_MESSAGE),
        gate(leader),
    );
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(GRPC_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(GRPC_STREAMS_PER_CONNECTION as usize)
        .http2_max_header_list_size(GRPC_MAX_HEADERS)
        .add_service(service);
    let stop = shutdown.clone().cancelled_owned();
    let grpc_result = match &tls {
        Some(t) => router.serve_with_incoming_shutdown(incoming(grpc, t.rustls_server()), stop).await,
        None => {
            router.serve_with_incoming_shutdown(TcpIncoming::from(grpc).with_nodelay(Some(true)), stop).await
        }
    };
    shutdown.cancel(); // a failed gRPC server stops the rest too
    let _ = planner.await;
    let _ = http_task.await;
    info!("allocator stopped");
    grpc_result.map_err(ServerError::Grpc)
}

/// Plans on a timer and right after a request is denied, at most once per
/// `plan_min_gap_ms` so that a storm of denials costs one round, not thousands.
async fn plan_loop(sh: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(sh.config.plan_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let min_gap = Duration::from_millis(sh.config.plan_interval_ms.min(sh.config.plan_min_gap_ms));
    loop {
        tokio::select! {
            () = sh.shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = sh.plan_now.notified() => {}
        }
        sh.plan_round();
        tokio::select! {
            () = sh.shutdown.cancelled() => return,
            () = tokio::time::sleep(min_gap) => {}
        }
    }
}

/// Ready while leading (always, without election).
async fn readyz(leader: Option<watch::Receiver<bool>>) -> impl IntoResponse {
    match leader {
        Some(l) if !*l.borrow() => {
            (axum::http::StatusCode::SERVICE_UNAVAILABLE, "standby: another replica holds the lease\n")
        }
        _ => (axum::http::StatusCode::OK, "ok\n"),
    }
}

/// Lets agents' calls through only while this replica leads: a standby's
/// ledger is empty, and a grant from it could over-commit a node.
fn gate(
    leader: Option<watch::Receiver<bool>>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req| match &leader {
        Some(l) if !*l.borrow() => {
            Err(tonic::Status::unavailable("this allocator is a standby; connect through the Service"))
        }
        _ => Ok(req),
    }
}

async fn metrics(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    // Encoded from a copy: the lock is held only to take it.
    let text = sh.metrics_text();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

async fn state(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    match sh.state_json() {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode state: {e}\n"))
            .into_response(),
    }
}
