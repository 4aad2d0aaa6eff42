//! The agent's node certificate in Kubernetes, from the CertificateSigningRequest
//! API: the agent generates its key (it never leaves the node), asks signer
//! `vmscale.io/node` for `<node>.node.vmscale`, waits for the allocator to
//! approve and sign (allocator/src/node_certs: it approves only a request
//! whose requester's token was issued to a pod on that very node), and
//! writes key and certificate where its `[tls]` section reads them. It asks
//! again at two thirds of the certificate's life; the TLS code picks up the
//! new files.
//!
//! Requests: `create` and `get` of certificatesigningrequests (the agent's
//! ClusterRole in deploy/ grants these).

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::PostParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The signer that issues node certificates (the allocator).
pub const NODE_SIGNER: &str = "vmscale.io/node";
/// What a node certificate is for: the agent's client certificate and its
/// migration service's server certificate.
pub const USAGES: [&str; 4] = ["digital signature", "key encipherment", "client auth", "server auth"];

/// `[kubernetes.node_certificate]`: where the key and certificate go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCertConfig {
    /// Directory for `node.key` and `node.pem` (the `[tls]` key and cert
    /// point there); a memory-backed volume in the pod.
    pub dir: PathBuf,
    /// Validity asked for, seconds (the signer may give less). Default
    /// 259200 (72 h), at least 3600.
    #[serde(default = "default_expiration")]
    pub expiration_seconds: u32,
    /// How long to wait for the signer, ms. Default 60000.
    #[serde(default = "default_wait")]
    pub wait_ms: u64,
}

fn default_expiration() -> u32 {
    259_200
}

fn default_wait() -> u64 {
    60_000
}

impl NodeCertConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.expiration_seconds < 3600 {
            return Err(format!(
                "node_certificate.expiration_seconds = {} is below 3600 (the API's minimum is 600; renewals need room)",
                self.expiration_seconds
            ));
        }
        if self.wait_ms == 0 {
            return Err("node_certificate.wait_ms must be > 0".into());
        }
        Ok(())
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("node.pem")
    }

    /// When to ask again after a certificate was issued: at two thirds of
    /// the validity asked for.
    pub fn renew_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.expiration_seconds) * 2 / 3)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeCertError {
    #[error("making a key and certificate request for {name}")]
    Request {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("submitting the certificate signing request")]
    Create(#[source] kube::Error),
    #[error("reading certificate signing request {csr}")]
    Get {
        csr: String,
        #[source]
        source: kube::Error,
    },
    #[error("certificate signing request {csr} was {verdict}: {message}")]
    Refused { csr: String, verdict: String, message: String },
    #[error("certificate signing request {csr} got no certificate within {waited:?}; is the allocator (signer {NODE_SIGNER}) running?")]
    Timeout { csr: String, waited: Duration },
    #[error("writing {path}", path = .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The node identity's DNS name (the shared TLS design's `Identity::Node`).
pub fn node_dns_name(node: &str) -> String {
    format!("{node}.node.vmscale")
}

/// The CSR object for `request_pem` (a PKCS#10 request, PEM).
pub fn csr_object(node: &str, request_pem: &str, expiration_seconds: u32) -> CertificateSigningRequest {
    let mut csr = CertificateSigningRequest::default();
    csr.metadata.generate_name = Some(format!("vmscale-node-{node}-"));
    csr.spec.request = k8s_openapi::ByteString(request_pem.as_bytes().to_vec());
    csr.spec.signer_name = NODE_SIGNER.into();
    csr.spec.usages = Some(USAGES.iter().map(|u| (*u).to_owned()).collect());
    csr.spec.expiration_seconds = i32::try_from(expiration_seconds).ok();
    csr
}

/// What a CSR's status says now: the certificate, a refusal, or nothing yet.
pub fn outcome(csr: &CertificateSigningRequest) -> Option<Result<Vec<u8>, (String, String)>> {
    let status = csr.status.as_ref()?;
    if let Some(c) = status.conditions.iter().flatten().find(|c| c.type_ == "Denied" || c.type_ == "Failed") {
        return Some(Err((c.type_.to_lowercase(), c.message.clone().unwrap_or_default())));
    }
    status.certificate.as_ref().filter(|c| !c.0.is_empty()).map(|c| Ok(c.0.clone()))
}

/// Gets a certificate for `node` and writes `node.key` and `node.pem`.
pub async fn obtain(client: Client, node: &str, cfg: &NodeCertConfig) -> Result<(), NodeCertError> {
    obtain_polling(client, node, cfg, Duration::from_secs(1)).await
}

/// [`obtain`], asking for the CSR's status every `poll`.
pub async fn obtain_polling(
    client: Client,
    node: &str,
    cfg: &NodeCertConfig,
    poll: Duration,
) -> Result<(), NodeCertError> {
    let name = node_dns_name(node);
    let request_error = |source| NodeCertError::Request { name: name.clone(), source };
    let key = rcgen::KeyPair::generate().map_err(request_error)?;
    let mut params = rcgen::CertificateParams::new(vec![name.clone()]).map_err(request_error)?;
    // Only the node's name, in the subject too (rcgen's default common name
    // would be refused by the signer).
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name.clone());
    let request = params.serialize_request(&key).map_err(request_error)?.pem().map_err(request_error)?;
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let created = api
        .create(&PostParams::default(), &csr_object(node, &request, cfg.expiration_seconds))
        .await
        .map_err(NodeCertError::Create)?;
    let csr = created.metadata.name.clone().unwrap_or_default();
    let waited = Duration::from_millis(cfg.wait_ms);
    let deadline = tokio::time::Instant::now() + waited;
    let cert = loop {
        let now = api.get(&csr).await.map_err(|source| NodeCertError::Get { csr: csr.clone(), source })?;
        match outcome(&now) {
            Some(Ok(cert)) => break cert,
            Some(Err((verdict, message))) => return Err(NodeCertError::Refused { csr, verdict, message }),
            None if tokio::time::Instant::now() >= deadline => {
                return Err(NodeCertError::Timeout { csr, waited })
            }
            None => tokio::time::sleep(poll).await,
        }
    };
    // The key first: a reader that sees the new certificate finds its key.
    write_private(&cfg.key_path(), key.serialize_pem().as_bytes())?;
    write_private(&cfg.cert_path(), &cert)?;
    Ok(())
}

/// [`obtain`] until it works or `cancel` (`Ok(false)`): the allocator that
/// signs may not be up yet when the agent starts, and a restarting agent
/// would only file more requests. A denied request is final: the signer
/// said why, and asking again would get the same answer.
pub async fn obtain_patiently(
    client: Client,
    node: &str,
    cfg: &NodeCertConfig,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<bool, NodeCertError> {
    let backoff = vmscale_common::backoff::Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
    let mut failures: u32 = 0;
    loop {
        match obtain(client.clone(), node, cfg).await {
            Ok(()) => return Ok(true),
            Err(e @ NodeCertError::Refused { .. }) => return Err(e),
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff.jittered(failures, vmscale_common::backoff::seed_of(node));
                tracing::warn!(%node, "no node certificate yet, asking again in {wait:?}: {}", vmscale_common::error::chain(&e));
                tokio::select! {
                    () = cancel.cancelled() => return Ok(false),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// After the first certificate: asks again at two thirds of its life, and
/// every 30 s after a failure, until `cancel`. The TLS code reads the files
/// afresh for each connection, so the new certificate is used from then on.
pub async fn renew(
    client: Client,
    node: String,
    cfg: NodeCertConfig,
    cancel: tokio_util::sync::CancellationToken,
) {
    const RETRY: Duration = Duration::from_secs(30);
    let mut wait = cfg.renew_after();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = match obtain(client.clone(), &node, &cfg).await {
            Ok(()) => {
                tracing::info!(%node, "node certificate renewed");
                cfg.renew_after()
            }
            Err(e) => {
                tracing::warn!(%node, "renewing the node certificate failed, retrying in {RETRY:?}: {}", vmscale_common::error::chain(&e));
                RETRY
            }
        };
    }
}

/// Writes `bytes` to `path` by a rename, readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), NodeCertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| NodeCertError::Write { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_object_names_our_signer_usages_and_lifetime() {
        let c = csr_object("node-a", "PEM", 7200);
        assert_eq!(c.metadata.generate_name.as_deref(), Some("vmscale-node-node-a-"));
        assert_eq!(c.spec.signer_name, NODE_SIGNER);
        assert_eq!(c.spec.expiration_seconds, Some(7200));
        assert_eq!(c.spec.usages.as_deref().map(<[String]>::len), Some(4));
        assert_eq!(c.spec.request.0, b"PEM");
    }

    #[test]
    fn outcomes() {
        let mut c = csr_object("n", "PEM", 7200);
        assert_eq!(outcome(&c), None);
        c.status = Some(
            serde_json::from_value(
                serde_json::json!({"conditions": [{"type": "Approved", "status": "True"}]}),
            )
            .unwrap(),
        );
        assert_eq!(outcome(&c), None, "approved, not signed yet");
        c.status.as_mut().unwrap().certificate = Some(k8s_openapi::ByteString(b"CERT".to_vec()));
        assert_eq!(outcome(&c), Some(Ok(b"CERT".to_vec())));
        c.status = Some(
            serde_json::from_value(serde_json::json!({"conditions": [{"type": "Denied", "status": "True", "message": "not yours"}]}))
                .unwrap(),
        );
        assert_eq!(outcome(&c), Some(Err(("denied".into(), "not yours".into()))));
    }

    #[test]
    fn config_is_checked_and_renewal_comes_early() {
        let c: NodeCertConfig = toml::from_str("dir = \"/run/vmscale-tls\"").unwrap();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.renew_after(), Duration::from_secs(172_800));
        assert_eq!(c.cert_path(), PathBuf::from("/run/vmscale-tls/node.pem"));
        let short = NodeCertConfig { expiration_seconds: 600, ..c };
        assert!(short.validate().unwrap_err().contains("3600"));
    }
}
