//! [`Cluster`]: every node's ledger and the orders between them, and the
//! requests an agent makes about its own VMs (add, remove, reserve,
//! release). Sessions are opened and closed in `sessions`, orders are
//! created and finished in `orders`.

use super::endpoint::EndpointScheme;
use super::error::{CoreError, Result};
use super::ledger::{Grant, NodeLedger};
use super::limits::Limits;
use super::migration::Order;
use super::names::{cut, MAX_ID_LEN};
use super::order_ids::OrderIds;
use super::orders::MoveBackoff;
use super::sessions::{Reservation, SessionRef};
use super::units::Resources;
use super::vm::{VmEntry, VmRegistration, VmState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use vmscale_common::backoff::Backoff;

/// Policy knobs of the core. Defaults, units and validation are in
/// `crate::config`, beside the file's keys.
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
    /// A node whose worst VM's run-queue delay p99 is at least this (µs) is
    /// contended: it takes a VM only when no calm node has room.
    pub contended_p99_us: u64,
    /// After a VM's move fails it is not planned again for this long (ms),
    /// doubled after each further failure in a row up to `move_retry_max_ms`.
    pub move_retry_base_ms: u64,
    pub move_retry_max_ms: u64,
    /// Bounds on what agents can make the core keep.
    pub limits: Limits,
    /// Kubernetes mode (`capacity_from_nodes`): only nodes the cluster knows
    /// (a Node object) register, with the cluster's capacity, never their
    /// agent's claim.
    pub known_nodes_only: bool,
    /// The scheme agents' migration endpoints must use.
    pub endpoint_scheme: EndpointScheme,
    /// Kubernetes mode with `migration_port`: a node's migration endpoint is
    /// the cluster's (its Node's InternalIP and the port), never the
    /// agent's; the agent only says whether it takes VMs in at all.
    pub endpoints_from_cluster: bool,
}

/// The defaults of `crate::config`, for tests and embedders.
impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            system_reserve: Resources::ZERO,
            watermark: 0.9,
            order_timeout_ms: 600_000,
            max_moves_per_round: 16,
            contended_p99_us: 5_000,
            move_retry_base_ms: 5_000,
            move_retry_max_ms: 300_000,
            limits: Limits::default(),
            known_nodes_only: false,
            endpoint_scheme: EndpointScheme::Https,
            endpoints_from_cluster: false,
        }
    }
}

impl CoreConfig {
    /// How long a VM waits after `failures` failed moves in a row (at least one).
    pub fn move_retry_wait_ms(&self, failures: u32) -> u64 {
        Backoff::from_ms(self.move_retry_base_ms, self.move_retry_max_ms).delay_ms(failures)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    pub config: CoreConfig,
    /// Issues and checks migration order ids (the cluster's order key).
    /// Never shown; a state read back from `/state` (the harnesses) gets a
    /// key of its own.
    #[serde(skip, default = "OrderIds::one_run")]
    pub(super) order_ids: OrderIds,
    #[serde(serialize_with = "sorted_nodes")]
    pub nodes: HashMap<String, NodeLedger>,
    pub orders: BTreeMap<u64, Order>,
    pub finished_orders: VecDeque<Order>,
    /// Node capacities from the cluster (Kubernetes mode), which win over
    /// what agents report; see [`cluster_capacity`].
    pub cluster_capacity: BTreeMap<String, Resources>,
    /// Migration endpoints from the cluster (Kubernetes mode with
    /// `migration_port`), which replace what agents report.
    #[serde(default)]
    pub cluster_endpoints: BTreeMap<String, String>,
    /// VMs whose last move failed, by id (see [`CoreConfig::move_retry_base_ms`]).
    pub move_backoff: BTreeMap<String, MoveBackoff>,
    pub(super) next_session: u64,
}

fn sorted_nodes<S: serde::Serializer>(
    m: &HashMap<String, NodeLedger>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let ordered: BTreeMap<_, _> = m.iter().collect();
    serde::Serialize::serialize(&ordered, s)
}

impl Cluster {
    /// A cluster with an order key of its own, good for one run (tests,
    /// benchmarks): its orders are not adopted by another run. The server
    /// uses [`Cluster::with_order_ids`] and the cluster's key.
    pub fn new(config: CoreConfig) -> Self {
        Cluster::with_order_ids(config, OrderIds::one_run())
    }

    pub fn with_order_ids(config: CoreConfig, order_ids: OrderIds) -> Self {
        Cluster {
            config,
            order_ids,
            nodes: HashMap::new(),
            orders: BTreeMap::new(),
            finished_orders: VecDeque::new(),
            cluster_capacity: BTreeMap::new(),
            cluster_endpoints: BTreeMap::new(),
            move_backoff: BTreeMap::new(),
            next_session: 1,
        }
    }

    /// The node a session owns, if the session still owns it.
    pub(super) fn owned(&self, s: &SessionRef) -> Result<&NodeLedger> {
        let n = self.nodes.get(&s.node).ok_or_else(|| CoreError::UnknownNode(s.node.clone()))?;
        if n.session != Some(s.id) {
            return Err(CoreError::StaleSession { node: s.node.clone(), session: s.id });
        }
        Ok(n)
    }

    pub(super) fn owned_vm<'a>(&'a self, s: &SessionRef, vm: &str) -> Result<(&'a NodeLedger, &'a VmEntry)> {
        let n = self.owned(s)?;
        match n.vms.get(vm) {
            Some(e) => Ok((n, e)),
            None => Err(self.missing_vm(s, vm)),
        }
    }

    pub(super) fn missing_vm(&self, s: &SessionRef, vm: &str) -> CoreError {
        // The id is the agent's, unchecked: quoted only in part.
        let vm = cut(vm, MAX_ID_LEN);
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

    pub(super) fn not_moving(vm: &str, e: &VmEntry, orders: &BTreeMap<u64, Order>) -> Result<()> {
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
        let limit = self.config.limits.max_vms_per_node;
        if n.vms.len() >= limit {
            return Err(CoreError::too_many(format!("vms on node {:?}", s.node), limit, "max_vms_per_node"));
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
