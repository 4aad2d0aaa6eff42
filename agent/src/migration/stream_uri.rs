//! The one kind of URI a source hands QMP `migrate`: `tcp:<ip>:<port>`,
//! the IP being the target agent's that the source reached. The URI comes
//! from the target's `Prepare` answer, that is from the network, and QEMU
//! runs `exec:` URIs with `/bin/sh` and writes guest RAM to `file:` ones:
//! anything else is refused before QEMU sees it (pure, table-tested).

use std::net::{IpAddr, SocketAddr};

/// Longest URI accepted (and shown in an error): `tcp:[v6]:port` fits.
const MAX_URI: usize = 64;

/// Why a target's stream URI is refused. The URI is shown cut to
/// [`MAX_URI`] characters, escaped, so a hostile one cannot flood the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamUriError {
    #[error("the target's stream uri {0} is not tcp:<ip>:<port>")]
    NotTcp(String),
    #[error("the target's stream uri {uri} names {got}, not the target agent's address {want}")]
    OtherHost { uri: String, got: IpAddr, want: String },
    #[error("the target's stream uri {0} names port 0")]
    NoPort(String),
}

/// `uri` cut to [`MAX_URI`] characters and escaped, for messages.
pub fn shown(uri: &str) -> String {
    let cut: String = uri.chars().take(MAX_URI).collect();
    let more = if uri.chars().count() > MAX_URI { "..." } else { "" };
    format!("{:?}{more}", cut)
}

/// The stream address in `uri` if it is exactly `tcp:<ip>:<port>` with an
/// IP literal among `target_ips` (the addresses the source's call to the
/// target agent went to) and a port above 0.
pub fn check(uri: &str, target_ips: &[IpAddr]) -> Result<SocketAddr, StreamUriError> {
    let addr = uri
        .strip_prefix("tcp:")
        .filter(|_| uri.len() <= MAX_URI)
        // A socket address only: no hostname, no `,ipv4=on` or other option.
        .and_then(|rest| rest.parse::<SocketAddr>().ok())
        .ok_or_else(|| StreamUriError::NotTcp(shown(uri)))?;
    if addr.port() == 0 {
        return Err(StreamUriError::NoPort(shown(uri)));
    }
    if !target_ips.contains(&addr.ip()) {
        let want = target_ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        return Err(StreamUriError::OtherHost { uri: shown(uri), got: addr.ip(), want });
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn only_tcp_to_the_target_agents_address_passes() {
        let target = [ip("10.0.0.2")];
        assert_eq!(
            check("tcp:10.0.0.2:41233", &target),
            Ok("10.0.0.2:41233".parse().unwrap_or(([0; 4], 0).into()))
        );
        let v6 = [ip("fd00::2")];
        assert!(check("tcp:[fd00::2]:4444", &v6).is_ok());
        let refused = [
            "exec:cat > /tmp/x",
            "exec:/bin/sh -c 'id'",
            "file:/etc/shadow",
            "unix:/run/qmp.sock",
            "fd:3",
            "rdma:10.0.0.2:4444",
            "vsock:2:4444",
            "tcp:target.example:4444",
            "tcp:10.0.0.2:4444,ipv4=on",
            "tcp:10.0.0.2",
            "tcp:10.0.0.2:99999",
            "TCP:10.0.0.2:4444",
            " tcp:10.0.0.2:4444",
            "tcp:10.0.0.2:4444\n",
            "",
        ];
        for uri in refused {
            assert_eq!(check(uri, &target), Err(StreamUriError::NotTcp(shown(uri))), "{uri:?}");
        }
        assert!(matches!(check("tcp:10.0.0.3:4444", &target), Err(StreamUriError::OtherHost { .. })));
        assert!(matches!(check("tcp:127.0.0.1:4444", &target), Err(StreamUriError::OtherHost { .. })));
        assert_eq!(check("tcp:10.0.0.2:0", &target), Err(StreamUriError::NoPort(shown("tcp:10.0.0.2:0"))));
        assert!(check("tcp:10.0.0.2:4444", &[]).is_err(), "no known target address: nothing passes");
    }

    #[test]
    fn a_long_uri_is_cut_in_the_message() {
        let long = format!("exec:{}", "x".repeat(10_000));
        let e = check(&long, &[ip("10.0.0.2")]).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("...") && e.starts_with("the target's stream uri \"exec:"), "{e}");
    }
}
