//! `cargo xtask demo`: the project's main job as a newcomer meets it. It
//! builds what is missing (guest image, release binaries), starts the
//! allocator, the agents and two QEMU guests (TCG) with the real informant,
//! drives a memory ramp and then a CPU burst in one VM while the other
//! idles, and prints a live view every second. On exit (Ctrl-C or
//! `--duration`) it stops everything it started and writes a timeline to
//! `target/demo/timeline.svg`.
//!
//! Where network namespaces can be made (root), there are two nodes, an
//! agent in each (see `cluster::net`): the busy VM's growth takes node a
//! past its watermark and the allocator has the idle VM moved live to node
//! b; the view shows the nodes' ledgers, the move and the orders, and the
//! timeline marks them. Elsewhere one node runs both VMs, without
//! migration, and the demo says why.

use anyhow::Context;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{self, net, Node, NodePlan, Vm, VmPlan, MIB};
use crate::echo::EchoClient;
use crate::migration::{self, GuestVm, Shape, TAP};
use crate::netns::Fabric;
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

/// Where the demo runs.
enum Setup {
    /// One node: allocator and agent on loopback (no namespaces here).
    Single { node: Node, idle: Vm },
    /// Two nodes as network namespaces, an agent in each; the idle VM is a
    /// tap-networked guest on node a that can be moved live.
    TwoNodes {
        allocator: net::Allocator,
        agents: Vec<net::Agent>,
        /// The idle VM's first QEMU; it quits once the VM moved.
        _idle: GuestVm,
        /// The idle VM's echo server, for a client that shows its TCP
        /// connection survives the move.
        echo: SocketAddr,
        /// Dropped last: its namespaces end whatever still runs in them.
        _fabric: Fabric,
    },
}

impl Setup {
    fn check(&mut self) -> anyhow::Result<()> {
        match self {
            Setup::Single { node, idle } => {
                node.check()?;
                idle.check()
            }
            Setup::TwoNodes { allocator, agents, .. } => {
                allocator.daemon.check()?;
                agents.iter_mut().try_for_each(|a| a.daemon.check())
            }
        }
    }

    /// Every agent's VMs: id -> (node, its `/state` entry).
    fn vms(&self) -> BTreeMap<String, (String, serde_json::Value)> {
        let mut out = BTreeMap::new();
        let mut add = |node: &str, s: Option<serde_json::Value>| {
            for (id, v) in s.as_ref().and_then(|s| s["vms"].as_object()).into_iter().flatten() {
                out.insert(id.clone(), (node.to_owned(), v.clone()));
            }
        };
        match self {
            Setup::Single { node, .. } => {
                add(cluster::NODE, cluster::http_json(node.agent_http, "/state").ok())
            }
            Setup::TwoNodes { agents, .. } => agents.iter().for_each(|a| add(&a.name, a.state())),
        }
        out
    }

    fn allocator_state(&self) -> Option<serde_json::Value> {
        match self {
            Setup::Single { node, .. } => cluster::http_json(node.allocator_http, "/state").ok(),
            Setup::TwoNodes { allocator, .. } => allocator.state(),
        }
    }
}

/// A VM plan of the demo: CUs of 1/8 vCPU and 128 MiB, 1 GiB from boot.
fn plan(id: &str, max_cus: u32, workload: Option<String>) -> VmPlan {
    VmPlan {
        id: id.into(),
        cu_milli_cpu: 125,
        cu_mib: 128,
        min_cus: 8,
        max_cus,
        boot_mib: 1024,
        boot_dimms: 0,
        cpus: 2,
        max_cpus: 2,
        workload,
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut steps = Steps::new(crate::guest::step_count(&Default::default()) + 2);
    let image = crate::guest::build(&Default::default(), &mut steps)?;
    cluster::build_daemons(&mut steps)?;
    let root = crate::workspace_root();
    let dir = root.join("target/demo");
    // An earlier demo killed hard may have left agents' QEMUs behind.
    net::kill_qemus_under(&dir);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    fs::write(dir.join("ramp.pl"), cluster::RAMP_PL)?;
    fs::write(dir.join("busy.sh"), BUSY_SH)?;
    let d = dir.display().to_string();
    anyhow::ensure!(!d.contains([',', ' ']), "the workspace path {d} holds a comma or space");

    let stop = Arc::new(AtomicBool::new(false));
    watch_ctrl_c(stop.clone())?;
    let busy_plan = plan("busy", 16, Some(format!("sh,{d}/busy.sh,{d}")));
    let r = match crate::netns::can_run() {
        Ok(()) => {
            eprintln!(
                "\n==> two nodes as network namespaces, an agent in each; VMs (TCG) busy and idle on {A}; \
                 logs in {d}"
            );
            let busy = Vm::boot(&image, &dir, &busy_plan)?;
            let setup = two_nodes(&root, &dir, &image, &busy)?;
            show(&a, &dir, stop, busy, setup)
        }
        Err(why) => {
            eprintln!(
                "\n==> one node, no live migration: {why}. Starting two VMs (TCG), the allocator and the \
                 agent; logs in {d}"
            );
            let busy = Vm::boot(&image, &dir, &busy_plan)?;
            let idle = Vm::boot(&image, &dir, &plan("idle", 16, None))?;
            let node = NodePlan { capacity_milli_cpu: 8000, capacity_mib: 6144, policy: String::new() };
            let node = Node::start(&root, &dir, &node, &[&busy, &idle])?;
            eprintln!(
                "    allocator: http://127.0.0.1:{}/state, agent: http://127.0.0.1:{}/state; Ctrl-C stops the demo",
                node.allocator_http, node.agent_http
            );
            show(&a, &dir, stop, busy, Setup::Single { node, idle })
        }
    };
    // QEMUs an agent started for a VM moved to its node run in a process
    // group of their own: neither Ctrl-C nor a handle of ours ends them.
    net::kill_qemus_under(&dir);
    r
}

/// Node names in the two-node setup.
const A: &str = "node-a";
const B: &str = "node-b";

/// The allocator, node a (the busy VM, and the idle VM on a tap) and node b.
/// Node a holds both VMs (2 GiB) under its watermark (90% of 2304 MiB);
/// the busy VM's first step up passes it, and the allocator moves the idle
/// VM to node b, which has room for it (90% of 1152 MiB) and not for the
/// busy one (which could not move anyway: its 9p share of the host's root
/// blocks migration).
fn two_nodes(root: &Path, dir: &Path, image: &crate::guest::Image, busy: &Vm) -> anyhow::Result<Setup> {
    let fabric = Fabric::new(2)?;
    fabric.add_tap(0, TAP)?;
    fabric.add_tap(1, TAP)?;
    let allocator = net::Allocator::start(root, dir, &fabric, "watermark = 0.9\nplan_interval_ms = 1000\n")?;
    let shape = Shape {
        cpus: 2,
        max_cpus: 2,
        virtio_mem_mib: 0,
        extra_cmdline: vec!["vmscale.informant=--cpu-mode,sysfs".into()],
        ..Shape::new(1024)
    };
    let idle_dir = dir.join("idle");
    let qmp = idle_dir.join("agent.qmp");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let idle =
        migration::start(&fabric, 0, &shape.base_args(image, &fabric), &["-qmp".into(), qmp_arg], &idle_dir)?;
    // The busy VM's informant is forwarded on the host's loopback only;
    // node a's agent reaches it through the fabric's host address.
    let forward = SocketAddr::from((fabric.gateway(), net::free_port_on(fabric.gateway())?));
    net::forward(forward, SocketAddr::from(([127, 0, 0, 1], busy.informant_port)))?;
    let busy_entry = busy
        .agent_entry()
        .replace(&format!("http://127.0.0.1:{}", busy.informant_port), &format!("http://{forward}"));
    let idle_plan = plan("idle", 12, None);
    let idle_entry = format!(
        "[[vm]]\nid = \"idle\"\nqmp = \"{}\"\ninformant = \"http://{}:{}\"\n\
         cu = {{ milli_cpu = {}, memory_bytes = {} }}\nmin_cus = {}\nmax_cus = {}\ncpu_mode = \"sysfs\"\n\
         memory = {{ kind = \"dimm\", dimm_bytes = {} }}\n",
        qmp.display(),
        migration::guest_ip(&fabric),
        crate::guest::INFORMANT_PORT,
        idle_plan.cu_milli_cpu,
        idle_plan.cu_mib * MIB,
        idle_plan.min_cus,
        idle_plan.max_cus,
        idle_plan.cu_mib * MIB
    );
    let agent = |name: &str, cpu: u64, mib: u64| net::AgentPlan {
        name: name.into(),
        capacity_milli_cpu: cpu,
        capacity_mib: mib,
        policy: String::new(),
        transfer: String::new(),
        confirm_grace_ms: 10_000,
    };
    let a = net::Agent::start(
        root,
        dir,
        &fabric,
        0,
        &allocator.url,
        &agent(A, 8000, 2304),
        &(busy_entry + &idle_entry),
    )?;
    let b = net::Agent::start(root, dir, &fabric, 1, &allocator.url, &agent(B, 4000, 1152), "")?;
    eprintln!(
        "    allocator: http://127.0.0.1:{}/state, agents: http://{}/state, http://{}/state; Ctrl-C stops the demo",
        allocator.http, a.http, b.http
    );
    let echo = SocketAddr::from((migration::guest_ip(&fabric), migration::ECHO_PORT));
    Ok(Setup::TwoNodes { allocator, agents: vec![a, b], _idle: idle, echo, _fabric: fabric })
}

/// The live view until Ctrl-C or the duration; then the timeline.
fn show(a: &Args, dir: &Path, stop: Arc<AtomicBool>, mut busy: Vm, mut setup: Setup) -> anyhow::Result<()> {
    let ids = ["busy", "idle"];
    let t0 = Instant::now();
    let mut points = Vec::new();
    let mut used_mib = 0.0;
    let mut go = false;
    let mut console = Vec::new();
    // Orders as last seen: id -> state; each change is an event.
    let mut orders: BTreeMap<u64, String> = BTreeMap::new();
    let mut events: Vec<(f64, String)> = Vec::new();
    // A line every 100 ms to the idle VM and back, across its move.
    let mut echo: Option<EchoClient> = None;
    while !stop.load(Ordering::SeqCst) && a.duration.is_none_or(|s| t0.elapsed() < Duration::from_secs(s)) {
        std::thread::sleep(Duration::from_secs(1));
        // Ctrl-C in a terminal reaches the whole process group: QEMU, the
        // allocator and the agent stop on it too. That is the stop asked
        // for, not a failure to report.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        setup.check()?;
        busy.check()?;
        let now = t0.elapsed().as_secs_f64();
        while let Ok((_, l)) = busy.qemu.console.try_recv() {
            if let Some(u) = l.split("used=").nth(1).and_then(|r| r.split_whitespace().next()) {
                used_mib = u.parse().unwrap_or(used_mib);
            }
            if l.starts_with("demo:") || l.contains("Killed process") {
                console.push(format!("{now:5.1}s {l}"));
            }
        }
        let vms = setup.vms();
        if !go && ids.iter().all(|id| vms.get(*id).is_some_and(|v| v.1["informant_connected"] == true)) {
            fs::write(dir.join("go"), "go\n")?;
            go = true;
            console.push(format!("{now:5.1}s demo: memory ramp started"));
        }
        if let (None, Setup::TwoNodes { echo: addr, .. }) = (&echo, &setup) {
            if vms.get("idle").is_some_and(|v| v.1["informant_connected"] == true) {
                if let Ok(c) = std::net::TcpStream::connect_timeout(addr, Duration::from_millis(500)) {
                    echo = EchoClient::start(c, Duration::from_millis(100)).ok();
                    if echo.is_some() {
                        console.push(format!("{now:5.1}s demo: echo client to idle ({addr}) started"));
                    }
                }
            }
        }
        let alloc = setup.allocator_state();
        for c in order_changes(alloc.as_ref(), &mut orders) {
            console.push(format!("{now:5.1}s allocator: {}", c.long));
            events.push((now, c.short));
        }
        let mut p = Point { t: now, used_mib, ..Point::default() };
        let mut view = format!("\n--- {now:.0} s ---\n");
        if let Some(s) = &alloc {
            view.push_str(&nodes_view(s));
        }
        for (i, id) in ids.iter().enumerate() {
            let Some((node, v)) = vms.get(*id) else {
                let _ = writeln!(view, "{id:<5} (no agent has it yet)");
                continue;
            };
            let cpu = v["current"]["milli_cpu"].as_u64().unwrap_or(0);
            let mem = v["current"]["memory_bytes"].as_u64().unwrap_or(0);
            p.memory_mib[i] = (mem / MIB) as f64;
            p.pressure[i] = v["pressure_events"].as_u64().unwrap_or(0);
            let use_s = if i == 0 { format!("{used_mib:.0} MiB") } else { "idle".into() };
            let _ = writeln!(
                view,
                "{id:<5} vCPUs {:.2}  memory {:>5} MiB  use {:>9}  pressure events {:>4}  last {} ({} ms)  on {node}{}{}",
                cpu as f64 / 1000.0,
                mem / MIB,
                use_s,
                p.pressure[i],
                v["last_action"].as_str().unwrap_or("-"),
                v["last_action_ms"].as_u64().map_or("-".into(), |m| m.to_string()),
                v["migration"].as_str().map_or(String::new(), |m| format!("  MIGRATION {m}")),
                if v["informant_connected"] == true { "" } else { "  (informant not yet connected)" },
            );
        }
        for l in console.iter().rev().take(4).rev() {
            let _ = writeln!(view, "  {l}");
        }
        eprint!("{view}");
        points.push(p);
    }
    let moved = events.iter().filter(|e| e.1.ends_with(": completed")).count();
    let echo = match echo.map(|e| e.finish(Duration::from_secs(2))) {
        Some(Ok(r)) => format!(
            " The echo client to the idle VM: {} lines sent, {} lost, longest gap {:.0} ms.",
            r.sent, r.lost, r.max_gap_ms
        ),
        Some(Err(e)) => format!(" The echo client to the idle VM failed: {e:#}."),
        None => String::new(),
    };
    drop(setup);
    drop(busy);
    let svg = dir.join("timeline.svg");
    fs::write(&svg, timeline(&points, &events))?;
    let upscales = points.windows(2).filter(|w| w[1].memory_mib[0] > w[0].memory_mib[0]).count();
    println!(
        "demo stopped after {:.0} s; everything it started is stopped. {upscales} memory upscales of the busy VM, \
         {moved} live migration(s); timeline: {}.{echo}",
        t0.elapsed().as_secs_f64(),
        svg.display()
    );
    Ok(())
}

/// A new or changed migration order, as the view and the timeline say it.
struct OrderChange {
    /// "order 7 idle node-a -> node-b: started (node node-a above its watermark)"
    long: String,
    /// "idle -> node-b: started"
    short: String,
}

/// New or changed orders in the allocator's state.
fn order_changes(state: Option<&serde_json::Value>, seen: &mut BTreeMap<u64, String>) -> Vec<OrderChange> {
    let Some(s) = state else { return Vec::new() };
    let open = s["orders"].as_object().map(|m| m.values().cloned().collect::<Vec<_>>()).unwrap_or_default();
    let done = s["finished_orders"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for o in open.iter().chain(done.iter()) {
        let (Some(id), Some(state)) = (o["id"].as_u64(), o["state"].as_str()) else { continue };
        if seen.get(&id).map(String::as_str) == Some(state) {
            continue;
        }
        seen.insert(id, state.to_owned());
        let why = o["reason"].as_str().filter(|r| !r.is_empty()).map_or(String::new(), |r| format!(" ({r})"));
        let (vm, source, target) = (
            o["vm"].as_str().unwrap_or("?"),
            o["source"].as_str().unwrap_or("?"),
            o["target"].as_str().unwrap_or("?"),
        );
        out.push(OrderChange {
            long: format!("order {id} {vm} {source} -> {target}: {state}{why}"),
            short: format!("{vm} -> {target}: {state}"),
        });
    }
    out
}

/// One line per node: reserved memory and CPU against capacity and watermark.
fn nodes_view(s: &serde_json::Value) -> String {
    let mut out = String::new();
    for (name, n) in s["nodes"].as_object().into_iter().flatten() {
        let get = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        let (mut cpu, mut mem) = (0, 0);
        let mut vms = Vec::new();
        for (id, e) in n["vms"].as_object().into_iter().flatten() {
            cpu += get(&e["reserved"], "milli_cpu");
            mem += get(&e["reserved"], "memory_bytes");
            let state = e["state"]["state"].as_str().unwrap_or("?");
            vms.push(if state == "active" { id.clone() } else { format!("{id} ({state})") });
        }
        let w = n["watermark"].as_f64().unwrap_or(1.0);
        let cap =
            get(&n["capacity"], "memory_bytes").saturating_sub(get(&n["system_reserve"], "memory_bytes"));
        let _ = writeln!(
            out,
            "{name:<10} reserved {:>5}/{:>5} MiB (watermark {:.0} MiB), {:.2}/{:.2} vCPUs: {}",
            mem / MIB,
            cap / MIB,
            w * (cap / MIB) as f64,
            cpu as f64 / 1000.0,
            get(&n["capacity"], "milli_cpu") as f64 / 1000.0,
            if vms.is_empty() { "-".into() } else { vms.join(", ") }
        );
    }
    out
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
fn timeline(points: &[Point], events: &[(f64, String)]) -> String {
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
         <text x=\"{pad}\" y=\"20\">vmscale demo: memory (MiB) over time (s); red ticks: pressure events (busy VM); purple: live migration</text>\n\
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
    // Migration orders: a dashed line and a label at each change, the
    // label on the side of the line with more room, below the legend.
    for (i, (t, what)) in events.iter().enumerate() {
        let px = x(*t);
        let ly = pad + 40.0 + 14.0 * (i % 6) as f64;
        let (lx, anchor) = if px > w / 2.0 { (px - 3.0, "end") } else { (px + 3.0, "start") };
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{pad}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#9467bd\" stroke-dasharray=\"4,3\"/>\n\
             <text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"{anchor}\" fill=\"#9467bd\">{}</text>",
            h - pad,
            xml(what)
        );
    }
    let legend = [("#1f77b4", "busy: allocated"), ("#ff7f0e", "busy: used"), ("#2ca02c", "idle: allocated")];
    for (i, (c, l)) in legend.iter().enumerate() {
        let ly = 40.0 + 16.0 * i as f64;
        let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\" fill=\"{c}\">{l}</text>", w - 200.0);
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
