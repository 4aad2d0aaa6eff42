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

    /// A guest file's contents, read by the guest's Postgres. `path` is ours,
    /// a constant: it goes into SQL and a shell inside the guest.
    fn read_file(&self, path: &'static str) -> anyhow::Result<String> {
        debug_assert!(path.chars().all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c)));
        let sql = format!(
            "CREATE TEMP TABLE f(l text); COPY f FROM PROGRAM 'cat {path}'; SELECT string_agg(l, E'\\n') FROM f;"
        );
        self.query(&sql, Duration::from_secs(20))
    }

    /// What the guest's kernel shows now.
    pub fn guest(&self) -> anyhow::Result<GuestView> {
        let online = self.read_file("/sys/devices/system/cpu/online")?;
        let meminfo = self.read_file("/proc/meminfo")?;
        let vmstat = self.read_file("/proc/vmstat")?;
        let loadavg = self.read_file("/proc/loadavg")?;
        GuestView::parse(&online, &meminfo, &vmstat, &loadavg)
    }
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
