//! Measuring helpers (percentiles, RSS, CPU time, the machine) and the
//! rendering of the figures: a plain summary and the BENCHMARKS.md section.

use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::process::Command;

/// Percentile `p` (0..=100) of nanosecond samples, in milliseconds; sorts them.
pub fn percentile_ms(samples: &mut [u64], p: f64) -> f64 {
    vmscale_common::stats::quantile(samples, p / 100.0).map_or(f64::NAN, |ns| ns as f64 / 1e6)
}

/// `VmRSS` and `VmHWM` (peak) of this process, in MiB.
pub fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:") as f64 / 1024.0, kib("VmHWM:") as f64 / 1024.0)
}

/// User plus system CPU time of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here; in
    // clock ticks, which are 100 per second on every Linux this runs on.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

pub fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| (kib + (1 << 19)) >> 20);
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    json!({ "cores": cores, "cpu": model, "memory_gib": mem_gib })
}

/// A JSON number for a table ("?" when absent).
pub fn fmt_value(v: &Value) -> String {
    v.as_f64().map_or_else(|| "?".to_owned(), fmt_num)
}

fn num(m: &Map<String, Value>, k: &str) -> f64 {
    m.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// (label, key, target, unit, true when higher is better)
const HEADLINES: [(&str, &str, f64, &str, bool); 5] = [
    ("core decisions", "core_decisions_per_s", 1_000_000.0, "/s", true),
    ("gRPC reservations, most sustained", "grpc_reservations_per_s", 50_000.0, "/s", true),
    ("gRPC p99 at an offered 10,000/s", "grpc_p99_ms", 2.0, "ms", false),
    ("500,000-VM simulation, peak RSS", "sim_rss_mib", 1024.0, "MiB", false),
    ("one planning round, worst", "sim_plan_ms", 100.0, "ms", false),
];

fn verdict(value: f64, target: f64, higher: bool) -> &'static str {
    let ok = if higher { value >= target } else { value <= target };
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// A figure as people write it: thousands separated, whole numbers without
/// decimals, small ones with a few.
pub fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 && v < 1000.0 {
        format!("{v:.0}")
    } else if v >= 1000.0 {
        // Thousands separated, as the issue writes them.
        let s = format!("{v:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The headline figures, one line each, with their targets.
pub fn summary(m: &Map<String, Value>) -> String {
    let mut s = String::from("allocator benchmark figures\n");
    for (label, key, target, unit, higher) in HEADLINES {
        let v = num(m, key);
        let cmp = if higher { ">=" } else { "<=" };
        let _ = writeln!(
            s,
            "  {key:<26} {:>12} {unit:<4} ({label}; target {cmp} {} {unit}: {})",
            fmt_num(v),
            fmt_num(target),
            verdict(v, target, higher)
        );
    }
    let _ =
        writeln!(s, "  sim_nodes {}, sim_vms {}", fmt_num(num(m, "sim_nodes")), fmt_num(num(m, "sim_vms")));
    s
}

/// The "Allocator" section of BENCHMARKS.md, from the merged figures.
pub fn markdown(m: &Map<String, Value>) -> String {
    let s_ = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    let machine = m.get("machine").cloned().unwrap_or(Value::Null);
    let mut s = String::new();
    let _ = writeln!(s, "## Allocator\n");
    let _ = writeln!(
        s,
        "Command: `cargo xtask bench allocator` (figures also in `target/bench/allocator.json`).\n"
    );
    let _ = writeln!(
        s,
        "Run {} on {} cores ({}), {} GiB; load average before {} and after {} (1, 5, 15 min).\n",
        s_("date"),
        machine["cores"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["memory_gib"],
        s_("load_before"),
        s_("load_after"),
    );
    let busy = s_("load_before").split_whitespace().next().and_then(|l| l.parse::<f64>().ok());
    if busy.is_some_and(|l| l > 1.0) {
        let _ = writeln!(
            s,
            "Other work (builds by other engineers) was running on this machine when the run started; \
             the figures may be lower than on an idle machine.\n"
        );
    }
    if m.get("quick").and_then(Value::as_bool) == Some(true) {
        let _ = writeln!(s, "**Quick run (`--quick`): shortened, not the figures of record.**\n");
    }
    let _ = writeln!(s, "| figure | value | target | |\n|---|---:|---|---|");
    for (label, key, target, unit, higher) in HEADLINES {
        let v = num(m, key);
        let cmp = if higher { "≥" } else { "≤" };
        let _ = writeln!(
            s,
            "| `{key}`: {label} | {} {unit} | {cmp} {} {unit} | {} |",
            fmt_num(v),
            fmt_num(target),
            verdict(v, target, higher)
        );
    }
    let _ = writeln!(
        s,
        "| `sim_nodes`, `sim_vms` | {}, {} | 5,000, 500,000 | |",
        fmt_num(num(m, "sim_nodes")),
        fmt_num(num(m, "sim_vms"))
    );
    let _ = writeln!(s);
    s.push_str(&crate::grpc::markdown(m));
    s.push_str(&crate::decisions::markdown(m));
    s.push_str(&crate::sim::markdown(m));
    s
}
