//! `cargo xtask build-guest --os debian`: a real Debian bookworm guest with
//! systemd, PostgreSQL 15 and the informant's Debian package, in
//! `target/guest-debian/`:
//!
//! - `rootfs.img`: the root filesystem, raw ext4 (3 GiB, sparse), only ever
//!   a read-only backing file: each VM writes to its own qcow2 overlay
//!   ([`overlay`]), which a migration target QEMU on the same host opens too;
//! - `vmlinuz`, `initrd.img`: Debian's kernel and its initramfs (only the
//!   modules to mount the root: `files/initramfs.conf`), and `vmlinux`, the
//!   same kernel uncompressed, which boots faster ([`DebianImage::kernel`]);
//! - `cmdline`: [`CMDLINE`]; `manifest.txt`: what went in (every package's
//!   version); `inputs.hash`: decides whether a run has anything to do.
//!
//! How it is made (`rootfs.rs`): mmdebstrap (`mmdebstrap.rs`) from the
//! host's Debian mirror into a staging directory, the configuration files in
//! `files/` copied in by its hooks (`assets.rs` says where each lands) and
//! `files/setup.sh` run in the chroot (installs the package, masks what a
//! test VM does not need, sets up PostgreSQL), then `mkfs.ext4 -d`: no loop
//! device, no mount, no Docker. The image is remade only when its inputs
//! change: the package list, the informant package's hash, the files, the
//! mirror, [`FORMAT`].
//!
//! In the guest: PostgreSQL 15 (cluster 15/main, user `postgres`, password
//! [`PG_PASSWORD`], database `pgbench`) in `workload.slice`, the informant
//! watching that slice, an address from the kernel command line, and one
//! line on the serial console starting with [`READY_PREFIX`] when both are
//! up. `--smoke` boots it and queries PostgreSQL from the host (`smoke.rs`).

mod assets;
pub mod boot;
mod mmdebstrap;
mod rootfs;
mod smoke;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::guest::write_atomic;
use crate::steps::Steps;

/// Where the image goes, relative to the workspace root.
pub const IMAGE_DIR: &str = "target/guest-debian";
/// The start of the guest's ready line on the serial console, written by
/// `files/vmscale-ready` once PostgreSQL and the informant are up or have
/// failed: `vmscale-guest: ready postgres=<state> informant=<state>`, the
/// states as `systemctl is-active` says them (`active` when all is well).
pub const READY_PREFIX: &str = "vmscale-guest: ready";
/// PostgreSQL's port in the guest.
pub const PG_PORT: u16 = 5432;
/// The password of PostgreSQL's `postgres` user in this demo image (set at
/// build time; connections from the network need it).
pub const PG_PASSWORD: &str = "vmscale";
/// Kernel command line. Each part, and why:
/// - `root=/dev/vda rw`: the root filesystem is the first virtio disk (the
///   VM's overlay), mounted writable at once (no fsck, no remount);
/// - `console=ttyS0`: the serial console, where the ready line and the
///   kernel's errors go;
/// - `quiet loglevel=4`: only errors and worse reach the console, so boot
///   chatter costs no time under TCG, while the OOM killer's "Out of memory:
///   Killed process" line (KERN_ERR) still does;
/// - `panic=-1`: reboot at once on a panic, which `-no-reboot` turns into
///   QEMU exiting;
/// - `net.ifnames=0`: the NIC stays `eth0`, so nothing renames it while
///   `vmscale-cmdline` configures it;
/// - `memhp_default_state=online_movable memory_hotplug.memmap_on_memory=1`:
///   as the busybox guest (`crate::guest::CMDLINE`): hot-added memory online
///   at once and movable, each block's memory map inside the block.
///
/// The image reads its own keys too (`files/vmscale-cmdline`):
/// `vmscale.ip=ADDR/PREFIX`, `vmscale.gw=GW`, `vmscale.informant=ARG,...`.
pub const CMDLINE: &str = "root=/dev/vda rw console=ttyS0 quiet loglevel=4 panic=-1 net.ifnames=0 \
                           memhp_default_state=online_movable memory_hotplug.memmap_on_memory=1";
/// Bumped when the image changes in a way its inputs don't show.
pub const FORMAT: u32 = 1;
/// Host packages: mmdebstrap and mkfs.ext4 make the image, qemu-img its
/// overlays, QEMU boots it.
const HOST_PACKAGES: &[&str] = &["mmdebstrap", "e2fsprogs", "qemu-utils", "qemu-system-x86"];
/// How many of a caller's [`Steps`] [`ensure`] takes.
pub const ENSURE_STEPS: usize = 2 + crate::package::STEPS;

/// A built Debian guest.
#[derive(Debug, Clone)]
pub struct DebianImage {
    /// What QEMU's `-kernel` takes: `vmlinux` (PVH entry, faster under TCG)
    /// where the kernel has one, else `vmlinuz`.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Raw ext4; never boot it directly, boot an [`overlay`] of it.
    pub rootfs: PathBuf,
    /// [`CMDLINE`]; add `vmscale.ip=...` and the like per VM.
    pub cmdline: String,
}

/// `cargo xtask build-guest --os debian [--smoke]`.
pub fn run(smoke: bool, smoke_timeout: Duration) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let mut steps = Steps::new(ENSURE_STEPS + usize::from(smoke));
    let image = ensure(&mut steps)?;
    if smoke {
        let mut report = None;
        steps.call("smoke test: boot under QEMU (TCG), wait for the ready line, query PostgreSQL", || {
            report = Some(smoke::run(&root, &image, smoke_timeout)?);
            Ok(())
        })?;
        if let Some(r) = report {
            println!(
                "smoke test passed: ready line after {:.1} s, first query (SELECT 1 through the port \
                 forward) after {:.1} s (from QEMU's start, TCG)",
                r.ready_s, r.query_s
            );
        }
    }
    Ok(())
}

/// Builds the image (in this workspace's `target/guest-debian`) where its
/// inputs changed and returns it; progress goes to `steps` ([`ENSURE_STEPS`]
/// of them). Needs root to build (mmdebstrap's root mode); an up-to-date
/// image is returned without.
pub fn ensure(steps: &mut Steps) -> anyhow::Result<DebianImage> {
    ensure_in(&crate::workspace_root(), steps)
}

/// [`ensure`] for the workspace at `root`.
pub fn ensure_in(root: &Path, steps: &mut Steps) -> anyhow::Result<DebianImage> {
    let started = Instant::now();
    let dir = root.join(IMAGE_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    steps.call("host packages (mmdebstrap, e2fsprogs, qemu-utils, QEMU)", || {
        crate::apt::ensure(HOST_PACKAGES, "the Debian guest image")
    })?;
    let package = crate::package::build(steps)?;
    let inputs = inputs(&package.sha256)?;
    let hash = sha256_hex(inputs.as_bytes());
    let mut image = None;
    steps.call("the Debian root filesystem (mmdebstrap, mkfs.ext4)", || {
        // Two runs at once (a test and the demo, say) would build into one
        // staging directory and break each other: the second waits, then
        // finds the image up to date. The lock goes with the file handle.
        let lock = fs::File::create(dir.join(".build.lock"))?;
        lock.lock().with_context(|| format!("locking {}", dir.join(".build.lock").display()))?;
        image = Some(build_if_changed(&dir, &package.path, &inputs, &hash)?);
        Ok(())
    })?;
    let image = image.context("the image step gave nothing")?;
    eprintln!("    kernel command line: {}", image.cmdline);
    eprintln!("    debian guest image in {} ({:.1} s)", dir.display(), started.elapsed().as_secs_f64());
    Ok(image)
}

fn build_if_changed(dir: &Path, deb: &Path, inputs: &str, hash: &str) -> anyhow::Result<DebianImage> {
    let vmlinux = dir.join("vmlinux");
    let image = |kernel| DebianImage {
        kernel,
        initrd: dir.join("initrd.img"),
        rootfs: dir.join("rootfs.img"),
        cmdline: CMDLINE.to_owned(),
    };
    let hash_file = dir.join("inputs.hash");
    let complete = ["rootfs.img", "vmlinuz", "initrd.img", "cmdline", "manifest.txt"]
        .iter()
        .all(|f| dir.join(f).is_file());
    if complete && fs::read_to_string(&hash_file).is_ok_and(|h| h.trim() == hash) {
        println!("debian guest image up to date ({})", &hash[..12]);
        let kernel = if vmlinux.is_file() { vmlinux } else { dir.join("vmlinuz") };
        return Ok(image(kernel));
    }
    if !crate::ebpf::is_root() {
        bail!(
            "building the Debian guest needs root (mmdebstrap --mode=root, mkfs.ext4 -d of root's files); \
               run `cargo xtask build-guest --os debian` as root once"
        );
    }
    // inputs.hash goes first and comes last: an interrupted build never
    // looks complete.
    let _ = fs::remove_file(&hash_file);
    let t0 = Instant::now();
    let built = rootfs::build(dir, deb)?;
    let manifest = format!(
        "# vmscale Debian guest image\n{inputs}kernel {}\nbuilt in {:.0} s\n\n# installed packages\n{}",
        built.kernel_release,
        t0.elapsed().as_secs_f64(),
        built.packages
    );
    write_atomic(&dir.join("cmdline"), format!("{CMDLINE}\n").as_bytes())?;
    write_atomic(&dir.join("manifest.txt"), manifest.as_bytes())?;
    write_atomic(&hash_file, format!("{hash}\n").as_bytes())?;
    let rootfs = dir.join("rootfs.img");
    let used = Command::new("du").arg("-sm").arg(&rootfs).output();
    let used =
        used.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or("?").to_owned());
    println!(
        "debian guest image built ({}) in {:.0} s: kernel {}, rootfs.img {} MiB used of {}",
        &hash[..12],
        t0.elapsed().as_secs_f64(),
        built.kernel_release,
        used.unwrap_or_else(|_| "?".into()),
        rootfs::IMAGE_SIZE
    );
    Ok(image(built.vmlinux.unwrap_or(built.vmlinuz)))
}

/// Everything the image is made from, as text (its hash is `inputs.hash`;
/// the text heads `manifest.txt`).
fn inputs(deb_sha256: &str) -> anyhow::Result<String> {
    let sources = match mmdebstrap::host_sources() {
        Some(p) => {
            let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            format!("{}\n{text}", p.display())
        }
        None => "deb.debian.org (mmdebstrap's default)\n".to_owned(),
    };
    Ok(format!(
        "format {FORMAT}\nsuite {}\npackages {}\nexcludes {}\nimage size {}\ncmdline {CMDLINE}\n\
         informant package sha256 {deb_sha256}\nassets sha256 {}\nmirror {sources}",
        mmdebstrap::SUITE,
        mmdebstrap::PACKAGES.join(" "),
        mmdebstrap::EXCLUDES.join(" "),
        rootfs::IMAGE_SIZE,
        sha256_hex(assets::fingerprint().as_bytes()),
    ))
}

/// A per-VM writable root: a qcow2 overlay on the read-only `rootfs.img`
/// (`qemu-img create -f qcow2 -F raw -b <rootfs.img> <path>`). Boot it with
/// [`boot::disk`]; a migration target QEMU on the same host opens the same
/// file.
pub fn overlay(image: &DebianImage, path: &Path) -> anyhow::Result<()> {
    // The overlay names its backing file by this path: absolute, so the
    // overlay can live anywhere.
    let backing = fs::canonicalize(&image.rootfs).with_context(|| {
        format!("{} is missing; build it with `cargo xtask build-guest --os debian`", image.rootfs.display())
    })?;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&backing).arg(path);
    let out = cmd.output().context("cannot run qemu-img (apt-get install qemu-utils)")?;
    if !out.status.success() {
        bail!("`{}` failed: {}", crate::steps::show(&cmd), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_keeps_the_hotplug_settings_and_the_oom_lines() {
        for part in crate::guest::CMDLINE.split_whitespace().filter(|p| p.starts_with("mem")) {
            assert!(CMDLINE.split_whitespace().any(|c| c == part), "{part} missing from {CMDLINE}");
        }
        // KERN_ERR (3) is below loglevel 4: the OOM kill line is printed.
        assert!(CMDLINE.contains("loglevel=4"));
        assert!(CMDLINE.starts_with("root=/dev/vda rw console=ttyS0 "));
    }

    #[test]
    fn inputs_change_with_the_package() {
        let a = inputs("aa").unwrap();
        let b = inputs("bb").unwrap();
        assert_ne!(sha256_hex(a.as_bytes()), sha256_hex(b.as_bytes()));
        assert!(a.contains("postgresql-15"));
    }
}
