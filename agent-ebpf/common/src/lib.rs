//! What the eBPF programs and user space share: the record the programs put in
//! the ring buffer, the per-kind state they keep in a map, and the names of
//! the maps, globals and programs. The host agent's run-queue programs have
//! their own module, [`sched`].
//!
//! Every type here is `#[repr(C)]` and free of padding (checked at compile
//! time below), so the bytes the kernel writes are the bytes user space reads.
//!
//! Counters in [`Record`] and [`KindState`] are cumulative since the programs
//! were loaded: user space takes differences. That way a record lost, read
//! twice or overtaken by a later one never makes a count wrong, only late.

// The eBPF programs build this crate without the `user` feature, where there
// is no std; user space gets std and the loaders' shared checks.
#![cfg_attr(not(feature = "user"), no_std)]

#[cfg(feature = "user")]
pub mod object;
#[cfg(feature = "user")]
pub mod preflight;
pub mod sched;

/// Which tracepoint family a record or state entry belongs to.
///
/// Stored as `u32` in [`Record::kind`] and used as the index into
/// [`STATE_MAP`].
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `vmscan/mm_vmscan_direct_reclaim_begin` / `_end`: a task reclaiming
    /// memory itself because the whole system ran short.
    DirectReclaim = 0,
    /// `vmscan/mm_vmscan_memcg_reclaim_begin` / `_end`: a task reclaiming
    /// because its cgroup reached its limit.
    MemcgReclaim = 1,
    /// `vmscan/mm_vmscan_kswapd_wake`: the background reclaimer woke up.
    KswapdWake = 2,
    /// `oom/mark_victim`: the OOM killer chose a victim. Never aggregated.
    OomVictim = 3,
}

/// Number of [`Kind`]s; the size of [`STATE_MAP`].
pub const KIND_COUNT: u32 = 4;

impl Kind {
    pub const ALL: [Kind; KIND_COUNT as usize] =
        [Kind::DirectReclaim, Kind::MemcgReclaim, Kind::KswapdWake, Kind::OomVictim];

    pub const fn from_u32(v: u32) -> Option<Kind> {
        match v {
            0 => Some(Kind::DirectReclaim),
            1 => Some(Kind::MemcgReclaim),
            2 => Some(Kind::KswapdWake),
            3 => Some(Kind::OomVictim),
            _ => None,
        }
    }

    /// Whether the programs fold this kind's events into windows.
    pub const fn is_aggregated(self) -> bool {
        !matches!(self, Kind::OomVictim)
    }
}

/// One ring buffer entry.
///
/// Reclaim and kswapd records are emitted at most once per window per kind,
/// except that the first event after a quiet window leaves at once. OOM
/// victim records are emitted once per victim.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the record was emitted,
    /// which is also the time of the tracepoint hit that emitted it.
    pub ts_ns: u64,
    /// Tracepoint hits of this kind since load: reclaim begins, kswapd
    /// wakes, OOM victims.
    pub count: u64,
    /// Total time tasks spent between a reclaim's begin and end since load,
    /// for the reclaims that have ended. 0 for kswapd and OOM.
    pub stall_ns: u64,
    /// Pages reclaimed (`nr_reclaimed` of the end events) since load.
    pub reclaimed_pages: u64,
    /// Records of this kind the programs could not put in the ring (full)
    /// since load.
    pub dropped: u64,
    /// A [`Kind`] as `u32`.
    pub kind: u32,
    /// OOM victim: the victim's pid (thread-group id). Otherwise the
    /// thread-group id of the task whose tracepoint hit emitted the record.
    pub pid: u32,
}

/// Per-kind state of the programs, one entry per [`Kind`] in [`STATE_MAP`].
/// User space reads it to collect what the last window left behind.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KindState {
    /// Same meaning as [`Record::count`].
    pub count: u64,
    /// Same meaning as [`Record::stall_ns`].
    pub stall_ns: u64,
    /// Same meaning as [`Record::reclaimed_pages`].
    pub reclaimed_pages: u64,
    /// Same meaning as [`Record::dropped`].
    pub dropped: u64,
    /// `bpf_ktime_get_ns()` of the latest tracepoint hit of this kind.
    pub last_event_ns: u64,
    /// `bpf_ktime_get_ns()` of the latest record emitted (0: none yet).
    pub last_emit_ns: u64,
}

/// The ring buffer map (`BPF_MAP_TYPE_RINGBUF`) of [`Record`]s.
pub const RING_MAP: &str = "RECORDS";
/// Ring size in bytes (a power of two, a multiple of the page size).
pub const RING_BYTES: u32 = 64 * 1024;
/// The array map of [`KindState`], indexed by [`Kind`].
pub const STATE_MAP: &str = "STATE";
/// The hash map of reclaim start times per (kind, thread).
pub const START_MAP: &str = "RECLAIM_START";
/// Entries in [`START_MAP`]: threads that can be inside reclaim at once.
pub const START_MAP_ENTRIES: u32 = 16 * 1024;
/// Read-only global (`u64`, ns): the aggregation window. User space sets it
/// at load time; the value compiled in is [`DEFAULT_WINDOW_NS`].
pub const WINDOW_GLOBAL: &str = "WINDOW_NS";
/// 10 ms: short enough that the agent sees a sustained stall's size quickly,
/// long enough that thousands of reclaims a second cost a hundred records.
pub const DEFAULT_WINDOW_NS: u64 = 10_000_000;

/// Key of [`START_MAP`]: the kind in the high half, the thread id in the low
/// half (a thread is in at most one reclaim of each kind at a time).
pub const fn start_key(kind: Kind, tid: u32) -> u64 {
    ((kind as u64) << 32) | tid as u64
}

/// Whether an aggregated kind may emit a record at `now_ns`, given the time
/// of its last record (`0`: none yet) and the window. The first hit after a
/// quiet window emits at once; hits inside a window wait for the next one.
pub const fn window_elapsed(now_ns: u64, last_emit_ns: u64, window_ns: u64) -> bool {
    last_emit_ns == 0 || now_ns.saturating_sub(last_emit_ns) >= window_ns
}

/// Each program: its name in the object, and the tracepoint it attaches to.
pub const PROGRAMS: [Program; 6] = [
    Program {
        name: "direct_reclaim_begin",
        category: "vmscan",
        tracepoint: "mm_vmscan_direct_reclaim_begin",
    },
    Program { name: "direct_reclaim_end", category: "vmscan", tracepoint: "mm_vmscan_direct_reclaim_end" },
    Program { name: "memcg_reclaim_begin", category: "vmscan", tracepoint: "mm_vmscan_memcg_reclaim_begin" },
    Program { name: "memcg_reclaim_end", category: "vmscan", tracepoint: "mm_vmscan_memcg_reclaim_end" },
    Program { name: "kswapd_wake", category: "vmscan", tracepoint: "mm_vmscan_kswapd_wake" },
    Program { name: "oom_mark_victim", category: "oom", tracepoint: "mark_victim" },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    pub name: &'static str,
    pub category: &'static str,
    pub tracepoint: &'static str,
}

/// Byte offsets of the tracepoint fields the programs read, after the 8-byte
/// common header (see `/sys/kernel/tracing/events/<category>/<name>/format`;
/// stable from 5.x to 6.18).
pub mod offsets {
    /// `mm_vmscan_{direct,memcg}_reclaim_end`: `unsigned long nr_reclaimed`.
    pub const RECLAIM_END_NR_RECLAIMED: usize = 8;
    /// `oom/mark_victim`: `int pid`.
    pub const MARK_VICTIM_PID: usize = 8;
}

// Padding-free: the size is the sum of the fields.
const _: () = assert!(core::mem::size_of::<Record>() == 5 * 8 + 2 * 4);
const _: () = assert!(core::mem::align_of::<Record>() == 8);
const _: () = assert!(core::mem::size_of::<KindState>() == 6 * 8);

// SAFETY: both are `#[repr(C)]`, contain only integers, have no padding (see
// the assertions above), and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Record {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for KindState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_u32() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_u32(k as u32), Some(k));
        }
        assert_eq!(Kind::from_u32(KIND_COUNT), None);
    }

    #[test]
    fn windows_open_at_once_after_quiet_and_then_once_per_window() {
        let w = DEFAULT_WINDOW_NS;
        let cases = [
            // (now, last emit, emit?)
            (5, 0, true),                      // never emitted: at once
            (1_000 * w, 999 * w, true),        // exactly one window later
            (1_000 * w, 1_000 * w - 1, false), // inside the window
            (1_000 * w, 1_000 * w + 5, false), // clock read on another CPU a bit later
            (1_000 * w, 3, true),              // long quiet period
        ];
        for (now, last, want) in cases {
            assert_eq!(window_elapsed(now, last, w), want, "now {now} last {last}");
        }
    }

    #[test]
    fn start_keys_differ_by_kind() {
        assert_ne!(start_key(Kind::DirectReclaim, 7), start_key(Kind::MemcgReclaim, 7));
        assert_eq!(start_key(Kind::MemcgReclaim, 7), (1 << 32) | 7);
    }
}
