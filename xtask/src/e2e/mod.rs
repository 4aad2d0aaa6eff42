//! `cargo xtask e2e <scenario>`: end-to-end scenarios with every part real:
//! the allocator and the agent (release binaries, gRPC on loopback), one
//! QEMU guest under TCG with the real informant inside (sysfs CPU mode,
//! 128 MiB DIMMs), and a workload in the guest (`cluster/ramp.pl` for
//! memory, `cpu.pl` for CPU, by the guest's own clock). `xtask/tests/e2e_*.rs`
//! run them, one per test file; each prints "e2e <scenario> passed: " and
//! its figures on one line.
//!
//! The guest's console shows only kernel emergencies; its /init reports OOM
//! kills from `/proc/vmstat` as "oom: Killed process ...", and every scenario
//! first checks that this watch runs, so "no OOM kill" is never a blind spot.

mod cpu;
mod full;
mod memory;
mod migrate;
mod restart;
mod room;
mod vsock;

use anyhow::{ensure, Context};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmscale_allocator::core::units::Resources;

use crate::cluster::{self, Node, NodePlan, Vm, VmPlan, MIB};
use crate::console::Console;
use crate::steps::Steps;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Scenario {
    /// A 32 MiB/s ramp to 1200 MiB in a 1 GiB guest: memory is plugged in
    /// time, no OOM kill while the node has room.
    MemoryRamp,
    /// The workload holds 650 MiB of a 1 GiB guest; the agent asks to
    /// shrink, the informant says no, the VM keeps its DIMMs.
    DeniedDownscale,
    /// Idle, the guest's second vCPU goes offline; four busy loops for 30 s
    /// bring it back; after they stop it goes offline again.
    CpuLoad,
    /// A node with no room left: the ramp outgrows the guest, the allocator
    /// denies, QEMU's size never changes, the ledger stays within capacity
    /// and the agent asks at a bounded rate.
    NoRoom,
    /// The agent is killed (SIGKILL) mid-ramp and started again: it reads the
    /// VM back from QEMU, registers it once, and scaling goes on.
    AgentRestart,
    /// The allocator is killed mid-ramp and started again on its port: the
    /// agent registers again, nothing grows before that, the ledger matches
    /// QEMU and stays within capacity.
    AllocatorRestart,
    /// Two nodes as network namespaces, an agent in each: node a passes its
    /// watermark, the allocator orders its VM to b; the first move has its
    /// network cut mid-stream and fails, a later one lands. The guest keeps
    /// its hot-added vCPU and DIMM and a TCP client loses no line.
    Migrate,
    /// The guest's boot memory is filled, then 10 DIMMs are plugged over
    /// QMP and 8 new processes take 96 MiB each: the full guest uses the
    /// new memory, no OOM kill (the image's memmap_on_memory at work).
    FullBootMemory,
    /// The informant listens on vsock only (as shipped); the agent reaches
    /// it through the guest's vsock device (vhost-user here, with shared
    /// memfd memory and DIMMs): its link shakes hands, the informant sees the
    /// host as CID 2, a memory ramp gets DIMMs the informant onlines.
    Vsock,
    /// The Debian guest with Postgres: idle, its second vCPU goes offline;
    /// pgbench load brings it back, quiet takes it (and the DIMMs that came
    /// with it) away; a memory-hungry sort gets memory without an OOM kill,
    /// and the agent unplugs it afterwards.
    PgScale,
    /// The Debian guest with a virtio-mem device: a memory-hungry sort grows
    /// it, the agent shrinks it afterwards.
    PgVirtioMem,
    /// pgbench through a live migration of its Postgres guest between two
    /// network-namespace nodes: no failed transaction, no broken connection.
    PgMigrate,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::MemoryRamp => "memory-ramp",
            Scenario::DeniedDownscale => "denied-downscale",
            Scenario::CpuLoad => "cpu-load",
            Scenario::NoRoom => "no-room",
            Scenario::AgentRestart => "agent-restart",
            Scenario::AllocatorRestart => "allocator-restart",
            Scenario::Migrate => "migrate",
            Scenario::FullBootMemory => "full-boot-memory",
            Scenario::Vsock => "vsock",
            Scenario::PgScale => "pg-scale",
            Scenario::PgVirtioMem => "pg-virtio-mem",
            Scenario::PgMigrate => "pg-migrate",
        }
    }

    /// Whether it runs on the Debian guest with Postgres (`crate::pg`).
    fn on_postgres(self) -> bool {
        matches!(self, Scenario::PgScale | Scenario::PgVirtioMem | Scenario::PgMigrate)
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Seconds the scenario may take once the VM is booted (builds
    /// excluded); by default 360, and 1200 for the pg- scenarios, whose
    /// load average takes minutes to fall after a load.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// A word for the guest kernel's command line after the image's own (a
    /// later word wins), e.g. `memory_hotplug.memmap_on_memory=0` to see what
    /// a setting is worth. Repeatable.
    #[arg(long = "guest-arg", value_name = "WORD")]
    pub guest_args: Vec<String>,
    /// full-boot-memory only: the size of each DIMM plugged (1280 MiB in
    /// all), e.g. 256 to see a DIMM larger than the guest's memory block.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(128..=1280))]
    pub dimm_mib: u64,
}

/// What every scenario gets.
struct Ctx {
    root: PathBuf,
    image: crate::guest::Image,
    dir: PathBuf,
    /// `ramp.pl` in `dir` (no spaces or commas, for the kernel command line).
    ramp: String,
    /// `cpu.pl` in `dir`.
    cpu: String,
    /// `full.pl` in `dir`.
    full: String,
    /// More guest kernel command line words (`--guest-arg`).
    kernel_args: Vec<String>,
    /// `--dimm-mib`.
    dimm_mib: u64,
    timeout: Duration,
}

/// The CPU workload (see its header).
const CPU_PL: &str = include_str!("cpu.pl");
/// The full-guest workload (see its header).
const FULL_PL: &str = include_str!("full.pl");

pub fn run(a: Args) -> anyhow::Result<()> {
    // Bad arguments fail before minutes of building.
    ensure!(
        a.dimm_mib.is_multiple_of(128) && 1280 % a.dimm_mib == 0,
        "--dimm-mib {}: a multiple of 128 MiB that divides 1280 MiB",
        a.dimm_mib
    );
    if let Some(w) = a.guest_args.iter().find(|w| w.is_empty() || w.contains(char::is_whitespace)) {
        anyhow::bail!("--guest-arg {w:?}: one kernel command line word, without spaces");
    }
    if a.scenario.on_postgres() {
        return run_on_postgres(a.scenario, Duration::from_secs(a.timeout.unwrap_or(1200)));
    }
    let mut steps = Steps::new(crate::guest::step_count(&Default::default()) + 2);
    let image = crate::guest::build(&Default::default(), &mut steps)?;
    // In a shared checkout other builds may hold cargo's lock for many
    // minutes; with this set the release binaries are used as they are.
    if std::env::var_os("VMSCALE_E2E_PREBUILT").is_some() {
        eprintln!("    VMSCALE_E2E_PREBUILT: using target/release's allocator and agent as they are");
    } else {
        cluster::build_daemons(&mut steps)?;
    }
    let root = crate::workspace_root();
    let name = a.scenario.name();
    // One directory per run: two test runs at once (two checkouts' worth of
    // `cargo test`, say) must not share sockets or logs.
    let dir = root.join("target/e2e").join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let ramp = dir.join("ramp.pl");
    fs::write(&ramp, cluster::RAMP_PL)?;
    let cpu = dir.join("cpu.pl");
    fs::write(&cpu, CPU_PL)?;
    let full = dir.join("full.pl");
    fs::write(&full, FULL_PL)?;
    let (ramp, cpu, full) =
        (ramp.display().to_string(), cpu.display().to_string(), full.display().to_string());
    ensure!(!ramp.contains([',', ' ']), "the workspace path {ramp} holds a comma or space");
    let ctx = Ctx {
        root,
        image,
        dir: dir.clone(),
        ramp,
        cpu,
        full,
        kernel_args: a.guest_args,
        dimm_mib: a.dimm_mib,
        timeout: Duration::from_secs(a.timeout.unwrap_or(360)),
    };
    let mut result = None;
    let parts = match a.scenario {
        Scenario::FullBootMemory => "QEMU under TCG, real informant; the harness plugs over QMP",
        _ => "QEMU under TCG, real informant, allocator and agent",
    };
    steps.call(&format!("scenario {name} ({parts})"), || {
        result = Some(match a.scenario {
            Scenario::MemoryRamp => memory::memory_ramp(&ctx),
            Scenario::DeniedDownscale => memory::denied_downscale(&ctx),
            Scenario::CpuLoad => cpu::cpu_load(&ctx),
            Scenario::NoRoom => room::no_room(&ctx),
            Scenario::AgentRestart => restart::agent_restart(&ctx),
            Scenario::AllocatorRestart => restart::allocator_restart(&ctx),
            Scenario::Migrate => migrate::migrate(&ctx),
            Scenario::FullBootMemory => full::full_boot_memory(&ctx),
            Scenario::Vsock => vsock::vsock_link(&ctx),
            Scenario::PgScale | Scenario::PgVirtioMem | Scenario::PgMigrate => {
                Err(anyhow::anyhow!("{name} runs on the Debian guest (run_on_postgres)"))
            }
        });
        Ok(())
    })?;
    let summary = result.context("no result")?.with_context(|| format!("logs in {}", dir.display()))?;
    println!("e2e {name} passed: {summary}");
    Ok(())
}

/// The scenarios on the Debian guest: its image, the daemons, a directory.
fn run_on_postgres(scenario: Scenario, timeout: Duration) -> anyhow::Result<()> {
    let mut steps = Steps::new(crate::debian::ENSURE_STEPS + 2);
    let image = crate::debian::ensure(&mut steps)?;
    if std::env::var_os("VMSCALE_E2E_PREBUILT").is_some() {
        eprintln!("    VMSCALE_E2E_PREBUILT: using target/release's allocator and agent as they are");
    } else {
        cluster::build_daemons(&mut steps)?;
    }
    let root = crate::workspace_root();
    let name = scenario.name();
    let dir = root.join("target/e2e").join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let ctx = crate::pg::PgCtx { root, image, dir: dir.clone(), timeout };
    let mut result = None;
    steps.call(
        &format!(
            "scenario {name} (Debian guest with Postgres under TCG, real informant, allocator and agents)"
        ),
        || {
            result = Some(match scenario {
                Scenario::PgScale => crate::pg::scale(&ctx),
                Scenario::PgVirtioMem => crate::pg::virtio_mem(&ctx),
                Scenario::PgMigrate => crate::pg::migrate(&ctx),
                _ => Err(anyhow::anyhow!("{name} runs on the busybox guest")),
            });
            Ok(())
        },
    )?;
    let summary = result.context("no result")?.with_context(|| crate::pg::logs(&dir))?;
    println!("e2e {name} passed: {summary}");
    Ok(())
}

/// A VM of `boot_mib` (plus `boot_dimms` DIMMs) in CUs of 1/8 vCPU and
/// 128 MiB, at most 16 CUs (2 GiB).
fn plan(id: &str, boot_mib: u64, boot_dimms: u32, workload: String) -> VmPlan {
    VmPlan {
        id: id.into(),
        cu_milli_cpu: 125,
        cu_mib: 128,
        min_cus: u32::try_from(boot_mib / 128).unwrap_or(1),
        max_cus: 16,
        boot_mib,
        boot_dimms,
        // Sysfs CPU mode: every vCPU the VM may get is there from boot, as
        // many as max_cus CUs need. (With fewer, the agent can never reach
        // a whole CU more and re-plugs the same size in a loop.)
        cpus: 2,
        max_cpus: 2,
        workload: Some(workload),
    }
}

/// Starts the node for the booted `vm`, waits for the agent to hold both
/// links and checks the guest's OOM watch.
fn start(
    ctx: &Ctx,
    mut vm: Vm,
    console: &mut Console,
    node: &NodePlan,
    timeout: Duration,
) -> anyhow::Result<(Vm, Node)> {
    let mut n = Node::start(&ctx.root, &ctx.dir, node, &[&vm])?;
    let id = vm.plan.id.clone();
    crate::harness::wait_for(
        "the agent to connect to the allocator and the informant in the guest",
        timeout,
        || {
            vm.check()?;
            n.check()?;
            console.drain(&vm);
            let Some(s) = n.agent_vm(&id) else { return Ok(None) };
            let up = |k: &str| s.get(k).and_then(serde_json::Value::as_bool) == Some(true);
            Ok((up("informant_connected") && up("allocator_connected")).then_some(()))
        },
    )?;
    console.require_oom_watch(&vm)?;
    Ok((vm, n))
}

/// One node's ledger as the allocator's `/state` shows it.
#[derive(Debug, Clone, PartialEq)]
struct Ledger {
    /// Capacity less the system reserve: what grants may fill.
    usable: (u64, u64),
    /// Reservations by VM: (milli-vCPU, bytes).
    vms: BTreeMap<String, (u64, u64)>,
    /// Demand the allocator could not grant: (milli-vCPU, bytes).
    unmet: (u64, u64),
    /// Whether an agent's session holds the node.
    session: bool,
}

impl Ledger {
    /// `None` while the allocator doesn't answer or doesn't know the node.
    fn read(n: &Node) -> Option<Ledger> {
        let mut s = cluster::allocator_state(n.allocator_http)?;
        let node = s.nodes.remove(cluster::NODE)?;
        let pair = |r: Resources| (r.milli_cpu, r.memory_bytes);
        Some(Ledger {
            usable: pair(node.usable()),
            vms: node.vms.iter().map(|(id, v)| (id.clone(), pair(v.reserved))).collect(),
            unmet: pair(node.unmet()),
            session: node.session.is_some(),
        })
    }

    fn sum(&self) -> (u64, u64) {
        self.vms.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1))
    }

    /// Fails when the reservations pass what the node can give.
    fn within_capacity(&self) -> anyhow::Result<()> {
        let s = self.sum();
        ensure!(
            s.0 <= self.usable.0 && s.1 <= self.usable.1,
            "over-committed: reservations {} mCPU / {} MiB on a node with {} mCPU / {} MiB usable",
            s.0,
            s.1 / MIB,
            self.usable.0,
            self.usable.1 / MIB
        );
        Ok(())
    }
}

/// The agent's executed actions of one kind (all outcomes), from `/metrics`.
fn agent_ops(n: &Node, action: &str) -> u64 {
    cluster::agent_operations(std::net::SocketAddr::from(([127, 0, 0, 1], n.agent_http)), action)
}

/// The agent's view of the VM: (current milli-vCPU, current bytes).
fn agent_current(n: &Node, vm: &str) -> Option<(u64, u64)> {
    let s = n.agent_vm(vm)?;
    let c = s.get("current")?;
    Some((c.get("milli_cpu")?.as_u64()?, c.get("memory_bytes")?.as_u64()?))
}

/// Fails fast on a dead process, an OOM kill or a workload that exited.
fn healthy(vm: &mut Vm, n: &mut Node, console: &mut Console) -> anyhow::Result<()> {
    n.check()?;
    guest_healthy(vm, console)
}

/// Waits up to `left` for a console line holding `pat` at or after line
/// `from`, failing fast as [`healthy`] does; the line's index.
fn wait_line(
    (vm, n, console): (&mut Vm, &mut Node, &mut Console),
    what: &str,
    left: Duration,
    (from, pat): (usize, &str),
) -> anyhow::Result<usize> {
    crate::harness::wait_for(what, left, || {
        healthy(vm, n, console)?;
        Ok(console.find_from(from, pat))
    })
}

/// [`healthy`] for the guest alone: QEMU runs, no OOM kill, the workload
/// has not exited.
fn guest_healthy(vm: &mut Vm, console: &mut Console) -> anyhow::Result<()> {
    vm.check()?;
    console.drain(vm);
    if console.has("workload exited") {
        // /init's OOM watch reports a kill up to 0.6 s after it: name the
        // kill, not just the exit, when there was one.
        std::thread::sleep(Duration::from_secs(2));
        console.drain(vm);
    }
    ensure!(
        console.oom_kills() == 0,
        "OOM kill in the guest ({} in all); console {}",
        console.oom_kills(),
        vm.console_log.display()
    );
    ensure!(!console.has("workload exited"), "the workload exited; console {}", vm.console_log.display());
    Ok(())
}

/// Lines of a daemon's log that contain `pat`.
fn log_lines(path: &Path, pat: &str) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(pat))
        .map(str::to_owned)
        .collect()
}

fn ms(d: Option<f64>) -> String {
    d.map_or("n/a".into(), |s| format!("{:.0} ms", s * 1000.0))
}
