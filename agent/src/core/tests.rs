//! Scenario tests of one VM's loop on a fake clock.

use super::policy::{Cu, Policy, Size, Usage};
use super::pressure::PressureKind;
use super::vm::{Action, Input, VmCore};

const GIB: u64 = 1 << 30;
const CU: Cu = Cu { milli_cpu: 250, memory_bytes: GIB };

fn cus(n: u32) -> Size {
    Size::of_cus(n, CU)
}

/// These scenarios plug each upscale whole; the split first plug
/// (`first_plug_cus`, on by default) has its own in `first_plug_tests.rs`.
fn whole_plugs() -> Policy {
    Policy { first_plug_cus: 0, ..Policy::default() }
}

struct Sim {
    vm: VmCore,
    now: u64,
}

impl Sim {
    /// A VM of `n` CUs, bounds 1..=16, both peers connected.
    fn new(n: u32) -> Sim {
        let mut vm = VmCore::new(CU, 1, 16, whole_plugs(), cus(n), cus(n), 42);
        vm.input(0, Input::InformantConnected(true));
        vm.input(0, Input::AllocatorConnected(true));
        Sim { vm, now: 0 }
    }

    fn at(&mut self, ms: u64) -> &mut Self {
        assert!(ms >= self.now, "time runs forward");
        self.now = ms;
        self
    }

    fn feed(&mut self, i: Input) -> &mut Self {
        self.vm.input(self.now, i);
        self
    }

    fn step(&mut self) -> Option<Action> {
        self.vm.step(self.now).action
    }

    fn using(&mut self, mem_gib: f64) -> &mut Self {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bytes = (mem_gib * GIB as f64) as u64;
        self.feed(Input::Sample(Usage { load_avg_1: 0.1, memory_used_bytes: bytes }))
    }

    /// Runs a whole upscale: permit (granted up to `grant`), plug, confirm.
    fn upscale_to(&mut self, want: u32, grant: u32) {
        assert_eq!(self.step(), Some(Action::RequestPermit { target: cus(want) }));
        self.feed(Input::Permit { permitted: cus(grant) });
        assert_eq!(self.step(), Some(Action::Plug { target: cus(grant) }));
        self.feed(Input::Plugged { size: cus(grant) });
        assert_eq!(self.step(), Some(Action::NotifyUpscale { size: cus(grant) }));
        self.feed(Input::UpscaleConfirmed);
    }
}

#[test]
fn pressure_upscales_at_once_in_protocol_order() {
    let mut s = Sim::new(4);
    s.at(1000).using(2.0);
    assert_eq!(s.step(), None, "2 GiB of 4 is fine");
    // A reclaim event: grow by half (2 CUs) without waiting for a sample.
    s.at(1010).feed(Input::Pressure(PressureKind::MemcgReclaim));
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(6) }));
    assert_eq!(s.step(), None, "one operation at a time");
    s.at(1011).feed(Input::Permit { permitted: cus(6) });
    assert_eq!(s.step(), Some(Action::Plug { target: cus(6) }));
    s.at(1050).feed(Input::Plugged { size: cus(6) });
    assert_eq!(s.step(), Some(Action::NotifyUpscale { size: cus(6) }));
    s.at(1090).feed(Input::UpscaleConfirmed);
    let d = s.vm.step(s.now);
    let t = d.upscale_done.expect("upscale reported");
    assert_eq!((t.to_permit_ms, t.to_plug_ms, t.to_confirm_ms), (Some(1), Some(40), Some(80)));
    assert_eq!(d.action, None);
    assert_eq!(s.vm.current, cus(6));
}

#[test]
fn oom_doubles_and_respects_max() {
    let mut s = Sim::new(10);
    s.at(5).feed(Input::Pressure(PressureKind::OomVictim));
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(16) }), "20 CUs capped at max 16");
}

#[test]
fn samples_drive_the_goal() {
    let mut s = Sim::new(2);
    s.at(100).using(3.0); // 3 GiB / 0.75 = 4 CUs
    s.upscale_to(4, 4);
    assert_eq!(s.vm.current, cus(4));
}

#[test]
fn partial_permit_plugs_what_was_granted_then_cools_down() {
    let mut s = Sim::new(2);
    s.at(100).using(5.9); // wants 8
    s.upscale_to(8, 5);
    assert_eq!(s.vm.current, cus(5));
    // Still wants 8; the next request goes out at once (the permit was partial, not denied)...
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(8) }));
    // ...and this one is denied: wait the cooldown before asking again.
    s.at(200).feed(Input::Permit { permitted: cus(5) });
    let d = s.vm.step(s.now);
    assert_eq!(d.action, None);
    let wake = d.wake_at_ms.expect("timer set");
    assert!((200 + 1500..=200 + 2000).contains(&wake), "jittered cooldown, got {wake}");
    s.at(wake).using(5.9);
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(8) }));
}

#[test]
fn pressure_cuts_a_denial_cooldown_short() {
    let mut s = Sim::new(4);
    s.at(10).using(3.5); // wants 5
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(5) }));
    s.feed(Input::Permit { permitted: cus(4) });
    assert_eq!(s.step(), None, "denied, cooling down");
    s.at(20).feed(Input::Pressure(PressureKind::MemcgReclaim));
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(6) }), "new pressure: ask at once");
}

#[test]
fn downscale_waits_for_sustained_low_use_then_one_cu_per_step() {
    let mut s = Sim::new(6);
    let p = Policy::default();
    s.at(0).using(1.0); // wants 2
    assert_eq!(s.step(), None);
    s.at(p.downscale_after_ms - 1).using(1.0);
    assert_eq!(s.step(), None, "not yet");
    s.at(p.downscale_after_ms).using(1.0);
    assert_eq!(s.step(), Some(Action::AskDownscale { target: cus(5), vcpus: 0 }), "one CU, not four");
    s.feed(Input::DownscaleAnswer { approved: true });
    assert_eq!(s.step(), Some(Action::Unplug { target: cus(5) }));
    s.feed(Input::Unplugged { size: cus(5) });
    assert_eq!(s.step(), Some(Action::Release { size: cus(5) }), "allocator told after the unplug");
    s.feed(Input::Released);
    assert_eq!(s.vm.permitted, cus(5));
    assert_eq!(s.step(), None, "next step waits downscale_step_ms");
    s.at(p.downscale_after_ms + p.downscale_step_ms).using(1.0);
    assert_eq!(s.step(), Some(Action::AskDownscale { target: cus(4), vcpus: 0 }));
}

#[test]
fn cpu_pressure_right_after_giving_up_a_vcpu_is_the_downscales_echo() {
    let mut s = Sim::new(6);
    let p = Policy::default();
    s.at(0).using(1.0);
    assert_eq!(s.step(), None);
    s.at(p.downscale_after_ms).using(1.0);
    assert_eq!(s.step(), Some(Action::AskDownscale { target: cus(5), vcpus: 0 }));
    s.feed(Input::DownscaleAnswer { approved: true });
    // The guest offlined a vCPU as it approved: its tasks crowd the rest.
    s.feed(Input::Pressure(PressureKind::PsiCpu));
    assert_eq!(s.step(), Some(Action::Unplug { target: cus(5) }), "not undone by its own echo");
    s.feed(Input::Unplugged { size: cus(5) });
    assert_eq!(s.step(), Some(Action::Release { size: cus(5) }));
    s.feed(Input::Released);
    s.at(p.downscale_after_ms + p.cpu_settle_ms - 1).feed(Input::Pressure(PressureKind::PsiCpu));
    assert_eq!(s.step(), None, "still settling");
    // Pressure that outlasts the settle is real: grow.
    s.at(p.downscale_after_ms + p.cpu_settle_ms).feed(Input::Pressure(PressureKind::PsiCpu));
    assert!(matches!(s.step(), Some(Action::RequestPermit { .. })), "{:?}", s.vm.in_flight());
}

#[test]
fn denied_downscale_keeps_the_vm_and_retries_after_cooldown() {
    let mut s = Sim::new(4);
    let p = Policy::default();
    s.at(0).using(0.5);
    s.step();
    s.at(p.downscale_after_ms).using(0.5);
    assert_eq!(s.step(), Some(Action::AskDownscale { target: cus(3), vcpus: 0 }));
    s.feed(Input::DownscaleAnswer { approved: false });
    let d = s.vm.step(s.now);
    assert_eq!(d.action, None);
    assert_eq!(s.vm.current, cus(4), "kept");
    let wake = d.wake_at_ms.unwrap();
    assert!(wake > s.now + p.downscale_denied_cooldown_ms / 2);
    s.at(wake).using(0.5);
    assert_eq!(
        s.step(),
        Some(Action::AskDownscale { target: cus(3), vcpus: 0 }),
        "retried after the cooldown"
    );
}

#[test]
fn pressure_stops_a_pending_downscale() {
    let mut s = Sim::new(4);
    let p = Policy::default();
    s.at(0).using(0.5);
    s.step();
    s.at(p.downscale_after_ms - 10).feed(Input::Pressure(PressureKind::MemcgReclaim));
    s.at(p.downscale_after_ms).using(0.5);
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(6) }), "pressure floor wins over samples");
}

#[test]
fn no_informant_no_downscale_but_upscale_still_works() {
    let mut s = Sim::new(4);
    s.feed(Input::InformantConnected(false));
    s.at(0).using(0.5);
    s.step();
    s.at(10 * 60_000).using(0.5);
    assert_eq!(s.step(), None, "memory is never shrunk without the informant");
    s.using(4.0);
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(6) }));
    s.feed(Input::Permit { permitted: cus(6) });
    assert_eq!(s.step(), Some(Action::Plug { target: cus(6) }));
    s.feed(Input::Plugged { size: cus(6) });
    assert_eq!(s.step(), None, "nobody to notify; done");
}

#[test]
fn informant_leaving_mid_question_drops_the_question() {
    let mut s = Sim::new(4);
    let p = Policy::default();
    s.at(0).using(0.5);
    s.step();
    s.at(p.downscale_after_ms).using(0.5);
    assert!(matches!(s.step(), Some(Action::AskDownscale { .. })));
    s.feed(Input::InformantConnected(false));
    s.feed(Input::DownscaleAnswer { approved: true }); // late answer from a dead connection
    assert_eq!(s.step(), None, "no unplug on a stale approval");
}

#[test]
fn allocator_gone_means_no_growth_until_it_returns() {
    let mut s = Sim::new(2);
    s.feed(Input::AllocatorConnected(false));
    s.at(10).using(3.0);
    assert_eq!(s.step(), None);
    s.feed(Input::AllocatorConnected(true));
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(4) }));
}

#[test]
fn failed_plug_gives_the_reservation_back_and_backs_off() {
    let mut s = Sim::new(2);
    s.at(10).using(3.0);
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(4) }));
    s.feed(Input::Permit { permitted: cus(4) });
    assert_eq!(s.step(), Some(Action::Plug { target: cus(4) }));
    s.at(20).feed(Input::Failed { size: Some(cus(2)) });
    let d = s.vm.step(s.now);
    assert_eq!(d.action, None, "backing off");
    let retry = d.wake_at_ms.unwrap();
    assert!(retry > 20 && retry <= 20 + Policy::default().retry_base_ms);
    s.at(retry);
    assert_eq!(s.step(), Some(Action::Release { size: cus(2) }), "unused permit returned first");
    s.feed(Input::Released);
    assert_eq!(s.vm.permitted, cus(2));
}

#[test]
fn a_plug_that_keeps_failing_backs_off_further_each_time_despite_the_ledger_steps_between() {
    let mut s = Sim::new(2);
    s.at(10).using(3.0);
    let mut waits = Vec::new();
    for _ in 0..Policy::default().stuck_after_failures {
        assert!(matches!(s.step(), Some(Action::RequestPermit { .. })));
        s.feed(Input::Permit { permitted: cus(4) });
        assert_eq!(s.step(), Some(Action::Plug { target: cus(4) }));
        let failed_at = s.now;
        s.feed(Input::Failed { size: Some(cus(2)) });
        let retry = s.vm.step(s.now).wake_at_ms.unwrap();
        waits.push(retry - failed_at);
        s.at(retry);
        assert_eq!(s.step(), Some(Action::Release { size: cus(2) }));
        s.feed(Input::Released);
    }
    assert!(waits.windows(2).all(|w| w[1] > w[0]), "the backoff must grow: {waits:?}");
    assert!(s.vm.is_stuck(), "failed plugs in a row make a stuck VM");
}

#[test]
fn timeouts_count_as_failures_and_the_vm_is_reported_stuck() {
    let mut s = Sim::new(2);
    s.at(0).using(3.0);
    let p = Policy::default();
    for _ in 0..p.stuck_after_failures {
        assert!(matches!(s.step(), Some(Action::RequestPermit { .. })));
        let d = s.vm.step(s.now);
        let deadline = d.wake_at_ms.unwrap();
        s.at(deadline).using(3.0);
        let d = s.vm.step(s.now); // times out, backs off
        if let Some(w) = d.wake_at_ms {
            s.at(w).using(3.0);
        }
    }
    assert!(s.vm.is_stuck());
    s.feed(Input::Permit { permitted: cus(4) });
    assert!(s.vm.is_stuck(), "a stale answer does not clear it");
}

#[test]
fn late_and_duplicate_answers_are_ignored() {
    let mut s = Sim::new(2);
    s.feed(Input::Plugged { size: cus(9) });
    s.feed(Input::Released);
    s.feed(Input::Permit { permitted: cus(9) });
    assert_eq!((s.vm.current, s.vm.permitted), (cus(2), cus(2)));
}

#[test]
fn nothing_changes_while_migrating() {
    let mut s = Sim::new(2);
    s.feed(Input::Migrating(true));
    s.at(10).feed(Input::Pressure(PressureKind::OomVictim));
    assert_eq!(s.step(), None);
    s.feed(Input::Migrating(false));
    assert!(matches!(s.step(), Some(Action::RequestPermit { .. })));
}

#[test]
fn bounds_changed_clamp_the_goal() {
    let mut s = Sim::new(4);
    s.at(10).using(10.0); // wants 14
    s.feed(Input::Bounds { min_cus: 1, max_cus: 6 });
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(6) }));
}

#[test]
fn agent_restart_resumes_from_qemu_and_leftover_permit() {
    // QEMU has 4 CUs, the last permit was 6: plug straight to the permit, no new request.
    let mut vm = VmCore::new(CU, 1, 16, whole_plugs(), cus(4), cus(6), 7);
    vm.input(0, Input::AllocatorConnected(true));
    vm.input(0, Input::Sample(Usage { load_avg_1: 0.0, memory_used_bytes: 5 * GIB }));
    assert_eq!(vm.step(0).action, Some(Action::Plug { target: cus(6) }));
}

#[test]
fn stale_samples_never_shrink() {
    let mut s = Sim::new(4);
    s.at(0).using(0.5);
    s.at(10 * 60_000);
    assert_eq!(s.vm.goal_cus(s.now), 4, "old numbers: hold the size");
    assert_eq!(s.step(), None);
}

#[test]
fn a_plug_that_cannot_reach_another_cu_backs_off_instead_of_looping() {
    let mut s = Sim::new(2);
    s.at(10).using(3.0); // wants 4
    assert_eq!(s.step(), Some(Action::RequestPermit { target: cus(4) }));
    s.feed(Input::Permit { permitted: cus(4) });
    assert_eq!(s.step(), Some(Action::Plug { target: cus(4) }));
    // Memory arrived but the CPU could not: still 2 whole CUs.
    s.feed(Input::Plugged { size: Size::new(500, 4 * GIB) });
    let d = s.vm.step(s.now);
    assert_eq!(d.action, None, "no immediate re-plug");
    assert!(d.wake_at_ms.is_some_and(|w| w > s.now), "backing off");
    assert_eq!(s.vm.failures, 1);
}

const MIB: u64 = 1 << 20;
/// The e2e tests' shape: CUs of 1/8 vCPU and 128 MiB.
const SMALL: Cu = Cu { milli_cpu: 125, memory_bytes: 128 * MIB };

fn small_vm(n: u32) -> VmCore {
    let size = Size::of_cus(n, SMALL);
    let mut vm = VmCore::new(SMALL, 1, 16, Policy::default(), size, size, 3);
    vm.input(0, Input::InformantConnected(true));
    vm.input(0, Input::AllocatorConnected(true));
    vm
}

fn used_mib(mib: u64) -> Input {
    Input::Sample(Usage { load_avg_1: 0.0, memory_used_bytes: mib * MIB })
}

#[test]
fn memory_the_guest_never_sees_counts_towards_the_goal() {
    // 512 MiB in QEMU, 392 MiB MemTotal in the guest, 300 MiB used: 77% of
    // what the guest has. By QEMU's size (59%) it would wait.
    let mut vm = small_vm(4);
    vm.input(10, used_mib(300));
    assert_eq!(vm.step(10).action, None, "without MemTotal: 300 / 0.75 = 400 MiB fits 4 CUs");
    vm.input(20, Input::GuestMemory { total_bytes: 392 * MIB });
    assert_eq!(vm.memory_overhead(), Some(120 * MIB));
    assert_eq!(vm.goal_cus(20), 5, "400 + 120 MiB needs 5 CUs");
    assert_eq!(vm.step(20).action, Some(Action::RequestPermit { target: Size::of_cus(5, SMALL) }));
}

#[test]
fn guest_memory_reports_around_a_plug_do_not_skew_the_overhead() {
    let mut vm = small_vm(4);
    vm.input(0, used_mib(300));
    vm.input(0, Input::GuestMemory { total_bytes: 392 * MIB });
    assert_eq!(vm.step(0).action, Some(Action::RequestPermit { target: Size::of_cus(5, SMALL) }));
    vm.input(1, Input::Permit { permitted: Size::of_cus(5, SMALL) });
    assert!(matches!(vm.step(1).action, Some(Action::Plug { .. })));
    // The guest onlined the DIMM before QEMU's answer reached the core:
    // 520 MiB against 512 would mean no overhead at all. Ignored.
    vm.input(2, Input::GuestMemory { total_bytes: 520 * MIB });
    assert_eq!(vm.memory_overhead(), Some(120 * MIB));
    vm.input(3, Input::Plugged { size: Size::of_cus(5, SMALL) });
    // A report that lags the plug (still 392 MiB against 640) is larger: the
    // smallest difference stands.
    vm.input(4, Input::GuestMemory { total_bytes: 392 * MIB });
    assert_eq!(vm.memory_overhead(), Some(120 * MIB));
    vm.input(5, Input::GuestMemory { total_bytes: 519 * MIB });
    assert_eq!(vm.memory_overhead(), Some(120 * MIB));
    // Nonsense (MemTotal 0, or far below the VM) never makes the VM huge.
    vm.input(6, Input::GuestMemory { total_bytes: 0 });
    assert_eq!(vm.memory_overhead(), Some(120 * MIB));
    let mut fresh = small_vm(4);
    fresh.input(0, Input::GuestMemory { total_bytes: MIB });
    assert_eq!(fresh.memory_overhead(), Some(256 * MIB), "at most half the VM");
}

#[test]
fn a_plug_whose_outcome_is_unknown_forgets_the_overhead() {
    let mut vm = small_vm(4);
    vm.input(0, Input::GuestMemory { total_bytes: 392 * MIB });
    vm.input(0, used_mib(300));
    vm.step(0);
    vm.input(1, Input::Permit { permitted: Size::of_cus(5, SMALL) });
    vm.step(1);
    vm.input(2, Input::Failed { size: None });
    assert_eq!(vm.memory_overhead(), None, "QEMU's size unknown: learn it again");
}

/// Drives every downscale to its end (approved, unplugged as asked,
/// released) until the core stops asking; the targets asked for.
fn downscale_to_the_end(vm: &mut VmCore, used: u64) -> Vec<Size> {
    let mut asked = Vec::new();
    let mut now = 0;
    for _ in 0..200 {
        now += 5_000;
        vm.input(now, used_mib(used));
        match vm.step(now).action {
            Some(Action::AskDownscale { target, .. }) => {
                asked.push(target);
                vm.input(now, Input::DownscaleAnswer { approved: true });
                assert_eq!(vm.step(now).action, Some(Action::Unplug { target }));
                vm.input(now, Input::Unplugged { size: target });
                assert_eq!(vm.step(now).action, Some(Action::Release { size: target }));
                vm.input(now, Input::Released);
            }
            None => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    asked
}

#[test]
fn downscales_stop_at_boot_memory_which_nothing_can_unplug() {
    // 1 GiB: 512 MiB boot memory and four DIMMs; min 1 CU (128 MiB). The
    // guest is idle: the goal is 1 CU, but only the DIMMs can go.
    let mut vm = small_vm(8);
    vm.set_boot_memory(512 * MIB);
    assert_eq!(vm.floor(), Size::new(125, 512 * MIB));
    let asked = downscale_to_the_end(&mut vm, 20);
    assert!(asked.iter().all(|t| t.memory_bytes >= 512 * MIB), "asked below boot memory: {asked:?}");
    // CPU keeps shrinking with the CUs while memory sits at boot size.
    assert_eq!(asked.last(), Some(&Size::new(125, 512 * MIB)), "{asked:?}");
    assert_eq!(asked.len(), 7, "one CU per step, then nothing: {asked:?}");
    assert_eq!(vm.current, Size::new(125, 512 * MIB));
    assert_eq!(vm.step(10_000_000).action, None, "nothing left to ask for");
}

#[test]
fn a_vm_at_its_floor_in_both_dimensions_asks_nothing() {
    // 4 CUs of 512 MiB boot memory, min 4 CUs: nothing can go.
    let size = Size::of_cus(4, SMALL);
    let mut vm = VmCore::new(SMALL, 1, 16, Policy::default(), size, size, 3);
    vm.set_boot_memory(512 * MIB);
    vm.input(0, Input::InformantConnected(true));
    vm.input(0, Input::AllocatorConnected(true));
    vm.input(0, Input::Bounds { min_cus: 1, max_cus: 16 });
    // sysfs mode may start with more CPU than CUs: that part can go.
    let mut vm2 = VmCore::new(SMALL, 1, 16, Policy::default(), Size::new(2000, 512 * MIB), size, 3);
    vm2.set_boot_memory(512 * MIB);
    vm2.input(0, Input::InformantConnected(true));
    vm2.input(0, Input::AllocatorConnected(true));
    let asked = downscale_to_the_end(&mut vm2, 20);
    assert_eq!(asked.first(), Some(&Size::new(375, 512 * MIB)), "one CU below 4, CPU only: {asked:?}");
    assert_eq!(vm2.current, Size::new(125, 512 * MIB));
    let asked = downscale_to_the_end(&mut vm, 20);
    assert_eq!(asked.len(), 3, "{asked:?}");
    assert_eq!(downscale_to_the_end(&mut vm, 20), vec![], "at the floor: no more asks");
}

#[test]
fn cpu_pressure_grows_only_where_more_cus_bring_more_cpu() {
    // Every vCPU online (sysfs mode starts so): 2000 mCPU, 512 MiB, 4 CUs
    // of 125 mCPU + 128 MiB. More CUs would add only memory: ignored.
    let mut vm = VmCore::new(
        SMALL,
        1,
        16,
        Policy::default(),
        Size::new(2000, 512 * MIB),
        Size::new(2000, 512 * MIB),
        3,
    );
    vm.input(0, Input::InformantConnected(true));
    vm.input(0, Input::AllocatorConnected(true));
    for t in 0..20 {
        vm.input(t * 100, Input::Pressure(PressureKind::PsiCpu));
        assert_eq!(vm.step(t * 100).action, None, "no growth from CPU pressure the VM can't use");
    }
    // Half a vCPU per CU, one vCPU online: more CUs bring CPU, so grow.
    let cu = Cu { milli_cpu: 500, memory_bytes: 128 * MIB };
    let mut vm =
        VmCore::new(cu, 1, 4, Policy::default(), Size::new(1000, 512 * MIB), Size::new(1000, 512 * MIB), 3);
    vm.input(0, Input::InformantConnected(true));
    vm.input(0, Input::AllocatorConnected(true));
    vm.input(10, Input::Pressure(PressureKind::PsiCpu));
    assert_eq!(vm.step(10).action, Some(Action::RequestPermit { target: Size::new(1500, 512 * MIB) }));
}

#[test]
fn a_vm_with_more_vcpus_than_its_cus_hold_gives_the_excess_back() {
    // Booted with 2 vCPUs online (8 CUs of CPU) and memory for 4 CUs: at a
    // goal of 4 CUs the second vCPU is excess, and it goes once use has
    // stayed low; then nothing more is asked.
    let found = Size::new(2000, 4 * GIB);
    let mut vm = VmCore::new(CU, 4, 16, whole_plugs(), found, found, 42);
    vm.input(0, Input::InformantConnected(true));
    vm.input(0, Input::AllocatorConnected(true));
    let mut s = Sim { vm, now: 0 };
    s.at(10).using(0.5);
    assert_eq!(s.step(), None, "use must stay low for a while first");
    let later = 10 + Policy::default().downscale_after_ms + 1;
    s.at(later).using(0.5);
    let asked = s.step();
    assert!(
        matches!(asked, Some(Action::AskDownscale { target, .. }) if target == Size::new(1000, 4 * GIB)),
        "{asked:?}"
    );
    s.feed(Input::DownscaleAnswer { approved: true });
    assert!(matches!(s.step(), Some(Action::Unplug { target }) if target == Size::new(1000, 4 * GIB)));
    s.feed(Input::Unplugged { size: Size::new(1000, 4 * GIB) });
    assert!(matches!(s.step(), Some(Action::Release { .. })));
    s.feed(Input::Released);
    s.at(later + 600_000).using(0.5);
    assert_eq!(s.step(), None, "at its CUs' shape nothing more is asked");
}
