//! What the live view and the timeline say about nodes and migration
//! orders, from the allocator's `/state`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use vmscale_allocator::core::vm::VmState;
use vmscale_allocator::core::Cluster;

use crate::cluster::MIB;

/// A new or changed migration order, as the view and the timeline say it.
pub(super) struct OrderChange {
    /// "order 7 idle node-a -> node-b: started (node node-a above its watermark)"
    pub long: String,
    /// "idle -> node-b: started"
    pub short: String,
}

/// New or changed orders in the allocator's state.
pub(super) fn order_changes(state: Option<&Cluster>, seen: &mut BTreeMap<u64, String>) -> Vec<OrderChange> {
    let Some(s) = state else { return Vec::new() };
    let mut out = Vec::new();
    for o in s.orders.values().chain(s.finished_orders.iter()) {
        let state = o.state.name();
        if seen.get(&o.id).map(String::as_str) == Some(state) {
            continue;
        }
        seen.insert(o.id, state.to_owned());
        let why = if o.reason.is_empty() { String::new() } else { format!(" ({})", o.reason) };
        out.push(OrderChange {
            long: format!("order {} {} {} -> {}: {state}{why}", o.id, o.vm, o.source, o.target),
            short: format!("{} -> {}: {state}", o.vm, o.target),
        });
    }
    out
}

/// One line per node: reserved memory and CPU against capacity and watermark.
pub(super) fn nodes_view(s: &Cluster) -> String {
    let mut out = String::new();
    let mut nodes: Vec<_> = s.nodes.iter().collect();
    nodes.sort_by_key(|(name, _)| name.as_str());
    for (name, n) in nodes {
        let mut vms: Vec<_> = n.vms.iter().collect();
        vms.sort_by_key(|(id, _)| id.as_str());
        let vms: Vec<String> = vms
            .into_iter()
            .map(|(id, e)| match e.state {
                VmState::Active => id.clone(),
                VmState::MigratingOut { .. } => format!("{id} (migrating_out)"),
                VmState::Incoming { .. } => format!("{id} (incoming)"),
            })
            .collect();
        let (reserved, usable) = (n.reserved(), n.usable());
        let _ = writeln!(
            out,
            "{name:<10} reserved {:>5}/{:>5} MiB (watermark {} MiB), {:.2}/{:.2} vCPUs: {}",
            reserved.memory_bytes / MIB,
            usable.memory_bytes / MIB,
            n.watermark_level().memory_bytes / MIB,
            reserved.milli_cpu as f64 / 1000.0,
            n.capacity.milli_cpu as f64 / 1000.0,
            if vms.is_empty() { "-".into() } else { vms.join(", ") }
        );
    }
    out
}
