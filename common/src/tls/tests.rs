//! Handshakes over loopback between configs made from a test CA.

use super::*;
use crate::testing::TestPki;
use rustls::pki_types::ServerName;
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn node(n: &str) -> Identity {
    Identity::Node(n.into())
}

/// What each side saw of one connection: the server the client's
/// certificates (or its error), the client whether one byte went through
/// and came back.
struct Seen {
    server: Result<Vec<CertificateDer<'static>>, String>,
    client: Result<(), String>,
}

async fn connect(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    name: &Identity,
) -> Seen {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await.map_err(|e| e.to_string())?;
        let certs = s.get_ref().1.peer_certificates().map(<[_]>::to_vec).unwrap_or_default();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        s.write_all(&b).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(certs)
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let sn = ServerName::try_from(name.dns_name()).map_err(|e| e.to_string())?;
        let mut s =
            tokio_rustls::TlsConnector::from(client).connect(sn, tcp).await.map_err(|e| e.to_string())?;
        s.write_all(b"x").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    }
    .await;
    // A client refused during its own handshake leaves the server waiting
    // for nothing: a failed client closes the socket, so the server ends too.
    let server = srv.await.unwrap();
    Seen { server, client }
}

/// A rustls client that presents no certificate.
fn anonymous_client(ca: &TlsFiles) -> Arc<rustls::ClientConfig> {
    let tls = Tls::load(ca).unwrap();
    let roots = read(&tls.current).roots.clone();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A rustls client presenting `files` as they are, unchecked (for
/// certificates `Tls::load` would refuse).
fn raw_client(trust: &TlsFiles, files: &TlsFiles) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let roots = read(&Tls::load(trust).unwrap().current).roots.clone();
    let chain = CertificateDer::pem_file_iter(&files.cert).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

#[tokio::test]
async fn a_good_pair_connects_and_the_server_knows_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server = Tls::load(&pki.issue(&Identity::Allocator)).unwrap();
    let client = Tls::load(&pki.issue(&node("a"))).unwrap();
    let seen = connect(server.rustls_server(), client.rustls_client(), &Identity::Allocator).await;
    assert_eq!(seen.client, Ok(()));
    let certs = seen.server.unwrap();
    assert!(certs_identity_is(&certs, &node("a")));
    assert!(!certs_identity_is(&certs, &node("b")), "a node certificate for a is not b's");
    assert!(!certs_identity_is(&certs, &Identity::Allocator));
    assert_eq!(leaf_names(&certs), ["a.node.vmscale"]);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let server = Tls::load(&pki.issue(&Identity::Allocator)).unwrap();
    let seen =
        connect(server.rustls_server(), anonymous_client(&pki.issue(&node("a"))), &Identity::Allocator).await;
    let e = seen.server.unwrap_err();
    assert!(e.contains("peer sent no certificates"), "{e}");
    assert!(seen.client.is_err());
}

#[tokio::test]
async fn another_cas_certificates_are_refused_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path().join("ours"));
    let theirs = TestPki::new(dir.path().join("theirs"));
    let server = Tls::load(&pki.issue(&Identity::Allocator)).unwrap();
    let stranger = Tls::load(&theirs.issue(&node("a"))).unwrap();
    // Their client towards our server: their CA does not know our server,
    // and we would not know them.
    let seen = connect(server.rustls_server(), stranger.rustls_client(), &Identity::Allocator).await;
    assert!(seen.client.is_err() && seen.server.is_err());
    // Their certificate presented to our server by a client that trusts us.
    let ours = pki.issue(&node("b"));
    let forged = raw_client(&ours, &theirs.issue(&node("c")));
    let seen = connect(server.rustls_server(), forged, &Identity::Allocator).await;
    let e = seen.server.unwrap_err();
    // Both test CAs have the same name: the signature gives the stranger away.
    assert!(e.contains("UnknownIssuer") || e.contains("BadSignature"), "{e}");
}

#[tokio::test]
async fn the_client_checks_the_servers_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    // A node's certificate cannot pass for the allocator.
    let impostor = Tls::load(&pki.issue(&node("x"))).unwrap();
    let client = Tls::load(&pki.issue(&node("a"))).unwrap();
    let seen = connect(impostor.rustls_server(), client.rustls_client(), &Identity::Allocator).await;
    let e = seen.client.unwrap_err();
    assert!(e.contains("NotValidForName") || e.contains("not valid for"), "{e}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_at_load_and_in_a_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let expired = pki.issue_names("old", &[node("a").dns_name()], now - 10 * day, now - day).unwrap();
    let e = crate::error::chain(&Tls::load(&expired).unwrap_err());
    assert!(e.contains("old.pem") && e.contains("expired"), "{e}");
    let server = Tls::load(&pki.issue(&Identity::Allocator)).unwrap();
    let seen =
        connect(server.rustls_server(), raw_client(&pki.issue(&node("b")), &expired), &Identity::Allocator)
            .await;
    let e = seen.server.unwrap_err();
    assert!(e.to_lowercase().contains("expired"), "{e}");
}

#[tokio::test]
async fn a_wildcard_names_no_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let wild = pki.issue_names("wild", &["*.node.vmscale".into()], now - day, now + day).unwrap();
    let server = Tls::load(&pki.issue(&Identity::Allocator)).unwrap();
    let seen =
        connect(server.rustls_server(), Tls::load(&wild).unwrap().rustls_client(), &Identity::Allocator)
            .await;
    let certs = seen.server.unwrap();
    assert!(!certs_identity_is(&certs, &node("a")));
    assert_eq!(leaf_names(&certs), ["*.node.vmscale"]);
    assert_eq!(Identity::from_dns_name("*.node.vmscale"), None);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let files = pki.issue(&Identity::Allocator);
    let server = Tls::load(&files).unwrap();
    let client = Tls::load(&pki.issue(&node("a"))).unwrap();
    let first = read(&server.current).certified.cert.clone();
    assert!(!server.reload_if_changed().unwrap(), "nothing changed yet");
    // Renewed in place (a new key and serial, the same name).
    std::thread::sleep(Duration::from_millis(20));
    pki.issue(&Identity::Allocator);
    assert!(server.reload_if_changed().unwrap());
    let second = read(&server.current).certified.cert.clone();
    assert_ne!(first, second);
    let seen = connect(server.rustls_server(), client.rustls_client(), &Identity::Allocator).await;
    assert_eq!(seen.client, Ok(()));
    // A broken rewrite keeps the previous set and says why.
    std::fs::write(&files.key, "not a key").unwrap();
    let e = server.reload_if_changed().unwrap_err();
    assert!(e.to_string().contains(&files.key.display().to_string()), "{e}");
    assert_eq!(read(&server.current).certified.cert, second);
    let seen = connect(server.rustls_server(), client.rustls_client(), &Identity::Allocator).await;
    assert_eq!(seen.client, Ok(()));
}

#[test]
fn bad_files_are_named_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path().join("ours"));
    let theirs = TestPki::new(dir.path().join("theirs"));
    let good = pki.issue(&node("a"));
    let other = pki.issue(&node("b"));
    let missing = TlsFiles { cert: dir.path().join("none.pem"), ..good.clone() };
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let cases: Vec<(TlsFiles, &str)> = vec![
        (missing, "cannot read the certificate file"),
        (TlsFiles { ca: garbage.clone(), ..good.clone() }, "the CA file"),
        (TlsFiles { cert: garbage.clone(), ..good.clone() }, "holds no CERTIFICATE"),
        (TlsFiles { key: garbage, ..good.clone() }, "the key file"),
        (TlsFiles { key: other.key, ..good.clone() }, "does not belong to the certificate"),
        (TlsFiles { ca: theirs.issue(&node("a")).ca, ..good.clone() }, "not signed by this CA"),
    ];
    for (files, want) in cases {
        let e = crate::error::chain(&Tls::load(&files).unwrap_err());
        assert!(e.contains(want), "{files:?}: {e} should say {want}");
    }
    assert!(Tls::load(&good).is_ok());
}

#[test]
fn transport_choice_and_schemes() {
    let files = TlsFiles { ca: "ca".into(), cert: "c".into(), key: "k".into() };
    let e = check_transport(None, false).unwrap_err().to_string();
    assert!(e.contains("set [tls]") && e.contains("insecure = true"), "{e}");
    assert!(check_transport(Some(&files), false).is_ok());
    assert!(check_transport(None, true).is_ok());
    // (url, tls, insecure, ok)
    let table = [
        ("https://a:1", true, false, true),
        ("https://a:1", false, true, false),
        ("http://a:1", false, true, true),
        ("http://a:1", true, false, false),
        ("http://a:1", true, true, true),
        ("a:1", true, true, false),
    ];
    for (url, tls, insecure, ok) in table {
        let r = check_url("allocator", url, tls.then_some(&files), insecure);
        assert_eq!(r.is_ok(), ok, "{url} tls={tls} insecure={insecure}: {r:?}");
    }
    let e = check_url("allocator", "https://a:1", None, true).unwrap_err().to_string();
    assert!(e.contains("allocator") && e.contains("[tls]"), "{e}");
}

#[tokio::test]
async fn a_reopened_ca_issues_leaves_under_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestPki::new(dir.path());
    let server = Tls::load(&first.issue(&Identity::Allocator)).unwrap();
    drop(first);
    let again = TestPki::open(dir.path()).unwrap();
    let client = Tls::load(&again.issue(&node("late"))).unwrap();
    let seen = connect(server.rustls_server(), client.rustls_client(), &Identity::Allocator).await;
    assert_eq!(seen.client, Ok(()));
    assert!(certs_identity_is(&seen.server.unwrap(), &node("late")));
}
