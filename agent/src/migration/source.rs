//! The source agent's executor of one move. Every path out of it leaves the
//! guest running in exactly one QEMU: on the target after `Completed`, on
//! the source after `Failed` (the target's QEMU killed first).

use std::time::Duration;

use vmscale_proto::allocator::migration_status::Phase;

use super::machine::MachineSpec;
use super::target::{AfterAbort, ConfirmError, Handoff, IncomingTarget};
use super::{MoveError, MoveState};
use crate::qmp::migrate::{MigrateError, Migration, MigrationConfig, MigrationInfo, RunState};
use crate::qmp::migrate_spec::{read_spec, DeviceSpec};
use crate::qmp::{Hotplug, QmpClient};
use vmscale_common::error::Chain;

/// How long the target may take to run the guest after the stream ended.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The first and the longest wait between two questions to a target that
/// could not say whether it runs the guest after a confirm.
const ASK_AGAIN_FIRST: Duration = Duration::from_millis(100);
const ASK_AGAIN_MAX: Duration = Duration::from_secs(5);

/// What a finished move did.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub info: MigrationInfo,
    pub devices: DeviceSpec,
}

/// One move, its state, and the reports the allocator gets.
struct Run<'a, R: FnMut(Phase, &str)> {
    state: MoveState,
    report: &'a mut R,
}

impl<R: FnMut(Phase, &str)> Run<'_, R> {
    fn enter(&mut self, to: MoveState, reason: &str) {
        match self.state.transition(to) {
            Ok(next) => {
                self.state = next;
                if let Some(phase) = next.report() {
                    (self.report)(phase, reason);
                }
            }
            // A bug here must not leave two running QEMUs: log, keep going.
            Err(e) => tracing::error!("{e}"),
        }
    }
}

/// Moves the guest behind `source` to `target`. `report` hears `Started`,
/// then `Completed` or `Failed` with the reason, as the allocator must.
pub async fn carry_out(
    order_id: u64,
    vm_id: &str,
    source: &QmpClient,
    machine: MachineSpec,
    target: &dyn IncomingTarget,
    config: &MigrationConfig,
    mut report: impl FnMut(Phase, &str),
) -> Result<MoveReport, MoveError> {
    let mut run = Run { state: MoveState::Ordered, report: &mut report };
    let result = attempt(order_id, vm_id, source, machine, target, config, &mut run).await;
    match &result {
        Ok(_) => run.enter(MoveState::Completed, ""),
        Err(e) => {
            // The target first: once it is gone the source is the only
            // QEMU that can hold the guest, and may safely run it. (After a
            // confirm, `attempt` fails only once the target said it is gone.)
            let _ = target.abort().await;
            let out = Migration::new(source.clone());
            if let Ok(status) = out.run_status().await {
                if !status.running && status.status == RunState::PostMigrate {
                    if let Err(e) = out.cont().await {
                        tracing::error!(
                            order = order_id,
                            "cannot resume the source after a failed move: {}",
                            Chain(&e)
                        );
                    }
                }
            }
            let reason = super::reason(e);
            tracing::warn!(order = order_id, vm = %vm_id, %reason, "move failed; the vm stays on the source");
            run.enter(MoveState::Failed, &reason);
        }
    }
    result
}

async fn attempt<R: FnMut(Phase, &str)>(
    order_id: u64,
    vm_id: &str,
    source: &QmpClient,
    machine: MachineSpec,
    target: &dyn IncomingTarget,
    config: &MigrationConfig,
    run: &mut Run<'_, R>,
) -> Result<MoveReport, MoveError> {
    run.enter(MoveState::Preparing, "");
    let devices = read_spec(source).await?;
    let machine = MachineSpec { devices: devices.clone(), ..machine };
    // The command line against QEMU's own answers.
    let size = crate::qmp::QmpVm::new(source.clone(), crate::qmp::HotplugConfig::default())
        .read_size()
        .await
        .map_err(|e| MoveError::Migrate(MigrateError::Qmp(e)))?;
    super::machine_from_args::agrees_with(&machine, &size).map_err(MoveError::Describe)?;
    // Checked here too: a move the target would refuse fails before it starts.
    machine.validate().map_err(|e| MoveError::Describe(e.into()))?;
    let out = Migration::new(source.clone());
    // As the source's QEMU is set up (`super::stream_tls`): the target
    // checks it against its own.
    let params: serde_json::Value =
        source.execute("query-migrate-parameters", None).await.map_err(MigrateError::from)?;
    let stream_tls = params["tls-creds"].as_str().is_some_and(|c| !c.is_empty());
    let handoff = Handoff {
        order_id,
        vm_id: vm_id.to_owned(),
        machine,
        stream_tls,
        config: config.clone(),
        source_running: out.run_status().await?.running,
    };
    let uri = target.prepare(&handoff).await.map_err(MoveError::TargetStart)?;
    out.configure(config).await?;
    out.start(&uri).await?;
    run.enter(MoveState::Migrating, "");
    let info = out.wait(config, |_| {}).await?;
    run.enter(MoveState::SwitchedOver, "");
    match target.confirm(CONFIRM_TIMEOUT).await {
        Ok(()) => {}
        Err(e @ ConfirmError::NotDelivered(_)) => return Err(MoveError::Switchover(e)),
        // The confirm may have gone through although its answer did not
        // come back: the source resumes only when the target says it is gone.
        Err(ConfirmError::Failed(e)) => {
            let why = super::reason(&e);
            if !runs_on_target(order_id, target, &why).await {
                return Err(MoveError::Switchover(ConfirmError::Failed(e)));
            }
            tracing::info!(order = order_id, "the confirm failed ({why}) but the guest runs on the target");
        }
    }
    // The guest runs on the target; the paused source QEMU goes. A QEMU
    // that closes the connection while quitting is what we asked for.
    if let Err(e) = out.quit().await {
        if !e.is_disconnected() {
            tracing::warn!(order = order_id, "the source qemu did not quit: {}; it stays paused", Chain(&e));
        }
    }
    Ok(MoveReport { info, devices })
}

/// After a failed confirm: asks the target (aborting what has not run)
/// until it says whether the guest runs there. Meanwhile the guest runs
/// nowhere: the source's QEMU stays paused, because resuming it while the
/// target may run the guest would run it twice.
pub(super) async fn runs_on_target(order_id: u64, target: &dyn IncomingTarget, confirm_error: &str) -> bool {
    let mut again = AskAgain::new(order_id, confirm_error);
    loop {
        match target.abort().await {
            AfterAbort::Gone => return false,
            AfterAbort::RunsThere => return true,
            AfterAbort::Unknown(why) => again.wait(&why).await,
        }
    }
}

/// The pause between two questions to a target that could not say whether
/// it runs the guest, growing to [`ASK_AGAIN_MAX`], with a log a person can
/// act on: loud at first, then every minute or so.
pub(super) struct AskAgain<'a> {
    order_id: u64,
    confirm_error: &'a str,
    asked: u32,
}

impl<'a> AskAgain<'a> {
    pub(super) fn new(order_id: u64, confirm_error: &'a str) -> Self {
        Self { order_id, confirm_error, asked: 0 }
    }

    pub(super) async fn wait(&mut self, why: &str) {
        self.asked += 1;
        if self.asked <= 3 || self.asked.is_multiple_of(12) {
            tracing::error!(
                order = self.order_id,
                "the confirm failed ({}) and the target cannot say whether it runs the guest ({why}); the \
                 guest stays paused on the source until it can. If the target node is lost for good, make \
                 sure its QEMU is gone, then resume the source with QMP `cont`",
                self.confirm_error
            );
        }
        let backoff = vmscale_common::backoff::Backoff::new(ASK_AGAIN_FIRST, ASK_AGAIN_MAX);
        tokio::time::sleep(backoff.delay(self.asked)).await;
    }
}
