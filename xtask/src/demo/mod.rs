//! `cargo xtask demo`: the project's main job as a newcomer meets it. It
//! builds what is missing (the Debian guest image with Postgres and the
//! informant's package, release daemons), boots two Postgres VMs (pg-1,
//! pg-2) under QEMU (TCG here) on network-namespace nodes with the real
//! allocator and agents, and runs pgbench from the host against them in
//! phases (`phases.rs`): rising client counts on pg-1 (its vCPUs grow), a
//! memory-hungry sort (its memory grows, no OOM kill), quiet (both go back
//! down, the ledger is released); with two nodes, pg-1's growth passes node
//! a's watermark and the allocator moves pg-2 live to node b while pgbench
//! runs against it. A live view redraws in place like `top` (a frame every
//! two seconds in a log); on exit (Ctrl-C or `--duration`) it stops
//! everything it started, writes `target/demo/timeline.svg` and prints a
//! summary with one `check:` line per claim.
//!
//! The screen and the chart are pure functions of plain data:
//! `view::render(&Frame)` (its shell `screen::Screen`), `timeline::svg`;
//! `ledger` turns the allocator's `/state` into node rows and order changes;
//! `live` collects what the demo sees, `probe` reads the guests' kernels,
//! `summary` says what happened, `nodes` is where it runs.

use anyhow::Context;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod ledger;
mod live;
mod nodes;
mod phases;
mod probe;
mod screen;
mod summary;
#[cfg(test)]
mod summary_tests;
mod svg;
mod timeline;
#[cfg(test)]
mod timeline_tests;
mod view;
#[cfg(test)]
mod view_tests;

use crate::cluster::{self, net, MIB};
use crate::steps::Steps;
use live::Live;
use nodes::{Setup, PG1};
use phases::{Director, Plan};
use summary::Outcome;
use timeline::{scalings, svg, Timeline, VmSeries};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// One node, no live migration, even where two could be made.
    #[arg(long)]
    pub one_node: bool,
    /// Shorter phases (two load steps of 20 s): what the demo's test runs.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Postgres guests sit on taps in network namespaces, even on one node,
    // and the image is built with mmdebstrap as root.
    if let Err(why) = crate::netns::can_run() {
        anyhow::bail!(
            "the Postgres demo cannot run here: {why}. Its guests are on taps in network namespaces (one per \
             node) and its image is built as root: run it as root (sudo -E cargo xtask demo)"
        );
    }
    let mut steps = Steps::new(crate::debian::ENSURE_STEPS + 2);
    let image = crate::debian::ensure(&mut steps)?;
    cluster::build_daemons(&mut steps)?;
    steps.call("pgbench and psql on this host (postgresql-client)", crate::pgbench::ensure_client)?;
    let root = crate::workspace_root();
    let dir = root.join("target/demo");
    // An earlier demo killed hard may have left agents' QEMUs behind.
    net::kill_qemus_under(&dir);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;

    let stop = Arc::new(AtomicBool::new(false));
    watch_ctrl_c(stop.clone())?;
    let two = !a.one_node;
    if two {
        eprintln!(
            "\n==> two nodes as network namespaces, an agent in each; pg-1 and pg-2 (Debian, Postgres 15, TCG) \
             boot on {}; logs in {}",
            nodes::A,
            dir.display()
        );
    } else {
        eprintln!(
            "\n==> one node, no live migration (--one-node); pg-1 and pg-2 (Debian, Postgres 15, TCG); logs in {}",
            dir.display()
        );
    }
    let r = Setup::start(&root, &dir, &image, two).and_then(|setup| {
        eprintln!(
            "    allocator: http://127.0.0.1:{}/state; {}; Ctrl-C stops the demo",
            setup.allocator.http,
            setup
                .agents
                .iter()
                .map(|a| format!("{}: http://{}/state", a.name, a.http))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let plan = if a.quick { Plan::quick() } else { Plan::full() };
        show(&a, &dir, &stop, setup, plan)
    });
    // QEMUs an agent started for a VM moved to its node run in a process
    // group of their own: neither Ctrl-C nor a handle of ours ends them.
    net::kill_qemus_under(&dir);
    match r {
        // Ctrl-C reaches QEMU and the daemons too: what fails after it is
        // the stop asked for, not a failure to report.
        Err(e) if stop.load(Ordering::SeqCst) => {
            println!("demo stopped by Ctrl-C before its live view began ({e:#}); everything it started is stopped.");
            Ok(())
        }
        r => r,
    }
}

/// The live view and the phases until Ctrl-C or the duration; then the
/// timeline and the summary.
fn show(a: &Args, dir: &Path, stop: &AtomicBool, mut setup: Setup, plan: Plan) -> anyhow::Result<()> {
    let mut live = Live::new(&setup);
    let mut director = Director::new(plan);
    let r = (|| {
        while !stop.load(Ordering::SeqCst)
            && a.duration.is_none_or(|s| live.t0.elapsed() < Duration::from_secs(s))
        {
            std::thread::sleep(Duration::from_secs(1));
            // Ctrl-C in a terminal reaches the whole process group: QEMU,
            // the allocator and the agents stop on it too.
            if stop.load(Ordering::SeqCst) {
                break;
            }
            setup.check(&live.moving())?;
            live.tick(&setup, &|id| director.latest(id))?;
            director.advance(&mut setup, &mut live)?;
        }
        anyhow::Ok(())
    })();
    director.stop(&live);
    let outcome = outcome(&setup, &live, &director);
    let logs = setup.logs(dir);
    drop(setup);
    let path = dir.join("timeline.svg");
    fs::write(&path, svg(&timeline(&live))).with_context(|| format!("writing {}", path.display()))?;
    let (text, ok) = summary::report(&outcome);
    println!("{text}");
    println!(
        "demo stopped after {:.0} s; everything it started is stopped. {} live migration(s); timeline: {}; {logs}",
        live.t0.elapsed().as_secs_f64(),
        outcome.moves.len(),
        path.display()
    );
    if r.is_err() || !ok {
        eprintln!("    (not every check passed; {logs})");
    }
    match r {
        // What failed as Ctrl-C stopped QEMU and the daemons is the stop.
        Err(e) if stop.load(Ordering::SeqCst) => {
            eprintln!("    as the demo stopped: {e:#}");
            Ok(())
        }
        r => r,
    }
}

/// What the summary needs, read before the VMs stop.
fn outcome(setup: &Setup, live: &Live, director: &Director) -> Outcome {
    let series = live.series();
    let pg1 = series.iter().find(|(id, _)| id == PG1).map(|(_, p)| p.clone()).unwrap_or_default();
    let vm = setup.vm(PG1);
    let pg1_min = vm.map_or((1.0, 1024.0), |v| {
        let p = &v.plan;
        let n = u64::from(p.min_cus);
        ((p.cu.milli_cpu * n) as f64 / 1000.0, (p.cu.memory_bytes / MIB * n) as f64)
    });
    let pg1_reserved = live.ledger.as_ref().and_then(|s| {
        let e = s.nodes.values().find_map(|n| n.vms.get(PG1))?;
        Some((e.reserved.milli_cpu as f64 / 1000.0, (e.reserved.memory_bytes / MIB) as f64))
    });
    Outcome {
        two_nodes: setup.two_nodes(),
        stats: live.stats.clone(),
        pg1,
        pg1_min,
        pg1_reserved,
        runs: director.runs.clone(),
        side: director.side_run.clone(),
        moves: live.moved.clone(),
        sort: director.sort.clone(),
        sort_peak_mib: director.sort_peak_mib,
        oom_vmstat: live.probes.get(PG1).and_then(probe::GuestProbe::oom_kills),
        oom_console: vm.map_or(0, crate::pg::vm::PgVm::console_oom_kills),
    }
}

fn timeline(live: &Live) -> Timeline {
    let mut phases = live.phases.clone();
    if let Some(p) = phases.last_mut() {
        p.end.get_or_insert(live.now());
    }
    Timeline {
        vms: live
            .series()
            .into_iter()
            .map(|(id, points)| VmSeries { id, scalings: scalings(&points), points })
            .collect(),
        phases,
        moves: live.spans.iter().map(|(_, m)| m.clone()).collect(),
        marks: Vec::new(),
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
                        eprintln!("\n==> Ctrl-C: stopping pgbench, the VMs, the agents and the allocator");
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
