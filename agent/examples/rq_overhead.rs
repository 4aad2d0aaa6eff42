//! What the run-queue programs cost: the machine's context-switch rate, and
//! a pipe ping-pong between two threads on one CPU (two context switches and
//! two wakeups per round trip) timed with the programs detached, and attached
//! (classic tracepoints, then raw ones) with the ping-pong threads not watched
//! (every other thread on a node) and watched (like a vCPU thread), in
//! alternating rounds of one run.
//!
//! `cargo run --release -p vmscale-agent --example rq_overhead [-- ROUND_TRIPS ROUNDS]`
//! (root, BTF, and the object from `cargo xtask build-ebpf`).
//!
//! Measured on the 2-core dev VM (kernel 6.18, others compiling; 2026-11-28,
//! `-- 20000 101` and `-- 20000 51`): ~500-750 context switches/s machine-wide
//! at rest; a ping-pong round trip 3.1-3.2 µs of CPU detached; per switch plus
//! wakeup +120-230 ns with classic tracepoints and +115-165 ns with raw ones
//! when no watched thread is involved, +230-280 ns when one is; the noise
//! floor (nothing attached, timed the same way) +10-30 ns with quartiles of
//! about ±100 ns. Kernel BPF statistics: 55-80 ns a program run unwatched,
//! 100-140 ns watched.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use vmscale_agent::ebpf::{Attach, RunQueue, RunQueueConfig};

fn gettid() -> u32 {
    // SAFETY: gettid takes no arguments, cannot fail and touches no memory.
    u32::try_from(unsafe { libc::syscall(libc::SYS_gettid) }).unwrap()
}

fn pin_to(cpu: usize) {
    // SAFETY: `set` is a bitmask we own; CPU_ZERO/CPU_SET write inside it
    // and sched_setaffinity reads exactly its size for the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are new and owned by nobody else; each File
    // takes one and closes it on drop.
    unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
}

/// Context switches per second on the whole machine, from /proc/stat.
fn switch_rate(over: Duration) -> f64 {
    let ctxt = || -> u64 {
        let s = std::fs::read_to_string("/proc/stat").unwrap();
        s.lines().find_map(|l| l.strip_prefix("ctxt ")).unwrap().trim().parse().unwrap()
    };
    let (a, t) = (ctxt(), Instant::now());
    std::thread::sleep(over);
    (ctxt() - a) as f64 / t.elapsed().as_secs_f64()
}

/// A ping-pong pair pinned to CPU 0, driven one batch at a time.
struct PingPong {
    go: std::sync::mpsc::Sender<u64>,
    done: std::sync::mpsc::Receiver<Duration>,
    tids: [u32; 2],
}

impl PingPong {
    fn start() -> PingPong {
        let (a_r, a_w) = pipe();
        let (b_r, b_w) = pipe();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<u64>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let t = tid_tx.clone();
        // Echoes every byte back.
        std::thread::spawn(move || {
            pin_to(0);
            t.send(gettid()).unwrap();
            let (mut r, mut w) = (a_r, b_w);
            let mut b = [0u8; 1];
            while r.read_exact(&mut b).is_ok() {
                if w.write_all(&b).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            pin_to(0);
            tid_tx.send(gettid()).unwrap();
            let (mut w, mut r) = (a_w, b_r);
            let mut b = [0u8; 1];
            while let Ok(n) = go_rx.recv() {
                let t = Instant::now();
                for _ in 0..n {
                    w.write_all(&b).unwrap();
                    r.read_exact(&mut b).unwrap();
                }
                done_tx.send(t.elapsed()).unwrap();
            }
        });
        let tids = [tid_rx.recv().unwrap(), tid_rx.recv().unwrap()];
        PingPong { go: go_tx, done: done_rx, tids }
    }

    /// CPU time of the two threads per round trip over `n` round trips, ns.
    /// CPU time rather than wall time: others compile on this machine, and
    /// their turns on CPU 0 would count in wall time. The programs' time is
    /// charged to the ping-pong threads (a wakeup program runs as the waker,
    /// the switch program between the two).
    fn run(&self, n: u64) -> f64 {
        let before = self.cpu_ns();
        self.go.send(n).unwrap();
        let _wall = self.done.recv().unwrap();
        (self.cpu_ns() - before) as f64 / n as f64
    }

    /// Time on CPU of both threads so far (`schedstat`'s first field), ns.
    fn cpu_ns(&self) -> u64 {
        self.tids
            .iter()
            .map(|t| {
                let s = std::fs::read_to_string(format!("/proc/self/task/{t}/schedstat")).unwrap();
                s.split_whitespace().next().unwrap().parse::<u64>().unwrap()
            })
            .sum()
    }
}

fn median(v: &mut [f64]) -> f64 {
    quantile(v, 0.5)
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    vmscale_common::stats::quantile(v, q).unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let n = args.first().copied().unwrap_or(100_000);
    let rounds = args.get(1).copied().unwrap_or(7);

    let idle_rate = switch_rate(Duration::from_secs(3));
    println!("context switches on this machine (all CPUs, /proc/stat ctxt over 3 s): {idle_rate:.0}/s");

    let pp = PingPong::start();
    pp.run(n / 10); // warm up
                    // Other VMs' vCPU threads, watched but not ours: the map is not empty.
    let others: Vec<u32> = (0..64).map(|i| 3_999_000 + i).collect();
    // `None`: nothing attached, timed like the others: the noise floor.
    let modes = [None, Some(Attach::Tracepoint), Some(Attach::Raw)];
    // Others compile on this machine too: each round times the detached
    // case before and after the attached ones, and each attached figure is
    // taken against the mean of the two (paired), so slow drifts in load
    // cancel; the median over rounds drops the rounds a burst hit.
    let mut off = Vec::new();
    // Per mode: paired differences (not watched, watched), ns per round trip.
    let mut diffs: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); modes.len()];
    for round in 0..rounds {
        let before = pp.run(n);
        let mut got = vec![(0.0, 0.0); modes.len()];
        // Alternate the order, so that no kind always follows a load.
        let order: Vec<usize> =
            if round % 2 == 0 { (0..modes.len()).collect() } else { (0..modes.len()).rev().collect() };
        for i in order {
            let Some(mode) = modes[i] else {
                got[i] = (pp.run(n), pp.run(n));
                continue;
            };
            let cfg = RunQueueConfig { attach: mode, ..RunQueueConfig::default() };
            let mut rq =
                RunQueue::new(&cfg).unwrap_or_else(|e| panic!("cannot load the programs ({mode:?}): {e}"));
            rq.set_threads("others", &others).unwrap();
            let not_watched = pp.run(n);
            rq.set_threads("pingpong", &pp.tids).unwrap();
            let _ = rq.read().unwrap();
            let watched = pp.run(n);
            let r = rq.read().unwrap();
            assert!(r["pingpong"].samples > 0, "the watched ping-pong threads were not seen waiting");
            got[i] = (not_watched, watched);
        } // dropped: detached
        let after = pp.run(n);
        let base = (before + after) / 2.0;
        off.push(base);
        for (d, (nw, w)) in diffs.iter_mut().zip(got) {
            d.0.push(nw - base);
            d.1.push(w - base);
        }
    }
    let rate_during = {
        let t = std::thread::spawn(move || switch_rate(Duration::from_secs(1)));
        pp.run(n * 5);
        t.join().unwrap()
    };
    let off = median(&mut off);
    // Two switches and two wakeups per round trip: the cost of one switch
    // with its wakeup is half the difference.
    println!("pipe ping-pong on one CPU, {n} round trips x {rounds} rounds (median of paired differences):");
    println!("  programs detached:                {off:8.0} ns of CPU/round trip");
    for (mode, (not_watched, watched)) in modes.iter().zip(diffs.iter_mut()) {
        for (what, v) in [("not watched", not_watched), ("watched", watched)] {
            let (q1, d, q3) = (quantile(v, 0.25), median(v), quantile(v, 0.75));
            println!(
                "  {:<11} threads {what:<11}: {d:+6.0} ns of CPU/round trip ({:+5.1}%), {:+4.0} ns per switch+wakeup \
                 (quartiles {:+.0}..{:+.0})",
                mode.map_or("(detached)".to_owned(), |m| format!("{m:?},")),
                d / off * 100.0,
                d / 2.0,
                q1 / 2.0,
                q3 / 2.0
            );
        }
    }
    println!("  switch rate while ping-ponging: {rate_during:.0}/s");

    // The programs' own run time, as the kernel counts it (the counting adds
    // two clock reads per run, so these are upper bounds). It excludes what
    // the tracepoint costs around the program (for a classic one, building
    // the trace record).
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Err(e) => println!("BPF run-time statistics unavailable: {e}"),
        Ok(_stats) => {
            println!("program run time (kernel BPF statistics, {n} round trips each):");
            for mode in [Attach::Tracepoint, Attach::Raw] {
                let cfg = RunQueueConfig { attach: mode, ..RunQueueConfig::default() };
                let mut rq = RunQueue::new(&cfg).unwrap();
                rq.set_threads("others", &others).unwrap();
                for (what, watch) in [("not watched", false), ("watched", true)] {
                    if watch {
                        rq.set_threads("pingpong", &pp.tids).unwrap();
                    }
                    let before = rq.program_stats();
                    pp.run(n);
                    for ((name, t1, c1), (_, t0, c0)) in rq.program_stats().into_iter().zip(before) {
                        let runs = c1 - c0;
                        if runs > 0 {
                            let ns = (t1 - t0).as_nanos() as f64 / runs as f64;
                            println!(
                                "  {mode:?}, threads {what:<11}: {name:<18} {runs:7} runs, {ns:5.0} ns/run"
                            );
                        }
                    }
                }
            }
        }
    }
}
