//! A node without room: the allocator denies, the VM stays as it is.

use anyhow::{ensure, Context};
use std::fs;
use std::time::{Duration, Instant};

use super::{agent_ops, plan, start, Console, Ctx, Ledger};
use crate::cluster::qmp::Qmp;
use crate::cluster::{Node, NodePlan, Vm, MIB};
use vmscale_agent::core::policy::Policy;

/// What the scenario watches while the workload outgrows the VM: QEMU's
/// size never changes and the ledger never passes the capacity.
struct Watch {
    /// QEMU's memory at boot.
    mem0: u64,
    /// The agent's asks before the ramp.
    asks0: u64,
    /// When the agent first asked the allocator for more.
    first_ask: Option<Instant>,
    /// The most unmet demand the allocator recorded: (milli-vCPU, bytes).
    unmet_seen: (u64, u64),
}

impl Watch {
    /// The agent asked at a bounded rate since its first ask, plugged
    /// nothing, and the allocator recorded unmet demand: (asks, seconds
    /// since the first, bound).
    fn asks_bounded(&self, n: &Node, cooldown_ms: u64) -> anyhow::Result<(u64, f64, u64)> {
        let first =
            self.first_ask.context("the agent never asked the allocator for more, yet the guest ran out")?;
        let asks = agent_ops(n, "request_permit") - self.asks0;
        let window = first.elapsed().as_secs_f64();
        // A denial holds off the next ask for the cooldown (less up to a quarter
        // of jitter); pressure that raises the goal may ask once more at once.
        let pressure_asks = 6;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a count of cooldowns, >= 0
        let cooldowns = (window / (cooldown_ms as f64 * 0.75 / 1000.0)).ceil() as u64;
        let bound = cooldowns + 1 + pressure_asks;
        ensure!(asks <= bound, "the agent asked {asks} times in {window:.0} s: a loop (bound {bound})");
        ensure!(agent_ops(n, "plug") == 0, "the agent plugged without a permit");
        ensure!(
            self.unmet_seen.1 > 0,
            "the allocator never recorded unmet memory demand, so it never denied"
        );
        Ok((asks, window, bound))
    }

    fn check(
        &mut self,
        console: &mut Console,
        vm: &mut Vm,
        n: &mut Node,
        qmp: &mut Qmp,
    ) -> anyhow::Result<()> {
        vm.check()?;
        n.check()?;
        console.drain(vm);
        let (dimms, mem) = qmp.memory()?;
        ensure!(
            dimms.is_empty() && mem == self.mem0,
            "QEMU's memory changed on a node without room: {} -> {} MiB ({dimms:?})",
            self.mem0 / MIB,
            mem / MIB
        );
        if let Some(l) = Ledger::read(n) {
            l.within_capacity()?;
            self.unmet_seen.0 = self.unmet_seen.0.max(l.unmet.0);
            self.unmet_seen.1 = self.unmet_seen.1.max(l.unmet.1);
        }
        if self.first_ask.is_none() && agent_ops(n, "request_permit") > self.asks0 {
            self.first_ask = Some(Instant::now());
        }
        Ok(())
    }
}

pub(super) fn no_room(ctx: &Ctx) -> anyhow::Result<String> {
    let timeout = ctx.timeout;
    let t0 = Instant::now();
    let go = ctx.dir.join("go");
    // 512 MiB (the guest sees about 390) and a ramp to 600 MiB: the workload
    // must outgrow the VM. The node's capacity is exactly the VM's size (two
    // vCPUs, 512 MiB), so every increase is denied.
    let target_mib = 600;
    let plan = plan("e2e-full", 512, 0, format!("perl,{},32,{target_mib},{}", ctx.ramp, go.display()));
    let cooldown_ms = 2000;
    let policy = Policy { denied_cooldown_ms: cooldown_ms, ..Policy::default() };
    let node = NodePlan { capacity_milli_cpu: 2000, capacity_mib: 512, policy };
    let vm = Vm::boot(&ctx.image, &ctx.dir, &plan)?;
    let mut console = Console::default();
    let (mut vm, mut n) = start(ctx, vm, &mut console, &node, timeout)?;
    let id = plan.id.clone();
    let mut qmp = Qmp::connect(&vm.watch_qmp)?;
    let (dimms0, mem0) = qmp.memory()?;
    ensure!(dimms0.is_empty() && mem0 == 512 * MIB, "the VM booted with {} MiB ({dimms0:?})", mem0 / MIB);
    let ledger0 = Ledger::read(&n).context("the allocator has no ledger for the node")?;
    ledger0.within_capacity()?;
    let asks0 = agent_ops(&n, "request_permit");
    fs::write(&go, "go\n")?;

    // Until the workload is killed or gives up, and 20 s after: QEMU's size
    // never changes and the ledger never passes the capacity.
    let mut watch = Watch { mem0, asks0, first_ask: None, unmet_seen: (0, 0) };
    let left = || timeout.saturating_sub(t0.elapsed());
    crate::harness::wait_for("the workload to outgrow the VM (an OOM kill or its end)", left(), || {
        watch.check(&mut console, &mut vm, &mut n, &mut qmp)?;
        Ok((console.oom_kills() > 0 || console.has("workload exited")).then_some(()))
    })?;
    let constrained = Instant::now();
    while constrained.elapsed() < Duration::from_secs(20) {
        watch.check(&mut console, &mut vm, &mut n, &mut qmp)?;
        std::thread::sleep(Duration::from_millis(250));
    }
    let unmet_seen = watch.unmet_seen;
    let (asks, window, bound) = watch.asks_bounded(&n, cooldown_ms)?;
    let ledger = Ledger::read(&n).context("no ledger at the end")?;
    ledger.within_capacity()?;
    let reserved = *ledger.vms.get(&id).context("the VM left the ledger")?;
    ensure!(reserved.1 == mem0, "the ledger holds {} MiB for a VM of {} MiB", reserved.1 / MIB, mem0 / MIB);
    // The guest had to run out: this is where the OOM watch proves it sees kills.
    ensure!(
        console.oom_kills() > 0,
        "a {target_mib} MiB workload in a 512 MiB guest without room, yet no OOM kill was seen: \
         the OOM watch is blind; console {}",
        vm.console_log.display()
    );
    let s = ledger.sum();
    Ok(format!(
        "node {} mCPU / {} MiB, VM {} MiB, ramp to {target_mib} MiB: {asks} asks in {window:.0} s (bound {bound}), \
         all denied (unmet up to {} MiB), 0 plugs; QEMU stayed at {} MiB; ledger {} mCPU / {} MiB <= capacity; \
         the workload was OOM-killed {} time(s), as it must be",
        ledger.usable.0,
        ledger.usable.1 / MIB,
        mem0 / MIB,
        unmet_seen.1 / MIB,
        mem0 / MIB,
        s.0,
        s.1 / MIB,
        console.oom_kills()
    ))
}
