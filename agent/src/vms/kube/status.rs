//! Writing each VM's current and approved sizes back into its pod's
//! annotations, so `kubectl get pod -o yaml` shows what the agent did.
//!
//! The scaling loops call [`StatusReporter::report`], which never waits on the
//! API server (Neon's scheduler answering only after an API patch cost up to
//! a second per decision). A background task coalesces reports per VM, skips
//! sizes already written, patches at most once per pod per `min_interval_ms`
//! (the latest report wins), and retries failures with a doubling delay.

use super::annotations::PREFIX;
use super::{PodIndex, PodRef, Refusal};
use crate::core::policy::Size;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Recorded as the field manager of the annotations we patch.
pub const FIELD_MANAGER: &str = "vmscale-agent";

/// One VM's sizes as the agent last saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmStatus {
    /// What QEMU reports the VM has now.
    pub current: Size,
    /// The allocator's permit: what the VM may grow to without asking.
    pub approved: Size,
    /// When the agent observed these sizes (the caller's clock).
    pub at: SystemTime,
}

impl VmStatus {
    fn sizes(&self) -> (Size, Size) {
        (self.current, self.approved)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("patching the annotations of pod {pod} failed")]
    Patch {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("patching the annotations of pod {pod} took longer than {after_ms} ms")]
    Timeout { pod: String, after_ms: u64 },
}

/// The Kubernetes side of the write-back: put one VM's status on its pod,
/// or why the agent refuses to scale a pod (`None` removes the note).
pub trait StatusWriter: Send + Sync + 'static {
    fn write(&self, pod: &PodRef, status: &VmStatus) -> impl Future<Output = Result<(), StatusError>> + Send;
    fn write_refusal(
        &self,
        pod: &PodRef,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), StatusError>> + Send;
}

/// Writes with a JSON merge patch of `metadata.annotations` only: the patch
/// touches no other field, needs only the `patch` verb, and leaves every
/// other annotation as it is.
#[derive(Clone)]
pub struct KubeStatusWriter {
    client: Client,
}

// kube::Client has no Debug of its own.
impl std::fmt::Debug for KubeStatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStatusWriter").finish_non_exhaustive()
    }
}

impl KubeStatusWriter {
    pub fn new(client: Client) -> Self {
        KubeStatusWriter { client }
    }
}

impl KubeStatusWriter {
    /// A merge patch of these annotations (`null` removes one).
    async fn patch(&self, pod: &PodRef, annotations: serde_json::Value) -> Result<(), StatusError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let body = serde_json::json!({ "metadata": { "annotations": annotations } });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        api.patch(&pod.name, &params, &Patch::Merge(body))
            .await
            .map(drop)
            .map_err(|source| StatusError::Patch { pod: pod.key(), source })
    }
}

impl StatusWriter for KubeStatusWriter {
    async fn write(&self, pod: &PodRef, status: &VmStatus) -> Result<(), StatusError> {
        self.patch(pod, serde_json::json!(status_annotations(status))).await
    }

    async fn write_refusal(&self, pod: &PodRef, reason: Option<&str>) -> Result<(), StatusError> {
        self.patch(pod, serde_json::json!({ vmscale_contract::keys::REFUSED: reason })).await
    }
}

/// The annotations a status is written as (see the table in the parent module).
pub fn status_annotations(s: &VmStatus) -> BTreeMap<String, String> {
    let key = |k: &str| format!("{PREFIX}{k}");
    let millis = s.at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let at = i64::try_from(millis)
        .ok()
        .and_then(|ms| k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    BTreeMap::from([
        (key("current-milli-cpu"), s.current.milli_cpu.to_string()),
        (key("current-memory-bytes"), s.current.memory_bytes.to_string()),
        (key("approved-milli-cpu"), s.approved.milli_cpu.to_string()),
        (key("approved-memory-bytes"), s.approved.memory_bytes.to_string()),
        (key("updated-at"), at.to_string()),
    ])
}

/// Rate limit and retries of the write-back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// At most one patch per pod in this long, ms; newer sizes wait, and the
    /// latest is written when it ends. Default 1000.
    pub min_interval_ms: u64,
    /// A patch not answered in this long counts as failed, ms. Default 10000.
    pub write_timeout_ms: u64,
    /// Longest delay before retrying a failed patch, ms; the delay starts at
    /// `min_interval_ms` and doubles per failure. Default 30000.
    pub retry_max_ms: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig { min_interval_ms: 1000, write_timeout_ms: 10_000, retry_max_ms: 30_000 }
    }
}

/// One pod's write-back state. Pure: times are passed in.
#[derive(Debug, Default)]
struct Gate {
    uid: Option<String>,
    latest: Option<VmStatus>,
    written: Option<(Size, Size)>,
    not_before: Option<Instant>,
    failures: u32,
}

impl Gate {
    fn offer(&mut self, s: VmStatus) {
        self.latest = Some(s);
    }

    /// A pod re-created under the same name has none of our annotations.
    fn bind(&mut self, uid: Option<&str>) {
        if self.uid.as_deref() != uid {
            self.uid = uid.map(str::to_owned);
            self.written = None;
        }
    }

    fn dirty(&self) -> bool {
        self.latest.is_some_and(|s| Some(s.sizes()) != self.written)
    }

    /// When the next write may go out, if one is needed.
    fn due_at(&self, now: Instant) -> Option<Instant> {
        self.dirty().then(|| self.not_before.unwrap_or(now).max(now))
    }

    fn take_due(&self, now: Instant) -> Option<VmStatus> {
        if self.due_at(now)? <= now {
            self.latest
        } else {
            None
        }
    }

    fn written(&mut self, s: VmStatus, started: Instant, cfg: &StatusConfig) {
        self.written = Some(s.sizes());
        self.failures = 0;
        self.not_before = Some(started + Duration::from_millis(cfg.min_interval_ms));
    }

    fn failed(&mut self, started: Instant, cfg: &StatusConfig) {
        self.failures = self.failures.saturating_add(1);
        // Twice the interval after the first failure, doubling up to the cap.
        let backoff = vmscale_common::backoff::Backoff::from_ms(cfg.min_interval_ms, cfg.retry_max_ms);
        let delay = backoff.delay_ms(self.failures.saturating_add(1));
        self.not_before = Some(started + Duration::from_millis(delay.max(cfg.min_interval_ms)));
    }
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<String, VmStatus>>,
    wake: Notify,
}

/// The loops' handle on the write-back task.
#[derive(Debug, Clone)]
pub struct StatusReporter {
    shared: Arc<Shared>,
    pods: PodIndex,
}

impl StatusReporter {
    /// Starts the write-back task; it stops at `cancel`.
    pub fn start<W: StatusWriter>(
        writer: W,
        pods: PodIndex,
        config: StatusConfig,
        cancel: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        tokio::spawn(run(writer, pods.clone(), config, shared.clone(), cancel));
        StatusReporter { shared, pods }
    }

    /// The UID of the VM's pod, if the source knows it (the pod's cgroup is
    /// where the VM's QEMU must be, `vm_loop::cpu_max`).
    pub fn pod_uid(&self, vm_id: &str) -> Option<String> {
        self.pods.get(vm_id).and_then(|p| p.uid)
    }

    /// Records a VM's sizes for writing; returns at once. A VM whose pod the
    /// source does not know (it just left) is dropped by the task.
    pub fn report(&self, vm_id: &str, status: VmStatus) {
        self.shared.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(vm_id.to_owned(), status);
        self.shared.wake.notify_one();
    }
}

#[tracing::instrument(skip_all, name = "kube_status")]
async fn run<W: StatusWriter>(
    writer: W,
    pods: PodIndex,
    cfg: StatusConfig,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut gates: HashMap<String, Gate> = HashMap::new();
    let mut refusals = RefusalQueue::default();
    let timeout = Duration::from_millis(cfg.write_timeout_ms);
    loop {
        refusals.offer(pods.take_refusals());
        refusals.write_due(&writer, timeout, &cfg).await;
        let reports = std::mem::take(&mut *shared.pending.lock().unwrap_or_else(PoisonError::into_inner));
        for (id, s) in reports {
            gates.entry(id).or_default().offer(s);
        }
        let mut ids: Vec<String> = gates.keys().cloned().collect();
        ids.sort();
        for id in ids {
            let Some(pod) = pods.get(&id) else {
                tracing::debug!(vm = %id, "no pod for this VM any more; its status is not written");
                gates.remove(&id);
                continue;
            };
            let Some(gate) = gates.get_mut(&id) else { continue };
            gate.bind(pod.uid.as_deref());
            let started = Instant::now();
            let Some(status) = gate.take_due(started) else { continue };
            let result = match tokio::time::timeout(timeout, writer.write(&pod, &status)).await {
                Ok(r) => r,
                Err(_) => Err(StatusError::Timeout { pod: pod.key(), after_ms: cfg.write_timeout_ms }),
            };
            match result {
                Ok(()) => gate.written(status, started, &cfg),
                Err(e) => {
                    gate.failed(started, &cfg);
                    tracing::warn!(vm = %id, failures = gate.failures, "status write-back failed, will retry: {}", super::chain(&e));
                }
            }
        }
        let now = Instant::now();
        let next = gates.values().filter_map(|g| g.due_at(now)).chain(refusals.due_at()).min();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = shared.wake.notified() => {}
            () = pods.refusals_queued() => {}
            () = sleep_until(next) => {}
        }
    }
}

/// Refusal notes waiting to be written, retried with a doubling delay.
#[derive(Debug, Default)]
struct RefusalQueue {
    /// By pod key: the note, when it may go out, failures so far.
    pending: BTreeMap<String, (Refusal, Option<Instant>, u32)>,
}

impl RefusalQueue {
    /// A newer note for a pod replaces the older one and goes out at once.
    fn offer(&mut self, fresh: BTreeMap<String, Refusal>) {
        for (key, r) in fresh {
            self.pending.insert(key, (r, None, 0));
        }
    }

    fn due_at(&self) -> Option<Instant> {
        self.pending.values().map(|(_, t, _)| t.unwrap_or_else(Instant::now)).min()
    }

    async fn write_due<W: StatusWriter>(&mut self, writer: &W, timeout: Duration, cfg: &StatusConfig) {
        let now = Instant::now();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, (_, t, _))| t.is_none_or(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some((r, _, failures)) = self.pending.remove(&key) else { continue };
            let write = writer.write_refusal(&r.pod, r.reason.as_deref());
            let result = match tokio::time::timeout(timeout, write).await {
                Ok(r) => r,
                Err(_) => Err(StatusError::Timeout { pod: key.clone(), after_ms: cfg.write_timeout_ms }),
            };
            if let Err(e) = result {
                let failures = failures.saturating_add(1);
                let backoff =
                    vmscale_common::backoff::Backoff::from_ms(cfg.min_interval_ms, cfg.retry_max_ms);
                let at = Instant::now() + Duration::from_millis(backoff.delay_ms(failures));
                tracing::warn!(pod = %key, failures, "writing why the pod is refused failed, will retry: {}", super::chain(&e));
                self.pending.insert(key, (r, Some(at), failures));
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(cpu: u64, at_s: u64) -> VmStatus {
        VmStatus {
            current: Size::new(cpu, 1 << 30),
            approved: Size::new(cpu + 250, 2 << 30),
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(at_s),
        }
    }

    #[test]
    fn annotations_carry_both_sizes_and_the_time() {
        let a = status_annotations(&VmStatus {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_250),
            ..status(500, 0)
        });
        let want: BTreeMap<String, String> = [
            ("vmscale.io/current-milli-cpu", "500"),
            ("vmscale.io/current-memory-bytes", "1073741824"),
            ("vmscale.io/approved-milli-cpu", "750"),
            ("vmscale.io/approved-memory-bytes", "2147483648"),
            ("vmscale.io/updated-at", "2026-09-21T14:13:20.25Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(a, want);
    }

    #[test]
    fn gate_writes_changes_only_and_at_most_once_per_interval() {
        let cfg = StatusConfig { min_interval_ms: 1000, write_timeout_ms: 10, retry_max_ms: 5000 };
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut g = Gate::default();
        assert_eq!(g.due_at(t0), None, "nothing reported");
        g.offer(status(500, 1));
        assert_eq!(g.take_due(t0), Some(status(500, 1)), "first report goes out at once");
        g.written(status(500, 1), t0, &cfg);
        g.offer(status(500, 2));
        assert_eq!(g.due_at(ms(10)), None, "same sizes, later time: nothing to write");
        g.offer(status(750, 3));
        assert_eq!(g.due_at(ms(10)), Some(ms(1000)));
        assert_eq!(g.take_due(ms(999)), None);
        g.offer(status(1000, 4));
        assert_eq!(g.take_due(ms(1000)), Some(status(1000, 4)), "the latest wins");
        // Failures back off: 2 s, 4 s, then the 5 s cap.
        g.failed(ms(1000), &cfg);
        assert_eq!(g.due_at(ms(1000)), Some(ms(3000)));
        g.failed(ms(3000), &cfg);
        assert_eq!(g.due_at(ms(3000)), Some(ms(7000)));
        g.failed(ms(7000), &cfg);
        assert_eq!(g.due_at(ms(7000)), Some(ms(12000)));
        g.written(status(1000, 4), ms(12000), &cfg);
        assert_eq!(g.failures, 0);
        assert_eq!(g.due_at(ms(12000)), None);
        // The pod was re-created: write again even though the sizes match.
        g.bind(Some("new-uid"));
        assert_eq!(g.due_at(ms(13000)), Some(ms(13000)));
    }

    /// Records writes; fails the ones asked to.
    #[derive(Clone, Default)]
    struct FakeWriter {
        writes: Arc<Mutex<Vec<(String, VmStatus, Instant)>>>,
        fail_next: Arc<Mutex<u32>>,
    }

    impl StatusWriter for FakeWriter {
        async fn write_refusal(&self, _: &PodRef, _: Option<&str>) -> Result<(), StatusError> {
            Ok(())
        }

        async fn write(&self, pod: &PodRef, status: &VmStatus) -> Result<(), StatusError> {
            self.writes.lock().unwrap().push((pod.key(), *status, Instant::now()));
            let mut fail = self.fail_next.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(StatusError::Timeout { pod: pod.key(), after_ms: 0 });
            }
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reporter_coalesces_rate_limits_and_retries() {
        let pods = PodIndex::default();
        let pod = PodRef { namespace: "ns".into(), name: "pg-1".into(), uid: Some("u1".into()) };
        pods.replace(BTreeMap::from([("vm-1".to_owned(), pod)]));
        let fake = FakeWriter::default();
        let cancel = CancellationToken::new();
        let r = StatusReporter::start(fake.clone(), pods, StatusConfig::default(), cancel.clone());
        let t0 = Instant::now();
        let settle = || tokio::time::sleep(Duration::from_millis(1));
        let writes = || {
            fake.writes
                .lock()
                .unwrap()
                .iter()
                .map(|(p, s, t)| (p.clone(), s.current.milli_cpu, *t - t0))
                .collect::<Vec<_>>()
        };

        r.report("vm-1", status(500, 1));
        r.report("unknown-vm", status(500, 1));
        settle().await;
        assert_eq!(writes(), [("ns/pg-1".to_owned(), 500, Duration::ZERO)]);
        r.report("vm-1", status(500, 2));
        r.report("vm-1", status(750, 3));
        r.report("vm-1", status(1000, 4));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(writes().len(), 2, "{:?}", writes());
        assert_eq!(writes()[1], ("ns/pg-1".to_owned(), 1000, Duration::from_millis(1000)));

        *fake.fail_next.lock().unwrap() = 1;
        r.report("vm-1", status(250, 5));
        tokio::time::sleep(Duration::from_millis(5000)).await;
        let w = writes();
        assert_eq!(w.len(), 4, "{w:?}");
        assert_eq!(
            (w[2].1, w[2].2),
            (250, Duration::from_millis(2000)),
            "rate limit measured from the last write"
        );
        assert_eq!((w[3].1, w[3].2), (250, Duration::from_millis(4000)), "retried after twice the interval");
        cancel.cancel();
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// (pod, note) of every refusal written.
    type Written = Arc<StdMutex<Vec<(String, Option<String>)>>>;

    #[derive(Clone, Default)]
    struct Notes {
        written: Written,
        fail_first: Arc<StdMutex<bool>>,
    }

    impl StatusWriter for Notes {
        async fn write(&self, _: &PodRef, _: &VmStatus) -> Result<(), StatusError> {
            Ok(())
        }

        async fn write_refusal(&self, pod: &PodRef, reason: Option<&str>) -> Result<(), StatusError> {
            self.written.lock().unwrap().push((pod.key(), reason.map(str::to_owned)));
            let mut fail = self.fail_first.lock().unwrap();
            if std::mem::take(&mut *fail) {
                return Err(StatusError::Timeout { pod: pod.key(), after_ms: 0 });
            }
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_written_and_a_failed_one_retried() {
        let pods = PodIndex::default();
        let notes = Notes::default();
        *notes.fail_first.lock().unwrap() = true;
        let cancel = CancellationToken::new();
        let _r = StatusReporter::start(notes.clone(), pods.clone(), StatusConfig::default(), cancel.clone());
        let pod = PodRef { namespace: "ns".into(), name: "b".into(), uid: Some("u2".into()) };
        pods.refuse(vec![Refusal { pod: pod.clone(), reason: Some("tcp: refused".into()) }]);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(notes.written.lock().unwrap().len(), 1, "written at once");
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let w = notes.written.lock().unwrap().clone();
        let note = ("ns/b".to_owned(), Some("tcp: refused".to_owned()));
        assert_eq!(w, [note.clone(), note], "retried after a failure");
        pods.refuse(vec![Refusal { pod, reason: None }]);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(notes.written.lock().unwrap().last().unwrap().1, None, "the note is removed");
        cancel.cancel();
    }
}
