//! A TLS listener for tonic's `serve_with_incoming`: accepts TCP, runs each
//! handshake in a task of its own (a client that stalls mid-handshake holds
//! back nobody else), and yields finished streams. tonic's own TLS would
//! fix the server's certificate at start; this one asks the
//! [`super::Tls`]'s resolver at every handshake, so a renewed certificate
//! is served without a restart, and the peer's certificates reach
//! `Request::peer_certs()` as with tonic's TLS.

use futures::Stream;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// A handshake not finished by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; connections past it are closed at once,
/// so a flood of half-open connections costs a bounded amount of memory.
pub const MAX_HANDSHAKES: usize = 256;
/// After an accept error (out of file descriptors, say), wait this long
/// before accepting again rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type Handshake = Result<TlsStream<TcpStream>, (SocketAddr, std::io::Error)>;

struct State {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Handshake>,
}

/// The TLS connections of `listener` under `config`. Failed handshakes (no
/// client certificate, another CA's, an expired one) are logged with the
/// peer's address and never end the stream; neither do accept errors.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
    let state = State { listener, acceptor: TlsAcceptor::from(config), handshakes: JoinSet::new() };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            tokio::select! {
                accepted = st.listener.accept() => match accepted {
                    Ok((tcp, peer)) => st.start(tcp, peer),
                    Err(e) => {
                        warn!("cannot accept a connection: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(done) = st.handshakes.join_next(), if !st.handshakes.is_empty() => match done {
                    Ok(Ok(stream)) => return Some((Ok(stream), st)),
                    Ok(Err((peer, e))) => warn!(%peer, "TLS handshake failed: {e}"),
                    Err(e) => warn!("a TLS handshake task failed: {e}"),
                },
            }
        }
    })
}

impl State {
    fn start(&mut self, tcp: TcpStream, peer: SocketAddr) {
        if self.handshakes.len() >= MAX_HANDSHAKES {
            warn!(%peer, "connection closed: {MAX_HANDSHAKES} TLS handshakes already under way");
            return;
        }
        // Small gRPC messages must not wait 40 ms for an ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(%peer, "cannot set TCP_NODELAY: {e}");
        }
        let acceptor = self.acceptor.clone();
        self.handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err((peer, e)),
                Err(_) => Err((
                    peer,
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                    ),
                )),
            }
        });
    }
}
