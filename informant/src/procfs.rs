//! Pure parsers for the kernel's text files the informant reads. Each takes the
//! file's contents, so tests feed them strings and the readers stay thin.
//!
//! `/proc` files are parsed by the `procfs-core` crate (PSI lines, load
//! average) except `/proc/meminfo`: the watermark reads it every 10 ms, and
//! the crate's parser (every field into a `HashMap` of owned keys) takes
//! 14 us a read against 2.3 us for the two fields read here, six times the
//! cost on the hottest path (`cargo run --release -p vmscale-informant
//! --example meminfo_parse`; figures in BENCHMARKS.md). cgroup v2 files and
//! sysfs CPU lists are outside what the crate covers.

use procfs_core::FromRead;

/// One line of a PSI file (`some ...` or `full ...`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Cumulative stall time, microseconds.
    pub total_us: u64,
}

/// A PSI file (`/proc/pressure/*`, `<cgroup>/memory.pressure`). `full` is
/// absent from `/proc/pressure/cpu` on older kernels.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Psi {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

pub fn parse_psi(text: &str) -> Option<Psi> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let slot = match line.split_whitespace().next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => continue,
        };
        let r = procfs_core::parse_pressure_record(line).ok()?;
        *slot = Some(PsiLine {
            avg10: f64::from(r.avg10),
            avg60: f64::from(r.avg60),
            avg300: f64::from(r.avg300),
            total_us: r.total,
        });
    }
    Some(Psi { some: some?, full })
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let mut total = None;
    let mut available = None;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        let mut words = rest.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        let scale = match words.next() {
            Some("kB") => 1024,
            None => 1,
            Some(_) => return None,
        };
        *slot = Some(n.checked_mul(scale)?);
    }
    Some(MemInfo { total_bytes: total?, available_bytes: available? })
}

/// The 1- and 5-minute load averages of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<(f64, f64)> {
    let l = procfs_core::LoadAverage::from_read(text.as_bytes()).ok()?;
    Some((f64::from(l.one), f64::from(l.five)))
}

/// A kernel CPU list (`0-3,5,7-8`), as in `/sys/devices/system/cpu/online`.
/// An empty string is an empty list.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    let text = text.trim();
    if text.is_empty() {
        return Some(out);
    }
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b - a > 65_536 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

/// One key of a flat-keyed cgroup file (`memory.stat`, `memory.events`).
pub fn parse_flat_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The counters of a cgroup v2 `memory.events` file the informant reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEvents {
    pub high: u64,
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
}

/// `None` when the file is empty or cut short (it is being rewritten, or it
/// is not a `memory.events` file).
pub fn parse_memory_events(text: &str) -> Option<MemoryEvents> {
    Some(MemoryEvents {
        high: parse_flat_key(text, "high")?,
        max: parse_flat_key(text, "max")?,
        oom: parse_flat_key(text, "oom")?,
        oom_kill: parse_flat_key(text, "oom_kill")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_files_parse() {
        let p = parse_psi(
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=32703\n\
             full avg10=0.25 avg60=0.00 avg300=0.00 total=6332\n",
        )
        .unwrap();
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.total_us, 32703);
        assert_eq!(p.full.unwrap().avg10, 0.25);
        let cpu = parse_psi("some avg10=3.00 avg60=0.00 avg300=0.00 total=9\n").unwrap();
        assert_eq!(cpu.full, None);
        assert_eq!(parse_psi(""), None);
        assert_eq!(parse_psi("some avg10=x total=1\n"), None);
    }

    #[test]
    fn meminfo_parses_kb() {
        let m = parse_meminfo("MemTotal:       24684060 kB\nMemFree: 1 kB\nMemAvailable:   23911012 kB\n")
            .unwrap();
        assert_eq!(m.total_bytes, 24_684_060 * 1024);
        assert_eq!(m.available_bytes, 23_911_012 * 1024);
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None, "MemAvailable missing");
        assert_eq!(parse_meminfo("MemTotal: 5 MB\nMemAvailable: 1 kB\n"), None, "unknown unit");
    }

    #[test]
    fn loadavg_parses() {
        let (one, five) = parse_loadavg("0.52 0.30 0.10 1/123 4567\n").unwrap();
        assert!((one - 0.52).abs() < 1e-6 && (five - 0.30).abs() < 1e-6, "{one} {five}");
        assert_eq!(parse_loadavg("x"), None);
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-4,7"), Some(vec![0, 2, 3, 4, 7]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("\n"), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }

    #[test]
    fn memory_events_parse_and_reject_partial_files() {
        let text = "low 0\nhigh 3\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_memory_events(text), Some(MemoryEvents { high: 3, max: 2, oom: 1, oom_kill: 1 }));
        assert_eq!(parse_memory_events(""), None);
        assert_eq!(parse_memory_events("low 0\nhigh 3\n"), None);
        assert_eq!(parse_flat_key("anon 4096\nfile 8192\n", "anon"), Some(4096));
        assert_eq!(parse_flat_key("anon_thp 4096\n", "anon"), None);
    }
}
