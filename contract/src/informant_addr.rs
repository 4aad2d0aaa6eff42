//! Where the agent reaches a VM's informant, parsed once at the edge (the
//! agent's VM list and the `vmscale.io/informant` annotation both come
//! through [`InformantAddr::from_str`](std::str::FromStr)), with errors that
//! say what to write instead.
//!
//! | form | transport |
//! |---|---|
//! | `http://HOST:PORT` | TCP, plain text (the agent's `insecure = true` only; host: IPv4, `[IPv6]` or a DNS name) |
//! | `https://HOST:PORT` | TCP with mutual TLS: the informant's certificate is `informant.vmscale`, the agent presents its node's |
//! | `vsock://CID:PORT` | AF_VSOCK to the guest's CID (3 or more): hosts with the kernel's vhost-vsock |
//! | `vsock+unix:///PATH:PORT` | the host socket of a vhost-user vsock backend (vhost-device-vsock's `uds-path`), then `CONNECT PORT` |
//!
//! The third form is named like `http+unix`: the guest's vsock port reached
//! through a unix socket. Its path is absolute (hence the three slashes) and
//! the port comes after the last `:`, so a path may hold colons.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;

/// The first CID a guest can have: 0 is the hypervisor, 1 local loopback,
/// 2 the host (`VMADDR_CID_HOST`).
pub const FIRST_GUEST_CID: u32 = 3;
/// `VMADDR_CID_ANY` and `VMADDR_PORT_ANY`: wildcards, never a peer.
const ANY: u32 = u32::MAX;
/// `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_UNIX_PATH: usize = 107;
/// Longer than any address of these forms can be: a bigger value is a
/// mistake, and the message need not echo all of it.
const MAX_LEN: usize = 512;
/// DNS names are at most 253 characters.
const MAX_HOST: usize = 253;

const FORMS: &str = "https://HOST:PORT, http://HOST:PORT, vsock://CID:PORT or vsock+unix:///PATH:PORT";

/// A checked informant address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum InformantAddr {
    /// `http://HOST:PORT`; `host` as written (`[::1]` keeps its brackets).
    Http { host: String, port: u16 },
    /// `https://HOST:PORT`: as `Http`, with mutual TLS.
    Https { host: String, port: u16 },
    /// `vsock://CID:PORT`.
    Vsock { cid: u32, port: u32 },
    /// `vsock+unix:///PATH:PORT`: the backend's host socket and the guest's
    /// vsock port.
    VsockUnix { path: PathBuf, port: u32 },
}

/// Why an informant address was refused; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("informant address {value:?} {reason}")]
pub struct InformantAddrError {
    /// The value as given, cut to 80 characters.
    pub value: String,
    pub reason: String,
}

impl InformantAddr {
    /// The TCP form for `host:port`.
    pub fn http(host: impl Into<String>, port: u16) -> InformantAddr {
        InformantAddr::Http { host: host.into(), port }
    }
}

impl fmt::Display for InformantAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InformantAddr::Http { host, port } => write!(f, "http://{host}:{port}"),
            InformantAddr::Https { host, port } => write!(f, "https://{host}:{port}"),
            InformantAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            InformantAddr::VsockUnix { path, port } => write!(f, "vsock+unix://{}:{port}", path.display()),
        }
    }
}

impl FromStr for InformantAddr {
    type Err = InformantAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map_err(|reason| InformantAddrError { value: s.chars().take(80).collect(), reason })
    }
}

impl TryFrom<String> for InformantAddr {
    type Error = InformantAddrError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<InformantAddr> for String {
    fn from(a: InformantAddr) -> String {
        a.to_string()
    }
}

fn parse(s: &str) -> Result<InformantAddr, String> {
    if s.is_empty() {
        return Err(format!("is empty; write one of {FORMS}"));
    }
    if s.len() > MAX_LEN {
        return Err(format!("is {} bytes long, more than any address ({MAX_LEN})", s.len()));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("holds whitespace or control characters".to_owned());
    }
    if let Some(rest) = s.strip_prefix("http://") {
        return tcp(rest, "http").map(|(host, port)| InformantAddr::Http { host, port });
    }
    if let Some(rest) = s.strip_prefix("https://") {
        return tcp(rest, "https").map(|(host, port)| InformantAddr::Https { host, port });
    }
    if let Some(rest) = s.strip_prefix("vsock+unix://") {
        return vsock_unix(rest);
    }
    if let Some(rest) = s.strip_prefix("vsock://") {
        return vsock(rest);
    }
    if s.starts_with("vsock:") {
        return Err("is the informant's listen syntax; the agent dials vsock://CID:PORT".to_owned());
    }
    Err(format!("has no scheme this agent dials; write one of {FORMS}"))
}

/// `HOST:PORT` after `scheme://`.
fn tcp(rest: &str, scheme: &str) -> Result<(String, u16), String> {
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("has no port: write {scheme}://HOST:PORT"));
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("has port {port:?}: a TCP port is 1-65535, with no path after it"))?;
    let ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<Ipv6Addr>().is_ok()
    } else {
        host.parse::<Ipv4Addr>().is_ok() || dns_name(host)
    };
    if !ok {
        return Err(format!("has host {host:?}: an IPv4 address, [IPv6] in brackets or a DNS name"));
    }
    Ok((host.to_owned(), port))
}

fn dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOST
        && h.split('.').all(|l| {
            !l.is_empty() && !l.starts_with('-') && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn vsock_port(port: &str) -> Result<u32, String> {
    match port.parse::<u32>() {
        Ok(p) if p != 0 && p != ANY => Ok(p),
        _ => Err(format!("has vsock port {port:?}: 1 to {}", ANY - 1)),
    }
}

fn vsock(rest: &str) -> Result<InformantAddr, String> {
    let Some((cid, port)) = rest.split_once(':') else {
        return Err("has no port: write vsock://CID:PORT".to_owned());
    };
    let cid: u32 = cid.parse().map_err(|_| format!("has CID {cid:?}: a number, the guest's guest-cid"))?;
    let who = match cid {
        0 => Some("the hypervisor"),
        1 => Some("local loopback"),
        2 => Some("the host itself"),
        ANY => Some("the wildcard VMADDR_CID_ANY"),
        _ => None,
    };
    if let Some(who) = who {
        return Err(format!(
            "has CID {cid}, {who}: the agent dials the guest, whose CID (QEMU's guest-cid) is \
             {FIRST_GUEST_CID} or more"
        ));
    }
    Ok(InformantAddr::Vsock { cid, port: vsock_port(port)? })
}

fn vsock_unix(rest: &str) -> Result<InformantAddr, String> {
    let Some((path, port)) = rest.rsplit_once(':') else {
        return Err("has no port: write vsock+unix:///PATH:PORT".to_owned());
    };
    if !path.starts_with('/') {
        return Err(format!(
            "has path {path:?}: an absolute path, so three slashes: vsock+unix:///run/vmscale/vm.vsock:7072"
        ));
    }
    if path.len() > MAX_UNIX_PATH {
        return Err(format!(
            "has a path of {} bytes; a unix socket path is at most {MAX_UNIX_PATH}",
            path.len()
        ));
    }
    if path.ends_with('/') {
        return Err(format!("has path {path:?}, a directory: name the backend's uds-path socket"));
    }
    Ok(InformantAddr::VsockUnix { path: PathBuf::from(path), port: vsock_port(port)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_addresses_parse_and_print_back() {
        let cases = [
            ("http://10.0.2.15:7080", InformantAddr::http("10.0.2.15", 7080)),
            ("http://[::1]:7080", InformantAddr::http("[::1]", 7080)),
            ("http://pg-1.vms.example:80", InformantAddr::http("pg-1.vms.example", 80)),
            ("https://10.0.2.15:7080", InformantAddr::Https { host: "10.0.2.15".into(), port: 7080 }),
            ("vsock://3:7072", InformantAddr::Vsock { cid: 3, port: 7072 }),
            ("vsock://4294967294:1", InformantAddr::Vsock { cid: u32::MAX - 1, port: 1 }),
            (
                "vsock+unix:///run/vmscale/pg-1.vsock:7072",
                InformantAddr::VsockUnix { path: "/run/vmscale/pg-1.vsock".into(), port: 7072 },
            ),
            (
                "vsock+unix:///odd:dir/v.sock:9",
                InformantAddr::VsockUnix { path: "/odd:dir/v.sock".into(), port: 9 },
            ),
        ];
        for (text, want) in cases {
            let got: InformantAddr = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text);
        }
    }

    #[test]
    fn bad_addresses_say_what_to_write() {
        let long_path = format!("vsock+unix:///{}:1", "a".repeat(120));
        let huge = "x".repeat(600);
        let cases: &[(&str, &str)] = &[
            ("", "is empty; write one of https://"),
            (
                "10.0.2.15:7080",
                "has no scheme this agent dials; write one of https://HOST:PORT, http://HOST:PORT",
            ),
            ("https://10.0.2.15", "has no port: write https://HOST:PORT"),
            ("https://a_b:7080", "a DNS name"),
            ("vsock:3:7072", "listen syntax; the agent dials vsock://CID:PORT"),
            ("http://10.0.2.15", "has no port"),
            ("http://10.0.2.15:0", "a TCP port is 1-65535"),
            ("http://10.0.2.15:70800", "a TCP port is 1-65535"),
            ("http://10.0.2.15:7080/", "with no path after it"),
            ("http://:7080", "an IPv4 address, [IPv6] in brackets or a DNS name"),
            ("http://[zz]:7080", "[IPv6] in brackets"),
            ("http://a_b:7080", "a DNS name"),
            ("http://10.0.2.15 :7080", "whitespace"),
            ("vsock://2:7072", "CID 2, the host itself: the agent dials the guest, whose CID"),
            ("vsock://0:7072", "the hypervisor"),
            ("vsock://1:7072", "local loopback"),
            ("vsock://4294967295:7072", "VMADDR_CID_ANY"),
            ("vsock://guest:7072", "a number, the guest's guest-cid"),
            ("vsock://3", "has no port: write vsock://CID:PORT"),
            ("vsock://3:0", "vsock port \"0\": 1 to 4294967294"),
            ("vsock://3:4294967295", "1 to 4294967294"),
            ("vsock://3:1:2", "vsock port \"1:2\""),
            ("vsock+unix://run/v.sock:7072", "an absolute path, so three slashes"),
            ("vsock+unix:///run/v.sock", "has no port: write vsock+unix:///PATH:PORT"),
            ("vsock+unix:///run/v.sock:x", "has vsock port \"x\""),
            ("vsock+unix:///run/:7072", "a directory"),
            (&long_path, "a unix socket path is at most 107"),
            (&huge, "more than any address (512)"),
        ];
        for (text, want) in cases {
            let e = text.parse::<InformantAddr>().unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e:?} should say {want:?}");
            assert!(e.starts_with("informant address "), "{e}");
        }
    }

    #[test]
    fn serde_goes_through_the_parser() {
        #[derive(Debug, Deserialize, Serialize)]
        struct T {
            a: InformantAddr,
        }
        let t: T = serde_json::from_str(r#"{"a":"vsock://3:7072"}"#).unwrap();
        assert_eq!(t.a, InformantAddr::Vsock { cid: 3, port: 7072 });
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"a":"vsock://3:7072"}"#);
        let e = serde_json::from_str::<T>(r#"{"a":"vsock://2:7072"}"#).unwrap_err().to_string();
        assert!(e.contains("the host itself"), "{e}");
    }
}
