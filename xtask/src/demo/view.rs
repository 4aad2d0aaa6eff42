//! The live view: one [`Frame`] (what the demo knows at one moment) drawn
//! as a whole screen by [`render`], pure; `screen.rs` puts it on the
//! terminal in place, like `top`, or as separated frames in a log.
//!
//! ```ignore
//! let frame = Frame {
//!     elapsed: Duration::from_secs(83),
//!     phase: "rising clients: 8".into(),
//!     nodes: ledger::node_rows(&allocator_state),
//!     vms: vec![VmRow { tps: Some(812.5), latency_ms: Some(9.8), ..VmRow::new("pg-1", Some("node-a")) }],
//!     events: vec!["12.0 s pg-1: upscale to 2 vCPUs".into()],
//! };
//! screen.show(&frame)?;   // or render(&frame) for the text
//! ```

use std::fmt::Write as _;
use std::time::Duration;

/// What the view shows at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Frame {
    /// Since the demo started.
    pub elapsed: Duration,
    /// The phase under way ("warm-up", "rising clients: 8", "migration").
    pub phase: String,
    pub nodes: Vec<NodeRow>,
    pub vms: Vec<VmRow>,
    /// Notable moments, oldest first; the view shows the last [`EVENTS`].
    pub events: Vec<String>,
}

/// A node's ledger, as the allocator keeps it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct NodeRow {
    pub name: String,
    pub reserved_mib: u64,
    /// Capacity less the system reserve.
    pub usable_mib: u64,
    /// Where the allocator starts moving VMs away.
    pub watermark_mib: u64,
    pub reserved_vcpus: f64,
    pub usable_vcpus: f64,
    /// Its VMs, with their state where not plain active ("idle (incoming)").
    pub vms: Vec<String>,
}

/// One VM. Every figure is optional: "-" is shown for what is not known
/// (yet), such as TPS where nothing runs pgbench against the VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct VmRow {
    pub id: String,
    /// The node whose agent runs it; `None` while no agent has it.
    pub node: Option<String>,
    /// vCPUs online (or reserved, as the agent counts them) and the most
    /// it may have.
    pub vcpus: Option<f64>,
    pub max_vcpus: Option<f64>,
    /// Memory plugged (boot memory included).
    pub memory_mib: Option<u64>,
    /// Memory the guest uses.
    pub used_mib: Option<u64>,
    /// CPU use of its online vCPUs, in percent.
    pub cpu_pct: Option<f64>,
    pub tps: Option<f64>,
    pub latency_ms: Option<f64>,
    pub pressure_events: u64,
    pub last_action: Option<LastAction>,
    /// A move under way ("to node-b (order 7): migrating").
    pub moving: Option<String>,
    /// Anything else worth a line ("informant not yet connected").
    pub note: Option<String>,
}

impl VmRow {
    pub fn new(id: &str, node: Option<&str>) -> VmRow {
        VmRow { id: id.into(), node: node.map(Into::into), ..VmRow::default() }
    }
}

/// The last scaling action the agent finished for a VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct LastAction {
    /// "upscale", "downscale", ...
    pub name: String,
    /// How long it took.
    pub took_ms: Option<u64>,
    /// How long ago it finished.
    pub age: Option<Duration>,
}

/// Events shown under the tables.
pub(super) const EVENTS: usize = 6;

/// Column widths: names are cut to fit, numbers right-aligned.
const NODE_W: usize = 10;
const VM_W: usize = 10;
const ON_W: usize = 10;

/// The whole screen for `f`: a header, the nodes' ledgers, the VMs, the
/// latest events. Lines end with `\n`; none carries trailing blanks.
pub(super) fn render(f: &Frame) -> String {
    let mut out = String::new();
    let secs = f.elapsed.as_secs();
    let phase = if f.phase.is_empty() { "-" } else { &f.phase };
    line(&mut out, format!("vmscale demo   {}:{:02} elapsed   phase: {phase}", secs / 60, secs % 60));
    line(&mut out, String::new());
    line(
        &mut out,
        format!("{:<NODE_W$} {:>15} {:>9} {:>11}  VMS", "NODE", "RESERVED/USABLE", "WATERMARK", "vCPUs"),
    );
    for n in &f.nodes {
        let vms = if n.vms.is_empty() { "-".to_owned() } else { n.vms.join(", ") };
        line(
            &mut out,
            format!(
                "{:<NODE_W$} {:>15} {:>9} {:>11}  {vms}",
                cut(&n.name, NODE_W),
                format!("{}/{} MiB", n.reserved_mib, n.usable_mib),
                format!("{} MiB", n.watermark_mib),
                format!("{:.2}/{:.2}", n.reserved_vcpus, n.usable_vcpus),
            ),
        );
    }
    if f.nodes.is_empty() {
        line(&mut out, "(the allocator has not answered yet)".into());
    }
    line(&mut out, String::new());
    line(
        &mut out,
        format!(
            "{:<VM_W$} {:<ON_W$} {:>9} {:>7} {:>8} {:>4} {:>4} {:>8} {:>7} {:>5}  LAST ACTION",
            "VM", "NODE", "vCPUs", "MEM MiB", "USED MiB", "USE%", "CPU%", "TPS", "LAT ms", "PRESS"
        ),
    );
    for v in &f.vms {
        vm_lines(&mut out, v);
    }
    if !f.events.is_empty() {
        line(&mut out, String::new());
        for e in &f.events[f.events.len().saturating_sub(EVENTS)..] {
            line(&mut out, format!("  {e}"));
        }
    }
    out
}

fn vm_lines(out: &mut String, v: &VmRow) {
    let vcpus = match (v.vcpus, v.max_vcpus) {
        (None, None) => "-".to_owned(),
        (c, m) => format!("{}/{}", opt(c, cpus), opt(m, cpus)),
    };
    let use_pct = match (v.used_mib, v.memory_mib) {
        (Some(u), Some(m)) if m > 0 => Some(u as f64 * 100.0 / m as f64),
        _ => None,
    };
    let last = v.last_action.as_ref().map_or("-".to_owned(), |a| {
        let mut s = a.name.clone();
        if let Some(ms) = a.took_ms {
            let _ = write!(s, " ({ms} ms)");
        }
        if let Some(age) = a.age {
            let _ = write!(s, ", {} ago", short_duration(age));
        }
        s
    });
    line(
        out,
        format!(
            "{:<VM_W$} {:<ON_W$} {vcpus:>9} {:>7} {:>8} {:>4} {:>4} {:>8} {:>7} {:>5}  {last}",
            cut(&v.id, VM_W),
            cut(v.node.as_deref().unwrap_or("-"), ON_W),
            opt(v.memory_mib, |m| m.to_string()),
            opt(v.used_mib, |m| m.to_string()),
            opt(use_pct, |p| format!("{p:.0}")),
            opt(v.cpu_pct, |p| format!("{p:.0}")),
            opt(v.tps, |t| format!("{t:.1}")),
            opt(v.latency_ms, |l| format!("{l:.1}")),
            v.pressure_events,
        ),
    );
    for extra in [v.moving.as_ref().map(|m| format!("moving {m}")), v.note.clone()].into_iter().flatten() {
        line(out, format!("{:VM_W$} `- {extra}", ""));
    }
}

/// Appends `l` without trailing blanks: a redraw in place clears the rest.
fn line(out: &mut String, l: String) {
    out.push_str(l.trim_end());
    out.push('\n');
}

/// `v` shown by `f`, or "-".
fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

/// vCPUs: whole numbers plain ("2"), fractions of a reservation with two
/// places ("1.25").
fn cpus(c: f64) -> String {
    if c.fract() == 0.0 {
        format!("{c:.0}")
    } else {
        format!("{c:.2}")
    }
}

/// "850 ms", "12 s", "3m05s".
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        format!("{} ms", d.as_millis())
    } else if s < 120 {
        format!("{s} s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// `s` in at most `w` characters, a cut marked with `~` (one column wide
/// in every terminal and log).
pub(super) fn cut(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.to_owned();
    }
    let mut c: String = s.chars().take(w.saturating_sub(1)).collect();
    c.push('~');
    c
}
