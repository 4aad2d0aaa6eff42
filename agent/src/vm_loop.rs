//! One VM's loop: feeds the core with what the guest, the allocator and QEMU
//! say, and runs the action it decides (one at a time, in a task, so events
//! keep flowing while QEMU works).

use crate::allocator_link::{registration, Registered, Registry, Session};
use crate::core::policy::{Policy, Size};
use crate::core::vm::{Action, Input, VmCore};
use crate::executor::{self, size_of, vcpus_for};
use crate::informant_link::{self, GuestEvent};
use crate::metrics::{Metrics, OpLabels, SizeLabels, StageLabel, VmLabel};
use crate::qmp::Hypervisor;
use crate::vms::{CpuMode, VmSpec};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vmscale_proto::allocator as apb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::informant as ipb;

/// What the state dump shows of one VM.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmStatus {
    pub current: Size,
    pub permitted: Size,
    pub desired_cus: u32,
    pub last_action: Option<String>,
    pub last_action_ms: Option<u64>,
    pub last_error: Option<String>,
    pub pressure_events: u64,
    /// The same by kind (`psi_cpu`, ...): which signals drove the VM.
    pub pressure_kinds: BTreeMap<String, u64>,
    pub informant_connected: bool,
    pub allocator_connected: bool,
    pub stuck: bool,
    /// A live migration under way, e.g. `to node-b (order 7): migrating`.
    pub migration: Option<String>,
    /// Guest kernel settings that make scaling worse, as the informant
    /// named them at its last handshake (e.g. memmap_on_memory off).
    pub guest_notes: Vec<String>,
}

pub type StatusMap = Arc<Mutex<BTreeMap<String, VmStatus>>>;

/// Everything one loop needs from the node.
#[derive(Clone)]
pub struct Node {
    pub session: watch::Receiver<Session>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub status: StatusMap,
    pub default_policy: Policy,
    /// Where pods get their VM's sizes written back (Kubernetes source only).
    pub reporter: Option<crate::vms::kube::status::StatusReporter>,
    /// Where `/proc` is, for the QEMU process's cgroup (`policy.cpu_max_cgroup`).
    pub proc_root: std::path::PathBuf,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

fn ms_since(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX)
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
/// QEMU is not there yet).
pub async fn run(
    spec: VmSpec,
    hv: Arc<dyn Hypervisor>,
    node: Node,
    last_permit: Option<Size>,
    mut gate: MoveGate,
    cancel: CancellationToken,
) {
    let vm = spec.id.clone();
    let policy = spec.policy.clone().unwrap_or_else(|| node.default_policy.clone());
    let op_timeout = Duration::from_millis(policy.op_timeout_ms);
    let t0 = Instant::now();

    let mut wait = Duration::from_millis(100);
    let qemu = loop {
        match hv.read_size().await {
            Ok(s) => break s,
            Err(e) => {
                warn!(%vm, "cannot read the VM's size from QEMU yet: {e}");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => wait = (wait * 2).min(Duration::from_secs(5)),
                }
            }
        }
    };
    let mut sysfs_milli = u64::from(qemu.vcpus_present) * 1000;
    let current = size_of(&qemu, spec.cpu_mode, Some(sysfs_milli));
    let permitted = last_permit.unwrap_or(current).max(current);
    let seed =
        vm.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut core = VmCore::new(spec.cu, spec.min_cus, spec.max_cus, policy.clone(), current, permitted, seed);
    core.set_boot_memory(qemu.memory_base_bytes);
    info!(%vm, ?current, ?permitted, "VM loop started from QEMU's state");
    // Polling-only (comparison) mode: samples wait for the loop's tick.
    let mut poller = policy.polling.as_deref().map(|p| crate::polling::Poller::new(*p, ms_since(t0)));
    if let Some(p) = &policy.polling {
        info!(%vm, loop_interval_ms = p.loop_interval_ms, sample_average_ms = p.sample_average_ms,
            "polling-only mode: pressure events are ignored");
    }
    // The CPU size QEMU's cgroup quota was last set for, when the policy asks.
    let cpu_max = policy.cpu_max_cgroup.then(|| node.proc_root.clone());
    let mut cpu_max_for: Option<u64> = None;
    if let Some(proc_root) = &cpu_max {
        cpu_max_for = apply_cpu_max(hv.as_ref(), proc_root, &vm, current.milli_cpu).await;
    }

    let publish = |core: &VmCore| {
        node.registry.set(
            &vm,
            Registered {
                current: core.current,
                permitted: core.permitted,
                cu: core.cu,
                min_cus: core.min_cus,
                max_cus: core.max_cus,
            },
        );
    };
    publish(&core);

    // The guest's side.
    let (ev_tx, mut ev_rx) = mpsc::channel::<GuestEvent>(1024);
    let (inf_tx, mut inf_rx) = watch::channel::<informant_link::Client>(None);
    let (notes_tx, notes_rx) = watch::channel(Vec::new());
    if let Some(addr) = spec.informant.clone() {
        tokio::spawn(informant_link::run(addr, ev_tx, inf_tx, notes_tx, cancel.child_token()));
    } else {
        drop(ev_tx);
    }
    let mut session_rx = node.session.clone();
    let mut session = session_rx.borrow_and_update().clone();
    if let Some(s) = &session {
        add_vm(s, &vm, &core).await;
    }
    core.input(ms_since(t0), Input::AllocatorConnected(session.is_some()));
    core.input(ms_since(t0), Input::Migrating(*gate.moving.borrow_and_update()));

    let (done_tx, mut done_rx) = mpsc::channel::<(Action, Input, Duration, Option<String>)>(1);
    let mut wake: Option<u64> = None;
    let mut reported: Option<(Size, Size)> = None;
    loop {
        let now = ms_since(t0);
        let d = core.step(now);
        wake = d.wake_at_ms.or(wake.filter(|w| *w > now));
        if let Some(t) = d.upscale_done {
            for (stage, v) in
                [("to_permit", t.to_permit_ms), ("to_plug", t.to_plug_ms), ("to_confirm", t.to_confirm_ms)]
            {
                if let Some(ms) = v {
                    #[allow(clippy::cast_precision_loss)]
                    node.metrics
                        .upscale_seconds
                        .get_or_create(&StageLabel { stage })
                        .observe(ms as f64 / 1000.0);
                }
            }
            info!(%vm, size = ?core.current, times = ?t, "upscale done");
        }
        if let Some(action) = d.action {
            let ctx = Exec {
                vm: vm.clone(),
                spec: spec.clone(),
                hv: hv.clone(),
                session: session.clone(),
                informant: inf_rx.borrow().clone(),
                sysfs_milli,
                op_timeout,
            };
            let tx = done_tx.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let (input, err) = ctx.run(action).await;
                let _ = tx.send((action, input, started.elapsed(), err)).await;
            });
        }
        update_status(&node, &vm, &core, now, &notes_rx.borrow());
        publish(&core);
        gate.quiet.send_replace(core.migrating && core.in_flight().is_none());
        if let Some(r) = &node.reporter {
            if reported != Some((core.current, core.permitted)) {
                reported = Some((core.current, core.permitted));
                let at = std::time::SystemTime::now();
                r.report(
                    &vm,
                    crate::vms::kube::status::VmStatus {
                        current: core.current,
                        approved: core.permitted,
                        at,
                    },
                );
            }
        }

        let sleep = wake.map(|w| Duration::from_millis(w.saturating_sub(ms_since(t0))));
        let poll_sleep =
            poller.as_ref().map(|p| Duration::from_millis(p.next_tick_ms().saturating_sub(ms_since(t0))));
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(ev) = ev_rx.recv() => match ev {
                GuestEvent::Sample { usage, mem_total_bytes, at_ns } => {
                    debug!(%vm, guest_ns = at_ns, used = usage.memory_used_bytes, "sample");
                    // Calibration, not a decision input: in either mode.
                    core.input(ms_since(t0), Input::GuestMemory { total_bytes: mem_total_bytes });
                    match &mut poller {
                        Some(p) => p.sample(ms_since(t0), usage),
                        None => core.input(ms_since(t0), Input::Sample(usage)),
                    }
                }
                GuestEvent::Pressure { oom, kind, at_ns } => {
                    // The guest's clock beside ours: how long an event took to
                    // arrive, when the two clocks' offset is known.
                    debug!(%vm, kind = kind_name(kind), guest_ns = at_ns, "pressure event");
                    // Counted in either mode, so a comparison shows what polling missed.
                    node.metrics.pressure_events.get_or_create(&VmLabel { vm: vm.clone() }).inc();
                    {
                        let mut st = node.status.lock().unwrap_or_else(|p| p.into_inner());
                        let e = st.entry(vm.clone()).or_default();
                        e.pressure_events += 1;
                        *e.pressure_kinds.entry(kind_name(kind)).or_default() += 1;
                    }
                    if poller.is_none() && !policy.ignore_pressure.contains(&kind_name(kind)) {
                        let cpu = kind == ipb::pressure::Kind::PsiCpu as i32;
                        core.input(ms_since(t0), if cpu { Input::CpuPressure } else { Input::Pressure { oom } });
                    }
                }
            },
            () = sleep_opt(poll_sleep) => {
                let now = ms_since(t0);
                if let Some(t) = poller.as_mut().and_then(|p| p.tick(now)) {
                    match t.usage {
                        Some(u) => {
                            debug!(%vm, samples = t.samples, used = u.memory_used_bytes, "polling tick");
                            core.input(now, Input::Sample(u));
                        }
                        None => warn!(%vm, "polling tick without a sample in its window"),
                    }
                }
            }
            Ok(()) = gate.moving.changed() => {
                let moving = *gate.moving.borrow_and_update();
                core.input(ms_since(t0), Input::Migrating(moving));
            }
            Ok(()) = inf_rx.changed() => {
                let up = inf_rx.borrow_and_update().is_some();
                core.input(ms_since(t0), Input::InformantConnected(up));
            }
            Ok(()) = session_rx.changed() => {
                session = session_rx.borrow_and_update().clone();
                if let Some(s) = &session {
                    add_vm(s, &vm, &core).await;
                }
                core.input(ms_since(t0), Input::AllocatorConnected(session.is_some()));
            }
            Some((action, input, took, err)) = done_rx.recv() => {
                let outcome = if err.is_some() { "error" } else { "ok" };
                let l = OpLabels { action: action.name(), outcome };
                node.metrics.ops.get_or_create(&l).inc();
                node.metrics.op_seconds.get_or_create(&l).observe(took.as_secs_f64());
                let mut new_cpu = None;
                if let Input::Plugged { size } | Input::Unplugged { size } = input {
                    if spec.cpu_mode == CpuMode::Sysfs {
                        sysfs_milli = size.milli_cpu;
                    }
                    new_cpu = Some(size.milli_cpu);
                }
                {
                    let mut st = node.status.lock().unwrap_or_else(|p| p.into_inner());
                    let e = st.entry(vm.clone()).or_default();
                    e.last_action = Some(action.name().to_owned());
                    e.last_action_ms = Some(u64::try_from(took.as_millis()).unwrap_or(u64::MAX));
                    if let Some(err) = &err {
                        e.last_error = Some(err.clone());
                    }
                }
                if let Some(err) = err {
                    warn!(%vm, action = action.name(), "action failed: {err}");
                } else {
                    info!(%vm, action = action.name(), ms = took.as_millis() as u64, "action done");
                }
                core.input(ms_since(t0), input);
                if let (Some(proc_root), Some(cpu)) = (&cpu_max, new_cpu) {
                    // Also retries a quota that failed before.
                    if cpu_max_for != Some(cpu) {
                        cpu_max_for = apply_cpu_max(hv.as_ref(), proc_root, &vm, cpu).await;
                    }
                }
            }
            () = sleep_opt(sleep) => {}
        }
    }
    // The VM left this node (or the agent stops): the allocator hears of it
    // only when the VM is gone for good, which the node supervisor decides.
    node.metrics.forget(&vm);
}

/// A pressure kind's wire name without `KIND_`, lower case (`psi_cpu`), as
/// `policy.ignore_pressure` and the state dump name it.
fn kind_name(kind: i32) -> String {
    ipb::pressure::Kind::try_from(kind)
        .map_or_else(|_| kind.to_string(), |k| k.as_str_name().trim_start_matches("KIND_").to_lowercase())
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn add_vm(s: &vmscale_allocator::client::SessionClient, vm: &str, core: &VmCore) {
    let r = Registered {
        current: core.current,
        permitted: core.permitted,
        cu: core.cu,
        min_cus: core.min_cus,
        max_cus: core.max_cus,
    };
    let body = Body::AddVm(apb::AddVm { vm: Some(registration(vm, &r)) });
    match s.call(body).await {
        Ok(_) => {}
        // Registered by the hello already: nothing to do.
        Err(vmscale_allocator::client::ClientError::Request { code: tonic::Code::AlreadyExists, .. }) => {}
        Err(e) => warn!(%vm, "cannot add the VM to the allocator's ledger: {e}"),
    }
}

fn update_status(node: &Node, vm: &str, core: &VmCore, now: u64, guest_notes: &[String]) {
    let goal = core.goal_cus(now);
    let desired = Size::of_cus(goal, core.cu);
    let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for (size, s) in [("current", core.current), ("desired", desired), ("permitted", core.permitted)] {
        let l = SizeLabels { vm: vm.to_owned(), size };
        node.metrics.milli_cpu.get_or_create(&l).set(g(s.milli_cpu));
        node.metrics.memory_bytes.get_or_create(&l).set(g(s.memory_bytes));
    }
    node.metrics.stuck.get_or_create(&VmLabel { vm: vm.to_owned() }).set(i64::from(core.is_stuck()));
    let mut st = node.status.lock().unwrap_or_else(|p| p.into_inner());
    let e = st.entry(vm.to_owned()).or_default();
    e.current = core.current;
    e.permitted = core.permitted;
    e.desired_cus = goal;
    e.stuck = core.is_stuck();
    e.informant_connected = core.informant_up;
    e.allocator_connected = core.allocator_up;
    if e.guest_notes != guest_notes {
        e.guest_notes = guest_notes.to_vec();
    }
}

/// One action's execution context: a snapshot taken when it started.
struct Exec {
    vm: String,
    spec: VmSpec,
    hv: Arc<dyn Hypervisor>,
    session: Session,
    informant: informant_link::Client,
    sysfs_milli: u64,
    op_timeout: Duration,
}

impl Exec {
    async fn run(self, action: Action) -> (Input, Option<String>) {
        let r = tokio::time::timeout(self.op_timeout, self.act(action)).await;
        match r {
            Ok(Ok(input)) => (input, None),
            Ok(Err((size, reason))) => (Input::Failed { size }, Some(reason)),
            Err(_) => (Input::Failed { size: None }, Some(format!("timed out after {:?}", self.op_timeout))),
        }
    }

    async fn act(&self, action: Action) -> Result<Input, (Option<Size>, String)> {
        let no_session = || (None, "no allocator session".to_owned());
        let no_informant = || (None, "no informant connection".to_owned());
        match action {
            Action::RequestPermit { target } => {
                let s = self.session.as_ref().ok_or_else(no_session)?;
                let p = s
                    .reserve(&self.vm, target.milli_cpu, target.memory_bytes)
                    .await
                    .map_err(|e| (None, e.to_string()))?;
                let got = p.permitted.unwrap_or_default();
                Ok(Input::Permit { permitted: Size::new(got.milli_cpu, got.memory_bytes) })
            }
            Action::Release { size } => {
                let s = self.session.as_ref().ok_or_else(no_session)?;
                s.release(&self.vm, size.milli_cpu, size.memory_bytes)
                    .await
                    .map_err(|e| (None, e.to_string()))?;
                Ok(Input::Released)
            }
            Action::Plug { target } => {
                let v = executor::plug(self.hv.as_ref(), &self.spec, target, self.op_timeout)
                    .await
                    .map_err(|e| (e.size, e.reason))?;
                let cpu = self.cpu_after(target.milli_cpu, v.vcpus_present, true);
                Ok(Input::Plugged { size: size_of(&v, self.spec.cpu_mode, Some(cpu)) })
            }
            Action::Unplug { target } => {
                let v = executor::unplug(self.hv.as_ref(), &self.spec, target, self.op_timeout)
                    .await
                    .map_err(|e| (e.size, e.reason))?;
                let cpu = self.cpu_after(target.milli_cpu, v.vcpus_present, false);
                Ok(Input::Unplugged { size: size_of(&v, self.spec.cpu_mode, Some(cpu)) })
            }
            Action::NotifyUpscale { size } => {
                let mut c = self.informant.clone().ok_or_else(no_informant)?;
                c.notify_upscale(ipb::UpscaleNotice {
                    cpus: vcpus_for(size.milli_cpu),
                    memory_bytes: size.memory_bytes,
                })
                .await
                .map_err(|s| (None, format!("informant: {}", s.message())))?;
                Ok(Input::UpscaleConfirmed)
            }
            Action::AskDownscale { target } => {
                let mut c = self.informant.clone().ok_or_else(no_informant)?;
                let cpus = if self.spec.cpu_mode == CpuMode::Sysfs { vcpus_for(target.milli_cpu) } else { 0 };
                let r = c
                    .try_downscale(ipb::DownscaleRequest {
                        target_cpus: cpus,
                        target_memory_bytes: target.memory_bytes,
                    })
                    .await
                    .map_err(|s| (None, format!("informant: {}", s.message())))?
                    .into_inner();
                if !r.approved {
                    info!(vm = %self.vm, reason = %r.reason, "informant denied a downscale");
                }
                Ok(Input::DownscaleAnswer { approved: r.approved })
            }
        }
    }

    /// The VM's CPU after an operation: in sysfs mode, the target clamped to
    /// the vCPUs QEMU has (the informant onlines/offlines them); otherwise
    /// what QEMU has.
    fn cpu_after(&self, target: u64, present: u32, growing: bool) -> u64 {
        match self.spec.cpu_mode {
            CpuMode::Sysfs => {
                let cap = u64::from(present) * 1000;
                if growing {
                    target.max(self.sysfs_milli).min(cap)
                } else {
                    target.min(cap)
                }
            }
            CpuMode::Hotplug => u64::from(present) * 1000,
        }
    }
}

/// Sets the QEMU process's CPU quota for `milli_cpu`; the size it is set for,
/// or `None` when it failed. A failure leaves the VM as it is (the plug or
/// unplug itself worked) and is logged: the quota refines the VM's size, it
/// is no condition of scaling.
async fn apply_cpu_max(
    hv: &dyn Hypervisor,
    proc_root: &std::path::Path,
    vm: &str,
    milli_cpu: u64,
) -> Option<u64> {
    match crate::cpu_max::apply(hv, proc_root, milli_cpu).await {
        Ok(a) => {
            info!(%vm, milli_cpu, pid = a.pid, cgroup = %a.cgroup.dir.display(), limit = ?a.limit, "QEMU CPU quota set");
            Some(milli_cpu)
        }
        Err(e) => {
            let mut chain = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                chain.push_str(&format!(": {s}"));
                src = s.source();
            }
            warn!(%vm, milli_cpu, "cannot set QEMU's CPU quota: {chain}");
            None
        }
    }
}
