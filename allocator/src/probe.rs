//! `vmscale-allocator --probe /readyz`: the kubelet's liveness and
//! readiness probes, run as an exec probe inside the pod. The HTTP listener
//! takes only clients with a certificate of the cluster CA (`http_tls`),
//! which the kubelet's own HTTP probes cannot present; the binary can: it
//! dials its own listener on loopback with its own certificate
//! (`allocator.vmscale`, issued for client auth too) and checks the answer.
//! Only the status code is read; nothing else of the response is used.

use crate::config::Config;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vmscale_common::tls::{Identity, Tls};

/// The longest response head read, bytes: a status line is far shorter.
const MAX_HEAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe path {0:?} must start with / and hold no spaces or line breaks")]
    Path(String),
    #[error("the [tls] files are not usable")]
    Tls(#[from] vmscale_common::tls::TlsError),
    #[error("cannot reach {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer is not HTTP: {0:?}")]
    NotHttp(String),
}

/// Where the probe dials: the HTTP listener's port on loopback.
pub fn probe_addr(http_listen: SocketAddr) -> SocketAddr {
    let ip = match http_listen {
        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    };
    SocketAddr::new(ip, http_listen.port())
}

/// GETs `path` from this allocator's HTTP listener; its status code.
pub async fn probe(config: &Config, path: &str, timeout: Duration) -> Result<u16, ProbeError> {
    if !path.starts_with('/') || path.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(ProbeError::Path(path.to_owned()));
    }
    let addr = probe_addr(config.http_listen);
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ProbeError::Connect { addr, source })?;
        match (&config.tls, config.http_tls) {
            (Some(files), true) => {
                let tls = Tls::load(files)?;
                let connector = tokio_rustls::TlsConnector::from(tls.rustls_client());
                let name = rustls::pki_types::ServerName::try_from(Identity::Allocator.dns_name())
                    .map_err(|e| ProbeError::NotHttp(e.to_string()))?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|source| ProbeError::Connect { addr, source })?;
                get(stream, path).await.map_err(|source| ProbeError::Connect { addr, source })
            }
            _ => get(tcp, path).await.map_err(|source| ProbeError::Connect { addr, source }),
        }
    };
    let head = tokio::time::timeout(timeout, work).await.map_err(|_| ProbeError::Timeout(timeout))??;
    status_of(&head)
}

async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, path: &str) -> std::io::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: allocator.vmscale\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while head.len() < MAX_HEAD && !head.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The status code of a response's first line (`HTTP/1.1 200 OK`).
pub fn status_of(head: &str) -> Result<u16, ProbeError> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().and_then(|c| c.parse().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(ProbeError::NotHttp(line.chars().take(80).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_of("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n").unwrap(), 200);
        assert_eq!(status_of("HTTP/1.1 503 Service Unavailable\r\n").unwrap(), 503);
        assert!(status_of("SSH-2.0-OpenSSH\r\n").is_err());
        assert!(status_of("").is_err());
        assert_eq!(probe_addr("0.0.0.0:7071".parse().unwrap()), "127.0.0.1:7071".parse().unwrap());
        assert_eq!(probe_addr("[::]:7071".parse().unwrap()), "[::1]:7071".parse().unwrap());
    }

    #[tokio::test]
    async fn a_plain_listener_is_probed_and_bad_paths_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /readyz HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\nstandby\n").await.unwrap();
        });
        let config = Config {
            http_listen: SocketAddr::from(([0, 0, 0, 0], port)),
            insecure: true,
            ..Config::default()
        };
        assert_eq!(probe(&config, "/readyz", Duration::from_secs(5)).await.unwrap(), 503);
        assert!(matches!(probe(&config, "readyz", Duration::from_secs(1)).await, Err(ProbeError::Path(_))));
        assert!(matches!(probe(&config, "/a b", Duration::from_secs(1)).await, Err(ProbeError::Path(_))));
    }
}
