//! The attacker's side of the allocator protocol: a raw session whose every
//! message the audit writes itself (the real client would refuse to send
//! most of them), and the wire values attacks are built from.

use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_client::AllocatorClient;
use vmscale_proto::allocator::allocator_message::Body as Reply;

/// How long the audit waits for any one answer.
pub const ANSWER: Duration = Duration::from_secs(20);

pub fn res(milli_cpu: u64, memory_bytes: u64) -> Option<pb::Resources> {
    Some(pb::Resources { milli_cpu, memory_bytes })
}

/// A VM registration of `cpu` mCPU and `mem` bytes, in units of 250 mCPU +
/// 128 MiB, bounded by 1 and 8 of them.
pub fn vm(id: &str, cpu: u64, mem: u64) -> pb::VmRegistration {
    let mib = super::lab::MIB;
    pb::VmRegistration {
        vm_id: id.into(),
        current: res(cpu, mem),
        last_permit: None,
        bounds: Some(pb::Bounds { min: res(250, 128 * mib), max: res(2000, 1024 * mib) }),
        compute_unit: res(250, 128 * mib),
        migration: None,
    }
}

pub fn hello(node: &str, capacity: (u64, u64), vms: Vec<pb::VmRegistration>, endpoint: &str) -> pb::Hello {
    pb::Hello {
        versions: Some(pb::VersionRange { min: 1, max: 1 }),
        node: node.into(),
        capacity: res(capacity.0, capacity.1),
        vms,
        agent: "vmscale audit (hostile)".into(),
        migration_endpoint: endpoint.into(),
    }
}

/// A session the attacker holds open.
#[derive(Debug)]
pub struct Session {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: tonic::Streaming<pb::AllocatorMessage>,
    pub welcome: pb::Welcome,
}

/// How an allocator answered a hello.
pub type Opened = Result<Session, tonic::Status>;

/// Opens a session on `channel` with `hello`; the allocator's refusal is
/// the `Err` (a transport failure is one too, as UNAVAILABLE or UNKNOWN).
pub async fn open(channel: Channel, hello: pb::Hello) -> Opened {
    let (tx, rx) = mpsc::channel(16);
    let first = pb::AgentMessage { request_id: 1, node: String::new(), body: Some(Body::Hello(hello)) };
    tx.send(first).await.map_err(|_| tonic::Status::internal("audit: the hello queue closed"))?;
    let mut client = AllocatorClient::new(channel).max_encoding_message_size(usize::MAX);
    let call = async {
        let mut rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
        match rx.message().await? {
            Some(pb::AllocatorMessage { body: Some(Reply::Welcome(welcome)), .. }) => {
                Ok(Session { tx, rx, welcome })
            }
            Some(other) => Err(tonic::Status::unknown(format!("audit: not a welcome: {other:?}"))),
            None => Err(tonic::Status::unknown("audit: the session ended without a welcome")),
        }
    };
    tokio::time::timeout(ANSWER, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("audit: no welcome within 20 s")))
}

/// Connects to the allocator at `addr` as `creds` (plain text without) and
/// opens a session with `hello`; a connection or handshake refused is the
/// allocator's refusal too, as UNAVAILABLE.
pub async fn connect_open(
    addr: std::net::SocketAddr,
    creds: Option<&super::tls::Creds>,
    hello: pb::Hello,
) -> Opened {
    let server = vmscale_common::tls::Identity::Allocator;
    match super::tls::channel(addr, &server, creds).await {
        Ok(ch) => open(ch, hello).await,
        Err(e) => Err(tonic::Status::unavailable(format!("connection refused: {e:#}"))),
    }
}

impl Session {
    /// Sends `body` and waits for its answer (pushed orders on the way are
    /// kept in `pushed`).
    pub async fn call(
        &mut self,
        id: u64,
        body: Body,
        pushed: &mut Vec<pb::MigrationOrder>,
    ) -> Result<Reply, tonic::Status> {
        let m = pb::AgentMessage { request_id: id, node: String::new(), body: Some(body) };
        self.tx.send(m).await.map_err(|_| tonic::Status::unavailable("audit: the session is closed"))?;
        let wait = async {
            loop {
                match self.rx.message().await? {
                    Some(pb::AllocatorMessage { body: Some(Reply::MigrationOrder(o)), .. }) => pushed.push(o),
                    Some(pb::AllocatorMessage { request_id, body: Some(b) }) if request_id == id => {
                        return Ok(b)
                    }
                    Some(_) => {}
                    None => return Err(tonic::Status::unavailable("audit: the session ended")),
                }
            }
        };
        tokio::time::timeout(ANSWER, wait)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("audit: no answer")))
    }

    /// The next migration order pushed to this session, within `wait`.
    pub async fn next_order(&mut self, wait: Duration) -> Option<pb::MigrationOrder> {
        let read = async {
            loop {
                match self.rx.message().await {
                    Ok(Some(pb::AllocatorMessage { body: Some(Reply::MigrationOrder(o)), .. })) => {
                        return Some(o)
                    }
                    Ok(Some(_)) => {}
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(wait, read).await.ok().flatten()
    }
}

/// `status` in a few words for an attack's line, with its causes (a
/// refused TLS handshake shows only there: "transport error" alone says
/// nothing).
pub fn status_words(s: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !out.contains(&c_text) {
            out.push_str(": ");
            out.push_str(&c_text);
        }
        cause = c.source();
    }
    out
}

/// A plain-text channel to `url` (the daemons' links before TLS, and the
/// attack that tries plain text on a TLS port).
pub async fn plain_channel(url: &str) -> anyhow::Result<Channel> {
    use anyhow::Context;
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad url {url}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// A TCP connection to `addr` (a TLS port of `who`) that never starts its
/// handshake: a slow client holding one of the server's handshake slots.
/// Refused when the server closes it by itself within the handshake
/// timeout (`vmscale_common::tls::HANDSHAKE_TIMEOUT`) and a margin.
pub async fn stalled(name: &str, who: &str, addr: std::net::SocketAddr) -> super::report::Attack {
    use super::report::Attack;
    use tokio::io::AsyncReadExt;
    let limit = vmscale_common::tls::HANDSHAKE_TIMEOUT + Duration::from_secs(5);
    let r = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let t0 = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(limit, s.read(&mut buf)).await;
        anyhow::Ok((closed, t0.elapsed()))
    };
    match r.await {
        Ok((Ok(Ok(0) | Err(_)), took)) => {
            Attack::judge(name, true, format!("closed by {who} after {:.1} s", took.as_secs_f64()), None)
        }
        Ok((Ok(Ok(n)), _)) => Attack::judge(name, false, format!("{who} sent {n} bytes unasked"), None),
        Ok((Err(_), _)) => {
            Attack::judge(name, false, format!("still open after {} s", limit.as_secs()), None)
        }
        Err(e) => Attack::could_not_run(name, &e),
    }
}
