//! Sessions: an agent registers its node and the VMs it runs, and the
//! cluster replaces the node's ledger with that report, reconciled with the
//! orders still open (a restarted agent or allocator must find every move
//! where it left it). A session that ends leaves its VMs' reservations.
//!
//! The agent is believed about its own node only: its name must be one the
//! cluster knows (Kubernetes mode), its capacity gives way to the cluster's,
//! and a move it reports is adopted only with an order id this cluster
//! issued for that very move ([`super::order_ids`]). A bad VM is refused
//! alone, with why, and the rest of the node registers.

use super::endpoint::check_endpoint;
use super::error::{CoreError, Result};
use super::ledger::NodeLedger;
use super::migration::OrderState;
use super::names::check_node_name;
use super::units::Resources;
use super::vm::{VmEntry, VmRegistration, VmState};
use super::Cluster;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

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
    /// VMs the edge could not read (bad values), refused alone.
    pub refused: Vec<VmRefusal>,
}

/// A VM of a hello that was not registered, or whose reported move was not
/// adopted (then the VM registers as not moving).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRefusal {
    pub vm: String,
    pub error: CoreError,
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
    /// What was not taken from the hello: the VMs the edge could not read,
    /// then those the core refused, each group in the order of the hello.
    pub refused: Vec<VmRefusal>,
}

impl Cluster {
    /// Starts a session for a node: checks the whole registration first, then
    /// replaces the node's ledger with what the agent reports. A session that
    /// owned the node before is replaced (never two live sessions per node).
    /// Moves the agent reports are adopted (after an allocator restart) and
    /// hold room on their targets; moves it no longer reports for a VM it
    /// runs are failed. An error about the node changes nothing; a bad VM is
    /// left out and listed in [`Opened::refused`].
    pub fn open_session(&mut self, reg: NodeRegistration, now_ms: u64) -> Result<Opened> {
        let capacity = self.check_node(&reg)?;
        let NodeRegistration { node, vms, migration_endpoint, refused: edge_refused, .. } = reg;
        let (vms, mut refused) = self.sort_vms(&node, vms, now_ms);
        refused.splice(0..0, edge_refused);

        // Checked; from here on nothing fails.
        self.fail_abandoned_moves(&node, &vms, now_ms);
        let session = self.next_session;
        self.next_session = self.next_session.saturating_add(1);
        let mut ledger = NodeLedger::new(capacity, self.config.system_reserve, self.config.watermark);
        ledger.session = Some(session);
        ledger.migration_endpoint = self.endpoint_of(&node, migration_endpoint);
        let old = self.nodes.remove(&node);
        let replaced = old.as_ref().and_then(|n| n.session);
        for v in vms {
            self.register_vm(&mut ledger, v, &node, now_ms);
        }
        self.keep_leaving_vms(&mut ledger, &node, old.as_ref());
        self.hold_incoming_vms(&mut ledger, &node, old.as_ref());
        let reservations = reservations(&ledger);
        self.nodes.insert(node.clone(), ledger);
        Ok(Opened { session: SessionRef { node, id: session }, replaced, reservations, refused })
    }

    /// The migration endpoint a node gets: the agent's (checked), or in
    /// `endpoints_from_cluster` mode the cluster's for it, if the agent takes
    /// VMs in at all (a node the cluster gives no address takes none).
    fn endpoint_of(&self, node: &str, claimed: String) -> String {
        if !self.config.endpoints_from_cluster || claimed.is_empty() {
            return claimed;
        }
        self.cluster_endpoints.get(node).cloned().unwrap_or_default()
    }

    /// What is checked about the node itself, before anything changes; the
    /// node's capacity to use (the cluster's figure wins over the agent's).
    fn check_node(&self, reg: &NodeRegistration) -> Result<Resources> {
        check_node_name("node name", &reg.node)?;
        let known = self.cluster_capacity.get(&reg.node).copied();
        if self.config.known_nodes_only && known.is_none() {
            return Err(CoreError::NotClusterNode(reg.node.clone()));
        }
        let limits = &self.config.limits;
        if !self.nodes.contains_key(&reg.node) && self.nodes.len() >= limits.max_nodes {
            return Err(CoreError::too_many("nodes registered", limits.max_nodes, "max_nodes"));
        }
        let listed = reg.vms.len().saturating_add(reg.refused.len());
        if listed > limits.max_vms_per_node {
            return Err(CoreError::too_many(
                format!("the hello of node {:?} lists {listed} VMs", reg.node),
                limits.max_vms_per_node,
                "max_vms_per_node",
            ));
        }
        let capacity = reg.capacity.checked("node capacity")?;
        if capacity.milli_cpu == 0 || capacity.memory_bytes == 0 {
            return Err(CoreError::invalid(
                "node capacity",
                format!("{capacity} has a zero dimension; report the node's schedulable cpu and memory"),
            ));
        }
        check_endpoint(&reg.migration_endpoint, self.config.endpoint_scheme)?;
        Ok(known.unwrap_or(capacity))
    }

    /// The VMs to register, and those refused: a second entry for one id, or
    /// a move that cannot be adopted (the VM then registers as not moving).
    fn sort_vms(
        &self,
        node: &str,
        vms: Vec<VmRegistration>,
        now_ms: u64,
    ) -> (Vec<VmRegistration>, Vec<VmRefusal>) {
        let mut seen = HashSet::new();
        let mut taken = Vec::with_capacity(vms.len());
        let mut refused = Vec::new();
        let mut adopting = 0usize;
        for mut v in vms {
            if !seen.insert(v.id.clone()) {
                refused.push(VmRefusal { vm: v.id.clone(), error: CoreError::DuplicateVm(v.id) });
                continue;
            }
            if let Some((order, target)) = &v.migration {
                match self.check_adoption(node, &v.id, *order, target, now_ms, adopting) {
                    Ok(new) => adopting += usize::from(new),
                    Err(error) => {
                        refused.push(VmRefusal { vm: v.id.clone(), error });
                        v.migration = None;
                    }
                }
            }
            taken.push(v);
        }
        (taken, refused)
    }

    /// Whether the move `node` reports for `vm` may be adopted; true when it
    /// opens an order this run does not hold yet (`adopting` such orders of
    /// the same hello come before it).
    fn check_adoption(
        &self,
        node: &str,
        vm: &str,
        order: u64,
        target: &str,
        now_ms: u64,
        adopting: usize,
    ) -> Result<bool> {
        check_node_name("migration target node", target)?;
        if target == node {
            return Err(CoreError::invalid("migration", format!("vm {vm:?} cannot migrate to its own node")));
        }
        if let Some(o) = self.orders.get(&order) {
            if o.vm == vm && o.source == node && o.target == target {
                return Ok(false);
            }
        }
        self.order_ids.check(order, vm, node, target, now_ms, self.config.order_timeout_ms)?;
        if let Some(done) = self.finished_orders.iter().find(|o| o.id == order) {
            return Err(CoreError::invalid(
                "migration",
                format!(
                    "order {order} for vm {vm:?} already {}; report the vm as not moving",
                    done.state.name()
                ),
            ));
        }
        let limit = self.config.limits.max_open_orders;
        if self.orders.len().saturating_add(adopting) >= limit {
            return Err(CoreError::too_many("open migration orders", limit, "max_open_orders"));
        }
        Ok(true)
    }

    /// Moves this node runs as their source that its agent no longer
    /// reports although it reports the VM: the agent trusts QEMU, and QEMU
    /// runs the VM here, not moving. Failed first, so that their targets'
    /// holds go and the VM can never become active on two nodes.
    fn fail_abandoned_moves(&mut self, node: &str, vms: &[VmRegistration], now_ms: u64) {
        let reported: HashMap<&str, Option<u64>> =
            vms.iter().map(|v| (v.id.as_str(), v.migration.as_ref().map(|m| m.0))).collect();
        let abandoned: Vec<u64> = self
            .orders
            .values()
            .filter(|o| o.source == node && reported.get(o.vm.as_str()).is_some_and(|r| *r != Some(o.id)))
            .map(|o| o.id)
            .collect();
        for id in abandoned {
            let why = "the source agent re-registered the vm as not moving";
            self.finish_or_advance(id, OrderState::Failed, why, now_ms);
        }
    }

    /// One VM the agent reports; a move it reports is adopted and holds room
    /// on its target.
    fn register_vm(&mut self, ledger: &mut NodeLedger, v: VmRegistration, node: &str, now_ms: u64) {
        let reserved = v.reservation();
        let mut entry =
            VmEntry { reserved, bounds: v.bounds, cu: v.cu, unmet: Resources::ZERO, state: VmState::Active };
        if let Some((order, target)) = &v.migration {
            self.adopt_order(*order, &v.id, node, target, reserved, now_ms);
            entry.state = VmState::MigratingOut { order: *order };
            self.hold_on_target(*order, &entry);
        }
        ledger.insert(v.id, entry);
    }

    /// VMs leaving this node under open orders that its agent does not
    /// report (a restarted agent holds such a VM back until it has settled
    /// the move, then adds it): they keep their place here meanwhile, or
    /// the room they take would look free and be granted to others.
    fn keep_leaving_vms(&self, ledger: &mut NodeLedger, node: &str, old: Option<&NodeLedger>) {
        for o in self.orders.values() {
            if o.source != node || ledger.vms.contains_key(&o.vm) {
                continue;
            }
            if let Some(e) = old.and_then(|n| n.vms.get(&o.vm)).filter(|e| e.order() == Some(o.id)) {
                ledger.insert(o.vm.clone(), e.clone());
            }
        }
    }

    /// Holds for VMs moving in under open orders, unless the agent already
    /// runs them (then its registration counts them). They come from the
    /// orders, not from the old ledger: after an allocator restart there is
    /// none, and an adopted order must still hold room here.
    fn hold_incoming_vms(&self, ledger: &mut NodeLedger, node: &str, old: Option<&NodeLedger>) {
        for o in self.orders.values() {
            if o.target != node || ledger.vms.contains_key(&o.vm) {
                continue;
            }
            let like = old
                .and_then(|n| n.vms.get(&o.vm))
                .or_else(|| self.nodes.get(&o.source).and_then(|n| n.vms.get(&o.vm)));
            if let Some(like) = like {
                let hold = VmEntry {
                    reserved: o.hold_on(ledger),
                    unmet: Resources::ZERO,
                    state: VmState::Incoming { order: o.id },
                    ..like.clone()
                };
                ledger.insert(o.vm.clone(), hold);
            }
        }
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
}

/// What the node holds after its registration, sorted by VM id.
fn reservations(ledger: &NodeLedger) -> Vec<Reservation> {
    let mut out: Vec<Reservation> = ledger
        .vms
        .iter()
        .map(|(id, e)| Reservation {
            vm: id.clone(),
            reserved: e.reserved,
            migrating: e.state != VmState::Active,
        })
        .collect();
    out.sort_by(|a, b| a.vm.cmp(&b.vm));
    out
}
