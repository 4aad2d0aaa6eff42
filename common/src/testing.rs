//! For tests that need something a machine may lack (root, QEMU, BTF, PSI):
//! under `CI=true` such a test fails, so a skipped test is never counted as
//! passing there; elsewhere it says why it skips.

/// Whether `CI=true` is set.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Panics under `CI=true`; elsewhere prints why the test skips and returns
/// `true` (so `if cannot_run && skip_unless_ci(..) { return; }` reads well).
pub fn skip_unless_ci(reason: &str) -> bool {
    if in_ci() {
        panic!("cannot run under CI=true: {reason}");
    }
    eprintln!("skipping: {reason}");
    true
}

#[cfg(any(test, feature = "testing"))]
mod pki;
#[cfg(any(test, feature = "testing"))]
pub use pki::{PkiError, TestPki, LEAF_VALIDITY};
