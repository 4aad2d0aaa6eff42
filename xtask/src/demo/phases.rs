//! The demo's phases and what drives them, one step a second, never
//! blocking (the live view redraws meanwhile, Ctrl-C is seen at once):
//! slow work (pgbench -i, the sort) runs on a thread of its own, pgbench in
//! the background.
//!
//! boot -> warm-up (pgbench -i) -> idle (down to the minimum: a guest's
//! boot under TCG takes it to its maximum) -> rising load (pgbench on pg-1,
//! more clients each step: vCPUs, and memory with them, grow) -> cool-down
//! (back to the minimum) -> memory-hungry sort on pg-1 (memory grows, no
//! OOM kill) -> quiet (back to the minimum, the ledger released) -> done.
//! With two nodes, pgbench runs against pg-2 from the first load step;
//! once pg-1's growth has passed node a's watermark and pg-1 wants more
//! than pg-2, node b's agent starts and the allocator moves pg-2 there under
//! pgbench; that run ends a while after the move.

use anyhow::{bail, Context};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::live::Live;
use super::nodes::{Setup, PG1, PG2};
use super::summary::SideRun;
use crate::pg::probe::Conn;
use crate::pgbench::{self, Pgbench, Sample, Summary};

/// How long each part takes.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    /// pgbench clients against pg-1, one step each.
    pub clients: Vec<u32>,
    pub step: Duration,
    /// Rows of the memory-hungry sort.
    pub sort_rows: u64,
    /// The most a cool-down or quiet waits for pg-1's minimum.
    pub settle: Duration,
    /// pgbench against pg-2 goes on this long after its move.
    pub after_move: Duration,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            clients: vec![2, 4, 8, 16],
            step: Duration::from_secs(30),
            sort_rows: SORT_ROWS,
            settle: Duration::from_secs(300),
            after_move: Duration::from_secs(20),
        }
    }

    /// For the test: two load steps, shorter.
    pub fn quick() -> Plan {
        Plan {
            clients: vec![4, 16],
            step: Duration::from_secs(20),
            // The test requires pg-1 back at its minimum when quiet ends:
            // under contention the load average took over 150 s to fall.
            settle: Duration::from_secs(300),
            after_move: Duration::from_secs(10),
            ..Plan::full()
        }
    }
}

/// The sort's rows: about 100 bytes each in the backend (8 million took
/// 813 MB of anonymous memory and were OOM-killed at pg-1's 1 GiB maximum),
/// so some 400 MB (`work_mem` 2 GB keeps it in memory): more than the 512
/// MiB guest has free, less than its maximum.
const SORT_ROWS: u64 = 4_000_000;
/// pgbench clients against pg-2, across its move: light, so that pg-1
/// grows first and pg-2 stays the smaller VM the allocator moves.
const SIDE_CLIENTS: u32 = 1;
/// The guests boot, Postgres and the informant start (about 30-60 s under
/// TCG each, both at once on two cores).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Where the demo is.
enum Stage {
    Boot,
    WarmUp(JoinHandle<anyhow::Result<()>>),
    Idle { until: Instant },
    Load { step: usize, bench: Pgbench, until: Instant },
    CoolDown { until: Instant },
    Sort { query: JoinHandle<anyhow::Result<String>>, started: Instant },
    Quiet { until: Instant },
    Done,
}

/// Drives the phases.
pub(super) struct Director {
    plan: Plan,
    stage: Stage,
    /// pgbench against pg-2 and when it started (demo's clock).
    side: Option<(Pgbench, f64)>,
    pub side_run: Option<SideRun>,
    /// Every finished pgbench run against pg-1.
    pub runs: Vec<(String, Summary)>,
    pub sort: Option<(u64, f64, Option<String>)>,
    pub sort_peak_mib: Option<f64>,
}

impl Director {
    pub fn new(plan: Plan) -> Director {
        Director {
            plan,
            stage: Stage::Boot,
            side: None,
            side_run: None,
            runs: Vec::new(),
            sort: None,
            sort_peak_mib: None,
        }
    }

    /// The newest sample of the pgbench running against `id`.
    pub fn latest(&self, id: &str) -> Option<Sample> {
        match (id, &self.stage, &self.side) {
            (PG1, Stage::Load { bench, .. }, _) => bench.latest(),
            (PG2, _, Some((bench, _))) => bench.latest(),
            _ => None,
        }
    }

    pub fn done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    /// One step: moves on where the current stage is over.
    pub fn advance(&mut self, setup: &mut Setup, live: &mut Live) -> anyhow::Result<()> {
        self.side(setup, live)?;
        if self.side.is_some() && setup.agents.len() < 2 && move_wanted(live) {
            setup.start_b()?;
            live.event("node-b's agent joins: node-a is above its watermark and pg-2 its smallest VM");
        }
        let stage = std::mem::replace(&mut self.stage, Stage::Done);
        self.stage = match stage {
            Stage::Boot => self.boot(setup, live)?,
            Stage::WarmUp(init) if init.is_finished() => {
                join(init).context("pgbench -i (the warm-up)")?;
                live.event("pgbench tables ready");
                live.phase("idle");
                Stage::Idle { until: Instant::now() + self.plan.settle }
            }
            Stage::Idle { until } if at_min(setup, live) || Instant::now() >= until => {
                self.load(setup, live, 0)?
            }
            Stage::Load { step, bench, until } if Instant::now() >= until => {
                let clients = self.plan.clients[step];
                let s = bench.stop()?;
                live.event(format!(
                    "pgbench {clients} clients on pg-1: {} tps, {} failed",
                    tps(&s),
                    s.failed
                ));
                self.runs.push((format!("pg-1, {clients} clients"), s));
                if step + 1 < self.plan.clients.len() {
                    self.load(setup, live, step + 1)?
                } else {
                    live.phase("cool-down");
                    Stage::CoolDown { until: Instant::now() + self.plan.settle }
                }
            }
            Stage::CoolDown { until } if at_min(setup, live) || Instant::now() >= until => {
                live.phase("memory-hungry sort");
                let sql = pgbench::memory_hungry_sql(self.plan.sort_rows, 2048);
                let conn = vm_conn(setup, PG1)?;
                live.event(format!("pg-1: sort of {} rows with work_mem 2 GB", self.plan.sort_rows));
                let query = std::thread::Builder::new()
                    .name("sort".into())
                    .spawn(move || conn.query(&sql, Duration::from_secs(900)))?;
                Stage::Sort { query, started: Instant::now() }
            }
            Stage::Sort { query, started } => {
                if let (_, Some(m)) = live.size(PG1) {
                    self.sort_peak_mib = Some(self.sort_peak_mib.unwrap_or(0.0).max(m as f64));
                }
                if query.is_finished() {
                    let secs = started.elapsed().as_secs_f64();
                    let error = join(query).err().map(|e| format!("{e:#}"));
                    live.event(match &error {
                        None => format!("pg-1: the sort finished in {secs:.0} s"),
                        Some(e) => format!("pg-1: the sort failed after {secs:.0} s: {e}"),
                    });
                    self.sort = Some((self.plan.sort_rows, secs, error));
                    live.phase("quiet");
                    Stage::Quiet { until: Instant::now() + self.plan.settle }
                } else {
                    Stage::Sort { query, started }
                }
            }
            Stage::Quiet { until }
                if (at_min(setup, live) && self.side.is_none()) || Instant::now() >= until =>
            {
                live.phase("done: Ctrl-C stops the demo");
                Stage::Done
            }
            other => other,
        };
        Ok(())
    }

    /// Boot is over when both guests are up and their agents hold them with
    /// their informants; then pgbench's tables are made.
    fn boot(&mut self, setup: &Setup, live: &mut Live) -> anyhow::Result<Stage> {
        for v in &setup.vms {
            if let Some(line) = live.ready(&v.plan.id) {
                if !line.contains("postgres=active") || !line.contains("informant=active") {
                    bail!("{} is up but not every unit is active: {line}\n{}", v.plan.id, v.qemu.logs());
                }
            }
        }
        let up = setup
            .vms
            .iter()
            .all(|v| live.ready(&v.plan.id).is_some() && live.informant_connected(&v.plan.id));
        if !up {
            if live.t0.elapsed() > BOOT_TIMEOUT {
                bail!("the guests did not boot in {} s", BOOT_TIMEOUT.as_secs());
            }
            return Ok(Stage::Boot);
        }
        live.phase("warm-up");
        let targets: Vec<_> = setup.vms.iter().map(|v| v.conn.target.clone()).collect();
        live.event("pgbench -i -s 1 on each VM");
        let init = std::thread::Builder::new().name("pgbench-init".into()).spawn(move || {
            for t in targets {
                pgbench::init(&t, &pgbench::host, 1, Duration::from_secs(300))?;
            }
            Ok(())
        })?;
        Ok(Stage::WarmUp(init))
    }

    /// Load step `step` on pg-1 (and, with two nodes, the run against pg-2
    /// from the first step).
    fn load(&mut self, setup: &Setup, live: &mut Live, step: usize) -> anyhow::Result<Stage> {
        let clients = self.plan.clients[step];
        if step == 0 && setup.two_nodes() {
            let vm = setup.vm(PG2).context("no pg-2")?;
            let bench = Pgbench::start(&crate::pg::bench_options(vm, SIDE_CLIENTS, None), &pgbench::host)?;
            live.event(format!("pgbench {SIDE_CLIENTS} client on pg-2, until after its move"));
            self.side = Some((bench, live.now()));
        }
        live.phase(&format!("rising load: {clients} clients"));
        let vm = setup.vm(PG1).context("no pg-1")?;
        let bench = Pgbench::start(&crate::pg::bench_options(vm, clients, None), &pgbench::host)?;
        Ok(Stage::Load { step, bench, until: Instant::now() + self.plan.step })
    }

    /// Ends the run against pg-2 a while after its move, or once the demo
    /// is done without one.
    fn side(&mut self, _setup: &Setup, live: &mut Live) -> anyhow::Result<()> {
        let Some((_, start)) = &self.side else { return Ok(()) };
        let moved = live.moved.iter().find(|m| m.vm == PG2).map(|m| m.end);
        let over = match moved {
            Some(end) => live.now() - end >= self.plan.after_move.as_secs_f64(),
            None => self.done() && !live.moving().iter().any(|v| v == PG2),
        };
        if !over {
            return Ok(());
        }
        let start = *start;
        if let Some((bench, _)) = self.side.take() {
            let summary = bench.stop()?;
            live.event(format!(
                "pgbench on pg-2 stopped: {} transactions, {} failed, {} broken connections",
                summary.processed, summary.failed, summary.broken_connections
            ));
            self.side_run = Some(SideRun { clients: SIDE_CLIENTS, start, end: live.now(), summary });
        }
        Ok(())
    }

    /// Stops what still runs (Ctrl-C, `--duration`); its figures are kept.
    pub fn stop(&mut self, live: &Live) {
        if let Stage::Load { step, bench, .. } = std::mem::replace(&mut self.stage, Stage::Done) {
            if let Ok(s) = bench.stop() {
                self.runs.push((format!("pg-1, {} clients (stopped)", self.plan.clients[step]), s));
            }
        }
        if let Some((bench, start)) = self.side.take() {
            if let Ok(summary) = bench.stop() {
                self.side_run = Some(SideRun { clients: SIDE_CLIENTS, start, end: live.now(), summary });
            }
        }
    }
}

/// Node a is above its watermark and pg-1 wants more than pg-2 there (its
/// reservation and denied demand together): the allocator's planner, which
/// moves the smallest VM that covers the excess, would pick pg-2.
fn move_wanted(live: &Live) -> bool {
    let Some(a) = live.ledger.as_ref().and_then(|s| s.nodes.get(super::nodes::A)) else { return false };
    let wants = |id: &str| a.vms.get(id).map(|e| e.reserved.saturating_add(e.unmet));
    let (Some(p1), Some(p2)) = (wants(PG1), wants(PG2)) else { return false };
    !a.wanted().fits_in(a.watermark_level()) && p1.memory_bytes > p2.memory_bytes
}

/// pg-1 at its minimum as its agent has it.
fn at_min(setup: &Setup, live: &Live) -> bool {
    let Some(vm) = setup.vm(PG1) else { return false };
    let p = &vm.plan;
    let min_cpu = (p.cu.milli_cpu * u64::from(p.min_cus)) as f64 / 1000.0;
    let min_mib = p.cu.memory_bytes / crate::cluster::MIB * u64::from(p.min_cus);
    matches!(live.size(PG1), (Some(c), Some(m)) if c <= min_cpu && m <= min_mib)
}

fn vm_conn(setup: &Setup, id: &str) -> anyhow::Result<Conn> {
    Ok(setup.vm(id).with_context(|| format!("no {id}"))?.conn.clone())
}

fn join<T>(h: JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("its thread panicked"))?
}

fn tps(s: &Summary) -> String {
    s.tps.map_or("?".into(), |t| format!("{t:.1}"))
}
