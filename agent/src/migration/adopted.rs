//! What the target keeps of the VMs it took in, so that they survive an
//! agent restart: each confirmed order and its VM's spec are written to
//! `<state_dir>/adopted/<vm>.json` *before* the guest is resumed (its QEMU
//! runs on in its own process group). After a restart [`recover`] reads
//! them back, resumes a confirmed guest the restart caught before its
//! resume, and [`kill_unconfirmed_qemus`] kills the incoming QEMUs of moves
//! nobody confirmed (paused with -S, they never ran the guest).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::target::kill_unconfirmed;
use crate::qmp::migrate::{MigrateError, Migration, Progress};
use crate::qmp::{ClientConfig, Endpoint, QmpClient};
use crate::vms::VmSpec;

/// How long a restarted agent waits for a confirmed guest's stream to land.
const RECOVER_WAIT: Duration = Duration::from_secs(30);

/// How often a restarted agent asks whether that stream has landed.
const RECOVER_POLL: Duration = Duration::from_millis(50);

/// `<state_dir>/adopted/<vm>.json`: a VM taken in under a confirmed order.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdoptedRecord {
    pub order_id: u64,
    /// The guest is to run here (it ran on the source).
    pub resume: bool,
    /// Set once it was resumed here: a guest found paused after that was
    /// paused by someone else, and stays so.
    pub resumed: bool,
    /// The node it came from (empty in records written before it was kept).
    #[serde(default)]
    pub source_node: String,
    pub spec: VmSpec,
}

/// What a restart found of the VMs taken in.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Their QEMU runs them (or holds them paused on purpose): adopted.
    pub running: Vec<AdoptedRecord>,
    /// Their QEMU is gone (no QMP socket). The guest may have run here, so
    /// the order is remembered as such (the caller writes its tombstone,
    /// then removes the record with [`forget_record`]).
    pub gone: Vec<AdoptedRecord>,
    /// Their incoming stream failed before the guest was ever resumed
    /// here: the QEMU was killed and the record removed; the source holds
    /// the guest, and may resume it.
    pub never_ran: Vec<AdoptedRecord>,
    /// Their QEMU is there but could not be brought up: left alone, record
    /// kept, for a person to look at; never killed, since the guest may
    /// have run there and nowhere else may hold it now.
    pub stuck: Vec<AdoptedRecord>,
}

/// Removes the record of the VM `r` names.
pub fn forget_record(dir: &Path, r: &AdoptedRecord) {
    let _ = std::fs::remove_file(record_path(dir, &r.spec.id));
}

impl Recovered {
    /// Every record whose QEMU must be left running.
    pub fn kept(&self) -> Vec<AdoptedRecord> {
        self.running.iter().chain(&self.stuck).cloned().collect()
    }
}

/// Why a VM confirmed here before a restart cannot be taken in again.
#[derive(Debug, thiserror::Error)]
pub enum BringUpError {
    #[error("cannot reach its qemu")]
    Connect(#[source] crate::qmp::Error),
    #[error("its qemu does not answer")]
    Qmp(#[source] MigrateError),
    #[error("its qemu does not resume the guest")]
    Resume(#[source] MigrateError),
    #[error("its incoming stream failed")]
    StreamFailed,
    #[error("its incoming stream did not complete within {0:?}")]
    Late(Duration),
}

pub fn record_path(dir: &Path, vm: &str) -> PathBuf {
    dir.join(super::file_name(vm, "json"))
}

/// Writes `r` into `dir`, durably: the record is what a restarted agent
/// answers from, so a crash must leave the old record or the new, never an
/// empty file.
pub fn persist(dir: &Path, r: &AdoptedRecord) -> Result<(), super::RecordError> {
    let path = record_path(dir, &r.spec.id);
    std::fs::create_dir_all(dir)
        .and_then(|()| vmscale_common::durable::write_json(&path, r))
        .map_err(|source| super::RecordError { path, source })
}

/// The VMs recorded in `dir`, sorted by what became of their QEMU (see
/// [`Recovered`]); a confirmed guest a restart caught paused before its
/// resume is resumed first.
pub async fn recover(dir: &Path) -> Recovered {
    let mut out = Recovered::default();
    for path in json_files(dir) {
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
            info!(vm = %r.spec.id, order = r.order_id, "a VM taken in earlier is gone (no QMP socket)");
            out.gone.push(r);
            continue;
        }
        match bring_up(&r).await {
            Ok(()) => out.running.push(r),
            // Paused since its start (-S) and never resumed: the guest never
            // ran here, and this QEMU holds no complete copy of it.
            Err(BringUpError::StreamFailed) if !r.resumed => {
                warn!(vm = %r.spec.id, order = r.order_id, "a VM confirmed here lost its stream before it ever ran; its QEMU is killed");
                if let Some(dir) = Path::new(&r.spec.qmp).parent() {
                    kill_unconfirmed(dir);
                }
                let _ = std::fs::remove_file(&path);
                out.never_ran.push(r);
            }
            Err(e) => {
                let why = super::reason(&e);
                tracing::error!(
                    vm = %r.spec.id, order = r.order_id,
                    "a VM confirmed here cannot be brought up: {why}; its QEMU ({}) is left alone and the \
                     order still answers that the guest ran here. Look at it: resume it with QMP `cont`, or \
                     make sure no copy of the guest is needed and remove {}",
                    r.spec.qmp,
                    path.display()
                );
                out.stuck.push(r);
            }
        }
    }
    out
}

/// Kills the incoming QEMUs under `incoming_dir` that none of `kept` runs
/// in and removes their directories; returns how many were killed.
pub fn kill_unconfirmed_qemus(incoming_dir: &Path, kept: &[AdoptedRecord]) -> usize {
    let Ok(dirs) = std::fs::read_dir(incoming_dir) else { return 0 };
    let mut killed = 0;
    for d in dirs.flatten().map(|d| d.path()) {
        if kept.iter().any(|r| Path::new(&r.spec.qmp).starts_with(&d)) {
            continue;
        }
        if kill_unconfirmed(&d) {
            warn!(dir = %d.display(), "killed an incoming QEMU nobody confirmed before the restart");
            killed += 1;
        }
        let _ = std::fs::remove_dir_all(&d);
    }
    killed
}

/// A confirmed guest's QEMU after an agent restart: running, or paused on
/// purpose, or (caught between its record and its resume) resumed now once
/// its stream is in.
async fn bring_up(r: &AdoptedRecord) -> Result<(), BringUpError> {
    let endpoint = Endpoint::Unix(PathBuf::from(&r.spec.qmp));
    let client =
        QmpClient::connect(&endpoint, ClientConfig::default()).await.map_err(BringUpError::Connect)?;
    let qemu = Migration::new(client);
    let deadline = tokio::time::Instant::now() + RECOVER_WAIT;
    loop {
        let status = qemu.run_status().await.map_err(BringUpError::Qmp)?;
        if status.running || !r.resume || r.resumed {
            return Ok(());
        }
        match qemu.query().await.map_err(BringUpError::Qmp)?.incoming() {
            Progress::Completed => {
                qemu.cont().await.map_err(BringUpError::Resume)?;
                info!(vm = %r.spec.id, order = r.order_id, "resumed a guest confirmed here before the restart");
                return Ok(());
            }
            Progress::Failed | Progress::Cancelled => return Err(BringUpError::StreamFailed),
            Progress::NotStarted | Progress::Running if tokio::time::Instant::now() > deadline => {
                return Err(BringUpError::Late(RECOVER_WAIT))
            }
            Progress::NotStarted | Progress::Running => tokio::time::sleep(RECOVER_POLL).await,
        }
    }
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect()
}
