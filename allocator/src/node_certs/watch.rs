//! The signer's shell: watches the CertificateSigningRequests of signer
//! `vmscale.io/node` (a field selector, so no other CSR reaches us), asks
//! [`decide`] about each, and carries the answer out: a condition on the
//! `approval` subresource, then the certificate on `status`. Requests: list
//! and watch of CSRs, patch of their `approval` and `status` (the
//! allocator's ClusterRole in deploy/ grants these, with `approve` and
//! `sign` on the signer name).

use super::decide::{decide, CsrView, Decision, NODE_SIGNER};
use super::sign::{read_request, Signer};
use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vmscale_common::error::chain;

/// The field manager of our approval and status patches, and the reason
/// on our conditions.
pub const MANAGER: &str = "vmscale-allocator";
const REASON: &str = "VmscaleNodeIdentity";

#[derive(Debug, thiserror::Error)]
pub enum NodeCertError {
    #[error("recording the decision on certificate request {csr}")]
    Approval {
        csr: String,
        #[source]
        source: kube::Error,
    },
    #[error("issuing the certificate for request {csr}")]
    Sign {
        csr: String,
        #[source]
        source: super::sign::SignError,
    },
    #[error("writing the certificate into request {csr}")]
    Status {
        csr: String,
        #[source]
        source: kube::Error,
    },
}

/// What was done with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Ignored,
    Denied(String),
    Signed { node: String },
}

pub fn watch_config() -> watcher::Config {
    watcher::Config::default().fields(&format!("spec.signerName={NODE_SIGNER}"))
}

/// Runs until `cancel`: every request of our signer is decided once.
pub async fn run(client: Client, signer: Signer, agent_user: String, cancel: CancellationToken) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let events = watcher::watcher(api.clone(), watch_config()).default_backoff();
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = events.next() => e,
        };
        let csr = match event {
            None => return,
            Some(Err(e)) => {
                warn!("watching certificate signing requests failed, retrying: {}", chain(&e));
                continue;
            }
            Some(Ok(Event::Apply(csr) | Event::InitApply(csr))) => csr,
            Some(Ok(_)) => continue,
        };
        let name = csr.metadata.name.clone().unwrap_or_default();
        match handle(&api, &signer, &agent_user, &csr, SystemTime::now()).await {
            Ok(Handled::Ignored) => {}
            Ok(Handled::Signed { node }) => info!(csr = %name, %node, "node certificate issued"),
            Ok(Handled::Denied(reason)) => warn!(csr = %name, "node certificate request denied: {reason}"),
            // The next event of this request (or a re-list) tries again.
            Err(e) => warn!(csr = %name, "{}", chain(&e)),
        }
    }
}

/// Decides one request and carries the decision out.
pub async fn handle(
    api: &Api<CertificateSigningRequest>,
    signer: &Signer,
    agent_user: &str,
    csr: &CertificateSigningRequest,
    now: SystemTime,
) -> Result<Handled, NodeCertError> {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let status = csr.status.as_ref();
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    let has = |t: &str| conditions.iter().any(|c| c.type_ == t);
    let signed = status.and_then(|s| s.certificate.as_ref()).is_some_and(|c| !c.0.is_empty());
    let empty = BTreeMap::new();
    let parsed = read_request(&csr.spec.request.0);
    let view = CsrView {
        signer: &csr.spec.signer_name,
        username: csr.spec.username.as_deref().unwrap_or(""),
        extra: csr.spec.extra.as_ref().unwrap_or(&empty),
        usages: csr.spec.usages.as_deref().unwrap_or_default(),
        // Our own approval without a certificate yet (we stopped in between)
        // is not settled: it is signed now.
        settled: has("Denied") || has("Failed") || signed,
        requested: parsed.as_ref().map(|(r, _)| r.clone()).map_err(Clone::clone),
    };
    match decide(&view, agent_user) {
        Decision::Ignore => Ok(Handled::Ignored),
        Decision::Deny { reason } => {
            set_condition(api, &name, "Denied", &reason).await?;
            Ok(Handled::Denied(reason))
        }
        Decision::Approve { node } => {
            let Ok((_, key)) = parsed else { return Ok(Handled::Ignored) };
            if !has("Approved") {
                let message = format!("the vmscale agent on node {node} asks for its node identity");
                set_condition(api, &name, "Approved", &message).await?;
            }
            let pem = signer
                .issue(&key, &node, now)
                .map_err(|source| NodeCertError::Sign { csr: name.clone(), source })?;
            let body = serde_json::json!({ "status": { "certificate": ByteString(pem.into_bytes()) } });
            api.patch_status(&name, &params(), &Patch::Merge(body))
                .await
                .map_err(|source| NodeCertError::Status { csr: name.clone(), source })?;
            Ok(Handled::Signed { node })
        }
    }
}

fn params() -> PatchParams {
    PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() }
}

async fn set_condition(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    kind: &str,
    message: &str,
) -> Result<(), NodeCertError> {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let body = serde_json::json!({ "status": { "conditions": [{
        "type": kind, "status": "True", "reason": REASON, "message": message,
        "lastUpdateTime": now,
    }]}});
    api.patch_approval(name, &params(), &Patch::Merge(body))
        .await
        .map(drop)
        .map_err(|source| NodeCertError::Approval { csr: name.to_owned(), source })
}
