//! Where the eBPF object file is found, by both loaders (the informant's
//! and the agent's run-queue programs).
//!
//! `cargo xtask build-ebpf` writes it to `<workspace>/target/ebpf/vmscale.bpf.o`.
//! The loader takes the path as a parameter (config). Without one,
//! `$VMSCALE_EBPF_OBJECT` names it when set (tests, ad-hoc runs); a path
//! given either way must exist, nothing else is tried. Otherwise it looks,
//! in order:
//!
//! 1. next to the running binary (`vmscale.bpf.o`): how images and packages
//!    ship it, beside `vmscale-informant`;
//! 2. at `<workspace>/target/ebpf/vmscale.bpf.o` of the checkout this crate
//!    was compiled from: `cargo run` and `cargo test` find the object xtask
//!    built without anyone copying it.
//!
//! Why not embed the object with `include_bytes!`: the eBPF build needs a
//! toolchain (Debian's rustc, LLVM 22, bpf-linker) that a plain `cargo build`
//! of the workspace must not require, and a build script that embeds the
//! object only when it happens to exist would make two kinds of binaries
//! from one command. A file next to the binary is explicit and the loader
//! says exactly where it looked.

use std::path::{Path, PathBuf};

/// No object at any place looked; the loaders wrap it in their own error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the eBPF object file is missing: {}; build it with `cargo xtask build-ebpf`", crate::preflight::list(.searched))]
pub struct ObjectMissing {
    pub searched: Vec<PathBuf>,
}

/// The object's file name, as xtask writes it.
pub const FILE_NAME: &str = "vmscale.bpf.o";
/// Environment variable naming the object file.
pub const ENV_VAR: &str = "VMSCALE_EBPF_OBJECT";

/// Where `cargo xtask build-ebpf` puts the object in the checkout this crate
/// was built from.
pub fn workspace_object() -> PathBuf {
    // This crate is agent-ebpf/common: the workspace is two levels up.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join("target").join("ebpf").join(FILE_NAME)
}

/// The places tried when no path is given, in order: `$VMSCALE_EBPF_OBJECT`
/// alone when set, else next to the binary and in the workspace.
pub fn candidates() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os(ENV_VAR).filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut v = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        v.push(dir.join(FILE_NAME));
    }
    v.push(workspace_object());
    v
}

/// The object to load: `explicit` if given (it must exist), else the first
/// default candidate that exists.
pub fn find(explicit: Option<&Path>) -> Result<PathBuf, ObjectMissing> {
    let searched = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => candidates(),
    };
    first_file(&searched).ok_or(ObjectMissing { searched })
}

fn first_file(paths: &[PathBuf]) -> Option<PathBuf> {
    paths.iter().find(|p| p.is_file()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_must_exist_and_is_named_in_the_error() {
        let e =
            find(Some(Path::new("/nonexistent/x.bpf.o"))).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("/nonexistent/x.bpf.o"), "{e}");
        assert!(e.contains("cargo xtask build-ebpf"), "{e}");
    }

    #[test]
    fn first_existing_candidate_wins() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.o");
        let b = dir.path().join("b.o");
        std::fs::write(&b, b"x").unwrap();
        assert_eq!(first_file(&[a.clone(), b.clone()]), Some(b.clone()));
        std::fs::write(&a, b"x").unwrap();
        assert_eq!(first_file(&[a.clone(), b]), Some(a));
    }

    #[test]
    fn workspace_object_is_under_target_ebpf() {
        let p = workspace_object();
        assert!(p.ends_with("target/ebpf/vmscale.bpf.o"), "{}", p.display());
    }
}
