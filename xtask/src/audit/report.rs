//! What `cargo xtask audit` found: one outcome per attack and per fuzz
//! target, the verdict, the lines it prints and `target/bench/audit.json`.

use serde::Serialize;

/// How one attack ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Refused with a clear status, and the state is as it was.
    Refused,
    /// It got in: a finding.
    NotRefused,
    /// The audit could not set it up: not a finding about the daemons, but
    /// not a pass either.
    CouldNotRun,
}

/// One attack: its name, how it ended, and what the audit saw (the status
/// or answer, and any difference in the daemons' state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attack {
    pub name: String,
    pub verdict: Verdict,
    pub seen: String,
}

impl Attack {
    /// Refused only when both hold: the daemon answered with a refusal and
    /// its state did not change. `seen` says what was answered; `changed`
    /// is the state's difference, if any.
    pub fn judge(name: &str, refused: bool, seen: impl Into<String>, changed: Option<String>) -> Attack {
        let mut seen = seen.into();
        let verdict = match (&changed, refused) {
            (None, true) => Verdict::Refused,
            _ => Verdict::NotRefused,
        };
        if let Some(c) = changed {
            seen = format!("{seen}; state changed: {c}");
        }
        Attack { name: name.to_owned(), verdict, seen }
    }

    pub fn could_not_run(name: &str, why: &anyhow::Error) -> Attack {
        Attack { name: name.to_owned(), verdict: Verdict::CouldNotRun, seen: format!("{why:#}") }
    }

    /// The line printed for it.
    pub fn line(&self) -> String {
        let word = match self.verdict {
            Verdict::Refused => "refused",
            Verdict::NotRefused => "NOT REFUSED",
            Verdict::CouldNotRun => "COULD NOT RUN",
        };
        format!("{:<40} {word:<13} {}", self.name, one_line(&self.seen, 300))
    }
}

/// One fuzz target's run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FuzzRun {
    pub target: String,
    pub seconds: u64,
    /// Inputs tried, as libFuzzer counted them (0 when it did not say).
    pub runs: u64,
    /// The input that crashed it, saved for `cargo fuzz run <target> <file>`.
    pub crash: Option<String>,
    /// Why it did not run, if it did not (a build failure, libFuzzer's exit).
    pub error: Option<String>,
}

impl FuzzRun {
    pub fn line(&self) -> String {
        let (word, what) = match (&self.crash, &self.error) {
            (Some(c), _) => ("CRASHED", format!("reproducer {c}")),
            (None, Some(e)) => ("COULD NOT RUN", one_line(e, 300)),
            (None, None) => ("ok", format!("{} runs in {} s", self.runs, self.seconds)),
        };
        format!("fuzz {:<35} {word:<13} {what}", self.target)
    }
}

/// `target/bench/audit.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// When it ran, e.g. "2026-12-06 10:30 UTC" (set by the caller).
    pub ran_at: String,
    /// Wall time of the hostile-client suite, and of the fuzz pass with
    /// its build (set by the caller), seconds.
    pub suite_seconds: u64,
    pub fuzz_pass_seconds: u64,
    pub attacks_tried: usize,
    pub attacks_refused: usize,
    pub fuzz_targets: usize,
    /// Seconds of fuzzing, all targets together.
    pub fuzz_seconds: u64,
    /// Fuzz targets that crashed (or could not run).
    pub crashes: usize,
    pub attacks: Vec<Attack>,
    pub fuzz: Vec<FuzzRun>,
}

impl Report {
    pub fn new(attacks: Vec<Attack>, fuzz: Vec<FuzzRun>) -> Report {
        Report {
            ran_at: String::new(),
            suite_seconds: 0,
            fuzz_pass_seconds: 0,
            attacks_tried: attacks.len(),
            attacks_refused: attacks.iter().filter(|a| a.verdict == Verdict::Refused).count(),
            fuzz_targets: fuzz.len(),
            fuzz_seconds: fuzz.iter().map(|f| f.seconds).sum(),
            crashes: fuzz.iter().filter(|f| f.crash.is_some() || f.error.is_some()).count(),
            attacks,
            fuzz,
        }
    }

    /// Whether everything was refused and no fuzz target crashed.
    pub fn passed(&self) -> bool {
        self.attacks_refused == self.attacks_tried && self.crashes == 0
    }

    /// The closing line.
    pub fn summary(&self) -> String {
        format!(
            "{} of {} attacks refused in {} s; {} fuzz targets for {} s each, {} s with the build, {} crashed",
            self.attacks_refused,
            self.attacks_tried,
            self.suite_seconds,
            self.fuzz_targets,
            self.fuzz.first().map_or(0, |f| f.seconds),
            self.fuzz_pass_seconds,
            self.crashes
        )
    }
}

/// `s` on one line, at most `max` characters (a daemon's message may be long).
pub fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match flat.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &flat[..i]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attack_counts_as_refused_only_with_a_refusal_and_no_change() {
        assert_eq!(Attack::judge("a", true, "denied", None).verdict, Verdict::Refused);
        let changed = Attack::judge("a", true, "denied", Some("node x added".into()));
        assert_eq!(changed.verdict, Verdict::NotRefused);
        assert!(changed.seen.contains("node x added"), "{}", changed.seen);
        assert_eq!(Attack::judge("a", false, "ok", None).verdict, Verdict::NotRefused);
        assert!(Attack::judge("a", false, "ok", None).line().contains("NOT REFUSED"));
    }

    #[test]
    fn the_report_fails_on_any_attack_let_in_crash_or_broken_run() {
        let ok = Attack::judge("a", true, "denied", None);
        let fuzz = |crash: Option<&str>| FuzzRun {
            target: "t".into(),
            seconds: 5,
            runs: 100,
            crash: crash.map(Into::into),
            error: None,
        };
        let r = Report::new(vec![ok.clone(), ok.clone()], vec![fuzz(None), fuzz(None)]);
        assert!(r.passed(), "{}", r.summary());
        assert_eq!((r.attacks_tried, r.attacks_refused, r.fuzz_seconds), (2, 2, 10));
        let let_in = Attack::judge("b", false, "ok", None);
        assert!(!Report::new(vec![ok.clone(), let_in], vec![]).passed());
        let broken = Attack::could_not_run("c", &anyhow::anyhow!("no qemu"));
        assert!(!Report::new(vec![broken], vec![]).passed());
        let crashed = Report::new(vec![ok], vec![fuzz(Some("target/fuzz-artifacts/t/crash-1"))]);
        assert_eq!(crashed.crashes, 1);
        assert!(!crashed.passed());
        let json = serde_json::to_value(&crashed).unwrap();
        for key in ["attacks_tried", "attacks_refused", "fuzz_targets", "fuzz_seconds", "crashes"] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
    }

    #[test]
    fn long_or_multi_line_messages_print_on_one_bounded_line() {
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line(&"x".repeat(20), 5), "xxxxx...");
    }
}
