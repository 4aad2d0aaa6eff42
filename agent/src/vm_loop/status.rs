//! What one VM's loop shows of itself: its entry in the node's status map
//! (the state dump), its metrics, its registration (the source of each hello
//! to the allocator) and, on Kubernetes, its pod's status.

use super::exec::Done;
use super::LoopContext;
use crate::core::policy::Size;
use crate::core::pressure::PressureKind;
use crate::core::vm::{UpscaleTimes, VmCore};
use crate::links::allocator::Registered;
use crate::metrics::{OpLabels, SizeLabels, StageLabel, VmLabel};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vmscale_common::sync::lock;

/// What the state dump shows of one VM.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmStatus {
    pub current: Size,
    pub permitted: Size,
    pub desired_cus: u32,
    pub last_action: Option<String>,
    pub last_action_ms: Option<u64>,
    pub last_error: Option<String>,
    pub pressure_events: u64,
    /// The same by kind (`psi_cpu`, ..., `unknown` for every kind this agent
    /// does not know): which signals drove the VM.
    pub pressure_kinds: BTreeMap<String, u64>,
    pub informant_connected: bool,
    pub allocator_connected: bool,
    pub stuck: bool,
    /// A live migration under way, e.g. `to node-b (order 7): migrating`.
    pub migration: Option<String>,
    /// Guest kernel settings that make scaling worse, as the informant
    /// named them at its last handshake (e.g. memmap_on_memory off).
    pub guest_notes: Vec<String>,
}

pub type StatusMap = Arc<Mutex<BTreeMap<String, VmStatus>>>;

/// The registration the allocator hears of at each hello and `AddVm`.
pub fn registered(core: &VmCore) -> Registered {
    Registered {
        current: core.current,
        permitted: core.permitted,
        cu: core.cu,
        min_cus: core.min_cus,
        max_cus: core.max_cus,
    }
}

/// A pressure event, counted in either mode so that a comparison shows what
/// polling missed.
pub fn count_pressure(ctx: &LoopContext, vm: &str, kind: PressureKind) {
    ctx.metrics.pressure_events.get_or_create(&VmLabel { vm: vm.to_owned() }).inc();
    let mut st = lock(&ctx.status);
    let e = st.entry(vm.to_owned()).or_default();
    e.pressure_events += 1;
    *e.pressure_kinds.entry(kind.name().to_owned()).or_default() += 1;
}

/// One finished action, in the metrics and the state dump.
pub fn record_action(ctx: &LoopContext, vm: &str, done: &Done) {
    let outcome = if done.error.is_some() { "error" } else { "ok" };
    let l = OpLabels { action: done.action.name(), outcome };
    ctx.metrics.ops.get_or_create(&l).inc();
    ctx.metrics.op_seconds.get_or_create(&l).observe(done.took.as_secs_f64());
    let mut st = lock(&ctx.status);
    let e = st.entry(vm.to_owned()).or_default();
    e.last_action = Some(done.action.name().to_owned());
    e.last_action_ms = Some(u64::try_from(done.took.as_millis()).unwrap_or(u64::MAX));
    if let Some(err) = &done.error {
        e.last_error = Some(err.clone());
    }
}

/// The stage times of a finished upscale.
pub fn record_upscale(ctx: &LoopContext, t: UpscaleTimes) {
    for (stage, v) in
        [("to_permit", t.to_permit_ms), ("to_plug", t.to_plug_ms), ("to_confirm", t.to_confirm_ms)]
    {
        if let Some(ms) = v {
            ctx.metrics.upscale_seconds.get_or_create(&StageLabel { stage }).observe(ms as f64 / 1000.0);
        }
    }
}

/// The VM's sizes and links in the metrics, the state dump and the registry.
pub fn show(ctx: &LoopContext, vm: &str, core: &VmCore, now: u64, guest_notes: &[String]) {
    let goal = core.goal_cus(now);
    let desired = Size::of_cus(goal, core.cu);
    let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for (size, s) in [("current", core.current), ("desired", desired), ("permitted", core.permitted)] {
        let l = SizeLabels { vm: vm.to_owned(), size };
        ctx.metrics.milli_cpu.get_or_create(&l).set(g(s.milli_cpu));
        ctx.metrics.memory_bytes.get_or_create(&l).set(g(s.memory_bytes));
    }
    ctx.metrics.stuck.get_or_create(&VmLabel { vm: vm.to_owned() }).set(i64::from(core.is_stuck()));
    {
        let mut st = lock(&ctx.status);
        let e = st.entry(vm.to_owned()).or_default();
        e.current = core.current;
        e.permitted = core.permitted;
        e.desired_cus = goal;
        e.stuck = core.is_stuck();
        e.informant_connected = core.informant_up;
        e.allocator_connected = core.allocator_up;
        if e.guest_notes != guest_notes {
            e.guest_notes = guest_notes.to_vec();
        }
    }
    ctx.registry.set(vm, registered(core));
}

/// The sizes last written to the VM's pod: a pod's status is written when
/// they change, not at every turn of the loop.
#[derive(Debug, Default)]
pub struct PodReport {
    last: Option<(Size, Size)>,
}

impl PodReport {
    /// Whether `(current, permitted)` differ from the last ones reported;
    /// they count as reported from here on.
    pub fn changed(&mut self, current: Size, permitted: Size) -> bool {
        let now = Some((current, permitted));
        let changed = self.last != now;
        self.last = now;
        changed
    }

    /// Writes the VM's sizes to its pod when they changed (Kubernetes only).
    pub fn report(&mut self, ctx: &LoopContext, vm: &str, core: &VmCore) {
        let Some(r) = &ctx.reporter else { return };
        if self.changed(core.current, core.permitted) {
            let status = crate::vms::kube::status::VmStatus {
                current: core.current,
                approved: core.permitted,
                at: std::time::SystemTime::now(),
            };
            r.report(vm, status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_hears_of_changed_sizes_only() {
        let mut r = PodReport::default();
        let (a, b) = (Size::new(1000, 1 << 30), Size::new(2000, 2 << 30));
        assert!(r.changed(a, a), "the first report");
        assert!(!r.changed(a, a));
        assert!(r.changed(a, b), "a new permit");
        assert!(r.changed(b, b), "a new size");
        assert!(!r.changed(b, b));
    }
}
