//! What the guest itself says, read through Postgres: `psql` from the host
//! to the guest's address, and, for the guest's own files, `COPY ... FROM
//! PROGRAM` (the `postgres` superuser may run a program in the guest). The
//! harness thus checks the guest's kernel (online CPUs, memory, OOM kills)
//! without a shell in the guest and without trusting the informant's or the
//! agent's word.

use anyhow::{bail, Context};
use std::time::Duration;

use crate::pgbench::{self, Target};

/// How to reach one guest's Postgres: the image's `postgres` role over the
/// network (see `xtask/src/debian/`).
#[derive(Debug, Clone)]
pub struct Conn {
    pub target: Target,
}

impl Conn {
    pub fn new(host: std::net::Ipv4Addr) -> Conn {
        let target = Target::new(&host.to_string(), crate::debian::PG_PORT, "postgres", "postgres")
            .password(crate::debian::PG_PASSWORD);
        Conn { target }
    }

    /// Runs `sql` with `psql`; its output (unaligned, tuples only).
    pub fn query(&self, sql: &str, timeout: Duration) -> anyhow::Result<String> {
        let out = pgbench::sql(&self.target, &pgbench::host, sql, timeout)?;
        match out.error {
            None => Ok(out.output),
            Some(e) => bail!("psql to {}:{}: {e}", self.target.host, self.target.port),
        }
    }

    /// What the guest's kernel shows now: its files read by the guest's
    /// Postgres in one session and one program. Each probe costs the guest
    /// a backend and a shell, which under TCG is visible in its load
    /// average: poll it every few seconds, not in a tight loop.
    pub fn guest(&self) -> anyhow::Result<GuestView> {
        // Our constant: it goes into SQL and a shell inside the guest.
        let files = GUEST_FILES.join(" ");
        let sql = format!(
            "CREATE TEMP TABLE f(n serial, l text); \
             COPY f(l) FROM PROGRAM 'for f in {files}; do echo \"=={{}}== $f\"; cat $f; done'; \
             SELECT string_agg(l, E'\\n' ORDER BY n) FROM f;"
        );
        let out = self.query(&sql, Duration::from_secs(20))?;
        let part = |file: &str| {
            section(&out, file).with_context(|| format!("the guest's answer lacks {file}: {out:.300}"))
        };
        GuestView::parse(
            part(GUEST_FILES[0])?,
            part(GUEST_FILES[1])?,
            part(GUEST_FILES[2])?,
            part(GUEST_FILES[3])?,
        )
    }
}

/// The guest files a probe reads, in the order [`GuestView::parse`] takes them.
const GUEST_FILES: [&str; 4] =
    ["/sys/devices/system/cpu/online", "/proc/meminfo", "/proc/vmstat", "/proc/loadavg"];

/// The lines after `=={}== <file>` up to the next such line.
fn section<'a>(out: &'a str, file: &str) -> Option<&'a str> {
    let head = format!("=={{}}== {file}\n");
    let start = out.find(&head)? + head.len();
    let rest = &out[start..];
    Some(rest.find("=={}== ").map_or(rest, |end| &rest[..end]))
}

/// The guest's CPUs and memory as its kernel has them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestView {
    pub online_cpus: u32,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// `/proc/vmstat`'s `oom_kill`: every OOM kill since boot.
    pub oom_kills: u64,
    /// The 1-minute load average, which the agent's CPU goal follows.
    pub load1: f64,
}

impl GuestView {
    fn parse(online: &str, meminfo: &str, vmstat: &str, loadavg: &str) -> anyhow::Result<GuestView> {
        let field = |text: &str, key: &str| -> anyhow::Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no `{key}` in the guest's answer: {text:.200}"))
        };
        Ok(GuestView {
            online_cpus: cpu_count(online.trim()).with_context(|| format!("`{online}` is not a CPU list"))?,
            mem_total_kib: field(meminfo, "MemTotal:")?,
            mem_available_kib: field(meminfo, "MemAvailable:")?,
            oom_kills: field(vmstat, "oom_kill ")?,
            load1: loadavg
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("`{loadavg}` is not /proc/loadavg"))?,
        })
    }

    pub fn mem_total_mib(&self) -> u64 {
        self.mem_total_kib / 1024
    }
}

/// How many CPUs a kernel CPU list (`0-1,3`) names.
pub fn cpu_count(list: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => part.parse::<u32>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(cpu_count("0"), Some(1));
        assert_eq!(cpu_count("0-1"), Some(2));
        assert_eq!(cpu_count("0-1,3,5-7"), Some(6));
        assert_eq!(cpu_count(""), None);
        assert_eq!(cpu_count("3-1"), None);
        assert_eq!(cpu_count("x"), None);
    }

    #[test]
    fn a_probe_answer_splits_into_its_files() {
        let out = "=={}== /a\n0-1\n=={}== /b\nx 1\ny 2\n=={}== /c\n";
        assert_eq!(section(out, "/a"), Some("0-1\n"));
        assert_eq!(section(out, "/b"), Some("x 1\ny 2\n"));
        assert_eq!(section(out, "/c"), Some(""));
        assert_eq!(section(out, "/d"), None);
    }

    #[test]
    fn the_guest_view_is_read_from_its_files() {
        let meminfo =
            "MemTotal:        1004528 kB\nMemFree:          500000 kB\nMemAvailable:     753396 kB\n";
        let vmstat = "nr_free_pages 1\noom_kill 2\nother 3\n";
        let v = GuestView::parse("0-1\n", meminfo, vmstat, "0.52 0.30 0.10 1/80 999\n").unwrap();
        assert_eq!(
            v,
            GuestView {
                online_cpus: 2,
                mem_total_kib: 1004528,
                mem_available_kib: 753396,
                oom_kills: 2,
                load1: 0.52
            }
        );
        assert_eq!(v.mem_total_mib(), 980);
        let e = GuestView::parse("0", "MemTotal: 1 kB\n", vmstat, "0.1").unwrap_err();
        assert!(format!("{e:#}").contains("MemAvailable"), "{e:#}");
    }
}
