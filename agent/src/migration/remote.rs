//! The source agent's end of `MigrationTarget` (proto/migration.proto): the
//! target agent, reached over the network, behind [`IncomingTarget`].

use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::Channel;
use vmscale_proto::migration as pb;
use vmscale_proto::migration::migration_target_client::MigrationTargetClient;

use super::target::{AfterAbort, ConfirmError, Handoff, IncomingError, IncomingTarget};
use crate::vms::VmSpec;
use std::net::IpAddr;
use vmscale_common::tls::{Identity, Tls};

/// How long an abort may take before the source gives up on it.
const ABORT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a confirm's answer may take beyond the target's own wait.
const CONFIRM_SLACK: Duration = Duration::from_secs(2);

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

/// The target node of an order and how to reach its agent.
#[derive(Debug, Clone, Copy)]
pub struct TargetLink<'a> {
    pub endpoint: &'a str,
    pub node: &'a str,
    /// With TLS, the target's certificate must name `node`
    /// (`Identity::Node`); without, anyone at `endpoint` is believed.
    pub tls: Option<&'a Tls>,
}

impl RemoteTarget {
    /// Connects lazily: a target that cannot be reached fails `prepare`.
    pub fn new(link: TargetLink<'_>, order_id: u64, spec: VmSpec) -> Result<Self, IncomingError> {
        let endpoint = link.endpoint;
        let bad = |why: &str| IncomingError::BadUrl {
            endpoint: super::stream_uri::shown(endpoint),
            why: why.to_owned(),
        };
        let mut channel = Channel::from_shared(endpoint.to_owned())
            .map_err(|source| IncomingError::BadEndpoint { endpoint: endpoint.to_owned(), source })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT);
        match (link.tls, endpoint.starts_with("https://")) {
            (Some(tls), true) => {
                channel = channel
                    .tls_config(tls.client_config(&Identity::Node(link.node.to_owned())))
                    .map_err(|e| bad(&e.to_string()))?;
            }
            (Some(_), false) => return Err(bad("this agent has [tls]: the target must be https://")),
            (None, true) => return Err(bad("https:// needs [tls] on this agent")),
            (None, false) => {}
        }
        Ok(Self {
            endpoint: endpoint.to_owned(),
            order_id,
            spec,
            client: MigrationTargetClient::new(channel.connect_lazy()),
        })
    }

    /// The addresses the calls to the target agent go to: the stream must
    /// go to one of them.
    async fn target_ips(&self) -> Vec<IpAddr> {
        let Ok(uri) = self.endpoint.parse::<tonic::codegen::http::Uri>() else { return Vec::new() };
        let Some(host) = uri.host() else { return Vec::new() };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return vec![ip];
        }
        let port = uri.port_u16().unwrap_or(443);
        let found = tokio::net::lookup_host(format!("{host}:{port}")).await;
        found.map(|addrs| addrs.map(|a| a.ip()).collect()).unwrap_or_default()
    }

    fn why(&self, s: &tonic::Status) -> IncomingError {
        IncomingError::Remote {
            endpoint: self.endpoint.clone(),
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// What the target gets in `PrepareRequest.handoff_json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireHandoff {
    pub handoff: Handoff,
    pub vm: VmSpec,
}

#[async_trait]
impl IncomingTarget for RemoteTarget {
    async fn prepare(&self, handoff: &Handoff) -> Result<String, IncomingError> {
        let wire = WireHandoff { handoff: handoff.clone(), vm: self.spec.clone() };
        let handoff_json = serde_json::to_string(&wire).map_err(IncomingError::Encode)?;
        let req = pb::PrepareRequest { order_id: self.order_id, vm_id: handoff.vm_id.clone(), handoff_json };
        let r = self.client.clone().prepare(req).await.map_err(|s| self.why(&s))?;
        // From the network: QEMU would run an `exec:` URI with /bin/sh.
        let uri = r.into_inner().uri;
        let addr =
            super::stream_uri::check(&uri, &self.target_ips().await).map_err(IncomingError::StreamUri)?;
        Ok(crate::qmp::migrate::tcp_uri(addr))
    }

    async fn confirm(&self, timeout: Duration) -> Result<(), ConfirmError> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut req = tonic::Request::new(pb::ConfirmRequest { order_id: self.order_id, timeout_ms: ms });
        // The guest runs nowhere while this waits: no longer than the
        // target's own wait for the resume and a little for the way.
        req.set_timeout(timeout + CONFIRM_SLACK);
        match self.client.clone().confirm(req).await {
            Ok(_) => Ok(()),
            Err(s) if never_connected(&s) => Err(ConfirmError::NotDelivered(self.why(&s))),
            Err(s) => Err(ConfirmError::Failed(self.why(&s))),
        }
    }

    async fn abort(&self) -> AfterAbort {
        // Short: a target that cannot be reached is asked again by the
        // caller if it matters (after a confirm), and kills an unconfirmed
        // QEMU by itself otherwise.
        let req = pb::AbortRequest { order_id: self.order_id };
        let why = match tokio::time::timeout(ABORT_TIMEOUT, self.client.clone().abort(req)).await {
            Ok(Ok(r)) => match r.into_inner().state() {
                pb::status_reply::State::None => return AfterAbort::Gone,
                pb::status_reply::State::Running => return AfterAbort::RunsThere,
                other => format!("target agent at {} answered the abort with {other:?}", self.endpoint),
            },
            Ok(Err(s)) => self.why(&s).to_string(),
            Err(_) => {
                format!("target agent at {} did not answer the abort within {ABORT_TIMEOUT:?}", self.endpoint)
            }
        };
        tracing::warn!(order = self.order_id, "{why}");
        AfterAbort::Unknown(why)
    }
}

/// Whether a call failed while connecting, so the request never left: the
/// peer refused the connection (nothing listens: its agent is down). A
/// reset or timeout on a connection that was up says nothing of the sort.
fn never_connected(s: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_confirm_to_an_agent_that_is_down_was_never_delivered() {
        // A port nobody listens on: the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let link = TargetLink { endpoint: &endpoint, node: "b", tls: None };
        let t = RemoteTarget::new(link, 3, crate::vms::tests::spec("vm")).unwrap();
        let e = t.confirm(Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(e, ConfirmError::NotDelivered(_)), "{e:?}");
        assert!(matches!(t.abort().await, AfterAbort::Unknown(_)));
    }
}
