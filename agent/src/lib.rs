//! The node agent: one scaling loop per VM, a reservation from the allocator
//! before any growth, then vCPU and memory hotplug over QMP.
//!
//! - [`core`]: the pure per-VM state machine (policy, protocol order, timers).

pub mod core;
pub mod qmp;

/// The allocator protocol versions this agent will offer.
pub fn allocator_versions() -> std::ops::RangeInclusive<u32> {
    vmscale_proto::ALLOCATOR_PROTOCOL
}
