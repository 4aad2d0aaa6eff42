//! Node capacity from the cluster (Kubernetes mode): what a node can give
//! to autoscaled VMs is its Node's allocatable CPU and memory less what the
//! pods that are not autoscaled VMs request there (kube-scheduler's own
//! sum: the containers' requests, or the largest init container's if more,
//! plus the pod overhead). A VM pod (the contract's label) is left out only
//! while its VM is in the node's ledger, which counts the VM's reservation
//! already: a label alone would let any pod on the node go uncounted.
//!
//! [`CapacityTable`] folds watcher events purely; [`watch`] feeds it from the
//! API server and hands each change to the ledger.

pub mod watch;

use crate::core::units::Resources;
use k8s_openapi::api::core::v1::{Node, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::watcher::Event;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use vmscale_contract::quantity;

/// Which pods are autoscaled VMs (left out of the sum): the contract's label.
pub use vmscale_contract::VmLabel;

/// A pod as the sum needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counted {
    node: String,
    requests: Resources,
    /// A labelled pod's VM id (`vmscale_contract::annotations::vm_id`):
    /// its requests are left out while that VM is in the node's ledger.
    vm: Option<String>,
}

/// Folds the Node and Pod watches into per-node capacities.
#[derive(Debug, Clone)]
pub struct CapacityTable {
    label: VmLabel,
    nodes: BTreeMap<String, Resources>,
    pods: BTreeMap<String, Counted>,
    /// Objects listed since a watcher's `Init`, swapped in at `InitDone` so a
    /// re-list never shows a half-empty cluster.
    node_relist: Option<BTreeMap<String, Resources>>,
    pod_relist: Option<BTreeMap<String, Counted>>,
    /// Each Node's first InternalIP, for migration endpoints
    /// (`migration_port`); a Node without one has none.
    ips: BTreeMap<String, IpAddr>,
    ip_relist: Option<BTreeMap<String, IpAddr>>,
}

impl CapacityTable {
    pub fn new(label: VmLabel) -> Self {
        CapacityTable {
            label,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            node_relist: None,
            pod_relist: None,
            ips: BTreeMap::new(),
            ip_relist: None,
        }
    }

    pub fn apply_node(&mut self, e: Event<Node>) {
        fold(e.clone(), &mut self.ips, &mut self.ip_relist, |n| {
            Some((n.metadata.name.clone()?, internal_ip(n)?))
        });
        fold(e, &mut self.nodes, &mut self.node_relist, |n| {
            let name = n.metadata.name.clone()?;
            Some((name, allocatable(n)))
        });
    }

    pub fn apply_pod(&mut self, e: Event<Pod>) {
        let label = self.label.clone();
        fold(e, &mut self.pods, &mut self.pod_relist, |p| {
            let key = format!("{}/{}", p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?);
            Some((key, counted(p, &label)?))
        });
    }

    /// Every known Node's InternalIP (see `migration_port` in the config).
    pub fn internal_ips(&self) -> &BTreeMap<String, IpAddr> {
        &self.ips
    }

    /// Every known node's capacity for VMs, never below zero. `in_ledger`
    /// says whether the VM of a labelled pod is in its node's ledger, as
    /// `(node, vm id)` pairs (see [`Self::vm_pods`]).
    pub fn capacities(&self, in_ledger: &BTreeSet<(String, String)>) -> BTreeMap<String, Resources> {
        let mut out = self.nodes.clone();
        for p in self.pods.values() {
            let ledgered = p.vm.as_ref().is_some_and(|vm| in_ledger.contains(&(p.node.clone(), vm.clone())));
            if ledgered {
                continue;
            }
            if let Some(c) = out.get_mut(&p.node) {
                *c = c.saturating_sub(p.requests);
            }
        }
        out
    }

    /// The `(node, vm id)` of every labelled pod: what the shell looks up in
    /// the ledger for [`Self::capacities`].
    pub fn vm_pods(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pods.values().filter_map(|p| p.vm.as_deref().map(|vm| (p.node.as_str(), vm)))
    }
}

/// Applies one watcher event to `live`; `entry` gives an object's key and
/// value, or `None` when the object does not count (then it is removed).
fn fold<K, V>(
    e: Event<K>,
    live: &mut BTreeMap<String, V>,
    relist: &mut Option<BTreeMap<String, V>>,
    entry: impl Fn(&K) -> Option<(String, V)>,
) where
    K: kube::Resource,
{
    let key_of = |o: &K| {
        let m = o.meta();
        match &m.namespace {
            Some(ns) => format!("{ns}/{}", m.name.as_deref().unwrap_or("")),
            None => m.name.clone().unwrap_or_default(),
        }
    };
    match e {
        Event::Apply(o) => match entry(&o) {
            Some((k, v)) => drop(live.insert(k, v)),
            None => drop(live.remove(&key_of(&o))),
        },
        Event::Delete(o) => drop(live.remove(&key_of(&o))),
        Event::Init => *relist = Some(BTreeMap::new()),
        Event::InitApply(o) => {
            if let Some((k, v)) = entry(&o) {
                relist.get_or_insert_with(BTreeMap::new).insert(k, v);
            }
        }
        Event::InitDone => *live = relist.take().unwrap_or_default(),
    }
}

fn quantity(map: Option<&BTreeMap<String, Quantity>>, key: &str, parse: fn(&str) -> Option<u64>) -> u64 {
    // An unparsable quantity was rejected by the API server's validation;
    // counting it as zero is the only reading left.
    map.and_then(|m| m.get(key)).and_then(|q| parse(&q.0)).unwrap_or(0)
}

fn resources(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
    Resources::new(quantity(map, "cpu", quantity::milli_cpu), quantity(map, "memory", quantity::bytes))
}

/// The Node's first InternalIP address, as kubelet reports it.
fn internal_ip(n: &Node) -> Option<IpAddr> {
    let addresses = n.status.as_ref()?.addresses.as_ref()?;
    addresses.iter().filter(|a| a.type_ == "InternalIP").find_map(|a| a.address.parse().ok())
}

fn allocatable(n: &Node) -> Resources {
    resources(n.status.as_ref().and_then(|s| s.allocatable.as_ref()))
}

fn requests(r: Option<&ResourceRequirements>) -> Resources {
    resources(r.and_then(|r| r.requests.as_ref()))
}

/// A pod's requests on its node, if it counts: bound to a node and not
/// finished. A labelled pod carries its VM id, if its annotations give one.
fn counted(p: &Pod, label: &VmLabel) -> Option<Counted> {
    let spec = p.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let vm = label.matches(p.metadata.labels.as_ref()).then(|| vm_of(p)).flatten();
    let sum = spec
        .containers
        .iter()
        .fold(Resources::ZERO, |acc, c| acc.saturating_add(requests(c.resources.as_ref())));
    let init = spec.init_containers.iter().flatten().fold(Resources::ZERO, |acc, c| {
        let r = requests(c.resources.as_ref());
        Resources::new(acc.milli_cpu.max(r.milli_cpu), acc.memory_bytes.max(r.memory_bytes))
    });
    let total = Resources::new(sum.milli_cpu.max(init.milli_cpu), sum.memory_bytes.max(init.memory_bytes))
        .saturating_add(resources(spec.overhead.as_ref()));
    Some(Counted { node, requests: total, vm })
}

/// The VM id a labelled pod's VM is registered under, if its annotations
/// give a valid one (else the agent scales no VM for it).
fn vm_of(p: &Pod) -> Option<String> {
    let m = &p.metadata;
    let empty = BTreeMap::new();
    let a = m.annotations.as_ref().unwrap_or(&empty);
    vmscale_contract::annotations::vm_id(a, m.namespace.as_deref()?, m.name.as_deref()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpu: &str, mem: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "110"}},
        }))
        .unwrap()
    }

    fn pod(name: &str, node: &str, vm: bool, containers: &[(&str, &str)]) -> Pod {
        let cs: Vec<_> = containers
            .iter()
            .enumerate()
            .map(|(i, (c, m))| json!({"name": format!("c{i}"), "resources": {"requests": {"cpu": c, "memory": m}}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name, "labels": if vm { json!({"vmscale.io/autoscale": "true"}) } else { json!({}) }},
            "spec": {"nodeName": node, "containers": cs},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn table() -> CapacityTable {
        CapacityTable::new(VmLabel { key: "vmscale.io/autoscale".into(), value: "true".into() })
    }

    /// Nothing in the ledger.
    fn none() -> BTreeSet<(String, String)> {
        BTreeSet::new()
    }

    fn ledger(entries: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        entries.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn allocatable_less_the_requests_of_other_pods() {
        let mut t = table();
        t.apply_node(Event::Apply(node("a", "8", "32Gi")));
        t.apply_node(Event::Apply(node("b", "3500m", "16Gi")));
        t.apply_pod(Event::Apply(pod("web", "a", false, &[("500m", "1Gi"), ("250m", "512Mi")])));
        t.apply_pod(Event::Apply(pod("vm", "a", true, &[("4", "8Gi")])));
        t.apply_pod(Event::Apply(pod("huge", "b", false, &[("16", "64Gi")])));
        let c = t.capacities(&ledger(&[("a", "ns/vm")]));
        assert_eq!(c["a"], Resources::new(7250, 32 * GI - GI - GI / 2));
        assert_eq!(c["b"], Resources::ZERO, "never below zero");
        t.apply_pod(Event::Delete(pod("huge", "b", false, &[])));
        assert_eq!(t.capacities(&none())["b"], Resources::new(3500, 16 * GI));
    }

    /// Before, the label alone left a pod out: any pod could carry it and
    /// take a node's capacity unseen.
    #[test]
    fn a_labelled_pod_is_left_out_only_while_its_vm_is_in_the_nodes_ledger() {
        let mut t = table();
        t.apply_node(Event::Apply(node("a", "8", "32Gi")));
        t.apply_pod(Event::Apply(pod("vm", "a", true, &[("4", "8Gi")])));
        let counted = Resources::new(4000, 24 * GI);
        assert_eq!(t.capacities(&none())["a"], counted, "no VM in the ledger: the pod counts");
        assert_eq!(t.capacities(&ledger(&[("b", "ns/vm")]))["a"], counted, "its VM is on another node");
        assert_eq!(t.capacities(&ledger(&[("a", "ns/vm")]))["a"], Resources::new(8000, 32 * GI));
        assert_eq!(t.vm_pods().collect::<Vec<_>>(), [("a", "ns/vm")]);
        // The VM id is the agent's: the namespace and vmscale.io/vm-id.
        let mut named = pod("vm2", "a", true, &[("1", "1Gi")]);
        named.metadata.annotations = Some(BTreeMap::from([("vmscale.io/vm-id".into(), "db".into())]));
        t.apply_pod(Event::Apply(named));
        assert!(t.vm_pods().any(|p| p == ("a", "ns/db")));
        // An id the agent would refuse names no VM: the pod counts.
        let mut bad = pod("vm3", "a", true, &[("1", "1Gi")]);
        bad.metadata.annotations = Some(BTreeMap::from([("vmscale.io/vm-id".into(), "other/db".into())]));
        t.apply_pod(Event::Apply(bad));
        assert_eq!(t.vm_pods().count(), 2);
    }

    #[test]
    fn init_containers_and_overhead_count_as_the_scheduler_counts_them() {
        let mut p = pod("p", "a", false, &[("100m", "100Mi"), ("100m", "100Mi")]);
        let spec = p.spec.as_mut().unwrap();
        spec.init_containers = Some(vec![serde_json::from_value(
            json!({"name": "init", "resources": {"requests": {"cpu": "1", "memory": "50Mi"}}}),
        )
        .unwrap()]);
        spec.overhead = Some(BTreeMap::from([("cpu".into(), Quantity("50m".into()))]));
        let label = VmLabel { key: "k".into(), value: "v".into() };
        assert_eq!(counted(&p, &label).unwrap().requests, Resources::new(1050, 200 << 20));
        assert_eq!(counted(&p, &label).unwrap().vm, None, "not labelled: no VM");
    }

    #[test]
    fn finished_and_unbound_pods_do_not_count_and_a_finishing_pod_stops_counting() {
        let mut t = table();
        t.apply_node(Event::Apply(node("a", "4", "8Gi")));
        let mut p = pod("job", "a", false, &[("1", "1Gi")]);
        t.apply_pod(Event::Apply(p.clone()));
        assert_eq!(t.capacities(&none())["a"], Resources::new(3000, 7 * GI));
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        t.apply_pod(Event::Apply(p));
        assert_eq!(t.capacities(&none())["a"], Resources::new(4000, 8 * GI));
        let mut pending = pod("pending", "a", false, &[("1", "1Gi")]);
        pending.spec.as_mut().unwrap().node_name = None;
        t.apply_pod(Event::Apply(pending));
        assert_eq!(t.capacities(&none())["a"], Resources::new(4000, 8 * GI));
    }

    #[test]
    fn nodes_internal_ips_follow_the_watch() {
        let with_ips = |name: &str, addresses: serde_json::Value| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {"allocatable": {"cpu": "4", "memory": "8Gi"}, "addresses": addresses},
            }))
            .unwrap()
        };
        let mut t = table();
        t.apply_node(Event::Apply(with_ips(
            "a",
            json!([{"type": "Hostname", "address": "a"}, {"type": "InternalIP", "address": "10.0.0.1"}]),
        )));
        t.apply_node(Event::Apply(with_ips("b", json!([{"type": "InternalIP", "address": "not an ip"}]))));
        t.apply_node(Event::Apply(with_ips("c", json!([{"type": "InternalIP", "address": "fd00::3"}]))));
        let ips: Vec<_> = t.internal_ips().iter().map(|(n, ip)| (n.as_str(), ip.to_string())).collect();
        assert_eq!(ips, [("a", "10.0.0.1".to_owned()), ("c", "fd00::3".to_owned())]);
        t.apply_node(Event::Delete(with_ips("a", json!([]))));
        assert_eq!(t.internal_ips().len(), 1);
    }

    #[test]
    fn a_relist_replaces_everything_at_once() {
        let mut t = table();
        t.apply_node(Event::Apply(node("a", "4", "8Gi")));
        t.apply_node(Event::Apply(node("gone", "4", "8Gi")));
        t.apply_node(Event::Init);
        t.apply_node(Event::InitApply(node("a", "2", "8Gi")));
        assert_eq!(t.capacities(&none()).len(), 2, "the old set stays until the list is done");
        t.apply_node(Event::InitDone);
        assert_eq!(t.capacities(&none()), BTreeMap::from([("a".into(), Resources::new(2000, 8 * GI))]));
    }
}
