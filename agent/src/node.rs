//! The node supervisor: one allocator link, one loop per VM. It follows the
//! VM source's list plus the VMs moved here: a new VM gets a QMP connection
//! and a loop, a VM that left gets its loop stopped and its reservation
//! released. Migration orders go to the node's mover (as the source) or to
//! its migration service (as the target).

use crate::allocator_link::{self, LinkConfig, Registry, Session};
use crate::contention::{self, ContentionConfig, ContentionNode, Hypervisors};
use crate::core::policy::{Policy, Size};
use crate::metrics::Metrics;
use crate::migration::mover::{self, Ended, MoverNode, VmNow};
use crate::migration::service::{self, TargetNode};
use crate::migration::settings::MigrationSettings;
use crate::qmp::{ClientConfig, Endpoint, HotplugConfig, Hypervisor, QmpClient, QmpVm};
use crate::vm_loop::{self, MoveGate, StatusMap};
use crate::vms::{MemoryMode, VmSpec};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};
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
    /// Run-queue delay reports (host eBPF).
    pub contention: ContentionConfig,
    /// Where `/proc` is: vCPU threads' process and cgroup for `cpu.max`.
    pub proc_root: PathBuf,
    /// Live migration: taking VMs in, and how moves out run.
    pub migration: MigrationSettings,
}

/// How long a VM's loop may take to end once cancelled.
const LOOP_STOP_TIMEOUT: Duration = Duration::from_secs(5);

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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shared with the HTTP endpoints.
#[derive(Debug, Clone)]
pub struct NodeHandles {
    pub metrics: Arc<Metrics>,
    pub status: StatusMap,
    pub registry: Arc<Registry>,
    pub session: watch::Receiver<Session>,
    pub reporter: Option<crate::vms::kube::status::StatusReporter>,
}

/// Runs until `cancel`, following `vms`.
pub async fn run(
    cfg: NodeConfig,
    mut vms: watch::Receiver<Vec<VmSpec>>,
    handles: NodeHandles,
    session_tx: watch::Sender<Session>,
    cancel: CancellationToken,
) {
    let (pushed_tx, mut pushed_rx) = mpsc::unbounded_channel();
    tokio::spawn(allocator_link::run(
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

    // Taking VMs in: only with a listen address.
    let target = match cfg.migration.listen {
        Some(listen) => {
            let t = TargetNode::new(cfg.migration.clone(), handles.metrics.clone());
            let (adopted, killed) = t.recover().await;
            info!(%listen, adopted, killed, "taking VMs in by live migration");
            let svc = t.clone();
            let stop = cancel.child_token();
            tokio::spawn(async move {
                if let Err(e) = service::serve(svc, listen, stop).await {
                    tracing::error!("{e}; this node takes no VMs in");
                }
            });
            Some(t)
        }
        None => None,
    };
    let mut adopted = match &target {
        Some(t) => t.adopted(),
        None => watch::channel(Vec::new()).1,
    };
    let mover = MoverNode {
        session: handles.session.clone(),
        registry: handles.registry.clone(),
        status: handles.status.clone(),
        proc_root: cfg.proc_root.clone(),
        transfer: cfg.migration.transfer.clone(),
        state_dir: cfg.migration.state_dir.clone(),
        metrics: handles.metrics.clone(),
    };
    let live: LiveMap = Arc::default();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(String, Ended)>();
    // VMs that moved away, with the spec they had here: not scaled here
    // while the list still names them so (a changed entry is a new VM);
    // and VMs whose interrupted move is not settled yet (not scaled until
    // it is).
    let mut moved_away: HashMap<String, Option<VmSpec>> = HashMap::new();
    let mut held: HashSet<String> = HashSet::new();
    for record in mover::unsettled(&cfg.migration.state_dir) {
        held.insert(record.vm.clone());
        let (m, tx) = (mover.clone(), ended_tx.clone());
        tokio::spawn(async move {
            let ended = mover::recover(&m, &record).await;
            let _ = tx.send((record.vm.clone(), ended));
        });
    }

    let mut running: HashMap<String, (VmSpec, CancellationToken, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    loop {
        let listed = vms.borrow_and_update().clone();
        // An entry the list changed names a new VM; one it no longer names
        // stays (a VM that came and went again by migration was never listed).
        moved_away.retain(|id, was| match listed.iter().find(|v| v.id == *id) {
            Some(v) => was.as_ref().is_none_or(|w| w == v),
            None => true,
        });
        let mut wanted: HashMap<String, VmSpec> = listed
            .into_iter()
            .filter(|v| !moved_away.contains_key(&v.id))
            .map(|v| (v.id.clone(), v))
            .collect();
        // A VM moved here runs on the QEMU this agent started, whatever the
        // list says.
        for v in adopted.borrow_and_update().iter() {
            moved_away.remove(&v.id);
            wanted.insert(v.id.clone(), v.clone());
        }
        wanted.retain(|id, _| !held.contains(id));
        // Stop loops for VMs that left or changed; a changed VM restarts below.
        let gone: Vec<String> = running
            .iter()
            .filter(|(id, (spec, _, _))| wanted.get(*id) != Some(spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some((_, token, task)) = running.remove(&id) {
                token.cancel();
                // The loop publishes the VM's size on every turn: only once it
                // has ended may its entries go, or a last turn puts them back
                // (and the next hello would register a VM that left).
                if tokio::time::timeout(LOOP_STOP_TIMEOUT, task).await.is_err() {
                    warn!(vm = %id, "the VM's loop did not stop within {LOOP_STOP_TIMEOUT:?}");
                }
            }
            lock(&live).remove(&id);
            if !wanted.contains_key(&id) {
                handles.registry.remove(&id);
                handles.status.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                let session = handles.session.borrow().clone();
                // A VM that moved away is on its target's ledger now; one
                // held for recovery is settled by its report.
                let ours = !moved_away.contains_key(&id) && !held.contains(&id);
                if let Some(s) = session.filter(|_| ours) {
                    if let Err(e) = s.call(Body::RemoveVm(pb::RemoveVm { vm_id: id.clone() })).await {
                        warn!(vm = %id, "cannot release the VM's reservation: {e}");
                    }
                }
                info!(vm = %id, "VM left the node");
            }
        }
        for (id, spec) in wanted {
            if running.contains_key(&id) {
                continue;
            }
            let token = cancel.child_token();
            let node = vm_loop::Node {
                session: handles.session.clone(),
                registry: handles.registry.clone(),
                metrics: handles.metrics.clone(),
                status: handles.status.clone(),
                default_policy: cfg.policy.clone(),
                reporter: handles.reporter.clone(),
                proc_root: cfg.proc_root.clone(),
            };
            let span = tracing::info_span!("vm", vm = %id);
            let hvs = hypervisors.clone();
            let (gate, moving, quiet) = MoveGate::new();
            lock(&live).insert(id.clone(), Live { spec: spec.clone(), client: None, moving, quiet });
            let sup = Supervised {
                spec: spec.clone(),
                node,
                cfg: cfg.clone(),
                hypervisors: hvs,
                gate,
                live: live.clone(),
            };
            let task = tokio::spawn(supervise_vm(sup, token.clone()).instrument(span));
            running.insert(id, (spec, token, task));
        }

        tokio::select! {
            () = cancel.cancelled() => return,
            r = vms.changed() => if r.is_err() { cancel.cancelled().await; return },
            Ok(()) = adopted.changed() => {}
            Some(m) = pushed_rx.recv() => {
                let Some(Reply::MigrationOrder(o)) = m.body else { continue };
                on_order(o, &cfg, target.as_deref(), &mover, &live, &ended_tx);
            }
            Some((vm, ended)) = ended_rx.recv() => {
                held.remove(&vm);
                if ended == Ended::MovedAway {
                    let spec = running.get(&vm).map(|(s, _, _)| s.clone());
                    moved_away.insert(vm.clone(), spec);
                    if let Some(t) = &target {
                        t.forget(&vm);
                    }
                }
            }
        }
    }
}

/// An order pushed by the allocator: this node is its target (accept that
/// VM from the source's agent) or its source (move the VM).
fn on_order(
    o: pb::MigrationOrder,
    cfg: &NodeConfig,
    target: Option<&TargetNode>,
    mover: &MoverNode,
    live: &LiveMap,
    ended_tx: &mpsc::UnboundedSender<(String, Ended)>,
) {
    if o.target_node == cfg.link.node {
        match target {
            Some(t) => {
                info!(order = o.order_id, vm = %o.vm_id, from = %o.source_node, "a VM will move here");
                t.authorise(o.order_id, &o.vm_id);
            }
            None => warn!(order = o.order_id, "ordered to take a VM in, but migration.listen is not set"),
        }
        return;
    }
    if o.source_node != cfg.link.node {
        warn!(order = o.order_id, source = %o.source_node, target = %o.target_node, "an order for other nodes; ignored");
        return;
    }
    let now = lock(live).get(&o.vm_id).and_then(|l| {
        let client = l.client.clone().filter(QmpClient::is_connected)?;
        Some(VmNow { spec: l.spec.clone(), client, moving: l.moving.clone(), quiet: l.quiet.clone() })
    });
    let (m, tx) = (mover.clone(), ended_tx.clone());
    tokio::spawn(async move {
        let ended = m.move_out(&o, now).await;
        let _ = tx.send((o.vm_id.clone(), ended));
    });
}

/// One VM's supervision: its spec and what it shares with the node.
struct Supervised {
    spec: VmSpec,
    node: vm_loop::Node,
    cfg: NodeConfig,
    hypervisors: Hypervisors,
    gate: MoveGate,
    live: LiveMap,
}

/// Keeps a VM's loop running across QMP reconnects until `cancel`.
async fn supervise_vm(sup: Supervised, cancel: CancellationToken) {
    let Supervised { spec, node, cfg, hypervisors, gate, live } = sup;
    let endpoint: Endpoint = match spec.qmp.parse() {
        Ok(e) => e,
        Err(e) => {
            warn!("VM not scaled: {e}");
            return;
        }
    };
    let hotplug = HotplugConfig {
        virtio_mem_id: match &spec.memory {
            MemoryMode::VirtioMem { device } => Some(device.clone()),
            MemoryMode::Dimm { .. } => None,
        },
        unplug_timeout: cfg.unplug_timeout,
        ..HotplugConfig::default()
    };
    let mut wait = Duration::from_millis(100);
    let mut last_permit: Option<Size> = None;
    loop {
        let client = tokio::select! {
            () = cancel.cancelled() => return,
            c = QmpClient::connect(&endpoint, cfg.qmp.clone()) => c,
        };
        match client {
            Ok(client) => {
                wait = Duration::from_millis(100);
                if let Some(l) = lock(&live).get_mut(&spec.id) {
                    l.client = Some(client.clone());
                }
                let vm = Arc::new(QmpVm::new(client, hotplug.clone()));
                // The contention task asks this connection for vCPU threads.
                let hv: Arc<dyn Hypervisor> = vm.clone();
                hypervisors.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.id.clone(), hv.clone());
                let lost = cancel.child_token();
                let watch_vm = vm.clone();
                let stop = lost.clone();
                // QEMU went away: end this loop and connect again.
                tokio::spawn(async move {
                    while !stop.is_cancelled() && watch_vm.client().is_connected() {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                    stop.cancel();
                });
                vm_loop::run(spec.clone(), vm, node.clone(), last_permit, gate.clone(), lost.clone()).await;
                lost.cancel();
                {
                    // Only our own entry: a restarted supervisor may have put its own.
                    let mut hvs = hypervisors.lock().unwrap_or_else(|p| p.into_inner());
                    if hvs.get(&spec.id).is_some_and(|h| Arc::ptr_eq(h, &hv)) {
                        hvs.remove(&spec.id);
                    }
                }
                last_permit = node
                    .registry
                    .snapshot()
                    .into_iter()
                    .find(|(id, _)| *id == spec.id)
                    .map(|(_, r)| r.permitted);
                if cancel.is_cancelled() {
                    return;
                }
                warn!("lost QMP connection to {endpoint}; reconnecting");
            }
            Err(e) => {
                warn!("cannot connect to QMP at {endpoint}: {e}");
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
