//! What the live view and the timeline say about nodes and migration
//! orders, from the allocator's `/state`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::cluster::MIB;

/// A new or changed migration order, as the view and the timeline say it.
pub(super) struct OrderChange {
    /// "order 7 idle node-a -> node-b: started (node node-a above its watermark)"
    pub long: String,
    /// "idle -> node-b: started"
    pub short: String,
}

/// New or changed orders in the allocator's state.
pub(super) fn order_changes(
    state: Option<&serde_json::Value>,
    seen: &mut BTreeMap<u64, String>,
) -> Vec<OrderChange> {
    let Some(s) = state else { return Vec::new() };
    let open = s["orders"].as_object().map(|m| m.values().cloned().collect::<Vec<_>>()).unwrap_or_default();
    let done = s["finished_orders"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for o in open.iter().chain(done.iter()) {
        let (Some(id), Some(state)) = (o["id"].as_u64(), o["state"].as_str()) else { continue };
        if seen.get(&id).map(String::as_str) == Some(state) {
            continue;
        }
        seen.insert(id, state.to_owned());
        let why = o["reason"].as_str().filter(|r| !r.is_empty()).map_or(String::new(), |r| format!(" ({r})"));
        let (vm, source, target) = (
            o["vm"].as_str().unwrap_or("?"),
            o["source"].as_str().unwrap_or("?"),
            o["target"].as_str().unwrap_or("?"),
        );
        out.push(OrderChange {
            long: format!("order {id} {vm} {source} -> {target}: {state}{why}"),
            short: format!("{vm} -> {target}: {state}"),
        });
    }
    out
}

/// One line per node: reserved memory and CPU against capacity and watermark.
pub(super) fn nodes_view(s: &serde_json::Value) -> String {
    let mut out = String::new();
    for (name, n) in s["nodes"].as_object().into_iter().flatten() {
        let get = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        let (mut cpu, mut mem) = (0, 0);
        let mut vms = Vec::new();
        for (id, e) in n["vms"].as_object().into_iter().flatten() {
            cpu += get(&e["reserved"], "milli_cpu");
            mem += get(&e["reserved"], "memory_bytes");
            let state = e["state"]["state"].as_str().unwrap_or("?");
            vms.push(if state == "active" { id.clone() } else { format!("{id} ({state})") });
        }
        let w = n["watermark"].as_f64().unwrap_or(1.0);
        let cap =
            get(&n["capacity"], "memory_bytes").saturating_sub(get(&n["system_reserve"], "memory_bytes"));
        let _ = writeln!(
            out,
            "{name:<10} reserved {:>5}/{:>5} MiB (watermark {:.0} MiB), {:.2}/{:.2} vCPUs: {}",
            mem / MIB,
            cap / MIB,
            w * (cap / MIB) as f64,
            cpu as f64 / 1000.0,
            get(&n["capacity"], "milli_cpu") as f64 / 1000.0,
            if vms.is_empty() { "-".into() } else { vms.join(", ") }
        );
    }
    out
}
