//! `pg-boot`'s phases under its agents: the sort, the move under pgbench,
//! 100 clients.

use anyhow::{bail, ensure, Context};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use vmscale_allocator::core::migration::OrderState;

use super::report::{ManyClients, MemoryRun, MoveRun};
use super::{agent_plan, quick_down, spec_of, Bench, NAMES, NODE_A, NODE_B};
use crate::cluster::qmp::Qmp;
use crate::cluster::{agent_operations, MIB};
use crate::pgbench::{self, Pgbench, Source};

/// Rows of the sort: some 300 MiB in memory, more than the guest's 512 MiB
/// of boot memory has free and less than its 1 GiB at most. A row takes
/// about 100 bytes of sort memory (8,000,000 rows had the backend at 815
/// MiB of anonymous memory, and the OOM killer on it, in a quick run).
const SORT_ROWS: u64 = 3_000_000;

/// The reservation of `vm` on `node` in the allocator's ledger:
/// (milli-vCPU, MiB).
fn reserved(b: &Bench, node: usize, vm: &str) -> Option<(u64, u64)> {
    let s = b.alloc.state()?;
    let e = s.nodes.get(NAMES[node])?.vms.get(vm)?;
    Some((e.reserved.milli_cpu, e.reserved.memory_bytes / MIB))
}

/// Node a's agent takes `pg-boot`; a sort larger than its free memory runs;
/// the memory QEMU has before, at most during, and once the agent has
/// unplugged what it would after it.
pub(super) fn memory(b: &mut Bench) -> anyhow::Result<MemoryRun> {
    // Node a: exactly the VM's largest size, so that its growth under the
    // burst later fills the node past its watermark.
    let plan = agent_plan(NODE_A, (2000, 2048), quick_down(), &b.boot);
    let spec = spec_of(&b.boot, &plan.policy);
    b.start_agent(NODE_A, &plan, &[spec])?;
    let mut watch = Qmp::connect(&b.boot.qemu.dir.join("qmp.sock"))?;
    // The agent first grows the VM for the load average the rounds left (in
    // the run of 06:32 the sort started at 1 GiB, every DIMM already in),
    // then gives it back: the sort starts from the boot memory, so what it
    // gets is its own, or after 240 s from wherever the VM is.
    let boot_bytes = b.boot.plan.boot_mib * MIB;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(240) {
        b.check()?;
        if watch.memory()?.1 <= boot_bytes && t.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let before = b.boot.conn.guest()?;
    let (_, before_bytes) = watch.memory()?;
    let conn = b.boot.conn.clone();
    let sql = pgbench::memory_hungry_sql(SORT_ROWS, 2048);
    let t = Instant::now();
    let q = std::thread::Builder::new()
        .name("sort".into())
        .spawn(move || conn.query(&sql, Duration::from_secs(900)))?;
    let mut peak = before_bytes;
    while !q.is_finished() {
        b.check()?;
        if let Ok((_, bytes)) = watch.memory() {
            peak = peak.max(bytes);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let query_s = t.elapsed().as_secs_f64();
    let count = q.join().map_err(|_| anyhow::anyhow!("the sort's thread panicked"))?;
    let count = count.context("the sort failed")?;
    ensure!(count == SORT_ROWS.to_string(), "the sort counted {count} rows, not {SORT_ROWS}");
    // Back to the boot memory (every DIMM out), or what is left after 150 s.
    let t = Instant::now();
    let mut after = peak;
    while t.elapsed() < Duration::from_secs(150) {
        b.check()?;
        if let Ok((_, bytes)) = watch.memory() {
            after = bytes;
            if bytes <= boot_bytes {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let settle_s = t.elapsed().as_secs_f64();
    let end = b.boot.conn.guest()?;
    let m = MemoryRun {
        rows: SORT_ROWS,
        query_s,
        oom_kills: end.oom_kills.saturating_sub(before.oom_kills),
        before_mib: before_bytes / MIB,
        peak_mib: peak / MIB,
        after_mib: after / MIB,
        settle_s,
    };
    eprintln!("    sort: {m:?}");
    Ok(m)
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The witness: a rate-limited pgbench on `pg-boot` through a burst's
/// scale-up on node a, the move to node b and a scale-down there.
pub(super) fn migration_run(b: &mut Bench) -> anyhow::Result<MoveRun> {
    const WITNESS_CLIENTS: u32 = 2;
    const WITNESS_RATE: f64 = 10.0;
    let id = b.boot.plan.id.clone();
    let len = b.len.witness;
    let mut wopts = crate::pg::bench_options(&b.boot, WITNESS_CLIENTS, Some(len));
    wopts.rate = Some(WITNESS_RATE);
    let log_dir = wopts.log_dir.clone().context("bench_options gives a log directory")?;
    let witness = Pgbench::start(&wopts, &pgbench::host)?;
    let t0 = Instant::now();
    let secs = |t: Instant| t.duration_since(t0).as_secs_f64();
    std::thread::sleep(Duration::from_secs(5));
    let burst = Pgbench::start(&crate::pg::bench_options(&b.boot, 4, None), &pgbench::host)?;
    // The scale-up: the second vCPU online and node a full enough (0.9 of
    // 2000 milli-vCPU or 2048 MiB) that the allocator will move the VM
    // once there is a target; or, should the agent stop short of that,
    // 20 s after the vCPU came (the move then shows whether it was enough).
    let mut cpu1: Option<Instant> = None;
    let up = crate::harness::wait_for(
        "the burst to grow pg-boot past node a's watermark",
        Duration::from_secs(150),
        || {
            b.check()?;
            if cpu1.is_none() && b.boot.conn.guest()?.online_cpus == 2 {
                cpu1 = Some(Instant::now());
            }
            let full = reserved(b, NODE_A, &id).is_some_and(|(cpu, mib)| cpu >= 1800 || mib >= 1844);
            Ok(cpu1.filter(|t| full || t.elapsed() > Duration::from_secs(20)))
        },
    );
    let up = match up {
        Ok(t) => t,
        Err(e) => {
            let (w, s) = (witness.stop(), burst.stop());
            return Err(e).with_context(|| format!("witness {w:?}; burst {s:?}"));
        }
    };
    let plan = agent_plan(NODE_B, (4000, 8192), quick_down(), &b.boot);
    b.start_agent(NODE_B, &plan, &[])?;
    let move_t0 = unix_now();
    let moved =
        crate::harness::wait_for("the allocator to move pg-boot to node b", Duration::from_secs(150), || {
            b.check()?;
            match crate::pg::last_order(&b.alloc, &id) {
                Some((_, OrderState::Completed, _)) => Ok(Some(Instant::now())),
                Some((n, state, reason)) if state.is_final() => {
                    bail!("order {n} ended {}: {reason}", state.name())
                }
                _ => Ok(None),
            }
        });
    let moved = match moved {
        Ok(t) => t,
        Err(e) => {
            let (w, s) = (witness.stop(), burst.stop());
            return Err(e).with_context(|| format!("witness {w:?}; burst {s:?}"));
        }
    };
    let move_t1 = unix_now();
    std::thread::sleep(Duration::from_secs(5));
    let burst = burst.stop()?;
    // The scale-down: node b's agent gives something back before the
    // witness ends.
    let agent_b = b.agent(NODE_B)?.http;
    let unplugs0 = agent_operations(agent_b, "unplug");
    let mut down = None;
    while t0.elapsed() + Duration::from_secs(5) < len {
        b.check()?;
        if agent_operations(agent_b, "unplug") > unplugs0 {
            down = Some(Instant::now());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let w = witness.wait(len + Duration::from_secs(90))?;
    ensure!(w.source == Source::Report, "the witness ended without its report: {w:?}");
    let pause_ms = downtime_ms(&b.agent(NODE_A)?.daemon.log);
    let near = aggregate_max_ms(&log_dir, move_t0 - 2.0, move_t1 + 3.0);
    let m = MoveRun {
        clients: WITNESS_CLIENTS,
        rate: WITNESS_RATE,
        secs: len.as_secs(),
        processed: w.processed,
        failed: w.failed,
        broken: w.broken_connections,
        up_s: Some(secs(up)),
        moved_s: Some(secs(moved)),
        down_s: down.map(secs),
        pause_ms,
        max_latency_near_move_ms: near,
        max_latency_ms: w.max_latency_ms,
        burst_failed: burst.failed,
        burst_broken: burst.broken_connections,
    };
    eprintln!("    move: {m:?}; witness errors {:?}; burst errors {:?}", w.errors, burst.errors);
    Ok(m)
}

/// QEMU's downtime of the move, as the source agent logged it
/// (`downtime_ms=Some(N)` on its "the VM moved away" line).
fn downtime_ms(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("the VM moved away"))?;
    let key = "downtime_ms=Some(";
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(')').next()?.trim().parse().ok()
}

/// The longest transaction in the aggregate logs in `dir` over the
/// intervals that start between `from` and `to` (Unix seconds): `start
/// count sum sum2 min max ...`, latencies in microseconds.
fn aggregate_max_ms(dir: &Path, from: f64, to: f64) -> Option<f64> {
    let mut max: Option<f64> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (Some(start), Some(count), Some(us)) = (f.first(), f.get(1), f.get(5)) else { continue };
            let (Ok(start), Ok(count), Ok(us)) =
                (start.parse::<f64>(), count.parse::<u64>(), us.parse::<f64>())
            else {
                continue;
            };
            if count > 0 && start >= from.floor() && start <= to {
                max = Some(max.map_or(us / 1000.0, |m: f64| m.max(us / 1000.0)));
            }
        }
    }
    max
}

/// Free pages of the guest's kernel zones (all but Movable), MiB, from its
/// `/proc/zoneinfo` read through Postgres.
fn kernel_free_mib(vm: &crate::pg::vm::PgVm) -> anyhow::Result<u64> {
    let sql = "CREATE TEMP TABLE z(l text); COPY z FROM PROGRAM 'cat /proc/zoneinfo'; \
               SELECT string_agg(l, E'\\n') FROM z;";
    let text = vm.conn.query(sql, Duration::from_secs(30))?;
    Ok(zone_free_pages(&text) * 4096 / MIB)
}

/// Sum of `pages free` over the zones that are not Movable.
fn zone_free_pages(zoneinfo: &str) -> u64 {
    let mut zone = "";
    let mut free = 0;
    for l in zoneinfo.lines() {
        if let Some(rest) = l.strip_prefix("Node ") {
            zone = rest.rsplit(' ').next().unwrap_or("");
        } else if let Some(n) = l.trim_start().strip_prefix("pages free") {
            if zone != "Movable" {
                free += n.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    free
}

/// 100 pgbench clients on `pg-boot` (wherever it now runs); its OOM kills
/// and the kernel zones' free memory at the lowest while they ran.
pub(super) fn many_clients(b: &mut Bench) -> anyhow::Result<ManyClients> {
    const CLIENTS_100: u32 = 100;
    let vm = &b.boot;
    let before = vm.conn.guest()?;
    let free_before = kernel_free_mib(vm).ok();
    let run = b.len.clients_100;
    let bench = Pgbench::start(&crate::pg::bench_options(vm, CLIENTS_100, Some(run)), &pgbench::host)?;
    let t = Instant::now();
    let mut lowest: Option<u64> = None;
    let mut lowest_total = before.mem_total_mib();
    while t.elapsed() + Duration::from_secs(3) < run {
        // Each read is a connection of its own; one may be refused while
        // 100 clients hold the server, and that is no error of the run.
        if let Ok(free) = kernel_free_mib(vm) {
            lowest = Some(lowest.map_or(free, |l| l.min(free)));
        }
        if let Ok(g) = vm.conn.guest() {
            lowest_total = lowest_total.max(g.mem_total_mib());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let s = bench.wait(run + Duration::from_secs(120))?;
    let after = vm.conn.guest()?;
    let c = ManyClients {
        clients: CLIENTS_100,
        secs: run.as_secs(),
        oom_kills: after.oom_kills.saturating_sub(before.oom_kills),
        tps: s.tps,
        failed: s.failed,
        broken: s.broken_connections,
        mem_total_mib: lowest_total,
        kernel_free_mib: lowest,
        kernel_free_before_mib: free_before,
    };
    eprintln!("    100 clients: {c:?}; pgbench errors {:?}", s.errors);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_zones_are_all_but_movable() {
        let z =
            "Node 0, zone      DMA\n  pages free     3968\n        min      33\nNode 0, zone    DMA32\n  \
                 pages free     1000\nNode 0, zone  Movable\n  pages free     50000\n";
        assert_eq!(zone_free_pages(z), 4968);
    }

    #[test]
    fn the_source_agents_downtime_is_read_from_its_line() {
        let dir = std::env::temp_dir().join(format!("bench-pgbench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("a.log");
        std::fs::write(
            &log,
            "x\nINFO vm=pg-boot total_ms=Some(812) downtime_ms=Some(17) the VM moved away\n",
        )
        .unwrap();
        assert_eq!(downtime_ms(&log), Some(17.0));
        std::fs::write(dir.join("pgbench.1"), "100 10 0 0 1000 5000\n101 0 0 0 0 0\n103 5 0 0 1000 90000\n")
            .unwrap();
        assert_eq!(aggregate_max_ms(&dir, 100.0, 102.0), Some(5.0));
        assert_eq!(aggregate_max_ms(&dir, 100.0, 104.0), Some(90.0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
