//! Restarts mid-ramp: the agent, then the allocator, killed with SIGKILL and
//! started again while the guest's memory grows.

use anyhow::{ensure, Context};
use std::fs;
use std::time::{Duration, Instant};

use super::{agent_current, healthy, log_lines, plan, start, Console, Ctx, Ledger};
use crate::cluster::qmp::Qmp;
use crate::cluster::{Node, NodePlan, Vm, MIB};
use serde_json::Value;
use vmscale_agent::core::policy::Policy;

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
    let node = NodePlan { capacity_milli_cpu: 4000, capacity_mib: 4096, policy: Policy::default() };
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
        crate::harness::wait_for(what, left, || {
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
        crate::harness::wait_for("the ramp to reach its target", left, || {
            healthy(vm, n, console)?;
            Ok(console.has("ramp: done").then_some(()))
        })?;
        let settled =
            crate::harness::wait_for("the ledger to hold QEMU's size", Duration::from_secs(20), || {
                healthy(vm, n, console)?;
                let (d, mem) = qmp.memory()?;
                let (Some(l), Some(cur)) = (Ledger::read(n), agent_current(n, id)) else { return Ok(None) };
                Ok((l.vms.get(id.as_str()) == Some(&(cur.0, mem)) && cur.1 == mem).then_some((
                    l,
                    d.len(),
                    mem,
                )))
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

impl Ramp {
    /// With the allocator down for 6 s after `killed` while the ramp goes on
    /// (about 100 MiB more), the agent wants more memory and has nobody to
    /// ask: QEMU stays within its last permit. The most QEMU had meanwhile.
    fn hold_while_down(&mut self, killed: Instant, mem_kill: u64, permit_bytes: u64) -> anyhow::Result<u64> {
        let mut mem_down_max = mem_kill;
        while killed.elapsed() < Duration::from_secs(6) {
            healthy(&mut self.vm, &mut self.n, &mut self.console)?;
            let (_, mem) = self.qmp.memory()?;
            mem_down_max = mem_down_max.max(mem);
            ensure!(
                mem <= permit_bytes,
                "QEMU grew to {} MiB with the allocator down; the agent's permit was {} MiB",
                mem / MIB,
                permit_bytes / MIB
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(mem_down_max)
    }

    /// From the restarted allocator's first answer on, its ledger never
    /// holds less than QEMU has (it is rebuilt from the agent's
    /// registration, not grown from nothing) and never passes the capacity.
    /// QEMU's memory when the VM was registered, and how many ledger reads.
    fn wait_registered(&mut self, ctx: &Ctx) -> anyhow::Result<(u64, usize)> {
        let left = self.left(ctx);
        let Ramp { vm, n, console, qmp, id, .. } = self;
        let mut polls = 0;
        let found = crate::harness::wait_for(
            "the agent to register the VM with the restarted allocator",
            left,
            || {
                healthy(vm, n, console)?;
                // QEMU first: the ledger read after it can only have grown
                // since (a permit comes before its plug), so a ledger below
                // it was not rebuilt from the registration.
                let (_, mem) = qmp.memory()?;
                let Some(l) = Ledger::read(n) else { return Ok(None) };
                polls += 1;
                l.within_capacity()?;
                let Some(res) = l.vms.get(id.as_str()).copied() else { return Ok(None) };
                ensure!(
                    res.1 >= mem,
                    "the restarted allocator holds {} MiB for a VM QEMU has {} MiB of",
                    res.1 / MIB,
                    mem / MIB
                );
                Ok(Some(mem))
            },
        )?;
        Ok((found, polls))
    }
}

/// The agent's side of the order: after the allocator's crash (its log was
/// `log_at_kill` bytes long then), no permit was granted before it
/// registered. (A request in flight at the crash fails: only granted ones
/// count.)
fn no_permit_before_registration(agent_log: &std::path::Path, log_at_kill: u64) -> anyhow::Result<()> {
    let log = fs::read_to_string(agent_log).unwrap_or_default();
    let after = log.get(usize::try_from(log_at_kill).unwrap_or(0)..).unwrap_or("");
    let registered =
        after.find("registered with the allocator").context("the agent never registered again")?;
    let granted = after
        .lines()
        .scan(0, |at, l| {
            let here = *at;
            *at += l.len() + 1;
            Some((here, l))
        })
        .find(|(_, l)| l.contains("action done") && l.contains("action=\"request_permit\""));
    if let Some((at, line)) = granted {
        ensure!(at > registered, "after the allocator's crash a permit came before the registration: {line}");
    }
    Ok(())
}

/// The agent's permit for the VM, as it knows it: (milli-vCPU, bytes).
fn agent_permitted(n: &Node, vm: &str) -> Option<(u64, u64)> {
    let p = n.agent_vm(vm)?.get("permitted")?.clone();
    Some((p.get("milli_cpu")?.as_u64()?, p.get("memory_bytes")?.as_u64()?))
}

/// Waits until the agent holds both links again.
fn wait_links(r: &mut Ramp, ctx: &Ctx, what: &str) -> anyhow::Result<()> {
    let left = r.left(ctx);
    let Ramp { vm, n, console, id, .. } = r;
    crate::harness::wait_for(what, left, || {
        healthy(vm, n, console)?;
        let Some(s) = n.agent_vm(id) else { return Ok(None) };
        let up = |k: &str| s.get(k).and_then(Value::as_bool) == Some(true);
        Ok((up("informant_connected") && up("allocator_connected")).then_some(()))
    })
}

/// Waits until the allocator's reservation for the VM is the agent's permit
/// (so not counted twice) and covers QEMU's memory; the ledger then.
fn wait_ledger_is_permit(r: &mut Ramp, what: &str) -> anyhow::Result<(Ledger, (u64, u64), u64)> {
    let Ramp { vm, n, console, qmp, id, .. } = r;
    crate::harness::wait_for(what, Duration::from_secs(15), || {
        healthy(vm, n, console)?;
        let (Some(l), Some(p)) = (Ledger::read(n), agent_permitted(n, id)) else { return Ok(None) };
        let (_, mem) = qmp.memory()?;
        let res = l.vms.get(id.as_str()).copied();
        Ok((res == Some(p) && l.sum() == p && p.1 >= mem).then_some((l, p, mem)))
    })
    .with_context(|| {
        format!(
            "ledger {:?}; agent's permit {:?}; QEMU {:?}",
            Ledger::read(n),
            agent_permitted(n, id),
            qmp.memory().ok()
        )
    })
}

pub(super) fn agent_restart(ctx: &Ctx) -> anyhow::Result<String> {
    let mut r = boot_and_ramp(ctx, "e2e-agent-restart")?;
    r.wait_dimms(ctx, 1, "the first DIMM of the ramp")?;
    std::thread::sleep(Duration::from_secs(1));
    let id = r.id.clone();
    r.n.agent.kill()?;
    let (dimms_kill, mem_kill) = r.qmp.memory()?;
    let res_kill =
        *Ledger::read(&r.n).context("no ledger")?.vms.get(&id).context("the VM is not in the ledger")?;
    // The ramp goes on without an agent; nothing may grow QEMU meanwhile.
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(2) {
        r.console.drain(&r.vm);
        let (_, mem) = r.qmp.memory()?;
        ensure!(mem == mem_kill, "QEMU's memory changed with no agent running");
        std::thread::sleep(Duration::from_millis(200));
    }
    r.n.agent.restart()?;
    let restarted = Instant::now();
    wait_links(&mut r, ctx, "the restarted agent to connect to both peers")?;
    let reconnect_s = restarted.elapsed().as_secs_f64();
    let started = log_lines(&r.n.agent.log, "VM loop started from QEMU's state");
    ensure!(started.len() == 2, "the agent's log shows {} VM loop starts, not 2", started.len());
    // Read back from QEMU, not from its memory (it has none): the new loop
    // starts from QEMU's size at the restart.
    let from_qemu = started[1].contains(&format!("memory_bytes: {mem_kill}"));
    ensure!(from_qemu, "the restarted agent did not start from QEMU's {mem_kill} bytes: {}", started[1]);
    // Registered once: the ledger holds the agent's permit, not that plus
    // the reservation from before the crash.
    let (ledger_back, permit_back, mem_back) =
        wait_ledger_is_permit(&mut r, "the ledger to hold the restarted agent's permit, once")?;
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
        "agent killed with {} MiB ({} DIMMs) in QEMU and {} MiB reserved, down 2 s, back on both links \
         {reconnect_s:.1} s after its restart, starting from QEMU's {} MiB; ledger then {} MiB = its permit \
         (QEMU {} MiB, one entry); the ramp to {TARGET_MIB} MiB went on to {} MiB ({dimms_end} DIMMs); ledger \
         {} mCPU / {} MiB = QEMU's, sum <= {} MiB usable; OOM kills: 0",
        mem_kill / MIB,
        dimms_kill.len(),
        res_kill.1 / MIB,
        mem_kill / MIB,
        permit_back.1 / MIB,
        mem_back / MIB,
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
    let log_at_kill = fs::metadata(&r.n.agent.log).map(|m| m.len()).unwrap_or(0);
    r.n.allocator.kill()?;
    let killed = Instant::now();
    let (dimms_kill, mem_kill) = r.qmp.memory()?;
    // No allocator can grant now: what the agent holds is all it may use.
    let permit_kill =
        crate::harness::wait_for("the agent to see the allocator gone", Duration::from_secs(15), || {
            healthy(&mut r.vm, &mut r.n, &mut r.console)?;
            let s = r.n.agent_vm(&id);
            let down = s.as_ref().and_then(|s| s.get("allocator_connected")?.as_bool()) == Some(false);
            Ok(if down { agent_permitted(&r.n, &id) } else { None })
        })?;
    let mem_down_max = r.hold_while_down(killed, mem_kill, permit_kill.1)?;
    r.n.allocator.restart()?;
    let restarted = Instant::now();
    let (mem_at_reg, polls) = r.wait_registered(ctx)?;
    let reg_s = restarted.elapsed().as_secs_f64();
    let opened = log_lines(&r.n.allocator.log, "session opened");
    ensure!(opened.len() >= 2, "the allocator's log shows {} sessions, not a second one", opened.len());
    no_permit_before_registration(&r.n.agent.log, log_at_kill)?;
    let (_, permit_back, _) = wait_ledger_is_permit(&mut r, "the new ledger to hold the agent's permit")?;
    let (ledger, dimms_end, mem_end) = r.finish(ctx)?;
    ensure!(
        dimms_end > dimms_kill.len(),
        "no DIMM plugged after the allocator came back ({} before, {dimms_end} after)",
        dimms_kill.len()
    );
    ensure!(r.console.oom_kills() == 0, "OOM kill in the guest");
    let s = ledger.sum();
    Ok(format!(
        "allocator killed with {} MiB ({} DIMMs) in QEMU and a {} MiB permit, down 6 s (QEMU at most {} MiB \
         meanwhile); VM registered again {reg_s:.1} s after the restart ({polls} ledger polls, never below \
         QEMU's {} MiB), permit {} MiB; the ramp to {TARGET_MIB} MiB went on to {} MiB ({dimms_end} DIMMs); \
         ledger {} mCPU / {} MiB = QEMU's, sum <= {} MiB usable; OOM kills: 0",
        mem_kill / MIB,
        dimms_kill.len(),
        permit_kill.1 / MIB,
        mem_down_max / MIB,
        mem_at_reg / MIB,
        permit_back.1 / MIB,
        mem_end / MIB,
        s.0,
        s.1 / MIB,
        ledger.usable.1 / MIB
    ))
}
