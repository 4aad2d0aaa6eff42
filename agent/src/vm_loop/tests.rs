//! The loop shell against fakes: a scripted allocator session, a fake QEMU
//! and a fake guest, on tokio's paused clock. The decisions have their own
//! scenario tests in `core`; these check that the shell hears, carries out
//! and shows them.

use super::*;
use crate::core::policy::{Cu, Usage};
use crate::core::pressure::{PressureKind, PressureKinds};
use crate::links::allocator::fake::ScriptedSession;
use crate::links::allocator::res;
use crate::links::informant::fake::{channels, FakeGuest, GuestEnds};
use crate::qmp::fake::FakeHypervisor;
use crate::vms::{CpuMode, MemoryMode};
use std::sync::atomic::Ordering;
use vmscale_common::sync::lock;
use vmscale_proto::allocator::agent_message::Body;

const MIB: u64 = 1 << 20;

/// A running loop and the fakes around it.
struct Harness {
    hv: Arc<FakeHypervisor>,
    session: Arc<ScriptedSession>,
    guest: Arc<FakeGuest>,
    ends: GuestEnds,
    ctx: LoopContext,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// The node's ends: the session it publishes, and the move gate.
    session_tx: watch::Sender<Session>,
    moving: watch::Sender<bool>,
    quiet: watch::Receiver<bool>,
}

fn spec(cu: Cu, cpu_mode: CpuMode, policy: Policy) -> VmSpec {
    VmSpec {
        id: "vm-1".into(),
        qmp: "unused".into(),
        informant: None,
        cu,
        min_cus: 1,
        max_cus: 4,
        cpu_mode,
        memory: MemoryMode::Dimm { dimm_bytes: 256 * MIB },
        policy: Some(policy),
    }
}

/// Starts a loop on a VM QEMU has at `qemu`, with a session and a guest
/// connected.
fn start(spec: VmSpec, qemu: VmSize) -> Harness {
    start_with(spec, qemu, true)
}

/// The same, the allocator session up or not yet.
fn start_with(spec: VmSpec, qemu: VmSize, session_up: bool) -> Harness {
    let hv = Arc::new(FakeHypervisor::new(qemu.clone()));
    let session = ScriptedSession::granting();
    let up: Session = Some(session.clone());
    let (session_tx, session_rx) = watch::channel::<Session>(up.filter(|_| session_up));
    let ctx = LoopContext {
        session: session_rx,
        registry: Arc::new(Registry::default()),
        metrics: Arc::new(Metrics::new()),
        status: StatusMap::default(),
        default_policy: Policy::default(),
        reporter: None,
        proc_root: "/nonexistent".into(),
        informants: Default::default(),
    };
    let (guest_channels, ends) = channels();
    let guest = Arc::new(FakeGuest::default());
    ends.link.send_replace(Some(guest.clone()));
    let (gate, moving, quiet) = MoveGate::new();
    let l = VmLoop::new(spec, hv.clone(), ctx.clone(), &qemu, None, guest_channels, gate);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let task = tokio::spawn(async move { l.run(&c).await });
    Harness { hv, session, guest, ends, ctx, cancel, task, session_tx, moving, quiet }
}

impl Harness {
    fn status(&self) -> VmStatus {
        lock(&self.ctx.status).get("vm-1").cloned().unwrap_or_default()
    }

    async fn send(&self, ev: GuestEvent) {
        self.ends.events.send(ev).await.unwrap();
    }

    /// Waits (on the paused clock) until `f` holds of the VM's status.
    async fn until(&self, what: &str, f: impl Fn(&VmStatus) -> bool) {
        for _ in 0..1000 {
            if f(&self.status()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}: {:?}", self.status());
    }

    fn reserves(&self) -> usize {
        self.session.calls().iter().filter(|b| matches!(b, Body::Reserve(_))).count()
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

fn pressure(kind: PressureKind) -> GuestEvent {
    GuestEvent::Pressure { kind, at_ns: 0 }
}

#[tokio::test(start_paused = true)]
async fn a_pressure_event_reserves_then_plugs_then_tells_the_guest() {
    let cu = Cu { milli_cpu: 1000, memory_bytes: 512 * MIB };
    let qemu = VmSize { vcpus_present: 1, vcpu_slots: 4, memory_base_bytes: 512 * MIB, ..VmSize::default() };
    let h = start(spec(cu, CpuMode::Hotplug, Policy::default()), qemu);
    h.until("the guest connected", |s| s.informant_connected).await;
    h.send(pressure(PressureKind::MemcgReclaim)).await;
    let two = Size::new(2000, 1024 * MIB);
    h.until("the upscale", |s| s.current == two && s.last_action.as_deref() == Some("notify_upscale")).await;
    let calls = h.session.calls();
    assert!(matches!(&calls[0], Body::AddVm(_)), "{calls:?}");
    assert!(matches!(&calls[1], Body::Reserve(r) if r.target == res(two)), "{calls:?}");
    assert_eq!(calls.len(), 2);
    assert_eq!(
        h.hv.state().calls,
        ["read_size", "plug_vcpu", "plug_dimm(268435456)", "plug_dimm(268435456)", "read_size"]
    );
    assert_eq!(h.guest.calls(), ["notify_upscale(2, 1073741824)"]);
    let s = h.status();
    assert_eq!((s.pressure_events, s.permitted), (1, two));
    assert_eq!(h.ctx.registry.snapshot()[0].1.current, two, "the next hello carries the new size");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn unknown_kinds_are_counted_under_one_key_and_can_be_ignored() {
    let cu = Cu { milli_cpu: 1000, memory_bytes: 512 * MIB };
    let qemu = VmSize { vcpus_present: 1, vcpu_slots: 4, memory_base_bytes: 512 * MIB, ..VmSize::default() };
    let policy = Policy { ignore_pressure: PressureKinds::of(&[PressureKind::Unknown]), ..Policy::default() };
    let h = start(spec(cu, CpuMode::Hotplug, policy), qemu);
    for _ in 0..3 {
        // What the link makes of kinds 13, 14, 999: one kind.
        h.send(pressure(PressureKind::Unknown)).await;
    }
    h.send(pressure(PressureKind::PsiMemory)).await;
    h.until("four events", |s| s.pressure_events == 4).await;
    let kinds: Vec<(String, u64)> = h.status().pressure_kinds.into_iter().collect();
    assert_eq!(kinds, [("psi_memory".to_owned(), 1), ("unknown".to_owned(), 3)]);
    // psi_memory counts and grows the VM; the ignored ones did not.
    h.until("the upscale", |s| s.current.milli_cpu == 2000).await;
    assert_eq!(h.reserves(), 1);
    h.stop().await;
}

/// Sysfs mode: the guest is asked to keep one vCPU online, QEMU keeps both,
/// and the VM's CPU is what the guest keeps.
#[tokio::test(start_paused = true)]
async fn a_sysfs_downscale_asks_the_guest_for_its_vcpus_and_releases_after_the_unplug() {
    let cu = Cu { milli_cpu: 500, memory_bytes: 256 * MIB };
    let qemu = VmSize {
        vcpus_present: 2,
        vcpu_slots: 2,
        memory_base_bytes: 256 * MIB,
        dimm_bytes: 256 * MIB,
        dimm_count: 1,
        plugged_memory_bytes: 256 * MIB,
        ..VmSize::default()
    };
    let policy = Policy { downscale_after_ms: 1000, ..Policy::default() };
    let h = start(spec(cu, CpuMode::Sysfs, policy), qemu);
    h.guest.approve.store(true, Ordering::SeqCst);
    h.until("the guest connected", |s| s.informant_connected).await;
    let usage = Usage { load_avg_1: 0.0, memory_used_bytes: 10 * MIB };
    h.send(GuestEvent::Sample { usage, mem_total_bytes: 0, at_ns: 0 }).await;
    let one = Size::new(500, 256 * MIB);
    h.until("the downscale", |s| s.current == one && s.permitted == one).await;
    assert_eq!(h.guest.calls(), ["ask_downscale(1, 268435456)"]);
    assert!(h.hv.state().calls.contains(&"unplug_dimm".to_owned()));
    assert!(!h.hv.state().calls.contains(&"unplug_vcpu".to_owned()), "the guest offlines, not QEMU");
    let last = h.session.calls().pop();
    assert!(matches!(&last, Some(Body::Release(r)) if r.new_size == res(one)), "{last:?}");
    h.stop().await;
}

fn one_cu_vm() -> (VmSpec, VmSize) {
    let cu = Cu { milli_cpu: 1000, memory_bytes: 512 * MIB };
    let qemu = VmSize { vcpus_present: 1, vcpu_slots: 4, memory_base_bytes: 512 * MIB, ..VmSize::default() };
    (spec(cu, CpuMode::Hotplug, Policy::default()), qemu)
}

#[tokio::test(start_paused = true)]
async fn a_session_that_comes_later_gets_the_vm_before_its_reserve() {
    let (spec, qemu) = one_cu_vm();
    let h = start_with(spec, qemu, false);
    h.send(pressure(PressureKind::OomVictim)).await;
    h.until("the event", |s| s.pressure_events == 1 && s.informant_connected).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!h.status().allocator_connected);
    assert_eq!(h.status().current.milli_cpu, 1000, "no growth without a permit");
    h.session_tx.send_replace(Some(h.session.clone()));
    h.until("the upscale", |s| s.current.milli_cpu == 3000).await;
    let calls = h.session.calls();
    assert!(matches!(&calls[0], Body::AddVm(_)), "registered first: {calls:?}");
    assert!(matches!(&calls[1], Body::Reserve(_)), "{calls:?}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_moving_vm_goes_quiet_and_grows_only_after_the_move() {
    let (spec, qemu) = one_cu_vm();
    let mut h = start(spec, qemu);
    h.until("the guest connected", |s| s.informant_connected).await;
    h.moving.send_replace(true);
    h.quiet.wait_for(|q| *q).await.unwrap();
    h.send(pressure(PressureKind::MemcgReclaim)).await;
    h.until("the event", |s| s.pressure_events == 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.reserves(), 0, "held still while it moves");
    h.moving.send_replace(false);
    h.until("the upscale", |s| s.current.milli_cpu == 2000).await;
    assert!(!*h.quiet.borrow_and_update());
    h.stop().await;
}
