//! One function per request of a live session: the wire message in, the
//! core's decision under the lock, the answer out. [`Shared::handle`] wraps
//! them with the metrics and the log line every request gets.

use crate::convert::{self, EdgeError};
use crate::core::contention::ContentionReport;
use crate::core::error::CoreError;
use crate::core::ledger::Outcome;
use crate::core::names::{cut, MAX_NODE_LEN};
use crate::core::vm::VmRegistration;
use crate::core::SessionRef;
use crate::metrics::{ErrorLabels, RequestLabels};
use crate::shared::Shared;
use std::time::Instant;
use tracing::{info, warn};
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_message::Body as Reply;

/// A decided request: the outcome label for the metrics and the answer, or
/// why it was refused.
type Decided = Result<(&'static str, Reply), EdgeError>;

impl Shared {
    /// Decides one request of a live session.
    pub fn handle(&self, s: &SessionRef, m: pb::AgentMessage) -> pb::AllocatorMessage {
        let rid = m.request_id;
        let t0 = Instant::now();
        let (kind, result) = decide(self, s, m);
        self.metrics.decision_seconds.observe(t0.elapsed().as_secs_f64());
        let body = match result {
            Ok((outcome, body)) => {
                self.metrics.requests.get_or_create(&RequestLabels { kind, outcome }).inc();
                body
            }
            Err(e) => {
                self.metrics.requests.get_or_create(&RequestLabels { kind, outcome: "error" }).inc();
                self.metrics.errors.get_or_create(&ErrorLabels { kind, error: e.label() }).inc();
                warn!(node = %s.node, request = rid, kind, "request refused: {e}");
                Reply::Error(pb::RequestError { code: e.code() as i32, message: e.to_string() })
            }
        };
        pb::AllocatorMessage { request_id: rid, body: Some(body) }
    }
}

/// The request's kind (the metrics' label) and its decision.
fn decide(sh: &Shared, s: &SessionRef, m: pb::AgentMessage) -> (&'static str, Decided) {
    if !m.node.is_empty() && m.node != s.node {
        let e =
            CoreError::NotOwnNode { own: s.node.clone(), requested: cut(&m.node, MAX_NODE_LEN).to_owned() };
        return ("any", Err(e.into()));
    }
    let Some(body) = m.body else {
        let why = "empty: set one of add_vm, remove_vm, reserve, release, migration_status, \
                   node_contention, ping";
        return ("empty", Err(CoreError::invalid("message", why).into()));
    };
    match body {
        Body::Hello(_) => {
            let why = "only the first message of a session may be hello; open a new session to re-register";
            ("hello", Err(CoreError::invalid("hello", why).into()))
        }
        Body::Ping(_) => ("ping", ack()),
        Body::AddVm(a) => ("add_vm", add_vm(sh, s, a)),
        Body::RemoveVm(r) => ("remove_vm", remove_vm(sh, s, &r)),
        Body::Reserve(r) => ("reserve", reserve(sh, s, r)),
        Body::Release(r) => ("release", release(sh, s, r)),
        Body::NodeContention(c) => ("node_contention", node_contention(sh, s, c)),
        Body::MigrationStatus(st) => ("migration_status", migration_status(sh, s, &st)),
    }
}

fn ack() -> Decided {
    Ok(("ok", Reply::Ack(pb::Ack {})))
}

fn add_vm(sh: &Shared, s: &SessionRef, a: pb::AddVm) -> Decided {
    let reg = VmRegistration::try_from(a.vm.ok_or(EdgeError::Missing("add_vm.vm"))?)?;
    sh.lock().cluster.add_vm(s, reg)?;
    ack()
}

fn remove_vm(sh: &Shared, s: &SessionRef, r: &pb::RemoveVm) -> Decided {
    sh.lock().cluster.remove_vm(s, &r.vm_id)?;
    ack()
}

/// A request not granted in full wakes the planner: the node may be hot.
fn reserve(sh: &Shared, s: &SessionRef, r: pb::Reserve) -> Decided {
    let target = convert::resources(r.target, "reserve.target")?;
    let grant = sh.lock().cluster.reserve(s, &r.vm_id, target)?;
    if grant.outcome != Outcome::Granted {
        sh.plan_now.notify_one();
    }
    Ok((grant.outcome.label(), Reply::Permit(convert::permit(r.vm_id, &grant))))
}

fn release(sh: &Shared, s: &SessionRef, r: pb::Release) -> Decided {
    let size = convert::resources(r.new_size, "release.new_size")?;
    sh.lock().cluster.release(s, &r.vm_id, size)?;
    ack()
}

fn node_contention(sh: &Shared, s: &SessionRef, c: pb::NodeContention) -> Decided {
    let report = ContentionReport::try_from(c)?;
    let now = sh.now_ms();
    sh.lock().cluster.record_contention(s, report, now)?;
    ack()
}

fn migration_status(sh: &Shared, s: &SessionRef, st: &pb::MigrationStatus) -> Decided {
    let phase = convert::phase(st.phase)?;
    let now = sh.now_ms();
    let reason = cut(&st.reason, sh.config.limits.max_reason_bytes);
    sh.lock().cluster.migration_status(s, st.order_id, phase, reason, now)?;
    info!(node = %s.node, order = st.order_id, phase = phase.name(), reason = %reason.escape_debug(), "migration status");
    sh.metrics.orders.get_or_create(&RequestLabels { kind: "migration", outcome: phase.name() }).inc();
    ack()
}
