//! Where the agent learns which VMs run on its node: a local file (the
//! default, no Kubernetes needed) or the Kubernetes API. Either way a source
//! publishes the whole desired set on a `watch` channel whenever it changes;
//! the agent starts a loop for each new VM and stops loops for VMs that left.

pub mod file;
pub mod kube;

use crate::core::policy::{Cu, Policy};
use serde::{Deserialize, Serialize};
pub use vmscale_contract::informant_addr::InformantAddr;

/// How a VM's CPUs scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuMode {
    /// vCPUs are plugged and unplugged over QMP (`device_add` / `device_del`).
    Hotplug,
    /// All vCPUs exist from boot; the informant takes them online and offline
    /// in the guest. The only safe way to scale CPUs down under TCG.
    #[default]
    Sysfs,
}

/// How a VM's memory scales.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum MemoryMode {
    /// pc-dimm devices of `dimm_bytes` each, in the machine's hotplug slots.
    Dimm { dimm_bytes: u64 },
    /// One virtio-mem device whose requested size moves.
    VirtioMem { device: String },
}

/// One VM the agent must scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique across the cluster (the allocator's key).
    pub id: String,
    /// QMP endpoint: a unix socket path, or `tcp:HOST:PORT`.
    pub qmp: String,
    /// The informant's gRPC endpoint: `http://HOST:PORT`, `vsock://CID:PORT`
    /// or `vsock+unix:///PATH:PORT` (a vhost-user vsock backend's host
    /// socket), checked when the list or annotation is read
    /// (`vmscale_contract::informant_addr`, the one parser of both); none
    /// means no informant: the VM may grow but its memory never shrinks.
    #[serde(default)]
    pub informant: Option<InformantAddr>,
    /// The compute unit, e.g. 250 milli-vCPU + 1 GiB.
    pub cu: Cu,
    pub min_cus: u32,
    pub max_cus: u32,
    #[serde(default)]
    pub cpu_mode: CpuMode,
    pub memory: MemoryMode,
    /// Per-VM policy; the agent's default policy where absent.
    #[serde(default)]
    pub policy: Option<Policy>,
}

// The bounds a pod's annotations are held to (one definition of each):
// a compute unit beyond them is a unit mix-up (vCPU vs milli-vCPU), and a
// largest size beyond one million vCPUs or 1 PiB is what the allocator
// refuses as absurd.
use vmscale_contract::annotations::{
    MAX_CU_MEMORY_BYTES as MAX_CU_MEMORY, MAX_CU_MILLI_CPU, MAX_SIZE_MEMORY_BYTES, MAX_SIZE_MILLI_CPU,
};

impl VmSpec {
    /// Checks a spec from a file or an annotation; the message names the VM
    /// and the field.
    pub fn validate(&self) -> Result<(), String> {
        let id = &self.id;
        // The contract's rule: a name for the allocator and a record file
        // name on every node (NAME_MAX), whichever source the VM came from.
        if let Err(e) = vmscale_contract::vm_id::check(id) {
            return Err(format!("vm id {id:?} is refused: {e}"));
        }
        if self.qmp.is_empty() {
            return Err(format!("vm {id}: qmp endpoint is empty"));
        }
        let cu = self.cu;
        if cu.milli_cpu == 0 || cu.memory_bytes == 0 {
            return Err(format!("vm {id}: compute unit needs both milli_cpu and memory_bytes above zero"));
        }
        if cu.milli_cpu > MAX_CU_MILLI_CPU || cu.memory_bytes > MAX_CU_MEMORY {
            return Err(format!(
                "vm {id}: compute unit {cu:?} is absurdly large; units are milli-vCPU and bytes"
            ));
        }
        if self.min_cus == 0 || self.min_cus > self.max_cus {
            return Err(format!(
                "vm {id}: need 1 <= min_cus ({}) <= max_cus ({})",
                self.min_cus, self.max_cus
            ));
        }
        // Checked here, so that no size of this VM (all at most max_cus
        // units) can overflow later, nor make the allocator refuse the VM.
        let max = u64::from(self.max_cus);
        let fits = |unit: u64, limit: u64| unit.checked_mul(max).is_some_and(|v| v <= limit);
        if !(fits(cu.milli_cpu, MAX_SIZE_MILLI_CPU) && fits(cu.memory_bytes, MAX_SIZE_MEMORY_BYTES)) {
            return Err(format!(
                "vm {id}: max_cus ({}) times the compute unit is beyond {MAX_SIZE_MILLI_CPU} milli-vCPU or \
                 {MAX_SIZE_MEMORY_BYTES} bytes; check the units or lower max_cus",
                self.max_cus
            ));
        }
        match &self.memory {
            MemoryMode::Dimm { dimm_bytes } => {
                if *dimm_bytes == 0 || !cu.memory_bytes.is_multiple_of(*dimm_bytes) {
                    return Err(format!(
                        "vm {id}: dimm_bytes ({dimm_bytes}) must divide the compute unit's memory ({})",
                        cu.memory_bytes
                    ));
                }
            }
            MemoryMode::VirtioMem { device } => {
                if device.is_empty() {
                    return Err(format!("vm {id}: virtio_mem device id is empty"));
                }
                // virtio-mem moves in blocks of at least 2 MiB; 128 MiB on x86 Linux guests.
                if !cu.memory_bytes.is_multiple_of(128 << 20) {
                    return Err(format!(
                        "vm {id}: with virtio-mem the compute unit's memory must be a multiple of 128 MiB"
                    ));
                }
            }
        }
        if let Some(p) = &self.policy {
            p.validate().map_err(|e| format!("vm {id}: policy: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid spec for tests elsewhere in the crate too.
    pub fn spec(id: &str) -> VmSpec {
        VmSpec {
            id: id.into(),
            qmp: "/run/vm/qmp.sock".into(),
            informant: Some(InformantAddr::http("10.0.2.15", 7080)),
            cu: Cu { milli_cpu: 250, memory_bytes: 256 << 20 },
            min_cus: 1,
            max_cus: 8,
            cpu_mode: CpuMode::Sysfs,
            memory: MemoryMode::Dimm { dimm_bytes: 256 << 20 },
            policy: None,
        }
    }

    #[test]
    fn validation_names_vm_and_field() {
        assert!(spec("a").validate().is_ok());
        let cases: Vec<(VmSpec, &str)> = vec![
            (VmSpec { id: String::new(), ..spec("a") }, "vm id"),
            // 80 dots escape to a 240-byte record name: one byte too many.
            (VmSpec { id: ".".repeat(80), ..spec("a") }, "file name"),
            (VmSpec { cu: Cu { milli_cpu: 0, memory_bytes: 1 }, ..spec("a") }, "compute unit"),
            (VmSpec { cu: Cu { milli_cpu: 250_000_000, memory_bytes: 1 << 30 }, ..spec("a") }, "absurdly"),
            (VmSpec { min_cus: 3, max_cus: 2, ..spec("a") }, "min_cus"),
            // 2^32 - 1 units of 1 TiB overflow u64; a million and one vCPUs
            // and 4 PiB do not, but are beyond any machine.
            (
                VmSpec { cu: Cu { milli_cpu: 1000, memory_bytes: 1 << 40 }, max_cus: u32::MAX, ..spec("a") },
                "max_cus (4294967295) times the compute unit",
            ),
            (
                VmSpec { cu: Cu { milli_cpu: 1000, memory_bytes: 1 << 20 }, max_cus: 1_000_001, ..spec("a") },
                "max_cus",
            ),
            (
                VmSpec { cu: Cu { milli_cpu: 250, memory_bytes: 1 << 40 }, max_cus: 4096, ..spec("a") },
                "max_cus",
            ),
            (VmSpec { memory: MemoryMode::Dimm { dimm_bytes: 100 << 20 }, ..spec("a") }, "dimm_bytes"),
            (
                VmSpec {
                    memory: MemoryMode::VirtioMem { device: "vm0".into() },
                    cu: Cu { milli_cpu: 250, memory_bytes: 100 << 20 },
                    ..spec("a")
                },
                "128 MiB",
            ),
        ];
        for (s, want) in cases {
            let e = s.validate().unwrap_err();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }
}
