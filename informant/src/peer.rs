//! Who may talk to the informant over vsock: only the host. Any process in
//! any other VM the hypervisor lets reach this guest's vsock (a sibling CID,
//! a vhost-device-vsock group) could otherwise approve nothing but ask
//! everything: read the guest's pressure stream, take its CPUs offline
//! through a downscale. The host is `VMADDR_CID_HOST` (2) whether the
//! transport is the kernel's vhost-vsock or a vhost-user backend, which
//! presents host connections as coming from CID 2 too.
//!
//! TCP has no such check: on TCP the guest's own network policy decides.

/// `VMADDR_CID_HOST`: the host, as every guest sees it.
pub const VMADDR_CID_HOST: u32 = 2;

/// A vsock peer that is not the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("vsock connection from CID {cid} closed: only the host (CID 2) may talk to the informant")]
pub struct NotHost {
    pub cid: u32,
}

/// Whether a vsock connection from `cid` may be served.
pub fn host_only(cid: u32) -> Result<(), NotHost> {
    if cid == VMADDR_CID_HOST {
        Ok(())
    } else {
        Err(NotHost { cid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_is_served() {
        // (peer CID, served): the hypervisor, loopback, the host, guests,
        // the wildcard.
        let table = [(0, false), (1, false), (2, true), (3, false), (42, false), (u32::MAX, false)];
        for (cid, served) in table {
            assert_eq!(host_only(cid).is_ok(), served, "CID {cid}");
        }
        let e = host_only(7).unwrap_err().to_string();
        assert!(e.contains("CID 7") && e.contains("only the host (CID 2)"), "{e}");
    }
}
