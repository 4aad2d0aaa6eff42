//! `cargo xtask demo`: the project's main job as a newcomer meets it. It
//! builds what is missing (guest image, release binaries), starts the
//! allocator, the agent and two QEMU guests (TCG) with the real informant,
//! drives a memory ramp and then a CPU burst in one VM while the other
//! idles, and prints a live view every second. On exit (Ctrl-C or
//! `--duration`) it stops everything it started and writes a timeline to
//! `target/demo/timeline.svg`.

use anyhow::Context;
use std::fmt::Write as _;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{self, Node, NodePlan, Vm, VmPlan, MIB};
use crate::steps::Steps;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
}

/// The busy VM's workload: a memory ramp (32 MiB/s to 900 MiB, held), then
/// a CPU burst: two perl loops spinning for 20 s by the guest's clock. (It
/// was stress-ng, which aborts at once in the guest: its temporary files go
/// to the working directory, here the host's root shared read-only.)
const BUSY_SH: &str = "perl \"$1/ramp.pl\" 32 900 \"$1/go\" &\n\
                       while [ ! -e \"$1/go\" ]; do sleep 0.5; done\n\
                       sleep 35\n\
                       echo 'demo: CPU burst (2 busy loops, 20 s)'\n\
                       spin() { perl -e '$e = time + 20; while (time < $e) { $n++ for 1 .. 200000 }'; }\n\
                       spin & a=$!\n\
                       spin & b=$!\n\
                       wait $a $b\n\
                       echo 'demo: CPU burst over'\n\
                       wait\n";

/// One second of the live view, for the timeline.
#[derive(Debug, Clone, Default)]
struct Point {
    t: f64,
    memory_mib: [f64; 2],
    used_mib: f64,
    pressure: [u64; 2],
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut steps = Steps::new(crate::guest::step_count(&Default::default()) + 2);
    let image = crate::guest::build(&Default::default(), &mut steps)?;
    cluster::build_daemons(&mut steps)?;
    let root = crate::workspace_root();
    let dir = root.join("target/demo");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    fs::write(dir.join("ramp.pl"), cluster::RAMP_PL)?;
    fs::write(dir.join("busy.sh"), BUSY_SH)?;
    let d = dir.display().to_string();
    anyhow::ensure!(!d.contains([',', ' ']), "the workspace path {d} holds a comma or space");

    let stop = Arc::new(AtomicBool::new(false));
    watch_ctrl_c(stop.clone())?;
    let plan = |id: &str, workload: Option<String>| VmPlan {
        id: id.into(),
        cu_milli_cpu: 125,
        cu_mib: 128,
        min_cus: 8,
        max_cus: 16,
        boot_mib: 1024,
        boot_dimms: 0,
        cpus: 2,
        max_cpus: 2,
        workload,
    };
    let plans = [plan("busy", Some(format!("sh,{d}/busy.sh,{d}"))), plan("idle", None)];
    eprintln!("\n==> starting two VMs (TCG), the allocator and the agent; logs in {d}");
    let mut vms = Vec::new();
    for p in &plans {
        vms.push(Vm::boot(&image, &dir, p)?);
    }
    let node = NodePlan { capacity_milli_cpu: 8000, capacity_mib: 6144, policy: String::new() };
    let mut n = Node::start(&root, &dir, &node, &vms.iter().collect::<Vec<_>>())?;
    eprintln!(
        "    allocator: http://127.0.0.1:{}/state, agent: http://127.0.0.1:{}/state; Ctrl-C stops the demo",
        n.allocator_http, n.agent_http
    );
    let t0 = Instant::now();
    let mut points = Vec::new();
    let mut used_mib = 0.0;
    let mut go = false;
    let mut console = Vec::new();
    while !stop.load(Ordering::SeqCst) && a.duration.is_none_or(|s| t0.elapsed() < Duration::from_secs(s)) {
        std::thread::sleep(Duration::from_secs(1));
        // Ctrl-C in a terminal reaches the whole process group: QEMU, the
        // allocator and the agent stop on it too. That is the stop asked
        // for, not a failure to report.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        n.check()?;
        for vm in &mut vms {
            vm.check()?;
        }
        while let Ok((_, l)) = vms[0].qemu.console.try_recv() {
            if let Some(u) = l.split("used=").nth(1).and_then(|r| r.split_whitespace().next()) {
                used_mib = u.parse().unwrap_or(used_mib);
            }
            if l.starts_with("demo:") || l.contains("Killed process") {
                console.push(format!("{:5.1}s {l}", t0.elapsed().as_secs_f64()));
            }
        }
        let state = cluster::http_json(n.agent_http, "/state").ok();
        let vm_state = |id: &str| state.as_ref().and_then(|s| s.get("vms")?.get(id).cloned());
        if !go && plans.iter().all(|p| vm_state(&p.id).is_some_and(|v| v["informant_connected"] == true)) {
            fs::write(dir.join("go"), "go\n")?;
            go = true;
            console.push(format!("{:5.1}s demo: memory ramp started", t0.elapsed().as_secs_f64()));
        }
        let mut p = Point { t: t0.elapsed().as_secs_f64(), used_mib, ..Point::default() };
        let mut view = format!("\n--- {:.0} s ---\n", p.t);
        for (i, plan) in plans.iter().enumerate() {
            let Some(v) = vm_state(&plan.id) else {
                let _ = writeln!(view, "{:<5} (agent has no state yet)", plan.id);
                continue;
            };
            let cpu = v["current"]["milli_cpu"].as_u64().unwrap_or(0);
            let mem = v["current"]["memory_bytes"].as_u64().unwrap_or(0);
            p.memory_mib[i] = (mem / MIB) as f64;
            p.pressure[i] = v["pressure_events"].as_u64().unwrap_or(0);
            let use_s = if i == 0 { format!("{used_mib:.0} MiB") } else { "idle".into() };
            let _ = writeln!(
                view,
                "{:<5} vCPUs {:.2}  memory {:>5} MiB  use {:>9}  pressure events {:>4}  last {} ({} ms){}",
                plan.id,
                cpu as f64 / 1000.0,
                mem / MIB,
                use_s,
                p.pressure[i],
                v["last_action"].as_str().unwrap_or("-"),
                v["last_action_ms"].as_u64().map_or("-".into(), |m| m.to_string()),
                if v["informant_connected"] == true { "" } else { "  (informant not yet connected)" },
            );
        }
        for l in console.iter().rev().take(3).rev() {
            let _ = writeln!(view, "  {l}");
        }
        eprint!("{view}");
        points.push(p);
    }
    drop(n);
    drop(vms);
    let svg = dir.join("timeline.svg");
    fs::write(&svg, timeline(&points))?;
    let upscales = points.windows(2).filter(|w| w[1].memory_mib[0] > w[0].memory_mib[0]).count();
    println!(
        "demo stopped after {:.0} s; everything it started is stopped. {upscales} memory upscales of the busy VM; \
         timeline: {}",
        t0.elapsed().as_secs_f64(),
        svg.display()
    );
    Ok(())
}

/// Sets `stop` on the first SIGINT. The handler is installed before this
/// returns, on a thread of its own: the demo's loop is synchronous, and a
/// tokio task nobody drives would never install it (SIGINT would then kill
/// the demo before it could stop its VMs and write the timeline).
fn watch_ctrl_c(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("ctrl-c".into()).spawn(move || {
        rt.block_on(async {
            // `signal` installs the handler when called, not when awaited.
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
                Ok(mut sigint) => {
                    let _ = ready_tx.send(Ok(()));
                    if sigint.recv().await.is_some() {
                        eprintln!("\n==> Ctrl-C: stopping the VMs, the agent and the allocator");
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
    })?;
    ready_rx.recv().context("the Ctrl-C thread stopped")?.context("cannot install a SIGINT handler")
}

/// The busy VM's use against both VMs' allocation, pressure events marked.
fn timeline(points: &[Point]) -> String {
    let (w, h, pad) = (900.0, 400.0, 50.0);
    let t_max = points.last().map_or(1.0, |p| p.t).max(1.0);
    let m_max =
        points.iter().flat_map(|p| [p.memory_mib[0], p.memory_mib[1], p.used_mib]).fold(1.0, f64::max) * 1.1;
    let x = |t: f64| pad + t / t_max * (w - 2.0 * pad);
    let y = |m: f64| h - pad - m / m_max * (h - 2.0 * pad);
    let line = |f: &dyn Fn(&Point) -> f64, color: &str| {
        let pts: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", x(p.t), y(f(p)))).collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        )
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\">vmscale demo: memory (MiB) over time (s); red ticks: pressure events (busy VM)</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"5\" y=\"{}\">{m_max:.0}</text><text x=\"{}\" y=\"{}\">{t_max:.0} s</text>\n",
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        pad + 4.0,
        w - pad - 20.0,
        h - pad + 16.0
    );
    s.push_str(&line(&|p| p.memory_mib[0], "#1f77b4"));
    s.push_str(&line(&|p| p.used_mib, "#ff7f0e"));
    s.push_str(&line(&|p| p.memory_mib[1], "#2ca02c"));
    for w2 in points.windows(2) {
        if w2[1].pressure[0] > w2[0].pressure[0] {
            let px = x(w2[1].t);
            let _ = writeln!(
                s,
                "<line x1=\"{px:.1}\" y1=\"{}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"red\"/>",
                h - pad,
                h - pad - 12.0
            );
        }
    }
    let legend = [("#1f77b4", "busy: allocated"), ("#ff7f0e", "busy: used"), ("#2ca02c", "idle: allocated")];
    for (i, (c, l)) in legend.iter().enumerate() {
        let ly = 40.0 + 16.0 * i as f64;
        let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\" fill=\"{c}\">{l}</text>", w - 200.0);
    }
    s.push_str("</svg>\n");
    s
}
