//! The HTTP listener (`/state`, `/metrics`, the extender) over TLS with
//! required client certificates, for axum: an [`axum::serve::Listener`]
//! over `vmscale_common::tls::incoming` (handshakes run beside each other,
//! and a renewed certificate is served without a restart).
//!
//! Every request's connection is known as a [`Peer`]
//! (`axum::extract::ConnectInfo<Peer>`), on plain text too (no
//! certificates then), so a handler can ask who called: the extender
//! requires `Identity::Scheduler`, the rest only a certificate of the CA,
//! which the handshake has already required.

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use futures::{Stream, StreamExt};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use vmscale_common::tls::{certs_identity_is, Identity};

/// Who is on the other end of a request's connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The client's chain, leaf first, checked against the CA by the
    /// handshake; empty on plain text.
    pub certs: Arc<Vec<CertificateDer<'static>>>,
}

impl Peer {
    /// Whether the client's certificate names exactly `who`.
    pub fn is(&self, who: &Identity) -> bool {
        certs_identity_is(&self.certs, who)
    }
}

type Connections = Pin<Box<dyn Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send>>;

/// A TCP listener whose connections are TLS streams.
pub struct TlsListener {
    local: Option<SocketAddr>,
    connections: Connections,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener").field("local", &self.local).finish_non_exhaustive()
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> TlsListener {
        let local = listener.local_addr().ok();
        TlsListener { local, connections: Box::pin(vmscale_common::tls::incoming(listener, config)) }
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Peer) {
        loop {
            match self.connections.next().await {
                Some(Ok(s)) => {
                    let (tcp, session) = s.get_ref();
                    let certs = session.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()));
                    let peer = Peer {
                        addr: tcp.peer_addr().ok(),
                        certs: Arc::new(certs.into_iter().flatten().collect()),
                    };
                    return (s, peer);
                }
                // `incoming` logs its errors and never ends while the
                // listener lives; should it end, accept nothing more.
                Some(Err(_)) => {}
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer { addr: self.local, certs: Arc::default() })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Peer {
        Peer { addr: Some(*stream.remote_addr()), certs: Arc::default() }
    }
}
