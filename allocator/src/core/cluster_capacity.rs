//! Capacity from the cluster (Kubernetes mode): the cluster's figure for a
//! node replaces what its agent reports, now and at every later session
//! start, so the ledger follows pods that come and go beside the VMs.

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
}
