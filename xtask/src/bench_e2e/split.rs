//! Where a relief sample's time went, from the agent's log beside the
//! guest's console. The guest stamps its events and samples with its own
//! CLOCK_MONOTONIC; the agent logs each (`guest_ns=`, at debug) under its
//! own UTC stamp. The least host-minus-guest difference over a run is the
//! clocks' offset plus the quickest delivery (under a millisecond on
//! loopback), so every guest time can be put on the host's clock and back.
//!
//! For a crossing of 90% at `cross` and new memory seen at `grew` (both
//! guest clock), with the last `usage_watermark` event before `grew` and
//! the first DIMM the agent plugged after that event:
//! - `event_vs_cross_ms`: the event's stamp less the crossing (negative:
//!   sent ahead of it);
//! - `to_agent_ms`: from the event's stamp to the agent logging it;
//! - `to_plugged_ms`: from there to the agent's "dimm plugged" (decision,
//!   permit, `object-add`, `device_add`);
//! - `plugged_to_online_ms`: from there to the guest's MemTotal grown
//!   (ACPI, the kernel onlining the block, the watcher's poll).

/// One relief sample's parts, ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    pub event_vs_cross_ms: f64,
    pub to_agent_ms: f64,
    pub to_plugged_ms: f64,
    pub plugged_to_online_ms: f64,
}

/// Seconds since the epoch of a log line's leading UTC stamp
/// (`2026-11-28T09:20:45.451582Z ...`).
fn host_secs(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    let s = t.next()?.parse::<f64>().ok()?;
    // Days from 1970-01-01 of a proleptic Gregorian date (March-based year).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s;
    Some(secs)
}

/// `guest_ns=N` in a line, in seconds.
fn guest_secs(line: &str) -> Option<f64> {
    let rest = &line[line.find("guest_ns=")? + "guest_ns=".len()..];
    let ns: u64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// The parts of each relief sample (`(cross, grew)`, guest seconds) the log
/// can account for; a sample with no watermark event or plug before its
/// growth (memory another signal asked for) has none.
pub fn splits(agent_log: &str, samples: &[(f64, f64)]) -> Vec<Split> {
    let stamped: Vec<(f64, f64, &str)> =
        agent_log.lines().filter_map(|l| Some((host_secs(l)?, guest_secs(l)?, l))).collect();
    let Some(offset) = stamped.iter().map(|(h, g, _)| h - g).reduce(f64::min) else {
        return Vec::new();
    };
    let events: Vec<(f64, f64)> = stamped
        .iter()
        .filter(|(_, _, l)| l.contains("pressure event") && l.contains("usage_watermark"))
        .map(|&(h, g, _)| (h, g))
        .collect();
    let plugs: Vec<f64> =
        agent_log.lines().filter(|l| l.contains("dimm plugged")).filter_map(host_secs).collect();
    samples
        .iter()
        .filter_map(|&(cross, grew)| {
            let &(eh, eg) = events.iter().rev().find(|(_, g)| *g <= grew && grew - g < 2.0)?;
            let plugged = *plugs.iter().find(|p| **p >= eh)?;
            let plugged_guest = plugged - offset;
            (plugged_guest <= grew).then_some(Split {
                event_vs_cross_ms: (eg - cross) * 1000.0,
                to_agent_ms: (eh - offset - eg) * 1000.0,
                to_plugged_ms: (plugged - eh) * 1000.0,
                plugged_to_online_ms: (grew - plugged_guest) * 1000.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_read_as_epoch_seconds() {
        let s = host_secs("2026-11-28T09:20:45.451582Z  INFO x").unwrap();
        // `date -u -d 2026-11-28T09:20:45Z +%s`
        assert!((s - 1_795_857_645.451_582).abs() < 1e-5, "{s}");
        assert_eq!(host_secs("1970-01-01T00:00:00.5Z").unwrap(), 0.5);
        assert_eq!(host_secs("2000-03-01T00:00:00Z").unwrap(), 951_868_800.0);
        assert!(host_secs("no stamp").is_none());
    }

    #[test]
    fn a_sample_splits_into_its_parts() {
        let log = "\
2026-01-01T00:00:10.0005Z DEBUG vm_loop: sample vm=b guest_ns=9000000000 used=1
2026-01-01T00:00:20.0025Z DEBUG vm_loop: pressure event vm=b kind=\"usage_watermark\" guest_ns=19000000000
2026-01-01T00:00:20.0035Z  INFO vm_loop: action done vm=b action=\"request_permit\" ms=1
2026-01-01T00:00:20.0125Z  INFO qmp::dimm: dimm plugged id=vmscale-dimm0 bytes=134217728
2026-01-01T00:00:20.0205Z  INFO qmp::dimm: dimm plugged id=vmscale-dimm1 bytes=134217728
";
        // The sample says guest 9 s at host 00:00:10.0005: a host time on the
        // guest's clock, taking that as the quickest delivery.
        let g = |host_s: f64| host_s - host_secs("2026-01-01T00:00:10.0005Z").unwrap() + 9.0;
        let cross = 19.005; // the event went 5 ms ahead of the crossing
        let grew = g(host_secs("2026-01-01T00:00:20.0125Z").unwrap()) + 0.040;
        let s = splits(log, &[(cross, grew)]);
        assert_eq!(s.len(), 1, "{s:?}");
        let s = s[0];
        let near = |a: f64, b: f64| (a - b).abs() < 0.01;
        assert!(near(s.event_vs_cross_ms, -5.0), "{s:?}");
        // 2.5 ms after the stamp, less the sample's 0.5 ms taken as the offset.
        assert!(near(s.to_agent_ms, 2.0), "{s:?}");
        assert!(near(s.to_plugged_ms, 10.0), "{s:?}");
        assert!(near(s.plugged_to_online_ms, 40.0), "{s:?}");

        // Growth with no watermark event before it: nothing to split.
        assert!(splits(log, &[(5.0, 8.0)]).is_empty());
        assert!(splits("", &[(cross, grew)]).is_empty());
    }
}
