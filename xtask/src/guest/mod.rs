//! `cargo xtask build-guest`: a bootable test guest in `target/guest/`.
//!
//! - `vmlinuz`: Debian's kernel (`linux-image-amd64`, downloaded and
//!   unpacked under `target/guest/debian/`, never installed on the host),
//!   and `vmlinux`, the same kernel uncompressed, which QEMU boots 4-8 s
//!   faster under TCG (see `vmlinux.rs`); [`Image::kernel`] names the one to
//!   boot;
//! - `initramfs.img`: busybox (Debian's `busybox-static`, unpacked the same
//!   way), the static informant (built in `target/guest-build/`) with its
//!   eBPF object, the kernel modules the
//!   guest needs and an `/init` (`init.sh` beside this file: its header
//!   lists the kernel command line keys it reads);
//! - `cmdline`: the kernel command line for hotplug;
//! - `manifest.txt` and `inputs.hash`: what went in, and the hash that
//!   decides whether the next run has anything to do.
//!
//! Each step checks first, so a second run costs the two cargo builds' no-op
//! checks and a hash; with nothing changed it prints "guest image up to
//! date". `--smoke` then boots the image under QEMU and waits for the
//! informant's gRPC Handshake.

mod cpio;
mod debs;
mod elf;
mod image;
mod informant;
mod modules;
pub mod qemu;
mod smoke;
/// The Debian guest boots the same way (`crate::debian`).
pub(crate) mod vmlinux;

use anyhow::{bail, Context};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::steps::Steps;

/// Where the image goes, relative to the workspace root.
pub const GUEST_DIR: &str = "target/guest";
/// The informant's TCP port inside the guest (`vmscale.port=` changes it).
pub const INFORMANT_PORT: u16 = 7080;
/// Kernel command line: serial console; hot-added memory online at once and
/// movable (so it can be unplugged again), its memory map (`struct page`s,
/// 2 MiB of each 128 MiB DIMM) inside the DIMM itself rather than taken from
/// the boot memory a full guest has none of (without it, a guest whose boot
/// memory was full OOM-killed with 1.2 GiB of new memory free: see
/// `cargo xtask e2e full-boot-memory`); reboot at once on a panic, which
/// QEMU's `-no-reboot` turns into an exit; no kernel chatter on the console.
pub const CMDLINE: &str =
    "console=ttyS0 memhp_default_state=online_movable memory_hotplug.memmap_on_memory=1 panic=-1 quiet";
/// Host packages: QEMU for the smoke test and the demo, stress-ng for
/// workloads run from the host's root through the 9p share; zstd and xz
/// to pack the initramfs and unpack the kernel.
const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "stress-ng", "zstd", "xz-utils"];
const KERNEL_META: &str = "linux-image-amd64";
const BUSYBOX: &str = "busybox-static";

/// Which guest `build-guest` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Os {
    /// This module's initramfs guest (busybox, the informant as /init's child).
    #[default]
    Busybox,
    /// Debian bookworm with systemd, PostgreSQL 15 and the informant's package
    /// (`crate::debian`, in target/guest-debian/).
    Debian,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which guest: the busybox initramfs, or Debian with PostgreSQL.
    #[arg(long, value_enum, default_value_t = Os::Busybox)]
    pub os: Os,
    /// Boot the image under QEMU (TCG) afterwards and wait for the
    /// informant's gRPC Handshake (Debian: the ready line, then a query).
    #[arg(long)]
    pub smoke: bool,
    /// Seconds the smoke test waits for the informant (Debian: for the
    /// ready line). Default 90; 180 for Debian (systemd under TCG).
    #[arg(long)]
    pub smoke_timeout: Option<u64>,
    /// Leave the eBPF object out (and don't build it).
    #[arg(long)]
    pub no_ebpf: bool,
    /// Don't install anything; say what is missing and how to install it.
    #[arg(long)]
    pub no_install: bool,
    /// Forget the downloaded Debian kernel and busybox and fetch apt's
    /// current versions (otherwise the first ones fetched stay pinned).
    #[arg(long)]
    pub refresh: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            os: Os::Busybox,
            smoke: false,
            smoke_timeout: None,
            no_ebpf: false,
            no_install: false,
            refresh: false,
        }
    }
}

/// A built guest image.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    /// What QEMU's `-kernel` takes: `vmlinux` (the plain ELF, started at its
    /// PVH entry: 4-8 s faster under TCG, see `vmlinux.rs`) where the kernel
    /// allows, else `vmlinuz`.
    pub kernel: PathBuf,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    /// The kernel command line (also in `<dir>/cmdline`).
    pub cmdline: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.os == Os::Debian {
        return crate::debian::run(a.smoke, Duration::from_secs(a.smoke_timeout.unwrap_or(180)));
    }
    let mut steps = Steps::new(step_count(&a) + usize::from(a.smoke));
    let image = build(&a, &mut steps)?;
    if a.smoke {
        let mut report = None;
        steps.call("smoke test: boot under QEMU (TCG), Handshake with the informant", || {
            report =
                Some(smoke::run(&image, Duration::from_secs(a.smoke_timeout.unwrap_or(90)), !a.no_ebpf)?);
            Ok(())
        })?;
        if let Some(r) = report {
            let secs = |v: Option<f64>| v.map_or("?".into(), |s| format!("{s:.1} s"));
            println!(
                "smoke test passed: /init after {} ({} guest uptime), informant serving after {}, \
                 Handshake answered after {:.1} s (from QEMU's start, TCG)",
                secs(r.init_s),
                secs(r.init_uptime_s),
                secs(r.serving_s),
                r.handshake_s
            );
        }
    }
    Ok(())
}

/// How many of `steps` [`build`] takes, for a caller's own count.
pub fn step_count(a: &Args) -> usize {
    if a.no_ebpf {
        4
    } else {
        5
    }
}

/// Builds the image where needed and returns it; progress goes to `steps`.
pub fn build(a: &Args, steps: &mut Steps) -> anyhow::Result<Image> {
    let started = Instant::now();
    let root = crate::workspace_root();
    let dir = root.join(GUEST_DIR);
    let debian = dir.join("debian");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    steps.call("host packages (QEMU, stress-ng, zstd, xz)", || {
        let missing = crate::apt::missing(HOST_PACKAGES);
        if a.no_install && !missing.is_empty() {
            bail!("missing host packages (--no-install): apt-get install -y {}", missing.join(" "));
        }
        crate::apt::ensure(HOST_PACKAGES, "the guest image")
    })?;

    let mut unpacked = None;
    steps.call("Debian's kernel and busybox (downloaded and unpacked once)", || {
        if a.refresh {
            let _ = fs::remove_dir_all(&debian);
        }
        fs::create_dir_all(&debian).with_context(|| format!("creating {}", debian.display()))?;
        let mut debs = debs::Debs::new(&debian, !a.no_install);
        let kernel_package = kernel_package(&mut debs, &debian)?;
        let kernel = debs.unpacked(&kernel_package)?;
        let busybox = debs.unpacked(BUSYBOX)?;
        unpacked = Some((kernel, busybox));
        Ok(())
    })?;
    let (kernel, busybox) = unpacked.context("Debian packages step gave nothing")?;
    let release = kernel_release(&kernel.root)?;

    let ebpf_object = if a.no_ebpf {
        None
    } else {
        steps.call("the eBPF object (cargo xtask build-ebpf)", || crate::ebpf::run(Default::default()))?;
        let p = root.join(crate::ebpf::OBJECT_PATH);
        Some(fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
    };

    let informant = informant::build(steps, &root)?;

    let mut image = None;
    steps.call("the initramfs", || {
        let modules = modules::Tree::open(&kernel.root, &release)?.resolve(modules::WANTED)?;
        eprintln!("    modules: {}", modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(" "));
        let label =
            format!("kernel {release} ({} {}), busybox {}", kernel.package, kernel.version, busybox.version);
        let archive = image::archive(image::Contents {
            busybox: &busybox.root.join("bin/busybox"),
            informant,
            ebpf_object,
            modules,
            label: label.clone(),
        })?;
        let boot = kernel.root.join("boot");
        let config = fs::read_to_string(boot.join(format!("config-{release}"))).unwrap_or_default();
        let vmlinuz = boot.join(format!("vmlinuz-{release}"));
        image = Some(write_if_changed(&dir, &archive, &vmlinuz, vmlinux::has_pvh(&config), &label)?);
        Ok(())
    })?;
    let image = image.context("initramfs step gave nothing")?;
    println!("kernel command line: {}", image.cmdline);
    println!("guest image in {} ({:.1} s)", dir.display(), started.elapsed().as_secs_f64());
    Ok(image)
}

/// The kernel package: the one fetched before, or the one
/// `linux-image-amd64` points at now.
fn kernel_package(debs: &mut debs::Debs, debian: &Path) -> anyhow::Result<String> {
    let pin = debian.join("kernel-package");
    if let Ok(p) = fs::read_to_string(&pin) {
        return Ok(p.trim().to_owned());
    }
    let p = debs.resolve_meta(KERNEL_META)?;
    fs::write(&pin, &p).with_context(|| format!("writing {}", pin.display()))?;
    Ok(p)
}

/// The one `lib/modules/<release>` of the unpacked kernel package.
fn kernel_release(root: &Path) -> anyhow::Result<String> {
    let dir = root.join("lib/modules");
    let mut found = Vec::new();
    for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        found.push(e?.file_name().to_string_lossy().into_owned());
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one kernel release in {}, found {found:?}", dir.display()),
    }
}

/// Writes the image unless `inputs.hash` says this exact one is there.
fn write_if_changed(
    dir: &Path,
    archive: &cpio::Archive,
    vmlinuz: &Path,
    pvh: bool,
    label: &str,
) -> anyhow::Result<Image> {
    let cpio = archive.to_bytes()?;
    let kernel = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let manifest = format!(
        "# vmscale guest image: {label}\ncmdline {CMDLINE}\ncompress {}\nvmlinuz sha256 {}\npvh {pvh}\n\
         initramfs (uncompressed cpio) sha256 {}\n{}",
        image::COMPRESS.join(" "),
        image::sha256(&kernel)?,
        image::sha256(&cpio)?,
        image::manifest(archive)
    );
    let hash = image::sha256(manifest.as_bytes())?;
    let vmlinux = dir.join("vmlinux");
    let mut out = Image {
        dir: dir.to_path_buf(),
        kernel: if vmlinux.is_file() { vmlinux.clone() } else { dir.join("vmlinuz") },
        vmlinuz: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.img"),
        cmdline: CMDLINE.to_owned(),
    };
    let hash_file = dir.join("inputs.hash");
    let complete = out.vmlinuz.is_file() && out.initramfs.is_file() && dir.join("cmdline").is_file();
    if complete && fs::read_to_string(&hash_file).is_ok_and(|h| h.trim() == hash) {
        println!("guest image up to date ({})", &hash[..12]);
        return Ok(out);
    }
    // inputs.hash goes last and first away: an interrupted build never
    // looks complete.
    let _ = fs::remove_file(&hash_file);
    let t0 = Instant::now();
    let compressed = image::compress(&cpio)?;
    eprintln!(
        "    {} entries, {:.1} MiB -> {:.1} MiB ({}) in {:.1} s",
        archive.entries().count(),
        mib(cpio.len()),
        mib(compressed.len()),
        image::COMPRESS[0],
        t0.elapsed().as_secs_f64()
    );
    write_atomic(&out.initramfs, &compressed)?;
    write_atomic(&out.vmlinuz, &kernel)?;
    let _ = fs::remove_file(&vmlinux);
    out.kernel = out.vmlinuz.clone();
    if pvh {
        if let Some(elf) = vmlinux::extract(&kernel)? {
            write_atomic(&vmlinux, &elf)?;
            out.kernel = vmlinux;
        }
    }
    write_atomic(&dir.join("cmdline"), format!("{CMDLINE}\n").as_bytes())?;
    write_atomic(&dir.join("manifest.txt"), manifest.as_bytes())?;
    write_atomic(&hash_file, format!("{hash}\n").as_bytes())?;
    println!(
        "guest image built ({}): initramfs {:.1} MiB, boots {}",
        &hash[..12],
        mib(compressed.len()),
        out.kernel.display()
    );
    Ok(out)
}

/// Writes `data` to a temporary beside `path`, then renames it into place.
pub fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn mib(n: usize) -> f64 {
    n as f64 / (1 << 20) as f64
}
