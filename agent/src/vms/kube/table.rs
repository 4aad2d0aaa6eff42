//! The desired VM set, folded from watcher events. Pure: the source task
//! feeds it events and acts on what it returns (publish, log, count).

use super::annotations::{pod_key, pod_vm, AnnotationError, PodVm};
use super::sockets::PodSockets;
use super::{PodRef, Selector};
use crate::vms::VmSpec;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::Event;
use std::collections::{BTreeMap, BTreeSet};
use vmscale_contract::keys::REFUSED;

/// Longest `vmscale.io/refused` the agent writes, bytes: the reason quotes
/// the pod's own annotation values, which may be long.
pub const MAX_REFUSED_LEN: usize = 1024;

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
    /// Another pod (named here) holds this VM id: the one that held it
    /// first, or else the older one.
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
                write!(f, "vm id {id} is already held by pod {owner}")
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
    /// `vmscale.io/refused` to write on pods (the reason, or `None` to
    /// remove it), where the pod's own annotation says otherwise.
    pub refusals: Vec<Refusal>,
}

/// What a pod's `vmscale.io/refused` should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub pod: PodRef,
    pub reason: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    pod: PodRef,
    state: State,
    /// When the pod was created: the older of two pods claiming one VM id
    /// gets it (after the one that held it already).
    created: Option<Timestamp>,
    /// The pod's `vmscale.io/refused` as the API server last showed it.
    refused: Option<String>,
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
    sockets: PodSockets,
    live: BTreeMap<String, Entry>,
    /// Pods listed since the watcher's `Init`, swapped in whole at `InitDone`
    /// so a re-list never publishes a half-empty set.
    relist: Option<BTreeMap<String, Entry>>,
    specs: Vec<VmSpec>,
    pods: BTreeMap<String, PodRef>,
    duplicates: BTreeSet<String>,
    /// Refusals handed out and not yet seen on the pod, by pod key: not
    /// handed out again on every event until the patch shows.
    sent: BTreeMap<String, Option<String>>,
}

impl PodTable {
    pub fn new(sel: Selector, sockets: PodSockets) -> Self {
        PodTable {
            sel,
            sockets,
            sent: BTreeMap::new(),
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
                return Applied { skips, ..Applied::default() };
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
        let (changed, reasons) = self.rebuild(&mut skips);
        let refusals = self.refusals(&reasons);
        Applied { changed, skips, refusals }
    }

    /// The refusals to write: every scaled-or-refused pod whose
    /// `vmscale.io/refused` differs from what it should say.
    fn refusals(&mut self, reasons: &BTreeMap<String, String>) -> Vec<Refusal> {
        let mut out = Vec::new();
        self.sent.retain(|k, _| self.live.contains_key(k));
        for (key, entry) in &self.live {
            if matches!(entry.state, State::Ineligible) {
                continue;
            }
            let want = reasons.get(key).map(|r| bounded(r));
            if entry.refused == want {
                self.sent.remove(key);
                continue;
            }
            if self.sent.get(key) == Some(&want) {
                continue;
            }
            self.sent.insert(key.clone(), want.clone());
            out.push(Refusal { pod: entry.pod.clone(), reason: want });
        }
        out
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
        let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let refused = pod.metadata.annotations.as_ref().and_then(|a| a.get(REFUSED)).cloned();
        let state = match pod_vm(pod, &self.sel, &self.sockets) {
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
        Entry { pod: pod_ref, state, created, refused }
    }

    /// Recomputes the published set; whether it changed, and why each pod
    /// that is not scaled as it says is refused (by pod key).
    fn rebuild(&mut self, skips: &mut Vec<Skip>) -> (bool, BTreeMap<String, String>) {
        let mut specs: BTreeMap<String, VmSpec> = BTreeMap::new();
        let mut pods = BTreeMap::new();
        let mut duplicates = BTreeSet::new();
        let mut reasons = BTreeMap::new();
        for (key, entry) in &self.live {
            if let State::Bad { error, .. } = &entry.state {
                reasons.insert(key.clone(), error.to_string());
            }
        }
        // A VM id stays with the pod that holds it; other claimants queue by
        // age, then by key, so no newcomer takes a running VM's id and the
        // same pod wins every time, whatever order the events came in.
        let mut claims: Vec<(&String, &Entry, &VmSpec)> =
            self.live.iter().filter_map(|(k, e)| e.spec().map(|s| (k, e, s))).collect();
        claims.sort_by_key(|(key, e, s)| {
            let held = self.pods.get(&s.id) == Some(&e.pod);
            (!held, e.created.is_none(), e.created, *key)
        });
        for (key, entry, spec) in claims {
            if let Some(owner) = pods.get(&spec.id).map(|p: &PodRef| p.key()) {
                let reason = SkipReason::DuplicateId { id: spec.id.clone(), owner };
                reasons.insert(key.clone(), reason.to_string());
                if !self.duplicates.contains(key) {
                    skips.push(Skip { pod: key.clone(), reason, kept_last_good: false });
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
        (changed, reasons)
    }
}

/// `reason`, cut at a character boundary to at most [`MAX_REFUSED_LEN`] bytes.
fn bounded(reason: &str) -> String {
    if reason.len() <= MAX_REFUSED_LEN {
        return reason.to_owned();
    }
    let mut end = MAX_REFUSED_LEN - 3;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &reason[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vms::kube::annotations::{MAX_CUS, QMP, VM_ID};

    fn sel() -> Selector {
        Selector {
            node_name: "node-a".into(),
            label_key: "vmscale.io/autoscale".into(),
            label_value: "true".into(),
        }
    }

    fn table() -> PodTable {
        PodTable::new(sel(), PodSockets::default())
    }

    /// A UUID made from a short tag, so tests can say "u1".
    fn uuid(tag: &str) -> String {
        let n = tag.bytes().fold(0u64, |a, b| a.wrapping_mul(256).wrapping_add(u64::from(b)));
        format!("00000000-0000-0000-0000-{:012x}", n & 0xffff_ffff_ffff)
    }

    fn pod(name: &str, uid: &str, extra: &[(&str, &str)]) -> Pod {
        let mut annotations = serde_json::json!({
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
                "namespace": "ns", "name": name, "uid": uuid(uid),
                "labels": {"vmscale.io/autoscale": "true"},
                "annotations": annotations,
            },
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn created(mut p: Pod, at_s: i64) -> Pod {
        let t = k8s_openapi::jiff::Timestamp::from_second(at_s).unwrap();
        p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t));
        p
    }

    fn ids(t: &PodTable) -> Vec<(&str, u32)> {
        t.specs().iter().map(|s| (s.id.as_str(), s.max_cus)).collect()
    }

    fn refusals(a: &Applied) -> Vec<(String, Option<String>)> {
        a.refusals.iter().map(|r| (r.pod.key(), r.reason.clone())).collect()
    }

    #[test]
    fn eligibility() {
        let s = PodSockets::default();
        let mut p = pod("a", "u1", &[]);
        assert!(matches!(pod_vm(&p, &sel(), &s), PodVm::Vm(_)));
        p.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(pod_vm(&p, &sel(), &s), PodVm::Ineligible("not running"));
        let mut p = pod("a", "u1", &[]);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(pod_vm(&p, &sel(), &s), PodVm::Ineligible("being deleted"));
        let mut p = pod("a", "u1", &[]);
        p.metadata.labels.as_mut().unwrap().insert("vmscale.io/autoscale".into(), "false".into());
        assert_eq!(pod_vm(&p, &sel(), &s), PodVm::Ineligible("without the selector label"));
        let mut p = pod("a", "u1", &[]);
        p.spec.as_mut().unwrap().node_name = Some("node-b".into());
        assert_eq!(pod_vm(&p, &sel(), &s), PodVm::Ineligible("on another node"));
    }

    #[test]
    fn the_qmp_socket_is_in_the_pods_own_directory() {
        let p = pod("a", "u1", &[]);
        let PodVm::Vm(spec) = pod_vm(&p, &sel(), &PodSockets::default()) else { panic!("a VM") };
        let want = format!("/pods/{}/volumes/kubernetes.io~empty-dir/vmscale/qmp.sock", uuid("u1"));
        assert_eq!(spec.qmp, want);
    }

    #[test]
    fn events_fold_into_the_set() {
        let mut t = table();
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
    fn a_refused_pod_is_told_why_once_and_the_note_goes_when_it_is_fixed() {
        let mut t = table();
        t.apply(Event::Apply(pod("a", "u1", &[])));
        let tcp = t.apply(Event::Apply(pod("b", "u2", &[(QMP, "tcp:10.0.0.9:4444")])));
        let r = refusals(&tcp);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, "ns/b");
        let why = r[0].1.clone().unwrap();
        assert!(why.contains("QMP over TCP is not allowed for pods"), "{why}");
        assert_eq!(ids(&t), [("ns/a", 4)], "the tcp: pod is not scaled");
        // Not asked again while the patch is on its way...
        let before_patch = t.apply(Event::Apply(pod("b", "u2", &[(QMP, "tcp:10.0.0.9:4444"), ("x", "y")])));
        assert!(before_patch.refusals.is_empty());
        // ...nor once the pod shows it.
        let patched = pod("b", "u2", &[(QMP, "tcp:10.0.0.9:4444"), (REFUSED, &why)]);
        assert!(t.apply(Event::Apply(patched)).refusals.is_empty());
        // Fixed: the note is removed.
        let fixed = t.apply(Event::Apply(pod("b", "u2", &[(REFUSED, &why)])));
        assert_eq!(refusals(&fixed), [("ns/b".to_owned(), None)]);
        assert_eq!(ids(&t), [("ns/a", 4), ("ns/b", 4)]);
    }

    #[test]
    fn refusal_notes_are_bounded() {
        let long = "é".repeat(2000);
        let b = bounded(&long);
        assert!(b.len() <= MAX_REFUSED_LEN && b.ends_with("..."), "{}", b.len());
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn broken_annotations_keep_the_last_good_spec_of_the_same_pod() {
        let mut t = table();
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
        let mut t = table();
        t.apply(Event::Apply(pod("a", "u1", &[])));
        t.apply(Event::Apply(pod("b", "u2", &[])));
        t.apply(Event::Init);
        t.apply(Event::InitApply(pod("b", "u2", &[(MAX_CUS, "8")])));
        assert_eq!(ids(&t), [("ns/a", 4), ("ns/b", 4)], "unchanged until InitDone");
        assert!(t.apply(Event::InitDone).changed);
        assert_eq!(ids(&t), [("ns/b", 8)]);
    }

    /// Before, the pod whose name sorted first won a contested id: a new pod
    /// named `a` took the id of a running VM from pod `z`.
    #[test]
    fn a_newcomer_cannot_take_a_held_vm_id() {
        let mut t = table();
        t.apply(Event::Apply(created(pod("z", "u1", &[(VM_ID, "db")]), 100)));
        assert_eq!(t.pods()["ns/db"].name, "z");
        let dup = t.apply(Event::Apply(created(pod("a", "u2", &[(VM_ID, "db")]), 50)));
        assert_eq!(dup.skips.len(), 1);
        assert_eq!(dup.skips[0].reason, SkipReason::DuplicateId { id: "ns/db".into(), owner: "ns/z".into() });
        assert_eq!(dup.skips[0].pod, "ns/a");
        assert_eq!(t.pods()["ns/db"].name, "z", "the pod that held the id keeps it");
        let note = refusals(&dup);
        assert_eq!(note.len(), 1);
        assert!(note[0].1.as_deref().unwrap().contains("already held by pod ns/z"), "{note:?}");
        // Still a duplicate after another update: not reported again.
        assert!(t.apply(Event::Apply(pod("a", "u2", &[(VM_ID, "db"), ("x", "y")]))).skips.is_empty());
        t.apply(Event::Delete(pod("z", "u1", &[])));
        assert_eq!(t.pods()["ns/db"].name, "a", "free again: the claimant gets it");
    }

    #[test]
    fn after_a_restart_the_older_pod_gets_a_contested_id() {
        let mut t = table();
        t.apply(Event::Init);
        t.apply(Event::InitApply(created(pod("a", "u2", &[(VM_ID, "db")]), 200)));
        t.apply(Event::InitApply(created(pod("z", "u1", &[(VM_ID, "db")]), 100)));
        t.apply(Event::InitDone);
        assert_eq!(t.pods()["ns/db"].name, "z");
    }

    #[test]
    fn no_pod_claims_an_id_in_another_namespace() {
        let mut t = table();
        let p = pod("a", "u1", &[(VM_ID, "other/db")]);
        let a = t.apply(Event::Apply(p));
        assert!(ids(&t).is_empty());
        assert!(a.skips[0].reason.to_string().contains("vmscale.io/vm-id"), "{:?}", a.skips);
    }
}
