//! The kube-scheduler extender (filter and prioritize): a new VM pod may
//! only land on a node whose ledger has room for its smallest size, and
//! nodes with more room left score higher. Pods that are not autoscaled VMs
//! pass through untouched. The wire types are kube-scheduler's
//! (`k8s.io/kube-scheduler/extender/v1`, Go field names as JSON keys);
//! [`http`] serves them.
//!
//! Not covered: two VM pods placed in quick succession both see the room
//! as it was until their agents register them (the scheduler itself binds
//! one pod at a time, and an agent registers its VM within seconds).

pub mod http;

use crate::capacity::VmLabel;
use crate::core::ledger::NodeLedger;
use crate::core::units::Resources;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::List;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use vmscale_contract::annotations::default_vm_id;

/// The highest score an extender may give (kube-scheduler's `MaxExtenderPriority`).
pub const MAX_SCORE: i64 = 10;

/// `ExtenderArgs`: the pod and its candidate nodes, as full objects
/// (`nodeCacheCapable: false`) or names (`true`).
#[derive(Debug, Clone, Deserialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod", alias = "pod")]
    pub pod: Pod,
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub nodes: Option<List<Node>>,
    #[serde(rename = "NodeNames", alias = "nodenames", default)]
    pub node_names: Option<Vec<String>>,
}

/// `ExtenderFilterResult`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ExtenderFilterResult {
    #[serde(rename = "Nodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<List<Node>>,
    #[serde(rename = "NodeNames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
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
    /// The candidate node names, from whichever form was sent.
    pub fn candidates(&self) -> Vec<String> {
        match (&self.node_names, &self.nodes) {
            (Some(names), _) => names.clone(),
            (None, Some(list)) => list.items.iter().filter_map(|n| n.metadata.name.clone()).collect(),
            (None, None) => Vec::new(),
        }
    }
}

/// What a VM pod needs on its node to start: its smallest size.
/// `Ok(None)`: not an autoscaled VM. `Err`: its annotations are wrong, so
/// no node is right for it (the message says which). The annotations are
/// checked by the contract's one parser, the agent's too: a pod placed here
/// is never one the agent then refuses to scale.
pub fn demand(pod: &Pod, label: &VmLabel) -> Result<Option<Resources>, String> {
    if !label.matches(pod.metadata.labels.as_ref()) {
        return Ok(None);
    }
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let meta = &pod.metadata;
    let id = default_vm_id(meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""));
    let vm = vmscale_contract::parse(annotations, &id).map_err(|e| format!("the VM pod's {e}"))?;
    let (milli_cpu, memory_bytes) = vm.smallest();
    let need = Resources::new(milli_cpu, memory_bytes);
    need.checked("the VM's smallest size").map(Some).map_err(|e| e.to_string())
}

/// Why `ledger` (None: unknown to the allocator) cannot take `need`; `None`
/// if it can.
pub fn misfit(ledger: Option<&NodeLedger>, need: Resources) -> Option<String> {
    let Some(l) = ledger else {
        return Some("no vmscale agent has registered this node".into());
    };
    if l.session.is_none() {
        return Some("the node's vmscale agent is not connected".into());
    }
    let free = l.free();
    (!need.fits_in(free))
        .then(|| format!("the VM needs {need} and the node has {free} free of {}", l.usable()))
}

/// Filter: nodes with room pass; the rest are listed with the reason.
pub fn filter<'a>(
    args: &ExtenderArgs,
    label: &VmLabel,
    ledger: impl Fn(&str) -> Option<&'a NodeLedger>,
) -> ExtenderFilterResult {
    let names = args.candidates();
    let mut out = ExtenderFilterResult::default();
    let passed: Vec<String> = match demand(&args.pod, label) {
        Ok(None) => names,
        Err(why) => {
            out.failed_and_unresolvable = names.into_iter().map(|n| (n, why.clone())).collect();
            Vec::new()
        }
        Ok(Some(need)) => {
            let mut passed = Vec::new();
            for n in names {
                match misfit(ledger(&n), need) {
                    None => passed.push(n),
                    Some(why) => drop(out.failed_nodes.insert(n, why)),
                }
            }
            passed
        }
    };
    match &args.nodes {
        Some(list) if args.node_names.is_none() => {
            let mut kept = list.clone();
            kept.items.retain(|n| n.metadata.name.as_ref().is_some_and(|name| passed.contains(name)));
            out.nodes = Some(kept);
        }
        _ => out.node_names = Some(passed),
    }
    out
}

/// Prioritize: the share of the node's usable room left after the VM
/// lands, in the tighter dimension, scaled to 0..=10. Pods that are not
/// VMs get 0 everywhere (no preference).
pub fn prioritize<'a>(
    args: &ExtenderArgs,
    label: &VmLabel,
    ledger: impl Fn(&str) -> Option<&'a NodeLedger>,
) -> Vec<HostPriority> {
    let need = demand(&args.pod, label).ok().flatten();
    args.candidates()
        .into_iter()
        .map(|host| {
            let score = match (need, ledger(&host)) {
                (Some(need), Some(l)) if misfit(Some(l), need).is_none() => score(l, need),
                _ => 0,
            };
            HostPriority { host, score }
        })
        .collect()
}

fn score(l: &NodeLedger, need: Resources) -> i64 {
    let usable = l.usable();
    let left = l.free().saturating_sub(need);
    let share = |left: u64, usable: u64| if usable == 0 { 0.0 } else { left as f64 / usable as f64 };
    let s = share(left.milli_cpu, usable.milli_cpu).min(share(left.memory_bytes, usable.memory_bytes));
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

    fn vm_pod(min_cus: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "pg", "namespace": "db", "labels": {"vmscale.io/autoscale": "true"},
                "annotations": {
                    QMP: "/run/vmscale/pg/qmp.sock", MEMORY: "dimm:256Mi",
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

    fn args(pod: Pod, names: &[&str]) -> ExtenderArgs {
        ExtenderArgs { pod, nodes: None, node_names: Some(names.iter().map(|s| (*s).to_owned()).collect()) }
    }

    fn ledgers() -> BTreeMap<&'static str, NodeLedger> {
        BTreeMap::from([
            ("roomy", ledger(8000, 32 * GI, None, true)),
            ("half", ledger(8000, 32 * GI, Some((4000, 16 * GI)), true)),
            ("full", ledger(8000, 32 * GI, Some((7500, 31 * GI)), true)),
            ("away", ledger(8000, 32 * GI, None, false)),
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
        let r =
            filter(&args(vm_pod("4"), &["roomy", "half", "full", "away", "unknown"]), &label(), |n| l.get(n));
        assert_eq!(r.node_names, Some(vec!["roomy".to_owned(), "half".to_owned()]));
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
        let r = filter(&args(web, &["full", "unknown"]), &label(), |n| l.get(n));
        assert_eq!(r.node_names.unwrap(), ["full", "unknown"]);
        let r = filter(&args(vm_pod("x"), &["roomy"]), &label(), |n| l.get(n));
        assert_eq!(r.node_names.unwrap(), Vec::<String>::new());
        assert!(r.failed_and_unresolvable["roomy"].contains("min-cus"));
    }

    #[test]
    fn prioritize_prefers_room_left() {
        let l = ledgers();
        let p = prioritize(&args(vm_pod("4"), &["roomy", "half", "full", "unknown"]), &label(), |n| l.get(n));
        let scores: Vec<_> = p.iter().map(|h| (h.host.as_str(), h.score)).collect();
        // roomy: 7/8 of CPU and 28/32 of memory left -> 8; half: 3/8 -> 3.
        assert_eq!(scores, [("roomy", 8), ("half", 3), ("full", 0), ("unknown", 0)]);
    }
}
