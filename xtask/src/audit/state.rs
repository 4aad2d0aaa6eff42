//! "The state unchanged", as the daemons show it on `/state`: the parts an
//! attack could move (ledgers, nodes, orders; an agent's VMs and their
//! sizes), read before and after and compared. Read as JSON, not as the
//! daemons' types, so the audit says what changed in words a person reads.

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::time::Duration;

use super::http::{request, Via};

/// `GET /state` at `addr`, as JSON.
pub async fn get_state(addr: SocketAddr, via: &Via) -> anyhow::Result<Value> {
    let a = request(addr, via, "GET", "/state", Vec::new(), Duration::from_secs(10)).await?;
    if a.status != 200 {
        bail!("GET /state at {addr}: HTTP {}", a.status);
    }
    serde_json::from_slice(&a.body).with_context(|| format!("/state at {addr} is not JSON"))
}

/// What of the allocator's `/state` an attack must not change: each node's
/// capacity, endpoint and VMs (reservation and state), and every order,
/// open or finished. Nodes named in `except` are left out: an attacker's
/// own authenticated registration of itself is not a change to the others.
pub fn ledger_view(state: &Value, except: &[&str]) -> Value {
    let mut nodes = Map::new();
    if let Some(all) = state.get("nodes").and_then(Value::as_object) {
        for (name, n) in all.iter().filter(|(name, _)| !except.contains(&name.as_str())) {
            let mut vms = Map::new();
            if let Some(v) = n.get("vms").and_then(Value::as_object) {
                for (id, e) in v {
                    vms.insert(id.clone(), json!({ "reserved": e.get("reserved"), "state": e.get("state") }));
                }
            }
            nodes.insert(
                name.clone(),
                json!({
                    "capacity": n.get("capacity"),
                    "migration_endpoint": n.get("migration_endpoint"),
                    "vms": vms,
                }),
            );
        }
    }
    let orders = |key: &str| -> Vec<Value> {
        let list: Vec<&Value> = match state.get(key) {
            Some(Value::Object(m)) => m.values().collect(),
            Some(Value::Array(a)) => a.iter().collect(),
            _ => vec![],
        };
        list.into_iter()
            .map(|o| {
                json!({
                    "id": o.get("id"), "vm": o.get("vm"), "source": o.get("source"),
                    "target": o.get("target"), "reserved": o.get("reserved"), "state": o.get("state"),
                })
            })
            .collect()
    };
    json!({ "nodes": nodes, "orders": orders("orders"), "finished_orders": orders("finished_orders") })
}

/// What of an agent's `/state` an attack must not change: its VMs, their
/// sizes and any move under way.
pub fn agent_view(state: &Value) -> Value {
    let mut vms = Map::new();
    if let Some(all) = state.get("vms").and_then(Value::as_object) {
        for (id, s) in all {
            vms.insert(
                id.clone(),
                json!({ "current": s.get("current"), "permitted": s.get("permitted"), "migration": s.get("migration") }),
            );
        }
    }
    json!({ "vms": vms })
}

/// `None` when equal, else where they differ (a few JSON paths with both
/// values), for the attack's line.
pub fn diff(before: &Value, after: &Value) -> Option<String> {
    let mut out = Vec::new();
    walk("", before, after, &mut out);
    if out.is_empty() {
        return None;
    }
    let more = out.len().saturating_sub(4);
    out.truncate(4);
    let mut s = out.join("; ");
    if more > 0 {
        s.push_str(&format!("; and {more} more"));
    }
    Some(s)
}

fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}/{k}");
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => walk(&p, va, vb, out),
                    (None, Some(vb)) => out.push(format!("{p} added ({})", short(vb))),
                    (Some(_), None) => out.push(format!("{p} removed")),
                    (None, None) => {}
                }
            }
        }
        _ if a == b => {}
        _ => out.push(format!(
            "{} was {}, is {}",
            if path.is_empty() { "/" } else { path },
            short(a),
            short(b)
        )),
    }
}

fn short(v: &Value) -> String {
    super::report::one_line(&v.to_string(), 120)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(extra_node: bool, hold: bool) -> Value {
        let mut nodes = json!({
            "a": { "capacity": {"milli_cpu": 4000}, "migration_endpoint": "", "session": 3,
                   "vms": { "vm1": { "reserved": {"milli_cpu": 1000}, "state": "active", "unmet": 5 } } },
        });
        if extra_node {
            nodes["evil"] = json!({ "capacity": {"milli_cpu": 1}, "vms": {} });
        }
        if hold {
            nodes["a"]["vms"]["held"] = json!({ "reserved": {"milli_cpu": 9000}, "state": "incoming" });
        }
        json!({ "nodes": nodes, "orders": {}, "finished_orders": [], "next_session": 9 })
    }

    #[test]
    fn the_attackers_own_node_and_counters_are_not_changes_a_hold_on_another_node_is() {
        let before = ledger_view(&cluster(false, false), &["evil"]);
        assert_eq!(diff(&before, &ledger_view(&cluster(true, false), &["evil"])), None);
        let d = diff(&before, &ledger_view(&cluster(true, true), &["evil"])).unwrap();
        assert!(d.contains("/nodes/a/vms/held added"), "{d}");
        let d = diff(&before, &ledger_view(&cluster(true, false), &[])).unwrap();
        assert!(d.contains("/nodes/evil added"), "{d}");
    }

    #[test]
    fn an_order_or_a_changed_size_is_a_change() {
        let before = ledger_view(&cluster(false, false), &[]);
        let mut after = cluster(false, false);
        after["orders"] =
            json!({ "7": { "id": 7, "vm": "vm1", "source": "a", "target": "b", "state": "ordered" } });
        assert!(diff(&before, &ledger_view(&after, &[])).unwrap().contains("/orders"));
        let mut grown = cluster(false, false);
        grown["nodes"]["a"]["vms"]["vm1"]["reserved"]["milli_cpu"] = json!(2000);
        let d = diff(&before, &ledger_view(&grown, &[])).unwrap();
        assert!(d.contains("was 1000, is 2000"), "{d}");
    }

    #[test]
    fn an_agents_counters_are_not_its_state() {
        let s = |events: u64, mem: u64| json!({ "vms": { "vm1": { "current": {"memory_bytes": mem}, "pressure_events": events } } });
        assert_eq!(diff(&agent_view(&s(1, 5)), &agent_view(&s(900, 5))), None);
        assert!(diff(&agent_view(&s(1, 5)), &agent_view(&s(1, 6))).is_some());
    }
}
