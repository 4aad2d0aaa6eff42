//! The TPS comparison: interleaved rounds on the two guests, and the
//! hot-added vCPU between them.

use anyhow::{ensure, Context};
use std::time::{Duration, Instant};

use super::report::{Phase, Round, ScaleUp};
use super::{Bench, CLIENTS, NODE_H};
use crate::pg::vm::PgVm;
use crate::pgbench::{self, Pgbench};

/// One timed pgbench run of `secs` with `clients` on `vm`; its summary.
pub(super) fn timed(vm: &PgVm, clients: u32, run: Duration) -> anyhow::Result<pgbench::Summary> {
    let opts = crate::pg::bench_options(vm, clients, Some(run));
    let s = Pgbench::start(&opts, &pgbench::host)?.wait(run + Duration::from_secs(90))?;
    ensure!(s.source == pgbench::Source::Report, "pgbench on {} ended without its report: {s:?}", vm.plan.id);
    Ok(s)
}

/// `b.len.rounds` rounds, each a pgbench run on both guests back to back,
/// `pg-boot` first in even rounds, `pg-hot` first in odd ones.
/// Each round goes into `out` as it ends, so a failure keeps the ones before.
pub(super) fn rounds(b: &mut Bench, phase: Phase, out: &mut Vec<Round>) -> anyhow::Result<()> {
    for round in 0..b.len.rounds {
        let order = if round % 2 == 0 { [&b.boot, &b.hot] } else { [&b.hot, &b.boot] };
        for vm in order {
            let vcpus = vm.conn.guest()?.online_cpus;
            let s = timed(vm, CLIENTS, b.len.round)
                .with_context(|| format!("round {round} {} on {}", phase_name(phase), vm.plan.id))?;
            let r = Round {
                phase,
                round,
                guest: vm.plan.id.clone(),
                vcpus,
                tps: s.tps.unwrap_or(0.0),
                failed: s.failed,
                broken: s.broken_connections,
            };
            eprintln!("    {phase:?} round {round}: {} at {vcpus} vCPU(s): {:.1} TPS", r.guest, r.tps);
            out.push(r);
        }
        b.check()?;
    }
    Ok(())
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Before => "before the plug",
        Phase::After => "after the plug",
    }
}

/// A query that returns once the guest has CPUs 0 and 1 online: a shell
/// loop in the guest (run by Postgres, `COPY FROM PROGRAM`) reading the
/// kernel's `online` list every 50 ms, for at most `4000` tries (some
/// minutes under TCG) so that it ends even if psql is gone. It prints the
/// list it saw last.
const WAIT_FOR_CPU1: &str = "CREATE TEMP TABLE w(l text); \
    COPY w FROM PROGRAM 'i=0; while [ \"$(cat /sys/devices/system/cpu/online)\" != 0-1 ] && [ $i -lt 4000 ]; \
    do sleep 0.05; i=$((i+1)); done; cat /sys/devices/system/cpu/online'; \
    SELECT string_agg(l, ',') FROM w;";

/// pgbench on `pg-hot` (its agent running) until its second vCPU is online
/// in the guest, then 10 s more; the time from pgbench's start to it.
pub(super) fn scale_up(b: &mut Bench) -> anyhow::Result<ScaleUp> {
    let agent = b.agent(NODE_H)?;
    let plugs0 = crate::cluster::agent_operations(agent.http, "plug");
    let vm = &b.hot;
    ensure!(vm.conn.guest()?.online_cpus == 1, "pg-hot has more than one vCPU online before its scale-up");
    let target = vm.conn.target.clone();
    let watcher = std::thread::Builder::new()
        .name("cpu1-online".into())
        .spawn(move || pgbench::sql(&target, &pgbench::host, WAIT_FOR_CPU1, Duration::from_secs(400)))?;
    // Long enough for psql to connect and the loop to be running before
    // the clock starts.
    std::thread::sleep(Duration::from_secs(2));
    let bench = Pgbench::start(&crate::pg::bench_options(vm, CLIENTS, None), &pgbench::host)?;
    let t0 = Instant::now();
    let seen = loop {
        if watcher.is_finished() {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(300) {
            let s = bench.stop();
            anyhow::bail!("pg-hot's second vCPU was not online 300 s into pgbench: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = watcher.join().map_err(|_| anyhow::anyhow!("the vCPU watcher's thread panicked"))??;
    if let Some(e) = out.error {
        let _ = bench.stop();
        anyhow::bail!("the guest's vCPU watch failed: {e}");
    }
    ensure!(out.output.trim() == "0-1", "the guest's vCPU watch ended without CPU 1 online: {}", out.output);
    std::thread::sleep(Duration::from_secs(10));
    let s = bench.stop()?;
    let agent = b.agent(NODE_H)?;
    let plugs = crate::cluster::agent_operations(agent.http, "plug").saturating_sub(plugs0);
    let ms = seen.as_secs_f64() * 1000.0;
    eprintln!(
        "    pg-hot: second vCPU online {ms:.0} ms after pgbench started; {plugs} plug(s) by the agent"
    );
    Ok(ScaleUp { ms, plugs, tps: s.tps })
}
