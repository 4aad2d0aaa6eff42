//! Random interleavings of everything the agents and the allocator's own loop
//! do to the core (registrations, permits, releases, VMs starting and
//! stopping, migration plans and reports, deadlines, lost sessions, agent and
//! allocator restarts) across several nodes, checked at every step against a
//! model of what the agents know.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use vmscale_allocator::core::error::CoreError;
use vmscale_allocator::core::ledger::{Grant, Outcome};
use vmscale_allocator::core::migration::OrderState;
use vmscale_allocator::core::order_ids::OrderIds;
use vmscale_allocator::core::units::{ComputeUnit, Resources};
use vmscale_allocator::core::vm::{Bounds, VmRegistration, VmState};
use vmscale_allocator::core::{Cluster, CoreConfig, NodeRegistration, SessionRef};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const TIMEOUT_MS: u64 = 60_000;
const START_MS: u64 = 10_000;

/// The cluster's order key, the same for every allocator run of a world.
fn order_ids() -> OrderIds {
    OrderIds::new(b"ledger_props order key: 32 bytes", 1_796_547_600_000)
}

/// One thing that happens. Small integers pick nodes, VMs and amounts modulo
/// whatever exists at that step, so that shrinking keeps sequences valid.
#[derive(Debug, Clone)]
enum Op {
    /// The node's agent opens a new session (reconnect), replacing any live one.
    Register {
        node: u8,
    },
    /// The agent restarts, gives up the moves it was running, and registers.
    AgentRestart {
        node: u8,
    },
    Reserve {
        node: u8,
        vm: u8,
        cpu: u8,
        mem: u8,
    },
    Release {
        node: u8,
        vm: u8,
        cpu: u8,
        mem: u8,
    },
    AddVm {
        node: u8,
        seed: u8,
        cu: u8,
        dup: bool,
    },
    RemoveVm {
        node: u8,
        vm: u8,
    },
    Plan,
    Status {
        node: u8,
        order: u8,
        to: u8,
        wrong: u8,
    },
    Expire {
        advance_ms: u32,
    },
    Close {
        node: u8,
        stale: bool,
    },
    /// A request on a session that was replaced or closed, or for a node
    /// that never registered.
    Stale {
        node: u8,
        kind: u8,
    },
    /// The allocator restarts: a fresh core, and every agent registers again.
    Restart {
        seed: u8,
    },
}

impl Op {
    /// Ops that may legitimately leave a node above its usable capacity: the
    /// agents report what runs, and what runs is a fact, not a grant.
    fn registers(&self) -> bool {
        matches!(self, Op::Register { .. } | Op::AgentRestart { .. } | Op::AddVm { .. } | Op::Restart { .. })
    }
}

fn op() -> impl Strategy<Value = Op> {
    let u = any::<u8>;
    prop_oneof![
        3 => u().prop_map(|node| Op::Register { node }),
        1 => u().prop_map(|node| Op::AgentRestart { node }),
        20 => (u(), u(), u(), u()).prop_map(|(node, vm, cpu, mem)| Op::Reserve { node, vm, cpu, mem }),
        10 => (u(), u(), u(), u()).prop_map(|(node, vm, cpu, mem)| Op::Release { node, vm, cpu, mem }),
        5 => (u(), u(), u(), prop::bool::weighted(0.15))
            .prop_map(|(node, seed, cu, dup)| Op::AddVm { node, seed, cu, dup }),
        4 => (u(), u()).prop_map(|(node, vm)| Op::RemoveVm { node, vm }),
        6 => Just(Op::Plan),
        10 => (u(), u(), u(), u()).prop_map(|(node, order, to, wrong)| Op::Status { node, order, to, wrong }),
        4 => (0u32..40_000).prop_map(|advance_ms| Op::Expire { advance_ms }),
        2 => (u(), any::<bool>()).prop_map(|(node, stale)| Op::Close { node, stale }),
        2 => (u(), u()).prop_map(|(node, kind)| Op::Stale { node, kind }),
        1 => u().prop_map(|seed| Op::Restart { seed }),
    ]
}

/// (vCPUs, GiB, initial VMs as (size seed, cu seed)).
type NodeSpec = (u64, u64, Vec<(u8, u8)>);

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (8u64..=32, 16u64..=128, prop::collection::vec((any::<u8>(), any::<u8>()), 0..=10))
}

fn cu_of(seed: u8) -> ComputeUnit {
    let steps = [Resources::new(250, GIB), Resources::new(500, 2 * GIB), Resources::new(250, 512 * MIB)];
    ComputeUnit::new(steps[usize::from(seed) % steps.len()]).unwrap()
}

/// A VM as its agent knows it.
#[derive(Debug, Clone)]
struct AgentVm {
    current: Resources,
    last_permit: Resources,
    bounds: Bounds,
    cu: ComputeUnit,
    migration: Option<(u64, String)>,
}

impl AgentVm {
    /// Between one CU and 4..24 CUs, not always a whole number of CUs.
    fn new(seed: u8, cu_seed: u8) -> Self {
        let cu = cu_of(cu_seed);
        let step = cu.get();
        let steps = |k: u64| Resources::new(step.milli_cpu * k, step.memory_bytes * k);
        let max = steps(4 + u64::from(seed % 21));
        let odd = Resources::new(u64::from(seed % 5) * 30, u64::from(seed % 3) * 100 * MIB);
        let current = steps(1 + u64::from(seed / 32 % 4)).saturating_add(odd).min(max);
        let last_permit =
            if seed.is_multiple_of(3) { current.saturating_add(step).min(max) } else { Resources::ZERO };
        AgentVm { current, last_permit, bounds: Bounds::new(step, max).unwrap(), cu, migration: None }
    }

    fn reservation(&self) -> Resources {
        self.current.max(self.last_permit)
    }
}

#[derive(Debug)]
struct Agent {
    name: String,
    capacity: Resources,
    vms: BTreeMap<String, AgentVm>,
    session: Option<SessionRef>,
    /// Sessions this agent held before; requests on them must be refused.
    stale: Vec<SessionRef>,
}

impl Agent {
    fn registration(&self) -> NodeRegistration {
        let vms = self
            .vms
            .iter()
            .map(|(id, v)| {
                let mut reg = VmRegistration::new(id.clone(), v.current, v.last_permit, v.bounds, v.cu)
                    .expect("the model only holds valid VMs");
                reg.migration.clone_from(&v.migration);
                reg
            })
            .collect();
        NodeRegistration {
            node: self.name.clone(),
            capacity: self.capacity,
            vms,
            migration_endpoint: format!("https://{}:7073", self.name),
            refused: Vec::new(),
        }
    }
}

struct World {
    config: CoreConfig,
    cluster: Cluster,
    agents: Vec<Agent>,
    now: u64,
    next_vm: u64,
    /// How often each path was taken, to show the test is not vacuous.
    seen: BTreeMap<String, usize>,
}

type Expect = Result<(), &'static str>;

fn outcome<T>(r: &Result<T, CoreError>) -> Expect {
    r.as_ref().map(|_| ()).map_err(CoreError::label)
}

fn pick(r: Resources, f_cpu: u64, f_mem: u64) -> Resources {
    Resources::new(r.milli_cpu * f_cpu / 100, r.memory_bytes * f_mem / 100)
}

impl World {
    fn new(specs: Vec<NodeSpec>, watermark: f64, max_moves: usize) -> Self {
        let config = CoreConfig {
            system_reserve: Resources::new(500, 2 * GIB),
            watermark,
            order_timeout_ms: TIMEOUT_MS,
            max_moves_per_round: max_moves,
            contended_p99_us: 5_000,
            move_retry_base_ms: 5_000,
            move_retry_max_ms: 300_000,
            ..CoreConfig::default()
        };
        let mut w = World {
            cluster: Cluster::with_order_ids(config.clone(), order_ids()),
            config,
            agents: Vec::new(),
            now: START_MS,
            next_vm: 0,
            seen: BTreeMap::new(),
        };
        for (i, (cpus, gib, vms)) in specs.into_iter().enumerate() {
            let mut agent = Agent {
                name: format!("n{i}"),
                capacity: Resources::new(cpus * 1000, gib * GIB),
                vms: BTreeMap::new(),
                session: None,
                stale: Vec::new(),
            };
            for (seed, cu) in vms {
                agent.vms.insert(w.fresh_id(), AgentVm::new(seed, cu));
            }
            w.agents.push(agent);
        }
        for i in 0..w.agents.len() {
            w.register(i);
        }
        w.check();
        w
    }

    fn note(&mut self, what: &str, r: Expect) {
        let key = match r {
            Ok(()) => format!("{what} ok"),
            Err(label) => format!("{what} {label}"),
        };
        *self.seen.entry(key).or_default() += 1;
    }

    fn fresh_id(&mut self) -> String {
        self.next_vm += 1;
        format!("v{}", self.next_vm)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.cluster).unwrap()
    }

    /// Runs a fallible call; one that fails must change nothing at all.
    fn attempt<T>(&mut self, f: impl FnOnce(&mut Cluster) -> Result<T, CoreError>) -> Result<T, CoreError> {
        let before = self.state();
        let out = f(&mut self.cluster);
        if let Err(e) = &out {
            assert_eq!(self.state(), before, "a failed call ({e}) changed the state");
        }
        out
    }

    fn node(&self, i: usize) -> &vmscale_allocator::core::ledger::NodeLedger {
        &self.cluster.nodes[&self.agents[i].name]
    }

    /// The ids a node's ledger holds (incoming holds too), sorted.
    fn ledger_ids(&self, i: usize) -> Vec<String> {
        let mut ids: Vec<String> = self.node(i).vms.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Picks a VM for a request: one of the node's own entries, one held by
    /// another node, or one nobody has.
    fn pick_vm(&self, i: usize, sel: u8) -> (String, Expect) {
        let own = self.ledger_ids(i);
        let mut others: Vec<String> = self
            .cluster
            .nodes
            .iter()
            .filter(|(name, _)| **name != self.agents[i].name)
            .flat_map(|(_, n)| n.vms.keys().filter(|id| !own.contains(id)).cloned())
            .collect();
        others.sort();
        let k = usize::from(sel) % (own.len() + 2);
        if k < own.len() {
            let id = own[k].clone();
            let moving = self.node(i).vms[&id].state != VmState::Active;
            (id, if moving { Err("migrating") } else { Ok(()) })
        } else if k == own.len() && !others.is_empty() {
            (others[usize::from(sel) % others.len()].clone(), Err("vm_on_other_node"))
        } else {
            ("ghost".into(), Err("unknown_vm"))
        }
    }

    fn register(&mut self, i: usize) {
        let reg = self.agents[i].registration();
        let live = self.agents[i].session.clone();
        let now = self.now;
        let opened = self.attempt(|c| c.open_session(reg, now)).expect("a valid registration");
        assert_eq!(opened.replaced, live.as_ref().map(|s| s.id), "the replaced session");
        let a = &mut self.agents[i];
        a.stale.extend(live);
        a.session = Some(opened.session.clone());
        // The welcome lists the agent's VMs at max(current, last permit) and
        // the holds for VMs moving in.
        for res in &opened.reservations {
            match a.vms.get(&res.vm) {
                Some(v) => {
                    assert_eq!(res.reserved, v.reservation(), "{}", res.vm);
                    assert_eq!(res.migrating, v.migration.is_some(), "{}", res.vm);
                }
                None => {
                    assert!(res.migrating, "{} is neither run nor held", res.vm);
                    assert!(self
                        .cluster
                        .orders
                        .values()
                        .any(|o| o.vm == res.vm && o.target == a.name && o.reserved == res.reserved));
                }
            }
        }
        assert!(a.vms.keys().all(|id| opened.reservations.iter().any(|r| r.vm == *id)));
    }

    fn apply(&mut self, op: &Op) {
        let n = self.agents.len();
        let node = |x: u8| usize::from(x) % n;
        match *op {
            Op::Register { node: x } => self.register(node(x)),
            Op::AgentRestart { node: x } => {
                let i = node(x);
                let mut gave_up = 0;
                for v in self.agents[i].vms.values_mut() {
                    gave_up += usize::from(v.migration.take().is_some());
                }
                let open = self.cluster.orders.len();
                self.register(i);
                assert_eq!(self.cluster.orders.len(), open - gave_up, "given-up moves stay open");
                if gave_up > 0 {
                    self.note("agent gave up moves", Ok(()));
                }
            }
            Op::Reserve { node: x, vm, cpu, mem } => self.reserve(node(x), vm, cpu, mem),
            Op::Release { node: x, vm, cpu, mem } => self.release(node(x), vm, cpu, mem),
            Op::AddVm { node: x, seed, cu, dup } => {
                let i = node(x);
                let Some(s) = self.agents[i].session.clone() else { return };
                let ids = self.ledger_ids(i);
                let (id, expect) = if dup && !ids.is_empty() {
                    (ids[usize::from(seed) % ids.len()].clone(), Err("vm_exists"))
                } else {
                    (self.fresh_id(), Ok(()))
                };
                let v = AgentVm::new(seed, cu);
                let reg = VmRegistration::new(id.clone(), v.current, v.last_permit, v.bounds, v.cu).unwrap();
                let r = self.attempt(|c| c.add_vm(&s, reg));
                assert_eq!(outcome(&r), expect);
                self.note("add_vm", outcome(&r));
                if let Ok(res) = r {
                    assert_eq!((res.reserved, res.migrating), (v.reservation(), false));
                    self.agents[i].vms.insert(id, v);
                }
            }
            Op::RemoveVm { node: x, vm } => {
                let i = node(x);
                let Some(s) = self.agents[i].session.clone() else { return };
                let (id, expect) = self.pick_vm(i, vm);
                let r = self.attempt(|c| c.remove_vm(&s, &id));
                assert_eq!(outcome(&r), expect, "remove {id}");
                self.note("remove_vm", outcome(&r));
                if r.is_ok() {
                    self.agents[i].vms.remove(&id);
                }
            }
            Op::Plan => {
                let orders = self.cluster.plan_and_order(self.now);
                for o in orders {
                    self.note("planned move", Ok(()));
                    assert_ne!(o.source, o.target);
                    let src = self.agents.iter_mut().find(|a| a.name == o.source).unwrap();
                    assert!(src.session.is_some(), "order for a node without an agent");
                    let v = src.vms.get_mut(&o.vm).expect("the planner moves only VMs that run");
                    assert_eq!(v.migration, None, "{} planned twice", o.vm);
                    v.migration = Some((o.id, o.target.clone()));
                    let dst = self.agents.iter().find(|a| a.name == o.target).unwrap();
                    assert!(dst.session.is_some(), "moved onto a node without an agent");
                }
            }
            Op::Status { node: x, order, to, wrong } => self.status(node(x), order, to, wrong),
            Op::Expire { advance_ms } => {
                self.now += u64::from(advance_ms);
                let late: Vec<u64> = self
                    .cluster
                    .orders
                    .values()
                    .filter(|o| o.deadline_ms <= self.now)
                    .map(|o| o.id)
                    .collect();
                let mut failed = self.cluster.expire_orders(self.now);
                failed.sort_unstable();
                assert_eq!(failed, late);
                for id in failed {
                    self.note("expired", Ok(()));
                    self.forget_migration(id);
                }
            }
            Op::Close { node: x, stale } => {
                let i = node(x);
                if stale {
                    let Some(s) = self.agents[i].stale.last().cloned() else { return };
                    let before = self.state();
                    assert!(!self.cluster.close_session(&s), "closing a stale session");
                    assert_eq!(self.state(), before, "closing a stale session changed the state");
                } else if let Some(s) = self.agents[i].session.take() {
                    assert!(self.cluster.close_session(&s));
                    self.agents[i].stale.push(s);
                }
            }
            Op::Stale { node: x, kind } => {
                let i = node(x);
                let s = if kind % 6 == 5 {
                    SessionRef { node: "ghost-node".into(), id: 1 }
                } else if let Some(s) = self.agents[i].stale.last() {
                    s.clone()
                } else {
                    return;
                };
                let expect = if kind % 6 == 5 { "unknown_node" } else { "stale_session" };
                let (vm, _) = self.pick_vm(i, kind);
                let any = Resources::new(1000, 4 * GIB);
                let reg = VmRegistration::new(
                    "stale-vm".into(),
                    any,
                    Resources::ZERO,
                    Bounds::new(Resources::ZERO, any).unwrap(),
                    cu_of(0),
                )
                .unwrap();
                let now = self.now;
                let r = match kind % 6 {
                    0 | 5 => outcome(&self.attempt(|c| c.reserve(&s, &vm, any))),
                    1 => outcome(&self.attempt(|c| c.release(&s, &vm, Resources::ZERO))),
                    2 => outcome(&self.attempt(|c| c.add_vm(&s, reg))),
                    3 => outcome(&self.attempt(|c| c.remove_vm(&s, &vm))),
                    _ => {
                        let id = self.cluster.orders.keys().next().copied().unwrap_or(1);
                        outcome(&self.attempt(|c| c.migration_status(&s, id, OrderState::Failed, "", now)))
                    }
                };
                assert_eq!(r, Err(expect));
                self.note("stale request", r);
            }
            Op::Restart { seed } => {
                // The same order key: the new run adopts the old run's orders.
                self.cluster = Cluster::with_order_ids(self.config.clone(), order_ids());
                for a in &mut self.agents {
                    a.session = None;
                    a.stale.clear(); // those connections died with the allocator
                }
                let mut order: Vec<usize> = (0..n).collect();
                order.rotate_left(usize::from(seed) % n);
                if seed & 0x80 != 0 {
                    order.reverse();
                }
                for i in order {
                    self.register(i);
                }
                for o in self.cluster.orders.values() {
                    assert_eq!(o.state, OrderState::Started, "adopted orders are under way");
                }
                if !self.cluster.orders.is_empty() {
                    self.note("restart adopted moves", Ok(()));
                }
            }
        }
    }

    fn reserve(&mut self, i: usize, sel: u8, cpu: u8, mem: u8) {
        let Some(s) = self.agents[i].session.clone() else { return };
        let (id, mut expect) = self.pick_vm(i, sel);
        let entry = self.node(i).vms.get(&id).cloned();
        let max = entry.as_ref().map_or(Resources::new(4000, 16 * GIB), |e| e.bounds.max);
        let mut target = pick(max, u64::from(cpu % 126), u64::from(mem % 126));
        if cpu == 255 {
            target.milli_cpu = u64::MAX;
            expect = Err("absurd_amount");
        } else if expect.is_ok() && !target.fits_in(max) {
            expect = Err("invalid");
        }
        let free = self.node(i).free();
        let r = self.attempt(|c| c.reserve(&s, &id, target));
        assert_eq!(outcome(&r), expect, "reserve {id} -> {target}");
        self.note("reserve", outcome(&r));
        let Ok(g) = r else { return };
        self.note(g.outcome.label(), Ok(()));
        let e = entry.expect("granted for a VM this node holds");
        check_grant(&g, e.reserved, target, e.cu, free);
        let after = &self.node(i).vms[&id];
        assert_eq!(after.reserved, g.permitted);
        assert_eq!(after.unmet, g.requested.saturating_sub(g.permitted));
        // The agent hotplugs all it was permitted.
        let v = self.agents[i].vms.get_mut(&id).expect("the agent runs the VM");
        v.current = g.permitted;
        v.last_permit = g.permitted;
    }

    fn release(&mut self, i: usize, sel: u8, cpu: u8, mem: u8) {
        let Some(s) = self.agents[i].session.clone() else { return };
        let (id, mut expect) = self.pick_vm(i, sel);
        let entry = self.node(i).vms.get(&id).cloned();
        let (min, res) = entry
            .as_ref()
            .map_or((Resources::ZERO, Resources::new(1000, GIB)), |e| (e.bounds.min, e.reserved));
        let dim = |f: u8, min: u64, res: u64| match f {
            255 => min.saturating_sub(1),
            0..=100 => min + res.saturating_sub(min) * u64::from(f) / 100,
            _ => res + u64::from(f),
        };
        let size = Resources::new(
            dim(cpu, min.milli_cpu, res.milli_cpu),
            dim(mem, min.memory_bytes, res.memory_bytes),
        );
        if expect.is_ok() && !(size.fits_in(res) && min.fits_in(size)) {
            expect = Err("invalid");
        }
        let r = self.attempt(|c| c.release(&s, &id, size));
        assert_eq!(outcome(&r), expect, "release {id} -> {size}");
        self.note("release", outcome(&r));
        if r.is_ok() {
            let after = &self.node(i).vms[&id];
            assert_eq!((after.reserved, after.unmet), (size, Resources::ZERO));
            // The agent has already unplugged down to the new size.
            let v = self.agents[i].vms.get_mut(&id).expect("the agent runs the VM");
            v.current = size;
            v.last_permit = size;
        }
    }

    fn status(&mut self, i: usize, sel: u8, to: u8, wrong: u8) {
        let open: Vec<u64> = self.cluster.orders.keys().copied().collect();
        let k = usize::from(sel) % (open.len() + 1);
        let (id, order) = match open.get(k) {
            Some(id) => (*id, Some(self.cluster.orders[id].clone())),
            None => (1_000_000 + u64::from(sel), None),
        };
        let reporter = match &order {
            Some(o) if !wrong.is_multiple_of(4) => {
                self.agents.iter().position(|a| a.name == o.source).unwrap()
            }
            _ => i,
        };
        let Some(s) = self.agents[reporter].session.clone() else { return };
        let to = match to % 8 {
            0 => OrderState::Ordered,
            1 | 2 => OrderState::Started,
            3..=5 => OrderState::Completed,
            _ => OrderState::Failed,
        };
        let expect = match &order {
            None => Err("unknown_order"),
            Some(o) if o.source != s.node => Err("order_not_owned"),
            Some(o) => o.state.transition(to, id).map(|_| ()).map_err(|e| e.label()),
        };
        let now = self.now;
        let r = self.attempt(|c| c.migration_status(&s, id, to, "reported", now));
        assert_eq!(outcome(&r), expect, "order {id} -> {to:?}");
        self.note(to.name(), outcome(&r));
        let (Ok(()), Some(o)) = (r, order) else { return };
        match to {
            OrderState::Completed => {
                // The VM now runs on the target, inside the room held for it.
                let src = self.agents.iter_mut().find(|a| a.name == o.source).unwrap();
                let mut v = src.vms.remove(&o.vm).unwrap();
                v.migration = None;
                v.last_permit = o.reserved;
                let dst = self.agents.iter_mut().find(|a| a.name == o.target).unwrap();
                assert!(dst.vms.insert(o.vm.clone(), v).is_none());
            }
            OrderState::Failed => self.forget_migration(id),
            _ => assert_eq!(self.cluster.orders[&id].state, to),
        }
    }

    fn forget_migration(&mut self, id: u64) {
        let v = self
            .agents
            .iter_mut()
            .flat_map(|a| a.vms.values_mut())
            .find(|v| v.migration.as_ref().is_some_and(|m| m.0 == id))
            .expect("an agent ran the failed move");
        v.migration = None;
    }

    /// What must hold after every step.
    fn check(&self) {
        let c = &self.cluster;
        c.check_sums().unwrap();
        assert!(c.finished_orders.len() <= 256);

        // Every open order: the VM frozen on its source, room held on its target.
        for o in c.orders.values() {
            assert!(!o.state.is_final());
            let src = &c.nodes[&o.source].vms[&o.vm];
            assert_eq!(src.state, VmState::MigratingOut { order: o.id }, "order {}", o.id);
            let dst = c.nodes[&o.target].vms.get(&o.vm);
            assert_eq!(
                dst.map(|e| (e.state, e.reserved)),
                Some((VmState::Incoming { order: o.id }, o.reserved)),
                "order {}: no hold on the target",
                o.id
            );
        }
        // No VM is frozen or held for an order that is gone, and none is
        // active on two nodes.
        let mut active: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, n) in &c.nodes {
            for (id, e) in &n.vms {
                match e.state {
                    VmState::Active => active.entry(id).or_default().push(name),
                    VmState::MigratingOut { order } => {
                        let o = c.orders.get(&order).unwrap_or_else(|| panic!("{id} stuck on {name}"));
                        assert_eq!((&o.vm, &o.source), (id, name));
                    }
                    VmState::Incoming { order } => {
                        let o = c.orders.get(&order).unwrap_or_else(|| panic!("stale hold {id} on {name}"));
                        assert_eq!((&o.vm, &o.target), (id, name));
                    }
                }
            }
        }
        for (id, nodes) in active {
            assert!(nodes.len() <= 1, "{id} active on {nodes:?}");
        }

        // The ledger is what the agents know.
        let mut moves = 0;
        for a in &self.agents {
            let n = &c.nodes[&a.name];
            assert_eq!(n.session, a.session.as_ref().map(|s| s.id), "session of {}", a.name);
            let runs: BTreeSet<&String> = n
                .vms
                .iter()
                .filter(|(_, e)| !matches!(e.state, VmState::Incoming { .. }))
                .map(|(id, _)| id)
                .collect();
            assert_eq!(runs, a.vms.keys().collect::<BTreeSet<_>>(), "VMs of {}", a.name);
            for (id, v) in &a.vms {
                let e = &n.vms[id];
                assert_eq!(e.reserved, v.reservation(), "{id} on {}", a.name);
                assert_eq!(e.order(), v.migration.as_ref().map(|m| m.0), "{id} on {}", a.name);
                if let Some((order, target)) = &v.migration {
                    assert_eq!(c.orders[order].target, *target);
                    moves += 1;
                }
            }
        }
        assert_eq!(moves, c.orders.len(), "open orders no agent runs");
    }

    fn reserved(&self) -> Vec<(Resources, Resources)> {
        self.agents
            .iter()
            .map(|a| (self.cluster.nodes[&a.name].reserved(), self.cluster.nodes[&a.name].usable()))
            .collect()
    }
}

/// A permit lies between the old reservation and the request, grows in whole
/// CUs (the last one cut at the target), fits in the free room, and goes as
/// far as the room allows.
fn check_grant(g: &Grant, old: Resources, target: Resources, cu: ComputeUnit, free: Resources) {
    let requested = old.max(target);
    assert_eq!(g.requested, requested);
    assert!(old.fits_in(g.permitted) && g.permitted.fits_in(requested), "{g:?} from {old}");
    let grown = g.permitted.saturating_sub(old);
    assert!(grown.fits_in(free), "{g:?} grows past the free room {free}");
    let delta = requested.saturating_sub(old);
    let step = cu.get();
    let k = g.granted_cus;
    assert_eq!(grown.milli_cpu, (k * step.milli_cpu).min(delta.milli_cpu), "{g:?}");
    assert_eq!(grown.memory_bytes, (k * step.memory_bytes).min(delta.memory_bytes), "{g:?}");
    assert_eq!(g.requested_cus, cu.steps_to_cover(delta));
    let expected = if g.permitted == requested {
        assert!(k <= g.requested_cus);
        Outcome::Granted
    } else {
        assert!(!cu.steps_capped(k + 1, delta).fits_in(free), "{g:?}: one more CU had room in {free}");
        if k == 0 {
            Outcome::Denied
        } else {
            Outcome::Partial
        }
    };
    assert_eq!(g.outcome, expected);
}

fn run(specs: Vec<NodeSpec>, watermark: f64, max_moves: usize, ops: &[Op]) -> BTreeMap<String, usize> {
    let mut w = World::new(specs, watermark, max_moves);
    for op in ops {
        let before = w.reserved();
        w.apply(op);
        w.check();
        if !op.registers() {
            // Nothing but a registration takes a node past its usable
            // capacity, or further past it, in any dimension.
            for (a, ((was, usable), (now, _))) in w.agents.iter().zip(before.iter().zip(w.reserved())) {
                let ceiling = was.max(*usable);
                assert!(now.fits_in(ceiling), "{op:?} took {} from {was} to {now} (usable {usable})", a.name);
            }
        }
    }
    w.seen
}

#[test]
fn ledger_invariants_hold_under_random_interleavings() {
    let strategy = (
        prop::collection::vec(node_spec(), 2..=6),
        prop::sample::select(vec![0.6, 0.75, 0.9, 1.0]),
        1usize..=4,
        prop::collection::vec(op(), 1..=200),
    );
    // 64 cases of up to 200 steps run in a few seconds in a debug build.
    let mut runner = TestRunner::new(Config {
        cases: 64,
        max_shrink_iters: 4096,
        source_file: Some(file!()),
        ..Config::default()
    });
    let seen = Mutex::new(BTreeMap::<String, usize>::new());
    runner
        .run(&strategy, |(specs, watermark, max_moves, ops)| {
            let counts = run(specs, watermark, max_moves, &ops);
            let mut all = seen.lock().unwrap();
            for (k, v) in counts {
                *all.entry(k).or_default() += v;
            }
            Ok(())
        })
        .unwrap();
    let seen = seen.into_inner().unwrap();
    eprintln!("paths taken: {seen:#?}");
    for path in [
        "granted ok",
        "partial ok",
        "denied ok",
        "reserve migrating",
        "reserve invalid",
        "reserve vm_on_other_node",
        "release ok",
        "release invalid",
        "add_vm ok",
        "add_vm vm_exists",
        "remove_vm ok",
        "planned move ok",
        "started ok",
        "completed ok",
        "failed ok",
        "completed order_not_owned",
        "completed unknown_order",
        "expired ok",
        "restart adopted moves ok",
        "agent gave up moves ok",
        "stale request stale_session",
    ] {
        assert!(seen.get(path).copied().unwrap_or(0) > 0, "no case took the path {path:?}");
    }
}
