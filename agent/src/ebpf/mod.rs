//! Host-side eBPF: run-queue delay of each VM's vCPU threads, the time a
//! runnable vCPU waits for a host CPU. That is the node's CPU contention as
//! the VMs feel it, and what the allocator needs to see over-commit.
//!
//! The programs (`agent-ebpf/programs/src/sched.rs`, on `sched_wakeup`,
//! `sched_wakeup_new` and `sched_switch`) fold every wait into a per-thread
//! entry in the kernel, for the thread ids we put in their map only; no event
//! crosses into user space. [`RunQueue`] sets the watched threads per VM and
//! reads the figures of the last interval (see [`delay`]).
//!
//! [`RunQueue::new`] does everything that can fail and says what is missing
//! (object, privileges, tracefs, a kernel that loads the programs); the agent
//! then runs without contention figures.

pub mod btf;
pub mod delay;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError};
use aya::programs::{RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use vmscale_ebpf_common::object;
use vmscale_ebpf_common::preflight::{self, PreflightError};
use vmscale_ebpf_common::sched::{
    RqStats, RQ_EPOCH_MAP, RQ_STATS_MAP, SCHED_PROGRAMS, SCHED_RAW_PROGRAMS, TASK_PID_OFFSET_GLOBAL,
};
use vmscale_ebpf_common::Program;

pub use delay::{RunQueueDelay, StatsMap, Tracker};

/// Where to find things. Paths are parameters so tests can point the checks
/// at fake trees; aya itself always uses the real tracefs mount points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunQueueConfig {
    /// The object file; `None` looks in the default places ([`candidates`]).
    pub object: Option<PathBuf>,
    /// Mount tracefs at `<sys>/kernel/tracing` if it is not mounted.
    pub mount_tracefs: bool,
    /// procfs mount point (capabilities from `self/status`). Default `/proc`.
    pub proc_root: PathBuf,
    /// sysfs mount point (`kernel/btf/vmlinux`, `kernel/tracing`). Default `/sys`.
    pub sys_root: PathBuf,
    /// Which kind of tracepoint to attach to. Default [`Attach::Auto`].
    pub attach: Attach,
}

/// Raw tracepoints need no tracefs and no trace record (see [`btf`]);
/// classic ones work without the kernel's BTF and before Linux 5.18. Both
/// cost about the same per context switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attach {
    /// Raw where the kernel allows, else classic.
    #[default]
    Auto,
    Raw,
    Tracepoint,
}

impl Default for RunQueueConfig {
    fn default() -> Self {
        RunQueueConfig {
            object: None,
            mount_tracefs: true,
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            attach: Attach::Auto,
        }
    }
}

/// Why run-queue delay can't be measured here. Each message names what is
/// missing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    ObjectMissing(#[from] object::ObjectMissing),
    /// Capabilities, tracefs: what both loaders check before loading.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("reading {path}", path = .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object {}{}", .path.display(), if *.btf { "" } else { " (the kernel has no BTF: /sys/kernel/btf/vmlinux is missing)" })]
    Load {
        path: PathBuf,
        btf: bool,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no {what} {name}; rebuild it with `cargo xtask build-ebpf`")]
    NotInObject { what: &'static str, name: &'static str },
    #[error("loading or attaching program {program} to tracepoint {tracepoint}")]
    Attach {
        program: &'static str,
        tracepoint: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("reading the kernel's BTF at {}", .path.display())]
    Btf {
        path: PathBuf,
        #[source]
        source: btf::BtfError,
    },
    #[error("{op} in eBPF map {map}")]
    Map {
        op: String,
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The object's file name, as `cargo xtask build-ebpf` writes it.
pub const OBJECT_FILE: &str = object::FILE_NAME;

/// The object to load: `explicit` if given (it must exist), else the first
/// of [`object::candidates`] that exists, as the informant does.
pub fn find_object(explicit: Option<&Path>) -> Result<PathBuf> {
    Ok(object::find(explicit)?)
}

/// Loads program `p` and attaches it as `kind`.
fn attach(ebpf: &mut Ebpf, p: Program, kind: Attach) -> Result<()> {
    let err = |source| Error::Attach {
        program: p.name,
        tracepoint: format!(
            "{}/{}{}",
            p.category,
            p.tracepoint,
            if kind == Attach::Raw { " (raw)" } else { "" }
        ),
        source: Box::new(source),
    };
    let prog = ebpf.program_mut(p.name).ok_or(Error::NotInObject { what: "program", name: p.name })?;
    if kind == Attach::Raw {
        let prog: &mut RawTracePoint = prog.try_into().map_err(err)?;
        prog.load().map_err(err)?;
        prog.attach(p.tracepoint).map_err(err)?;
    } else {
        let prog: &mut TracePoint = prog.try_into().map_err(err)?;
        prog.load().map_err(err)?;
        prog.attach(p.category, p.tracepoint).map_err(err)?;
    }
    Ok(())
}

/// The kernel maps behind [`StatsMap`].
pub struct KernelMaps {
    stats: HashMap<MapData, u32, RqStats>,
    epoch: Array<MapData, u64>,
}

impl std::fmt::Debug for KernelMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelMaps").finish_non_exhaustive()
    }
}

fn map_err(op: String, map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { op, map, source: Box::new(source) }
}

impl StatsMap for KernelMaps {
    fn watch(&mut self, tid: u32) -> Result<()> {
        self.stats
            .insert(tid, RqStats::default(), 0)
            .map_err(map_err(format!("adding thread {tid} (map full?)"), RQ_STATS_MAP))
    }

    fn unwatch(&mut self, tid: u32) -> Result<()> {
        match self.stats.remove(&tid) {
            Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
            Err(e) => Err(map_err(format!("removing thread {tid}"), RQ_STATS_MAP)(e)),
        }
    }

    fn get(&self, tid: u32) -> Result<Option<RqStats>> {
        match self.stats.get(&tid, 0) {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(None),
            Err(e) => Err(map_err(format!("reading thread {tid}"), RQ_STATS_MAP)(e)),
        }
    }

    fn set_epoch(&mut self, epoch: u64) -> Result<()> {
        self.epoch.set(0, epoch, 0).map_err(map_err("setting the epoch".into(), RQ_EPOCH_MAP))
    }
}

/// The loaded and attached programs and the watched threads. Dropping it
/// detaches the programs.
pub struct RunQueue {
    /// Owns the programs and their links.
    _ebpf: Ebpf,
    tracker: Tracker<KernelMaps>,
    object: PathBuf,
    attached: Attach,
}

impl std::fmt::Debug for RunQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunQueue")
            .field("object", &self.object)
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl RunQueue {
    /// Finds and loads the object, attaches the `sched` programs: on raw
    /// tracepoints where the kernel allows ([`Attach::Auto`]: its BTF gives
    /// the `task_struct` layout and the raw attach works), else on classic
    /// ones. The error of the last kind tried is returned.
    pub fn new(config: &RunQueueConfig) -> Result<Self> {
        let object = find_object(config.object.as_deref())?;
        preflight::check_capabilities(&config.proc_root)?;
        let btf = preflight::has_btf(&config.sys_root);
        if config.attach != Attach::Tracepoint {
            let raw = Self::layout(&config.sys_root)
                .and_then(|l| Self::load(&object, btf, Some(l.task_pid_offset)));
            match raw {
                Ok(rq) => return Ok(rq),
                Err(e) if config.attach == Attach::Raw => return Err(e),
                Err(e) => tracing::debug!("raw tracepoints unusable, using classic ones: {e}"),
            }
        }
        preflight::ensure_tracefs(&config.sys_root, config.mount_tracefs)?;
        Self::load(&object, btf, None)
    }

    fn layout(sys_root: &Path) -> Result<btf::KernelLayout> {
        let path = sys_root.join("kernel/btf/vmlinux");
        let bytes = std::fs::read(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
        btf::kernel_layout(&bytes).map_err(|source| Error::Btf { path, source })
    }

    /// Loads the object and attaches the raw programs (with the pid offset)
    /// or the classic ones.
    fn load(object: &Path, btf: bool, task_pid_offset: Option<u32>) -> Result<Self> {
        let offset = u64::from(task_pid_offset.unwrap_or(0));
        // The object also holds the informant's programs: loading it creates
        // their maps too (a 64 KiB ring among them), but only ours are loaded
        // into the kernel and attached.
        let mut ebpf = EbpfLoader::new()
            .override_global(TASK_PID_OFFSET_GLOBAL, &offset, true)
            .load_file(object)
            .map_err(|source| Error::Load { path: object.to_path_buf(), btf, source: Box::new(source) })?;
        let attached = if task_pid_offset.is_some() { Attach::Raw } else { Attach::Tracepoint };
        let programs = if attached == Attach::Raw { SCHED_RAW_PROGRAMS } else { SCHED_PROGRAMS };
        for p in programs {
            attach(&mut ebpf, p, attached)?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(Error::NotInObject { what: "map", name })
        };
        let stats = HashMap::try_from(take(&mut ebpf, RQ_STATS_MAP)?)
            .map_err(map_err("opening".into(), RQ_STATS_MAP))?;
        let epoch = Array::try_from(take(&mut ebpf, RQ_EPOCH_MAP)?)
            .map_err(map_err("opening".into(), RQ_EPOCH_MAP))?;
        Ok(RunQueue {
            _ebpf: ebpf,
            tracker: Tracker::new(KernelMaps { stats, epoch }),
            object: object.to_path_buf(),
            attached,
        })
    }

    /// Each attached program's name, total run time and run count, as the
    /// kernel counts them while BPF statistics are on
    /// (`sysctl kernel.bpf_stats_enabled=1`, or [`aya::sys::enable_stats`]);
    /// zero while they are off. For benchmarks: the counting itself costs.
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        let names: &[Program] =
            if self.attached == Attach::Raw { &SCHED_RAW_PROGRAMS } else { &SCHED_PROGRAMS };
        names
            .iter()
            .filter_map(|p| {
                let info = self._ebpf.program(p.name)?.info().ok()?;
                Some((p.name.to_owned(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Which kind of tracepoint the programs are attached to.
    pub fn attached(&self) -> Attach {
        self.attached
    }

    /// The object file that was loaded.
    pub fn object(&self) -> &Path {
        &self.object
    }

    /// The `category/name` of every attached tracepoint.
    pub fn tracepoints() -> impl Iterator<Item = String> {
        SCHED_PROGRAMS.iter().map(|p| format!("{}/{}", p.category, p.tracepoint))
    }

    /// Makes `tids` the watched vCPU threads of `vm`.
    pub fn set_threads(&mut self, vm: &str, tids: &[u32]) -> Result<()> {
        self.tracker.set_threads(vm, tids)
    }

    /// Stops watching the VMs `keep` says no to.
    pub fn retain_vms(&mut self, keep: impl Fn(&str) -> bool) -> Result<()> {
        self.tracker.retain_vms(keep)
    }

    /// Every VM's run-queue delay since the previous read.
    pub fn read(&mut self) -> Result<BTreeMap<String, RunQueueDelay>> {
        self.tracker.read()
    }

    /// The thread ids the kernel map holds right now (not what we think it
    /// holds): for tests that check no other thread got in.
    pub fn kernel_tids(&self) -> Result<Vec<u32>> {
        let mut v = Vec::new();
        for k in self.tracker.map().stats.keys() {
            v.push(k.map_err(map_err("listing threads".into(), RQ_STATS_MAP))?);
        }
        v.sort_unstable();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_object_is_named_with_the_fix() {
        let e = find_object(Some(Path::new("/nonexistent/x.bpf.o"))).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.bpf.o") && e.contains("cargo xtask build-ebpf"), "{e}");
        let e = RunQueue::new(&RunQueueConfig {
            object: Some(PathBuf::from("/nonexistent/x.bpf.o")),
            ..RunQueueConfig::default()
        })
        .unwrap_err();
        assert!(matches!(e, Error::ObjectMissing(_)));
    }

    #[test]
    fn missing_privileges_are_named_before_loading() {
        let dir = tempfile::tempdir().unwrap();
        let object = dir.path().join(OBJECT_FILE);
        std::fs::write(&object, b"not an object").unwrap();
        std::fs::create_dir_all(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("self/status"), "CapEff:\t0000000000000000\n").unwrap();
        let cfg = RunQueueConfig {
            object: Some(object),
            proc_root: dir.path().to_path_buf(),
            ..RunQueueConfig::default()
        };
        let e = RunQueue::new(&cfg).unwrap_err().to_string();
        assert!(e.contains("CAP_BPF"), "{e}");
    }
}
