//! Live migration between two network-namespace "nodes" with a TCP client
//! echoing through the guest (`cargo xtask migration`). Needs root (network
//! namespaces, bridges, taps) and QEMU; without them it skips, and under
//! `CI=true` it fails instead.
#![allow(clippy::expect_used)] // a test's setup failing is the test failing

use std::process::{Command, Output};

fn can_run() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();
    if root && qemu {
        return true;
    }
    vmscale_common::testing::skip_unless_ci("needs root (network namespaces, taps) and qemu-system-x86_64");
    false
}

/// Runs `xtask migration ARGS`; returns its output and its pid.
fn xtask_migration(args: &[&str]) -> (Output, u32) {
    let child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("migration")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run xtask migration");
    let pid = child.id();
    (child.wait_with_output().expect("xtask migration ends"), pid)
}

/// Namespaces the run with `pid` left behind.
fn leftovers(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("vmsm{pid}-")))
        .map(str::to_owned)
        .collect()
}

fn tail(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().rev().take(40).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[test]
fn a_grown_guest_survives_a_cut_network_then_moves_twice_and_its_tcp_connection_loses_no_line() {
    if !can_run() {
        return;
    }
    let (out, pid) = xtask_migration(&["--hotplug", "--moves", "2", "--break-network"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "xtask migration failed:\n{}\n{stdout}", tail(&out.stderr));
    assert!(stdout.contains("migration passed") && stdout.contains(" 0 lost, 0 wrong"), "{stdout}");
    assert!(stdout.contains("move 2:"), "{stdout}");
    assert_eq!(leftovers(pid), Vec::<String>::new(), "network namespaces left behind");
    println!("{stdout}");
}

#[test]
fn a_run_that_fails_leaves_no_namespace_behind() {
    if !can_run() {
        return;
    }
    // 64 TiB of guest memory: QEMU refuses to start, after the network is built.
    let (out, pid) = xtask_migration(&["--no-build", "--memory-mib", "67108864"]);
    assert!(!out.status.success(), "a 64 TiB guest booted?\n{}", tail(&out.stderr));
    assert_eq!(leftovers(pid), Vec::<String>::new(), "network namespaces left behind");
}
