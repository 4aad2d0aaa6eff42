//! [`Shared`]: what the sessions, the planner and the HTTP endpoints share:
//! the core's [`Cluster`] and each live session's queue under one short lock
//! (never held across an await), the metrics and the config. Requests are
//! decided in `crate::requests`; answers and pushed migration orders go out
//! through the session's queue.

use crate::config::Config;
use crate::convert;
use crate::core::error::CoreError;
use crate::core::order_ids::OrderIds;
use crate::core::{Cluster, NodeRegistration, SessionRef};
use crate::metrics::{ErrorLabels, Metrics, RequestLabels};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{error, info, warn};
use vmscale_common::sync::lock;
use vmscale_proto::allocator as pb;
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

/// This run's order ids: signed with the cluster's order key, so that a
/// restarted allocator adopts the orders agents report (and no others); a
/// key of this run's own when the config names none.
fn order_ids(config: &Config) -> OrderIds {
    let started =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let started = u64::try_from(started).unwrap_or(0);
    let Some(path) = &config.order_key else {
        warn!("no order_key: this run signs its migration orders with a key of its own, so after a restart the moves under way are not adopted");
        return OrderIds::one_run();
    };
    match crate::config::read_order_key(path) {
        Ok(key) => OrderIds::new(&key, started),
        Err(e) => {
            // Read when the daemon started (`Config::read_files`); gone since.
            error!("{e}; signing with a key of this run's own");
            OrderIds::one_run()
        }
    }
}

impl Shared {
    pub fn new(config: Config, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(State {
                cluster: Cluster::with_order_ids(config.core(), order_ids(&config)),
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
        lock(&self.state)
    }

    /// The state as `/state` shows it, pretty JSON. Only the copy is made
    /// under the lock; the encoding (the slow part) runs after it.
    pub fn state_json(&self) -> serde_json::Result<String> {
        let cluster = self.lock().cluster.clone();
        serde_json::to_string_pretty(&cluster)
    }

    /// The metrics as `/metrics` shows them; the ledger's figures are read
    /// from a copy taken under the lock.
    pub fn metrics_text(&self) -> String {
        let cluster = self.lock().cluster.clone();
        self.metrics.render(&cluster)
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
        // Forged order ids among them: a hostile or misconfigured agent.
        for r in &opened.refused {
            self.metrics
                .errors
                .get_or_create(&ErrorLabels { kind: "hello_vm", error: r.error.label() })
                .inc();
        }
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
}
