//! Dials a VM's informant at its [`InformantAddr`]: TCP (with TCP_NODELAY:
//! without it small gRPC messages wait 40 ms for an ACK; `https://` with
//! mutual TLS, `http://` only when the agent is `insecure`), AF_VSOCK, or the
//! host socket of a vhost-user vsock backend (vhost-device-vsock's
//! `uds-path`), where the first line names the guest's port. The latter two
//! go through tonic's `connect_with_connector` with a service that returns
//! the connected stream.
//!
//! The backend's socket speaks the hybrid vsock handshake (as Firecracker's
//! and vhost-device-vsock's do): the host writes `CONNECT <port>\n`, the
//! backend answers `OK <n>\n` once the guest accepted, and from then on the
//! bytes are the guest port's. Nothing here trusts the answer: one line of
//! at most [`MAX_REPLY`] bytes, read byte by byte (a byte past the newline
//! is already the guest's), within [`HANDSHAKE_TIMEOUT`].

use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_vsock::{VsockAddr, VsockStream};
use tonic::transport::{Channel, Endpoint, Uri};
use vmscale_common::tls::{Identity, Tls, TlsFiles};

pub use vmscale_contract::informant_addr::{InformantAddr, InformantAddrError};

/// Longest reply line accepted: `OK 4294967295\n` is 14 bytes.
pub const MAX_REPLY: usize = 32;
/// How long the backend may take to connect and answer: the guest's
/// kernel accepts within milliseconds when something listens, so this is
/// only the bound on a backend or guest that hangs.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// tonic's connect timeout, around the connector's own.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a vhost-user vsock backend's socket gave no stream.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("cannot connect to the vsock backend's socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the vsock backend's socket failed during the handshake")]
    Io(#[source] std::io::Error),
    #[error(
        "the vsock backend closed the connection without an answer: nothing listens on vsock port \
         {port} in the guest (informant not up yet?), or the backend refused `CONNECT {port}`"
    )]
    Refused { port: u32 },
    #[error("the vsock backend sent no answer line within {ms} ms")]
    Timeout { ms: u128 },
    #[error("the vsock backend's answer is longer than {MAX_REPLY} bytes without a newline")]
    TooLong,
    #[error("the vsock backend answered {line:?}, not `OK <port>`")]
    Garbage { line: String },
}

/// Why the informant could not be dialed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("bad informant address {addr}")]
    Address {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "informant address {addr} is plain text: write https:// (the informant with [tls]) or set \
         insecure = true in the agent's config"
    )]
    Plain { addr: String },
    #[error("informant address {addr} asks for TLS: the agent needs a [tls] section")]
    NoTls { addr: String },
    #[error("cannot load the agent's TLS files for {addr}")]
    Tls {
        addr: String,
        #[source]
        source: vmscale_common::tls::TlsError,
    },
    #[error("cannot connect to the informant at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// How the agent may reach informants over TCP: with its `[tls]` files
/// (re-read at every connection, so a renewed certificate is used from the
/// next one on), and plain text only if `insecure`. vsock needs neither:
/// there the informant serves only the host.
#[derive(Debug, Clone, Default)]
pub struct TcpSecurity {
    pub tls: Option<TlsFiles>,
    pub insecure: bool,
}

/// An HTTP/2 channel to the informant at `addr`, connected now.
pub async fn channel(addr: &InformantAddr, security: &TcpSecurity) -> Result<Channel, DialError> {
    let connect_err = |source| DialError::Connect { addr: addr.to_string(), source };
    let address_err = |source| DialError::Address { addr: addr.to_string(), source };
    match addr {
        InformantAddr::Http { .. } => {
            if !security.insecure {
                return Err(DialError::Plain { addr: addr.to_string() });
            }
            let ep = Endpoint::from_shared(addr.to_string()).map_err(address_err)?;
            tuned(ep.tcp_nodelay(true)).connect().await.map_err(connect_err)
        }
        InformantAddr::Https { .. } => {
            let files = security.tls.as_ref().ok_or_else(|| DialError::NoTls { addr: addr.to_string() })?;
            let tls = Tls::load(files).map_err(|source| DialError::Tls { addr: addr.to_string(), source })?;
            let ep = Endpoint::from_shared(addr.to_string())
                .map_err(address_err)?
                .tls_config(tls.client_config(&Identity::Informant))
                .map_err(address_err)?;
            tuned(ep.tcp_nodelay(true)).connect().await.map_err(connect_err)
        }
        InformantAddr::Vsock { cid, port } => {
            let to = VsockAddr::new(*cid, *port);
            let connector = tower::service_fn(move |_: Uri| async move {
                let s = tokio::time::timeout(CONNECT_TIMEOUT, VsockStream::connect(to)).await.map_err(
                    |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "vsock connect timed out"),
                )??;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            });
            tuned(local_endpoint()).connect_with_connector(connector).await.map_err(connect_err)
        }
        InformantAddr::VsockUnix { path, port } => {
            let (path, port) = (path.clone(), *port);
            let connector = tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { through_backend(&path, port, HANDSHAKE_TIMEOUT).await.map(TokioIo::new) }
            });
            tuned(local_endpoint()).connect_with_connector(connector).await.map_err(connect_err)
        }
    }
}

/// The URI only names the HTTP/2 authority: the connector decides where the
/// bytes go.
fn local_endpoint() -> Endpoint {
    Endpoint::from_static("http://informant.vsock")
}

/// Timeouts and keep-alives every informant link has: a guest that hangs
/// (or a backend that holds the socket open for a dead guest) is noticed.
fn tuned(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
}

/// Connects to a vhost-user vsock backend's host socket and asks for the
/// guest's `port`: the stream, ready for the guest's bytes.
pub async fn through_backend(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    let mut s = tokio::time::timeout(timeout, UnixStream::connect(path))
        .await
        .map_err(|_| HandshakeError::Timeout { ms: timeout.as_millis() })?
        .map_err(|source| HandshakeError::Socket { path: path.to_owned(), source })?;
    handshake(&mut s, port, timeout).await?;
    Ok(s)
}

/// The hybrid vsock handshake on a connected stream: `CONNECT port`, then
/// the `OK <n>` line (its number returned). Bounded in bytes and time.
pub async fn handshake<S>(s: &mut S, port: u32, timeout: Duration) -> Result<u32, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        s.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(HandshakeError::Io)?;
        s.flush().await.map_err(HandshakeError::Io)?;
        let mut line = Vec::with_capacity(MAX_REPLY);
        loop {
            let mut b = [0u8; 1];
            // One byte at a time: what follows the newline is the guest's.
            if s.read(&mut b).await.map_err(HandshakeError::Io)? == 0 {
                return Err(HandshakeError::Refused { port });
            }
            if b[0] == b'\n' {
                return parse_reply(&line);
            }
            if line.len() == MAX_REPLY {
                return Err(HandshakeError::TooLong);
            }
            line.push(b[0]);
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout { ms: timeout.as_millis() })?
}

/// `OK <n>` (the backend's port number for this connection).
fn parse_reply(line: &[u8]) -> Result<u32, HandshakeError> {
    let text = String::from_utf8_lossy(line);
    let garbage = || HandshakeError::Garbage { line: text.chars().filter(|c| !c.is_control()).collect() };
    let n = text.strip_prefix("OK ").ok_or_else(garbage)?;
    n.trim_end_matches('\r').parse::<u32>().map_err(|_| garbage())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A backend that reads the request line, answers `reply` (or closes
    /// when `None`), then echoes: the test sees what the handshake left.
    async fn backend(dir: &Path, reply: Option<&'static [u8]>) -> (PathBuf, tokio::task::JoinHandle<String>) {
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
                req.push(b[0]);
            }
            let Some(reply) = reply else { return String::from_utf8(req).unwrap() };
            s.write_all(reply).await.unwrap();
            if !reply.contains(&b'\n') {
                return String::from_utf8(req).unwrap();
            }
            let mut rest = [0u8; 5];
            if s.read_exact(&mut rest).await.is_ok() {
                s.write_all(&rest).await.unwrap();
            }
            String::from_utf8(req).unwrap()
        });
        (path, task)
    }

    const T: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn ok_then_the_stream_is_the_guests() {
        let dir = tempfile::tempdir().unwrap();
        // The guest's first bytes arrive with the OK line: they must stay in the stream.
        let (path, task) = backend(dir.path(), Some(b"OK 1073741824\nhello")).await;
        let mut s = through_backend(&path, 7072, T).await.unwrap();
        let mut first = [0u8; 5];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hello");
        s.write_all(b"world").await.unwrap();
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"world");
        assert_eq!(task.await.unwrap(), "CONNECT 7072");
    }

    #[tokio::test]
    async fn refusal_garbage_and_long_lines_are_errors() {
        let cases: [(Option<&'static [u8]>, &str); 5] = [
            (None, "nothing listens on vsock port 7072 in the guest"),
            (Some(b"FAILURE\n"), "answered \"FAILURE\", not `OK <port>`"),
            (Some(b"OK port\n"), "answered \"OK port\""),
            (Some(b"OK 1234567890123456789012345678901234567890\n"), "longer than 32 bytes"),
            // Half a line, then closed.
            (Some(b"OK 1"), "closed the connection without an answer"),
        ];
        for (reply, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (path, task) = backend(dir.path(), reply).await;
            let e = through_backend(&path, 7072, T).await.unwrap_err();
            assert!(e.to_string().contains(want), "{reply:?}: {e} should say {want}");
            task.abort();
        }
    }

    #[tokio::test]
    async fn silence_times_out_and_a_missing_socket_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        // Accepts (the kernel does) but never answers.
        let _l = UnixListener::bind(&path).unwrap();
        let e = through_backend(&path, 1, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(e, HandshakeError::Timeout { ms: 100 }), "{e}");
        let e = through_backend(&dir.path().join("none"), 1, T).await.unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
        assert!(matches!(e, HandshakeError::Socket { .. }), "{e}");
    }

    /// Through tonic: a failed dial names the address, and its cause the
    /// backend's refusal or the missing transport (this host has no
    /// vhost-vsock, so AF_VSOCK to a guest cannot connect).
    #[tokio::test]
    async fn failed_dials_name_the_address_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _task) = backend(dir.path(), None).await;
        let addr = InformantAddr::VsockUnix { path, port: 7072 };
        let e = vmscale_common::error::chain(&channel(&addr, &TcpSecurity::default()).await.unwrap_err());
        assert!(e.contains(&format!("cannot connect to the informant at {addr}")), "{e}");
        assert!(e.contains("nothing listens on vsock port 7072"), "{e}");
        let addr = InformantAddr::Vsock { cid: 1_000_000, port: 7072 };
        let e = vmscale_common::error::chain(&channel(&addr, &TcpSecurity::default()).await.unwrap_err());
        assert!(e.contains("cannot connect to the informant at vsock://1000000:7072"), "{e}");
    }

    /// TCP: plain text only when insecure, TLS only with files; refused
    /// before any connection is tried.
    #[tokio::test]
    async fn tcp_needs_tls_or_insecure() {
        let plain: InformantAddr = "http://127.0.0.1:1".parse().unwrap();
        let e = channel(&plain, &TcpSecurity::default()).await.unwrap_err();
        assert!(matches!(e, DialError::Plain { .. }), "{e}");
        assert!(e.to_string().contains("insecure = true"), "{e}");
        let secure: InformantAddr = "https://127.0.0.1:1".parse().unwrap();
        let e = channel(&secure, &TcpSecurity { tls: None, insecure: true }).await.unwrap_err();
        assert!(matches!(e, DialError::NoTls { .. }), "{e}");
        let files = TlsFiles { ca: "/nonexistent/ca.pem".into(), cert: "/c".into(), key: "/k".into() };
        let e = channel(&secure, &TcpSecurity { tls: Some(files), insecure: false }).await.unwrap_err();
        assert!(vmscale_common::error::chain(&e).contains("/nonexistent/ca.pem"), "{e}");
    }

    /// `https://`: mutual TLS end to end through tonic, the server checked
    /// as `informant.vmscale`. The server here serves no gRPC service, so
    /// a call that gets UNIMPLEMENTED went through TLS and HTTP/2.
    #[tokio::test]
    async fn https_dials_with_the_nodes_certificate_and_checks_the_informant() {
        use vmscale_common::testing::TestPki;
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(dir.path());
        let serve = |files: TlsFiles| async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr: InformantAddr = format!("https://{}", l.local_addr().unwrap()).parse().unwrap();
            let tls = Tls::load(&files).unwrap();
            let incoming = vmscale_common::tls::incoming(l, tls.rustls_server());
            let server = tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(incoming);
            (addr, tokio::spawn(server))
        };
        let node = TcpSecurity { tls: Some(pki.issue(&Identity::Node("a".into()))), insecure: false };
        let (addr, task) = serve(pki.issue(&Identity::Informant)).await;
        let ch = channel(&addr, &node).await.unwrap();
        let mut c = vmscale_proto::informant::informant_client::InformantClient::new(ch);
        let s = c.handshake(vmscale_proto::informant::HandshakeRequest::default()).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unimplemented, "{s}");
        task.abort();
        // A server with another identity's certificate is not the informant.
        let (addr, task) = serve(pki.issue(&Identity::Allocator)).await;
        let e = vmscale_common::error::chain(&channel(&addr, &node).await.unwrap_err());
        assert!(e.contains("NotValidForName") || e.contains("not valid for"), "{e}");
        task.abort();
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"OK 7072").unwrap(), 7072);
        assert_eq!(parse_reply(b"OK 5\r").unwrap(), 5);
        for bad in [&b"ok 1"[..], b"OK", b"OK -1", b"OK 1 2", b"\x1b[2J"] {
            assert!(matches!(parse_reply(bad), Err(HandshakeError::Garbage { .. })), "{bad:?}");
        }
    }
}
