//! Whether a CertificateSigningRequest for signer `vmscale.io/node` is
//! approved, and for which node. Pure: a view of the request in, a decision
//! out; the shell reads the API and parses the PEM.
//!
//! The binding to the node: the API server itself writes the requester's
//! identity into the CSR (`spec.username`, `spec.extra`), and a service
//! account token bound to a pod carries the name of the pod's node
//! (`authentication.kubernetes.io/node-name`, Kubernetes 1.30+). So an agent
//! can obtain a certificate for `<node>.node.vmscale` only from a pod on
//! `<node>`, whatever it writes into the request.

use std::collections::BTreeMap;

/// The signer name the agents request node certificates from.
pub const NODE_SIGNER: &str = "vmscale.io/node";

/// The user-extra key the API server sets from a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Key usages a node certificate may have: it is the agent's client
/// certificate (to the allocator, other agents, informants) and the server
/// certificate of its migration service.
pub const ALLOWED_USAGES: [&str; 4] = ["digital signature", "key encipherment", "client auth", "server auth"];

/// What the request asks for, parsed from its PEM by the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// The subjectAltName DNS names.
    pub dns_names: Vec<String>,
    /// Whether it has SANs of other kinds (IP, URI, e-mail).
    pub other_sans: bool,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
}

/// A CSR as the decision needs it.
#[derive(Debug, Clone)]
pub struct CsrView<'a> {
    pub signer: &'a str,
    /// `spec.username`: who created it, set by the API server.
    pub username: &'a str,
    /// `spec.extra`, set by the API server.
    pub extra: &'a BTreeMap<String, Vec<String>>,
    pub usages: &'a [String],
    /// Already approved, denied, failed or signed.
    pub settled: bool,
    /// The request's PEM, parsed (or why not).
    pub requested: Result<Requested, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not ours, or already settled.
    Ignore,
    /// Approve and sign a certificate for this node's identity.
    Approve { node: String },
    /// Deny, with a reason the requester can act on.
    Deny { reason: String },
}

/// The DNS name a node's agent certificate carries (the shared TLS design's
/// `Identity::Node`).
pub fn node_dns_name(node: &str) -> String {
    format!("{node}.node.vmscale")
}

/// A Kubernetes node name: a DNS subdomain (lower-case letters, digits, `-`
/// and `.`, at most 253 bytes).
fn is_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !n.starts_with(['-', '.'])
        && !n.ends_with(['-', '.'])
}

/// Decides one CSR. `agent_user` is the agents' service account user name
/// (`system:serviceaccount:<namespace>:<name>`).
pub fn decide(csr: &CsrView<'_>, agent_user: &str) -> Decision {
    if csr.signer != NODE_SIGNER || csr.settled {
        return Decision::Ignore;
    }
    let deny = |reason: String| Decision::Deny { reason };
    if csr.username != agent_user {
        return deny(format!("requested by {:?}, not by the vmscale agent ({agent_user})", csr.username));
    }
    let node = match csr.extra.get(NODE_NAME_EXTRA).map(Vec::as_slice) {
        Some([node]) if is_node_name(node) => node.clone(),
        Some(other) => return deny(format!("the requester's node name {other:?} is not one node name")),
        None => {
            return deny(format!(
                "the request carries no {NODE_NAME_EXTRA}: the agent's token must be bound to its pod \
                 (Kubernetes 1.30 or later)"
            ))
        }
    };
    let requested = match &csr.requested {
        Ok(r) => r,
        Err(e) => return deny(format!("the certificate request cannot be read: {e}")),
    };
    let want = node_dns_name(&node);
    let names_ok = requested.dns_names == [want.clone()]
        && !requested.other_sans
        && requested.common_name.as_ref().is_none_or(|cn| *cn == want);
    if !names_ok {
        return deny(format!(
            "asks for {:?} (common name {:?}, other names: {}); the agent on node {node} may have {want} \
             and nothing else",
            requested.dns_names, requested.common_name, requested.other_sans
        ));
    }
    if let Some(u) = csr.usages.iter().find(|u| !ALLOWED_USAGES.contains(&u.as_str())) {
        return deny(format!("asks for usage {u:?}; allowed: {}", ALLOWED_USAGES.join(", ")));
    }
    Decision::Approve { node }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "system:serviceaccount:vmscale-node:vmscale-agent";

    struct Case {
        signer: &'static str,
        username: &'static str,
        extra: Vec<(&'static str, Vec<&'static str>)>,
        usages: Vec<&'static str>,
        settled: bool,
        requested: Result<Requested, String>,
    }

    fn asks(names: &[&str]) -> Result<Requested, String> {
        Ok(Requested {
            dns_names: names.iter().map(|s| (*s).to_owned()).collect(),
            other_sans: false,
            common_name: None,
        })
    }

    /// node-a's agent asking for its own name.
    fn good() -> Case {
        Case {
            signer: NODE_SIGNER,
            username: AGENT,
            extra: vec![
                (NODE_NAME_EXTRA, vec!["node-a"]),
                ("authentication.kubernetes.io/pod-name", vec!["x"]),
            ],
            usages: vec!["digital signature", "key encipherment", "client auth", "server auth"],
            settled: false,
            requested: asks(&["node-a.node.vmscale"]),
        }
    }

    fn run(c: &Case) -> Decision {
        let extra: BTreeMap<String, Vec<String>> = c
            .extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.iter().map(|s| (*s).to_owned()).collect()))
            .collect();
        let usages: Vec<String> = c.usages.iter().map(|s| (*s).to_owned()).collect();
        let view = CsrView {
            signer: c.signer,
            username: c.username,
            extra: &extra,
            usages: &usages,
            settled: c.settled,
            requested: c.requested.clone(),
        };
        decide(&view, AGENT)
    }

    #[test]
    fn only_the_agent_on_the_named_node_gets_that_nodes_name() {
        assert_eq!(run(&good()), Decision::Approve { node: "node-a".into() });
        let with_cn = Case {
            requested: Ok(Requested {
                common_name: Some("node-a.node.vmscale".into()),
                ..asks(&["node-a.node.vmscale"]).unwrap()
            }),
            ..good()
        };
        assert_eq!(run(&with_cn), Decision::Approve { node: "node-a".into() });

        // (the case, what the denial must say; None: ignored)
        let cases: Vec<(Case, Option<&str>)> = vec![
            (Case { signer: "kubernetes.io/kube-apiserver-client", ..good() }, None),
            (Case { settled: true, ..good() }, None),
            (
                Case { requested: asks(&["node-b.node.vmscale"]), ..good() },
                Some("may have node-a.node.vmscale"),
            ),
            (
                Case { requested: asks(&["node-a.node.vmscale", "allocator.vmscale"]), ..good() },
                Some("nothing else"),
            ),
            (Case { requested: asks(&["allocator.vmscale"]), ..good() }, Some("nothing else")),
            (Case { requested: asks(&[]), ..good() }, Some("nothing else")),
            (
                Case {
                    requested: Ok(Requested { other_sans: true, ..asks(&["node-a.node.vmscale"]).unwrap() }),
                    ..good()
                },
                Some("other names: true"),
            ),
            (
                Case {
                    requested: Ok(Requested {
                        common_name: Some("node-b.node.vmscale".into()),
                        ..asks(&["node-a.node.vmscale"]).unwrap()
                    }),
                    ..good()
                },
                Some("common name"),
            ),
            (Case { extra: vec![], ..good() }, Some("carries no authentication.kubernetes.io/node-name")),
            (
                Case { extra: vec![(NODE_NAME_EXTRA, vec!["node-a", "node-b"])], ..good() },
                Some("not one node name"),
            ),
            (Case { extra: vec![(NODE_NAME_EXTRA, vec!["Node A"])], ..good() }, Some("not one node name")),
            (
                Case { username: "system:serviceaccount:default:mallory", ..good() },
                Some("not by the vmscale agent"),
            ),
            (Case { username: "system:node:node-a", ..good() }, Some("not by the vmscale agent")),
            (Case { usages: vec!["client auth", "cert sign"], ..good() }, Some("usage \"cert sign\"")),
            (Case { requested: Err("not PEM".into()), ..good() }, Some("cannot be read: not PEM")),
        ];
        for (case, want) in cases {
            match (run(&case), want) {
                (Decision::Ignore, None) => {}
                (Decision::Deny { reason }, Some(w)) => {
                    assert!(reason.contains(w), "{reason} should say {w}")
                }
                (got, want) => panic!("{got:?}, want {want:?} ({:?})", case.requested),
            }
        }
    }
}
