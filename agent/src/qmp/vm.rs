//! [`QmpVm`]: one VM's typed operations over a [`QmpClient`].

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use tokio::time::Instant;

use super::client::QmpClient;
use super::error::{Error, Result};
use super::event::QmpEvent;
use super::hypervisor::{CpuDevice, DimmDevice, Hotplug, HotplugConfig, VcpuThreads};
use super::size::{read_size, VmSize};
use super::types::{HotpluggableCpu, MachineMemory, Memdev, MemoryDevice, MemorySizeSummary, VcpuThread};

/// One VM reached over QMP. Multi-step operations (plug a DIMM: query, add a
/// backend, add the device) hold a per-VM lock so two of them never pick the
/// same slot or id.
#[derive(Debug)]
pub struct QmpVm {
    pub(super) client: QmpClient,
    pub(super) config: HotplugConfig,
    pub(super) op_lock: tokio::sync::Mutex<()>,
    /// Devices whose `device_del` timed out. QEMU does not report a pending
    /// unplug, so this is our own note; after a restart the deterministic
    /// choice of "last device" leads back to the same one anyway.
    pub(super) pending_unplug: Mutex<BTreeSet<String>>,
}

/// How waiting for DEVICE_DELETED ended.
pub(super) enum Deletion {
    Deleted,
    /// No event in time, or events were lost: the caller checks with a query.
    Unknown,
}

impl QmpVm {
    pub fn new(client: QmpClient, config: HotplugConfig) -> Self {
        Self {
            client,
            config,
            op_lock: tokio::sync::Mutex::new(()),
            pending_unplug: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn client(&self) -> &QmpClient {
        &self.client
    }

    pub fn config(&self) -> &HotplugConfig {
        &self.config
    }

    /// Devices whose unplug was requested but not yet seen to finish.
    pub fn pending_unplugs(&self) -> Vec<String> {
        self.pending().iter().cloned().collect()
    }

    pub(super) fn pending(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.pending_unplug.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub async fn hotpluggable_cpus(&self) -> Result<Vec<HotpluggableCpu>> {
        self.client.execute("query-hotpluggable-cpus", None).await
    }

    pub async fn memory_devices(&self) -> Result<Vec<MemoryDevice>> {
        self.client.execute("query-memory-devices", None).await
    }

    pub async fn memory_size_summary(&self) -> Result<MemorySizeSummary> {
        self.client.execute("query-memory-size-summary", None).await
    }

    pub async fn memdevs(&self) -> Result<Vec<Memdev>> {
        self.client.execute("query-memdev", None).await
    }

    /// `-m size,slots,maxmem`. Older QEMUs lack this property: `None` then.
    pub async fn machine_memory(&self) -> Result<Option<MachineMemory>> {
        let args = json!({"path": "/machine", "property": "memory"});
        match self.client.execute("qom-get", Some(args)).await {
            Ok(memory) => Ok(Some(memory)),
            Err(Error::Qemu { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn device_del(&self, device: &str) -> Result<()> {
        self.client.execute::<Value>("device_del", Some(json!({"id": device}))).await.map(drop)
    }

    pub(super) async fn object_del(&self, id: &str) -> Result<()> {
        self.client.execute::<Value>("object-del", Some(json!({"id": id}))).await.map(drop)
    }

    /// Waits for DEVICE_DELETED of `device` (id or QOM path) on a
    /// subscription taken before `device_del` was sent.
    pub(super) async fn wait_deleted(
        &self,
        events: &mut Receiver<QmpEvent>,
        device: &str,
        alias: &str,
        deadline: Instant,
    ) -> Result<Deletion> {
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return Ok(Deletion::Unknown),
                Ok(Ok(event)) if event.deletes(device) || event.deletes(alias) => {
                    return Ok(Deletion::Deleted)
                }
                Ok(Ok(_)) => {}
                Ok(Err(RecvError::Lagged(_))) => return Ok(Deletion::Unknown),
                Ok(Err(RecvError::Closed)) => {
                    return Err(Error::Disconnected {
                        reason: "qemu closed the qmp connection while a device_del was pending".into(),
                    })
                }
            }
        }
    }

    pub(super) fn unplug_deadline(&self) -> Instant {
        Instant::now() + self.config.unplug_timeout
    }

    pub(super) fn unplug_timeout(&self, device: &str) -> Error {
        self.pending().insert(device.to_string());
        Error::UnplugTimeout { device: device.to_string(), after: self.config.unplug_timeout }
    }
}

#[async_trait]
impl Hotplug for QmpVm {
    async fn read_size(&self) -> Result<VmSize> {
        // Sent together: QEMU still runs them one by one, but reads them in
        // one wake-up and answers back to back, saving round trips.
        let (cpus, devices, summary, machine) = tokio::try_join!(
            self.hotpluggable_cpus(),
            self.memory_devices(),
            self.memory_size_summary(),
            self.machine_memory(),
        )?;
        Ok(read_size(&cpus, &devices, &summary, machine.as_ref()))
    }

    async fn plug_vcpu(&self) -> Result<CpuDevice> {
        self.plug_vcpu_inner().await
    }

    async fn unplug_vcpu(&self) -> Result<CpuDevice> {
        self.unplug_vcpu_inner().await
    }

    async fn plug_dimm(&self, bytes: u64) -> Result<DimmDevice> {
        self.plug_dimm_inner(bytes).await
    }

    async fn unplug_dimm(&self) -> Result<DimmDevice> {
        self.unplug_dimm_inner().await
    }

    async fn set_virtio_mem_size(&self, requested_bytes: u64) -> Result<()> {
        self.set_virtio_mem_inner(requested_bytes).await
    }

    async fn wait_virtio_mem_plugged(&self, timeout: Duration) -> Result<u64> {
        self.wait_virtio_mem_inner(timeout).await
    }
}

#[async_trait]
impl VcpuThreads for QmpVm {
    async fn vcpu_threads(&self) -> Result<Vec<VcpuThread>> {
        self.client.execute("query-cpus-fast", None).await
    }

    fn qemu_pid(&self) -> Option<u32> {
        self.client.peer_pid()
    }
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
