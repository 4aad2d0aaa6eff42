//! A small session client: opens a session, pipelines requests (matched to
//! answers by request id), and hands pushed migration orders to the caller.
//! The agent's reconnecting client builds on it; tests and benchmarks use it
//! as is.
//!
//! A crate of its own so that the agent links the client only, not the
//! allocator's server, leader election and scheduler extender.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{ClientTlsConfig, Endpoint};
use vmscale_common::sync::lock;
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_client::AllocatorClient;
use vmscale_proto::allocator::allocator_message::Body as Reply;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the allocator at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot load this node's TLS files")]
    Tls(#[source] vmscale_common::tls::TlsError),
    #[error("allocator address {addr}: {reason}")]
    Scheme { addr: String, reason: &'static str },
    #[error("the allocator refused the session: {0}")]
    Refused(tonic::Status),
    #[error("the session ended: {0}")]
    Ended(String),
    #[error("the allocator refused the request ({code:?}): {message}")]
    Request { code: tonic::Code, message: String },
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    #[error("the allocator did not answer within {} ms; the request is given up", .0.as_millis())]
    Timeout(Duration),
}

/// How long a request (and a session's welcome) waits for its answer: a
/// stalled allocator must not stall the agent's loops, which retry with
/// backoff. The allocator decides a request in microseconds.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Pushed messages (migration orders) queued for the caller; when it does
/// not take them, the session stops reading (the allocator's own queue
/// towards this session is bounded and its orders time out).
pub const PUSHED_QUEUE: usize = 256;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, ClientError>>>>>;

#[derive(Debug)]
pub struct SessionClient {
    tx: mpsc::Sender<pb::AgentMessage>,
    pending: Pending,
    next_id: AtomicU64,
    pub welcome: pb::Welcome,
    /// Messages the allocator pushes (migration orders), at most
    /// [`PUSHED_QUEUE`] waiting.
    pub pushed: mpsc::Receiver<pb::AllocatorMessage>,
    /// See [`CALL_TIMEOUT`]; [`SessionClient::with_call_timeout`] changes it.
    call_timeout: Duration,
    /// Set when the stream ended, with the allocator's status.
    pub ended: Arc<Mutex<Option<tonic::Status>>>,
}

/// Opens a plain-text gRPC channel (`http://` only) with the settings
/// sessions want (no Nagle delay).
pub async fn channel(addr: &str) -> Result<tonic::transport::Channel, ClientError> {
    channel_with(addr, None).await
}

/// Opens a gRPC channel: TLS with `tls` (`https://` only; the config names
/// the server identity it checks), plain text without (`http://` only).
/// A mismatch is refused before anything is sent, so an `https://` address
/// never quietly goes out in plain text.
pub async fn channel_with(
    addr: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<tonic::transport::Channel, ClientError> {
    let scheme = |reason| Err(ClientError::Scheme { addr: addr.chars().take(80).collect(), reason });
    match (&tls, addr.starts_with("https://"), addr.starts_with("http://")) {
        (Some(_), true, _) | (None, _, true) => {}
        (Some(_), false, _) => return scheme("TLS is configured: write https://"),
        (None, true, _) => {
            return scheme("https:// needs TLS ([tls]); without it write http:// and set insecure")
        }
        (None, false, false) => return scheme("must be an http:// or https:// URL"),
    }
    let err = |source| ClientError::Connect { addr: addr.to_owned(), source };
    let mut ep = Endpoint::from_shared(addr.to_owned())
        .map_err(err)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).map_err(err)?;
    }
    ep.connect().await.map_err(err)
}

impl SessionClient {
    pub async fn open(channel: tonic::transport::Channel, hello: pb::Hello) -> Result<Self, ClientError> {
        let (tx, rx) = mpsc::channel(1024);
        let _ = tx
            .send(pb::AgentMessage { request_id: 0, node: String::new(), body: Some(Body::Hello(hello)) })
            .await;
        let mut client = AllocatorClient::new(channel);
        let mut inbound =
            client.session(ReceiverStream::new(rx)).await.map_err(ClientError::Refused)?.into_inner();
        let welcome = match tokio::time::timeout(CALL_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(ClientError::Timeout(CALL_TIMEOUT)),
            Ok(Ok(Some(pb::AllocatorMessage { body: Some(Reply::Welcome(w)), .. }))) => w,
            Ok(Ok(other)) => return Err(ClientError::Unexpected(format!("{other:?} instead of welcome"))),
            Ok(Err(status)) => return Err(ClientError::Refused(status)),
        };
        let pending: Pending = Arc::default();
        let ended: Arc<Mutex<Option<tonic::Status>>> = Arc::default();
        let (push_tx, pushed) = mpsc::channel(PUSHED_QUEUE);
        let (p, e) = (pending.clone(), ended.clone());
        tokio::spawn(async move {
            let status = loop {
                match inbound.message().await {
                    Ok(Some(m)) if m.request_id == 0 => {
                        let _ = push_tx.send(m).await;
                    }
                    Ok(Some(m)) => {
                        let waiter = lock(&p).remove(&m.request_id);
                        if let (Some(w), Some(body)) = (waiter, m.body) {
                            let _ = w.send(Ok(body));
                        }
                    }
                    Ok(None) => break tonic::Status::ok("stream ended"),
                    Err(s) => break s,
                }
            };
            let msg = format!("{:?}: {}", status.code(), status.message());
            *lock(&e) = Some(status);
            for (_, w) in lock(&p).drain() {
                let _ = w.send(Err(ClientError::Ended(msg.clone())));
            }
        });
        let call_timeout = CALL_TIMEOUT;
        Ok(SessionClient { tx, pending, next_id: AtomicU64::new(1), welcome, pushed, call_timeout, ended })
    }

    /// Sets how long each request waits for its answer.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sends one request and waits for its answer; a `RequestError` answer
    /// becomes [`ClientError::Request`].
    pub async fn call(&self, body: Body) -> Result<Reply, ClientError> {
        self.call_as(String::new(), body).await
    }

    /// Like [`call`](Self::call) with the optional `node` field set.
    pub async fn call_as(&self, node: String, body: Body) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (w, r) = oneshot::channel();
        lock(&self.pending).insert(id, w);
        let exchange = async {
            if self.tx.send(pb::AgentMessage { request_id: id, node, body: Some(body) }).await.is_err() {
                return Err(ClientError::Ended("request stream closed".into()));
            }
            match r.await {
                Ok(Ok(Reply::Error(e))) => {
                    Err(ClientError::Request { code: tonic::Code::from(e.code), message: e.message })
                }
                Ok(other) => other,
                Err(_) => Err(ClientError::Ended("the session ended before answering".into())),
            }
        };
        let answer = tokio::time::timeout(self.call_timeout, exchange)
            .await
            .unwrap_or(Err(ClientError::Timeout(self.call_timeout)));
        if answer.is_err() {
            // Answered or not, nobody waits for this id any more.
            lock(&self.pending).remove(&id);
        }
        answer
    }

    pub async fn reserve(
        &self,
        vm: &str,
        milli_cpu: u64,
        memory_bytes: u64,
    ) -> Result<pb::Permit, ClientError> {
        let body = Body::Reserve(pb::Reserve {
            vm_id: vm.to_owned(),
            target: Some(pb::Resources { milli_cpu, memory_bytes }),
        });
        match self.call(body).await? {
            Reply::Permit(p) => Ok(p),
            other => Err(ClientError::Unexpected(format!("{other:?} instead of a permit"))),
        }
    }

    pub async fn release(&self, vm: &str, milli_cpu: u64, memory_bytes: u64) -> Result<(), ClientError> {
        let body = Body::Release(pb::Release {
            vm_id: vm.to_owned(),
            new_size: Some(pb::Resources { milli_cpu, memory_bytes }),
        });
        self.call(body).await.map(|_| ())
    }

    /// Ends the session from the agent's side.
    pub fn close(self) {
        drop(self.tx);
    }
}
