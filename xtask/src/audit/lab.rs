//! The daemons under attack, for real: the allocator and the agent run from
//! their own libraries in this process, each on a runtime and threads of
//! its own (the allocator with the scheduler extender's routes, as in
//! Kubernetes mode), on real sockets on loopback, each stopped when its
//! handle drops; a bare QEMU (no guest, paused) where an agent needs a VM
//! to scale or move.

use anyhow::{bail, Context};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vmscale_agent::config::Config as AgentConfig;
use vmscale_agent::core::policy::Cu;
use vmscale_agent::migration::settings::MigrationSettings;
use vmscale_agent::vms::{CpuMode, InformantAddr, MemoryMode, VmSpec};
use vmscale_allocator::config::Config as AllocatorConfig;
use vmscale_common::tls::TlsFiles;

use super::http::Via;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A scratch directory under `target/audit/`, emptied first.
pub fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = crate::workspace_root().join("target/audit").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A listener on a loopback port.
pub async fn listen() -> anyhow::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").await.context("binding a loopback port")
}

/// Waits up to `timeout` for `f` to give `Some`, asking every 100 ms.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real allocator, with the extender's routes beside `/state`.
#[derive(Debug)]
pub struct Allocator {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Whether its gRPC listener speaks TLS.
    pub tls: bool,
    /// How its `/state` is read (over TLS with `http_tls`).
    via: Via,
    stop: CancellationToken,
}

impl Allocator {
    /// Starts it with `config` (its listen addresses are set here) and waits
    /// until `/state` answers. It runs on a runtime of its own, as in a
    /// process of its own: work it does under its lock never stalls the
    /// attackers' threads, nor theirs its own.
    pub async fn start(mut config: AllocatorConfig, via: Via) -> anyhow::Result<Allocator> {
        let grpc = std::net::TcpListener::bind("127.0.0.1:0")?;
        let http = std::net::TcpListener::bind("127.0.0.1:0")?;
        config.listen = grpc.local_addr()?;
        config.http_listen = http.local_addr()?;
        config.validate().context("the audit's allocator config")?;
        let (grpc_addr, http_addr, tls) = (config.listen, config.http_listen, config.tls.is_some());
        let stop = CancellationToken::new();
        let cancel = stop.clone();
        std::thread::Builder::new().name("allocator".into()).spawn(move || {
            let served = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(serve_allocator(config, grpc, http, cancel)));
            if let Err(e) = served {
                eprintln!("audit: the allocator stopped: {e:#}");
            }
        })?;
        let a = Allocator { grpc: grpc_addr, http: http_addr, tls, via, stop };
        let r = &a;
        until("the allocator's /state", Duration::from_secs(10), || async move { r.state().await.ok() })
            .await?;
        Ok(a)
    }

    /// A config for the audit: plans often, retries a failed move soon;
    /// plain text until a family sets `[tls]`.
    pub fn config() -> AllocatorConfig {
        AllocatorConfig {
            insecure: true,
            plan_interval_ms: 200,
            move_retry_base_ms: 500,
            move_retry_max_ms: 1000,
            order_timeout_ms: 60_000,
            ..AllocatorConfig::default()
        }
    }

    /// The URL agents dial.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.grpc)
    }

    pub async fn state(&self) -> anyhow::Result<Value> {
        super::state::get_state(self.http, &self.via).await
    }
}

async fn serve_allocator(
    config: AllocatorConfig,
    grpc: std::net::TcpListener,
    http: std::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    grpc.set_nonblocking(true)?;
    http.set_nonblocking(true)?;
    let (grpc, http) = (TcpListener::from_std(grpc)?, TcpListener::from_std(http)?);
    let shared = vmscale_allocator::shared::Shared::new(config, stop);
    let label = vmscale_allocator::capacity::VmLabel {
        key: vmscale_contract::keys::DEFAULT_LABEL_KEY.into(),
        value: vmscale_contract::keys::DEFAULT_LABEL_VALUE.into(),
    };
    let routes = vmscale_allocator::extender::http::router(shared.clone(), label);
    let extras = vmscale_allocator::server::Extras { leader: None, routes: Some(routes) };
    vmscale_allocator::server::serve_with(shared, grpc, http, extras).await?;
    Ok(())
}

impl Drop for Allocator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A real agent.
#[derive(Debug)]
pub struct Agent {
    pub node: String,
    pub http: SocketAddr,
    /// Where its migration service listens, when it takes VMs in.
    pub migration: Option<SocketAddr>,
    stop: CancellationToken,
}

impl Agent {
    /// Starts the agent of `node` with `vms`, connected to `allocator`, with
    /// `tls` (its node's certificate) or in plain text; with `migration`,
    /// its migration service listens too.
    pub async fn start(
        dir: &Path,
        node: &str,
        allocator: &str,
        tls: Option<TlsFiles>,
        vms: &[VmSpec],
        capacity: (u64, u64),
        migration: Option<MigrationSettings>,
    ) -> anyhow::Result<Agent> {
        let dir = dir.join(node);
        std::fs::create_dir_all(&dir)?;
        let vms_file = dir.join("vms.toml");
        crate::cluster::write_vms_file(&vms_file, vms)?;
        let http = crate::harness::free_port()?;
        let mut migration = migration.unwrap_or_default();
        migration.state_dir = dir.join("migration");
        let config = AgentConfig {
            node: node.into(),
            allocator: allocator.into(),
            insecure: tls.is_none(),
            tls,
            vms_file,
            vms_file_interval_ms: 200,
            http_listen: ([127, 0, 0, 1], http).into(),
            capacity_milli_cpu: capacity.0,
            capacity_memory_bytes: capacity.1,
            allocator_retry_base_ms: 100,
            allocator_retry_max_ms: 1000,
            migration: migration.clone(),
            ..AgentConfig::default()
        };
        let stop = CancellationToken::new();
        let cancel = stop.clone();
        let name = node.to_owned();
        // A runtime of its own, as a process of its own would have: the
        // agent's tasks never share worker threads with its attackers.
        std::thread::Builder::new().name(format!("agent {node}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
            match rt {
                Ok(rt) => {
                    if let Err(e) = rt.block_on(vmscale_agent::daemon::run(config, cancel)) {
                        eprintln!("audit: agent {name} stopped: {e:#}");
                    }
                }
                Err(e) => eprintln!("audit: no runtime for agent {name}: {e}"),
            }
        })?;
        let a = Agent {
            node: node.into(),
            http: ([127, 0, 0, 1], http).into(),
            migration: migration.listen,
            stop,
        };
        let r = &a;
        until(
            &format!("agent {node}'s /state"),
            Duration::from_secs(10),
            || async move { r.state().await.ok() },
        )
        .await?;
        Ok(a)
    }

    pub async fn state(&self) -> anyhow::Result<Value> {
        super::state::get_state(self.http, &Via::Plain).await
    }

    /// Waits until the agent shows `vm` registered with the allocator.
    pub async fn wait_registered(&self, vm: &str) -> anyhow::Result<()> {
        let what = format!("agent {} to register {vm}", self.node);
        until(&what, Duration::from_secs(30), || async move {
            let s = self.state().await.ok()?;
            let v = s.get("vms")?.get(vm)?;
            (v.get("allocator_connected")? == &Value::Bool(true)).then_some(())
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A QEMU with no guest, paused: enough for an agent to read its size, hold
/// it, and move it (a paused guest migrates too). Killed on drop.
#[derive(Debug)]
pub struct BareQemu {
    pub qmp: PathBuf,
    child: tokio::process::Child,
}

impl BareQemu {
    pub async fn start(dir: &Path, id: &str) -> anyhow::Result<BareQemu> {
        let qmp = dir.join(format!("{id}.qmp"));
        let _ = std::fs::remove_file(&qmp);
        let log = std::fs::File::create(dir.join(format!("{id}.qemu.log")))?;
        let child = tokio::process::Command::new("qemu-system-x86_64")
            .args(["-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-S"])
            .args(["-m", "128M,slots=4,maxmem=1G", "-smp", "1,maxcpus=1"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot run qemu-system-x86_64 (cargo xtask test installs it)")?;
        let q = BareQemu { qmp, child };
        let path = q.qmp.clone();
        until("QEMU's QMP socket", Duration::from_secs(15), || {
            let exists = path.exists();
            async move { exists.then_some(()) }
        })
        .await?;
        Ok(q)
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its entry for an agent's VM list (see [`vm_spec`]).
    pub fn spec(&self, id: &str, informant: Option<InformantAddr>) -> VmSpec {
        VmSpec { qmp: self.qmp.display().to_string(), ..vm_spec(id, informant) }
    }
}

/// A VM of 1 vCPU and 128 MiB now, in units of 250 mCPU + 128 MiB, 1 to 8
/// of them, without an informant unless given one; its QMP is for the
/// caller to set.
pub fn vm_spec(id: &str, informant: Option<InformantAddr>) -> VmSpec {
    VmSpec {
        id: id.into(),
        qmp: String::new(),
        informant,
        cu: Cu { milli_cpu: 250, memory_bytes: 128 * MIB },
        min_cus: 1,
        max_cus: 8,
        cpu_mode: CpuMode::Sysfs,
        memory: MemoryMode::Dimm { dimm_bytes: 128 * MIB },
        policy: None,
    }
}
