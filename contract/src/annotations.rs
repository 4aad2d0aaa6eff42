//! A VM pod's annotations into [`VmAnnotations`], or the first thing wrong
//! with them, named so the pod's owner knows what to fix. Pure: a map in, a
//! value out.

use crate::informant_addr::InformantAddr;
use crate::keys::*;
use crate::policy::Policy;
use crate::quantity;
use crate::vm_id;
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
/// Longest `vmscale.io/qmp` file name: the socket's whole path must fit in
/// a unix socket address (107 bytes), under a directory the agent names.
pub const MAX_QMP_FILE_LEN: usize = 16;
/// The QMP socket's file name in the pod's socket directory when the pod
/// names none.
pub const DEFAULT_QMP_FILE: &str = "qmp.sock";

/// What a VM pod's annotations say, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VmAnnotations {
    /// `<namespace>/<vmscale.io/vm-id>`, or `<namespace>/<pod name>`
    /// ([`crate::vm_id::of_pod`]).
    pub id: String,
    /// The QMP socket's file name in the pod's socket directory, which the
    /// agent derives from the pod's UID (never a path or `tcp:`: the pod
    /// must not point the agent at another process's monitor).
    pub qmp_file: String,
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
    vm_id::of_pod(namespace, name)
}

/// Checks the annotations of pod `name` in `namespace`. Annotations outside
/// `vmscale.io/` are ignored.
pub fn parse(
    a: &BTreeMap<String, String>,
    namespace: &str,
    name: &str,
) -> Result<VmAnnotations, AnnotationError> {
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
        id: vm_id(a, namespace, name)?,
        qmp_file: qmp_file(a)?,
        informant: informant(a)?,
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
    let fields = match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
        Ok(fields) => fields,
        Err(e) => return Err(invalid(POLICY, a, &format!("is not a JSON object: {e}"))),
    };
    if let Some(f) = crate::policy::NODE_ONLY_FIELDS.iter().find(|f| fields.contains_key(**f)) {
        let reason = format!("sets {f}, which only the node's [policy] may set");
        return Err(invalid(POLICY, a, &reason));
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

/// The VM id of pod `name` in `namespace`, bound to the namespace: the pod
/// chooses at most the part after the `/` (`vmscale.io/vm-id`). The one
/// derivation: the agent registers its VM under it, and the allocator finds
/// a VM pod's VM in its ledger by it.
pub fn vm_id(a: &BTreeMap<String, String>, namespace: &str, name: &str) -> Result<String, AnnotationError> {
    let chosen = optional(a, VM_ID)?;
    if let Some(c) = chosen {
        if !vm_id::is_pod_chosen_name(c) {
            let reason = "must be letters, digits, `.`, `_` and `-` (the namespace is prepended, so no `/`)";
            return Err(invalid(VM_ID, a, reason));
        }
    }
    let id = vm_id::of_pod(namespace, chosen.unwrap_or(name));
    if let Err(e) = vm_id::check(&id) {
        return Err(match chosen {
            Some(_) => invalid(VM_ID, a, &format!("makes the vm id {id:?}, which is refused: {e}")),
            None => AnnotationError::Spec { reason: format!("the pod's vm id {id:?} is refused: {e}") },
        });
    }
    Ok(id)
}

/// `vmscale.io/informant`. A `vsock+unix` address names a host socket path
/// the agent would connect to as root: no pod may point it at one.
fn informant(a: &BTreeMap<String, String>) -> Result<Option<InformantAddr>, AnnotationError> {
    let Some(v) = optional(a, INFORMANT)? else { return Ok(None) };
    let addr = v
        .parse::<InformantAddr>()
        .map_err(|e| invalid(INFORMANT, a, &format!("is not an address: {}", e.reason)))?;
    if matches!(addr, InformantAddr::VsockUnix { .. }) {
        let reason =
            "names a host socket path, which a pod may not; use vsock://CID:PORT or https://HOST:PORT";
        return Err(invalid(INFORMANT, a, reason));
    }
    Ok(Some(addr))
}

/// `vmscale.io/qmp`: a file name in the pod's socket directory, no path and
/// no `tcp:`.
fn qmp_file(a: &BTreeMap<String, String>) -> Result<String, AnnotationError> {
    let Some(v) = optional(a, QMP)? else { return Ok(DEFAULT_QMP_FILE.to_owned()) };
    if v.starts_with("tcp:") {
        let reason = "is refused: QMP over TCP is not allowed for pods; have QEMU listen on a unix socket \
                      in the pod's socket directory (`-qmp unix:<dir>/qmp.sock,server=on,wait=off`)";
        return Err(invalid(QMP, a, reason));
    }
    let plain = !v.starts_with('.') && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !plain || v.len() > MAX_QMP_FILE_LEN {
        let reason = format!(
            "must be a file name in the pod's socket directory (letters, digits, `.`, `_`, `-`, at most \
             {MAX_QMP_FILE_LEN} bytes, no `/`); default {DEFAULT_QMP_FILE}"
        );
        return Err(invalid(QMP, a, &reason));
    }
    Ok(v.to_owned())
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
            (QMP, "monitor.sock"),
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
        let v = parse(&good(), "ns", "pg-1").unwrap();
        assert_eq!(v.id, "ns/pg-1");
        assert_eq!(v.qmp_file, "monitor.sock");
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
                (QMP, None),
            ]),
            "ns",
            "pg-1",
        )
        .unwrap();
        assert_eq!(v.id, "ns/db-7", "bound to the pod's namespace");
        assert_eq!(v.qmp_file, DEFAULT_QMP_FILE);
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
            let v = parse(&with(&[(CU_MEMORY_BYTES, Some(q))]), "ns", "pg").unwrap();
            assert_eq!(v.cu_memory_bytes, want, "{q}");
        }
        let v = parse(&with(&[(MEMORY, Some("dimm:0.25Gi"))]), "ns", "pg").unwrap();
        assert_eq!(v.memory, Memory::Dimm { dimm_bytes: 256 << 20 });
    }

    #[test]
    fn every_error_names_the_annotation_and_the_fix() {
        // (annotation changes to the good set, text the error must contain)
        type Case = (Vec<(&'static str, Option<&'static str>)>, &'static str);
        let cases: Vec<Case> = vec![
            (vec![(QMP, Some(" "))], "vmscale.io/qmp=\" \" is empty"),
            (vec![(QMP, Some("tcp:10.0.0.1:4444"))], "QMP over TCP is not allowed for pods"),
            (
                vec![(QMP, Some("/run/other-vm/qmp.sock"))],
                "must be a file name in the pod's socket directory",
            ),
            (vec![(QMP, Some("../qmp.sock"))], "must be a file name"),
            (vec![(QMP, Some(".."))], "must be a file name"),
            (vec![(VM_ID, Some("other-ns/db"))], "vmscale.io/vm-id=\"other-ns/db\" must be letters"),
            (vec![(POLICY, Some(r#"{"cpu_max_cgroup": true}"#))], "sets cpu_max_cgroup, which only the node"),
            (vec![(POLICY, Some(r#"{"cpu_max_cgroup": false}"#))], "only the node's [policy] may set"),
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
            (vec![(INFORMANT, Some("vsock+unix:///run/other/vsock.sock:7072"))], "names a host socket path"),
            (vec![(POLICY, Some("[1]"))], "vmscale.io/policy=\"[1]\" is not a JSON object"),
            (vec![(VM_ID, Some("a\u{7}b"))], "must be letters"),
            (vec![("vmscale.io/min-cu", Some("1"))], "annotation vmscale.io/min-cu is not one"),
        ];
        for (changes, want) in cases {
            let e = parse(&with(&changes), "ns", "pg-1").unwrap_err();
            assert!(e.to_string().contains(want), "{changes:?}: {e} should contain {want}");
        }
        // 250 bytes chosen, 253 with the namespace: one too many.
        let long = "a".repeat(250);
        let e = parse(&with(&[(VM_ID, Some(&long))]), "ns4", "pg-1").unwrap_err();
        assert!(e.to_string().contains("254 bytes long; at most 253"), "{e}");
    }

    #[test]
    fn default_id_is_checked_too() {
        let e = parse(&good(), "ns", &".".repeat(80)).unwrap_err();
        assert_eq!(e.kind(), "spec");
        assert!(e.to_string().contains("file name"), "{e}");
        assert_eq!(default_vm_id("db", "pg-0"), "db/pg-0");
    }
}
