//! The source agent's end of `MigrationTarget` (proto/migration.proto): the
//! target agent, reached over the network, behind [`IncomingTarget`].

use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::Channel;
use vmscale_proto::migration as pb;
use vmscale_proto::migration::migration_target_client::MigrationTargetClient;

use super::target::{Handoff, IncomingTarget};
use crate::vms::VmSpec;

/// How long an abort may take before the source gives up on it.
const ABORT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one call to the target agent may take (Prepare starts a QEMU).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The target agent of one order.
#[derive(Debug, Clone)]
pub struct RemoteTarget {
    endpoint: String,
    order_id: u64,
    /// The VM's scaling spec, for the target agent to adopt it with.
    spec: VmSpec,
    client: MigrationTargetClient<Channel>,
}

impl RemoteTarget {
    /// Connects lazily: a target that cannot be reached fails `prepare`.
    pub fn new(endpoint: &str, order_id: u64, spec: VmSpec) -> Result<Self, String> {
        let channel = Channel::from_shared(endpoint.to_owned())
            .map_err(|e| format!("target endpoint {endpoint:?}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        Ok(Self {
            endpoint: endpoint.to_owned(),
            order_id,
            spec,
            client: MigrationTargetClient::new(channel),
        })
    }

    /// Where the move stands on the target.
    pub async fn status(&self) -> Result<pb::status_reply::State, String> {
        let r = self
            .client
            .clone()
            .status(pb::StatusRequest { order_id: self.order_id })
            .await
            .map_err(|s| self.why(&s))?;
        Ok(r.into_inner().state())
    }

    fn why(&self, s: &tonic::Status) -> String {
        format!("target agent at {}: {:?}: {}", self.endpoint, s.code(), s.message())
    }
}

/// What the target gets in `PrepareRequest.handoff_json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct WireHandoff {
    pub handoff: Handoff,
    pub vm: VmSpec,
}

#[async_trait]
impl IncomingTarget for RemoteTarget {
    async fn prepare(&self, handoff: &Handoff) -> Result<String, String> {
        let wire = WireHandoff { handoff: handoff.clone(), vm: self.spec.clone() };
        let handoff_json = serde_json::to_string(&wire).map_err(|e| e.to_string())?;
        let req = pb::PrepareRequest { order_id: self.order_id, vm_id: handoff.vm_id.clone(), handoff_json };
        let r = self.client.clone().prepare(req).await.map_err(|s| self.why(&s))?;
        Ok(r.into_inner().uri)
    }

    async fn confirm(&self, timeout: Duration) -> Result<(), String> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let req = pb::ConfirmRequest { order_id: self.order_id, timeout_ms: ms };
        self.client.clone().confirm(req).await.map_err(|s| self.why(&s))?;
        Ok(())
    }

    async fn abort(&self) {
        // Short: the source resumes its guest and reports only after this,
        // and a target that cannot be reached kills its QEMU by itself.
        let req = pb::AbortRequest { order_id: self.order_id };
        match tokio::time::timeout(ABORT_TIMEOUT, self.client.clone().abort(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => {
                tracing::warn!(order = self.order_id, "{}; it kills its QEMU by itself later", self.why(&s));
            }
            Err(_) => tracing::warn!(
                order = self.order_id,
                "target agent at {} did not answer the abort within {ABORT_TIMEOUT:?}; it kills its QEMU by itself later",
                self.endpoint
            ),
        }
    }
}
