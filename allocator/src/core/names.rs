//! What a name or a free-text field from an agent may be. Names are keys of
//! the core's maps and appear in logs, metrics labels and certificates, so
//! each has a length bound and a character set; free text (a move's reason)
//! is cut to a bound instead of refused.

use super::error::{CoreError, Result};
use vmscale_common::tls::node_name_ok;

/// Longest VM id accepted: the contract's (a Kubernetes object name's bound).
pub const MAX_ID_LEN: usize = vmscale_contract::vm_id::MAX_LEN;

/// Longest node name: the agent's certificate names it as
/// `<node>.node.vmscale`, which must stay within a DNS name's 253 bytes.
pub const MAX_NODE_LEN: usize = 240;

/// A node name: what can be the node's certificate identity
/// (`vmscale_common::tls::node_name_ok`: lower-case DNS labels, as a
/// Kubernetes Node name, no wildcard), so that the name a hello carries is
/// one a certificate can vouch for.
pub fn check_node_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(CoreError::invalid(what, "must not be empty"));
    }
    if name.len() > MAX_NODE_LEN {
        return Err(CoreError::invalid(what, format!("is longer than {MAX_NODE_LEN} bytes")));
    }
    if !node_name_ok(name) {
        return Err(CoreError::invalid(
            what,
            format!(
                "{:?} is not a DNS name: use lower-case letters, digits, '-' and '.' (as a Kubernetes Node name)",
                cut(name, 64)
            ),
        ));
    }
    Ok(())
}

/// A VM id: what the contract takes as one (`vmscale_contract::vm_id`, the
/// agent's rule too): 1 to [`MAX_ID_LEN`] bytes, no control characters, and
/// a record file name for it within `NAME_MAX`.
pub fn check_vm_id(what: &str, id: &str) -> Result<()> {
    vmscale_contract::vm_id::check(id)
        .map_err(|e| CoreError::invalid(what, format!("{:?}: {e}", cut(id, 64))))
}

/// `s` cut to at most `max` bytes at a character boundary: what is kept of
/// free text (and what is quoted of a bad name in an error).
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_names() {
        for ok in ["a", "node-a", "n1.example", "x".repeat(63).as_str()] {
            assert!(check_node_name("node", ok).is_ok(), "{ok}");
        }
        let long = format!("{}.{}.{}.{}", "a".repeat(60), "b".repeat(60), "c".repeat(60), "d".repeat(60));
        for bad in ["", "Node", "a_b", "-a", "a-", "a..b", "a/b", "a\n", "ä", long.as_str(), &"x".repeat(64)]
        {
            let e = check_node_name("node", bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid node"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn vm_ids_are_the_contracts() {
        for ok in ["pg-1", "db/pg", "ns/pod.x:1@a+b", &"v".repeat(239)] {
            assert!(check_vm_id("vm id", ok).is_ok(), "{ok}");
        }
        // Too long, a control character, or a record file name past NAME_MAX
        // once escaped (each '/' takes three bytes).
        for bad in ["", "a\u{7}", &"v".repeat(MAX_ID_LEN + 1), &"/".repeat(100)] {
            let e = check_vm_id("vm id", bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid vm id"), "{bad:?}: {e}");
            assert!(e.to_string().len() < 300, "{e}");
        }
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("abcdef", 3), "abc");
        // 'é' is two bytes: a cut in its middle drops it whole.
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("ééé", 4), "éé");
        assert_eq!(cut("", 0), "");
    }
}
