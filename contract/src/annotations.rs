//! A VM pod's annotations into [`VmAnnotations`], or the first thing wrong
//! with them, named so the pod's owner knows what to fix. Pure: a map in, a
//! value out.

use crate::informant_addr::InformantAddr;
use crate::keys::*;
use crate::policy::Policy;
use crate::quantity;
use std::collections::BTreeMap;

/// Largest compute unit accepted: more is a unit mix-up (vCPU against
/// milli-vCPU, bytes against MiB).
pub const MAX_CU_MILLI_CPU: u64 = 64 * 1000;
pub const MAX_CU_MEMORY_BYTES: u64 = 1 << 40;
/// Largest size (`max-cus` units) accepted: one million vCPUs and 1 PiB, as
/// the allocator's ledger bounds any amount.
pub const MAX_SIZE_MILLI_CPU: u64 = 1_000_000 * 1000;
pub const MAX_SIZE_MEMORY_BYTES: u64 = 1 << 50;
/// Memory amounts are whole MiB (see the crate documentation).
const MIB: u64 = 1 << 20;
/// virtio-mem moves in blocks of at least 2 MiB; 128 MiB on x86 Linux guests.
const VIRTIO_MEM_BLOCK: u64 = 128 << 20;
/// VM ids are names in the allocator (and Kubernetes object names at most this long).
const MAX_ID_LEN: usize = 253;

/// What a VM pod's annotations say, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VmAnnotations {
    /// `vmscale.io/vm-id`, or the default the caller passed.
    pub id: String,
    pub qmp: String,
    pub informant: Option<InformantAddr>,
    pub cu_milli_cpu: u64,
    pub cu_memory_bytes: u64,
    pub min_cus: u32,
    pub max_cus: u32,
    pub cpu_mode: CpuMode,
    pub memory: Memory,
    /// `vmscale.io/policy`, parsed and validated: a JSON object whose fields
    /// override the node's policy.
    pub policy: Option<Policy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    Sysfs,
    Hotplug,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    Dimm { dimm_bytes: u64 },
    VirtioMem { device: String },
}

impl VmAnnotations {
    /// The smallest size, `min-cus` units: what the VM needs on its node to
    /// start, as (milli-vCPU, bytes). Bounded by the parse, so no overflow.
    pub fn smallest(&self) -> (u64, u64) {
        let n = u64::from(self.min_cus);
        (self.cu_milli_cpu * n, self.cu_memory_bytes * n)
    }
}

/// What the annotations of a VM pod got wrong. Each message names the
/// annotation, so the pod's owner knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("annotation {key} is missing")]
    Missing { key: &'static str },
    #[error("annotation {key}={value:?} {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
    #[error("annotation {key} is not one vmscale knows (a typo?)")]
    Unknown { key: String },
    /// Rules a user of the contract adds (the agent's policy fields).
    #[error("the annotations describe an invalid VM: {reason}")]
    Spec { reason: String },
}

impl AnnotationError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AnnotationError::Missing { .. } => "missing",
            AnnotationError::Invalid { .. } => "invalid",
            AnnotationError::Unknown { .. } => "unknown",
            AnnotationError::Spec { .. } => "spec",
        }
    }
}

/// `<namespace>/<name>`: a pod's VM id when it sets none.
pub fn default_vm_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Checks a VM pod's annotations; `default_id` is the VM's id when
/// `vmscale.io/vm-id` is absent. Annotations outside `vmscale.io/` are ignored.
pub fn parse(a: &BTreeMap<String, String>, default_id: &str) -> Result<VmAnnotations, AnnotationError> {
    if let Some(key) = a.keys().find(|k| is_unknown(k)) {
        return Err(AnnotationError::Unknown { key: key.clone() });
    }
    let (min_cus, max_cus) = sizes(a)?;
    let cu_milli_cpu: u64 = number(a, CU_MILLI_CPU)?;
    if cu_milli_cpu == 0 || cu_milli_cpu > MAX_CU_MILLI_CPU {
        return Err(invalid(CU_MILLI_CPU, a, &format!("must be 1 to {MAX_CU_MILLI_CPU} (milli-vCPU)")));
    }
    let cu_memory_bytes = memory_amount(a, CU_MEMORY_BYTES, required(a, CU_MEMORY_BYTES)?, "")?;
    if cu_memory_bytes > MAX_CU_MEMORY_BYTES {
        return Err(invalid(CU_MEMORY_BYTES, a, "is absurdly large for one compute unit (above 1Ti)"));
    }
    let largest = (cu_milli_cpu * u64::from(max_cus), cu_memory_bytes.saturating_mul(u64::from(max_cus)));
    if largest.0 > MAX_SIZE_MILLI_CPU || largest.1 > MAX_SIZE_MEMORY_BYTES {
        return Err(invalid(MAX_CUS, a, "times the compute unit is beyond any machine; check the units"));
    }
    let cpu_mode = match optional(a, CPU_MODE)? {
        None | Some("sysfs") => CpuMode::Sysfs,
        Some("hotplug") => CpuMode::Hotplug,
        Some(_) => return Err(invalid(CPU_MODE, a, "must be `hotplug` or `sysfs`")),
    };
    let policy = optional(a, POLICY)?.map(|json| policy(a, json)).transpose()?;
    Ok(VmAnnotations {
        id: vm_id(a, default_id)?,
        qmp: required(a, QMP)?.to_owned(),
        informant: optional(a, INFORMANT)?
            .map(|v| {
                v.parse::<InformantAddr>()
                    .map_err(|e| invalid(INFORMANT, a, &format!("is not an address: {}", e.reason)))
            })
            .transpose()?,
        cu_milli_cpu,
        cu_memory_bytes,
        min_cus,
        max_cus,
        cpu_mode,
        memory: memory(a, cu_memory_bytes)?,
        policy,
    })
}

/// `vmscale.io/policy`: a JSON object of policy fields, each checked as the
/// agent's `[policy]` is.
fn policy(a: &BTreeMap<String, String>, json: &str) -> Result<Policy, AnnotationError> {
    if let Err(e) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
        return Err(invalid(POLICY, a, &format!("is not a JSON object: {e}")));
    }
    let p: Policy = serde_json::from_str(json)
        .map_err(|e| invalid(POLICY, a, &format!("is not a JSON policy object: {e}")))?;
    p.validate().map_err(|e| invalid(POLICY, a, &format!("is not a valid policy: {e}")))?;
    Ok(p)
}

fn sizes(a: &BTreeMap<String, String>) -> Result<(u32, u32), AnnotationError> {
    let min_cus: u32 = number(a, MIN_CUS)?;
    let max_cus: u32 = number(a, MAX_CUS)?;
    if min_cus == 0 {
        return Err(invalid(MIN_CUS, a, "must be at least 1"));
    }
    if max_cus < min_cus {
        return Err(invalid(MAX_CUS, a, &format!("is below {MIN_CUS} ({min_cus})")));
    }
    Ok((min_cus, max_cus))
}

fn vm_id(a: &BTreeMap<String, String>, default_id: &str) -> Result<String, AnnotationError> {
    let id = optional(a, VM_ID)?.unwrap_or(default_id);
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        let reason = format!("vm id {id:?} must be 1-{MAX_ID_LEN} printable characters");
        return Err(match a.get(VM_ID) {
            Some(_) => invalid(VM_ID, a, &reason),
            None => AnnotationError::Spec { reason },
        });
    }
    Ok(id.to_owned())
}

fn memory(a: &BTreeMap<String, String>, cu_memory_bytes: u64) -> Result<Memory, AnnotationError> {
    let v = required(a, MEMORY)?;
    if let Some(size) = v.strip_prefix("dimm:") {
        let dimm_bytes = memory_amount(a, MEMORY, size, "the dimm size ")?;
        if !cu_memory_bytes.is_multiple_of(dimm_bytes) {
            let reason = format!("the dimm size must divide {CU_MEMORY_BYTES} ({cu_memory_bytes} bytes)");
            return Err(invalid(MEMORY, a, &reason));
        }
        Ok(Memory::Dimm { dimm_bytes })
    } else if let Some(device) = v.strip_prefix("virtio-mem:") {
        if device.is_empty() {
            return Err(invalid(MEMORY, a, "names no virtio-mem device (`virtio-mem:<device id>`)"));
        }
        if !cu_memory_bytes.is_multiple_of(VIRTIO_MEM_BLOCK) {
            let reason = format!("needs {CU_MEMORY_BYTES} to be a multiple of 128Mi (virtio-mem's block)");
            return Err(invalid(MEMORY, a, &reason));
        }
        Ok(Memory::VirtioMem { device: device.to_owned() })
    } else {
        Err(invalid(MEMORY, a, "must be `dimm:<bytes>` or `virtio-mem:<device id>`"))
    }
}

/// A memory quantity: whole MiB, above zero. `what` prefixes the reason
/// when the amount is part of the value (`dimm:1G`).
fn memory_amount(
    a: &BTreeMap<String, String>,
    key: &'static str,
    s: &str,
    what: &str,
) -> Result<u64, AnnotationError> {
    let Some(bytes) = quantity::whole_bytes(s) else {
        let reason = format!("{what}is not a quantity of whole bytes (such as 1Gi, 512Mi or 1073741824)");
        return Err(invalid(key, a, &reason));
    };
    if bytes == 0 || !bytes.is_multiple_of(MIB) {
        let hint = if quantity::is_decimal(s) {
            format!("; {s} is {bytes} bytes, did you mean {}i?", s.trim())
        } else {
            String::new()
        };
        let reason =
            format!("{what}must be a positive whole number of MiB (guests hotplug memory in blocks){hint}");
        return Err(invalid(key, a, &reason));
    }
    Ok(bytes)
}

fn invalid(key: &'static str, a: &BTreeMap<String, String>, reason: &str) -> AnnotationError {
    AnnotationError::Invalid {
        key,
        value: a.get(key).cloned().unwrap_or_default(),
        reason: reason.to_owned(),
    }
}

/// A present annotation must not be empty: an empty value is almost always
/// a templating slip, and "absent" is spelled by leaving the key out.
fn optional<'a>(
    a: &'a BTreeMap<String, String>,
    key: &'static str,
) -> Result<Option<&'a str>, AnnotationError> {
    match a.get(key).map(|v| v.trim()) {
        Some("") => Err(invalid(key, a, "is empty")),
        v => Ok(v),
    }
}

fn required<'a>(a: &'a BTreeMap<String, String>, key: &'static str) -> Result<&'a str, AnnotationError> {
    optional(a, key)?.ok_or(AnnotationError::Missing { key })
}

fn number<T: std::str::FromStr>(
    a: &BTreeMap<String, String>,
    key: &'static str,
) -> Result<T, AnnotationError> {
    required(a, key)?.parse().map_err(|_| invalid(key, a, "is not a whole non-negative number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> BTreeMap<String, String> {
        [
            (QMP, "/run/vmscale/pg-1/qmp.sock"),
            (INFORMANT, "http://10.0.2.15:7080"),
            (CU_MILLI_CPU, "250"),
            (CU_MEMORY_BYTES, "1Gi"),
            (MIN_CUS, "1"),
            (MAX_CUS, "8"),
            (MEMORY, "dimm:256Mi"),
            ("vmscale.io/current-milli-cpu", "500"),
            ("vmscale.io/updated-at", "2026-01-01T00:00:00Z"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn with(changes: &[(&str, Option<&str>)]) -> BTreeMap<String, String> {
        let mut a = good();
        for (k, v) in changes {
            match v {
                Some(v) => a.insert((*k).to_owned(), (*v).to_owned()),
                None => a.remove(*k),
            };
        }
        a
    }

    #[test]
    fn good_annotations_give_a_vm() {
        let v = parse(&good(), "ns/pg-1").unwrap();
        assert_eq!(v.id, "ns/pg-1");
        assert_eq!((v.cu_milli_cpu, v.cu_memory_bytes), (250, 1 << 30));
        assert_eq!((v.min_cus, v.max_cus), (1, 8));
        assert_eq!(v.cpu_mode, CpuMode::Sysfs);
        assert_eq!(v.memory, Memory::Dimm { dimm_bytes: 256 << 20 });
        assert_eq!(v.informant, Some(InformantAddr::http("10.0.2.15", 7080)));
        assert_eq!(v.policy, None);
        assert_eq!(v.smallest(), (250, 1 << 30));

        let v = parse(
            &with(&[
                (VM_ID, Some("db-7")),
                (CPU_MODE, Some("hotplug")),
                (MEMORY, Some("virtio-mem:vm0")),
                (INFORMANT, None),
                (MIN_CUS, Some("2")),
                (POLICY, Some(r#"{"cpu_target": 0.5}"#)),
            ]),
            "ns/pg-1",
        )
        .unwrap();
        assert_eq!(v.id, "db-7");
        assert_eq!(v.cpu_mode, CpuMode::Hotplug);
        assert_eq!(v.memory, Memory::VirtioMem { device: "vm0".into() });
        assert_eq!(v.informant, None);
        assert_eq!(v.policy.as_ref().map(|p| p.cpu_target), Some(0.5));
        assert_eq!(v.smallest(), (500, 2 << 30));
    }

    #[test]
    fn memory_is_a_kubernetes_quantity_of_whole_mib() {
        for (q, want) in [("1Gi", 1 << 30), ("1536Mi", 3 << 29), ("1.5Gi", 3 << 29), ("1073741824", 1 << 30)]
        {
            let v = parse(&with(&[(CU_MEMORY_BYTES, Some(q))]), "ns/pg").unwrap();
            assert_eq!(v.cu_memory_bytes, want, "{q}");
        }
        let v = parse(&with(&[(MEMORY, Some("dimm:0.25Gi"))]), "ns/pg").unwrap();
        assert_eq!(v.memory, Memory::Dimm { dimm_bytes: 256 << 20 });
    }

    #[test]
    fn every_error_names_the_annotation_and_the_fix() {
        // (annotation changes to the good set, text the error must contain)
        type Case = (Vec<(&'static str, Option<&'static str>)>, &'static str);
        let cases: Vec<Case> = vec![
            (vec![(QMP, None)], "annotation vmscale.io/qmp is missing"),
            (vec![(QMP, Some(" "))], "vmscale.io/qmp=\" \" is empty"),
            (vec![(MAX_CUS, Some("lots"))], "vmscale.io/max-cus=\"lots\" is not a whole"),
            (vec![(MIN_CUS, Some("-1"))], "vmscale.io/min-cus=\"-1\" is not a whole"),
            (vec![(MIN_CUS, Some("0"))], "vmscale.io/min-cus=\"0\" must be at least 1"),
            (vec![(MIN_CUS, Some("9"))], "vmscale.io/max-cus=\"8\" is below vmscale.io/min-cus (9)"),
            (vec![(MAX_CUS, Some("4000000000"))], "beyond any machine"),
            (vec![(CU_MILLI_CPU, Some("0"))], "vmscale.io/cu-milli-cpu=\"0\" must be 1 to 64000"),
            (vec![(CU_MILLI_CPU, Some("250m"))], "vmscale.io/cu-milli-cpu=\"250m\" is not a whole"),
            (vec![(CU_MEMORY_BYTES, Some("1G"))], "1G is 1000000000 bytes, did you mean 1Gi?"),
            (vec![(CU_MEMORY_BYTES, Some("129e6"))], "did you mean 129e6i?"),
            (vec![(CU_MEMORY_BYTES, Some("1.5"))], "is not a quantity of whole bytes"),
            (vec![(CU_MEMORY_BYTES, Some("lots"))], "vmscale.io/cu-memory-bytes=\"lots\" is not a quantity"),
            (vec![(CU_MEMORY_BYTES, Some("0"))], "must be a positive whole number of MiB"),
            (vec![(CU_MEMORY_BYTES, Some("2Ti"))], "absurdly large"),
            (vec![(CPU_MODE, Some("kvm"))], "vmscale.io/cpu-mode=\"kvm\" must be"),
            (vec![(MEMORY, Some("balloon:1"))], "vmscale.io/memory=\"balloon:1\" must be"),
            (vec![(MEMORY, Some("dimm:lots"))], "vmscale.io/memory=\"dimm:lots\" the dimm size is not"),
            (vec![(MEMORY, Some("dimm:100Mi"))], "the dimm size must divide vmscale.io/cu-memory-bytes"),
            (vec![(MEMORY, Some("dimm:256M"))], "did you mean 256Mi?"),
            (vec![(MEMORY, Some("virtio-mem:"))], "names no virtio-mem device"),
            (vec![(MEMORY, Some("virtio-mem:vm0")), (CU_MEMORY_BYTES, Some("100Mi"))], "multiple of 128Mi"),
            (
                vec![(INFORMANT, Some("10.0.2.15:7080"))],
                "vmscale.io/informant=\"10.0.2.15:7080\" is not an address: has no scheme",
            ),
            (vec![(INFORMANT, Some("vsock://2:7072"))], "is not an address: has CID 2, the host itself"),
            (vec![(POLICY, Some("[1]"))], "vmscale.io/policy=\"[1]\" is not a JSON object"),
            (vec![(VM_ID, Some("a\u{7}b"))], "printable"),
            (vec![("vmscale.io/min-cu", Some("1"))], "annotation vmscale.io/min-cu is not one"),
        ];
        for (changes, want) in cases {
            let e = parse(&with(&changes), "ns/pg-1").unwrap_err();
            assert!(e.to_string().contains(want), "{changes:?}: {e} should contain {want}");
        }
    }

    #[test]
    fn default_id_is_checked_too() {
        let e = parse(&good(), "").unwrap_err();
        assert_eq!(e.kind(), "spec");
        assert_eq!(default_vm_id("db", "pg-0"), "db/pg-0");
    }
}
