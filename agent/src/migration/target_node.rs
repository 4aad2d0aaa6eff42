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
use super::stream_tls::StreamTls;
use super::target::{Handoff, IncomingError, IncomingTarget, LocalIncoming};
use super::target_state::{Authorised, Caller, Move, Moves, Refusal, TargetState};
use super::tombstones::{self, Tombstone};
use crate::vms::VmSpec;
use vmscale_common::tls::TlsFiles;

/// How long a prepare waits for the allocator's copy of its order: the
/// allocator pushes the order to both agents at once, and the source's call
/// may overtake the target's copy by a moment.
const AUTHORISATION_WAIT: Duration = Duration::from_secs(3);

/// The longest a stream may take as a source asks, before its incoming
/// QEMU is killed unconfirmed (plus `migration.confirm_grace_ms`).
const MAX_STREAM_WAIT: Duration = Duration::from_secs(3600);

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
    #[error("the source sends the stream {} and this node takes it only {}", tls_word(*theirs), tls_word(!*theirs))]
    StreamTls { theirs: bool },
    #[error("migration.tls is on and this agent has no [tls] files")]
    NoTlsFiles,
    #[error("the vm's informant socket {0} is not in this node's migration.vsock_dir")]
    ForeignInformant(String),
    #[error("the handoff is {0} bytes, more than any vm needs")]
    HandoffSize(usize),
    #[error("{0}")]
    BadSpec(String),
    #[error("the vm's machine is refused")]
    BadMachine(#[source] super::machine::SpecError),
    #[error("the transfer settings are refused")]
    BadTransfer(#[source] crate::qmp::migrate::ConfigError),
    #[error("this agent takes no vms in (no migration.listen)")]
    NotTakingVms,
    #[error("no migration order {order} from the allocator names vm {vm:?} and this node (or it was used)")]
    NotAuthorised { order: u64, vm: String },
    #[error("order {order} is node {source_node}'s to carry out, and the caller is not that node")]
    NotTheSource { order: u64, source_node: String },
    #[error("order {0} belongs to another node")]
    NotYours(u64),
    #[error(
        "order {0}'s qemu did not come back after this agent restarted, and nobody can say whether the guest \
         runs here; the target's log says what to look at"
    )]
    Stuck(u64),
    #[error("order {0} was prepared already")]
    AlreadyPrepared(u64),
    #[error("vm {0:?} runs on this node already")]
    AlreadyHere(String),
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

fn tls_word(tls: bool) -> &'static str {
    if tls {
        "over tls"
    } else {
        "in plain text"
    }
}

/// The target side of this node's moves; shared by the gRPC service and the
/// node supervisor.
#[derive(Debug)]
pub struct TargetNode {
    settings: MigrationSettings,
    /// The agent's `[tls]`: also the stream's, laid out for QEMU.
    tls: Option<TlsFiles>,
    moves: Mutex<Moves<Prepared>>,
    /// Watched by prepares that wait for their order.
    authorised: watch::Sender<Authorised>,
    /// VMs taken in (and read back after a restart), for the node to scale.
    adopted: watch::Sender<Vec<VmSpec>>,
    /// Orders whose QEMU a restart could not bring up: nobody can say
    /// whether the guest runs there until a person looks.
    stuck: Mutex<std::collections::BTreeSet<u64>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl TargetNode {
    pub fn new(
        settings: MigrationSettings,
        tls: Option<TlsFiles>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            tls,
            moves: Mutex::default(),
            authorised: watch::Sender::new(Authorised::default()),
            adopted: watch::Sender::new(Vec::new()),
            stuck: Mutex::default(),
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

    /// The allocator named this node the target of `order` for `vm`, to be
    /// prepared by the agent of node `source`.
    pub fn authorise(&self, order: u64, vm: &str, source: &str) {
        self.authorised.send_modify(|a| a.insert(order, vm, source));
    }

    fn tombstone_dir(&self) -> PathBuf {
        self.settings.state_dir.join("settled")
    }

    fn ask(&self, order: u64, caller: &Caller) -> Result<(), TargetError> {
        if !self.moves().may_ask(order, caller) {
            return Err(TargetError::NotYours(order));
        }
        if self.stuck.lock().unwrap_or_else(|p| p.into_inner()).contains(&order) {
            return Err(TargetError::Stuck(order));
        }
        Ok(())
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
        let max_age = self.settings.tombstone_max_age_days.saturating_mul(86_400);
        // First the orders confirmed here: whatever became of their VM, the
        // guest ran (or may have run) here, and its source must hear so.
        for t in tombstones::load(&self.tombstone_dir(), tombstones::now_unix_s(), max_age) {
            self.step(t.order_id, Some(Move::Running { vm: t.vm.clone() }));
            self.moves().set_source(t.order_id, &t.source_node);
        }
        let recovered = adopted::recover(&self.adopted_dir()).await;
        let killed = adopted::kill_unconfirmed_qemus(&self.incoming_dir(), &recovered.kept());
        for r in &recovered.gone {
            // Its QEMU may have run the guest before it went: remembered so.
            let t = Tombstone {
                order_id: r.order_id,
                vm: r.spec.id.clone(),
                source_node: r.source_node.clone(),
                at_unix_s: tombstones::now_unix_s(),
            };
            let kept = self.status_of(r.order_id) == TargetState::Running
                || tombstones::record(&self.tombstone_dir(), &t).is_ok();
            if kept {
                adopted::forget_record(&self.adopted_dir(), r);
            }
        }
        for r in &recovered.never_ran {
            tombstones::remove(&self.tombstone_dir(), r.order_id);
            if self.status_of(r.order_id) == TargetState::Running {
                // Read from its tombstone above; it never ran here after all.
                self.moves().forget_running(r.order_id);
            }
        }
        for r in recovered.running.iter().chain(&recovered.gone) {
            if self.status_of(r.order_id) != TargetState::Running {
                self.step(r.order_id, Some(Move::Running { vm: r.spec.id.clone() }));
                self.moves().set_source(r.order_id, &r.source_node);
            }
        }
        *self.stuck.lock().unwrap_or_else(|p| p.into_inner()) =
            recovered.stuck.iter().map(|r| r.order_id).collect();
        let n = recovered.running.len();
        self.adopted.send_replace(recovered.running.into_iter().map(|r| r.spec).collect());
        (n, killed)
    }

    fn status_of(&self, order: u64) -> TargetState {
        self.moves().state(order)
    }

    /// Where `order` stands here, for its source node (or anyone, for an
    /// order not held here).
    pub fn status(&self, order: u64, caller: &Caller) -> Result<TargetState, TargetError> {
        self.ask(order, caller)?;
        Ok(self.status_of(order))
    }

    /// Starts a paused incoming QEMU for an authorised order, called by its
    /// source node's agent; the URI it listens on for the stream. The
    /// authorisation is used up by the first prepare that names it.
    pub async fn prepare(self: &Arc<Self>, p: Prepare, caller: &Caller) -> Result<String, TargetError> {
        let Some(ip) = self.settings.stream_ip() else { return Err(TargetError::NotTakingVms) };
        self.check_informant(&p.vm)?;
        let order = p.order_id;
        let mut authorised = self.authorised.subscribe();
        let _ = tokio::time::timeout(AUTHORISATION_WAIT, authorised.wait_for(|a| a.contains(order))).await;
        let mut taken = Err(Refusal::NoOrder);
        self.authorised.send_if_modified(|a| {
            taken = a.take(order, &p.vm.id, caller);
            taken.is_ok()
        });
        let source = match taken {
            Ok(a) => a.source,
            Err(Refusal::NoOrder) => return Err(TargetError::NotAuthorised { order, vm: p.vm.id }),
            Err(Refusal::NotTheSource(source_node)) => {
                return Err(TargetError::NotTheSource { order, source_node })
            }
        };
        if self.adopted.borrow().iter().any(|s| s.id == p.vm.id) {
            return Err(TargetError::AlreadyHere(p.vm.id));
        }
        // Held while QEMU starts, so a second prepare of the order is refused.
        {
            let mut moves = self.moves();
            if moves.step(order, Some(Move::Starting)).is_err() {
                return Err(TargetError::AlreadyPrepared(order));
            }
            moves.set_source(order, &source);
        }
        let incoming = match self.start(&p, ip, &source) {
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
        // The source's transfer timeout, within bounds: it cannot hold a
        // paused QEMU here for longer than any move takes.
        let wait = p.handoff.config.timeout().min(MAX_STREAM_WAIT)
            + Duration::from_millis(self.settings.confirm_grace_ms);
        self.kill_if_unconfirmed(order, wait);
        Ok(uri)
    }

    /// The VM's informant address comes from the source, and this agent
    /// dials it once the VM runs here: a vhost-user vsock socket must be one
    /// in this node's `migration.vsock_dir`, not any unix socket of the host.
    fn check_informant(&self, vm: &VmSpec) -> Result<(), TargetError> {
        let Some(vmscale_contract::informant_addr::InformantAddr::VsockUnix { path, .. }) = &vm.informant
        else {
            return Ok(());
        };
        let ours = self.settings.vsock_dir.as_deref().is_some_and(|d| path.parent() == Some(d))
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| super::machine::is_plain_name(n, 64));
        if ours {
            Ok(())
        } else {
            Err(TargetError::ForeignInformant(super::stream_uri::shown(&path.display().to_string())))
        }
    }

    /// The incoming QEMU of `p`, not started yet, on a free port of `ip`,
    /// taking the stream from `source`'s QEMU.
    fn start(&self, p: &Prepare, ip: std::net::IpAddr, source: &str) -> Result<LocalIncoming, TargetError> {
        let tls = self.settings.stream_tls(self.tls.is_some());
        if p.handoff.stream_tls != tls {
            return Err(TargetError::StreamTls { theirs: p.handoff.stream_tls });
        }
        let stream_tls = if tls {
            let files = self.tls.as_ref().ok_or(TargetError::NoTlsFiles)?;
            let dir = super::stream_tls::creds_dir(&self.settings.state_dir);
            super::stream_tls::write_creds_dir(files, &dir)
                .map_err(|e| TargetError::NotStarted(IncomingError::StreamTls(e)))?;
            Some(StreamTls { dir, peer_node: source.to_owned() })
        } else {
            None
        };
        // Bound by LocalIncoming and handed to QEMU as it is.
        let port = 0;
        let dir = self.incoming_dir().join(p.order_id.to_string());
        let template = self.settings.template();
        Ok(LocalIncoming::new(self.settings.qemu.clone(), template, dir, SocketAddr::new(ip, port))
            .with_stream_tls(stream_tls))
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
    pub async fn confirm(&self, order: u64, timeout: Duration, caller: &Caller) -> Result<(), TargetError> {
        self.ask(order, caller)?;
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
        let source_node = self.moves().source(order).unwrap_or_default().to_owned();
        // Recorded before the guest may run here: a restarted agent must
        // still say it runs here, or the source would resume it too. The
        // tombstone outlives the VM's record (it goes when the VM leaves).
        let tombstone = Tombstone {
            order_id: order,
            vm: spec.id.clone(),
            source_node: source_node.clone(),
            at_unix_s: tombstones::now_unix_s(),
        };
        let mut record =
            AdoptedRecord { order_id: order, resume: incoming.resumes(), resumed: false, source_node, spec };
        let recorded = tombstones::record(&self.tombstone_dir(), &tombstone)
            .and_then(|()| adopted::persist(&self.adopted_dir(), &record));
        let confirmed = match recorded {
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
            // Its QEMU is gone and the guest never ran here: the source may
            // resume it, and hears "none".
            let _ = std::fs::remove_file(adopted::record_path(&self.adopted_dir(), &record.spec.id));
            tombstones::remove(&self.tombstone_dir(), order);
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
    pub async fn abort(&self, order: u64, caller: &Caller) -> Result<TargetState, TargetError> {
        self.ask(order, caller)?;
        let prepared = self.moves().take_prepared(order, None);
        if let Some((vm, incoming)) = prepared {
            incoming.abort().await;
            self.count("failed");
            info!(order, vm = %vm.id, "move aborted by the source; incoming QEMU killed");
            return Ok(TargetState::Absent);
        }
        match self.status_of(order) {
            s @ (TargetState::Running | TargetState::Absent) => Ok(s),
            TargetState::Starting | TargetState::Prepared | TargetState::Confirming => Err(TargetError::Busy),
        }
    }
}

#[cfg(test)]
#[path = "target_node_tests.rs"]
mod tests;
