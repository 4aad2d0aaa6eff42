//! What a hostile or broken agent can make the core do: only what concerns
//! its own node. Forged, replayed and absurd order ids are not adopted, a
//! bad VM is refused alone, holds are capped, and everything keyed by remote
//! input is bounded. Each refusal says why and leaves the rest as it was.

use super::error::CoreError;
use super::limits::Limits;
use super::migration::OrderState;
use super::order_ids::OrderIds;
use super::units::{ComputeUnit, Resources};
use super::vm::{Bounds, VmRegistration, VmState};
use super::*;

const GIB: u64 = 1 << 30;
const NOW: u64 = 1_000;
const KEY: &[u8] = b"the cluster's order key, 32 byte";
/// 2026-12-06 09:00 UTC.
const STARTED: u64 = 1_796_547_600_000;

fn r(milli_cpu: u64, gib: u64) -> Resources {
    Resources::new(milli_cpu, gib * GIB)
}

fn config() -> CoreConfig {
    CoreConfig { max_moves_per_round: 4, watermark: 0.8, ..CoreConfig::default() }
}

fn cluster() -> Cluster {
    Cluster::with_order_ids(config(), OrderIds::new(KEY, STARTED))
}

fn vm(id: &str, current: Resources) -> VmRegistration {
    let cu = ComputeUnit::new(r(250, 1)).unwrap();
    VmRegistration::new(id.into(), current, Resources::ZERO, Bounds::new(r(250, 1), r(8000, 32)).unwrap(), cu)
        .unwrap()
}

fn moving(id: &str, current: Resources, order: u64, target: &str) -> VmRegistration {
    VmRegistration { migration: Some((order, target.into())), ..vm(id, current) }
}

fn hello(node: &str, vms: Vec<VmRegistration>) -> NodeRegistration {
    NodeRegistration {
        node: node.into(),
        capacity: r(8000, 32),
        vms,
        migration_endpoint: format!("https://{node}:7073"),
        refused: Vec::new(),
    }
}

fn state(c: &Cluster) -> serde_json::Value {
    serde_json::to_value(c).unwrap()
}

/// What the refusals of an opened session say, by VM.
fn refusals(o: &Opened) -> Vec<(String, &'static str)> {
    o.refused.iter().map(|r| (r.vm.clone(), r.error.label())).collect()
}

#[test]
fn forged_replayed_and_absurd_order_ids_are_not_adopted() {
    let mut c = cluster();
    c.open_session(hello("b", vec![]), NOW).unwrap();
    c.open_session(hello("c", vec![]), NOW).unwrap();
    let real = c.order_ids.issue(NOW, "x", "a", "b", |_| false).unwrap();
    let cases = [
        ("u64::MAX", moving("x", r(1000, 4), u64::MAX, "b"), "forged_order"),
        ("a small id", moving("x", r(1000, 4), 41, "b"), "forged_order"),
        ("x's id for vm y", moving("y", r(1000, 4), real, "b"), "forged_order"),
        ("x's id towards c", moving("x", r(1000, 4), real, "c"), "forged_order"),
        (
            "another cluster's id",
            moving(
                "x",
                r(1000, 4),
                OrderIds::new(&[7; 32], STARTED).issue(NOW, "x", "a", "b", |_| false).unwrap(),
                "b",
            ),
            "forged_order",
        ),
        ("to its own node", moving("x", r(1000, 4), real, "a"), "invalid"),
        ("to a bad node name", moving("x", r(1000, 4), real, "B\n"), "invalid"),
    ];
    for (what, reg, label) in cases {
        let mut c = c.clone();
        let before_b = state(&c)["nodes"]["b"].clone();
        let vm_id = reg.id.clone();
        let opened = c.open_session(hello("a", vec![reg, vm("other", r(500, 2))]), NOW).unwrap();
        assert_eq!(refusals(&opened), vec![(vm_id.clone(), label)], "{what}");
        assert!(opened.refused[0].error.to_string().len() < 1024, "{what}");
        // The VM counts on its own node, as not moving; nothing else changed.
        assert_eq!(c.node("a").unwrap().vms[&vm_id].state, VmState::Active, "{what}");
        assert!(c.node("a").unwrap().vms.contains_key("other"), "{what}");
        assert!(c.orders.is_empty(), "{what}: {:?}", c.orders);
        assert_eq!(state(&c)["nodes"]["b"], before_b, "{what}: no hold on b");
        c.check_sums().unwrap();
        // A later plan still works (the counter of ids cannot be pushed to
        // overflow: ids are not a counter any more).
        let _ = c.plan_and_order(NOW + 1);
    }
    // The real id is adopted.
    let opened = c.open_session(hello("a", vec![moving("x", r(1000, 4), real, "b")]), NOW).unwrap();
    assert!(opened.refused.is_empty(), "{:?}", opened.refused);
    assert_eq!(c.orders[&real].state, OrderState::Started);
    assert_eq!(c.node("b").unwrap().vms["x"].state, VmState::Incoming { order: real });
}

#[test]
fn an_order_id_expires_with_its_order_and_a_finished_one_is_not_replayed() {
    let mut c = cluster();
    c.open_session(hello("b", vec![]), NOW).unwrap();
    let id = c.order_ids.issue(NOW, "x", "a", "b", |_| false).unwrap();
    // Well past issue time + order timeout (10 minutes).
    let late = NOW + 15 * 60_000;
    let opened = c.open_session(hello("a", vec![moving("x", r(1000, 4), id, "b")]), late).unwrap();
    assert_eq!(refusals(&opened), vec![("x".to_owned(), "expired_order")]);
    assert!(c.orders.is_empty());

    // Adopted, then failed: reporting it again does not hold room again.
    let mut c = cluster();
    c.open_session(hello("b", vec![]), NOW).unwrap();
    let a = c.open_session(hello("a", vec![moving("x", r(1000, 4), id, "b")]), NOW).unwrap();
    c.migration_status(&a.session, id, OrderState::Failed, "", NOW).unwrap();
    let again = c.open_session(hello("a", vec![moving("x", r(1000, 4), id, "b")]), NOW + 1).unwrap();
    assert_eq!(refusals(&again), vec![("x".to_owned(), "invalid")]);
    assert!(again.refused[0].error.to_string().contains("already failed"), "{:?}", again.refused);
    assert!(c.node("b").unwrap().vms.is_empty());
}

#[test]
fn a_bad_vm_is_refused_alone() {
    let mut c = cluster();
    let mut reg = hello("a", vec![vm("x", r(1000, 4)), vm("y", r(500, 2)), vm("x", r(4000, 16))]);
    // A VM the edge could not read.
    reg.refused.push(VmRefusal { vm: "huge".into(), error: CoreError::invalid("vm", "too big") });
    let opened = c.open_session(reg, NOW).unwrap();
    assert_eq!(refusals(&opened), vec![("huge".to_owned(), "invalid"), ("x".to_owned(), "duplicate_vm")]);
    let n = c.node("a").unwrap();
    assert_eq!(n.vms.keys().count(), 2);
    assert_eq!(n.vms["x"].reserved, r(1000, 4), "the first entry counts");
    assert_eq!(n.session, Some(opened.session.id), "the node registered");
}

#[test]
fn a_hold_is_capped_at_the_targets_usable_capacity() {
    let mut c = cluster();
    c.open_session(NodeRegistration { capacity: r(2000, 4), ..hello("b", vec![]) }, NOW).unwrap();
    let id = c.order_ids.issue(NOW, "x", "a", "b", |_| false).unwrap();
    // The source says its VM is as large as a whole big machine.
    let mut big = moving("x", r(8000, 32), id, "b");
    big.last_permit = r(8000, 32);
    c.open_session(hello("a", vec![big]), NOW).unwrap();
    assert_eq!(c.node("b").unwrap().vms["x"].reserved, r(2000, 4));
    c.check_sums().unwrap();
    // So it is when the target registers after the source.
    c.open_session(NodeRegistration { capacity: r(2000, 4), ..hello("b", vec![]) }, NOW + 1).unwrap();
    assert_eq!(c.node("b").unwrap().vms["x"].reserved, r(2000, 4));
}

#[test]
fn everything_keyed_by_remote_input_is_bounded() {
    let limits = Limits {
        max_nodes: 2,
        max_vms_per_node: 2,
        max_open_orders: 1,
        max_reason_bytes: 8,
        ..Limits::default()
    };
    let mut c = Cluster::with_order_ids(CoreConfig { limits, ..config() }, OrderIds::new(KEY, STARTED));
    c.open_session(hello("a", vec![vm("x", r(1000, 4))]), NOW).unwrap();
    c.open_session(hello("b", vec![]), NOW).unwrap();

    // Nodes: a third is refused, the two known ones still re-register.
    let e = c.open_session(hello("c", vec![]), NOW).unwrap_err();
    assert_eq!(e.label(), "too_many");
    assert!(e.to_string().contains("max_nodes"), "{e}");
    let a = c.open_session(hello("a", vec![vm("x", r(1000, 4))]), NOW).unwrap().session;

    // VMs per node: in a hello (refused whole, nothing changes) and by add_vm.
    let before = state(&c);
    let e = c
        .open_session(hello("a", vec![vm("x", r(250, 1)), vm("y", r(250, 1)), vm("z", r(250, 1))]), NOW)
        .unwrap_err();
    assert!(e.to_string().contains("lists 3 VMs") && e.to_string().contains("max_vms_per_node"), "{e}");
    assert_eq!(state(&c), before);
    c.add_vm(&a, vm("y", r(250, 1))).unwrap();
    let e = c.add_vm(&a, vm("z", r(250, 1))).unwrap_err();
    assert_eq!(e.label(), "too_many");

    // Open orders: one adopted, the second is not (its VM counts as not moving).
    let one = c.order_ids.issue(NOW, "x", "a", "b", |_| false).unwrap();
    let two = c.order_ids.issue(NOW, "y", "a", "b", |_| false).unwrap();
    let opened = c
        .open_session(
            hello("a", vec![moving("x", r(1000, 4), one, "b"), moving("y", r(250, 1), two, "b")]),
            NOW,
        )
        .unwrap();
    assert_eq!(refusals(&opened), vec![("y".to_owned(), "too_many")]);
    assert_eq!(c.orders.len(), 1);

    // Reasons are cut at a character boundary.
    c.migration_status(&opened.session, one, OrderState::Failed, "ééééé and more", NOW).unwrap();
    assert_eq!(c.finished_orders.back().unwrap().reason, "éééé");
}

#[test]
fn the_planner_opens_no_more_than_max_open_orders() {
    let limits = Limits { max_open_orders: 1, ..Limits::default() };
    let mut c = Cluster::with_order_ids(CoreConfig { limits, ..config() }, OrderIds::new(KEY, STARTED));
    // Two hot nodes and two roomy ones: two moves are wanted.
    c.open_session(hello("a", vec![vm("a1", r(4000, 16)), vm("a2", r(3000, 12))]), NOW).unwrap();
    c.open_session(hello("b", vec![vm("b1", r(4000, 16)), vm("b2", r(3000, 12))]), NOW).unwrap();
    c.open_session(hello("c", vec![]), NOW).unwrap();
    c.open_session(hello("d", vec![]), NOW).unwrap();
    assert_eq!(c.plan_and_order(NOW).len(), 1);
    assert!(c.plan_and_order(NOW + 1).is_empty());
}

#[test]
fn in_kubernetes_only_nodes_the_cluster_knows_register_with_its_capacity() {
    let mut c = Cluster::with_order_ids(
        CoreConfig { known_nodes_only: true, ..config() },
        OrderIds::new(KEY, STARTED),
    );
    let e = c.open_session(hello("ghost", vec![]), NOW).unwrap_err();
    assert_eq!(e, CoreError::NotClusterNode("ghost".into()));
    assert!(c.nodes.is_empty());
    c.set_cluster_capacity("a", Some(r(4000, 16)));
    c.open_session(hello("a", vec![]), NOW).unwrap();
    assert_eq!(c.node("a").unwrap().capacity, r(4000, 16), "the Node's figure, not the agent's 8000/32");
}
