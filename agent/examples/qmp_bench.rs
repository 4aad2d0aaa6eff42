//! Prints QMP hotplug latencies from our client as one JSON object.
//!
//! `cargo run --release -p vmscale-agent --example qmp_bench [-- ROUNDTRIPS CPU_PLUGS DIMM_PLUGS]`
//! Needs `qemu-system-x86_64` (Debian package `qemu-system-x86`) or `$VMSCALE_QEMU`.

use std::process::ExitCode;

use vmscale_agent::qmp::bench::{run, BenchPlan};
use vmscale_agent::qmp::process::{find_qemu, QEMU_PACKAGE};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut plan = BenchPlan::default();
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if let [roundtrips, cpus, dimms, ..] = args[..] {
        (plan.roundtrips, plan.cpu_plugs, plan.dimm_plugs) = (roundtrips, cpus, dimms);
    }
    let Some(qemu) = find_qemu() else {
        eprintln!("qemu-system-x86_64 not found: apt-get install {QEMU_PACKAGE}, or set VMSCALE_QEMU");
        return ExitCode::FAILURE;
    };
    let dir = std::env::temp_dir().join(format!("vmscale-qmp-bench-{}", std::process::id()));
    let report = run(&qemu, &dir, plan).await;
    let _ = std::fs::remove_dir_all(&dir);
    match report.map(|r| serde_json::to_string_pretty(&r)) {
        Ok(Ok(json)) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("qmp_bench: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("qmp_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
