//! The closing summary's checks against made-up outcomes.

use super::summary::{report, Move, Outcome, PhaseStats, SideRun};
use super::timeline::VmPoint;
use crate::pgbench::{Source, Summary};

fn point(t: f64, vcpus: f64, mib: f64, tps: Option<f64>) -> VmPoint {
    VmPoint { t, vcpus: Some(vcpus), memory_mib: Some(mib), used_mib: None, tps }
}

fn clean(processed: u64) -> Summary {
    Summary {
        source: Source::Progress,
        processed,
        failed: 0,
        retried: None,
        latency_avg_ms: None,
        latency_stddev_ms: None,
        tps: Some(50.0),
        max_latency_ms: Some(120.0),
        worst_second_latency_ms: None,
        broken_connections: 0,
        aborted: false,
        errors: Vec::new(),
        exit: None,
    }
}

/// pg-1 goes 2 -> 1 -> 2 vCPUs and 1 -> 2 GiB and back; pg-2 moves under
/// a clean pgbench.
fn good() -> Outcome {
    let pg1 = vec![
        point(1.0, 2.0, 1024.0, None),
        point(10.0, 1.0, 1024.0, None),
        point(20.0, 2.0, 2048.0, Some(80.0)),
        point(40.0, 1.0, 1024.0, None),
    ];
    let mut load = PhaseStats::new("rising load: 4 clients", 15.0);
    pg1.iter().for_each(|p| load.add(p));
    Outcome {
        two_nodes: true,
        stats: vec![load],
        pg1,
        pg1_min: (1.0, 1024.0),
        pg1_reserved: Some((1.0, 1024.0)),
        runs: vec![("pg-1, 4 clients".into(), clean(1000))],
        side: Some(SideRun { clients: 1, start: 15.0, end: 50.0, summary: clean(300) }),
        moves: vec![Move {
            order: 1,
            vm: "pg-2".into(),
            from: "node-a".into(),
            to: "node-b".into(),
            start: 22.0,
            end: 30.0,
        }],
        sort: Some((5_000_000, 40.0, None)),
        sort_peak_mib: Some(1792.0),
        oom_vmstat: Some(0),
        oom_console: 0,
    }
}

#[test]
fn a_demo_that_did_everything_passes_every_check() {
    let (text, ok) = report(&good());
    assert!(ok, "{text}");
    assert!(!text.contains(": NO"), "{text}");
    assert!(text.contains("move: pg-2 node-a -> node-b (order 1)"), "{text}");
    assert!(text.contains("errors: 0"), "{text}");
    assert!(text.contains("rising load: 4 clients"), "{text}");
}

#[test]
fn each_missing_claim_is_a_failed_check() {
    type Spoil = Box<dyn Fn(&mut Outcome)>;
    let cases: Vec<(&str, Spoil)> = vec![
        ("vCPUs grew", Box::new(|o| o.pg1.iter_mut().for_each(|p| p.vcpus = Some(1.0)))),
        ("memory grew", Box::new(|o| o.pg1.last_mut().unwrap().memory_mib = Some(1280.0))),
        ("no OOM kill", Box::new(|o| o.oom_vmstat = Some(1))),
        ("released", Box::new(|o| o.pg1_reserved = Some((1.25, 1280.0)))),
        ("no error", Box::new(|o| o.runs[0].1.broken_connections = 1)),
        ("moved live", Box::new(|o| o.moves.clear())),
        // The run against pg-2 must span the move.
        ("moved live", Box::new(|o| o.side.as_mut().unwrap().end = 25.0)),
        ("sort ran", Box::new(|o| o.sort_peak_mib = Some(1024.0))),
    ];
    for (claim, spoil) in cases {
        let mut o = good();
        spoil(&mut o);
        let (text, ok) = report(&o);
        assert!(!ok, "{claim}: {text}");
        let failed: Vec<_> = text.lines().filter(|l| l.ends_with(": NO")).collect();
        assert!(failed.iter().any(|l| l.contains(claim)), "{claim}: {failed:?}\n{text}");
    }
}

#[test]
fn one_node_has_no_move_to_check() {
    let mut o = good();
    o.two_nodes = false;
    o.moves.clear();
    o.side = None;
    let (text, ok) = report(&o);
    assert!(ok, "{text}");
    assert!(!text.contains("moved live"), "{text}");
}
