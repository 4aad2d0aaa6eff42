//! The Kubernetes VM source: the pods on this node that carry the selector
//! label, each describing its VM in annotations; and the write-back of each
//! VM's sizes into the same pod's annotations ([`status`]).
//!
//! Pods are watched with kube-rs's `runtime::watcher` (list, then watch from
//! the list's resource version; re-list after a desync; reconnects with the
//! watcher's `default_backoff()`), so a change reaches the agent at once.
//! The whole desired set is published on a `watch` channel like the file
//! source's. While the API server is unreachable the last set stays.
//!
//! # Which pods
//!
//! Pods with `spec.nodeName=<node>` (field selector) and the selector label
//! (default `vmscale.io/autoscale=true`), in all namespaces or one. Of those,
//! pods not in phase `Running` and pods being deleted are left out. A pod
//! whose annotations are wrong is skipped with a warning that names the pod
//! and the annotation, and counted ([`SourceStats`]); the others go on. If the
//! pod had good annotations before, its VM keeps that last good spec.
//!
//! # Annotation contract
//!
//! The annotations a pod's owner sets and those the agent writes back
//! ([`status`]) are `vmscale_contract`'s: the table of keys and values is in
//! that crate's documentation, and its parser is the one the scheduler
//! extender uses too, so a pod placed there is a pod this agent scales.
//!
//! # RBAC
//!
//! The agent lists and watches pods and patches their annotations; it never
//! gets, creates or deletes them. A ValidatingAdmissionPolicy
//! (deploy/kustomize/base/agent-admission.yaml) narrows the patch to pods on
//! the agent's own node and to `vmscale.io/` annotations:
//!
//! ```yaml
//! apiVersion: rbac.authorization.k8s.io/v1
//! kind: ClusterRole          # a Role in that namespace when `namespace` is set
//! metadata:
//!   name: vmscale-agent
//! rules:
//!   - apiGroups: [""]
//!     resources: ["pods"]
//!     verbs: ["list", "watch", "patch"]
//! ```
//!
//! The node name comes from the downward API (`fieldRef: spec.nodeName`).

pub mod annotations;
pub mod sockets;
pub mod status;
mod table;

pub use table::{Refusal, Skip, SkipReason};

use crate::vms::VmSpec;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use table::PodTable;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vmscale_common::error::chain;

/// Where to find this node's VM pods.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeSourceConfig {
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node_name: String,
    /// Label key that marks a pod whose VM this agent scales. Default `vmscale.io/autoscale`.
    #[serde(default = "default_label_key")]
    pub label_key: String,
    /// The value that key must have. Default `true`.
    #[serde(default = "default_label_value")]
    pub label_value: String,
    /// Only pods in this namespace (then a Role suffices); default all namespaces.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Each pod's socket directory as this agent sees it, `{uid}` standing
    /// for the pod's UID (see [`sockets`]). Default
    /// `/pods/{uid}/volumes/kubernetes.io~empty-dir/vmscale`.
    #[serde(default = "default_pod_socket_dir")]
    pub pod_socket_dir: String,
}

pub fn default_pod_socket_dir() -> String {
    sockets::DEFAULT_TEMPLATE.into()
}

fn default_label_key() -> String {
    vmscale_contract::keys::DEFAULT_LABEL_KEY.into()
}

fn default_label_value() -> String {
    vmscale_contract::keys::DEFAULT_LABEL_VALUE.into()
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("node name {0:?} is not a Kubernetes node name; set it from the downward API (spec.nodeName)")]
    NodeName(String),
    #[error("label {key:?}={value:?} is not a valid label key and value")]
    Label { key: String, value: String },
    #[error("namespace {0:?} is not a valid namespace name")]
    Namespace(String),
    #[error(transparent)]
    SocketDir(#[from] sockets::SocketDirError),
}

impl KubeSourceConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        KubeSourceConfig {
            node_name: node_name.into(),
            label_key: default_label_key(),
            label_value: default_label_value(),
            namespace: None,
            pod_socket_dir: default_pod_socket_dir(),
        }
    }

    /// Checks the names that go into selectors, so none can widen them
    /// (a `,` would add a selector term).
    pub fn validate(&self) -> Result<(), KubeSourceError> {
        let dns = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        let label = |s: &str, extra: &[u8]| {
            s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b) || extra.contains(&b))
        };
        if !dns(&self.node_name) {
            return Err(KubeSourceError::NodeName(self.node_name.clone()));
        }
        let (k, v) = (&self.label_key, &self.label_value);
        if k.is_empty() || k.len() > 317 || !label(k, b"/") || v.len() > 63 || !label(v, b"") {
            return Err(KubeSourceError::Label { key: k.clone(), value: v.clone() });
        }
        if let Some(ns) = &self.namespace {
            if !dns(ns) || ns.len() > 63 || ns.contains('.') {
                return Err(KubeSourceError::Namespace(ns.clone()));
            }
        }
        sockets::PodSockets::new(&self.pod_socket_dir)?;
        Ok(())
    }

    fn selector(&self) -> Selector {
        Selector {
            node_name: self.node_name.clone(),
            label_key: self.label_key.clone(),
            label_value: self.label_value.clone(),
        }
    }

    /// List from the API server's watch cache (`resourceVersion=0`) in one
    /// page, as the kubelet lists its pods: every node's agent re-lists after
    /// a restart or a desync, and quorum reads from all of them at once would
    /// land on etcd. One node's pods fit in one page.
    fn watcher_config(&self) -> watcher::Config {
        let mut wc = watcher::Config::default()
            .labels(&format!("{}={}", self.label_key, self.label_value))
            .fields(&format!("spec.nodeName={}", self.node_name))
            .any_semantic();
        wc.page_size = None;
        wc
    }
}

/// What a pod must match; checked again on every pod the API returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub node_name: String,
    pub label_key: String,
    pub label_value: String,
}

/// The pod behind a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

impl PodRef {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// VM id -> pod, kept current by the source (updated before each publish,
/// so any VM a consumer sees is already here), and the refusals the source
/// wants written on pods. Shared with the status writer.
#[derive(Debug, Clone, Default)]
pub struct PodIndex {
    pods: Arc<RwLock<BTreeMap<String, PodRef>>>,
    refusals: Arc<Mutex<BTreeMap<String, Refusal>>>,
    refused: Arc<tokio::sync::Notify>,
}

impl PodIndex {
    pub fn get(&self, vm_id: &str) -> Option<PodRef> {
        self.pods.read().unwrap_or_else(PoisonError::into_inner).get(vm_id).cloned()
    }

    pub(crate) fn replace(&self, pods: BTreeMap<String, PodRef>) {
        *self.pods.write().unwrap_or_else(PoisonError::into_inner) = pods;
    }

    /// Queues `vmscale.io/refused` writes; the latest per pod wins.
    pub(crate) fn refuse(&self, refusals: Vec<Refusal>) {
        if refusals.is_empty() {
            return;
        }
        let mut q = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        for r in refusals {
            q.insert(r.pod.key(), r);
        }
        self.refused.notify_one();
    }

    /// Takes the queued refusals, by pod key.
    pub(crate) fn take_refusals(&self) -> BTreeMap<String, Refusal> {
        std::mem::take(&mut *self.refusals.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Resolves when refusals were queued since the last wake.
    pub(crate) async fn refusals_queued(&self) {
        self.refused.notified().await;
    }
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct SourceStats {
    skipped: Mutex<BTreeMap<&'static str, u64>>,
    watch_errors: Mutex<u64>,
}

impl SourceStats {
    /// Pods skipped (or kept on their last good spec), by reason: `missing`,
    /// `invalid`, `unknown`, `spec` (annotations) and `duplicate_id`. A pod
    /// counts once each time it turns bad or bad in a new way.
    pub fn skipped(&self) -> BTreeMap<&'static str, u64> {
        self.skipped.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Failed list or watch calls (each retried by the watcher's backoff).
    pub fn watch_errors(&self) -> u64 {
        *self.watch_errors.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_skip(&self, kind: &'static str) {
        *self.skipped.lock().unwrap_or_else(PoisonError::into_inner).entry(kind).or_default() += 1;
    }

    fn count_watch_error(&self) {
        *self.watch_errors.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    }
}

/// A running source's outputs.
#[derive(Debug)]
pub struct KubeVms {
    /// The desired VM set, sorted by id; empty until the first list is in.
    /// Closed when the source stops.
    pub vms: watch::Receiver<Vec<VmSpec>>,
    pub pods: PodIndex,
    pub stats: Arc<SourceStats>,
}

#[derive(Debug)]
pub struct KubeSource {
    pub config: KubeSourceConfig,
}

impl KubeSource {
    /// Validates the config and starts watching in the background until
    /// `cancel`. Unlike the file source this does not wait for the first
    /// list: the API server may be down, and the watcher retries on its own.
    pub fn start(self, client: Client, cancel: CancellationToken) -> Result<KubeVms, KubeSourceError> {
        self.config.validate()?;
        let api: Api<Pod> = match &self.config.namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        let events = watcher::watcher(api, self.config.watcher_config()).default_backoff();
        let (tx, rx) = watch::channel(Vec::new());
        let out = KubeVms { vms: rx, pods: PodIndex::default(), stats: Arc::default() };
        let sockets = sockets::PodSockets::new(&self.config.pod_socket_dir)?;
        let table = PodTable::new(self.config.selector(), sockets);
        tokio::spawn(run(events, table, tx, out.pods.clone(), out.stats.clone(), cancel));
        Ok(out)
    }
}

#[tracing::instrument(skip_all, name = "kube_source")]
async fn run<S>(
    events: S,
    mut table: PodTable,
    tx: watch::Sender<Vec<VmSpec>>,
    pods: PodIndex,
    stats: Arc<SourceStats>,
    cancel: CancellationToken,
) where
    S: Stream<Item = Result<Event<Pod>, watcher::Error>> + Send,
{
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            // The watcher's stream never ends; if it did, there is nothing to retry.
            None => return,
            Some(Err(e)) => {
                stats.count_watch_error();
                tracing::warn!("watching pods failed, keeping the last VM set and retrying: {}", chain(&e));
            }
            Some(Ok(event)) => {
                let applied = table.apply(event);
                for skip in &applied.skips {
                    stats.count_skip(skip.reason.kind());
                    let keeps = if skip.kept_last_good { "; its VM keeps the last good spec" } else { "" };
                    tracing::warn!(pod = %skip.pod, "pod skipped: {}{keeps}", skip.reason);
                }
                if applied.changed {
                    pods.replace(table.pods().clone());
                    tracing::info!(vms = table.specs().len(), "VM set changed");
                    tx.send_replace(table.specs().to_vec());
                }
                pods.refuse(applied.refusals);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_keeps_selectors_narrow() {
        assert!(KubeSourceConfig::new("node-a.example").validate().is_ok());
        let ns = KubeSourceConfig { namespace: Some("db".into()), ..KubeSourceConfig::new("n") };
        assert!(ns.validate().is_ok());
        for bad in ["", "node-a,metadata.name=x", "Node A"] {
            let e = KubeSourceConfig::new(bad).validate().unwrap_err();
            assert!(matches!(e, KubeSourceError::NodeName(_)), "{bad}: {e}");
        }
        let label = KubeSourceConfig { label_value: "true,env=prod".into(), ..KubeSourceConfig::new("n") };
        assert!(matches!(label.validate(), Err(KubeSourceError::Label { .. })));
        let ns = KubeSourceConfig { namespace: Some("a.b".into()), ..KubeSourceConfig::new("n") };
        assert!(matches!(ns.validate(), Err(KubeSourceError::Namespace(_))));
        let cfg: KubeSourceConfig = toml::from_str("node_name = \"n\"").unwrap();
        assert_eq!(cfg, KubeSourceConfig::new("n"));
        assert!(toml::from_str::<KubeSourceConfig>("node_name = \"n\"\nlabel = \"x\"").is_err());
    }

    #[test]
    fn watcher_lists_from_the_cache_in_one_page() {
        let wc = KubeSourceConfig::new("node-a").watcher_config();
        assert_eq!(wc.label_selector.as_deref(), Some("vmscale.io/autoscale=true"));
        assert_eq!(wc.field_selector.as_deref(), Some("spec.nodeName=node-a"));
        assert_eq!(wc.list_semantic, watcher::ListSemantic::Any);
        assert_eq!(wc.page_size, None);
    }
}
