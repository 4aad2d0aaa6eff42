//! Live migration between two real qemu-system-x86_64 processes (TCG, no
//! guest OS): the target is built from the source's QMP state and ends up
//! with the same hot-added vCPU, DIMM and virtio-mem request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod qmp_support;

use std::time::Duration;

use vmscale_agent::qmp::migrate::{tcp_uri, MigrateError, Migration, MigrationConfig, Progress, RunState};
use vmscale_agent::qmp::migrate_spec::read_spec;
use vmscale_agent::qmp::process::{QemuOptions, QemuProcess};
use vmscale_agent::qmp::{Hotplug, QmpClient, QmpVm};

use qmp_support::{client_config, hotplug_config, qemu_or_skip, TempDir, MIB};

/// A source QEMU and the options it was started with (a target's base).
struct Source {
    qemu: QemuProcess,
    options: QemuOptions,
    _dir: TempDir,
}

impl Source {
    /// Running (not `-S`), as a VM being moved is.
    async fn start(test: &str, shape: impl FnOnce(&mut QemuOptions)) -> Option<Self> {
        let binary = qemu_or_skip(test)?;
        let dir = TempDir::new();
        let mut options = QemuOptions::new(binary);
        shape(&mut options);
        let qemu = QemuProcess::spawn(&options, dir.path()).await.expect("source qemu starts");
        Some(Self { qemu, options, _dir: dir })
    }

    async fn client(&self) -> QmpClient {
        QmpClient::connect(self.qemu.endpoint(), client_config()).await.unwrap()
    }

    async fn vm(&self) -> QmpVm {
        QmpVm::new(self.client().await, hotplug_config())
    }
}

/// A free loopback port for the incoming side.
fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Starts a target with the source's base shape plus `spec` args, waiting
/// for an incoming migration at `addr`.
async fn start_target(
    source: &Source,
    extra: Vec<String>,
    addr: std::net::SocketAddr,
) -> (QemuProcess, TempDir, Migration) {
    let dir = TempDir::new();
    let mut options = source.options.clone();
    options.paused = false;
    options.extra_args.extend(extra);
    options.extra_args.extend(["-incoming".to_string(), "defer".to_string()]);
    let qemu = QemuProcess::spawn(&options, dir.path()).await.expect("target qemu starts");
    let client = QmpClient::connect(qemu.endpoint(), client_config()).await.unwrap();
    let m = Migration::new(client);
    m.configure(&MigrationConfig::default()).await.unwrap();
    m.listen(&tcp_uri(addr)).await.unwrap();
    (qemu, dir, m)
}

#[tokio::test]
async fn a_vm_with_hot_added_cpu_dimm_and_virtio_mem_moves_and_keeps_them() {
    let Some(source) = Source::start("migrate_keeps_devices", |o| o.memory_mib = 128).await else { return };
    let vm = source.vm().await;
    vm.plug_vcpu().await.unwrap();
    vm.plug_dimm(128 * MIB).await.unwrap();
    vm.plug_dimm(128 * MIB).await.unwrap();
    vm.set_virtio_mem_size(64 * MIB).await.unwrap();
    let before = vm.read_size().await.unwrap();

    let spec = read_spec(vm.client()).await.unwrap();
    assert_eq!(spec.cpus.len(), 1, "{spec:?}");
    assert_eq!(spec.dimms.len(), 2, "{spec:?}");
    let addr = free_addr();
    let (mut target, _dir, incoming) = start_target(&source, spec.qemu_args(), addr).await;
    assert_eq!(incoming.run_status().await.unwrap().status, RunState::InMigrate);

    let out = Migration::new(vm.client().clone());
    let config = MigrationConfig { timeout_ms: 60_000, ..MigrationConfig::default() };
    out.configure(&config).await.unwrap();
    out.start(&tcp_uri(addr)).await.unwrap();
    let mut readings = 0;
    let info = out.wait(&config, |_| readings += 1).await.unwrap();
    assert_eq!(info.progress(), Progress::Completed);
    assert!(info.downtime.is_some() && info.total_time_ms.is_some(), "{info:?}");
    assert!(readings >= 1);
    assert_eq!(out.run_status().await.unwrap().status, RunState::PostMigrate);

    // The target runs the guest now, with the same devices and sizes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !incoming.run_status().await.unwrap().running {
        assert!(tokio::time::Instant::now() < deadline, "target did not start running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let target_vm = QmpVm::new(incoming.client().clone(), hotplug_config());
    let after = target_vm.read_size().await.unwrap();
    assert_eq!(after, before);
    assert_eq!(after.vcpus_present, 2);
    assert_eq!(after.dimm_bytes, 256 * MIB);
    assert_eq!(after.virtio_mem_requested_bytes, 64 * MIB);
    assert_eq!(read_spec(incoming.client()).await.unwrap(), spec);
    // The moved VM scales on: one more DIMM goes into the next free slot.
    let dimm = target_vm.plug_dimm(128 * MIB).await.unwrap();
    assert_eq!(dimm.id, "vmscale-dimm2");
    let grown = target_vm.read_size().await.unwrap();

    // And moves again, from a QEMU that was itself a migration target (its
    // query-migrate still shows the incoming migration as completed).
    let spec = read_spec(incoming.client()).await.unwrap();
    let addr = free_addr();
    let (mut third, _dir3, incoming3) = start_target(&source, spec.qemu_args(), addr).await;
    incoming.configure(&config).await.unwrap();
    incoming.start(&tcp_uri(addr)).await.unwrap();
    let info = incoming.wait(&config, |_| {}).await.unwrap();
    assert!(info.total_time_ms.is_some_and(|t| t > 0), "{info:?}");
    assert_eq!(incoming.run_status().await.unwrap().status, RunState::PostMigrate);
    let third_vm = QmpVm::new(incoming3.client().clone(), hotplug_config());
    assert_eq!(third_vm.read_size().await.unwrap(), grown);
    target.kill().await.unwrap();
    third.kill().await.unwrap();
}

#[tokio::test]
async fn a_migration_to_nobody_fails_and_the_source_keeps_running() {
    let Some(source) = Source::start("migrate_to_nobody", |_| {}).await else { return };
    let out = Migration::new(source.client().await);
    let config = MigrationConfig { timeout_ms: 10_000, ..MigrationConfig::default() };
    out.configure(&config).await.unwrap();
    out.start(&tcp_uri(free_addr())).await.unwrap();
    let e = out.wait(&config, |_| {}).await.unwrap_err();
    assert!(matches!(e, MigrateError::Failed { .. }), "{e:#}");
    assert!(out.run_status().await.unwrap().running);
}

#[tokio::test]
async fn a_stream_nobody_reads_is_named_stalled_long_before_the_deadline() {
    let dir = TempDir::new();
    let ram = dir.path().join("ram");
    qmp_support::random_ram(&ram, 128);
    let Some(source) = Source::start("migrate_stalled", |o| {
        o.memory_mib = 128;
        o.extra_args = qmp_support::file_backed_ram(&ram, 128);
    })
    .await
    else {
        return;
    };
    // Accepts the connection and never reads: once the socket buffers are
    // full nothing more is sent, as when the network to the target is cut.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let out = Migration::new(source.client().await);
    let config =
        MigrationConfig { timeout_ms: 60_000, stall_timeout_ms: 1_500, ..MigrationConfig::default() };
    out.configure(&config).await.unwrap();
    out.start(&tcp_uri(addr)).await.unwrap();
    let t0 = std::time::Instant::now();
    let e = out.wait(&config, |_| {}).await.unwrap_err();
    assert!(matches!(e, MigrateError::Stalled { .. }), "{e:#}");
    assert!(e.to_string().contains("network"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(30), "stalled after {:?}", t0.elapsed());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !out.run_status().await.unwrap().running {
        assert!(std::time::Instant::now() < deadline, "the source does not run after the cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(hold);
}

#[tokio::test]
async fn a_migration_past_its_deadline_is_cancelled_and_the_source_keeps_running() {
    let Some(source) = Source::start("migrate_not_converged", |o| o.memory_mib = 512).await else { return };
    let addr = free_addr();
    let (mut target, _dir, _incoming) = start_target(&source, Vec::new(), addr).await;
    let out = Migration::new(source.client().await);
    // 1 MiB/s for 512 MiB cannot finish in a second.
    let config =
        MigrationConfig { max_bandwidth_bytes_per_s: MIB, timeout_ms: 1_000, ..MigrationConfig::default() };
    out.configure(&config).await.unwrap();
    out.start(&tcp_uri(addr)).await.unwrap();
    let e = out.wait(&config, |_| {}).await.unwrap_err();
    assert!(matches!(e, MigrateError::NotConverged { .. }), "{e:#}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = out.query().await.unwrap();
        if info.progress() == Progress::Cancelled {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not cancelled: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(out.run_status().await.unwrap().running);
    target.kill().await.unwrap();
}

#[tokio::test]
async fn a_target_that_dies_fails_the_migration_and_the_source_keeps_running() {
    let Some(source) = Source::start("migrate_target_dies", |o| o.memory_mib = 512).await else { return };
    let addr = free_addr();
    let (mut target, _dir, _incoming) = start_target(&source, Vec::new(), addr).await;
    let out = Migration::new(source.client().await);
    let config = MigrationConfig { max_bandwidth_bytes_per_s: MIB, timeout_ms: 30_000, ..Default::default() };
    out.configure(&config).await.unwrap();
    out.start(&tcp_uri(addr)).await.unwrap();
    // Zero pages cost almost nothing, so only a tiny bandwidth keeps an
    // empty guest's migration going long enough to kill the target mid-way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(out.query().await.unwrap().progress(), Progress::Running);
    target.kill().await.unwrap();
    let e = out.wait(&config, |_| {}).await.unwrap_err();
    assert!(matches!(e, MigrateError::Failed { .. }), "{e:#}");
    assert!(out.run_status().await.unwrap().running);
}
