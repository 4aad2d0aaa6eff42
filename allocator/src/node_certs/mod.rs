//! Node certificates in Kubernetes: the allocator is the signer
//! `vmscale.io/node` of the CertificateSigningRequest API. Each agent
//! generates its key, submits a CSR for `<node>.node.vmscale` (its node
//! identity in the shared TLS design), and gets the certificate back in the
//! CSR's status; the key never leaves the node.
//!
//! Why this binds a certificate to the node the agent runs on: the API
//! server, not the requester, fills in `spec.username` and `spec.extra` of a
//! CSR, and a pod-bound service-account token carries its pod's node name
//! (`authentication.kubernetes.io/node-name`). [`decide`] approves only a
//! request from the agents' service account whose sole name is that node's
//! identity. A pod on node `a` cannot get `b.node.vmscale`, whatever its
//! request says. (cert-manager's csi-driver was the other choice: its
//! node plugin asks for whatever names a volume names, so a node could get
//! any other node's name.)
//!
//! - [`decide`]: the pure decision, with table tests.
//! - [`sign`]: the CA and the X.509 work (rcgen): reading a request, issuing
//!   a certificate with the node's name, our usages and validity only.
//! - [`watch`]: the shell: watches CSRs for our signer, approves or denies
//!   (`certificatesigningrequests/approval`) and writes the certificate
//!   (`certificatesigningrequests/status`). The leader alone runs it.

pub mod decide;
pub mod sign;
pub mod watch;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[kubernetes.node_certs]` in the allocator's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCertsConfig {
    /// The cluster CA's certificate (PEM), the one every vmscale daemon trusts.
    pub ca_cert: PathBuf,
    /// Its private key (PEM). Mounted from a Secret only the allocator reads.
    pub ca_key: PathBuf,
    /// The agents' service account, as the API server names the requester.
    /// Default `system:serviceaccount:vmscale-node:vmscale-agent`.
    #[serde(default = "default_agent_user")]
    pub agent_user: String,
    /// How long an issued node certificate is valid, hours (the agent renews
    /// at two thirds of it). Default 72, at most 8760.
    #[serde(default = "default_validity_hours")]
    pub validity_hours: u32,
}

fn default_agent_user() -> String {
    "system:serviceaccount:vmscale-node:vmscale-agent".into()
}

fn default_validity_hours() -> u32 {
    72
}

/// The longest validity taken, hours (a year).
pub const MAX_VALIDITY_HOURS: u32 = 8760;

impl NodeCertsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.validity_hours == 0 || self.validity_hours > MAX_VALIDITY_HOURS {
            return Err(format!(
                "node_certs.validity_hours = {} must be 1 to {MAX_VALIDITY_HOURS}",
                self.validity_hours
            ));
        }
        let sa = self.agent_user.strip_prefix("system:serviceaccount:").unwrap_or("");
        if sa.split(':').count() != 2 || sa.split(':').any(str::is_empty) {
            return Err(format!(
                "node_certs.agent_user = {:?} must be system:serviceaccount:<namespace>:<name>",
                self.agent_user
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        let c: NodeCertsConfig = toml::from_str("ca_cert = \"/ca.pem\"\nca_key = \"/ca.key\"").unwrap();
        assert_eq!(c.agent_user, "system:serviceaccount:vmscale-node:vmscale-agent");
        assert_eq!(c.validate(), Ok(()));
        let long = NodeCertsConfig { validity_hours: 9000, ..c.clone() };
        assert!(long.validate().unwrap_err().contains("validity_hours"));
        let user = NodeCertsConfig { agent_user: "system:node:a".into(), ..c };
        assert!(user.validate().unwrap_err().contains("agent_user"));
        assert!(toml::from_str::<NodeCertsConfig>("ca_cert = \"a\"\nca_key = \"b\"\nsigner = \"x\"").is_err());
    }
}
