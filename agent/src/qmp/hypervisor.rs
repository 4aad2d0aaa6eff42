//! The narrow boundary the agent's executors use to change a VM. The real
//! implementation is [`super::QmpVm`]; tests use a fake.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::error::Result;
use super::size::VmSize;
use super::types::{CpuProps, VcpuThread};

/// A vCPU that was plugged or unplugged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuDevice {
    /// The device id, or the QOM path for vCPUs whose id we did not choose.
    pub id: String,
    pub props: CpuProps,
}

/// A pc-dimm that was plugged or unplugged, with its memory backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DimmDevice {
    pub id: String,
    pub backend: String,
    pub bytes: u64,
}

/// Which memory backend object new DIMMs get (the agent's `dimm_backend`:
/// `"ram"` or `"memfd"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DimmBackend {
    /// `memory-backend-ram`: private anonymous memory.
    #[default]
    Ram,
    /// `memory-backend-memfd,share=on`: needed when a vhost-user device
    /// (e.g. vhost-device-vsock) must map guest memory.
    Memfd,
}

impl DimmBackend {
    pub fn qom_type(self) -> &'static str {
        match self {
            DimmBackend::Ram => "memory-backend-ram",
            DimmBackend::Memfd => "memory-backend-memfd",
        }
    }
}

/// How hotplug operations behave; defaults fit this machine.
#[derive(Debug, Clone)]
pub struct HotplugConfig {
    pub dimm_backend: DimmBackend,
    /// The virtio-mem device to resize; `None` takes the VM's only one.
    pub virtio_mem_id: Option<String>,
    /// How long to wait for the guest to release a device after `device_del`
    /// (DEVICE_DELETED). A guest acks a DIMM in ~50 ms and a vCPU in ~0.5 s
    /// here; a guest without ACPI hotplug support never does.
    pub unplug_timeout: Duration,
    /// How often to read virtio-mem's plugged size while waiting, in case an
    /// event was missed.
    pub virtio_mem_poll: Duration,
}

impl Default for HotplugConfig {
    fn default() -> Self {
        Self {
            dimm_backend: DimmBackend::Ram,
            virtio_mem_id: None,
            unplug_timeout: Duration::from_secs(5),
            virtio_mem_poll: Duration::from_millis(50),
        }
    }
}

/// What an executor may do to one VM's size. Every call reads QEMU's state
/// first, so it behaves the same after an agent restart as before it.
#[async_trait]
pub trait Hotplug: Send + Sync {
    /// The VM's size as QEMU sees it now.
    async fn read_size(&self) -> Result<VmSize>;

    /// Adds one vCPU in the first free slot. The guest still has to online it.
    async fn plug_vcpu(&self) -> Result<CpuDevice>;

    /// Removes the last hot-plugged vCPU and waits until the guest released
    /// it. Under TCG on this machine QEMU's heap breaks after this (see
    /// DESIGN.md): use the sysfs mode there.
    async fn unplug_vcpu(&self) -> Result<CpuDevice>;

    /// Adds one DIMM of `bytes` (reusing a leftover backend of that size).
    async fn plug_dimm(&self, bytes: u64) -> Result<DimmDevice>;

    /// Removes the last DIMM (first one whose earlier unplug is pending),
    /// waits until the guest released it, then frees its backend.
    async fn unplug_dimm(&self) -> Result<DimmDevice>;

    /// Sets the virtio-mem device's requested size; returns at once.
    async fn set_virtio_mem_size(&self, requested_bytes: u64) -> Result<()>;

    /// Waits until the guest's virtio-mem driver has plugged what was
    /// requested; returns the plugged size.
    async fn wait_virtio_mem_plugged(&self, timeout: Duration) -> Result<u64>;
}

/// The host threads that run a VM's vCPUs: all that run-queue accounting
/// ([`crate::node::contention`]) and `cpu.max` ([`crate::vm_loop::cpu_max`]) ask of QEMU.
#[async_trait]
pub trait VcpuThreads: Send + Sync {
    /// Host thread ids of the vCPUs.
    async fn vcpu_threads(&self) -> Result<Vec<VcpuThread>>;

    /// QEMU's pid as the kernel vouches for it (the QMP unix socket's peer
    /// credentials); `None` where nothing does (TCP), and then nothing is
    /// written into QEMU's cgroup (`vm_loop::cpu_max`).
    fn qemu_pid(&self) -> Option<u32> {
        None
    }
}

/// Both roles, for the per-VM loop that sizes a VM and caps its threads.
/// Anything that has both is one; code that needs only one role asks for
/// that trait, so its test fakes only that.
pub trait Hypervisor: Hotplug + VcpuThreads {}

impl<T: Hotplug + VcpuThreads + ?Sized> Hypervisor for T {}
