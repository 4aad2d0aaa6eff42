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
use super::target_state::{Caller, TargetState};
use vmscale_common::tls::{peer_identities, Identity, Tls};

/// The shortest and longest wait for the guest to run that a confirm may
/// ask of the target, ms: a source's value outside is clamped.
const CONFIRM_WAIT_MS: std::ops::RangeInclusive<u64> = 100..=120_000;

/// The largest handoff taken: a spec at its bounds is a few KiB.
pub const MAX_HANDOFF_BYTES: usize = 64 * 1024;

impl TryFrom<pb::PrepareRequest> for Prepare {
    type Error = TargetError;

    fn try_from(r: pb::PrepareRequest) -> Result<Self, TargetError> {
        if r.handoff_json.len() > MAX_HANDOFF_BYTES {
            return Err(TargetError::HandoffSize(r.handoff_json.len()));
        }
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
        h.machine.validate().map_err(TargetError::BadMachine)?;
        h.config.validate().map_err(TargetError::BadTransfer)?;
        Ok(Prepare { order_id: r.order_id, vm: wire.vm, handoff: wire.handoff })
    }
}

impl From<TargetError> for Status {
    fn from(e: TargetError) -> Status {
        // The source agent sees only the message: all of the chain goes in.
        let msg = super::reason(&e);
        match e {
            TargetError::HandoffJson(_)
            | TargetError::HandoffSize(_)
            | TargetError::Mismatch { .. }
            | TargetError::BadSpec(_)
            | TargetError::BadMachine(_)
            | TargetError::BadTransfer(_)
            | TargetError::ForeignInformant(_) => Status::invalid_argument(msg),
            TargetError::StreamTls { .. } | TargetError::NoTlsFiles => Status::failed_precondition(msg),
            TargetError::NotTakingVms | TargetError::ConfirmBusy => Status::failed_precondition(msg),
            TargetError::NotAuthorised { .. }
            | TargetError::NotTheSource { .. }
            | TargetError::NotYours(_) => Status::permission_denied(msg),
            TargetError::AlreadyPrepared(_) | TargetError::AlreadyHere(_) => Status::already_exists(msg),
            TargetError::Busy | TargetError::Stuck(_) => Status::unavailable(msg),
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

/// The gRPC face of [`TargetNode`]; `tls`: it is served with client
/// certificates, which name the calling node.
#[derive(Debug, Clone)]
pub struct TargetService {
    pub node: Arc<TargetNode>,
    pub tls: bool,
}

impl TargetService {
    /// Who called: the node names of its certificate, or anyone on a link
    /// without TLS.
    fn caller<T>(&self, r: &Request<T>) -> Caller {
        if !self.tls {
            return Caller::Anyone;
        }
        Caller::Nodes(
            peer_identities(r)
                .into_iter()
                .filter_map(|i| match i {
                    Identity::Node(n) => Some(n),
                    _ => None,
                })
                .collect(),
        )
    }
}

#[tonic::async_trait]
impl MigrationTarget for TargetService {
    // Prepare and confirm run to their end in a task of their own: the
    // server drops a call's future when its client gives up (a timeout, a
    // reset), and a confirm dropped between resuming the guest and noting
    // it would leave the order busy for good, so the source could never
    // learn that the guest runs here.
    async fn prepare(&self, r: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareReply>, Status> {
        let node = self.node.clone();
        let caller = self.caller(&r);
        let req = Prepare::try_from(r.into_inner())?;
        let uri = tokio::spawn(async move { node.prepare(req, &caller).await })
            .await
            .map_err(|e| Status::internal(format!("prepare: {e}")))??;
        Ok(Response::new(pb::PrepareReply { uri }))
    }

    async fn confirm(&self, r: Request<pb::ConfirmRequest>) -> Result<Response<pb::ConfirmReply>, Status> {
        let node = self.node.clone();
        let caller = self.caller(&r);
        let req = r.into_inner();
        let wait =
            Duration::from_millis(req.timeout_ms.clamp(*CONFIRM_WAIT_MS.start(), *CONFIRM_WAIT_MS.end()));
        tokio::spawn(async move { node.confirm(req.order_id, wait, &caller).await })
            .await
            .map_err(|e| Status::internal(format!("confirm: {e}")))??;
        Ok(Response::new(pb::ConfirmReply {}))
    }

    async fn abort(&self, r: Request<pb::AbortRequest>) -> Result<Response<pb::AbortReply>, Status> {
        let caller = self.caller(&r);
        let state = self.node.abort(r.into_inner().order_id, &caller).await?;
        Ok(Response::new(pb::AbortReply { state: wire_state(state) as i32 }))
    }

    async fn status(&self, r: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let caller = self.caller(&r);
        let state = self.node.status(r.into_inner().order_id, &caller)?;
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

/// Most calls served at once, and how long one may take (a prepare starts
/// a QEMU; a confirm waits at most [`CONFIRM_WAIT_MS`]).
const CONCURRENCY: usize = 32;
const CALL_TIMEOUT: Duration = Duration::from_secs(150);

/// Serves `svc` on `listen` until `cancel`: with `tls`, only to peers with
/// a certificate of the cluster CA (each call then checked against the
/// order's source node); without, to anyone (`insecure = true`).
pub async fn serve(
    svc: Arc<TargetNode>,
    listen: SocketAddr,
    tls: Option<Tls>,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), ServeError> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen { addr: listen, source })?;
    let service = MigrationTargetServer::new(TargetService { node: svc, tls: tls.is_some() })
        .max_decoding_message_size(MAX_HANDOFF_BYTES + 4096);
    let mut server = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(CONCURRENCY)
        .timeout(CALL_TIMEOUT);
    let router = server.add_service(service);
    let served = match tls {
        Some(tls) => {
            let incoming = vmscale_common::tls::incoming(l, tls.rustls_server());
            router.serve_with_incoming_shutdown(incoming, cancel.cancelled_owned()).await
        }
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, cancel.cancelled_owned()).await
        }
    };
    served.map_err(|source| ServeError::Serve { addr: listen, source })
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
            machine: crate::migration::machine::tests::guest(),
            config: Default::default(),
            stream_tls: false,
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

    /// What an attacker would send in place of a spec: argv of its own, a
    /// hostile name, a huge body, a transfer that never ends. Each is an
    /// invalid argument before the node looks at it.
    #[test]
    fn a_prepare_with_foreign_arguments_is_refused_at_the_edge() {
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut r = req(8, "vm1", "vm1", "vm1");
            let mut v: serde_json::Value = serde_json::from_str(&r.handoff_json).unwrap();
            f(&mut v);
            r.handoff_json = v.to_string();
            let e = Prepare::try_from(r).unwrap_err();
            let why = super::super::reason(&e);
            (Status::from(e).code(), why)
        };
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "base_args",
                Box::new(|v| v["handoff"]["base_args"] = serde_json::json!(["-virtfs", "local,path=/"])),
            ),
            (
                "disks.name",
                Box::new(|v| {
                    v["handoff"]["machine"]["disks"] =
                        serde_json::json!([{"name": "x,file=/dev/sda", "format": "raw"}])
                }),
            ),
            (
                "nics.tap",
                Box::new(|v| v["handoff"]["machine"]["nics"][0]["tap"] = "vm0,script=/bin/sh".into()),
            ),
            ("max_bandwidth", Box::new(|v| v["handoff"]["config"]["max_bandwidth_bytes_per_s"] = 0.into())),
        ];
        for (what, f) in cases {
            let (code, why) = with(&*f);
            assert_eq!(code, tonic::Code::InvalidArgument, "{what}: {why}");
            assert!(why.contains(what), "{what}: {why}");
        }
        let mut big = req(8, "vm1", "vm1", "vm1");
        big.handoff_json = " ".repeat(MAX_HANDOFF_BYTES + 1);
        assert_eq!(code(big), tonic::Code::InvalidArgument);
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
        let bind =
            crate::migration::target::IncomingError::Bind { addr: ([127, 0, 0, 1], 0).into(), source: io() };
        let s = Status::from(TargetError::NotStarted(bind));
        assert_eq!(
            s.message(),
            "the target qemu did not start: cannot listen for the stream on 127.0.0.1:0: in use"
        );
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
