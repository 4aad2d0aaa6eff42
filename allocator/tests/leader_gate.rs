//! A standby allocator (not holding the Lease) over real TCP: `/readyz` says
//! 503 and agents' sessions are refused with UNAVAILABLE; once it leads,
//! both open up. The election itself is in kube_leader.rs.

#![allow(clippy::unwrap_used)]

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vmscale_allocator::config::Config;
use vmscale_allocator::server::{serve_with, Extras};
use vmscale_allocator::shared::Shared;
use vmscale_allocator_client::{channel, ClientError, SessionClient};
use vmscale_proto::allocator as pb;

async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn hello() -> pb::Hello {
    pb::Hello {
        versions: Some(pb::VersionRange { min: 1, max: 1 }),
        node: "n1".into(),
        capacity: Some(pb::Resources { milli_cpu: 4000, memory_bytes: 8 << 30 }),
        vms: vec![],
        agent: "test".into(),
        migration_endpoint: String::new(),
    }
}

#[tokio::test]
async fn a_standby_is_not_ready_and_refuses_agents_until_it_leads() {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let http_addr = http.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let shared = Shared::new(Config::default(), stop.clone());
    let (leader, rx) = watch::channel(false);
    let task = tokio::spawn(serve_with(shared, grpc, http, Extras { leader: Some(rx), routes: None }));

    let r = http_get(&http_addr, "/readyz").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(http_get(&http_addr, "/healthz").await.starts_with("HTTP/1.1 200"), "a standby is alive");
    let e = SessionClient::open(channel(&addr).await.unwrap(), hello()).await.unwrap_err();
    let ClientError::Refused(status) = e else { panic!("{e}") };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(status.message().contains("standby"), "{status}");

    leader.send_replace(true);
    assert!(http_get(&http_addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    let s = SessionClient::open(channel(&addr).await.unwrap(), hello()).await.unwrap();
    s.close();

    stop.cancel();
    task.await.unwrap().unwrap();
}
