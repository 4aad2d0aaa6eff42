//! Memory scenarios: a ramp met with plugged memory, and a downscale the
//! informant denies while the workload holds its memory.

use anyhow::{bail, ensure, Context};
use std::fs;
use std::time::{Duration, Instant};

use super::{healthy, log_lines, ms, plan, start, Console, Ctx};
use crate::cluster::qmp::Qmp;
use crate::cluster::{Node, NodePlan, Vm, MIB};
use crate::console::value;
use vmscale_agent::core::policy::Policy;

pub(super) fn memory_ramp(ctx: &Ctx) -> anyhow::Result<String> {
    let (ramp, timeout) = (&ctx.ramp, ctx.timeout);
    let t0 = Instant::now();
    let go = ctx.dir.join("go");
    let (boot_mib, target_mib) = (1024, 1200);
    let plan = plan("e2e-ramp", boot_mib, 0, format!("perl,{ramp},32,{target_mib},{}", go.display()));
    let node = NodePlan { capacity_milli_cpu: 4000, capacity_mib: 4096, policy: Policy::default() };
    let vm = Vm::boot(&ctx.image, &ctx.dir, &plan)?;
    let mut console = Console::default();
    let (mut vm, mut n) = start(ctx, vm, &mut console, &node, timeout)?;
    let booted = t0.elapsed();
    eprintln!("    agent connected {:.1} s after QEMU started; starting the ramp", booted.as_secs_f64());
    fs::write(&go, "go\n")?;
    crate::harness::wait_for("the ramp to reach its target", timeout.saturating_sub(t0.elapsed()), || {
        vm.check()?;
        n.check()?;
        console.drain(&vm);
        if console.oom_kills() > 0 {
            bail!("OOM kill in the guest during the ramp; console {}", vm.console_log.display());
        }
        if console.has("workload exited") {
            bail!("the workload exited; console {}", vm.console_log.display());
        }
        Ok(console.has("ramp: done").then_some(()))
    })?;
    // Settle: the last plug's reservation and the guest's onlining.
    std::thread::sleep(Duration::from_secs(3));
    console.drain(&vm);
    ensure!(console.oom_kills() == 0, "OOM kill in the guest; console {}", vm.console_log.display());
    let mut qmp = Qmp::connect(&vm.watch_qmp)?;
    let (dimms, total) = qmp.memory()?;
    ensure!(!dimms.is_empty(), "no DIMM plugged in QEMU, yet the workload holds {target_mib} MiB");
    ensure!(total == (boot_mib + 128 * dimms.len() as u64) * MIB, "QEMU's memory {total} does not add up");
    let reserved = crate::harness::wait_for(
        "the allocator's ledger to hold the VM's size",
        Duration::from_secs(15),
        || {
            n.check()?;
            Ok(n.reserved(&plan.id).filter(|r| r.1 == total))
        },
    )
    .with_context(|| format!("QEMU has {} MiB; the ledger says {:?}", total / MIB, n.reserved(&plan.id)))?;
    let start_t = console.ramp_value("start", "t");
    let cross = console.ramp_value("cross90", "t");
    let grew = |after: f64| console.ramp("grew").filter_map(|(_, l)| value(l, "t")).find(|t| *t >= after);
    let first_grew = start_t.and_then(grew);
    let relief = cross.and_then(|c| grew(c).map(|g| g - c));
    Ok(format!(
        "ramp 32 MiB/s to {target_mib} MiB in a {boot_mib} MiB guest: {} DIMMs of 128 MiB plugged ({} MiB), \
         ledger {} MiB; first memory online {} after the ramp started; use past 90%: {}; \
         90% -> memory online: {}; OOM kills: {}; boot to agent connected {:.1} s",
        dimms.len(),
        total / MIB,
        reserved.1 / MIB,
        ms(first_grew.zip(start_t).map(|(g, s)| g - s)),
        if cross.is_some() { "yes" } else { "never" },
        ms(relief),
        console.oom_kills(),
        booted.as_secs_f64()
    ))
}

/// After the informant denied, the VM keeps its memory: several more asks
/// (cooldown 3 s) over 12 s, no change. QEMU's DIMMs and memory then.
fn keeps_memory(
    (vm, n, console): (&mut Vm, &mut Node, &mut Console),
    qmp: &mut Qmp,
) -> anyhow::Result<(Vec<String>, u64)> {
    let (dimms_at_denial, total_at_denial) = qmp.memory()?;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(12) {
        healthy(vm, n, console)?;
        let (dimms, total) = qmp.memory()?;
        ensure!(
            total >= total_at_denial,
            "memory went from {} to {} MiB after the informant denied ({dimms:?})",
            total_at_denial / MIB,
            total / MIB
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (dimms, total) = qmp.memory()?;
    ensure!(dimms.len() >= dimms_at_denial.len(), "DIMMs went from {dimms_at_denial:?} to {dimms:?}");
    Ok((dimms, total))
}

pub(super) fn denied_downscale(ctx: &Ctx) -> anyhow::Result<String> {
    let (ramp, timeout) = (&ctx.ramp, ctx.timeout);
    let t0 = Instant::now();
    let hold_mib = 650;
    // 512 MiB and four DIMMs from boot: 1 GiB. The workload takes its memory
    // at once.
    let plan = plan("e2e-hold", 512, 4, format!("perl,{ramp},0,{hold_mib}"));
    // memory_target 0.95: the agent's goal (use / 0.95, about 6 CUs) sits
    // below the VM's 8 CUs, so it asks for 7; the informant keeps a 256 MiB
    // buffer on top of what is used (about 700 MiB), which 7 CUs can't hold.
    let policy = Policy {
        memory_target: 0.95,
        downscale_after_ms: 3000,
        downscale_step_ms: 2000,
        downscale_denied_cooldown_ms: 3000,
        ..Policy::default()
    };
    let node = NodePlan { capacity_milli_cpu: 4000, capacity_mib: 4096, policy };
    // The agent starts once the workload holds its memory: before, use is
    // low and a downscale would rightly be approved.
    let mut vm = Vm::boot(&ctx.image, &ctx.dir, &plan)?;
    let mut console = Console::default();
    crate::harness::wait_for("the workload to take its memory", timeout, || {
        vm.check()?;
        console.drain(&vm);
        Ok(console.has("ramp: done").then_some(()))
    })?;
    let (mut vm, mut n) = start(ctx, vm, &mut console, &node, timeout.saturating_sub(t0.elapsed()))?;
    let check = healthy;
    let agent_log = n.agent.log.clone();
    let denials = || log_lines(&agent_log, "informant denied a downscale");
    let first = {
        let (vm, n, console) = (&mut vm, &mut n, &mut console);
        crate::harness::wait_for(
            "the informant to deny a downscale while the workload holds its memory",
            timeout.saturating_sub(t0.elapsed()),
            || {
                check(vm, n, console)?;
                Ok(denials().into_iter().next())
            },
        )?
    };
    eprintln!("    denied: {first}");
    let mut qmp = Qmp::connect(&vm.watch_qmp)?;
    let (dimms, total) = keeps_memory((&mut vm, &mut n, &mut console), &mut qmp)?;
    // The memory the workload holds must be why: a denial for recent
    // pressure alone (constant CPU pressure under TCG, say) would pass the
    // checks above without testing what this scenario is about.
    let all = denials();
    ensure!(
        all.iter().any(|d| d.contains("does not fit")),
        "no denial names the memory the workload holds; the informant said: {all:#?}"
    );
    let reserved = n.reserved(&plan.id).context("the VM is not in the allocator's ledger")?;
    ensure!(reserved.1 == total, "the ledger holds {} MiB, QEMU has {} MiB", reserved.1 / MIB, total / MIB);
    let held = console.ramp_value("done", "held").unwrap_or(0.0);
    Ok(format!(
        "workload holds {held} MiB; {} downscale asks denied by the informant; the VM keeps {} DIMMs \
         ({} MiB, ledger {} MiB); first reason: {}",
        denials().len(),
        dimms.len(),
        total / MIB,
        reserved.1 / MIB,
        first.split("reason=").nth(1).unwrap_or(&first)
    ))
}
