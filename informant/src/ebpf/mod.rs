//! The eBPF source: reclaim, kswapd and OOM-victim tracepoints (programs in
//! `agent-ebpf/`), read from a ring buffer and turned into [`Event`]s.
//!
//! [`EbpfSource::new`] does everything that can fail: it finds the object,
//! checks the privileges, makes sure tracefs is mounted, loads the programs
//! and attaches them. Its error says which of these is missing, for the
//! handshake and the log; the informant then runs on its other sources.
//! Once spawned, the source only reads.
//!
//! Timestamps: a record's `ts_ns` is the kernel's `bpf_ktime_get_ns()`
//! (CLOCK_MONOTONIC) at the tracepoint hit that emitted it, and becomes the
//! event's `monotonic_ns` unchanged, so `monotonic_ns() - event.monotonic_ns`
//! anywhere on the guest is the latency from the kernel to that point (see
//! [`latency_ns`]). The one exception is the tail of a burst that the
//! programs left in their state map: the source collects it one window after
//! the last record and stamps it with the time it collected it.
//!
//! Where the object comes from: see [`object`].

mod hog;
/// Where the object file is found (shared with the agent's loader).
pub use vmscale_ebpf_common::object;
mod reader;
mod records;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{Array, MapData, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vmscale_ebpf_common::preflight::{self, PreflightError};
use vmscale_ebpf_common::{KindState, DEFAULT_WINDOW_NS, PROGRAMS, RING_MAP, STATE_MAP, WINDOW_GLOBAL};

use crate::event::{Event, SourceKind};
use crate::source::Source;

pub use hog::MemoryHog;
pub use reader::EbpfStats;
pub use records::Tracker;

/// What the eBPF source needs to know. Paths are parameters so tests can
/// point the checks at fake trees; aya itself always uses the real tracefs
/// mount points (`/sys/kernel/tracing`, `/sys/kernel/debug/tracing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfConfig {
    /// The object file; `None` looks in the default places (see
    /// [`object::candidates`]).
    pub object: Option<PathBuf>,
    /// Aggregation window of the programs: reclaim and kswapd events of one
    /// kind reach user space at most once per window, the first of a quiet
    /// spell at once. Default 10 ms.
    pub window: Duration,
    /// Mount tracefs at `/sys/kernel/tracing` if it is not mounted (it
    /// isn't in a bare initramfs; systemd mounts it). Default true.
    pub mount_tracefs: bool,
    /// procfs mount point (capabilities from `self/status`). Default `/proc`.
    pub proc_root: PathBuf,
    /// sysfs mount point (`kernel/btf/vmlinux`, `kernel/tracing`). Default `/sys`.
    pub sys_root: PathBuf,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        EbpfConfig {
            object: None,
            window: Duration::from_nanos(DEFAULT_WINDOW_NS),
            mount_tracefs: true,
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
        }
    }
}

/// Why the eBPF source can't run here. Each message names what is missing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    ObjectMissing(#[from] object::ObjectMissing),
    /// Capabilities, tracefs: what both loaders check before loading.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
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
    #[error("opening map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("waiting for the ring buffer")]
    Poll(#[source] std::io::Error),
    #[error("registering the ring buffer with the tokio reactor (is a runtime running?)")]
    Reactor(#[source] std::io::Error),
    #[error("the aggregation window must be between 1 µs and 10 s, got {0:?}")]
    Window(Duration),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Loaded and attached programs, ready to be spawned as a [`Source`].
pub struct EbpfSource {
    /// Owns the programs and their links: dropping it detaches them.
    ebpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    state: Array<MapData, KindState>,
    object: PathBuf,
    window: Duration,
    stats: Arc<EbpfStats>,
}

impl std::fmt::Debug for EbpfSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfSource").field("object", &self.object).field("window", &self.window).finish()
    }
}

impl EbpfSource {
    /// Finds and loads the object and attaches every program. Must run
    /// inside a tokio runtime (the ring buffer joins its reactor here, so a
    /// failure shows now rather than after spawn).
    pub fn new(config: &EbpfConfig) -> Result<Self> {
        let window_ns = u64::try_from(config.window.as_nanos()).unwrap_or(u64::MAX);
        if !(1_000..=10_000_000_000).contains(&window_ns) {
            return Err(Error::Window(config.window));
        }
        let object = object::find(config.object.as_deref())?;
        preflight::check_capabilities(&config.proc_root)?;
        preflight::ensure_tracefs(&config.sys_root, config.mount_tracefs)?;
        let btf = preflight::has_btf(&config.sys_root);

        let mut ebpf = EbpfLoader::new()
            .override_global(WINDOW_GLOBAL, &window_ns, true)
            .load_file(&object)
            .map_err(|source| Error::Load { path: object.clone(), btf, source: Box::new(source) })?;
        for p in PROGRAMS {
            let attach = |source| Error::Attach {
                program: p.name,
                tracepoint: format!("{}/{}", p.category, p.tracepoint),
                source: Box::new(source),
            };
            let prog: &mut TracePoint = ebpf
                .program_mut(p.name)
                .ok_or(Error::NotInObject { what: "program", name: p.name })?
                .try_into()
                .map_err(attach)?;
            prog.load().map_err(attach)?;
            prog.attach(p.category, p.tracepoint).map_err(attach)?;
        }
        let ring = ebpf.take_map(RING_MAP).ok_or(Error::NotInObject { what: "map", name: RING_MAP })?;
        let ring = RingBuf::try_from(ring)
            .map_err(|source| Error::Map { map: RING_MAP, source: Box::new(source) })?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Reactor(std::io::Error::other("no tokio runtime")));
        }
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same for as long as the RingBuf lives, and the AsyncFd owns the
        // RingBuf (nothing else can close or replace the fd). A runtime
        // exists (checked above), so registration cannot panic.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| Error::Reactor(e.into_parts().1))?;
        let state = ebpf.take_map(STATE_MAP).ok_or(Error::NotInObject { what: "map", name: STATE_MAP })?;
        let state = Array::try_from(state)
            .map_err(|source| Error::Map { map: STATE_MAP, source: Box::new(source) })?;
        Ok(EbpfSource { ebpf, ring, state, object, window: config.window, stats: Arc::default() })
    }

    /// The object file that was loaded.
    pub fn object(&self) -> &Path {
        &self.object
    }

    /// Counters of the running source (records read, events sent, tails
    /// collected, records the kernel dropped, kernel-to-reader latency).
    pub fn stats(&self) -> Arc<EbpfStats> {
        Arc::clone(&self.stats)
    }

    /// The `category/name` of every attached tracepoint.
    pub fn tracepoints() -> impl Iterator<Item = String> {
        PROGRAMS.iter().map(|p| format!("{}/{}", p.category, p.tracepoint))
    }
}

impl Source for EbpfSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Ebpf
    }

    fn spawn(
        self: Box<Self>,
        tx: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let EbpfSource { ebpf, ring, state, window, stats, .. } = *self;
        tokio::spawn(async move {
            let reader = reader::Reader { ring, state, window, stats, tx };
            if let Err(e) = reader.run(cancel).await {
                tracing::error!("eBPF source stopped: {}", vmscale_common::error::Chain(&e));
            }
            // Detaches the programs only now that reading is over.
            drop(ebpf);
        })
    }
}

/// For benchmarks and metrics: how long after the kernel stamped an eBPF
/// event `received_ns` (CLOCK_MONOTONIC, e.g. [`crate::event::monotonic_ns`]
/// on arrival) is. `None` for events of other sources, whose timestamps are
/// taken in user space.
pub fn latency_ns(event: &Event, received_ns: u64) -> Option<u64> {
    (event.source == SourceKind::Ebpf).then(|| received_ns.saturating_sub(event.monotonic_ns))
}
