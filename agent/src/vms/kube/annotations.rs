//! Pod -> [`VmSpec`]: which pods count, and the annotation contract, whose
//! keys, rules and parser are `vmscale_contract`'s (the scheduler extender
//! uses the same, so a pod it places is one this agent scales). Pure: no
//! client, no clock.

use super::sockets::PodSockets;
use super::Selector;
use crate::core::policy::Cu;
use crate::vms::{CpuMode, MemoryMode, VmSpec};
use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;
use vmscale_contract::annotations::{self as contract, default_vm_id};

pub use vmscale_contract::keys::{
    CPU_MODE, CU_MEMORY_BYTES, CU_MILLI_CPU, INFORMANT, MAX_CUS, MEMORY, MIN_CUS, POLICY, PREFIX, QMP, VM_ID,
};
pub use vmscale_contract::AnnotationError;

/// How one pod from the watch counts.
#[derive(Debug, Clone, PartialEq)]
pub enum PodVm {
    /// Not a VM for this agent now (the reason is for debug logs): not
    /// running, being deleted, or outside the selector.
    Ineligible(&'static str),
    /// Boxed: a spec is far larger than the other variants.
    Vm(Box<VmSpec>),
    Bad(AnnotationError),
}

/// `<namespace>/<name>`: how pods are named in logs and keyed in the table,
/// and a VM's id when its pod sets none.
pub fn pod_key(pod: &Pod) -> String {
    default_vm_id(pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or(""))
}

/// Classifies a pod. The API server already filters by label and node; they
/// are checked again because a VM on another node must never be scaled from
/// here, whatever a proxy or a selector mix-up lets through. Its QMP socket
/// is in its own directory under `sockets`.
pub fn pod_vm(pod: &Pod, sel: &Selector, sockets: &PodSockets) -> PodVm {
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
    let m = &pod.metadata;
    let at = PodAt {
        namespace: m.namespace.as_deref().unwrap_or(""),
        name: m.name.as_deref().unwrap_or(""),
        uid: m.uid.as_deref(),
        sockets,
    };
    match parse(annotations, &at) {
        Ok(spec) => PodVm::Vm(Box::new(spec)),
        Err(e) => PodVm::Bad(e),
    }
}

/// Which pod the annotations are of, and where this node keeps pods' sockets.
#[derive(Debug, Clone, Copy)]
pub struct PodAt<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: Option<&'a str>,
    pub sockets: &'a PodSockets,
}

/// Builds and validates a spec from a pod's annotations. The contract checks
/// the annotations, the policy's fields and the VM id (bound to the pod's
/// namespace) included; this builds the agent's own spec, whose QMP socket
/// is in the pod's own directory.
pub fn parse(a: &BTreeMap<String, String>, pod: &PodAt<'_>) -> Result<VmSpec, AnnotationError> {
    let vm = contract::parse(a, pod.namespace, pod.name)?;
    let qmp = pod
        .sockets
        .qmp(pod.uid, &vm.qmp_file)
        .map_err(|e| AnnotationError::Spec { reason: e.to_string() })?;
    let spec = VmSpec {
        id: vm.id,
        qmp: qmp.to_string_lossy().into_owned(),
        informant: vm.informant,
        cu: Cu { milli_cpu: vm.cu_milli_cpu, memory_bytes: vm.cu_memory_bytes },
        min_cus: vm.min_cus,
        max_cus: vm.max_cus,
        cpu_mode: match vm.cpu_mode {
            contract::CpuMode::Sysfs => CpuMode::Sysfs,
            contract::CpuMode::Hotplug => CpuMode::Hotplug,
        },
        memory: match vm.memory {
            contract::Memory::Dimm { dimm_bytes } => MemoryMode::Dimm { dimm_bytes },
            contract::Memory::VirtioMem { device } => MemoryMode::VirtioMem { device },
        },
        policy: vm.policy,
    };
    spec.validate().map_err(|reason| AnnotationError::Spec { reason })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> BTreeMap<String, String> {
        [
            (QMP, "qmp.sock"),
            (INFORMANT, "http://10.0.2.15:7080"),
            (CU_MILLI_CPU, "250"),
            (CU_MEMORY_BYTES, "1Gi"),
            (MIN_CUS, "1"),
            (MAX_CUS, "8"),
            (MEMORY, "dimm:256Mi"),
            ("vmscale.io/current-milli-cpu", "500"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn with(changes: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut a = good();
        for (k, v) in changes {
            a.insert((*k).to_owned(), (*v).to_owned());
        }
        a
    }

    const UID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    fn at(sockets: &PodSockets) -> PodAt<'_> {
        PodAt { namespace: "ns", name: "pg-1", uid: Some(UID), sockets }
    }

    #[test]
    fn good_annotations_give_a_spec() {
        let sockets = PodSockets::default();
        let s = parse(&good(), &at(&sockets)).unwrap();
        assert_eq!(s.id, "ns/pg-1");
        assert_eq!(s.qmp, format!("/pods/{UID}/volumes/kubernetes.io~empty-dir/vmscale/qmp.sock"));
        assert_eq!(s.cu, Cu { milli_cpu: 250, memory_bytes: 1 << 30 });
        assert_eq!((s.min_cus, s.max_cus), (1, 8));
        assert_eq!(s.cpu_mode, CpuMode::Sysfs);
        assert_eq!(s.memory, MemoryMode::Dimm { dimm_bytes: 256 << 20 });
        assert_eq!(s.informant.map(|a| a.to_string()).as_deref(), Some("http://10.0.2.15:7080"));
        assert_eq!(s.policy, None);

        let s = parse(
            &with(&[
                (VM_ID, "db-7"),
                (CPU_MODE, "hotplug"),
                (MEMORY, "virtio-mem:vm0"),
                (CU_MEMORY_BYTES, "1.5Gi"),
                (POLICY, r#"{"cpu_target": 0.5}"#),
            ]),
            &at(&sockets),
        )
        .unwrap();
        assert_eq!(s.id, "ns/db-7");
        assert_eq!(s.cu.memory_bytes, 3 << 29);
        assert_eq!(s.cpu_mode, CpuMode::Hotplug);
        assert_eq!(s.memory, MemoryMode::VirtioMem { device: "vm0".into() });
        assert_eq!(s.policy.map(|p| p.cpu_target), Some(0.5));
    }

    /// The contract's rules are tested in `vmscale_contract`; here, that
    /// its errors come through and the agent's own (the policy's fields).
    #[test]
    fn errors_name_the_annotation() {
        let cases = [
            (with(&[(CU_MEMORY_BYTES, "1G")]), "did you mean 1Gi?"),
            (with(&[(MIN_CUS, "0")]), "vmscale.io/min-cus=\"0\" must be at least 1"),
            (with(&[(POLICY, r#"{"colour": 1}"#)]), "vmscale.io/policy="),
            (with(&[(POLICY, r#"{"cpu_target": 2.0}"#)]), "policy: cpu_target"),
            (with(&[(QMP, "tcp:127.0.0.1:4444")]), "QMP over TCP is not allowed for pods"),
            (with(&[(QMP, "/var/run/vmscale/other/qmp.sock")]), "must be a file name"),
        ];
        let sockets = PodSockets::default();
        for (a, want) in cases {
            let e = parse(&a, &at(&sockets)).unwrap_err();
            assert!(e.to_string().contains(want), "{e} should contain {want}");
        }
        let no_uid = PodAt { uid: None, ..at(&sockets) };
        let e = parse(&good(), &no_uid).unwrap_err();
        assert!(e.to_string().contains("no UID"), "{e}");
        let bad_uid = PodAt { uid: Some("../../run"), ..at(&sockets) };
        let e = parse(&good(), &bad_uid).unwrap_err();
        assert!(e.to_string().contains("not a UUID"), "{e}");
    }
}
