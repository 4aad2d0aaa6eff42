//! The report of `cargo xtask bench e2e`: the runs' figures summed up per
//! mode and step, as JSON (`target/bench/e2e.json`) and as the Markdown
//! section of BENCHMARKS.md.

use serde_json::{json, Value};

use super::{
    pct, Mode, Run, Step, Target, BOOT_MIB, CU_MIB, FLOOR_PLUGS, MAX_CUS, MODES, RELIEF_TARGET_X, TARGET_MIB,
};

/// Pressure events by kind summed over runs.
fn kinds(rs: &[&Run]) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for r in rs {
        for (k, n) in &r.pressure_kinds {
            *m.entry(k.clone()).or_default() += n;
        }
    }
    m
}

/// When and how the runs were made.
pub(super) struct Session<'a> {
    pub quick: bool,
    pub date: &'a str,
    pub load_before: &'a str,
    pub load_after: &'a str,
    pub minutes: f64,
}

/// The runs summed up: what the JSON and the Markdown both say.
struct Figures<'a> {
    runs: &'a [Run],
    /// The steps in the order they ran.
    steps: Vec<Step>,
    relief_e: Vec<f64>,
    relief_p: Vec<f64>,
    relief_m: Vec<f64>,
    relief_n: Vec<f64>,
    split_e: Value,
    split_n: Value,
    oom_e: usize,
    oom_p: usize,
    oom_m: usize,
    oom_n: usize,
    ahead_e: usize,
    at_line_e: usize,
    crossings_e: usize,
    floors: Vec<f64>,
    floor_p50: Option<f64>,
    e_p50: Option<f64>,
    e_p99: Option<f64>,
    p_p99: Option<f64>,
    /// Per target: the fastest ramp without OOM kill, event-driven.
    max_shipped: Option<f64>,
    max_watermark: Option<f64>,
    /// Steps where the event-driven runs saw no OOM kill and polling did.
    split: Vec<Step>,
    relief_met: Option<bool>,
}

impl<'a> Figures<'a> {
    fn of(&self, m: Mode) -> impl Iterator<Item = &'a Run> {
        self.runs.iter().filter(move |r| r.mode == m)
    }

    fn at(&self, m: Mode, step: Step) -> impl Iterator<Item = &'a Run> {
        self.of(m).filter(move |r| r.step == step)
    }

    fn oom_at(&self, m: Mode, step: Step) -> usize {
        self.at(m, step).map(|r| r.oom_kills).sum()
    }

    fn new(runs: &'a [Run]) -> Figures<'a> {
        let of = |m: Mode| runs.iter().filter(move |r| r.mode == m);
        let sum = |m: Mode, f: fn(&Run) -> usize| of(m).map(f).sum::<usize>();
        let mut steps: Vec<Step> = Vec::new();
        for r in runs {
            if !steps.contains(&r.step) {
                steps.push(r.step);
            }
        }
        let relief_e = relief_of(of(Mode::Events));
        let relief_p = relief_of(of(Mode::Polling));
        let floors: Vec<f64> = runs.iter().flat_map(|r| r.floor_ms.iter().copied()).collect();
        let mut f = Figures {
            runs,
            relief_m: relief_of(of(Mode::MemoryEvents)),
            relief_n: relief_of(of(Mode::NoLead)),
            split_e: split_p50(&of(Mode::Events).collect::<Vec<_>>()),
            split_n: split_p50(&of(Mode::NoLead).collect::<Vec<_>>()),
            oom_e: sum(Mode::Events, |r| r.oom_kills),
            oom_p: sum(Mode::Polling, |r| r.oom_kills),
            oom_m: sum(Mode::MemoryEvents, |r| r.oom_kills),
            oom_n: sum(Mode::NoLead, |r| r.oom_kills),
            ahead_e: sum(Mode::Events, |r| r.watermark_ahead),
            at_line_e: sum(Mode::Events, |r| r.watermark_at_line),
            crossings_e: sum(Mode::Events, |r| r.crossings),
            floor_p50: pct(&floors, 50.0),
            e_p50: pct(&relief_e, 50.0),
            e_p99: pct(&relief_e, 99.0),
            p_p99: pct(&relief_p, 99.0),
            floors,
            relief_e,
            relief_p,
            steps,
            max_shipped: None,
            max_watermark: None,
            split: Vec::new(),
            relief_met: None,
        };
        f.max_shipped = f.max_ok(Target::Shipped);
        f.max_watermark = f.max_ok(Target::Watermark);
        f.split = f
            .steps
            .iter()
            .copied()
            .filter(|&s| f.oom_at(Mode::Events, s) == 0 && f.oom_at(Mode::Polling, s) > 0)
            .collect();
        f.relief_met = f.e_p99.zip(f.floor_p50).map(|(p, fl)| p <= RELIEF_TARGET_X * fl);
        f
    }

    /// The fastest step at `target` whose event-driven runs saw no OOM
    /// kill, as the slowest of those runs reached.
    fn max_ok(&self, target: Target) -> Option<f64> {
        self.steps
            .iter()
            .filter(|s| s.target == target && self.oom_at(Mode::Events, **s) == 0)
            .filter_map(|&s| self.at(Mode::Events, s).filter_map(|r| r.achieved).reduce(f64::min))
            .reduce(f64::max)
    }
}

/// Every relief sample of `rs`, ms.
fn relief_of<'a>(rs: impl Iterator<Item = &'a Run>) -> Vec<f64> {
    rs.flat_map(|r| r.relief_ms.iter().copied()).collect()
}

/// The figures (JSON) and the BENCHMARKS.md section.
pub(super) fn summarize(runs: &[Run], session: &Session<'_>) -> (Value, String) {
    let f = Figures::new(runs);
    let mut md = String::new();
    md_header(&f, session, &mut md);
    md_figures(&f, &mut md);
    md_method(&f, &mut md);
    md_steps(&f, &mut md);
    (json_figures(&f, session), md)
}

/// One step's figures for one mode, as JSON.
fn step_json(rs: &[&Run]) -> Value {
    let rel = relief_of(rs.iter().copied());
    json!({
        "runs": rs.len(),
        "achieved_mib_per_s": rs.iter().map(|r| r.achieved).collect::<Vec<_>>(),
        "oom_kills": rs.iter().map(|r| r.oom_kills).sum::<usize>(),
        "crossings": rs.iter().map(|r| r.crossings).sum::<usize>(),
        "watermark_events_ahead": rs.iter().map(|r| r.watermark_ahead).sum::<usize>(),
        "watermark_events_at_line": rs.iter().map(|r| r.watermark_at_line).sum::<usize>(),
        "relief_samples": rel.len(),
        "relief_p50_ms": pct(&rel, 50.0),
        "relief_max_ms": pct(&rel, 100.0),
        "pressure_events": rs.iter().map(|r| r.pressure_events).collect::<Vec<_>>(),
        "pressure_kinds": kinds(rs),
        "dimms_at_end": rs.iter().map(|r| r.dimms).collect::<Vec<_>>(),
    })
}

fn json_figures(f: &Figures<'_>, session: &Session<'_>) -> Value {
    let steps_json: Vec<Value> = f
        .steps
        .iter()
        .map(|&step| {
            let per = |m: Mode| step_json(&f.at(m, step).collect::<Vec<_>>());
            json!({
                "memory_target": step.target.value(),
                "rate_mib_per_s": step.rate,
                "workers": step.workers,
                "event_driven": per(Mode::Events),
                "memory_events_only": per(Mode::MemoryEvents),
                "event_driven_no_lead": per(Mode::NoLead),
                "polling": per(Mode::Polling),
            })
        })
        .collect();
    json!({
        "date": session.date,
        "quick": session.quick,
        "load_before": session.load_before,
        "load_after": session.load_after,
        "minutes": session.minutes,
        "guest": { "boot_mib": BOOT_MIB, "cu_mib": CU_MIB, "max_cus": MAX_CUS, "ramp_to_mib": TARGET_MIB },
        "relief_p50_ms": f.e_p50,
        "relief_p99_ms": f.e_p99,
        "relief_samples": f.relief_e.len(),
        "watermark_events_ahead_event_driven": f.ahead_e,
        "watermark_events_at_line_event_driven": f.at_line_e,
        "crossings_event_driven": f.crossings_e,
        "relief_p50_ms_no_lead": pct(&f.relief_n, 50.0),
        "relief_p99_ms_no_lead": pct(&f.relief_n, 99.0),
        "relief_samples_no_lead": f.relief_n.len(),
        "relief_split_p50_ms": f.split_e,
        "relief_split_p50_ms_no_lead": f.split_n,
        "oom_kills_no_lead": f.oom_n,
        "relief_p50_ms_memory_events_only": pct(&f.relief_m, 50.0),
        "relief_p99_ms_memory_events_only": pct(&f.relief_m, 99.0),
        "relief_samples_memory_events_only": f.relief_m.len(),
        "oom_kills_memory_events_only": f.oom_m,
        "relief_p50_ms_polling": pct(&f.relief_p, 50.0),
        "relief_p99_ms_polling": f.p_p99,
        "relief_samples_polling": f.relief_p.len(),
        "hotplug_floor_ms": f.floor_p50,
        "hotplug_floor_p99_ms": pct(&f.floors, 99.0),
        "hotplug_floor_samples": f.floors.len(),
        "oom_kills_event_driven": f.oom_e,
        "oom_kills_polling": f.oom_p,
        "ramp_mib_per_s_max": f.max_shipped,
        "ramp_mib_per_s_max_target_0_9": f.max_watermark,
        "steps_event_driven_clean_polling_oom": f.split.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "targets": {
            "relief_p99_within_1_5x_floor": f.relief_met,
            "zero_oom_event_driven_where_polling_has_some": !f.split.is_empty(),
        },
        "steps": steps_json,
    })
}

fn ms(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{x:.0} ms"))
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        // No sample: use never passed 90% (memory came first), or no run.
        None => "not shown: no crossing",
    }
}

/// How many runs each mode had at each step.
fn reps(f: &Figures<'_>) -> usize {
    f.runs.len() / (MODES.len() * f.steps.len()).max(1)
}

fn md_header(f: &Figures<'_>, session: &Session<'_>, md: &mut String) {
    let quick = session.quick;
    md.push_str("## End to end: relief under a memory ramp, event-driven against polling\n\n");
    md.push_str(&format!(
        "Command: `cargo xtask bench e2e{}` (figures also in `target/bench/e2e.json`).{}\n\n",
        if quick { " --quick" } else { "" },
        if quick { " **Quick run**: one run per mode and step, fewer rates." } else { "" }
    ));
    md.push_str(&format!(
        "Run {} on 2 cores, QEMU under TCG; {:.1} minutes, {} runs; load average before {} \
         and after {} (1, 5, 15 min).\n\n",
        session.date,
        session.minutes,
        f.runs.len(),
        session.load_before,
        session.load_after
    ));
}

/// The summary table: one figure a row.
fn md_figures(f: &Figures<'_>, md: &mut String) {
    let mibs = |x: Option<f64>| x.map_or("none".into(), |x| format!("{x:.0} MiB/s"));
    let mut rate_names: Vec<String> = Vec::new();
    for s in &f.steps {
        if !rate_names.contains(&s.rate_name()) {
            rate_names.push(s.rate_name());
        }
    }
    let rate_list = rate_names.join("; ");
    let (relief_n, relief_m, relief_p) = (&f.relief_n, &f.relief_m, &f.relief_p);
    let (ahead_e, at_line_e, crossings_e) = (f.ahead_e, f.at_line_e, f.crossings_e);
    let (oom_e, oom_p, oom_m, oom_n) = (f.oom_e, f.oom_p, f.oom_m, f.oom_n);
    md.push_str("| figure | value | target | |\n|---|---:|---|---|\n");
    md.push_str(&format!(
        "| `relief_p50_ms`: use past 90% to new memory online, guest clock, event-driven | {} ({} samples) | | |\n",
        ms(f.e_p50),
        f.relief_e.len()
    ));
    md.push_str(&format!(
        "| `relief_p99_ms`, event-driven | {} | ≤ {RELIEF_TARGET_X}x floor = {} | {} |\n",
        ms(f.e_p99),
        ms(f.floor_p50.map(|fl| fl * RELIEF_TARGET_X)),
        verdict(f.relief_met)
    ));
    md.push_str(&format!(
        "| event-driven: usage watermark events sent ahead of the line, at it; crossings of 90% | {ahead_e}, {at_line_e}; {crossings_e} | | |\n"
    ));
    md.push_str(&format!(
        "| relief p99 (p50), event-driven with no lead (watermark event at the line) | {} ({}; {} samples) | | |\n",
        ms(pct(relief_n, 99.0)),
        ms(pct(relief_n, 50.0)),
        relief_n.len()
    ));
    md.push_str(&format!(
        "| where relief went, p50 per part: event stamp less crossing; to the agent; to the DIMM plugged; plugged to online (agent's log against the console), event-driven / no lead | {} / {} | | |\n",
        split_cell(&f.split_e),
        split_cell(&f.split_n)
    ));
    md.push_str(&format!(
        "| relief p99 (p50), memory events only: CPU pressure not acted on | {} ({}; {} samples) | | |\n",
        ms(pct(relief_m, 99.0)),
        ms(pct(relief_m, 50.0)),
        relief_m.len()
    ));
    md.push_str(&format!(
        "| `relief_p99_ms_polling` (p50 {}) | {} ({} samples) | | |\n",
        ms(pct(relief_p, 50.0)),
        ms(f.p_p99),
        relief_p.len()
    ));
    md.push_str(&format!(
        "| `hotplug_floor_ms`: raw QMP DIMM plug to the guest's MemTotal grown, p50 (p99 {}) | {} ({} samples) | | |\n",
        ms(pct(&f.floors, 99.0)),
        ms(f.floor_p50),
        f.floors.len()
    ));
    md.push_str(&format!(
        "| `oom_kills_event_driven`, `oom_kills_polling` (no lead: {oom_n}; memory events only: {oom_m}), all runs at {rate_list} | {oom_e}, {oom_p} | 0 event-driven where polling has some | {} |\n",
        verdict(Some(!f.split.is_empty()))
    ));
    md.push_str(&format!(
        "| `ramp_mib_per_s_max`: fastest ramp without OOM kill, event-driven, as reached (target 0.75; at 0.9) | {} ({}) | | |\n\n",
        mibs(f.max_shipped),
        mibs(f.max_watermark)
    ));
}

/// A `split_p50` as one table cell.
fn split_cell(v: &Value) -> String {
    let f = |k: &str| v.get(k).and_then(Value::as_f64).map_or("-".into(), |x| format!("{x:.0}"));
    match v.get("samples").and_then(Value::as_u64) {
        Some(n) if n > 0 => format!(
            "{}; {}; {}; {} ms ({n} samples)",
            f("event_vs_cross_ms"),
            f("to_agent_ms"),
            f("to_plugged_ms"),
            f("plugged_to_online_ms")
        ),
        _ => "n/a".into(),
    }
}

/// How the runs were made.
fn md_method(f: &Figures<'_>, md: &mut String) {
    let reps = reps(f);
    md.push_str(&format!(
        "Each run boots a fresh guest of {BOOT_MIB} MiB (CUs of 1/8 vCPU and {CU_MIB} MiB, pc-dimm, at most \
         {MAX_CUS} CUs) on a node of 4 vCPU and 4 GiB; its workload (`xtask/src/cluster/ramp.pl`, perl in the \
         guest's workload cgroup) fills anonymous memory in 4 MiB chunks up to {TARGET_MIB} MiB from one or \
         more processes while a watcher reads `/proc/meminfo` every 5 ms. A relief sample is each time use \
         (MemTotal - MemAvailable) passes 90% of MemTotal, to the first MemTotal growth after it, both by the \
         guest's CLOCK_MONOTONIC; use that never passes 90% because memory came first gives no sample. \
         Event-driven: agent and informant as shipped (pressure events, a sample a second; the usage \
         watermark's event sent ahead of the line by the informant's lead, see README). Event-driven, no lead: \
         the same with the informant's `--watermark-lead-ms 0` (its event when use reaches 90%). Memory events \
         only: the same with `ignore_pressure = [\"psi_cpu\"]` (CPU pressure counted, not acted on). Polling: \
         `[policy.polling]` (pressure events ignored, the informant sampling every 100 ms, averaged over 500 ms, \
         the agent deciding every 5 s; the ramp starts after its first tick). Both with `memory_target` 0.75 \
         (the default) and 0.9 (Neon's watermark; every plug then follows a crossing), and at 0.9 also a slow ramp, where the \
         guest's CPU (TCG) is less contended and CPU pressure less often grows the VM by whole CUs. The floor: before each \
         ramp, {FLOOR_PLUGS} DIMMs of one CU plugged and unplugged over a second QMP monitor, from `object-add` \
         to the guest's line saying MemTotal grew reaching the host (serial console included). Runs alternate \
         the four modes at each step ({reps} per mode and step); per target the rates rise until the \
         event-driven agent sees an OOM kill. OOM kills are the guest kernel's.\n\n"
    ));
}

/// Every step, every mode: one row each.
fn md_steps(f: &Figures<'_>, md: &mut String) {
    md.push_str(
        "| target | rate asked | mode | reached MiB/s | OOM kills | 90% crossings | watermark events ahead, at the line | relief p50 | relief max | pressure events (all runs) | DIMMs at end |\n\
         |---|---|---|---|---|---|---|---:|---:|---|---|\n",
    );
    for &step in &f.steps {
        for m in MODES {
            let rs: Vec<&Run> = f.at(m, step).collect();
            let rel = relief_of(rs.iter().copied());
            let join = |g: &dyn Fn(&Run) -> String| rs.iter().map(|r| g(r)).collect::<Vec<_>>().join(", ");
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                step.target.value(),
                step.rate_name(),
                m.name(),
                join(&|r| r.achieved.map_or("-".into(), |x| format!("{x:.0}"))),
                join(&|r| r.oom_kills.to_string()),
                join(&|r| r.crossings.to_string()),
                join(&|r| format!("{}/{}", r.watermark_ahead, r.watermark_at_line)),
                ms(pct(&rel, 50.0)),
                ms(pct(&rel, 100.0)),
                kinds(&rs).iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
                join(&|r| r.dimms.to_string()),
            ));
        }
    }
}

/// The median of each part of the runs' relief samples (`split.rs`), with
/// how many samples the agent's log accounted for.
fn split_p50(rs: &[&Run]) -> Value {
    let all: Vec<&super::split::Split> = rs.iter().flat_map(|r| r.split.iter()).collect();
    let p50 = |f: fn(&super::split::Split) -> f64| pct(&all.iter().map(|s| f(s)).collect::<Vec<_>>(), 50.0);
    json!({
        "samples": all.len(),
        "event_vs_cross_ms": p50(|s| s.event_vs_cross_ms),
        "to_agent_ms": p50(|s| s.to_agent_ms),
        "to_plugged_ms": p50(|s| s.to_plugged_ms),
        "plugged_to_online_ms": p50(|s| s.plugged_to_online_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: Mode, relief_ms: Vec<f64>, oom_kills: usize) -> Run {
        Run {
            mode,
            step: Step { target: Target::Watermark, rate: 16, workers: 1 },
            achieved: Some(15.5),
            completed: true,
            oom_kills,
            victims: Vec::new(),
            crossings: relief_ms.len(),
            watermark_ahead: 1,
            watermark_at_line: 0,
            relief_ms,
            split: Vec::new(),
            floor_ms: vec![100.0, 120.0],
            dimms: 4,
            pressure_events: 3,
            pressure_kinds: vec![("psi_cpu".into(), 3)],
        }
    }

    #[test]
    fn the_summary_says_each_mode_once_per_step_and_judges_the_targets() {
        let runs = [
            run(Mode::Events, vec![90.0, 140.0], 0),
            run(Mode::NoLead, vec![200.0], 0),
            run(Mode::MemoryEvents, vec![150.0], 0),
            run(Mode::Polling, vec![4000.0], 1),
        ];
        let session = Session { quick: true, date: "d", load_before: "1", load_after: "2", minutes: 1.0 };
        let (v, md) = summarize(&runs, &session);
        assert_eq!(v["relief_samples"], 2);
        assert_eq!(v["relief_p50_ms"], 90.0);
        assert_eq!(v["hotplug_floor_ms"], 100.0);
        assert_eq!(v["oom_kills_polling"], 1);
        assert_eq!(v["ramp_mib_per_s_max_target_0_9"], 15.5);
        // p99 140 ms against 1.5 x the 100 ms floor: met.
        assert_eq!(v["targets"]["relief_p99_within_1_5x_floor"], true);
        assert_eq!(v["targets"]["zero_oom_event_driven_where_polling_has_some"], true);
        assert_eq!(v["steps"].as_array().map(Vec::len), Some(1));
        assert!(
            md.contains("| `relief_p99_ms`, event-driven | 140 ms | ≤ 1.5x floor = 150 ms | met |"),
            "{md}"
        );
        assert_eq!(md.lines().filter(|l| l.starts_with("| 0.9 | 16 MiB/s |")).count(), MODES.len(), "{md}");
        assert!(md.contains("(2 per mode and step)") || md.contains("(1 per mode and step)"), "{md}");
    }
}
