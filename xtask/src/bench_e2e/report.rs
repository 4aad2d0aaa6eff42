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

/// The figures (JSON) and the BENCHMARKS.md section.
#[allow(clippy::too_many_lines)]
pub(super) fn summarize(
    runs: &[Run],
    quick: bool,
    date: &str,
    load_before: &str,
    load_after: &str,
    minutes: f64,
) -> (Value, String) {
    let of = |m: Mode| runs.iter().filter(move |r| r.mode == m);
    let at = |m: Mode, step: Step| of(m).filter(move |r| r.step == step);
    let relief_of = |rs: &mut dyn Iterator<Item = &Run>| {
        rs.flat_map(|r| r.relief_ms.iter().copied()).collect::<Vec<f64>>()
    };
    let relief_e = relief_of(&mut of(Mode::Events));
    let relief_p = relief_of(&mut of(Mode::Polling));
    let relief_m = relief_of(&mut of(Mode::MemoryEvents));
    let relief_n = relief_of(&mut of(Mode::NoLead));
    let split_e = split_p50(&of(Mode::Events).collect::<Vec<_>>());
    let split_n = split_p50(&of(Mode::NoLead).collect::<Vec<_>>());
    let oom_n: usize = of(Mode::NoLead).map(|r| r.oom_kills).sum();
    let ahead_e: usize = of(Mode::Events).map(|r| r.watermark_ahead).sum();
    let at_line_e: usize = of(Mode::Events).map(|r| r.watermark_at_line).sum();
    let crossings_e: usize = of(Mode::Events).map(|r| r.crossings).sum();
    let oom_m: usize = of(Mode::MemoryEvents).map(|r| r.oom_kills).sum();
    let floors: Vec<f64> = runs.iter().flat_map(|r| r.floor_ms.iter().copied()).collect();
    let floor_p50 = pct(&floors, 50.0);
    let e_p50 = pct(&relief_e, 50.0);
    let e_p99 = pct(&relief_e, 99.0);
    let p_p99 = pct(&relief_p, 99.0);
    let oom_e: usize = of(Mode::Events).map(|r| r.oom_kills).sum();
    let oom_p: usize = of(Mode::Polling).map(|r| r.oom_kills).sum();
    let mut steps: Vec<Step> = Vec::new();
    for r in runs {
        if !steps.contains(&r.step) {
            steps.push(r.step);
        }
    }
    let oom_at = |m: Mode, step: Step| at(m, step).map(|r| r.oom_kills).sum::<usize>();
    // Per target: the fastest step whose event-driven runs saw no OOM kill,
    // as the slowest of those runs reached.
    let max_ok = |target: Target| {
        steps
            .iter()
            .filter(|s| s.target == target && oom_at(Mode::Events, **s) == 0)
            .filter_map(|&s| at(Mode::Events, s).filter_map(|r| r.achieved).reduce(f64::min))
            .reduce(f64::max)
    };
    let max_shipped = max_ok(Target::Shipped);
    let max_watermark = max_ok(Target::Watermark);
    let split: Vec<Step> = steps
        .iter()
        .copied()
        .filter(|&s| oom_at(Mode::Events, s) == 0 && oom_at(Mode::Polling, s) > 0)
        .collect();
    let relief_met = e_p99.zip(floor_p50).map(|(p, f)| p <= RELIEF_TARGET_X * f);
    let steps_json: Vec<Value> = steps
        .iter()
        .map(|&step| {
            let per = |m: Mode| {
                let rs: Vec<&Run> = at(m, step).collect();
                let rel = relief_of(&mut rs.iter().copied());
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
                    "pressure_kinds": kinds(&rs),
                    "dimms_at_end": rs.iter().map(|r| r.dimms).collect::<Vec<_>>(),
                })
            };
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
    let v = json!({
        "date": date,
        "quick": quick,
        "load_before": load_before,
        "load_after": load_after,
        "minutes": minutes,
        "guest": { "boot_mib": BOOT_MIB, "cu_mib": CU_MIB, "max_cus": MAX_CUS, "ramp_to_mib": TARGET_MIB },
        "relief_p50_ms": e_p50,
        "relief_p99_ms": e_p99,
        "relief_samples": relief_e.len(),
        "watermark_events_ahead_event_driven": ahead_e,
        "watermark_events_at_line_event_driven": at_line_e,
        "crossings_event_driven": crossings_e,
        "relief_p50_ms_no_lead": pct(&relief_n, 50.0),
        "relief_p99_ms_no_lead": pct(&relief_n, 99.0),
        "relief_samples_no_lead": relief_n.len(),
        "relief_split_p50_ms": split_e,
        "relief_split_p50_ms_no_lead": split_n,
        "oom_kills_no_lead": oom_n,
        "relief_p50_ms_memory_events_only": pct(&relief_m, 50.0),
        "relief_p99_ms_memory_events_only": pct(&relief_m, 99.0),
        "relief_samples_memory_events_only": relief_m.len(),
        "oom_kills_memory_events_only": oom_m,
        "relief_p50_ms_polling": pct(&relief_p, 50.0),
        "relief_p99_ms_polling": p_p99,
        "relief_samples_polling": relief_p.len(),
        "hotplug_floor_ms": floor_p50,
        "hotplug_floor_p99_ms": pct(&floors, 99.0),
        "hotplug_floor_samples": floors.len(),
        "oom_kills_event_driven": oom_e,
        "oom_kills_polling": oom_p,
        "ramp_mib_per_s_max": max_shipped,
        "ramp_mib_per_s_max_target_0_9": max_watermark,
        "steps_event_driven_clean_polling_oom": split.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "targets": {
            "relief_p99_within_1_5x_floor": relief_met,
            "zero_oom_event_driven_where_polling_has_some": !split.is_empty(),
        },
        "steps": steps_json,
    });

    let ms = |x: Option<f64>| x.map_or("n/a".into(), |x| format!("{x:.0} ms"));
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        // No sample: use never passed 90% (memory came first), or no run.
        None => "not shown: no crossing",
    };
    let mibs = |x: Option<f64>| x.map_or("none".into(), |x| format!("{x:.0} MiB/s"));
    let rate_list = {
        let mut names: Vec<String> = Vec::new();
        for s in &steps {
            if !names.contains(&s.rate_name()) {
                names.push(s.rate_name());
            }
        }
        names.join("; ")
    };
    let reps = runs.len() / (MODES.len() * steps.len()).max(1);
    let mut md = String::new();
    md.push_str("## End to end: relief under a memory ramp, event-driven against polling\n\n");
    md.push_str(&format!(
        "Command: `cargo xtask bench e2e{}` (figures also in `target/bench/e2e.json`).{}\n\n",
        if quick { " --quick" } else { "" },
        if quick { " **Quick run**: one run per mode and step, fewer rates." } else { "" }
    ));
    md.push_str(&format!(
        "Run {date} on 2 cores, QEMU under TCG; {minutes:.1} minutes, {} runs; load average before {load_before} \
         and after {load_after} (1, 5, 15 min).\n\n",
        runs.len()
    ));
    md.push_str("| figure | value | target | |\n|---|---:|---|---|\n");
    md.push_str(&format!(
        "| `relief_p50_ms`: use past 90% to new memory online, guest clock, event-driven | {} ({} samples) | | |\n",
        ms(e_p50),
        relief_e.len()
    ));
    md.push_str(&format!(
        "| `relief_p99_ms`, event-driven | {} | ≤ {RELIEF_TARGET_X}x floor = {} | {} |\n",
        ms(e_p99),
        ms(floor_p50.map(|f| f * RELIEF_TARGET_X)),
        verdict(relief_met)
    ));
    md.push_str(&format!(
        "| event-driven: usage watermark events sent ahead of the line, at it; crossings of 90% | {ahead_e}, {at_line_e}; {crossings_e} | | |\n"
    ));
    md.push_str(&format!(
        "| relief p99 (p50), event-driven with no lead (watermark event at the line) | {} ({}; {} samples) | | |\n",
        ms(pct(&relief_n, 99.0)),
        ms(pct(&relief_n, 50.0)),
        relief_n.len()
    ));
    let split_cell = |v: &Value| {
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
    };
    md.push_str(&format!(
        "| where relief went, p50 per part: event stamp less crossing; to the agent; to the DIMM plugged; plugged to online (agent's log against the console), event-driven / no lead | {} / {} | | |\n",
        split_cell(&split_e),
        split_cell(&split_n)
    ));
    md.push_str(&format!(
        "| relief p99 (p50), memory events only: CPU pressure not acted on | {} ({}; {} samples) | | |\n",
        ms(pct(&relief_m, 99.0)),
        ms(pct(&relief_m, 50.0)),
        relief_m.len()
    ));
    md.push_str(&format!(
        "| `relief_p99_ms_polling` (p50 {}) | {} ({} samples) | | |\n",
        ms(pct(&relief_p, 50.0)),
        ms(p_p99),
        relief_p.len()
    ));
    md.push_str(&format!(
        "| `hotplug_floor_ms`: raw QMP DIMM plug to the guest's MemTotal grown, p50 (p99 {}) | {} ({} samples) | | |\n",
        ms(pct(&floors, 99.0)),
        ms(floor_p50),
        floors.len()
    ));
    md.push_str(&format!(
        "| `oom_kills_event_driven`, `oom_kills_polling` (no lead: {oom_n}; memory events only: {oom_m}), all runs at {rate_list} | {oom_e}, {oom_p} | 0 event-driven where polling has some | {} |\n",
        verdict(Some(!split.is_empty()))
    ));
    md.push_str(&format!(
        "| `ramp_mib_per_s_max`: fastest ramp without OOM kill, event-driven, as reached (target 0.75; at 0.9) | {} ({}) | | |\n\n",
        mibs(max_shipped),
        mibs(max_watermark)
    ));
    md.push_str(&format!(
        "Each run boots a fresh guest of {BOOT_MIB} MiB (CUs of 1/8 vCPU and {CU_MIB} MiB, pc-dimm, at most \
         {MAX_CUS} CUs) on a node of 4 vCPU and 4 GiB; its workload (`xtask/src/bench_e2e/ramp.pl`, perl in the \
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
    md.push_str(
        "| target | rate asked | mode | reached MiB/s | OOM kills | 90% crossings | watermark events ahead, at the line | relief p50 | relief max | pressure events (all runs) | DIMMs at end |\n\
         |---|---|---|---|---|---|---|---:|---:|---|---|\n",
    );
    for &step in &steps {
        for m in MODES {
            let rs: Vec<&Run> = at(m, step).collect();
            let rel = relief_of(&mut rs.iter().copied());
            let join = |f: &dyn Fn(&Run) -> String| rs.iter().map(|r| f(r)).collect::<Vec<_>>().join(", ");
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
    (v, md)
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
