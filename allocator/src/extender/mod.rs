//! The kube-scheduler extender (filter and prioritize): a new VM pod may
//! only land on a node whose ledger has room for its smallest size, and
//! nodes with more room left score higher. Pods that are not autoscaled VMs
//! pass through untouched. The wire types are kube-scheduler's
//! (`k8s.io/kube-scheduler/extender/v1`, Go field names as JSON keys);
//! [`http`] serves them.
//!
//! Only the `NodeNames` form is taken (the scheduler config in deploy/ sets
//! `nodeCacheCapable: true`): whole Node objects would make every call tens
//! of KiB per node for nothing the extender reads. Of the pod only its
//! metadata is read. The decisions here are pure, over a [`NodeRoom`] per
//! candidate that [`http`] copies from the ledger under its lock.
//!
//! Not covered: two VM pods placed in quick succession both see the room
//! as it was until their agents register them (the scheduler itself binds
//! one pod at a time, and an agent registers its VM within seconds).

pub mod http;

use crate::capacity::VmLabel;
use crate::core::ledger::NodeLedger;
use crate::core::units::Resources;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// The highest score an extender may give (kube-scheduler's `MaxExtenderPriority`).
pub const MAX_SCORE: i64 = 10;

/// `ExtenderArgs`: the pod and its candidate nodes by name.
#[derive(Debug, Clone, Deserialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod", alias = "pod")]
    pub pod: PodMeta,
    /// Whole Node objects (`nodeCacheCapable: false`): refused, so only
    /// looked at to see whether they were sent.
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub nodes: Option<serde::de::IgnoredAny>,
    #[serde(rename = "NodeNames", alias = "nodenames", default)]
    pub node_names: Option<Vec<String>>,
}

/// The part of a Pod the extender reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodMeta {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// Why an `ExtenderArgs` is not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error(
        "the extender takes candidate nodes as NodeNames only; set nodeCacheCapable: true in the \
         scheduler's extender config (deploy/scheduler/kube-scheduler-config.yaml)"
    )]
    WholeNodes,
}

/// `ExtenderFilterResult`, in the `NodeNames` form.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ExtenderFilterResult {
    #[serde(rename = "NodeNames")]
    pub node_names: Vec<String>,
    /// Nodes that do not fit now, and why (preemption could change that).
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    /// Nodes that cannot fit whatever is preempted, and why.
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable: BTreeMap<String, String>,
    #[serde(rename = "Error")]
    pub error: String,
}

/// One entry of `HostPriorityList`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

impl ExtenderArgs {
    /// The candidate node names, each once, in the order sent; an error
    /// when whole Node objects were sent instead.
    pub fn candidates(&self) -> Result<Vec<String>, ArgsError> {
        if self.nodes.is_some() {
            return Err(ArgsError::WholeNodes);
        }
        let mut seen = HashSet::new();
        let names = self.node_names.iter().flatten();
        Ok(names.filter(|n| seen.insert(n.as_str())).cloned().collect())
    }
}

/// What the extender needs of one node's ledger, copied under the lock so
/// that the decisions run after it is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRoom {
    pub connected: bool,
    pub free: Resources,
    pub usable: Resources,
}

impl NodeRoom {
    pub fn of(l: &NodeLedger) -> NodeRoom {
        NodeRoom { connected: l.session.is_some(), free: l.free(), usable: l.usable() }
    }
}

/// What a VM pod needs on its node to start: its smallest size.
/// `Ok(None)`: not an autoscaled VM. `Err`: its annotations are wrong, so
/// no node is right for it (the message says which). The annotations are
/// checked by the contract's one parser, the agent's too: a pod placed here
/// is never one the agent then refuses to scale.
pub fn demand(pod: &PodMeta, label: &VmLabel) -> Result<Option<Resources>, String> {
    let meta = &pod.metadata;
    if !label.matches(meta.labels.as_ref()) {
        return Ok(None);
    }
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let (namespace, name) = (meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""));
    let vm =
        vmscale_contract::parse(annotations, namespace, name).map_err(|e| format!("the VM pod's {e}"))?;
    let (milli_cpu, memory_bytes) = vm.smallest();
    let need = Resources::new(milli_cpu, memory_bytes);
    need.checked("the VM's smallest size").map(Some).map_err(|e| e.to_string())
}

/// Why `room` (None: unknown to the allocator) cannot take `need`; `None`
/// if it can.
pub fn misfit(room: Option<NodeRoom>, need: Resources) -> Option<String> {
    let Some(r) = room else {
        return Some("no vmscale agent has registered this node".into());
    };
    if !r.connected {
        return Some("the node's vmscale agent is not connected".into());
    }
    (!need.fits_in(r.free))
        .then(|| format!("the VM needs {need} and the node has {} free of {}", r.free, r.usable))
}

/// Filter: nodes with room pass; the rest are listed with the reason.
pub fn filter(
    pod: &PodMeta,
    names: Vec<String>,
    label: &VmLabel,
    room: impl Fn(&str) -> Option<NodeRoom>,
) -> ExtenderFilterResult {
    let mut out = ExtenderFilterResult::default();
    match demand(pod, label) {
        Ok(None) => out.node_names = names,
        Err(why) => out.failed_and_unresolvable = names.into_iter().map(|n| (n, why.clone())).collect(),
        Ok(Some(need)) => {
            for n in names {
                match misfit(room(&n), need) {
                    None => out.node_names.push(n),
                    Some(why) => drop(out.failed_nodes.insert(n, why)),
                }
            }
        }
    }
    out
}

/// Prioritize: the share of the node's usable room left after the VM
/// lands, in the tighter dimension, scaled to 0..=10. Pods that are not
/// VMs get 0 everywhere (no preference).
pub fn prioritize(
    pod: &PodMeta,
    names: Vec<String>,
    label: &VmLabel,
    room: impl Fn(&str) -> Option<NodeRoom>,
) -> Vec<HostPriority> {
    let need = demand(pod, label).ok().flatten();
    names
        .into_iter()
        .map(|host| {
            let score = match (need, room(&host)) {
                (Some(need), Some(r)) if misfit(Some(r), need).is_none() => score(r, need),
                _ => 0,
            };
            HostPriority { host, score }
        })
        .collect()
}

fn score(r: NodeRoom, need: Resources) -> i64 {
    let left = r.free.saturating_sub(need);
    let share = |left: u64, usable: u64| if usable == 0 { 0.0 } else { left as f64 / usable as f64 };
    let s = share(left.milli_cpu, r.usable.milli_cpu).min(share(left.memory_bytes, r.usable.memory_bytes));
    #[allow(clippy::cast_possible_truncation)] // s is a share in 0..=1: the score is in 0..=MAX_SCORE
    let score = (s * MAX_SCORE as f64).floor() as i64;
    score.clamp(0, MAX_SCORE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vmscale_contract::keys::{CU_MEMORY_BYTES, CU_MILLI_CPU, MAX_CUS, MEMORY, MIN_CUS, QMP};

    const GI: u64 = 1 << 30;

    fn label() -> VmLabel {
        VmLabel { key: "vmscale.io/autoscale".into(), value: "true".into() }
    }

    fn vm_pod(min_cus: &str) -> PodMeta {
        serde_json::from_value(json!({
            "metadata": {
                "name": "pg", "namespace": "db", "labels": {"vmscale.io/autoscale": "true"},
                "annotations": {
                    QMP: "qmp.sock", MEMORY: "dimm:256Mi",
                    CU_MILLI_CPU: "250", CU_MEMORY_BYTES: "1Gi", MIN_CUS: min_cus, MAX_CUS: "16",
                },
            },
            "spec": {"containers": [{"name": "qemu"}]},
        }))
        .unwrap()
    }

    fn ledger(cpu: u64, mem: u64, reserved: Option<(u64, u64)>, connected: bool) -> NodeLedger {
        let mut l = NodeLedger::new(Resources::new(cpu, mem), Resources::ZERO, 0.9);
        l.session = connected.then_some(1);
        if let Some((c, m)) = reserved {
            let reg = crate::core::vm::VmEntry {
                reserved: Resources::new(c, m),
                bounds: crate::core::vm::Bounds { min: Resources::new(250, GI), max: Resources::new(c, m) },
                cu: crate::core::units::ComputeUnit::new(Resources::new(250, GI)).unwrap(),
                unmet: Resources::ZERO,
                state: crate::core::vm::VmState::Active,
            };
            l.insert("other".into(), reg);
        }
        l
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn ledgers() -> BTreeMap<&'static str, NodeRoom> {
        BTreeMap::from([
            ("roomy", NodeRoom::of(&ledger(8000, 32 * GI, None, true))),
            ("half", NodeRoom::of(&ledger(8000, 32 * GI, Some((4000, 16 * GI)), true))),
            ("full", NodeRoom::of(&ledger(8000, 32 * GI, Some((7500, 31 * GI)), true))),
            ("away", NodeRoom::of(&ledger(8000, 32 * GI, None, false))),
        ])
    }

    #[test]
    fn demand_is_the_smallest_size() {
        assert_eq!(demand(&vm_pod("4"), &label()), Ok(Some(Resources::new(1000, 4 * GI))));
        let mut other = vm_pod("4");
        other.metadata.labels = None;
        assert_eq!(demand(&other, &label()), Ok(None));
        let e = demand(&vm_pod("four"), &label()).unwrap_err();
        assert!(e.contains("vmscale.io/min-cus=\"four\""), "{e}");
        // What the agent could not run is refused here too (the contract's rules).
        let e = demand(&vm_pod("0"), &label()).unwrap_err();
        assert!(e.contains("vmscale.io/min-cus=\"0\" must be at least 1"), "{e}");
        let mut decimal = vm_pod("4");
        decimal.metadata.annotations.as_mut().unwrap().insert(CU_MEMORY_BYTES.into(), "1G".into());
        let e = demand(&decimal, &label()).unwrap_err();
        assert!(e.contains("did you mean 1Gi?"), "{e}");
    }

    #[test]
    fn filter_keeps_nodes_with_room_and_says_why_not() {
        let l = ledgers();
        let r = filter(&vm_pod("4"), names(&["roomy", "half", "full", "away", "unknown"]), &label(), |n| {
            l.get(n).copied()
        });
        assert_eq!(r.node_names, vec!["roomy".to_owned(), "half".to_owned()]);
        assert!(r.failed_nodes["full"].contains("needs 1000"), "{:?}", r.failed_nodes);
        assert!(r.failed_nodes["away"].contains("not connected"));
        assert!(r.failed_nodes["unknown"].contains("no vmscale agent"));
        assert!(r.error.is_empty());
    }

    #[test]
    fn pods_that_are_not_vms_pass_and_bad_vm_pods_fit_nowhere() {
        let mut web = vm_pod("1");
        web.metadata.labels = None;
        let l = ledgers();
        let r = filter(&web, names(&["full", "unknown"]), &label(), |n| l.get(n).copied());
        assert_eq!(r.node_names, ["full", "unknown"]);
        let r = filter(&vm_pod("x"), names(&["roomy"]), &label(), |n| l.get(n).copied());
        assert_eq!(r.node_names, Vec::<String>::new());
        assert!(r.failed_and_unresolvable["roomy"].contains("min-cus"));
    }

    #[test]
    fn candidates_come_as_names_once_each_and_never_as_node_objects() {
        let args: ExtenderArgs =
            serde_json::from_value(json!({"Pod": {}, "Nodes": null, "NodeNames": ["b", "a", "b"]})).unwrap();
        assert_eq!(args.candidates(), Ok(names(&["b", "a"])));
        let args: ExtenderArgs =
            serde_json::from_value(json!({"Pod": {}, "Nodes": {"items": [{"metadata": {"name": "a"}}]}}))
                .unwrap();
        let e = args.candidates().unwrap_err();
        assert!(e.to_string().contains("nodeCacheCapable: true"), "{e}");
        let args: ExtenderArgs = serde_json::from_value(json!({"Pod": {}})).unwrap();
        assert_eq!(args.candidates(), Ok(vec![]));
    }

    #[test]
    fn prioritize_prefers_room_left() {
        let l = ledgers();
        let p = prioritize(&vm_pod("4"), names(&["roomy", "half", "full", "unknown"]), &label(), |n| {
            l.get(n).copied()
        });
        let scores: Vec<_> = p.iter().map(|h| (h.host.as_str(), h.score)).collect();
        // roomy: 7/8 of CPU and 28/32 of memory left -> 8; half: 3/8 -> 3.
        assert_eq!(scores, [("roomy", 8), ("half", 3), ("full", 0), ("unknown", 0)]);
    }
}
