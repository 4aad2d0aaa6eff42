//! Scenario tests of `policy.first_plug_cus`: an upscale of several CUs
//! plugs a small first step (relief), then the rest, then tells the
//! informant once; `current` follows each plug's reported size.

use super::policy::{Cu, Policy, Size};
use super::pressure::PressureKind;
use super::vm::{Action, Input, VmCore};

const GIB: u64 = 1 << 30;
const CU: Cu = Cu { milli_cpu: 250, memory_bytes: GIB };

fn cus(n: u32) -> Size {
    Size::of_cus(n, CU)
}

/// A VM of 4 CUs, bounds 1..=16, both peers connected, first plugs of one CU.
fn vm() -> VmCore {
    let policy = Policy { first_plug_cus: 1, ..Policy::default() };
    let mut vm = VmCore::new(CU, 1, 16, policy, cus(4), cus(4), 7);
    vm.input(0, Input::InformantConnected(true));
    vm.input(0, Input::AllocatorConnected(true));
    vm
}

/// Pressure at 4 CUs calls for 6; the whole permit is asked for first.
fn pressured_and_permitted(vm: &mut VmCore, grant: u32) {
    vm.input(10, Input::Pressure(PressureKind::MemcgReclaim));
    assert_eq!(vm.step(10).action, Some(Action::RequestPermit { target: cus(6) }));
    vm.input(11, Input::Permit { permitted: cus(grant) });
}

#[test]
fn one_cu_first_then_the_rest_then_one_notice() {
    let mut vm = vm();
    pressured_and_permitted(&mut vm, 6);
    assert_eq!(vm.step(11).action, Some(Action::Plug { target: cus(5) }), "relief first");
    vm.input(30, Input::Plugged { size: cus(5) });
    assert_eq!(vm.current, cus(5), "current is what QEMU reported");
    assert_eq!(vm.step(30).action, Some(Action::Plug { target: cus(6) }), "the rest before the notice");
    vm.input(50, Input::Plugged { size: cus(6) });
    assert_eq!(vm.step(50).action, Some(Action::NotifyUpscale { size: cus(6) }));
    vm.input(90, Input::UpscaleConfirmed);
    let d = vm.step(90);
    let t = d.upscale_done.expect("one upscale, reported once");
    assert_eq!((t.to_permit_ms, t.to_plug_ms, t.to_confirm_ms), (Some(1), Some(40), Some(80)));
    assert_eq!(d.action, None);
    assert_eq!((vm.current, vm.permitted), (cus(6), cus(6)));
}

#[test]
fn growth_of_one_step_is_not_split() {
    let mut vm = vm();
    pressured_and_permitted(&mut vm, 5);
    assert_eq!(vm.step(11).action, Some(Action::Plug { target: cus(5) }));
    vm.input(30, Input::Plugged { size: cus(5) });
    assert_eq!(vm.step(30).action, Some(Action::NotifyUpscale { size: cus(5) }));
}

#[test]
fn a_failed_first_step_returns_the_whole_unused_permit() {
    let mut vm = vm();
    pressured_and_permitted(&mut vm, 6);
    assert_eq!(vm.step(11).action, Some(Action::Plug { target: cus(5) }));
    vm.input(20, Input::Failed { size: Some(cus(4)) });
    let retry = vm.step(20).wake_at_ms.expect("backing off");
    assert_eq!(vm.step(retry).action, Some(Action::Release { size: cus(4) }));
    vm.input(retry, Input::Released);
    assert_eq!((vm.current, vm.permitted), (cus(4), cus(4)));
}

#[test]
fn a_failed_rest_keeps_the_first_step_and_returns_the_remainder() {
    let mut vm = vm();
    pressured_and_permitted(&mut vm, 6);
    assert_eq!(vm.step(11).action, Some(Action::Plug { target: cus(5) }));
    vm.input(30, Input::Plugged { size: cus(5) });
    assert_eq!(vm.step(30).action, Some(Action::Plug { target: cus(6) }));
    vm.input(40, Input::Failed { size: Some(cus(5)) });
    let retry = vm.step(40).wake_at_ms.expect("backing off");
    assert_eq!(vm.step(retry).action, Some(Action::Release { size: cus(5) }), "ledger first");
    vm.input(retry, Input::Released);
    assert_eq!(vm.permitted, cus(5));
    assert_eq!(
        vm.step(retry).action,
        Some(Action::NotifyUpscale { size: cus(5) }),
        "the guest still hears of the step that worked"
    );
}

#[test]
fn without_an_informant_the_rest_follows_and_nobody_is_told() {
    let mut vm = vm();
    vm.input(0, Input::InformantConnected(false));
    pressured_and_permitted(&mut vm, 6);
    assert_eq!(vm.step(11).action, Some(Action::Plug { target: cus(5) }));
    vm.input(30, Input::Plugged { size: cus(5) });
    assert_eq!(vm.step(30).action, Some(Action::Plug { target: cus(6) }));
    vm.input(50, Input::Plugged { size: cus(6) });
    assert_eq!(vm.step(50).action, None);
    assert_eq!(vm.current, cus(6));
}

#[test]
fn a_migration_after_the_first_step_tells_the_guest_and_holds_the_rest() {
    let mut vm = vm();
    pressured_and_permitted(&mut vm, 6);
    assert_eq!(vm.step(11).action, Some(Action::Plug { target: cus(5) }));
    vm.input(30, Input::Plugged { size: cus(5) });
    vm.input(31, Input::Migrating(true));
    assert_eq!(vm.step(31).action, Some(Action::NotifyUpscale { size: cus(5) }));
    vm.input(60, Input::UpscaleConfirmed);
    assert_eq!(vm.step(60).action, None, "nothing while migrating");
    vm.input(900, Input::Migrating(false));
    assert_eq!(vm.step(900).action, Some(Action::Plug { target: cus(6) }), "a fresh upscale, one CU to go");
}
