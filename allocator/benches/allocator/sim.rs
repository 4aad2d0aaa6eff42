//! A simulated cluster of 5,000 nodes and 500,000 VMs, registered through the
//! core, under a random scaling workload that pushes nodes past their
//! watermark: the process's memory, and the time of one planning round.
#![allow(clippy::expect_used)] // a test's setup failing is the test failing

use crate::decisions::{cus, random_request, random_start, vm_registration};
use crate::report::{fmt_value, rss_mib};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::time::Instant;
use vmscale_allocator::config::Config;
use vmscale_allocator::core::migration::OrderState;
use vmscale_allocator::core::units::Resources;
use vmscale_allocator::core::{Cluster, NodeRegistration, SessionRef};

const NODES: usize = 5_000;
const VMS_PER_NODE: usize = 100;
const VMS: usize = NODES * VMS_PER_NODE;
/// 128 vCPU + 512 GiB: 512 CUs. Its 100 VMs start at 3-6 CUs (about 88%,
/// just under the 0.9 watermark) and wander under the workload, so that at
/// any time some nodes are above their watermark and others have room.
const NODE: Resources = Resources::new(128_000, 512 << 30);
/// The full cluster: 448 CUs for the same VMs, so that every node is above its
/// watermark except one in a hundred, laid out by [`just_under`].
const FULL_NODE: Resources = Resources::new(112_000, 448 << 30);

/// VM sizes that put a [`FULL_NODE`] 403 CUs full: just under its watermark
/// (403.2 CUs) with less than one CU of headroom, so no VM fits on it.
fn just_under(v: usize) -> u64 {
    if v < 97 {
        4
    } else {
        5
    }
}

#[derive(Debug)]
struct Round {
    hot_nodes: usize,
    plan_ms: f64,
    moves: usize,
}

impl Round {
    fn json(&self) -> Value {
        json!({"hot_nodes": self.hot_nodes, "plan_ms": self.plan_ms, "moves": self.moves})
    }
}

/// The cluster and what the simulated agents know: where each VM runs.
struct Sim {
    cluster: Cluster,
    names: Vec<String>,
    sessions: Vec<SessionRef>,
    vm_node: Vec<u32>,
    rng: SmallRng,
    now_ms: u64,
    denied: u64,
}

fn vm_index(id: &str) -> usize {
    id.strip_prefix("vm-").and_then(|i| i.parse().ok()).expect("bench vm id")
}

impl Sim {
    /// `full`: every node is a [`FULL_NODE`], one in a hundred laid out [`just_under`].
    fn new(node: Resources, seed: u64, full: bool) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut cluster = Cluster::new(Config::default().core());
        let names: Vec<String> = (0..NODES).map(|n| format!("node-{n}")).collect();
        let mut sessions = Vec::with_capacity(NODES);
        for (n, name) in names.iter().enumerate() {
            let vms = (0..VMS_PER_NODE)
                .map(|v| {
                    let size =
                        if full && n.is_multiple_of(100) { just_under(v) } else { random_start(&mut rng) };
                    vm_registration(format!("vm-{}", n * VMS_PER_NODE + v), size)
                })
                .collect();
            let reg = NodeRegistration {
                node: name.clone(),
                capacity: node,
                vms,
                migration_endpoint: format!("http://{name}:7073"),
                refused: Vec::new(),
            };
            sessions.push(cluster.open_session(reg, 0).expect("registration accepted").session);
        }
        let vm_node = (0..VMS).map(|i| u32::try_from(i / VMS_PER_NODE).unwrap_or(0)).collect();
        Sim { cluster, names, sessions, vm_node, rng, now_ms: 0, denied: 0 }
    }

    /// Random increases and decreases on random VMs.
    fn workload(&mut self, requests: usize) {
        self.now_ms += 1000;
        for _ in 0..requests {
            let i = self.rng.random_range(0..VMS);
            let n = self.vm_node[i] as usize;
            let id = format!("vm-{i}");
            let held = self.cluster.nodes[&self.names[n]].vms[&id].reserved.milli_cpu / cus(1).milli_cpu;
            match random_request(&mut self.rng, held) {
                Ok(target) => {
                    let g = self.cluster.reserve(&self.sessions[n], &id, cus(target)).expect("valid reserve");
                    self.denied += u64::from(g.permitted != g.requested);
                }
                Err(size) => self.cluster.release(&self.sessions[n], &id, cus(size)).expect("valid release"),
            }
        }
    }

    /// One timed `plan_and_order`; then the agents carry the moves out.
    fn plan(&mut self) -> Round {
        let c = &self.cluster;
        let hot_nodes = c.nodes.values().filter(|n| !n.wanted().fits_in(n.watermark_level())).count();
        let t = Instant::now();
        let orders = self.cluster.plan_and_order(self.now_ms);
        let plan_ms = t.elapsed().as_secs_f64() * 1e3;
        for o in &orders {
            let vm = vm_index(&o.vm);
            let src = &self.sessions[self.vm_node[vm] as usize];
            for phase in [OrderState::Started, OrderState::Completed] {
                self.cluster.migration_status(src, o.id, phase, "", self.now_ms).expect("order reported");
            }
            self.vm_node[vm] =
                o.target.strip_prefix("node-").and_then(|n| n.parse().ok()).expect("node name");
        }
        Round { hot_nodes, plan_ms, moves: orders.len() }
    }
}

fn worst(rounds: &[Round]) -> &Round {
    rounds.iter().max_by(|a, b| a.plan_ms.total_cmp(&b.plan_ms)).expect("at least one round")
}

pub fn run(quick: bool) -> Map<String, Value> {
    let (rounds, requests) = if quick { (4, 100_000) } else { (10, 250_000) };
    let (rss_start, _) = rss_mib();
    let t = Instant::now();
    let mut sim = Sim::new(NODE, 7, false);
    let budget = sim.cluster.config.max_moves_per_round;
    let (rss_registered, _) = rss_mib();
    println!("sim: {NODES} nodes, {VMS} VMs registered in {:.2?}, RSS {rss_registered:.0} MiB", t.elapsed());

    let mut log = Vec::new();
    let mut unbounded = None;
    for round in 0..rounds {
        sim.workload(requests);
        let r = sim.plan();
        println!(
            "sim: round {round}: {requests} requests, {} hot nodes; planned {} moves in {:.2} ms",
            r.hot_nodes, r.moves, r.plan_ms
        );
        log.push(r);
        if round == rounds / 2 {
            // The same planner without the per-round budget: what a full plan costs.
            sim.cluster.config.max_moves_per_round = usize::MAX;
            let r = sim.plan();
            sim.cluster.config.max_moves_per_round = budget;
            println!(
                "sim: unbounded round: {} hot nodes, planned {} moves in {:.2} ms",
                r.hot_nodes, r.moves, r.plan_ms
            );
            unbounded = Some(r);
        }
    }
    sim.cluster.check_sums().expect("ledger sums stay right");
    let (rss_end, rss_peak) = rss_mib();
    let w = worst(&log);
    println!(
        "sim: RSS {rss_end:.0} MiB at the end, peak {rss_peak:.0} MiB (at start {rss_start:.0}); \
         worst planning round {:.2} ms ({} moves, budget {budget})",
        w.plan_ms, w.moves
    );
    let denied = sim.denied;
    drop(sim);

    // A full cluster, after the first one is gone (its memory is not counted):
    // what a round costs when there is no room for any move.
    let mut full = Sim::new(FULL_NODE, 8, true);
    let mut full_log = Vec::new();
    for round in 0..3 {
        let r = full.plan();
        println!(
            "sim: full cluster round {round}: {} hot nodes; planned {} moves in {:.2} ms",
            r.hot_nodes, r.moves, r.plan_ms
        );
        full_log.push(r);
    }

    let mut m = Map::new();
    m.insert("sim_nodes".into(), json!(NODES));
    m.insert("sim_vms".into(), json!(VMS));
    m.insert("sim_rss_mib".into(), json!(rss_peak.round()));
    m.insert("sim_plan_ms".into(), json!((w.plan_ms * 100.0).round() / 100.0));
    m.insert(
        "sim".into(),
        json!({
            "rss_start_mib": rss_start, "rss_registered_mib": rss_registered,
            "rss_end_mib": rss_end, "rss_peak_mib": rss_peak,
            "requests_per_round": requests, "denied_or_partial": denied,
            "max_moves_per_round": budget,
            "worst_round": w.json(),
            "rounds": log.iter().map(Round::json).collect::<Vec<_>>(),
            "unbounded_round": unbounded.as_ref().map(Round::json),
            "full_rounds": full_log.iter().map(Round::json).collect::<Vec<_>>(),
        }),
    );
    m
}

pub fn markdown(m: &Map<String, Value>) -> String {
    let s_ = m.get("sim").cloned().unwrap_or(Value::Null);
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Simulation: {} nodes ({} vCPU, {} GiB) with {} VMs of 1-8 CUs registered through the core, then \
         {} rounds of {} random increases and decreases ({} partial or denied in all, which push nodes \
         past their 0.9 watermark), each followed by one timed `plan_and_order` whose moves are then \
         completed. RSS is the simulation process's own (`VmRSS`/`VmHWM`): {:.0} MiB at start, {:.0} MiB \
         once registered, {:.0} MiB at the end, {:.0} MiB at its peak (the figure above).\n",
        fmt_value(m.get("sim_nodes").unwrap_or(&Value::Null)),
        NODE.milli_cpu / 1000,
        NODE.memory_bytes >> 30,
        fmt_value(m.get("sim_vms").unwrap_or(&Value::Null)),
        s_["rounds"].as_array().map_or(0, Vec::len),
        fmt_value(&s_["requests_per_round"]),
        fmt_value(&s_["denied_or_partial"]),
        f(&s_["rss_start_mib"]),
        f(&s_["rss_registered_mib"]),
        f(&s_["rss_end_mib"]),
        f(&s_["rss_peak_mib"]),
    );
    let _ = writeln!(s, "| round | hot nodes | moves planned | planning time |\n|---|---:|---:|---:|");
    let row = |s: &mut String, label: &str, r: &Value| {
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {:.2} ms |",
            fmt_value(&r["hot_nodes"]),
            fmt_value(&r["moves"]),
            f(&r["plan_ms"])
        );
    };
    for (i, r) in s_["rounds"].as_array().into_iter().flatten().enumerate() {
        row(&mut s, &i.to_string(), r);
    }
    if s_["unbounded_round"].is_object() {
        row(&mut s, "unbounded (extra, mid-run)", &s_["unbounded_round"]);
    }
    for (i, r) in s_["full_rounds"].as_array().into_iter().flatten().enumerate() {
        row(&mut s, &format!("full cluster {i}"), r);
    }
    let _ = writeln!(
        s,
        "\nEach round plans at most `max_moves_per_round` = {} moves (the default). \"Unbounded\" is one \
         extra round without that limit. \"Full cluster\" is a second cluster of the same size with \
         nodes of {} vCPU and {} GiB, every one above its watermark but one in a hundred, and those \
         less than one CU under it: the planner finds no move, and the rows show what a round costs \
         then; they are not part of the headline figure.\n",
        s_["max_moves_per_round"],
        FULL_NODE.milli_cpu / 1000,
        FULL_NODE.memory_bytes >> 30,
    );
    s
}
