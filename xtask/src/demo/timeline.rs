//! The timeline chart written when the demo stops (SVG).

use std::fmt::Write as _;

/// One second of the live view, for the timeline.
#[derive(Debug, Clone, Default)]
pub(super) struct Point {
    pub t: f64,
    pub memory_mib: [f64; 2],
    pub used_mib: f64,
    pub pressure: [u64; 2],
}

/// The busy VM's use against both VMs' allocation, pressure events marked.
pub(super) fn timeline(points: &[Point], events: &[(f64, String)]) -> String {
    let (w, h, pad) = (900.0, 400.0, 50.0);
    let t_max = points.last().map_or(1.0, |p| p.t).max(1.0);
    let m_max =
        points.iter().flat_map(|p| [p.memory_mib[0], p.memory_mib[1], p.used_mib]).fold(1.0, f64::max) * 1.1;
    let x = |t: f64| pad + t / t_max * (w - 2.0 * pad);
    let y = |m: f64| h - pad - m / m_max * (h - 2.0 * pad);
    let line = |f: &dyn Fn(&Point) -> f64, color: &str| {
        let pts: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", x(p.t), y(f(p)))).collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        )
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\">vmscale demo: memory (MiB) over time (s); red ticks: pressure events (busy VM); purple: live migration</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"5\" y=\"{}\">{m_max:.0}</text><text x=\"{}\" y=\"{}\">{t_max:.0} s</text>\n",
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        pad + 4.0,
        w - pad - 20.0,
        h - pad + 16.0
    );
    s.push_str(&line(&|p| p.memory_mib[0], "#1f77b4"));
    s.push_str(&line(&|p| p.used_mib, "#ff7f0e"));
    s.push_str(&line(&|p| p.memory_mib[1], "#2ca02c"));
    for w2 in points.windows(2) {
        if w2[1].pressure[0] > w2[0].pressure[0] {
            let px = x(w2[1].t);
            let _ = writeln!(
                s,
                "<line x1=\"{px:.1}\" y1=\"{}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"red\"/>",
                h - pad,
                h - pad - 12.0
            );
        }
    }
    // Migration orders: a dashed line and a label at each change, the
    // label on the side of the line with more room, below the legend.
    for (i, (t, what)) in events.iter().enumerate() {
        let px = x(*t);
        let ly = pad + 40.0 + 14.0 * (i % 6) as f64;
        let (lx, anchor) = if px > w / 2.0 { (px - 3.0, "end") } else { (px + 3.0, "start") };
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{pad}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#9467bd\" stroke-dasharray=\"4,3\"/>\n\
             <text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"{anchor}\" fill=\"#9467bd\">{}</text>",
            h - pad,
            xml(what)
        );
    }
    let legend = [("#1f77b4", "busy: allocated"), ("#ff7f0e", "busy: used"), ("#2ca02c", "idle: allocated")];
    for (i, (c, l)) in legend.iter().enumerate() {
        let ly = 40.0 + 16.0 * i as f64;
        let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\" fill=\"{c}\">{l}</text>", w - 200.0);
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
