//! Carries out the core's hotplug actions on one VM through the
//! [`Hotplug`] boundary, and reads the result back from QEMU. The core
//! decides sizes; this file only turns a target size into device operations
//! and never goes past the target (a permit is an upper bound).

use crate::core::policy::{vcpus_for, Size};
use crate::qmp::{Hotplug, VmSize};
use crate::vms::{CpuMode, MemoryMode, VmSpec};
use std::time::Duration;

/// A failed operation: what went wrong, and QEMU's size after it when it
/// could still be read.
#[derive(Debug)]
pub struct OpError {
    pub reason: String,
    pub size: Option<Size>,
}

/// A VM's size as QEMU has it: its vCPUs present and its memory. In sysfs
/// mode QEMU has every vCPU from boot; which are online is the guest's
/// business, and the core narrows the CPU to it (`Input::Plugged`).
pub fn size_of(v: &VmSize) -> Size {
    Size::new(u64::from(v.vcpus_present) * 1000, v.memory_bytes())
}

/// Grows the VM towards `target` (CPU then memory), stopping short rather
/// than passing it.
pub async fn plug(
    hv: &dyn Hotplug,
    spec: &VmSpec,
    target: Size,
    timeout: Duration,
) -> Result<VmSize, OpError> {
    let fail = |e: crate::qmp::Error| e.to_string();
    let mut now = hv.read_size().await.map_err(|e| OpError { reason: fail(e), size: None })?;
    if spec.cpu_mode == CpuMode::Hotplug {
        let want = vcpus_for(target.milli_cpu).min(now.vcpu_slots.max(1));
        while now.vcpus_present < want {
            hv.plug_vcpu().await.map_err(|e| OpError { reason: fail(e), size: None })?;
            now.vcpus_present += 1;
        }
    }
    grow_memory(hv, spec, target.memory_bytes, &now, timeout)
        .await
        .map_err(|reason| OpError { reason, size: None })?;
    hv.read_size().await.map_err(|e| OpError { reason: fail(e), size: None })
}

async fn grow_memory(
    hv: &dyn Hotplug,
    spec: &VmSpec,
    target: u64,
    now: &VmSize,
    timeout: Duration,
) -> Result<(), String> {
    match &spec.memory {
        MemoryMode::Dimm { dimm_bytes } => {
            let mut have = now.memory_bytes();
            while have + dimm_bytes <= target {
                hv.plug_dimm(*dimm_bytes).await.map_err(|e| e.to_string())?;
                have += dimm_bytes;
            }
        }
        MemoryMode::VirtioMem { .. } => {
            let fixed = now.memory_base_bytes + now.dimm_bytes;
            // virtio-mem moves in 128 MiB blocks on x86 guests; round down.
            let want = (target.saturating_sub(fixed) / (128 << 20)) * (128 << 20);
            let want = want.min(now.virtio_mem_max_bytes);
            if want > now.virtio_mem_requested_bytes {
                hv.set_virtio_mem_size(want).await.map_err(|e| e.to_string())?;
                hv.wait_virtio_mem_plugged(timeout).await.map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// Shrinks the VM to `target` (memory then CPU), never below it.
pub async fn unplug(
    hv: &dyn Hotplug,
    spec: &VmSpec,
    target: Size,
    timeout: Duration,
) -> Result<VmSize, OpError> {
    let read = |e: crate::qmp::Error| e.to_string();
    let now = hv.read_size().await.map_err(|e| OpError { reason: read(e), size: None })?;
    let shrink = async {
        match &spec.memory {
            MemoryMode::Dimm { dimm_bytes } => {
                let mut have = now.memory_bytes();
                while have >= target.memory_bytes + dimm_bytes && have > now.memory_base_bytes {
                    hv.unplug_dimm().await.map_err(|e| e.to_string())?;
                    have -= dimm_bytes;
                }
            }
            MemoryMode::VirtioMem { .. } => {
                let fixed = now.memory_base_bytes + now.dimm_bytes;
                let want = (target.memory_bytes.saturating_sub(fixed)).div_ceil(128 << 20) * (128 << 20);
                if want < now.virtio_mem_requested_bytes {
                    hv.set_virtio_mem_size(want).await.map_err(|e| e.to_string())?;
                    hv.wait_virtio_mem_plugged(timeout).await.map_err(|e| e.to_string())?;
                }
            }
        }
        if spec.cpu_mode == CpuMode::Hotplug {
            let want = vcpus_for(target.milli_cpu);
            let mut present = now.vcpus_present;
            while present > want && now.vcpus_removable > 0 {
                hv.unplug_vcpu().await.map_err(|e| e.to_string())?;
                present -= 1;
            }
        }
        Ok::<(), String>(())
    };
    match shrink.await {
        Ok(()) => hv.read_size().await.map_err(|e| OpError { reason: read(e), size: None }),
        Err(reason) => {
            // Part of it may have gone: report what QEMU has now.
            let size = hv.read_size().await.ok().map(|v| size_of(&v));
            Err(OpError { reason, size })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::Cu;
    use crate::qmp::fake::FakeHypervisor;

    const MIB: u64 = 1 << 20;

    fn spec(cpu: CpuMode, memory: MemoryMode) -> VmSpec {
        VmSpec {
            id: "vm".into(),
            qmp: "x".into(),
            informant: None,
            cu: Cu { milli_cpu: 500, memory_bytes: 256 * MIB },
            min_cus: 1,
            max_cus: 8,
            cpu_mode: cpu,
            memory,
            policy: None,
        }
    }

    fn vm() -> VmSize {
        VmSize {
            vcpus_present: 1,
            vcpu_slots: 8,
            memory_base_bytes: 512 * MIB,
            virtio_mem_max_bytes: 2048 * MIB,
            ..VmSize::default()
        }
    }

    #[tokio::test]
    async fn dimm_plug_never_passes_the_target() {
        let hv = FakeHypervisor::new(vm());
        let s = spec(CpuMode::Hotplug, MemoryMode::Dimm { dimm_bytes: 256 * MIB });
        // 2 vCPUs, 512 + 600 MiB: two DIMMs fit (1024), a third would pass 1112.
        let got = plug(&hv, &s, Size::new(1500, 1112 * MIB), Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.vcpus_present, 2);
        assert_eq!(got.memory_bytes(), 1024 * MIB);
        let back = unplug(&hv, &s, Size::new(1000, 512 * MIB), Duration::from_secs(1)).await.unwrap();
        assert_eq!(back.memory_bytes(), 512 * MIB);
    }

    #[tokio::test]
    async fn virtio_mem_rounds_to_blocks() {
        let hv = FakeHypervisor::new(vm());
        let s = spec(CpuMode::Sysfs, MemoryMode::VirtioMem { device: "vm0".into() });
        let got =
            plug(&hv, &s, Size::new(1000, 512 * MIB + 300 * MIB), Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.virtio_mem_requested_bytes, 256 * MIB, "rounded down, not past the permit");
        assert_eq!(got.vcpus_present, 1, "sysfs mode: QEMU's vCPUs untouched");
    }

    #[tokio::test]
    async fn a_failing_hypervisor_gives_a_reason() {
        let hv = FakeHypervisor::new(vm());
        hv.state().fail_next = Some(crate::qmp::Error::Disconnected { reason: "qemu went away".into() });
        let s = spec(CpuMode::Sysfs, MemoryMode::Dimm { dimm_bytes: 256 * MIB });
        let e = plug(&hv, &s, Size::new(1000, 1024 * MIB), Duration::from_secs(1)).await.unwrap_err();
        assert!(e.reason.contains("qemu went away"), "{}", e.reason);
    }
}
