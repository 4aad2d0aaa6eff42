//! The informant for the guest: a static(-pie) binary, so it runs in a
//! busybox initramfs that has no C library or loader.
//!
//! It builds in its own target directory: the `+crt-static` RUSTFLAGS would
//! otherwise invalidate the normal build's cache on every switch.

use anyhow::{bail, Context};
use std::path::Path;
use std::process::Command;

use crate::steps::{cargo, Steps};

const PACKAGE: &str = "vmscale-informant";
const BINARY: &str = "vmscale-informant";
/// Naming the target explicitly keeps RUSTFLAGS off build scripts and proc
/// macros, which must stay dynamic host programs.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Relative to the workspace root.
pub const TARGET_DIR: &str = "target/guest-build";

/// Builds the static informant and returns the binary.
pub fn build(steps: &mut Steps, root: &Path) -> anyhow::Result<Vec<u8>> {
    let target_dir = root.join(TARGET_DIR);
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", PACKAGE, "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    // Flags the caller set for host builds would replace ours.
    for var in ["CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(var);
    }
    steps.run("build the static informant (first build: a few minutes)", &mut cmd)?;
    let built = target_dir.join(TARGET).join("release").join(BINARY);
    // The release profile's line tables are four fifths of the binary; the
    // guest keeps the symbols (names in backtraces) and loses the rest.
    // Stripped to a name of this process's own, then renamed into place:
    // two builds at once (a test and the demo, say) must not read each
    // other's half-written file.
    let bin = target_dir.join(format!("{BINARY}.guest"));
    let tmp = target_dir.join(format!("{BINARY}.guest.{}", std::process::id()));
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&built)
        .arg(&tmp)
        .status()
        .context("cannot run objcopy (binutils) to strip the informant")?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!("objcopy --strip-debug {} failed ({status})", built.display());
    }
    let bytes = std::fs::read(&tmp).with_context(|| format!("reading {}", tmp.display()));
    let checked = bytes.and_then(|b| check_static(&tmp, &b).map(|()| b));
    let renamed =
        std::fs::rename(&tmp, &bin).with_context(|| format!("renaming {} into place", tmp.display()));
    if checked.is_err() || renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let bytes = checked?;
    renamed?;
    Ok(bytes)
}

/// Fails unless the binary would start without a dynamic loader.
fn check_static(bin: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if super::elf::has_interpreter(bytes).with_context(|| format!("reading {} as ELF", bin.display()))? {
        bail!(
            "{} is dynamically linked (it names a program interpreter); the guest has no loader. \
             Was RUSTFLAGS overridden?",
            bin.display()
        );
    }
    eprintln!("    {} is static ({} bytes, no program interpreter)", bin.display(), bytes.len());
    Ok(())
}
