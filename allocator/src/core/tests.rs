//! Scenario and table tests of [`Cluster`]: sessions, permits, releases, VMs
//! coming and going, migration orders and re-registration after a restart.
//! Every failing call is checked to leave the whole state as it was.

use super::error::{CoreError, ErrorKind, Result};
use super::ledger::Outcome;
use super::migration::OrderState;
use super::units::{ComputeUnit, Resources, MAX_MEMORY_BYTES, MAX_MILLI_CPU};
use super::vm::{Bounds, VmRegistration, VmState};
use super::*;
use std::fmt::Debug;

const GIB: u64 = 1 << 30;
const NOW: u64 = 1_000;
const TIMEOUT: u64 = 60_000;

fn r(milli_cpu: u64, gib: u64) -> Resources {
    Resources::new(milli_cpu, gib * GIB)
}

fn cu() -> ComputeUnit {
    ComputeUnit::new(r(250, 1)).unwrap()
}

fn config() -> CoreConfig {
    CoreConfig {
        system_reserve: r(1000, 4),
        watermark: 0.8,
        order_timeout_ms: TIMEOUT,
        max_moves_per_round: 4,
        contended_p99_us: 5_000,
        move_retry_base_ms: 5_000,
        move_retry_max_ms: 300_000,
        ..CoreConfig::default()
    }
}

/// Usable (8000 mCPU, 32 GiB) once the system reserve is taken off; the
/// watermark level is (6400 mCPU, 25.6 GiB).
const CAPACITY: Resources = Resources::new(9000, 36 * GIB);

fn vm(id: &str, current: Resources) -> VmRegistration {
    VmRegistration::new(
        id.into(),
        current,
        Resources::ZERO,
        Bounds::new(r(250, 1), r(4000, 16)).unwrap(),
        cu(),
    )
    .unwrap()
}

fn migrating(id: &str, current: Resources, order: u64, target: &str) -> VmRegistration {
    VmRegistration { migration: Some((order, target.into())), ..vm(id, current) }
}

fn endpoint(node: &str) -> String {
    format!("https://{node}:7073")
}

/// The id this cluster issued (or would have) for moving `vm` from `source`
/// to `target` at `now`.
fn signed(c: &Cluster, vm: &str, source: &str, target: &str) -> u64 {
    c.order_ids.issue(NOW, vm, source, target, |_| false).unwrap()
}

#[test]
fn a_migration_endpoint_must_be_https_to_a_host_and_port() {
    let mut c = Cluster::new(config());
    for bad in ["10.0.0.2:7073", "https://a b:1", "ftp://x", "http://a:7073", "https://a", "https://a:1/x"] {
        let reg = NodeRegistration { migration_endpoint: bad.into(), ..hello("a", vec![]) };
        let e = c.open_session(reg, NOW).unwrap_err();
        assert!(e.to_string().contains("migration endpoint"), "{bad}: {e}");
    }
    assert!(c.nodes.is_empty(), "nothing registered");
    let reg = NodeRegistration { migration_endpoint: String::new(), ..hello("a", vec![]) };
    c.open_session(reg, NOW).unwrap();
    assert_eq!(c.nodes["a"].migration_endpoint, "");
}

fn hello(node: &str, vms: Vec<VmRegistration>) -> NodeRegistration {
    NodeRegistration {
        node: node.into(),
        capacity: CAPACITY,
        vms,
        migration_endpoint: endpoint(node),
        refused: Vec::new(),
    }
}

fn open(c: &mut Cluster, node: &str, vms: Vec<VmRegistration>) -> SessionRef {
    let opened = c.open_session(hello(node, vms), NOW).unwrap();
    c.check_sums().unwrap();
    opened.session
}

fn state(c: &Cluster) -> serde_json::Value {
    serde_json::to_value(c).unwrap()
}

/// Runs an operation that must fail and checks that it changed nothing.
#[track_caller]
fn fails<T: Debug>(c: &mut Cluster, op: impl FnOnce(&mut Cluster) -> Result<T>) -> CoreError {
    let before = state(c);
    let e = op(c).expect_err("the call should fail");
    assert_eq!(state(c), before, "a failed call changed the state ({e})");
    c.check_sums().unwrap();
    e
}

fn reserved(c: &Cluster, node: &str, vm: &str) -> Option<(Resources, VmState)> {
    c.node(node)?.vms.get(vm).map(|e| (e.reserved, e.state))
}

fn sessions(c: &Cluster) -> Vec<(String, Option<u64>)> {
    let mut v: Vec<_> = c.nodes.iter().map(|(n, l)| (n.clone(), l.session)).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------- sessions

#[test]
fn open_session_rejects_bad_registrations() {
    let mut absurd_cpu = hello("a", vec![]);
    absurd_cpu.capacity = Resources::new(MAX_MILLI_CPU + 1, GIB);
    let mut absurd_mem = hello("a", vec![]);
    absurd_mem.capacity = Resources::new(1000, u64::MAX);
    let mut zero_cpu = hello("a", vec![]);
    zero_cpu.capacity = Resources::new(0, 36 * GIB);
    let mut zero_mem = hello("a", vec![]);
    zero_mem.capacity = Resources::new(9000, 0);
    let mut too_long = hello("a", vec![]);
    too_long.node = "n".repeat(254);
    let mut control = hello("a", vec![]);
    control.node = "node\n7".into();
    let cases: Vec<(&str, NodeRegistration, &str)> = vec![
        ("empty node name", hello("", vec![]), "invalid"),
        ("node name too long", too_long, "invalid"),
        ("control character in node name", control, "invalid"),
        ("absurd cpu capacity", absurd_cpu, "absurd_amount"),
        ("absurd memory capacity", absurd_mem, "absurd_amount"),
        ("zero cpu capacity", zero_cpu, "invalid"),
        ("zero memory capacity", zero_mem, "invalid"),
        ("upper-case node name", hello("A", vec![]), "invalid"),
        ("node name with a slash", hello("a/b", vec![]), "invalid"),
    ];
    for (what, reg, label) in cases {
        // A live node "a" and another node: a bad hello for "a" must not
        // replace, close or touch the session that owns it.
        let mut c = Cluster::new(config());
        let a = open(&mut c, "a", vec![vm("x", r(1000, 4))]);
        open(&mut c, "b", vec![vm("y", r(1000, 4))]);
        let e = fails(&mut c, |c| c.open_session(reg, NOW));
        assert_eq!(e.label(), label, "{what}: {e}");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{what}");
        assert!(c.reserve(&a, "x", r(1250, 5)).is_ok(), "{what}: the old session must still work");
    }
}

#[test]
fn registration_reserves_the_larger_of_current_and_last_permit() {
    let mut c = Cluster::new(config());
    let mut x = vm("x", r(1000, 2));
    x.last_permit = r(750, 3);
    let y = vm("y", r(500, 1)); // no permit yet
    let opened = c.open_session(hello("a", vec![y, x]), NOW).unwrap();
    assert_eq!(opened.replaced, None);
    assert_eq!(
        opened.reservations,
        vec![
            Reservation { vm: "x".into(), reserved: r(1000, 3), migrating: false },
            Reservation { vm: "y".into(), reserved: r(500, 1), migrating: false },
        ]
    );
    let n = c.node("a").unwrap();
    assert_eq!(n.reserved(), r(1500, 4));
    assert_eq!(n.usable(), r(8000, 32));
    assert_eq!(n.session, Some(opened.session.id));
    c.check_sums().unwrap();
}

#[test]
fn a_second_session_replaces_the_first() {
    let mut c = Cluster::new(config());
    let first = open(&mut c, "a", vec![vm("x", r(1000, 4))]);
    let second = c.open_session(hello("a", vec![vm("x", r(1000, 4))]), NOW).unwrap();
    assert_eq!(second.replaced, Some(first.id));
    assert_ne!(second.session.id, first.id);
    let second = second.session;
    // Never two live sessions: every request of the old one is stale.
    let stale = |e: CoreError| {
        assert_eq!(e, CoreError::StaleSession { node: "a".into(), session: first.id });
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    };
    stale(fails(&mut c, |c| c.reserve(&first, "x", r(2000, 8))));
    stale(fails(&mut c, |c| c.release(&first, "x", r(250, 1))));
    stale(fails(&mut c, |c| c.add_vm(&first, vm("z", r(250, 1)))));
    stale(fails(&mut c, |c| c.remove_vm(&first, "x")));
    stale(fails(&mut c, |c| c.migration_status(&first, 1, OrderState::Failed, "", NOW)));
    // Closing the stale session is a no-op: the new one stays live.
    let before = state(&c);
    assert!(!c.close_session(&first));
    assert_eq!(state(&c), before);
    assert_eq!(sessions(&c), vec![("a".into(), Some(second.id))]);
    assert!(c.reserve(&second, "x", r(2000, 8)).is_ok());
    // A third session replaces the second in turn.
    let third = c.open_session(hello("a", vec![vm("x", r(2000, 8))]), NOW).unwrap();
    assert_eq!(third.replaced, Some(second.id));
    assert!(c.reserve(&second, "x", r(3000, 8)).is_err());
}

#[test]
fn closing_a_session_keeps_reservations_but_stops_grants() {
    let mut c = Cluster::new(config());
    let a = open(&mut c, "a", vec![vm("x", r(1000, 4))]);
    assert!(c.close_session(&a));
    assert_eq!(c.node("a").unwrap().session, None);
    assert_eq!(reserved(&c, "a", "x"), Some((r(1000, 4), VmState::Active)));
    // Closing twice is a no-op.
    let before = state(&c);
    assert!(!c.close_session(&a));
    assert_eq!(state(&c), before);
    let e = fails(&mut c, |c| c.reserve(&a, "x", r(2000, 8)));
    assert_eq!(e.label(), "stale_session");
    // Its agent comes back: a new session, nothing to replace.
    let back = c.open_session(hello("a", vec![vm("x", r(1000, 4))]), NOW).unwrap();
    assert_eq!(back.replaced, None);
    assert!(c.reserve(&back.session, "x", r(2000, 8)).is_ok());
}

#[test]
fn requests_for_an_unregistered_node_are_refused() {
    let mut c = Cluster::new(config());
    open(&mut c, "a", vec![vm("x", r(1000, 4))]);
    let ghost = SessionRef { node: "ghost".into(), id: 1 };
    let e = fails(&mut c, |c| c.reserve(&ghost, "x", r(2000, 8)));
    assert_eq!(e, CoreError::UnknownNode("ghost".into()));
    assert_eq!(e.kind(), ErrorKind::NotFound);
    fails(&mut c, |c| c.add_vm(&ghost, vm("y", r(250, 1))));
    assert!(!c.close_session(&ghost));
}

// ---------------------------------------------------------------- reserve

#[test]
fn reserve_grants_whole_cus_as_far_as_the_node_has_room() {
    let mut c = Cluster::new(config());
    let filler =
        VmRegistration { bounds: Bounds::new(r(250, 1), r(8000, 32)).unwrap(), ..vm("filler", r(5000, 20)) };
    let a = open(&mut c, "a", vec![vm("x", r(1000, 4)), filler]);
    assert_eq!(c.node("a").unwrap().free(), r(2000, 8));

    // (target, requested, permitted, outcome, granted CUs, requested CUs, unmet after)
    let steps = [
        // Fits: exactly the target.
        (r(2000, 8), r(2000, 8), r(2000, 8), Outcome::Granted, 4, 4, Resources::ZERO),
        // 8 CUs asked, room for 4.
        (r(4000, 16), r(4000, 16), r(3000, 12), Outcome::Partial, 4, 8, r(1000, 4)),
        // No room left at all.
        (r(4000, 16), r(4000, 16), r(3000, 12), Outcome::Denied, 0, 4, r(1000, 4)),
        // Nothing asked (at or below the reservation): granted, unchanged, no unmet.
        (r(1000, 2), r(3000, 12), r(3000, 12), Outcome::Granted, 0, 0, Resources::ZERO),
    ];
    for (i, (target, requested, permitted, outcome, granted_cus, requested_cus, unmet)) in
        steps.into_iter().enumerate()
    {
        let g = c.reserve(&a, "x", target).unwrap();
        assert_eq!(
            (g.requested, g.permitted, g.outcome, g.granted_cus, g.requested_cus),
            (requested, permitted, outcome, granted_cus, requested_cus),
            "step {i}: {g:?}"
        );
        let e = &c.node("a").unwrap().vms["x"];
        assert_eq!((e.reserved, e.unmet), (permitted, unmet), "step {i}");
        assert_eq!(c.node("a").unwrap().unmet(), unmet, "step {i}");
        assert!(c.node("a").unwrap().reserved().fits_in(r(8000, 32)), "step {i}");
        c.check_sums().unwrap();
    }

    // Room again; a target that is not a whole number of CUs is met exactly
    // (the last step is cut at the target).
    c.release(&a, "filler", r(1000, 4)).unwrap();
    let g = c.reserve(&a, "x", Resources::new(3100, 12 * GIB + 5)).unwrap();
    assert_eq!(
        (g.permitted, g.outcome, g.granted_cus),
        (Resources::new(3100, 12 * GIB + 5), Outcome::Granted, 1)
    );
    // Mixed request: more cpu, less memory; memory stays where it is.
    let g = c.reserve(&a, "x", r(3600, 2)).unwrap();
    assert_eq!(g.permitted, Resources::new(3600, 12 * GIB + 5));
}

#[test]
fn reserve_never_grants_past_the_usable_capacity_in_either_dimension() {
    // Memory is the scarce dimension: 2.5 GiB free, cpu plenty.
    let mut c = Cluster::new(config());
    let filler = VmRegistration {
        bounds: Bounds::new(r(250, 1), r(8000, 32)).unwrap(),
        ..vm("filler", Resources::new(1000, 28 * GIB + GIB / 2))
    };
    let a = open(&mut c, "a", vec![vm("x", r(1000, 1)), filler]);
    let g = c.reserve(&a, "x", r(4000, 16)).unwrap();
    // Two whole CUs of memory fit, not three: cpu grows in step.
    assert_eq!((g.permitted, g.outcome), (r(1500, 3), Outcome::Partial));
    assert!(c.node("a").unwrap().reserved().fits_in(c.node("a").unwrap().usable()));
}

#[test]
fn reserve_refuses_bad_requests_without_changing_anything() {
    let mut c = Cluster::new(config());
    let a = open(&mut c, "a", vec![vm("x", r(1000, 4))]);
    let b = open(&mut c, "b", vec![vm("y", r(1000, 4))]);

    let e = fails(&mut c, |c| c.reserve(&a, "x", r(4250, 4)));
    assert_eq!(e.label(), "invalid", "{e}");
    assert!(e.to_string().contains("above its maximum"), "{e}");
    let e = fails(&mut c, |c| c.reserve(&a, "x", r(1000, 17)));
    assert_eq!(e.label(), "invalid", "{e}");
    let e = fails(&mut c, |c| c.reserve(&a, "x", Resources::new(u64::MAX, GIB)));
    assert_eq!(e.label(), "absurd_amount", "{e}");
    assert!(e.to_string().contains("milli-vCPU"), "{e}");
    let e = fails(&mut c, |c| c.reserve(&a, "x", Resources::new(1000, MAX_MEMORY_BYTES + 1)));
    assert_eq!(e.label(), "absurd_amount", "{e}");

    let e = fails(&mut c, |c| c.reserve(&a, "nope", r(2000, 8)));
    assert_eq!(e, CoreError::UnknownVm { node: "a".into(), vm: "nope".into() });
    let e = fails(&mut c, |c| c.reserve(&a, "y", r(2000, 8)));
    assert_eq!(e, CoreError::VmOnOtherNode { node: "a".into(), vm: "y".into(), owner: "b".into() });
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    // The owner may.
    assert!(c.reserve(&b, "y", r(2000, 8)).is_ok());
}

#[test]
fn a_node_registered_over_its_capacity_gets_no_grants() {
    let mut c = Cluster::new(config());
    let big = |id: &str| VmRegistration {
        bounds: Bounds::new(r(250, 1), r(8000, 32)).unwrap(),
        ..vm(id, r(4000, 17))
    };
    let a = open(&mut c, "a", vec![big("x"), big("y")]);
    assert!(c.node("a").unwrap().is_overcommitted());
    // Memory is over: any memory growth is denied...
    let g = c.reserve(&a, "x", r(4000, 18)).unwrap();
    assert_eq!((g.permitted, g.outcome), (r(4000, 17), Outcome::Denied));
    // ...and cpu is full (8000 of 8000 reserved), so cpu growth is too.
    let g = c.reserve(&a, "x", r(4250, 17)).unwrap();
    assert_eq!(g.outcome, Outcome::Denied);
    // Releasing brings it back under.
    c.release(&a, "y", r(2000, 8)).unwrap();
    assert!(!c.node("a").unwrap().is_overcommitted());
}

// ---------------------------------------------------------------- release

#[test]
fn release_is_applied_at_once_and_checked() {
    let mut c = Cluster::new(config());
    let other =
        VmRegistration { bounds: Bounds::new(r(250, 1), r(8000, 32)).unwrap(), ..vm("other", r(4000, 20)) };
    let a = open(&mut c, "a", vec![vm("x", r(4000, 12)), other]);
    assert_eq!(c.node("a").unwrap().free(), Resources::ZERO);
    // A denied request leaves unmet demand behind.
    let g = c.reserve(&a, "other", r(5000, 24)).unwrap();
    assert_eq!(g.outcome, Outcome::Denied);
    assert_eq!(c.node("a").unwrap().unmet(), r(1000, 4));

    let e = fails(&mut c, |c| c.release(&a, "x", r(4250, 12)));
    assert!(e.to_string().contains("above its reservation"), "{e}");
    let e = fails(&mut c, |c| c.release(&a, "x", r(4000, 13)));
    assert_eq!(e.label(), "invalid");
    let e = fails(&mut c, |c| c.release(&a, "x", r(0, 4)));
    assert!(e.to_string().contains("below its minimum"), "{e}");
    let e = fails(&mut c, |c| c.release(&a, "x", Resources::new(1000, u64::MAX)));
    assert_eq!(e.label(), "absurd_amount");
    fails(&mut c, |c| c.release(&a, "ghost", r(250, 1)));

    // Down to the minimum in one dimension, part way in the other.
    c.release(&a, "x", r(250, 8)).unwrap();
    assert_eq!(reserved(&c, "a", "x"), Some((r(250, 8), VmState::Active)));
    assert_eq!(c.node("a").unwrap().free(), r(3750, 4));
    // The room is there at once for the next request.
    let g = c.reserve(&a, "other", r(5000, 24)).unwrap();
    assert_eq!((g.permitted, g.outcome), (r(5000, 24), Outcome::Granted));
    assert_eq!(c.node("a").unwrap().unmet(), Resources::ZERO);
    // A release clears the VM's unmet demand; releasing to the same size is fine.
    c.release(&a, "other", r(5000, 24)).unwrap();
    c.check_sums().unwrap();
}

// ---------------------------------------------------------------- add / remove

#[test]
fn vms_come_and_go() {
    let mut c = Cluster::new(config());
    let a = open(&mut c, "a", vec![vm("x", r(1000, 4))]);
    open(&mut c, "b", vec![vm("y", r(1000, 4))]);

    let res = c.add_vm(&a, vm("z", r(500, 2))).unwrap();
    assert_eq!(res, Reservation { vm: "z".into(), reserved: r(500, 2), migrating: false });
    assert_eq!(c.node("a").unwrap().reserved(), r(1500, 6));
    let e = fails(&mut c, |c| c.add_vm(&a, vm("z", r(250, 1))));
    assert_eq!(e, CoreError::VmExists("z".into()));
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let e = fails(&mut c, |c| c.add_vm(&a, migrating("w", r(250, 1), signed(c, "w", "a", "b"), "b")));
    assert_eq!(e.label(), "invalid");

    c.remove_vm(&a, "x").unwrap();
    assert_eq!(c.node("a").unwrap().reserved(), r(500, 2));
    let e = fails(&mut c, |c| c.remove_vm(&a, "x"));
    assert_eq!(e.label(), "unknown_vm");
    let e = fails(&mut c, |c| c.reserve(&a, "x", r(2000, 8)));
    assert_eq!(e.label(), "unknown_vm");
    let e = fails(&mut c, |c| c.remove_vm(&a, "y"));
    assert_eq!(e.label(), "vm_on_other_node");
    // The id is free again once removed.
    c.add_vm(&a, vm("x", r(250, 1))).unwrap();
    c.check_sums().unwrap();
}

// ---------------------------------------------------------------- migrations

/// Node "a" above its watermark with three VMs; "b" empty. The planner moves
/// the smallest VM that covers the excess: "x" (ties with "y" broken by id).
fn hot_pair() -> (Cluster, SessionRef, SessionRef, u64) {
    let mut c = Cluster::new(config());
    let a = open(&mut c, "a", vec![vm("big", r(3000, 12)), vm("x", r(2000, 8)), vm("y", r(2000, 8))]);
    let b = open(&mut c, "b", vec![]);
    let orders = c.plan_and_order(NOW);
    assert_eq!(orders.len(), 1, "{orders:?}");
    let o = &orders[0];
    assert_eq!((o.vm.as_str(), o.source.as_str(), o.target.as_str()), ("x", "a", "b"));
    assert_eq!((o.reserved, o.state, o.deadline_ms), (r(2000, 8), OrderState::Ordered, NOW + TIMEOUT));
    c.check_sums().unwrap();
    (c, a, b, o.id)
}

#[test]
fn an_order_freezes_the_vm_and_holds_room_on_the_target() {
    let (mut c, a, b, id) = hot_pair();
    assert_eq!(reserved(&c, "a", "x"), Some((r(2000, 8), VmState::MigratingOut { order: id })));
    assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Incoming { order: id })));
    assert_eq!(c.node("a").unwrap().reserved(), r(7000, 28));
    assert_eq!(c.node("b").unwrap().reserved(), r(2000, 8));

    let moving = |e: CoreError| {
        assert_eq!(e, CoreError::Migrating { vm: "x".into(), order: id, target: "b".into() });
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    };
    moving(fails(&mut c, |c| c.reserve(&a, "x", r(3000, 12))));
    moving(fails(&mut c, |c| c.release(&a, "x", r(1000, 4))));
    moving(fails(&mut c, |c| c.remove_vm(&a, "x")));
    // On the target, the hold is not the target agent's to change either.
    moving(fails(&mut c, |c| c.reserve(&b, "x", r(3000, 12))));
    moving(fails(&mut c, |c| c.remove_vm(&b, "x")));
    let e = fails(&mut c, |c| c.add_vm(&b, vm("x", r(2000, 8))));
    assert_eq!(e.label(), "vm_exists");
    // The other VMs on the source still scale.
    assert!(c.reserve(&a, "y", r(2250, 8)).is_ok());
}

#[test]
fn migration_status_refuses_bad_reports() {
    let (mut c, a, b, id) = hot_pair();
    let e = fails(&mut c, |c| c.migration_status(&b, id, OrderState::Completed, "", NOW));
    assert_eq!(e, CoreError::OrderNotOwned { order: id, node: "b".into(), source_node: "a".into() });
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    let e = fails(&mut c, |c| c.migration_status(&a, id + 100, OrderState::Completed, "", NOW));
    assert_eq!(e, CoreError::UnknownOrder(id + 100));
    let e = fails(&mut c, |c| c.migration_status(&a, id, OrderState::Ordered, "", NOW));
    assert_eq!(e.label(), "bad_transition");

    c.migration_status(&a, id, OrderState::Started, "copying", NOW).unwrap();
    assert_eq!(c.orders[&id].state, OrderState::Started);
    assert_eq!(c.orders[&id].reason, "copying");
    let e = fails(&mut c, |c| c.migration_status(&a, id, OrderState::Started, "", NOW));
    assert_eq!(e, CoreError::BadTransition { order: id, from: "started", to: "started" });
    let e = fails(&mut c, |c| c.migration_status(&a, id, OrderState::Ordered, "", NOW));
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);

    // Once finished the order is gone: a second report is an unknown order.
    c.migration_status(&a, id, OrderState::Failed, "", NOW).unwrap();
    let e = fails(&mut c, |c| c.migration_status(&a, id, OrderState::Completed, "", NOW));
    assert_eq!(e, CoreError::UnknownOrder(id));
}

#[test]
fn completion_moves_the_reservation_to_the_target_only_at_the_end() {
    for started in [false, true] {
        let (mut c, a, b, id) = hot_pair();
        if started {
            c.migration_status(&a, id, OrderState::Started, "", NOW).unwrap();
            // Still on both nodes while the copy runs.
            assert_eq!(c.node("a").unwrap().reserved(), r(7000, 28));
            assert_eq!(c.node("b").unwrap().reserved(), r(2000, 8));
        }
        c.migration_status(&a, id, OrderState::Completed, "done", NOW + 5).unwrap();
        c.check_sums().unwrap();
        assert_eq!(reserved(&c, "a", "x"), None);
        assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Active)));
        assert_eq!(c.node("a").unwrap().reserved(), r(5000, 20));
        assert_eq!(c.node("b").unwrap().reserved(), r(2000, 8));
        assert!(c.orders.is_empty());
        let done = c.finished_orders.back().unwrap();
        assert_eq!((done.id, done.state, done.reason.as_str()), (id, OrderState::Completed, "done"));
        // The source is back under its watermark; the VM now belongs to "b".
        let src = c.node("a").unwrap();
        assert!(src.wanted().fits_in(src.watermark_level()));
        let e = fails(&mut c, |c| c.reserve(&a, "x", r(3000, 12)));
        assert_eq!(e.label(), "vm_on_other_node");
        assert!(c.reserve(&b, "x", r(3000, 12)).is_ok());
        assert!(c.plan_and_order(NOW + 10).is_empty());
    }
}

#[test]
fn failure_releases_the_target_hold_and_unfreezes_the_vm() {
    let (mut c, a, b, id) = hot_pair();
    c.migration_status(&a, id, OrderState::Started, "", NOW).unwrap();
    c.migration_status(&a, id, OrderState::Failed, "qemu said no", NOW).unwrap();
    c.check_sums().unwrap();
    assert_eq!(reserved(&c, "a", "x"), Some((r(2000, 8), VmState::Active)));
    assert_eq!(reserved(&c, "b", "x"), None);
    assert_eq!(c.node("b").unwrap().reserved(), Resources::ZERO);
    assert!(c.orders.is_empty());
    assert_eq!(c.finished_orders.back().unwrap().state, OrderState::Failed);
    // The VM scales again on its source.
    assert!(c.release(&a, "x", r(1000, 4)).is_ok());
    let e = fails(&mut c, |c| c.reserve(&b, "x", r(3000, 12)));
    assert_eq!(e.label(), "vm_on_other_node");
}

#[test]
fn a_reconnected_source_still_runs_its_order() {
    let (mut c, a, _b, id) = hot_pair();
    // The source agent reconnects and reports the move it is running.
    let a2 = c
        .open_session(
            hello(
                "a",
                vec![vm("big", r(3000, 12)), migrating("x", r(2000, 8), id, "b"), vm("y", r(2000, 8))],
            ),
            NOW + 1,
        )
        .unwrap();
    assert_eq!(a2.replaced, Some(a.id));
    assert!(a2.reservations.iter().any(|v| v.vm == "x" && v.migrating));
    assert_eq!(c.orders[&id].state, OrderState::Ordered, "the order is kept as it was");
    assert_eq!(c.orders[&id].created_ms, NOW);
    fails(&mut c, |c| c.migration_status(&a, id, OrderState::Completed, "", NOW));
    c.migration_status(&a2.session, id, OrderState::Completed, "", NOW).unwrap();
    assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Active)));
    c.check_sums().unwrap();
}

#[test]
fn a_restarted_source_that_holds_the_vm_back_keeps_its_place() {
    let (mut c, _a, _b, id) = hot_pair();
    // The source agent restarted mid-move: until it has settled the move it
    // reports the VM neither as moving nor at all.
    let a2 = c.open_session(hello("a", vec![vm("big", r(3000, 12)), vm("y", r(2000, 8))]), NOW + 1).unwrap();
    c.check_sums().unwrap();
    assert_eq!(reserved(&c, "a", "x"), Some((r(2000, 8), VmState::MigratingOut { order: id })));
    assert!(a2.reservations.iter().any(|v| v.vm == "x" && v.migrating));
    // Its room is not free for others meanwhile.
    assert_eq!(c.node("a").unwrap().reserved(), r(7000, 28));
    // The move failed: the VM is active on the source again, once.
    c.migration_status(&a2.session, id, OrderState::Failed, "the source agent restarted mid-move", NOW + 2)
        .unwrap();
    assert_eq!(reserved(&c, "a", "x"), Some((r(2000, 8), VmState::Active)));
    assert_eq!(reserved(&c, "b", "x"), None);
    assert_eq!(fails(&mut c, |c| c.add_vm(&a2.session, vm("x", r(2000, 8)))).label(), "vm_exists");
    c.check_sums().unwrap();
}

#[test]
fn a_reconnected_target_keeps_its_holds() {
    let (mut c, a, b, id) = hot_pair();
    let b2 = c.open_session(hello("b", vec![]), NOW + 1).unwrap();
    assert_eq!(b2.replaced, Some(b.id));
    assert_eq!(b2.reservations, vec![Reservation { vm: "x".into(), reserved: r(2000, 8), migrating: true }]);
    assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Incoming { order: id })));
    c.migration_status(&a, id, OrderState::Completed, "", NOW).unwrap();
    assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Active)));
    c.check_sums().unwrap();
}

#[test]
fn a_source_that_no_longer_reports_the_move_fails_the_order() {
    let (mut c, _a, _b, id) = hot_pair();
    // The source agent restarted and found the VM running, not migrating
    // (it trusts QEMU over its memory): the move is off, the hold goes.
    let a2 = c
        .open_session(
            hello("a", vec![vm("big", r(3000, 12)), vm("x", r(2000, 8)), vm("y", r(2000, 8))]),
            NOW + 1,
        )
        .unwrap();
    c.check_sums().unwrap();
    assert!(c.orders.is_empty(), "{:?}", c.orders);
    assert_eq!(c.finished_orders.back().map(|o| (o.id, o.state)), Some((id, OrderState::Failed)));
    assert_eq!(reserved(&c, "b", "x"), None);
    assert_eq!(reserved(&c, "a", "x"), Some((r(2000, 8), VmState::Active)));
    assert!(c.reserve(&a2.session, "x", r(2250, 8)).is_ok());
}

#[test]
fn orders_past_their_deadline_fail() {
    for started in [false, true] {
        let (mut c, a, b, id) = hot_pair();
        if started {
            c.migration_status(&a, id, OrderState::Started, "", NOW).unwrap();
        }
        let before = state(&c);
        assert_eq!(c.expire_orders(NOW + TIMEOUT - 1), Vec::<u64>::new());
        assert_eq!(state(&c), before);
        assert_eq!(c.expire_orders(NOW + TIMEOUT), vec![id]);
        c.check_sums().unwrap();
        assert_eq!(reserved(&c, "b", "x"), None);
        assert_eq!(reserved(&c, "a", "x"), Some((r(2000, 8), VmState::Active)));
        assert_eq!(c.finished_orders.back().unwrap().state, OrderState::Failed);
        assert!(c.expire_orders(NOW + 10 * TIMEOUT).is_empty());
        // A late report finds no order.
        let e = fails(&mut c, |c| c.migration_status(&a, id, OrderState::Completed, "", NOW));
        assert_eq!(e.label(), "unknown_order");
        // The move did land after all (the source waited for the target's
        // word past the deadline): the source agent releases the VM here,
        // the target's agent adds it there, and it is counted once.
        c.remove_vm(&a, "x").unwrap();
        c.add_vm(&b, vm("x", r(2000, 8))).unwrap();
        c.check_sums().unwrap();
        assert_eq!(reserved(&c, "a", "x"), None);
        assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Active)));
    }
}

#[test]
fn finished_orders_are_remembered_up_to_a_bound() {
    let (mut c, a, _b, mut id) = hot_pair();
    let kept = c.config.limits.finished_orders_kept;
    let mut now = NOW;
    for _ in 0..kept + 10 {
        // Fail the move; the node is still hot, so a move is planned again
        // (once the VM's wait after the failure is over, or another VM).
        c.migration_status(&a, id, OrderState::Failed, "", now).unwrap();
        now += c.config.move_retry_max_ms;
        let orders = c.plan_and_order(now);
        assert_eq!(orders.len(), 1);
        assert!(c.finished_orders.iter().all(|o| o.id != orders[0].id), "an id is never issued twice");
        assert_eq!(c.finished_orders.back().unwrap().id, id);
        id = orders[0].id;
    }
    assert_eq!(c.finished_orders.len(), kept);
    c.check_sums().unwrap();
}

// ---------------------------------------------------------------- restart

/// The allocator restarted: a fresh cluster learns everything from the agents.
/// Node "a" runs an order it was given before (x to "b"); "b" runs "w".
fn reregister(source_first: bool) -> (Cluster, SessionRef, SessionRef, u64) {
    let mut c = Cluster::new(config());
    let id = signed(&c, "x", "a", "b");
    let mut x = migrating("x", r(2000, 6), id, "b");
    x.last_permit = r(1500, 8);
    let mut w = vm("w", r(500, 2));
    w.last_permit = r(1000, 1);
    let (a, b) = if source_first {
        let a = open(&mut c, "a", vec![vm("big", r(3000, 12)), x]);
        let b = open(&mut c, "b", vec![w]);
        (a, b)
    } else {
        let b = open(&mut c, "b", vec![w]);
        let a = open(&mut c, "a", vec![vm("big", r(3000, 12)), x]);
        (a, b)
    };
    (c, a, b, id)
}

#[test]
fn re_registration_restores_reservations_and_adopts_the_migration() {
    for source_first in [true, false] {
        let (mut c, a, b, id) = reregister(source_first);
        let case = format!("source first: {source_first}");
        // max(current, last permit), dimension by dimension.
        assert_eq!(reserved(&c, "a", "x"), Some((r(2000, 8), VmState::MigratingOut { order: id })), "{case}");
        assert_eq!(reserved(&c, "b", "w"), Some((r(1000, 2), VmState::Active)), "{case}");
        let o = &c.orders[&id];
        assert_eq!(
            (o.vm.as_str(), o.source.as_str(), o.target.as_str(), o.reserved, o.state),
            ("x", "a", "b", r(2000, 8), OrderState::Started),
            "{case}"
        );
        assert_eq!(o.deadline_ms, NOW + TIMEOUT);
        // The target holds room for the incoming VM, whichever registered first.
        assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Incoming { order: id })), "{case}");
        assert_eq!(c.node("b").unwrap().reserved(), r(3000, 10), "{case}");
        c.check_sums().unwrap();

        // New orders never reuse the adopted id.
        // Make "a" hot even without x (which counts as leaving).
        c.add_vm(&a, vm("hog", r(4000, 16))).unwrap();
        let orders = c.plan_and_order(NOW);
        assert!(!orders.is_empty(), "{case}");
        assert!(orders.iter().all(|o| o.id != id), "{case}: {orders:?}");

        c.migration_status(&a, id, OrderState::Completed, "", NOW).unwrap();
        assert_eq!(reserved(&c, "a", "x"), None, "{case}");
        assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Active)), "{case}");
        assert!(c.reserve(&b, "x", r(2250, 8)).is_ok(), "{case}");
        c.check_sums().unwrap();
    }
}

#[test]
fn an_adopted_order_that_fails_releases_the_target_hold() {
    for source_first in [true, false] {
        let (mut c, a, _b, id) = reregister(source_first);
        assert_eq!(c.expire_orders(NOW + TIMEOUT), vec![id]);
        assert_eq!(reserved(&c, "b", "x"), None);
        assert_eq!(c.node("b").unwrap().reserved(), r(1000, 2));
        assert_eq!(reserved(&c, "a", "x"), Some((r(2000, 8), VmState::Active)));
        assert!(c.reserve(&a, "x", r(2250, 8)).is_ok());
        c.check_sums().unwrap();
    }
}

#[test]
fn a_target_already_running_the_vm_holds_nothing_extra() {
    // The move finished while the allocator was away but the source has not
    // said so yet: the target reports the VM as its own.
    let mut c = Cluster::new(config());
    let b = open(&mut c, "b", vec![vm("x", r(2000, 8))]);
    let id = signed(&c, "x", "a", "b");
    let a = open(&mut c, "a", vec![migrating("x", r(2000, 8), id, "b")]);
    assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Active)));
    assert_eq!(c.node("b").unwrap().reserved(), r(2000, 8));
    c.migration_status(&a, id, OrderState::Completed, "", NOW).unwrap();
    assert_eq!(reserved(&c, "b", "x"), Some((r(2000, 8), VmState::Active)));
    assert_eq!(reserved(&c, "a", "x"), None);
    assert!(c.reserve(&b, "x", r(2250, 8)).is_ok());
    c.check_sums().unwrap();
}

#[test]
fn no_grant_before_the_node_re_registers() {
    let mut c = Cluster::new(config());
    open(&mut c, "b", vec![]);
    // A session id from before the restart means nothing now.
    let old = SessionRef { node: "a".into(), id: 1 };
    let e = fails(&mut c, |c| c.reserve(&old, "x", r(2000, 8)));
    assert_eq!(e.label(), "unknown_node");
}

/// The harnesses read `/state` back as a `Cluster` (xtask's
/// `allocator_state`): everything shown reads back, the order key is never
/// shown.
#[test]
fn the_state_reads_back_without_its_order_key() {
    let (c, _a, _b, id) = hot_pair();
    let shown = serde_json::to_string(&c).unwrap();
    let back: Cluster = serde_json::from_str(&shown).unwrap();
    assert_eq!(state(&back), state(&c));
    assert_eq!(back.orders[&id].vm, "x");
    assert!(!shown.contains("order_ids") && !shown.contains("key"), "{shown}");
}
