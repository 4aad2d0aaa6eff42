//! Debian packages the project needs, installed when missing (as root), or
//! named with the exact command to run otherwise.

use anyhow::{bail, Context};
use std::process::Command;

/// Packages of `pkgs` that dpkg does not report as installed.
pub fn missing(pkgs: &[&str]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|p| (*p).to_owned())
        .collect()
}

/// Installs what is missing of `pkgs`; `why` says what needs them.
pub fn ensure(pkgs: &[&str], why: &str) -> anyhow::Result<()> {
    let need = missing(pkgs);
    if need.is_empty() {
        eprintln!("    {why}: {} already installed", pkgs.join(", "));
        return Ok(());
    }
    let cmd = format!("apt-get update && apt-get install -y --no-install-recommends {}", need.join(" "));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc_geteuid() } == 0;
    if !root {
        bail!("{why} needs Debian packages {}; run as root: {cmd}", need.join(", "));
    }
    eprintln!("    {why}: installing {}", need.join(", "));
    let ok = Command::new("apt-get").arg("update").status().context("cannot run apt-get update")?.success();
    if !ok {
        bail!("apt-get update failed; fix the package sources, then run: {cmd}");
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&need)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get install")?
        .success();
    if !ok {
        bail!("installing {} failed; try: {cmd}", need.join(", "));
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
