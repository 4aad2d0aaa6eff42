//! The desired VM set, folded from watcher events. Pure: the source task
//! feeds it events and acts on what it returns (publish, log, count).

use super::annotations::{pod_key, pod_vm, AnnotationError, PodVm};
use super::{PodRef, Selector};
use crate::vms::VmSpec;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use std::collections::{BTreeMap, BTreeSet};

/// Why a pod that looks like ours is not (or no longer exactly) scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    /// `<namespace>/<name>`.
    pub pod: String,
    pub reason: SkipReason,
    /// The VM keeps the spec its pod last had good annotations for, so a typo
    /// in a running pod never stops its VM's loop (as the file source does).
    pub kept_last_good: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SkipReason {
    Annotations(AnnotationError),
    /// Another pod (named here) already claims this VM id.
    DuplicateId {
        id: String,
        owner: String,
    },
}

impl SkipReason {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SkipReason::Annotations(e) => e.kind(),
            SkipReason::DuplicateId { .. } => "duplicate_id",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::Annotations(e) => e.fmt(f),
            SkipReason::DuplicateId { id, owner } => {
                write!(f, "vm id {id} is already claimed by pod {owner}")
            }
        }
    }
}

/// What one event changed.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// The VM set (or the id -> pod map) differs from the last one returned.
    pub changed: bool,
    /// Problems new with this event; a pod that stays broken the same way is
    /// reported once, not on every update of it (our own status patches
    /// update pods all the time).
    pub skips: Vec<Skip>,
}

#[derive(Debug, Clone)]
struct Entry {
    pod: PodRef,
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    Ineligible,
    Good(VmSpec),
    Bad { error: AnnotationError, last_good: Option<VmSpec> },
}

impl Entry {
    fn spec(&self) -> Option<&VmSpec> {
        match &self.state {
            State::Ineligible => None,
            State::Good(s) => Some(s),
            State::Bad { last_good, .. } => last_good.as_ref(),
        }
    }
}

#[derive(Debug)]
pub struct PodTable {
    sel: Selector,
    live: BTreeMap<String, Entry>,
    /// Pods listed since the watcher's `Init`, swapped in whole at `InitDone`
    /// so a re-list never publishes a half-empty set.
    relist: Option<BTreeMap<String, Entry>>,
    specs: Vec<VmSpec>,
    pods: BTreeMap<String, PodRef>,
    duplicates: BTreeSet<String>,
}

impl PodTable {
    pub fn new(sel: Selector) -> Self {
        PodTable {
            sel,
            live: BTreeMap::new(),
            relist: None,
            specs: Vec::new(),
            pods: BTreeMap::new(),
            duplicates: BTreeSet::new(),
        }
    }

    /// The VM set, sorted by id.
    pub fn specs(&self) -> &[VmSpec] {
        &self.specs
    }

    /// VM id -> its pod, for writing status back.
    pub fn pods(&self) -> &BTreeMap<String, PodRef> {
        &self.pods
    }

    pub fn apply(&mut self, event: Event<Pod>) -> Applied {
        let mut skips = Vec::new();
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                return Applied::default();
            }
            Event::InitApply(pod) => {
                let key = pod_key(&pod);
                // Compare with what the live set knew, so an unchanged broken
                // pod is not reported again on every re-list.
                let entry = self.entry(&pod, self.live.get(&key), &mut skips);
                self.relist.get_or_insert_with(BTreeMap::new).insert(key, entry);
                return Applied { changed: false, skips };
            }
            Event::InitDone => self.live = self.relist.take().unwrap_or_default(),
            Event::Apply(pod) => {
                let key = pod_key(&pod);
                let entry = self.entry(&pod, self.live.get(&key), &mut skips);
                self.live.insert(key, entry);
            }
            Event::Delete(pod) => {
                self.live.remove(&pod_key(&pod));
            }
        }
        let changed = self.rebuild(&mut skips);
        Applied { changed, skips }
    }

    fn entry(&self, pod: &Pod, prev: Option<&Entry>, skips: &mut Vec<Skip>) -> Entry {
        let key = pod_key(pod);
        let pod_ref = PodRef {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone(),
        };
        // A pod re-created under the same name is a new VM: nothing carries over.
        let prev = prev.filter(|p| p.pod.uid == pod_ref.uid);
        let state = match pod_vm(pod, &self.sel) {
            PodVm::Ineligible(why) => {
                tracing::debug!(pod = %key, "pod left out: {why}");
                State::Ineligible
            }
            PodVm::Vm(spec) => State::Good(*spec),
            PodVm::Bad(error) => {
                let last_good = prev.and_then(Entry::spec).cloned();
                let known =
                    matches!(prev, Some(Entry { state: State::Bad { error: e, .. }, .. }) if *e == error);
                if !known {
                    skips.push(Skip {
                        pod: key,
                        reason: SkipReason::Annotations(error.clone()),
                        kept_last_good: last_good.is_some(),
                    });
                }
                State::Bad { error, last_good }
            }
        };
        Entry { pod: pod_ref, state }
    }

    /// Recomputes the published set; true if it changed.
    fn rebuild(&mut self, skips: &mut Vec<Skip>) -> bool {
        let mut specs: BTreeMap<String, VmSpec> = BTreeMap::new();
        let mut pods = BTreeMap::new();
        let mut duplicates = BTreeSet::new();
        // Pod keys are visited in order, so the same pod wins a duplicate id
        // every time, whatever order the events came in.
        for (key, entry) in &self.live {
            let Some(spec) = entry.spec() else { continue };
            if let Some(owner) = pods.get(&spec.id).map(|p: &PodRef| p.key()) {
                if !self.duplicates.contains(key) {
                    skips.push(Skip {
                        pod: key.clone(),
                        reason: SkipReason::DuplicateId { id: spec.id.clone(), owner },
                        kept_last_good: false,
                    });
                }
                duplicates.insert(key.clone());
                continue;
            }
            pods.insert(spec.id.clone(), entry.pod.clone());
            specs.insert(spec.id.clone(), spec.clone());
        }
        let specs: Vec<VmSpec> = specs.into_values().collect();
        self.duplicates = duplicates;
        let changed = specs != self.specs || pods != self.pods;
        self.specs = specs;
        self.pods = pods;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vms::kube::annotations::{MAX_CUS, VM_ID};

    fn sel() -> Selector {
        Selector {
            node_name: "node-a".into(),
            label_key: "vmscale.io/autoscale".into(),
            label_value: "true".into(),
        }
    }

    fn pod(name: &str, uid: &str, extra: &[(&str, &str)]) -> Pod {
        let mut annotations = serde_json::json!({
            "vmscale.io/qmp": format!("/run/{name}.qmp"),
            "vmscale.io/cu-milli-cpu": "250",
            "vmscale.io/cu-memory-bytes": "1Gi",
            "vmscale.io/min-cus": "1",
            "vmscale.io/max-cus": "4",
            "vmscale.io/memory": "virtio-mem:vm0",
        });
        for (k, v) in extra {
            annotations[*k] = serde_json::Value::from(*v);
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "namespace": "ns", "name": name, "uid": uid,
                "labels": {"vmscale.io/autoscale": "true"},
                "annotations": annotations,
            },
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn ids(t: &PodTable) -> Vec<(&str, u32)> {
        t.specs().iter().map(|s| (s.id.as_str(), s.max_cus)).collect()
    }

    #[test]
    fn eligibility() {
        let mut p = pod("a", "u1", &[]);
        assert!(matches!(pod_vm(&p, &sel()), PodVm::Vm(_)));
        p.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(pod_vm(&p, &sel()), PodVm::Ineligible("not running"));
        let mut p = pod("a", "u1", &[]);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(pod_vm(&p, &sel()), PodVm::Ineligible("being deleted"));
        let mut p = pod("a", "u1", &[]);
        p.metadata.labels.as_mut().unwrap().insert("vmscale.io/autoscale".into(), "false".into());
        assert_eq!(pod_vm(&p, &sel()), PodVm::Ineligible("without the selector label"));
        let mut p = pod("a", "u1", &[]);
        p.spec.as_mut().unwrap().node_name = Some("node-b".into());
        assert_eq!(pod_vm(&p, &sel()), PodVm::Ineligible("on another node"));
    }

    #[test]
    fn events_fold_into_the_set() {
        let mut t = PodTable::new(sel());
        assert_eq!(t.apply(Event::Init), Applied::default());
        assert_eq!(t.apply(Event::InitApply(pod("a", "u1", &[]))), Applied::default());
        let bad = t.apply(Event::InitApply(pod("b", "u2", &[(MAX_CUS, "x")])));
        assert_eq!(bad.skips.len(), 1);
        assert_eq!(bad.skips[0].pod, "ns/b");
        assert!(!bad.skips[0].kept_last_good);
        assert!(bad.skips[0].reason.to_string().contains("vmscale.io/max-cus"));
        assert!(ids(&t).is_empty(), "nothing published before InitDone");
        assert!(t.apply(Event::InitDone).changed);
        assert_eq!(ids(&t), [("ns/a", 4)]);
        assert_eq!(t.pods()["ns/a"].name, "a");

        // Our own status patch: a new resourceVersion, the same spec.
        let same = t.apply(Event::Apply(pod("a", "u1", &[("vmscale.io/updated-at", "now")])));
        assert_eq!(same, Applied::default());
        // The broken pod updated but broken the same way: not reported again.
        let again =
            t.apply(Event::Apply(pod("b", "u2", &[(MAX_CUS, "x"), ("vmscale.io/updated-at", "now")])));
        assert_eq!(again, Applied::default());
        assert!(t.apply(Event::Apply(pod("b", "u2", &[]))).changed);
        assert_eq!(ids(&t), [("ns/a", 4), ("ns/b", 4)]);
        assert!(t.apply(Event::Delete(pod("a", "u1", &[]))).changed);
        assert_eq!(ids(&t), [("ns/b", 4)]);
    }

    #[test]
    fn broken_annotations_keep_the_last_good_spec_of_the_same_pod() {
        let mut t = PodTable::new(sel());
        t.apply(Event::Apply(pod("a", "u1", &[(MAX_CUS, "6")])));
        let broke = t.apply(Event::Apply(pod("a", "u1", &[(MAX_CUS, "six")])));
        assert!(!broke.changed);
        assert!(broke.skips[0].kept_last_good);
        assert_eq!(ids(&t), [("ns/a", 6)]);
        // A re-list after a desync keeps it too, and does not report it again.
        t.apply(Event::Init);
        let relisted = t.apply(Event::InitApply(pod("a", "u1", &[(MAX_CUS, "six")])));
        assert!(relisted.skips.is_empty());
        assert!(!t.apply(Event::InitDone).changed);
        assert_eq!(ids(&t), [("ns/a", 6)]);
        // The same name, a new pod: its predecessor's spec is not inherited.
        let new = t.apply(Event::Apply(pod("a", "u9", &[(MAX_CUS, "six")])));
        assert!(new.changed && !new.skips[0].kept_last_good);
        assert!(ids(&t).is_empty());
    }

    #[test]
    fn relist_replaces_the_set_at_once() {
        let mut t = PodTable::new(sel());
        t.apply(Event::Apply(pod("a", "u1", &[])));
        t.apply(Event::Apply(pod("b", "u2", &[])));
        t.apply(Event::Init);
        t.apply(Event::InitApply(pod("b", "u2", &[(MAX_CUS, "8")])));
        assert_eq!(ids(&t), [("ns/a", 4), ("ns/b", 4)], "unchanged until InitDone");
        assert!(t.apply(Event::InitDone).changed);
        assert_eq!(ids(&t), [("ns/b", 8)]);
    }

    #[test]
    fn a_duplicate_id_goes_to_the_first_pod_by_name() {
        let mut t = PodTable::new(sel());
        t.apply(Event::Apply(pod("z", "u1", &[(VM_ID, "db")])));
        let dup = t.apply(Event::Apply(pod("a", "u2", &[(VM_ID, "db")])));
        assert_eq!(dup.skips.len(), 1);
        assert_eq!(
            dup.skips[0].reason,
            SkipReason::DuplicateId { id: "db".into(), owner: "ns/a".into() },
            "ns/a sorts first, so it owns the id"
        );
        assert_eq!(dup.skips[0].pod, "ns/z");
        assert_eq!(t.pods()["db"].name, "a");
        // Still a duplicate after another update: not reported again.
        assert!(t.apply(Event::Apply(pod("z", "u1", &[(VM_ID, "db"), ("x", "y")]))).skips.is_empty());
        t.apply(Event::Delete(pod("a", "u2", &[])));
        assert_eq!(t.pods()["db"].name, "z");
    }
}
