//! The VM's real size, rebuilt from QEMU's answers alone. The agent trusts
//! this over its own memory, above all after a restart.

use serde::Serialize;

use super::types::{HotpluggableCpu, MachineMemory, MemoryDevice, MemorySizeSummary};

/// What a VM has right now, as QEMU sees it. Bytes are bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VmSize {
    /// vCPUs that exist (boot plus hot-plugged).
    pub vcpus_present: u32,
    /// vCPUs the machine can hold (`-smp maxcpus`).
    pub vcpu_slots: u32,
    /// vCPUs that QMP could unplug (added by `device_add` or `-device`).
    pub vcpus_removable: u32,
    /// Boot memory (`-m size`).
    pub memory_base_bytes: u64,
    /// Sum of all pc-dimm sizes, including any whose unplug is still pending.
    pub dimm_bytes: u64,
    pub dimm_count: u32,
    /// DIMM slots of the machine (`-m slots`), when QEMU tells.
    pub dimm_slots: Option<u32>,
    /// `-m maxmem`: base plus everything hotplug may add, when QEMU tells.
    pub memory_max_bytes: Option<u64>,
    /// What the agent asked the virtio-mem devices for (summed).
    pub virtio_mem_requested_bytes: u64,
    /// What the guest driver has actually plugged (summed). Lags the request,
    /// and stays put without a guest driver.
    pub virtio_mem_plugged_bytes: u64,
    /// Most the virtio-mem devices can hold (summed backend sizes).
    pub virtio_mem_max_bytes: u64,
    /// `query-memory-size-summary`'s `plugged-memory`: QEMU's own total of
    /// DIMMs plus virtio-mem plugged, kept as a cross-check.
    pub plugged_memory_bytes: u64,
}

impl VmSize {
    /// Memory the guest can use now: base, DIMMs, virtio-mem plugged.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_base_bytes + self.dimm_bytes + self.virtio_mem_plugged_bytes
    }

    /// Memory once the guest has caught up with every virtio-mem request.
    pub fn memory_target_bytes(&self) -> u64 {
        self.memory_base_bytes + self.dimm_bytes + self.virtio_mem_requested_bytes
    }
}

/// Builds a [`VmSize`] from the replies of `query-hotpluggable-cpus`,
/// `query-memory-devices`, `query-memory-size-summary` and, where available,
/// `qom-get /machine memory`. Pure, so it is tested on captured replies.
pub fn read_size(
    cpus: &[HotpluggableCpu],
    devices: &[MemoryDevice],
    summary: &MemorySizeSummary,
    machine: Option<&MachineMemory>,
) -> VmSize {
    let mut size = VmSize {
        memory_base_bytes: summary.base_memory,
        plugged_memory_bytes: summary.plugged_memory.unwrap_or(0),
        dimm_slots: machine.map(|m| m.slots),
        memory_max_bytes: machine.map(|m| m.max_size).filter(|m| *m > 0),
        ..VmSize::default()
    };
    for cpu in cpus {
        size.vcpu_slots += cpu.vcpus_count;
        if cpu.is_plugged() {
            size.vcpus_present += cpu.vcpus_count;
        }
        if cpu.is_removable() {
            size.vcpus_removable += cpu.vcpus_count;
        }
    }
    for device in devices {
        match device {
            MemoryDevice::Dimm(dimm) => {
                size.dimm_bytes += dimm.size;
                size.dimm_count += 1;
            }
            MemoryDevice::VirtioMem(vm) => {
                size.virtio_mem_requested_bytes += vm.requested_size;
                size.virtio_mem_plugged_bytes += vm.size;
                size.virtio_mem_max_bytes += vm.max_size;
            }
            MemoryDevice::Other => {}
        }
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn rebuilds_size_from_captured_replies() {
        let cpus: Vec<HotpluggableCpu> =
            serde_json::from_str(include_str!("testdata/query-hotpluggable-cpus.json")).expect("cpus");
        let devices: Vec<MemoryDevice> =
            serde_json::from_str(include_str!("testdata/query-memory-devices.json")).expect("devices");
        let summary = MemorySizeSummary { base_memory: 256 * MIB, plugged_memory: Some(256 * MIB) };
        let machine = MachineMemory { size: 256 * MIB, slots: 8, max_size: 4 * GIB };
        let size = read_size(&cpus, &devices, &summary, Some(&machine));
        assert_eq!(
            size,
            VmSize {
                vcpus_present: 2,
                vcpu_slots: 8,
                vcpus_removable: 1,
                memory_base_bytes: 256 * MIB,
                dimm_bytes: 256 * MIB,
                dimm_count: 1,
                dimm_slots: Some(8),
                memory_max_bytes: Some(4 * GIB),
                virtio_mem_requested_bytes: 512 * MIB,
                virtio_mem_plugged_bytes: 0,
                virtio_mem_max_bytes: 2 * GIB,
                plugged_memory_bytes: 256 * MIB,
            }
        );
        assert_eq!(size.memory_bytes(), 512 * MIB);
        assert_eq!(size.memory_target_bytes(), GIB);
        // QEMU's own total agrees with ours.
        assert_eq!(size.plugged_memory_bytes, size.dimm_bytes + size.virtio_mem_plugged_bytes);
    }

    #[test]
    fn a_vm_without_hotplug_devices() {
        let summary = MemorySizeSummary { base_memory: GIB, plugged_memory: None };
        let size = read_size(&[], &[], &summary, None);
        assert_eq!(size.memory_bytes(), GIB);
        assert_eq!(size.vcpu_slots, 0);
        assert_eq!(size.dimm_slots, None);
        assert_eq!(size.memory_max_bytes, None);
    }
}
