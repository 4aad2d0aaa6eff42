//! Sessions: an agent registers its node and the VMs it runs, and the
//! cluster replaces the node's ledger with that report, reconciled with the
//! orders still open (a restarted agent or allocator must find every move
//! where it left it). A session that ends leaves its VMs' reservations.

use super::error::{CoreError, Result};
use super::ledger::NodeLedger;
use super::migration::OrderState;
use super::units::Resources;
use super::vm::{check_id, VmEntry, VmRegistration, VmState};
use super::Cluster;
use serde::Serialize;

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

impl Cluster {
    /// Starts a session for a node: checks the whole registration first, then
    /// replaces the node's ledger with what the agent reports. A session that
    /// owned the node before is replaced (never two live sessions per node).
    /// Moves the agent reports are adopted (after an allocator restart) and
    /// hold room on their targets; moves it no longer reports for a VM it
    /// runs are failed.
    pub fn open_session(&mut self, reg: NodeRegistration, now_ms: u64) -> Result<Opened> {
        let capacity = self.check_registration(&reg)?;

        // Checked; from here on nothing fails.
        self.fail_abandoned_moves(&reg, now_ms);
        let session = self.next_session;
        self.next_session += 1;
        let mut ledger = NodeLedger::new(capacity, self.config.system_reserve, self.config.watermark);
        ledger.session = Some(session);
        ledger.migration_endpoint = reg.migration_endpoint;
        let old = self.nodes.remove(&reg.node);
        let replaced = old.as_ref().and_then(|n| n.session);
        for v in reg.vms {
            self.register_vm(&mut ledger, v, &reg.node, now_ms);
        }
        self.keep_leaving_vms(&mut ledger, &reg.node, old.as_ref());
        self.hold_incoming_vms(&mut ledger, &reg.node, old.as_ref());
        let reservations = reservations(&ledger);
        self.nodes.insert(reg.node.clone(), ledger);
        Ok(Opened { session: SessionRef { node: reg.node, id: session }, replaced, reservations })
    }

    /// The whole registration, checked before anything changes; the node's
    /// capacity to use (the cluster's figure wins over the agent's).
    fn check_registration(&self, reg: &NodeRegistration) -> Result<Resources> {
        check_id("node name", &reg.node)?;
        let capacity = reg.capacity.checked("node capacity")?;
        if capacity.milli_cpu == 0 || capacity.memory_bytes == 0 {
            return Err(CoreError::invalid(
                "node capacity",
                format!("{capacity} has a zero dimension; report the node's schedulable cpu and memory"),
            ));
        }
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
        Ok(self.cluster_capacity.get(&reg.node).copied().unwrap_or(capacity))
    }

    /// Moves this node runs as their source that its agent no longer
    /// reports although it reports the VM: the agent trusts QEMU, and QEMU
    /// runs the VM here, not moving. Failed first, so that their targets'
    /// holds go and the VM can never become active on two nodes.
    fn fail_abandoned_moves(&mut self, reg: &NodeRegistration, now_ms: u64) {
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
                    reserved: o.reserved,
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
