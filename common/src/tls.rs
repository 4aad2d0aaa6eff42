//! Mutual TLS for every vmscale link: one cluster CA, identities as DNS
//! names in the certificates ([`Identity`]), rustls with ring.
//!
//! A daemon's config has `[tls]` ([`TlsFiles`]: PEM files `ca`, `cert`,
//! `key`) and `insecure` (default false); [`check_transport`] refuses a
//! config with neither, and [`check_url`] ties `https://` to `[tls]` and
//! `http://` to `insecure`. [`Tls::load`] reads and checks the files once;
//! from it come tonic's configs ([`Tls::server_config`],
//! [`Tls::client_config`]) and rustls's ([`Tls::rustls_server`],
//! [`Tls::rustls_client`]); servers learn who called with
//! [`peer_identity_is`].
//!
//! Servers always require a client certificate signed by the CA; clients
//! always present theirs and check the server's name.
//!
//! **Rotation**: a daemon runs [`Tls::keep_fresh`], which looks at the
//! files' modification times every few seconds and re-reads them when they
//! change (a renewed set that fails its checks is logged and the old one
//! kept). The certificate and key are then served by every later handshake
//! of [`Tls::rustls_server`] (hence [`incoming`]) and presented by every
//! later connection of [`Tls::rustls_client`]; tonic's configs
//! ([`Tls::server_config`], [`Tls::client_config`]) take the files as they
//! are when called, so a client that makes one per connection picks them
//! up too, and a tonic server built with one keeps its certificate until
//! restarted. Connections already open keep the certificate they started
//! with. The CA itself is read once: a new CA needs a restart.

mod identity;
mod incoming;
mod material;
pub mod names;

pub use identity::{node_name_ok, Identity, DOMAIN};
pub use incoming::{incoming, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES};

use crate::config::ConfigError;
use material::Material;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `[tls]`: the cluster CA and this daemon's certificate and key, PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate(s): the only roots trusted.
    pub ca: PathBuf,
    /// This daemon's certificate, leaf first, then any intermediates.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why TLS could not be set up; each names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} file {path}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} file {path} is not usable PEM: {reason}")]
    Pem { what: &'static str, path: String, reason: String },
    #[error("the CA file {path} holds a certificate that cannot be a trust root")]
    Ca {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate {cert} is not valid under the CA {ca}: {reason}")]
    Chain { cert: String, ca: String, reason: String },
    #[error("the key {key} does not belong to the certificate {cert}, or is not a key this build can use")]
    Key {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The loaded material and the configs built on it; cheap to clone (all
/// clones see the same reloads).
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    current: Arc<RwLock<Material>>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

/// ring, and nothing else: the provider is passed everywhere so that no
/// process-wide default is needed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN: gRPC is HTTP/2; HTTPS servers (the extender) take HTTP/1.1 too.
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

impl Tls {
    /// Reads and checks the files (see the module doc).
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let provider = provider();
        let material = Material::load(files, &provider, UnixTime::now())?;
        let roots = material.roots.clone();
        let current = Arc::new(RwLock::new(material));
        let resolver = Arc::new(Current(current.clone()));
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![H2.to_vec(), HTTP11.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_root_certificates(roots)
            .with_client_cert_resolver(resolver);
        client.alpn_protocols = vec![H2.to_vec()];
        Ok(Tls { files: files.clone(), current, server: Arc::new(server), client: Arc::new(client) })
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// tonic's server TLS: our certificate, client certificates required
    /// and checked against the CA. Fixed when called: servers that must
    /// pick up a renewed certificate serve [`incoming`] instead.
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        let m = read(&self.current);
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&m.cert_pem, &m.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&m.ca_pem))
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// tonic's client TLS towards `server`: the CA as the only root, our
    /// certificate presented, the server's certificate checked for
    /// `server.dns_name()` (whatever host the URL names).
    pub fn client_config(&self, server: &Identity) -> tonic::transport::ClientTlsConfig {
        let m = read(&self.current);
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&m.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&m.cert_pem, &m.key_pem))
            .domain_name(server.dns_name())
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// rustls's server config (for HTTPS servers and [`incoming`]): client
    /// certificates required and chained to the CA; ALPN `h2`, `http/1.1`;
    /// the current certificate at every handshake.
    pub fn rustls_server(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// rustls's client config: the CA as the only root, our current
    /// certificate presented; ALPN `h2`. The caller names the server it
    /// expects when connecting: `ServerName::try_from(who.dns_name())`.
    pub fn rustls_client(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// Re-reads the files if their modification times or sizes changed.
    /// `Ok(true)`: a new set is in use; on error the old one stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if material::stamp(&self.files) == read(&self.current).stamp {
            return Ok(false);
        }
        let fresh = Material::load(&self.files, &provider(), UnixTime::now())?;
        let mut m = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *m = fresh;
        Ok(true)
    }

    /// Polls the files every `every` until `cancel` (see the module doc).
    pub async fn keep_fresh(self, every: Duration, cancel: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    failing = false;
                    info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Ok(false) => {}
                // Files are often written one after the other: say it once
                // per bad spell, and keep serving the old set.
                Err(e) if !failing => {
                    failing = true;
                    warn!("keeping the previous TLS certificate: {}", crate::error::Chain(&e));
                }
                Err(_) => {}
            }
        }
    }
}

/// How often daemons look at their certificate files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

fn read(m: &RwLock<Material>) -> std::sync::RwLockReadGuard<'_, Material> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The certificate and key in use, for rustls on both sides.
#[derive(Debug)]
struct Current(Arc<RwLock<Material>>);

impl Current {
    fn certified(&self) -> Arc<CertifiedKey> {
        read(&self.0).certified.clone()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }
}

impl ResolvesClientCert for Current {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Whether the peer of `req` presented a certificate (already checked
/// against the CA by the handshake) whose leaf names exactly `who`.
/// False on a plain-text connection.
pub fn peer_identity_is<T>(req: &tonic::Request<T>, who: &Identity) -> bool {
    req.peer_certs().is_some_and(|c| certs_identity_is(&c, who))
}

/// Like [`peer_identity_is`] for a chain at hand (an HTTPS server's).
pub fn certs_identity_is(certs: &[CertificateDer<'_>], who: &Identity) -> bool {
    let want = who.dns_name();
    leaf_names(certs).contains(&want)
}

/// Every identity the peer's leaf certificate names (none on plain text).
pub fn peer_identities<T>(req: &tonic::Request<T>) -> Vec<Identity> {
    req.peer_certs()
        .map(|c| leaf_names(&c).iter().filter_map(|n| Identity::from_dns_name(n)).collect())
        .unwrap_or_default()
}

/// The peer as a refusal should name it: its certificate's names, or that
/// it has none.
pub fn describe_peer<T>(req: &tonic::Request<T>) -> String {
    match req.peer_certs() {
        None => "a peer without a client certificate".into(),
        Some(c) => match leaf_names(&c) {
            n if n.is_empty() => "a certificate with no DNS name".into(),
            n => format!("the certificate of {}", n.join(", ")),
        },
    }
}

/// The DNS names of the leaf (first) certificate; none if unreadable.
pub fn leaf_names(certs: &[CertificateDer<'_>]) -> Vec<String> {
    certs.first().and_then(|leaf| names::dns_names(leaf).ok()).unwrap_or_default()
}

/// A config's transport choice: `[tls]`, or plain text by an explicit
/// `insecure = true`; neither is an error.
pub fn check_transport(tls: Option<&TlsFiles>, insecure: bool) -> Result<(), ConfigError> {
    if tls.is_none() && !insecure {
        return Err(ConfigError::Rule(
            "no transport security chosen: set [tls] (ca, cert, key) or insecure = true (plain text, \
             for tests on one machine)"
                .into(),
        ));
    }
    Ok(())
}

/// A URL this daemon dials: `https://` only with `[tls]`, `http://` only
/// with `insecure = true`.
pub fn check_url(field: &str, url: &str, tls: Option<&TlsFiles>, insecure: bool) -> Result<(), ConfigError> {
    let shown: String = url.chars().take(80).collect();
    if url.starts_with("https://") {
        if tls.is_none() {
            return Err(ConfigError::invalid(field, shown, "https:// needs a [tls] section"));
        }
    } else if url.starts_with("http://") {
        if !insecure {
            return Err(ConfigError::invalid(
                field,
                shown,
                "http:// is plain text: write https:// (with [tls]) or set insecure = true",
            ));
        }
    } else {
        return Err(ConfigError::invalid(field, shown, "must be an https:// (or, insecure, http://) URL"));
    }
    Ok(())
}

/// The warning every daemon logs once at start when `insecure = true`.
pub fn warn_insecure(daemon: &str) {
    warn!("{daemon}: insecure = true: links without [tls] are plain text and unauthenticated; use only for tests on one machine");
}

#[cfg(test)]
mod tests;
