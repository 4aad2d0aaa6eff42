//! The README's run command, as a newcomer uses it: `cargo xtask demo`
//! (with `--quick`, its short phase plan) started in a terminal of its own,
//! watched until its phases are done, then stopped with Ctrl-C the way a
//! terminal sends it (SIGINT to the whole process group, so QEMU, the
//! agents and the allocator get it too). It must stop cleanly, write its
//! timeline, print its summary, and leave nothing running. The summary's
//! `check:` lines must all say yes: pg-1's vCPUs and memory grew and came
//! back down, no OOM kill, the ledger released, pgbench saw no error, and,
//! with two nodes, pg-2 moved live to node b under pgbench.
//!
//! Needs root (network namespaces, taps, the image build) and QEMU; without
//! them it skips, and under `CI=true` it fails instead.

mod e2e_support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds (Debian image, release daemons) on a cold machine included, then
/// the quick phases (about 5 minutes under TCG).
const DONE_TIMEOUT: Duration = Duration::from_secs(1800);

/// The live view's header once the phases are over.
const DONE: &str = "phase: done";

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
fn the_demo_scales_postgres_vms_and_ctrl_c_stops_everything_it_started() {
    // The Postgres guests sit on taps in network namespaces, one node or two.
    if !e2e_support::can_boot_guests() || !e2e_support::can_make_namespaces() {
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
        .args(["demo", "--quick"])
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
        s.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    };

    // The phases run to their end (the view says "done").
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!(
                "the demo exited by itself ({status}):\n{}\n{}",
                tail(&read(&err_path)),
                tail(&read(&out_path))
            );
        }
        if read(&out_path).contains(DONE) {
            break;
        }
        if t0.elapsed() > DONE_TIMEOUT {
            let _ = Command::new("kill").args(["-s", "INT", "--", &format!("-{pgid}")]).status();
            std::thread::sleep(Duration::from_secs(20));
            panic!("the demo's phases did not end within {DONE_TIMEOUT:?}:\n{}", tail(&read(&out_path)));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let phases_took = t0.elapsed();

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
    assert!(status.success(), "the demo failed on Ctrl-C ({status}):\n{}\n{}", tail(&err), tail(&out));
    assert!(out.contains("demo stopped after"), "no closing line:\n{}", tail(&out));

    // Nothing left running: not in its process group, not anywhere with the
    // demo's directory on its command line (QEMU's disks and sockets,
    // pgbench's logs live there). Give the kernel a moment to reap.
    let deadline = Instant::now() + Duration::from_secs(15);
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

    // What the summary claims.
    let summary = &out[out.rfind("\nsummary").expect("a summary")..];
    let checks: Vec<&str> = summary.lines().filter(|l| l.starts_with("check: ")).collect();
    let mut claims = vec![
        "pg-1's vCPUs grew and came back down",
        "pg-1's memory grew and came back down",
        "no OOM kill in pg-1",
        "the ledger released pg-1",
        "pgbench saw no error",
    ];
    if two_nodes(&err) {
        claims.push("pg-2 moved live to node-b under pgbench");
    }
    for claim in claims {
        assert!(
            checks.iter().any(|l| l.contains(claim) && l.ends_with(": yes")),
            "the summary does not confirm \"{claim}\":\n{summary}\n{}",
            tail(&out[..out.len() - summary.len()])
        );
    }

    // The timeline: vCPUs, memory and TPS drawn, the move marked.
    let svg = std::fs::read_to_string(demo_dir.join("timeline.svg")).expect("timeline.svg written");
    assert!(svg.starts_with("<svg"), "not an SVG: {}", &svg[..svg.len().min(80)]);
    assert!(svg.trim_end().ends_with("</svg>"), "the SVG is cut short");
    assert!(svg.matches("<polyline").count() >= 3, "too little drawn in the timeline");
    assert!(!svg.contains("no throughput measured"), "no TPS in the timeline");
    if two_nodes(&err) {
        assert!(svg.contains("pg-2 -&gt; node-b: completed"), "the timeline does not mark the move");
    }
    println!(
        "demo --quick: phases done in {phases_took:?}, stopped by Ctrl-C in {:?}\n{summary}",
        stopped.elapsed()
    );
}
