//! The three PEM files of a `[tls]` section, read and checked together: the
//! CA parses as a trust root, the key belongs to the certificate, and the
//! certificate chains to the CA and is valid now. A daemon with a bad file
//! stops at start with the file named, instead of failing every handshake.

use super::{TlsError, TlsFiles};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// What the files held when last read.
#[derive(Debug)]
pub(super) struct Material {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub roots: Arc<RootCertStore>,
    pub certified: Arc<CertifiedKey>,
    pub stamp: Stamp,
}

/// Modification time and length of each file: a change to either means
/// the files were rewritten (cert-manager and the harness replace them).
pub(super) type Stamp = [Option<(SystemTime, u64)>; 3];

pub(super) fn stamp(files: &TlsFiles) -> Stamp {
    [&files.ca, &files.cert, &files.key]
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())))
}

impl Material {
    /// Reads and checks the files; `now` decides whether the certificate
    /// is valid yet and not expired.
    pub fn load(files: &TlsFiles, provider: &CryptoProvider, now: UnixTime) -> Result<Material, TlsError> {
        let stamp = stamp(files);
        let ca_pem = read("CA", &files.ca)?;
        let cert_pem = read("certificate", &files.cert)?;
        let key_pem = read("key", &files.key)?;
        let ca = certs("CA", &files.ca, &ca_pem)?;
        let chain = certs("certificate", &files.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            what: "key",
            path: files.key.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut roots = RootCertStore::empty();
        for c in &ca {
            roots
                .add(c.clone())
                .map_err(|source| TlsError::Ca { path: files.ca.display().to_string(), source })?;
        }
        check_chain(files, &ca, &chain, provider, now)?;
        let certified = CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Key {
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
            source,
        })?;
        Ok(Material {
            ca_pem,
            cert_pem,
            key_pem,
            roots: Arc::new(roots),
            certified: Arc::new(certified),
            stamp,
        })
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.display().to_string(), source })
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem { what, path: path.display().to_string(), reason };
    let certs =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("it holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The leaf (first) certificate chains to the CA through the rest of the
/// file and is valid at `now`, for a server or a client (a node's
/// certificate is both).
fn check_chain(
    files: &TlsFiles,
    ca: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    provider: &CryptoProvider,
    now: UnixTime,
) -> Result<(), TlsError> {
    let not_valid = |reason: String| TlsError::Chain {
        cert: files.cert.display().to_string(),
        ca: files.ca.display().to_string(),
        reason,
    };
    let anchors = ca
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_valid(format!("the CA is not a usable trust anchor ({e})")))?;
    let (leaf, intermediates) = chain.split_first().ok_or_else(|| not_valid("no certificate".into()))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| not_valid(format!("unparsable ({e})")))?;
    let algs = provider.signature_verification_algorithms.all;
    let verify =
        |usage| ee.verify_for_usage(algs, &anchors, intermediates, now, usage, None, None).map(|_| ());
    verify(webpki::KeyUsage::server_auth())
        .or_else(|_| verify(webpki::KeyUsage::client_auth()))
        .map_err(|e| not_valid(explain(&e)))
}

/// webpki's errors in words a person can act on.
fn explain(e: &webpki::Error) -> String {
    match e {
        webpki::Error::CertExpired { .. } => "it has expired: renew it".into(),
        webpki::Error::CertNotValidYet { .. } => "it is not valid yet: check the clock".into(),
        // Another CA of the same name shows as a bad signature.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            "it is not signed by this CA".into()
        }
        other => format!("{other:?}"),
    }
}
