//! The audit's certificates and the clients that present them: one cluster
//! CA whose leaves the honest parties and the attackers' own nodes get,
//! and a second CA, trusted by nobody, for the attacker who forges one.
//! The clients are built from the PEM files directly (tonic's and rustls's
//! own configs), not from the daemons' `Tls`, so that an attacker can
//! present what no daemon would load: no certificate, or one from the
//! other CA while trusting the real one.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use vmscale_common::testing::TestPki;
use vmscale_common::tls::{Identity, TlsFiles};

/// What a client presents and trusts.
#[derive(Debug, Clone)]
pub struct Creds {
    /// The CA it checks the server against.
    pub ca: PathBuf,
    /// Its certificate and key; none: it presents no certificate.
    pub leaf: Option<TlsFiles>,
}

/// The cluster CA and the untrusted one.
#[derive(Debug)]
pub struct Pki {
    ca: TestPki,
    other: TestPki,
}

impl Pki {
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        let ca = TestPki::try_new(&dir.join("ca")).context("making the audit's cluster CA")?;
        let other = TestPki::try_new(&dir.join("other-ca")).context("making the untrusted CA")?;
        Ok(Pki { ca, other })
    }

    /// `who`'s files from the cluster CA, for a daemon's `[tls]`.
    pub fn files(&self, who: &Identity) -> anyhow::Result<TlsFiles> {
        self.ca.try_issue(who).with_context(|| format!("issuing a certificate for {}", who.dns_name()))
    }

    /// A client holding `who`'s certificate from the cluster CA.
    pub fn creds(&self, who: &Identity) -> anyhow::Result<Creds> {
        let leaf = self.files(who)?;
        Ok(Creds { ca: leaf.ca.clone(), leaf: Some(leaf) })
    }

    /// A client with no certificate at all.
    pub fn no_certificate(&self) -> Creds {
        Creds { ca: self.ca.dir().join("ca.pem"), leaf: None }
    }

    /// A client holding a certificate for `who` from the untrusted CA (while
    /// trusting the cluster's, so the server's refusal is what it meets).
    pub fn forged(&self, who: &Identity) -> anyhow::Result<Creds> {
        let leaf = self.other.try_issue(who).context("issuing from the untrusted CA")?;
        Ok(Creds { ca: self.ca.dir().join("ca.pem"), leaf: Some(leaf) })
    }
}

/// A gRPC channel to `addr`: plain text without `creds`, else TLS checking
/// the server is `server` and presenting what `creds` holds. A refused
/// handshake may surface here or on the first call.
pub async fn channel(addr: SocketAddr, server: &Identity, creds: Option<&Creds>) -> anyhow::Result<Channel> {
    let Some(c) = creds else {
        return super::hostile::plain_channel(&format!("http://{addr}")).await;
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&c.ca)?))
        .domain_name(server.dns_name());
    if let Some(l) = &c.leaf {
        tls = tls.identity(tonic::transport::Identity::from_pem(read(&l.cert)?, read(&l.key)?));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)
        .context("the audit's TLS client config")?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to https://{addr} as {}", who(c)))
}

/// A rustls client config for HTTPS (HTTP/1.1) from `creds`.
pub fn https_client(creds: &Creds) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&creds.ca).context("reading the CA")? {
        roots.add(c.context("reading the CA")?)?;
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let mut config = match &creds.leaf {
        Some(l) => {
            let certs = CertificateDer::pem_file_iter(&l.cert)
                .context("reading a certificate")?
                .collect::<Result<Vec<_>, _>>()
                .context("reading a certificate")?;
            let key = PrivateKeyDer::from_pem_file(&l.key).context("reading a key")?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

fn who(c: &Creds) -> String {
    match &c.leaf {
        Some(l) => l.cert.file_stem().map_or_else(|| "?".into(), |s| s.to_string_lossy().into_owned()),
        None => "a client without a certificate".into(),
    }
}
