//! The host agent's programs: run-queue delay of watched threads (the VMs'
//! vCPU threads), from the moment a thread becomes runnable to the moment it
//! is switched in.
//!
//! A thread becomes runnable when it is woken (`sched_wakeup`,
//! `sched_wakeup_new`) or when it is switched out while still runnable
//! (preempted, or its sleep cut short). `sched_switch` fires tens of
//! thousands of times a second on a busy node, so the programs stop after a
//! failed hash lookup for each of the two threads unless a watched thread is
//! involved. Everything is folded into the thread's `RQ_STATS` entry in the
//! kernel; user space reads the map every few seconds.
//!
//! Each program exists twice, sharing the logic: on raw tracepoints
//! (preferred: the kernel passes the arguments without building a trace
//! record and without tracefs; the thread id of `next` and of the wakee is
//! read from `task_struct` at an offset user space takes from the kernel's
//! BTF) and on classic tracepoints (the fallback, which read the ids straight
//! from the trace record). Both cost about the same per context switch here:
//! ~60-80 ns a run for the program when no watched thread is involved,
//! ~100-140 ns when one is (the agent's `examples/rq_overhead.rs`).
//!
//! Why the per-entry fields need no atomics: the scheduler serialises every
//! event of one task under the lock of the run queue it is on (a wakeup holds
//! the target queue's lock, a switch the CPU's own), and a task runs on one
//! CPU at a time, so two programs never update the same entry at once. User
//! space may read an entry midway through an update; it then sees one wait
//! less, never a wrong one.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use vmscale_ebpf_common::sched::{
    offsets, rq_bucket, still_runnable, RqStats, RQ_HIST_BUCKETS, RQ_STATS_ENTRIES,
};

/// Watched threads. Only user space adds and removes entries. Not
/// preallocated: the informant loads this same object in small guests, where
/// 8192 preallocated entries would be a few MiB of locked memory for nothing;
/// entries are only ever created by user space, so no program allocates.
#[map(name = "RQ_STATS")]
static RQ_STATS: HashMap<u32, RqStats> = HashMap::with_max_entries(RQ_STATS_ENTRIES, BPF_F_NO_PREALLOC);

/// Byte offset of `pid` in the kernel's `struct task_struct`, from the
/// kernel's BTF; user space sets it at load time for the raw programs.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u64 = 0;

/// The current epoch of the longest-wait slots (one u64, set by user space).
#[map(name = "RQ_EPOCH")]
static RQ_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

#[tracepoint]
pub fn rq_wakeup(ctx: TracePointContext) -> u32 {
    try_rq_wakeup(&ctx);
    0
}

#[tracepoint]
pub fn rq_wakeup_new(ctx: TracePointContext) -> u32 {
    try_rq_wakeup(&ctx);
    0
}

#[tracepoint]
pub fn rq_switch(ctx: TracePointContext) -> u32 {
    try_rq_switch(&ctx);
    0
}

/// Raw tracepoints: the tracepoint's arguments as they are, no trace record
/// built. `sched_wakeup(struct task_struct *p)`.
#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn rq_wakeup_raw(ctx: RawTracePointContext) -> u32 {
    if let Some(tid) = task_pid(raw_arg(&ctx, 0)) {
        wakeup(tid);
    }
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn rq_wakeup_new_raw(ctx: RawTracePointContext) -> u32 {
    if let Some(tid) = task_pid(raw_arg(&ctx, 0)) {
        wakeup(tid);
    }
    0
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct
/// *next, unsigned int prev_state)` (5.18+). It fires in `__schedule`
/// before the switch, so `prev` is still the current task.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn rq_switch_raw(ctx: RawTracePointContext) -> u32 {
    let prev = bpf_get_current_pid_tgid() as u32;
    if prev != 0 {
        if let Some(e) = Entry::of(prev) {
            // Preempted, or its sleep was cut short (the state the kernel
            // passes is TASK_RUNNING then): still runnable.
            switched_out(&e, raw_arg(&ctx, 0) & 1 != 0 || raw_arg(&ctx, 3) as u32 == 0);
        }
    }
    if let Some(next) = task_pid(raw_arg(&ctx, 2)) {
        if next != 0 {
            if let Some(e) = Entry::of(next) {
                switched_in(&e);
            }
        }
    }
    0
}

/// The raw tracepoint argument `n` as a u64.
fn raw_arg(ctx: &RawTracePointContext, n: usize) -> u64 {
    // SAFETY: a raw tracepoint program's context is an array of u64
    // arguments; the verifier bounds each read and the kernel refuses to
    // attach a program that reads past the tracepoint's argument count (all
    // reads here are within sched_switch's four and sched_wakeup's one).
    unsafe { ctx.as_ptr().cast::<u64>().add(n).read() }
}

/// `task->pid`, read with `bpf_probe_read_kernel` at the offset user space
/// found in the kernel's BTF.
fn task_pid(task: u64) -> Option<u32> {
    // SAFETY: TASK_PID_OFFSET is a plain u64 static; the volatile read keeps
    // the compiler from folding in 0, since user space rewrites the value in
    // the object before loading it.
    let off = unsafe { core::ptr::read_volatile(&TASK_PID_OFFSET) };
    if task == 0 || off == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies 4 bytes from a kernel address
    // and fails cleanly (no fault) if it is not readable.
    unsafe { bpf_probe_read_kernel((task + off) as *const u32) }.ok()
}

fn try_rq_wakeup(ctx: &TracePointContext) {
    wakeup(read_u32(ctx, offsets::WAKEUP_PID));
}

/// A watched thread was woken: its wait starts now, unless it already waits
/// (a second wakeup of a queued thread does not move it back in the queue).
fn wakeup(tid: u32) {
    let Some(e) = Entry::of(tid) else { return };
    if e.enqueued_ns.load() == 0 {
        e.enqueued_ns.store(now_ns());
    }
}

fn try_rq_switch(ctx: &TracePointContext) {
    let prev = read_u32(ctx, offsets::SWITCH_PREV_PID);
    let next = read_u32(ctx, offsets::SWITCH_NEXT_PID);
    // pid 0 is the idle task, never watched; skipping it saves a lookup on
    // every switch to and from idle.
    if prev != 0 {
        if let Some(e) = Entry::of(prev) {
            switched_out(&e, still_runnable(read_u64(ctx, offsets::SWITCH_PREV_STATE)));
        }
    }
    if next != 0 {
        if let Some(e) = Entry::of(next) {
            switched_in(&e);
        }
    }
}

/// A watched thread left the CPU. Still runnable: its wait starts now. Going
/// to sleep: no wait until its next wakeup; clearing here also drops a stale
/// time a wakeup may have left while the thread was running.
fn switched_out(e: &Entry, runnable: bool) {
    e.enqueued_ns.store(if runnable { now_ns() } else { 0 });
}

/// A watched thread got the CPU: its wait, if we saw it start, ends now.
fn switched_in(e: &Entry) {
    let start = e.enqueued_ns.load();
    if start == 0 {
        // Attached (or started watching) while it was already queued.
        return;
    }
    let delay = now_ns().saturating_sub(start);
    let epoch = RQ_EPOCH.get(0).copied().unwrap_or(0);
    e.enqueued_ns.store(0);
    e.delay_sum_ns.add(delay);
    e.count.add(1);
    e.hist(rq_bucket(delay)).add(1);
    let (max, tag) = e.max_slot(epoch);
    if tag.load() != epoch {
        // First wait of this epoch: the slot still holds the epoch before
        // last. Value first, then the tag that vouches for it.
        max.store(delay);
        tag.store(epoch);
    } else if delay > max.load() {
        max.store(delay);
    }
}

/// One u64 of an entry, accessed only by volatile loads and stores (user
/// space reads the entry concurrently; see the module comment).
struct Field(*mut u64);

impl Field {
    fn load(&self) -> u64 {
        // SAFETY: see `Entry::of`: the pointer is valid and aligned.
        unsafe { self.0.read_volatile() }
    }

    fn store(&self, v: u64) {
        // SAFETY: as in `load`.
        unsafe { self.0.write_volatile(v) }
    }

    fn add(&self, v: u64) {
        self.store(self.load().wrapping_add(v));
    }
}

/// A watched thread's entry in `RQ_STATS`.
struct Entry {
    p: *mut RqStats,
    enqueued_ns: Field,
    delay_sum_ns: Field,
    count: Field,
}

impl Entry {
    /// The entry of `tid`, if it is watched.
    fn of(tid: u32) -> Option<Entry> {
        let p = RQ_STATS.get_ptr_mut(tid)?;
        // SAFETY: `p` comes from a successful hash map lookup, so it points
        // to a live, 8-byte aligned `RqStats` (repr(C), only u64s) that the
        // kernel keeps alive until this program returns, even if user space
        // deletes the entry meanwhile (RCU); so do the field pointers taken
        // here and in the methods below. `addr_of_mut!` takes them without
        // making a reference to memory others may read concurrently. u64 has
        // no invalid bit patterns.
        unsafe {
            Some(Entry {
                p,
                enqueued_ns: Field(addr_of_mut!((*p).enqueued_ns)),
                delay_sum_ns: Field(addr_of_mut!((*p).delay_sum_ns)),
                count: Field(addr_of_mut!((*p).count)),
            })
        }
    }

    /// The histogram counter of `bucket` (masked into range).
    fn hist(&self, bucket: usize) -> Field {
        let i = bucket & (RQ_HIST_BUCKETS - 1);
        // SAFETY: as in `of`; `i` < RQ_HIST_BUCKETS (the mask, which the
        // verifier can follow), so the element lies inside the array.
        unsafe { Field(addr_of_mut!((*self.p).hist).cast::<u64>().add(i)) }
    }

    /// The (longest wait, its epoch) slot of `epoch`.
    fn max_slot(&self, epoch: u64) -> (Field, Field) {
        let i = (epoch & 1) as usize;
        // SAFETY: as in `of`; `i` < 2, the arrays' length.
        unsafe {
            (
                Field(addr_of_mut!((*self.p).max_ns).cast::<u64>().add(i)),
                Field(addr_of_mut!((*self.p).max_epoch).cast::<u64>().add(i)),
            )
        }
    }
}

fn read_u32(ctx: &TracePointContext, offset: usize) -> u32 {
    // SAFETY: a tracepoint program may read its record directly: the
    // verifier checks each access against the context bounds, and the kernel
    // refuses to attach a program whose largest offset lies past the
    // tracepoint's record (all offsets come from the format, see
    // `offsets`). Direct reads avoid a bpf_probe_read_kernel call per field
    // on the hottest path. The field is a 4-byte aligned `pid_t`.
    unsafe { ctx.as_ptr().cast::<u8>().add(offset).cast::<u32>().read() }
}

fn read_u64(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: as in `read_u32`; the field is an 8-byte aligned `long`.
    unsafe { ctx.as_ptr().cast::<u8>().add(offset).cast::<u64>().read() }
}

fn now_ns() -> u64 {
    // SAFETY: the helper takes no arguments and only reads CLOCK_MONOTONIC.
    unsafe { bpf_ktime_get_ns() }
}
