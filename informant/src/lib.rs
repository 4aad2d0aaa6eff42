//! The in-VM informant: memory pressure from eBPF, PSI and cgroup events,
//! streamed to the node agent.
//!
//! Not built yet: issue 3 (informant) delivers it. Until then this crate only
//! pins the protocol it will speak.

/// The informant protocol versions this build serves.
pub fn informant_versions() -> std::ops::RangeInclusive<u32> {
    vmscale_proto::INFORMANT_PROTOCOL
}
