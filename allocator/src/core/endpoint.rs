//! An agent's migration endpoint, as its hello states it: the address other
//! agents dial to hand it a VM. The allocator passes it on in every order
//! towards that node, so it is checked strictly: one scheme (`https://`
//! when the cluster runs TLS, where the source then verifies the target's
//! certificate as that node, so an endpoint cannot stand in for another
//! node; `http://` only when it runs without), a host that is an IP literal
//! or a DNS name, a port, and nothing else (no user, path or query).

use super::error::{CoreError, Result};
use super::names::cut;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest endpoint accepted.
pub const MAX_ENDPOINT_LEN: usize = 256;

/// Which scheme migration endpoints must use: the one the agents' links run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointScheme {
    /// `https://`: the cluster runs TLS (the allocator's `[tls]`).
    Https,
    /// `http://`: the cluster runs without TLS (`insecure = true`).
    Http,
}

impl EndpointScheme {
    fn prefix(self) -> &'static str {
        match self {
            EndpointScheme::Https => "https://",
            EndpointScheme::Http => "http://",
        }
    }
}

/// Checks `e` (empty: the agent takes no VMs in).
pub fn check_endpoint(e: &str, scheme: EndpointScheme) -> Result<()> {
    if e.is_empty() {
        return Ok(());
    }
    let bad = |why: &str| {
        CoreError::invalid(
            "migration endpoint",
            format!(
                "{:?} {why}; give {}HOST:PORT with an IP address or DNS name, e.g. {}10.0.0.2:7073, or leave it empty",
                cut(e, 80),
                scheme.prefix(),
                scheme.prefix()
            ),
        )
    };
    if e.len() > MAX_ENDPOINT_LEN {
        return Err(bad(&format!("is longer than {MAX_ENDPOINT_LEN} bytes")));
    }
    let Some(rest) = e.strip_prefix(scheme.prefix()) else {
        return Err(bad(&format!("does not start with {}", scheme.prefix())));
    };
    let port = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("has an unclosed '['"))?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(bad("has no IPv6 address inside [...]"));
        }
        after.strip_prefix(':').ok_or_else(|| bad("has no port"))?
    } else {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
        if !(host.parse::<Ipv4Addr>().is_ok() || is_dns_name(host)) {
            return Err(bad("has a host that is neither an IP address nor a DNS name"));
        }
        port
    };
    // Digits only: `u16::from_str` would take a leading '+'.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..))
    {
        return Err(bad("has no port from 1 to 65535 (or something after it)"));
    }
    Ok(())
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens.
fn is_dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use EndpointScheme::*;

    #[test]
    fn endpoints_that_pass() {
        for (e, s) in [
            ("", Https),
            ("", Http),
            ("https://10.0.0.2:7073", Https),
            ("https://node-a.example:7073", Https),
            ("https://[fd00::2]:7073", Https),
            ("http://127.0.0.1:1", Http),
        ] {
            assert!(check_endpoint(e, s).is_ok(), "{e}");
        }
    }

    #[test]
    fn endpoints_that_are_refused_say_why() {
        let long = format!("https://{}:1", "a".repeat(300));
        let cases = [
            ("http://10.0.0.2:7073", Https, "does not start with https://"),
            ("https://10.0.0.2:7073", Http, "does not start with http://"),
            ("10.0.0.2:7073", Https, "does not start with"),
            ("ftp://x:1", Https, "does not start with"),
            ("https://10.0.0.2", Https, "no port"),
            ("https://10.0.0.2:", Https, "no port from 1"),
            ("https://10.0.0.2:0", Https, "no port from 1"),
            ("https://10.0.0.2:65536", Https, "no port from 1"),
            ("https://10.0.0.2:+80", Https, "no port from 1"),
            ("https://10.0.0.2:7073/path", Https, "no port from 1"),
            ("https://user@10.0.0.2:7073", Https, "neither an IP"),
            ("https://a b:7073", Https, "neither an IP"),
            ("https://a_b:7073", Https, "neither an IP"),
            ("https://:7073", Https, "neither an IP"),
            ("https://[::1:7073", Https, "unclosed"),
            ("https://[zz]:7073", Https, "no IPv6"),
            ("https://[::1]7073", Https, "no port"),
            (long.as_str(), Https, "longer than 256"),
        ];
        for (e, s, want) in cases {
            let err = check_endpoint(e, s).unwrap_err().to_string();
            assert!(err.contains(want), "{e}: {err}");
            assert!(err.contains("migration endpoint"), "{err}");
        }
    }
}
