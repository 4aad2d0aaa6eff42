//! The timeline chart written when the demo stops (`target/demo/timeline.svg`):
//! one time axis in seconds under three stacked panels that share it,
//! vCPUs, memory (plugged, solid; used, dashed) and TPS, one colour per VM;
//! scaling events as triangles at the foot of their panel (up or down), a
//! live move as a shaded band from its start to its end across all panels
//! with its label, the phases as named bands across the top. [`svg`] is
//! pure: the demo collects a [`Timeline`] as it runs.
//!
//! ```ignore
//! let mut tl = Timeline::default();
//! tl.phases.push(Span { start: 0.0, end: Some(30.0), label: "warm-up".into() });
//! let points = vec![VmPoint { t: 1.0, vcpus: Some(1.0), memory_mib: Some(1024.0), tps: Some(250.0), ..Default::default() }];
//! tl.vms.push(VmSeries { id: "pg-1".into(), scalings: scalings(&points), points });
//! tl.moves.push(Span { start: 95.0, end: Some(103.5), label: "pg-2 -> node-b: completed".into() });
//! std::fs::write(dir.join("timeline.svg"), svg(&tl))?;
//! ```

use std::fmt::Write as _;

use super::svg::{esc, headroom, lines, num, Scale};

/// What the chart shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Timeline {
    pub vms: Vec<VmSeries>,
    /// The demo's phases, in order; the last may be open (`end: None`).
    pub phases: Vec<Span>,
    /// Live moves; one still under way at the end is open.
    pub moves: Vec<Span>,
    /// Other moments worth a labelled line (an order that failed, say).
    pub marks: Vec<Mark>,
}

/// One VM over time.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct VmSeries {
    pub id: String,
    pub points: Vec<VmPoint>,
    pub scalings: Vec<Scaling>,
}

/// One VM at one moment (seconds since the demo started); missing values
/// leave a gap.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct VmPoint {
    pub t: f64,
    pub vcpus: Option<f64>,
    /// Plugged memory.
    pub memory_mib: Option<f64>,
    /// Memory the guest uses.
    pub used_mib: Option<f64>,
    pub tps: Option<f64>,
}

/// A VM grew or shrank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Scaling {
    pub t: f64,
    pub resource: Resource,
    pub up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resource {
    Cpu,
    Memory,
}

/// A stretch of time with a name: a phase or a move.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Span {
    pub start: f64,
    /// `None`: until the chart's end.
    pub end: Option<f64>,
    pub label: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Mark {
    pub t: f64,
    pub label: String,
}

/// The scaling events in `points`: each change of vCPUs or plugged memory.
pub(super) fn scalings(points: &[VmPoint]) -> Vec<Scaling> {
    let mut out = Vec::new();
    let (mut cpu, mut mem): (Option<f64>, Option<f64>) = (None, None);
    for p in points {
        for (now, was, resource) in
            [(p.vcpus, &mut cpu, Resource::Cpu), (p.memory_mib, &mut mem, Resource::Memory)]
        {
            let Some(now) = now else { continue };
            if let Some(w) = *was {
                if now != w {
                    out.push(Scaling { t: p.t, resource, up: now > w });
                }
            }
            *was = Some(now);
        }
    }
    out
}

const W: f64 = 1000.0;
const LEFT: f64 = 70.0;
/// Room for the legend on the right.
const RIGHT: f64 = 180.0;
/// The title and the phase strip above the panels.
const TOP: f64 = 60.0;
const PHASE_Y: f64 = 30.0;
const PANEL_H: f64 = 150.0;
const GAP: f64 = 18.0;
const BOTTOM: f64 = 45.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#8c564b", "#e377c2"];
const MOVE_FILL: &str = "#9467bd";

/// What a panel draws of a point.
type Pick = fn(&VmPoint) -> Option<f64>;

/// One of the stacked panels.
struct Panel {
    title: &'static str,
    /// The value axis' label.
    axis: &'static str,
    /// The solid line per VM, and a dashed one where there is a second.
    main: Pick,
    second: Option<Pick>,
    /// Sizes hold until they change: drawn as steps, not slopes.
    step: bool,
    /// The scaling events marked at its foot.
    events: Option<Resource>,
}

const PANELS: [Panel; 3] = [
    Panel {
        title: "vCPUs",
        axis: "vCPUs",
        main: vcpus,
        second: None,
        step: true,
        events: Some(Resource::Cpu),
    },
    Panel {
        title: "memory",
        axis: "memory (MiB)",
        main: plugged,
        second: Some(used),
        step: true,
        events: Some(Resource::Memory),
    },
    Panel { title: "throughput", axis: "TPS", main: tps, second: None, step: false, events: None },
];

fn vcpus(p: &VmPoint) -> Option<f64> {
    p.vcpus
}
fn plugged(p: &VmPoint) -> Option<f64> {
    p.memory_mib
}
fn used(p: &VmPoint) -> Option<f64> {
    p.used_mib
}
fn tps(p: &VmPoint) -> Option<f64> {
    p.tps
}

/// The chart as an SVG document.
pub(super) fn svg(tl: &Timeline) -> String {
    let t_end = end_time(tl);
    let x = Scale { lo: 0.0, hi: t_end, px_lo: LEFT, px_hi: W - RIGHT };
    let panels_bottom = TOP + 3.0 * PANEL_H + 2.0 * GAP;
    let h = panels_bottom + BOTTOM;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">vmscale demo: vCPUs, memory and \
         throughput per VM over time</text>"
    );
    phases(&mut s, tl, x, panels_bottom);
    moves(&mut s, tl, x, panels_bottom);
    let mut top = TOP;
    for p in &PANELS {
        panel(&mut s, tl, x, top, p);
        if let Some(r) = p.events {
            ticks(&mut s, tl, x, top + PANEL_H, r);
        }
        top += PANEL_H + GAP;
    }
    marks(&mut s, tl, x, panels_bottom);
    move_labels(&mut s, tl, x);
    time_axis(&mut s, x, panels_bottom);
    legend(&mut s, tl);
    s.push_str("</svg>\n");
    s
}

/// The last moment anything happened, at least one second.
fn end_time(tl: &Timeline) -> f64 {
    let points = tl.vms.iter().flat_map(|v| v.points.iter().map(|p| p.t));
    let spans = tl.phases.iter().chain(&tl.moves).flat_map(|s| [Some(s.start), s.end]).flatten();
    let marks = tl.marks.iter().map(|m| m.t);
    points.chain(spans).chain(marks).fold(1.0, f64::max)
}

/// One panel: frame, value axis with grid, each VM's line(s).
fn panel(s: &mut String, tl: &Timeline, x: Scale, top: f64, p: &Panel) {
    let (main, second) = (p.main, p.second);
    let bottom = top + PANEL_H;
    let max = tl
        .vms
        .iter()
        .flat_map(|v| &v.points)
        .flat_map(|p| [main(p), second.and_then(|f| f(p))])
        .flatten()
        .fold(0.0, f64::max);
    let y = Scale { lo: 0.0, hi: headroom(max, 1.0), px_lo: bottom, px_hi: top };
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{}\" height=\"{PANEL_H}\" fill=\"none\" stroke=\"#888\"/>\n\
         <text x=\"{}\" y=\"{}\" font-weight=\"bold\">{}</text>\n\
         <text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        W - RIGHT - LEFT,
        LEFT + 4.0,
        top + 13.0,
        esc(p.title),
        top + PANEL_H / 2.0,
        esc(p.axis),
    );
    for v in y.ticks(4) {
        let py = y.at(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#eee\"/>\n\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 4.0,
            py + 4.0,
            num(v)
        );
    }
    let mut drawn = false;
    for (i, vm) in tl.vms.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<_> = vm.points.iter().map(|p| (p.t, main(p))).collect();
        drawn |= pts.iter().any(|p| p.1.is_some());
        lines(s, &pts, x, y, &format!("stroke=\"{c}\" stroke-width=\"2\""), p.step);
        if let Some(f) = second {
            let pts: Vec<_> = vm.points.iter().map(|p| (p.t, f(p))).collect();
            lines(
                s,
                &pts,
                x,
                y,
                &format!("stroke=\"{c}\" stroke-width=\"1.5\" stroke-dasharray=\"5,3\""),
                false,
            );
        }
    }
    if !drawn {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#888\">no {} measured</text>",
            (LEFT + W - RIGHT) / 2.0,
            top + PANEL_H / 2.0,
            esc(p.title)
        );
    }
}

/// The phases as alternating bands with their names above the panels, and
/// a faint line down at each phase's start.
fn phases(s: &mut String, tl: &Timeline, x: Scale, bottom: f64) {
    for (i, p) in tl.phases.iter().enumerate() {
        let (x0, x1) = (x.at(p.start), x.at(p.end.unwrap_or(x.hi)));
        let fill = if i % 2 == 0 { "#eef2f7" } else { "#dde4ee" };
        let room = ((x1 - x0) / 6.5).floor().max(0.0);
        // Whole characters that fit the band at about 6.5 px each.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let label = super::view::cut(&p.label, room as usize);
        let _ = writeln!(
            s,
            "<rect x=\"{x0:.1}\" y=\"{PHASE_Y}\" width=\"{:.1}\" height=\"18\" fill=\"{fill}\"/>\n\
             <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <line x1=\"{x0:.1}\" y1=\"{PHASE_Y}\" x2=\"{x0:.1}\" y2=\"{bottom}\" stroke=\"#ccc\"/>",
            (x1 - x0).max(0.0),
            (x0 + x1) / 2.0,
            PHASE_Y + 13.0,
            esc(&label)
        );
    }
}

/// Each move as a shaded band over all panels, its label at the top.
fn moves(s: &mut String, tl: &Timeline, x: Scale, bottom: f64) {
    for m in &tl.moves {
        let (x0, x1) = (x.at(m.start), x.at(m.end.unwrap_or(x.hi)));
        let _ = writeln!(
            s,
            "<rect class=\"move\" x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{MOVE_FILL}\" \
             fill-opacity=\"0.18\" stroke=\"{MOVE_FILL}\" stroke-opacity=\"0.5\"/>",
            (x1 - x0).max(2.0),
            bottom - TOP,
        );
    }
}

/// Each move's label, drawn over the lines on a pale ground so that it
/// stays readable, on the side of its band with more room.
fn move_labels(s: &mut String, tl: &Timeline, x: Scale) {
    for (i, m) in tl.moves.iter().enumerate() {
        let (x0, x1) = (x.at(m.start), x.at(m.end.unwrap_or(x.hi)));
        let text = format!("move: {}", m.label);
        // About 6.2 px a character at this font size.
        let w = 6.2 * f64::from(u16::try_from(text.chars().count()).unwrap_or(u16::MAX)) + 6.0;
        let y = TOP + 26.0 + 14.0 * f64::from(u8::try_from(i % 3).unwrap_or(0));
        let right = x0 > (LEFT + W - RIGHT) / 2.0;
        let (lx, bx, anchor) = if right { (x1 - 3.0, x1 - w, "end") } else { (x0 + 3.0, x0, "start") };
        let _ = writeln!(
            s,
            "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"14\" fill=\"white\" fill-opacity=\"0.8\"/>\n\
             <text x=\"{lx:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\" fill=\"{MOVE_FILL}\">{}</text>",
            y - 11.0,
            esc(&text)
        );
    }
}

/// Scaling events of `r` as triangles at a panel's foot: up or down, in
/// the VM's colour.
fn ticks(s: &mut String, tl: &Timeline, x: Scale, foot: f64, r: Resource) {
    for (i, vm) in tl.vms.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        for e in vm.scalings.iter().filter(|e| e.resource == r) {
            let px = x.at(e.t);
            let (d, what) = if e.up {
                (format!("M{:.1},{:.1} l-4,8 h8 z", px, foot - 10.0), "up")
            } else {
                (format!("M{:.1},{:.1} l-4,-8 h8 z", px, foot - 2.0), "down")
            };
            let _ = writeln!(
                s,
                "<path class=\"scale-{what}\" d=\"{d}\" fill=\"{c}\"><title>{} scaled {what}</title></path>",
                esc(&vm.id)
            );
        }
    }
}

fn marks(s: &mut String, tl: &Timeline, x: Scale, bottom: f64) {
    for (i, m) in tl.marks.iter().enumerate() {
        let px = x.at(m.t);
        let ly = TOP + 40.0 + 14.0 * f64::from(u8::try_from(i % 6).unwrap_or(0));
        let (lx, anchor) =
            if px > (LEFT + W - RIGHT) / 2.0 { (px - 3.0, "end") } else { (px + 3.0, "start") };
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{bottom}\" stroke=\"#555\" stroke-dasharray=\"4,3\"/>\n\
             <text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"{anchor}\" fill=\"#555\">{}</text>",
            esc(&m.label)
        );
    }
}

/// The shared time axis under the last panel, with grid lines up through
/// every panel.
fn time_axis(s: &mut String, x: Scale, bottom: f64) {
    for t in x.ticks(10) {
        let px = x.at(t);
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{bottom}\" stroke=\"#000\" stroke-opacity=\"0.06\"/>\n\
             <line x1=\"{px:.1}\" y1=\"{bottom}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#000\"/>\n\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            bottom + 5.0,
            bottom + 17.0,
            num(t)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time (s)</text>",
        (LEFT + W - RIGHT) / 2.0,
        bottom + 34.0
    );
}

/// What a legend row shows beside its text.
enum Swatch {
    Line { color: &'static str, dashed: bool },
    Up,
    Down,
    Band,
}

fn legend(s: &mut String, tl: &Timeline) {
    let lx = W - RIGHT + 15.0;
    let mut rows: Vec<(Swatch, &str)> = tl
        .vms
        .iter()
        .enumerate()
        .map(|(i, vm)| (Swatch::Line { color: COLORS[i % COLORS.len()], dashed: false }, vm.id.as_str()))
        .collect();
    rows.extend([
        (Swatch::Line { color: "#444", dashed: false }, "memory plugged"),
        (Swatch::Line { color: "#444", dashed: true }, "memory used"),
        (Swatch::Up, "scaled up"),
        (Swatch::Down, "scaled down"),
        (Swatch::Band, "live migration"),
    ]);
    let mut y = TOP + 10.0;
    for (swatch, text) in rows {
        let x2 = lx + 22.0;
        let _ = match swatch {
            Swatch::Line { color, dashed } => {
                let dash = if dashed { " stroke-dasharray=\"5,3\"" } else { "" };
                writeln!(s, "<line x1=\"{lx}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"{color}\" stroke-width=\"3\"{dash}/>")
            }
            Swatch::Up => writeln!(s, "<path d=\"M{:.1},{:.1} l-4,8 h8 z\" fill=\"#444\"/>", lx + 11.0, y - 4.0),
            Swatch::Down => writeln!(s, "<path d=\"M{:.1},{:.1} l-4,-8 h8 z\" fill=\"#444\"/>", lx + 11.0, y + 4.0),
            Swatch::Band => writeln!(
                s,
                "<rect x=\"{lx}\" y=\"{:.1}\" width=\"22\" height=\"10\" fill=\"{MOVE_FILL}\" fill-opacity=\"0.3\"/>",
                y - 5.0
            ),
        };
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>", lx + 28.0, y + 4.0, esc(text));
        y += 18.0;
    }
}
