//! The fuzz pass: each target in `fuzz/` (cargo-fuzz, libFuzzer) runs for a
//! bounded time on its corpus in `target/fuzz-corpus/<target>/` (kept
//! between runs, so each pass starts where the last stopped); a crash's
//! input is saved under `target/fuzz-artifacts/<target>/` and named in the
//! report.
//!
//! cargo-fuzz needs nightly's flags: the nightly toolchain when rustup has
//! one, else the stable one with `RUSTC_BOOTSTRAP=1`. It is installed from
//! crates.io when missing. Builds have debug assertions and overflow checks
//! (a wrapped size is a crash here) and no sanitizer: the decoders are safe
//! Rust, where AddressSanitizer finds nothing and costs a slower build and
//! run. They are release builds, except for `--quick`: unoptimised, which
//! builds in minutes less and is fast enough for a few seconds a target.

use super::report::FuzzRun;
use anyhow::{bail, Context};
use std::path::Path;
use std::process::{Command, Stdio};

/// Every target in fuzz/Cargo.toml, one per decoder family.
pub const TARGETS: [&str; 8] = [
    "allocator_wire",
    "informant_wire",
    "guest_events",
    "annotations",
    "quantities",
    "qmp_lines",
    "configs",
    "migration_records",
];

/// Builds every target, then runs each for `seconds`; `dev`: unoptimised
/// (the quick pass: minutes less to build, fast enough for seconds).
pub fn run(seconds: u64, dev: bool) -> anyhow::Result<Vec<FuzzRun>> {
    let root = crate::workspace_root();
    ensure_cargo_fuzz()?;
    let nightly = has_nightly();
    eprintln!(
        "==> building the fuzz targets ({})",
        if nightly { "nightly" } else { "stable, RUSTC_BOOTSTRAP=1" }
    );
    let status = cargo_fuzz(&root, nightly)
        .arg("build")
        .args(common_flags(&root, dev))
        .status()
        .context("cannot run cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status}); its output is above");
    }
    let mut out = Vec::new();
    for t in TARGETS {
        eprintln!("==> fuzzing {t} for {seconds} s");
        out.push(run_one(&root, nightly, dev, t, seconds));
    }
    Ok(out)
}

fn run_one(root: &Path, nightly: bool, dev: bool, target: &str, seconds: u64) -> FuzzRun {
    let corpus = root.join("target/fuzz-corpus").join(target);
    let artifacts = root.join("target/fuzz-artifacts").join(target);
    let log = root.join("target/fuzz-logs").join(format!("{target}.log"));
    let mut run = FuzzRun { target: target.into(), seconds, runs: 0, crash: None, error: None };
    let prepared = [&corpus, &artifacts, &log.parent().map(Path::to_path_buf).unwrap_or_default()]
        .iter()
        .try_for_each(std::fs::create_dir_all);
    if let Err(e) = prepared {
        run.error = Some(format!("cannot create the corpus or artifact directory: {e}"));
        return run;
    }
    let mut cmd = cargo_fuzz(root, nightly);
    cmd.arg("run").args(common_flags(root, dev)).arg(target).arg(&corpus);
    let seeds = root.join("fuzz/seeds").join(target);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048", "-max_len=65536"]);
    let output = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            run.error = Some(format!("cannot run cargo fuzz: {e}"));
            return run;
        }
    };
    let text = String::from_utf8_lossy(&output.stderr);
    let _ = std::fs::write(&log, text.as_bytes());
    run.runs = executed(&text);
    if !output.status.success() {
        match reproducer(&text) {
            Some(p) => run.crash = Some(p),
            None => {
                run.error =
                    Some(format!("libFuzzer exited with {}; its output: {}", output.status, log.display()))
            }
        }
    }
    run
}

/// The flags every cargo-fuzz call takes.
fn common_flags(root: &Path, dev: bool) -> Vec<String> {
    let mut flags = vec![
        "--fuzz-dir".into(),
        root.join("fuzz").display().to_string(),
        "--target-dir".into(),
        root.join("target/fuzz").display().to_string(),
        "--sanitizer".into(),
        "none".into(),
        "--debug-assertions".into(),
    ];
    if dev {
        flags.push("--dev".into());
    }
    flags
}

/// `cargo fuzz` with the toolchain chosen, run from the workspace root.
fn cargo_fuzz(root: &Path, nightly: bool) -> Command {
    let mut c = Command::new("cargo");
    if nightly {
        c.arg("+nightly");
    } else {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    c.arg("fuzz").current_dir(root);
    // The outer cargo's choices are not the fuzz build's.
    for v in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WRAPPER", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO"] {
        c.env_remove(v);
    }
    c
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("nightly")))
}

/// Installs cargo-fuzz from crates.io when `cargo fuzz` is missing.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("==> installing cargo-fuzz from crates.io (once; a few minutes)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status}); its output is above");
    }
    Ok(())
}

/// libFuzzer's count of inputs run (`stat::number_of_executed_units`).
pub fn executed(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The crashing input libFuzzer saved (`Test unit written to <path>`).
pub fn reproducer(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_owned()))
}

/// How a crash is run again by hand, from the workspace root.
pub fn rerun_hint(target: &str, input: &str, dev: bool) -> String {
    let dev = if dev { " --dev" } else { "" };
    format!(
        "cargo +nightly fuzz run --fuzz-dir fuzz --target-dir target/fuzz -s none -a{dev} {target} {input}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzers_closing_lines_give_the_runs_and_the_reproducer() {
        let ok = "#1024\tDONE   cov: 12\nstat::number_of_executed_units: 53211\nstat::peak_rss_mb: 40\n";
        assert_eq!(executed(ok), 53211);
        assert_eq!(reproducer(ok), None);
        let crashed = "thread '<unnamed>' panicked at src/x.rs:3:5\n==1== ERROR: libFuzzer: deadly signal\n\
                       artifact_prefix='t/'; Test unit written to t/crash-abc\nBase64: AAA=\n";
        assert_eq!(reproducer(crashed).as_deref(), Some("t/crash-abc"));
        assert_eq!(executed(crashed), 0);
    }

    #[test]
    fn every_target_has_its_file_and_its_bin_entry() {
        let fuzz = crate::workspace_root().join("fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(fuzz.join(format!("fuzz_targets/{t}.rs")).is_file(), "{t}");
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t} not in fuzz/Cargo.toml");
        }
    }
}
