//! The node supervisor: one allocator link, one loop per VM. It follows the
//! VM source's list: a new VM gets a QMP connection and a loop, a VM that left
//! gets its loop stopped and its reservation released.

use crate::allocator_link::{self, LinkConfig, Registry, Session};
use crate::contention::{self, ContentionConfig, ContentionNode, Hypervisors};
use crate::core::policy::{Policy, Size};
use crate::metrics::Metrics;
use crate::qmp::{ClientConfig, Endpoint, HotplugConfig, Hypervisor, QmpClient, QmpVm};
use crate::vm_loop::{self, StatusMap};
use crate::vms::{MemoryMode, VmSpec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
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

    let mut running: HashMap<String, (VmSpec, CancellationToken)> = HashMap::new();
    loop {
        let wanted: HashMap<String, VmSpec> =
            vms.borrow_and_update().iter().map(|v| (v.id.clone(), v.clone())).collect();
        // Stop loops for VMs that left or changed; a changed VM restarts below.
        let gone: Vec<String> = running
            .iter()
            .filter(|(id, (spec, _))| wanted.get(*id) != Some(spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some((_, token)) = running.remove(&id) {
                token.cancel();
            }
            if !wanted.contains_key(&id) {
                handles.registry.remove(&id);
                handles.status.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                let session = handles.session.borrow().clone();
                if let Some(s) = session {
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
            tokio::spawn(supervise_vm(spec.clone(), node, cfg.clone(), hvs, token.clone()).instrument(span));
            running.insert(id, (spec, token));
        }

        tokio::select! {
            () = cancel.cancelled() => return,
            r = vms.changed() => if r.is_err() { cancel.cancelled().await; return },
            Some(m) = pushed_rx.recv() => refuse_order(&handles, m).await,
        }
    }
}

/// Migration orders are carried out by a later part of the agent; until then
/// they are refused at once so the allocator frees the target's hold now
/// rather than at the order's deadline.
async fn refuse_order(handles: &NodeHandles, m: pb::AllocatorMessage) {
    let Some(Reply::MigrationOrder(o)) = m.body else { return };
    warn!(order = o.order_id, vm = %o.vm_id, target = %o.target_node, "migration order refused: this agent does not migrate VMs yet");
    let session = handles.session.borrow().clone();
    if let Some(s) = session {
        let body = Body::MigrationStatus(pb::MigrationStatus {
            order_id: o.order_id,
            phase: pb::migration_status::Phase::Failed as i32,
            reason: "this agent does not carry out migrations yet".into(),
        });
        if let Err(e) = s.call(body).await {
            warn!(order = o.order_id, "cannot report the refused order: {e}");
        }
    }
}

/// Keeps a VM's loop running across QMP reconnects until `cancel`.
async fn supervise_vm(
    spec: VmSpec,
    node: vm_loop::Node,
    cfg: NodeConfig,
    hypervisors: Hypervisors,
    cancel: CancellationToken,
) {
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
                vm_loop::run(spec.clone(), vm, node.clone(), last_permit, lost.clone()).await;
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
