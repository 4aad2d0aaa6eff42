//! The in-VM informant: memory pressure from eBPF, PSI and cgroup events,
//! streamed to the node agent; downscale approval; onlining of new CPUs and
//! memory.

pub mod event;
pub mod source;

/// The informant protocol versions this build serves.
pub fn informant_versions() -> std::ops::RangeInclusive<u32> {
    vmscale_proto::INFORMANT_PROTOCOL
}
