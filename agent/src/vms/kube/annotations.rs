//! Pod -> [`VmSpec`]: which pods count, and the annotation contract (see the
//! table in the parent module). Pure: no client, no clock.

use super::Selector;
use crate::core::policy::{Cu, Policy};
use crate::vms::{CpuMode, MemoryMode, VmSpec};
use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;

/// Every key this agent reads or writes starts with this.
pub const PREFIX: &str = "vmscale.io/";

pub const VM_ID: &str = "vmscale.io/vm-id";
pub const QMP: &str = "vmscale.io/qmp";
pub const INFORMANT: &str = "vmscale.io/informant";
pub const CU_MILLI_CPU: &str = "vmscale.io/cu-milli-cpu";
pub const CU_MEMORY_BYTES: &str = "vmscale.io/cu-memory-bytes";
pub const MIN_CUS: &str = "vmscale.io/min-cus";
pub const MAX_CUS: &str = "vmscale.io/max-cus";
pub const CPU_MODE: &str = "vmscale.io/cpu-mode";
pub const MEMORY: &str = "vmscale.io/memory";
pub const POLICY: &str = "vmscale.io/policy";

/// The keys a pod's owner may set; any other `vmscale.io/` key that is not
/// one the agent writes is rejected, as `deny_unknown_fields` does for the
/// file source, so a typo (`min-cu`) is reported instead of silently ignored.
const SPEC_KEYS: [&str; 10] =
    [VM_ID, QMP, INFORMANT, CU_MILLI_CPU, CU_MEMORY_BYTES, MIN_CUS, MAX_CUS, CPU_MODE, MEMORY, POLICY];

/// Keys under these (after the prefix) belong to the agent's write-back; they
/// are ignored on read, also ones a newer agent may add.
const STATUS_KEY_STARTS: [&str; 3] = ["current-", "approved-", "updated-at"];

/// What the annotations of one eligible pod got wrong. Each message names the
/// annotation, so the pod's owner knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("annotation {key} is missing")]
    Missing { key: &'static str },
    #[error("annotation {key}={value:?} {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
    #[error("annotation {key} is not one this agent knows (a typo?)")]
    Unknown { key: String },
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

/// How one pod from the watch counts.
#[derive(Debug, Clone, PartialEq)]
pub enum PodVm {
    /// Not a VM for this agent now (the reason is for debug logs): not
    /// running, being deleted, or outside the selector.
    Ineligible(&'static str),
    Vm(VmSpec),
    Bad(AnnotationError),
}

/// `<namespace>/<name>`: how pods are named in logs and keyed in the table.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// Classifies a pod. The API server already filters by label and node; they
/// are checked again because a VM on another node must never be scaled from
/// here, whatever a proxy or a selector mix-up lets through.
pub fn pod_vm(pod: &Pod, sel: &Selector) -> PodVm {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodVm::Ineligible("being deleted");
    }
    if pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running") {
        return PodVm::Ineligible("not running");
    }
    let labelled = pod.metadata.labels.as_ref().and_then(|l| l.get(&sel.label_key)) == Some(&sel.label_value);
    if !labelled {
        return PodVm::Ineligible("without the selector label");
    }
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(sel.node_name.as_str()) {
        return PodVm::Ineligible("on another node");
    }
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    match parse(annotations, &pod_key(pod)) {
        Ok(spec) => PodVm::Vm(spec),
        Err(e) => PodVm::Bad(e),
    }
}

/// Builds and validates a spec from annotations; `default_id` is used when
/// `vmscale.io/vm-id` is absent.
pub fn parse(a: &BTreeMap<String, String>, default_id: &str) -> Result<VmSpec, AnnotationError> {
    if let Some(key) = a.keys().find(|k| is_unknown(k)) {
        return Err(AnnotationError::Unknown { key: key.clone() });
    }
    let min_cus: u32 = number(a, MIN_CUS)?;
    let max_cus: u32 = number(a, MAX_CUS)?;
    if min_cus == 0 {
        return Err(invalid(MIN_CUS, a, "must be at least 1"));
    }
    if max_cus < min_cus {
        return Err(invalid(MAX_CUS, a, &format!("is below {MIN_CUS} ({min_cus})")));
    }
    let cu = Cu { milli_cpu: number(a, CU_MILLI_CPU)?, memory_bytes: bytes(a, CU_MEMORY_BYTES)? };
    let cpu_mode = match optional(a, CPU_MODE)? {
        None | Some("sysfs") => CpuMode::Sysfs,
        Some("hotplug") => CpuMode::Hotplug,
        Some(_) => return Err(invalid(CPU_MODE, a, "must be `hotplug` or `sysfs`")),
    };
    let policy = match optional(a, POLICY)? {
        None => None,
        Some(json) => Some(
            serde_json::from_str::<Policy>(json)
                .map_err(|e| invalid(POLICY, a, &format!("is not a JSON policy object: {e}")))?,
        ),
    };
    let spec = VmSpec {
        id: optional(a, VM_ID)?.unwrap_or(default_id).to_owned(),
        qmp: required(a, QMP)?.to_owned(),
        informant: optional(a, INFORMANT)?.map(str::to_owned),
        cu,
        min_cus,
        max_cus,
        cpu_mode,
        memory: memory(a)?,
        policy,
    };
    spec.validate().map_err(|reason| AnnotationError::Spec { reason })?;
    Ok(spec)
}

fn is_unknown(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(PREFIX) else { return false };
    !SPEC_KEYS.contains(&key) && !STATUS_KEY_STARTS.iter().any(|s| rest.starts_with(s))
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

fn bytes(a: &BTreeMap<String, String>, key: &'static str) -> Result<u64, AnnotationError> {
    parse_bytes(required(a, key)?).ok_or_else(|| invalid(key, a, BYTES_HELP))
}

const BYTES_HELP: &str = "is not a byte count (a whole number, optionally with Ki, Mi, Gi or Ti)";

/// Bytes as a whole number, with an optional binary suffix as Kubernetes
/// quantities write them (`256Mi`), since that is how pod authors think of
/// memory. Decimal suffixes (`M`, `G`) are refused: mixing them up with the
/// binary ones is exactly the unit slip the design warns about.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let (digits, shift) = match s.len().checked_sub(2).and_then(|i| s.get(i..).map(|suffix| (i, suffix))) {
        Some((i, "Ki")) => (&s[..i], 10),
        Some((i, "Mi")) => (&s[..i], 20),
        Some((i, "Gi")) => (&s[..i], 30),
        Some((i, "Ti")) => (&s[..i], 40),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn memory(a: &BTreeMap<String, String>) -> Result<MemoryMode, AnnotationError> {
    let v = required(a, MEMORY)?;
    if let Some(size) = v.strip_prefix("dimm:") {
        let dimm_bytes =
            parse_bytes(size).ok_or_else(|| invalid(MEMORY, a, &format!("dimm size {BYTES_HELP}")))?;
        Ok(MemoryMode::Dimm { dimm_bytes })
    } else if let Some(device) = v.strip_prefix("virtio-mem:") {
        Ok(MemoryMode::VirtioMem { device: device.to_owned() })
    } else {
        Err(invalid(MEMORY, a, "must be `dimm:<bytes>` or `virtio-mem:<device id>`"))
    }
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
    fn good_annotations_give_a_spec() {
        let s = parse(&good(), "ns/pg-1").unwrap();
        assert_eq!(s.id, "ns/pg-1");
        assert_eq!(s.cu, Cu { milli_cpu: 250, memory_bytes: 1 << 30 });
        assert_eq!((s.min_cus, s.max_cus), (1, 8));
        assert_eq!(s.cpu_mode, CpuMode::Sysfs);
        assert_eq!(s.memory, MemoryMode::Dimm { dimm_bytes: 256 << 20 });
        assert_eq!(s.informant.as_deref(), Some("http://10.0.2.15:7080"));
        assert_eq!(s.policy, None);

        let s = parse(
            &with(&[
                (VM_ID, Some("db-7")),
                (CPU_MODE, Some("hotplug")),
                (MEMORY, Some("virtio-mem:vm0")),
                (INFORMANT, None),
                (POLICY, Some(r#"{"cpu_target": 0.5}"#)),
            ]),
            "ns/pg-1",
        )
        .unwrap();
        assert_eq!(s.id, "db-7");
        assert_eq!(s.cpu_mode, CpuMode::Hotplug);
        assert_eq!(s.memory, MemoryMode::VirtioMem { device: "vm0".into() });
        assert_eq!(s.informant, None);
        assert_eq!(s.policy.map(|p| p.cpu_target), Some(0.5));
    }

    #[test]
    fn every_error_names_the_annotation() {
        // (annotation changes to the good set, text the error must contain)
        type Case = (Vec<(&'static str, Option<&'static str>)>, &'static str);
        let cases: Vec<Case> = vec![
            (vec![(QMP, None)], "annotation vmscale.io/qmp is missing"),
            (vec![(QMP, Some(" "))], "vmscale.io/qmp=\" \" is empty"),
            (vec![(MAX_CUS, Some("lots"))], "vmscale.io/max-cus=\"lots\" is not a whole"),
            (vec![(MIN_CUS, Some("-1"))], "vmscale.io/min-cus"),
            (vec![(MIN_CUS, Some("0"))], "vmscale.io/min-cus=\"0\" must be at least 1"),
            (vec![(MIN_CUS, Some("9"))], "vmscale.io/max-cus=\"8\" is below vmscale.io/min-cus (9)"),
            (vec![(CU_MEMORY_BYTES, Some("1G"))], "vmscale.io/cu-memory-bytes=\"1G\" is not a byte count"),
            (vec![(CPU_MODE, Some("kvm"))], "vmscale.io/cpu-mode=\"kvm\" must be"),
            (vec![(MEMORY, Some("balloon:1"))], "vmscale.io/memory=\"balloon:1\" must be"),
            (vec![(MEMORY, Some("dimm:lots"))], "vmscale.io/memory=\"dimm:lots\" dimm size"),
            (vec![(POLICY, Some(r#"{"colour": 1}"#))], "vmscale.io/policy="),
            (vec![("vmscale.io/min-cu", Some("1"))], "annotation vmscale.io/min-cu is not one"),
            // Reached validate(): its message names the spec field.
            (vec![(MEMORY, Some("dimm:100Mi"))], "dimm_bytes"),
            (vec![(CU_MILLI_CPU, Some("0"))], "compute unit"),
            (vec![(POLICY, Some(r#"{"cpu_target": 2.0}"#))], "policy: cpu_target"),
        ];
        for (changes, want) in cases {
            let e = parse(&with(&changes), "ns/pg-1").unwrap_err();
            assert!(e.to_string().contains(want), "{changes:?}: {e} should contain {want}");
        }
    }

    #[test]
    fn bytes_accept_binary_suffixes_only() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("4Ki"), Some(4096));
        assert_eq!(parse_bytes("256Mi"), Some(256 << 20));
        assert_eq!(parse_bytes("2Gi"), Some(2 << 30));
        assert_eq!(parse_bytes("1Ti"), Some(1 << 40));
        for bad in ["", "Mi", "1M", "1.5Gi", "-1", "1 Gi", "99999999999Ti", "+1"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }
}
