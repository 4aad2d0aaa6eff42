//! The allocator with `[tls]` over real TCP: agents must present a node
//! certificate of the cluster CA, and may register only as that node; a
//! renewed server certificate is served without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vmscale_allocator::config::Config;
use vmscale_allocator::shared::Shared;
use vmscale_allocator_client::{channel_with, ClientError, SessionClient};
use vmscale_common::testing::TestPki;
use vmscale_common::tls::{Identity, Tls, TlsFiles};
use vmscale_proto::allocator as pb;

fn hello(node: &str) -> pb::Hello {
    pb::Hello {
        versions: Some(pb::VersionRange { min: 1, max: 1 }),
        node: node.into(),
        capacity: Some(pb::Resources { milli_cpu: 4000, memory_bytes: 8 << 30 }),
        agent: "test".into(),
        ..Default::default()
    }
}

struct Running {
    addr: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), vmscale_allocator::server::ServerError>>,
}

async fn start(files: TlsFiles) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("https://{}", grpc.local_addr().unwrap());
    let stop = CancellationToken::new();
    let config = Config { tls: Some(files), ..Config::default() };
    config.validate().unwrap();
    let shared = Shared::new(config, stop.clone());
    let task = tokio::spawn(vmscale_allocator::server::serve(shared.clone(), grpc, http));
    Running { addr, shared, stop, task }
}

/// A session as `who` (its certificate) registering `node`.
async fn open_as(r: &Running, files: &TlsFiles, node: &str) -> Result<SessionClient, ClientError> {
    let tls = Tls::load(files).unwrap().client_config(&Identity::Allocator);
    SessionClient::open(channel_with(&r.addr, Some(tls)).await?, hello(node)).await
}

fn node(n: &str) -> Identity {
    Identity::Node(n.into())
}

#[tokio::test]
async fn a_node_registers_as_itself_and_nobody_else_can() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let r = start(pki.issue(&Identity::Allocator)).await;
    let a = pki.issue(&node("a"));
    let b = pki.issue(&node("b"));
    let session = open_as(&r, &a, "a").await.unwrap();
    let before = r.shared.state_json().unwrap();

    // Node b's certificate cannot register a (which would close a's
    // session), nor a node of its own invention.
    for (files, name, who) in
        [(&b, "a", "b.node.vmscale"), (&b, "fake", "b.node.vmscale"), (&a, "b", "a.node.vmscale")]
    {
        let e = open_as(&r, files, name).await.unwrap_err();
        let ClientError::Refused(status) = e else { panic!("{e}") };
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
        let m = status.message();
        assert!(m.contains(who) && m.contains(&format!("node {name:?}")), "{m}");
    }
    // The allocator's own certificate is no node either.
    let own = pki.issue(&Identity::Allocator);
    let e = open_as(&r, &own, "a").await.unwrap_err();
    assert!(matches!(e, ClientError::Refused(ref s) if s.code() == tonic::Code::PermissionDenied), "{e}");

    // Nothing changed: a's session is open and the state is as it was.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(session.ended.lock().unwrap().is_none(), "a's session was ended");
    assert_eq!(r.shared.state_json().unwrap(), before);
    session.close();
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn no_certificate_or_another_cas_gets_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path().join("ours"));
    let theirs = TestPki::new(dir.path().join("theirs"));
    let r = start(pki.issue(&Identity::Allocator)).await;
    let before = r.shared.state_json().unwrap();
    let ours = pki.issue(&node("a"));
    // No client certificate: the CA is trusted, nothing is presented.
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&ours.ca).unwrap());
    let anonymous = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name(Identity::Allocator.dns_name());
    let refused = async {
        let ch = channel_with(&r.addr, Some(anonymous)).await?;
        SessionClient::open(ch, hello("a")).await
    };
    assert!(refused.await.is_err(), "a session without a client certificate");
    // Another CA's node certificate (trusting our CA, to get that far).
    let forged = TlsFiles { ca: ours.ca.clone(), ..theirs.issue(&node("a")) };
    let e = Tls::load(&forged).unwrap_err();
    assert!(e.to_string().contains("not valid under the CA"), "{e}");
    let id = tonic::transport::Identity::from_pem(
        std::fs::read(&forged.cert).unwrap(),
        std::fs::read(&forged.key).unwrap(),
    );
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&ours.ca).unwrap());
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(id)
        .domain_name(Identity::Allocator.dns_name());
    let refused = async {
        let ch = channel_with(&r.addr, Some(tls)).await?;
        SessionClient::open(ch, hello("a")).await
    };
    assert!(refused.await.is_err(), "a session with another CA's certificate");
    // Plain text to a TLS allocator is refused by the client before it is sent.
    let e = channel_with(&r.addr, None).await.unwrap_err();
    assert!(e.to_string().contains("https:// needs TLS"), "{e}");
    assert_eq!(r.shared.state_json().unwrap(), before, "nothing registered");
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

/// The server certificate is renewed in place while a session is open: new
/// connections get the new one, the open session and the ledger stay.
#[tokio::test]
async fn a_renewed_certificate_is_served_and_the_ledger_stays() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server_files = pki.issue(&Identity::Allocator);
    let r = start(server_files.clone()).await;
    let a = pki.issue(&node("a"));
    let session = open_as(&r, &a, "a").await.unwrap();
    let served = || async {
        let tls = Tls::load(&a).unwrap();
        let tcp = tokio::net::TcpStream::connect(r.addr.trim_start_matches("https://")).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(Identity::Allocator.dns_name()).unwrap();
        let s = tokio_rustls::TlsConnector::from(tls.rustls_client()).connect(name, tcp).await.unwrap();
        s.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let first = served().await;
    std::thread::sleep(Duration::from_millis(20));
    pki.issue(&Identity::Allocator);
    let deadline = tokio::time::Instant::now() + vmscale_common::tls::RELOAD_INTERVAL * 3;
    loop {
        let now = served().await;
        if now != first {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(session.ended.lock().unwrap().is_none(), "the open session survived the renewal");
    assert!(r.shared.state_json().unwrap().contains("\"a\""), "node a is still in the ledger");
    open_as(&r, &pki.issue(&node("b")), "b").await.unwrap().close();
    session.close();
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}
