//! The node agent: one scaling loop per VM, a reservation from the allocator
//! before any growth, then vCPU and memory hotplug over QMP.
//!
//! - [`core`]: the pure per-VM state machine (policy, protocol order, timers).

pub mod allocator_link;
pub mod config;
pub mod contention;
pub mod core;
pub mod cpu_max;
pub mod daemon;
pub mod ebpf;
pub mod executor;
pub mod http;
pub mod informant_link;
pub mod metrics;
pub mod migration;
pub mod node;
pub mod polling;
pub mod qmp;
pub mod vm_loop;
pub mod vms;

/// The allocator protocol versions this agent will offer.
pub fn allocator_versions() -> std::ops::RangeInclusive<u32> {
    vmscale_proto::ALLOCATOR_PROTOCOL
}
