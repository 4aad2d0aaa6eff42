//! `cargo xtask package`: the informant as a Debian package,
//! `target/package/vmscale-informant_<version>_amd64.deb`, built with
//! `dpkg-deb --build --root-owner-group` and nothing else.
//!
//! It holds the release informant (a normal glibc build: the guests it is
//! made for run bookworm like this host, and `Depends: libc6 (>= <this
//! host's glibc>)` says so), the eBPF object, `deploy/informant.service` as
//! `vmscale-informant.service` and `deploy/informant.toml` as the conffile
//! `/etc/vmscale/informant.toml`, both unchanged. `control.rs` says what goes
//! where; `deb.rs` lays it out and runs dpkg-deb, once per set of inputs.

mod control;
mod deb;

use anyhow::Context;
use std::path::PathBuf;

use crate::steps::{cargo, Steps};

/// Where the package goes, relative to the workspace root.
pub const OUT_DIR: &str = "target/package";
/// How many of a caller's [`Steps`] [`build`] takes.
pub const STEPS: usize = 3;

#[derive(Debug, Default, clap::Args)]
pub struct Args {}

/// A built package.
#[derive(Debug, Clone)]
pub struct Package {
    pub path: PathBuf,
    /// Of the .deb file, hex.
    pub sha256: String,
}

pub fn run(_: Args) -> anyhow::Result<()> {
    let mut steps = Steps::new(STEPS);
    let p = build(&mut steps)?;
    println!("package: {} (sha256 {})", p.path.display(), &p.sha256[..12]);
    println!("install it in a bookworm guest: dpkg -i {}", p.path.display());
    Ok(())
}

/// Builds the informant, the eBPF object and the package where any changed.
pub fn build(steps: &mut Steps) -> anyhow::Result<Package> {
    let root = crate::workspace_root();
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", "vmscale-informant"]);
    steps.run("build the informant (release, glibc)", &mut cmd)?;
    steps.call("the eBPF object (cargo xtask build-ebpf)", || crate::ebpf::run(Default::default()))?;
    let mut out = None;
    steps.call("the Debian package (dpkg-deb)", || {
        out = Some(deb::assemble(&root, env!("CARGO_PKG_VERSION"))?);
        Ok(())
    })?;
    out.context("the package step gave nothing")
}
