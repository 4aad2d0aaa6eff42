//! Fractional CPUs: a VM of 0.75 or 1.5 vCPUs gets one or two vCPUs online
//! and its QEMU process's CPU time capped by CFS bandwidth control, cgroup
//! v2 `cpu.max` ("QUOTA PERIOD") or v1 `cpu.cfs_quota_us` /
//! `cpu.cfs_period_us`. Whole vCPUs get no quota: the vCPU count already
//! bounds the guest, and a quota would only throttle QEMU's own I/O threads.
//!
//! Which cgroup: the one the QEMU process is in, found from
//! `/proc/<pid>/cgroup` and the agent's own `/proc/self/mountinfo` (so
//! hybrid hosts, cgroup namespaces and odd mount points all resolve). The
//! cpu controller is either on a v1 hierarchy or on v2, never both; a v1
//! line naming `cpu` wins. The launcher must have put QEMU in a cgroup of its
//! own (a pod's container, a systemd scope): the root cgroup cannot be
//! limited and a shared one would cap its neighbours too.
//!
//! Whose cgroup: the agent runs as root and writes where it is told, so a
//! VM must not be able to point it at another process (the review's
//! confused deputy: a pod's `tcp:` QMP endpoint answering `query-cpus-fast`
//! with another process's thread ids). So, before any write ([`apply`]):
//!
//! 1. QEMU's pid comes from the kernel, not from QEMU's answers: the QMP
//!    unix socket's peer credentials (`SO_PEERCRED`, taken at connect,
//!    [`crate::qmp::VcpuThreads::qemu_pid`]). Over TCP there is none, and
//!    nothing is written.
//! 2. Every vCPU thread id QEMU reports must be a thread of that pid
//!    (`/proc/<pid>/task/<tid>` exists): a monitor that reports threads of
//!    another process is not QEMU's own.
//! 3. In Kubernetes, QEMU's cgroup must lie under the pod's
//!    ([`Scope::Pod`]): the pod UID is a component of its kubepods path, with
//!    `-` (cgroupfs driver: `/kubepods/burstable/pod<uid>/...`) or `_`
//!    (systemd driver: `.../kubepods-burstable-pod<uid_>.slice/...`).
//!
//! Anything else: no write, and an error that says which check failed.
//!
//! The paths are read as the agent's cgroup namespace shows them. An agent
//! in a cgroup namespace of its own (containerd's default on cgroup v2) sees
//! other pods' cgroups as `/../..`-relative paths, which are never taken as
//! under a pod: there `cpu.max` is refused, not written somewhere unchecked.
//!
//! Paths are parameters: tests build fake `/proc` and cgroup trees.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::qmp::VcpuThreads;
use procfs_core::FromRead;

/// The CFS period the agent sets with a quota: the kernel's default, 100 ms.
pub const DEFAULT_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel takes (1 ms).
pub const MIN_QUOTA_US: u64 = 1_000;

/// A CPU bandwidth limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CpuLimit {
    /// No quota (`max`, or -1 on v1).
    Unlimited,
    /// At most `quota_us` of CPU time per `period_us`, over all CPUs.
    Quota { quota_us: u64, period_us: u64 },
}

/// The limit for a VM of `milli_cpu`: a quota for a fractional size, none for
/// whole vCPUs (or zero, which no valid VM has).
pub fn limit_for(milli_cpu: u64, period_us: u64) -> CpuLimit {
    if milli_cpu.is_multiple_of(1000) {
        return CpuLimit::Unlimited;
    }
    let quota = u64::try_from(u128::from(milli_cpu) * u128::from(period_us) / 1000).unwrap_or(u64::MAX);
    CpuLimit::Quota { quota_us: quota.max(MIN_QUOTA_US), period_us }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}", path = .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {value:?} to {path}", path = .path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no thread-group id (Tgid:)", path = .path.display())]
    NoTgid { path: PathBuf },
    #[error("{path}: cannot parse {text:?}", path = .path.display())]
    Parse { path: PathBuf, text: String },
    #[error(
        "process {pid} is in no cgroup with the cpu controller (no v1 `cpu` line and no v2 `0::` line in {path})",
        path = .path.display()
    )]
    NoCpuCgroup { pid: u32, path: PathBuf },
    #[error("the {hierarchy} hierarchy of process {pid} is not mounted where this agent can see it (looked in {mountinfo})", mountinfo = .mountinfo.display())]
    NotMounted { pid: u32, hierarchy: &'static str, mountinfo: PathBuf },
    #[error(
        "process {pid} runs in the root cpu cgroup, whose CPU time cannot be limited; start QEMU in a cgroup \
         of its own"
    )]
    RootCgroup { pid: u32 },
    #[error(
        "cgroup {dir} has no cpu.max: the cpu controller is not enabled for it (add +cpu to its parent's \
         cgroup.subtree_control)",
        dir = .dir.display()
    )]
    NoCpuMax { dir: PathBuf },
    #[error("QEMU reported no vCPU thread ids")]
    NoVcpuThreads,
    #[error(
        "QEMU's pid is unknown: cpu.max is set only over a unix QMP socket, whose peer credentials name \
         the QEMU process"
    )]
    NoPeerPid,
    #[error(
        "vCPU thread {tid} that QEMU reported is not a thread of the QMP socket's process {pid} (no {path}); \
         nothing written",
        path = .path.display()
    )]
    ForeignThread { tid: i64, pid: u32, path: PathBuf },
    #[error(
        "QEMU (process {pid}) is in cgroup {cgroup:?}, which is not under the cgroup of pod {pod_uid}; \
         nothing written"
    )]
    OutsidePod { pid: u32, cgroup: String, pod_uid: String },
    #[error("the VM's pod is unknown, so QEMU's cgroup cannot be checked against it; nothing written")]
    NoPod,
    #[error("asking QEMU for its vCPU threads")]
    Qmp(#[source] crate::qmp::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

/// The process (thread group) a thread belongs to.
pub fn process_of_thread(proc_root: &Path, tid: u32) -> Result<u32> {
    let path = proc_root.join(tid.to_string()).join("status");
    let status = read(&path)?;
    procfs_core::process::Status::from_read(status.as_bytes())
        .ok()
        .and_then(|s| u32::try_from(s.tgid).ok())
        .ok_or(Error::NoTgid { path })
}

/// Which cgroup interface a controller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Version {
    V1,
    V2,
}

/// A process's cpu cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuCgroup {
    pub dir: PathBuf,
    pub version: Version,
    /// The cgroup's path in its hierarchy, as `/proc/<pid>/cgroup` shows it.
    pub path: String,
}

/// The lines of `/proc/<pid>/cgroup` (hierarchy id, controllers, path),
/// parsed by procfs-core. `/proc/self/mountinfo` keeps its own parser
/// below: the crate's leaves mountinfo's octal escapes (`\040`) in paths.
fn cgroup_lines(path: &Path, text: &str) -> Result<Vec<procfs_core::ProcessCGroup>> {
    procfs_core::ProcessCGroups::from_read(text.as_bytes())
        .map(|c| c.0)
        .map_err(|_| Error::Parse { path: path.to_path_buf(), text: text.to_owned() })
}

/// A cgroup mount from mountinfo: (root inside the hierarchy, mount point,
/// filesystem type, super options).
struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    options: String,
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or("");
            Some(Mount {
                root: unescape(left.get(3)?),
                point: PathBuf::from(unescape(left.get(4)?)),
                fstype: fstype.to_owned(),
                options: options.to_owned(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal =
            b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` (a cgroup path as `/proc/<pid>/cgroup` shows it) under a mount of
/// its hierarchy whose root contains it.
fn resolve(m: &[&Mount], path: &str) -> Option<PathBuf> {
    m.iter().find_map(|m| {
        let root = m.root.trim_end_matches('/');
        let rest = path.strip_prefix(root)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        Some(m.point.join(rest.trim_start_matches('/')))
    })
}

impl CpuCgroup {
    /// The cpu cgroup of process `pid`, resolved through the agent's own
    /// mounts (`<proc_root>/self/mountinfo`).
    pub fn of_pid(proc_root: &Path, pid: u32) -> Result<CpuCgroup> {
        let cgroup_path = proc_root.join(pid.to_string()).join("cgroup");
        let cgroups = read(&cgroup_path)?;
        let mountinfo_path = proc_root.join("self/mountinfo");
        let mountinfo = read(&mountinfo_path)?;
        let all = mounts(&mountinfo);
        let not_mounted = |hierarchy| Error::NotMounted { pid, hierarchy, mountinfo: mountinfo_path.clone() };

        let lines = cgroup_lines(&cgroup_path, &cgroups)?;
        let v1 = lines.iter().find(|c| c.hierarchy != 0 && c.controllers.iter().any(|c| c == "cpu"));
        let (path, version, dir) = if let Some(c) = v1 {
            let path = c.pathname.as_str();
            let m: Vec<&Mount> = all
                .iter()
                .filter(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == "cpu"))
                .collect();
            (path, Version::V1, resolve(&m, path).ok_or_else(|| not_mounted("cgroup v1 cpu"))?)
        } else {
            let path = lines
                .iter()
                .find(|c| c.hierarchy == 0 && c.controllers.is_empty())
                .map(|c| c.pathname.as_str())
                .ok_or(Error::NoCpuCgroup { pid, path: cgroup_path.clone() })?;
            let m: Vec<&Mount> = all.iter().filter(|m| m.fstype == "cgroup2").collect();
            (path, Version::V2, resolve(&m, path).ok_or_else(|| not_mounted("cgroup v2"))?)
        };
        if path.trim_matches('/').is_empty() {
            return Err(Error::RootCgroup { pid });
        }
        if version == Version::V2 && !dir.join("cpu.max").is_file() {
            return Err(Error::NoCpuMax { dir });
        }
        Ok(CpuCgroup { dir, version, path: path.to_owned() })
    }

    /// The limit in force now.
    pub fn get(&self) -> Result<CpuLimit> {
        match self.version {
            Version::V2 => {
                let path = self.dir.join("cpu.max");
                let text = read(&path)?;
                let bad = || Error::Parse { path: path.clone(), text: text.clone() };
                let mut it = text.split_whitespace();
                let quota = it.next().ok_or_else(bad)?;
                let period_us: u64 = it.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
                if quota == "max" {
                    return Ok(CpuLimit::Unlimited);
                }
                Ok(CpuLimit::Quota { quota_us: quota.parse().map_err(|_| bad())?, period_us })
            }
            Version::V1 => {
                let quota = self.v1_value("cpu.cfs_quota_us")?;
                let period_us = u64::try_from(self.v1_value("cpu.cfs_period_us")?).unwrap_or(0);
                match u64::try_from(quota) {
                    Ok(quota_us) => Ok(CpuLimit::Quota { quota_us, period_us }),
                    Err(_) => Ok(CpuLimit::Unlimited),
                }
            }
        }
    }

    fn v1_value(&self, file: &str) -> Result<i64> {
        let path = self.dir.join(file);
        let text = read(&path)?;
        text.trim().parse().map_err(|_| Error::Parse { path, text })
    }

    /// Sets the limit. On v1 the period goes first with the quota lifted
    /// meanwhile, since the kernel checks every write against the parent's
    /// quota scaled to the period in force at that moment.
    pub fn set(&self, limit: CpuLimit) -> Result<()> {
        match (self.version, limit) {
            (Version::V2, CpuLimit::Unlimited) => {
                // Keeps the period; "max" alone only changes the quota.
                write(&self.dir.join("cpu.max"), "max")
            }
            (Version::V2, CpuLimit::Quota { quota_us, period_us }) => {
                write(&self.dir.join("cpu.max"), &format!("{quota_us} {period_us}"))
            }
            (Version::V1, CpuLimit::Unlimited) => write(&self.dir.join("cpu.cfs_quota_us"), "-1"),
            (Version::V1, CpuLimit::Quota { quota_us, period_us }) => {
                let period_now = self.v1_value("cpu.cfs_period_us")?;
                if u64::try_from(period_now).ok() != Some(period_us) {
                    write(&self.dir.join("cpu.cfs_quota_us"), "-1")?;
                    write(&self.dir.join("cpu.cfs_period_us"), &period_us.to_string())?;
                }
                write(&self.dir.join("cpu.cfs_quota_us"), &quota_us.to_string())
            }
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub pid: u32,
    pub cgroup: CpuCgroup,
    pub limit: CpuLimit,
}

/// Where QEMU's cgroup must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Any cgroup of its own (the VM list is the node's own file).
    Node,
    /// Under the cgroup of the pod with this UID (Kubernetes).
    Pod { uid: String },
    /// A Kubernetes VM whose pod is not known (it just left): no write.
    UnknownPod,
}

impl Scope {
    /// A VM's scope: `None` outside Kubernetes, else its pod's UID if known.
    pub fn for_vm(pod_uid: Option<Option<String>>) -> Scope {
        match pod_uid {
            None => Scope::Node,
            Some(None) => Scope::UnknownPod,
            Some(Some(uid)) => Scope::Pod { uid },
        }
    }
}

/// Whether cgroup `path` lies under the cgroup of pod `uid`: a `kubepods`
/// component, then one naming the pod (`pod<uid>` for the cgroupfs driver,
/// `...-pod<uid with _>.slice` for systemd's). Paths with `.` or `..`
/// components (another cgroup namespace's view) are never under a pod.
pub fn in_pod(path: &str, uid: &str) -> bool {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if uid.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return false;
    }
    let Some(kubepods) = parts.iter().position(|p| p.starts_with("kubepods")) else { return false };
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
    parts[kubepods..].iter().any(|p| *p == cgroupfs || (p.starts_with("kubepods") && p.ends_with(&systemd)))
}

/// Checks that every vCPU thread id is a thread of process `pid`. QEMU
/// reports its threads' ids in its own pid namespace (a pod has one): an id
/// is the thread's if `/proc/<pid>/task/<tid>` exists, or if one of
/// `pid`'s threads has it as its innermost id (`NSpid:` in its status).
pub fn check_threads(proc_root: &Path, pid: u32, tids: &[i64]) -> Result<()> {
    if tids.is_empty() {
        return Err(Error::NoVcpuThreads);
    }
    let tasks = proc_root.join(pid.to_string()).join("task");
    let mut inner_ids: Option<Vec<i64>> = None;
    for &tid in tids {
        let path = tasks.join(tid.to_string());
        if tid > 0 && path.is_dir() {
            continue;
        }
        let inner = inner_ids.get_or_insert_with(|| innermost_ids(&tasks));
        if tid <= 0 || !inner.contains(&tid) {
            return Err(Error::ForeignThread { tid, pid, path });
        }
    }
    Ok(())
}

/// The innermost pid-namespace ids of the threads under `tasks`
/// (`/proc/<pid>/task`), from the last field of each one's `NSpid:` line.
fn innermost_ids(tasks: &Path) -> Vec<i64> {
    let Ok(entries) = std::fs::read_dir(tasks) else { return Vec::new() };
    entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("status")).ok())
        .filter_map(|status| {
            let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            line.split_whitespace().last()?.parse().ok()
        })
        .collect()
}

/// Caps the VM's QEMU process at `milli_cpu`, after the checks in the
/// module's documentation: its pid from the socket's peer credentials, its
/// vCPU threads that process's, its cgroup within `scope`.
pub async fn apply(hv: &dyn VcpuThreads, proc_root: &Path, scope: &Scope, milli_cpu: u64) -> Result<Applied> {
    let pid = hv.qemu_pid().ok_or(Error::NoPeerPid)?;
    let threads = hv.vcpu_threads().await.map_err(Error::Qmp)?;
    let tids: Vec<i64> = threads.iter().map(|t| t.thread_id).collect();
    check_threads(proc_root, pid, &tids)?;
    let cgroup = CpuCgroup::of_pid(proc_root, pid)?;
    match scope {
        Scope::Node => {}
        Scope::UnknownPod => return Err(Error::NoPod),
        Scope::Pod { uid } => {
            if !in_pod(&cgroup.path, uid) {
                return Err(Error::OutsidePod { pid, cgroup: cgroup.path, pod_uid: uid.clone() });
            }
        }
    }
    let limit = limit_for(milli_cpu, DEFAULT_PERIOD_US);
    cgroup.set(limit)?;
    Ok(Applied { pid, cgroup, limit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn limits_for_sizes() {
        let p = DEFAULT_PERIOD_US;
        let cases = [
            (750, CpuLimit::Quota { quota_us: 75_000, period_us: p }),
            (1_250, CpuLimit::Quota { quota_us: 125_000, period_us: p }),
            (2_000, CpuLimit::Unlimited),
            (1_000, CpuLimit::Unlimited),
            (0, CpuLimit::Unlimited),
            (5, CpuLimit::Quota { quota_us: MIN_QUOTA_US, period_us: p }),
        ];
        for (milli, want) in cases {
            assert_eq!(limit_for(milli, p), want, "{milli} milli");
        }
        assert_eq!(limit_for(500, 50_000), CpuLimit::Quota { quota_us: 25_000, period_us: 50_000 });
    }

    /// A fake host: `<root>/proc/{self/mountinfo, <pid>/cgroup, <tid>/status}`
    /// and cgroup trees under `<root>/sys/fs/cgroup`.
    struct Host {
        dir: tempfile::TempDir,
    }

    impl Host {
        fn new(mountinfo: &str) -> Host {
            let dir = tempfile::tempdir().unwrap();
            let h = Host { dir };
            let mi = mountinfo.replace("ROOT", h.root().to_str().unwrap());
            h.put("proc/self/mountinfo", &mi);
            h
        }
        fn root(&self) -> &Path {
            self.dir.path()
        }
        fn proc(&self) -> PathBuf {
            self.root().join("proc")
        }
        fn put(&self, rel: &str, text: &str) {
            let p = self.root().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        fn text(&self, rel: &str) -> String {
            fs::read_to_string(self.root().join(rel)).unwrap()
        }
    }

    /// Like this machine: v1 controllers, cgroup2 at unified/ without cpu.
    const HYBRID: &str = "\
30 25 0:26 / ROOT/sys/fs/cgroup rw shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / ROOT/sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
35 30 0:31 / ROOT/sys/fs/cgroup/cpu rw shared:14 - cgroup cgroup rw,cpu
36 30 0:32 / ROOT/sys/fs/cgroup/memory rw shared:15 - cgroup cgroup rw,memory
";
    /// A pure v2 host.
    const UNIFIED: &str = "30 25 0:26 / ROOT/sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn v1_quota_is_written_and_read_back() {
        let h = Host::new(HYBRID);
        h.put("proc/4242/status", &status_of(4200));
        h.put("proc/4200/cgroup", "4:memory:/vms/a\n1:cpu:/vms/a\n0::/\n");
        h.put("sys/fs/cgroup/cpu/vms/a/cpu.cfs_quota_us", "-1\n");
        h.put("sys/fs/cgroup/cpu/vms/a/cpu.cfs_period_us", "100000\n");
        assert_eq!(process_of_thread(&h.proc(), 4242).unwrap(), 4200);
        let cg = CpuCgroup::of_pid(&h.proc(), 4200).unwrap();
        assert_eq!(cg.version, Version::V1);
        assert_eq!(cg.dir, h.root().join("sys/fs/cgroup/cpu/vms/a"));
        assert_eq!(cg.get().unwrap(), CpuLimit::Unlimited);
        cg.set(limit_for(750, DEFAULT_PERIOD_US)).unwrap();
        assert_eq!(h.text("sys/fs/cgroup/cpu/vms/a/cpu.cfs_quota_us"), "75000");
        assert_eq!(cg.get().unwrap(), CpuLimit::Quota { quota_us: 75_000, period_us: 100_000 });
        // Another period: quota lifted, period, then quota.
        cg.set(CpuLimit::Quota { quota_us: 25_000, period_us: 50_000 }).unwrap();
        assert_eq!(h.text("sys/fs/cgroup/cpu/vms/a/cpu.cfs_period_us"), "50000");
        assert_eq!(cg.get().unwrap(), CpuLimit::Quota { quota_us: 25_000, period_us: 50_000 });
        cg.set(CpuLimit::Unlimited).unwrap();
        assert_eq!(h.text("sys/fs/cgroup/cpu/vms/a/cpu.cfs_quota_us"), "-1");
    }

    #[test]
    fn v1_with_cpuacct_and_a_namespaced_mount_root() {
        // cpu,cpuacct co-mounted; the agent's mount shows only /kubepods.
        let h = Host::new("40 30 0:40 /kubepods ROOT/cg\\040cpu rw - cgroup cgroup rw,cpu,cpuacct\n");
        h.put("proc/7/cgroup", "3:cpu,cpuacct:/kubepods/pod1/qemu\n0::/\n");
        h.put("cg cpu/pod1/qemu/cpu.cfs_quota_us", "-1");
        h.put("cg cpu/pod1/qemu/cpu.cfs_period_us", "100000");
        let cg = CpuCgroup::of_pid(&h.proc(), 7).unwrap();
        assert_eq!(cg.dir, h.root().join("cg cpu/pod1/qemu"));
    }

    #[test]
    fn v2_cpu_max_is_written_and_read_back() {
        let h = Host::new(UNIFIED);
        h.put("proc/9/cgroup", "0::/machine/vm-a\n");
        h.put("sys/fs/cgroup/machine/vm-a/cpu.max", "max 100000\n");
        let cg = CpuCgroup::of_pid(&h.proc(), 9).unwrap();
        assert_eq!(cg.version, Version::V2);
        assert_eq!(cg.get().unwrap(), CpuLimit::Unlimited);
        cg.set(limit_for(1_250, DEFAULT_PERIOD_US)).unwrap();
        assert_eq!(h.text("sys/fs/cgroup/machine/vm-a/cpu.max"), "125000 100000");
        assert_eq!(cg.get().unwrap(), CpuLimit::Quota { quota_us: 125_000, period_us: 100_000 });
        cg.set(CpuLimit::Unlimited).unwrap();
        assert_eq!(h.text("sys/fs/cgroup/machine/vm-a/cpu.max"), "max");
    }

    #[test]
    fn errors_say_what_to_fix() {
        let h = Host::new(UNIFIED);
        // Root cgroup.
        h.put("proc/1/cgroup", "0::/\n");
        assert!(matches!(CpuCgroup::of_pid(&h.proc(), 1), Err(Error::RootCgroup { pid: 1 })));
        // v2 without the cpu controller enabled.
        h.put("proc/2/cgroup", "0::/a\n");
        fs::create_dir_all(h.root().join("sys/fs/cgroup/a")).unwrap();
        let e = CpuCgroup::of_pid(&h.proc(), 2).unwrap_err().to_string();
        assert!(e.contains("subtree_control"), "{e}");
        // A v1 cpu hierarchy that is not mounted here.
        h.put("proc/3/cgroup", "1:cpu:/a\n0::/a\n");
        let e = CpuCgroup::of_pid(&h.proc(), 3).unwrap_err().to_string();
        assert!(e.contains("cgroup v1 cpu") && e.contains("mountinfo"), "{e}");
        // No such process.
        assert!(matches!(CpuCgroup::of_pid(&h.proc(), 99), Err(Error::Read { .. })));
        h.put("proc/5/status", "Name:\tx\n");
        assert!(matches!(process_of_thread(&h.proc(), 5), Err(Error::NoTgid { .. })));
        // Garbage in a limit file.
        h.put("proc/4/cgroup", "0::/b\n");
        h.put("sys/fs/cgroup/b/cpu.max", "lots\n");
        let cg = CpuCgroup::of_pid(&h.proc(), 4).unwrap();
        assert!(matches!(cg.get(), Err(Error::Parse { .. })));
    }

    /// A real `/proc/<tid>/status` (this build machine's), of a thread of
    /// process `tgid`.
    fn status_of(tgid: u32) -> String {
        format!("Tgid:\t{tgid}\n{}", include_str!("../testdata/status_without_tgid"))
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape(r"/plain\0"), r"/plain\0");
    }

    /// QEMU as the checks see it: the socket's peer pid and the thread
    /// ids it reports.
    struct Qemu {
        pid: Option<u32>,
        tids: Vec<i64>,
    }

    #[async_trait::async_trait]
    impl VcpuThreads for Qemu {
        async fn vcpu_threads(&self) -> crate::qmp::Result<Vec<crate::qmp::types::VcpuThread>> {
            Ok(self
                .tids
                .iter()
                .enumerate()
                .map(|(i, t)| crate::qmp::types::VcpuThread {
                    cpu_index: u32::try_from(i).unwrap(),
                    thread_id: *t,
                    qom_path: format!("/machine/test/cpu{i}"),
                    props: Default::default(),
                })
                .collect())
        }

        fn qemu_pid(&self) -> Option<u32> {
            self.pid
        }
    }

    const POD: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    /// A fake host with QEMU (pid 777, threads 778 and 779) in a v1 cpu
    /// cgroup `cgroup`, and a bystander (pid 900, thread 901) elsewhere.
    fn host_with_qemu_in(cgroup: &str) -> Host {
        let h = Host::new(HYBRID);
        for t in [777, 778, 779] {
            h.put(&format!("proc/777/task/{t}/stat"), "");
        }
        h.put("proc/900/task/901/stat", "");
        h.put("proc/777/cgroup", &format!("1:cpu:{cgroup}\n"));
        h.put("proc/900/cgroup", "1:cpu:/system.slice/sshd.service\n");
        h.put(&format!("sys/fs/cgroup/cpu{cgroup}/cpu.cfs_quota_us"), "-1");
        h.put(&format!("sys/fs/cgroup/cpu{cgroup}/cpu.cfs_period_us"), "100000");
        h
    }

    const IN_POD: &str = "/kubepods/burstable/pod7c9e6679-7425-40de-944b-e07fc1f90ae7/0123abcd";

    #[tokio::test]
    async fn apply_checks_qemu_then_writes_the_quota() {
        let h = host_with_qemu_in(IN_POD);
        let qemu = Qemu { pid: Some(777), tids: vec![778, 779] };
        let pod = Scope::Pod { uid: POD.into() };
        let a = apply(&qemu, &h.proc(), &pod, 2_500).await.unwrap();
        assert_eq!((a.pid, a.limit), (777, CpuLimit::Quota { quota_us: 250_000, period_us: 100_000 }));
        assert_eq!(h.text(&format!("sys/fs/cgroup/cpu{IN_POD}/cpu.cfs_quota_us")), "250000");
        assert_eq!(a.cgroup.path, IN_POD);
    }

    /// Before, the pid came from the first thread id QEMU reported: a
    /// monitor that named a bystander's thread had the bystander capped.
    #[tokio::test]
    async fn nothing_is_written_for_a_qemu_that_fails_a_check() {
        let h = host_with_qemu_in(IN_POD);
        let quota = || h.text(&format!("sys/fs/cgroup/cpu{IN_POD}/cpu.cfs_quota_us"));
        let pod = Scope::Pod { uid: POD.into() };
        let other_pod = Scope::Pod { uid: "11111111-2222-3333-4444-555555555555".into() };
        let cases: Vec<(Qemu, &Scope, &str)> = vec![
            (Qemu { pid: None, tids: vec![778] }, &pod, "unix QMP socket"),
            (Qemu { pid: Some(777), tids: vec![901] }, &pod, "thread 901"),
            (Qemu { pid: Some(777), tids: vec![778, 901] }, &pod, "not a thread of"),
            (Qemu { pid: Some(777), tids: vec![-1] }, &pod, "thread -1"),
            (Qemu { pid: Some(777), tids: vec![] }, &pod, "no vCPU thread ids"),
            (Qemu { pid: Some(900), tids: vec![901] }, &pod, "not under the cgroup of pod"),
            (Qemu { pid: Some(777), tids: vec![778] }, &other_pod, "not under the cgroup of pod 1111"),
            (Qemu { pid: Some(777), tids: vec![778] }, &Scope::UnknownPod, "pod is unknown"),
        ];
        for (qemu, scope, want) in cases {
            let e = apply(&qemu, &h.proc(), scope, 750).await.unwrap_err().to_string();
            assert!(e.contains(want), "{e} should say {want}");
            assert_eq!(quota(), "-1", "written despite: {e}");
        }
        // Outside Kubernetes any cgroup of its own will do, once the pid checks pass.
        let qemu = Qemu { pid: Some(900), tids: vec![901] };
        h.put("sys/fs/cgroup/cpu/system.slice/sshd.service/cpu.cfs_quota_us", "-1");
        h.put("sys/fs/cgroup/cpu/system.slice/sshd.service/cpu.cfs_period_us", "100000");
        assert!(apply(&qemu, &h.proc(), &Scope::Node, 750).await.is_ok());
    }

    /// QEMU in a pod reports thread ids of the pod's pid namespace; they
    /// are its threads when its tasks' `NSpid:` lines end in them.
    #[tokio::test]
    async fn thread_ids_from_qemus_own_pid_namespace_are_recognised() {
        let h = host_with_qemu_in(IN_POD);
        h.put("proc/777/task/778/status", "Name:\tqemu\nNSpid:\t778\t12\n");
        h.put("proc/777/task/779/status", "Name:\tqemu\nNSpid:\t779\t13\n");
        assert!(check_threads(&h.proc(), 777, &[12, 13]).is_ok());
        assert!(check_threads(&h.proc(), 777, &[778, 13]).is_ok());
        let e = check_threads(&h.proc(), 777, &[12, 14]).unwrap_err();
        assert!(matches!(e, Error::ForeignThread { tid: 14, pid: 777, .. }), "{e}");
        let pod = Scope::Pod { uid: POD.into() };
        let a = apply(&Qemu { pid: Some(777), tids: vec![12, 13] }, &h.proc(), &pod, 1_500).await.unwrap();
        assert_eq!(a.pid, 777);
    }

    #[test]
    fn pod_cgroups_under_both_drivers() {
        let systemd = "/kubepods.slice/kubepods-burstable.slice/\
                       kubepods-burstable-pod7c9e6679_7425_40de_944b_e07fc1f90ae7.slice/cri-containerd-ab.scope";
        let cases = [
            (IN_POD, true),
            ("/kubepods/pod7c9e6679-7425-40de-944b-e07fc1f90ae7/c1", true),
            (systemd, true),
            ("/kubepods.slice/kubepods-pod7c9e6679_7425_40de_944b_e07fc1f90ae7.slice/x.scope", true),
            ("/kubepods/burstable/pod11111111-2222-3333-4444-555555555555/c1", false),
            ("/system.slice/pod7c9e6679-7425-40de-944b-e07fc1f90ae7", false),
            ("/kubepods/burstable/pod7c9e6679-7425-40de-944b-e07fc1f90ae7x/c1", false),
            ("/../kubepods/burstable/pod7c9e6679-7425-40de-944b-e07fc1f90ae7/c1", false),
            ("/", false),
        ];
        for (path, want) in cases {
            assert_eq!(in_pod(path, POD), want, "{path}");
        }
        assert!(!in_pod(IN_POD, ""), "no uid, no pod");
    }
}
