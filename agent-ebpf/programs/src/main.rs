//! The eBPF programs: the informant's memory reclaim and OOM tracepoints
//! (here), and the host agent's run-queue delay of vCPU threads (`sched.rs`).
//!
//! Reclaim can fire thousands of times a second, so the programs fold it per
//! kind: each begin counts, each end adds the time since that thread's begin
//! (the stall) and the pages it reclaimed, and a record goes to the ring at
//! most once per window (`WINDOW_NS`) per kind. The first hit after a quiet
//! window is emitted at once, so user space hears of new pressure without
//! delay. What the last window of a burst leaves behind stays in the `STATE`
//! map, where user space collects it. OOM victims are sent one by one.
//!
//! Each program is a thin entry point that calls a `try_` function.

#![no_std]
#![no_main]
// BPF atomics are written as inline assembly (see state.rs). The build runs
// with RUSTC_BOOTSTRAP=1 anyway (Debian's stable rustc, as aya-ebpf needs it).
#![feature(asm_experimental_arch)]

mod sched;
mod state;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, LruHashMap, RingBuf},
    programs::TracePointContext,
};
use vmscale_ebpf_common::{
    offsets, start_key, window_elapsed, Kind, KindState, Record, DEFAULT_WINDOW_NS, KIND_COUNT, RING_BYTES,
    START_MAP_ENTRIES,
};

use crate::state::StateEntry;

/// The aggregation window in ns; user space overrides it at load time.
#[unsafe(no_mangle)]
static WINDOW_NS: u64 = DEFAULT_WINDOW_NS;

#[map(name = "RECORDS")]
static RECORDS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map(name = "STATE")]
static STATE: Array<KindState> = Array::with_max_entries(KIND_COUNT, 0);

/// Begin time per (kind, thread). LRU, so a begin whose end we never saw
/// (programs attached mid-reclaim, a task that died) ages out.
#[map(name = "RECLAIM_START")]
static RECLAIM_START: LruHashMap<u64, u64> = LruHashMap::with_max_entries(START_MAP_ENTRIES, 0);

/// Why a program stopped early. The entry points ignore it: a tracepoint
/// program's return value means nothing to the kernel.
enum Error {
    /// The state entry of a kind was missing: the map is smaller than
    /// `KIND_COUNT` (a mismatched object).
    NoState,
    /// A kernel helper failed with this code.
    Helper,
}

#[tracepoint]
pub fn direct_reclaim_begin(_ctx: TracePointContext) -> u32 {
    exit(try_reclaim_begin(Kind::DirectReclaim))
}

#[tracepoint]
pub fn direct_reclaim_end(ctx: TracePointContext) -> u32 {
    exit(try_reclaim_end(&ctx, Kind::DirectReclaim))
}

#[tracepoint]
pub fn memcg_reclaim_begin(_ctx: TracePointContext) -> u32 {
    exit(try_reclaim_begin(Kind::MemcgReclaim))
}

#[tracepoint]
pub fn memcg_reclaim_end(ctx: TracePointContext) -> u32 {
    exit(try_reclaim_end(&ctx, Kind::MemcgReclaim))
}

#[tracepoint]
pub fn kswapd_wake(_ctx: TracePointContext) -> u32 {
    exit(try_kswapd_wake())
}

#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    exit(try_oom_mark_victim(&ctx))
}

fn exit(r: Result<(), Error>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(Error::NoState) => 1,
        Err(Error::Helper) => 2,
    }
}

fn try_reclaim_begin(kind: Kind) -> Result<(), Error> {
    let now = now_ns();
    let (tid, tgid) = current_ids();
    // A full map (only with an LRU under churn) costs this reclaim's stall
    // time, not its count.
    let _ = RECLAIM_START.insert(start_key(kind, tid), now, 0);
    let state = StateEntry::of(kind)?;
    state.count.fetch_add(1);
    state.last_event_ns.store(now);
    maybe_emit(kind, &state, now, tgid);
    Ok(())
}

fn try_reclaim_end(ctx: &TracePointContext, kind: Kind) -> Result<(), Error> {
    let now = now_ns();
    let (tid, tgid) = current_ids();
    let key = start_key(kind, tid);
    let Some(start) = RECLAIM_START.get_ptr(key) else {
        // A begin from before we attached, or one the LRU dropped.
        return Ok(());
    };
    // SAFETY: the pointer comes from a successful lookup in a hash map and
    // the kernel keeps the value alive until this program returns; a u64 has
    // no invalid bit patterns. (A concurrent update can only come from this
    // same thread, which is here.)
    let start = unsafe { start.read() };
    let _ = RECLAIM_START.remove(key);
    // SAFETY: offset 8 of this tracepoint's record is `unsigned long
    // nr_reclaimed` (see `offsets`); read_at copies it with
    // bpf_probe_read_kernel, which fails cleanly rather than fault.
    let reclaimed: u64 = unsafe { ctx.read_at(offsets::RECLAIM_END_NR_RECLAIMED) }.unwrap_or(0);
    let state = StateEntry::of(kind)?;
    state.stall_ns.fetch_add(now.saturating_sub(start));
    state.reclaimed_pages.fetch_add(reclaimed);
    state.last_event_ns.store(now);
    maybe_emit(kind, &state, now, tgid);
    Ok(())
}

fn try_kswapd_wake() -> Result<(), Error> {
    let now = now_ns();
    let (_, tgid) = current_ids();
    let state = StateEntry::of(Kind::KswapdWake)?;
    state.count.fetch_add(1);
    state.last_event_ns.store(now);
    maybe_emit(Kind::KswapdWake, &state, now, tgid);
    Ok(())
}

fn try_oom_mark_victim(ctx: &TracePointContext) -> Result<(), Error> {
    let now = now_ns();
    // SAFETY: offset 8 of `oom/mark_victim` is `int pid` (see `offsets`);
    // read_at copies it with bpf_probe_read_kernel, which fails cleanly.
    let pid: i32 = unsafe { ctx.read_at(offsets::MARK_VICTIM_PID) }.map_err(|_| Error::Helper)?;
    let state = StateEntry::of(Kind::OomVictim)?;
    state.count.fetch_add(1);
    state.last_event_ns.store(now);
    state.last_emit_ns.store(now);
    emit(Kind::OomVictim, &state, now, pid.unsigned_abs());
    Ok(())
}

/// Emits a record if this kind's window has passed and no other CPU claimed
/// the emission first.
fn maybe_emit(kind: Kind, state: &StateEntry, now: u64, pid: u32) {
    // SAFETY: WINDOW_NS is a plain u64 static; the volatile read stops the
    // compiler from folding in the compiled-in default, since user space
    // rewrites the value in the object before loading it.
    let window = unsafe { core::ptr::read_volatile(&WINDOW_NS) };
    let last = state.last_emit_ns.load();
    if !window_elapsed(now, last, window) {
        return;
    }
    if !state.last_emit_ns.claim(last, now) {
        return;
    }
    emit(kind, state, now, pid);
}

fn emit(kind: Kind, state: &StateEntry, now: u64, pid: u32) {
    let Some(mut entry) = RECORDS.reserve::<Record>(0) else {
        state.dropped.fetch_add(1);
        return;
    };
    entry.write(Record {
        ts_ns: now,
        count: state.count.load(),
        stall_ns: state.stall_ns.load(),
        reclaimed_pages: state.reclaimed_pages.load(),
        dropped: state.dropped.load(),
        kind: kind as u32,
        pid,
    });
    entry.submit(0);
}

fn now_ns() -> u64 {
    // SAFETY: the helper takes no arguments and only reads CLOCK_MONOTONIC.
    unsafe { bpf_ktime_get_ns() }
}

/// (thread id, thread-group id) of the current task.
fn current_ids() -> (u32, u32) {
    let v = bpf_get_current_pid_tgid();
    (v as u32, (v >> 32) as u32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Never reached: the verifier rejects programs with a reachable panic
    // path (it would be an endless loop), so a build that loads has none.
    loop {}
}
