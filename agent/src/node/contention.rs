//! The node's CPU contention as its VMs feel it: run-queue delay of every
//! VM's vCPU threads (host eBPF, see [`crate::ebpf`]), reported to the
//! allocator as `NodeContention` every interval and exported as metrics.
//!
//! One task per node. Each round it asks every VM's QEMU for its vCPU thread
//! ids (`query-cpus-fast`: vCPUs come and go with hotplug, and a restarted
//! QEMU has new threads), waits an interval, and reads what the kernel
//! gathered meanwhile. Without eBPF (no privileges, no object, an old kernel)
//! it says so once and the agent runs on without the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;

use crate::ebpf::{self, Attach, RunQueue, RunQueueConfig, RunQueueDelay};
use crate::links::allocator::{Registry, Session};
use crate::metrics::{DelayLabels, Metrics, VmLabel};
use crate::qmp::VcpuThreads;
use vmscale_common::error::Chain;

/// Every VM's QEMU connection, by VM id, while it is connected. The node
/// supervisor keeps it; the contention task reads it.
pub type Hypervisors = Arc<Mutex<BTreeMap<String, Arc<dyn VcpuThreads>>>>;

/// The `[contention]` section of the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentionConfig {
    /// Measure run-queue delay of vCPU threads with eBPF and report it.
    /// Default true; where eBPF can't run the agent says why once and goes on.
    pub enabled: bool,
    /// How often figures are read and reported, ms. Default 5000.
    pub interval_ms: u64,
    /// The eBPF object; default: `$VMSCALE_EBPF_OBJECT`, next to the binary,
    /// then the workspace's `target/ebpf/vmscale.bpf.o`.
    pub ebpf_object: Option<PathBuf>,
    /// Mount tracefs at `/sys/kernel/tracing` when it is not. Default true.
    pub mount_tracefs: bool,
    /// Where sysfs is (BTF, tracefs). Default `/sys`.
    pub sys_root: PathBuf,
    /// `auto` (default): raw tracepoints where the kernel's BTF allows
    /// (cheaper per context switch), classic ones otherwise; or force `raw`
    /// or `tracepoint`.
    pub attach: Attach,
}

impl Default for ContentionConfig {
    fn default() -> Self {
        ContentionConfig {
            enabled: true,
            interval_ms: 5000,
            ebpf_object: None,
            mount_tracefs: true,
            sys_root: PathBuf::from("/sys"),
            attach: Attach::Auto,
        }
    }
}

/// Shortest and longest reporting interval. Below 100 ms the QMP queries
/// alone would cost more than the figures are worth; the allocator takes
/// at most an hour.
const MIN_INTERVAL_MS: u64 = 100;
const MAX_INTERVAL_MS: u64 = 3_600_000;
/// How long one VM's `query-cpus-fast` may take before the round goes on
/// with that VM's previous threads.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

impl ContentionConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(format!(
                "contention.interval_ms = {} must be between {MIN_INTERVAL_MS} and {MAX_INTERVAL_MS}",
                self.interval_ms
            ));
        }
        Ok(())
    }
}

/// Where the figures come from: [`RunQueue`] on a real host, a fake in tests.
pub trait DelaySource: Send {
    fn set_threads(&mut self, vm: &str, tids: &[u32]) -> ebpf::Result<()>;
    fn retain_vms(&mut self, keep: &dyn Fn(&str) -> bool) -> ebpf::Result<()>;
    fn read(&mut self) -> ebpf::Result<BTreeMap<String, RunQueueDelay>>;
}

impl DelaySource for RunQueue {
    fn set_threads(&mut self, vm: &str, tids: &[u32]) -> ebpf::Result<()> {
        RunQueue::set_threads(self, vm, tids)
    }
    fn retain_vms(&mut self, keep: &dyn Fn(&str) -> bool) -> ebpf::Result<()> {
        RunQueue::retain_vms(self, keep)
    }
    fn read(&mut self) -> ebpf::Result<BTreeMap<String, RunQueueDelay>> {
        RunQueue::read(self)
    }
}

/// Everything the task needs from the node.
#[derive(Clone)]
pub struct ContentionNode {
    pub hypervisors: Hypervisors,
    pub registry: Arc<Registry>,
    pub session: watch::Receiver<Session>,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ContentionNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vms: Vec<String> =
            self.hypervisors.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        f.debug_struct("ContentionNode").field("vms", &vms).finish_non_exhaustive()
    }
}

/// Loads the programs and runs the reporting loop until `cancel`. Without
/// eBPF it logs why, once, and returns.
pub async fn run(cfg: ContentionConfig, proc_root: PathBuf, node: ContentionNode, cancel: CancellationToken) {
    if !cfg.enabled {
        info!("run-queue delay of vCPU threads is not measured: contention.enabled = false");
        return;
    }
    let rq_cfg = RunQueueConfig {
        object: cfg.ebpf_object.clone(),
        mount_tracefs: cfg.mount_tracefs,
        proc_root,
        sys_root: cfg.sys_root.clone(),
        attach: cfg.attach,
    };
    let rq = match RunQueue::new(&rq_cfg) {
        Ok(rq) => rq,
        Err(e) => {
            warn!("run-queue delay of vCPU threads is not measured, no contention reports: {}", Chain(&e));
            return;
        }
    };
    info!(object = %rq.object().display(), attached = ?rq.attached(), "measuring run-queue delay of vCPU threads");
    report_loop(rq, Duration::from_millis(cfg.interval_ms), node, cancel).await;
}

/// The loop proper, over any [`DelaySource`].
pub async fn report_loop<S: DelaySource>(
    mut source: S,
    interval: Duration,
    node: ContentionNode,
    cancel: CancellationToken,
) {
    let mut quiet = Quiet::default();
    let mut shown: BTreeSet<String> = BTreeSet::new();
    refresh_threads(&mut source, &node.hypervisors, &mut quiet).await;
    let mut since = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let figures = match source.read() {
            Ok(f) => {
                quiet.ok("read");
                f
            }
            Err(e) => {
                quiet.failed("read", &format!("reading run-queue delay: {}", Chain(&e)));
                BTreeMap::new()
            }
        };
        let took = since.elapsed();
        since = Instant::now();
        shown = export(&node.metrics, &figures, &shown);
        let registered: BTreeSet<String> = node.registry.snapshot().into_iter().map(|(id, _)| id).collect();
        let msg = report(&figures, |vm| registered.contains(vm), took);
        let session = node.session.borrow().clone();
        if let Some(s) = session {
            match s.call(Body::NodeContention(msg)).await {
                Ok(_) => quiet.ok("send"),
                Err(e) => quiet.failed("send", &format!("cannot report contention to the allocator: {e}")),
            }
        }
        refresh_threads(&mut source, &node.hypervisors, &mut quiet).await;
    }
}

/// Asks every connected VM's QEMU for its vCPU threads and watches exactly
/// those; VMs that left stop being watched. A VM whose query fails keeps
/// its previous threads for this round.
async fn refresh_threads<S: DelaySource>(source: &mut S, hvs: &Hypervisors, quiet: &mut Quiet) {
    let vms: Vec<(String, Arc<dyn VcpuThreads>)> =
        hvs.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let answers =
        futures::future::join_all(vms.iter().map(|(vm, hv)| async move {
            (vm, tokio::time::timeout(QUERY_TIMEOUT, hv.vcpu_threads()).await)
        }))
        .await;
    for (vm, answer) in answers {
        let threads = match answer {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                debug!(%vm, "cannot list vCPU threads: {e}");
                continue;
            }
            Err(_) => {
                debug!(%vm, "listing vCPU threads timed out after {QUERY_TIMEOUT:?}");
                continue;
            }
        };
        let tids: Vec<u32> =
            threads.iter().filter_map(|t| u32::try_from(t.thread_id).ok()).filter(|t| *t > 0).collect();
        match source.set_threads(vm, &tids) {
            Ok(()) => quiet.ok("watch"),
            Err(e) => quiet.failed("watch", &format!("cannot watch vCPU threads of {vm}: {}", Chain(&e))),
        }
    }
    let present: BTreeSet<&str> = vms.iter().map(|(vm, _)| vm.as_str()).collect();
    if let Err(e) = source.retain_vms(&|vm| present.contains(vm)) {
        quiet.failed("watch", &format!("cannot stop watching threads of VMs that left: {}", Chain(&e)));
    }
}

/// Sets the per-VM gauges; returns the VMs shown, dropping the series of
/// those no longer there.
fn export(
    m: &Metrics,
    figures: &BTreeMap<String, RunQueueDelay>,
    shown_before: &BTreeSet<String>,
) -> BTreeSet<String> {
    let secs = |ns: u64| ns as f64 / 1e9;
    for (vm, d) in figures {
        for (stat, ns) in [("p50", d.p50_ns), ("p99", d.p99_ns), ("mean", d.mean_ns), ("max", d.max_ns)] {
            m.run_queue_delay.get_or_create(&DelayLabels { vm: vm.clone(), stat }).set(secs(ns));
        }
        m.run_queue_waits.get_or_create(&VmLabel { vm: vm.clone() }).inc_by(d.samples);
    }
    for gone in shown_before.iter().filter(|vm| !figures.contains_key(*vm)) {
        m.forget_run_queue(gone);
    }
    figures.keys().cloned().collect()
}

/// The allocator's message: the registered VMs' figures in µs, rounded up
/// (a wait of 300 ns is not "0 µs of delay"), and made consistent for its
/// checks (p50 <= p99 <= max, mean <= max) where a read raced an update.
pub fn report(
    figures: &BTreeMap<String, RunQueueDelay>,
    registered: impl Fn(&str) -> bool,
    interval: Duration,
) -> pb::NodeContention {
    let us = |ns: u64| ns.div_ceil(1000);
    let vms = figures
        .iter()
        .filter(|(vm, _)| registered(vm))
        .map(|(vm, d)| {
            if d.samples == 0 {
                return pb::VmContention { vm_id: vm.clone(), ..Default::default() };
            }
            let p99 = us(d.p99_ns);
            let p50 = us(d.p50_ns).min(p99);
            let mean = us(d.mean_ns);
            let max = us(d.max_ns).max(p99).max(mean);
            pb::VmContention {
                vm_id: vm.clone(),
                p50_us: p50,
                p99_us: p99,
                mean_us: mean,
                max_us: max,
                samples: d.samples,
            }
        })
        .collect();
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).clamp(1, MAX_INTERVAL_MS);
    pb::NodeContention { vms, interval_ms }
}

/// Logs a failure of each kind once until that kind succeeds again, so a
/// lasting problem costs one line, not one per interval.
#[derive(Debug, Default)]
struct Quiet {
    failing: BTreeSet<&'static str>,
}

impl Quiet {
    fn failed(&mut self, what: &'static str, msg: &str) {
        if self.failing.insert(what) {
            warn!("{msg} (said once until it works again)");
        } else {
            debug!("{msg}");
        }
    }

    fn ok(&mut self, what: &'static str) {
        if self.failing.remove(what) {
            info!("{what} works again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::fake::FakeHypervisor;
    use crate::qmp::VmSize;

    #[derive(Default)]
    struct FakeSource {
        watched: Arc<Mutex<BTreeMap<String, Vec<u32>>>>,
        figures: BTreeMap<String, RunQueueDelay>,
    }

    impl DelaySource for FakeSource {
        fn set_threads(&mut self, vm: &str, tids: &[u32]) -> ebpf::Result<()> {
            self.watched.lock().unwrap().insert(vm.to_owned(), tids.to_vec());
            Ok(())
        }
        fn retain_vms(&mut self, keep: &dyn Fn(&str) -> bool) -> ebpf::Result<()> {
            self.watched.lock().unwrap().retain(|vm, _| keep(vm));
            Ok(())
        }
        fn read(&mut self) -> ebpf::Result<BTreeMap<String, RunQueueDelay>> {
            let w = self.watched.lock().unwrap();
            Ok(self
                .figures
                .iter()
                .filter(|(vm, _)| w.contains_key(*vm))
                .map(|(k, v)| (k.clone(), *v))
                .collect())
        }
    }

    fn delay(p99_us: u64) -> RunQueueDelay {
        RunQueueDelay {
            samples: 10,
            sum_ns: 10 * 1_000,
            mean_ns: 1_000,
            p50_ns: 500,
            p99_ns: p99_us * 1000,
            max_ns: p99_us * 1000,
        }
    }

    #[test]
    fn report_rounds_up_keeps_registered_vms_and_is_consistent() {
        let mut f = BTreeMap::new();
        f.insert("a".to_owned(), RunQueueDelay { p50_ns: 300, p99_ns: 2_500, max_ns: 2_000, ..delay(0) });
        f.insert("b".to_owned(), RunQueueDelay::default());
        f.insert("unregistered".to_owned(), delay(9));
        let r = report(&f, |vm| vm != "unregistered", Duration::from_millis(5003));
        assert_eq!(r.interval_ms, 5003);
        assert_eq!(r.vms.len(), 2);
        let a = &r.vms[0];
        // 300 ns -> 1 µs; max raised to p99 (a read that raced an update).
        assert_eq!((a.p50_us, a.p99_us, a.mean_us, a.max_us, a.samples), (1, 3, 1, 3, 10));
        assert_eq!(r.vms[1], pb::VmContention { vm_id: "b".into(), ..Default::default() });
        // The allocator's own checks accept what we send.
        let wire = vmscale_allocator::core::contention::ContentionReport::try_from(r);
        assert!(wire.is_ok(), "{wire:?}");
    }

    #[test]
    fn config_interval_is_bounded() {
        let c: crate::config::Config =
            toml::from_str("node = \"n\"\n[contention]\ninterval_ms = 1000\nattach = \"raw\"\n").unwrap();
        assert_eq!(
            (c.contention.interval_ms, c.contention.attach, c.contention.enabled),
            (1000, Attach::Raw, true)
        );
        assert!(toml::from_str::<crate::config::Config>("[contention]\nintervall_ms = 1\n").is_err());
        assert!(ContentionConfig::default().validate().is_ok());
        let e = ContentionConfig { interval_ms: 10, ..ContentionConfig::default() }.validate().unwrap_err();
        assert!(e.contains("interval_ms"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn loop_watches_each_vms_threads_and_exports_figures() {
        let hvs: Hypervisors = Arc::default();
        let size = |n| VmSize { vcpus_present: n, vcpu_slots: 4, ..VmSize::default() };
        hvs.lock().unwrap().insert("a".into(), Arc::new(FakeHypervisor::new(size(2))));
        hvs.lock().unwrap().insert("b".into(), Arc::new(FakeHypervisor::new(size(1))));
        let watched = Arc::new(Mutex::new(BTreeMap::new()));
        let source = FakeSource {
            watched: watched.clone(),
            figures: [("a".to_owned(), delay(40)), ("b".to_owned(), delay(7))].into_iter().collect(),
        };
        let (_tx, rx) = watch::channel(None);
        let node = ContentionNode {
            hypervisors: hvs.clone(),
            registry: Arc::default(),
            session: rx,
            metrics: Arc::default(),
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(report_loop(source, Duration::from_secs(5), node.clone(), cancel.clone()));
        tokio::time::sleep(Duration::from_millis(5100)).await;
        assert_eq!(watched.lock().unwrap()["a"], vec![1000, 1001]);
        let text = node.metrics.render();
        assert!(
            text.contains(r#"vmscale_agent_vm_run_queue_delay_seconds{vm="a",stat="p99"} 0.00004"#),
            "{text}"
        );
        assert!(text.contains(r#"vmscale_agent_vm_run_queue_waits_total{vm="b"} 10"#), "{text}");
        // b leaves: its threads are dropped and its series go after the next read.
        hvs.lock().unwrap().remove("b");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!watched.lock().unwrap().contains_key("b"));
        assert!(!node.metrics.render().contains(r#"vm="b""#));
        cancel.cancel();
        task.await.unwrap();
    }
}
