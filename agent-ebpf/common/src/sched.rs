//! Run-queue delay of chosen threads (the host agent's vCPU threads): what the
//! `sched_*` programs and the agent share.
//!
//! User space puts one zeroed [`RqStats`] per thread id to watch into
//! [`RQ_STATS_MAP`]; the programs only ever update entries that exist, so a
//! thread nobody asked about costs one failed hash lookup per context switch
//! and nothing else. Each entry holds the thread's enqueue time while it waits
//! to run, and cumulative figures of its waits (sum, count, a log2
//! histogram), which user space differences between two reads. The one figure
//! that cannot be differenced, the longest wait, is kept per epoch (see
//! [`RQ_EPOCH_MAP`]).

/// Buckets of [`RqStats::hist`]: bucket `i` counts waits in `[2^i, 2^(i+1))`
/// ns (bucket 0 also takes 0 and 1 ns); the last bucket takes everything from
/// 2^31 ns (2.1 s) up.
pub const RQ_HIST_BUCKETS: usize = 32;

/// One watched thread. Written by the programs, read by user space.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RqStats {
    /// `bpf_ktime_get_ns()` when the thread last became runnable (woken, or
    /// switched out while still runnable); 0 while it runs or sleeps.
    pub enqueued_ns: u64,
    /// Sum of all waits measured since the entry was created, ns.
    pub delay_sum_ns: u64,
    /// Number of waits measured since the entry was created.
    pub count: u64,
    /// Longest wait of epoch `max_epoch[e & 1]`, for the two latest epochs.
    pub max_ns: [u64; 2],
    /// The epoch each `max_ns` slot belongs to.
    pub max_epoch: [u64; 2],
    /// Waits by log2 of their length in ns (see [`rq_bucket`]), cumulative.
    pub hist: [u64; RQ_HIST_BUCKETS],
}

/// The hash map (`u32` thread id -> [`RqStats`]) of watched threads.
pub const RQ_STATS_MAP: &str = "RQ_STATS";
/// Threads that can be watched at once: vCPUs of every VM on a node.
pub const RQ_STATS_ENTRIES: u32 = 8192;
/// The array map (one `u64`) holding the current epoch. User space bumps it
/// each time it reads; programs keep each entry's longest wait per epoch, in
/// the slot `epoch & 1`, so after a bump the previous epoch's maximum stays
/// put for user space to read while the programs fill the other slot.
pub const RQ_EPOCH_MAP: &str = "RQ_EPOCH";

/// `sched_switch`'s `prev_state` bits that mean the task left the CPU to
/// wait (S, D, T, t, X, Z, P, I on kernels 5.14 to 6.18; see the tracepoint's
/// `print fmt`). A task with none of them set was preempted (the kernel then
/// reports `TASK_REPORT_MAX`, 0x100) or yielded: it stays on the run queue.
pub const TASK_REPORT_WAIT_MASK: u64 = 0xff;

/// Whether the task switched out with `prev_state` is still runnable, so
/// that its wait for the CPU starts now.
pub const fn still_runnable(prev_state: u64) -> bool {
    prev_state & TASK_REPORT_WAIT_MASK == 0
}

/// The histogram bucket of a wait of `ns`: floor(log2(ns)), capped at the last
/// bucket. Written with shifts and compares because BPF has no
/// count-leading-zeros instruction.
pub const fn rq_bucket(ns: u64) -> usize {
    let mut v = ns;
    let mut b = 0usize;
    if v >= 1 << 32 {
        v >>= 32;
        b += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        b += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        b += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        b += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        b += 2;
    }
    if v >= 1 << 1 {
        b += 1;
    }
    if b >= RQ_HIST_BUCKETS {
        RQ_HIST_BUCKETS - 1
    } else {
        b
    }
}

/// The range of waits, in ns, that bucket `b` counts: `[lo, hi)`.
pub const fn rq_bucket_range(b: usize) -> (u64, u64) {
    let lo = if b == 0 { 0 } else { 1u64 << b };
    let hi = if b + 1 >= RQ_HIST_BUCKETS { u64::MAX } else { 1u64 << (b + 1) };
    (lo, hi)
}

/// The programs on raw tracepoints, preferred: the kernel hands over the
/// tracepoint's arguments without building a trace record and without
/// tracefs. They need [`TASK_PID_OFFSET_GLOBAL`] set.
/// Separate from [`crate::PROGRAMS`] (the guest informant's), since only the
/// host agent attaches these.
pub const SCHED_RAW_PROGRAMS: [crate::Program; 3] = [
    crate::Program { name: "rq_wakeup_raw", category: "sched", tracepoint: "sched_wakeup" },
    crate::Program { name: "rq_wakeup_new_raw", category: "sched", tracepoint: "sched_wakeup_new" },
    crate::Program { name: "rq_switch_raw", category: "sched", tracepoint: "sched_switch" },
];

/// The same on classic tracepoints: the fallback where the kernel's BTF
/// gives no `task_struct` layout or the raw `sched_switch` arguments differ
/// (before 5.18).
pub const SCHED_PROGRAMS: [crate::Program; 3] = [
    crate::Program { name: "rq_wakeup", category: "sched", tracepoint: "sched_wakeup" },
    crate::Program { name: "rq_wakeup_new", category: "sched", tracepoint: "sched_wakeup_new" },
    crate::Program { name: "rq_switch", category: "sched", tracepoint: "sched_switch" },
];

/// Read-only global (`u64`): byte offset of `pid` in `struct task_struct`,
/// which user space reads from the kernel's BTF and sets at load time. 0
/// (the compiled-in value) makes the raw programs do nothing.
pub const TASK_PID_OFFSET_GLOBAL: &str = "TASK_PID_OFFSET";

/// Byte offsets of the `sched` tracepoint fields the programs read (see
/// `/sys/kernel/tracing/events/sched/<name>/format`; unchanged from 5.x to
/// 6.18). The programs read them straight from the tracepoint record.
pub mod offsets {
    /// `sched_wakeup`, `sched_wakeup_new`: `pid_t pid`.
    pub const WAKEUP_PID: usize = 24;
    /// `sched_switch`: `pid_t prev_pid`.
    pub const SWITCH_PREV_PID: usize = 24;
    /// `sched_switch`: `long prev_state`.
    pub const SWITCH_PREV_STATE: usize = 32;
    /// `sched_switch`: `pid_t next_pid`.
    pub const SWITCH_NEXT_PID: usize = 56;
}

// Padding-free: the size is the sum of the fields.
const _: () = assert!(core::mem::size_of::<RqStats>() == (3 + 2 + 2 + RQ_HIST_BUCKETS) * 8);
const _: () = assert!(RQ_HIST_BUCKETS.is_power_of_two());

// SAFETY: `#[repr(C)]`, only u64 fields and arrays of u64, no padding (see
// the assertion above), and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for RqStats {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_floor_log2_capped() {
        let cases = [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 1),
            (4, 2),
            (1023, 9),
            (1024, 10),
            (1_000_000, 19),
            ((1 << 31) - 1, 30),
            (1 << 31, 31),
            (1 << 40, 31),
            (u64::MAX, 31),
        ];
        for (ns, want) in cases {
            assert_eq!(rq_bucket(ns), want, "{ns} ns");
        }
        for ns in [0u64, 1, 5, 999, 123_456, 9_999_999] {
            let (lo, hi) = rq_bucket_range(rq_bucket(ns));
            assert!(lo <= ns && ns < hi, "{ns} in [{lo}, {hi})");
        }
    }

    #[test]
    fn runnable_when_no_wait_bit_is_set() {
        // R (yield), R+ (preempted: TASK_REPORT_MAX), S, D, I.
        let cases = [(0, true), (0x100, true), (0x1, false), (0x2, false), (0x80, false)];
        for (state, want) in cases {
            assert_eq!(still_runnable(state), want, "{state:#x}");
        }
    }
}
