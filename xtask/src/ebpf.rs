//! `cargo xtask build-ebpf`: builds the eBPF programs in agent-ebpf/ into
//! `target/ebpf/vmscale.bpf.o`, installing the toolchain first where it is
//! missing.
//!
//! The toolchain (measured to work on Debian 12, see shared/DESIGN.md):
//! Debian's rustc 1.96 with a prebuilt `core` for `bpfel-unknown-none`
//! (`rustc-web` and friends), LLVM 22, and `bpf-linker` 0.13.0 built against
//! that LLVM. Each step checks first and does nothing when all is there, so a
//! second run costs the cargo build only (a second or two).
//!
//! Where it can't install (not root, no apt-get, `--no-install`) it prints
//! the exact commands and fails.
//!
//! The object lands at a fixed path, `<workspace>/target/ebpf/vmscale.bpf.o`,
//! which the informant's loader looks for by default (see
//! `vmscale_informant::ebpf::ObjectPath`); nobody copies it by hand.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context};

/// Debian packages: Rust with the BPF core, LLVM 22 for bpf-linker.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang-22",
    "lld-22",
    "libzstd-dev",
    "zlib1g-dev",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's rustc-web installs these; the rustup toolchains have no BPF core.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// The `[[bin]]` of agent-ebpf/programs: the linked object.
const OBJECT_BIN: &str = "vmscale";
/// Where the object goes, relative to the workspace root.
pub const OBJECT_PATH: &str = "target/ebpf/vmscale.bpf.o";

#[derive(Debug, Default, clap::Args)]
pub struct Args {
    /// Don't install anything; print what is missing and how to install it.
    #[arg(long)]
    no_install: bool,
    /// Only check the toolchain (and install what is missing, unless
    /// --no-install); don't build.
    #[arg(long)]
    check: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = crate::workspace_root();
    // Why this run may not install, if it may not.
    let cannot_install = if a.no_install {
        Some("--no-install was given")
    } else if !is_root() {
        Some("not running as root")
    } else if which("apt-get").is_none() {
        Some("no apt-get here")
    } else {
        None
    };

    step("checking Debian packages");
    let missing = missing_apt_packages()?;
    report_packages(&missing);
    step("checking bpf-linker");
    let linker = bpf_linker_version();
    report_linker(linker.as_deref());
    let linker_ok = linker.as_deref() == Some(BPF_LINKER_VERSION);
    if let Some(why) = cannot_install.filter(|_| !missing.is_empty() || !linker_ok) {
        bail!("{}", what_to_run(why, &missing, linker_ok));
    }
    if !missing.is_empty() {
        install_apt_packages(&missing)?;
    }
    if !linker_ok {
        install_bpf_linker()?;
    }
    if a.check {
        println!("toolchain complete ({:.1} s)", started.elapsed().as_secs_f64());
        return Ok(());
    }

    step("building agent-ebpf");
    let built = build(&root)?;
    let out = root.join(OBJECT_PATH);
    let changed = install_object(&built, &out)?;
    let size = fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "{} {} ({size} bytes) in {:.1} s",
        if changed { "wrote" } else { "unchanged:" },
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}

fn report_packages(missing: &[String]) {
    if missing.is_empty() {
        println!("    all {} present", APT_PACKAGES.len());
    } else {
        println!("    missing: {}", missing.join(" "));
    }
}

fn report_linker(found: Option<&str>) {
    match found {
        Some(v) if v == BPF_LINKER_VERSION => println!("    bpf-linker {v} present"),
        Some(v) => println!("    bpf-linker {v} found, want {BPF_LINKER_VERSION}"),
        None => println!("    bpf-linker not found"),
    }
}

/// The commands that install what is missing, for when xtask can't.
fn what_to_run(why: &str, missing: &[String], linker_ok: bool) -> String {
    let mut s = format!("the eBPF toolchain is incomplete and this run does not install it ({why}); run:\n");
    if !missing.is_empty() {
        s.push_str(&format!(
            "  apt-get update && apt-get install -y --no-install-recommends {}\n",
            missing.join(" ")
        ));
    }
    if !linker_ok {
        s.push_str(&format!("  {}\n", bpf_linker_install_hint()));
    }
    s.push_str("then run `cargo xtask build-ebpf` again");
    s
}

fn install_apt_packages(missing: &[String]) -> anyhow::Result<()> {
    // Another apt run (a colleague's, unattended-upgrades) holds the lock
    // for a while at most: wait for it rather than fail.
    let lock_wait = ["-o", "DPkg::Lock::Timeout=600"];
    run_streaming(Command::new("apt-get").args(lock_wait).arg("update"), "apt-get update")?;
    let mut install = Command::new("apt-get");
    install
        .args(lock_wait)
        .args(["install", "-y", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run_streaming(&mut install, "apt-get install")?;
    let still = missing_apt_packages()?;
    if !still.is_empty() {
        bail!("apt-get install finished but these packages are still missing: {}", still.join(" "));
    }
    Ok(())
}

/// The packages of [`APT_PACKAGES`] that dpkg doesn't report as installed.
fn missing_apt_packages() -> anyhow::Result<Vec<String>> {
    if which("dpkg-query").is_none() {
        bail!(
            "this is not a Debian-like system (no dpkg-query); install by hand: Rust with a prebuilt \
             `core` for {BPF_TARGET} at {DEBIAN_RUSTC}, LLVM 22 under {LLVM_PREFIX}, and {}",
            bpf_linker_install_hint()
        );
    }
    // One call for all: `${Status}` is "install ok installed" when present;
    // unknown packages only print to stderr.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Status}\\n"])
        .args(APT_PACKAGES)
        .stderr(std::process::Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let listing = String::from_utf8_lossy(&out.stdout);
    Ok(APT_PACKAGES
        .iter()
        .filter(|p| !listing.lines().any(|l| l.starts_with(&format!("{p} ")) && l.ends_with(" installed")))
        .map(|p| (*p).to_owned())
        .collect())
}

fn install_bpf_linker() -> anyhow::Result<()> {
    println!("    building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2-5 minutes)");
    let mut install = Command::new(host_cargo());
    install
        .args(["install", "bpf-linker", "--force", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .env("PATH", path_with(&[PathBuf::from(LLVM_PREFIX).join("bin")]));
    run_streaming(&mut install, "cargo install bpf-linker")?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => Ok(()),
        other => {
            bail!("bpf-linker still not usable after install (found {other:?}); is ~/.cargo/bin on PATH?")
        }
    }
}

fn bpf_linker_install_hint() -> String {
    format!(
        "LLVM_PREFIX={LLVM_PREFIX} LLVM_SYS_221_PREFIX={LLVM_PREFIX} PATH={LLVM_PREFIX}/bin:$PATH \
         cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
    )
}

/// `bpf-linker --version` ("bpf-linker 0.13.0"), looked up on PATH and in
/// cargo's bin directory.
fn bpf_linker_version() -> Option<String> {
    let exe = which_with("bpf-linker", &cargo_bin_dir())?;
    let out = Command::new(exe).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// Builds agent-ebpf with Debian's rustc and returns the linked object.
fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("agent-ebpf");
    let mut cargo = Command::new(DEBIAN_CARGO);
    cargo
        .current_dir(&dir)
        .args(["build", "--release", "--target", BPF_TARGET])
        .env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf and the inline BPF atomics use unstable features.
        .env("RUSTC_BOOTSTRAP", "1")
        // bpf-linker is found on PATH.
        .env("PATH", path_with(&[cargo_bin_dir()]));
    // What the calling cargo or the user's shell set for host builds must
    // not leak into the BPF build (RUSTFLAGS would replace agent-ebpf's
    // rustflags; the others would move or wrap the build).
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        cargo.env_remove(var);
    }
    run_streaming(&mut cargo, "cargo build (agent-ebpf)")?;
    let built = dir.join("target").join(BPF_TARGET).join("release").join(OBJECT_BIN);
    if !built.is_file() {
        bail!("the build succeeded but {} is missing", built.display());
    }
    Ok(built)
}

/// Copies the object to its stable path unless it is already there with the
/// same bytes (so its mtime only moves when it changed). True if it wrote.
fn install_object(built: &Path, out: &Path) -> anyhow::Result<bool> {
    let bytes = fs::read(built).with_context(|| format!("reading {}", built.display()))?;
    if fs::read(out).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    let dir = out.parent().context("object path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = out.with_extension("o.tmp");
    fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(true)
}

/// Runs a command with its output going straight to ours, so long installs
/// show their progress.
fn run_streaming(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // The effective uid is the second field of "Uid:" in /proc/self/status.
    fs::read_to_string("/proc/self/status").ok().is_some_and(|s| {
        s.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1)) == Some("0")
    })
}

fn cargo_bin_dir() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h).join("bin"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo").join("bin"),
    }
}

/// The cargo that runs xtask (rustup's), for `cargo install`.
fn host_cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// PATH with `first` in front.
fn path_with(first: &[PathBuf]) -> OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(first.iter().cloned().chain(std::env::split_paths(&rest))).unwrap_or(rest)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn which_with(name: &str, extra: &Path) -> Option<PathBuf> {
    which(name).or_else(|| Some(extra.join(name)).filter(|p| p.is_file()))
}
