//! VM ids: the allocator's key for a VM, and part of a file name on every
//! node that keeps records of it (`agent/src/migration` writes one record
//! file per VM, named by [`file_stem`]). An id that passes [`check`] is
//! both.
//!
//! A pod's VM id is bound to its namespace ([`of_pod`]): a pod may choose
//! the part after the `/` (`vmscale.io/vm-id`), never the namespace, so no
//! pod can claim the id of a VM in another namespace. Within a namespace the
//! agent gives a contested id to the pod that held it first (by UID and
//! creation time, `agent/src/vms/kube/table.rs`).

/// Longest VM id: a Kubernetes object name's limit.
pub const MAX_LEN: usize = 253;
/// Longest file name Linux takes (`NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Kept free in a file name for the extension a record gets (`.json`,
/// `.json.tmp`, ...).
pub const EXTENSION_ROOM: usize = 16;

/// What is wrong with a VM id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmIdError {
    #[error("vm id is empty")]
    Empty,
    #[error("vm id is {len} bytes long; at most {MAX_LEN}")]
    TooLong { len: usize },
    #[error("vm id has a control character")]
    Control,
    #[error(
        "vm id escapes to a {len}-byte file name; at most {} (use fewer characters outside \
         [A-Za-z0-9_-])",
        NAME_MAX - EXTENSION_ROOM
    )]
    FileName { len: usize },
}

/// The file name stem of a VM's records: the id with every byte outside
/// `[A-Za-z0-9_-]` written as `%XX`, so that an id with `/` or `..` in it
/// never names a path elsewhere.
pub fn file_stem(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks that `id` can be a VM id: 1 to [`MAX_LEN`] bytes, no control
/// characters, and a record file name for it fits in [`NAME_MAX`].
pub fn check(id: &str) -> Result<(), VmIdError> {
    if id.is_empty() {
        return Err(VmIdError::Empty);
    }
    if id.len() > MAX_LEN {
        return Err(VmIdError::TooLong { len: id.len() });
    }
    if id.chars().any(char::is_control) {
        return Err(VmIdError::Control);
    }
    let len = file_stem(id).len();
    if len > NAME_MAX - EXTENSION_ROOM {
        return Err(VmIdError::FileName { len });
    }
    Ok(())
}

/// A pod's VM id: `<namespace>/<name>`, where `name` is the pod's
/// `vmscale.io/vm-id` or else the pod's own name.
pub fn of_pod(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Whether `name` may be the part of a VM id a pod chooses: ASCII letters,
/// digits, `.`, `_` and `-`, not starting with `.`. No `/`: the namespace
/// part is not the pod's to choose.
pub fn is_pod_chosen_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stems_stay_in_their_directory() {
        assert_eq!(file_stem("pg-1_a"), "pg-1_a");
        assert_eq!(file_stem("../x/y"), "%2E%2E%2Fx%2Fy");
        assert_eq!(file_stem("db/pg-0"), "db%2Fpg-0");
    }

    #[test]
    fn ids_are_bounded_as_names_and_as_file_names() {
        assert_eq!(check("db/pg-0"), Ok(()));
        assert_eq!(check(""), Err(VmIdError::Empty));
        assert_eq!(check("a\u{7}b"), Err(VmIdError::Control));
        // A record's name holds 239 bytes of the id's escaped form.
        assert_eq!(check(&"a".repeat(239)), Ok(()));
        assert_eq!(check(&"a".repeat(240)), Err(VmIdError::FileName { len: 240 }));
        assert_eq!(check(&"a".repeat(254)), Err(VmIdError::TooLong { len: 254 }));
        // 80 dots are 240 bytes escaped: one more than a record name may hold.
        assert_eq!(check(&".".repeat(79)), Ok(()));
        assert_eq!(check(&".".repeat(80)), Err(VmIdError::FileName { len: 240 }));
        // The longest namespace (63) and a 189-byte name with no dots fit.
        assert_eq!(check(&of_pod(&"n".repeat(63), &"p".repeat(173))), Ok(()));
    }

    #[test]
    fn pods_choose_only_the_name_part() {
        for good in ["db-7", "pg_0", "a.b", "A9"] {
            assert!(is_pod_chosen_name(good), "{good}");
        }
        for bad in ["", "other-ns/db", "../x", ".hidden", "a b", "db\u{0}"] {
            assert!(!is_pod_chosen_name(bad), "{bad:?}");
        }
        assert_eq!(of_pod("db", "pg-0"), "db/pg-0");
    }
}
