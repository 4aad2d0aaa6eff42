//! What the demo sees as it runs, once a second: the agents' `/state` (each
//! VM's size, last action, a move), the allocator's (ledgers, orders), the
//! guests' own view (`probe.rs`) and pgbench's samples; turned into the live
//! view's frames, the timeline's series and the figures per phase that the
//! closing summary prints.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use vmscale_allocator::core::migration::OrderState;
use vmscale_allocator::core::Cluster;

use super::ledger::{node_rows, order_changes};
use super::nodes::{Setup, PG1};
use super::probe::{used_mib, GuestProbe};
use super::screen::Screen;
use super::summary::{Move, PhaseStats};
use super::timeline::{Span, VmPoint};
use super::view::{Frame, LastAction, VmRow};
use crate::cluster::MIB;
use crate::pgbench::Sample;

/// A frame in a log this often (on a terminal: every second, in place).
const LOG_EVERY: Duration = Duration::from_secs(2);
/// A pgbench sample older than this is not "now" any more.
const FRESH_S: f64 = 3.0;

/// One VM as last seen.
#[derive(Default)]
struct Seen {
    node: Option<String>,
    vcpus: Option<f64>,
    memory_mib: Option<u64>,
    informant: bool,
    /// Its last action and when this view first saw it.
    action: (serde_json::Value, f64),
    /// The guest's ready line, once seen.
    ready: Option<String>,
}

/// What the demo has seen so far.
pub(super) struct Live {
    pub t0: Instant,
    t0_wall: SystemTime,
    screen: Screen,
    /// Per VM (in the setup's order): its points, its probe, what was seen.
    ids: Vec<String>,
    points: BTreeMap<String, Vec<VmPoint>>,
    pub probes: BTreeMap<String, GuestProbe>,
    seen: BTreeMap<String, Seen>,
    pub events: Vec<String>,
    pub phases: Vec<Span>,
    pub stats: Vec<PhaseStats>,
    /// Orders as last seen: id -> state; each change is an event.
    orders: BTreeMap<u64, String>,
    /// Moves for the timeline, the last of a VM open while its order runs.
    pub spans: Vec<(String, Span)>,
    /// Orders that completed.
    pub moved: Vec<Move>,
    /// The allocator's latest state.
    pub ledger: Option<Cluster>,
}

impl Live {
    pub fn new(setup: &Setup) -> Live {
        let ids: Vec<String> = setup.vms.iter().map(|v| v.plan.id.clone()).collect();
        let probes = setup.vms.iter().map(|v| (v.plan.id.clone(), GuestProbe::new(v.conn.clone()))).collect();
        let mut live = Live {
            t0: Instant::now(),
            t0_wall: SystemTime::now(),
            screen: Screen::new(LOG_EVERY),
            points: ids.iter().map(|id| (id.clone(), Vec::new())).collect(),
            seen: ids.iter().map(|id| (id.clone(), Seen::default())).collect(),
            ids,
            probes,
            events: Vec::new(),
            phases: Vec::new(),
            stats: Vec::new(),
            orders: BTreeMap::new(),
            spans: Vec::new(),
            moved: Vec::new(),
            ledger: None,
        };
        live.phase("boot");
        live
    }

    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// A note in the view's event list, stamped.
    pub fn event(&mut self, text: impl AsRef<str>) {
        let line = format!("{:5.1}s {}", self.now(), text.as_ref());
        self.events.push(line);
    }

    /// A new phase from now; the one before ends here.
    pub fn phase(&mut self, name: &str) {
        let now = self.now();
        if let Some(p) = self.phases.last_mut() {
            p.end = Some(now);
        }
        if let Some(s) = self.stats.last_mut() {
            s.end = now;
        }
        self.phases.push(Span { start: now, end: None, label: name.into() });
        self.stats.push(PhaseStats::new(name, now));
        self.event(format!("phase: {name}"));
    }

    pub fn phase_name(&self) -> String {
        self.phases.last().map(|p| p.label.clone()).unwrap_or_default()
    }

    /// The guest's ready line, once its console has shown it.
    pub fn ready(&self, id: &str) -> Option<&str> {
        self.seen.get(id)?.ready.as_deref()
    }

    pub fn informant_connected(&self, id: &str) -> bool {
        self.seen.get(id).is_some_and(|s| s.informant)
    }

    /// vCPUs and memory as the agent has them now.
    pub fn size(&self, id: &str) -> (Option<f64>, Option<u64>) {
        self.seen.get(id).map_or((None, None), |s| (s.vcpus, s.memory_mib))
    }

    /// VMs under an order that has not ended, or moved: their first QEMU
    /// may quit.
    pub fn moving(&self) -> Vec<String> {
        self.spans.iter().map(|(vm, _)| vm.clone()).collect()
    }

    /// One second: read what changed and show the view. `bench` gives the
    /// newest pgbench sample against a VM, if one runs.
    pub fn tick(&mut self, setup: &Setup, bench: &dyn Fn(&str) -> Option<Sample>) -> anyhow::Result<()> {
        let now = self.now();
        for v in &setup.vms {
            let s = self.seen.entry(v.plan.id.clone()).or_default();
            if s.ready.is_none() {
                s.ready = v
                    .qemu
                    .console()
                    .lines()
                    .find(|l| l.contains(crate::debian::READY_PREFIX))
                    .map(str::to_owned);
                if let Some(r) = s.ready.clone() {
                    self.event(format!("{}: {r}", v.plan.id));
                }
            }
        }
        let ready: Vec<String> = self.ids.iter().filter(|id| self.ready(id).is_some()).cloned().collect();
        for id in &ready {
            if let Some(p) = self.probes.get_mut(id) {
                p.poll();
            }
        }
        let agents = setup.agent_vms();
        // The last answer stays: on Ctrl-C the allocator stops first, and the
        // summary wants its ledger.
        if let Some(s) = setup.allocator_state() {
            self.ledger = Some(s);
        }
        self.orders_seen(now);
        let mut rows = Vec::new();
        for id in self.ids.clone() {
            let latest = bench(&id).filter(|s| now - s.secs_after(self.t0_wall) <= FRESH_S);
            let max = setup.vm(&id).map(|v| f64::from(v.plan.max_cpus));
            rows.push(VmRow { max_vcpus: max, ..self.vm_row(&id, now, agents.get(&id), latest) });
        }
        let frame = Frame {
            elapsed: self.t0.elapsed(),
            phase: self.phase_name(),
            nodes: self.ledger.as_ref().map(node_rows).unwrap_or_default(),
            vms: rows,
            events: self.events.clone(),
        };
        self.screen.show(&frame)?;
        Ok(())
    }

    /// Order changes become events and move spans; completed ones moves.
    fn orders_seen(&mut self, now: f64) {
        for c in order_changes(self.ledger.as_ref(), &mut self.orders) {
            self.events.push(format!("{now:5.1}s allocator: {}", c.long));
            let end = c.ended.then_some(now);
            let open = self.spans.iter_mut().rev().find(|(vm, m)| *vm == c.vm && m.end.is_none());
            match open {
                Some((_, m)) => (m.label, m.end) = (c.short, end),
                None => self.spans.push((c.vm, Span { start: now, end, label: c.short })),
            }
        }
        let Some(s) = &self.ledger else { return };
        for o in s.orders.values().chain(&s.finished_orders) {
            if o.state != OrderState::Completed || self.moved.iter().any(|m| m.order == o.id) {
                continue;
            }
            let start = self.spans.iter().rev().find(|(vm, _)| *vm == o.vm).map_or(now, |(_, m)| m.start);
            self.moved.push(Move {
                order: o.id,
                vm: o.vm.clone(),
                from: o.source.clone(),
                to: o.target.clone(),
                start,
                end: now,
            });
        }
    }

    /// The view's row of `id`, its timeline point and the phase's figures.
    fn vm_row(
        &mut self,
        id: &str,
        now: f64,
        agent: Option<&(String, serde_json::Value)>,
        bench: Option<Sample>,
    ) -> VmRow {
        let probe = self.probes.get(id);
        let guest = probe.and_then(|p| p.latest);
        let probe_error = probe.and_then(|p| p.error.clone());
        let used = guest.as_ref().map(used_mib);
        let seen = self.seen.entry(id.to_owned()).or_default();
        let Some((node, v)) = agent else {
            return VmRow { note: Some("no agent has it yet".into()), ..VmRow::new(id, None) };
        };
        let vcpus = v["current"]["milli_cpu"].as_u64().map(|m| m as f64 / 1000.0);
        let memory_mib = v["current"]["memory_bytes"].as_u64().map(|b| b / MIB);
        let mut changes = Vec::new();
        if seen.vcpus.is_some() && vcpus.is_some() && seen.vcpus != vcpus {
            changes.push(format!("vCPUs {} -> {}", cpus(seen.vcpus), cpus(vcpus)));
        }
        if seen.memory_mib.is_some() && memory_mib.is_some() && seen.memory_mib != memory_mib {
            changes.push(format!(
                "memory {} -> {} MiB",
                seen.memory_mib.unwrap_or(0),
                memory_mib.unwrap_or(0)
            ));
        }
        if seen.node.as_deref().is_some_and(|n| n != node) {
            changes.push(format!("now on {node}"));
        }
        (seen.node, seen.vcpus, seen.memory_mib) = (Some(node.clone()), vcpus, memory_mib);
        seen.informant = v["informant_connected"] == true;
        // /state says what the last action was, not when: it is dated by
        // when this view first saw it.
        let key = serde_json::json!([v["last_action"], v["last_action_ms"]]);
        if seen.action.0 != key {
            seen.action = (key, now);
        }
        let age = Duration::from_secs_f64((now - seen.action.1).max(0.0));
        let informant = seen.informant;
        let ready = seen.ready.is_some();
        if !changes.is_empty() {
            self.event(format!("{id}: {}", changes.join(", ")));
        }
        let point = VmPoint {
            t: now,
            vcpus,
            memory_mib: memory_mib.map(|m| m as f64),
            used_mib: used.map(|u| u as f64),
            tps: bench.map(|s| s.tps),
        };
        if let Some(p) = self.points.get_mut(id) {
            p.push(point);
        }
        if id == PG1 {
            if let Some(s) = self.stats.last_mut() {
                s.add(&point);
            }
        }
        let note = if !ready {
            Some("booting: Postgres and the informant not up yet".to_owned())
        } else if !informant {
            Some("informant not yet connected".to_owned())
        } else if v["stuck"] == true {
            Some(format!("stuck: {}", v["last_error"].as_str().unwrap_or("?")))
        } else {
            probe_error.map(|e| format!("guest probe: {}", super::view::cut(&e, 60)))
        };
        VmRow {
            vcpus,
            memory_mib,
            used_mib: used,
            tps: bench.map(|s| s.tps),
            latency_ms: bench.and_then(|s| s.latency_ms),
            pressure_events: v["pressure_events"].as_u64().unwrap_or(0),
            last_action: v["last_action"].as_str().map(|name| LastAction {
                name: name.to_owned(),
                took_ms: v["last_action_ms"].as_u64(),
                age: Some(age),
            }),
            moving: v["migration"].as_str().map(str::to_owned),
            note,
            ..VmRow::new(id, Some(node))
        }
    }

    /// The timeline's series, per VM in the setup's order.
    pub fn series(&self) -> Vec<(String, Vec<VmPoint>)> {
        self.ids.iter().map(|id| (id.clone(), self.points.get(id).cloned().unwrap_or_default())).collect()
    }
}

/// "1.25", "2", or "?".
fn cpus(c: Option<f64>) -> String {
    c.map_or("?".into(), |c| if c.fract() == 0.0 { format!("{c:.0}") } else { format!("{c:.2}") })
}
