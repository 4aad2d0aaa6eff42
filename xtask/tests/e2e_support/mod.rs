//! What the tests that boot guests share: whether they can run here, and
//! one `cargo xtask e2e` scenario run through the xtask binary. Booting
//! needs root (to install QEMU and the rest) or QEMU already installed;
//! without either a test skips, and under `CI=true` it fails instead.
#![allow(clippy::expect_used)]
// a test's setup failing is the test failing

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::process::Command;

/// Whether a guest can boot here; says why not, and fails under `CI=true`.
pub fn can_boot_guests() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    if !root && !qemu {
        vmscale_common::testing::skip_unless_ci(
            "not root and no qemu-system-x86_64: nothing can boot the guest",
        );
        return false;
    }
    true
}

/// Whether network namespaces with bridges and taps can be made here (root,
/// `/dev/net/tun`, `ip`); says why not, and fails under `CI=true`.
pub fn can_make_namespaces() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    let why = if !root {
        Some("not root: network namespaces, bridges and taps need root")
    } else if !std::path::Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun is missing: tap devices cannot be made")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("`ip` is missing (iproute2)")
    } else {
        None
    };
    if let Some(reason) = why {
        vmscale_common::testing::skip_unless_ci(reason);
        return false;
    }
    true
}

pub fn run_scenario(name: &str) {
    if !can_boot_guests() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["e2e", name])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run xtask e2e");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The whole log is long (cargo, apt): the end says why.
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(out.status.success(), "xtask e2e {name} failed:\n{}\n{stdout}", tail.join("\n"));
    assert!(stdout.contains(&format!("e2e {name} passed")), "{stdout}");
    println!("{stdout}");
}
