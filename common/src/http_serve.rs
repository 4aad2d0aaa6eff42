//! The HTTP server loop of every daemon's HTTP listener (the allocator's
//! `/state`, `/metrics`, `/readyz` and scheduler extender, the agent's
//! `/state` and `/metrics`), with the limits `axum::serve` leaves out: it
//! sets no header-read timeout (hyper has one only with a timer) and takes
//! any number of connections. Here a client must send its request head
//! within [`HEADER_READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections
//! are served at once (the next waits in the kernel's backlog), and an
//! HTTP/2 connection runs at most [`MAX_STREAMS`] requests at a time.
//! Handlers learn who called from `ConnectInfo<P>`, as with axum's own,
//! where `P` is what the caller's `peer` function makes of the listener's
//! address (the allocator's carries the client's certificates).

use axum::extract::ConnectInfo;
use axum::serve::Listener;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How long a client may take to send a request's head (slow-loris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Requests at once on one HTTP/2 connection.
pub const MAX_STREAMS: u32 = 16;
/// How long open connections get to finish once the server stops.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown`; `peer` says who is on the
/// other end of a connection, from the listener's address type.
pub async fn serve<L, P>(listener: L, app: Router, shutdown: CancellationToken, peer: impl Fn(L::Addr) -> P)
where
    L: Listener,
    P: Clone + Send + Sync + 'static,
{
    serve_with(listener, app, shutdown, peer, HEADER_READ_TIMEOUT).await;
}

async fn serve_with<L, P>(
    mut listener: L,
    app: Router,
    shutdown: CancellationToken,
    peer: impl Fn(L::Addr) -> P,
    header_read_timeout: Duration,
) where
    L: Listener,
    P: Clone + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
        };
        let (io, addr) = tokio::select! {
            () = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let service = TowerToHyperService::new(app.clone().layer(axum::Extension(ConnectInfo(peer(addr)))));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(Some(Duration::from_secs(20)));
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!("http connection ended: {e}");
                    }
                }
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A client that sends half a request head and stops is cut off after
    /// the header-read timeout; a whole request is answered.
    #[tokio::test]
    async fn a_slow_request_head_is_cut_off() {
        let timeout = Duration::from_millis(300);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let peer = |a: std::net::SocketAddr| a;
        let server = tokio::spawn(serve_with(listener, app, stop.clone(), peer, timeout));

        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        ok.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let t0 = std::time::Instant::now();
        let mut rest = Vec::new();
        // The server closes the connection (hyper answers 408 first or not).
        let _ = slow.read_to_end(&mut rest).await;
        let waited = t0.elapsed();
        assert!(waited >= timeout && waited < timeout * 20, "{waited:?}");

        stop.cancel();
        server.await.unwrap();
    }
}
