//! The in-VM informant: memory pressure from eBPF, PSI and cgroup events,
//! streamed to the node agent; downscale approval; onlining of new CPUs and
//! memory.
//!
//! - Sources, each behind [`source::Source`]: [`psi`], [`cgroup_events`],
//!   [`sampler`] (and eBPF, wired in [`source_set`]), reading [`procfs`] texts.
//! - [`hub`] merges them and fans out to the one subscribed agent.
//! - [`downscale`] decides purely; [`guest`] reads and writes sysfs;
//!   [`hotplug_settings`] says which guest kernel settings make scaling worse.
//! - [`convert`], [`service`] and [`server`] are the gRPC edge; [`peer`]
//!   says which vsock peers it serves (the host only).

pub mod cgroup_events;
pub mod config;
pub mod convert;
pub mod downscale;
pub mod ebpf;
pub mod event;
pub mod fake;
pub mod guest;
pub mod hotplug_settings;
pub mod hub;
pub mod peer;
pub mod procfs;
pub mod psi;
pub mod sampler;
pub mod server;
pub mod service;
pub mod source;
pub mod source_set;
pub mod watermark;

pub use server::{run, serve, Listener, RunError};

/// The informant protocol versions this build serves.
pub fn informant_versions() -> std::ops::RangeInclusive<u32> {
    vmscale_proto::INFORMANT_PROTOCOL
}

/// An error and its sources as one line: `outer: inner: innermost`.
pub use vmscale_common::error::chain as error_chain;
/// For tests that need something this machine may lack (fails under `CI=true`).
pub use vmscale_common::testing::skip_unless_ci;
