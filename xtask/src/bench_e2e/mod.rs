//! `cargo xtask bench e2e`: how soon memory arrives when a workload needs it,
//! event-driven against a polling-only agent like Neon's autoscaler, with
//! every part real: the release allocator and agent, QEMU under TCG, the
//! informant in the guest, and a memory ramp (`cluster/ramp.pl`) timing
//! itself by the guest's clock.
//!
//! Each run is a fresh 512 MiB guest (CUs of 128 MiB, up to 16) whose
//! workload ramps to 1024 MiB at a stated rate, under one of two policies:
//! as shipped (memory target 0.75: memory is meant to come before use
//! reaches 90%) and at Neon's watermark (target 0.9: every plug follows a
//! crossing of 90%, so each one is a relief sample). Before the ramp the bench
//! plugs and unplugs DIMMs itself over a second QMP monitor (the agent is
//! not started yet) and times each until the guest's MemTotal grows: the
//! hotplug floor, measured inside every run. Then the node starts and the
//! ramp runs; each time use passes 90% of MemTotal the time until new memory
//! is online is one relief sample. Runs alternate event-driven and polling
//! at each step so the machine's noise hits both; rates rise until the
//! event-driven agent sees an OOM kill or the workload can go no faster.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmscale_agent::core::policy::Policy;
use vmscale_agent::core::polling::Polling;
use vmscale_agent::core::pressure::{PressureKind, PressureKinds};

use crate::cluster::qmp::Qmp;
use crate::cluster::{self, Node, NodePlan, Vm, VmPlan, MIB};
use crate::console::{value, Console};
use crate::harness::{loadavg, now_utc};
use crate::steps::Steps;

mod report;
mod split;

const BOOT_MIB: u64 = 512;
const CU_MIB: u64 = 128;
const MAX_CUS: u32 = 16;
const TARGET_MIB: u64 = 1024;
/// Raw DIMM plugs timed per run, before its ramp.
const FLOOR_PLUGS: usize = 2;
/// Relief must come within this multiple of the hotplug floor (p50).
const RELIEF_TARGET_X: f64 = 1.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Events,
    /// Event-driven, acting on memory signals only: CPU pressure (which
    /// under TCG alone grows the VM by whole CUs, memory included) counted,
    /// not acted on. Shows how fast the memory signals themselves are.
    MemoryEvents,
    /// Event-driven, the informant's usage watermark sent when use reaches
    /// the line, not ahead of it (`--watermark-lead-ms 0`): how fast the
    /// reaction itself is, every plug after a crossing.
    NoLead,
    Polling,
}

const MODES: [Mode; 4] = [Mode::Events, Mode::NoLead, Mode::MemoryEvents, Mode::Polling];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Events => "event-driven",
            Mode::MemoryEvents => "memory events only",
            Mode::NoLead => "event-driven, no lead",
            Mode::Polling => "polling",
        }
    }

    /// The agent's policy at `target`: the defaults, plus polling for the
    /// comparison (Neon: 100 ms samples, 500 ms average, agent loop 5 s).
    fn policy(self, target: Target) -> Policy {
        let base = Policy { memory_target: target.value(), ..Policy::default() };
        match self {
            Mode::Events | Mode::NoLead => base,
            Mode::MemoryEvents => {
                Policy { ignore_pressure: PressureKinds::of(&[PressureKind::PsiCpu]), ..base }
            }
            Mode::Polling => Policy {
                polling: Some(Box::new(Polling { loop_interval_ms: 5000, sample_average_ms: 500 })),
                ..base
            },
        }
    }

    /// The informant's flags beyond the cluster's: the event-driven guest
    /// runs the informant as shipped (a sample a second besides its
    /// events); the polling one samples every 100 ms, as Neon's monitor.
    fn informant_args(self) -> &'static [&'static str] {
        match self {
            Mode::Events | Mode::MemoryEvents => &[],
            Mode::NoLead => &["--watermark-lead-ms", "0"],
            Mode::Polling => &["--sample-interval-ms", "100"],
        }
    }
}

/// The agent's memory target (`policy.memory_target`) in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// 0.75, the default.
    Shipped,
    /// 0.9, Neon's watermark.
    Watermark,
}

impl Target {
    fn value(self) -> f64 {
        match self {
            Target::Shipped => 0.75,
            Target::Watermark => 0.9,
        }
    }
}

/// One point of the comparison: both modes run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    target: Target,
    /// MiB/s asked of the ramp; 0: as fast as the workers can.
    rate: u64,
    /// Processes filling memory at once (one perl under TCG tops out near
    /// 90 MiB/s).
    workers: u32,
}

impl Step {
    fn rate_name(self) -> String {
        match (self.rate, self.workers) {
            (0, 1) => "unlimited, 1 process".into(),
            (0, w) => format!("unlimited, {w} processes"),
            (r, _) => format!("{r} MiB/s"),
        }
    }
    fn name(self) -> String {
        format!("target {}, {}", self.target.value(), self.rate_name())
    }
}

/// What one run (one guest, one mode, one step) gave.
#[derive(Debug)]
struct Run {
    mode: Mode,
    step: Step,
    /// What the ramp reached, MiB/s (held over its duration, by the guest's clock).
    achieved: Option<f64>,
    completed: bool,
    oom_kills: usize,
    victims: Vec<String>,
    crossings: usize,
    /// The informant's `usage_watermark` events sent ahead of the line
    /// (projected) and at it.
    watermark_ahead: usize,
    watermark_at_line: usize,
    relief_ms: Vec<f64>,
    /// Where each relief sample's time went, as far as the agent's log tells.
    split: Vec<split::Split>,
    floor_ms: Vec<f64>,
    dimms: usize,
    pressure_events: u64,
    /// Pressure events by kind, as the agent counted them.
    pressure_kinds: Vec<(String, u64)>,
}

/// Each 90% crossing paired with the first growth after it (guest clock,
/// s); and how many crossings there were.
fn relief_pairs(c: &Console) -> (usize, Vec<(f64, f64)>) {
    let grew: Vec<f64> = c.ramp("grew").filter_map(|(_, l)| value(l, "t")).collect();
    let crosses: Vec<f64> = c.ramp("cross90").filter_map(|(_, l)| value(l, "t")).collect();
    let out = crosses.iter().filter_map(|x| grew.iter().find(|g| **g >= *x).map(|g| (*x, *g))).collect();
    (crosses.len(), out)
}

/// The relief samples, ms; and how many crossings there were.
fn relief(c: &Console) -> (usize, Vec<f64>) {
    let (n, pairs) = relief_pairs(c);
    (n, pairs.iter().map(|(x, g)| (g - x) * 1000.0).collect())
}

/// Nearest-rank percentile of `v` (sorted here); `None` when empty.
fn pct(v: &[f64], p: f64) -> Option<f64> {
    vmscale_common::stats::quantile(&mut v.to_vec(), p / 100.0)
}

/// Per target, the steps in the order they run, and runs per mode and step.
fn ladders(quick: bool) -> (Vec<Vec<Step>>, usize) {
    // Per target, rates rise until the event-driven agent sees an OOM kill;
    // "unlimited" is as fast as the workers fill memory. Full: two runs per
    // mode and step; quick: one, and fewer rates.
    // At 0.9 a slow ramp too: fast ones raise CPU pressure (TCG), which
    // grows the VM by whole CUs, memory included, before use nears 90%.
    // (MiB/s, processes) per target.
    type Rates = &'static [(u64, u32)];
    let (shipped, watermark, reps): (Rates, Rates, usize) =
        if quick { (&[], &[(16, 1), (0, 2)], 1) } else { (&[(0, 2)], &[(16, 1), (0, 2)], 2) };
    let plan = [(Target::Shipped, shipped), (Target::Watermark, watermark)]
        .into_iter()
        .map(|(target, rates)| rates.iter().map(|&(rate, workers)| Step { target, rate, workers }).collect())
        .collect();
    (plan, reps)
}

/// Where the runs happen: the workspace, the guest image, the bench's
/// directory, the ramp's path as the guest sees it.
struct Place<'a> {
    root: &'a Path,
    image: &'a crate::guest::Image,
    dir: &'a Path,
    ramp: &'a str,
}

/// One target's steps: `reps` runs of every mode at each, until the
/// event-driven agent sees an OOM kill.
fn climb(place: &Place<'_>, ladder: &[Step], reps: usize, runs: &mut Vec<Run>) -> anyhow::Result<()> {
    for &step in ladder {
        for _ in 0..reps {
            for mode in MODES {
                let n = runs.len();
                let r = one_run(place.root, place.image, place.dir, n, mode, step, place.ramp).with_context(
                    || format!("run {n} ({}, {}); logs in {}", mode.name(), step.name(), place.dir.display()),
                )?;
                eprintln!("    {}", describe(&r));
                runs.push(r);
            }
        }
        if runs.iter().any(|r| r.mode == Mode::Events && r.step == step && r.oom_kills > 0) {
            eprintln!("    the event-driven agent saw an OOM kill at {}: no faster rate", step.name());
            break;
        }
    }
    Ok(())
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let (plan, reps) = ladders(quick);
    let mut steps = Steps::new(crate::guest::step_count(&Default::default()) + 3);
    let image = crate::guest::build(&Default::default(), &mut steps)?;
    cluster::build_daemons(&mut steps)?;
    let root = crate::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let dir = target.join("bench").join(format!("e2e-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let ramp = dir.join("ramp.pl");
    fs::write(&ramp, cluster::RAMP_PL)?;
    let ramp_s = ramp.display().to_string();
    anyhow::ensure!(!ramp_s.contains([',', ' ']), "the path {ramp_s} holds a comma or space");

    let load_before = loadavg();
    let started = Instant::now();
    let date = now_utc();
    let mut runs: Vec<Run> = Vec::new();
    steps.call(
        &format!(
            "ramps to {TARGET_MIB} MiB in a {BOOT_MIB} MiB guest at {}; \
             {reps} run(s) per mode and step, alternating (about {} minutes)",
            plan.iter().flatten().map(|s| s.name()).collect::<Vec<_>>().join("; "),
            if quick { 7 } else { 19 }
        ),
        || {
            let place = Place { root: &root, image: &image, dir: &dir, ramp: &ramp_s };
            plan.iter().try_for_each(|ladder| climb(&place, ladder, reps, &mut runs))
        },
    )?;
    let load_after = loadavg();
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let session =
        report::Session { quick, date: &date, load_before: &load_before, load_after: &load_after, minutes };
    let (v, md) = report::summarize(&runs, &session);
    let json_path = target.join("bench/e2e.json");
    fs::write(&json_path, serde_json::to_string_pretty(&v)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    println!("{md}");
    eprintln!("    figures in {}; logs in {}", json_path.display(), dir.display());
    let bench_md = root.join("BENCHMARKS.md");
    steps.call("record the figures in BENCHMARKS.md", || crate::bench::record(&bench_md, "e2e", &md))
}

fn describe(r: &Run) -> String {
    let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.0}"));
    format!(
        "{} at {}: reached {} MiB/s, {}; {} crossings of 90%, relief p50 {} ms max {} ms; watermark events {} ahead, {} at the line; floor {:?} ms; \
         {} DIMMs; {} pressure events {:?}; OOM kills {}{}",
        r.mode.name(),
        r.step.name(),
        f(r.achieved),
        if r.completed { "ramp done" } else { "ramp not done" },
        r.crossings,
        f(pct(&r.relief_ms, 50.0)),
        f(pct(&r.relief_ms, 100.0)),
        r.watermark_ahead,
        r.watermark_at_line,
        r.floor_ms.iter().map(|x| x.round()).collect::<Vec<_>>(),
        r.dimms,
        r.pressure_events,
        r.pressure_kinds,
        r.oom_kills,
        if r.victims.is_empty() { String::new() } else { format!(" ({})", r.victims.join(", ")) }
    )
}

/// One guest: boot, time raw DIMM plugs, start the node in `mode`, ramp.
fn one_run(
    root: &Path,
    image: &crate::guest::Image,
    dir: &Path,
    n: usize,
    mode: Mode,
    step: Step,
    ramp: &str,
) -> anyhow::Result<Run> {
    let run_dir = dir.join(format!(
        "{n:02}-{}-{}-{}x{}",
        // A path QEMU takes in its options: no commas.
        mode.name().replace([' ', ','], "-").replace("--", "-"),
        step.target.value(),
        step.rate,
        step.workers
    ));
    fs::create_dir_all(&run_dir)?;
    let go = run_dir.join("go");
    let plan = VmPlan {
        id: "bench".into(),
        cu_milli_cpu: 125,
        cu_mib: CU_MIB,
        min_cus: u32::try_from(BOOT_MIB / CU_MIB)?,
        max_cus: MAX_CUS,
        boot_mib: BOOT_MIB,
        boot_dimms: 0,
        // Sysfs CPU mode needs every vCPU present from boot (see e2e.rs).
        cpus: 2,
        max_cpus: 2,
        workload: Some(format!("perl,{ramp},{},{TARGET_MIB},{},{}", step.rate, go.display(), step.workers)),
    };
    let mut vm = Vm::boot_with(image, &run_dir, &plan, mode.informant_args())?;
    let mut console = Console::default();
    crate::harness::wait_for("the guest's workload to start", Duration::from_secs(180), || {
        vm.check()?;
        console.drain(&vm);
        Ok((console.ramp_count("ready") > 0).then_some(()))
    })?;
    let floor_ms = floor(&mut vm, &mut console)?;
    let mut node = start_node(root, &run_dir, mode, step, &mut vm)?;
    // The polling agent ticks every 5 s from when its loop started; the ramp
    // starts after its first tick, at a phase spread over the interval from
    // run to run (1.7 s apart), as a workload's start would fall anywhere.
    if mode == Mode::Polling {
        let phase = u64::try_from(n).unwrap_or(0) * 1700 % 5000;
        std::thread::sleep(Duration::from_millis(5000 + phase));
    }
    fs::write(&go, "go\n")?;
    ramp_until_settled(&mut vm, &mut node, &mut console, step)?;
    figures(mode, step, &vm, &node, &console, floor_ms)
}

/// The node for the booted `vm` in `mode` at `step`'s memory target, once
/// the agent holds the allocator and the informant.
fn start_node(root: &Path, run_dir: &Path, mode: Mode, step: Step, vm: &mut Vm) -> anyhow::Result<Node> {
    let node_plan =
        NodePlan { capacity_milli_cpu: 4000, capacity_mib: 4096, policy: mode.policy(step.target) };
    let mut node = Node::start(root, run_dir, &node_plan, &[&*vm])?;
    let id = vm.plan.id.clone();
    crate::harness::wait_for(
        "the agent to hold the allocator and the informant",
        Duration::from_secs(120),
        || {
            vm.check()?;
            node.check()?;
            let Some(s) = node.agent_vm(&id) else { return Ok(None) };
            let up = |k: &str| s.get(k).and_then(Value::as_bool) == Some(true);
            Ok((up("informant_connected") && up("allocator_connected")).then_some(()))
        },
    )?;
    Ok(node)
}

/// Until the ramp is done (or the workload gone) and every crossing has
/// its relief, or a few seconds after.
fn ramp_until_settled(vm: &mut Vm, node: &mut Node, console: &mut Console, step: Step) -> anyhow::Result<()> {
    // Long enough for the slowest rate, plus the polling agent's last tick.
    let budget = Duration::from_secs(TARGET_MIB.checked_div(step.rate).map_or(60, |s| s + 40));
    let t0 = Instant::now();
    let mut done_at: Option<Instant> = None;
    loop {
        vm.check()?;
        node.check()?;
        console.drain(vm);
        let oom = !console.oom_victims().is_empty();
        if done_at.is_none() && (console.ramp_count("done") > 0 || oom || console.has("workload exited")) {
            done_at = Some(Instant::now());
        }
        if let Some(d) = done_at {
            // A crossing still waiting for memory gets until the polling
            // agent's next tick and its plug; once everything is paired (or
            // the workload is gone), a moment for lines in flight.
            let (crosses, relieved) = relief(console);
            let settled = crosses == relieved.len() || oom || console.has("workload exited");
            if (settled && d.elapsed() > Duration::from_secs(2)) || d.elapsed() > Duration::from_secs(8) {
                return Ok(());
            }
        } else if t0.elapsed() > budget {
            bail!("the ramp did not finish in {} s; console {}", budget.as_secs(), vm.console_log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the run gave, from the console, the agent's log and state, and QEMU.
fn figures(
    mode: Mode,
    step: Step,
    vm: &Vm,
    node: &Node,
    console: &Console,
    floor_ms: Vec<f64>,
) -> anyhow::Result<Run> {
    let (crossings, pairs) = relief_pairs(console);
    let relief_ms: Vec<f64> = pairs.iter().map(|(x, g)| (g - x) * 1000.0).collect();
    let split = split::splits(&fs::read_to_string(&node.agent.log).unwrap_or_default(), &pairs);
    let start_t = console.ramp("start").find_map(|(_, l)| value(l, "t"));
    let done = console.ramp("done").find_map(|(_, l)| Some((value(l, "t")?, value(l, "held")?)));
    let achieved = start_t.zip(done).map(|(s, (t, held))| held / (t - s).max(1e-3));
    let mut qmp = Qmp::connect(&vm.watch_qmp)?;
    let (dimms, _) = qmp.memory()?;
    let state = node.agent_vm(&vm.plan.id).unwrap_or_default();
    let pressure_events = state.get("pressure_events").and_then(Value::as_u64).unwrap_or(0);
    let pressure_kinds = state
        .get("pressure_kinds")
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.trim_start_matches("KIND_").to_lowercase(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let victims = console.oom_victims();
    let (watermark_ahead, watermark_at_line) = console.watermark_events();
    Ok(Run {
        mode,
        step,
        achieved,
        completed: done.is_some(),
        oom_kills: victims.len(),
        victims,
        crossings,
        watermark_ahead,
        watermark_at_line,
        relief_ms,
        split,
        floor_ms,
        dimms: dimms.len(),
        pressure_events,
        pressure_kinds,
    })
}

/// Plugs and unplugs `FLOOR_PLUGS` DIMMs of one CU over the watching QMP
/// monitor, timing each from `object-add` to the guest's "grew" line (its
/// MemTotal went up) reaching the host: QMP, ACPI, the kernel onlining the
/// block (online_movable), the ramp's 5 ms poll and the serial console.
fn floor(vm: &mut Vm, console: &mut Console) -> anyhow::Result<Vec<f64>> {
    let mut qmp = Qmp::connect(&vm.watch_qmp)?;
    let mut out = Vec::new();
    for k in 0..FLOOR_PLUGS {
        let (dev, mem) = (format!("floor-dimm{k}"), format!("floor-dimm{k}-mem"));
        console.drain(vm);
        let (grew0, shrank0) = (console.ramp_count("grew"), console.ramp_count("shrank"));
        let t = Instant::now();
        qmp.execute(
            "object-add",
            json!({"qom-type": "memory-backend-ram", "id": mem, "size": CU_MIB * MIB}),
        )?;
        qmp.execute("device_add", json!({"driver": "pc-dimm", "id": dev, "memdev": mem}))?;
        let seen =
            crate::harness::wait_for("the guest to online a plugged DIMM", Duration::from_secs(20), || {
                vm.check()?;
                console.drain(vm);
                Ok(console.ramp("grew").nth(grew0).map(|(at, _)| *at))
            })?;
        out.push(seen.duration_since(t).as_secs_f64() * 1000.0);
        // Out again before the agent starts: it must find the VM at its boot size.
        qmp.execute("device_del", json!({ "id": dev }))?;
        crate::harness::wait_for("the guest to release the DIMM", Duration::from_secs(20), || {
            vm.check()?;
            console.drain(vm);
            let (ids, _) = qmp.memory()?;
            Ok((!ids.contains(&dev) && console.ramp_count("shrank") > shrank0).then_some(()))
        })?;
        qmp.execute("object-del", json!({ "id": mem }))?;
    }
    Ok(out)
}
