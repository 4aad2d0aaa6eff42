//! Who a certificate speaks for. Every identity is one DNS name in the
//! certificate's subjectAltName, under the cluster's own domain, so one CA
//! serves every link and a name can never be mistaken for a public one.

use std::fmt;

/// The private domain every identity lives under.
pub const DOMAIN: &str = "vmscale";
/// The subdomain of node identities: `<node>.node.vmscale`.
const NODE_SUFFIX: &str = ".node.vmscale";
/// A DNS name is at most 253 characters.
const MAX_NAME: usize = 253;

/// One party of a link, as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// `allocator.vmscale`: the allocator's gRPC server and its extender.
    Allocator,
    /// `<node>.node.vmscale`: the agent of that node, as a client (to the
    /// allocator, to another node's migration service, to informants on
    /// TCP) and as the server of its migration service.
    Node(String),
    /// `kube-scheduler.vmscale`: kube-scheduler calling the extender.
    Scheduler,
    /// `informant.vmscale`: an informant serving on TCP.
    Informant,
}

impl Identity {
    /// The DNS name a certificate for this identity carries.
    pub fn dns_name(&self) -> String {
        match self {
            Identity::Allocator => format!("allocator.{DOMAIN}"),
            Identity::Node(n) => format!("{n}{NODE_SUFFIX}"),
            Identity::Scheduler => format!("kube-scheduler.{DOMAIN}"),
            Identity::Informant => format!("informant.{DOMAIN}"),
        }
    }

    /// The identity a certificate's DNS name stands for, if any. Exact:
    /// a wildcard (`*.node.vmscale`) names no node, and a node name must
    /// be a valid DNS name of its own, so one certificate cannot speak for
    /// every node or for a name that would print differently.
    pub fn from_dns_name(name: &str) -> Option<Identity> {
        let fixed = [Identity::Allocator, Identity::Scheduler, Identity::Informant];
        if let Some(i) = fixed.into_iter().find(|i| i.dns_name() == name) {
            return Some(i);
        }
        let node = name.strip_suffix(NODE_SUFFIX)?;
        node_name_ok(node).then(|| Identity::Node(node.to_owned()))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dns_name())
    }
}

/// Whether `node` can be the first labels of a node identity: lower-case
/// DNS labels (a Kubernetes node name is a DNS subdomain), no wildcard.
pub fn node_name_ok(node: &str) -> bool {
    !node.is_empty()
        && node.len() + NODE_SUFFIX.len() <= MAX_NAME
        && node.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let all = [
            Identity::Allocator,
            Identity::Scheduler,
            Identity::Informant,
            Identity::Node("a".into()),
            Identity::Node("ip-10-0-0-1.ec2.internal".into()),
        ];
        for i in all {
            assert_eq!(Identity::from_dns_name(&i.dns_name()), Some(i.clone()), "{i}");
        }
        assert_eq!(Identity::Node("b".into()).dns_name(), "b.node.vmscale");
        assert_eq!(Identity::Scheduler.to_string(), "kube-scheduler.vmscale");
    }

    #[test]
    fn wildcards_and_odd_names_are_nobody() {
        for name in [
            "*.node.vmscale",
            ".node.vmscale",
            "node.vmscale",
            "A.node.vmscale",
            "a..b.node.vmscale",
            "-a.node.vmscale",
            "a_b.node.vmscale",
            "a.node.vmscale.evil",
            "allocator.vmscale.",
            "allocator.example.com",
            "",
        ] {
            assert_eq!(Identity::from_dns_name(name), None, "{name}");
        }
        assert!(!node_name_ok(&"a".repeat(250)));
    }
}
