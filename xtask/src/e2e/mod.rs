//! `cargo xtask e2e <scenario>`: end-to-end scenarios with every part real:
//! the allocator and the agent (release binaries, gRPC on loopback), one
//! QEMU guest under TCG with the real informant inside (sysfs CPU mode,
//! 128 MiB DIMMs), and a memory workload in the guest (`cluster/ramp.pl`,
//! by the guest's own clock). `xtask/tests/e2e_*.rs` run them; each prints
//! "e2e <scenario> passed" and its figures.

use anyhow::{bail, ensure, Context};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cluster::qmp::Qmp;
use crate::cluster::{self, Node, NodePlan, Vm, VmPlan, MIB};
use crate::steps::Steps;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Scenario {
    /// A 32 MiB/s ramp to 1200 MiB in a 1 GiB guest: memory is plugged in
    /// time, no OOM kill while the node has room.
    MemoryRamp,
    /// The workload holds 650 MiB of a 1 GiB guest; the agent asks to
    /// shrink, the informant says no, the VM keeps its DIMMs.
    DeniedDownscale,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Seconds the scenario may take once the VM is booted (builds excluded).
    #[arg(long, default_value_t = 170)]
    pub timeout: u64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut steps = Steps::new(crate::guest::step_count(&Default::default()) + 2);
    let image = crate::guest::build(&Default::default(), &mut steps)?;
    cluster::build_daemons(&mut steps)?;
    let root = crate::workspace_root();
    let name = match a.scenario {
        Scenario::MemoryRamp => "memory-ramp",
        Scenario::DeniedDownscale => "denied-downscale",
    };
    // One directory per run: two test runs at once (two checkouts' worth of
    // `cargo test`, say) must not share sockets or logs.
    let dir = root.join("target/e2e").join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let ramp = dir.join("ramp.pl");
    fs::write(&ramp, cluster::RAMP_PL)?;
    let ramp_s = ramp.display().to_string();
    ensure!(!ramp_s.contains([',', ' ']), "the workspace path {ramp_s} holds a comma or space");
    let deadline = Duration::from_secs(a.timeout);
    let mut result = None;
    steps.call(&format!("scenario {name} (QEMU under TCG, real informant, allocator and agent)"), || {
        result = Some(match a.scenario {
            Scenario::MemoryRamp => memory_ramp(&root, &image, &dir, &ramp_s, deadline),
            Scenario::DeniedDownscale => denied_downscale(&root, &image, &dir, &ramp_s, deadline),
        });
        Ok(())
    })?;
    let summary = result.context("no result")?.with_context(|| format!("logs in {}", dir.display()))?;
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

/// What the guest's console said, as it arrived.
#[derive(Debug, Default)]
struct Console {
    lines: Vec<(Instant, String)>,
}

impl Console {
    fn drain(&mut self, vm: &Vm) {
        while let Ok(l) = vm.qemu.console.try_recv() {
            self.lines.push(l);
        }
    }
    fn oom_kills(&self) -> usize {
        self.lines.iter().filter(|(_, l)| l.contains("Killed process")).count()
    }
    fn has(&self, s: &str) -> bool {
        self.lines.iter().any(|(_, l)| l.contains(s))
    }
    /// The first `ramp: <what>` line's `key=` value.
    fn ramp_value(&self, what: &str, key: &str) -> Option<f64> {
        let prefix = format!("ramp: {what}");
        let line = self.lines.iter().find(|(_, l)| l.contains(&prefix))?;
        value(&line.1, key)
    }
}

/// `key=NUMBER` in a line.
fn value(line: &str, key: &str) -> Option<f64> {
    let pat = format!("{key}=");
    let rest = &line[line.find(&pat)? + pat.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Starts the node for the booted `vm`, waits for the agent to hold both
/// links.
fn start(
    root: &Path,
    mut vm: Vm,
    dir: &Path,
    plan: &VmPlan,
    node: &NodePlan,
    timeout: Duration,
) -> anyhow::Result<(Vm, Node)> {
    let mut n = Node::start(root, dir, node, &[&vm])?;
    let id = plan.id.clone();
    cluster::wait_for(
        "the agent to connect to the allocator and the informant in the guest",
        timeout,
        || {
            vm.check()?;
            n.check()?;
            let Some(s) = n.agent_vm(&id) else { return Ok(None) };
            let up = |k: &str| s.get(k).and_then(serde_json::Value::as_bool) == Some(true);
            Ok((up("informant_connected") && up("allocator_connected")).then_some(()))
        },
    )?;
    Ok((vm, n))
}

fn memory_ramp(
    root: &Path,
    image: &crate::guest::Image,
    dir: &Path,
    ramp: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let go = dir.join("go");
    let (boot_mib, target_mib) = (1024, 1200);
    let plan = plan("e2e-ramp", boot_mib, 0, format!("perl,{ramp},32,{target_mib},{}", go.display()));
    let node = NodePlan { capacity_milli_cpu: 4000, capacity_mib: 4096, policy: String::new() };
    let vm = Vm::boot(image, dir, &plan)?;
    let (mut vm, mut n) = start(root, vm, dir, &plan, &node, timeout)?;
    let booted = t0.elapsed();
    eprintln!("    agent connected {:.1} s after QEMU started; starting the ramp", booted.as_secs_f64());
    fs::write(&go, "go\n")?;
    let mut console = Console::default();
    cluster::wait_for("the ramp to reach its target", timeout.saturating_sub(t0.elapsed()), || {
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
    let reserved =
        cluster::wait_for("the allocator's ledger to hold the VM's size", Duration::from_secs(15), || {
            n.check()?;
            Ok(n.reserved(&plan.id).filter(|r| r.1 == total))
        })
        .with_context(|| {
            format!("QEMU has {} MiB; the ledger says {:?}", total / MIB, n.reserved(&plan.id))
        })?;
    let start_t = console.ramp_value("start", "t");
    let cross = console.ramp_value("cross90", "t");
    let grew = |after: f64| {
        console
            .lines
            .iter()
            .filter(|(_, l)| l.contains("ramp: grew"))
            .filter_map(|(_, l)| value(l, "t"))
            .find(|t| *t >= after)
    };
    let first_grew = start_t.and_then(grew);
    let relief = cross.and_then(|c| grew(c).map(|g| g - c));
    let fmt = |v: Option<f64>| v.map_or("n/a".into(), |s| format!("{:.0} ms", s * 1000.0));
    Ok(format!(
        "ramp 32 MiB/s to {target_mib} MiB in a {boot_mib} MiB guest: {} DIMMs of 128 MiB plugged ({} MiB), \
         ledger {} MiB; first memory online {} after the ramp started; use past 90%: {}; \
         90% -> memory online: {}; OOM kills: {}; boot to agent connected {:.1} s",
        dimms.len(),
        total / MIB,
        reserved.1 / MIB,
        fmt(first_grew.zip(start_t).map(|(g, s)| g - s)),
        if cross.is_some() { "yes" } else { "never" },
        fmt(relief),
        console.oom_kills(),
        booted.as_secs_f64()
    ))
}

fn denied_downscale(
    root: &Path,
    image: &crate::guest::Image,
    dir: &Path,
    ramp: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let hold_mib = 650;
    // 512 MiB and four DIMMs from boot: 1 GiB. The workload takes its memory
    // at once.
    let plan = plan("e2e-hold", 512, 4, format!("perl,{ramp},0,{hold_mib}"));
    // memory_target 0.95: the agent's goal (use / 0.95, about 6 CUs) sits
    // below the VM's 8 CUs, so it asks for 7; the informant keeps a 256 MiB
    // buffer on top of what is used (about 700 MiB), which 7 CUs can't hold.
    let policy = "memory_target = 0.95\ndownscale_after_ms = 3000\ndownscale_step_ms = 2000\n\
                  downscale_denied_cooldown_ms = 3000";
    let node = NodePlan { capacity_milli_cpu: 4000, capacity_mib: 4096, policy: policy.into() };
    // The agent starts once the workload holds its memory: before, use is
    // low and a downscale would rightly be approved.
    let mut vm = Vm::boot(image, dir, &plan)?;
    let mut console = Console::default();
    cluster::wait_for("the workload to take its memory", timeout, || {
        vm.check()?;
        console.drain(&vm);
        Ok(console.has("ramp: done").then_some(()))
    })?;
    let (mut vm, mut n) = start(root, vm, dir, &plan, &node, timeout.saturating_sub(t0.elapsed()))?;
    let check = |vm: &mut Vm, n: &mut Node, console: &mut Console| -> anyhow::Result<()> {
        vm.check()?;
        n.check()?;
        console.drain(vm);
        ensure!(console.oom_kills() == 0, "OOM kill in the guest; console {}", vm.console_log.display());
        ensure!(!console.has("workload exited"), "the workload exited; console {}", vm.console_log.display());
        Ok(())
    };
    let agent_log = n.agent.log.clone();
    let denials = || {
        fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("informant denied a downscale"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let first = {
        let (vm, n, console) = (&mut vm, &mut n, &mut console);
        cluster::wait_for(
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
    let (dimms_at_denial, total_at_denial) = qmp.memory()?;
    // The VM keeps it: several more asks (cooldown 3 s), no change.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(12) {
        check(&mut vm, &mut n, &mut console)?;
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
