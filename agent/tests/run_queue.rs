//! Run-queue delay on this machine's real kernel: the `sched` programs load
//! and attach; a watched thread sharing a CPU with two busy threads shows a
//! non-zero delay while threads nobody watches add nothing; and the figures
//! travel from the kernel through the agent's contention task to a real
//! allocator's ledger and metrics.
//!
//! Needs root, BTF and the object from `cargo xtask build-ebpf`. Under
//! `CI=true` a test that cannot run fails with the reason; elsewhere it
//! prints the reason and passes.

#![allow(clippy::unwrap_used)]

mod qmp_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vmscale_agent::core::policy::{Cu, Size};
use vmscale_agent::ebpf::{find_object, Attach, RunQueue, RunQueueConfig};
use vmscale_agent::links::allocator::{registration, Registered};
use vmscale_agent::node::contention::{self, ContentionConfig, ContentionNode, Hypervisors};
use vmscale_agent::qmp::types::{CpuProps, VcpuThread};
use vmscale_agent::qmp::{Hotplug, VcpuThreads};
use vmscale_common::error::chain;
use vmscale_proto::allocator as pb;

/// Tests that load programs run one at a time, so one's busy threads don't
/// disturb the other's figures.
static KERNEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The CPU the contended threads share.
const CPU: usize = 0;

/// Fails under `CI=true`, else says why the test skips.
fn skip_unless_ci(reason: &str) {
    vmscale_common::testing::skip_unless_ci(reason);
}

/// The loader config, or `None` (after skip_unless_ci) when this machine
/// can't run the test.
fn prerequisites() -> Option<RunQueueConfig> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        skip_unless_ci("the run-queue eBPF tests need root (to load programs)");
        return None;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").is_file() {
        skip_unless_ci("the kernel has no BTF (/sys/kernel/btf/vmlinux)");
        return None;
    }
    match find_object(None) {
        Ok(object) => Some(RunQueueConfig { object: Some(object), ..RunQueueConfig::default() }),
        Err(e) => {
            skip_unless_ci(&e.to_string());
            None
        }
    }
}

fn gettid() -> u32 {
    // SAFETY: gettid takes no arguments, cannot fail and touches no memory.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    u32::try_from(tid).unwrap()
}

fn pin_to(cpu: usize) {
    // SAFETY: `set` is a plain bitmask we own; CPU_ZERO/CPU_SET only write
    // inside it (cpu < CPU_SETSIZE), and sched_setaffinity(0, ..) reads
    // exactly size_of::<cpu_set_t>() bytes of it for the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

/// Threads that share CPU 0: two spinning ones and one that sleeps 1 ms and
/// spins 100 µs in turn, so it is woken ~700 times a second into a busy run
/// queue. Plus one that only blocks. Stopped on drop.
struct Contention {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The thread that keeps waking up, and its wakeups.
    waker: u32,
    wakeups: Arc<AtomicU64>,
    /// A thread that never runs after it started.
    sleeper: u32,
    busy: Vec<u32>,
    sleeper_wake: Option<mpsc::Sender<()>>,
}

impl Contention {
    fn start() -> Contention {
        let stop = Arc::new(AtomicBool::new(false));
        let wakeups = Arc::new(AtomicU64::new(0));
        let (tid_tx, tid_rx) = mpsc::channel::<u32>();
        let mut threads = Vec::new();
        let mut busy = Vec::new();
        for _ in 0..2 {
            let (stop, tx) = (stop.clone(), tid_tx.clone());
            threads.push(std::thread::spawn(move || {
                pin_to(CPU);
                tx.send(gettid()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            }));
            busy.push(tid_rx.recv().unwrap());
        }
        let (s, w, tx) = (stop.clone(), wakeups.clone(), tid_tx.clone());
        threads.push(std::thread::spawn(move || {
            pin_to(CPU);
            tx.send(gettid()).unwrap();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
                w.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(100) {
                    std::hint::spin_loop();
                }
            }
        }));
        let waker = tid_rx.recv().unwrap();
        let (wake_tx, wake_rx) = mpsc::channel::<()>();
        threads.push(std::thread::spawn(move || {
            pin_to(CPU);
            tid_tx.send(gettid()).unwrap();
            let _ = wake_rx.recv();
        }));
        let sleeper = tid_rx.recv().unwrap();
        // It sent its id before it blocked; on the crowded CPU it may still
        // be queued (preempted) between the two, and that wait would count
        // once it runs. Hand it over only once it sleeps for good.
        wait_until_sleeping(sleeper);
        Contention { stop, threads, waker, wakeups, sleeper, busy, sleeper_wake: Some(wake_tx) }
    }
}

/// Waits until thread `tid` of this process is blocked (state `S`).
fn wait_until_sleeping(tid: u32) {
    let path = format!("/proc/self/task/{tid}/stat");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(&path).unwrap();
        // The state follows the command name, which ends with the last ')'.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        if state == Some("S") {
            return;
        }
        assert!(Instant::now() < deadline, "thread {tid} never blocked: {stat}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Drop for Contention {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.sleeper_wake.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[tokio::test]
async fn programs_load_and_attach_raw_and_classic() {
    let Some(cfg) = prerequisites() else { return };
    let _k = KERNEL.lock().await;
    let tps: Vec<String> = RunQueue::tracepoints().collect();
    assert_eq!(tps, ["sched/sched_wakeup", "sched/sched_wakeup_new", "sched/sched_switch"]);
    // This kernel (6.x with BTF) takes the raw programs; auto picks them.
    for (want, attach) in
        [(Attach::Raw, Attach::Auto), (Attach::Raw, Attach::Raw), (Attach::Tracepoint, Attach::Tracepoint)]
    {
        let rq = RunQueue::new(&RunQueueConfig { attach, ..cfg.clone() })
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(rq.attached(), want);
        assert!(rq.kernel_tids().unwrap().is_empty());
        println!("{attach:?}: loaded {} and attached {} as {want:?}", rq.object().display(), tps.join(", "));
    }
}

#[tokio::test]
async fn raw_a_watched_thread_on_a_busy_cpu_waits_and_unwatched_threads_add_nothing() {
    watched_thread_waits(Attach::Raw).await;
}

#[tokio::test]
async fn classic_a_watched_thread_on_a_busy_cpu_waits_and_unwatched_threads_add_nothing() {
    watched_thread_waits(Attach::Tracepoint).await;
}

async fn watched_thread_waits(attach: Attach) {
    let Some(cfg) = prerequisites() else { return };
    let _k = KERNEL.lock().await;
    let cfg = RunQueueConfig { attach, ..cfg };
    let mut rq = RunQueue::new(&cfg).unwrap_or_else(|e| panic!("{}", chain(&e)));
    let load = Contention::start();
    rq.set_threads("vm-a", &[load.waker]).unwrap();
    rq.set_threads("vm-b", &[load.sleeper]).unwrap();
    let mut want = vec![load.waker, load.sleeper];
    want.sort_unstable();
    assert_eq!(rq.kernel_tids().unwrap(), want, "only the watched threads are in the kernel map");

    let _ = rq.read().unwrap();
    let w0 = load.wakeups.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = rq.read().unwrap();
    let wakeups = load.wakeups.load(Ordering::Relaxed) - w0;
    let a = r["vm-a"];
    println!(
        "{attach:?}: vm-a over 2 s: {} waits ({wakeups} wakeups), mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        a.samples,
        a.mean_ns as f64 / 1e3,
        a.p50_ns as f64 / 1e3,
        a.p99_ns as f64 / 1e3,
        a.max_ns as f64 / 1e3
    );
    // Every wakeup of the waker is one wait; preemptions in its spins add
    // some. The busy threads wait far more often; none of that may show.
    assert!(a.samples >= wakeups / 2 && a.samples > 20, "{a:?}, {wakeups} wakeups");
    assert!(a.samples <= wakeups * 3 + 20, "{a:?}: more waits than the watched thread can have");
    assert!(a.mean_ns > 0 && a.p99_ns > 0 && a.max_ns > 0, "{a:?}");
    assert!(a.p50_ns <= a.p99_ns && a.p99_ns <= a.max_ns && a.mean_ns <= a.max_ns, "{a:?}");
    assert_eq!(r["vm-b"].samples, 0, "a thread that never wakes never waits: {:?}", r["vm-b"]);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(load.busy.iter().all(|t| !rq.kernel_tids().unwrap().contains(t)));

    // Stop watching the waker: it still waits behind the busy threads, but
    // nothing of it is counted any more.
    rq.set_threads("vm-a", &[]).unwrap();
    assert_eq!(rq.kernel_tids().unwrap(), vec![load.sleeper]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = rq.read().unwrap();
    assert_eq!(r["vm-a"].samples, 0, "{:?}", r["vm-a"]);
}

/// A QEMU stand-in that only knows its vCPU threads.
#[derive(Debug)]
struct Threads(Vec<u32>);

#[async_trait]
impl VcpuThreads for Threads {
    async fn vcpu_threads(&self) -> vmscale_agent::qmp::Result<Vec<VcpuThread>> {
        Ok(self
            .0
            .iter()
            .enumerate()
            .map(|(i, t)| VcpuThread {
                cpu_index: u32::try_from(i).unwrap(),
                thread_id: i64::from(*t),
                qom_path: format!("/machine/test/cpu{i}"),
                props: CpuProps::default(),
            })
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_reach_the_allocator_ledger_and_metrics() {
    let Some(cfg) = prerequisites() else { return };
    let _k = KERNEL.lock().await;
    // A real allocator on port 0.
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let stop = CancellationToken::new();
    let shared =
        vmscale_allocator::shared::Shared::new(vmscale_allocator::config::Config::default(), stop.clone());
    let server = tokio::spawn(vmscale_allocator::server::serve(shared.clone(), grpc, http));

    let cu = Cu { milli_cpu: 250, memory_bytes: 1 << 30 };
    let reg = Registered {
        current: Size::of_cus(2, cu),
        permitted: Size::of_cus(2, cu),
        cu,
        min_cus: 1,
        max_cus: 8,
    };
    let registry = Arc::new(vmscale_agent::links::allocator::Registry::default());
    registry.set("vm-a", reg);
    let hello = pb::Hello {
        versions: Some(pb::VersionRange { min: 1, max: 1 }),
        node: "node-a".into(),
        capacity: Some(pb::Resources { milli_cpu: 2000, memory_bytes: 8 << 30 }),
        vms: vec![registration("vm-a", &reg)],
        agent: "run_queue test".into(),
        migration_endpoint: String::new(),
    };
    let ch = vmscale_allocator_client::channel(&addr).await.unwrap();
    let session = vmscale_allocator_client::SessionClient::open(ch, hello).await.unwrap();
    let session: vmscale_agent::links::allocator::Session = Some(Arc::new(session));
    let (_session_tx, session_rx) = watch::channel(session);

    let load = Contention::start();
    let hypervisors: Hypervisors = Arc::default();
    hypervisors.lock().unwrap().insert("vm-a".into(), Arc::new(Threads(vec![load.waker])));
    let metrics = Arc::new(vmscale_agent::metrics::Metrics::new());
    let node = ContentionNode { hypervisors, registry, session: session_rx, metrics: metrics.clone() };
    let ccfg =
        ContentionConfig { interval_ms: 500, ebpf_object: cfg.object.clone(), ..ContentionConfig::default() };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(contention::run(ccfg, "/proc".into(), node, cancel.clone()));

    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let c = shared.lock().cluster.node("node-a").and_then(|n| n.contention.clone());
        if let Some(c) = c.filter(|c| c.vms.get("vm-a").is_some_and(|v| v.samples > 0)) {
            break c;
        }
        assert!(Instant::now() < deadline, "no contention report with samples reached the allocator in 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let v = got.vms["vm-a"];
    println!("allocator holds for vm-a over {} ms: {v:?}", got.interval_ms);
    assert!(v.p99_us > 0 && v.max_us >= v.p99_us, "{v:?}");
    assert!((400..=2000).contains(&got.interval_ms), "{got:?}");
    let text = shared.metrics.render(&shared.lock().cluster);
    assert!(text.contains(r#"vmscale_allocator_node_run_queue_delay_p99_seconds{node="node-a"}"#), "{text}");
    let agent_text = metrics.render();
    assert!(agent_text.contains(r#"vmscale_agent_vm_run_queue_delay_seconds{vm="vm-a",stat="p99"}"#));

    cancel.cancel();
    task.await.unwrap();
    drop(load);
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

/// The thread ids QEMU reports are host threads of the QEMU process, get
/// watched, and a hot-plugged vCPU's new thread joins at the next refresh.
#[tokio::test]
async fn qemu_vcpu_threads_are_watched_across_a_hotplug() {
    let Some(cfg) = prerequisites() else { return };
    let Some(q) = qmp_support::TestQemu::start("qemu_vcpu_threads_are_watched", |_| {}).await else { return };
    let _k = KERNEL.lock().await;
    let vm = q.vm().await;
    let pid = q.qemu.pid().unwrap();
    let tids = |threads: Vec<VcpuThread>| -> Vec<u32> {
        threads.iter().map(|t| u32::try_from(t.thread_id).unwrap()).collect()
    };
    let before = tids(vm.vcpu_threads().await.unwrap());
    assert!(!before.is_empty());
    for t in &before {
        assert!(
            Path::new(&format!("/proc/{pid}/task/{t}")).exists(),
            "vCPU thread {t} is not a thread of QEMU {pid}"
        );
        assert_eq!(vmscale_agent::vm_loop::cpu_max::process_of_thread(Path::new("/proc"), *t).unwrap(), pid);
    }
    let mut rq = RunQueue::new(&cfg).unwrap_or_else(|e| panic!("{}", chain(&e)));
    rq.set_threads("qemu", &before).unwrap();
    vm.plug_vcpu().await.unwrap();
    let after = tids(vm.vcpu_threads().await.unwrap());
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    rq.set_threads("qemu", &after).unwrap();
    let mut want = after.clone();
    want.sort_unstable();
    assert_eq!(rq.kernel_tids().unwrap(), want);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = rq.read().unwrap();
    println!("QEMU (TCG, no guest) vCPU threads {after:?} over 0.5 s: {:?}", r["qemu"]);
}

/// The whole agent: the node supervisor finds the VM's QEMU, the contention
/// task watches its vCPU threads and reports them to the allocator; with
/// `cpu_max_cgroup` the VM loop sets QEMU's quota for its size at start
/// (here 1 vCPU, a whole one: the quota a launcher left is lifted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_agent_reports_contention_and_sets_the_quota() {
    use vmscale_agent::node::{self, NodeHandles};
    use vmscale_agent::vms::{CpuMode, MemoryMode, VmSpec};
    let Some(cfg) = prerequisites() else { return };
    let Some(q) = qmp_support::TestQemu::start("the_node_agent_reports_contention", |_| {}).await else {
        return;
    };
    let _k = KERNEL.lock().await;
    // QEMU in a v1 cpu cgroup of its own, with a quota to lift, where the host has one.
    let cgroup = Path::new("/sys/fs/cgroup/cpu").join(format!("vmscale-rq-test-{}", std::process::id()));
    let jailed = Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").is_file()
        && std::fs::create_dir_all(&cgroup).is_ok()
        && std::fs::write(cgroup.join("cpu.cfs_quota_us"), "12345").is_ok()
        && std::fs::write(cgroup.join("cgroup.procs"), q.qemu.pid().unwrap().to_string()).is_ok();

    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let stop = CancellationToken::new();
    let shared =
        vmscale_allocator::shared::Shared::new(vmscale_allocator::config::Config::default(), stop.clone());
    let server = tokio::spawn(vmscale_allocator::server::serve(shared.clone(), grpc, http));

    let (session_tx, session_rx) = watch::channel(None);
    let handles = NodeHandles::new(session_rx, None);
    let policy = vmscale_agent::core::policy::Policy { cpu_max_cgroup: true, ..Default::default() };
    // The node as the binary builds it from its config.
    let config = vmscale_agent::config::Config {
        node: "node-a".into(),
        allocator: addr,
        // A plain-text allocator on loopback.
        insecure: true,
        allocator_retry_base_ms: 50,
        allocator_retry_max_ms: 500,
        qmp_timeout_ms: 5000,
        unplug_timeout_ms: 300,
        policy: policy.clone(),
        contention: ContentionConfig {
            interval_ms: 200,
            ebpf_object: cfg.object.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let node_cfg = vmscale_agent::daemon::node_config(&config, Size::new(2000, 4 << 30));
    let spec = VmSpec {
        id: "pg-1".into(),
        qmp: q.qemu.endpoint().to_string(),
        informant: None,
        cu: Cu { milli_cpu: 250, memory_bytes: 256 << 20 },
        min_cus: 1,
        max_cus: 8,
        cpu_mode: CpuMode::Sysfs,
        memory: MemoryMode::Dimm { dimm_bytes: 256 << 20 },
        policy: Some(policy),
    };
    let (vms_tx, vms_rx) = watch::channel(vec![spec]);
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(node::run(node_cfg, vms_rx, handles.clone(), session_tx, cancel.clone()));

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reported = shared
            .lock()
            .cluster
            .node("node-a")
            .and_then(|n| n.contention.as_ref().map(|c| c.vms.contains_key("pg-1")))
            .unwrap_or(false);
        if reported {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never reported pg-1's contention");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = handles.metrics.render();
    assert!(text.contains(r#"vmscale_agent_vm_run_queue_delay_seconds{vm="pg-1",stat="p99"}"#), "{text}");
    if jailed {
        let quota = std::fs::read_to_string(cgroup.join("cpu.cfs_quota_us")).unwrap();
        assert_eq!(quota.trim(), "-1", "the VM loop did not lift the quota for a whole vCPU");
    } else {
        eprintln!("no v1 cpu cgroup here: the quota part was not checked");
    }

    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    drop(vms_tx);
    drop(q); // QEMU dies: its cgroup empties
    let gone = Instant::now() + Duration::from_secs(5);
    while jailed && std::fs::remove_dir(&cgroup).is_err() && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

#[test]
fn a_missing_object_is_named_in_the_error() {
    let cfg =
        RunQueueConfig { object: Some("/nonexistent/vmscale.bpf.o".into()), ..RunQueueConfig::default() };
    let e = RunQueue::new(&cfg).unwrap_err().to_string();
    assert!(e.contains("object file is missing") && e.contains("/nonexistent/vmscale.bpf.o"), "{e}");
}
