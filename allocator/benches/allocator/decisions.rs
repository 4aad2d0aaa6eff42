//! Decisions per second of the pure core: a random mix of increases and
//! decreases on a populated cluster (100 nodes of 100 VMs each), the way the
//! gRPC edge calls it, minus the transport.
#![allow(clippy::expect_used)] // a test's setup failing is the test failing

use crate::report::fmt_value;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use vmscale_allocator::config::Config;
use vmscale_allocator::core::ledger::Outcome;
use vmscale_allocator::core::units::{ComputeUnit, Resources};
use vmscale_allocator::core::vm::{Bounds, VmRegistration};
use vmscale_allocator::core::{Cluster, NodeRegistration, SessionRef};

const GIB: u64 = 1 << 30;
const NODES: usize = 100;
const VMS: usize = 100;
/// One CU: 250 milli-vCPU + 1 GiB. VMs hold 1 to 8 CUs (2 vCPU, 8 GiB).
const CU: Resources = Resources::new(250, GIB);
const MAX_CUS: u64 = 8;
/// A node: 112 vCPU + 448 GiB, i.e. 448 CUs. Its 100 VMs start at 3-6 CUs
/// (about its 0.9 watermark) and under the random workload want about 485
/// CUs, more than it has, so some increases are partial or denied.
const NODE: Resources = Resources::new(112_000, 448 * GIB);

pub fn cus(n: u64) -> Resources {
    Resources::new(CU.milli_cpu * n, CU.memory_bytes * n)
}

pub fn vm_registration(id: String, held: u64) -> VmRegistration {
    let bounds = Bounds::new(cus(1), cus(MAX_CUS)).expect("valid bounds");
    let cu = ComputeUnit::new(CU).expect("valid compute unit");
    VmRegistration::new(id, cus(held), Resources::ZERO, bounds, cu).expect("valid registration")
}

#[derive(Debug, Default)]
struct Counts {
    granted: u64,
    partial: u64,
    denied: u64,
    released: u64,
}

/// Initial size of a VM, in CUs.
pub fn random_start(rng: &mut SmallRng) -> u64 {
    rng.random_range(3..=6)
}

/// One random request for a VM holding `held` CUs: `Ok(target)` to grow to
/// (by 1-4 CUs), `Err(new_size)` to shrink to (by 1-2 CUs). The smaller the
/// VM, the likelier it grows, so sizes revert to about 5 CUs.
pub fn random_request(rng: &mut SmallRng, held: u64) -> Result<u64, u64> {
    let held = held.clamp(1, MAX_CUS);
    if held == 1 || rng.random_bool((MAX_CUS - held) as f64 / MAX_CUS as f64) {
        Ok(held + rng.random_range(1..=(MAX_CUS - held).min(4)))
    } else {
        Err(held - rng.random_range(1..=(held - 1).min(2)))
    }
}

pub fn run(quick: bool) -> Map<String, Value> {
    let duration = Duration::from_millis(if quick { 500 } else { 3000 });
    let mut rng = SmallRng::seed_from_u64(1);
    let mut cluster = Cluster::new(Config::default().core());
    let mut sessions: Vec<SessionRef> = Vec::new();
    let mut names: Vec<Vec<String>> = Vec::new();
    let mut held: Vec<Vec<u64>> = Vec::new();
    for n in 0..NODES {
        let ids: Vec<String> = (0..VMS).map(|v| format!("node-{n}-vm-{v}")).collect();
        let sizes: Vec<u64> = (0..VMS).map(|_| random_start(&mut rng)).collect();
        let vms = ids.iter().zip(&sizes).map(|(id, &h)| vm_registration(id.clone(), h)).collect();
        let reg = NodeRegistration {
            node: format!("node-{n}"),
            capacity: NODE,
            vms,
            migration_endpoint: format!("http://node-{n}:7073"),
            refused: Vec::new(),
        };
        sessions.push(cluster.open_session(reg, 0).expect("registration accepted").session);
        names.push(ids);
        held.push(sizes);
    }

    println!("core: {NODES} nodes x {VMS} VMs, random increases and decreases for {duration:?}");
    let mut counts = Counts::default();
    let mut ops: u64 = 0;
    let t0 = Instant::now();
    let elapsed = loop {
        for _ in 0..1024 {
            let n = rng.random_range(0..NODES);
            let v = rng.random_range(0..VMS);
            let h = held[n][v];
            match random_request(&mut rng, h) {
                Ok(target) => {
                    let g = cluster.reserve(&sessions[n], &names[n][v], cus(target)).expect("valid reserve");
                    held[n][v] = g.permitted.milli_cpu / CU.milli_cpu;
                    match g.outcome {
                        Outcome::Granted => counts.granted += 1,
                        Outcome::Partial => counts.partial += 1,
                        Outcome::Denied => counts.denied += 1,
                    }
                }
                Err(size) => {
                    cluster.release(&sessions[n], &names[n][v], cus(size)).expect("valid release");
                    held[n][v] = size;
                    counts.released += 1;
                }
            }
        }
        ops += 1024;
        let e = t0.elapsed();
        if e >= duration {
            break e;
        }
    };
    cluster.check_sums().expect("ledger sums stay right");
    let per_s = ops as f64 / elapsed.as_secs_f64();
    let share = |x: u64| (x as f64 / ops as f64 * 1000.0).round() / 10.0;
    println!(
        "core: {ops} decisions in {elapsed:.2?}: {per_s:.0}/s ({}% granted, {}% partial, {}% denied, {}% releases)",
        share(counts.granted),
        share(counts.partial),
        share(counts.denied),
        share(counts.released)
    );
    let mut m = Map::new();
    m.insert("core_decisions_per_s".into(), json!(per_s.round()));
    m.insert(
        "core".into(),
        json!({
            "nodes": NODES, "vms_per_node": VMS, "decisions": ops, "seconds": elapsed.as_secs_f64(),
            "granted_pct": share(counts.granted), "partial_pct": share(counts.partial),
            "denied_pct": share(counts.denied), "release_pct": share(counts.released),
        }),
    );
    m
}

pub fn markdown(m: &Map<String, Value>) -> String {
    let c = m.get("core").cloned().unwrap_or(Value::Null);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Core: `Cluster::reserve`/`release` on {} nodes ({} vCPU, {} GiB) of {} VMs (1-{MAX_CUS} CUs of 250 \
         milli-vCPU + 1 GiB) on one thread: {} random requests in {:.1} s ({}% granted, {}% partial, {}% \
         denied, {}% decreases); every request counts as one decision.\n",
        c["nodes"],
        NODE.milli_cpu / 1000,
        NODE.memory_bytes >> 30,
        c["vms_per_node"],
        fmt_value(&c["decisions"]),
        c["seconds"].as_f64().unwrap_or(0.0),
        c["granted_pct"],
        c["partial_pct"],
        c["denied_pct"],
        c["release_pct"],
    );
    s
}
