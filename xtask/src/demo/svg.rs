//! Small SVG pieces for the timeline: a linear scale with round ticks,
//! lines with gaps, and text escaping.

use std::fmt::Write as _;

/// Maps a value range onto a pixel range.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scale {
    pub lo: f64,
    pub hi: f64,
    pub px_lo: f64,
    pub px_hi: f64,
}

impl Scale {
    pub fn at(&self, v: f64) -> f64 {
        let span = if self.hi > self.lo { self.hi - self.lo } else { 1.0 };
        self.px_lo + (v - self.lo) / span * (self.px_hi - self.px_lo)
    }

    /// Round values from `lo` to `hi`, about `n` of them, one step apart
    /// (1, 2 or 5 times a power of ten).
    pub fn ticks(&self, n: u32) -> Vec<f64> {
        let span = (self.hi - self.lo).max(f64::MIN_POSITIVE);
        let raw = span / f64::from(n.max(1));
        let mag = 10f64.powf(raw.log10().floor());
        let step =
            [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(mag * 10.0);
        let first = (self.lo / step).ceil();
        let mut out = Vec::new();
        let mut k = first;
        while k * step <= self.hi + step * 1e-9 && out.len() < 100 {
            out.push(k * step);
            k += 1.0;
        }
        out
    }
}

/// The top of a value axis: `max` with room above it, at least `floor`.
pub(super) fn headroom(max: f64, floor: f64) -> f64 {
    (max * 1.1).max(floor)
}

/// A tick label: no decimals where none are needed.
pub(super) fn num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// `points` as polylines, broken where a value is missing; `step` draws a
/// staircase (a size holds until it changes) instead of slopes.
pub(super) fn lines(
    out: &mut String,
    points: &[(f64, Option<f64>)],
    x: Scale,
    y: Scale,
    style: &str,
    step: bool,
) {
    let mut run: Vec<String> = Vec::new();
    let mut last_y: Option<f64> = None;
    let flush = |run: &mut Vec<String>, out: &mut String| {
        if run.len() > 1 {
            let _ = writeln!(out, "<polyline fill=\"none\" {style} points=\"{}\"/>", run.join(" "));
        }
        run.clear();
    };
    for &(t, v) in points {
        match v {
            Some(v) => {
                let (px, py) = (x.at(t), y.at(v));
                if step {
                    if let Some(ly) = last_y {
                        run.push(format!("{px:.1},{ly:.1}"));
                    }
                }
                run.push(format!("{px:.1},{py:.1}"));
                last_y = Some(py);
            }
            None => {
                flush(&mut run, out);
                last_y = None;
            }
        }
    }
    flush(&mut run, out);
}

/// `s` safe inside an SVG text node or attribute.
pub(super) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            c if c.is_control() => o.push(' '),
            c => o.push(c),
        }
    }
    o
}
