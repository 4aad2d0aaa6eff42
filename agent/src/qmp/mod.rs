//! QEMU's machine protocol: a small async client of our own and the typed
//! hotplug operations the agent's executors use.
//!
//! - [`client`]: connection, handshake, commands matched by id with
//!   per-command timeouts, events on a broadcast channel.
//! - [`Hotplug`] (resize a VM) and [`VcpuThreads`] (its host threads): the
//!   narrow traits executors depend on, [`Hypervisor`] both; [`QmpVm`]
//!   implements them over QMP (vCPUs in [`cpu`], DIMMs in [`dimm`], virtio-mem
//!   in [`virtio_mem`]) and [`read_size`] rebuilds the VM's size from QEMU.
//! - [`process`]: starts a QEMU with hotplug room, for tests and benchmarks.
//!
//! Parsing and planning are pure functions tested on replies captured from
//! QEMU 7.2; the I/O around them is thin.
//!
//! We wrote our own client: the `qapi` crates generate bindings for one QEMU
//! schema at build time and bring more than we use, and the young `qmp` crate
//! adds an allow-list/retry layer we do not want under our own executors.

pub mod bench;
pub mod client;
pub mod cpu;
pub mod dimm;
pub mod error;
pub mod event;
#[cfg(test)]
pub(crate) mod fake;
pub mod hypervisor;
pub mod migrate;
pub mod migrate_spec;
pub mod process;
pub mod qemu_args;
pub mod size;
pub mod types;
pub mod virtio_mem;
mod vm;
pub mod wire;

pub use client::{ClientConfig, Endpoint, QmpClient};
pub use error::{Error, Result};
pub use event::{EventKind, QmpEvent};
pub use hypervisor::{CpuDevice, DimmBackend, DimmDevice, Hotplug, HotplugConfig, Hypervisor, VcpuThreads};
pub use size::{read_size, VmSize};
pub use vm::QmpVm;
