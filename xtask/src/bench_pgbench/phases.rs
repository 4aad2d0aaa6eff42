//! The TPS comparison: interleaved rounds on the two guests, and the
//! hot-added vCPU between them.

use anyhow::{ensure, Context};
use std::time::{Duration, Instant};

use super::report::{Phase, Round, ScaleUp};
use super::{Bench, CLIENTS, NODE_H};
use crate::cluster::net::AgentPlan;
use crate::pg::vm::PgVm;
use crate::pgbench::{self, Pgbench};
use vmscale_agent::vms::VmSpec;

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

/// A query that returns once the guest has CPUs 0 and 1 online: a perl
/// loop in the guest (run by Postgres, `COPY FROM PROGRAM`; perl-base is in
/// every Debian) reading the kernel's `online` list every 20 ms, in one
/// process, so that watching costs the 1-vCPU guest next to nothing (a
/// shell loop forking `cat` and `sleep` would load it itself). At most
/// 15,000 reads, so it ends even if psql is gone; it prints the list it saw
/// last.
const WAIT_FOR_CPU1: &str = r#"CREATE TEMP TABLE w(l text);
COPY w FROM PROGRAM 'perl -e ''my $l = ""; for (1..15000) { open(my $f, "<", "/sys/devices/system/cpu/online") or die; $l = <$f>; close $f; chomp $l; last if $l eq "0-1"; select(undef, undef, undef, 0.02) } print "$l\n"''';
SELECT string_agg(l, ',') FROM w;"#;

/// The guest's 1-minute load average, through Postgres.
fn load1(vm: &PgVm) -> anyhow::Result<f64> {
    let sql = "CREATE TEMP TABLE a(l text); COPY a FROM PROGRAM 'cat /proc/loadavg'; SELECT l FROM a;";
    let out = vm.conn.query(sql, Duration::from_secs(30))?;
    out.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("/proc/loadavg said {out:?}"))
}

/// Starts `pg-hot`'s agent (its policy never scales down) and times its
/// scale-up under pgbench: from pgbench's start to the guest's second vCPU
/// online, then 10 s more of load.
///
/// The agent starts only now, once the guest's 1-minute load average (the
/// agent's CPU signal) has fallen below 0.5 after the rounds before: started at once,
/// it plugged the vCPU for that old load before pgbench began (seen in a
/// quick run).
pub(super) fn scale_up(b: &mut Bench, plan: &AgentPlan, spec: VmSpec) -> anyhow::Result<ScaleUp> {
    // The agent's CPU goal is the load over `cpu_target` (0.7) vCPUs, so
    // below 0.5 it wants one. An idle guest under TCG on a busy host keeps a
    // load of 0.5-0.7 of its own (seen): after 240 s the agent starts anyway.
    let t = Instant::now();
    let mut load = load1(&b.hot)?;
    while load >= 0.5 && t.elapsed() < Duration::from_secs(240) {
        b.check()?;
        std::thread::sleep(Duration::from_secs(5));
        load = load1(&b.hot)?;
    }
    eprintln!(
        "    pg-hot idle after {:.0} s (1-minute load {load:.2}); starting its agent",
        t.elapsed().as_secs_f64()
    );
    ensure!(b.hot.conn.guest()?.online_cpus == 1, "pg-hot has more than one vCPU online before its scale-up");
    let target = b.hot.conn.target.clone();
    let watcher = std::thread::Builder::new()
        .name("cpu1-online".into())
        .spawn(move || pgbench::sql(&target, &pgbench::host, WAIT_FOR_CPU1, Duration::from_secs(600)))?;
    b.start_agent(NODE_H, plan, &[spec])?;
    // A few seconds for the agent's first look at the idle guest: in the
    // run of 06:37 it plugged the vCPU 0.46 s before pgbench started (a CPU
    // pressure event of the idle guest on a busy host grew it by half), and
    // the figure then timed the guest's onlining, not a reaction to pgbench.
    std::thread::sleep(Duration::from_secs(3));
    let plugs0 = crate::cluster::agent_operations(b.agent(NODE_H)?.http, "plug");
    if watcher.is_finished() || plugs0 > 0 {
        let out = if watcher.is_finished() {
            format!(
                "{:?}",
                watcher.join().map_err(|_| anyhow::anyhow!("the vCPU watcher's thread panicked"))?
            )
        } else {
            "still waiting".into()
        };
        anyhow::bail!(
            "the agent grew pg-hot before pgbench started ({plugs0} plug(s); CPU pressure of the idle guest on a \
             busy host?), so there is no scale-up to time; the watcher: {out}; see {}'s log",
            plan.name
        );
    }
    let vm = &b.hot;
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
    let plugs = crate::cluster::agent_operations(b.agent(NODE_H)?.http, "plug").saturating_sub(plugs0);
    let ms = seen.as_secs_f64() * 1000.0;
    eprintln!(
        "    pg-hot: second vCPU online {ms:.0} ms after pgbench started; {plugs} plug(s) by the agent"
    );
    Ok(ScaleUp { ms, plugs, tps: s.tps })
}
