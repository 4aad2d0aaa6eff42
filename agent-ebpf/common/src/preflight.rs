//! Checks before loading, so that a machine without what eBPF needs gets a
//! sentence naming it instead of an errno from deep inside aya. Both loaders
//! (the informant's in the guest, the agent's on the host) run them.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// What a check found missing. Each message names it.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing capability CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load and attach eBPF programs \
         (effective set {effective:#x})"
    )]
    Capability { effective: u64 },
    #[error("tracefs is not mounted (looked at {}) and mounting it failed", list(.looked_at))]
    TracefsMount {
        looked_at: Vec<PathBuf>,
        #[source]
        source: std::io::Error,
    },
    #[error("tracefs is not mounted (looked at {})", list(.looked_at))]
    TracefsMissing { looked_at: Vec<PathBuf> },
    #[error("reading {path}", path = .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, PreflightError>;
use PreflightError as Error;

/// Paths for a message, comma-separated.
pub fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Loading tracepoint programs needs CAP_BPF and attaching them
/// CAP_PERFMON (kernel 5.8+), or CAP_SYS_ADMIN for both (any kernel).
pub fn check_capabilities(proc_root: &Path) -> Result<()> {
    let path = proc_root.join("self/status");
    let status = std::fs::read_to_string(&path).map_err(|source| Error::Read { path, source })?;
    let effective = effective_caps(&status).unwrap_or(0);
    if caps_suffice(effective) {
        Ok(())
    } else {
        Err(Error::Capability { effective })
    }
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn caps_suffice(effective: u64) -> bool {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Where aya looks for tracefs (it does not take a parameter), relative to
/// the sysfs root.
fn tracefs_dirs(sys_root: &Path) -> [PathBuf; 2] {
    [sys_root.join("kernel/tracing"), sys_root.join("kernel/debug/tracing")]
}

/// Makes sure tracefs is mounted where aya looks for it, mounting it at
/// `<sys>/kernel/tracing` if allowed. This must happen before the first
/// attach: aya caches where it found tracefs (or that it found none).
pub fn ensure_tracefs(sys_root: &Path, mount: bool) -> Result<()> {
    let dirs = tracefs_dirs(sys_root);
    if dirs.iter().any(|d| is_tracefs(d)) {
        return Ok(());
    }
    let looked_at = dirs.to_vec();
    if !mount {
        return Err(Error::TracefsMissing { looked_at });
    }
    mount_tracefs(&dirs[0]).map_err(|source| Error::TracefsMount { looked_at: looked_at.clone(), source })?;
    if is_tracefs(&dirs[0]) {
        Ok(())
    } else {
        Err(Error::TracefsMissing { looked_at })
    }
}

/// A mounted tracefs has an `events` directory; the bare mount point of an
/// unmounted one is empty.
fn is_tracefs(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

fn mount_tracefs(target: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = CString::new(target.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let fstype = c"tracefs";
    // SAFETY: all three strings are valid NUL-terminated C strings that
    // outlive the call, and a null `data` pointer is allowed for tracefs.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the kernel exposes its BTF. The programs need no CO-RE
/// relocations, so loading may work without it; it is named in the error
/// when loading fails.
pub fn has_btf(sys_root: &Path) -> bool {
    sys_root.join("kernel/btf/vmlinux").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_from_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("Name:\tx\n"), None);
        let cases = [
            (0u64, false),
            (1 << CAP_SYS_ADMIN, true),
            (1 << CAP_BPF, false),
            ((1 << CAP_BPF) | (1 << CAP_PERFMON), true),
            (0x1ff_ffff_ffff, true),
        ];
        for (mask, want) in cases {
            assert_eq!(caps_suffice(mask), want, "{mask:#x}");
        }
    }

    #[test]
    fn capability_error_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("self/status"), "CapEff:\t0000000000000000\n").unwrap();
        let e = check_capabilities(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("CAP_BPF") && e.contains("CAP_SYS_ADMIN"), "{e}");
    }

    #[test]
    fn tracefs_found_at_either_place_or_named_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        std::fs::create_dir_all(sys.join("kernel/tracing")).unwrap();
        let e = ensure_tracefs(sys, false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("tracefs is not mounted") && e.contains("kernel/tracing"), "{e}");
        std::fs::create_dir_all(sys.join("kernel/debug/tracing/events")).unwrap();
        assert!(ensure_tracefs(sys, false).is_ok());
    }

    #[test]
    fn btf_is_a_file_under_sys() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!has_btf(dir.path()));
        std::fs::create_dir_all(dir.path().join("kernel/btf")).unwrap();
        std::fs::write(dir.path().join("kernel/btf/vmlinux"), b"").unwrap();
        assert!(has_btf(dir.path()));
    }
}
