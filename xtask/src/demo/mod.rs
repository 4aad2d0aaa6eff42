//! `cargo xtask demo`: the project's main job as a newcomer meets it. It
//! builds what is missing (guest image, release binaries), starts the
//! allocator, the agents and two QEMU guests (TCG) with the real informant,
//! drives a memory ramp and then a CPU burst in one VM while the other
//! idles, and shows a live view: redrawn in place every second on a
//! terminal, a frame every two seconds in a log. On exit (Ctrl-C or
//! `--duration`) it stops everything it started and writes a timeline to
//! `target/demo/timeline.svg`.
//!
//! The screen and the chart are pure functions of plain data, for the
//! Postgres demo to feed as well: `view::render(&Frame)` (its shell
//! `screen::Screen`), `timeline::svg(&Timeline)`; `ledger` turns the
//! allocator's `/state` into the view's node rows and the orders' changes;
//! `live` is what this demo collects for them.
//!
//! Where network namespaces can be made (root), there are two nodes, an
//! agent in each (see `cluster::net`): the busy VM's growth takes node a
//! past its watermark and the allocator has the idle VM moved live to node
//! b; the view shows the nodes' ledgers, the move and the orders, and the
//! timeline marks them. Elsewhere one node runs both VMs, without
//! migration, and the demo says why.

use anyhow::Context;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod ledger;
mod live;
mod nodes;
mod screen;
mod svg;
mod timeline;
#[cfg(test)]
mod timeline_tests;
mod view;
#[cfg(test)]
mod view_tests;

use crate::cluster::{self, net, Node, NodePlan, Vm};
use crate::steps::Steps;
use live::Live;
use nodes::{plan, two_nodes, Setup, A};

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
