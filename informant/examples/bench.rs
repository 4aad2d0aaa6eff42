//! Measures a running release informant with all its sources on, and prints
//! the figures as JSON:
//!
//! - `rss_mib`, `idle_cpu_pct`: the informant as a child process, idle for
//!   `--idle-secs` with an agent subscribed (samples flowing), from
//!   `/proc/<pid>/status` VmRSS and `/proc/<pid>/stat` utime+stime;
//! - `event_latency_p50_us`, `event_latency_p99_us`: from the kernel's
//!   timestamp of an eBPF tracepoint (memcg reclaim under a memory hog) to this
//!   gRPC client receiving the event over loopback, compared on
//!   CLOCK_MONOTONIC. Without the eBPF source (no object, no CAP_BPF) they are
//!   the cgroup-events path instead: from this process's write of a
//!   `memory.events` file to receiving the event (inotify, read, fan-out,
//!   gRPC), and `latency_source` says which.
//!
//! Build and run (root, for cgroups and eBPF):
//!
//! ```text
//! cargo build --release -p vmscale-informant --bin vmscale-informant --example bench
//! target/release/examples/bench --json target/bench/informant.json
//! ```

#![allow(clippy::unwrap_used)]

use anyhow::{bail, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmscale_informant::event::monotonic_ns;
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_client::InformantClient;

const MIB: f64 = (1u64 << 20) as f64;

struct Args {
    json: Option<PathBuf>,
    idle_secs: u64,
    events: usize,
    binary: Option<PathBuf>,
    /// Niceness for the informant and this client (e.g. -10, as the unit's
    /// CPUWeight=1000 gives the informant priority); none by default.
    nice: Option<i32>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { json: None, idle_secs: 10, events: 500, binary: None, nice: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--json" => a.json = Some(value()?.into()),
            "--idle-secs" => a.idle_secs = value()?.parse()?,
            "--events" => a.events = value()?.parse()?,
            "--binary" => a.binary = Some(value()?.into()),
            "--nice" => a.nice = Some(value()?.parse()?),
            "-h" | "--help" => {
                println!("bench [--json PATH] [--idle-secs 10] [--events 500] [--binary PATH] [--nice N]");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}; see --help"),
        }
    }
    Ok(a)
}

/// The informant binary beside this example's directory (target/release).
fn informant_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let p = match explicit {
        Some(p) => p,
        None => {
            let exe = std::env::current_exe()?;
            exe.parent().and_then(Path::parent).context("no parent directory")?.join("vmscale-informant")
        }
    };
    if !p.is_file() {
        bail!(
            "{} is missing; build it first: cargo build --release -p vmscale-informant --bin \
             vmscale-informant --example bench",
            p.display()
        );
    }
    Ok(p)
}

/// A real cgroup2 directory for the workload's `memory.pressure` where the
/// host has one (here: /sys/fs/cgroup/unified, without the memory
/// controller), and a directory the informant watches that holds a
/// hand-written `memory.events` and `memory.stat` beside a symlink to that
/// real `memory.pressure`. So every source runs: the PSI triggers on real
/// kernel files, the cgroup-events watch on a file this bench writes.
struct Workload {
    dir: tempfile::TempDir,
    real: Option<PathBuf>,
}

impl Workload {
    fn new() -> anyhow::Result<Workload> {
        let dir = tempfile::tempdir()?;
        let w = dir.path();
        std::fs::write(
            w.join("memory.events"),
            "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        )?;
        std::fs::write(w.join("memory.stat"), "anon 1048576\nfile 0\n")?;
        let unified = Path::new("/sys/fs/cgroup/unified");
        let real = unified.join(format!("vmscale-bench-{}", std::process::id()));
        let real = if unified.join("cgroup.procs").exists() && std::fs::create_dir(&real).is_ok() {
            std::os::unix::fs::symlink(real.join("memory.pressure"), w.join("memory.pressure"))?;
            Some(real)
        } else {
            eprintln!(
                "no cgroup2 directory to borrow memory.pressure from; the cgroup PSI trigger stays off"
            );
            None
        };
        Ok(Workload { dir, real })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Rewrites `memory.events` in place in one write, as the kernel does.
    fn set_high(&self, high: u64) -> anyhow::Result<()> {
        let text = format!("low 0\nhigh {high}\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n");
        let mut f = std::fs::OpenOptions::new().write(true).open(self.path().join("memory.events"))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(r) = &self.real {
            let _ = std::fs::remove_dir(r);
        }
    }
}

/// `tail /dev/zero` over and over in a 64 MiB v1 memory cgroup: memcg
/// reclaim for the eBPF programs, stalls for PSI.
struct Hog {
    shell: Child,
    cgroup: PathBuf,
}

impl Hog {
    fn start() -> anyhow::Result<Hog> {
        let cgroup = PathBuf::from(format!("/sys/fs/cgroup/memory/vmscale-bench-hog-{}", std::process::id()));
        std::fs::create_dir(&cgroup).with_context(|| format!("cannot create {}", cgroup.display()))?;
        std::fs::write(cgroup.join("memory.limit_in_bytes"), (64u64 << 20).to_string())?;
        let shell = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {}/cgroup.procs && while :; do tail /dev/zero; done", cgroup.display()))
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Hog { shell, cgroup })
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.shell.kill();
        let _ = self.shell.wait();
        for _ in 0..100 {
            if let Ok(pids) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            if std::fs::remove_dir(&self.cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The informant as a child; killed on drop.
struct Informant(Child);

impl Drop for Informant {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key} in status"))?;
    Ok(line.split_whitespace().nth(1).context("bad status line")?.parse()?)
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')').context("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Time on CPU of every thread, in ns (`/proc/<pid>/task/*/schedstat`):
/// finer than clock ticks, for a process that idles near zero.
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let s = std::fs::read_to_string(t?.path().join("schedstat")).unwrap_or_default();
        total += s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    vmscale_common::stats::nearest_rank(sorted.len(), p).map_or(0, |i| sorted[i])
}

fn summary(mut ns: Vec<u64>) -> serde_json::Value {
    ns.sort_unstable();
    serde_json::json!({
        "count": ns.len(),
        "p50_us": percentile(&ns, 0.50) as f64 / 1e3,
        "p99_us": percentile(&ns, 0.99) as f64 / 1e3,
        "max_us": ns.last().copied().unwrap_or(0) as f64 / 1e3,
    })
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let bin = informant_binary(a.binary.clone())?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(bench(a, bin))
}

fn load_avg_1() -> Option<f64> {
    let l = std::fs::read_to_string("/proc/loadavg").ok()?;
    l.split_whitespace().next()?.parse().ok()
}

async fn bench(a: Args, bin: PathBuf) -> anyhow::Result<()> {
    let load_at_start = load_avg_1();
    let workload = Workload::new()?;
    let port = vmscale_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into())?;
    let log = workload.path().join("informant.log");
    let mut cmd = match a.nice {
        Some(n) => {
            let me = std::process::id().to_string();
            let ok =
                Command::new("renice").args(["-n", &n.to_string(), "-p", &me]).stdout(Stdio::null()).status();
            if !ok.is_ok_and(|s| s.success()) {
                bail!("cannot renice this process to {n}");
            }
            let mut c = Command::new("nice");
            c.args(["-n", &n.to_string()]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let child = cmd
        .args(["--listen", &format!("tcp:127.0.0.1:{port}"), "--insecure"])
        .arg("--workload-cgroup")
        .arg(workload.path())
        .args(["--log", "warn"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let informant = Informant(child);
    let pid = informant.0.id();

    let addr = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let mut client = loop {
        match InformantClient::connect(addr.clone()).await {
            Ok(c) => break c,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => bail!("informant did not come up: {e}; its log:\n{}", std::fs::read_to_string(&log)?),
        }
    };
    let hello =
        pb::HandshakeRequest { versions: Some(pb::VersionRange { min: 1, max: 1 }), agent: "bench".into() };
    let h = client.handshake(hello).await?.into_inner();
    let sources: Vec<_> = h
        .sources
        .iter()
        .map(|s| serde_json::json!({"name": s.name, "available": s.available, "reason": s.reason}))
        .collect();
    for s in &h.sources {
        eprintln!("source {:<14} {} {}", s.name, if s.available { "up  " } else { "DOWN" }, s.reason);
    }
    let ebpf_up = h.sources.iter().any(|s| s.name == "ebpf" && s.available);

    // Everything the subscription delivers goes through one channel, stamped on arrival.
    let mut stream = client.subscribe(pb::SubscribeRequest {}).await?.into_inner();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, pb::Event)>();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            if tx.send((monotonic_ns(), ev)).is_err() {
                return;
            }
        }
    });

    // Idle: an agent subscribed, samples flowing, nothing else.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, c0, n0) = (Instant::now(), cpu_ticks(pid)?, cpu_ns(pid)?);
    tokio::time::sleep(Duration::from_secs(a.idle_secs)).await;
    let (secs, c1, n1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid)?, cpu_ns(pid)?);
    let idle_cpu_pct = (c1 - c0) as f64 / clock_ticks_per_sec() as f64 / secs * 100.0;
    let idle_cpu_pct_schedstat = n1.saturating_sub(n0) as f64 / 1e9 / secs * 100.0;
    let rss_mib = status_kib(pid, "VmRSS:")? as f64 * 1024.0 / MIB;
    let mut samples = 0;
    while let Ok((_, ev)) = rx.try_recv() {
        samples += usize::from(ev.source == "sampler");
    }
    eprintln!(
        "idle {secs:.1} s: {idle_cpu_pct:.3}% of a core (stat ticks), {idle_cpu_pct_schedstat:.4}% (schedstat), \
         RSS {rss_mib:.2} MiB, {samples} samples received"
    );

    // cgroup events: this process writes memory.events, the client receives.
    let mut cgroup_ns = Vec::with_capacity(a.events);
    let mut cgroup_stamp_ns = Vec::with_capacity(a.events);
    for i in 0..a.events {
        let sent = monotonic_ns();
        workload.set_high(i as u64 + 1)?;
        loop {
            let (got, ev) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .context("no cgroup event within 5 s")?
                .context("stream ended")?;
            if ev.source == "cgroup_events" {
                cgroup_ns.push(got.saturating_sub(sent));
                cgroup_stamp_ns.push(got.saturating_sub(ev.monotonic_ns));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2 + (i % 5) as u64)).await;
    }

    // A memory hog: eBPF reclaim events (kernel timestamps) and PSI events.
    let mut ebpf_ns = Vec::new();
    let mut ebpf_by_kind: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut psi_events = 0;
    let hog = Hog::start();
    if let Err(e) = &hog {
        eprintln!("no memory hog ({e:#}); no eBPF or PSI events measured");
    }
    let until = Instant::now() + Duration::from_secs(6);
    while hog.is_ok() && Instant::now() < until {
        let Ok(Some((got, ev))) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await else {
            continue;
        };
        match ev.source.as_str() {
            "ebpf" => {
                let lat = got.saturating_sub(ev.monotonic_ns);
                ebpf_ns.push(lat);
                if let Some(pb::event::Body::Pressure(p)) = &ev.body {
                    ebpf_by_kind.entry(p.kind().as_str_name().to_owned()).or_default().push(lat);
                }
            }
            "psi" => psi_events += 1,
            _ => {}
        }
    }
    drop(hog);
    let rss_after_load_mib = status_kib(pid, "VmRSS:")? as f64 * 1024.0 / MIB;
    let hwm_mib = status_kib(pid, "VmHWM:")? as f64 * 1024.0 / MIB;

    let (source, headline) = if ebpf_up && ebpf_ns.len() >= 10 {
        ("ebpf: kernel tracepoint timestamp to gRPC client", summary(ebpf_ns.clone()))
    } else {
        (
            "cgroup_events: memory.events write to gRPC client (eBPF source not measured)",
            summary(cgroup_ns.clone()),
        )
    };
    let p50 = headline["p50_us"].as_f64().unwrap_or(0.0);
    let p99 = headline["p99_us"].as_f64().unwrap_or(0.0);
    let out = serde_json::json!({
        "event_latency_p50_us": p50,
        "event_latency_p99_us": p99,
        "rss_mib": (rss_mib * 100.0).round() / 100.0,
        "idle_cpu_pct": (idle_cpu_pct * 1000.0).round() / 1000.0,
        "idle_cpu_pct_schedstat": (idle_cpu_pct_schedstat * 10000.0).round() / 10000.0,
        "latency_source": source,
        "ebpf_latency": summary(ebpf_ns),
        "ebpf_latency_by_kind": ebpf_by_kind.into_iter().map(|(k, v)| (k, summary(v))).collect::<serde_json::Map<_, _>>(),
        "cgroup_events_latency": summary(cgroup_ns),
        "cgroup_events_stamp_to_client": summary(cgroup_stamp_ns),
        "psi_events_under_hog": psi_events,
        "rss_after_load_mib": (rss_after_load_mib * 100.0).round() / 100.0,
        "rss_peak_mib": (hwm_mib * 100.0).round() / 100.0,
        "idle_secs": a.idle_secs,
        "nice": a.nice,
        "load_avg_1": {"start": load_at_start, "end": load_avg_1()},
        "sources": sources,
        "targets": {"event_latency_p99_us": 2000, "rss_mib": 10, "idle_cpu_pct": 0.5},
        "pass": p99 <= 2000.0 && rss_mib <= 10.0 && idle_cpu_pct <= 0.5,
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(p) = a.json {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&p, text + "\n").with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    drop(informant);
    Ok(())
}
