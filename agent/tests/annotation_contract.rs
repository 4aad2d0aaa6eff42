//! One pod, one verdict: the scheduler extender (which places a VM pod) and
//! the agent (which scales its VM) accept or refuse each pod alike, because
//! both read its annotations with `vmscale_contract`. Before, a pod with
//! `vmscale.io/cu-memory-bytes: 1G` was placed and then never scaled.
#![allow(clippy::expect_used)] // a test's setup failing is the test failing

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use vmscale_agent::vms::kube::annotations::{pod_vm, PodVm};
use vmscale_agent::vms::kube::sockets::PodSockets;
use vmscale_agent::vms::kube::Selector;
use vmscale_allocator::capacity::VmLabel;
use vmscale_allocator::extender::{demand, PodMeta};

const NODE: &str = "node-a";

/// A running VM pod on [`NODE`] with good annotations, changed by `changes`
/// (`None` removes the key).
fn pod(changes: &[(&str, Option<&str>)]) -> Pod {
    let mut annotations = json!({
        "vmscale.io/cu-milli-cpu": "250",
        "vmscale.io/cu-memory-bytes": "1Gi",
        "vmscale.io/min-cus": "1",
        "vmscale.io/max-cus": "8",
        "vmscale.io/memory": "dimm:256Mi",
    });
    for (k, v) in changes {
        match v {
            Some(v) => annotations[*k] = json!(v),
            None => drop(annotations.as_object_mut().map(|m| m.remove(*k))),
        }
    }
    serde_json::from_value(json!({
        "metadata": {
            "namespace": "db", "name": "pg-0", "uid": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
            "labels": {"vmscale.io/autoscale": "true"},
            "annotations": annotations,
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "qemu"}]},
        "status": {"phase": "Running"},
    }))
    .expect("a pod")
}

/// (extender accepts, agent accepts, the agent's reason if it refuses).
fn verdicts(p: &Pod) -> (bool, bool, String) {
    let placed = demand(&PodMeta { metadata: p.metadata.clone() }, &VmLabel::default());
    assert!(!matches!(placed, Ok(None)), "the extender must see a VM pod");
    let sel = Selector {
        node_name: NODE.into(),
        label_key: "vmscale.io/autoscale".into(),
        label_value: "true".into(),
    };
    let (scaled, why) = match pod_vm(p, &sel, &PodSockets::default()) {
        PodVm::Vm(_) => (true, String::new()),
        PodVm::Bad(e) => (false, e.to_string()),
        PodVm::Ineligible(why) => panic!("the agent must see a VM pod, not one {why}"),
    };
    (placed.is_ok(), scaled, why)
}

#[test]
fn extender_and_agent_accept_and_refuse_the_same_pods() {
    // (annotation changes, accepted by both)
    type Case = (Vec<(&'static str, Option<&'static str>)>, bool);
    let cases: Vec<Case> = vec![
        (vec![], true),
        (vec![("vmscale.io/cu-memory-bytes", Some("1.5Gi"))], true),
        (vec![("vmscale.io/cu-memory-bytes", Some("1073741824"))], true),
        (vec![("vmscale.io/memory", Some("virtio-mem:vm0"))], true),
        (vec![("vmscale.io/cpu-mode", Some("hotplug")), ("vmscale.io/vm-id", Some("pg"))], true),
        (vec![("vmscale.io/policy", Some(r#"{"cpu_target": 0.6}"#))], true),
        (vec![("vmscale.io/current-milli-cpu", Some("500"))], true),
        // 10^9 bytes: no guest hotplugs that; placed and then skipped before.
        (vec![("vmscale.io/cu-memory-bytes", Some("1G"))], false),
        (vec![("vmscale.io/cu-memory-bytes", Some("129e6"))], false),
        (vec![("vmscale.io/cu-memory-bytes", Some("500m"))], false),
        (vec![("vmscale.io/cu-memory-bytes", Some("lots"))], false),
        (vec![("vmscale.io/min-cus", Some("0"))], false),
        (vec![("vmscale.io/min-cus", Some("four"))], false),
        (vec![("vmscale.io/min-cus", Some("9"))], false),
        (vec![("vmscale.io/max-cus", Some("4000000000"))], false),
        (vec![("vmscale.io/cu-milli-cpu", Some("0"))], false),
        (vec![("vmscale.io/cu-milli-cpu", Some("0.25"))], false),
        // The QMP socket is in the pod's own directory: the pod names at
        // most the file, never a path or a TCP endpoint.
        (vec![("vmscale.io/qmp", Some("monitor.sock"))], true),
        (vec![("vmscale.io/qmp", Some("tcp:10.0.0.9:4444"))], false),
        (vec![("vmscale.io/qmp", Some("/var/run/vmscale/other-pod/qmp.sock"))], false),
        // VM ids are bound to the pod's namespace.
        (vec![("vmscale.io/vm-id", Some("other-ns/pg"))], false),
        // cpu_max_cgroup is the node's setting alone.
        (vec![("vmscale.io/policy", Some(r#"{"cpu_max_cgroup": true}"#))], false),
        (vec![("vmscale.io/memory", None)], false),
        (vec![("vmscale.io/memory", Some("dimm:100Mi"))], false),
        (
            vec![
                ("vmscale.io/memory", Some("virtio-mem:vm0")),
                ("vmscale.io/cu-memory-bytes", Some("100Mi")),
            ],
            false,
        ),
        (vec![("vmscale.io/cpu-mode", Some("kvm"))], false),
        (vec![("vmscale.io/vm-id", Some(" "))], false),
        (vec![("vmscale.io/policy", Some("[1]"))], false),
        // The policy's fields are the contract's too (contract/src/policy.rs):
        // a policy the agent could not run is refused by both.
        (vec![("vmscale.io/policy", Some(r#"{"cpu_target": 2.0}"#))], false),
        (vec![("vmscale.io/policy", Some(r#"{"colour": 1}"#))], false),
        (vec![("vmscale.io/policy", Some(r#"{"ignore_pressure": ["psi_cpu"]}"#))], true),
        (vec![("vmscale.io/policy", Some(r#"{"ignore_pressure": ["psi_cpuu"]}"#))], false),
        (vec![("vmscale.io/policy", Some(r#"{"polling": {"loop_interval_ms": 0}}"#))], false),
        (vec![("vmscale.io/min-cu", Some("1"))], false),
        (vec![("vmscale.io/cu-milli-cpu", Some("\u{0}garbage\u{7f}"))], false),
    ];
    for (changes, want) in cases {
        let (placed, scaled, why) = verdicts(&pod(&changes));
        assert_eq!(placed, scaled, "{changes:?}: extender {placed}, agent {scaled} ({why})");
        assert_eq!(placed, want, "{changes:?}: {why}");
    }
}
