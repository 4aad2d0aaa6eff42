//! Why the watermark keeps its own `/proc/meminfo` parser: the cost of one
//! read and parse, ours (two fields) against `procfs-core`'s `Meminfo`
//! (every field), interleaved in rounds so the machine's noise hits both.
//!
//! `cargo run --release -p vmscale-informant --example meminfo_parse`
#![allow(clippy::expect_used)] // a test's setup failing is the test failing

use procfs_core::FromRead;
use std::time::{Duration, Instant};
use vmscale_informant::procfs::parse_meminfo;

const READS: u32 = 20_000;
const ROUNDS: usize = 5;

fn per_read(mut f: impl FnMut(&str) -> u64) -> Duration {
    let t = Instant::now();
    let mut sink = 0u64;
    for _ in 0..READS {
        let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo is readable");
        sink = sink.wrapping_add(f(&text));
    }
    std::hint::black_box(sink);
    t.elapsed() / READS
}

fn main() {
    let mut ours = Vec::new();
    let mut crate_ = Vec::new();
    let mut read_only = Vec::new();
    for _ in 0..ROUNDS {
        read_only.push(per_read(|t| t.len() as u64));
        ours.push(per_read(|t| parse_meminfo(t).map_or(0, |m| m.available_bytes)));
        crate_.push(per_read(|t| {
            procfs_core::Meminfo::from_read(t.as_bytes()).ok().and_then(|m| m.mem_available).unwrap_or(0)
        }));
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (r, o, c) = (median(&mut read_only), median(&mut ours), median(&mut crate_));
    println!("per read of /proc/meminfo, median of {ROUNDS} interleaved rounds of {READS}:");
    println!("  read only           {:>6.2} us", r.as_secs_f64() * 1e6);
    println!(
        "  read + ours         {:>6.2} us (parse {:.2} us)",
        o.as_secs_f64() * 1e6,
        o.saturating_sub(r).as_secs_f64() * 1e6
    );
    println!(
        "  read + procfs-core  {:>6.2} us (parse {:.2} us)",
        c.as_secs_f64() * 1e6,
        c.saturating_sub(r).as_secs_f64() * 1e6
    );
}
