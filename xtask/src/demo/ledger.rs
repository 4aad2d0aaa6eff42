//! What the view and the timeline take from the allocator's `/state`: the
//! nodes' ledgers and the migration orders' changes.

use std::collections::BTreeMap;

use vmscale_allocator::core::vm::VmState;
use vmscale_allocator::core::Cluster;

use super::view::NodeRow;
use crate::cluster::MIB;

/// A new or changed migration order, as the view and the timeline say it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct OrderChange {
    /// "order 7 idle node-a -> node-b: started (node node-a above its watermark)"
    pub long: String,
    /// "idle -> node-b: started"
    pub short: String,
    /// The VM it moves.
    pub vm: String,
    /// The order reached its end (completed or failed): its move is over.
    pub ended: bool,
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
            vm: o.vm.clone(),
            ended: o.state.is_final(),
        });
    }
    out
}

/// The view's node rows, by name.
pub(super) fn node_rows(s: &Cluster) -> Vec<NodeRow> {
    let mut nodes: Vec<_> = s.nodes.iter().collect();
    nodes.sort_by_key(|(name, _)| name.as_str());
    nodes
        .into_iter()
        .map(|(name, n)| {
            let mut vms: Vec<_> = n.vms.iter().collect();
            vms.sort_by_key(|(id, _)| id.as_str());
            let (reserved, usable) = (n.reserved(), n.usable());
            NodeRow {
                name: name.clone(),
                reserved_mib: reserved.memory_bytes / MIB,
                usable_mib: usable.memory_bytes / MIB,
                watermark_mib: n.watermark_level().memory_bytes / MIB,
                reserved_vcpus: reserved.milli_cpu as f64 / 1000.0,
                usable_vcpus: usable.milli_cpu as f64 / 1000.0,
                vms: vms
                    .into_iter()
                    .map(|(id, e)| match e.state {
                        VmState::Active => id.clone(),
                        VmState::MigratingOut { .. } => format!("{id} (migrating_out)"),
                        VmState::Incoming { .. } => format!("{id} (incoming)"),
                    })
                    .collect(),
            }
        })
        .collect()
}
