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
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod nodes;
mod timeline;
mod view;

use crate::cluster::{self, net, Node, NodePlan, Vm, MIB};
use crate::echo::EchoClient;
use crate::steps::Steps;
use nodes::{plan, two_nodes, Setup, A};
use timeline::{timeline, Point};
use view::{nodes_view, order_changes};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// One node, no live migration, even where network namespaces can be
    /// made (what the demo does without root).
    #[arg(long)]
    pub one_node: bool,
}

/// The busy VM's workload: a memory ramp (32 MiB/s to 900 MiB, held, its
/// use shown every 8 MiB it grows, about as often as the view asks), then
/// a CPU burst: two perl loops spinning for 20 s by the guest's clock. (It
/// was stress-ng, which aborts at once in the guest: its temporary files go
/// to the working directory, here the host's root shared read-only.)
const BUSY_SH: &str = "perl \"$1/ramp.pl\" 32 900 \"$1/go\" 1 8 &\n\
                       while [ ! -e \"$1/go\" ]; do sleep 0.5; done\n\
                       sleep 35\n\
                       echo 'demo: CPU burst (2 busy loops, 20 s)'\n\
                       spin() { perl -e '$e = time + 20; while (time < $e) { $n++ for 1 .. 200000 }'; }\n\
                       spin & a=$!\n\
                       spin & b=$!\n\
                       wait $a $b\n\
                       echo 'demo: CPU burst over'\n\
                       wait\n";

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
    let nodes = if a.one_node { Err("--one-node".to_owned()) } else { crate::netns::can_run() };
    let r = match nodes {
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
                "\n==> one node, no live migration ({why}). Starting two VMs (TCG), the allocator and the \
                 agent; logs in {d}"
            );
            let busy = Vm::boot(&image, &dir, &busy_plan)?;
            let idle = Vm::boot(&image, &dir, &plan("idle", 16, None))?;
            let node = NodePlan { capacity_milli_cpu: 8000, capacity_mib: 6144, policy: Default::default() };
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

/// The live view until Ctrl-C or the duration; then the timeline.
fn show(a: &Args, dir: &Path, stop: Arc<AtomicBool>, mut busy: Vm, mut setup: Setup) -> anyhow::Result<()> {
    let mut live = Live::new();
    while !stop.load(Ordering::SeqCst)
        && a.duration.is_none_or(|s| live.t0.elapsed() < Duration::from_secs(s))
    {
        std::thread::sleep(Duration::from_secs(1));
        // Ctrl-C in a terminal reaches the whole process group: QEMU, the
        // allocator and the agent stop on it too. That is the stop asked
        // for, not a failure to report.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        setup.check()?;
        busy.check()?;
        live.tick(dir, &busy, &setup)?;
    }
    live.finish(dir, setup, busy)
}

/// The VMs the view shows, busy first.
const IDS: [&str; 2] = ["busy", "idle"];

/// What the live view has seen so far.
struct Live {
    t0: Instant,
    points: Vec<Point>,
    /// The busy VM's use, from its ramp's lines.
    used_mib: f64,
    /// Whether the ramp was started.
    go: bool,
    /// Notable lines (the workload's, the allocator's orders), stamped.
    console: Vec<String>,
    /// Orders as last seen: id -> state; each change is an event.
    orders: BTreeMap<u64, String>,
    events: Vec<(f64, String)>,
    /// A line every 100 ms to the idle VM and back, across its move.
    echo: Option<EchoClient>,
}

impl Live {
    fn new() -> Live {
        Live {
            t0: Instant::now(),
            points: Vec::new(),
            used_mib: 0.0,
            go: false,
            console: Vec::new(),
            orders: BTreeMap::new(),
            events: Vec::new(),
            echo: None,
        }
    }

    /// One second: read what changed, start what is due, print the view.
    fn tick(&mut self, dir: &Path, busy: &Vm, setup: &Setup) -> anyhow::Result<()> {
        let now = self.t0.elapsed().as_secs_f64();
        while let Ok((_, l)) = busy.qemu.console.try_recv() {
            self.used_mib = crate::console::value(&l, "used").unwrap_or(self.used_mib);
            if l.starts_with("demo:") || l.contains("Killed process") {
                self.console.push(format!("{now:5.1}s {l}"));
            }
        }
        let vms = setup.vms();
        let connected = |id: &str| vms.get(id).is_some_and(|v| v.1["informant_connected"] == true);
        if !self.go && IDS.iter().all(|id| connected(id)) {
            fs::write(dir.join("go"), "go\n")?;
            self.go = true;
            self.console.push(format!("{now:5.1}s demo: memory ramp started"));
        }
        if let (None, Setup::TwoNodes { echo: addr, .. }) = (&self.echo, setup) {
            if connected("idle") {
                if let Ok(c) = std::net::TcpStream::connect_timeout(addr, Duration::from_millis(500)) {
                    self.echo = EchoClient::start(c, Duration::from_millis(100)).ok();
                    if self.echo.is_some() {
                        self.console.push(format!("{now:5.1}s demo: echo client to idle ({addr}) started"));
                    }
                }
            }
        }
        let alloc = setup.allocator_state();
        for c in order_changes(alloc.as_ref(), &mut self.orders) {
            self.console.push(format!("{now:5.1}s allocator: {}", c.long));
            self.events.push((now, c.short));
        }
        let mut p = Point { t: now, used_mib: self.used_mib, ..Point::default() };
        let mut view = format!("\n--- {now:.0} s ---\n");
        if let Some(s) = &alloc {
            view.push_str(&nodes_view(s));
        }
        self.vms_view(&vms, &mut p, &mut view);
        for l in self.console.iter().rev().take(4).rev() {
            let _ = writeln!(view, "  {l}");
        }
        eprint!("{view}");
        self.points.push(p);
        Ok(())
    }

    /// One line per VM into `view`; its size and pressure into `p`.
    fn vms_view(
        &self,
        vms: &BTreeMap<String, (String, serde_json::Value)>,
        p: &mut Point,
        view: &mut String,
    ) {
        for (i, id) in IDS.iter().enumerate() {
            let Some((node, v)) = vms.get(*id) else {
                let _ = writeln!(view, "{id:<5} (no agent has it yet)");
                continue;
            };
            let cpu = v["current"]["milli_cpu"].as_u64().unwrap_or(0);
            let mem = v["current"]["memory_bytes"].as_u64().unwrap_or(0);
            p.memory_mib[i] = (mem / MIB) as f64;
            p.pressure[i] = v["pressure_events"].as_u64().unwrap_or(0);
            let use_s = if i == 0 { format!("{:.0} MiB", self.used_mib) } else { "idle".into() };
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
    }

    /// Stops everything, writes the timeline and says what happened.
    fn finish(self, dir: &Path, setup: Setup, busy: Vm) -> anyhow::Result<()> {
        let moved = self.events.iter().filter(|e| e.1.ends_with(": completed")).count();
        let echo = match self.echo.map(|e| e.finish(Duration::from_secs(2))) {
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
        fs::write(&svg, timeline(&self.points, &self.events))?;
        let upscales = self.points.windows(2).filter(|w| w[1].memory_mib[0] > w[0].memory_mib[0]).count();
        println!(
            "demo stopped after {:.0} s; everything it started is stopped. {upscales} memory upscales of the busy VM, \
             {moved} live migration(s); timeline: {}.{echo}",
            self.t0.elapsed().as_secs_f64(),
            svg.display()
        );
        Ok(())
    }
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
