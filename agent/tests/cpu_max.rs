//! Fractional CPUs on this machine's real cgroups: a real process in a real
//! cpu cgroup (v1 here: the host is hybrid) gets its quota written through
//! `cpu_max`, read back, and is held to it.
//!
//! Needs root and a cgroup v1 cpu hierarchy (or cgroup v2 with the cpu
//! controller enabled at the root). Under `CI=true` a test that cannot run
//! fails with the reason; elsewhere it prints the reason and passes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use vmscale_agent::qmp::types::{CpuProps, VcpuThread};
use vmscale_agent::qmp::VcpuThreads;
use vmscale_agent::vm_loop::cpu_max::{self, limit_for, CpuCgroup, CpuLimit, Version, DEFAULT_PERIOD_US};

/// Fails under `CI=true`, else says why the test skips.
fn skip_unless_ci(reason: &str) {
    vmscale_common::testing::skip_unless_ci(reason);
}

/// A cpu hierarchy where we may make a child cgroup, and its version.
fn cpu_hierarchy() -> Option<(PathBuf, Version)> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        skip_unless_ci("the cgroup test needs root (to create a cgroup and move a process into it)");
        return None;
    }
    for v1 in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] {
        if Path::new(v1).join("cpu.cfs_quota_us").is_file() {
            return Some((PathBuf::from(v1), Version::V1));
        }
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let enabled = std::fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap_or_default();
    if enabled.split_whitespace().any(|c| c == "cpu") {
        return Some((v2.to_path_buf(), Version::V2));
    }
    skip_unless_ci("no cgroup v1 cpu hierarchy and no cgroup v2 with the cpu controller enabled at its root");
    None
}

/// A busy shell loop in a cgroup of its own; killed and removed on drop.
struct Jailed {
    child: Child,
    dir: PathBuf,
}

impl Jailed {
    fn start(hierarchy: &Path) -> Jailed {
        let dir = hierarchy.join(format!("vmscale-cpu-max-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        let j = Jailed { child, dir };
        std::fs::write(j.dir.join("cgroup.procs"), j.pid().to_string()).unwrap();
        j
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the process used so far (utime + stime).
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces) start at ") ".
        let rest = &stat[stat.rfind(") ").unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf only reads a configuration value.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
        Duration::from_millis(ticks * 1000 / hz)
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap().trim().to_owned()
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Empty now; a cgroup directory is removed with rmdir.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Stands in for QEMU: the jailed process is the QMP socket's peer, and its
/// one thread is the "vCPU thread" it reports.
#[derive(Debug)]
struct OneThread(u32);

#[async_trait]
impl VcpuThreads for OneThread {
    async fn vcpu_threads(&self) -> vmscale_agent::qmp::Result<Vec<VcpuThread>> {
        Ok(vec![VcpuThread {
            cpu_index: 0,
            thread_id: i64::from(self.0),
            qom_path: "/machine/test/cpu0".into(),
            props: CpuProps::default(),
        }])
    }

    fn qemu_pid(&self) -> Option<u32> {
        Some(self.0)
    }
}

#[tokio::test]
async fn a_real_process_gets_its_quota_and_is_held_to_it() {
    let Some((hierarchy, version)) = cpu_hierarchy() else { return };
    let jail = Jailed::start(&hierarchy);
    let proc_root = Path::new("/proc");

    let cg = CpuCgroup::of_pid(proc_root, jail.pid()).unwrap();
    assert_eq!((cg.dir.as_path(), cg.version), (jail.dir.as_path(), version));

    // Through the agent's path: the socket's peer and its threads checked,
    // its cgroup, the quota. (A node's own VM list: any cgroup of its own.)
    let applied =
        cpu_max::apply(&OneThread(jail.pid()), proc_root, &cpu_max::Scope::Node, 250).await.unwrap();
    assert_eq!(applied.pid, jail.pid());
    assert_eq!(applied.limit, CpuLimit::Quota { quota_us: 25_000, period_us: DEFAULT_PERIOD_US });
    match version {
        Version::V1 => {
            assert_eq!(jail.file("cpu.cfs_quota_us"), "25000");
            assert_eq!(jail.file("cpu.cfs_period_us"), "100000");
        }
        Version::V2 => assert_eq!(jail.file("cpu.max"), "25000 100000"),
    }
    assert_eq!(cg.get().unwrap(), applied.limit);

    // A busy loop held to a quarter of a CPU. On a loaded 2-core machine it
    // may get less, never much more.
    let t0 = jail.cpu_time();
    let wall = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = jail.cpu_time() - t0;
    let share = used.as_secs_f64() / wall.elapsed().as_secs_f64();
    println!(
        "busy loop under a 250 milli-CPU quota used {used:?} of CPU in {:?} ({share:.2} CPU)",
        wall.elapsed()
    );
    assert!(share <= 0.35, "the quota does not hold: {share:.2} CPU");

    // Whole vCPUs: the quota goes.
    cg.set(limit_for(2000, DEFAULT_PERIOD_US)).unwrap();
    assert_eq!(cg.get().unwrap(), CpuLimit::Unlimited);
    if version == Version::V1 {
        assert_eq!(jail.file("cpu.cfs_quota_us"), "-1");
    }
}

#[test]
fn the_root_cgroup_is_refused() {
    let Some((_, _)) = cpu_hierarchy() else { return };
    // pid 1 lives in the root cpu cgroup on a plain host; skip where it does not.
    let cgroups = std::fs::read_to_string("/proc/1/cgroup").unwrap_or_default();
    let in_root = cgroups.lines().any(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        ctl.split(',').any(|c| c == "cpu") && path == "/"
    });
    if !in_root {
        eprintln!("skipping: pid 1 is not in the root cpu cgroup here");
        return;
    }
    let e = CpuCgroup::of_pid(Path::new("/proc"), 1).unwrap_err();
    assert!(matches!(e, cpu_max::Error::RootCgroup { pid: 1 }), "{e}");
}
