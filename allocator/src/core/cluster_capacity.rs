//! Capacity from the cluster (Kubernetes mode): the cluster's figure for a
//! node replaces what its agent reports, now and at every later session
//! start, so the ledger follows pods that come and go beside the VMs. So
//! does its migration endpoint, when the allocator is configured to build
//! it from the Node's address (`migration_port`).

use super::endpoint::check_endpoint;
use super::error::Result;
use super::units::Resources;
use super::Cluster;

impl Cluster {
    /// Records the cluster's capacity for `node` (`None`: the Node is gone;
    /// a live ledger keeps its last capacity, its VMs still run) and applies
    /// it to the node's ledger at once. A smaller capacity than reserved
    /// makes the node hot: the planner moves VMs away, and no grant fits
    /// until it does. Returns whether anything changed.
    pub fn set_cluster_capacity(&mut self, node: &str, capacity: Option<Resources>) -> bool {
        let Some(c) = capacity else {
            return self.cluster_capacity.remove(node).is_some();
        };
        let known = self.cluster_capacity.insert(node.to_owned(), c) != Some(c);
        let ledger = self.nodes.get_mut(node).filter(|l| l.capacity != c).map(|l| l.capacity = c);
        known || ledger.is_some()
    }
}

impl Cluster {
    /// Records the cluster's migration endpoint for `node` (`None`: it has
    /// none now) and gives it to a live ledger that takes VMs in, at once.
    /// Returns whether anything changed. `endpoint` is built by the caller
    /// from the Node's address and the configured port, and checked here.
    pub fn set_cluster_endpoint(&mut self, node: &str, endpoint: Option<String>) -> Result<bool> {
        let Some(e) = endpoint else {
            return Ok(self.cluster_endpoints.remove(node).is_some());
        };
        check_endpoint(&e, self.config.endpoint_scheme)?;
        let known = self.cluster_endpoints.insert(node.to_owned(), e.clone()).as_ref() != Some(&e);
        let live = self
            .nodes
            .get_mut(node)
            .filter(|l| !l.migration_endpoint.is_empty() && l.migration_endpoint != e);
        let changed = live.map(|l| l.migration_endpoint = e).is_some();
        Ok(known || changed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::units::Resources;
    use super::super::{Cluster, CoreConfig, NodeRegistration};

    const GI: u64 = 1 << 30;

    fn cluster() -> Cluster {
        Cluster::new(CoreConfig {
            system_reserve: Resources::ZERO,
            watermark: 0.9,
            order_timeout_ms: 1000,
            max_moves_per_round: 0,
            contended_p99_us: 5_000,
            move_retry_base_ms: 5_000,
            move_retry_max_ms: 300_000,
            ..CoreConfig::default()
        })
    }

    #[test]
    fn the_cluster_figure_wins_over_the_agents_now_and_at_the_next_session() {
        let mut c = cluster();
        let reg = || NodeRegistration {
            node: "a".into(),
            capacity: Resources::new(16_000, 64 * GI),
            vms: vec![],
            migration_endpoint: String::new(),
            refused: Vec::new(),
        };
        assert!(c.set_cluster_capacity("a", Some(Resources::new(6000, 20 * GI))));
        assert!(!c.set_cluster_capacity("a", Some(Resources::new(6000, 20 * GI))));
        c.open_session(reg(), 0).unwrap();
        assert_eq!(c.node("a").unwrap().capacity, Resources::new(6000, 20 * GI));
        // A pod left the node: the live ledger grows at once.
        assert!(c.set_cluster_capacity("a", Some(Resources::new(7000, 24 * GI))));
        assert_eq!(c.node("a").unwrap().capacity, Resources::new(7000, 24 * GI));
        // Even zero room is taken (other pods fill the node): no grants fit.
        assert!(c.set_cluster_capacity("a", Some(Resources::ZERO)));
        assert_eq!(c.node("a").unwrap().free(), Resources::ZERO);
        // The Node is gone: the ledger keeps what it had; a new session
        // takes the agent's figure again.
        assert!(c.set_cluster_capacity("a", None));
        c.open_session(reg(), 1).unwrap();
        assert_eq!(c.node("a").unwrap().capacity, Resources::new(16_000, 64 * GI));
    }

    #[test]
    fn endpoints_from_the_cluster_replace_the_agents() {
        let mut c =
            Cluster::new(super::super::CoreConfig { endpoints_from_cluster: true, ..cluster().config });
        let reg = |endpoint: &str| NodeRegistration {
            node: "a".into(),
            capacity: Resources::new(16_000, 64 * GI),
            vms: vec![],
            migration_endpoint: endpoint.into(),
            refused: Vec::new(),
        };
        // No address from the cluster yet: the node takes no VMs in.
        c.open_session(reg("https://evil.example:1"), 0).unwrap();
        assert_eq!(c.node("a").unwrap().migration_endpoint, "");
        // A bad one is refused (it is checked as an agent's would be).
        assert!(c.set_cluster_endpoint("a", Some("http://10.0.0.1:7073".into())).is_err());
        assert!(c.set_cluster_endpoint("a", Some("https://10.0.0.1:7073".into())).unwrap());
        c.open_session(reg("https://evil.example:1"), 1).unwrap();
        assert_eq!(c.node("a").unwrap().migration_endpoint, "https://10.0.0.1:7073", "the cluster's wins");
        // The address moves: the live ledger follows.
        assert!(c.set_cluster_endpoint("a", Some("https://10.0.0.9:7073".into())).unwrap());
        assert_eq!(c.node("a").unwrap().migration_endpoint, "https://10.0.0.9:7073");
        // An agent that takes no VMs in is never made a target.
        c.open_session(reg(""), 2).unwrap();
        assert_eq!(c.node("a").unwrap().migration_endpoint, "");
        assert!(!c.set_cluster_endpoint("a", Some("https://10.0.0.9:7073".into())).unwrap());
        assert_eq!(c.node("a").unwrap().migration_endpoint, "");
    }
}
