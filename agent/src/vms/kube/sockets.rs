//! Where a VM pod's QMP socket is: a directory on this node derived from the
//! pod's UID, never a path the pod names. The pod names at most the file in
//! it (`vmscale.io/qmp`, checked by the contract), so it can point the agent
//! at no other process's monitor and at no `tcp:` endpoint.
//!
//! The default is the pod's `emptyDir` volume named `vmscale`, as the
//! kubelet lays it out under its pods directory, which the agent's
//! DaemonSet mounts read-only at `/pods` (deploy/kustomize/base/agent.yaml):
//! the kubelet makes that directory for the pod alone, and only the pod's
//! containers can write into it. QEMU in the pod listens on
//! `<its mount of the volume>/qmp.sock`.

use std::path::PathBuf;
use vmscale_contract::annotations::MAX_QMP_FILE_LEN;

/// The placeholder for the pod's UID in [`PodSockets`]' template.
pub const UID: &str = "{uid}";

/// The default template: the pod's `vmscale` emptyDir under the kubelet's
/// pods directory, mounted at `/pods` in the agent's container.
pub const DEFAULT_TEMPLATE: &str = "/pods/{uid}/volumes/kubernetes.io~empty-dir/vmscale";

/// A unix socket address holds a path of at most this many bytes (108 with
/// the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Length of a pod UID (a UUID in its text form).
const UID_LEN: usize = 36;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketDirError {
    #[error(
        "pod_socket_dir = {0:?} must be an absolute path with {UID} as one whole component, and no `.` or \
         `..` components"
    )]
    Template(String),
    #[error(
        "pod_socket_dir = {template:?} is too long: with a pod UID and a {MAX_QMP_FILE_LEN}-byte socket name \
         the path is {len} bytes, and a unix socket path holds at most {SUN_PATH_MAX}; mount the kubelet's \
         pods directory at a shorter path"
    )]
    TooLong { template: String, len: usize },
    #[error("the pod has no UID, so it has no socket directory")]
    NoUid,
    #[error("the pod's UID {0:?} is not a UUID, so it names no socket directory")]
    BadUid(String),
}

/// The per-pod socket directory template, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSockets {
    template: String,
}

impl Default for PodSockets {
    fn default() -> Self {
        PodSockets { template: DEFAULT_TEMPLATE.to_owned() }
    }
}

impl PodSockets {
    /// Checks `template`: absolute, `{uid}` one whole component, no `.` or
    /// `..`, and short enough for any socket name the contract allows.
    pub fn new(template: &str) -> Result<PodSockets, SocketDirError> {
        let parts: Vec<&str> = template.split('/').skip(1).collect();
        let ok = template.starts_with('/')
            && parts.iter().filter(|p| **p == UID).count() == 1
            && !parts
                .iter()
                .any(|p| p.is_empty() || *p == "." || *p == ".." || (*p != UID && p.contains('{')));
        if !ok {
            return Err(SocketDirError::Template(template.to_owned()));
        }
        let len = template.len() - UID.len() + UID_LEN + 1 + MAX_QMP_FILE_LEN;
        if len > SUN_PATH_MAX {
            return Err(SocketDirError::TooLong { template: template.to_owned(), len });
        }
        Ok(PodSockets { template: template.to_owned() })
    }

    /// The QMP socket of the pod with `uid`, named `file` (checked by the
    /// contract) in its directory. The UID comes from the API server, but it
    /// becomes a path, so it is checked all the same.
    pub fn qmp(&self, uid: Option<&str>, file: &str) -> Result<PathBuf, SocketDirError> {
        let uid = uid.ok_or(SocketDirError::NoUid)?;
        let uuid = uid.len() == UID_LEN && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        if !uuid {
            return Err(SocketDirError::BadUid(uid.to_owned()));
        }
        Ok(PathBuf::from(self.template.replace(UID, uid)).join(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID_A: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    #[test]
    fn the_socket_is_in_the_pods_own_directory() {
        let s = PodSockets::default();
        assert_eq!(PodSockets::new(DEFAULT_TEMPLATE), Ok(s.clone()));
        assert_eq!(
            s.qmp(Some(UID_A), "qmp.sock").unwrap(),
            PathBuf::from(format!("/pods/{UID_A}/volumes/kubernetes.io~empty-dir/vmscale/qmp.sock"))
        );
        let s = PodSockets::new("/var/run/vmscale/pods/{uid}").unwrap();
        assert_eq!(
            s.qmp(Some(UID_A), "m.sock").unwrap(),
            PathBuf::from(format!("/var/run/vmscale/pods/{UID_A}/m.sock"))
        );
    }

    #[test]
    fn uids_that_are_no_uuid_name_no_directory() {
        let s = PodSockets::default();
        assert_eq!(s.qmp(None, "qmp.sock"), Err(SocketDirError::NoUid));
        for bad in ["..", "../../etc", "7c9e6679-7425-40de-944b-e07fc1f90ae/", "x"] {
            assert!(matches!(s.qmp(Some(bad), "qmp.sock"), Err(SocketDirError::BadUid(_))), "{bad}");
        }
    }

    #[test]
    fn templates_are_checked() {
        for bad in [
            "pods/{uid}",
            "/pods",
            "/pods/{uid}/{uid}",
            "/pods/x{uid}",
            "/pods/../{uid}",
            "/pods//{uid}",
            "/p/{node}/{uid}",
        ] {
            assert!(matches!(PodSockets::new(bad), Err(SocketDirError::Template(_))), "{bad}");
        }
        // The kubelet's own path is too long for a socket address.
        let e = PodSockets::new("/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/vmscale")
            .unwrap_err();
        assert!(e.to_string().contains("at most 107"), "{e}");
    }
}
