//! `POST /scheduler/filter` and `POST /scheduler/prioritize` on the
//! allocator's HTTP server (the `urlPrefix` in
//! deploy/scheduler/kube-scheduler-config.yaml ends in `/scheduler`).
//! Each call reads the ledger once under its lock.

use super::{filter, prioritize, ExtenderArgs, ExtenderFilterResult, HostPriority};
use crate::capacity::VmLabel;
use crate::shared::Shared;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use std::sync::Arc;

/// With `nodeCacheCapable: false` every call carries whole Node objects
/// (tens of KiB each): room for a few thousand nodes.
const BODY_LIMIT: usize = 64 << 20;

#[derive(Debug, Clone)]
struct Ctx {
    shared: Arc<Shared>,
    label: VmLabel,
}

pub fn router(shared: Arc<Shared>, label: VmLabel) -> Router {
    Router::new()
        .route("/scheduler/filter", post(on_filter))
        .route("/scheduler/prioritize", post(on_prioritize))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(Ctx { shared, label })
}

async fn on_filter(State(ctx): State<Ctx>, Json(args): Json<ExtenderArgs>) -> Json<ExtenderFilterResult> {
    let st = ctx.shared.lock();
    let out = filter(&args, &ctx.label, |n| st.cluster.node(n));
    drop(st);
    let placed = out.node_names.as_ref().map_or(0, Vec::len);
    tracing::debug!(pod = ?args.pod.metadata.name, placed, failed = out.failed_nodes.len(), "extender filter");
    Json(out)
}

async fn on_prioritize(State(ctx): State<Ctx>, Json(args): Json<ExtenderArgs>) -> Json<Vec<HostPriority>> {
    let st = ctx.shared.lock();
    let out = prioritize(&args, &ctx.label, |n| st.cluster.node(n));
    Json(out)
}
