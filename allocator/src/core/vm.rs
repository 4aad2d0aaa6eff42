//! One VM's entry in a node's ledger, and the validated registration it comes from.

use super::error::{CoreError, Result};
use super::names::check_vm_id;
use super::units::{ComputeUnit, Resources};
use serde::{Deserialize, Serialize};

/// The least and the most a VM may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    pub min: Resources,
    pub max: Resources,
}

impl Bounds {
    pub fn new(min: Resources, max: Resources) -> Result<Self> {
        let min = min.checked("bounds.min")?;
        let max = max.checked("bounds.max")?;
        if !min.fits_in(max) {
            return Err(CoreError::invalid(
                "bounds",
                format!("min {min} is above max {max} in at least one dimension"),
            ));
        }
        Ok(Bounds { min, max })
    }
}

/// A VM as an agent registers it: already validated, ready for the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRegistration {
    pub id: String,
    /// What QEMU has right now.
    pub current: Resources,
    /// The last permit the VM held (zero if none).
    pub last_permit: Resources,
    pub bounds: Bounds,
    pub cu: ComputeUnit,
    /// A migration this node's agent says is still under way, with its target.
    pub migration: Option<(u64, String)>,
}

impl VmRegistration {
    pub fn new(
        id: String,
        current: Resources,
        last_permit: Resources,
        bounds: Bounds,
        cu: ComputeUnit,
    ) -> Result<Self> {
        check_vm_id("vm id", &id)?;
        let current = current.checked(&format!("vm {id:?} current"))?;
        let last_permit = last_permit.checked(&format!("vm {id:?} last_permit"))?;
        Ok(VmRegistration { id, current, last_permit, bounds, cu, migration: None })
    }

    /// The reservation this registration stands for: the VM may use what it has
    /// and what it was last permitted, whichever is more.
    pub fn reservation(&self) -> Resources {
        self.current.max(self.last_permit)
    }
}

/// Where a VM stands in the ledger of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VmState {
    Active,
    /// Running here, moving away under this order.
    MigratingOut {
        order: u64,
    },
    /// Capacity held here for a VM that is moving in under this order.
    Incoming {
        order: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    pub reserved: Resources,
    pub bounds: Bounds,
    pub cu: ComputeUnit,
    /// What the VM asked for beyond what it got at its last request.
    pub unmet: Resources,
    pub state: VmState,
}

impl VmEntry {
    pub fn order(&self) -> Option<u64> {
        match self.state {
            VmState::Active => None,
            VmState::MigratingOut { order } | VmState::Incoming { order } => Some(order),
        }
    }
}
