//! Scenario tests of the migration planner, through [`Cluster::plan_and_order`]
//! and [`planner::plan`].

use super::migration::OrderState;
use super::planner::{plan, Move};
use super::units::{ComputeUnit, Resources};
use super::vm::{Bounds, VmRegistration, VmState};
use super::*;
use std::collections::HashMap;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const NOW: u64 = 5_000;

fn r(milli_cpu: u64, gib: u64) -> Resources {
    Resources::new(milli_cpu, gib * GIB)
}

/// No system reserve: usable (10000 mCPU, 40 GiB), watermark level (8000, 32 GiB).
fn config(max_moves_per_round: usize) -> CoreConfig {
    CoreConfig {
        system_reserve: Resources::ZERO,
        watermark: 0.8,
        order_timeout_ms: 60_000,
        max_moves_per_round,
        contended_p99_us: 5_000,
        move_retry_base_ms: 5_000,
        move_retry_max_ms: 300_000,
        ..CoreConfig::default()
    }
}

fn vm(id: &str, size: Resources) -> VmRegistration {
    VmRegistration::new(
        id.into(),
        size,
        Resources::ZERO,
        Bounds::new(Resources::ZERO, r(8000, 32)).unwrap(),
        ComputeUnit::new(r(250, 1)).unwrap(),
    )
    .unwrap()
}

struct World {
    c: Cluster,
    sessions: HashMap<String, SessionRef>,
}

impl World {
    fn new(max_moves: usize, nodes: &[(&str, &[(&str, Resources)])]) -> Self {
        let mut w = World { c: Cluster::new(config(max_moves)), sessions: HashMap::new() };
        for (node, vms) in nodes {
            w.register(node, vms);
        }
        w
    }

    fn register(&mut self, node: &str, vms: &[(&str, Resources)]) {
        let reg = NodeRegistration {
            node: node.into(),
            capacity: r(10_000, 40),
            vms: vms.iter().map(|(id, size)| vm(id, *size)).collect(),
            migration_endpoint: format!("https://{node}:7073"),
            refused: Vec::new(),
        };
        let opened = self.c.open_session(reg, NOW).unwrap();
        self.sessions.insert(node.into(), opened.session);
    }

    fn close(&mut self, node: &str) {
        assert!(self.c.close_session(&self.sessions[node]));
    }

    /// Plans, checks the plan is reproducible and harmless, and applies it.
    fn round(&mut self) -> Vec<(String, String, String)> {
        self.round_at(NOW)
    }

    fn round_at(&mut self, now: u64) -> Vec<(String, String, String)> {
        let planned = plan(&self.c, now);
        assert_eq!(planned, plan(&self.c.clone(), now), "plans must be reproducible");
        let before = self.c.clone();
        let orders = self.c.plan_and_order(now);
        self.c.check_sums().unwrap();
        assert_eq!(orders.len(), planned.len());
        for (o, m) in orders.iter().zip(&planned) {
            assert_eq!((&o.vm, &o.source, &o.target, o.reserved), (&m.vm, &m.source, &m.target, m.reserved));
            assert_eq!(o.state, OrderState::Ordered);
            // Sources and targets are connected; the VM was active on its source.
            let src = &before.nodes[&o.source];
            let e = &src.vms[&o.vm];
            assert!(src.session.is_some() && before.nodes[&o.target].session.is_some());
            assert_eq!(e.state, VmState::Active);
            assert_eq!(o.reserved, e.reserved.saturating_add(e.unmet));
            assert_eq!(self.c.nodes[&o.source].vms[&o.vm].state, VmState::MigratingOut { order: o.id });
            assert_eq!(self.c.nodes[&o.target].vms[&o.vm].state, VmState::Incoming { order: o.id });
        }
        // No target passes its own watermark because of the moves.
        for (name, n) in &self.c.nodes {
            if orders.iter().any(|o| o.target == *name) {
                assert!(n.wanted().fits_in(n.watermark_level()), "target {name} passed its watermark");
                assert!(!n.is_overcommitted());
            }
        }
        orders.into_iter().map(|o| (o.vm, o.source, o.target)).collect()
    }

    fn finish_all(&mut self, to: OrderState) {
        let open: Vec<(u64, String)> = self.c.orders.values().map(|o| (o.id, o.source.clone())).collect();
        for (id, source) in open {
            self.c.migration_status(&self.sessions[&source], id, to, "", NOW).unwrap();
        }
        self.c.check_sums().unwrap();
    }

    fn under_watermark(&self, node: &str) -> bool {
        let n = &self.c.nodes[node];
        n.wanted().fits_in(n.watermark_level())
    }
}

fn mv(vm: &str, source: &str, target: &str) -> (String, String, String) {
    (vm.into(), source.into(), target.into())
}

#[test]
fn one_move_when_one_vm_covers_the_excess_the_smallest_such() {
    // "a" wants (9500, 38 GiB): 1500 mCPU and 6 GiB over. a1, a2 and a4
    // each cover that alone; a2 is the smallest of them; a3 is too small.
    let a: &[(&str, Resources)] =
        &[("a1", r(4000, 16)), ("a2", r(2000, 8)), ("a3", r(1000, 4)), ("a4", r(2500, 10))];
    let mut w = World::new(4, &[("a", a), ("b", &[])]);
    assert!(!w.under_watermark("a"));
    assert_eq!(w.round(), vec![mv("a2", "a", "b")]);
    assert!(w.round().is_empty(), "the move in flight counts");
    w.finish_all(OrderState::Completed);
    assert!(w.under_watermark("a"));
    assert_eq!(w.c.nodes["b"].vms["a2"].state, VmState::Active);
    assert!(w.round().is_empty());
}

#[test]
fn the_smallest_covering_vm_that_has_somewhere_to_go() {
    // Excess (1500, 6 GiB). p is the smallest VM that covers it but no node
    // has the cpu for it; q and m both fit somewhere, q is smaller. (Sorted
    // by id, m would come first.)
    let small = Resources::new(1100, 512 * MIB);
    let a: &[(&str, Resources)] = &[
        ("m", r(1600, 16)),
        ("p", r(2000, 8)),
        ("q", r(1500, 12)),
        ("s1", small),
        ("s2", small),
        ("s3", small),
        ("s4", small),
    ];
    // b's headroom: (1800 mCPU, 20 GiB).
    let mut w = World::new(4, &[("a", a), ("b", &[("bb", r(6200, 12))])]);
    assert_eq!(w.round(), vec![mv("q", "a", "b")]);
    w.finish_all(OrderState::Completed);
    assert!(w.under_watermark("a"));
}

#[test]
fn largest_first_when_no_single_vm_covers_the_excess() {
    // "a" wants (9600, 38 GiB): (1600, 6 GiB) over; the largest VM has 1400.
    let mut a: Vec<(String, Resources)> = vec![("a1".into(), r(1400, 5)), ("a2".into(), r(1200, 5))];
    a.extend((3..10).map(|i| (format!("a{i}"), r(1000, 4))));
    let a: Vec<(&str, Resources)> = a.iter().map(|(id, s)| (id.as_str(), *s)).collect();
    let mut w = World::new(4, &[("a", &a), ("b", &[]), ("c", &[])]);
    // a1 takes most of the excess, a2 the rest; each goes where it leaves
    // the most room.
    assert_eq!(w.round(), vec![mv("a1", "a", "b"), mv("a2", "a", "c")]);
    assert!(w.round().is_empty());
    w.finish_all(OrderState::Completed);
    assert!(w.under_watermark("a"));
    assert_eq!(w.c.nodes["a"].wanted(), r(7000, 28));
}

#[test]
fn never_onto_a_node_that_would_pass_its_own_watermark() {
    // Excess (1000, 4 GiB); the smallest VM that covers it is a2.
    let a: &[(&str, Resources)] = &[("a1", r(5000, 20)), ("a2", r(4000, 16))];
    // b's headroom is (3500, 22 GiB): a2 does not fit, nor does a1.
    let mut w = World::new(4, &[("a", a), ("b", &[("b1", r(4500, 10))])]);
    assert!(w.round().is_empty());
    // c has exactly a2's size of headroom: reaching the watermark is allowed.
    w.register("c", &[("c1", r(4000, 16))]);
    assert_eq!(w.round(), vec![mv("a2", "a", "c")]);
    assert_eq!(w.c.nodes["c"].watermark_level(), r(8000, 32));
    assert_eq!(w.c.nodes["c"].wanted(), r(8000, 32));
    w.finish_all(OrderState::Completed);
    assert!(w.under_watermark("a") && w.under_watermark("c"));
}

#[test]
fn never_onto_or_off_a_disconnected_node() {
    let a: &[(&str, Resources)] = &[("a1", r(5000, 20)), ("a2", r(4000, 16))];
    let mut w = World::new(4, &[("a", a), ("b", &[])]);
    // The only target has no agent.
    w.close("b");
    assert!(w.round().is_empty());
    // The hot node has no agent to run the move.
    w.register("b", &[]);
    w.close("a");
    assert!(w.round().is_empty());
    w.register("a", a);
    assert_eq!(w.round(), vec![mv("a2", "a", "b")]);
}

#[test]
fn never_onto_a_node_whose_agent_takes_no_vms_in() {
    let a: &[(&str, Resources)] = &[("a1", r(5000, 20)), ("a2", r(4000, 16))];
    let mut w = World::new(4, &[("a", a)]);
    let reg = NodeRegistration {
        node: "b".into(),
        capacity: r(10_000, 40),
        vms: vec![],
        migration_endpoint: String::new(),
        refused: Vec::new(),
    };
    let opened = w.c.open_session(reg, NOW).unwrap();
    w.sessions.insert("b".into(), opened.session);
    assert!(w.round().is_empty(), "b has room but no migration endpoint");
    w.register("b", &[]);
    assert_eq!(w.round(), vec![mv("a2", "a", "b")]);
}

#[test]
fn nothing_is_planned_when_no_node_has_room() {
    let hot: &[(&str, Resources)] = &[("1", r(5000, 20)), ("2", r(4000, 16))];
    let busy: &[(&str, Resources)] = &[("3", r(7000, 20))];
    // Two hot nodes and one whose headroom (1000 mCPU) is too small.
    let mut w = World::new(4, &[("a", hot), ("b", &[("b1", r(5000, 20)), ("b2", r(4000, 16))]), ("c", busy)]);
    assert!(w.round().is_empty());
    assert!(w.c.orders.is_empty());
    // A lone node has nowhere to go.
    let mut w = World::new(4, &[("a", hot)]);
    assert!(w.round().is_empty());
}

#[test]
fn in_flight_orders_count_on_both_ends() {
    // Two equally hot nodes, one move per round, one target with room for
    // exactly the two moves.
    let a: &[(&str, Resources)] = &[("a1", r(5000, 20)), ("a2", r(4000, 16))];
    let c: &[(&str, Resources)] = &[("c1", r(5000, 20)), ("c2", r(4000, 16))];
    let mut w = World::new(1, &[("a", a), ("b", &[]), ("c", c)]);
    // Worst first; names break the tie.
    assert_eq!(w.round(), vec![mv("a2", "a", "b")]);
    // "a" counts as relieved; the hold on "b" counts against its headroom.
    assert_eq!(w.round(), vec![mv("c2", "c", "b")]);
    assert_eq!(w.c.nodes["b"].wanted(), r(8000, 32));
    assert!(w.round().is_empty());
    // A started move still counts.
    let id = w.c.orders.values().find(|o| o.source == "a").unwrap().id;
    w.c.migration_status(&w.sessions["a"], id, OrderState::Started, "", NOW).unwrap();
    assert!(w.round().is_empty());
    w.finish_all(OrderState::Completed);
    assert!(w.under_watermark("a") && w.under_watermark("b") && w.under_watermark("c"));
}

#[test]
fn a_failed_move_is_planned_again_after_a_wait_that_grows() {
    let (base, max) = (config(0).move_retry_base_ms, config(0).move_retry_max_ms);
    let a: &[(&str, Resources)] = &[("a1", r(5000, 20)), ("a2", r(4000, 16))];
    let mut w = World::new(4, &[("a", a), ("b", &[])]);
    assert_eq!(w.round(), vec![mv("a2", "a", "b")]);
    w.finish_all(OrderState::Failed);
    assert_eq!(w.c.nodes["b"].reserved(), Resources::ZERO);
    // a2 waits; a1 alone also covers the excess, so it goes instead.
    assert_eq!(w.round(), vec![mv("a1", "a", "b")]);
    w.finish_all(OrderState::Failed);
    assert!(w.round().is_empty(), "both wait");
    // Both waits end: the smallest covering VM goes again.
    assert_eq!(w.round_at(NOW + base), vec![mv("a2", "a", "b")]);
    w.finish_all(OrderState::Failed);
    // Its second failure in a row doubles its wait.
    assert_eq!(w.c.move_backoff["a2"].until_ms, NOW + 2 * base);
    assert!(!w.c.backing_off("a2", NOW + 2 * base));
    // A completed move clears the VM's record.
    assert_eq!(w.round_at(NOW + 2 * base - 1), vec![mv("a1", "a", "b")]);
    w.finish_all(OrderState::Completed);
    assert!(!w.c.move_backoff.contains_key("a1"));
    // The wait doubles per failure in a row and never passes the cap.
    let waits: Vec<u64> =
        [1, 2, 3, 7, 40, u32::MAX].into_iter().map(|n| config(0).move_retry_wait_ms(n)).collect();
    assert_eq!(waits, vec![base, 2 * base, 4 * base, max.min(64 * base), max, max]);
}

#[test]
fn respects_max_moves_per_round() {
    let mut a: Vec<(String, Resources)> = vec![("a1".into(), r(1400, 5)), ("a2".into(), r(1200, 5))];
    a.extend((3..10).map(|i| (format!("a{i}"), r(1000, 4))));
    let a: Vec<(&str, Resources)> = a.iter().map(|(id, s)| (id.as_str(), *s)).collect();

    let mut w = World::new(0, &[("a", &a), ("b", &[])]);
    assert!(w.round().is_empty(), "a budget of zero plans nothing");

    let mut w = World::new(1, &[("a", &a), ("b", &[])]);
    assert_eq!(w.round(), vec![mv("a1", "a", "b")]);
    // What is left over, (200, 1 GiB), is covered by one of the smallest VMs.
    assert_eq!(w.round(), vec![mv("a3", "a", "b")]);
    assert!(w.round().is_empty());
    w.finish_all(OrderState::Completed);
    assert!(w.under_watermark("a"));
}

#[test]
fn unmet_demand_makes_a_node_hot_and_moves_with_the_vm() {
    // Reservations fill "a" exactly; x asks for more than there is.
    let a: &[(&str, Resources)] = &[("x", r(2000, 8)), ("z", r(6000, 24))];
    let mut w = World::new(4, &[("a", a), ("b", &[])]);
    assert!(w.round().is_empty(), "at the watermark is not above it");
    let s = w.sessions["a"].clone();
    assert_eq!(w.c.reserve(&s, "x", r(4000, 16)).unwrap().permitted, r(4000, 16));
    let g = w.c.reserve(&s, "x", r(5000, 20)).unwrap();
    assert_eq!(g.permitted, r(4000, 16));
    assert_eq!(w.c.nodes["a"].unmet(), r(1000, 4));
    // Wanted (11000, 44 GiB): x, wanting (5000, 20 GiB), is the smallest
    // cover; the target holds what it wants, not just what it has.
    assert_eq!(w.round(), vec![mv("x", "a", "b")]);
    assert_eq!(w.c.nodes["b"].vms["x"].reserved, r(5000, 20));
    w.finish_all(OrderState::Completed);
    assert!(w.under_watermark("a"));
    assert_eq!(w.c.nodes["b"].reserved(), r(5000, 20));
}

#[test]
fn moves_carry_their_reason() {
    let a: &[(&str, Resources)] = &[("a1", r(5000, 20)), ("a2", r(4000, 16))];
    let w = World::new(4, &[("a", a), ("b", &[])]);
    let moves: Vec<Move> = plan(&w.c, NOW);
    assert_eq!(moves.len(), 1);
    assert!(moves[0].reason.contains("node a above its watermark"), "{}", moves[0].reason);
}

#[test]
fn a_contended_node_takes_a_vm_only_when_no_calm_node_has_room() {
    use super::contention::{ContentionReport, VmContention};
    let slow = |p99_us: u64| VmContention {
        p50_us: p99_us / 4,
        p99_us,
        mean_us: p99_us / 3,
        max_us: p99_us,
        samples: 50,
    };
    // "a" is 1500 mCPU and 6 GiB over; "b" has the most headroom, "c" less,
    // both enough for a2.
    let a: &[(&str, Resources)] = &[("a1", r(5500, 22)), ("a2", r(4000, 16))];
    let mut w = World::new(4, &[("a", a), ("b", &[("b1", r(500, 2))]), ("c", &[("c1", r(3000, 12))])]);
    assert_eq!(plan(&w.c, NOW)[0].target, "b", "calm nodes: the most headroom wins");
    let report = |p99| ContentionReport::new(5000, vec![("b1".into(), slow(p99))]).unwrap();
    // Just under the threshold is still calm.
    let contended = w.c.config.contended_p99_us;
    w.c.record_contention(&w.sessions["b"].clone(), report(contended - 1), NOW).unwrap();
    assert_eq!(plan(&w.c, NOW)[0].target, "b");
    w.c.record_contention(&w.sessions["b"].clone(), report(contended), NOW).unwrap();
    assert_eq!(w.round(), vec![mv("a2", "a", "c")], "the calm node, though it has less headroom");
    w.finish_all(OrderState::Completed);
    // Now only the contended node has room for a VM from "c" (made hot):
    // better a contended node than none.
    let s = w.sessions["c"].clone();
    w.c.reserve(&s, "c1", r(6000, 24)).unwrap();
    let moves = plan(&w.c, NOW);
    assert!(!moves.is_empty() && moves.iter().all(|m| m.target == "b"), "{moves:?}");
}
