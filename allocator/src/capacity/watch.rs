//! Feeds [`CapacityTable`] from the API server (list then watch of Nodes and
//! of unfinished Pods, with kube-runtime's watcher and its backoff) and hands
//! every changed capacity to the ledger. Requests: `list` and `watch` of
//! nodes and pods, cluster-wide (the ClusterRole in deploy/ grants these).

use super::{CapacityTable, VmLabel};
use crate::core::units::Resources;
use crate::shared::Shared;
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

// Boxed: a Pod event is large, and these pass through a stream by value.
enum Change {
    Node(Box<Event<Node>>),
    Pod(Box<Event<Pod>>),
}

/// How often the capacities are recomputed without a watch event: a VM
/// pod's requests stop counting when its VM enters the node's ledger (and
/// count again when it leaves), which no watch event shows.
const LEDGER_RECHECK: Duration = Duration::from_secs(1);

/// The pod watch leaves out finished pods on the server side, as
/// kube-scheduler's own pod informer does.
pub fn pod_watch_config() -> watcher::Config {
    from_cache(watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
}

pub fn node_watch_config() -> watcher::Config {
    from_cache(watcher::Config::default())
}

/// Lists from the API server's watch cache (`resourceVersion=0`) in one
/// page, as informers do: one allocator lists, and the watch brings it up
/// to date at once; pages would have to come from etcd instead.
fn from_cache(c: watcher::Config) -> watcher::Config {
    let mut c = c.any_semantic();
    c.page_size = None;
    c
}

/// Runs until `cancel`. While the API server is unreachable the last
/// capacities stay.
pub async fn run(client: Client, label: VmLabel, shared: Arc<Shared>, cancel: CancellationToken) {
    let nodes = watcher::watcher(Api::<Node>::all(client.clone()), node_watch_config()).default_backoff();
    let pods = watcher::watcher(Api::<Pod>::all(client), pod_watch_config()).default_backoff();
    let changes = stream::select(
        nodes.map(|e| e.map(|e| Change::Node(Box::new(e))).map_err(|e| ("nodes", e))),
        pods.map(|e| e.map(|e| Change::Pod(Box::new(e))).map_err(|e| ("pods", e))),
    );
    let mut changes = std::pin::pin!(changes);
    let mut table = CapacityTable::new(label);
    let mut applied: BTreeMap<String, Resources> = BTreeMap::new();
    let mut applied_ips: BTreeMap<String, IpAddr> = BTreeMap::new();
    let port = shared.config.kubernetes.as_ref().and_then(|k| k.migration_port);
    let mut recheck = tokio::time::interval(LEDGER_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let change = tokio::select! {
            () = cancel.cancelled() => return,
            c = changes.next() => Some(c),
            _ = recheck.tick() => None,
        };
        match change {
            None => {}
            Some(None) => return,
            Some(Some(Err((what, e)))) => {
                warn!("watching {what} failed, keeping the last capacities and retrying: {e}")
            }
            Some(Some(Ok(Change::Node(e)))) => table.apply_node(*e),
            Some(Some(Ok(Change::Pod(e)))) => table.apply_pod(*e),
        }
        let now = table.capacities(&ledgered(&shared, &table));
        if now != applied {
            push(&shared, &applied, &now);
            applied = now;
        }
        if let Some(port) = port.filter(|_| *table.internal_ips() != applied_ips) {
            push_endpoints(&shared, &applied_ips, table.internal_ips(), port);
            applied_ips = table.internal_ips().clone();
        }
    }
}

/// The labelled pods whose VM is in their node's ledger, as `(node, vm id)`:
/// looked up under the lock, the sum done after.
fn ledgered(shared: &Shared, table: &CapacityTable) -> BTreeSet<(String, String)> {
    let st = shared.lock();
    table
        .vm_pods()
        .filter(|(node, vm)| st.cluster.node(node).is_some_and(|l| l.vms.contains_key(*vm)))
        .map(|(node, vm)| (node.to_owned(), vm.to_owned()))
        .collect()
}

/// Hands the ledger each node's migration endpoint built from its
/// InternalIP and `port` (`migration_port`), as changed since `before`.
fn push_endpoints(
    shared: &Shared,
    before: &BTreeMap<String, IpAddr>,
    now: &BTreeMap<String, IpAddr>,
    port: u16,
) {
    let scheme = if shared.config.tls.is_some() { "https" } else { "http" };
    let mut st = shared.lock();
    for (node, ip) in now.iter().filter(|(n, ip)| before.get(*n) != Some(*ip)) {
        let endpoint = format!("{scheme}://{}", SocketAddr::new(*ip, port));
        match st.cluster.set_cluster_endpoint(node, Some(endpoint)) {
            Ok(true) => debug!(node, %ip, "migration endpoint from the cluster"),
            Ok(false) => {}
            Err(e) => warn!(node, "ignoring the node's address: {e}"),
        }
    }
    for node in before.keys().filter(|n| !now.contains_key(*n)) {
        let _ = st.cluster.set_cluster_endpoint(node, None);
    }
}

fn push(shared: &Shared, before: &BTreeMap<String, Resources>, now: &BTreeMap<String, Resources>) {
    let mut shrunk = false;
    {
        let mut st = shared.lock();
        for (node, c) in now {
            if before.get(node) == Some(c) {
                continue;
            }
            let c = match c.checked("node allocatable") {
                Ok(c) => c,
                Err(e) => {
                    warn!(node, "ignoring the node's allocatable resources: {e}");
                    continue;
                }
            };
            shrunk |= before.get(node).is_some_and(|b| !b.fits_in(c));
            if st.cluster.set_cluster_capacity(node, Some(c)) {
                debug!(node, capacity = %c, "node capacity from the cluster");
            }
        }
        for node in before.keys().filter(|n| !now.contains_key(*n)) {
            info!(node, "node gone from the cluster; its ledger keeps its last capacity");
            st.cluster.set_cluster_capacity(node, None);
        }
    }
    if shrunk {
        // Less room than before may leave a node hot: plan now, not at the next tick.
        shared.plan_now.notify_one();
    }
}
