//! The agent against a real allocator (gRPC on loopback) and a real QEMU (TCG,
//! no guest). The informant is a scripted gRPC server here: it sends the
//! events the test chooses and records what the agent tells it (the real
//! informant inside a real guest is the end-to-end tests' part).

#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod qmp_support;

use qmp_support::{TestQemu, MIB};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use vmscale_agent::config::Config;
use vmscale_agent::core::policy::{Cu, Policy, Size};
use vmscale_agent::daemon;
use vmscale_agent::node::{self, NodeHandles};
use vmscale_agent::qmp::Hotplug;
use vmscale_agent::vms::{CpuMode, MemoryMode, VmSpec};
use vmscale_allocator::shared::Shared;
use vmscale_proto::informant as ipb;
use vmscale_proto::informant::informant_server::{Informant, InformantServer};

/// What the scripted informant says of its guest's kernel settings.
const SCRIPTED_NOTE: &str = "memory_hotplug.memmap_on_memory is off (scripted)";

/// A scripted informant: the test pushes events; answers are recorded.
#[derive(Clone, Default)]
struct Scripted {
    events: Arc<Mutex<Option<mpsc::Receiver<Result<ipb::Event, tonic::Status>>>>>,
    notices: Arc<Mutex<Vec<ipb::UpscaleNotice>>>,
    downscale_asks: Arc<Mutex<Vec<ipb::DownscaleRequest>>>,
    approve: Arc<Mutex<bool>>,
}

#[tonic::async_trait]
impl Informant for Scripted {
    type SubscribeStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<ipb::Event, tonic::Status>> + Send>>;

    async fn handshake(
        &self,
        _: tonic::Request<ipb::HandshakeRequest>,
    ) -> Result<tonic::Response<ipb::HandshakeResponse>, tonic::Status> {
        Ok(tonic::Response::new(ipb::HandshakeResponse {
            version: 1,
            guest_notes: vec![SCRIPTED_NOTE.into()],
            ..Default::default()
        }))
    }

    async fn subscribe(
        &self,
        _: tonic::Request<ipb::SubscribeRequest>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        let rx = self
            .events
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| tonic::Status::unavailable("one subscriber in this test"))?;
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn try_downscale(
        &self,
        r: tonic::Request<ipb::DownscaleRequest>,
    ) -> Result<tonic::Response<ipb::DownscaleResponse>, tonic::Status> {
        self.downscale_asks.lock().unwrap().push(r.into_inner());
        let approved = *self.approve.lock().unwrap();
        Ok(tonic::Response::new(ipb::DownscaleResponse {
            approved,
            reason: if approved { String::new() } else { "the workload holds the memory".into() },
            now: None,
        }))
    }

    async fn notify_upscale(
        &self,
        r: tonic::Request<ipb::UpscaleNotice>,
    ) -> Result<tonic::Response<ipb::GuestResources>, tonic::Status> {
        let n = r.into_inner();
        let res = ipb::GuestResources {
            online_cpus: n.cpus,
            memory_total_bytes: n.memory_bytes,
            ..Default::default()
        };
        self.notices.lock().unwrap().push(n);
        Ok(tonic::Response::new(res))
    }
}

async fn start_informant(
) -> (String, Scripted, mpsc::Sender<Result<ipb::Event, tonic::Status>>, CancellationToken) {
    let (tx, rx) = mpsc::channel(64);
    let s = Scripted { events: Arc::new(Mutex::new(Some(rx))), ..Default::default() };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let stop = CancellationToken::new();
    let svc = InformantServer::new(s.clone());
    let st = stop.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(l),
                st.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    (addr, s, tx, stop)
}

async fn start_allocator() -> (String, Arc<Shared>, CancellationToken) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let stop = CancellationToken::new();
    let shared = Shared::new(vmscale_allocator::config::Config::default(), stop.clone());
    let sh = shared.clone();
    tokio::spawn(async move { vmscale_allocator::server::serve(sh, grpc, http).await.unwrap() });
    (addr, shared, stop)
}

fn pressure() -> ipb::Event {
    ipb::Event {
        monotonic_ns: 1,
        source: "ebpf".into(),
        dropped: 0,
        body: Some(ipb::event::Body::Pressure(ipb::Pressure {
            kind: ipb::pressure::Kind::MemcgReclaim as i32,
            count: 3,
            stall_ns: 1000,
            pid: 0,
        })),
    }
}

fn sample(used: u64, total: u64) -> ipb::Event {
    ipb::Event {
        monotonic_ns: 2,
        source: "sampler".into(),
        dropped: 0,
        body: Some(ipb::event::Body::Sample(ipb::Sample {
            workload_anon_bytes: used,
            mem_available_bytes: total - used,
            mem_total_bytes: total,
            online_cpus: 1,
            load_avg_1: 0.1,
            ..Default::default()
        })),
    }
}

/// QEMU serves one client per QMP socket and the agent holds the main one:
/// the test watches through a second monitor.
fn second_monitor(o: &mut vmscale_agent::qmp::process::QemuOptions) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("vmscale-agent-test-{}-{n}.qmp", std::process::id()));
    let _ = std::fs::remove_file(&p);
    o.paused = true;
    o.extra_args.extend(["-qmp".to_owned(), format!("unix:{},server=on,wait=off", p.display())]);
    p
}

async fn watcher(path: &std::path::Path) -> vmscale_agent::qmp::QmpVm {
    let ep = vmscale_agent::qmp::Endpoint::Unix(path.to_owned());
    // QEMU creates its monitors one after another: wait for this one.
    for _ in 0..100 {
        if let Ok(c) = vmscale_agent::qmp::QmpClient::connect(&ep, qmp_support::client_config()).await {
            return vmscale_agent::qmp::QmpVm::new(c, qmp_support::hotplug_config());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("second QMP monitor {} never came up", path.display());
}

const CU: Cu = Cu { milli_cpu: 250, memory_bytes: 256 * MIB };

struct Agent {
    handles: NodeHandles,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_agent(allocator: &str, capacity: Size, spec: VmSpec, policy: Policy) -> Agent {
    let (session_tx, session_rx) = watch::channel(None);
    let handles = NodeHandles::new(session_rx, None);
    // The node as the binary builds it from its config.
    let config = Config {
        node: "node-a".into(),
        allocator: allocator.to_owned(),
        // A plain-text allocator and informant on loopback.
        insecure: true,
        allocator_retry_base_ms: 50,
        allocator_retry_max_ms: 500,
        qmp_timeout_ms: 5000,
        unplug_timeout_ms: 300,
        policy,
        ..Config::default()
    };
    let cfg = daemon::node_config(&config, capacity);
    let (_vms_tx, vms_rx) = watch::channel(vec![spec]);
    let stop = CancellationToken::new();
    let h = handles.clone();
    let st = stop.clone();
    let task = tokio::spawn(async move {
        let _keep = _vms_tx;
        node::run(cfg, vms_rx, h, session_tx, st).await;
    });
    Agent { handles, stop, task }
}

fn spec(qemu: &TestQemu, informant: &str) -> VmSpec {
    VmSpec {
        id: "pg-1".into(),
        qmp: qemu.qemu.endpoint().to_string(),
        informant: Some(informant.parse().unwrap()),
        cu: CU,
        min_cus: 1,
        max_cus: 8,
        cpu_mode: CpuMode::Sysfs,
        memory: MemoryMode::Dimm { dimm_bytes: 256 * MIB },
        policy: None,
    }
}

fn reserved(shared: &Shared, node: &str, vm: &str) -> Option<(u64, u64)> {
    let st = shared.lock();
    let e = st.cluster.node(node)?.vms.get(vm)?;
    Some((e.reserved.milli_cpu, e.reserved.memory_bytes))
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pressure_grows_the_vm_through_permit_plug_and_notice_and_survives_an_agent_restart() {
    let mut mon = std::path::PathBuf::new();
    let Some(qemu) = TestQemu::start("agent_allocator_qemu", |o| mon = second_monitor(o)).await else {
        return;
    };
    let vm = watcher(&mon).await;
    let (alloc_addr, shared, alloc_stop) = start_allocator().await;
    let (inf_addr, informant, events, inf_stop) = start_informant().await;
    let agent =
        start_agent(&alloc_addr, Size::new(4000, 4096 * MIB), spec(&qemu, &inf_addr), Policy::default());

    // The agent registers the VM as QEMU has it: 1 vCPU (sysfs mode), 256 MiB.
    eventually("registration", || reserved(&shared, "node-a", "pg-1") == Some((1000, 256 * MIB))).await;
    events.send(Ok(sample(100 * MIB, 256 * MIB))).await.unwrap();
    // A reclaim event: grow at once, by half and at least one CU.
    events.send(Ok(pressure())).await.unwrap();
    eventually("the guest told of the new size", || !informant.notices.lock().unwrap().is_empty()).await;
    let notice = informant.notices.lock().unwrap()[0];
    assert_eq!(notice.memory_bytes, 512 * MIB);
    assert_eq!(notice.cpu_mode(), ipb::CpuMode::Sysfs, "the VM spec's CPU mode goes with the notice");
    let size = vm.read_size().await.unwrap();
    assert_eq!((size.dimm_count, size.memory_bytes()), (1, 512 * MIB), "a real DIMM in QEMU");
    assert_eq!(
        reserved(&shared, "node-a", "pg-1"),
        Some((1000, 512 * MIB)),
        "permit before plug, held after"
    );

    // Kill the agent and start a new one: it reads the VM back from QEMU and
    // re-registers; nothing is counted twice.
    agent.stop.cancel();
    agent.task.await.unwrap();
    let (_e2, inf2_addr) = {
        let (addr, _s, tx, _stop) = start_informant().await;
        (tx, addr)
    };
    let agent =
        start_agent(&alloc_addr, Size::new(4000, 4096 * MIB), spec(&qemu, &inf2_addr), Policy::default());
    eventually("re-registration", || {
        agent.handles.status.lock().unwrap().get("pg-1").is_some_and(|s| s.allocator_connected)
    })
    .await;
    let st = agent.handles.status.lock().unwrap().get("pg-1").cloned().unwrap();
    assert_eq!(st.current, Size::new(1000, 512 * MIB), "size read back from QEMU");
    eventually("the informant's guest notes in the VM's status", || {
        agent.handles.status.lock().unwrap().get("pg-1").is_some_and(|s| s.guest_notes == [SCRIPTED_NOTE])
    })
    .await;
    let node = shared.lock().cluster.node("node-a").map(|n| n.reserved()).unwrap();
    assert_eq!((node.milli_cpu, node.memory_bytes), (1000, 512 * MIB), "one VM, counted once");
    agent.stop.cancel();
    agent.task.await.unwrap();
    alloc_stop.cancel();
    inf_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_denies_and_the_vm_stays_as_it_is() {
    let mut mon = std::path::PathBuf::new();
    let Some(qemu) = TestQemu::start("agent_full_node", |o| mon = second_monitor(o)).await else { return };
    let vm = watcher(&mon).await;
    let (alloc_addr, shared, alloc_stop) = start_allocator().await;
    let (inf_addr, informant, events, inf_stop) = start_informant().await;
    // The node holds exactly the VM as it is: no room for another CU.
    let agent =
        start_agent(&alloc_addr, Size::new(1000, 256 * MIB), spec(&qemu, &inf_addr), Policy::default());
    eventually("registration", || reserved(&shared, "node-a", "pg-1").is_some()).await;
    events.send(Ok(pressure())).await.unwrap();
    eventually("a denied request", || {
        agent
            .handles
            .metrics
            .render()
            .contains("vmscale_agent_operations_total{action=\"request_permit\",outcome=\"ok\"}")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(vm.read_size().await.unwrap().dimm_count, 0, "nothing plugged without a permit");
    assert!(informant.notices.lock().unwrap().is_empty());
    let n = shared.lock().cluster.node("node-a").map(|n| (n.reserved(), n.usable())).unwrap();
    assert!(n.0.fits_in(n.1), "nothing over-committed");
    agent.stop.cancel();
    agent.task.await.unwrap();
    alloc_stop.cancel();
    inf_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_downscale_keeps_the_memory() {
    let mut mon = std::path::PathBuf::new();
    let Some(qemu) = TestQemu::start("agent_denied_downscale", |o| mon = second_monitor(o)).await else {
        return;
    };
    let vm = watcher(&mon).await;
    let (alloc_addr, shared, alloc_stop) = start_allocator().await;
    let (inf_addr, informant, events, inf_stop) = start_informant().await;
    // Give the VM a DIMM first so there is something to take away.
    vm.plug_dimm(256 * MIB).await.unwrap();
    let policy =
        Policy { downscale_after_ms: 200, downscale_denied_cooldown_ms: 60_000, ..Policy::default() };
    let agent = start_agent(&alloc_addr, Size::new(4000, 4096 * MIB), spec(&qemu, &inf_addr), policy);
    eventually("registration", || reserved(&shared, "node-a", "pg-1") == Some((1000, 512 * MIB))).await;
    // Low use, sustained: the agent asks, the informant says no.
    for _ in 0..10 {
        events.send(Ok(sample(10 * MIB, 512 * MIB))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("a downscale question", || !informant.downscale_asks.lock().unwrap().is_empty()).await;
    let ask = informant.downscale_asks.lock().unwrap()[0];
    assert_eq!(ask.target_memory_bytes, 256 * MIB, "one CU at a time");
    assert_eq!(ask.cpu_mode(), ipb::CpuMode::Sysfs);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(vm.read_size().await.unwrap().dimm_count, 1, "the VM keeps its memory");
    assert_eq!(reserved(&shared, "node-a", "pg-1"), Some((1000, 512 * MIB)));
    agent.stop.cancel();
    agent.task.await.unwrap();
    alloc_stop.cancel();
    inf_stop.cancel();
}
