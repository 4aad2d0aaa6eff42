//! Starting a QEMU with hotplug room and a QMP socket, for tests, benchmarks
//! and the demo. The command line is the one that worked on this machine
//! (ARCHITECTURE.md, "What this machine can and cannot run"); no guest kernel is needed for QMP work.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::client::Endpoint;
use super::qemu_args::{Accel, QemuArgs, VirtioMem};

/// The Debian package that provides `qemu-system-x86_64`.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// The binary: `$VMSCALE_QEMU` if set, else `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("VMSCALE_QEMU") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| candidate.is_file())
}

/// The VM's shape. Defaults: 1 of 8 vCPUs, 256 MiB of 4 GiB in 8 DIMM slots,
/// a 2 GiB virtio-mem device `vm0`, TCG.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    pub binary: PathBuf,
    /// TCG here (no usable KVM); KVM where it works.
    pub accel: Accel,
    pub cpus: u32,
    pub max_cpus: u32,
    pub memory_mib: u64,
    pub dimm_slots: u32,
    pub max_memory_mib: u64,
    /// Size of the virtio-mem device `vm0`; `None` for no device.
    pub virtio_mem_mib: Option<u64>,
    /// Back the virtio-mem device with `memory-backend-memfd,share=on`.
    pub memfd: bool,
    /// QMP over TCP on loopback instead of a unix socket.
    pub tcp: bool,
    /// `-S`: vCPUs stay stopped, so an idle test QEMU costs no CPU.
    pub paused: bool,
    pub extra_args: Vec<String>,
}

impl QemuOptions {
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            accel: Accel::Tcg,
            cpus: 1,
            max_cpus: 8,
            memory_mib: 256,
            dimm_slots: 8,
            max_memory_mib: 4096,
            virtio_mem_mib: Some(2048),
            memfd: false,
            tcp: false,
            paused: false,
            extra_args: Vec::new(),
        }
    }

    /// The arguments after the binary, with QMP at `endpoint`.
    pub fn args(&self, endpoint: &Endpoint) -> Vec<String> {
        let mut q = QemuArgs::new(self.accel, self.cpus, self.max_cpus, self.memory_mib);
        q.dimm_slots = self.dimm_slots;
        q.max_memory_mib = self.max_memory_mib;
        q.virtio_mem = self.virtio_mem_mib.map(|size_mib| VirtioMem { size_mib, memfd: self.memfd });
        q.qmp = Some(endpoint.clone());
        q.paused = self.paused;
        q.nographic = true;
        q.extra = self.extra_args.clone();
        q.to_args()
    }
}

/// A running QEMU; killed when dropped.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    endpoint: Endpoint,
    log: PathBuf,
}

impl QemuProcess {
    /// Starts QEMU with its socket and log in `dir`, and waits (up to 10 s)
    /// until QMP accepts connections.
    pub async fn spawn(options: &QemuOptions, dir: &Path) -> std::io::Result<Self> {
        let endpoint = if options.tcp {
            // A port from bind(0) goes back to the kernel's pool before QEMU
            // binds it, and a parallel test may take it meanwhile.
            let ip = std::net::Ipv4Addr::LOCALHOST;
            Endpoint::Tcp((ip, vmscale_common::net::free_port(ip.into())?).into())
        } else {
            Endpoint::Unix(dir.join("qmp.sock"))
        };
        let log = dir.join("qemu.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(&options.binary)
            .args(options.args(&endpoint))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()?;
        let mut process = Self { child, endpoint, log };
        process.wait_ready().await?;
        Ok(process)
    }

    async fn wait_ready(&mut self) -> std::io::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "qemu exited with {status} before qmp was up: {}",
                    log.trim()
                )));
            }
            // Probing takes QEMU's single QMP connection for a moment; it
            // goes back to listening when we close.
            let up = match &self.endpoint {
                Endpoint::Unix(path) => tokio::net::UnixStream::connect(path).await.is_ok(),
                Endpoint::Tcp(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
            };
            if up {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("qmp at {} did not come up within 10 s", self.endpoint),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// QEMU's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub async fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill().await
    }
}
