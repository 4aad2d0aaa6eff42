//! The node agent: one scaling loop per VM, a reservation from the allocator
//! before any growth, then vCPU and memory hotplug over QMP.
//!
//! Not built yet: issue 4 (agent) delivers it. Until then this crate only pins
//! the protocol it will speak.

/// The allocator protocol versions this agent will offer.
pub fn allocator_versions() -> std::ops::RangeInclusive<u32> {
    vmscale_proto::ALLOCATOR_PROTOCOL
}
