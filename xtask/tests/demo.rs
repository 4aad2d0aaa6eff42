//! The README's run command, as a newcomer uses it: `cargo xtask demo`
//! started in a terminal of its own, watched until the busy VM has been given
//! memory and its CPU burst has begun, then stopped with Ctrl-C the way a
//! terminal sends it (SIGINT to the whole process group, so QEMU, the agent
//! and the allocator get it too). It must stop cleanly, write its timeline,
//! and leave nothing running. Where the demo runs two nodes (network
//! namespaces, as root), the idle VM must also have been moved live to node
//! b, and the timeline must mark the move.
//!
//! Needs root (to install QEMU) or QEMU installed; without either it skips,
//! and under `CI=true` it fails instead.

mod e2e_support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds (guest image, release daemons) on a cold machine included.
const START_TIMEOUT: Duration = Duration::from_secs(1500);

/// The busy VM's memory in the live view's latest row for it (columns VM,
/// NODE, vCPUs, MEM MiB, ...).
fn busy_memory_mib(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.starts_with("busy "))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What the live view says once the allocator's order moved the idle VM.
const MOVED: &str = "idle node-a -> node-b: completed";

/// Whether the demo runs two nodes (and so must show a migration).
fn two_nodes(log: &str) -> bool {
    log.contains("two nodes as network namespaces")
}

/// Processes whose command line names `dir`: what the demo started there.
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(&needle) {
            found.push(format!("{pid}: {cmd}"));
        }
    }
    found
}

#[test]
fn the_demo_scales_a_vm_and_ctrl_c_stops_everything_it_started() {
    if !e2e_support::can_boot_guests() {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    let demo_dir = root.join("target/demo");
    // Not in the demo's own directory, which it empties when it starts.
    let logs = root.join(format!("target/demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&logs).expect("log directory");
    let err_path = logs.join("stderr");
    let out_path = logs.join("stdout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("demo")
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        // A terminal's foreground job: its own process group, which Ctrl-C
        // signals as a whole.
        .process_group(0)
        .spawn()
        .expect("start xtask demo");
    let pgid = child.id();
    let read = |p: &Path| {
        let mut s = String::new();
        let _ = std::fs::File::open(p).and_then(|mut f| f.read_to_string(&mut s));
        s
    };
    let tail = |s: &str| {
        s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    };

    // Up and scaling: the busy VM got memory beyond its 1024 MiB, and its
    // CPU burst began.
    let t0 = Instant::now();
    let mut grew = None;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("the demo exited by itself ({status}):\n{}", tail(&read(&err_path)));
        }
        // The steps go to stderr, the live view to stdout.
        let log = read(&err_path) + &read(&out_path);
        if grew.is_none() {
            grew = busy_memory_mib(&log).filter(|m| *m > 1024);
        }
        let moved = !two_nodes(&log) || log.contains(MOVED);
        if grew.is_some() && log.contains("demo: CPU burst") && moved {
            break;
        }
        assert!(
            t0.elapsed() < START_TIMEOUT,
            "no memory upscale and CPU burst (or, with two nodes, no move of the idle VM) after {:?} \
             (busy VM memory {:?} MiB, moved {}):\n{}",
            t0.elapsed(),
            busy_memory_mib(&log),
            log.contains(MOVED),
            tail(&log)
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Ctrl-C.
    let sent = Command::new("kill").args(["-s", "INT", "--", &format!("-{pgid}")]).status().expect("kill");
    assert!(sent.success(), "kill -INT -{pgid} failed");
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if stopped.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the demo did not stop within 60 s of Ctrl-C:\n{}", tail(&read(&err_path)));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (read(&out_path), read(&err_path));
    assert!(status.success(), "the demo failed on Ctrl-C ({status}):\n{}\n{out}", tail(&err));
    assert!(out.contains("demo stopped after"), "no closing line:\n{out}");

    // Nothing left running: not in its process group, not anywhere with the
    // demo's directory on its command line (QEMU's sockets and images live
    // there). Give the kernel a moment to reap what was killed last.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let group_gone = !Command::new("kill")
            .args(["-0", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status()
            .expect("kill -0")
            .success();
        let left = processes_under(&demo_dir);
        if group_gone && left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left running after the demo stopped (group alive: {}): {left:#?}",
            !group_gone
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The timeline: an SVG with the busy VM's use and allocation drawn.
    let svg = std::fs::read_to_string(demo_dir.join("timeline.svg")).expect("timeline.svg written");
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "not an SVG: {}", &svg[..svg.len().min(80)]);
    assert!(svg.trim_end().ends_with("</svg>"), "the SVG is cut short");
    assert!(svg.contains("<polyline") || svg.contains("<path"), "nothing drawn in the timeline");
    assert!(out.contains("timeline.svg"), "the closing line does not say where the timeline is:\n{out}");
    if two_nodes(&err) {
        assert!(!out.contains(" 0 live migration"), "the closing line counts no move:\n{out}");
        assert!(svg.contains("idle -&gt; node-b: completed"), "the timeline does not mark the move");
    }
    println!("demo: busy VM grew to {} MiB; stopped by Ctrl-C in {:?}", grew.unwrap_or(0), stopped.elapsed());
}
