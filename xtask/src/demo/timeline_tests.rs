//! The timeline chart: a well-formed SVG that draws what it was given on
//! one time axis, with its labels.

use super::svg::Scale;
use super::timeline::{scalings, svg, Mark, Resource, Scaling, Span, Timeline, VmPoint, VmSeries};

/// Checks `doc` is well-formed XML as far as the chart uses it (no crate
/// for XML is in the lock file): every tag closed in order, attributes
/// quoted, no bare `<` or `&` in text. Returns the element names, in order.
fn elements(doc: &str) -> Vec<String> {
    let mut open: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut rest = doc;
    while let Some(i) = rest.find('<') {
        check_text(&rest[..i]);
        let end = rest[i..].find('>').unwrap_or_else(|| panic!("a tag is not closed: {}", &rest[i..]));
        let tag = &rest[i + 1..i + end];
        rest = &rest[i + end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop().as_deref(), Some(name), "</{name}> closes another element");
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name = body.split_whitespace().next().unwrap_or_default().to_owned();
        assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()), "bad tag <{tag}>");
        check_attributes(body[name.len()..].trim());
        names.push(name.clone());
        if !self_closing {
            open.push(name);
        }
    }
    check_text(rest);
    assert!(open.is_empty(), "not closed: {open:?}");
    names
}

fn check_text(t: &str) {
    for (i, _) in t.match_indices('&') {
        let entity = &t[i..t[i..].find(';').map_or(t.len(), |e| i + e + 1)];
        assert!(["&amp;", "&lt;", "&gt;", "&quot;"].contains(&entity), "bare & in {t:?}");
    }
    assert!(!t.contains('>'), "stray > in {t:?}");
}

/// `a="x" b="y"`: each a name, `=`, a double-quoted value without `<`.
fn check_attributes(mut a: &str) {
    while !a.is_empty() {
        let (name, rest) =
            a.split_once("=\"").unwrap_or_else(|| panic!("attribute without a quoted value: {a}"));
        assert!(!name.trim().is_empty() && !name.contains(' '), "bad attribute name in {a}");
        let (value, rest) = rest.split_once('"').unwrap_or_else(|| panic!("unclosed attribute in {a}"));
        assert!(!value.contains('<'), "< in an attribute: {value}");
        check_text(value);
        a = rest.trim_start();
    }
}

fn point(t: f64, vcpus: f64, memory: f64, tps: Option<f64>) -> VmPoint {
    VmPoint { t, vcpus: Some(vcpus), memory_mib: Some(memory), used_mib: Some(memory * 0.7), tps }
}

fn demo() -> Timeline {
    let pg1: Vec<VmPoint> = (0..120)
        .map(|s| {
            let t = f64::from(s);
            let cpus = if s < 30 {
                1.0
            } else if s < 90 {
                2.0
            } else {
                1.0
            };
            let mem = if (45..100).contains(&s) { 2048.0 } else { 1024.0 };
            point(t, cpus, mem, (s > 5).then_some(400.0 * cpus))
        })
        .collect();
    let mut pg2: Vec<VmPoint> = (0..120).map(|s| point(f64::from(s), 1.0, 1024.0, Some(150.0))).collect();
    pg2[70].tps = None; // the move's pause: no sample that second
    Timeline {
        vms: vec![
            VmSeries { id: "pg-1".into(), scalings: scalings(&pg1), points: pg1 },
            VmSeries { id: "pg-2".into(), scalings: scalings(&pg2), points: pg2 },
        ],
        phases: vec![
            Span { start: 0.0, end: Some(30.0), label: "warm-up".into() },
            Span { start: 30.0, end: Some(90.0), label: "rising clients & a big sort".into() },
            Span { start: 90.0, end: None, label: "quiet".into() },
        ],
        moves: vec![Span { start: 66.0, end: Some(74.5), label: "pg-2 -> node-b: completed".into() }],
        marks: vec![Mark { t: 50.0, label: "work_mem <1GB> query".into() }],
    }
}

#[test]
fn the_chart_is_well_formed_and_draws_every_panel() {
    let doc = svg(&demo());
    let names = elements(&doc);
    assert_eq!(names.first().map(String::as_str), Some("svg"));
    assert!(doc.trim_end().ends_with("</svg>"));
    // Three panels; per VM a vCPU line, plugged and used memory lines, and
    // TPS in two pieces around the missing second.
    let polylines = names.iter().filter(|n| *n == "polyline").count();
    assert_eq!(polylines, 2 * (1 + 2) + 2 + 1, "{polylines} lines");
}

#[test]
fn axes_panels_and_legend_are_labelled() {
    let doc = svg(&demo());
    for label in [
        "time (s)",
        ">vCPUs<",
        ">memory (MiB)<",
        ">TPS<",
        ">throughput<",
        ">pg-1<",
        ">pg-2<",
        "memory used",
        "live migration",
    ] {
        assert!(doc.contains(label), "no {label:?}");
    }
    for tick in [">0<", ">20<", ">100<"] {
        assert!(doc.contains(tick), "no time tick {tick}");
    }
}

#[test]
fn the_move_is_a_band_with_its_label_and_phases_are_named() {
    let doc = svg(&demo());
    assert_eq!(doc.matches("class=\"move\"").count(), 1);
    assert!(doc.contains("move: pg-2 -&gt; node-b: completed"), "the move's label, escaped");
    assert!(doc.contains(">warm-up<") && doc.contains(">quiet<"));
    assert!(doc.contains("rising clients &amp; a big sort"), "phase names escaped");
    assert!(doc.contains("work_mem &lt;1GB&gt; query"), "marks escaped");
}

#[test]
fn scaling_events_are_marked_up_and_down() {
    let tl = demo();
    assert_eq!(
        tl.vms[0].scalings,
        [
            Scaling { t: 30.0, resource: Resource::Cpu, up: true },
            Scaling { t: 45.0, resource: Resource::Memory, up: true },
            Scaling { t: 90.0, resource: Resource::Cpu, up: false },
            Scaling { t: 100.0, resource: Resource::Memory, up: false },
        ]
    );
    assert!(tl.vms[1].scalings.is_empty());
    let doc = svg(&tl);
    assert_eq!(doc.matches("class=\"scale-up\"").count(), 2);
    assert_eq!(doc.matches("class=\"scale-down\"").count(), 2);
}

#[test]
fn a_chart_without_tps_or_anything_at_all_still_renders() {
    let mut tl = demo();
    for v in &mut tl.vms {
        v.points.iter_mut().for_each(|p| p.tps = None);
    }
    let doc = svg(&tl);
    elements(&doc);
    assert!(doc.contains("no throughput measured"));
    let empty = svg(&Timeline::default());
    elements(&empty);
    assert!(empty.contains("time (s)"));
}

#[test]
fn time_ticks_are_round() {
    let s = |hi| Scale { lo: 0.0, hi, px_lo: 0.0, px_hi: 100.0 };
    assert_eq!(s(100.0).ticks(10), [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]);
    assert_eq!(s(7.0).ticks(4), [0.0, 2.0, 4.0, 6.0]);
    assert_eq!(s(1.0).ticks(4), [0.0, 0.5, 1.0]);
    assert_eq!(s(100.0).at(50.0), 50.0);
}
