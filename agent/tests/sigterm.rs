//! The agent binary stops cleanly on SIGTERM, what Kubernetes sends on every
//! DaemonSet rollout: with a VM loop running against a real QEMU (TCG, no
//! guest) and a real allocator, it ends its loops and exits 0 well within the
//! grace period, and leaves the VM's reservation on the ledger for the agent
//! that starts next.

#![allow(clippy::unwrap_used)]

mod qmp_support;

use qmp_support::{TempDir, TestQemu};
use serde::Serialize;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vmscale_agent::config::Config;
use vmscale_agent::core::policy::Cu;
use vmscale_agent::vms::{CpuMode, MemoryMode, VmSpec};
use vmscale_allocator::shared::Shared;

/// What the issue asks of a stop: well inside Kubernetes' 30 s grace period.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

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

fn registered(shared: &Shared, vm: &str) -> bool {
    shared.lock().cluster.node("node-a").is_some_and(|n| n.vms.contains_key(vm))
}

/// The VM file the agent reads, written from the agent's own type.
#[derive(Serialize)]
struct VmFile {
    vm: Vec<VmSpec>,
}

/// Writes the agent's config and VM file into `dir`; returns the config's path.
fn write_config(dir: &TempDir, allocator: &str, qmp: &str) -> std::path::PathBuf {
    let spec = VmSpec {
        id: "pg-1".into(),
        qmp: qmp.to_owned(),
        informant: None,
        cu: Cu { milli_cpu: 250, memory_bytes: 256 << 20 },
        min_cus: 1,
        max_cus: 8,
        cpu_mode: CpuMode::Sysfs,
        memory: MemoryMode::Dimm { dimm_bytes: 256 << 20 },
        policy: None,
    };
    let vms_file = dir.path().join("vms.toml");
    std::fs::write(&vms_file, toml::to_string(&VmFile { vm: vec![spec] }).unwrap()).unwrap();
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let mut c = Config {
        node: "node-a".into(),
        allocator: allocator.to_owned(),
        // A plain-text allocator on loopback.
        insecure: true,
        vms_file,
        vms_file_interval_ms: 100,
        http_listen: (ip, vmscale_common::net::free_port(ip).unwrap()).into(),
        capacity_milli_cpu: 4000,
        capacity_memory_bytes: 4 << 30,
        allocator_retry_base_ms: 50,
        allocator_retry_max_ms: 500,
        unplug_timeout_ms: 300,
        ..Config::default()
    };
    c.migration.state_dir = dir.path().join("state");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_loops_and_exits_zero_within_five_seconds() {
    let Some(qemu) = TestQemu::start("sigterm", |_| {}).await else { return };
    let (alloc_addr, shared, alloc_stop) = start_allocator().await;
    let dir = TempDir::new();
    let config = write_config(&dir, &alloc_addr, &qemu.qemu.endpoint().to_string());
    let log = dir.path().join("agent.log");
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmscale-agent"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let said = || std::fs::read_to_string(&log).unwrap_or_default();

    // The VM's loop runs once it has registered the VM with the allocator.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !registered(&shared, "pg-1") {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!("the agent exited ({status}) before registering the VM:\n{}", said());
        }
        assert!(Instant::now() < deadline, "the VM was never registered:\n{}", said());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pid = libc::pid_t::try_from(agent.id().unwrap()).unwrap();
    // SAFETY: kill only sends a signal; `pid` is our own child, not yet
    // reaped (try_wait saw it running), so it names no other process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let sent = Instant::now();
    let status = match tokio::time::timeout(EXIT_WITHIN, agent.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => panic!("the agent did not exit within {EXIT_WITHIN:?} of SIGTERM:\n{}", said()),
    };
    assert!(status.success(), "the agent exited with {status} on SIGTERM:\n{}", said());
    let log_text = said();
    assert!(log_text.contains("SIGTERM: shutting down"), "{log_text}");
    assert!(!log_text.contains("did not stop"), "a VM loop outlived the shutdown:\n{log_text}");
    eprintln!("the agent exited {:?} after SIGTERM", sent.elapsed());
    // A stop is not a departure: the VM still runs, and the next agent
    // registers it again.
    assert!(registered(&shared, "pg-1"), "the agent released the VM on SIGTERM:\n{log_text}");
    alloc_stop.cancel();
}
