//! The guest's console as the harness reads it: every line with when it
//! reached the host, and the figures in them. One reader for the e2e
//! scenarios and the benchmark; the lines come from the ramp workload
//! (`cluster/ramp.pl`, "ramp: ..."), the other workloads and the guest's
//! /init (OOM kills as "oom: Killed process ...").

use anyhow::ensure;
use std::time::Instant;

use crate::cluster::Vm;

/// What the guest's console said, as it arrived.
#[derive(Debug, Default)]
pub struct Console {
    pub lines: Vec<(Instant, String)>,
}

impl Console {
    /// Takes in the lines that arrived since the last call.
    pub fn drain(&mut self, vm: &Vm) {
        while let Ok(l) = vm.qemu.console.try_recv() {
            self.lines.push(l);
        }
    }

    pub fn has(&self, s: &str) -> bool {
        self.lines.iter().any(|(_, l)| l.contains(s))
    }

    /// The index of the first line at or after `from` holding `pat`.
    pub fn find_from(&self, from: usize, pat: &str) -> Option<usize> {
        self.lines.iter().skip(from).position(|(_, l)| l.contains(pat)).map(|i| i + from)
    }

    /// Line `i`'s `key=` value.
    pub fn value_at(&self, i: usize, key: &str) -> Option<f64> {
        value(&self.lines.get(i)?.1, key)
    }

    /// The ramp's `ramp: <what> ...` lines (`start`, `grew`, `cross90`...).
    pub fn ramp(&self, what: &str) -> impl Iterator<Item = &(Instant, String)> {
        let prefix = format!("ramp: {what} ");
        self.lines.iter().filter(move |(_, l)| l.contains(&prefix))
    }

    pub fn ramp_count(&self, what: &str) -> usize {
        self.ramp(what).count()
    }

    /// The first `ramp: <what>` line's `key=` value.
    pub fn ramp_value(&self, what: &str, key: &str) -> Option<f64> {
        self.ramp(what).find_map(|(_, l)| value(l, key))
    }

    /// The informant's usage watermark events (at debug in the guest's
    /// log): (ahead of the line, at it).
    pub fn watermark_events(&self) -> (usize, usize) {
        let ev = || self.lines.iter().filter(|(_, l)| l.contains("usage watermark event"));
        let at = ev().filter(|(_, l)| l.contains("at_line=true")).count();
        (ev().count() - at, at)
    }

    /// OOM kills /init reported ("oom: Killed process ..."; the kernel's own
    /// console lines are silenced).
    pub fn oom_kills(&self) -> usize {
        self.lines.iter().filter(|(_, l)| l.contains("Killed process")).count()
    }

    /// Each OOM kill's victim, "PID (NAME)".
    pub fn oom_victims(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|(_, l)| l.split("Killed process ").nth(1))
            .map(|rest| rest.split(')').next().unwrap_or(rest).to_owned() + ")")
            .collect()
    }

    /// Fails unless /init's OOM watch runs: without it an OOM kill would go
    /// unseen and "no OOM kill" would prove nothing.
    pub fn require_oom_watch(&self, vm: &Vm) -> anyhow::Result<()> {
        ensure!(
            self.has("oom watch started"),
            "the guest's /init did not start its OOM watch, so OOM kills can't be seen; console {}",
            vm.console_log.display()
        );
        Ok(())
    }
}

/// `key=NUMBER` in a line, the key a whole word: `t=` is not the end of
/// `at=`.
pub fn value(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(lines: &[&str]) -> Console {
        let now = Instant::now();
        Console { lines: lines.iter().map(|l| (now, (*l).to_owned())).collect() }
    }

    #[test]
    fn a_key_is_a_whole_word() {
        let line = "informant: usage watermark event at=12.5 t=13.25 at_line=true";
        assert_eq!(value(line, "t"), Some(13.25));
        assert_eq!(value(line, "at"), Some(12.5));
        // Only `at=` holds a `t=`: no value, not the wrong one.
        assert_eq!(value("ramp: grew at=3 total=900", "t"), None);
        assert_eq!(value("t=1.5 first", "t"), Some(1.5));
        assert_eq!(value("ramp: done held=x", "held"), None);
    }

    #[test]
    fn ramp_lines_are_found_by_their_word() {
        let c = console(&[
            "ramp: ready t=1.0 total=400 clock=monotonic",
            "ramp: start t=2.0 total=400",
            "ramp: cross90 t=3.5 used=361 total=400",
            "ramp: grew t=3.9 total=528",
            "ramp: done t=5.0 held=650",
            "oom: Killed process 81 (perl) total-vm:1kB",
        ]);
        assert_eq!(c.ramp_value("start", "t"), Some(2.0));
        assert_eq!(c.ramp_value("cross90", "used"), Some(361.0));
        assert_eq!(c.ramp_value("done", "held"), Some(650.0));
        assert_eq!(c.ramp_count("grew"), 1);
        assert_eq!(c.find_from(2, "ramp: grew"), Some(3));
        assert_eq!(c.value_at(3, "total"), Some(528.0));
        assert_eq!(c.oom_victims(), ["81 (perl)"]);
        assert_eq!(c.oom_kills(), 1);
    }
}
