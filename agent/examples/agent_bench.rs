//! The agent benchmark, printed as one JSON object (`cargo xtask bench agent`
//! runs it and records the figures):
//!
//! - `qmp_cpu_plug_ms`, `qmp_mem_plug_ms`, and the raw vs our client's QMP
//!   round trip (p50 over repeats) against a real QEMU under TCG;
//! - `decision_us`: one core step with an input, p50 and p99;
//! - `agent_rss_mib_50vms`: the release agent binary scaling 50 paused QEMUs
//!   (64 MiB each) registered with a real allocator.
//!
//! Needs `target/release/vmscale-{agent,allocator}` (xtask builds them) and
//! `qemu-system-x86_64`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmscale_agent::core::policy::{Cu, Policy, Size, Usage};
use vmscale_agent::core::vm::{Input, VmCore};
use vmscale_agent::qmp::bench::{run, BenchPlan};
use vmscale_agent::qmp::process::find_qemu;

fn decision_us() -> (f64, f64) {
    let cu = Cu { milli_cpu: 250, memory_bytes: 1 << 30 };
    let mut core = VmCore::new(cu, 1, 16, Policy::default(), Size::of_cus(4, cu), Size::of_cus(4, cu), 1);
    core.input(0, Input::AllocatorConnected(true));
    core.input(0, Input::InformantConnected(true));
    let mut samples = Vec::with_capacity(200_000);
    for i in 0..200_000u64 {
        let used = (i % 13) << 29;
        let t0 = Instant::now();
        core.input(i, Input::Sample(Usage { load_avg_1: (i % 7) as f64 * 0.3, memory_used_bytes: used }));
        let d = core.step(i);
        // Answer whatever it asked so the loop moves through every state.
        if let Some(a) = d.action {
            use vmscale_agent::core::vm::Action::*;
            let input = match a {
                RequestPermit { target } => Input::Permit { permitted: target },
                Plug { target } => Input::Plugged { size: target },
                NotifyUpscale { .. } => Input::UpscaleConfirmed,
                AskDownscale { .. } => Input::DownscaleAnswer { approved: i % 2 == 0 },
                Unplug { target } => Input::Unplugged { size: target },
                Release { .. } => Input::Released,
            };
            core.input(i, input);
        }
        samples.push(t0.elapsed());
        std::hint::black_box(&d);
    }
    samples.sort();
    let p = |q: f64| {
        vmscale_common::stats::nearest_rank(samples.len(), q).map_or(0.0, |i| samples[i].as_secs_f64() * 1e6)
    };
    (p(0.5), p(0.99))
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    vmscale_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into()).unwrap()
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

async fn agent_rss_50(root: &Path, qemu: &Path, dir: &Path) -> f64 {
    let n = 50;
    std::fs::create_dir_all(dir).unwrap();
    let mut qemus = Vec::new();
    let mut vms = String::new();
    for i in 0..n {
        let sock = dir.join(format!("vm{i}.qmp"));
        let child = Command::new(qemu)
            .args(["-accel", "tcg", "-M", "pc", "-nodefaults", "-nographic", "-S", "-display", "none"])
            .args(["-smp", "1,maxcpus=4", "-m", "64M,slots=4,maxmem=1G"])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", sock.display())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        qemus.push(Kill(child));
        vms.push_str(&format!(
            "[[vm]]\nid = \"vm{i}\"\nqmp = \"{}\"\ncu = {{ milli_cpu = 250, memory_bytes = 67108864 }}\n\
             min_cus = 1\nmax_cus = 8\nmemory = {{ kind = \"dimm\", dimm_bytes = 67108864 }}\n\n",
            sock.display()
        ));
    }
    let file = dir.join("vms.toml");
    std::fs::write(&file, vms).unwrap();
    let (grpc, http, agent_http) = (free_port(), free_port(), free_port());
    let _alloc = Kill(
        Command::new(root.join("target/release/vmscale-allocator"))
            .args(["--listen", &format!("127.0.0.1:{grpc}"), "--http-listen", &format!("127.0.0.1:{http}")])
            .arg("--insecure")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let agent = Kill(
        Command::new(root.join("target/release/vmscale-agent"))
            .args(["--node", "bench", "--allocator", &format!("http://127.0.0.1:{grpc}"), "--insecure"])
            .args(["--vms", file.to_str().unwrap(), "--http-listen", &format!("127.0.0.1:{agent_http}")])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Wait until the allocator's ledger holds all 50 VMs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = http_get(http, "/state").await.unwrap_or_default();
        let registered = state.matches("\"state\": \"active\"").count();
        if registered >= n {
            break;
        }
        assert!(Instant::now() < deadline, "only {registered} of {n} VMs registered in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_mib(agent.0.id())
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let qemu = find_qemu().expect("qemu-system-x86_64 (Debian package qemu-system-x86)");
    let dir = std::env::temp_dir().join(format!("vmscale-agent-bench-{}", std::process::id()));
    eprintln!("agent bench: QMP latencies against a real QEMU ...");
    let qmp = run(&qemu, &dir.join("qmp"), BenchPlan::default()).await.unwrap();
    eprintln!("agent bench: core decision time ...");
    let (d50, d99) = decision_us();
    eprintln!("agent bench: agent RSS with 50 VMs ...");
    let rss = agent_rss_50(&root, &qemu, &dir.join("fifty")).await;
    let _ = std::fs::remove_dir_all(&dir);
    let out = serde_json::json!({
        "qmp_cpu_plug_ms": qmp.qmp_cpu_plug_ms,
        "qmp_mem_plug_ms": qmp.qmp_mem_plug_ms,
        "qmp_raw_roundtrip_ms_p50": qmp.raw_roundtrip_ms_p50,
        "qmp_client_roundtrip_ms_p50": qmp.qmp_roundtrip_ms_p50,
        "agent_overhead_ms": qmp.qmp_roundtrip_ms_p50 - qmp.raw_roundtrip_ms_p50,
        "decision_us": d50,
        "decision_us_p99": d99,
        "agent_rss_mib_50vms": rss,
        "qmp": qmp,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
