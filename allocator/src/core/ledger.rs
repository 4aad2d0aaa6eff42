//! One node's ledger: its capacity and every VM's reservation, with the sums kept
//! current so that a decision never walks the VMs.

use super::contention::NodeContention;
use super::units::{ComputeUnit, Resources};
use super::vm::{VmEntry, VmState};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeLedger {
    /// What the agent reported for the node.
    pub capacity: Resources,
    /// Kept back for the host (kernel, agent, QEMU overhead); never granted.
    pub system_reserve: Resources,
    /// Fraction of the usable capacity above which the planner moves VMs away.
    pub watermark: f64,
    /// The session that owns this node; `None` while its agent is away. A node
    /// without a session keeps its reservations (its VMs still run) but gets no
    /// grants and takes no incoming VMs.
    pub session: Option<u64>,
    #[serde(serialize_with = "sorted")]
    pub vms: HashMap<String, VmEntry>,
    /// The agent's latest run-queue delay report, while its session lives.
    pub contention: Option<NodeContention>,
    /// Where the node's agent takes VMs in (its hello's migration endpoint);
    /// empty: it does not, and the planner never moves a VM here.
    pub migration_endpoint: String,
    reserved: Resources,
    unmet: Resources,
}

fn sorted<S: serde::Serializer>(m: &HashMap<String, VmEntry>, s: S) -> Result<S::Ok, S::Error> {
    let ordered: std::collections::BTreeMap<_, _> = m.iter().collect();
    serde::Serialize::serialize(&ordered, s)
}

/// The answer to one increase request, before it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub permitted: Resources,
    pub requested: Resources,
    pub outcome: Outcome,
    /// Whole CUs granted and asked for.
    pub granted_cus: u64,
    pub requested_cus: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Granted,
    Partial,
    Denied,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Granted => "granted",
            Outcome::Partial => "partial",
            Outcome::Denied => "denied",
        }
    }
}

impl NodeLedger {
    pub fn new(capacity: Resources, system_reserve: Resources, watermark: f64) -> Self {
        NodeLedger {
            capacity,
            system_reserve,
            watermark,
            session: None,
            vms: HashMap::new(),
            contention: None,
            migration_endpoint: String::new(),
            reserved: Resources::ZERO,
            unmet: Resources::ZERO,
        }
    }

    /// What may be handed out to VMs at all.
    pub fn usable(&self) -> Resources {
        self.capacity.saturating_sub(self.system_reserve)
    }

    pub fn reserved(&self) -> Resources {
        self.reserved
    }

    /// Demand that was asked for and not granted.
    pub fn unmet(&self) -> Resources {
        self.unmet
    }

    pub fn free(&self) -> Resources {
        self.usable().saturating_sub(self.reserved)
    }

    /// The level (reservations plus unmet demand) above which the node is hot.
    pub fn watermark_level(&self) -> Resources {
        self.usable().scaled(self.watermark)
    }

    /// Reservations plus unmet demand: what the node's VMs want.
    pub fn wanted(&self) -> Resources {
        self.reserved.saturating_add(self.unmet)
    }

    pub fn is_overcommitted(&self) -> bool {
        !self.reserved.fits_in(self.usable())
    }

    pub fn insert(&mut self, id: String, entry: VmEntry) {
        self.reserved = self.reserved.saturating_add(entry.reserved);
        self.unmet = self.unmet.saturating_add(entry.unmet);
        if let Some(old) = self.vms.insert(id, entry) {
            self.forget(&old);
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<VmEntry> {
        let old = self.vms.remove(id)?;
        self.forget(&old);
        if let Some(c) = &mut self.contention {
            c.vms.remove(id);
        }
        Some(old)
    }

    fn forget(&mut self, e: &VmEntry) {
        self.reserved = self.reserved.saturating_sub(e.reserved);
        self.unmet = self.unmet.saturating_sub(e.unmet);
    }

    /// Sets a VM's reservation and unmet demand, keeping the sums right.
    pub fn update(&mut self, id: &str, reserved: Resources, unmet: Resources) {
        if let Some(e) = self.vms.get_mut(id) {
            self.reserved = self.reserved.saturating_sub(e.reserved).saturating_add(reserved);
            self.unmet = self.unmet.saturating_sub(e.unmet).saturating_add(unmet);
            e.reserved = reserved;
            e.unmet = unmet;
        }
    }

    pub fn set_state(&mut self, id: &str, state: VmState) {
        if let Some(e) = self.vms.get_mut(id) {
            e.state = state;
        }
    }

    /// Recomputes the sums from scratch; tests compare it with the cached ones.
    pub fn recount(&self) -> (Resources, Resources) {
        self.vms.values().fold((Resources::ZERO, Resources::ZERO), |(r, u), e| {
            (r.saturating_add(e.reserved), u.saturating_add(e.unmet))
        })
    }

    /// How far a VM holding `old` may grow towards `target` on this node: whole
    /// compute units, the last one cut at the target, never past the usable
    /// capacity. Pure: the caller applies the answer.
    pub fn decide_increase(&self, old: Resources, target: Resources, cu: ComputeUnit) -> Grant {
        let requested = old.max(target);
        let delta = requested.saturating_sub(old);
        let requested_cus = cu.steps_to_cover(delta);
        let free = self.free();
        let step = cu.get();
        // In a dimension where the whole delta fits, any number of steps fits;
        // otherwise only as many whole steps as the free room holds.
        let mut fit = requested_cus;
        if delta.milli_cpu > free.milli_cpu {
            fit = fit.min(free.milli_cpu / step.milli_cpu);
        }
        if delta.memory_bytes > free.memory_bytes {
            fit = fit.min(free.memory_bytes / step.memory_bytes);
        }
        let permitted = old.saturating_add(cu.steps_capped(fit, delta));
        let outcome = if fit == requested_cus {
            Outcome::Granted
        } else if fit == 0 {
            Outcome::Denied
        } else {
            Outcome::Partial
        };
        Grant { permitted, requested, outcome, granted_cus: fit, requested_cus }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn cu() -> ComputeUnit {
        ComputeUnit::new(Resources::new(250, GIB)).unwrap()
    }

    fn node_with_free(free: Resources) -> NodeLedger {
        NodeLedger::new(free.saturating_add(Resources::new(100, GIB)), Resources::new(100, GIB), 0.9)
    }

    /// (free room, old, target) -> (permitted, outcome)
    #[test]
    fn increase_table() {
        use Outcome::*;
        let r = Resources::new;
        let cases = [
            // Everything fits: granted exactly to the target.
            (r(4000, 16 * GIB), r(250, GIB), r(1000, 4 * GIB), r(1000, 4 * GIB), Granted),
            // Target not a whole number of CUs: the last step is cut at the target.
            (r(4000, 16 * GIB), r(250, GIB), r(600, GIB + 5), r(600, GIB + 5), Granted),
            // Room for two of three CUs (memory is the limit).
            (r(4000, 2 * GIB + 7), r(250, GIB), r(1000, 4 * GIB), r(750, 3 * GIB), Partial),
            // CPU is the limit.
            (r(300, 16 * GIB), r(250, GIB), r(1000, 4 * GIB), r(500, 2 * GIB), Partial),
            // Less than one CU free: denied, unchanged.
            (r(249, 16 * GIB), r(250, GIB), r(1000, 4 * GIB), r(250, GIB), Denied),
            (r(0, 0), r(250, GIB), r(1000, 4 * GIB), r(250, GIB), Denied),
            // Nothing asked (target at or below current): granted, unchanged.
            (r(0, 0), r(500, 2 * GIB), r(250, GIB), r(500, 2 * GIB), Granted),
            // Mixed: cpu up, memory down -> memory stays, cpu grows.
            (r(1000, 0), r(250, 2 * GIB), r(750, GIB), r(750, 2 * GIB), Granted),
            // Only memory wanted, cpu room zero: memory steps need no cpu.
            (r(0, 8 * GIB), r(250, GIB), r(250, 3 * GIB), r(250, 3 * GIB), Granted),
        ];
        for (i, (free, old, target, want, outcome)) in cases.into_iter().enumerate() {
            let n = node_with_free(free);
            let g = n.decide_increase(old, target, cu());
            assert_eq!((g.permitted, g.outcome), (want, outcome), "case {i}: {g:?}");
            // The permit always lies between the old value and the request.
            assert!(old.fits_in(g.permitted) && g.permitted.fits_in(old.max(target)), "case {i}");
            assert!(g.permitted.saturating_sub(old).fits_in(n.free()), "case {i}");
        }
    }

    #[test]
    fn sums_follow_inserts_updates_and_removes() {
        let mut n = NodeLedger::new(Resources::new(8000, 32 * GIB), Resources::ZERO, 0.9);
        let e = |r: Resources| VmEntry {
            reserved: r,
            bounds: crate::core::vm::Bounds::new(Resources::ZERO, Resources::new(8000, 32 * GIB)).unwrap(),
            cu: cu(),
            unmet: Resources::ZERO,
            state: VmState::Active,
        };
        n.insert("a".into(), e(Resources::new(1000, 4 * GIB)));
        n.insert("b".into(), e(Resources::new(500, 2 * GIB)));
        n.update("a", Resources::new(2000, 4 * GIB), Resources::new(250, GIB));
        n.insert("b".into(), e(Resources::new(250, GIB))); // replaces b
        assert_eq!(n.reserved(), Resources::new(2250, 5 * GIB));
        assert_eq!(n.unmet(), Resources::new(250, GIB));
        assert_eq!((n.reserved(), n.unmet()), n.recount());
        n.remove("a");
        assert_eq!(n.reserved(), Resources::new(250, GIB));
        assert_eq!(n.unmet(), Resources::ZERO);
        assert!(n.remove("a").is_none());
    }
}
