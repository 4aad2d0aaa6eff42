//! Scenario tests of the rules the VM loop used to apply around the core:
//! which pressure events count, the CPU size in sysfs mode and the
//! downscale's vCPU count, when `cpu.max` is set, polling mode, and the
//! CPU settle time as a policy field.

use super::policy::{Cu, Policy, Size, Usage};
use super::pressure::{PressureKind, PressureKinds};
use super::vm::{Action, Input, VmCore};
use crate::core::polling::Polling;
use crate::vms::CpuMode;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CU: Cu = Cu { milli_cpu: 250, memory_bytes: GIB };

fn cus(n: u32) -> Size {
    Size::of_cus(n, CU)
}

/// Upscales are plugged whole here (`first_plug_cus` has its own tests).
fn policy() -> Policy {
    Policy { first_plug_cus: 0, ..Policy::default() }
}

/// A VM found at `current`, bounds 1..=max, both peers connected.
fn vm(cu: Cu, max: u32, policy: Policy, current: Size) -> VmCore {
    let mut vm = VmCore::new(cu, 1, max, policy, current, current, 11);
    vm.input(0, Input::InformantConnected(true));
    vm.input(0, Input::AllocatorConnected(true));
    vm
}

/// The action a pressure event of `kind` leads to at 4 CUs.
fn after_pressure(policy: Policy, kind: PressureKind) -> Option<Action> {
    let mut vm = vm(CU, 16, policy, cus(4));
    vm.input(10, Input::Pressure(kind));
    vm.step(10).action
}

#[test]
fn each_kind_grows_by_its_step() {
    for kind in PressureKind::ALL {
        let want = match kind {
            k if k.is_oom() => Some(Action::RequestPermit { target: cus(8) }),
            // Unknown kinds too: a newer informant's signal is still
            // pressure. CPU pressure too, where 6 CUs bring more CPU.
            _ => Some(Action::RequestPermit { target: cus(6) }),
        };
        assert_eq!(after_pressure(policy(), kind), want, "{kind}");
    }
}

#[test]
fn ignored_kinds_are_not_acted_on() {
    let ignoring = |kinds: &[PressureKind]| Policy { ignore_pressure: PressureKinds::of(kinds), ..policy() };
    let p = ignoring(&[PressureKind::MemcgReclaim, PressureKind::Unknown]);
    assert_eq!(after_pressure(p.clone(), PressureKind::MemcgReclaim), None);
    assert_eq!(after_pressure(p.clone(), PressureKind::Unknown), None);
    assert_eq!(after_pressure(p, PressureKind::PsiMemory), Some(Action::RequestPermit { target: cus(6) }));
    // CPU pressure where more CUs bring more CPU: acted on unless ignored.
    let cu = Cu { milli_cpu: 500, memory_bytes: 128 * MIB };
    let one_vcpu = Size::new(1000, 512 * MIB);
    let cpu = |p: Policy| {
        let mut vm = vm(cu, 4, p, one_vcpu);
        vm.input(10, Input::Pressure(PressureKind::PsiCpu));
        vm.step(10).action
    };
    assert_eq!(cpu(policy()), Some(Action::RequestPermit { target: Size::new(1500, 512 * MIB) }));
    assert_eq!(cpu(ignoring(&[PressureKind::PsiCpu])), None);
}

#[test]
fn polling_mode_ignores_pressure_and_decides_on_each_ticks_average() {
    let polling = Polling { loop_interval_ms: 1000, sample_average_ms: 500 };
    let p = Policy { polling: Some(Box::new(polling)), ..policy() };
    let mut vm = vm(CU, 16, p, cus(2));
    vm.input(100, Input::Pressure(PressureKind::OomVictim));
    let d = vm.step(100);
    assert_eq!((d.action, d.wake_at_ms), (None, Some(1000)), "pressure ignored; woken for the tick");
    let used = |gib: u64| Input::Sample(Usage { load_avg_1: 0.0, memory_used_bytes: gib * GIB });
    vm.input(200, used(9)); // outside the window before the tick
    vm.input(600, used(2));
    vm.input(900, used(4)); // average 3 GiB: 3 / 0.75 = 4 CUs
    assert_eq!(vm.step(900).action, None, "samples wait for the tick");
    let d = vm.step(1000);
    assert_eq!(d.polled.map(|t| t.samples), Some(2));
    assert_eq!(d.action, Some(Action::RequestPermit { target: cus(4) }));
    assert_eq!(d.wake_at_ms, Some(2000), "the next tick");
}

/// In sysfs mode QEMU keeps every vCPU; the guest onlines what the core
/// says. 250 mCPU and 256 MiB per CU, two vCPUs in QEMU.
#[test]
fn sysfs_cpu_is_the_target_within_qemus_vcpus() {
    let cu = Cu { milli_cpu: 250, memory_bytes: 256 * MIB };
    let mut vm = vm(cu, 12, policy(), Size::new(2000, 1024 * MIB));
    vm.set_cpu_mode(CpuMode::Sysfs);
    let low = Input::Sample(Usage { load_avg_1: 0.0, memory_used_bytes: 500 * MIB });
    vm.input(0, low.clone());
    assert_eq!(vm.step(0).action, None);
    let later = Policy::default().downscale_after_ms;
    vm.input(later, low);
    let target = Size::new(750, 768 * MIB);
    assert_eq!(
        vm.step(later).action,
        Some(Action::AskDownscale { target, vcpus: 1 }),
        "one vCPU kept online"
    );
    vm.input(later, Input::DownscaleAnswer { approved: true });
    assert_eq!(vm.step(later).action, Some(Action::Unplug { target }));
    // QEMU still has both vCPUs; the guest keeps 750 mCPU's worth online.
    vm.input(later, Input::Unplugged { size: Size::new(2000, 768 * MIB) });
    assert_eq!(vm.current, target);
    assert_eq!(vm.step(later).action, Some(Action::Release { size: target }));
    vm.input(later, Input::Released);
    // OOM at 3 CUs asks for 6: 1500 mCPU, within QEMU's two vCPUs.
    let t = later + 1;
    vm.input(t, Input::Pressure(PressureKind::OomVictim));
    let six = Size::new(1500, 1536 * MIB);
    assert_eq!(vm.step(t).action, Some(Action::RequestPermit { target: six }));
    vm.input(t, Input::Permit { permitted: six });
    assert_eq!(vm.step(t).action, Some(Action::Plug { target: six }));
    vm.input(t, Input::Plugged { size: Size::new(2000, 1536 * MIB) });
    assert_eq!(vm.current, six, "the target's CPU, not every vCPU QEMU has");
    assert_eq!(vm.step(t).action, Some(Action::NotifyUpscale { size: six }));
    vm.input(t, Input::UpscaleConfirmed);
    // OOM again asks for 12 CUs (3000 mCPU): two vCPUs are all there is.
    vm.input(t, Input::Pressure(PressureKind::OomVictim));
    let twelve = Size::new(3000, 3072 * MIB);
    assert_eq!(vm.step(t).action, Some(Action::RequestPermit { target: twelve }));
    vm.input(t, Input::Permit { permitted: twelve });
    assert_eq!(vm.step(t).action, Some(Action::Plug { target: twelve }));
    vm.input(t, Input::Plugged { size: Size::new(2000, 3072 * MIB) });
    assert_eq!(vm.current, Size::new(2000, 3072 * MIB), "clamped to QEMU's vCPUs");
}

#[test]
fn hotplug_mode_takes_qemus_vcpus_and_asks_the_guest_for_memory_only() {
    let cu = Cu { milli_cpu: 250, memory_bytes: 256 * MIB };
    let mut vm = vm(cu, 12, policy(), Size::new(2000, 1024 * MIB));
    let low = Input::Sample(Usage { load_avg_1: 0.0, memory_used_bytes: 500 * MIB });
    vm.input(0, low.clone());
    vm.step(0);
    let later = Policy::default().downscale_after_ms;
    vm.input(later, low);
    let target = Size::new(750, 768 * MIB);
    assert_eq!(vm.step(later).action, Some(Action::AskDownscale { target, vcpus: 0 }));
    vm.input(later, Input::DownscaleAnswer { approved: true });
    vm.step(later);
    vm.input(later, Input::Unplugged { size: Size::new(1000, 768 * MIB) });
    assert_eq!(vm.current, Size::new(1000, 768 * MIB), "what QEMU has");
}

#[test]
fn cpu_max_follows_the_cpu_size_and_a_failed_one_is_retried_at_the_next_resize() {
    let cu = Cu { milli_cpu: 250, memory_bytes: 256 * MIB };
    let p = Policy { cpu_max_cgroup: true, ..policy() };
    let mut vm = vm(cu, 12, p, Size::new(2000, 1024 * MIB));
    vm.set_cpu_mode(CpuMode::Sysfs);
    assert_eq!(vm.step(0).cpu_max, Some(2000), "set for the size the VM was found at");
    vm.input(0, Input::CpuMaxSet { milli_cpu: 2000, ok: false });
    assert_eq!(vm.step(0).cpu_max, None, "no retry loop: the quota is no condition of scaling");
    // A memory-only plug: the CPU stays, but the failed quota is tried again.
    vm.input(1, Input::Pressure(PressureKind::MemcgReclaim));
    let six = Size::new(2000, 1536 * MIB);
    assert_eq!(vm.step(1).action, Some(Action::RequestPermit { target: six }));
    vm.input(1, Input::Permit { permitted: six });
    assert_eq!(vm.step(1).action, Some(Action::Plug { target: six }));
    vm.input(1, Input::Plugged { size: six });
    let d = vm.step(1);
    assert_eq!((d.cpu_max, d.action), (Some(2000), Some(Action::NotifyUpscale { size: six })));
    vm.input(1, Input::CpuMaxSet { milli_cpu: 2000, ok: true });
    vm.input(1, Input::UpscaleConfirmed);
    // The same CPU after another plug: already set.
    vm.input(2, Input::Pressure(PressureKind::MemcgReclaim));
    let nine = Size::new(2250, 2304 * MIB);
    assert_eq!(vm.step(2).action, Some(Action::RequestPermit { target: nine }));
    vm.input(2, Input::Permit { permitted: nine });
    vm.step(2);
    vm.input(2, Input::Plugged { size: Size::new(2000, 2304 * MIB) });
    assert_eq!(vm.current, Size::new(2000, 2304 * MIB));
    assert_eq!(vm.step(2).cpu_max, None);
    // A fractional size after a downscale gets its quota.
    let mut down = self::vm(cu, 12, Policy { cpu_max_cgroup: true, ..policy() }, Size::new(2000, 1024 * MIB));
    down.set_cpu_mode(CpuMode::Sysfs);
    assert_eq!(down.step(0).cpu_max, Some(2000));
    down.input(0, Input::CpuMaxSet { milli_cpu: 2000, ok: true });
    let idle = Input::Sample(Usage { load_avg_1: 0.0, memory_used_bytes: 0 });
    down.input(0, idle.clone());
    down.step(0);
    let later = Policy::default().downscale_after_ms;
    down.input(later, idle);
    let three = Size::new(750, 768 * MIB);
    assert_eq!(down.step(later).action, Some(Action::AskDownscale { target: three, vcpus: 1 }));
    down.input(later, Input::DownscaleAnswer { approved: true });
    down.step(later);
    down.input(later, Input::Unplugged { size: Size::new(2000, 768 * MIB) });
    assert_eq!(down.step(later).cpu_max, Some(750));
    // Without the policy, never.
    let mut off = self::vm(cu, 12, policy(), Size::new(2000, 1024 * MIB));
    assert_eq!(off.step(0).cpu_max, None);
}

#[test]
fn the_cpu_settle_time_is_the_policys() {
    let run = |cpu_settle_ms: u64| {
        let p = Policy { cpu_settle_ms, ..policy() };
        let mut vm = vm(CU, 16, p, cus(6));
        let low = Input::Sample(Usage { load_avg_1: 0.1, memory_used_bytes: GIB });
        vm.input(0, low.clone());
        vm.step(0);
        let t = Policy::default().downscale_after_ms;
        vm.input(t, low);
        assert!(matches!(vm.step(t).action, Some(Action::AskDownscale { .. })));
        vm.input(t, Input::DownscaleAnswer { approved: true });
        vm.step(t);
        vm.input(t, Input::Unplugged { size: cus(5) });
        vm.step(t);
        vm.input(t, Input::Released);
        vm.input(t + 1, Input::Pressure(PressureKind::PsiCpu));
        vm.step(t + 1).action
    };
    assert_eq!(run(10_000), None, "the downscale's echo");
    assert!(matches!(run(0), Some(Action::RequestPermit { .. })), "no settle time: CPU pressure counts");
}
