//! `cargo xtask bench pgbench`: Postgres under pgbench while vmscale scales
//! its VM, on the Debian guest (`crate::debian`) with everything real: the
//! release allocator and agents in network-namespace nodes, QEMU under TCG,
//! the informant as its package installs it, pgbench and psql from the host.
//!
//! Two guests are booted once and kept for the whole run (a boot costs
//! 30-60 s under TCG), both with the informant on TCP (`Link::Tcp`), since
//! the second one moves and QEMU refuses to migrate vhost-user vsock:
//!
//! - `pg-boot`, booted with 2 vCPUs, sysfs CPU mode, on node a;
//! - `pg-hot`, booted with 1 vCPU and room for a second, `cpu_mode =
//!   hotplug`, on node h. Its second vCPU is a QMP `device_add` by the agent
//!   under load; under TCG a vCPU `device_del` corrupts QEMU, so its agent
//!   never scales it down: its policy's `downscale_after_ms` is `i64::MAX`
//!   (use never stays low "long enough"), see [`never_down`].
//!
//! The phases (`phases.rs`, `moves.rs`), in order:
//!
//! 1. TPS rounds, interleaved: `pg-boot` (2 vCPUs) against `pg-hot` (1 vCPU),
//!    no agent on either yet; each round runs both, alternating which goes
//!    first, so the machine's noise (2x on single runs) falls on both.
//! 2. `pg-hot`'s agent starts; pgbench starts on it; `scale_up_ms` is from
//!    pgbench's start to the guest's second vCPU online, seen by a shell
//!    loop inside the guest (started through Postgres before pgbench) whose
//!    query returns the moment `/sys/devices/system/cpu/online` says `0-1`.
//! 3. TPS rounds again, interleaved: `pg-boot` against `pg-hot` at 2 vCPUs.
//! 4. `pg-boot` joins node a's agent (policy: down after 5 s of low use);
//!    a sort larger than its free memory runs; its OOM kills and the memory
//!    unplugged after it ended.
//! 5. One rate-limited pgbench (the witness) spans a burst that scales
//!    `pg-boot` up on node a (which fills a), node b's agent starting (the
//!    allocator moves the VM there, live), the burst's end, and a scale-down
//!    on node b: its failed transactions and broken connections, QEMU's
//!    downtime as the source agent logged it, the witness's longest
//!    transaction around the switch-over.
//! 6. 100 pgbench clients on `pg-boot` (now on node b): the guest's OOM
//!    kills, and what its kernel zones (not movable memory) had left.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmscale_agent::core::policy::Policy;
use vmscale_agent::core::pressure::{PressureKind, PressureKinds};
use vmscale_agent::vms::{CpuMode, VmSpec};
use vmscale_allocator::config::Config as AllocatorConfig;

use crate::cluster::net::{Agent, AgentPlan, Allocator};
use crate::harness::{loadavg, now_utc};
use crate::netns::Fabric;
use crate::pg::vm::{Link, Memory, PgVm, PgVmPlan};
use crate::steps::Steps;

mod moves;
mod phases;
mod report;

/// Nodes of the fabric: `pg-hot`'s, `pg-boot`'s first, its move's target.
const NODE_H: usize = 0;
const NODE_A: usize = 1;
const NODE_B: usize = 2;
const NAMES: [&str; 3] = ["node-h", "node-a", "node-b"];

/// pgbench clients in a TPS round and the scale-up: enough to keep two
/// vCPUs busy under TCG.
const CLIENTS: u32 = 8;

/// How long each part runs; `--quick` shortens the TPS rounds only (the
/// move's witness must span a scale-down, which takes the guest's 1-minute
/// load average to fall, whatever the mode).
#[derive(Debug, Clone, Copy)]
struct Lengths {
    rounds: usize,
    round: Duration,
    witness: Duration,
    clients_100: Duration,
}

impl Lengths {
    fn new(quick: bool) -> Lengths {
        if quick {
            Lengths {
                rounds: 2,
                round: Duration::from_secs(10),
                witness: Duration::from_secs(240),
                clients_100: Duration::from_secs(20),
            }
        } else {
            Lengths {
                rounds: 4,
                round: Duration::from_secs(20),
                witness: Duration::from_secs(240),
                clients_100: Duration::from_secs(40),
            }
        }
    }
}

/// CPU pressure events counted, not acted on, for both guests (as in the
/// `pg-*` scenarios): under TCG beside other guests an idle guest feels CPU
/// pressure every few seconds, and each event grew it by half. In the run
/// of 06:37 one such event plugged `pg-hot`'s vCPU before pgbench started.
/// CPU growth then follows the guest's load average, which pgbench raises.
fn shipped_but_cpu_pressure() -> Policy {
    Policy { ignore_pressure: PressureKinds::of(&[PressureKind::PsiCpu]), ..Policy::default() }
}

/// The hotplugged VM's policy: never scales down. Use must stay low for
/// `downscale_after_ms` before a downscale (the core adds it with
/// saturation), and [`NEVER_MS`] is about 292 million years; its vCPU thus
/// is never `device_del`ed, which under TCG corrupts QEMU's heap.
fn never_down() -> Policy {
    Policy { downscale_after_ms: NEVER_MS, ..shipped_but_cpu_pressure() }
}

/// The longest delay the agent's VM file can say: TOML integers are i64.
const NEVER_MS: u64 = i64::MAX.unsigned_abs();

/// The moving VM's policy: down after 5 s of low use, a CU every 2 s (as
/// the `pg-scale` scenario), so a scale-down fits in one pgbench run.
fn quick_down() -> Policy {
    Policy { downscale_after_ms: 5000, downscale_step_ms: 2000, ..shipped_but_cpu_pressure() }
}

/// Everything the run started. Fields drop in order: agents, guests, the
/// allocator, and the namespaces last.
struct Bench {
    agents: [Option<Agent>; 3],
    hot: PgVm,
    boot: PgVm,
    alloc: Allocator,
    fabric: Fabric,
    root: PathBuf,
    dir: PathBuf,
    len: Lengths,
}

impl Bench {
    /// The agent of `node` with `vms` (from [`spec_of`]) in its list, once
    /// it holds each of them with both its links.
    fn start_agent(&mut self, node: usize, plan: &AgentPlan, vms: &[VmSpec]) -> anyhow::Result<()> {
        let mut agent = Agent::start(&self.root, &self.dir, &self.fabric, node, &self.alloc.url, plan, vms)?;
        for id in vms.iter().map(|v| v.id.clone()) {
            crate::harness::wait_for(
                &format!("{} to hold {id} with its informant and the allocator", plan.name),
                Duration::from_secs(120),
                || {
                    agent.daemon.check()?;
                    let Some(v) = agent.vm(&id) else { return Ok(None) };
                    Ok((v["informant_connected"] == true && v["allocator_connected"] == true).then_some(()))
                },
            )?;
        }
        self.agents[node] = Some(agent);
        Ok(())
    }

    fn agent(&self, node: usize) -> anyhow::Result<&Agent> {
        self.agents[node].as_ref().with_context(|| format!("{}'s agent is not running", NAMES[node]))
    }

    /// Fails fast when a daemon died.
    fn check(&mut self) -> anyhow::Result<()> {
        self.alloc.daemon.check()?;
        for a in self.agents.iter_mut().flatten() {
            a.daemon.check()?;
        }
        Ok(())
    }
}

impl Drop for Bench {
    /// The QEMU node b's agent started for the moved guest runs in a
    /// process group of its own and outlives the agent: end it, and any
    /// other QEMU of this run, before the namespaces go.
    fn drop(&mut self) {
        let n = crate::cluster::net::kill_qemus_under(&self.dir);
        if n > 0 {
            eprintln!("    stopped {n} QEMU(s) of this run");
        }
    }
}

/// The node plan of an agent: `capacity` (milli-vCPU, MiB) and `policy`.
fn agent_plan(node: usize, capacity: (u64, u64), policy: Policy, vm: &PgVm) -> AgentPlan {
    AgentPlan {
        name: NAMES[node].into(),
        capacity_milli_cpu: capacity.0,
        capacity_mib: capacity.1,
        policy,
        transfer: vmscale_agent::qmp::migrate::MigrationConfig { timeout_ms: 90_000, ..Default::default() },
        confirm_grace_ms: 5000,
        dimm_backend: vm.dimm_backend(),
        files: vm.node_files(),
    }
}

/// `vm` as an agent's list has it, with `policy` of its own.
fn spec_of(vm: &PgVm, policy: &Policy) -> VmSpec {
    let mut spec = vm.plan.spec(&vm.agent_qmp, Some(vm.informant_address()));
    spec.policy = Some(policy.clone());
    spec
}

/// Boots both guests (at once: the boots overlap) and makes pgbench's
/// tables in each.
fn boot(root: &Path, dir: &Path, image: &crate::debian::DebianImage, len: Lengths) -> anyhow::Result<Bench> {
    let fabric = Fabric::new(3)?;
    let config = AllocatorConfig {
        watermark: 0.9,
        plan_interval_ms: 500,
        order_timeout_ms: 120_000,
        ..Default::default()
    };
    let alloc = Allocator::start(root, dir, &fabric, config)?;
    let hot_plan = PgVmPlan {
        cpus: 1,
        max_cpus: 2,
        cpu_mode: CpuMode::Hotplug,
        link: Link::Tcp,
        ..PgVmPlan::small("pg-hot", 61, Memory::Dimm)
    };
    let boot_plan = PgVmPlan { link: Link::Tcp, ..PgVmPlan::small("pg-boot", 62, Memory::Dimm) };
    let t0 = Instant::now();
    let mut hot = PgVm::boot(image, &fabric, NODE_H, &hot_plan, &dir.join(&hot_plan.id))?;
    let mut boot = PgVm::boot(image, &fabric, NODE_A, &boot_plan, &dir.join(&boot_plan.id))?;
    for vm in [&mut hot, &mut boot] {
        vm.wait_ready(Duration::from_secs(300))?;
        eprintln!("    {} ready {:.0} s after boot", vm.plan.id, t0.elapsed().as_secs_f64());
    }
    for vm in [&hot, &boot] {
        crate::pg::init_pgbench(vm).with_context(|| format!("pgbench's tables in {}", vm.plan.id))?;
    }
    Ok(Bench {
        agents: [None, None, None],
        hot,
        boot,
        alloc,
        fabric,
        root: root.into(),
        dir: dir.into(),
        len,
    })
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let len = Lengths::new(quick);
    let mut steps = Steps::new(crate::debian::ENSURE_STEPS + 3);
    let image = crate::debian::ensure(&mut steps)?;
    crate::cluster::build_daemons(&mut steps)?;
    crate::pgbench::ensure_client()?;
    let root = crate::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let dir = target.join("bench").join(format!("pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;

    let load_before = loadavg();
    let date = now_utc();
    let started = Instant::now();
    let mut figures = report::Figures::default();
    let mut result = Ok(());
    steps.call(
        &format!(
            "two Postgres guests under TCG: {} interleaved TPS rounds of {} s before and after a vCPU hotplug, \
             a sort, a move under pgbench, 100 clients (about {} minutes); logs in {}",
            len.rounds,
            len.round.as_secs(),
            if quick { 14 } else { 19 },
            dir.display()
        ),
        || {
            result = measure(&root, &dir, &image, len, &mut figures);
            Ok(())
        },
    )?;
    let session = report::Session {
        quick,
        date: &date,
        load_before: &load_before,
        load_after: &loadavg(),
        minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    let (v, md) = report::summarize(&figures, &session);
    let json_path = target.join("bench/pgbench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&v)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    println!("{md}");
    eprintln!("    figures in {}; logs in {}", json_path.display(), dir.display());
    // A run that broke off still writes what it measured, then says why.
    result.with_context(|| format!("logs in {}", dir.display()))?;
    if quick {
        eprintln!("    quick run: BENCHMARKS.md left as it was");
        return Ok(());
    }
    steps.call("record the figures in BENCHMARKS.md", || {
        crate::bench::record(&root.join("BENCHMARKS.md"), "pgbench", &md)
    })
}

/// Every phase, in order, into `f`. The TPS comparison must succeed;
/// later phases that fail are recorded in `f.errors` and the next goes on
/// where it still can.
fn measure(
    root: &Path,
    dir: &Path,
    image: &crate::debian::DebianImage,
    len: Lengths,
    f: &mut report::Figures,
) -> anyhow::Result<()> {
    let mut b = boot(root, dir, image, len)?;
    let p = &b.boot.plan;
    f.shape = format!(
        "CUs of {} milli-vCPU + {} MiB, {} ({} MiB boot memory) to {} (2 vCPUs, {} MiB; DIMMs of {} MiB)",
        p.cu.milli_cpu,
        p.cu.memory_bytes / crate::cluster::MIB,
        p.min_cus,
        p.boot_mib,
        p.max_cus,
        p.max_mib(),
        crate::pg::vm::DIMM_MIB
    );
    phases::rounds(&mut b, report::Phase::Before, &mut f.rounds)?;
    // Room for pg-hot at its largest (2000, 2048) at 80%: under the
    // watermark, and too little to take pg-boot in as well, so the
    // allocator neither moves pg-hot nor sends pg-boot here.
    let plan = agent_plan(NODE_H, (2500, 2560), never_down(), &b.hot);
    let spec = spec_of(&b.hot, &plan.policy);
    match phases::scale_up(&mut b, &plan, spec) {
        Ok(u) => f.scale_up = Some(u),
        // The rounds after it still compare the vCPU the agent plugged, if
        // it did; each round says how many the guest had.
        Err(e) => f.errors.push(format!("scale-up: {e:#}")),
    }
    if b.agents[NODE_H].is_none() {
        anyhow::bail!("pg-hot's agent did not start: {}", f.errors.join("; "));
    }
    phases::rounds(&mut b, report::Phase::After, &mut f.rounds)?;
    match moves::memory(&mut b) {
        Ok(m) => f.memory = Some(m),
        Err(e) => f.errors.push(format!("memory phase: {e:#}")),
    }
    if b.agents[NODE_A].is_some() {
        match moves::migration_run(&mut b) {
            Ok(m) => f.moved = Some(m),
            Err(e) => f.errors.push(format!("move under pgbench: {e:#}")),
        }
    }
    match moves::many_clients(&mut b) {
        Ok(c) => f.clients = Some(c),
        Err(e) => f.errors.push(format!("100 clients: {e:#}")),
    }
    Ok(())
}
