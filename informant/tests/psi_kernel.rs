//! On this machine's real kernel: a memory hog thrashing in a small memory
//! cgroup makes the informant's PSI triggers fire, and the events reach a
//! gRPC client. Needs root, PSI and a memory cgroup (v1 `memory` hierarchy,
//! as on this host, or cgroup v2 with the memory controller, as in the guest).
//! Under CI=true it fails when it cannot run; elsewhere it says why it skips.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vmscale_informant::config::Config;
use vmscale_informant::{serve, skip_unless_ci, Listener};
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_client::InformantClient;

const LIMIT: u64 = 64 << 20;
/// Alone, both triggers fire within a few seconds (the cgroup's after one
/// or a few of its 2 s windows); one full test run once saw no cgroup event
/// in 30 s, so the bound is loose: the test is about the events arriving.
const DEADLINE: Duration = Duration::from_secs(90);

/// A shell that runs `tail /dev/zero` (which grows until the OOM killer
/// takes it) over and over inside a memory-limited cgroup, and, where the
/// host has a cgroup2 tree apart from the memory controller, inside a cgroup
/// there too, whose `memory.pressure` then shows the stalls.
struct Hog {
    shell: Child,
    limited: PathBuf,
    unified: Option<PathBuf>,
    /// The shell's stderr, for a failure's message.
    errors: PathBuf,
}

impl Hog {
    fn start(name: &str) -> Result<Hog, String> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let (limited, limit_file, unified) = if v1.join("memory.limit_in_bytes").exists() {
            let unified = Path::new("/sys/fs/cgroup/unified");
            let unified = unified.join("cgroup.procs").exists().then(|| unified.join(name));
            (v1.join(name), "memory.limit_in_bytes", unified)
        } else if std::fs::read_to_string(v2.join("cgroup.controllers")).is_ok_and(|c| c.contains("memory")) {
            (v2.join(name), "memory.max", None)
        } else {
            return Err("no memory cgroup controller (neither v1 nor v2)".into());
        };
        let mk = |d: &Path| std::fs::create_dir(d).map_err(|e| format!("cannot create {}: {e}", d.display()));
        mk(&limited)?;
        if let Some(u) = &unified {
            mk(u)?;
        }
        std::fs::write(limited.join(limit_file), LIMIT.to_string())
            .map_err(|e| format!("cannot limit {}: {e}", limited.display()))?;
        let mut join = format!("echo $$ > {}/cgroup.procs", limited.display());
        if let Some(u) = &unified {
            join += &format!(" && echo $$ > {}/cgroup.procs", u.display());
        }
        let errors = std::env::temp_dir().join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&errors).map_err(|e| format!("{}: {e}", errors.display()))?;
        let shell = Command::new("sh")
            .arg("-c")
            .arg(format!("{join} && while :; do tail /dev/zero; done"))
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start the hog: {e}"))?;
        let mut hog = Hog { shell, limited, unified, errors };
        // The shell must have joined its cgroups, or nothing below is about it.
        let t0 = Instant::now();
        while !hog.joined() {
            if let Ok(Some(status)) = hog.shell.try_wait() {
                return Err(format!("the hog exited with {status}: {}", hog.describe()));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!("the hog did not join its cgroups: {}", hog.describe()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(hog)
    }

    fn joined(&self) -> bool {
        let pid = self.shell.id().to_string();
        std::iter::once(&self.limited).chain(&self.unified).all(|d| {
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| p.lines().any(|l| l == pid))
        })
    }

    /// What the hog and its cgroups show, for a failure's message.
    fn describe(&self) -> String {
        let read =
            |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| format!("({}: {e})", p.display()));
        let mut out = format!("stderr: {:?}", read(self.errors.clone()).trim());
        out += &format!(
            "; {} procs: {:?}",
            self.limited.display(),
            read(self.limited.join("cgroup.procs")).trim()
        );
        out += &format!("; failcnt: {}", read(self.limited.join("memory.failcnt")).trim());
        if let Some(u) = &self.unified {
            out += &format!("; {} procs: {:?}", u.display(), read(u.join("cgroup.procs")).trim());
            out += &format!("; memory.pressure: {:?}", read(u.join("memory.pressure")).trim());
        }
        out += &format!("; /proc/pressure/memory: {:?}", read(PathBuf::from("/proc/pressure/memory")).trim());
        out
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.shell.kill();
        let _ = self.shell.wait();
        let _ = std::fs::remove_file(&self.errors);
        for dir in std::iter::once(&self.limited).chain(&self.unified) {
            for _ in 0..100 {
                if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in pids.split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn cannot_run() -> Option<String> {
    if !std::fs::read_to_string("/proc/self/status").is_ok_and(|s| s.lines().any(|l| l == "Uid:\t0\t0\t0\t0"))
    {
        return Some("needs root (cgroups, PSI triggers)".into());
    }
    if std::fs::read_to_string("/proc/pressure/memory").is_err() {
        return Some("the kernel has no PSI (/proc/pressure/memory)".into());
    }
    None
}

#[tokio::test]
async fn psi_triggers_fire_under_thrashing_and_reach_the_client() {
    if let Some(why) = cannot_run() {
        skip_unless_ci(&why);
        return;
    }
    let name = format!("vmscale-psi-test-{}", std::process::id());
    let unified = Path::new("/sys/fs/cgroup/unified").join(&name);
    let mut config = Config {
        ebpf: false,
        // Plain text on loopback: the test is about PSI, not TLS.
        insecure: true,
        sample_interval_ms: 1000,
        // The hog's cgroup on the cgroup2 tree, for its memory.pressure;
        // created below before the informant starts.
        workload_cgroup: None,
        ..Config::default()
    };
    config.psi.cpu.enabled = false;
    // Low thresholds: any real thrashing passes them. Without
    // CAP_SYS_RESOURCE the informant widens the window to 2 s by itself.
    config.psi.memory.stall_us = 10_000;
    config.psi.memory.window_us = 500_000;
    config.psi.cgroup_memory = config.psi.memory;

    let hog_started = Instant::now();
    let hog = match Hog::start(&name) {
        Ok(h) => h,
        Err(why) => {
            skip_unless_ci(&why);
            return;
        }
    };
    if hog.unified.is_some() {
        config.workload_cgroup = Some(unified.clone());
    }

    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(config, Listener::Tcp(l), stop.clone()));
    let mut client = InformantClient::connect(addr).await.unwrap();
    let h = client
        .handshake(pb::HandshakeRequest {
            versions: Some(pb::VersionRange { min: 1, max: 1 }),
            agent: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let psi = h.sources.iter().find(|s| s.name == "psi").unwrap();
    assert!(psi.available, "PSI source down: {}", psi.reason);
    eprintln!("psi source: {}", if psi.reason.is_empty() { "as configured" } else { &psi.reason });

    let mut stream = client.subscribe(pb::SubscribeRequest {}).await.unwrap().into_inner();
    let mut want = vec![pb::pressure::Kind::PsiMemory];
    if hog.unified.is_some() {
        want.push(pb::pressure::Kind::PsiCgroupMemory);
    }
    let end = Instant::now() + DEADLINE;
    while !want.is_empty() {
        let left = end.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, stream.message()).await;
        let ev = match msg {
            Ok(m) => m.unwrap().expect("stream open"),
            Err(_) => panic!("no {want:?} event within {DEADLINE:?} of thrashing; {}", hog.describe()),
        };
        if let Some(pb::event::Body::Pressure(p)) = &ev.body {
            if let Some(i) = want.iter().position(|k| *k == p.kind()) {
                assert_eq!(ev.source, "psi");
                assert!(p.stall_ns > 0);
                eprintln!("{:?} after {:?} of thrashing", p.kind(), hog_started.elapsed());
                want.remove(i);
            }
        }
    }
    drop(hog);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
}
