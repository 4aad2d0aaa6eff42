//! `cargo xtask migration`: boots the test guest on one "node" (network
//! namespace, see `netns.rs`) with a tap on the flat network, connects a TCP
//! client to an echo server in the guest, and live-migrates the guest to
//! another node and back while the client sends a line every 100 ms. It
//! passes when every line came back, the guest kept its address, and the
//! target has every vCPU and DIMM the source had.
//!
//! The move is the agent's own executor ([`agent_move`]: `carry_out` to the
//! target side a target agent runs, started in the other namespace): the
//! VM described from the source's /proc, its devices, the paused
//! target resumed by the confirm, the source quit. QEMU announces the guest
//! on the target's tap after the switch-over (self-announce, on by default),
//! so the bridges learn where it went. The benchmark and this harness move
//! the guest the same way.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use vmscale_agent::migration::command_line::read_machine;
use vmscale_agent::migration::settings::MigrationSettings;
use vmscale_agent::migration::source::carry_out;
use vmscale_agent::migration::stream_tls::{self, StreamTls};
use vmscale_agent::migration::target::{
    AfterAbort, ConfirmError, Handoff, IncomingError, IncomingTarget, LocalIncoming,
};
use vmscale_agent::migration::template::Template;
use vmscale_agent::qmp::migrate::{Migration, MigrationConfig, MigrationInfo};
use vmscale_agent::qmp::qemu_args::{Accel, DirectBoot, Network, QemuArgs, VirtioMem};
use vmscale_agent::qmp::{ClientConfig, Endpoint, Hotplug, HotplugConfig, QmpClient, QmpVm};

use crate::echo::{EchoClient, EchoReport};
use crate::guest::Image;
use crate::netns::Fabric;

/// The echo server's port in the guest (busybox nc, forking `cat` per
/// connection).
pub const ECHO_PORT: u16 = 7000;
/// The guest's MAC: the same on every node, as the target's command line
/// must match the source's.
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x6d, 0x01];
/// The tap's name in every node.
pub const TAP: &str = "vm0";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest boot memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// How many moves: node 0 to 1, then back, and so on.
    #[arg(long, default_value_t = 2)]
    pub moves: u32,
    /// Hot-add a vCPU, a 128 MiB DIMM and 64 MiB of virtio-mem before the
    /// first move, and check the target has them.
    #[arg(long)]
    pub hotplug: bool,
    /// Boot the guest image already in target/guest/ without checking it is
    /// up to date (no cargo builds; for repeated runs).
    #[arg(long)]
    pub no_build: bool,
    /// Before the first move, try one with the target node's network cut:
    /// it must fail within its deadline and leave the guest running on the
    /// source, connection and all.
    #[arg(long)]
    pub break_network: bool,
}

/// The guest's shape and address; the base command line of every QEMU that
/// runs it, on whichever node.
#[derive(Debug, Clone)]
pub struct Shape {
    pub memory_mib: u64,
    /// vCPUs from boot.
    pub cpus: u32,
    pub max_cpus: u32,
    pub slots: u32,
    /// The virtio-mem region; 0: no virtio-mem device.
    pub virtio_mem_mib: u64,
    /// More words for the kernel command line (no spaces in them), e.g.
    /// `vmscale.informant=--cpu-mode,sysfs`.
    pub extra_cmdline: Vec<String>,
}

impl Shape {
    pub fn new(memory_mib: u64) -> Shape {
        Shape { memory_mib, cpus: 1, max_cpus: 4, slots: 4, virtio_mem_mib: 1024, extra_cmdline: Vec::new() }
    }

    /// QEMU's arguments without QMP, console and the migration devices.
    pub fn base_args(&self, image: &Image, fabric: &Fabric) -> Vec<String> {
        let guest_ip = guest_ip(fabric);
        let mut cmdline = format!(
            "{} vmscale.ip={guest_ip}/24 vmscale.gw={} vmscale.workload=nc,-ll,-p,{ECHO_PORT},-e,cat",
            image.cmdline,
            fabric.gateway()
        );
        for w in &self.extra_cmdline {
            cmdline.push(' ');
            cmdline.push_str(w);
        }
        let mut q = QemuArgs::new(Accel::Tcg, self.cpus, self.max_cpus, self.memory_mib);
        q.dimm_slots = self.slots;
        // maxmem: boot memory, four DIMM-sized steps and the virtio-mem region.
        q.max_memory_mib = self.memory_mib + 4 * 128 + self.virtio_mem_mib;
        q.virtio_mem =
            (self.virtio_mem_mib > 0).then_some(VirtioMem { size_mib: self.virtio_mem_mib, memfd: false });
        q.boot = Some(DirectBoot { kernel: image.kernel.clone(), initrd: image.initramfs.clone(), cmdline });
        q.network = Some(Network::Tap { ifname: TAP.to_owned(), mac: Some(MAC) });
        q.no_reboot = true;
        q.to_args()
    }
}

/// The guest's address: the same on every node.
pub fn guest_ip(fabric: &Fabric) -> std::net::Ipv4Addr {
    fabric.addr(50)
}

/// One QEMU of the guest, in a node's namespace; killed when dropped.
#[derive(Debug)]
pub struct GuestVm {
    pub node: usize,
    pub dir: PathBuf,
    child: Child,
}

impl GuestVm {
    pub fn qmp(&self) -> Endpoint {
        Endpoint::Unix(self.dir.join("qmp.sock"))
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// The last lines of the console and QEMU's own log, for an error.
    pub fn logs(&self) -> String {
        let tail = |s: String| {
            s.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        let qemu = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
        format!("console ({}):\n{}\nqemu:\n{}", self.dir.display(), tail(self.console()), tail(qemu))
    }

    pub async fn client(&self) -> anyhow::Result<QmpClient> {
        let config = ClientConfig { command_timeout: Duration::from_secs(30), ..ClientConfig::default() };
        // The socket file appears when QEMU binds it, a moment before it
        // listens: a connection in between is refused, so try a few times.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match QmpClient::connect(&self.qmp(), config.clone()).await {
                Ok(c) => return Ok(c),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(e).with_context(|| format!("qmp of the guest on node {}", self.node)),
            }
        }
    }

    /// Why QEMU is not running any more, if it is not.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("qemu on node {} exited with {status}", self.node)),
            Ok(None) => None,
            Err(e) => Some(format!("cannot check qemu on node {}: {e}", self.node)),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts QEMU in `node`'s namespace with `base` plus `extra` arguments,
/// its QMP socket, console and log in `dir`, and waits for QMP.
pub fn start(
    fabric: &Fabric,
    node: usize,
    base: &[String],
    extra: &[String],
    dir: &Path,
) -> anyhow::Result<GuestVm> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let qmp = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let log = std::fs::File::create(dir.join("qemu.log"))?;
    let mut cmd = fabric.command_in(node, "qemu-system-x86_64");
    // Appended to, not truncated: an agent that takes the guest over starts
    // its QEMU with this same command line, and the source's lines must stay.
    cmd.args(base)
        .args(extra)
        .arg("-chardev")
        .arg(format!("file,id=console,path={},append=on", dir.join("console.log").display()))
        .args(["-serial", "chardev:console"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn().context("cannot start qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
    let mut vm = GuestVm { node, dir: dir.to_owned(), child };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !qmp.exists() {
        if let Some(status) = vm.child.try_wait()? {
            bail!("qemu on node {node} exited with {status} before qmp was up:\n{}", vm.logs());
        }
        if Instant::now() > deadline {
            bail!("qemu on node {node}: no qmp socket after 15 s:\n{}", vm.logs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(vm)
}

/// What one move took.
#[derive(Debug, Clone, Default)]
pub struct MoveFigures {
    /// QEMU's `total-time`: from `migrate` to the target running.
    pub total_ms: u64,
    /// QEMU's `downtime`: the guest's pause at switch-over.
    pub downtime_ms: u64,
    /// Ours, from reading the source's devices to the source stopped,
    /// including the target's start.
    pub wall_ms: u64,
    pub transferred_bytes: u64,
    /// How long the guest's vCPUs ran nowhere: from the source's `STOP`
    /// event to the target's `RESUME` (QEMU's own timestamps, one host
    /// clock). QEMU's `downtime` ends when the source has sent the last
    /// state; this also holds the target loading it and being resumed.
    pub guest_pause_ms: Option<f64>,
}

impl MoveFigures {
    pub fn from_info(info: &MigrationInfo, wall: Duration) -> MoveFigures {
        MoveFigures {
            total_ms: info.total_time_ms.unwrap_or(0),
            downtime_ms: info.downtime.unwrap_or(0),
            wall_ms: vmscale_common::time::millis(wall),
            transferred_bytes: info.ram.as_ref().map_or(0, |r| r.transferred),
            guest_pause_ms: None,
        }
    }
}

/// Host-clock microseconds of the last event named `name` that reached
/// `events` (QEMU stamps each event when it emits it).
pub fn last_event_us(
    events: &mut tokio::sync::broadcast::Receiver<vmscale_agent::qmp::QmpEvent>,
    name: &str,
) -> Option<i64> {
    let mut last = None;
    loop {
        match events.try_recv() {
            Ok(e) if e.name == name => {
                last = e.timestamp.map(|t| t.seconds * 1_000_000 + t.microseconds).or(last);
            }
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return last,
        }
    }
}

/// The guest's pause from a source's `STOP` to a target's `RESUME`, ms.
pub fn pause_ms(stop_us: Option<i64>, resume_us: Option<i64>) -> Option<f64> {
    let (stop, resume) = (stop_us?, resume_us?);
    (resume >= stop).then(|| (resume - stop) as f64 / 1000.0)
}

/// The QEMU that runs the guest now: one this harness started, or one the
/// agent's target side started and handed over (as it does to the agent
/// that adopts the VM).
pub enum Running {
    Harness(GuestVm),
    Agent { node: usize, dir: std::path::PathBuf, pid: Option<u32> },
}

impl Running {
    pub fn node(&self) -> usize {
        match self {
            Running::Harness(vm) => vm.node,
            Running::Agent { node, .. } => *node,
        }
    }

    pub async fn client(&self) -> anyhow::Result<QmpClient> {
        match self {
            Running::Harness(vm) => vm.client().await,
            Running::Agent { dir, .. } => {
                let config =
                    ClientConfig { command_timeout: Duration::from_secs(30), ..ClientConfig::default() };
                Ok(QmpClient::connect(&Endpoint::Unix(dir.join("qmp.sock")), config).await?)
            }
        }
    }

    pub fn logs(&self) -> String {
        match self {
            Running::Harness(vm) => vm.logs(),
            Running::Agent { dir, .. } => std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default(),
        }
    }

    pub fn kill(&mut self) {
        match self {
            Running::Harness(vm) => vm.kill(),
            Running::Agent { pid, .. } => {
                if let Some(p) = pid.take() {
                    let _ = std::process::Command::new("kill").args(["-9", &p.to_string()]).status();
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The agent's target side, with the incoming QEMU's events watched from
/// the moment it is up (for the `RESUME` that ends the guest's pause).
pub struct Watched {
    inner: LocalIncoming,
    events: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<vmscale_agent::qmp::QmpEvent>>>,
}

#[async_trait::async_trait]
impl IncomingTarget for Watched {
    async fn prepare(&self, handoff: &Handoff) -> Result<String, IncomingError> {
        let uri = self.inner.prepare(handoff).await?;
        let events = self.inner.client().await.map(|c| c.events());
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = events;
        Ok(uri)
    }

    async fn confirm(&self, timeout: Duration) -> Result<(), ConfirmError> {
        self.inner.confirm(timeout).await
    }

    async fn abort(&self) -> AfterAbort {
        self.inner.abort().await
    }
}

/// What a harness node's agent needs to take a moving VM in: where the
/// files its spec names are (on this one host, the source's own) and the
/// taps it may use (`[migration]` image_dir, disk_dir, vsock_dir,
/// tap_prefix; none: the default).
#[derive(Debug, Clone, Default)]
pub struct NodeFiles {
    pub image_dir: Option<PathBuf>,
    pub disk_dir: Option<PathBuf>,
    pub vsock_dir: Option<PathBuf>,
    pub tap_prefix: Option<String>,
}

impl NodeFiles {
    /// The test guest's (`cargo xtask build-guest`): its kernel and initrd.
    pub fn guest(image: &Image) -> NodeFiles {
        NodeFiles { image_dir: Some(image.dir.clone()), ..NodeFiles::default() }
    }

    /// `s` with these directories and prefix where they are set.
    pub fn settings(&self, s: MigrationSettings) -> MigrationSettings {
        MigrationSettings {
            image_dir: self.image_dir.clone().or(s.image_dir),
            disk_dir: self.disk_dir.clone().or(s.disk_dir),
            vsock_dir: self.vsock_dir.clone().or(s.vsock_dir),
            tap_prefix: self.tap_prefix.clone().unwrap_or(s.tap_prefix),
            ..s
        }
    }
}

/// The `[migration]` template of every node here: the guest image's
/// directory holds the kernels, taps are `vm...`.
pub fn template(image: &Image) -> Template {
    NodeFiles::guest(image).settings(MigrationSettings::default()).template()
}

/// Each node's certificate from one test CA, laid out for QEMU's stream
/// TLS (`stream_tls::write_creds_dir`), node `i` named `n<i>`.
#[derive(Debug)]
pub struct StreamPki {
    dirs: Vec<PathBuf>,
}

impl StreamPki {
    pub fn new(dir: &Path, nodes: usize) -> anyhow::Result<StreamPki> {
        let pki = vmscale_common::testing::TestPki::try_new(&dir.join("pki"))?;
        let mut dirs = Vec::new();
        for i in 0..nodes {
            let files = pki.try_issue(&vmscale_common::tls::Identity::Node(Self::name(i)))?;
            let d = dir.join(format!("qemu-tls-{}", Self::name(i)));
            stream_tls::write_creds_dir(&files, &d)?;
            dirs.push(d);
        }
        Ok(StreamPki { dirs })
    }

    pub fn name(node: usize) -> String {
        format!("n{node}")
    }

    /// Node `node`'s side of a stream with `peer`.
    fn side(&self, node: usize, peer: usize) -> Option<StreamTls> {
        Some(StreamTls { dir: self.dirs.get(node)?.clone(), peer_node: Self::name(peer) })
    }
}

/// A listener on node `to`'s address, bound inside its network namespace:
/// a target agent binds the stream's socket where it runs (its node), the
/// harness runs in the host's namespace.
fn bind_in(fabric: &Fabric, to: usize) -> anyhow::Result<std::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let ns_path = format!("/var/run/netns/{}", fabric.nodes[to].ns);
    let ns = std::fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
    let addr = std::net::SocketAddr::from((fabric.nodes[to].addr, 0));
    let bound = std::thread::spawn(move || {
        // SAFETY: setns(2) with a namespace file this thread holds open; it
        // moves only this thread, which ends right after the bind (the
        // socket keeps its namespace).
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::net::TcpListener::bind(addr)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread binding in {ns_path} panicked"))?;
    bound.with_context(|| format!("binding {addr} in {ns_path}"))
}

/// How a harness move runs: the transfer settings, the node's template,
/// and QEMU's stream TLS (none: plain).
#[derive(Debug, Clone, Copy)]
pub struct MoveSetup<'a> {
    pub config: &'a MigrationConfig,
    pub template: &'a Template,
    pub tls: Option<&'a StreamPki>,
}

/// The agent's move: `carry_out` from the source to a `LocalIncoming` in
/// node `to`'s namespace (a wrapper runs QEMU there, with the stream's
/// listener bound in that namespace), the VM described from the source
/// QEMU's /proc as the source agent describes it, and the target's command
/// line built by `template` as the target agent builds it.
pub async fn agent_move(
    fabric: &Fabric,
    source: &mut Running,
    to: usize,
    setup: MoveSetup<'_>,
    dir: &Path,
    order: u64,
) -> anyhow::Result<(Running, MoveFigures)> {
    let MoveSetup { config, template, tls } = setup;
    let t0 = Instant::now();
    let client = source.client().await?;
    let from = source.node();
    // As the source agent does before each move (clears an earlier setup
    // when plain: a QEMU that came in over TLS keeps its parameters).
    let source_tls = tls.and_then(|p| p.side(from, to));
    stream_tls::apply(&client, stream_tls::source_commands(source_tls.as_ref()))
        .await
        .map_err(|e| anyhow::anyhow!("{}", vmscale_agent::migration::reason(&e)))?;
    let machine = read_machine(&client, Path::new("/proc"), template)
        .await
        .map_err(|e| anyhow::anyhow!("{}", vmscale_agent::migration::reason(&e)))?;
    std::fs::create_dir_all(dir)?;
    let wrapper = dir.join("qemu-in-node");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec ip netns exec {} qemu-system-x86_64 \"$@\"\n", fabric.nodes[to].ns),
    )?;
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let target = Watched {
        inner: LocalIncoming::new(
            wrapper,
            template.clone(),
            dir.to_owned(),
            (fabric.nodes[to].addr, 0).into(),
        )
        .with_listener(bind_in(fabric, to)?)
        .with_stream_tls(tls.and_then(|p| p.side(to, from))),
        events: std::sync::Mutex::new(None),
    };
    let mut source_events = client.events();
    let done = carry_out(order, "bench", &client, machine, &target, config, |_, _| {})
        .await
        .map_err(|e| anyhow::anyhow!("{}", vmscale_agent::migration::reason(&e)))
        .with_context(|| source.logs())?;
    let stop = last_event_us(&mut source_events, "STOP");
    let resume = target
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .and_then(|rx| last_event_us(rx, "RESUME"));
    source.kill();
    let pid = target.inner.adopt().await;
    let moved = MoveFigures {
        guest_pause_ms: pause_ms(stop, resume),
        ..MoveFigures::from_info(&done.info, t0.elapsed())
    };
    Ok((Running::Agent { node: to, dir: dir.to_owned(), pid }, moved))
}

/// Hot-adds a vCPU, a 128 MiB DIMM and 64 MiB of virtio-mem, as the agent
/// does when the VM grows.
pub async fn grow(vm: &GuestVm) -> anyhow::Result<()> {
    let qmp = QmpVm::new(vm.client().await?, HotplugConfig::default());
    qmp.plug_vcpu().await?;
    qmp.plug_dimm(128 << 20).await?;
    qmp.set_virtio_mem_size(64 << 20).await?;
    // The guest driver plugs the blocks in its own time; the sizes compared
    // across the move must be settled ones.
    qmp.wait_virtio_mem_plugged(Duration::from_secs(60)).await?;
    Ok(())
}

/// A move to the other node with its link to the switch down: the migration
/// cannot connect, our deadline cancels it, the target is killed, and the
/// guest still runs on the source. The link comes back afterwards.
async fn cut_network_move(
    fabric: &Fabric,
    vm: &mut Running,
    template: &Template,
    dir: &Path,
) -> anyhow::Result<()> {
    let to = (vm.node() + 1) % fabric.nodes.len();
    eprintln!("    a move to node {to} with its network cut (must fail)");
    fabric.set_link(to, false)?;
    let config = MigrationConfig { timeout_ms: 3_000, ..MigrationConfig::default() };
    let setup = MoveSetup { config: &config, template, tls: None };
    let attempt = agent_move(fabric, vm, to, setup, &dir.join("vm-cut"), 1).await;
    fabric.set_link(to, true)?;
    match attempt {
        Ok(_) => bail!("a move to node {to} succeeded with its network cut"),
        Err(e) => eprintln!("    failed as it should: {e:#}"),
    }
    let status = Migration::new(vm.client().await?).run_status().await?;
    if !status.running {
        bail!("the guest does not run on the source after the failed move: {status:?}");
    }
    Ok(())
}

/// The whole scenario; also the benchmark's core.
pub fn run(a: Args) -> anyhow::Result<()> {
    let mut steps = crate::steps::Steps::new(1);
    let image = guest_image(a.no_build)?;
    let fabric = Fabric::new(2)?;
    let dir = run_dir()?;
    let mut report = None;
    steps.call("boot the guest on node 0, echo through it, move it between nodes", || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        report = Some(rt.block_on(scenario(&a, &image, &fabric, &dir))?);
        Ok(())
    })?;
    let (echo, moves) = report.context("no report")?;
    for (i, m) in moves.iter().enumerate() {
        println!(
            "move {}: total {} ms (qemu), downtime {} ms, wall {} ms, {} MiB sent",
            i + 1,
            m.total_ms,
            m.downtime_ms,
            m.wall_ms,
            m.transferred_bytes >> 20
        );
    }
    println!(
        "echo: {} lines sent, {} back, {} lost, {} wrong, longest gap {:.0} ms",
        echo.sent, echo.received, echo.lost, echo.wrong, echo.max_gap_ms
    );
    if echo.lost > 0 || echo.wrong > 0 {
        bail!("the connection did not survive the moves intact: {echo:?}");
    }
    println!("migration passed");
    Ok(())
}

/// The guest image: built (or checked) first, or as it is with `no_build`.
pub fn guest_image(no_build: bool) -> anyhow::Result<Image> {
    if !no_build {
        let mut steps = crate::steps::Steps::new(crate::guest::step_count(&Default::default()));
        return crate::guest::build(&Default::default(), &mut steps);
    }
    let dir = crate::workspace_root().join(crate::guest::GUEST_DIR);
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .with_context(|| format!("no guest image in {}: run `cargo xtask build-guest`", dir.display()))?;
    let vmlinux = dir.join("vmlinux");
    Ok(Image {
        kernel: if vmlinux.is_file() { vmlinux } else { dir.join("vmlinuz") },
        vmlinuz: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.img"),
        cmdline: cmdline.trim().to_owned(),
        dir,
    })
}

/// `target/migration/<pid>`, fresh.
pub fn run_dir() -> anyhow::Result<PathBuf> {
    let dir = crate::workspace_root().join("target/migration").join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

async fn scenario(
    a: &Args,
    image: &Image,
    fabric: &Fabric,
    dir: &Path,
) -> anyhow::Result<(EchoReport, Vec<MoveFigures>)> {
    let shape = Shape::new(a.memory_mib);
    let base = shape.base_args(image, fabric);
    fabric.add_tap(0, TAP)?;
    fabric.add_tap(1, TAP)?;
    let mut vm = start(fabric, 0, &base, &[], &dir.join("vm-0"))?;
    let addr = (guest_ip(fabric), ECHO_PORT).into();
    eprintln!("    waiting for the guest's echo server at {addr} (boot under TCG)");
    let stream =
        tokio::task::block_in_place(|| crate::echo::connect(addr, Duration::from_secs(180), || vm.exited()))
            .with_context(|| vm.logs())?;
    let client = EchoClient::start(stream, Duration::from_millis(100))?;
    if a.hotplug {
        grow(&vm).await?;
    }
    let before = QmpVm::new(vm.client().await?, HotplugConfig::default()).read_size().await?;
    let mut vm = Running::Harness(vm);
    // Let the client run a while on the first node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let config = MigrationConfig::default();
    let template = template(image);
    let setup = MoveSetup { config: &config, template: &template, tls: None };
    if a.break_network {
        cut_network_move(fabric, &mut vm, &template, dir).await?;
    }
    let mut moves = Vec::new();
    for i in 0..a.moves {
        let to = (vm.node() + 1) % fabric.nodes.len();
        eprintln!("    move {}: node {} -> node {to}", i + 1, vm.node());
        let order = u64::from(i) + 2;
        let (target, figures) =
            agent_move(fabric, &mut vm, to, setup, &dir.join(format!("vm-{}", i + 1)), order).await?;
        vm = target;
        moves.push(figures);
        let after = QmpVm::new(vm.client().await?, HotplugConfig::default()).read_size().await?;
        if after != before {
            bail!("the guest changed size in the move: before {before:?}, after {after:?}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let echo = tokio::task::block_in_place(|| client.finish(Duration::from_secs(5)))?;
    drop(vm);
    Ok((echo, moves))
}
