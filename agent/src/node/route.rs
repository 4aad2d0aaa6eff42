//! What this node is for a migration order the allocator pushed: the
//! allocator sends each order to both its source and its target, so a node
//! finds its part by name.

use vmscale_proto::allocator as pb;

/// This node's part in one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Take the VM in from the source's agent.
    Target,
    /// Move the VM out.
    Source,
    /// An order for other nodes.
    Neither,
}

/// This node's part in `order`, for the node named `me`. A node named both
/// source and target is the target: its migration service answers, and the
/// allocator never moves a VM onto its own node.
pub fn route(order: &pb::MigrationOrder, me: &str) -> Role {
    if order.target_node == me {
        Role::Target
    } else if order.source_node == me {
        Role::Source
    } else {
        Role::Neither
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_finds_its_part_by_name() {
        let cases = [
            ("node-a", "node-b", "node-b", Role::Target),
            ("node-a", "node-b", "node-a", Role::Source),
            ("node-a", "node-b", "node-c", Role::Neither),
            ("node-a", "node-a", "node-a", Role::Target),
            ("", "", "node-a", Role::Neither),
            ("node-a", "node-b", "Node-a", Role::Neither),
        ];
        for (source, target, me, role) in cases {
            let order = pb::MigrationOrder {
                order_id: 1,
                vm_id: "vm".into(),
                source_node: source.into(),
                target_node: target.into(),
                ..Default::default()
            };
            assert_eq!(route(&order, me), role, "{source} -> {target}, seen from {me}");
        }
    }
}
