//! A minimal HTTP/1.0 client, plain or over TLS, for `/state` and the
//! extender: the audit writes its own requests (a body the length it
//! likes) and reads whatever comes back, a refusal mid-body included.

use super::tls::{https_client, Creds};
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How a request travels: plain text, or TLS presenting `creds` to a
/// server that must be `server_name`.
#[derive(Debug, Clone)]
pub enum Via {
    Plain,
    Tls { creds: Creds, server_name: String },
}

/// An answer: the status code and the body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `method path` at `addr` with `body` (sent while the answer is read, so
/// a server that refuses early is heard); fails when no HTTP answer came
/// within `wait` (a refused TLS handshake included).
pub async fn request(
    addr: SocketAddr,
    via: &Via,
    method: &str,
    path: &str,
    body: Vec<u8>,
    wait: Duration,
) -> anyhow::Result<Answer> {
    let go = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        match via {
            Via::Plain => exchange(tcp, head, body).await,
            Via::Tls { creds, server_name } => {
                let name = rustls::pki_types::ServerName::try_from(server_name.clone())?;
                let tls = tokio_rustls::TlsConnector::from(https_client(creds)?).connect(name, tcp).await?;
                exchange(tls, head, body).await
            }
        }
    };
    let raw = tokio::time::timeout(wait, go)
        .await
        .with_context(|| format!("no answer from {addr}{path} within {} s", wait.as_secs()))??;
    parse(&raw).with_context(|| format!("not an HTTP answer from {addr}{path}"))
}

async fn exchange<S>(stream: S, head: String, body: Vec<u8>) -> anyhow::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&body).await?;
        wr.flush().await
    });
    let mut out = Vec::new();
    // A server that refuses mid-body may reset the connection after its
    // answer: what was read before the reset is the answer.
    let read = rd.read_to_end(&mut out).await;
    writer.abort();
    if out.is_empty() {
        read?;
    }
    Ok(out)
}

fn parse(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Answer { status, body: raw[end + 4..].to_vec() })
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_parse_with_or_without_a_body() {
        let a = super::parse(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (413, b"big".as_slice()));
        assert_eq!(super::parse(b"HTTP/1.1 200 OK\r\n\r\n").unwrap().status, 200);
        assert!(super::parse(b"garbage").is_none());
    }
}
