//! The source agent's move executor against real QEMUs (TCG, no guest OS):
//! the target is started from the source's own command line and devices,
//! and every failure leaves the guest running on the source alone.
#![allow(clippy::unwrap_used)]

mod qmp_support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmscale_agent::migration::command_line::read_args;
use vmscale_agent::migration::machine::MachineSpec;
use vmscale_agent::migration::machine_from_args::machine_from_args;
use vmscale_agent::migration::settings::MigrationSettings;
use vmscale_agent::migration::source::carry_out;
use vmscale_agent::migration::target::{
    kill_unconfirmed, AfterAbort, ConfirmError, Handoff, IncomingError, IncomingTarget, LocalIncoming,
};
use vmscale_agent::migration::MoveError;
use vmscale_agent::qmp::migrate::{Migration, MigrationConfig};
use vmscale_agent::qmp::process::{QemuOptions, QemuProcess};
use vmscale_agent::qmp::{Endpoint, Hotplug, QmpClient, QmpVm};
use vmscale_proto::allocator::migration_status::Phase;

use qmp_support::{client_config, hotplug_config, qemu_or_skip, TempDir, MIB};

struct Setup {
    source: QemuProcess,
    client: QmpClient,
    target: Arc<LocalIncoming>,
    machine: MachineSpec,
    _dirs: (TempDir, TempDir),
}

async fn setup(test: &str, shape: impl FnOnce(&mut QemuOptions)) -> Option<Setup> {
    let binary = qemu_or_skip(test)?;
    let (src_dir, dst_dir) = (TempDir::new(), TempDir::new());
    let mut options = QemuOptions::new(binary.clone());
    shape(&mut options);
    let source = QemuProcess::spawn(&options, src_dir.path()).await.unwrap();
    let client = QmpClient::connect(source.endpoint(), client_config()).await.unwrap();
    let template = MigrationSettings::default().template();
    let args = read_args(Path::new("/proc"), source.pid().unwrap()).unwrap();
    let machine = machine_from_args(&args, &template).unwrap();
    // Port 0: the target binds it and hands the socket to its QEMU.
    let listen = "127.0.0.1:0".parse().unwrap();
    let target = Arc::new(LocalIncoming::new(binary, template, dst_dir.path().join("target"), listen));
    Some(Setup { source, client, target, machine, _dirs: (src_dir, dst_dir) })
}

type Reports = Arc<Mutex<Vec<(Phase, String)>>>;

fn recorder() -> (Reports, impl FnMut(Phase, &str)) {
    let reports: Reports = Arc::default();
    let r = reports.clone();
    (reports, move |phase, reason: &str| r.lock().unwrap().push((phase, reason.to_owned())))
}

fn phases(reports: &Reports) -> Vec<Phase> {
    reports.lock().unwrap().iter().map(|(p, _)| *p).collect()
}

/// Whether the QEMU process is gone (or a zombie) within 10 s.
async fn exits(qemu: &QemuProcess) -> bool {
    let alive = || {
        qemu.pid().is_some_and(|p| {
            std::fs::read(format!("/proc/{p}/stat"))
                .map(|st| !String::from_utf8_lossy(&st).contains(") Z "))
                .unwrap_or(false)
        })
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while alive() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

async fn source_runs(client: &QmpClient) -> bool {
    Migration::new(client.clone()).run_status().await.unwrap().running
}

#[tokio::test]
async fn a_grown_vm_moves_and_only_the_target_runs_it() {
    let Some(mut s) = setup("move_completes", |_| {}).await else { return };
    let vm = QmpVm::new(s.client.clone(), hotplug_config());
    vm.plug_vcpu().await.unwrap();
    vm.plug_dimm(128 * MIB).await.unwrap();
    let before = vm.read_size().await.unwrap();
    let (reports, report) = recorder();
    let config = MigrationConfig { timeout_ms: 60_000, ..MigrationConfig::default() };
    let done = carry_out(1, "vm-a", &s.client, s.machine.clone(), &*s.target, &config, report).await.unwrap();
    assert_eq!(phases(&reports), vec![Phase::Started, Phase::Completed]);
    assert_eq!(done.devices.cpus.len(), 1);
    // The source QEMU quit; the target runs the guest with its devices.
    assert!(exits(&s.source).await, "the source qemu still runs after the move");
    let target = s.target.client().await.unwrap();
    assert!(source_runs(&target).await);
    assert_eq!(QmpVm::new(target, hotplug_config()).read_size().await.unwrap(), before);
    s.source.kill().await.ok();
    s.target.abort().await;
}

#[tokio::test]
async fn a_paused_vm_moves_and_stays_paused() {
    // -S: the guest never ran on the source; the target must not start it.
    let Some(s) = setup("move_paused", |o| o.paused = true).await else { return };
    assert!(!source_runs(&s.client).await);
    let (reports, report) = recorder();
    carry_out(5, "vm-e", &s.client, s.machine.clone(), &*s.target, &MigrationConfig::default(), report)
        .await
        .unwrap();
    assert_eq!(phases(&reports), vec![Phase::Started, Phase::Completed]);
    let target = s.target.client().await.unwrap();
    let status = Migration::new(target).run_status().await.unwrap();
    assert!(!status.running, "the target runs a guest that was paused: {status:?}");
    s.target.abort().await;
}

#[tokio::test]
async fn a_target_that_cannot_start_fails_the_move_and_the_source_runs_on() {
    let Some(s) = setup("move_target_fails", |_| {}).await else { return };
    // A valid spec this QEMU cannot run.
    let machine = MachineSpec { cpu_model: Some("no-such-cpu-model".into()), ..s.machine.clone() };
    let (reports, report) = recorder();
    let e = carry_out(2, "vm-b", &s.client, machine, &*s.target, &MigrationConfig::default(), report)
        .await
        .unwrap_err();
    assert!(matches!(e, MoveError::TargetStart(_)), "{e:#}");
    let got = reports.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, Phase::Failed);
    assert!(got[0].1.contains("target qemu did not start"), "{got:?}");
    assert!(source_runs(&s.client).await);
}

#[tokio::test]
async fn a_move_that_does_not_converge_is_cancelled_and_the_target_killed() {
    let Some(s) = setup("move_not_converged", |o| o.memory_mib = 512).await else { return };
    let (reports, report) = recorder();
    let config =
        MigrationConfig { max_bandwidth_bytes_per_s: MIB, timeout_ms: 1_000, ..MigrationConfig::default() };
    let e =
        carry_out(3, "vm-c", &s.client, s.machine.clone(), &*s.target, &config, report).await.unwrap_err();
    assert!(e.to_string().contains("migration"), "{e:#}");
    assert_eq!(phases(&reports), vec![Phase::Started, Phase::Failed]);
    assert!(reports.lock().unwrap()[1].1.contains("did not complete"), "{:?}", reports.lock().unwrap());
    assert!(s.target.confirm(Duration::from_millis(10)).await.is_err(), "the target qemu must be gone");
    // Cancelling takes a moment; then the source runs the guest again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !source_runs(&s.client).await {
        assert!(tokio::time::Instant::now() < deadline, "source does not run after the cancelled move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_target_that_dies_mid_move_fails_it_and_the_source_runs_on() {
    let Some(s) = setup("move_target_dies", |o| o.memory_mib = 512).await else { return };
    let (reports, report) = recorder();
    let config =
        MigrationConfig { max_bandwidth_bytes_per_s: MIB, timeout_ms: 30_000, ..MigrationConfig::default() };
    let target = s.target.clone();
    // The target's side goes away 300 ms into the stream (its agent died
    // and took its QEMU along, or its node was lost).
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        target.abort().await;
    });
    let e =
        carry_out(4, "vm-d", &s.client, s.machine.clone(), &*s.target, &config, report).await.unwrap_err();
    assert!(e.to_string().contains("migration"), "{e:#}");
    assert_eq!(phases(&reports), vec![Phase::Started, Phase::Failed]);
    assert!(source_runs(&s.client).await);
}

/// The target behind a network that fails the confirm's answer (and, when
/// `deliver` is false, the confirm itself) and cannot be asked anything for
/// the first `silent` aborts.
struct LossyLink {
    inner: Arc<LocalIncoming>,
    deliver: bool,
    silent: Mutex<u32>,
    /// Whether the source ran while the target could not be asked.
    source: QmpClient,
    source_ran_meanwhile: Mutex<bool>,
}

#[async_trait::async_trait]
impl IncomingTarget for LossyLink {
    async fn prepare(&self, handoff: &Handoff) -> Result<String, IncomingError> {
        self.inner.prepare(handoff).await
    }

    async fn confirm(&self, timeout: Duration) -> Result<(), ConfirmError> {
        if self.deliver {
            self.inner.confirm(timeout).await?;
            self.inner.adopt().await;
        }
        Err(ConfirmError::Failed(IncomingError::Remote {
            endpoint: "lossy link".into(),
            code: tonic::Code::Unavailable,
            message: "connection reset before the answer".into(),
        }))
    }

    async fn abort(&self) -> AfterAbort {
        let unreachable = {
            let mut silent = self.silent.lock().unwrap();
            let was = *silent > 0;
            *silent = silent.saturating_sub(1);
            was
        };
        if !unreachable {
            return self.inner.abort().await;
        }
        if source_runs(&self.source).await {
            *self.source_ran_meanwhile.lock().unwrap() = true;
        }
        AfterAbort::Unknown("unreachable".into())
    }
}

#[tokio::test]
async fn a_confirm_whose_answer_is_lost_completes_the_move_without_resuming_the_source() {
    let Some(mut s) = setup("move_confirm_lost", |_| {}).await else { return };
    let link = LossyLink {
        inner: s.target.clone(),
        deliver: true,
        silent: Mutex::new(2),
        source: s.client.clone(),
        source_ran_meanwhile: Mutex::new(false),
    };
    let (reports, report) = recorder();
    let config = MigrationConfig { timeout_ms: 60_000, ..MigrationConfig::default() };
    let e = carry_out(6, "vm-f", &s.client, s.machine.clone(), &link, &config, report).await;
    assert!(e.is_ok(), "the guest runs on the target, so the move is done: {e:?}");
    assert_eq!(phases(&reports), vec![Phase::Started, Phase::Completed]);
    assert!(!*link.source_ran_meanwhile.lock().unwrap(), "the source ran while the target could not say");
    // One QEMU runs the guest: the target; the source quit.
    assert!(exits(&s.source).await, "the source qemu still runs after the move");
    let target = QmpClient::connect(&Endpoint::Unix(s.target.qmp_path()), client_config()).await.unwrap();
    assert!(source_runs(&target).await, "the target does not run the guest");
    drop(target);
    assert!(kill_unconfirmed(&s._dirs.1.path().join("target")), "the target qemu was not running");
    s.source.kill().await.ok();
}

#[tokio::test]
async fn a_confirm_that_never_arrived_resumes_the_source_once_the_target_says_so() {
    let Some(s) = setup("move_confirm_unsent", |_| {}).await else { return };
    let link = LossyLink {
        inner: s.target.clone(),
        deliver: false,
        silent: Mutex::new(2),
        source: s.client.clone(),
        source_ran_meanwhile: Mutex::new(false),
    };
    let (reports, report) = recorder();
    let e = carry_out(7, "vm-g", &s.client, s.machine.clone(), &link, &MigrationConfig::default(), report)
        .await
        .unwrap_err();
    assert!(matches!(e, MoveError::Switchover(_)), "{e:#}");
    assert_eq!(phases(&reports), vec![Phase::Started, Phase::Failed]);
    assert!(!*link.source_ran_meanwhile.lock().unwrap(), "the source ran while the target could not say");
    assert!(source_runs(&s.client).await, "the source must run the guest once the target is gone");
    assert!(s.target.client().await.is_none(), "the target qemu must be gone");
}
