//! The gRPC face of the target ([`TargetNode`], proto/migration.proto):
//! requests become the node's types here, checked on the way in, and its
//! errors become status codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use vmscale_proto::migration as pb;
use vmscale_proto::migration::migration_target_server::{MigrationTarget, MigrationTargetServer};
use vmscale_proto::migration::status_reply::State as WireState;

use super::remote::WireHandoff;
pub use super::target_node::TargetNode;
use super::target_node::{Prepare, TargetError};
use super::target_state::TargetState;

/// The shortest and longest wait for the guest to run that a confirm may
/// ask of the target, ms: a source's value outside is clamped.
const CONFIRM_WAIT_MS: std::ops::RangeInclusive<u64> = 100..=120_000;

impl TryFrom<pb::PrepareRequest> for Prepare {
    type Error = TargetError;

    fn try_from(r: pb::PrepareRequest) -> Result<Self, TargetError> {
        let wire: WireHandoff = serde_json::from_str(&r.handoff_json).map_err(TargetError::HandoffJson)?;
        let h = &wire.handoff;
        if h.order_id != r.order_id || h.vm_id != r.vm_id || wire.vm.id != r.vm_id {
            return Err(TargetError::Mismatch {
                handoff_order: h.order_id,
                handoff_vm: h.vm_id.clone(),
                spec_vm: wire.vm.id.clone(),
                order: r.order_id,
                vm: r.vm_id,
            });
        }
        wire.vm.validate().map_err(TargetError::BadSpec)?;
        Ok(Prepare { order_id: r.order_id, vm: wire.vm, handoff: wire.handoff })
    }
}

impl From<TargetError> for Status {
    fn from(e: TargetError) -> Status {
        // The source agent sees only the message: all of the chain goes in.
        let msg = super::reason(&e);
        match e {
            TargetError::HandoffJson(_) | TargetError::Mismatch { .. } | TargetError::BadSpec(_) => {
                Status::invalid_argument(msg)
            }
            TargetError::NotTakingVms | TargetError::ConfirmBusy => Status::failed_precondition(msg),
            TargetError::NotAuthorised { .. } => Status::permission_denied(msg),
            TargetError::AlreadyPrepared(_) | TargetError::AlreadyHere(_) => Status::already_exists(msg),
            TargetError::NoPort { .. } | TargetError::Busy => Status::unavailable(msg),
            TargetError::NotStarted(_) => Status::internal(msg),
            TargetError::UnknownOrder(_) => Status::not_found(msg),
            TargetError::NotRecorded(_) | TargetError::NotResumed(_) => Status::aborted(msg),
        }
    }
}

/// What the source hears of an order: the target's inner steps are all
/// "prepared" to it.
fn wire_state(s: TargetState) -> WireState {
    match s {
        TargetState::Absent => WireState::None,
        TargetState::Running => WireState::Running,
        TargetState::Starting | TargetState::Prepared | TargetState::Confirming => WireState::Prepared,
    }
}

/// The gRPC face of [`TargetNode`].
#[derive(Debug, Clone)]
pub struct TargetService(pub Arc<TargetNode>);

#[tonic::async_trait]
impl MigrationTarget for TargetService {
    // Prepare and confirm run to their end in a task of their own: the
    // server drops a call's future when its client gives up (a timeout, a
    // reset), and a confirm dropped between resuming the guest and noting
    // it would leave the order busy for good, so the source could never
    // learn that the guest runs here.
    async fn prepare(&self, r: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareReply>, Status> {
        let node = self.0.clone();
        let req = Prepare::try_from(r.into_inner())?;
        let uri = tokio::spawn(async move { node.prepare(req).await })
            .await
            .map_err(|e| Status::internal(format!("prepare: {e}")))??;
        Ok(Response::new(pb::PrepareReply { uri }))
    }

    async fn confirm(&self, r: Request<pb::ConfirmRequest>) -> Result<Response<pb::ConfirmReply>, Status> {
        let node = self.0.clone();
        let req = r.into_inner();
        let wait =
            Duration::from_millis(req.timeout_ms.clamp(*CONFIRM_WAIT_MS.start(), *CONFIRM_WAIT_MS.end()));
        tokio::spawn(async move { node.confirm(req.order_id, wait).await })
            .await
            .map_err(|e| Status::internal(format!("confirm: {e}")))??;
        Ok(Response::new(pb::ConfirmReply {}))
    }

    async fn abort(&self, r: Request<pb::AbortRequest>) -> Result<Response<pb::AbortReply>, Status> {
        let state = self.0.abort(r.into_inner().order_id).await?;
        Ok(Response::new(pb::AbortReply { state: wire_state(state) as i32 }))
    }

    async fn status(&self, r: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let state = self.0.status(r.into_inner().order_id);
        Ok(Response::new(pb::StatusReply { state: wire_state(state) as i32 }))
    }
}

/// Why the migration service stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen for migrations on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("migration service on {addr}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Serves `svc` on `listen` until `cancel`.
pub async fn serve(
    svc: Arc<TargetNode>,
    listen: SocketAddr,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), ServeError> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen { addr: listen, source })?;
    let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(MigrationTargetServer::new(TargetService(svc)))
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
        .map_err(|source| ServeError::Serve { addr: listen, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::migration::target::Handoff;

    fn req(order: u64, vm: &str, handoff_vm: &str, spec_vm: &str) -> pb::PrepareRequest {
        let handoff = Handoff {
            order_id: order,
            vm_id: handoff_vm.into(),
            base_args: vec![],
            devices: Default::default(),
            config: Default::default(),
            source_running: true,
        };
        let vm_spec = crate::vms::VmSpec { qmp: "/x".into(), ..crate::vms::tests::spec(spec_vm) };
        let wire = WireHandoff { handoff, vm: vm_spec };
        pb::PrepareRequest {
            order_id: order,
            vm_id: vm.into(),
            handoff_json: serde_json::to_string(&wire).unwrap(),
        }
    }

    fn code(r: pb::PrepareRequest) -> tonic::Code {
        Status::from(Prepare::try_from(r).unwrap_err()).code()
    }

    #[test]
    fn a_prepare_whose_parts_disagree_is_refused_at_the_edge() {
        let ok = Prepare::try_from(req(8, "vm1", "vm1", "vm1")).unwrap();
        assert_eq!((ok.order_id, ok.vm.id.as_str(), ok.handoff.vm_id.as_str()), (8, "vm1", "vm1"));
        assert_eq!(code(req(8, "vm1", "vm3", "vm1")), tonic::Code::InvalidArgument);
        assert_eq!(code(req(8, "vm1", "vm1", "vm3")), tonic::Code::InvalidArgument);
        let mut other_order = req(8, "vm1", "vm1", "vm1");
        other_order.order_id = 9;
        assert_eq!(code(other_order), tonic::Code::InvalidArgument);
        let bad = pb::PrepareRequest { order_id: 8, vm_id: "vm1".into(), handoff_json: "{".into() };
        assert_eq!(code(bad), tonic::Code::InvalidArgument);
        assert_eq!(code(req(8, "", "", "")), tonic::Code::InvalidArgument, "an invalid spec");
    }

    #[test]
    fn errors_become_codes_with_their_whole_chain() {
        let io = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "in use");
        let cases = [
            (TargetError::NotTakingVms, tonic::Code::FailedPrecondition),
            (TargetError::ConfirmBusy, tonic::Code::FailedPrecondition),
            (TargetError::NotAuthorised { order: 1, vm: "a".into() }, tonic::Code::PermissionDenied),
            (TargetError::AlreadyPrepared(1), tonic::Code::AlreadyExists),
            (TargetError::AlreadyHere("a".into()), tonic::Code::AlreadyExists),
            (TargetError::NoPort { ip: [127, 0, 0, 1].into(), source: io() }, tonic::Code::Unavailable),
            (TargetError::Busy, tonic::Code::Unavailable),
            (
                TargetError::NotStarted(crate::migration::target::IncomingError::NotStarted),
                tonic::Code::Internal,
            ),
            (TargetError::UnknownOrder(1), tonic::Code::NotFound),
            (
                TargetError::NotRecorded(crate::migration::RecordError {
                    path: "/var/lib/vmscale/migration/adopted/vm.json".into(),
                    source: std::io::Error::other("disk full"),
                }),
                tonic::Code::Aborted,
            ),
            (
                TargetError::NotResumed(crate::migration::target::IncomingError::StreamFailed),
                tonic::Code::Aborted,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(Status::from(e).code(), want);
        }
        let s = Status::from(TargetError::NoPort { ip: [127, 0, 0, 1].into(), source: io() });
        assert_eq!(s.message(), "no free port on 127.0.0.1 for the stream: in use");
    }

    #[test]
    fn the_source_hears_inner_steps_as_prepared() {
        use TargetState::*;
        let heard: Vec<_> = [Absent, Starting, Prepared, Confirming, Running].map(wire_state).into();
        let want = [
            WireState::None,
            WireState::Prepared,
            WireState::Prepared,
            WireState::Prepared,
            WireState::Running,
        ];
        assert_eq!(heard, want);
    }
}
