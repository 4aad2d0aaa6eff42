//! What the current demo (a memory ramp and a CPU burst in the busy VM, the
//! idle VM moved) has seen as it runs: the live view's frames and the
//! timeline's series, from the agents' and the allocator's `/state` and the
//! busy VM's console. There is no pgbench here: TPS and latency stay "-".

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::ledger::{node_rows, order_changes};
use super::nodes::Setup;
use super::screen::Screen;
use super::timeline::{scalings, svg, Resource, Span, Timeline, VmPoint, VmSeries};
use super::view::{Frame, LastAction, VmRow};
use crate::cluster::{Vm, MIB};
use crate::echo::EchoClient;

/// The VMs the view shows, busy first.
const IDS: [&str; 2] = ["busy", "idle"];
/// Both VMs have two vCPUs from boot (sysfs mode: the reservation says how
/// much of them the VM may use).
const MAX_VCPUS: f64 = 2.0;
/// A frame in a log this often (on a terminal: every second, in place).
const LOG_EVERY: Duration = Duration::from_secs(2);

/// What the live view has seen so far.
pub(super) struct Live {
    pub t0: Instant,
    screen: Screen,
    /// Per VM (as [`IDS`]) one point a second.
    points: [Vec<VmPoint>; 2],
    /// The busy VM's use, from its ramp's lines.
    used_mib: f64,
    /// Whether the ramp was started.
    go: bool,
    /// Notable lines (the workload's, the allocator's orders), stamped.
    console: Vec<String>,
    phases: Vec<Span>,
    /// Orders as last seen: id -> state; each change is an event.
    orders: BTreeMap<u64, String>,
    /// Moves, the last of a VM open while its order runs.
    moves: Vec<(String, Span)>,
    /// Per VM its last action as last seen, and when it was first seen.
    actions: BTreeMap<String, (serde_json::Value, f64)>,
    /// A line every 100 ms to the idle VM and back, across its move.
    echo: Option<EchoClient>,
}

impl Live {
    pub fn new() -> Live {
        Live {
            t0: Instant::now(),
            screen: Screen::new(LOG_EVERY),
            points: [Vec::new(), Vec::new()],
            used_mib: 0.0,
            go: false,
            console: Vec::new(),
            phases: vec![Span { start: 0.0, end: None, label: "boot".into() }],
            orders: BTreeMap::new(),
            moves: Vec::new(),
            actions: BTreeMap::new(),
            echo: None,
        }
    }

    /// One second: read what changed, start what is due, show the view.
    pub fn tick(&mut self, dir: &Path, busy: &Vm, setup: &Setup) -> anyhow::Result<()> {
        let now = self.t0.elapsed().as_secs_f64();
        while let Ok((_, l)) = busy.qemu.console.try_recv() {
            self.used_mib = crate::console::value(&l, "used").unwrap_or(self.used_mib);
            if l.starts_with("demo: CPU burst over") {
                self.phase(now, "quiet");
            } else if l.starts_with("demo: CPU burst") {
                self.phase(now, "CPU burst");
            }
            if l.starts_with("demo:") || l.contains("Killed process") {
                self.console.push(format!("{now:5.1}s {l}"));
            }
        }
        let vms = setup.vms();
        let connected = |id: &str| vms.get(id).is_some_and(|v| v.1["informant_connected"] == true);
        if !self.go && IDS.iter().all(|id| connected(id)) {
            fs::write(dir.join("go"), "go\n")?;
            self.go = true;
            self.console.push(format!("{now:5.1}s demo: memory ramp started"));
            self.phase(now, "memory ramp");
        }
        if let (None, Setup::TwoNodes { echo: addr, .. }) = (&self.echo, setup) {
            if connected("idle") {
                if let Ok(c) = std::net::TcpStream::connect_timeout(addr, Duration::from_millis(500)) {
                    self.echo = EchoClient::start(c, Duration::from_millis(100)).ok();
                    if self.echo.is_some() {
                        self.console.push(format!("{now:5.1}s demo: echo client to idle ({addr}) started"));
                    }
                }
            }
        }
        let alloc = setup.allocator_state();
        for c in order_changes(alloc.as_ref(), &mut self.orders) {
            self.console.push(format!("{now:5.1}s allocator: {}", c.long));
            // The order's first sighting opens its move; its end closes it.
            let end = c.ended.then_some(now);
            let open = self.moves.iter_mut().rev().find(|(vm, m)| *vm == c.vm && m.end.is_none());
            match open {
                Some((_, m)) => (m.label, m.end) = (c.short, end),
                None => self.moves.push((c.vm, Span { start: now, end, label: c.short })),
            }
        }
        let rows = IDS.iter().enumerate().map(|(i, id)| self.vm_row(i, id, now, &vms)).collect();
        let frame = Frame {
            elapsed: self.t0.elapsed(),
            phase: self.phases.last().map(|p| p.label.clone()).unwrap_or_default(),
            nodes: alloc.as_ref().map(node_rows).unwrap_or_default(),
            vms: rows,
            events: self.console.clone(),
        };
        self.screen.show(&frame)?;
        Ok(())
    }

    /// A new phase from `now`; the one before ends there.
    fn phase(&mut self, now: f64, name: &str) {
        if let Some(p) = self.phases.last_mut() {
            p.end = Some(now);
        }
        self.phases.push(Span { start: now, end: None, label: name.into() });
    }

    /// The view's row of VM `i`, and its point for the timeline.
    fn vm_row(
        &mut self,
        i: usize,
        id: &str,
        now: f64,
        vms: &BTreeMap<String, (String, serde_json::Value)>,
    ) -> VmRow {
        let Some((node, v)) = vms.get(id) else {
            return VmRow { note: Some("no agent has it yet".into()), ..VmRow::new(id, None) };
        };
        let vcpus = v["current"]["milli_cpu"].as_u64().map(|m| m as f64 / 1000.0);
        let memory_mib = v["current"]["memory_bytes"].as_u64().map(|b| b / MIB);
        // The busy VM's use comes from its ramp; the idle one has none.
        let used_mib = (i == 0 && self.used_mib > 0.0).then_some(self.used_mib);
        self.points[i].push(VmPoint {
            t: now,
            vcpus,
            memory_mib: memory_mib.map(|m| m as f64),
            used_mib,
            tps: None,
        });
        // /state says what the last action was, not when: it is dated by
        // when this view first saw it.
        let key = serde_json::json!([v["last_action"], v["last_action_ms"]]);
        let seen = self.actions.entry(id.to_owned()).or_insert((serde_json::Value::Null, now));
        if seen.0 != key {
            *seen = (key, now);
        }
        let last_action = v["last_action"].as_str().map(|name| LastAction {
            name: name.to_owned(),
            took_ms: v["last_action_ms"].as_u64(),
            age: Some(Duration::from_secs_f64((now - seen.1).max(0.0))),
        });
        VmRow {
            vcpus,
            max_vcpus: Some(MAX_VCPUS),
            memory_mib,
            used_mib: used_mib.map(whole_mib),
            pressure_events: v["pressure_events"].as_u64().unwrap_or(0),
            last_action,
            moving: v["migration"].as_str().map(str::to_owned),
            note: (v["informant_connected"] != true).then(|| "informant not yet connected".into()),
            ..VmRow::new(id, Some(node))
        }
    }

    /// Stops everything, writes the timeline and says what happened.
    pub fn finish(self, dir: &Path, setup: Setup, busy: Vm) -> anyhow::Result<()> {
        let moved = self.moves.iter().filter(|(_, m)| m.label.ends_with(": completed")).count();
        let echo = match self.echo.map(|e| e.finish(Duration::from_secs(2))) {
            Some(Ok(r)) => format!(
                " The echo client to the idle VM: {} lines sent, {} lost, longest gap {:.0} ms.",
                r.sent, r.lost, r.max_gap_ms
            ),
            Some(Err(e)) => format!(" The echo client to the idle VM failed: {e:#}."),
            None => String::new(),
        };
        drop(setup);
        drop(busy);
        let [busy_points, idle_points] = self.points;
        let vms: Vec<VmSeries> = [("busy", busy_points), ("idle", idle_points)]
            .into_iter()
            .map(|(id, points)| VmSeries { id: id.into(), scalings: scalings(&points), points })
            .collect();
        let upscales = vms[0].scalings.iter().filter(|s| s.resource == Resource::Memory && s.up).count();
        let tl = Timeline {
            vms,
            phases: self.phases,
            moves: self.moves.into_iter().map(|(_, m)| m).collect(),
            marks: Vec::new(),
        };
        let path = dir.join("timeline.svg");
        fs::write(&path, svg(&tl))?;
        println!(
            "demo stopped after {:.0} s; everything it started is stopped. {upscales} memory upscales of the busy VM, \
             {moved} live migration(s); timeline: {}.{echo}",
            self.t0.elapsed().as_secs_f64(),
            path.display()
        );
        Ok(())
    }
}

/// Whole MiB for the view: the ramp reports fractions.
fn whole_mib(m: f64) -> u64 {
    // Rounded, non-negative, and far below 2^64 MiB.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let w = m.max(0.0).round() as u64;
    w
}
