//! The node supervisor: one allocator link, one loop per VM. It follows the
//! VM source's list plus the VMs moved here: a new VM gets a QMP connection
//! and a loop, a VM that left gets its loop stopped and its reservation
//! released. Migration orders go to the node's mover (as the source) or to
//! its migration service (as the target).
//!
//! - [`inventory`]: the pure decisions (which loops run, which stop, which
//!   reservations go back) over what the node knows of its VMs.
//! - [`route`]: what this node is for a migration order.
//! - [`contention`]: run-queue delay of the VMs' vCPU threads (host eBPF),
//!   reported to the allocator.
//! - this module: the async shell that reads the VM source, the adopted VMs,
//!   the allocator's orders and the moves' ends, and carries out the plans.

pub mod contention;
pub mod inventory;
pub mod route;
mod supervisor;

use crate::core::policy::Policy;
use crate::links::allocator::{self, LinkConfig, Registry, Session};
use crate::metrics::Metrics;
use crate::migration::mover::{self, Ended, MoverNode, VmNow};
use crate::migration::service::{self, TargetNode};
use crate::migration::settings::MigrationSettings;
use crate::qmp::{ClientConfig, QmpClient};
use crate::vm_loop::{self, MoveGate, StatusMap};
use crate::vms::VmSpec;
use contention::{ContentionConfig, ContentionNode, Hypervisors};
use inventory::{reconcile, Inventory, Stop};
use route::{route, Role};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use supervisor::{supervise_vm, Supervised};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};
use vmscale_common::error::chain;
use vmscale_common::sync::lock;
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_message::Body as Reply;

/// What the supervisor needs; built by `main` from the config.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub link: LinkConfig,
    pub policy: Policy,
    pub qmp: ClientConfig,
    pub unplug_timeout: Duration,
    /// The memory backend of plugged DIMMs.
    pub dimm_backend: crate::qmp::DimmBackend,
    /// Run-queue delay reports (host eBPF).
    pub contention: ContentionConfig,
    /// Where `/proc` is: vCPU threads' process and cgroup for `cpu.max`.
    pub proc_root: PathBuf,
    /// Live migration: taking VMs in, and how moves out run.
    pub migration: MigrationSettings,
    /// TLS (or, insecure, plain text) towards informants on TCP.
    pub informants: crate::links::dial::TcpSecurity,
}

/// How long a VM's loop may take to end once cancelled.
const LOOP_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long all loops together may take to end when the agent stops: well
/// inside the 5 s a stopping agent is given (Kubernetes' grace period is 30 s).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// A VM's loop as the mover needs it: its live QMP connection (QEMU serves
/// one client, so a move uses the loop's) and its move gate.
#[derive(Debug)]
struct Live {
    spec: VmSpec,
    client: Option<QmpClient>,
    moving: watch::Sender<bool>,
    quiet: watch::Receiver<bool>,
}

type LiveMap = Arc<Mutex<HashMap<String, Live>>>;

/// Shared with the HTTP endpoints.
#[derive(Debug, Clone)]
pub struct NodeHandles {
    pub metrics: Arc<Metrics>,
    pub status: StatusMap,
    pub registry: Arc<Registry>,
    pub session: watch::Receiver<Session>,
    pub reporter: Option<crate::vms::kube::status::StatusReporter>,
}

impl NodeHandles {
    /// Empty metrics, status and registry over the session the node's
    /// allocator link publishes on.
    pub fn new(
        session: watch::Receiver<Session>,
        reporter: Option<crate::vms::kube::status::StatusReporter>,
    ) -> Self {
        NodeHandles {
            metrics: Arc::default(),
            status: Arc::default(),
            registry: Arc::default(),
            session,
            reporter,
        }
    }
}

/// Runs until `cancel`, following `vms`.
pub async fn run(
    cfg: NodeConfig,
    mut vms: watch::Receiver<Vec<VmSpec>>,
    handles: NodeHandles,
    session_tx: watch::Sender<Session>,
    cancel: CancellationToken,
) {
    let (mut pushed_rx, hypervisors) = start_links(&cfg, &handles, session_tx, &cancel);
    let target = start_target(&cfg, &handles, &cancel).await;
    let mut adopted = match &target {
        Some(t) => t.adopted(),
        None => watch::channel(Vec::new()).1,
    };
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(String, Ended)>();
    let mut node = Shell::new(cfg, handles, hypervisors, target, ended_tx, cancel.clone());
    node.recover_moves();
    loop {
        node.inv.listed = vms.borrow_and_update().clone();
        node.inv.adopted = adopted.borrow_and_update().clone();
        node.turn().await;
        tokio::select! {
            () = cancel.cancelled() => break,
            r = vms.changed() => if r.is_err() { cancel.cancelled().await; break },
            Ok(()) = adopted.changed() => {}
            Some(m) = pushed_rx.recv() => {
                if let Some(Reply::MigrationOrder(o)) = m.body {
                    node.on_order(o);
                }
            }
            Some((vm, ended)) = ended_rx.recv() => node.settled(&vm, ended),
        }
    }
    node.shutdown().await;
}

/// Messages the allocator pushes (migration orders).
type Pushed = mpsc::Receiver<pb::AllocatorMessage>;

/// Starts the allocator link and the contention reports.
fn start_links(
    cfg: &NodeConfig,
    handles: &NodeHandles,
    session_tx: watch::Sender<Session>,
    cancel: &CancellationToken,
) -> (Pushed, Hypervisors) {
    let (pushed_tx, pushed_rx) = mpsc::channel(vmscale_allocator_client::PUSHED_QUEUE);
    tokio::spawn(allocator::run(
        cfg.link.clone(),
        handles.registry.clone(),
        session_tx,
        pushed_tx,
        cancel.child_token(),
    ));
    let hypervisors: Hypervisors = Arc::default();
    let contention_node = ContentionNode {
        hypervisors: hypervisors.clone(),
        registry: handles.registry.clone(),
        session: handles.session.clone(),
        metrics: handles.metrics.clone(),
    };
    tokio::spawn(contention::run(
        cfg.contention.clone(),
        cfg.proc_root.clone(),
        contention_node,
        cancel.child_token(),
    ));
    (pushed_rx, hypervisors)
}

/// Taking VMs in: only with a listen address. VMs taken in before a restart
/// are adopted again before the first turn.
async fn start_target(
    cfg: &NodeConfig,
    handles: &NodeHandles,
    cancel: &CancellationToken,
) -> Option<Arc<TargetNode>> {
    let listen = cfg.migration.listen?;
    let t = TargetNode::new(cfg.migration.clone(), cfg.informants.tls.clone(), handles.metrics.clone());
    let (adopted, killed) = t.recover().await;
    info!(%listen, adopted, killed, "taking VMs in by live migration");
    let svc = t.clone();
    let stop = cancel.child_token();
    // Agents dial each other with the node's own certificate; a node whose
    // files cannot be read takes nothing in rather than serve plain text.
    let tls = match cfg.informants.tls.as_ref().map(vmscale_common::tls::Tls::load).transpose() {
        Ok(tls) => tls,
        Err(e) => {
            let e = vmscale_common::error::Chain(&e);
            tracing::error!("cannot read [tls] for the migration service: {e}; this node takes no VMs in");
            return None;
        }
    };
    tokio::spawn(async move {
        if let Err(e) = service::serve(svc, listen, tls, stop).await {
            tracing::error!("{}; this node takes no VMs in", vmscale_common::error::Chain(&e));
        }
    });
    Some(t)
}

/// The node's async state around its [`Inventory`]: the loops' tasks and
/// what they share.
struct Shell {
    cfg: NodeConfig,
    handles: NodeHandles,
    hypervisors: Hypervisors,
    target: Option<Arc<TargetNode>>,
    mover: MoverNode,
    live: LiveMap,
    loops: HashMap<String, (CancellationToken, JoinHandle<()>)>,
    inv: Inventory,
    ended_tx: mpsc::UnboundedSender<(String, Ended)>,
    cancel: CancellationToken,
}

impl Shell {
    fn new(
        cfg: NodeConfig,
        handles: NodeHandles,
        hypervisors: Hypervisors,
        target: Option<Arc<TargetNode>>,
        ended_tx: mpsc::UnboundedSender<(String, Ended)>,
        cancel: CancellationToken,
    ) -> Self {
        let mover = MoverNode {
            session: handles.session.clone(),
            registry: handles.registry.clone(),
            status: handles.status.clone(),
            proc_root: cfg.proc_root.clone(),
            transfer: cfg.migration.transfer.clone(),
            template: cfg.migration.template(),
            security: cfg.informants.clone(),
            stream_tls: cfg.migration.stream_tls(cfg.informants.tls.is_some()),
            state_dir: cfg.migration.state_dir.clone(),
            metrics: handles.metrics.clone(),
        };
        let (live, loops, inv) = (LiveMap::default(), HashMap::new(), Inventory::default());
        Shell { cfg, handles, hypervisors, target, mover, live, loops, inv, ended_tx, cancel }
    }

    /// Moves interrupted by a restart: their VMs are held (not scaled)
    /// until each is settled.
    fn recover_moves(&mut self) {
        for record in mover::unsettled(&self.cfg.migration.state_dir) {
            self.inv.held.insert(record.vm.clone());
            let (m, tx) = (self.mover.clone(), self.ended_tx.clone());
            tokio::spawn(async move {
                let ended = mover::recover(&m, &record).await;
                let _ = tx.send((record.vm.clone(), ended));
            });
        }
    }

    /// Carries out what the inventory asks for now.
    async fn turn(&mut self) {
        let plan = reconcile(&self.inv);
        self.inv.apply(&plan);
        for (id, why) in plan.stop {
            self.stop(&id, why).await;
        }
        for spec in plan.start {
            self.start(spec);
        }
    }

    async fn stop(&mut self, id: &str, why: Stop) {
        if let Some((token, task)) = self.loops.remove(id) {
            token.cancel();
            // The loop publishes the VM's size on every turn: only once it
            // has ended may its entries go, or a last turn puts them back
            // (and the next hello would register a VM that left).
            if tokio::time::timeout(LOOP_STOP_TIMEOUT, task).await.is_err() {
                warn!(vm = %id, "the VM's loop did not stop within {LOOP_STOP_TIMEOUT:?}");
            }
        }
        lock(&self.live).remove(id);
        if why == Stop::Restart {
            return;
        }
        self.handles.registry.remove(id);
        lock(&self.handles.status).remove(id);
        let session = self.handles.session.borrow().clone();
        if let Some(s) = session.filter(|_| why == Stop::Release) {
            if let Err(e) = s.call(Body::RemoveVm(pb::RemoveVm { vm_id: id.to_owned() })).await {
                warn!(vm = %id, "cannot release the VM's reservation: {}", chain(&e));
            }
        }
        info!(vm = %id, "VM left the node");
    }

    fn start(&mut self, spec: VmSpec) {
        let token = self.cancel.child_token();
        let node = vm_loop::LoopContext {
            session: self.handles.session.clone(),
            registry: self.handles.registry.clone(),
            metrics: self.handles.metrics.clone(),
            status: self.handles.status.clone(),
            default_policy: self.cfg.policy.clone(),
            reporter: self.handles.reporter.clone(),
            proc_root: self.cfg.proc_root.clone(),
            informants: self.cfg.informants.clone(),
        };
        let span = tracing::info_span!("vm", vm = %spec.id);
        let (gate, moving, quiet) = MoveGate::new();
        lock(&self.live).insert(spec.id.clone(), Live { spec: spec.clone(), client: None, moving, quiet });
        let sup = Supervised {
            spec: spec.clone(),
            node,
            cfg: self.cfg.clone(),
            hypervisors: self.hypervisors.clone(),
            gate,
            live: self.live.clone(),
        };
        let task = tokio::spawn(supervise_vm(sup, token.clone()).instrument(span));
        self.loops.insert(spec.id, (token, task));
    }

    /// The agent stops: every loop (cancelled with the node's token) is
    /// waited for, so that none is cut off mid-operation. Nothing is
    /// released: the VMs keep running, and the next agent registers them.
    async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_TIMEOUT;
        for (id, (token, task)) in self.loops {
            token.cancel();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                warn!(vm = %id, "the VM's loop did not stop within {SHUTDOWN_TIMEOUT:?} of the shutdown");
            }
        }
    }

    /// An order pushed by the allocator: this node is its target (accept that
    /// VM from the source's agent) or its source (move the VM).
    fn on_order(&self, o: pb::MigrationOrder) {
        match (route(&o, &self.cfg.link.node), &self.target) {
            (Role::Target, Some(t)) => {
                info!(order = o.order_id, vm = %o.vm_id, from = %o.source_node, "a VM will move here");
                t.authorise(o.order_id, &o.vm_id, &o.source_node);
            }
            (Role::Target, None) => {
                warn!(order = o.order_id, "ordered to take a VM in, but migration.listen is not set");
            }
            (Role::Neither, _) => {
                warn!(order = o.order_id, source = %o.source_node, target = %o.target_node, "an order for other nodes; ignored");
            }
            (Role::Source, _) => self.move_out(o),
        }
    }

    /// Moves a VM out with its loop's connection; without one (the VM does
    /// not run here, or its QMP is down) the mover reports the order failed.
    /// Only a move that had the VM ends anything here: an order for a VM
    /// held by a restart's recovery must not release the hold while the
    /// recovery still uses its QEMU.
    fn move_out(&self, o: pb::MigrationOrder) {
        let now = self.inv.runs(&o.vm_id).then(|| self.vm_now(&o.vm_id)).flatten();
        let had_vm = now.is_some();
        let (m, tx) = (self.mover.clone(), self.ended_tx.clone());
        tokio::spawn(async move {
            let ended = m.move_out(&o, now).await;
            if had_vm {
                let _ = tx.send((o.vm_id.clone(), ended));
            }
        });
    }

    fn vm_now(&self, vm: &str) -> Option<VmNow> {
        let live = lock(&self.live);
        let l = live.get(vm)?;
        let client = l.client.clone().filter(QmpClient::is_connected)?;
        Some(VmNow { spec: l.spec.clone(), client, moving: l.moving.clone(), quiet: l.quiet.clone() })
    }

    /// A move ended: a VM that moved away is forgotten by the migration
    /// target too (it may have been adopted here before).
    fn settled(&mut self, vm: &str, ended: Ended) {
        if self.inv.settled(vm, ended) {
            if let Some(t) = &self.target {
                t.forget(vm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::Size;
    use crate::links::allocator::fake::ScriptedSession;
    use crate::links::allocator::AllocatorSession;
    use crate::vms::tests::spec;

    /// A shell over `session`; the sender keeps the session published.
    fn shell(session: Arc<ScriptedSession>) -> (Shell, watch::Sender<Session>) {
        let session: Arc<dyn AllocatorSession> = session;
        let (session_tx, session) = watch::channel(Some(session));
        let handles = NodeHandles::new(session, None);
        let cfg = NodeConfig {
            link: LinkConfig {
                addr: "http://127.0.0.1:1".into(),
                tls: None,
                node: "node-a".into(),
                capacity: Size::new(4000, 4 << 30),
                migration_endpoint: String::new(),
                retry_base: Duration::from_millis(50),
                retry_max: Duration::from_millis(500),
            },
            policy: Policy::default(),
            qmp: ClientConfig::default(),
            unplug_timeout: Duration::from_millis(300),
            dimm_backend: crate::qmp::DimmBackend::Ram,
            contention: ContentionConfig::default(),
            proc_root: "/proc".into(),
            migration: MigrationSettings::default(),
            informants: Default::default(),
        };
        let (ended_tx, _) = mpsc::unbounded_channel();
        let shell =
            Shell::new(cfg, handles, Hypervisors::default(), None, ended_tx, CancellationToken::new());
        (shell, session_tx)
    }

    fn removed(calls: &[Body]) -> Vec<&str> {
        calls
            .iter()
            .filter_map(|b| match b {
                Body::RemoveVm(r) => Some(r.vm_id.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The shell sends `RemoveVm` exactly for the VMs the inventory releases:
    /// not for a restart, not for a VM that moved away, not on shutdown.
    #[tokio::test]
    async fn only_a_vm_that_left_releases_its_reservation() {
        let session = ScriptedSession::granting();
        let (mut node, _session) = shell(session.clone());
        node.inv.listed = vec![spec("a"), spec("b"), spec("c")];
        node.turn().await;
        assert_eq!(node.loops.len(), 3);
        assert!(lock(&node.live).contains_key("a"));

        node.inv.listed[0].max_cus = 16;
        node.settled("b", Ended::MovedAway);
        node.turn().await;
        assert!(removed(&session.calls()).is_empty(), "{:?}", session.calls());
        assert!(!node.loops.contains_key("b") && !lock(&node.live).contains_key("b"));
        assert!(node.loops.contains_key("a"), "restarted with its new spec");

        node.inv.listed.retain(|v| v.id != "c");
        node.turn().await;
        assert_eq!(removed(&session.calls()), ["c"]);
        assert!(!lock(&node.handles.status).contains_key("c"));

        node.shutdown().await;
        assert_eq!(removed(&session.calls()), ["c"], "a stopping agent releases nothing");
    }

    /// An order naming this node the source of a VM it does not run (gone,
    /// or held while a restart's recovery settles its last move): the mover
    /// gets no VM and reports the order failed; nothing ends here, so a held
    /// VM stays held (its loop must not start while the recovery uses its
    /// QEMU).
    #[tokio::test]
    async fn an_order_for_a_vm_not_running_here_is_reported_failed() {
        let session = ScriptedSession::granting();
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
        let (mut node, _session) = shell(session.clone());
        node.ended_tx = ended_tx;
        node.inv.held.insert("held".into());
        for (order_id, vm) in [(7, "gone"), (8, "held")] {
            node.on_order(pb::MigrationOrder {
                order_id,
                vm_id: vm.into(),
                source_node: "node-a".into(),
                target_node: "node-b".into(),
                target_endpoint: "http://127.0.0.1:1".into(),
                ..Default::default()
            });
        }
        let reported = |id: u64| {
            session.calls().iter().any(|b| matches!(b, Body::MigrationStatus(r) if r.order_id == id))
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !(reported(7) && reported(8)) {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", session.calls());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(ended_rx.try_recv().is_err(), "a move without its VM ends nothing here");
        assert!(node.inv.held.contains("held") && node.inv.moved_away.is_empty());
    }
}
