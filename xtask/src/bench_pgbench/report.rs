//! The pgbench benchmark's figures: what each phase measured, the headline
//! figures drawn from them, the JSON and BENCHMARKS.md's section. Pure, so
//! the rendering is tested without a guest.

use serde_json::{json, Value};
use std::fmt::Write as _;

/// Target for `hotplug_tps_ratio`: a hot-added vCPU should serve nearly as
/// well as one the guest booted with.
pub const RATIO_TARGET: f64 = 0.9;
/// Target for `memory_returned_mib`: at least one DIMM.
pub const RETURNED_TARGET_MIB: u64 = 128;

/// Which TPS comparison a round belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `pg-hot` still at 1 vCPU.
    Before,
    /// `pg-hot` with its hot-added second vCPU.
    After,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Before => "before the plug",
            Phase::After => "after the plug",
        }
    }
}

/// One pgbench round on one guest.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub phase: Phase,
    pub round: usize,
    /// `pg-boot` or `pg-hot`.
    pub guest: String,
    /// vCPUs online in the guest as the round began.
    pub vcpus: u32,
    pub tps: f64,
    pub failed: u64,
    pub broken: u32,
}

/// The hot-added vCPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleUp {
    /// pgbench's start to the guest's `online` file saying `0-1`.
    pub ms: f64,
    /// vCPUs QEMU has after it (query-hotpluggable-cpus through the agent's
    /// `/state`), and what the agent did.
    pub plugs: u64,
    pub tps: Option<f64>,
}

/// The sort on `pg-boot`.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRun {
    pub rows: u64,
    pub query_s: f64,
    pub oom_kills: u64,
    /// QEMU's memory: before the query, its largest while the query ran,
    /// and once the agent had unplugged what it would (or the wait ended).
    pub before_mib: u64,
    pub peak_mib: u64,
    pub after_mib: u64,
    /// How long after the query ended the memory was back down.
    pub settle_s: f64,
}

impl MemoryRun {
    pub fn returned_mib(&self) -> u64 {
        self.peak_mib.saturating_sub(self.after_mib)
    }
}

/// The witness pgbench run through a scale-up, a move and a scale-down.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveRun {
    pub clients: u32,
    pub rate: f64,
    pub secs: u64,
    pub processed: u64,
    pub failed: u64,
    pub broken: u32,
    /// Seconds into the witness: the scale-up seen (second vCPU online and
    /// node a filled), the move's order completed, the scale-down seen.
    pub up_s: Option<f64>,
    pub moved_s: Option<f64>,
    pub down_s: Option<f64>,
    /// QEMU's downtime, from the source agent's log.
    pub pause_ms: Option<f64>,
    /// The witness's longest transaction in the seconds around the
    /// switch-over, and over the whole run.
    pub max_latency_near_move_ms: Option<f64>,
    pub max_latency_ms: Option<f64>,
    /// The burst's own count (4 clients, flat out, through the move).
    pub burst_failed: u64,
    pub burst_broken: u32,
}

/// 100 clients at once.
#[derive(Debug, Clone, PartialEq)]
pub struct ManyClients {
    pub clients: u32,
    pub secs: u64,
    pub oom_kills: u64,
    pub tps: Option<f64>,
    pub failed: u64,
    pub broken: u32,
    pub mem_total_mib: u64,
    /// Free memory in the guest's kernel zones (not Movable), MiB: at the
    /// lowest seen while the clients ran.
    pub kernel_free_mib: Option<u64>,
    pub kernel_free_before_mib: Option<u64>,
}

/// Everything measured; a phase that did not run is `None`, with its
/// reason in `errors`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub rounds: Vec<Round>,
    pub scale_up: Option<ScaleUp>,
    pub memory: Option<MemoryRun>,
    pub moved: Option<MoveRun>,
    pub clients: Option<ManyClients>,
    pub errors: Vec<String>,
    /// The guests' CUs and bounds, in words.
    pub shape: String,
}

/// When and how the run was made.
pub struct Session<'a> {
    pub quick: bool,
    pub date: &'a str,
    pub load_before: &'a str,
    pub load_after: &'a str,
    pub minutes: f64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    vmscale_common::stats::quantile(&mut v, 0.5)
}

impl Figures {
    fn tps(&self, phase: Phase, guest: &str) -> Vec<f64> {
        self.rounds.iter().filter(|r| r.phase == phase && r.guest == guest).map(|r| r.tps).collect()
    }

    /// Median TPS of `pg-boot` in the rounds after the plug (the ones the
    /// ratio compares), of `pg-hot` after it and before it.
    pub fn tps_booted(&self) -> Option<f64> {
        median(self.tps(Phase::After, "pg-boot"))
    }
    pub fn tps_hotplugged(&self) -> Option<f64> {
        median(self.tps(Phase::After, "pg-hot"))
    }
    pub fn tps_1vcpu(&self) -> Option<f64> {
        median(self.tps(Phase::Before, "pg-hot"))
    }

    /// Per round after the plug, `pg-hot` over `pg-boot`; their median. A
    /// round's pair ran back to back, so the ratio of a pair is less moved
    /// by the machine's drift than the ratio of two medians.
    pub fn ratio(&self) -> Option<f64> {
        let pairs = self.pair_ratios(Phase::After);
        median(pairs)
    }

    fn pair_ratios(&self, phase: Phase) -> Vec<f64> {
        let of = |guest: &str, round: usize| {
            self.rounds
                .iter()
                .find(|r| r.phase == phase && r.round == round && r.guest == guest)
                .map(|r| r.tps)
        };
        let n = self.rounds.iter().filter(|r| r.phase == phase).map(|r| r.round + 1).max().unwrap_or(0);
        (0..n)
            .filter_map(|i| Some((of("pg-hot", i)?, of("pg-boot", i)?)))
            .filter(|(_, b)| *b > 0.0)
            .map(|(h, b)| h / b)
            .collect()
    }
}

fn f1(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.1}"))
}
fn f0(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.0}"))
}

/// "met", "MISSED", or "" when not measured.
fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "",
    }
}

/// The JSON and the markdown section.
pub fn summarize(f: &Figures, s: &Session<'_>) -> (Value, String) {
    let ratio = f.ratio();
    let moved = f.moved.as_ref();
    let memory = f.memory.as_ref();
    let clients = f.clients.as_ref();
    let v = json!({
        "command": command(s.quick),
        "date": s.date,
        "quick": s.quick,
        "minutes": s.minutes,
        "loadavg_before": s.load_before,
        "loadavg_after": s.load_after,
        "tps_booted_2vcpu": f.tps_booted(),
        "tps_hotplugged_2vcpu": f.tps_hotplugged(),
        "hotplug_tps_ratio": ratio,
        "hotplug_tps_ratio_per_round": f.pair_ratios(Phase::After),
        "tps_1vcpu": f.tps_1vcpu(),
        "tps_booted_2vcpu_before_the_plug": median(f.tps(Phase::Before, "pg-boot")),
        "scale_up_ms": f.scale_up.as_ref().map(|u| u.ms),
        "failed_transactions": moved.map(|m| m.failed),
        "broken_connections": moved.map(|m| m.broken),
        "migration_pause_ms": moved.and_then(|m| m.pause_ms),
        "pgbench_max_latency_ms": moved.and_then(|m| m.max_latency_near_move_ms),
        "memory_query_oom_kills": memory.map(|m| m.oom_kills),
        "memory_returned_mib": memory.map(MemoryRun::returned_mib),
        "oom_kills_100_clients": clients.map(|c| c.oom_kills),
        "rounds": f.rounds.iter().map(|r| json!({
            "phase": r.phase.name(), "round": r.round, "guest": r.guest, "vcpus": r.vcpus,
            "tps": r.tps, "failed": r.failed, "broken_connections": r.broken,
        })).collect::<Vec<_>>(),
        "scale_up": f.scale_up.as_ref().map(|u| json!({"ms": u.ms, "agent_plugs": u.plugs, "tps": u.tps})),
        "memory": memory.map(|m| json!({
            "rows": m.rows, "query_s": m.query_s, "oom_kills": m.oom_kills, "before_mib": m.before_mib,
            "peak_mib": m.peak_mib, "after_mib": m.after_mib, "settle_s": m.settle_s,
        })),
        "move": moved.map(|m| json!({
            "clients": m.clients, "rate": m.rate, "secs": m.secs, "processed": m.processed,
            "failed": m.failed, "broken_connections": m.broken, "up_s": m.up_s, "moved_s": m.moved_s,
            "down_s": m.down_s, "pause_ms": m.pause_ms, "max_latency_near_move_ms": m.max_latency_near_move_ms,
            "max_latency_ms": m.max_latency_ms, "burst_failed": m.burst_failed,
            "burst_broken_connections": m.burst_broken,
        })),
        "clients_100": clients.map(|c| json!({
            "clients": c.clients, "secs": c.secs, "oom_kills": c.oom_kills, "tps": c.tps, "failed": c.failed,
            "broken_connections": c.broken, "mem_total_mib": c.mem_total_mib,
            "kernel_free_mib_lowest": c.kernel_free_mib, "kernel_free_mib_before": c.kernel_free_before_mib,
        })),
        "errors": f.errors,
        "guests": f.shape,
    });
    (v, markdown(f, s))
}

fn command(quick: bool) -> &'static str {
    if quick {
        "cargo xtask bench pgbench --quick"
    } else {
        "cargo xtask bench pgbench"
    }
}

fn markdown(f: &Figures, s: &Session<'_>) -> String {
    let mut md = String::new();
    let ratio = f.ratio();
    let moved = f.moved.as_ref();
    let memory = f.memory.as_ref();
    let clients = f.clients.as_ref();
    let _ = writeln!(md, "## Postgres under pgbench: hotplug, a move, memory, 100 clients\n");
    let _ = writeln!(md, "Command: `{}` (figures also in `target/bench/pgbench.json`).\n", command(s.quick));
    let _ = writeln!(
        md,
        "Run {} on 2 cores, QEMU under TCG (no KVM); {:.1} minutes; load average before {} and after {} \
         (1, 5, 15 min).\n",
        s.date, s.minutes, s.load_before, s.load_after
    );
    let _ = writeln!(md, "| figure | value | target | |\n|---|---:|---|---|");
    let mut row = |name: &str, value: String, target: &str, ok: Option<bool>| {
        let _ = writeln!(md, "| {name} | {value} | {target} | {} |", verdict(ok));
    };
    let after_rounds = f.rounds.iter().filter(|r| r.phase == Phase::After).count() / 2;
    let before_rounds = f.rounds.iter().filter(|r| r.phase == Phase::Before).count() / 2;
    row(
        &format!("`tps_booted_2vcpu`: booted with 2 vCPUs, median of {after_rounds} rounds"),
        f1(f.tps_booted()),
        "",
        None,
    );
    row(
        &format!(
            "`tps_hotplugged_2vcpu`: booted with 1, the 2nd hot-added by the agent, median of {after_rounds}"
        ),
        f1(f.tps_hotplugged()),
        "",
        None,
    );
    row(
        "`hotplug_tps_ratio`: hotplugged / booted, median of the per-round ratios",
        ratio.map_or("n/a".into(), |r| format!("{r:.2}")),
        &format!("≥ {RATIO_TARGET}"),
        ratio.map(|r| r >= RATIO_TARGET),
    );
    row(
        &format!("`tps_1vcpu`: the same guest before its plug, median of {before_rounds}"),
        f1(f.tps_1vcpu()),
        "",
        None,
    );
    row(
        "`scale_up_ms`: pgbench's start to the 2nd vCPU online in the guest",
        f0(f.scale_up.as_ref().map(|u| u.ms)),
        "",
        None,
    );
    row(
        "`failed_transactions`, `broken_connections`: one pgbench run through a scale-up, a move and a scale-down",
        moved.map_or("n/a".into(), |m| format!("{}, {}", m.failed, m.broken)),
        "0, 0",
        moved.map(|m| m.failed == 0 && m.broken == 0 && m.down_s.is_some()),
    );
    row(
        "`migration_pause_ms`: QEMU's downtime of that move (source agent's log)",
        f0(moved.and_then(|m| m.pause_ms)),
        "",
        None,
    );
    row(
        "`pgbench_max_latency_ms`: longest transaction around the switch-over (aggregate log)",
        f0(moved.and_then(|m| m.max_latency_near_move_ms)),
        "",
        None,
    );
    row(
        "`memory_query_oom_kills`: a sort larger than free memory",
        memory.map_or("n/a".into(), |m| m.oom_kills.to_string()),
        "0",
        memory.map(|m| m.oom_kills == 0),
    );
    row(
        "`memory_returned_mib`: unplugged once the sort ended",
        memory.map_or("n/a".into(), |m| m.returned_mib().to_string()),
        &format!("≥ {RETURNED_TARGET_MIB}"),
        memory.map(|m| m.returned_mib() >= RETURNED_TARGET_MIB),
    );
    row(
        "`oom_kills_100_clients`: 100 pgbench clients",
        clients.map_or("n/a".into(), |c| c.oom_kills.to_string()),
        "0",
        clients.map(|c| c.oom_kills == 0),
    );
    md.push('\n');
    let _ = writeln!(
        md,
        "Two guests of the Debian image (PostgreSQL 15, pgbench scale 1, the informant as packaged, on TCP \
         since one of them moves), booted once: `pg-boot` with 2 vCPUs (sysfs CPU mode) and `pg-hot` with 1 \
         of 2 (`cpu_mode = hotplug`); {}. Each round runs {CLIENTS_TEXT} on each guest in turn, which goes first alternating by round, so the \
         machine's noise falls on both. Before the plug no agent runs either guest; then `pg-hot`'s agent \
         plugs its second vCPU under pgbench (QMP `device_add`; under TCG a vCPU `device_del` corrupts QEMU, \
         so that VM's policy has `downscale_after_ms = i64::MAX`, the most its VM file can say: use never \
         stays low that long, and its agent never scales it down). Both guests' agents count CPU pressure events without acting on \
         them (`ignore_pressure = [\"psi_cpu\"]`: an idle TCG guest beside others feels some every few \
         seconds), so CPU follows the load average. The agent starts once the guest's \
         1-minute load average is below 0.5 after its rounds (or after 240 s). `scale_up_ms` is timed from \
         pgbench's start to a perl loop inside the guest (started through Postgres before pgbench, reading \
         `/sys/devices/system/cpu/online` every 20 ms) seeing `0-1`, whose query returns at that moment.\n",
        f.shape
    );
    let _ = writeln!(
        md,
        "| phase | round | guest | vCPUs | TPS | failed | broken |\n|---|---:|---|---:|---:|---:|---:|"
    );
    for r in &f.rounds {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {} | {} |",
            r.phase.name(),
            r.round,
            r.guest,
            r.vcpus,
            r.tps,
            r.failed,
            r.broken
        );
    }
    md.push('\n');
    if let Some(m) = moved {
        let at = |v: Option<f64>| v.map_or("not seen".into(), |x| format!("{x:.0} s"));
        let _ = writeln!(
            md,
            "The move: one pgbench run of {} clients at {} transactions/s for {} s on `pg-boot` (the witness), \
             with 4 clients flat out beside it from 5 s (the burst) until 5 s after the move. The burst grows \
             the VM to its 8 CUs on node a (whose 2000 milli-vCPU it then fills, past its 0.9 watermark); then node \
             b's agent starts and the allocator has the VM moved there live; after the burst, node b's agent \
             scales it down. Seen at: scale-up {}, move completed {}, scale-down {}. The witness processed {} \
             transactions: {} failed, {} broken connections; its longest transaction over the run {} ms, in \
             the seconds around the switch-over {} ms; QEMU's downtime {} ms. The burst: {} failed, {} broken.\n",
            m.clients,
            m.rate,
            m.secs,
            at(m.up_s),
            at(m.moved_s),
            at(m.down_s),
            m.processed,
            m.failed,
            m.broken,
            f0(m.max_latency_ms),
            f0(m.max_latency_near_move_ms),
            f0(m.pause_ms),
            m.burst_failed,
            m.burst_broken
        );
    }
    if let Some(m) = memory {
        let _ = writeln!(
            md,
            "The sort: {} rows shuffled and counted in memory (`work_mem` 2 GB) on `pg-boot` on node a once its \
             agent has given back what it grew for the rounds' load (or after 240 s), {:.0} s; QEMU's memory {} \
             MiB before, {} MiB at most while it ran, {} MiB {:.0} s after it ended; {} OOM \
             kills (the guest's `oom_kill` counter).\n",
            m.rows, m.query_s, m.before_mib, m.peak_mib, m.after_mib, m.settle_s, m.oom_kills
        );
    }
    if let Some(c) = clients {
        let _ = writeln!(
            md,
            "100 clients: {} clients for {} s on `pg-boot` (guest MemTotal {} MiB): {} OOM kills, {} TPS, {} \
             failed, {} broken; free memory in the guest's kernel zones (DMA, DMA32, Normal; hot-plugged \
             memory is Movable and cannot hold page tables or kernel stacks) {} MiB before, {} MiB at the \
             lowest while they ran.\n",
            c.clients,
            c.secs,
            c.mem_total_mib,
            c.oom_kills,
            f1(c.tps),
            c.failed,
            c.broken,
            c.kernel_free_before_mib.map_or("n/a".into(), |x| x.to_string()),
            c.kernel_free_mib.map_or("n/a".into(), |x| x.to_string()),
        );
    }
    for e in &f.errors {
        let _ = writeln!(md, "Not measured: {e}\n");
    }
    md.trim_end().to_owned()
}

/// The round's load, as the section says it.
const CLIENTS_TEXT: &str = "pgbench with 8 clients (TPC-B-like, prepared statements)";

#[cfg(test)]
mod tests {
    use super::*;

    fn round(phase: Phase, round: usize, guest: &str, vcpus: u32, tps: f64) -> Round {
        Round { phase, round, guest: guest.into(), vcpus, tps, failed: 0, broken: 0 }
    }

    fn figures() -> Figures {
        Figures {
            rounds: vec![
                round(Phase::Before, 0, "pg-boot", 2, 100.0),
                round(Phase::Before, 0, "pg-hot", 1, 50.0),
                round(Phase::After, 0, "pg-boot", 2, 100.0),
                round(Phase::After, 0, "pg-hot", 2, 95.0),
                round(Phase::After, 1, "pg-hot", 2, 40.0),
                round(Phase::After, 1, "pg-boot", 2, 50.0),
            ],
            scale_up: Some(ScaleUp { ms: 4321.0, plugs: 2, tps: Some(60.0) }),
            memory: Some(MemoryRun {
                rows: 3_000_000,
                query_s: 40.0,
                oom_kills: 0,
                before_mib: 1024,
                peak_mib: 2048,
                after_mib: 1024,
                settle_s: 30.0,
            }),
            moved: None,
            clients: Some(ManyClients {
                clients: 100,
                secs: 40,
                oom_kills: 2,
                tps: Some(30.0),
                failed: 0,
                broken: 3,
                mem_total_mib: 1500,
                kernel_free_mib: Some(12),
                kernel_free_before_mib: Some(400),
            }),
            errors: vec!["move under pgbench: the order failed".into()],
            shape: "CUs of 250 milli-vCPU + 128 MiB".into(),
        }
    }

    #[test]
    fn the_ratio_is_the_median_of_back_to_back_pairs() {
        let f = figures();
        // Pairs: 95/100 and 40/50; the median of two is the lower (nearest rank).
        assert_eq!(f.pair_ratios(Phase::After), [0.95, 0.8]);
        assert_eq!(f.ratio(), Some(0.8));
        assert_eq!(f.tps_1vcpu(), Some(50.0));
        assert_eq!(f.tps_booted(), Some(50.0));
    }

    #[test]
    fn the_section_names_every_figure_its_verdict_and_what_was_not_measured() {
        let s = Session {
            quick: false,
            date: "2026-12-06 07:00 UTC",
            load_before: "1.0 1.1 1.2",
            load_after: "2.0 1.5 1.3",
            minutes: 18.0,
        };
        let (v, md) = summarize(&figures(), &s);
        assert_eq!(v["hotplug_tps_ratio"], 0.8);
        assert_eq!(v["memory_returned_mib"], 1024);
        assert_eq!(v["oom_kills_100_clients"], 2);
        assert_eq!(v["failed_transactions"], Value::Null);
        assert_eq!(v["command"], "cargo xtask bench pgbench");
        assert!(md.contains("Command: `cargo xtask bench pgbench`"), "{md}");
        assert!(md.contains("2026-12-06 07:00 UTC") && md.contains("before 1.0 1.1 1.2"), "{md}");
        assert!(md.contains("| `hotplug_tps_ratio`: hotplugged / booted, median of the per-round ratios | 0.80 | ≥ 0.9 | MISSED |"), "{md}");
        assert!(
            md.contains("| `memory_returned_mib`: unplugged once the sort ended | 1024 | ≥ 128 | met |"),
            "{md}"
        );
        assert!(md.contains("| `oom_kills_100_clients`: 100 pgbench clients | 2 | 0 | MISSED |"), "{md}");
        assert!(
            md.contains("| `scale_up_ms`: pgbench's start to the 2nd vCPU online in the guest | 4321 |"),
            "{md}"
        );
        assert!(md.contains("| after the plug | 1 | pg-hot | 2 | 40.0 | 0 | 0 |"), "{md}");
        assert!(md.contains("Not measured: move under pgbench: the order failed"), "{md}");
        assert!(md.contains("| n/a | 0, 0 |"), "the move's row has no value: {md}");
        assert!(md.contains("(`cpu_mode = hotplug`); CUs of 250 milli-vCPU + 128 MiB. Each round"), "{md}");
        assert!(!md.ends_with('\n'));
    }
}
