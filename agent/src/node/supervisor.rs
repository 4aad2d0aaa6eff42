//! One VM's supervision: connects to its QEMU and keeps its scaling loop
//! running across QMP reconnects until the node stops it.

use super::{LiveMap, NodeConfig};
use crate::core::policy::Size;
use crate::node::contention::Hypervisors;
use crate::qmp::{Endpoint, HotplugConfig, QmpClient, QmpVm, VcpuThreads};
use crate::vm_loop::{self, MoveGate};
use crate::vms::{MemoryMode, VmSpec};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use vmscale_common::sync::lock;

/// First wait before connecting again after a failed connection.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between connection attempts.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often a connection is checked for QEMU having gone away.
const LIVENESS_POLL: Duration = Duration::from_millis(500);

/// One VM's supervision: its spec and what it shares with the node.
pub(super) struct Supervised {
    pub spec: VmSpec,
    pub node: vm_loop::LoopContext,
    pub cfg: NodeConfig,
    pub hypervisors: Hypervisors,
    pub gate: MoveGate,
    pub live: LiveMap,
}

/// Keeps a VM's loop running across QMP reconnects until `cancel`.
pub(super) async fn supervise_vm(sup: Supervised, cancel: CancellationToken) {
    let endpoint: Endpoint = match sup.spec.qmp.parse() {
        Ok(e) => e,
        Err(e) => {
            warn!("VM not scaled: {e}");
            return;
        }
    };
    let hotplug = HotplugConfig {
        virtio_mem_id: match &sup.spec.memory {
            MemoryMode::VirtioMem { device } => Some(device.clone()),
            MemoryMode::Dimm { .. } => None,
        },
        unplug_timeout: sup.cfg.unplug_timeout,
        dimm_backend: sup.cfg.dimm_backend,
        ..HotplugConfig::default()
    };
    let backoff = vmscale_common::backoff::Backoff::new(RETRY_FIRST, RETRY_MAX);
    let mut failures: u32 = 0;
    let mut last_permit: Option<Size> = None;
    loop {
        let client = tokio::select! {
            () = cancel.cancelled() => return,
            c = QmpClient::connect(&endpoint, sup.cfg.qmp.clone()) => c,
        };
        match client {
            Ok(client) => {
                failures = 0;
                let vm = Arc::new(QmpVm::new(client, hotplug.clone()));
                last_permit = run_connected(&sup, vm, last_permit, &cancel).await;
                if cancel.is_cancelled() {
                    return;
                }
                warn!("lost QMP connection to {endpoint}; reconnecting");
            }
            Err(e) => {
                warn!("cannot connect to QMP at {endpoint}: {e}");
                failures = failures.saturating_add(1);
            }
        }
        // After a lost connection (no failure yet) the first wait too.
        let wait = backoff.jittered(failures.max(1), vmscale_common::backoff::seed_of(&sup.spec.id));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Runs the VM's loop over one QMP connection until it is lost or `cancel`;
/// returns the permit the VM held then, for the next connection's loop.
async fn run_connected(
    sup: &Supervised,
    vm: Arc<QmpVm>,
    last_permit: Option<Size>,
    cancel: &CancellationToken,
) -> Option<Size> {
    let id = &sup.spec.id;
    if let Some(l) = lock(&sup.live).get_mut(id) {
        l.client = Some(vm.client().clone());
    }
    // The contention task asks this connection for vCPU threads.
    let hv: Arc<dyn VcpuThreads> = vm.clone();
    lock(&sup.hypervisors).insert(id.clone(), hv.clone());
    let lost = cancel.child_token();
    tokio::spawn(end_when_qemu_goes(vm.clone(), lost.clone()));
    vm_loop::run(sup.spec.clone(), vm, sup.node.clone(), last_permit, sup.gate.clone(), lost.clone()).await;
    lost.cancel();
    {
        // Only our own entry: a restarted supervisor may have put its own.
        let mut hvs = lock(&sup.hypervisors);
        if hvs.get(id).is_some_and(|h| Arc::ptr_eq(h, &hv)) {
            hvs.remove(id);
        }
    }
    sup.node.registry.snapshot().into_iter().find(|(v, _)| v == id).map(|(_, r)| r.permitted)
}

/// QEMU went away: cancels `lost`, which ends the loop so that the
/// supervisor connects again.
async fn end_when_qemu_goes(vm: Arc<QmpVm>, lost: CancellationToken) {
    while !lost.is_cancelled() && vm.client().is_connected() {
        tokio::select! {
            () = lost.cancelled() => return,
            () = tokio::time::sleep(LIVENESS_POLL) => {}
        }
    }
    lost.cancel();
}
