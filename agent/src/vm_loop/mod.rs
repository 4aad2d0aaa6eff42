//! One VM's loop: a thin shell around the pure [`VmCore`]. It reads QEMU's
//! size once, then only waits for what the guest, the allocator, the node
//! and its own actions say, feeds that to the core, and carries out what the
//! core decides (one action at a time, in a task, so events keep flowing
//! while QEMU works). The decisions, including which pressure events count,
//! the CPU size in sysfs mode and when to set `cpu.max`, are the core's.
//!
//! - `exec.rs`: carrying out an action, the `cpu.max` quota, `AddVm`;
//! - [`hotplug`]: how a target size becomes vCPU and memory plugs (QMP);
//! - [`cpu_max`]: the QEMU process's cgroup CPU quota;
//! - `status.rs`: what the loop shows (state dump, metrics, registry, pod).

pub mod cpu_max;
mod exec;
pub mod hotplug;
mod status;
#[cfg(test)]
mod tests;

pub use status::{StatusMap, VmStatus};

use crate::core::policy::{Policy, Size};
use crate::core::vm::{Decision, Input, VmCore};
use crate::links::allocator::{Registry, Session};
use crate::links::informant::{GuestChannels, GuestEvent};
use crate::metrics::Metrics;
use crate::qmp::{Hotplug, Hypervisor, VmSize};
use crate::vm_loop::hotplug::size_of;
use crate::vms::VmSpec;
use exec::{Done, Exec};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vmscale_common::backoff::{seed_of, Backoff};

/// What every VM loop of the node shares: the allocator session, where the
/// loop shows itself, and the defaults a VM without its own policy gets.
#[derive(Clone)]
pub struct LoopContext {
    pub session: watch::Receiver<Session>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub status: StatusMap,
    pub default_policy: Policy,
    /// Where pods get their VM's sizes written back (Kubernetes source only).
    pub reporter: Option<crate::vms::kube::status::StatusReporter>,
    /// Where `/proc` is, for the QEMU process's cgroup (`policy.cpu_max_cgroup`).
    pub proc_root: std::path::PathBuf,
    /// TLS (or, insecure, plain text) towards informants on TCP.
    pub informants: crate::links::dial::TcpSecurity,
}

impl std::fmt::Debug for LoopContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopContext").finish_non_exhaustive()
    }
}

/// How the node holds a VM still while it moves: it sets `moving`; the loop
/// stops scaling and says `quiet` once no action of its own is in flight, so
/// the devices read for the target are the ones the VM keeps.
#[derive(Debug, Clone)]
pub struct MoveGate {
    pub moving: watch::Receiver<bool>,
    pub quiet: Arc<watch::Sender<bool>>,
}

impl MoveGate {
    /// A gate and the node's ends of it.
    pub fn new() -> (MoveGate, watch::Sender<bool>, watch::Receiver<bool>) {
        let (moving_tx, moving) = watch::channel(false);
        let (quiet, quiet_rx) = watch::channel(false);
        (MoveGate { moving, quiet: Arc::new(quiet) }, moving_tx, quiet_rx)
    }
}

/// Runs until `cancel`. Reads the VM's size from QEMU first (retrying while
/// QEMU is not there yet), then connects to the VM's informant.
pub async fn run(
    spec: VmSpec,
    hv: Arc<dyn Hypervisor>,
    ctx: LoopContext,
    last_permit: Option<Size>,
    gate: MoveGate,
    cancel: CancellationToken,
) {
    let Some(qemu) = read_qemu(hv.as_ref(), &spec.id, &cancel).await else { return };
    let guest = GuestChannels::connect(
        spec.informant.clone(),
        ctx.informants.clone(),
        spec.cpu_mode,
        cancel.child_token(),
    );
    let vm = spec.id.clone();
    VmLoop::new(spec, hv, ctx, &qemu, last_permit, guest, gate).run(&cancel).await;
    // The VM left this node (or the agent stops): the allocator hears of it
    // only when the VM is gone for good, which the node supervisor decides.
    debug!(%vm, "VM loop ended");
}

/// QEMU's view of the VM; `None` if cancelled first.
async fn read_qemu(hv: &dyn Hotplug, vm: &str, cancel: &CancellationToken) -> Option<VmSize> {
    let backoff = Backoff::from_ms(100, 5000);
    let mut failures = 0;
    loop {
        match hv.read_size().await {
            Ok(s) => return Some(s),
            Err(e) => {
                failures += 1;
                warn!(%vm, "cannot read the VM's size from QEMU yet: {e}");
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = tokio::time::sleep(backoff.jittered(failures, seed_of(vm))) => {}
                }
            }
        }
    }
}

/// What woke the loop.
enum Wake {
    Cancelled,
    Guest(GuestEvent),
    Moving,
    Informant,
    Session,
    Done(Done),
    Timer,
}

/// One VM's loop state: the core and the ends of everything it listens to.
struct VmLoop {
    vm: String,
    spec: VmSpec,
    hv: Arc<dyn Hypervisor>,
    ctx: LoopContext,
    core: VmCore,
    /// The core's clock counts ms from here.
    t0: Instant,
    op_timeout: Duration,
    guest: GuestChannels,
    session_rx: watch::Receiver<Session>,
    session: Session,
    gate: MoveGate,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// When the core asked to be stepped again.
    wake: Option<u64>,
    pod: status::PodReport,
}

impl VmLoop {
    /// The core as QEMU has the VM, with the last permit known (at least
    /// QEMU's size).
    fn new(
        spec: VmSpec,
        hv: Arc<dyn Hypervisor>,
        ctx: LoopContext,
        qemu: &VmSize,
        last_permit: Option<Size>,
        guest: GuestChannels,
        gate: MoveGate,
    ) -> VmLoop {
        let vm = spec.id.clone();
        let policy = Policy::for_vm(spec.policy.as_ref(), &ctx.default_policy);
        let current = size_of(qemu);
        let permitted = last_permit.unwrap_or(current).max(current);
        if let Some(p) = &policy.polling {
            info!(%vm, loop_interval_ms = p.loop_interval_ms, sample_average_ms = p.sample_average_ms,
                "polling-only mode: pressure events are ignored");
        }
        let op_timeout = Duration::from_millis(policy.op_timeout_ms);
        let mut core =
            VmCore::new(spec.cu, spec.min_cus, spec.max_cus, policy, current, permitted, seed_of(&vm));
        core.set_boot_memory(qemu.memory_base_bytes);
        core.set_cpu_mode(spec.cpu_mode);
        info!(%vm, ?current, ?permitted, "VM loop started from QEMU's state");
        let (done_tx, done_rx) = mpsc::channel(1);
        let session_rx = ctx.session.clone();
        VmLoop {
            vm,
            spec,
            hv,
            ctx,
            core,
            t0: Instant::now(),
            op_timeout,
            guest,
            session_rx,
            session: None,
            gate,
            done_tx,
            done_rx,
            wake: None,
            pod: status::PodReport::default(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, cancel: &CancellationToken) {
        self.ctx.registry.set(&self.vm, status::registered(&self.core));
        self.session = self.session_rx.borrow_and_update().clone();
        if let Some(s) = &self.session {
            exec::add_vm(s.as_ref(), &self.vm, &self.core).await;
        }
        let moving = *self.gate.moving.borrow_and_update();
        self.core.input(self.now(), Input::AllocatorConnected(self.session.is_some()));
        self.core.input(self.now(), Input::Migrating(moving));
        loop {
            let d = self.core.step(self.now());
            self.act(d).await;
            match self.wait(cancel).await {
                Wake::Cancelled => break,
                w => self.hear(w).await,
            }
        }
        self.ctx.metrics.forget(&self.vm);
    }

    /// Carries out one step's decision and shows the VM as it is now.
    async fn act(&mut self, d: Decision) {
        let now = self.now();
        self.wake = d.wake_at_ms.or(self.wake.filter(|w| *w > now));
        if let Some(t) = d.upscale_done {
            status::record_upscale(&self.ctx, t);
            info!(vm = %self.vm, size = ?self.core.current, times = ?t, "upscale done");
        }
        if let Some(t) = d.polled {
            match t.usage {
                Some(u) => {
                    debug!(vm = %self.vm, samples = t.samples, used = u.memory_used_bytes, "polling tick")
                }
                None => warn!(vm = %self.vm, "polling tick without a sample in its window"),
            }
        }
        if let Some(milli_cpu) = d.cpu_max {
            // In Kubernetes QEMU's cgroup must be under its pod's.
            let pod = self.ctx.reporter.as_ref().map(|r| r.pod_uid(&self.vm));
            let scope = cpu_max::Scope::for_vm(pod);
            let ok =
                exec::apply_cpu_max(self.hv.as_ref(), &self.ctx.proc_root, &scope, &self.vm, milli_cpu).await;
            self.core.input(self.now(), Input::CpuMaxSet { milli_cpu, ok });
        }
        if let Some(action) = d.action {
            let exec = Exec {
                vm: self.vm.clone(),
                spec: self.spec.clone(),
                hv: self.hv.clone(),
                session: self.session.clone(),
                guest: self.guest.link.borrow().clone(),
                op_timeout: self.op_timeout,
            };
            let tx = self.done_tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(exec.run(action).await).await;
            });
        }
        status::show(&self.ctx, &self.vm, &self.core, now, &self.guest.notes.borrow());
        self.gate.quiet.send_replace(self.core.migrating && self.core.in_flight().is_none());
        self.pod.report(&self.ctx, &self.vm, &self.core);
    }

    /// Waits for the next thing to hear, or the core's timer.
    async fn wait(&mut self, cancel: &CancellationToken) -> Wake {
        let sleep = self.wake.map(|w| Duration::from_millis(w.saturating_sub(self.now())));
        tokio::select! {
            () = cancel.cancelled() => Wake::Cancelled,
            Some(ev) = self.guest.events.recv() => Wake::Guest(ev),
            Ok(()) = self.gate.moving.changed() => Wake::Moving,
            Ok(()) = self.guest.link.changed() => Wake::Informant,
            Ok(()) = self.session_rx.changed() => Wake::Session,
            Some(done) = self.done_rx.recv() => Wake::Done(done),
            () = sleep_opt(sleep) => Wake::Timer,
        }
    }

    /// Feeds what woke the loop to the core.
    async fn hear(&mut self, w: Wake) {
        let vm = &self.vm;
        let input = match w {
            Wake::Cancelled | Wake::Timer => return,
            Wake::Guest(GuestEvent::Sample { usage, mem_total_bytes, at_ns }) => {
                debug!(%vm, guest_ns = at_ns, used = usage.memory_used_bytes, "sample");
                // Calibration, not a decision input: in either mode.
                self.core.input(self.now(), Input::GuestMemory { total_bytes: mem_total_bytes });
                Input::Sample(usage)
            }
            Wake::Guest(GuestEvent::Pressure { kind, at_ns }) => {
                // The guest's clock beside ours: how long an event took to
                // arrive, when the two clocks' offset is known.
                debug!(%vm, kind = kind.name(), guest_ns = at_ns, "pressure event");
                status::count_pressure(&self.ctx, vm, kind);
                Input::Pressure(kind)
            }
            Wake::Moving => Input::Migrating(*self.gate.moving.borrow_and_update()),
            Wake::Informant => Input::InformantConnected(self.guest.link.borrow_and_update().is_some()),
            Wake::Session => {
                self.session = self.session_rx.borrow_and_update().clone();
                if let Some(s) = &self.session {
                    exec::add_vm(s.as_ref(), vm, &self.core).await;
                }
                Input::AllocatorConnected(self.session.is_some())
            }
            Wake::Done(done) => {
                status::record_action(&self.ctx, vm, &done);
                match &done.error {
                    Some(err) => warn!(%vm, action = done.action.name(), "action failed: {err}"),
                    None => {
                        let ms = u64::try_from(done.took.as_millis()).unwrap_or(u64::MAX);
                        info!(%vm, action = done.action.name(), ms, "action done");
                    }
                }
                done.input
            }
        };
        self.core.input(self.now(), input);
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
