//! CPU load: vCPUs come online under load and go offline after it.

use anyhow::{ensure, Context};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{agent_current, agent_ops, healthy, start, wait_line, Console, Ctx, Ledger};
use crate::cluster::qmp::Qmp;
use crate::cluster::{Node, NodePlan, Vm, VmPlan, MIB};
use vmscale_agent::core::policy::Policy;

const BUSY_S: u64 = 30;
const WORKERS: u32 = 4;

/// CUs of half a vCPU and 128 MiB, 1 to 4: two vCPUs are 4 CUs, one is
/// 2. The VM boots with 512 MiB, which nothing can unplug, so its memory
/// covers every size up to 4 CUs and only the CPU moves.
fn cpu_plan(ctx: &Ctx, go: &Path) -> VmPlan {
    VmPlan {
        id: "e2e-cpu".into(),
        cu_milli_cpu: 500,
        cu_mib: 128,
        min_cus: 1,
        max_cus: 4,
        boot_mib: 512,
        boot_dimms: 0,
        cpus: 2,
        max_cpus: 2,
        workload: Some(format!("perl,{},{},{BUSY_S},{WORKERS}", ctx.cpu, go.display())),
    }
}

/// Idle: the agent takes the second vCPU away (the informant offlines it),
/// and the agent's size follows. The console line where it went offline.
fn idle_offline(
    vm: &mut Vm,
    n: &mut Node,
    console: &mut Console,
    id: &str,
    left: Duration,
) -> anyhow::Result<usize> {
    let idle_off = crate::harness::wait_for("the idle guest's second vCPU to go offline", left, || {
        healthy(vm, n, console)?;
        Ok(console.find_from(0, "cpu: online=0 n=1"))
    })?;
    // The guest offlines the vCPU when it approves; the agent's size follows
    // once its unplug step has run.
    crate::harness::wait_for(
        "the agent's size to follow the guest (one vCPU)",
        Duration::from_secs(15),
        || {
            healthy(vm, n, console)?;
            Ok(agent_current(n, id).filter(|c| c.0 <= 1000))
        },
    )
    .with_context(|| format!("one vCPU online in the guest but the agent says {:?}", agent_current(n, id)))?;
    Ok(idle_off)
}

/// After the load: the release reaches the allocator. The ledger and the
/// agent's size once they match.
fn settle(
    vm: &mut Vm,
    n: &mut Node,
    console: &mut Console,
    id: &str,
) -> anyhow::Result<(Ledger, (u64, u64))> {
    crate::harness::wait_for("the ledger to match the agent's size", Duration::from_secs(20), || {
        healthy(vm, n, console)?;
        let (Some(l), Some(c)) = (Ledger::read(n), agent_current(n, id)) else { return Ok(None) };
        Ok((l.vms.get(id) == Some(&c) && c.0 <= 1000).then_some((l, c)))
    })
    .with_context(|| format!("ledger {:?}, agent {:?}", Ledger::read(n), agent_current(n, id)))
}

/// The load: its start, the second vCPU online, its end (console lines).
fn under_load(
    (vm, n, console): (&mut Vm, &mut Node, &mut Console),
    idle_off: usize,
    left: Duration,
) -> anyhow::Result<(usize, usize, usize)> {
    let start = wait_line((vm, n, console), "the CPU load to start", left, (idle_off, "load: start"))?;
    let on = wait_line(
        (vm, n, console),
        "a second vCPU to come online under load",
        left,
        (start, "cpu: online=0-1 n=2"),
    )?;
    let end = wait_line((vm, n, console), "the CPU load to end", left, (start, "load: end"))?;
    Ok((start, on, end))
}

pub(super) fn cpu_load(ctx: &Ctx) -> anyhow::Result<String> {
    let timeout = ctx.timeout;
    let t0 = Instant::now();
    let go = ctx.dir.join("go");
    let plan = cpu_plan(ctx, &go);
    // The CPU goal follows the 1-minute load average (target 0.7 per vCPU):
    // four spinning workers pass 0.7 after about 12 s, and 30 s of them
    // (load ~1.6) take about 50 s to fall back under it.
    let policy = Policy { downscale_after_ms: 4000, downscale_step_ms: 2000, ..Policy::default() };
    let node = NodePlan { capacity_milli_cpu: 4000, capacity_mib: 4096, policy };
    // A guest under TCG on a host that steals CPU from this machine feels
    // CPU pressure while idle (97 psi_cpu events in 6 min were seen), and
    // the informant's default 60 s cooldown after pressure then denied every
    // downscale of the idle guest. 15 s still denies the downscales during
    // and right after the load, which is what this test is about.
    let vm = Vm::boot_with(&ctx.image, &ctx.dir, &plan, &["--pressure-cooldown-ms", "15000"])?;
    let mut console = Console::default();
    let (mut vm, mut n) = start(ctx, vm, &mut console, &node, timeout)?;
    let connected = Instant::now();
    let left = || timeout.saturating_sub(t0.elapsed());
    let id = plan.id.clone();

    let idle_off = idle_offline(&mut vm, &mut n, &mut console, &id, left())?;
    let idle_off_s = connected.elapsed().as_secs_f64();
    let mut qmp = Qmp::connect(&vm.watch_qmp)?;
    let (_, mem_before) = qmp.memory()?;
    let plugs_before = agent_ops(&n, "plug");

    fs::write(&go, "go\n")?;
    let (load_start, on, load_end) = under_load((&mut vm, &mut n, &mut console), idle_off, left())?;
    ensure!(on < load_end, "the second vCPU came online only after the load had ended");
    let t = |c: &Console, i: usize| c.value_at(i, "t").context("a console line without t=");
    let (t_start, t_on, t_end) = (t(&console, load_start)?, t(&console, on)?, t(&console, load_end)?);
    ensure!(t_end - t_start >= BUSY_S as f64 - 0.5, "the load ran {:.1} s, not {BUSY_S} s", t_end - t_start);
    let workers = console.lines[load_start..].iter().filter(|(_, l)| l.contains("load: worker done")).count();
    ensure!(workers == WORKERS as usize, "{workers} of {WORKERS} workers reported done");
    let cpu_at_peak = agent_current(&n, &id).map_or(0, |c| c.0);
    let plugs = agent_ops(&n, "plug") - plugs_before;
    ensure!(plugs >= 1, "the guest onlined a vCPU but the agent plugged nothing");

    // After the load: the vCPU goes offline again, once the load average has fallen.
    let off = wait_line(
        (&mut vm, &mut n, &mut console),
        "the second vCPU to go offline after the load",
        left(),
        (load_end, "cpu: online=0 n=1"),
    )?;
    let t_off = t(&console, off)?;
    let load_at_off = console.value_at(off, "load").unwrap_or(f64::NAN);
    let (ledger, cur) = settle(&mut vm, &mut n, &mut console, &id)?;
    ledger.within_capacity()?;
    let (dimms, mem_after) = qmp.memory()?;
    ensure!(
        mem_after == mem_before && dimms.is_empty(),
        "memory moved in a CPU-only scenario: {} -> {} MiB ({dimms:?})",
        mem_before / MIB,
        mem_after / MIB
    );
    Ok(format!(
        "idle: 2nd vCPU offline {idle_off_s:.1} s after the agent connected; {WORKERS} busy loops for {:.1} s: \
         2nd vCPU online {:.1} s into the load ({plugs} plug(s), agent at {cpu_at_peak} mCPU); offline again \
         {:.1} s after the load stopped (load avg {load_at_off}); ledger {} mCPU / {} MiB = agent's; \
         QEMU memory {} MiB unchanged; OOM kills: {}",
        t_end - t_start,
        t_on - t_start,
        t_off - t_end,
        cur.0,
        cur.1 / MIB,
        mem_after / MIB,
        console.oom_kills()
    ))
}
