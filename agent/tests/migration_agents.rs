//! Live migration driven by the allocator and carried out by two real agent
//! processes (the `vmscale-agent` binary) between real QEMUs (TCG, no guest
//! OS), with a real allocator on loopback gRPC. The node "a" passes its
//! watermark, the allocator orders the VM to "b", and:
//! - the move completes: the VM keeps its hot-added vCPU and DIMM, runs on
//!   b's QEMU only, and its reservation is on b's ledger only;
//! - the target QEMU cannot start, the source or the target agent is killed
//!   mid-move, the migration does not converge in time: each time the VM
//!   runs in exactly one QEMU, its reservation is on exactly that node, the
//!   order failed with a reason, and a later order may move it;
//! - the target agent cannot answer the confirm (frozen with SIGSTOP): the
//!   guest stays paused on the source, never resumed there while the target
//!   might run it, and runs in exactly one place once the target answers.
//!
//! The guest's RAM is a file of random bytes, so that the stream takes as
//! long as its bandwidth says (zero pages would cross in no time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod qmp_support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qmp_support::{client_config, qemu_or_skip, random_ram, TempDir, MIB};
use tokio_util::sync::CancellationToken;
use vmscale_agent::qmp::migrate::{Migration, MigrationStatus};
use vmscale_agent::qmp::process::{QemuOptions, QemuProcess};
use vmscale_agent::qmp::{Endpoint, Hotplug, QmpClient, QmpVm};
use vmscale_allocator::core::migration::OrderState;
use vmscale_allocator::core::vm::VmState;
use vmscale_allocator::shared::Shared;
use vmscale_common::testing::TestPki;
use vmscale_common::tls::{Identity, TlsFiles};

/// One test at a time: each runs three QEMUs and two agents on 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const VM: &str = "vm1";
const RAM_MIB: u64 = 256;

/// A port for an agent to listen on. Not one from bind(0): that goes back to
/// the kernel's ephemeral pool when the probe closes, where the other tests
/// of this binary (they run at once) and any outgoing connection can get it
/// before the agent binds it (seen once in CI: "cannot listen for HTTP ...
/// Address already in use"). These come from below the ephemeral range
/// (32768 up by default), one number per call from a per-process counter
/// (a start that differs by process), checked free.
fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 400) * 25;
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(20_000 + (start + n) % 10_000).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-29999 on 127.0.0.1");
}

/// The allocator, over mTLS with `tls` (its own certificate) or plain text.
async fn start_allocator(tls: Option<TlsFiles>) -> (String, Arc<Shared>, CancellationToken) {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let addr = format!("{scheme}://{}", grpc.local_addr().unwrap());
    let stop = CancellationToken::new();
    let config = vmscale_allocator::config::Config {
        watermark: 0.5,
        system_reserve_milli_cpu: 0,
        system_reserve_memory_bytes: 0,
        plan_interval_ms: 200,
        order_timeout_ms: 120_000,
        insecure: tls.is_none(),
        tls,
        ..Default::default()
    };
    let shared = Shared::new(config, stop.clone());
    let sh = shared.clone();
    tokio::spawn(async move { vmscale_allocator::server::serve(sh, grpc, http).await.unwrap() });
    (addr, shared, stop)
}

/// An agent process with its own config, VM list and state directory.
struct Agent {
    node: String,
    config: PathBuf,
    log: PathBuf,
    http: u16,
    state_dir: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// `tls`: the node's certificate (`[tls]`), else `insecure = true`.
    fn new(
        dir: &Path,
        (node, tls): (&str, Option<&TlsFiles>),
        allocator: &str,
        capacity_mib: u64,
        extra: &str,
        vms: &str,
    ) -> Agent {
        let http = free_port();
        let transport = match tls {
            Some(t) => format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            ),
            None => String::new(),
        };
        let insecure = tls.is_none();
        let state_dir = dir.join(format!("{node}-state"));
        let vms_file = dir.join(format!("{node}-vms.toml"));
        std::fs::write(&vms_file, vms).unwrap();
        let config = dir.join(format!("{node}.toml"));
        std::fs::write(
            &config,
            format!(
                "node = \"{node}\"\ninsecure = {insecure}\nallocator = \"{allocator}\"\nvms_file = \"{}\"\nvms_file_interval_ms = 200\n\
                 http_listen = \"127.0.0.1:{http}\"\ncapacity_milli_cpu = 4000\n\
                 capacity_memory_bytes = {}\nallocator_retry_base_ms = 50\nallocator_retry_max_ms = 500\n\
                 {transport}[contention]\nenabled = false\n[migration]\nstate_dir = \"{}\"\n{extra}\n",
                vms_file.display(),
                capacity_mib * MIB,
                state_dir.display(),
            ),
        )
        .unwrap();
        let log = dir.join(format!("{node}.log"));
        let mut a = Agent { node: node.into(), config, log, http, state_dir, child: None };
        a.start();
        a
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vmscale-agent"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,vmscale_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no clean-up of any kind, as when a node's agent crashes.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP or SIGCONT: an agent that neither answers nor goes away,
    /// as behind a network partition.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("the agent runs").id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The body of an HTTP GET of `path` on the agent, empty while it does
    /// not answer.
    fn get(&self, path: &str) -> String {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.http)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }

    /// The agent's `/state` JSON, or null while it does not answer.
    fn state(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/state")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The QEMU processes whose command line names `dir`: what an agent started.
fn qemus_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if !exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu")) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

/// The world of one test: allocator, the source VM, agents a and b.
struct World {
    _dir: TempDir,
    dir: PathBuf,
    allocator: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
    source: QemuProcess,
    /// A second QMP monitor on the source: the agent holds the first.
    watch: QmpClient,
    vms_a: String,
    /// The cluster CA when the links run over mTLS.
    pki: Option<TestPki>,
}

impl World {
    async fn new(test: &str) -> Option<World> {
        World::with(test, false).await
    }

    /// `tls`: every link (agents to the allocator and to each other, and
    /// QEMU's stream) over mutual TLS with one test CA.
    async fn with(test: &str, tls: bool) -> Option<World> {
        let binary = qemu_or_skip(test)?;
        let tmp = TempDir::new();
        let dir = tmp.path().to_owned();
        let ram = dir.join("ram");
        random_ram(&ram, RAM_MIB);
        let watch_sock = dir.join("watch.sock");
        let mut o = QemuOptions::new(binary);
        o.memory_mib = RAM_MIB;
        o.virtio_mem_mib = None;
        o.extra_args = qmp_support::file_backed_ram(&ram, RAM_MIB);
        o.extra_args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", watch_sock.display())]);
        let source = QemuProcess::spawn(&o, &dir).await.expect("source qemu starts");
        // Grow it before any agent looks: one hot-added vCPU and DIMM.
        {
            let c = QmpClient::connect(source.endpoint(), client_config()).await.unwrap();
            let vm = QmpVm::new(c, qmp_support::hotplug_config());
            vm.plug_vcpu().await.unwrap();
            vm.plug_dimm(256 * MIB).await.unwrap();
        }
        let mut watch = None;
        for _ in 0..100 {
            if let Ok(c) = QmpClient::connect(&Endpoint::Unix(watch_sock.clone()), client_config()).await {
                watch = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pki = tls.then(|| TestPki::new(dir.join("pki")));
        let (allocator, shared, stop) =
            start_allocator(pki.as_ref().map(|p| p.issue(&Identity::Allocator))).await;
        let Endpoint::Unix(qmp) = source.endpoint().clone() else { unreachable!() };
        let vms_a = format!(
            "[[vm]]\nid = \"{VM}\"\nqmp = \"{}\"\ncu = {{ milli_cpu = 250, memory_bytes = {} }}\nmin_cus = 1\n\
             max_cus = 8\ncpu_mode = \"sysfs\"\nmemory = {{ kind = \"dimm\", dimm_bytes = {} }}\n",
            qmp.display(),
            256 * MIB,
            256 * MIB
        );
        Some(World {
            _dir: tmp,
            dir,
            allocator,
            shared,
            stop,
            source,
            watch: watch.expect("second monitor"),
            vms_a,
            pki,
        })
    }

    fn certificate(&self, node: &str) -> Option<TlsFiles> {
        self.pki.as_ref().map(|p| p.issue(&Identity::Node(node.into())))
    }

    /// Node a: 4 vCPUs and 768 MiB, so the VM's 512 MiB passes its
    /// watermark (0.5). `transfer` goes under `[migration.transfer]`.
    fn agent_a(&self, transfer: &str) -> Agent {
        Agent::new(
            &self.dir,
            ("a", self.certificate("a").as_ref()),
            &self.allocator,
            768,
            &format!("[migration.transfer]\n{transfer}"),
            &self.vms_a,
        )
    }

    /// Node b: room for the VM, taking VMs in with `qemu`.
    fn agent_b(&self, qemu: &str) -> Agent {
        let listen = free_port();
        let extra = format!("listen = \"127.0.0.1:{listen}\"\nqemu = \"{qemu}\"\nconfirm_grace_ms = 5000");
        Agent::new(&self.dir, ("b", self.certificate("b").as_ref()), &self.allocator, 8192, &extra, "")
    }

    fn qemu(&self) -> String {
        qmp_support::qemu_or_skip("qemu").unwrap().display().to_string()
    }

    /// Where the VM's reservation is, and in which state, per node.
    fn ledger(&self) -> Vec<(String, VmState)> {
        let st = self.shared.lock();
        let mut out: Vec<(String, VmState)> = ["a", "b"]
            .iter()
            .filter_map(|n| {
                st.cluster.node(n).and_then(|l| l.vms.get(VM)).map(|e| ((*n).to_owned(), e.state))
            })
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }

    fn finished(&self) -> Vec<(OrderState, String)> {
        self.finished_ids().into_iter().map(|(_, s, r)| (s, r)).collect()
    }

    fn finished_ids(&self) -> Vec<(u64, OrderState, String)> {
        let st = self.shared.lock();
        st.cluster
            .finished_orders
            .iter()
            .filter(|o| o.vm == VM)
            .map(|o| (o.id, o.state, o.reason.clone()))
            .collect()
    }

    fn open_order_started(&self) -> bool {
        let st = self.shared.lock();
        st.cluster.orders.values().any(|o| o.vm == VM && o.state == OrderState::Started)
    }

    async fn source_runs(&self) -> bool {
        Migration::new(self.watch.clone()).run_status().await.is_ok_and(|s| s.running)
    }

    fn source_alive(&mut self) -> bool {
        self.source.pid().is_some_and(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| !s.contains(") Z "))
        })
    }

    /// After a failure: the order failed with a reason naming `why`, the VM
    /// runs on the source, b runs no QEMU for that order, and the VM is held
    /// on a (a later order may already be moving it again: then b holds room
    /// for it, and may run a paused incoming QEMU for that order).
    async fn stayed_on_a(&mut self, b: &Agent, why: &str, agents: &[&Agent]) {
        let failed = self.stayed_on_a_keeping(b, why, agents).await;
        let logs = || agents.iter().map(|a| format!("--- {}\n{}", a.node, a.logs())).collect::<String>();
        let leftover = qemus_under(&b.state_dir.join("incoming").join(failed.to_string()));
        assert!(
            leftover.is_empty(),
            "b still runs QEMU {leftover:?} for the failed order {failed}\n{}",
            logs()
        );
    }

    /// [`World::stayed_on_a`] without looking at b's QEMUs (b's agent may be
    /// down); returns the failed order's id.
    async fn stayed_on_a_keeping(&mut self, _b: &Agent, why: &str, agents: &[&Agent]) -> u64 {
        let logs = || agents.iter().map(|a| format!("--- {}\n{}", a.node, a.logs())).collect::<String>();
        let mut failed = 0;
        eventually(
            &format!("an order failed for {why:?}"),
            || {
                let f = self.finished_ids();
                let hit = f.iter().find(|(_, s, r)| *s == OrderState::Failed && r.contains(why));
                failed = hit.map_or(0, |h| h.0);
                hit.is_some()
            },
            &logs,
        )
        .await;
        let mut runs = false;
        for _ in 0..50 {
            if self.source_runs().await {
                runs = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(runs && self.source_alive(), "the source must run the guest\n{}", logs());
        // Held on a alone (or on its way out again under a new order).
        let ledger = self.ledger();
        assert!(
            ledger.first().is_some_and(|(n, _)| n == "a")
                && ledger.iter().all(|(n, s)| n == "a" || matches!(s, VmState::Incoming { .. })),
            "ledger: {ledger:?}"
        );
        failed
    }

    /// The move landed: b runs the guest with its vCPU and DIMM, a nothing.
    async fn moved_to_b(&mut self, b: &Agent, agents: &[&Agent]) {
        let logs = || agents.iter().map(|a| format!("--- {}\n{}", a.node, a.logs())).collect::<String>();
        eventually(
            "the order completed",
            || self.finished().iter().any(|(s, _)| *s == OrderState::Completed),
            &logs,
        )
        .await;
        eventually(
            "b's ledger alone holds the VM, active",
            || self.ledger() == vec![("b".to_owned(), VmState::Active)],
            &logs,
        )
        .await;
        // b's own loop reads the VM's size from the QEMU it started.
        eventually(
            "b scales the VM at its full size",
            || {
                let st = b.state();
                let cur = &st["vms"][VM]["current"];
                cur["milli_cpu"] == 2000 && cur["memory_bytes"] == 512 * MIB
            },
            &logs,
        )
        .await;
        assert_eq!(qemus_under(&b.state_dir).len(), 1, "one QEMU runs the guest on b");
        let exited = tokio::time::timeout(Duration::from_secs(10), async {
            while self.source_alive() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(exited.is_ok(), "the source QEMU must quit after the move");
        // Node a fell back under its watermark.
        let st = self.shared.lock();
        let a = st.cluster.node("a").unwrap();
        assert!(a.wanted().fits_in(a.watermark_level()), "a: {:?}", a.wanted());
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
        // Whatever an agent started goes with the test.
        for pid in qemus_under(&self.dir) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool, logs: &dyn Fn() -> String) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(90) {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}\n{}", logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_node_moves_its_vm_away_with_its_devices() {
    let _one = SERIAL.lock().await;
    let Some(mut w) = World::new("a_hot_node_moves_its_vm_away").await else { return };
    let b = w.agent_b(&w.qemu());
    let a = w.agent_a("");
    w.moved_to_b(&b, &[&a, &b]).await;
    // Each side counts its part of the move.
    let metrics = a.get("/metrics");
    assert!(
        metrics.contains("vmscale_agent_migrations_total{role=\"source\",outcome=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmscale_agent_migration_seconds_count{role=\"source\",outcome=\"completed\"} 1")
    );
    let metrics = b.get("/metrics");
    assert!(
        metrics.contains("vmscale_agent_migrations_total{role=\"target\",outcome=\"completed\"} 1"),
        "{metrics}"
    );
    // A restarted target agent adopts the VM again from its record.
    let mut b = b;
    b.kill();
    b.start();
    let logs = || b.logs();
    eventually(
        "b scales the VM again after its restart",
        || b.state()["vms"][VM]["current"]["memory_bytes"] == 512 * MIB,
        &logs,
    )
    .await;
    assert_eq!(w.ledger(), vec![("b".to_owned(), VmState::Active)]);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_qemu_that_cannot_start_fails_the_order_and_a_later_one_succeeds() {
    let _one = SERIAL.lock().await;
    let Some(mut w) = World::new("target_qemu_cannot_start").await else { return };
    let mut b = w.agent_b("/nonexistent/qemu-system-x86_64");
    let a = w.agent_a("");
    w.stayed_on_a(&b, "did not start", &[&a, &b]).await;
    // Fix the target: the allocator orders the move again and it lands.
    b.kill();
    let good =
        std::fs::read_to_string(&b.config).unwrap().replace("/nonexistent/qemu-system-x86_64", &w.qemu());
    std::fs::write(&b.config, good).unwrap();
    b.start();
    w.moved_to_b(&b, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_does_not_converge_in_time_fails_and_the_vm_stays() {
    let _one = SERIAL.lock().await;
    let Some(mut w) = World::new("does_not_converge").await else { return };
    let b = w.agent_b(&w.qemu());
    // 512 MiB at 16 MiB/s takes far longer than 3 s.
    let a = w.agent_a("max_bandwidth_bytes_per_s = 16777216\ntimeout_ms = 3000");
    w.stayed_on_a(&b, "", &[&a, &b]).await;
    let reasons = w.finished();
    assert!(
        reasons.iter().any(|(_, r)| r.contains("3000") || r.contains("timed out") || r.contains("within")),
        "{reasons:?}"
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_agent_killed_mid_move_resumes_the_vm_on_restart() {
    let _one = SERIAL.lock().await;
    let Some(mut w) = World::new("source_agent_killed").await else { return };
    let b = w.agent_b(&w.qemu());
    let mut a = w.agent_a("max_bandwidth_bytes_per_s = 33554432");
    let logs = || format!("{}\n{}", a.logs(), b.logs());
    eventually("the move started", || w.open_order_started(), &logs).await;
    a.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.start();
    w.stayed_on_a(&b, "restarted mid-move", &[&a, &b]).await;
    // The allocator orders the move again; this time it lands.
    w.moved_to_b(&b, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_agent_killed_mid_move_leaves_the_vm_on_the_source() {
    let _one = SERIAL.lock().await;
    let Some(mut w) = World::new("target_agent_killed").await else { return };
    let mut b = w.agent_b(&w.qemu());
    let a = w.agent_a("max_bandwidth_bytes_per_s = 33554432");
    let logs = || format!("{}\n{}", a.logs(), b.logs());
    eventually("the move started", || w.open_order_started(), &logs).await;
    b.kill();
    // The stream goes on between the QEMUs; the confirm finds no agent, so
    // the source resumes the guest. b's incoming QEMU stays paused (it never
    // got a confirm) until b starts again and kills it.
    w.stayed_on_a_keeping(&b, "did not take the guest over", &[&a, &b]).await;
    let orphans = qemus_under(&b.state_dir);
    assert_eq!(orphans.len(), 1, "b's paused incoming QEMU outlives its agent");
    b.start();
    let logs = || b.logs();
    eventually(
        "b killed the unconfirmed QEMU",
        || b.logs().contains("killed an incoming QEMU nobody confirmed"),
        &logs,
    )
    .await;
    // SIGKILL takes effect a moment later.
    let stat = format!("/proc/{}/stat", orphans[0]);
    eventually(
        "the orphan QEMU is gone",
        || std::fs::read_to_string(&stat).map_or(true, |s| s.contains(") Z ")),
        &logs,
    )
    .await;
    // A later order moves the VM, and only its QEMU runs on b.
    w.moved_to_b(&b, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_agent_that_cannot_answer_the_confirm_keeps_the_guest_paused_until_it_does() {
    let _one = SERIAL.lock().await;
    let Some(mut w) = World::new("target_agent_frozen").await else { return };
    let b = w.agent_b(&w.qemu());
    let a = w.agent_a("max_bandwidth_bytes_per_s = 33554432");
    let logs = || format!("--- a\n{}\n--- b\n{}", a.logs(), b.logs());
    eventually("the move started", || w.open_order_started(), &logs).await;
    b.signal("-STOP");
    // The stream runs QEMU to QEMU without b's agent; then the source
    // stops the guest and sends the confirm, which gets no answer.
    let watch = Migration::new(w.watch.clone());
    let t0 = Instant::now();
    loop {
        let done = watch.query().await.is_ok_and(|q| q.status == MigrationStatus::Completed);
        if done && !w.source_runs().await {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "the stream did not complete\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Through the confirm's 12 s call timeout and the unanswered aborts
    // after it (a says why it waits), and a while longer, the guest must not
    // run on the source for a moment.
    let switched = Instant::now();
    let mut said = None;
    while said.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(5)) {
        assert!(!w.source_runs().await, "the source resumed while the target could not say\n{}", logs());
        assert!(w.source_alive(), "the source QEMU quit while the target could not say\n{}", logs());
        if said.is_none() && a.logs().contains("cannot say whether it runs") {
            said = Some(Instant::now());
        }
        assert!(switched.elapsed() < Duration::from_secs(120), "a never said why it waits\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.signal("-CONT");
    // Whichever way b took the confirm, the guest runs in one place and the
    // ledger holds it there alone.
    eventually("the order ended", || !w.finished().is_empty(), &logs).await;
    let (state, reason) = w.finished()[0].clone();
    eprintln!("the move ended {state:?} {reason:?}");
    let agents: [&Agent; 2] = [&a, &b];
    match state {
        OrderState::Completed => w.moved_to_b(&b, &agents).await,
        _ => w.stayed_on_a(&b, "", &agents).await,
    }
}

/// Every link over mutual TLS: the agents' to the allocator, the source's
/// to the target's migration service (each certificate checked as the
/// order's node), and QEMU's stream (`tls-authz` naming node a).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_over_mutual_tls_lands_and_the_stream_is_encrypted() {
    let _one = SERIAL.lock().await;
    let Some(mut w) = World::with("move_over_mtls", true).await else { return };
    let b = w.agent_b(&w.qemu());
    let a = w.agent_a("");
    w.moved_to_b(&b, &[&a, &b]).await;
    // b's QEMU took the stream over TLS from a only.
    let cmdlines: Vec<String> = qemus_under(&b.state_dir)
        .iter()
        .map(|p| {
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).unwrap()).replace('\0', " ")
        })
        .collect();
    assert!(
        cmdlines
            .iter()
            .any(|c| c.contains("identity=CN=a.node.vmscale") && c.contains("migration.tls-creds=")),
        "{cmdlines:?}"
    );
    assert!(!a.logs().contains("insecure = true"), "no plain link");
}
