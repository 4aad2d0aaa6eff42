//! Bounds on what agents can make the core keep. Everything the core stores
//! is keyed by remote input (node names, VM ids, order ids, free text), so
//! each kind has a ceiling; past it a request is refused with
//! RESOURCE_EXHAUSTED and the setting to raise, and nothing changes.
//! It is the allocator config's `[limits]` section.

use serde::{Deserialize, Serialize};

/// `[limits]` of the allocator's config; every key optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Nodes with a ledger (registered once, connected or not); a new node
    /// past it is refused. Default 10000.
    pub max_nodes: usize,
    /// VMs on one node: a hello listing more is refused whole (before any
    /// is read), an `add_vm` past it alone. Default 1024.
    pub max_vms_per_node: usize,
    /// Migration orders open at once, planned or adopted: the planner stops
    /// there, an adoption past it is refused (the VM registers as not
    /// moving). Default 1024.
    pub max_open_orders: usize,
    /// Finished orders kept for `/state`. Default 256.
    pub finished_orders_kept: usize,
    /// A move's `reason` is cut to this many bytes, at a character
    /// boundary, before it is kept or logged. Default 1024.
    pub max_reason_bytes: usize,
}

impl Limits {
    /// Each bound at least 1 (`max_reason_bytes` may be 0: no reasons kept).
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in [
            ("max_nodes", self.max_nodes),
            ("max_vms_per_node", self.max_vms_per_node),
            ("max_open_orders", self.max_open_orders),
            ("finished_orders_kept", self.finished_orders_kept),
        ] {
            if v == 0 {
                return Err(format!("limits.{key} = 0 must be at least 1"));
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: 10_000,
            max_vms_per_node: 1024,
            max_open_orders: 1024,
            finished_orders_kept: 256,
            max_reason_bytes: 1024,
        }
    }
}
