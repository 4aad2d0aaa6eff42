//! Restarts mid-ramp: the agent, then the allocator, killed with SIGKILL and
//! started again while the guest's memory grows.

use anyhow::{ensure, Context};
use std::fs;
use std::time::{Duration, Instant};

use super::{agent_current, healthy, log_lines, plan, start, Console, Ctx, Ledger};
use crate::cluster::qmp::Qmp;
use crate::cluster::{self, Node, NodePlan, Vm, MIB};

/// The VM both scenarios ramp: 512 MiB boot memory, 16 MiB/s to 700 MiB.
struct Ramp {
    vm: Vm,
    n: Node,
    console: Console,
    qmp: Qmp,
    id: String,
    t0: Instant,
}

const TARGET_MIB: u64 = 700;

fn boot_and_ramp(ctx: &Ctx, id: &str) -> anyhow::Result<Ramp> {
    let t0 = Instant::now();
    let go = ctx.dir.join("go");
    let plan = plan(id, 512, 0, format!("perl,{},16,{TARGET_MIB},{}", ctx.ramp, go.display()));
    let node = NodePlan { capacity_milli_cpu: 4000, capacity_mib: 4096, policy: String::new() };
    let vm = Vm::boot(&ctx.image, &ctx.dir, &plan)?;
    let mut console = Console::default();
    let (vm, n) = start(ctx, vm, &mut console, &node, ctx.timeout)?;
    let qmp = Qmp::connect(&vm.watch_qmp)?;
    fs::write(&go, "go\n")?;
    Ok(Ramp { vm, n, console, qmp, id: id.into(), t0 })
}

impl Ramp {
    fn left(&self, ctx: &Ctx) -> Duration {
        ctx.timeout.saturating_sub(self.t0.elapsed())
    }

    /// Waits until QEMU has at least `dimms` DIMMs; QEMU's memory then.
    fn wait_dimms(&mut self, ctx: &Ctx, dimms: usize, what: &str) -> anyhow::Result<u64> {
        let left = self.left(ctx);
        let Ramp { vm, n, console, qmp, .. } = self;
        cluster::wait_for(what, left, || {
            healthy(vm, n, console)?;
            let (d, mem) = qmp.memory()?;
            Ok((d.len() >= dimms).then_some(mem))
        })
    }

    /// The rest of the ramp, then the ledger settled on QEMU's size: the
    /// ledger, QEMU's DIMMs and memory.
    fn finish(&mut self, ctx: &Ctx) -> anyhow::Result<(Ledger, usize, u64)> {
        let left = self.left(ctx);
        let Ramp { vm, n, console, qmp, id, .. } = self;
        cluster::wait_for("the ramp to reach its target", left, || {
            healthy(vm, n, console)?;
            Ok(console.has("ramp: done").then_some(()))
        })?;
        let settled = cluster::wait_for("the ledger to hold QEMU's size", Duration::from_secs(20), || {
            healthy(vm, n, console)?;
            let (d, mem) = qmp.memory()?;
            let (Some(l), Some(cur)) = (Ledger::read(n), agent_current(n, id)) else { return Ok(None) };
            Ok((l.vms.get(id.as_str()) == Some(&(cur.0, mem)) && cur.1 == mem).then_some((l, d.len(), mem)))
        })
        .with_context(|| {
            format!(
                "ledger {:?}; agent {:?}; QEMU {:?}",
                Ledger::read(n),
                agent_current(n, id),
                qmp.memory().ok()
            )
        })?;
        settled.0.within_capacity()?;
        Ok(settled)
    }
}

pub(super) fn agent_restart(ctx: &Ctx) -> anyhow::Result<String> {
    let mut r = boot_and_ramp(ctx, "e2e-agent-restart")?;
    let mem_kill = r.wait_dimms(ctx, 1, "the first DIMM of the ramp")?;
    std::thread::sleep(Duration::from_secs(1));
    let (dimms_kill, mem_kill2) = r.qmp.memory()?;
    ensure!(mem_kill2 >= mem_kill, "memory shrank during the ramp");
    r.n.agent.kill()?;
    let killed = Instant::now();
    // The ramp goes on without an agent; nothing may change QEMU meanwhile.
    while killed.elapsed() < Duration::from_secs(2) {
        r.console.drain(&r.vm);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, mem_down) = r.qmp.memory()?;
    ensure!(mem_down == mem_kill2, "QEMU's memory changed while no agent ran");
    r.n.agent.restart()?;
    let restarted = Instant::now();
    let id = r.id.clone();
    // Read back from QEMU: the restarted agent's size is QEMU's, before it
    // has done anything.
    let back = {
        let left = r.left(ctx);
        let Ramp { vm, n, console, .. } = &mut r;
        cluster::wait_for("the restarted agent to connect to both peers", left, || {
            healthy(vm, n, console)?;
            let Some(s) = n.agent_vm(&id) else { return Ok(None) };
            let up = |k: &str| s.get(k).and_then(serde_json::Value::as_bool) == Some(true);
            Ok((up("informant_connected") && up("allocator_connected"))
                .then(|| agent_current(n, &id))
                .flatten())
        })?
    };
    let reconnect_s = restarted.elapsed().as_secs_f64();
    let started = log_lines(&r.n.agent.log, "VM loop started from QEMU's state");
    ensure!(started.len() == 2, "the agent's log shows {} VM loop starts, not 2", started.len());
    // Re-registered once: the ledger holds the VM's size, not that plus the
    // old reservation.
    let (_, mem_now) = r.qmp.memory()?;
    let ledger_back = Ledger::read(&r.n).context("no ledger after the agent's restart")?;
    let res = *ledger_back.vms.get(&id).context("the VM is not in the ledger after the restart")?;
    ensure!(ledger_back.vms.len() == 1, "the ledger holds {:?}", ledger_back.vms.keys());
    ensure!(
        res.1 >= mem_now && res.1 < mem_now + 2 * mem_kill2.min(mem_now),
        "after the restart the ledger holds {} MiB for a VM of {} MiB",
        res.1 / MIB,
        mem_now / MIB
    );
    ledger_back.within_capacity()?;
    let (ledger, dimms_end, mem_end) = r.finish(ctx)?;
    ensure!(
        dimms_end > dimms_kill.len(),
        "no DIMM plugged after the restart ({} before, {dimms_end} after)",
        dimms_kill.len()
    );
    ensure!(r.console.oom_kills() == 0, "OOM kill in the guest");
    let s = ledger.sum();
    Ok(format!(
        "agent killed with {} MiB ({} DIMMs) plugged, down 2 s, back on both links {reconnect_s:.1} s after its \
         restart; it read {} MiB back from QEMU (QEMU {} MiB), ledger then {} MiB (one entry); the ramp to \
         {TARGET_MIB} MiB went on to {} MiB ({dimms_end} DIMMs); ledger {} mCPU / {} MiB = QEMU's, sum <= {} MiB; \
         OOM kills: 0",
        mem_kill2 / MIB,
        dimms_kill.len(),
        back.1 / MIB,
        mem_now / MIB,
        res.1 / MIB,
        mem_end / MIB,
        s.0,
        s.1 / MIB,
        ledger.usable.1 / MIB
    ))
}

pub(super) fn allocator_restart(ctx: &Ctx) -> anyhow::Result<String> {
    let mut r = boot_and_ramp(ctx, "e2e-allocator-restart")?;
    r.wait_dimms(ctx, 1, "the first DIMM of the ramp")?;
    std::thread::sleep(Duration::from_secs(1));
    let id = r.id.clone();
    let old = Ledger::read(&r.n).context("no ledger before the restart")?;
    let old_res = *old.vms.get(&id).context("the VM is not in the ledger")?;
    let (dimms_kill, mem_kill) = r.qmp.memory()?;
    r.n.allocator.kill()?;
    let killed = Instant::now();
    // Down for 6 s while the ramp goes on (about 100 MiB more): the agent
    // wants more memory and has nobody to ask. QEMU may grow only within the
    // permit the old allocator gave.
    let mut mem_down_max = mem_kill;
    while killed.elapsed() < Duration::from_secs(6) {
        healthy(&mut r.vm, &mut r.n, &mut r.console)?;
        let (_, mem) = r.qmp.memory()?;
        mem_down_max = mem_down_max.max(mem);
        ensure!(
            mem <= old_res.1,
            "QEMU grew to {} MiB with the allocator down; its last reservation was {} MiB",
            mem / MIB,
            old_res.1 / MIB
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    r.n.allocator.restart()?;
    let restarted = Instant::now();
    // From its first answer on, the new allocator holds nothing for the VM
    // until the agent registers it, and then the VM's size, not more.
    let left = r.left(ctx);
    let (first, mem_at_reg) = {
        let Ramp { vm, n, console, qmp, .. } = &mut r;
        cluster::wait_for("the agent to register the VM with the restarted allocator", left, || {
            healthy(vm, n, console)?;
            let (_, mem_before) = qmp.memory()?;
            let Some(l) = Ledger::read(n) else { return Ok(None) };
            let Some(res) = l.vms.get(&id).copied() else { return Ok(None) };
            let (_, mem_after) = qmp.memory()?;
            ensure!(
                res.1 >= mem_after,
                "the restarted allocator holds {} MiB for a VM QEMU has {} MiB of",
                res.1 / MIB,
                mem_after / MIB
            );
            ensure!(
                res.1 <= old_res.1.max(mem_before),
                "the restarted allocator's first reservation ({} MiB) passes both the VM's size ({} MiB) \
                 and its last permit ({} MiB): granted before registration",
                res.1 / MIB,
                mem_before / MIB,
                old_res.1 / MIB
            );
            l.within_capacity()?;
            Ok(Some((res, mem_before)))
        })?
    };
    let reg_s = restarted.elapsed().as_secs_f64();
    ensure!(
        mem_at_reg <= old_res.1,
        "QEMU grew to {} MiB before the VM was registered again (last reservation {} MiB)",
        mem_at_reg / MIB,
        old_res.1 / MIB
    );
    let opened = log_lines(&r.n.allocator.log, "session opened");
    ensure!(opened.len() >= 2, "the allocator's log shows {} sessions, not a second one", opened.len());
    let (ledger, dimms_end, mem_end) = r.finish(ctx)?;
    ensure!(
        dimms_end > dimms_kill.len(),
        "no DIMM plugged after the allocator came back ({} before, {dimms_end} after)",
        dimms_kill.len()
    );
    ensure!(r.console.oom_kills() == 0, "OOM kill in the guest");
    let s = ledger.sum();
    Ok(format!(
        "allocator killed with {} MiB ({} DIMMs) in QEMU and {} MiB reserved, down 6 s (QEMU at most {} MiB \
         meanwhile), VM registered again {reg_s:.1} s after the restart at {} MiB (QEMU {} MiB); the ramp to \
         {TARGET_MIB} MiB went on to {} MiB ({dimms_end} DIMMs); ledger {} mCPU / {} MiB = QEMU's, sum <= {} MiB; \
         OOM kills: 0",
        mem_kill / MIB,
        dimms_kill.len(),
        old_res.1 / MIB,
        mem_down_max / MIB,
        first.1 / MIB,
        mem_at_reg / MIB,
        mem_end / MIB,
        s.0,
        s.1 / MIB,
        ledger.usable.1 / MIB
    ))
}
