//! `pg-scale` and `pg-virtio-mem` (see the module doc of `pg`): one node,
//! one Postgres guest, the real allocator and agent, pgbench and a
//! memory-hungry sort from the host. Every size is checked where it is
//! real: QEMU's (its second QMP monitor), the guest kernel's (through
//! Postgres), the allocator's ledger.

use anyhow::{bail, ensure, Context};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmscale_agent::core::policy::Policy;
use vmscale_agent::core::pressure::{PressureKind, PressureKinds};
use vmscale_allocator::config::Config as AllocatorConfig;

use super::probe::GuestView;
use super::vm::{Memory, PgVm, PgVmPlan};
use crate::cluster::net::{Agent, AgentPlan, Allocator};
use crate::cluster::qmp::Qmp;
use crate::cluster::{agent_operations, MIB};
use crate::netns::Fabric;
use crate::pgbench::{self, Pgbench, Summary};

/// What the pg scenarios get.
pub struct PgCtx {
    pub root: PathBuf,
    pub image: crate::debian::DebianImage,
    pub dir: PathBuf,
    pub timeout: Duration,
}

/// The memory-hungry sort's rows: about 100 bytes each in the backend
/// (8 million took 815 MiB and were OOM-killed at the VM's 1 GiB
/// maximum), so some 400 MiB: more than the boot memory has free, less
/// than the maximum.
const ROWS: u64 = 4_000_000;

/// pgbench's clients: a load of about 4, which brings the second vCPU at
/// once and decays in about two minutes once they stop (the 1-minute load
/// average is what the agent follows).
const CLIENTS: u32 = 4;

/// The node's name at the allocator.
const NODE: &str = "node-a";

/// The one node, its daemons and its guest.
struct Scene {
    // Fields drop in order: the fabric, last, takes its namespaces away
    // after everything that runs in them has gone.
    alloc: Allocator,
    agent: Agent,
    vm: PgVm,
    watch: Qmp,
    t0: Instant,
    timeout: Duration,
    _fabric: Fabric,
}

impl Scene {
    fn left(&self) -> Duration {
        self.timeout.saturating_sub(self.t0.elapsed())
    }

    /// Fails fast when a daemon or QEMU died.
    fn check(&mut self) -> anyhow::Result<()> {
        self.alloc.daemon.check()?;
        self.agent.daemon.check()?;
        if let Some(why) = self.vm.qemu.exited() {
            bail!("{why}: {}", self.vm.qemu.logs());
        }
        Ok(())
    }

    fn guest(&self) -> anyhow::Result<GuestView> {
        self.vm.conn.guest()
    }

    /// QEMU's DIMMs (ids) and memory (boot + plugged, virtio-mem's plugged
    /// size included), MiB.
    fn qemu_memory(&mut self) -> anyhow::Result<(Vec<String>, u64)> {
        let (dimms, bytes) = self.watch.memory()?;
        Ok((dimms, bytes / MIB))
    }

    /// The ledger's reservation for the VM: (milli-vCPU, MiB).
    fn reserved(&self) -> Option<(u64, u64)> {
        let s = self.alloc.state()?;
        let e = s.nodes.get(NODE)?.vms.get(&self.vm.plan.id)?;
        Some((e.reserved.milli_cpu, e.reserved.memory_bytes / MIB))
    }

    /// The agent's size of the VM: (milli-vCPU, MiB).
    fn agent_current(&self) -> Option<(u64, u64)> {
        let v = self.agent.vm(&self.vm.plan.id)?;
        let c = v.get("current")?;
        Some((c.get("milli_cpu")?.as_u64()?, c.get("memory_bytes")?.as_u64()? / MIB))
    }

    /// The agent's executed actions of one kind.
    fn ops(&self, action: &str) -> u64 {
        agent_operations(self.agent.http, action)
    }

    /// Waits for `f` while checking every process.
    fn wait<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&mut Scene) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let within = within.min(self.left());
        crate::harness::wait_for(what, within, || {
            self.check()?;
            f(self)
        })
    }
}

/// The agent's policy: downscale after 5 s of low use, one CU per 2 s; a
/// vCPU per 1.0 of load average rather than 0.7, and CPU pressure events
/// counted but not acted on. Under TCG on this 2-core machine a guest's
/// vCPU threads wait for the host whenever anything else runs: the idle
/// guest's load average then sits near 1 and it feels CPU pressure every
/// few seconds, and each such event would grow it by whole CUs (memory
/// included) right after every downscale. The load average still brings
/// the second vCPU under pgbench.
fn policy() -> Policy {
    Policy {
        cpu_target: 1.0,
        downscale_after_ms: 5000,
        downscale_step_ms: 2000,
        ignore_pressure: PressureKinds::of(&[PressureKind::PsiCpu]),
        ..Policy::default()
    }
}

fn start(ctx: &PgCtx, plan: &PgVmPlan) -> anyhow::Result<Scene> {
    let t0 = Instant::now();
    let fabric = Fabric::new(1)?;
    let config = AllocatorConfig { plan_interval_ms: 500, ..Default::default() };
    let alloc = Allocator::start(&ctx.root, &ctx.dir, &fabric, config)?;
    let mut vm = PgVm::boot(&ctx.image, &fabric, 0, plan, &ctx.dir.join(&plan.id))?;
    let ready = vm.wait_ready(Duration::from_secs(300))?;
    eprintln!("    {} ready {:.1} s after boot: {ready}", plan.id, t0.elapsed().as_secs_f64());
    let informant = vm.informant_address();
    let agent_plan = AgentPlan {
        name: NODE.into(),
        capacity_milli_cpu: 4000,
        capacity_mib: 8192,
        policy: policy(),
        transfer: Default::default(),
        confirm_grace_ms: 5000,
        dimm_backend: vm.dimm_backend(),
        files: Default::default(),
    };
    let spec = plan.spec(&vm.agent_qmp, Some(informant));
    let agent = Agent::start(&ctx.root, &ctx.dir, &fabric, 0, &alloc.url, &agent_plan, &[spec])?;
    let watch = Qmp::connect(&vm.qemu.dir.join("qmp.sock"))?;
    let mut scene = Scene { alloc, agent, vm, watch, t0, timeout: ctx.timeout, _fabric: fabric };
    let id = plan.id.clone();
    scene.wait(
        "the agent to hold the VM with its informant and the allocator",
        Duration::from_secs(120),
        |s| {
            let Some(v) = s.agent.vm(&id) else { return Ok(None) };
            let up = |k: &str| v[k] == true;
            Ok((up("informant_connected") && up("allocator_connected")).then_some(()))
        },
    )?;
    Ok(scene)
}

/// The VM at its smallest: one vCPU online in the guest, no DIMM (or no
/// virtio-mem) in QEMU, the ledger at `min_cus`; (guest view, seconds).
fn at_minimum(s: &mut Scene, what: &str, within: Duration) -> anyhow::Result<(GuestView, f64)> {
    let t = Instant::now();
    let plan = s.vm.plan.clone();
    let min =
        (plan.cu.milli_cpu * u64::from(plan.min_cus), plan.cu.memory_bytes / MIB * u64::from(plan.min_cus));
    let (mut said, mut probed) = (Instant::now(), None::<Instant>);
    let view = s
        .wait(what, within, |s| {
            // The host's side first (cheap); the guest is asked only when
            // that holds, and not more than every 5 s (a probe loads it).
            let (dimms, mib) = s.qemu_memory()?;
            let (agent, ledger) = (s.agent_current(), s.reserved());
            if said.elapsed() > Duration::from_secs(20) {
                said = Instant::now();
                eprintln!(
                    "    {:.0} s: agent {agent:?}, QEMU {mib} MiB, ledger {ledger:?} (want {min:?})",
                    t.elapsed().as_secs_f64()
                );
            }
            let host = agent == Some(min) && dimms.is_empty() && mib == plan.boot_mib && ledger == Some(min);
            if !host || probed.is_some_and(|p| p.elapsed() < Duration::from_secs(5)) {
                return Ok(None);
            }
            probed = Some(Instant::now());
            let g = s.guest()?;
            Ok((g.online_cpus == 1).then_some(g))
        })
        .with_context(|| {
            format!(
                "guest {:?}, agent {:?}, QEMU {:?}, ledger {:?}, expected {min:?}",
                s.guest().ok(),
                s.agent_current(),
                s.qemu_memory().ok(),
                s.reserved()
            )
        })?;
    Ok((view, t.elapsed().as_secs_f64()))
}

/// pgbench with `clients` until the guest's second vCPU is online, then 10
/// s more; (seconds to the vCPU, as the agent saw it and the guest then
/// confirmed, the summary).
fn cpu_load(s: &mut Scene, clients: u32) -> anyhow::Result<(f64, Summary)> {
    let opts = super::bench_options(&s.vm, clients, None);
    let bench = Pgbench::start(&opts, &pgbench::host)?;
    let t = Instant::now();
    let mut seen = None;
    let up = s.wait("pgbench load to bring the second vCPU online", Duration::from_secs(180), |s| {
        if seen.is_none() && s.agent_current().is_some_and(|(cpu, _)| cpu >= 2000) {
            seen = Some(t.elapsed().as_secs_f64());
        }
        let Some(at) = seen else { return Ok(None) };
        std::thread::sleep(Duration::from_secs(2));
        Ok((s.guest()?.online_cpus == 2).then_some(at))
    });
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            let summary = bench.stop();
            return Err(e).with_context(|| format!("pgbench: {summary:?}"));
        }
    };
    std::thread::sleep(Duration::from_secs(10));
    let summary = bench.stop()?;
    ensure!(summary.clean(), "pgbench lost work under scaling: {summary:?}");
    Ok((up, summary))
}

/// A sort larger than the guest's free memory (work_mem lets it stay in
/// memory); QEMU's largest size while it ran, MiB, and the query's seconds.
fn memory_query(s: &mut Scene, rows: u64) -> anyhow::Result<(u64, f64)> {
    let conn = s.vm.conn.clone();
    let sql = pgbench::memory_hungry_sql(rows, 2048);
    let t = Instant::now();
    let q = std::thread::spawn(move || conn.query(&sql, Duration::from_secs(600)));
    let mut peak = 0;
    while !q.is_finished() {
        s.check()?;
        if let Ok((_, mib)) = s.qemu_memory() {
            peak = peak.max(mib);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = q.join().map_err(|_| anyhow::anyhow!("the query's thread panicked"))?;
    let took = t.elapsed().as_secs_f64();
    let count = out.context("the memory-hungry query failed")?;
    ensure!(count == rows.to_string(), "the sort counted {count} rows, not {rows}");
    Ok((peak, took))
}

/// `pg-scale`: see the module doc of `pg`.
pub fn scale(ctx: &PgCtx) -> anyhow::Result<String> {
    let plan = PgVmPlan::small("pg-scale", 50, Memory::Dimm);
    let mut s = start(ctx, &plan)?;
    let (idle, idle_s) =
        at_minimum(&mut s, "the idle guest to go down to its minimum", Duration::from_secs(300))?;
    super::init_pgbench(&s.vm)?;
    let (plugs0, unplugs0) = (s.ops("plug"), s.ops("unplug"));
    let (up_s, summary) = cpu_load(&mut s, CLIENTS)?;
    let (_, peak_mib) = s.qemu_memory()?;
    let plugs = s.ops("plug") - plugs0;
    ensure!(plugs >= 1, "the second vCPU came online but the agent plugged nothing");
    let (_, down_s) =
        at_minimum(&mut s, "quiet to take the vCPU and the DIMMs away", Duration::from_secs(300))?;
    let unplugs = s.ops("unplug") - unplugs0;
    ensure!(unplugs >= 1, "the VM is back at its minimum but the agent unplugged nothing");

    let before = s.guest()?;
    let (query_peak, query_s) = memory_query(&mut s, ROWS)?;
    let after = s.guest()?;
    ensure!(
        after.oom_kills == before.oom_kills,
        "OOM kills in the guest during the sort: {before:?} -> {after:?}"
    );
    ensure!(query_peak > plan.boot_mib, "the sort ran without any memory plugged (peak {query_peak} MiB)");
    let (end, shrink_s) =
        at_minimum(&mut s, "the memory to be unplugged after the sort", Duration::from_secs(240))?;
    ensure!(end.oom_kills == idle.oom_kills, "OOM kills in the guest: {idle:?} -> {end:?}");
    ensure!(s.vm.console_oom_kills() == 0, "the guest's console shows an OOM kill: {}", s.vm.qemu.logs());
    Ok(format!(
        "idle at 1 vCPU after {idle_s:.0} s; pgbench {CLIENTS} clients: 2nd vCPU online {up_s:.1} s after start \
         ({} tps, {} failed, {} broken; QEMU at {peak_mib} MiB, {plugs} plug(s)); quiet: back to 1 vCPU and \
         {} MiB in {down_s:.0} s ({unplugs} unplug(s)); sort of {}M rows in {query_s:.0} s, memory up to \
         {query_peak} MiB, 0 OOM kills, unplugged again in {shrink_s:.0} s (guest MemTotal {} MiB)",
        summary.tps.map_or("?".into(), |t| format!("{t:.1}")),
        summary.failed,
        summary.broken_connections,
        plan.boot_mib,
        ROWS / 1_000_000,
        end.mem_total_mib()
    ))
}

/// `pg-virtio-mem`: the memory phase with a virtio-mem device.
pub fn virtio_mem(ctx: &PgCtx) -> anyhow::Result<String> {
    let plan = PgVmPlan::small("pg-vmem", 51, Memory::VirtioMem { region_mib: 1024 });
    let mut s = start(ctx, &plan)?;
    let (idle, _) = at_minimum(&mut s, "the idle guest to go down to its minimum", Duration::from_secs(300))?;
    let (query_peak, query_s) = memory_query(&mut s, ROWS)?;
    ensure!(query_peak > plan.boot_mib, "the sort ran without virtio-mem growing (peak {query_peak} MiB)");
    let (end, shrink_s) =
        at_minimum(&mut s, "virtio-mem to shrink after the sort", Duration::from_secs(240))?;
    ensure!(end.oom_kills == idle.oom_kills, "OOM kills in the guest: {idle:?} -> {end:?}");
    Ok(format!(
        "sort of {}M rows in {query_s:.0} s: virtio-mem grew to {} MiB, 0 OOM kills; shrunk back to 0 in \
         {shrink_s:.0} s (guest MemTotal {} MiB)",
        ROWS / 1_000_000,
        query_peak - plan.boot_mib,
        end.mem_total_mib()
    ))
}

/// Where a scenario's logs are.
pub fn logs(dir: &Path) -> String {
    format!("logs in {} (allocator.log, {NODE}.log, <vm>/console.log, <vm>/qemu.log)", dir.display())
}
