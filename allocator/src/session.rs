//! The life of one agent session: hello, version check, registration, then a
//! loop of requests until the agent leaves, a newer session replaces this one,
//! or the allocator shuts down.

use crate::convert::status_of;
use crate::core::SessionRef;
use crate::shared::Shared;
use rustls::pki_types::CertificateDer;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};
use vmscale_common::tls::{certs_identity_is, describe_peer, Identity};
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
        // Taken before the body: with [tls], the hello must come from its node.
        let peer = (sh.config.tls.is_some()).then(|| PeerCert {
            certs: req.peer_certs().map(|c| c.to_vec()).unwrap_or_default(),
            described: describe_peer(&req),
        });
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
        if let Some(peer) = &peer {
            may_register(peer, &hello.node).inspect_err(|s| warn!("hello refused: {}", s.message()))?;
        }
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
        // Free text from the agent, for the log only: cut and escaped.
        let agent = crate::core::names::cut(&hello.agent, 128).escape_debug().to_string();
        let reg =
            crate::convert::hello(hello, sh.config.limits.max_vms_per_node).map_err(|e| status_of(&e))?;
        let node = reg.node.clone();
        let vms = reg.vms.len();

        let (tx, rx) = mpsc::channel(sh.config.session_queue);
        let cancel = sh.shutdown.child_token();
        let opened = sh.open(reg, tx.clone(), cancel.clone()).map_err(|e| status_of(&e.into()))?;
        info!(%node, session = opened.session.id, vms, %agent, version, replaced = ?opened.replaced, "session opened");
        for r in &opened.refused {
            warn!(%node, vm = %r.vm, "vm of the hello refused: {}", r.error);
        }
        let welcome = pb::AllocatorMessage {
            request_id: first.request_id,
            body: Some(Reply::Welcome(pb::Welcome {
                version,
                session_id: opened.session.id,
                vms: opened.reservations.iter().map(crate::convert::reservation).collect(),
                refused: opened.refused.iter().map(crate::convert::refusal).collect(),
            })),
        };
        // The queue is new and empty: this cannot fail for lack of room.
        let _ = tx.try_send(Ok(welcome));
        let span = tracing::info_span!("session", %node, session = opened.session.id);
        let replies = Replies {
            sh: sh.clone(),
            session: opened.session,
            inbound,
            pushed: rx,
            cancelled: Box::pin(cancel.cancelled_owned()),
            ready: VecDeque::new(),
            ended: None,
            span,
        };
        Ok(Response::new(Box::pin(replies)))
    }
}

/// The client certificate of a session's connection, when the allocator
/// serves TLS.
struct PeerCert {
    certs: Vec<CertificateDer<'static>>,
    /// Its names, for the refusal.
    described: String,
}

/// Longest piece of a remote node name quoted back in a refusal or a log.
const NODE_SHOWN: usize = 64;

/// Whether the peer may register `node`: only with the certificate of
/// `<node>.node.vmscale`, exactly (no wildcard), so no agent can open a
/// session as a node of its own invention or as another node (which would
/// close that node's real session). Refused before anything changes.
fn may_register(peer: &PeerCert, node: &str) -> Result<(), Status> {
    if certs_identity_is(&peer.certs, &Identity::Node(node.to_owned())) {
        return Ok(());
    }
    let shown: String = node.chars().take(NODE_SHOWN).collect();
    Err(Status::permission_denied(format!(
        "{} may not register node {shown:?}: a node registers only as itself, with the certificate of \
         {}",
        peer.described,
        Identity::Node(shown.clone()),
    )))
}

/// Requests read and decided in one go when an agent pipelines them.
const BATCH: usize = 64;

/// The answer stream of one session, which also reads and decides the
/// session's requests. Deciding where the answers are sent, rather than in a
/// task of its own, spares every request two hand-overs between tasks; and
/// requests are read only as fast as the agent takes the answers, so a slow
/// agent holds back only itself. Answers keep the order of the requests.
struct Replies {
    sh: Arc<Shared>,
    session: SessionRef,
    inbound: Streaming<pb::AgentMessage>,
    /// The welcome and pushed migration orders.
    pushed: mpsc::Receiver<Outgoing>,
    /// Set when a newer session replaces this one or the allocator stops.
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Answers decided and not yet taken.
    ready: VecDeque<pb::AllocatorMessage>,
    /// Why the session ended, once it has.
    ended: Option<&'static str>,
    span: tracing::Span,
}

impl Replies {
    /// Reads what the agent has sent, up to a batch, and decides it.
    fn read(&mut self, cx: &mut Context<'_>) {
        while self.ready.len() < BATCH {
            match Pin::new(&mut self.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(m))) => {
                    let answer = self.sh.handle(&self.session, m);
                    self.ready.push_back(answer);
                }
                Poll::Ready(Some(Err(e))) => {
                    warn!("session stream error: {e}");
                    self.ended = Some("transport error");
                    break;
                }
                Poll::Ready(None) => {
                    self.ended = Some("agent closed the session");
                    break;
                }
                Poll::Pending => break,
            }
        }
    }
}

impl Stream for Replies {
    type Item = Outgoing;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let this = self.get_mut();
        let span = this.span.clone();
        let _entered = span.enter();
        if let Some(m) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(m)));
        }
        if this.ended.is_some() {
            return Poll::Ready(None);
        }
        if this.cancelled.as_mut().poll(cx).is_ready() {
            this.ended = Some("ended by the allocator");
            let status = if this.sh.shutdown.is_cancelled() {
                Status::unavailable("the allocator is shutting down; reconnect and register again")
            } else {
                Status::aborted(format!(
                    "a newer session registered node {:?}; this one is closed",
                    this.session.node
                ))
            };
            return Poll::Ready(Some(Err(status)));
        }
        if let Poll::Ready(Some(m)) = this.pushed.poll_recv(cx) {
            return Poll::Ready(Some(m));
        }
        this.read(cx);
        match this.ready.pop_front() {
            Some(m) => Poll::Ready(Some(Ok(m))),
            None if this.ended.is_some() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

/// The session ends when its answer stream does: finished, or dropped because
/// the agent went away. The node is handed back unless a newer session has it.
impl Drop for Replies {
    fn drop(&mut self) {
        let _entered = self.span.enter();
        let why = self.ended.unwrap_or("agent stopped reading");
        if self.sh.close(&self.session) {
            info!(why, "session closed; the node keeps its reservations until its agent registers again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmscale_common::testing::TestPki;

    fn peer_of(pki: &TestPki, who: &Identity) -> PeerCert {
        use rustls::pki_types::pem::PemObject;
        let files = pki.issue(who);
        let certs =
            CertificateDer::pem_file_iter(&files.cert).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
        PeerCert { certs, described: format!("the certificate of {who}") }
    }

    #[test]
    fn a_node_registers_only_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(dir.path());
        let a = peer_of(&pki, &Identity::Node("a".into()));
        assert!(may_register(&a, "a").is_ok());
        // (peer, hello's node): none may register.
        let b = peer_of(&pki, &Identity::Node("b".into()));
        let alloc = peer_of(&pki, &Identity::Allocator);
        let none = PeerCert { certs: Vec::new(), described: "a peer without a client certificate".into() };
        let long = "x".repeat(10_000);
        for (peer, node) in
            [(&a, "b"), (&a, "A"), (&a, ""), (&b, "a"), (&alloc, "a"), (&none, "a"), (&a, &long)]
        {
            let s = may_register(peer, node).unwrap_err();
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{node}");
            assert!(s.message().contains(&peer.described), "{}", s.message());
            assert!(s.message().len() < 400, "a long name is cut: {}", s.message().len());
        }
        let m = may_register(&b, "a").unwrap_err();
        assert!(m.message().contains("b.node.vmscale may not register node \"a\""), "{}", m.message());
        assert!(m.message().contains("a.node.vmscale"), "{}", m.message());
    }
}
