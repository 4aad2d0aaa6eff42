//! The informant on TCP with `[tls]`: only an agent with a node's
//! certificate of the cluster CA gets an answer; the agent's own dialer
//! (`https://` informant addresses) reaches it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use vmscale_common::testing::TestPki;
use vmscale_common::tls::{Identity, Tls, TlsFiles};
use vmscale_informant::config::Config;
use vmscale_informant::fake::FakeGuest;
use vmscale_informant::{serve, Listener};
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_client::InformantClient;

fn handshake() -> pb::HandshakeRequest {
    pb::HandshakeRequest { versions: Some(pb::VersionRange { min: 1, max: 1 }), agent: "test".into() }
}

async fn dial(addr: &str, as_who: &TlsFiles) -> Result<Channel, tonic::transport::Error> {
    let tls = Tls::load(as_who).unwrap().client_config(&Identity::Informant);
    Endpoint::from_shared(addr.to_owned())?.tls_config(tls)?.connect().await
}

#[tokio::test]
async fn only_node_certificates_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path().join("pki"));
    let guest = FakeGuest::create(dir.path());
    let config = Config { tls: Some(pki.issue(&Identity::Informant)), insecure: false, ..guest.config() };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("https://{}", l.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(config, Listener::Tcp(l), stop.clone()));

    // Any node's agent: served.
    for n in ["a", "b"] {
        let mut c = InformantClient::new(dial(&addr, &pki.issue(&Identity::Node(n.into()))).await.unwrap());
        assert_eq!(c.handshake(handshake()).await.unwrap().into_inner().version, 1);
    }
    // Another identity of the cluster: refused with a status naming it.
    let mut c = InformantClient::new(dial(&addr, &pki.issue(&Identity::Scheduler)).await.unwrap());
    let s = c.handshake(handshake()).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s}");
    assert!(s.message().contains("kube-scheduler.vmscale") && s.message().contains("node"), "{s}");
    // No certificate: no answer at all.
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(pki.dir().join("ca.pem")).unwrap());
    let anonymous = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name(Identity::Informant.dns_name());
    let r = async {
        let ch = Endpoint::from_shared(addr.clone())?.tls_config(anonymous)?.connect().await?;
        Ok::<_, Box<dyn std::error::Error>>(InformantClient::new(ch).handshake(handshake()).await?)
    };
    assert!(r.await.is_err(), "served without a client certificate");
    // Plain text to the TLS port: no answer either.
    let plain = addr.replace("https://", "http://");
    let r = async {
        let ch = Endpoint::from_shared(plain)?.connect().await?;
        Ok::<_, Box<dyn std::error::Error>>(InformantClient::new(ch).handshake(handshake()).await?)
    };
    assert!(r.await.is_err(), "served in plain text");

    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn plain_tcp_without_insecure_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let guest = FakeGuest::create(dir.path());
    let config = Config { insecure: false, ..guest.config() };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = serve(config, Listener::Tcp(l), CancellationToken::new()).await.unwrap_err();
    assert!(vmscale_informant::error_chain(&e).contains("insecure = true"), "{e}");
}
