//! The guest image end to end: `cargo xtask build-guest --smoke` builds the
//! image (cached; the first build compiles a static informant, minutes),
//! boots it under QEMU (TCG) and waits for the informant inside to answer a
//! gRPC Handshake with its sources up.
//!
//! It needs root (to install QEMU and the rest) or QEMU already installed;
//! without either it skips, and under `CI=true` it fails instead.

mod e2e_support;

use std::process::Command;

#[test]
fn guest_boots_and_its_informant_answers() {
    if !e2e_support::can_boot_guests() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["build-guest", "--smoke"])
        .output()
        .expect("run xtask build-guest --smoke");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The whole log is long (cargo, apt, the console): the end says why.
    let tail: Vec<&str> = stderr.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(out.status.success(), "build-guest --smoke failed:\n{}\n{stdout}", tail.join("\n"));
    assert!(stdout.contains("smoke test passed"), "{stdout}");
    println!("{stdout}");
}
