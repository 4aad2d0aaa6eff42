//! The pure core of the allocator: every node's ledger, the sessions that own
//! them, and the migration orders. No I/O and no clock of its own: callers pass
//! the time in milliseconds. Every method either applies all of its change or,
//! on error, none of it.

pub mod cluster_capacity;
pub mod contention;
pub mod error;
pub mod ledger;
pub mod migration;
pub mod planner;
pub mod units;
pub mod vm;

#[cfg(test)]
mod planner_tests;
#[cfg(test)]
mod tests;

use error::{CoreError, Result};
use ledger::{Grant, NodeLedger};
use migration::{Order, OrderState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use units::Resources;
use vm::{check_id, VmEntry, VmRegistration, VmState};

/// Policy knobs of the core. Defaults are in `crate::config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoreConfig {
    /// Kept back on every node for the host; never granted.
    pub system_reserve: Resources,
    /// Fraction (0, 1] of the usable capacity above which moves are planned.
    pub watermark: f64,
    /// A migration not finished after this long is failed.
    pub order_timeout_ms: u64,
    /// At most this many moves are planned per round across the cluster.
    pub max_moves_per_round: usize,
}

/// The identity every request after the hello carries: which node, which session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    pub node: String,
    pub id: u64,
}

/// A node as its agent registers it at the start of a session.
#[derive(Debug, Clone)]
pub struct NodeRegistration {
    pub node: String,
    pub capacity: Resources,
    pub vms: Vec<VmRegistration>,
    /// Where the agent takes VMs in; empty if it does not.
    pub migration_endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reservation {
    pub vm: String,
    pub reserved: Resources,
    pub migrating: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub session: SessionRef,
    /// The session this one replaced, which must now be closed.
    pub replaced: Option<u64>,
    pub reservations: Vec<Reservation>,
}

/// An agent's migration endpoint: empty, or an http(s) URL of sane length.
fn check_endpoint(e: &str) -> Result<()> {
    let ok = e.is_empty()
        || ((e.starts_with("http://") || e.starts_with("https://"))
            && e.len() <= 256
            && !e.chars().any(|c| c.is_whitespace() || c.is_control()));
    if ok {
        Ok(())
    } else {
        Err(CoreError::invalid(
            "migration endpoint",
            format!("{e:?} must be empty or an http(s) URL such as http://10.0.0.2:7073"),
        ))
    }
}

/// After a VM's move fails it is not planned again for this long, doubled
/// after each further failure in a row up to [`MOVE_RETRY_MAX_MS`].
pub const MOVE_RETRY_BASE_MS: u64 = 5_000;
pub const MOVE_RETRY_MAX_MS: u64 = 300_000;

/// How long a VM waits after `failures` failed moves in a row (at least one).
pub fn move_retry_wait_ms(failures: u32) -> u64 {
    MOVE_RETRY_BASE_MS.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MOVE_RETRY_MAX_MS)
}

/// A VM whose moves failed: how often in a row, and until when it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveBackoff {
    pub failures: u32,
    pub until_ms: u64,
}

/// How many finished orders the state dump remembers.
const FINISHED_ORDERS_KEPT: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    pub config: CoreConfig,
    #[serde(serialize_with = "sorted_nodes")]
    pub nodes: HashMap<String, NodeLedger>,
    pub orders: BTreeMap<u64, Order>,
    pub finished_orders: VecDeque<Order>,
    /// Node capacities from the cluster (Kubernetes mode), which win over
    /// what agents report; see [`cluster_capacity`].
    pub cluster_capacity: BTreeMap<String, Resources>,
    /// VMs whose last move failed, by id (see [`MOVE_RETRY_BASE_MS`]).
    pub move_backoff: BTreeMap<String, MoveBackoff>,
    next_session: u64,
    next_order: u64,
}

fn sorted_nodes<S: serde::Serializer>(
    m: &HashMap<String, NodeLedger>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let ordered: BTreeMap<_, _> = m.iter().collect();
    serde::Serialize::serialize(&ordered, s)
}

impl Cluster {
    pub fn new(config: CoreConfig) -> Self {
        Cluster {
            config,
            nodes: HashMap::new(),
            orders: BTreeMap::new(),
            finished_orders: VecDeque::new(),
            cluster_capacity: BTreeMap::new(),
            move_backoff: BTreeMap::new(),
            next_session: 1,
            next_order: 1,
        }
    }

    /// Starts this run's order ids at `base`. The server passes a value from
    /// the wall clock (ms << 16) so that an allocator that restarted never
    /// reuses an id an agent may still hold from the previous run.
    pub fn with_order_ids_from(mut self, base: u64) -> Self {
        self.next_order = self.next_order.max(base);
        self
    }

    /// Starts a session for a node: checks the whole registration first, then
    /// replaces the node's ledger with what the agent reports. A session that
    /// owned the node before is replaced (never two live sessions per node).
    /// Moves the agent reports are adopted (after an allocator restart) and
    /// hold room on their targets; moves it no longer reports for a VM it
    /// runs are failed.
    pub fn open_session(&mut self, reg: NodeRegistration, now_ms: u64) -> Result<Opened> {
        check_id("node name", &reg.node)?;
        let capacity = reg.capacity.checked("node capacity")?;
        if capacity.milli_cpu == 0 || capacity.memory_bytes == 0 {
            return Err(CoreError::invalid(
                "node capacity",
                format!("{capacity} has a zero dimension; report the node's schedulable cpu and memory"),
            ));
        }
        let capacity = self.cluster_capacity.get(&reg.node).copied().unwrap_or(capacity);
        check_endpoint(&reg.migration_endpoint)?;
        let mut seen = std::collections::HashSet::new();
        for v in &reg.vms {
            if !seen.insert(v.id.as_str()) {
                return Err(CoreError::DuplicateVm(v.id.clone()));
            }
            if let Some((_, target)) = &v.migration {
                check_id("migration target node", target)?;
                if *target == reg.node {
                    return Err(CoreError::invalid(
                        "migration",
                        format!("vm {:?} cannot migrate to its own node", v.id),
                    ));
                }
            }
        }

        // Checked; from here on nothing fails.

        // Moves this node runs as their source that its agent no longer
        // reports although it reports the VM: the agent trusts QEMU, and QEMU
        // runs the VM here, not moving. Fail them first, so that their targets'
        // holds go and the VM can never become active on two nodes.
        let abandoned: Vec<u64> = self
            .orders
            .values()
            .filter(|o| {
                o.source == reg.node
                    && reg.vms.iter().any(|v| v.id == o.vm && v.migration.as_ref().map(|m| m.0) != Some(o.id))
            })
            .map(|o| o.id)
            .collect();
        for id in abandoned {
            let why = "the source agent re-registered the vm as not moving";
            self.finish_or_advance(id, OrderState::Failed, why, now_ms);
        }

        let session = self.next_session;
        self.next_session += 1;
        let mut ledger = NodeLedger::new(capacity, self.config.system_reserve, self.config.watermark);
        ledger.session = Some(session);
        ledger.migration_endpoint = reg.migration_endpoint;
        let old = self.nodes.remove(&reg.node);
        let replaced = old.as_ref().and_then(|n| n.session);

        for v in reg.vms {
            let reserved = v.reservation();
            let mut entry = VmEntry {
                reserved,
                bounds: v.bounds,
                cu: v.cu,
                unmet: Resources::ZERO,
                state: VmState::Active,
            };
            if let Some((order, target)) = &v.migration {
                self.adopt_order(*order, &v.id, &reg.node, target, reserved, now_ms);
                entry.state = VmState::MigratingOut { order: *order };
                self.hold_on_target(*order, &entry);
            }
            ledger.insert(v.id, entry);
        }
        // VMs leaving this node under open orders that its agent does not
        // report (a restarted agent holds such a VM back until it has settled
        // the move, then adds it): they keep their place here meanwhile, or
        // the room they take would look free and be granted to others.
        for o in self.orders.values() {
            if o.source != reg.node || ledger.vms.contains_key(&o.vm) {
                continue;
            }
            if let Some(e) = old.as_ref().and_then(|n| n.vms.get(&o.vm)).filter(|e| e.order() == Some(o.id)) {
                ledger.insert(o.vm.clone(), e.clone());
            }
        }
        // Holds for VMs moving in under open orders, unless the agent already
        // runs them (then its registration counts them). They come from the
        // orders, not from the old ledger: after an allocator restart there is
        // none, and an adopted order must still hold room here.
        for o in self.orders.values() {
            if o.target != reg.node || ledger.vms.contains_key(&o.vm) {
                continue;
            }
            let like = old
                .as_ref()
                .and_then(|n| n.vms.get(&o.vm))
                .or_else(|| self.nodes.get(&o.source).and_then(|n| n.vms.get(&o.vm)));
            if let Some(like) = like {
                let hold = VmEntry {
                    reserved: o.reserved,
                    unmet: Resources::ZERO,
                    state: VmState::Incoming { order: o.id },
                    ..like.clone()
                };
                ledger.insert(o.vm.clone(), hold);
            }
        }
        let mut reservations: Vec<Reservation> = ledger
            .vms
            .iter()
            .map(|(id, e)| Reservation {
                vm: id.clone(),
                reserved: e.reserved,
                migrating: e.state != VmState::Active,
            })
            .collect();
        reservations.sort_by(|a, b| a.vm.cmp(&b.vm));
        self.nodes.insert(reg.node.clone(), ledger);
        Ok(Opened { session: SessionRef { node: reg.node, id: session }, replaced, reservations })
    }

    /// Re-creates an order a source agent reports after an allocator restart.
    fn adopt_order(
        &mut self,
        id: u64,
        vm: &str,
        source: &str,
        target: &str,
        reserved: Resources,
        now_ms: u64,
    ) {
        self.next_order = self.next_order.max(id.saturating_add(1));
        if self.orders.contains_key(&id) {
            return;
        }
        self.orders.insert(
            id,
            Order {
                id,
                vm: vm.to_owned(),
                source: source.to_owned(),
                target: target.to_owned(),
                reserved,
                state: OrderState::Started,
                created_ms: now_ms,
                deadline_ms: now_ms.saturating_add(self.config.order_timeout_ms),
                reason: "adopted from the source agent's registration".into(),
            },
        );
    }

    /// Holds room on an order's target for the VM moving in, unless the target
    /// already holds or runs it. A target that has not registered yet takes
    /// the hold from the order when it does.
    fn hold_on_target(&mut self, order_id: u64, like: &VmEntry) {
        let Some(o) = self.orders.get(&order_id) else { return };
        let Some(dst) = self.nodes.get_mut(&o.target) else { return };
        if dst.vms.contains_key(&o.vm) {
            return;
        }
        let hold = VmEntry {
            reserved: o.reserved,
            unmet: Resources::ZERO,
            state: VmState::Incoming { order: order_id },
            ..like.clone()
        };
        dst.insert(o.vm.clone(), hold);
    }

    /// The session ended. Its node keeps its reservations (the VMs still run),
    /// but gets no grants and no incoming VMs until its agent registers again.
    /// A stale session (already replaced) changes nothing.
    pub fn close_session(&mut self, s: &SessionRef) -> bool {
        match self.nodes.get_mut(&s.node) {
            Some(n) if n.session == Some(s.id) => {
                n.session = None;
                // Nobody measures the node now: its last figures would only go stale.
                n.contention = None;
                true
            }
            _ => false,
        }
    }

    fn owned(&self, s: &SessionRef) -> Result<&NodeLedger> {
        let n = self.nodes.get(&s.node).ok_or_else(|| CoreError::UnknownNode(s.node.clone()))?;
        if n.session != Some(s.id) {
            return Err(CoreError::StaleSession { node: s.node.clone(), session: s.id });
        }
        Ok(n)
    }

    fn owned_vm<'a>(&'a self, s: &SessionRef, vm: &str) -> Result<(&'a NodeLedger, &'a VmEntry)> {
        let n = self.owned(s)?;
        match n.vms.get(vm) {
            Some(e) => Ok((n, e)),
            None => Err(self.missing_vm(s, vm)),
        }
    }

    fn missing_vm(&self, s: &SessionRef, vm: &str) -> CoreError {
        // Only on the error path: say where the VM is, if anywhere.
        let owner = self
            .nodes
            .iter()
            .find(|(name, n)| **name != s.node && n.vms.contains_key(vm))
            .map(|(name, _)| name.clone());
        match owner {
            Some(owner) => CoreError::VmOnOtherNode { node: s.node.clone(), vm: vm.to_owned(), owner },
            None => CoreError::UnknownVm { node: s.node.clone(), vm: vm.to_owned() },
        }
    }

    fn not_moving(vm: &str, e: &VmEntry, orders: &BTreeMap<u64, Order>) -> Result<()> {
        match e.order() {
            None => Ok(()),
            Some(order) => Err(CoreError::Migrating {
                vm: vm.to_owned(),
                order,
                target: orders.get(&order).map(|o| o.target.clone()).unwrap_or_default(),
            }),
        }
    }

    /// A VM started on the node during the session.
    pub fn add_vm(&mut self, s: &SessionRef, reg: VmRegistration) -> Result<Reservation> {
        let n = self.owned(s)?;
        if n.vms.contains_key(&reg.id) {
            return Err(CoreError::VmExists(reg.id));
        }
        if reg.migration.is_some() {
            return Err(CoreError::invalid(
                "add_vm",
                "a migration in progress can only be reported in the session's hello",
            ));
        }
        let reserved = reg.reservation();
        let entry = VmEntry {
            reserved,
            bounds: reg.bounds,
            cu: reg.cu,
            unmet: Resources::ZERO,
            state: VmState::Active,
        };
        if let Some(n) = self.nodes.get_mut(&s.node) {
            n.insert(reg.id.clone(), entry);
        }
        Ok(Reservation { vm: reg.id, reserved, migrating: false })
    }

    /// The VM stopped: its reservation is released.
    pub fn remove_vm(&mut self, s: &SessionRef, vm: &str) -> Result<()> {
        let (_, e) = self.owned_vm(s, vm)?;
        Self::not_moving(vm, e, &self.orders)?;
        if let Some(n) = self.nodes.get_mut(&s.node) {
            n.remove(vm);
        }
        Ok(())
    }

    /// An increase request: grants whole CUs as far as the node has room.
    pub fn reserve(&mut self, s: &SessionRef, vm: &str, target: Resources) -> Result<Grant> {
        let target = target.checked("reserve target")?;
        let (n, e) = self.owned_vm(s, vm)?;
        Self::not_moving(vm, e, &self.orders)?;
        if !target.fits_in(e.bounds.max) {
            return Err(CoreError::invalid(
                "reserve target",
                format!("{target} for vm {vm:?} is above its maximum {}", e.bounds.max),
            ));
        }
        let grant = n.decide_increase(e.reserved, target, e.cu);
        let unmet = grant.requested.saturating_sub(grant.permitted);
        if let Some(n) = self.nodes.get_mut(&s.node) {
            n.update(vm, grant.permitted, unmet);
        }
        Ok(grant)
    }

    /// A decrease the agent has already carried out: applied at once.
    pub fn release(&mut self, s: &SessionRef, vm: &str, new_size: Resources) -> Result<()> {
        let new_size = new_size.checked("release size")?;
        let (_, e) = self.owned_vm(s, vm)?;
        Self::not_moving(vm, e, &self.orders)?;
        if !new_size.fits_in(e.reserved) {
            return Err(CoreError::invalid(
                "release size",
                format!(
                    "{new_size} for vm {vm:?} is above its reservation {}; ask for increases with reserve",
                    e.reserved
                ),
            ));
        }
        if !e.bounds.min.fits_in(new_size) {
            return Err(CoreError::invalid(
                "release size",
                format!("{new_size} for vm {vm:?} is below its minimum {}", e.bounds.min),
            ));
        }
        if let Some(n) = self.nodes.get_mut(&s.node) {
            n.update(vm, new_size, Resources::ZERO);
        }
        Ok(())
    }

    /// The source agent reports on a migration order.
    pub fn migration_status(
        &mut self,
        s: &SessionRef,
        order_id: u64,
        to: OrderState,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        self.owned(s)?;
        let order = self.orders.get(&order_id).ok_or(CoreError::UnknownOrder(order_id))?;
        if order.source != s.node {
            return Err(CoreError::OrderNotOwned {
                order: order_id,
                node: s.node.clone(),
                source_node: order.source.clone(),
            });
        }
        let next = order.state.transition(to, order_id)?;
        self.finish_or_advance(order_id, next, reason, now_ms);
        Ok(())
    }

    /// Whether a VM waits after failed moves at `now_ms`.
    pub fn backing_off(&self, vm: &str, now_ms: u64) -> bool {
        self.move_backoff.get(vm).is_some_and(|b| now_ms < b.until_ms)
    }

    fn finish_or_advance(&mut self, order_id: u64, next: OrderState, reason: &str, now_ms: u64) {
        let Some(mut order) = self.orders.remove(&order_id) else { return };
        order.state = next;
        if !reason.is_empty() {
            order.reason = reason.to_owned();
        }
        if !next.is_final() {
            self.orders.insert(order_id, order);
            return;
        }
        let is_ours = |e: &VmEntry| e.order() == Some(order_id);
        match next {
            OrderState::Completed => {
                self.move_backoff.remove(&order.vm);
                if let Some(src) = self.nodes.get_mut(&order.source) {
                    if src.vms.get(&order.vm).is_some_and(is_ours) {
                        src.remove(&order.vm);
                    }
                }
                if let Some(dst) = self.nodes.get_mut(&order.target) {
                    if dst.vms.get(&order.vm).is_some_and(is_ours) {
                        dst.set_state(&order.vm, VmState::Active);
                    }
                }
            }
            _ => {
                let b = self
                    .move_backoff
                    .entry(order.vm.clone())
                    .or_insert(MoveBackoff { failures: 0, until_ms: 0 });
                b.failures = b.failures.saturating_add(1);
                b.until_ms = now_ms.saturating_add(move_retry_wait_ms(b.failures));
                if let Some(dst) = self.nodes.get_mut(&order.target) {
                    if dst.vms.get(&order.vm).is_some_and(is_ours) {
                        dst.remove(&order.vm);
                    }
                }
                if let Some(src) = self.nodes.get_mut(&order.source) {
                    if src.vms.get(&order.vm).is_some_and(is_ours) {
                        src.set_state(&order.vm, VmState::Active);
                    }
                }
            }
        }
        self.finished_orders.push_back(order);
        while self.finished_orders.len() > FINISHED_ORDERS_KEPT {
            self.finished_orders.pop_front();
        }
    }

    /// Fails every order past its deadline; returns the ones it failed.
    pub fn expire_orders(&mut self, now_ms: u64) -> Vec<u64> {
        let late: Vec<u64> = self
            .orders
            .values()
            .filter(|o| !o.state.is_final() && o.deadline_ms <= now_ms)
            .map(|o| o.id)
            .collect();
        for id in &late {
            self.finish_or_advance(*id, OrderState::Failed, "did not finish before its deadline", now_ms);
        }
        late
    }

    /// Plans moves off hot nodes and applies them: capacity is held on each
    /// target and the VM frozen on its source. Returns the new orders.
    pub fn plan_and_order(&mut self, now_ms: u64) -> Vec<Order> {
        let moves = planner::plan(self, now_ms);
        let mut out = Vec::with_capacity(moves.len());
        for m in moves {
            let id = self.next_order;
            self.next_order += 1;
            let order = Order {
                id,
                vm: m.vm.clone(),
                source: m.source.clone(),
                target: m.target.clone(),
                reserved: m.reserved,
                state: OrderState::Ordered,
                created_ms: now_ms,
                deadline_ms: now_ms.saturating_add(self.config.order_timeout_ms),
                reason: m.reason,
            };
            let Some(src) = self.nodes.get_mut(&m.source) else { continue };
            let Some(e) = src.vms.get(&m.vm).cloned() else { continue };
            src.set_state(&m.vm, VmState::MigratingOut { order: id });
            if let Some(dst) = self.nodes.get_mut(&m.target) {
                dst.insert(
                    m.vm.clone(),
                    VmEntry {
                        reserved: m.reserved,
                        unmet: Resources::ZERO,
                        state: VmState::Incoming { order: id },
                        ..e
                    },
                );
            }
            self.orders.insert(id, order.clone());
            out.push(order);
        }
        out
    }

    pub fn node(&self, name: &str) -> Option<&NodeLedger> {
        self.nodes.get(name)
    }

    /// Checks the cached sums against a recount; for tests and debug builds.
    pub fn check_sums(&self) -> std::result::Result<(), String> {
        for (name, n) in &self.nodes {
            if (n.reserved(), n.unmet()) != n.recount() {
                return Err(format!("node {name}: cached sums differ from recount"));
            }
        }
        Ok(())
    }
}
