//! The target agent's side of a move: the `MigrationTarget` gRPC service
//! (proto/migration.proto). It starts a paused incoming QEMU only for an
//! order the allocator pushed to this node, resumes the guest only when the
//! source agent confirms, kills an incoming QEMU nobody confirmed in time,
//! and hands a VM that arrived to the node as one of its own.
//!
//! What it took in survives an agent restart: each confirmed order and its
//! VM's spec are written to `<state_dir>/adopted/<vm>.json` *before* the
//! guest is resumed (its QEMU runs on in its own process group), so a
//! restarted agent still answers that the guest runs here; and
//! [`TargetNode::recover`] kills the incoming QEMUs of moves nobody
//! confirmed (paused with -S, they never ran the guest) and resumes a
//! confirmed guest a restart caught before its resume.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use vmscale_proto::migration as pb;
use vmscale_proto::migration::migration_target_server::MigrationTarget;
use vmscale_proto::migration::status_reply::State as WireState;

use super::remote::WireHandoff;
use super::settings::MigrationSettings;
use super::target::{kill_unconfirmed, IncomingTarget, LocalIncoming};
use crate::qmp::migrate::Migration;
use crate::qmp::{ClientConfig, Endpoint, QmpClient};
use crate::vms::VmSpec;

/// How long a restarted agent waits for a confirmed guest's stream to land.
const RECOVER_WAIT: Duration = Duration::from_secs(30);

/// `<state_dir>/adopted/<vm>.json`: a VM taken in under a confirmed order.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct AdoptedRecord {
    order_id: u64,
    /// The guest is to run here (it ran on the source).
    resume: bool,
    /// Set once it was resumed here: a guest found paused after that was
    /// paused by someone else, and stays so.
    resumed: bool,
    spec: VmSpec,
}

/// How long a prepare waits for the allocator's copy of its order.
const AUTHORISATION_WAIT: Duration = Duration::from_secs(3);

/// One move into this node.
#[derive(Debug)]
enum Move {
    /// The QEMU waits (paused) for the stream and the confirm; `vm` is the
    /// spec the VM is scaled by once it runs here.
    Prepared { vm: Box<VmSpec>, incoming: Arc<LocalIncoming> },
    /// Being started or confirmed.
    Busy,
    /// The guest runs here.
    Running { vm: String },
}

#[derive(Debug, Default)]
struct State {
    /// Orders the allocator pushed naming this node as the target: order ->
    /// VM id.
    authorised: HashMap<u64, String>,
    moves: HashMap<u64, Move>,
}

/// The target side of this node's moves; shared by the gRPC service and the
/// node supervisor.
#[derive(Debug)]
pub struct TargetNode {
    settings: MigrationSettings,
    state: Mutex<State>,
    /// VMs taken in (and read back after a restart), for the node to scale.
    adopted: watch::Sender<Vec<VmSpec>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl TargetNode {
    pub fn new(settings: MigrationSettings, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self { settings, state: Mutex::default(), adopted: watch::Sender::new(Vec::new()), metrics })
    }

    fn count(&self, outcome: &'static str) {
        self.metrics.migrations.get_or_create(&crate::metrics::MoveLabels { role: "target", outcome }).inc();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut st = self.state();
        st.authorised.insert(order, vm.to_owned());
        // Old orders: a few per move at most, never unbounded.
        if st.authorised.len() > 1024 {
            let oldest = st.authorised.keys().min().copied();
            if let Some(o) = oldest {
                st.authorised.remove(&o);
            }
        }
    }

    /// The VM left this node (moved away again, or gone): its record goes.
    pub fn forget(&self, vm: &str) {
        let path = self.adopted_dir().join(super::file_name(vm, "json"));
        if path.exists() {
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(%vm, "cannot remove {}: {e}", path.display());
            }
        }
        self.adopted.send_modify(|l| l.retain(|s| s.id != vm));
    }

    /// After a start: VMs taken in before are adopted again when their QEMU
    /// is still there (a confirmed guest a restart caught paused before its
    /// resume is resumed first); incoming QEMUs nobody confirmed are killed.
    /// Returns how many of each.
    pub async fn recover(&self) -> (usize, usize) {
        let mut records = Vec::new();
        for path in json_files(&self.adopted_dir()) {
            let record = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<AdoptedRecord>(&b).map_err(|e| e.to_string()));
            let r = match record {
                Ok(r) => r,
                Err(e) => {
                    warn!("ignoring {}: {e}", path.display());
                    continue;
                }
            };
            if !Path::new(&r.spec.qmp).exists() {
                info!(vm = %r.spec.id, "a VM taken in earlier is gone (no QMP socket); forgetting it");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match bring_up(&r).await {
                Ok(()) => records.push(r),
                Err(why) => {
                    warn!(vm = %r.spec.id, order = r.order_id, "a VM confirmed here does not run: {why}; its QEMU is killed");
                    if let Some(dir) = Path::new(&r.spec.qmp).parent() {
                        kill_unconfirmed(dir);
                    }
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let mut killed = 0;
        if let Ok(dirs) = std::fs::read_dir(self.incoming_dir()) {
            for d in dirs.flatten().map(|d| d.path()) {
                let kept = records.iter().any(|r| Path::new(&r.spec.qmp).starts_with(&d));
                if !kept {
                    if kill_unconfirmed(&d) {
                        warn!(dir = %d.display(), "killed an incoming QEMU nobody confirmed before the restart");
                        killed += 1;
                    }
                    let _ = std::fs::remove_dir_all(&d);
                }
            }
        }
        {
            let mut st = self.state();
            for r in &records {
                st.moves.insert(r.order_id, Move::Running { vm: r.spec.id.clone() });
            }
        }
        let n = records.len();
        self.adopted.send_replace(records.into_iter().map(|r| r.spec).collect());
        (n, killed)
    }

    fn persist(&self, r: &AdoptedRecord) -> Result<(), String> {
        let dir = self.adopted_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = dir.join(format!(".{}.tmp", super::file_name(&r.spec.id, "json")));
        let body = serde_json::to_vec_pretty(r).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, body).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let path = dir.join(super::file_name(&r.spec.id, "json"));
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
    }

    async fn prepare(self: &Arc<Self>, r: pb::PrepareRequest) -> Result<String, Status> {
        let wire: WireHandoff = serde_json::from_str(&r.handoff_json)
            .map_err(|e| Status::invalid_argument(format!("handoff_json: {e}")))?;
        let h = &wire.handoff;
        if h.order_id != r.order_id || h.vm_id != r.vm_id || wire.vm.id != r.vm_id {
            return Err(Status::invalid_argument(format!(
                "the handoff names order {} and vm {:?}/{:?}, the request order {} and vm {:?}",
                h.order_id, h.vm_id, wire.vm.id, r.order_id, r.vm_id
            )));
        }
        wire.vm.validate().map_err(Status::invalid_argument)?;
        let Some(ip) = self.settings.stream_ip() else {
            return Err(Status::failed_precondition("this agent takes no VMs in (no migration.listen)"));
        };
        // The allocator pushes the order to both agents at once: the
        // source's call may overtake the target's copy by a moment.
        let deadline = tokio::time::Instant::now() + AUTHORISATION_WAIT;
        while !self.state().authorised.contains_key(&r.order_id) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        {
            let st = self.state();
            if st.authorised.get(&r.order_id) != Some(&r.vm_id) {
                return Err(Status::permission_denied(format!(
                    "no migration order {} from the allocator names vm {:?} and this node",
                    r.order_id, r.vm_id
                )));
            }
            if st.moves.contains_key(&r.order_id) {
                return Err(Status::already_exists(format!("order {} was prepared already", r.order_id)));
            }
            if self.adopted.borrow().iter().any(|s| s.id == r.vm_id) {
                return Err(Status::already_exists(format!("vm {:?} runs on this node already", r.vm_id)));
            }
        }
        let port = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| Status::unavailable(format!("no free port on {ip} for the stream: {e}")))?
            .port();
        let dir = self.incoming_dir().join(r.order_id.to_string());
        let incoming =
            Arc::new(LocalIncoming::new(self.settings.qemu.clone(), dir, SocketAddr::new(ip, port)));
        // Held while QEMU starts, so a second prepare of the order is refused.
        self.state().moves.insert(r.order_id, Move::Busy);
        let uri = match incoming.prepare(h).await {
            Ok(uri) => uri,
            Err(e) => {
                self.state().moves.remove(&r.order_id);
                return Err(Status::internal(format!("the target qemu did not start: {e}")));
            }
        };
        self.state()
            .moves
            .insert(r.order_id, Move::Prepared { vm: Box::new(wire.vm.clone()), incoming: incoming.clone() });
        info!(order = r.order_id, vm = %r.vm_id, %uri, "incoming QEMU waits for the stream");
        // Nobody confirmed in time: the source gave up or is gone.
        let this = self.clone();
        let order = r.order_id;
        let wait = h.config.timeout() + Duration::from_millis(self.settings.confirm_grace_ms);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if this.take_prepared(order).is_some() {
                warn!(order, "no confirm within {wait:?}: killing the incoming QEMU");
                this.count("failed");
                incoming.abort().await;
            }
        });
        Ok(uri)
    }

    fn take_prepared(&self, order: u64) -> Option<(Box<VmSpec>, Arc<LocalIncoming>)> {
        let mut st = self.state();
        match st.moves.remove(&order) {
            Some(Move::Prepared { vm, incoming }) => Some((vm, incoming)),
            Some(other) => {
                st.moves.insert(order, other);
                None
            }
            None => None,
        }
    }

    async fn confirm(&self, r: pb::ConfirmRequest) -> Result<(), Status> {
        let (vm, incoming) = {
            let mut st = self.state();
            match st.moves.remove(&r.order_id) {
                Some(Move::Prepared { vm, incoming }) => {
                    st.moves.insert(r.order_id, Move::Busy);
                    (vm, incoming)
                }
                Some(Move::Running { vm }) => {
                    st.moves.insert(r.order_id, Move::Running { vm });
                    return Ok(());
                }
                Some(m) => {
                    st.moves.insert(r.order_id, m);
                    return Err(Status::failed_precondition("the order is being confirmed already"));
                }
                None => {
                    return Err(Status::not_found(format!(
                        "no incoming QEMU for order {} (never prepared, aborted or timed out)",
                        r.order_id
                    )))
                }
            }
        };
        let timeout = Duration::from_millis(r.timeout_ms.clamp(100, 120_000));
        let mut spec = *vm;
        spec.qmp = incoming.qmp_path().to_string_lossy().into_owned();
        // Recorded before the guest may run here: a restarted agent must
        // still say it runs here, or the source would resume it too.
        let mut record =
            AdoptedRecord { order_id: r.order_id, resume: incoming.resumes(), resumed: false, spec };
        let confirmed = match self.persist(&record) {
            Ok(()) => incoming.confirm(timeout).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot record the VM taken in, so it is not taken: {e}")),
        };
        if let Err(e) = confirmed {
            self.count("failed");
            incoming.abort().await;
            let _ = std::fs::remove_file(self.adopted_dir().join(super::file_name(&record.spec.id, "json")));
            self.state().moves.remove(&r.order_id);
            return Err(Status::aborted(format!("the guest did not resume here; its QEMU is killed: {e}")));
        }
        record.resumed = record.resume;
        if let Err(e) = self.persist(&record) {
            warn!(vm = %record.spec.id, "cannot note the resume in the VM's record: {e}");
        }
        let spec = record.spec;
        // The watchdog holds the other clone until it fires; it kills only
        // moves still Prepared, and this one is not.
        let pid = incoming.adopt().await;
        self.state().moves.insert(r.order_id, Move::Running { vm: spec.id.clone() });
        info!(order = r.order_id, vm = %spec.id, ?pid, qmp = %spec.qmp, "the guest runs here now");
        self.count("completed");
        self.adopted.send_modify(|l| {
            l.retain(|s| s.id != spec.id);
            l.push(spec);
        });
        Ok(())
    }

    /// Kills the order's QEMU unless the guest runs here; says which.
    async fn abort(&self, r: pb::AbortRequest) -> Result<WireState, Status> {
        if let Some((vm, incoming)) = self.take_prepared(r.order_id) {
            incoming.abort().await;
            self.count("failed");
            info!(order = r.order_id, vm = %vm.id, "move aborted by the source; incoming QEMU killed");
            return Ok(WireState::None);
        }
        match self.state().moves.get(&r.order_id) {
            Some(Move::Running { .. }) => Ok(WireState::Running),
            Some(_) => Err(Status::unavailable("the order is being confirmed or started; ask again")),
            None => Ok(WireState::None),
        }
    }

    fn status(&self, order: u64) -> WireState {
        match self.state().moves.get(&order) {
            None => WireState::None,
            Some(Move::Running { .. }) => WireState::Running,
            Some(Move::Prepared { .. } | Move::Busy) => WireState::Prepared,
        }
    }
}

/// A confirmed guest's QEMU after an agent restart: running, or paused on
/// purpose, or (caught between its record and its resume) resumed now once
/// its stream is in. An error if it cannot be brought to run.
async fn bring_up(r: &AdoptedRecord) -> Result<(), String> {
    let endpoint = Endpoint::Unix(PathBuf::from(&r.spec.qmp));
    let client =
        QmpClient::connect(&endpoint, ClientConfig::default()).await.map_err(|e| format!("qmp: {e:#}"))?;
    let qemu = Migration::new(client);
    let deadline = tokio::time::Instant::now() + RECOVER_WAIT;
    loop {
        let status = qemu.run_status().await.map_err(|e| format!("qmp: {e:#}"))?;
        if status.running || !r.resume || r.resumed {
            return Ok(());
        }
        match qemu.query().await.map_err(|e| format!("qmp: {e:#}"))?.status.as_str() {
            "completed" => {
                qemu.client()
                    .execute::<serde_json::Value>("cont", None)
                    .await
                    .map_err(|e| format!("cont: {e:#}"))?;
                info!(vm = %r.spec.id, order = r.order_id, "resumed a guest confirmed here before the restart");
                return Ok(());
            }
            "failed" | "cancelled" => return Err("its incoming stream failed".into()),
            _ if tokio::time::Instant::now() > deadline => {
                return Err(format!("its incoming stream did not complete within {RECOVER_WAIT:?}"))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect()
}

/// The gRPC face of [`TargetNode`].
#[derive(Debug, Clone)]
pub struct TargetService(pub Arc<TargetNode>);

#[tonic::async_trait]
impl MigrationTarget for TargetService {
    // Prepare and confirm run to their end in a task of their own: the
    // server drops a call's future when its client gives up (a timeout, a
    // reset), and a confirm dropped between resuming the guest and noting
    // it would leave the order busy for good, so the source could never
    // learn that the guest runs here.
    async fn prepare(&self, r: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareReply>, Status> {
        let node = self.0.clone();
        let req = r.into_inner();
        let uri = tokio::spawn(async move { node.prepare(req).await })
            .await
            .map_err(|e| Status::internal(format!("prepare: {e}")))??;
        Ok(Response::new(pb::PrepareReply { uri }))
    }

    async fn confirm(&self, r: Request<pb::ConfirmRequest>) -> Result<Response<pb::ConfirmReply>, Status> {
        let node = self.0.clone();
        let req = r.into_inner();
        tokio::spawn(async move { node.confirm(req).await })
            .await
            .map_err(|e| Status::internal(format!("confirm: {e}")))??;
        Ok(Response::new(pb::ConfirmReply {}))
    }

    async fn abort(&self, r: Request<pb::AbortRequest>) -> Result<Response<pb::AbortReply>, Status> {
        let state = self.0.abort(r.into_inner()).await?;
        Ok(Response::new(pb::AbortReply { state: state as i32 }))
    }

    async fn status(&self, r: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let state = self.0.status(r.into_inner().order_id);
        Ok(Response::new(pb::StatusReply { state: state as i32 }))
    }
}

/// Serves `svc` on `listen` until `cancel`.
pub async fn serve(
    svc: Arc<TargetNode>,
    listen: SocketAddr,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen for migrations on {listen}: {e}"))?;
    let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(vmscale_proto::migration::migration_target_server::MigrationTargetServer::new(
            TargetService(svc),
        ))
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
        .map_err(|e| format!("migration service on {listen}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::migration::target::Handoff;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmscale-target-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn node(state_dir: &Path) -> Arc<TargetNode> {
        let settings = MigrationSettings {
            listen: Some("127.0.0.1:7073".parse().unwrap()),
            state_dir: state_dir.to_owned(),
            qemu: "/nonexistent/qemu".into(),
            ..MigrationSettings::default()
        };
        TargetNode::new(settings, Arc::default())
    }

    fn spec(id: &str, qmp: &str) -> VmSpec {
        VmSpec { qmp: qmp.into(), ..crate::vms::tests::spec(id) }
    }

    fn prepare_req(order: u64, vm: &str, handoff_vm: &str) -> pb::PrepareRequest {
        let handoff = Handoff {
            order_id: order,
            vm_id: handoff_vm.into(),
            base_args: vec![],
            devices: Default::default(),
            config: Default::default(),
            source_running: true,
        };
        let wire = WireHandoff { handoff, vm: spec(handoff_vm, "/x") };
        pb::PrepareRequest {
            order_id: order,
            vm_id: vm.into(),
            handoff_json: serde_json::to_string(&wire).unwrap(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_starts_without_the_allocators_order() {
        let d = dir("auth");
        let t = node(&d);
        let e = t.prepare(prepare_req(7, "vm1", "vm1")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // An order for another VM does not authorise this one.
        t.authorise(7, "vm2");
        let e = t.prepare(prepare_req(7, "vm1", "vm1")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // A handoff that names another VM than the request is refused first.
        t.authorise(8, "vm1");
        let e = t.prepare(prepare_req(8, "vm1", "vm3")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        let bad = pb::PrepareRequest { order_id: 8, vm_id: "vm1".into(), handoff_json: "{".into() };
        assert_eq!(t.prepare(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        // Authorised, but the QEMU binary is missing: a clear error, no state left.
        let e = t.prepare(prepare_req(8, "vm1", "vm1")).await.unwrap_err();
        assert!(e.message().contains("did not start"), "{e:?}");
        assert_eq!(t.status(8), WireState::None);
        // The order may reach the target a moment after the source calls.
        let late = t.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            late.authorise(9, "vm1");
        });
        let e = t.prepare(prepare_req(9, "vm1", "vm1")).await.unwrap_err();
        assert!(e.message().contains("did not start"), "authorised while waiting: {e:?}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn confirm_abort_and_status_of_unknown_orders() {
        let d = dir("unknown");
        let t = node(&d);
        let e = t.confirm(pb::ConfirmRequest { order_id: 9, timeout_ms: 100 }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(t.abort(pb::AbortRequest { order_id: 9 }).await.is_ok(), "aborting nothing is fine");
        assert_eq!(t.status(9), WireState::None);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A scripted QEMU monitor on a Unix socket: answers `query-status` and
    /// `query-migrate` as told, and counts `cont`s.
    fn scripted_qmp(
        path: &Path,
        running: bool,
        incoming: &'static str,
    ) -> Arc<std::sync::atomic::AtomicUsize> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let conts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = conts.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = tokio::io::split(stream);
            let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
            write.write_all(format!("{greeting}\r\n").as_bytes()).await.unwrap();
            let mut lines = BufReader::new(read).lines();
            let mut running = running;
            while let Ok(Some(line)) = lines.next_line().await {
                let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                let ret = match req["execute"].as_str().unwrap() {
                    "query-status" => {
                        serde_json::json!({"running": running, "status": if running { "running" } else { "paused" }})
                    }
                    "query-migrate" => serde_json::json!({"status": incoming}),
                    "cont" => {
                        running = true;
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        serde_json::json!({})
                    }
                    _ => serde_json::json!({}),
                };
                let reply = serde_json::json!({"return": ret, "id": req["id"]});
                write.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
            }
        });
        conts
    }

    #[tokio::test]
    async fn recover_adopts_vms_whose_qemu_is_there_and_forgets_the_rest() {
        let d = dir("recover");
        let t = node(&d);
        let record = |order, vm: &str, qmp: &Path, resumed| AdoptedRecord {
            order_id: order,
            resume: true,
            resumed,
            spec: spec(vm, &qmp.to_string_lossy()),
        };
        // Runs since its confirm.
        let live = d.join("incoming/4/qmp.sock");
        let live_conts = scripted_qmp(&live, true, "completed");
        t.persist(&record(4, "kept", &live, true)).unwrap();
        // Confirmed, then the agent died before the resume: resumed now.
        let held = d.join("incoming/5/qmp.sock");
        let held_conts = scripted_qmp(&held, false, "completed");
        t.persist(&record(5, "held", &held, false)).unwrap();
        // Paused by someone after its resume: stays paused.
        let paused = d.join("incoming/7/qmp.sock");
        let paused_conts = scripted_qmp(&paused, false, "completed");
        t.persist(&record(7, "paused", &paused, true)).unwrap();
        // Confirmed, but its stream broke before the resume: not taken in.
        let broken = d.join("incoming/8/qmp.sock");
        let broken_conts = scripted_qmp(&broken, false, "failed");
        t.persist(&record(8, "broken", &broken, false)).unwrap();
        // Its QEMU is gone.
        t.persist(&record(6, "gone", &d.join("incoming/6/qmp.sock"), true)).unwrap();
        std::fs::create_dir_all(d.join("incoming/6")).unwrap();
        std::fs::write(d.join("adopted/broken-record.json"), "{").unwrap();

        let (adopted, killed) = t.recover().await;
        assert_eq!((adopted, killed), (3, 0));
        let mut ids: Vec<String> = t.adopted().borrow().iter().map(|s| s.id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["held", "kept", "paused"]);
        let n = |c: &Arc<std::sync::atomic::AtomicUsize>| c.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!((n(&live_conts), n(&held_conts), n(&paused_conts), n(&broken_conts)), (0, 1, 0, 0));
        // A restarted target still says the guests it took in run here, so
        // no source resumes them; orders it does not hold are none.
        for order in [4, 5, 7] {
            assert_eq!(t.status(order), WireState::Running, "order {order}");
            assert_eq!(t.abort(pb::AbortRequest { order_id: order }).await.unwrap(), WireState::Running);
        }
        for order in [6, 8] {
            assert_eq!(t.abort(pb::AbortRequest { order_id: order }).await.unwrap(), WireState::None);
        }
        assert!(!d.join("adopted/gone.json").exists(), "a VM whose QEMU is gone is forgotten");
        assert!(!d.join("adopted/broken.json").exists(), "a VM whose stream broke is forgotten");
        assert!(d.join("incoming/4").exists(), "the adopted VM's directory stays");
        assert!(!d.join("incoming/6").exists(), "an unconfirmed move's directory goes");
        t.forget("kept");
        assert_eq!(t.adopted().borrow().len(), 2);
        assert!(!d.join("adopted/kept.json").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
