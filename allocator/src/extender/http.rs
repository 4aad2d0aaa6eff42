//! `POST /scheduler/filter` and `POST /scheduler/prioritize` on the
//! allocator's HTTP server (the `urlPrefix` in
//! deploy/scheduler/kube-scheduler-config.yaml ends in `/scheduler`).
//!
//! Every call is hostile until shown otherwise: over TLS (`http_tls`) only
//! kube-scheduler's certificate (`Identity::Scheduler`) is answered; a body
//! is read up to [`BODY_LIMIT`] (413 past it); at most [`MAX_CALLS`] calls
//! run at once (503 past it); and the ledger's lock is held only to copy
//! the candidates' room ([`NodeRoom`]), never while parsing or deciding.

use super::{filter, prioritize, ArgsError, ExtenderArgs, NodeRoom};
use crate::capacity::VmLabel;
use crate::https::Peer;
use crate::shared::Shared;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use vmscale_common::tls::Identity;

/// Largest request body read, bytes. With `NodeNames` a call carries the
/// pod and one name per node: 1 MiB holds a large pod and thousands of names.
pub const BODY_LIMIT: usize = 1 << 20;

/// How long a body may take to arrive: kube-scheduler sends it at once.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls served at once. kube-scheduler sends one pod's calls one after
/// another; more at once is a client that should wait its turn.
pub const MAX_CALLS: usize = 8;

#[derive(Debug, Clone)]
struct Ctx {
    shared: Arc<Shared>,
    label: VmLabel,
    calls: Arc<Semaphore>,
    /// Over TLS: only kube-scheduler's certificate is answered.
    scheduler_only: bool,
}

pub fn router(shared: Arc<Shared>, label: VmLabel) -> Router {
    let scheduler_only = shared.config.http_tls;
    let ctx = Ctx { shared, label, calls: Arc::new(Semaphore::new(MAX_CALLS)), scheduler_only };
    Router::new()
        .route("/scheduler/filter", post(on_filter))
        .route("/scheduler/prioritize", post(on_prioritize))
        .with_state(ctx)
}

/// A refused call: a status and a sentence saying what to change.
#[derive(Debug)]
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{}\n", self.1))
            .into_response()
    }
}

async fn on_filter(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match call(&ctx, &peer, &headers, body).await {
        Ok((args, names, rooms)) => {
            let out = filter(&args.pod, names, &ctx.label, |n| rooms.get(n).copied());
            tracing::debug!(pod = ?args.pod.metadata.name, placed = out.node_names.len(), failed = out.failed_nodes.len(), "extender filter");
            Json(out).into_response()
        }
        Err(r) => r.into_response(),
    }
}

async fn on_prioritize(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match call(&ctx, &peer, &headers, body).await {
        Ok((args, names, rooms)) => {
            Json(prioritize(&args.pod, names, &ctx.label, |n| rooms.get(n).copied())).into_response()
        }
        Err(r) => r.into_response(),
    }
}

type Call = (ExtenderArgs, Vec<String>, HashMap<String, NodeRoom>);

/// Everything a call needs before deciding: the caller checked, the body
/// read and parsed, the candidates' room copied from the ledger.
async fn call(ctx: &Ctx, peer: &Peer, headers: &HeaderMap, body: Body) -> Result<Call, Refused> {
    if ctx.scheduler_only && !peer.is(&Identity::Scheduler) {
        return Err(Refused(
            StatusCode::FORBIDDEN,
            format!(
                "the scheduler extender answers kube-scheduler only: present the certificate of {}",
                Identity::Scheduler.dns_name()
            ),
        ));
    }
    let _permit = ctx.calls.try_acquire().map_err(|_| {
        Refused(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("more than {MAX_CALLS} extender calls at once; retry when one has finished"),
        )
    })?;
    // A body announced as too large is refused before a byte of it is read.
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(too_large());
    }
    let bytes = read(body).await?;
    let args: ExtenderArgs = serde_json::from_slice(&bytes).map_err(|e| {
        let status = if e.is_data() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::BAD_REQUEST };
        Refused(status, format!("not an ExtenderArgs object: {e}"))
    })?;
    let names = args
        .candidates()
        .map_err(|e @ ArgsError::WholeNodes| Refused(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let rooms = {
        let st = ctx.shared.lock();
        names.iter().filter_map(|n| st.cluster.node(n).map(|l| (n.clone(), NodeRoom::of(l)))).collect()
    };
    Ok((args, names, rooms))
}

fn too_large() -> Refused {
    Refused(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body over {BODY_LIMIT} bytes; the extender takes NodeNames only (nodeCacheCapable: true)"),
    )
}

/// The body, up to [`BODY_LIMIT`] bytes, within [`BODY_TIMEOUT`].
async fn read(body: Body) -> Result<Vec<u8>, Refused> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    let all = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Refused(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))
            })?;
            if out.len().saturating_add(chunk.len()) > BODY_LIMIT {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(BODY_TIMEOUT, all).await {
        Ok(Ok(())) => Ok(out),
        Ok(Err(r)) => Err(r),
        Err(_) => Err(Refused(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_is_read_up_to_its_limit() {
        assert_eq!(read(Body::from(vec![b'x'; BODY_LIMIT])).await.unwrap().len(), BODY_LIMIT);
        // Sent in pieces with no length announced, as a chunked body is.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..=BODY_LIMIT / 4096).map(|_| Ok(vec![0; 4096])).collect();
        let r = read(Body::from_stream(futures::stream::iter(chunks))).await.unwrap_err();
        assert_eq!(r.0, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(r.1.contains("nodeCacheCapable"), "{}", r.1);
    }
}
