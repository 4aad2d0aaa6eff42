//! The target agent's side of a move, without its gRPC face
//! ([`super::service`]): it starts a paused incoming QEMU only for an order
//! the allocator pushed to this node, resumes the guest only when the source
//! agent confirms, kills an incoming QEMU nobody confirmed in time, and
//! hands a VM that arrived to the node as one of its own.
//!
//! Each order's state changes only through [`super::target_state`]'s
//! transition function; what survives a restart is in [`super::adopted`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::adopted::{self, AdoptedRecord};
use super::settings::MigrationSettings;
use super::target::{Handoff, IncomingError, IncomingTarget, LocalIncoming};
use super::target_state::{Authorised, Move, Moves, TargetState};
use crate::vms::VmSpec;

/// How long a prepare waits for the allocator's copy of its order: the
/// allocator pushes the order to both agents at once, and the source's call
/// may overtake the target's copy by a moment.
const AUTHORISATION_WAIT: Duration = Duration::from_secs(3);

/// What a prepared order holds until it is confirmed or thrown away: the
/// spec the VM is scaled by once it runs here, and its paused QEMU.
type Prepared = (Box<VmSpec>, Arc<LocalIncoming>);

/// A prepare as the node takes it; the edge checked that its parts agree.
#[derive(Debug)]
pub struct Prepare {
    pub order_id: u64,
    pub vm: VmSpec,
    pub handoff: Handoff,
}

/// Why the target refuses or fails a request. The gRPC edge turns each into
/// a status code ([`super::service`]).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("the handoff is not valid json")]
    HandoffJson(#[source] serde_json::Error),
    #[error(
        "the handoff names order {handoff_order} and vm {handoff_vm:?}/{spec_vm:?}, the request order \
         {order} and vm {vm:?}"
    )]
    Mismatch { handoff_order: u64, handoff_vm: String, spec_vm: String, order: u64, vm: String },
    #[error("{0}")]
    BadSpec(String),
    #[error("this agent takes no vms in (no migration.listen)")]
    NotTakingVms,
    #[error("no migration order {order} from the allocator names vm {vm:?} and this node")]
    NotAuthorised { order: u64, vm: String },
    #[error("order {0} was prepared already")]
    AlreadyPrepared(u64),
    #[error("vm {0:?} runs on this node already")]
    AlreadyHere(String),
    #[error("no free port on {ip} for the stream")]
    NoPort {
        ip: std::net::IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the target qemu did not start")]
    NotStarted(#[source] IncomingError),
    #[error("no incoming qemu for order {0} (never prepared, aborted or timed out)")]
    UnknownOrder(u64),
    #[error("the order is being confirmed already")]
    ConfirmBusy,
    #[error("the order is being confirmed or started; ask again")]
    Busy,
    #[error("cannot record the vm taken in, so it is not taken; its qemu is killed")]
    NotRecorded(#[source] super::RecordError),
    #[error("the guest did not resume here; its qemu is killed")]
    NotResumed(#[source] IncomingError),
}

/// The target side of this node's moves; shared by the gRPC service and the
/// node supervisor.
#[derive(Debug)]
pub struct TargetNode {
    settings: MigrationSettings,
    moves: Mutex<Moves<Prepared>>,
    /// Watched by prepares that wait for their order.
    authorised: watch::Sender<Authorised>,
    /// VMs taken in (and read back after a restart), for the node to scale.
    adopted: watch::Sender<Vec<VmSpec>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl TargetNode {
    pub fn new(settings: MigrationSettings, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            moves: Mutex::default(),
            authorised: watch::Sender::new(Authorised::default()),
            adopted: watch::Sender::new(Vec::new()),
            metrics,
        })
    }

    fn count(&self, outcome: &'static str) {
        self.metrics.migrations.get_or_create(&crate::metrics::MoveLabels { role: "target", outcome }).inc();
    }

    fn moves(&self) -> MutexGuard<'_, Moves<Prepared>> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A step the caller knows to be allowed; a refusal is a bug, logged.
    fn step(&self, order: u64, to: Option<Move<Prepared>>) {
        if let Err(e) = self.moves().step(order, to) {
            error!("{e}");
        }
    }

    fn adopted_dir(&self) -> PathBuf {
        self.settings.state_dir.join("adopted")
    }

    fn incoming_dir(&self) -> PathBuf {
        self.settings.state_dir.join("incoming")
    }

    /// The VMs this node took in, as the node follows them.
    pub fn adopted(&self) -> watch::Receiver<Vec<VmSpec>> {
        self.adopted.subscribe()
    }

    /// The allocator named this node the target of `order` for `vm`.
    pub fn authorise(&self, order: u64, vm: &str) {
        self.authorised.send_modify(|a| a.insert(order, vm));
    }

    /// The VM left this node (moved away again, or gone): its record goes.
    pub fn forget(&self, vm: &str) {
        let path = adopted::record_path(&self.adopted_dir(), vm);
        if path.exists() {
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(%vm, "cannot remove {}: {e}", path.display());
            }
        }
        self.adopted.send_modify(|l| l.retain(|s| s.id != vm));
    }

    /// After a start: VMs taken in before are adopted again when their QEMU
    /// is still there; incoming QEMUs nobody confirmed are killed. Returns
    /// how many of each.
    pub async fn recover(&self) -> (usize, usize) {
        let records = adopted::recover(&self.adopted_dir()).await;
        let killed = adopted::kill_unconfirmed_qemus(&self.incoming_dir(), &records);
        for r in &records {
            self.step(r.order_id, Some(Move::Running { vm: r.spec.id.clone() }));
        }
        let n = records.len();
        self.adopted.send_replace(records.into_iter().map(|r| r.spec).collect());
        (n, killed)
    }

    /// Where `order` stands here.
    pub fn status(&self, order: u64) -> TargetState {
        self.moves().state(order)
    }

    /// Starts a paused incoming QEMU for an authorised order; the URI it
    /// listens on for the stream.
    pub async fn prepare(self: &Arc<Self>, p: Prepare) -> Result<String, TargetError> {
        let Some(ip) = self.settings.stream_ip() else { return Err(TargetError::NotTakingVms) };
        let order = p.order_id;
        let mut authorised = self.authorised.subscribe();
        let _ = tokio::time::timeout(AUTHORISATION_WAIT, authorised.wait_for(|a| a.contains(order))).await;
        if !self.authorised.borrow().names(order, &p.vm.id) {
            return Err(TargetError::NotAuthorised { order, vm: p.vm.id });
        }
        if self.adopted.borrow().iter().any(|s| s.id == p.vm.id) {
            return Err(TargetError::AlreadyHere(p.vm.id));
        }
        // Held while QEMU starts, so a second prepare of the order is refused.
        if self.moves().step(order, Some(Move::Starting)).is_err() {
            return Err(TargetError::AlreadyPrepared(order));
        }
        let incoming = match self.start(&p, ip).await {
            Ok(incoming) => Arc::new(incoming),
            Err(e) => {
                self.step(order, None);
                return Err(e);
            }
        };
        let uri = match incoming.prepare(&p.handoff).await {
            Ok(uri) => uri,
            Err(e) => {
                self.step(order, None);
                return Err(TargetError::NotStarted(e));
            }
        };
        self.step(order, Some(Move::Prepared((Box::new(p.vm.clone()), incoming.clone()))));
        info!(order, vm = %p.vm.id, %uri, "incoming QEMU waits for the stream");
        let wait = p.handoff.config.timeout() + Duration::from_millis(self.settings.confirm_grace_ms);
        self.kill_if_unconfirmed(order, wait);
        Ok(uri)
    }

    /// The incoming QEMU of `p`, not started yet, on a free port of `ip`.
    async fn start(&self, p: &Prepare, ip: std::net::IpAddr) -> Result<LocalIncoming, TargetError> {
        // Not a bind(0) probe: its port goes back to the kernel's pool and
        // another process may take it before QEMU binds it.
        let port = vmscale_common::net::free_port(ip).map_err(|source| TargetError::NoPort { ip, source })?;
        let dir = self.incoming_dir().join(p.order_id.to_string());
        Ok(LocalIncoming::new(self.settings.qemu.clone(), dir, SocketAddr::new(ip, port)))
    }

    /// Nobody confirmed within `wait`: the source gave up or is gone.
    fn kill_if_unconfirmed(self: &Arc<Self>, order: u64, wait: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let prepared = this.moves().take_prepared(order, None);
            if let Some((_, incoming)) = prepared {
                warn!(order, "no confirm within {wait:?}: killing the incoming QEMU");
                this.count("failed");
                incoming.abort().await;
            }
        });
    }

    /// Resumes the guest of a prepared order here once its stream is in.
    pub async fn confirm(&self, order: u64, timeout: Duration) -> Result<(), TargetError> {
        let (vm, incoming) = {
            let mut moves = self.moves();
            match moves.take_prepared(order, Some(Move::Confirming)) {
                Some(prepared) => prepared,
                None => {
                    return match moves.state(order) {
                        TargetState::Running => Ok(()),
                        TargetState::Absent => Err(TargetError::UnknownOrder(order)),
                        TargetState::Starting | TargetState::Prepared | TargetState::Confirming => {
                            Err(TargetError::ConfirmBusy)
                        }
                    }
                }
            }
        };
        let mut spec = *vm;
        spec.qmp = incoming.qmp_path().to_string_lossy().into_owned();
        // Recorded before the guest may run here: a restarted agent must
        // still say it runs here, or the source would resume it too.
        let mut record = AdoptedRecord { order_id: order, resume: incoming.resumes(), resumed: false, spec };
        let confirmed = match adopted::persist(&self.adopted_dir(), &record) {
            Ok(()) => incoming.confirm(timeout).await.map_err(|e| match e {
                super::target::ConfirmError::NotDelivered(e) | super::target::ConfirmError::Failed(e) => {
                    TargetError::NotResumed(e)
                }
            }),
            Err(e) => Err(TargetError::NotRecorded(e)),
        };
        if let Err(e) = confirmed {
            self.count("failed");
            incoming.abort().await;
            let _ = std::fs::remove_file(adopted::record_path(&self.adopted_dir(), &record.spec.id));
            self.step(order, None);
            return Err(e);
        }
        record.resumed = record.resume;
        if let Err(e) = adopted::persist(&self.adopted_dir(), &record) {
            warn!(vm = %record.spec.id, "cannot note the resume in the VM's record: {}", vmscale_common::error::Chain(&e));
        }
        let spec = record.spec;
        // The watchdog holds the other clone until it fires; it kills only
        // moves still prepared, and this one is not.
        let pid = incoming.adopt().await;
        self.step(order, Some(Move::Running { vm: spec.id.clone() }));
        info!(order, vm = %spec.id, ?pid, qmp = %spec.qmp, "the guest runs here now");
        self.count("completed");
        self.adopted.send_modify(|l| {
            l.retain(|s| s.id != spec.id);
            l.push(spec);
        });
        Ok(())
    }

    /// Kills the order's QEMU unless the guest runs here; where the order
    /// stands afterwards ([`TargetState::Absent`] or [`TargetState::Running`]).
    pub async fn abort(&self, order: u64) -> Result<TargetState, TargetError> {
        let prepared = self.moves().take_prepared(order, None);
        if let Some((vm, incoming)) = prepared {
            incoming.abort().await;
            self.count("failed");
            info!(order, vm = %vm.id, "move aborted by the source; incoming QEMU killed");
            return Ok(TargetState::Absent);
        }
        match self.status(order) {
            s @ (TargetState::Running | TargetState::Absent) => Ok(s),
            TargetState::Starting | TargetState::Prepared | TargetState::Confirming => Err(TargetError::Busy),
        }
    }
}

#[cfg(test)]
#[path = "target_node_tests.rs"]
mod tests;
