//! The source node's side of a migration order: hold the VM's loop still,
//! move the VM with [`super::source::carry_out`] to the target agent, and
//! tell the allocator every phase until it has heard it.
//!
//! A move is recorded on disk (`<state_dir>/moves/<vm>.json`) from before
//! the stream starts until it is settled, with whether the confirm was
//! sent: an agent that died mid-move decides from it, when it starts again,
//! whether its paused QEMU may resume ([`recover`], by the table in
//! [`super::recovery`]). The same rule holds while the agent runs
//! ([`super::source`]): after a confirm, the source resumes only when the
//! target says its QEMU is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::migration_status::Phase;

use super::command_line::read_machine;
use super::recovery::{recovery, QemuSays, Step, TargetSays};
use super::remote::{RemoteTarget, TargetLink};
use super::source::{carry_out, AskAgain};
use super::stream_tls::StreamTls;
use super::target::{AfterAbort, ConfirmError, Handoff, IncomingError, IncomingTarget};
use super::template::Template;
use super::MoveError;
use crate::links::allocator::{Registry, Session};
use crate::links::dial::TcpSecurity;
use crate::qmp::migrate::{Migration, MigrationConfig, Progress};
use crate::qmp::QmpClient;
use crate::vm_loop::StatusMap;
use crate::vms::VmSpec;
use vmscale_common::error::Chain;
use vmscale_common::tls::Tls;

/// How long the VM's loop may take to finish its last action.
const QUIET_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a phase report is retried while the allocator is away.
const REPORT_PATIENCE: Duration = Duration::from_secs(300);
/// How often a report is tried again while there is no session.
const REPORT_RETRY: Duration = Duration::from_millis(250);
/// How long a restarted agent lets a cancelled stream settle.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// How often it looks whether the stream has settled.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// What the node shares with its moves.
#[derive(Debug, Clone)]
pub struct MoverNode {
    pub session: watch::Receiver<Session>,
    pub registry: Arc<Registry>,
    pub status: StatusMap,
    pub proc_root: PathBuf,
    pub transfer: MigrationConfig,
    /// This node's `[migration]` directories, which name the VM's files.
    pub template: Template,
    /// This agent's `[tls]` (read at every move, so a renewed certificate
    /// is used from the next move on), or plain text if `insecure`.
    pub security: TcpSecurity,
    /// Streams go over QEMU's TLS (`migration.tls`).
    pub stream_tls: bool,
    pub state_dir: PathBuf,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The VM as the node runs it now.
#[derive(Debug, Clone)]
pub struct VmNow {
    pub spec: VmSpec,
    pub client: QmpClient,
    pub moving: watch::Sender<bool>,
    pub quiet: watch::Receiver<bool>,
}

/// What became of a report to the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    Accepted,
    /// Answered with an error (e.g. the order is no longer open): final.
    Refused,
    /// No session for `REPORT_PATIENCE`: the next hello tells the truth.
    GaveUp,
}

/// How a move ended for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The VM runs on the target; this node drops it.
    MovedAway,
    /// The VM runs here, as before.
    Stayed,
}

/// The on-disk record of a move under way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub order_id: u64,
    pub vm: String,
    pub target_node: String,
    pub target_endpoint: String,
    /// The QMP endpoint of the source QEMU.
    pub qmp: String,
    pub spec: VmSpec,
    /// Set just before the target is asked to resume the guest.
    pub confirm_sent: bool,
    /// Whether the guest ran on the source before the move: a VM paused
    /// there is not resumed by a failed move.
    #[serde(default = "ran_before")]
    pub source_running: bool,
}

fn ran_before() -> bool {
    true
}

fn record_path(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join("moves").join(super::file_name(vm, "json"))
}

fn write_record(state_dir: &Path, r: &MoveRecord) -> Result<(), super::RecordError> {
    let path = record_path(state_dir, &r.vm);
    let dir = path.parent().unwrap_or(state_dir);
    // Durable (fsync, rename, fsync of the directory): a restarted agent
    // decides from this record whether its paused QEMU may resume.
    std::fs::create_dir_all(dir)
        .and_then(|()| vmscale_common::durable::write_json(&path, r))
        .map_err(|source| super::RecordError { path, source })
}

fn drop_record(state_dir: &Path, vm: &str) {
    let _ = std::fs::remove_file(record_path(state_dir, vm));
}

/// The records of moves a previous run of the agent left unsettled.
pub fn unsettled(state_dir: &Path) -> Vec<MoveRecord> {
    let Ok(rd) = std::fs::read_dir(state_dir.join("moves")) else { return Vec::new() };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter_map(|p| match std::fs::read(&p).map(|b| serde_json::from_slice::<MoveRecord>(&b)) {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                warn!("ignoring the move record {}: {e}", p.display());
                None
            }
            Err(e) => {
                warn!("cannot read the move record {}: {e}", p.display());
                None
            }
        })
        .collect()
}

impl MoverNode {
    /// Sets the source QEMU's next stream up: over TLS to `target`'s QEMU
    /// when `migration.tls` says so, else plain (clearing an earlier setup).
    async fn stream_tls(&self, client: &QmpClient, target: &str) -> Result<(), MoveError> {
        let tls = if self.stream_tls {
            let files = self.security.tls.as_ref().ok_or(MoveError::StreamTls(None))?;
            let dir = super::stream_tls::creds_dir(&self.state_dir);
            super::stream_tls::write_creds_dir(files, &dir).map_err(|e| MoveError::StreamTls(Some(e)))?;
            Some(StreamTls { dir, peer_node: target.to_owned() })
        } else {
            None
        };
        super::stream_tls::apply(client, super::stream_tls::source_commands(tls.as_ref()))
            .await
            .map_err(|e| MoveError::StreamTls(Some(e)))
    }

    /// The `[tls]` files read now, if set.
    fn tls(&self) -> Result<Option<Tls>, IncomingError> {
        self.security.tls.as_ref().map(Tls::load).transpose().map_err(IncomingError::Tls)
    }

    /// Only while the VM has a status entry: one that left keeps none.
    fn set_status(&self, vm: &str, what: Option<String>) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = st.get_mut(vm) {
            e.migration = what;
        }
    }

    /// Tells the allocator that the VM runs on the target now. If the
    /// allocator no longer holds the order (it passed its deadline while
    /// this agent waited for the target's word), it put the VM back on this
    /// node's ledger: the VM is released here, since it runs on the target
    /// (whose agent registers it there).
    pub async fn report_completed(&self, order: u64, vm: &str) {
        if self.report(order, Phase::Completed, "").await != Heard::Refused {
            return;
        }
        let session = self.session.borrow().clone();
        let Some(s) = session else { return };
        match s.call(Body::RemoveVm(pb::RemoveVm { vm_id: vm.to_owned() })).await {
            Ok(_) => info!(order, vm, "released the moved VM's stale reservation on this node"),
            Err(e) => {
                warn!(order, vm, "cannot release the moved VM's reservation on this node: {}", Chain(&e))
            }
        }
    }

    /// Tells the allocator about an order, retrying while there is no
    /// session; an answer that refuses the report is final.
    pub async fn report(&self, order: u64, phase: Phase, reason: &str) -> Heard {
        let deadline = tokio::time::Instant::now() + REPORT_PATIENCE;
        let mut session = self.session.clone();
        loop {
            let live = session.borrow_and_update().clone();
            if let Some(s) = live {
                let body = Body::MigrationStatus(pb::MigrationStatus {
                    order_id: order,
                    phase: phase as i32,
                    reason: reason.to_owned(),
                });
                match s.call(body).await {
                    Ok(_) => return Heard::Accepted,
                    Err(vmscale_allocator_client::ClientError::Request { code, message }) => {
                        warn!(order, ?phase, "the allocator refused the move's report: {code:?}: {message}");
                        return Heard::Refused;
                    }
                    Err(e) => warn!(order, ?phase, "cannot report the move yet: {}", Chain(&e)),
                }
            }
            if tokio::time::Instant::now() > deadline {
                warn!(order, ?phase, "gave up reporting the move; the allocator settles it at its deadline");
                return Heard::GaveUp;
            }
            // A link that is gone for good (its sender dropped) only
            // leaves the retry, not a busy loop.
            tokio::select! {
                Ok(()) = session.changed() => {}
                () = tokio::time::sleep(REPORT_RETRY) => {}
            }
        }
    }

    /// Carries out one order naming this node as the source.
    pub async fn move_out(&self, order: &pb::MigrationOrder, vm: Option<VmNow>) -> Ended {
        let id = order.order_id;
        let Some(vm) = vm else {
            let why = format!("vm {:?} does not run on this node (or its QMP is not connected)", order.vm_id);
            warn!(order = id, "{why}");
            self.report(id, Phase::Failed, &why).await;
            return Ended::Stayed;
        };
        if order.target_endpoint.is_empty() {
            let why = format!("target node {} has no migration endpoint", order.target_node);
            self.report(id, Phase::Failed, &why).await;
            return Ended::Stayed;
        }
        info!(order = id, vm = %order.vm_id, to = %order.target_node, endpoint = %order.target_endpoint, "moving the VM");
        self.registry.set_moving(&order.vm_id, Some((id, order.target_node.clone())));
        let label = |what: &str| Some(format!("to {} (order {id}): {what}", order.target_node));
        self.set_status(&order.vm_id, label("preparing"));
        let t0 = std::time::Instant::now();
        let ended = match self.attempt(order, &vm, &label).await {
            Ok(()) => Ended::MovedAway,
            Err(e) => {
                self.report(id, Phase::Failed, &super::reason(&e)).await;
                Ended::Stayed
            }
        };
        drop_record(&self.state_dir, &order.vm_id);
        let outcome = if ended == Ended::MovedAway { "completed" } else { "failed" };
        let l = crate::metrics::MoveLabels { role: "source", outcome };
        self.metrics.migrations.get_or_create(&l).inc();
        self.metrics.migration_seconds.get_or_create(&l).observe(t0.elapsed().as_secs_f64());
        match ended {
            Ended::MovedAway => self.registry.remove(&order.vm_id),
            Ended::Stayed => {
                self.registry.set_moving(&order.vm_id, None);
                vm.moving.send_replace(false);
            }
        }
        self.set_status(&order.vm_id, None);
        ended
    }

    /// Ok once the VM runs on the target and the allocator heard so; the
    /// reason otherwise, with the VM running here again.
    async fn attempt(
        &self,
        order: &pb::MigrationOrder,
        vm: &VmNow,
        label: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), MoveError> {
        let id = order.order_id;
        vm.moving.send_replace(true);
        let mut quiet = vm.quiet.clone();
        if tokio::time::timeout(QUIET_TIMEOUT, quiet.wait_for(|q| *q)).await.is_err() {
            return Err(MoveError::NotQuiet(QUIET_TIMEOUT));
        }
        let machine = read_machine(&vm.client, &self.proc_root, &self.template).await?;
        let source_running =
            Migration::new(vm.client.clone()).run_status().await.map_err(MoveError::SourceStatus)?.running;
        let tls = self.tls().map_err(MoveError::Target)?;
        self.stream_tls(&vm.client, &order.target_node).await?;
        let link =
            TargetLink { endpoint: &order.target_endpoint, node: &order.target_node, tls: tls.as_ref() };
        let target = RemoteTarget::new(link, id, vm.spec.clone()).map_err(MoveError::Target)?;
        let record = MoveRecord {
            order_id: id,
            vm: order.vm_id.clone(),
            target_node: order.target_node.clone(),
            target_endpoint: order.target_endpoint.clone(),
            qmp: vm.spec.qmp.clone(),
            spec: vm.spec.clone(),
            confirm_sent: false,
            source_running,
        };
        write_record(&self.state_dir, &record).map_err(MoveError::NotRecorded)?;
        // The confirm is the one step that lets the target run the guest:
        // recorded before it goes out.
        let recorded =
            Recorded { inner: &target, state_dir: &self.state_dir, record: std::sync::Mutex::new(record) };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Phase, String)>();
        let reporter = async {
            while let Some((phase, reason)) = rx.recv().await {
                if phase == Phase::Started {
                    self.set_status(&order.vm_id, label("migrating"));
                }
                match phase {
                    Phase::Completed => self.report_completed(id, &order.vm_id).await,
                    Phase::Failed => {}
                    _ => {
                        self.report(id, phase, &reason).await;
                    }
                }
            }
        };
        let mover = async {
            let r = carry_out(id, &order.vm_id, &vm.client, machine, &recorded, &self.transfer, |p, why| {
                let _ = tx.send((p, why.to_owned()));
            })
            .await;
            drop(tx);
            r
        };
        let (result, ()) = tokio::join!(mover, reporter);
        let done = result?;
        info!(order = id, vm = %order.vm_id, to = %order.target_node, total_ms = ?done.info.total_time_ms,
            downtime_ms = ?done.info.downtime, "the VM moved away");
        Ok(())
    }
}

/// The remote target, with the record updated before the confirm goes out.
struct Recorded<'a> {
    inner: &'a RemoteTarget,
    state_dir: &'a Path,
    record: std::sync::Mutex<MoveRecord>,
}

#[async_trait::async_trait]
impl IncomingTarget for Recorded<'_> {
    async fn prepare(&self, handoff: &Handoff) -> Result<String, IncomingError> {
        self.inner.prepare(handoff).await
    }

    async fn confirm(&self, timeout: Duration) -> Result<(), ConfirmError> {
        {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            r.confirm_sent = true;
            write_record(self.state_dir, &r)
                .map_err(|e| ConfirmError::NotDelivered(IncomingError::NotRecorded(e)))?;
        }
        self.inner.confirm(timeout).await
    }

    async fn abort(&self) -> AfterAbort {
        self.inner.abort().await
    }
}

/// Settles a move a previous run left unsettled, step by step as
/// [`recovery`] says; the record is gone afterwards. After a confirm it
/// waits, asking, until the target can say whether the guest runs there.
pub async fn recover(node: &MoverNode, r: &MoveRecord) -> Ended {
    let tls = node.tls().unwrap_or_else(|e| {
        warn!(order = r.order_id, "{}", super::reason(&e));
        None
    });
    let link = TargetLink { endpoint: &r.target_endpoint, node: &r.target_node, tls: tls.as_ref() };
    let target = match RemoteTarget::new(link, r.order_id, r.spec.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(order = r.order_id, "bad target endpoint in the move record: {}", super::reason(&e));
            None
        }
    };
    let mut says = TargetSays::NotAsked;
    let mut qemu = QemuSays::NotAsked;
    let mut source = None;
    let mut again = AskAgain::new(r.order_id, "the source agent restarted after sending it");
    let ended = loop {
        match recovery(r, &says, &qemu) {
            Step::AskTarget => says = ask_target(target.as_ref()).await,
            Step::AskAgain => {
                if let TargetSays::CannotSay(why) = &says {
                    again.wait(why).await;
                }
                says = ask_target(target.as_ref()).await;
            }
            Step::AskQemu => {
                source = connect(r).await;
                qemu = ask_qemu(source.as_ref(), false).await;
            }
            Step::CancelStream => {
                if let Some(out) = &source {
                    cancel_stream(out).await;
                }
                qemu = ask_qemu(source.as_ref(), true).await;
            }
            Step::MoveAway => {
                if let Some(out) = connect(r).await {
                    let _ = out.quit().await;
                }
                info!(order = r.order_id, vm = %r.vm, to = %r.target_node, "an interrupted move had finished: the VM runs on the target");
                node.report_completed(r.order_id, &r.vm).await;
                break Ended::MovedAway;
            }
            Step::Stay { resume } => {
                if let (true, Some(out)) = (resume, &source) {
                    if let Err(e) = out.cont().await {
                        warn!(order = r.order_id, vm = %r.vm, "cannot resume the source after an interrupted move: {}", Chain(&e));
                    }
                }
                let why = "the source agent restarted mid-move; the VM stays on the source";
                info!(order = r.order_id, vm = %r.vm, "{why}");
                node.report(r.order_id, Phase::Failed, why).await;
                break Ended::Stayed;
            }
        }
    };
    drop_record(&node.state_dir, &r.vm);
    ended
}

async fn ask_target(target: Option<&RemoteTarget>) -> TargetSays {
    let Some(target) = target else { return TargetSays::NoEndpoint };
    match target.abort().await {
        AfterAbort::Gone => TargetSays::Gone,
        AfterAbort::RunsThere => TargetSays::RunsThere,
        AfterAbort::Unknown(why) => TargetSays::CannotSay(why),
    }
}

/// The source QEMU of the record, if it answers on its QMP endpoint.
async fn connect(r: &MoveRecord) -> Option<Migration> {
    let endpoint = r.qmp.parse().ok()?;
    let client = QmpClient::connect(&endpoint, crate::qmp::ClientConfig::default()).await.ok()?;
    Some(Migration::new(client))
}

async fn ask_qemu(source: Option<&Migration>, cancelled: bool) -> QemuSays {
    let Some(out) = source else { return QemuSays::Unreachable };
    let sending = out.query().await.is_ok_and(|i| i.is_sending());
    let running = out.run_status().await.ok().map(|s| s.running);
    QemuSays::Answered { sending, running, cancelled }
}

/// Cancels the source's stream and waits (a while) until it has settled,
/// so that what the source says next is final.
async fn cancel_stream(out: &Migration) {
    let _ = out.cancel().await;
    let _ = tokio::time::timeout(CANCEL_WAIT, async {
        while out.query().await.is_ok_and(|i| i.progress() == Progress::Running) {
            tokio::time::sleep(CANCEL_POLL).await;
        }
    })
    .await;
}

#[cfg(test)]
#[path = "mover_tests.rs"]
mod tests;
