//! The gRPC edge: one bidirectional session per node. Requests are decided by
//! the core under one short lock (never held across an await); answers and
//! pushed migration orders go out through the session's queue.

use crate::config::Config;
use crate::convert::{self, EdgeError};
use crate::core::contention::ContentionReport;
use crate::core::error::CoreError;
use crate::core::ledger::Outcome;
use crate::core::vm::VmRegistration;
use crate::core::{Cluster, NodeRegistration, SessionRef};
use crate::metrics::{ErrorLabels, Metrics, RequestLabels};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_message::Body as Reply;

type Outgoing = Result<pb::AllocatorMessage, Status>;

/// The queue towards one live session.
#[derive(Debug)]
struct Outbox {
    session: u64,
    tx: mpsc::Sender<Outgoing>,
    cancel: CancellationToken,
}

#[derive(Debug)]
pub struct State {
    pub cluster: Cluster,
    outboxes: HashMap<String, Outbox>,
}

/// Everything the sessions, the planner and the HTTP endpoints share.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
    pub metrics: Metrics,
    pub config: Config,
    started: Instant,
    pub(crate) plan_now: Notify,
    pub(crate) shutdown: CancellationToken,
}

/// Order ids of this run start above any earlier run's: wall-clock ms << 16
/// leaves room for 65536 orders per millisecond of uptime.
fn order_id_base() -> u64 {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    u64::try_from(ms).unwrap_or(0) << 16
}

impl Shared {
    pub fn new(config: Config, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(State {
                cluster: Cluster::new(config.core()).with_order_ids_from(order_id_base()),
                outboxes: HashMap::new(),
            }),
            metrics: Metrics::new(),
            config,
            started: Instant::now(),
            plan_now: Notify::new(),
            shutdown,
        })
    }

    /// The core's clock: milliseconds since this allocator started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Locks the state. The core never panics while holding it, but if a bug
    /// ever did, the ledger is still the best truth we have: keep serving.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a node for a new session and installs its queue, replacing
    /// (and cancelling) any older session of the same node.
    pub(crate) fn open(
        &self,
        reg: NodeRegistration,
        tx: mpsc::Sender<Outgoing>,
        cancel: CancellationToken,
    ) -> Result<crate::core::Opened, CoreError> {
        let now = self.now_ms();
        let mut st = self.lock();
        let opened = st.cluster.open_session(reg, now)?;
        let ob = Outbox { session: opened.session.id, tx, cancel };
        if let Some(old) = st.outboxes.insert(opened.session.node.clone(), ob) {
            old.cancel.cancel();
            self.metrics.sessions_replaced.inc();
        } else {
            self.metrics.sessions_live.inc();
        }
        self.metrics.sessions_opened.inc();
        Ok(opened)
    }

    /// Ends a session if it still owns its node; true if it did.
    pub(crate) fn close(&self, s: &SessionRef) -> bool {
        let mut st = self.lock();
        if st.outboxes.get(&s.node).is_some_and(|o| o.session == s.id) {
            st.outboxes.remove(&s.node);
            self.metrics.sessions_live.dec();
        }
        st.cluster.close_session(s)
    }

    /// One planning round: fail late orders, plan moves, push the new orders.
    pub fn plan_round(&self) {
        let now = self.now_ms();
        let mut st = self.lock();
        for id in st.cluster.expire_orders(now) {
            warn!(order = id, "migration order failed: deadline passed");
            self.metrics.orders.get_or_create(&RequestLabels { kind: "migration", outcome: "expired" }).inc();
        }
        let orders = st.cluster.plan_and_order(now);
        for o in orders {
            info!(order = o.id, vm = %o.vm, from = %o.source, to = %o.target, reserved = %o.reserved, "migration ordered");
            self.metrics.orders.get_or_create(&RequestLabels { kind: "migration", outcome: "ordered" }).inc();
            let endpoint =
                st.cluster.nodes.get(&o.target).map(|n| n.migration_endpoint.clone()).unwrap_or_default();
            let msg = pb::AllocatorMessage {
                request_id: 0,
                body: Some(Reply::MigrationOrder(convert::order(&o, &endpoint))),
            };
            // The target first: it must know the order before the source's
            // agent asks it to take the VM in.
            for node in [&o.target, &o.source] {
                let sent = st.outboxes.get(node).map(|ob| ob.tx.try_send(Ok(msg.clone())).is_ok());
                if sent != Some(true) {
                    // The order stays open and fails at its deadline.
                    warn!(order = o.id, %node, "could not push migration order: session queue full or gone");
                }
            }
        }
    }

    /// Decides one request of a live session.
    pub fn handle(&self, s: &SessionRef, m: pb::AgentMessage) -> pb::AllocatorMessage {
        let rid = m.request_id;
        let t0 = Instant::now();
        let (kind, result) = self.decide(s, m);
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

    fn decide(
        &self,
        s: &SessionRef,
        m: pb::AgentMessage,
    ) -> (&'static str, Result<(&'static str, Reply), EdgeError>) {
        let ack = || Ok(("ok", Reply::Ack(pb::Ack {})));
        if !m.node.is_empty() && m.node != s.node {
            let e = CoreError::NotOwnNode { own: s.node.clone(), requested: m.node };
            return ("any", Err(e.into()));
        }
        let Some(body) = m.body else {
            return (
                "empty",
                Err(CoreError::invalid(
                    "message",
                    "empty: set one of add_vm, remove_vm, reserve, release, migration_status, \
                     node_contention, ping",
                )
                .into()),
            );
        };
        match body {
            Body::Hello(_) => (
                "hello",
                Err(CoreError::invalid(
                    "hello",
                    "only the first message of a session may be hello; open a new session to re-register",
                )
                .into()),
            ),
            Body::Ping(_) => ("ping", ack()),
            Body::AddVm(a) => (
                "add_vm",
                (|| {
                    let reg = VmRegistration::try_from(a.vm.ok_or(EdgeError::Missing("add_vm.vm"))?)?;
                    self.lock().cluster.add_vm(s, reg)?;
                    ack()
                })(),
            ),
            Body::RemoveVm(r) => (
                "remove_vm",
                (|| {
                    self.lock().cluster.remove_vm(s, &r.vm_id)?;
                    ack()
                })(),
            ),
            Body::Reserve(r) => (
                "reserve",
                (|| {
                    let target = convert::resources(r.target, "reserve.target")?;
                    let grant = self.lock().cluster.reserve(s, &r.vm_id, target)?;
                    if grant.outcome != Outcome::Granted {
                        self.plan_now.notify_one();
                    }
                    Ok((grant.outcome.label(), Reply::Permit(convert::permit(r.vm_id, &grant))))
                })(),
            ),
            Body::Release(r) => (
                "release",
                (|| {
                    let size = convert::resources(r.new_size, "release.new_size")?;
                    self.lock().cluster.release(s, &r.vm_id, size)?;
                    ack()
                })(),
            ),
            Body::NodeContention(c) => (
                "node_contention",
                (|| {
                    let report = ContentionReport::try_from(c)?;
                    let now = self.now_ms();
                    self.lock().cluster.record_contention(s, report, now)?;
                    ack()
                })(),
            ),
            Body::MigrationStatus(st) => (
                "migration_status",
                (|| {
                    let phase = convert::phase(st.phase)?;
                    let now = self.now_ms();
                    self.lock().cluster.migration_status(s, st.order_id, phase, &st.reason, now)?;
                    info!(node = %s.node, order = st.order_id, phase = phase.name(), reason = %st.reason, "migration status");
                    self.metrics
                        .orders
                        .get_or_create(&RequestLabels { kind: "migration", outcome: phase.name() })
                        .inc();
                    ack()
                })(),
            ),
        }
    }
}
