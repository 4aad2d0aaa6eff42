//! The target side of a move, behind a narrow trait: start a QEMU for the
//! guest in incoming mode, confirm it runs the guest, or throw it away.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::qmp::migrate::{tcp_uri, Migration, MigrationConfig};
use crate::qmp::migrate_spec::DeviceSpec;
use crate::qmp::{ClientConfig, Endpoint, QmpClient};

/// What the source hands the target: enough to start the same VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    pub order_id: u64,
    pub vm_id: String,
    /// The VM's base command line (see [`super::command_line`]).
    pub base_args: Vec<String>,
    /// The source's vCPUs, DIMMs and virtio-mem sizes now.
    pub devices: DeviceSpec,
    pub config: MigrationConfig,
}

/// Whoever starts the incoming QEMU: the target agent (over the network in
/// a cluster), or this process (tests, a single-host setup).
#[async_trait]
pub trait IncomingTarget: Send + Sync {
    /// Starts the QEMU and returns the URI it listens on for the stream.
    async fn prepare(&self, handoff: &Handoff) -> Result<String, String>;
    /// After the stream completed: waits until the target runs the guest.
    async fn confirm(&self, timeout: Duration) -> Result<(), String>;
    /// Kills the incoming QEMU, if any. Never fails: a target that cannot be
    /// reached any more has no QEMU we could talk to either.
    async fn abort(&self);
}

/// A target QEMU started by this process, listening on `listen`.
#[derive(Debug)]
pub struct LocalIncoming {
    binary: PathBuf,
    dir: PathBuf,
    listen: SocketAddr,
    running: Mutex<Option<(Child, Migration)>>,
}

impl LocalIncoming {
    /// `dir` gets the QMP socket and QEMU's log; `listen` is this node's
    /// address for the migration stream.
    pub fn new(binary: PathBuf, dir: PathBuf, listen: SocketAddr) -> Self {
        Self { binary, dir, listen, running: Mutex::new(None) }
    }

    /// The QMP endpoint of the incoming QEMU (for the agent to adopt it).
    pub fn qmp(&self) -> Endpoint {
        Endpoint::Unix(self.dir.join("qmp.sock"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default().trim().to_owned()
    }

    /// The incoming QEMU's QMP connection (QEMU serves one client at a
    /// time): how the agent that adopts the VM talks to it.
    pub async fn client(&self) -> Option<QmpClient> {
        self.running.lock().await.as_ref().map(|(_, m)| m.client().clone())
    }

    /// Hands the running QEMU over (the caller keeps it alive); `None` if
    /// none runs.
    pub async fn into_process(self) -> Option<Child> {
        self.running.into_inner().map(|(child, _)| child)
    }

    async fn start(&self, handoff: &Handoff) -> Result<(Child, Migration), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let qmp = self.dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp);
        let log = std::fs::File::create(self.dir.join("qemu.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.binary)
            .args(&handoff.base_args)
            .args(handoff.devices.qemu_args())
            .args(["-incoming", "defer", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let client = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("qemu exited with {status}: {}", self.log()));
            }
            if qmp.exists() {
                if let Ok(c) = QmpClient::connect(&Endpoint::Unix(qmp.clone()), ClientConfig::default()).await
                {
                    break c;
                }
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(format!("no qmp from the target qemu within 15 s: {}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let incoming = Migration::new(client);
        let listen = async {
            incoming.configure(&handoff.config).await?;
            incoming.listen(&tcp_uri(self.listen)).await
        };
        if let Err(e) = listen.await {
            let _ = child.kill().await;
            return Err(format!("the target qemu does not listen on {}: {e:#}", self.listen));
        }
        Ok((child, incoming))
    }
}

#[async_trait]
impl IncomingTarget for LocalIncoming {
    async fn prepare(&self, handoff: &Handoff) -> Result<String, String> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Err("a target qemu for this move runs already".into());
        }
        let started = self.start(handoff).await?;
        *running = Some(started);
        Ok(tcp_uri(self.listen))
    }

    async fn confirm(&self, timeout: Duration) -> Result<(), String> {
        let mut guard = self.running.lock().await;
        let Some((child, incoming)) = guard.as_mut() else { return Err("no target qemu".into()) };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the target qemu exited with {status}: {}", self.log()));
            }
            match incoming.run_status().await {
                Ok(s) if s.running => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(format!("the target qemu: {e:#}")),
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("the target does not run the guest after {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn abort(&self) {
        if let Some((mut child, _)) = self.running.lock().await.take() {
            let _ = child.kill().await;
        }
    }
}
