//! The closing summary: per phase pg-1's TPS, vCPUs and memory; the move;
//! pgbench's errors; and one `check:` line per claim of the demo, which its
//! test reads. Pure: the demo collects an [`Outcome`].

use std::fmt::Write as _;

use super::nodes::{B, PG2};
use super::timeline::{scalings, Resource, VmPoint};
use crate::pgbench::Summary;

/// pg-1's figures over one phase.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PhaseStats {
    pub name: String,
    pub start: f64,
    pub end: f64,
    tps_sum: f64,
    tps_n: u32,
    pub vcpus: Option<(f64, f64)>,
    pub memory_mib: Option<(f64, f64)>,
}

impl PhaseStats {
    pub fn new(name: &str, start: f64) -> PhaseStats {
        PhaseStats {
            name: name.into(),
            start,
            end: start,
            tps_sum: 0.0,
            tps_n: 0,
            vcpus: None,
            memory_mib: None,
        }
    }

    pub fn add(&mut self, p: &VmPoint) {
        self.end = p.t;
        if let Some(t) = p.tps {
            self.tps_sum += t;
            self.tps_n += 1;
        }
        let widen = |r: Option<(f64, f64)>, v: f64| Some(r.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))));
        if let Some(v) = p.vcpus {
            self.vcpus = widen(self.vcpus, v);
        }
        if let Some(m) = p.memory_mib {
            self.memory_mib = widen(self.memory_mib, m);
        }
    }

    /// The mean of the seconds that had a pgbench sample.
    pub fn tps(&self) -> Option<f64> {
        (self.tps_n > 0).then(|| self.tps_sum / f64::from(self.tps_n))
    }
}

/// A move that completed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Move {
    pub order: u64,
    pub vm: String,
    pub from: String,
    pub to: String,
    /// Seconds on the demo's clock: the order first seen, seen completed.
    pub start: f64,
    pub end: f64,
}

/// The pgbench run against pg-2 across its move.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SideRun {
    pub clients: u32,
    pub start: f64,
    pub end: f64,
    pub summary: Summary,
}

/// What the demo saw, for its summary.
#[derive(Debug, Clone, Default)]
pub(super) struct Outcome {
    pub two_nodes: bool,
    pub stats: Vec<PhaseStats>,
    /// pg-1 over the whole demo.
    pub pg1: Vec<VmPoint>,
    /// pg-1's bounds: (vCPUs, MiB) at its minimum.
    pub pg1_min: (f64, f64),
    /// The ledger's reservation of pg-1 at the end: (vCPUs, MiB).
    pub pg1_reserved: Option<(f64, f64)>,
    /// Every pgbench run: what it was, what it did.
    pub runs: Vec<(String, Summary)>,
    pub side: Option<SideRun>,
    pub moves: Vec<Move>,
    /// The sort: its rows, seconds and error, if it ran.
    pub sort: Option<(u64, f64, Option<String>)>,
    /// pg-1's memory at its largest during the sort, MiB.
    pub sort_peak_mib: Option<f64>,
    /// OOM kills in pg-1: the guest kernel's count (`/proc/vmstat`, as last
    /// read) and its console's lines.
    pub oom_vmstat: Option<u64>,
    pub oom_console: usize,
}

/// The summary's text and whether every check passed.
pub(super) fn report(o: &Outcome) -> (String, bool) {
    let mut s = String::new();
    let _ = writeln!(s, "\nsummary (pg-1; TPS is the mean of pgbench's one-second samples):");
    let _ = writeln!(s, "  {:<28} {:>6} {:>8} {:>9} {:>12}", "phase", "secs", "TPS", "vCPUs", "memory MiB");
    for p in &o.stats {
        let range = |r: Option<(f64, f64)>, f: fn(f64) -> String| match r {
            None => "-".to_owned(),
            Some((lo, hi)) if lo == hi => f(lo),
            Some((lo, hi)) => format!("{}-{}", f(lo), f(hi)),
        };
        let _ = writeln!(
            s,
            "  {:<28} {:>6.0} {:>8} {:>9} {:>12}",
            super::view::cut(&p.name, 28),
            p.end - p.start,
            p.tps().map_or("-".into(), |t| format!("{t:.1}")),
            range(p.vcpus, |v| if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.2}") }),
            range(p.memory_mib, |m| format!("{m:.0}")),
        );
    }
    let ev = scalings(&o.pg1);
    let count = |r: Resource, up: bool| ev.iter().filter(|e| e.resource == r && e.up == up).count();
    let last = o.pg1.iter().rev().find_map(|p| Some((p.vcpus?, p.memory_mib?)));
    let peak = |f: fn(&VmPoint) -> Option<f64>| {
        o.pg1.iter().filter_map(f).fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    };
    let (peak_cpu, peak_mem) = (peak(|p| p.vcpus), peak(|p| p.memory_mib));
    let _ = writeln!(
        s,
        "pg-1: {} vCPU and {} memory upscales, {} and {} downscales; at most {} vCPUs and {} MiB; at the end {}; \
         the ledger holds {}",
        count(Resource::Cpu, true),
        count(Resource::Memory, true),
        count(Resource::Cpu, false),
        count(Resource::Memory, false),
        peak_cpu.map_or("?".into(), |c| format!("{c}")),
        peak_mem.map_or("?".into(), |m| format!("{m:.0}")),
        last.map_or("?".into(), |(c, m)| format!("{c} vCPUs and {m:.0} MiB")),
        o.pg1_reserved.map_or("?".into(), |(c, m)| format!("{c} vCPUs and {m:.0} MiB")),
    );
    match &o.sort {
        Some((rows, secs, err)) => {
            let _ = writeln!(
                s,
                "memory-hungry sort: {rows} rows in {secs:.0} s{}; pg-1's memory up to {} MiB meanwhile",
                err.as_ref().map_or(String::new(), |e| format!(", FAILED: {e}")),
                o.sort_peak_mib.map_or("?".into(), |m| format!("{m:.0}")),
            );
        }
        None => {
            let _ = writeln!(s, "memory-hungry sort: not run");
        }
    }
    let _ = writeln!(
        s,
        "OOM kills in pg-1: {} (guest kernel's count since boot), {} on its console",
        o.oom_vmstat.map_or("unknown".into(), |n| n.to_string()),
        o.oom_console
    );
    for m in &o.moves {
        let _ = writeln!(
            s,
            "move: {} {} -> {} (order {}), from {:.0} s to {:.0} s on the demo's clock",
            m.vm, m.from, m.to, m.order, m.start, m.end
        );
    }
    if let Some(r) = &o.side {
        let _ = writeln!(
            s,
            "pgbench against pg-2 ({} clients, {:.0} s to {:.0} s): {} transactions, {} failed, {} broken connections, \
             max latency {}",
            r.clients,
            r.start,
            r.end,
            r.summary.processed,
            r.summary.failed,
            r.summary.broken_connections,
            r.summary.max_latency_ms.or(r.summary.worst_second_latency_ms).map_or("?".into(), |l| format!("{l:.0} ms"))
        );
    }
    let all: Vec<&Summary> =
        o.runs.iter().map(|(_, r)| r).chain(o.side.as_ref().map(|r| &r.summary)).collect();
    let dirty: Vec<String> = o
        .runs
        .iter()
        .map(|(what, r)| (what.as_str(), r))
        .chain(o.side.as_ref().map(|r| ("pg-2 across the move", &r.summary)))
        .filter(|(_, r)| !r.clean())
        .map(|(what, r)| {
            format!("{what}: {} failed, {} broken, {:?}", r.failed, r.broken_connections, r.errors)
        })
        .collect();
    let _ = writeln!(
        s,
        "pgbench: {} runs, {} transactions, errors: {}{}",
        all.len(),
        all.iter().map(|r| r.processed).sum::<u64>(),
        all.iter().map(|r| r.failed + u64::from(r.broken_connections)).sum::<u64>(),
        if dirty.is_empty() { String::new() } else { format!(" ({})", dirty.join("; ")) }
    );

    let at_min = last.is_some_and(|(c, m)| c <= o.pg1_min.0 && m <= o.pg1_min.1);
    let mut checks = vec![
        (
            "pg-1's vCPUs grew and came back down",
            count(Resource::Cpu, true) > 0 && count(Resource::Cpu, false) > 0 && at_min,
        ),
        (
            "pg-1's memory grew and came back down",
            count(Resource::Memory, true) > 0 && count(Resource::Memory, false) > 0 && at_min,
        ),
        (
            "the memory-hungry sort ran and pg-1's memory grew during it",
            o.sort.as_ref().is_some_and(|(_, _, e)| e.is_none())
                && o.sort_peak_mib.is_some_and(|m| m > o.pg1_min.1),
        ),
        ("no OOM kill in pg-1", o.oom_vmstat == Some(0) && o.oom_console == 0),
        (
            "the ledger released pg-1 back to its minimum",
            o.pg1_reserved.is_some_and(|(c, m)| c <= o.pg1_min.0 && m <= o.pg1_min.1),
        ),
        ("pgbench saw no error", !all.is_empty() && dirty.is_empty()),
    ];
    if o.two_nodes {
        let moved = o.moves.iter().find(|m| m.vm == PG2 && m.to == B);
        let under = match (moved, &o.side) {
            (Some(m), Some(r)) => {
                r.start < m.start && r.end > m.end && r.summary.processed > 0 && r.summary.clean()
            }
            _ => false,
        };
        checks.push(("pg-2 moved live to node-b under pgbench, which saw no error", under));
    }
    let mut ok = true;
    for (what, pass) in checks {
        ok &= pass;
        let _ = writeln!(s, "check: {what}: {}", if pass { "yes" } else { "NO" });
    }
    (s, ok)
}
