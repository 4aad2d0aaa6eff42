//! The agent's operator endpoints: `/metrics`, `/state` (JSON), `/healthz`.

use crate::node::NodeHandles;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vmscale_common::sync::lock;

pub async fn serve(
    listener: TcpListener,
    handles: NodeHandles,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/state", get(state))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(handles);
    // A request head within 10 s, at most 256 connections (vmscale_common::http_serve).
    vmscale_common::http_serve::serve(listener, app, cancel, |addr| addr).await;
    Ok(())
}

async fn metrics(State(h): State<NodeHandles>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        h.metrics.render(),
    )
}

async fn state(State(h): State<NodeHandles>) -> impl IntoResponse {
    let vms = lock(&h.status).clone();
    let body = serde_json::json!({
        "allocator_connected": h.session.borrow().is_some(),
        "vms": vms,
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string())
}
