//! The Debian guest end to end: `cargo xtask build-guest --os debian
//! --smoke` builds the image (mmdebstrap from the host's mirror, the
//! informant's package; minutes the first time, cached after), boots it
//! under QEMU (TCG), waits for the ready line with PostgreSQL and the
//! informant active and queries PostgreSQL from the host. A second run must
//! find the image up to date.
//!
//! Building needs root (mmdebstrap's root mode); without it the test skips,
//! and under `CI=true` it fails instead.
#![allow(clippy::expect_used)]

use std::process::Command;
use std::time::Instant;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
}

fn xtask(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().expect("run xtask");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The whole log is long (mmdebstrap, cargo, the console): the end says why.
    let tail: Vec<&str> = stderr.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(out.status.success(), "xtask {args:?} failed:\n{}\n{stdout}", tail.join("\n"));
    (stdout, tail.join("\n"))
}

#[test]
fn debian_guest_boots_to_postgres_and_the_informant() {
    if !is_root() {
        vmscale_common::testing::skip_unless_ci("not root: mmdebstrap builds the Debian guest as root");
        return;
    }
    let (stdout, _) = xtask(&["build-guest", "--os", "debian", "--smoke"]);
    assert!(stdout.contains("smoke test passed"), "{stdout}");
    println!("{stdout}");

    let t0 = Instant::now();
    let (stdout, _) = xtask(&["build-guest", "--os", "debian"]);
    assert!(stdout.contains("debian guest image up to date"), "{stdout}");
    println!("second run: up to date in {:.1} s", t0.elapsed().as_secs_f64());
}
