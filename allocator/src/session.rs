//! The life of one agent session: hello, version check, registration, then a
//! loop of requests until the agent leaves, a newer session replaces this one,
//! or the allocator shuts down.

use crate::convert::status_of;
use crate::core::{NodeRegistration, SessionRef};
use crate::service::Shared;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn, Instrument};
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_message::Body as Reply;
use vmscale_proto::{negotiate, ALLOCATOR_PROTOCOL};

type Outgoing = Result<pb::AllocatorMessage, Status>;

/// The tonic service; cheap to clone.
#[derive(Debug, Clone)]
pub struct AllocatorService {
    shared: Arc<Shared>,
}

impl AllocatorService {
    pub fn new(shared: Arc<Shared>) -> Self {
        AllocatorService { shared }
    }
}

#[tonic::async_trait]
impl pb::allocator_server::Allocator for AllocatorService {
    type SessionStream = Pin<Box<dyn tokio_stream::Stream<Item = Outgoing> + Send + 'static>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let sh = &self.shared;
        let mut inbound = req.into_inner();
        let wait = Duration::from_millis(sh.config.hello_timeout_ms);
        let first = tokio::time::timeout(wait, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no hello within {} ms; the first message of a session must be hello",
                    wait.as_millis()
                ))
            })??
            .ok_or_else(|| Status::invalid_argument("the session closed before its hello"))?;
        let Some(Body::Hello(hello)) = first.body else {
            return Err(Status::invalid_argument("the first message of a session must be hello"));
        };
        let v = hello.versions.unwrap_or_default();
        let Some(version) = negotiate(&ALLOCATOR_PROTOCOL, v.min, v.max) else {
            return Err(Status::failed_precondition(format!(
                "no common protocol version: the agent speaks {}..={}, this allocator {}..={}; upgrade the older side",
                v.min,
                v.max,
                ALLOCATOR_PROTOCOL.start(),
                ALLOCATOR_PROTOCOL.end()
            )));
        };
        let agent = hello.agent.clone();
        let reg = NodeRegistration::try_from(hello).map_err(|e| status_of(&e))?;
        let node = reg.node.clone();
        let vms = reg.vms.len();

        let (tx, rx) = mpsc::channel(sh.config.session_queue);
        let cancel = sh.shutdown.child_token();
        let opened = sh.open(reg, tx.clone(), cancel.clone()).map_err(|e| status_of(&e.into()))?;
        info!(%node, session = opened.session.id, vms, %agent, version, replaced = ?opened.replaced, "session opened");
        let welcome = pb::AllocatorMessage {
            request_id: first.request_id,
            body: Some(Reply::Welcome(pb::Welcome {
                version,
                session_id: opened.session.id,
                vms: opened.reservations.iter().map(crate::convert::reservation).collect(),
            })),
        };
        // The queue is new and empty: this cannot fail for lack of room.
        let _ = tx.try_send(Ok(welcome));
        let span = tracing::info_span!("session", %node, session = opened.session.id);
        tokio::spawn(serve(sh.clone(), opened.session, inbound, tx, cancel).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Answers requests in order until the session ends, then hands the node back.
async fn serve(
    sh: Arc<Shared>,
    s: SessionRef,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: mpsc::Sender<Outgoing>,
    cancel: CancellationToken,
) {
    let why = loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                let status = if sh.shutdown.is_cancelled() {
                    Status::unavailable("the allocator is shutting down; reconnect and register again")
                } else {
                    Status::aborted(format!("a newer session registered node {:?}; this one is closed", s.node))
                };
                let _ = tx.send(Err(status)).await;
                break "ended by the allocator";
            }
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    let reply = sh.handle(&s, m);
                    if tx.send(Ok(reply)).await.is_err() {
                        break "agent stopped reading";
                    }
                }
                Ok(None) => break "agent closed the session",
                Err(e) => {
                    warn!("session stream error: {e}");
                    break "transport error";
                }
            }
        }
    };
    if sh.close(&s) {
        info!(why, "session closed; the node keeps its reservations until its agent registers again");
    }
}
