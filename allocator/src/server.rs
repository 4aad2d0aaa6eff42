//! Binds the allocator to its listeners: gRPC for agents, HTTP for operators.
//! Takes bound listeners and a shutdown token, so tests and the demo can run it
//! on port 0 and stop it when they like.

use crate::config::Config;
use crate::service::Shared;
use crate::session::AllocatorService;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tracing::info;
use vmscale_proto::allocator::allocator_server::AllocatorServer;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
    #[error("HTTP server failed")]
    Http(#[source] std::io::Error),
}

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
    let shutdown = shared.shutdown.clone();
    info!(grpc = ?grpc.local_addr().ok(), http = ?http.local_addr().ok(), "allocator serving");
    let planner = tokio::spawn(plan_loop(shared.clone()));

    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/state", get(state))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared.clone());
    let http_stop = shutdown.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http, app).with_graceful_shutdown(http_stop.cancelled_owned()).await
    });

    let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
    let grpc_result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(AllocatorServer::new(AllocatorService::new(shared.clone())))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel(); // a failed gRPC server stops the rest too
    let _ = planner.await;
    let http_result = http_task.await.unwrap_or(Ok(()));
    info!("allocator stopped");
    grpc_result.map_err(ServerError::Grpc)?;
    http_result.map_err(ServerError::Http)
}

/// Plans on a timer and right after a request is denied, at most once per
/// `min_gap` so that a storm of denials costs one round, not thousands.
async fn plan_loop(sh: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(sh.config.plan_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let min_gap = Duration::from_millis(sh.config.plan_interval_ms.min(50));
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

async fn metrics(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    let text = {
        let st = sh.lock();
        sh.metrics.render(&st.cluster)
    };
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

async fn state(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    let body = {
        let st = sh.lock();
        serde_json::to_string_pretty(&st.cluster)
    };
    match body {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode state: {e}\n"))
            .into_response(),
    }
}
