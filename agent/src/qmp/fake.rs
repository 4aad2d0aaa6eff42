//! An in-memory [`Hypervisor`] (both roles) for executor tests: it keeps a [`VmSize`],
//! records each call, and fails the next call when told to.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::error::{Error, Result};
use super::hypervisor::{CpuDevice, DimmDevice, Hotplug, Hypervisor, VcpuThreads};
use super::size::VmSize;
use super::types::VcpuThread;

#[derive(Debug, Default)]
pub struct FakeState {
    pub size: VmSize,
    /// Calls in order, e.g. `plug_dimm(268435456)`.
    pub calls: Vec<String>,
    /// Returned (once) by the next call instead of acting.
    pub fail_next: Option<Error>,
    /// When false, virtio-mem requests are recorded but never plugged, like a
    /// guest without the driver.
    pub virtio_mem_driver: bool,
}

#[derive(Debug, Default)]
pub struct FakeHypervisor {
    state: Mutex<FakeState>,
}

impl FakeHypervisor {
    pub fn new(size: VmSize) -> Self {
        Self { state: Mutex::new(FakeState { size, virtio_mem_driver: true, ..FakeState::default() }) }
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn call(&self, name: String) -> Result<MutexGuard<'_, FakeState>> {
        let mut state = self.state();
        state.calls.push(name);
        match state.fail_next.take() {
            Some(e) => Err(e),
            None => Ok(state),
        }
    }
}

#[async_trait]
impl Hotplug for FakeHypervisor {
    async fn read_size(&self) -> Result<VmSize> {
        Ok(self.call("read_size".into())?.size.clone())
    }

    async fn plug_vcpu(&self) -> Result<CpuDevice> {
        let mut state = self.call("plug_vcpu".into())?;
        if state.size.vcpus_present >= state.size.vcpu_slots {
            return Err(Error::NoFreeCpuSlot { slots: state.size.vcpu_slots as usize });
        }
        let id = format!("vmscale-cpu{}", state.size.vcpus_present);
        state.size.vcpus_present += 1;
        state.size.vcpus_removable += 1;
        Ok(CpuDevice { id, props: Default::default() })
    }

    async fn unplug_vcpu(&self) -> Result<CpuDevice> {
        let mut state = self.call("unplug_vcpu".into())?;
        if state.size.vcpus_removable == 0 {
            return Err(Error::NoRemovableCpu);
        }
        state.size.vcpus_present -= 1;
        state.size.vcpus_removable -= 1;
        Ok(CpuDevice { id: format!("vmscale-cpu{}", state.size.vcpus_present), props: Default::default() })
    }

    async fn plug_dimm(&self, bytes: u64) -> Result<DimmDevice> {
        let mut state = self.call(format!("plug_dimm({bytes})"))?;
        let index = state.size.dimm_count;
        state.size.dimm_count += 1;
        state.size.dimm_bytes += bytes;
        state.size.plugged_memory_bytes += bytes;
        Ok(DimmDevice {
            id: format!("vmscale-dimm{index}"),
            backend: format!("vmscale-dimm{index}-mem"),
            bytes,
        })
    }

    async fn unplug_dimm(&self) -> Result<DimmDevice> {
        let mut state = self.call("unplug_dimm".into())?;
        if state.size.dimm_count == 0 {
            return Err(Error::NoRemovableDimm);
        }
        // All fake DIMMs are the same size.
        let bytes = state.size.dimm_bytes / u64::from(state.size.dimm_count);
        state.size.dimm_count -= 1;
        state.size.dimm_bytes -= bytes;
        state.size.plugged_memory_bytes -= bytes;
        let index = state.size.dimm_count;
        Ok(DimmDevice {
            id: format!("vmscale-dimm{index}"),
            backend: format!("vmscale-dimm{index}-mem"),
            bytes,
        })
    }

    async fn set_virtio_mem_size(&self, requested_bytes: u64) -> Result<()> {
        let mut state = self.call(format!("set_virtio_mem_size({requested_bytes})"))?;
        state.size.virtio_mem_requested_bytes = requested_bytes;
        if state.virtio_mem_driver {
            state.size.virtio_mem_plugged_bytes = requested_bytes;
        }
        Ok(())
    }

    async fn wait_virtio_mem_plugged(&self, timeout: Duration) -> Result<u64> {
        let state = self.call("wait_virtio_mem_plugged".into())?;
        let size = &state.size;
        if size.virtio_mem_plugged_bytes == size.virtio_mem_requested_bytes {
            return Ok(size.virtio_mem_plugged_bytes);
        }
        Err(Error::VirtioMemTimeout {
            device: "vm0".into(),
            requested_bytes: size.virtio_mem_requested_bytes,
            plugged_bytes: size.virtio_mem_plugged_bytes,
            after: timeout,
        })
    }
}

#[async_trait]
impl VcpuThreads for FakeHypervisor {
    async fn vcpu_threads(&self) -> Result<Vec<VcpuThread>> {
        let state = self.call("vcpu_threads".into())?;
        Ok((0..state.size.vcpus_present)
            .map(|i| VcpuThread {
                cpu_index: i,
                thread_id: 1000 + i64::from(i),
                qom_path: format!("/machine/fake/cpu{i}"),
                props: Default::default(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_behaves_like_a_small_vm() {
        let fake = FakeHypervisor::new(VmSize { vcpus_present: 1, vcpu_slots: 2, ..VmSize::default() });
        let hv: &dyn Hypervisor = &fake;
        hv.plug_vcpu().await.expect("plug");
        assert!(matches!(hv.plug_vcpu().await, Err(Error::NoFreeCpuSlot { .. })));
        hv.plug_dimm(1 << 28).await.expect("dimm");
        fake.state().fail_next = Some(Error::Disconnected { reason: "test".into() });
        assert!(hv.unplug_dimm().await.expect_err("injected").is_disconnected());
        hv.unplug_dimm().await.expect("dimm");
        assert_eq!(hv.read_size().await.expect("size").dimm_bytes, 0);
        assert_eq!(
            fake.state().calls,
            ["plug_vcpu", "plug_vcpu", "plug_dimm(268435456)", "unplug_dimm", "unplug_dimm", "read_size"]
        );
    }
}
