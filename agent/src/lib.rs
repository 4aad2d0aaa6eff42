//! The node agent: one scaling loop per VM, a reservation from the allocator
//! before any growth, then vCPU and memory hotplug over QMP; live moves
//! between nodes. ARCHITECTURE.md has the picture.
//!
//! - [`core`]: the pure per-VM state machine (policy, pressure, polling,
//!   protocol order, timers), tested by `Sim` scenarios.
//! - [`vm_loop`]: one VM's loop, the thin shell around the core (hotplug
//!   sizing, `cpu.max`, status).
//! - [`node`]: the node supervisor: the pure inventory and order routing,
//!   one loop per VM, run-queue contention reports.
//! - [`links`]: the allocator session and the guest links.
//! - [`vms`]: the VM inventory's sources (a VM file, the node's pods).
//! - [`node_cert`]: the node's certificate from the Kubernetes CSR API.
//! - [`migration`]: live moves, source and target, with their lifecycles.
//! - [`qmp`]: the QMP client, QEMU's command line, hotplug over QMP.
//! - [`ebpf`]: the host's run-queue eBPF programs.
//! - [`daemon`], [`config`], [`http`], [`metrics`]: the process around it.

pub mod config;
pub mod core;
pub mod daemon;
pub mod ebpf;
pub mod http;
pub mod links;
pub mod metrics;
pub mod migration;
pub mod node;
pub mod node_cert;
pub mod qmp;
pub mod vm_loop;
pub mod vms;

/// The allocator protocol versions this agent will offer.
pub fn allocator_versions() -> std::ops::RangeInclusive<u32> {
    vmscale_proto::ALLOCATOR_PROTOCOL
}
