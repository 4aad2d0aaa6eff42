//! The target side of a move, behind a narrow trait: start a QEMU for the
//! guest in incoming mode, confirm it runs the guest, or throw it away.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::machine::MachineSpec;
use super::stream_tls::StreamTls;
use super::template::{incoming_command_line, IncomingFiles, Template, TemplateError, STREAM_FD};
use crate::qmp::migrate::{nap, tcp_uri, MigrateError, Migration, MigrationConfig, Progress};
use crate::qmp::{ClientConfig, Endpoint, QmpClient};

/// How long a starting target QEMU may take to open its QMP socket.
const QMP_WAIT: Duration = Duration::from_secs(15);

/// What the source hands the target: enough to start the same VM, as data
/// (no command line: the target builds its own, see [`super::template`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    pub order_id: u64,
    pub vm_id: String,
    /// The VM's machine with its vCPUs, DIMMs and virtio-mem sizes now.
    pub machine: MachineSpec,
    pub config: MigrationConfig,
    /// Whether the source's QEMU sends the stream over TLS (a target with
    /// TLS on refuses to take it in plain text).
    #[serde(default)]
    pub stream_tls: bool,
    /// Whether the guest ran on the source: a paused VM stays paused.
    #[serde(default = "running_by_default")]
    pub source_running: bool,
}

fn running_by_default() -> bool {
    true
}

/// Whoever starts the incoming QEMU: the target agent (over the network in
/// a cluster), or this process (tests, a single-host setup).
#[async_trait]
pub trait IncomingTarget: Send + Sync {
    /// Starts the QEMU and returns the URI it listens on for the stream.
    async fn prepare(&self, handoff: &Handoff) -> Result<String, IncomingError>;
    /// After the stream completed: resumes the guest on the target and waits
    /// until it runs there. Until this succeeds the target never runs it.
    async fn confirm(&self, timeout: Duration) -> Result<(), ConfirmError>;
    /// Kills the incoming QEMU unless the guest runs there, and says which.
    /// Before a confirm was sent any answer will do (the target never runs
    /// the guest unconfirmed); after one, only [`AfterAbort::Gone`] lets the
    /// source resume its own QEMU.
    async fn abort(&self) -> AfterAbort;
}

/// How the target's QEMU, or the agent that runs it, failed a request.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("a target qemu for this move runs already")]
    AlreadyRunning,
    #[error("cannot set up {}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start this vm here")]
    Spec(#[from] TemplateError),
    #[error("cannot set up the stream's tls")]
    StreamTls(#[from] super::stream_tls::StreamTlsError),
    #[error("cannot run {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the target qemu exited with {status}: {log}")]
    Exited { status: std::process::ExitStatus, log: String },
    #[error("no qmp from the target qemu within {after:?}: {log}")]
    NoQmp { after: Duration, log: String },
    #[error("cannot listen for the stream on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the target qemu does not listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: MigrateError,
    },
    #[error("no target qemu")]
    NotStarted,
    #[error("the target qemu does not answer")]
    Qmp(#[source] MigrateError),
    #[error("the target qemu does not resume the guest")]
    Resume(#[source] MigrateError),
    #[error("the incoming stream failed")]
    StreamFailed,
    #[error("the target does not run the guest after {0:?}")]
    NotRunning(Duration),
    /// The target agent answered a call with an error, or could not be
    /// reached; `code` and `message` are its gRPC status.
    #[error("target agent at {endpoint}: {code:?}: {message}")]
    Remote { endpoint: String, code: tonic::Code, message: String },
    #[error("the target endpoint {endpoint:?} is not a url")]
    BadEndpoint {
        endpoint: String,
        #[source]
        source: tonic::codegen::http::uri::InvalidUri,
    },
    #[error("the target endpoint {endpoint} cannot be used: {why}")]
    BadUrl { endpoint: String, why: String },
    #[error("cannot read this agent's [tls] files")]
    Tls(#[source] vmscale_common::tls::TlsError),
    #[error("the target agent's answer is refused")]
    StreamUri(#[source] super::stream_uri::StreamUriError),
    #[error("cannot encode the handoff")]
    Encode(#[source] serde_json::Error),
    /// The source could not write down that it sends the confirm, so it
    /// does not send it.
    #[error("cannot record the confirm")]
    NotRecorded(#[source] super::RecordError),
}

/// A confirm that did not come back as done.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    /// It never left this side (the target agent could not be connected
    /// to, or the confirm could not be recorded first): the target cannot
    /// run the guest, and the source may resume it.
    #[error("the confirm was not delivered")]
    NotDelivered(#[source] IncomingError),
    /// It may have reached the target, which may run the guest now.
    #[error("the confirm failed")]
    Failed(#[source] IncomingError),
}

/// What the target says after an abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAbort {
    /// No QEMU of this move runs the guest there, nor can it any more.
    Gone,
    /// The confirm went through: the guest runs on the target.
    RunsThere,
    /// The target could not say (unreachable, busy confirming): ask again.
    Unknown(String),
}

/// A QEMU process this agent started, killed when dropped unless it was
/// handed over with [`Owned::release`]. QEMU runs in its own process group
/// and is not killed by tokio on drop, so that a VM it runs outlives an
/// agent that stops or dies.
#[derive(Debug)]
struct Owned {
    child: Option<Child>,
}

impl Owned {
    fn child(&mut self) -> &mut Child {
        #[allow(clippy::expect_used)]
        self.child.as_mut().expect("an owned QEMU has its child until released")
    }

    async fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Gives the process up: it keeps running; a task reaps it when it exits.
    fn release(mut self) -> Option<u32> {
        let mut child = self.child.take()?;
        let pid = child.id();
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::info!(?pid, ?status, "an adopted qemu exited");
        });
        pid
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// A target QEMU started by this process, listening on `listen`.
#[derive(Debug)]
pub struct LocalIncoming {
    binary: PathBuf,
    template: Template,
    /// QEMU's TLS on the stream, taken only from this peer node.
    stream_tls: Option<StreamTls>,
    /// The stream's listener, bound by the caller; else bound at `listen`.
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    dir: PathBuf,
    listen: SocketAddr,
    running: Mutex<Option<(Owned, Migration)>>,
    /// Resume the guest on confirm (it ran on the source).
    resume: std::sync::atomic::AtomicBool,
    /// The guest was confirmed here and its QEMU handed over ([`Self::adopt`]).
    adopted: std::sync::atomic::AtomicBool,
}

impl LocalIncoming {
    /// `binary` runs with the command line `template` makes of the VM's
    /// spec; `dir` gets the QMP socket, QEMU's pid file, its log and
    /// console; `listen` is this node's address for the migration stream
    /// (port 0: any free port, bound here and handed to QEMU).
    pub fn new(binary: PathBuf, template: Template, dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            binary,
            template,
            stream_tls: None,
            listener: std::sync::Mutex::new(None),
            dir,
            listen,
            running: Mutex::new(None),
            resume: true.into(),
            adopted: false.into(),
        }
    }

    /// The stream arrives over QEMU's TLS, from `tls.peer_node` only.
    pub fn with_stream_tls(mut self, tls: Option<StreamTls>) -> Self {
        self.stream_tls = tls;
        self
    }

    /// The stream arrives on `listener` (bound where the caller could, e.g.
    /// in another network namespace) instead of one bound at `listen`.
    pub fn with_listener(self, listener: std::net::TcpListener) -> Self {
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
        self
    }

    /// The QMP endpoint of the incoming QEMU (for the agent to adopt it).
    pub fn qmp(&self) -> Endpoint {
        Endpoint::Unix(self.qmp_path())
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Where QEMU writes its pid (see [`kill_unconfirmed`]).
    pub fn pid_file(dir: &Path) -> PathBuf {
        dir.join("qemu.pid")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default().trim().to_owned()
    }

    /// Whether confirm resumes the guest here (it ran on the source).
    pub fn resumes(&self) -> bool {
        self.resume.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The incoming QEMU's QMP connection (QEMU serves one client at a
    /// time): how the agent that adopts the VM talks to it.
    pub async fn client(&self) -> Option<QmpClient> {
        self.running.lock().await.as_ref().map(|(_, m)| m.client().clone())
    }

    /// Hands the running QEMU over after [`IncomingTarget::confirm`]: its
    /// QMP connection is closed (for the adopting loop to open its own) and
    /// the process keeps running whatever this agent does next. Its pid, or
    /// `None` if none runs.
    pub async fn adopt(&self) -> Option<u32> {
        let (owned, migration) = self.running.lock().await.take()?;
        drop(migration);
        self.adopted.store(true, std::sync::atomic::Ordering::Relaxed);
        owned.release()
    }

    /// Starts the QEMU with the stream's listener, bound here, as its file
    /// descriptor [`STREAM_FD`]: no port is probed and given back, so no
    /// other process can take it between a probe and QEMU's own bind.
    async fn start(&self, handoff: &Handoff) -> Result<(Owned, Migration, SocketAddr), IncomingError> {
        fn files(path: &Path) -> impl FnOnce(std::io::Error) -> IncomingError + '_ {
            move |source| IncomingError::Files { path: path.to_owned(), source }
        }
        let qmp = self.dir.join("qmp.sock");
        let incoming = IncomingFiles {
            qmp: qmp.clone(),
            pid_file: Self::pid_file(&self.dir),
            console: self.dir.join("console.log"),
            tls: self.stream_tls.clone(),
        };
        // Built before anything is touched: a spec this node cannot start
        // changes nothing.
        let args = incoming_command_line(&self.template, &handoff.machine, &incoming)?;
        std::fs::create_dir_all(&self.dir).map_err(files(&self.dir))?;
        let _ = std::fs::remove_file(&qmp);
        let log_path = self.dir.join("qemu.log");
        let log = std::fs::File::create(&log_path).map_err(files(&log_path))?;
        let log2 = log.try_clone().map_err(files(&log_path))?;
        let given = self.listener.lock().unwrap_or_else(|p| p.into_inner()).take();
        let listener = match given {
            Some(l) => l,
            None => std::net::TcpListener::bind(self.listen)
                .map_err(|source| IncomingError::Bind { addr: self.listen, source })?,
        };
        let addr =
            listener.local_addr().map_err(|source| IncomingError::Bind { addr: self.listen, source })?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        // The guest stays paused (-S) after the stream until confirm resumes
        // it, so the target never runs it unless the source agent says so.
        let mut command = Command::new(&self.binary);
        command.args(args).stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
        // SAFETY: runs in the forked child before exec, and calls only
        // dup2(2), which is async-signal-safe; `fd` stays open in the parent
        // (`listener` lives past `spawn`). dup2 leaves the copy without
        // FD_CLOEXEC, so QEMU inherits exactly this one descriptor.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(fd, STREAM_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child =
            command.spawn().map_err(|source| IncomingError::Spawn { binary: self.binary.clone(), source })?;
        // QEMU holds its own copy now.
        drop(listener);
        let mut owned = Owned { child: Some(child) };
        let deadline = tokio::time::Instant::now() + QMP_WAIT;
        let client = loop {
            if let Ok(Some(status)) = owned.child().try_wait() {
                return Err(IncomingError::Exited { status, log: self.log() });
            }
            if qmp.exists() {
                if let Ok(c) = QmpClient::connect(&Endpoint::Unix(qmp.clone()), ClientConfig::default()).await
                {
                    break c;
                }
            }
            if tokio::time::Instant::now() > deadline {
                owned.kill().await;
                return Err(IncomingError::NoQmp { after: QMP_WAIT, log: self.log() });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let incoming = Migration::new(client);
        // QEMU listens from its start (`-incoming` on its command line); the
        // source connects only once this prepare has answered.
        if let Err(source) = incoming.configure(&handoff.config).await {
            owned.kill().await;
            return Err(IncomingError::Listen { addr, source });
        }
        Ok((owned, incoming, addr))
    }
}

#[async_trait]
impl IncomingTarget for LocalIncoming {
    async fn prepare(&self, handoff: &Handoff) -> Result<String, IncomingError> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Err(IncomingError::AlreadyRunning);
        }
        let (owned, incoming, addr) = self.start(handoff).await?;
        self.resume.store(handoff.source_running, std::sync::atomic::Ordering::Relaxed);
        *running = Some((owned, incoming));
        Ok(tcp_uri(addr))
    }

    async fn confirm(&self, timeout: Duration) -> Result<(), ConfirmError> {
        self.resume_when_in(timeout).await.map_err(ConfirmError::Failed)
    }

    async fn abort(&self) -> AfterAbort {
        if let Some((owned, _)) = self.running.lock().await.take() {
            owned.kill().await;
        }
        if self.adopted.load(std::sync::atomic::Ordering::Relaxed) {
            AfterAbort::RunsThere
        } else {
            AfterAbort::Gone
        }
    }
}

impl LocalIncoming {
    /// Waits for the stream to be in, then resumes the guest (if it ran on
    /// the source) and waits until it runs.
    async fn resume_when_in(&self, timeout: Duration) -> Result<(), IncomingError> {
        let mut guard = self.running.lock().await;
        let Some((owned, incoming)) = guard.as_mut() else { return Err(IncomingError::NotStarted) };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = incoming.client().events();
        loop {
            if let Ok(Some(status)) = owned.child().try_wait() {
                return Err(IncomingError::Exited { status, log: self.log() });
            }
            let resume = self.resume.load(std::sync::atomic::Ordering::Relaxed);
            if incoming.run_status().await.map_err(IncomingError::Qmp)?.running {
                return Ok(());
            }
            match incoming.query().await.map_err(IncomingError::Qmp)?.incoming() {
                // The stream is in and the guest paused (-S): resume it,
                // unless it was paused on the source too.
                Progress::Completed if !resume => return Ok(()),
                Progress::Completed => incoming.cont().await.map_err(IncomingError::Resume)?,
                Progress::Failed => return Err(IncomingError::StreamFailed),
                Progress::NotStarted | Progress::Running | Progress::Cancelled => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(IncomingError::NotRunning(timeout));
            }
            // Woken by the incoming stream's `MIGRATION completed` event.
            nap(Duration::from_millis(5), &mut events).await;
        }
    }
}

/// Kills the QEMU whose pid file lies in `dir`, if it still runs and is a
/// QEMU: after an agent restart, an incoming QEMU nobody confirmed (paused
/// with -S, it never ran the guest). True if one was killed.
pub fn kill_unconfirmed(dir: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(LocalIncoming::pid_file(dir)) else { return false };
    let Ok(pid) = pid.trim().parse::<i32>() else { return false };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let is_qemu = exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy());
    if !(is_qemu && ours) {
        return false;
    }
    // SAFETY: kill(2) with a pid checked above to be our QEMU; no memory is touched.
    unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
}
