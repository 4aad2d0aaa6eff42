//! Making the image from nothing: mmdebstrap into a staging directory, the
//! checks that the guest got what it needs, the kernel and Debian's initrd
//! copied out, and `mkfs.ext4 -d` to turn the directory into a filesystem
//! image without a loop device or a mount. The staging directory goes away
//! whatever happens.

use anyhow::{bail, Context};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::assets::{self, Asset};
use super::mmdebstrap;

/// The root filesystem's size: the system takes about 700 MB, the rest is
/// room for a test's database (written to the per-VM overlay).
pub const IMAGE_SIZE: &str = "3G";
/// Free space needed to build: the staging root (~0.7 GB) and the image's
/// written blocks (about as much).
const NEEDED_FREE_KIB: u64 = 3 << 20;

/// What a build leaves in the image directory besides `rootfs.img`.
#[derive(Debug)]
pub struct Built {
    pub vmlinuz: PathBuf,
    /// The plain ELF kernel QEMU boots faster (PVH entry), where it has one.
    pub vmlinux: Option<PathBuf>,
    /// `package version` lines of what is installed, and the kernel release.
    pub packages: String,
    pub kernel_release: String,
}

/// Builds everything into `out` (rootfs.img, vmlinuz, initrd.img).
pub fn build(out: &Path, deb: &Path) -> anyhow::Result<Built> {
    check_free_space(out)?;
    let staging = out.join("staging");
    remove_staging(&staging)?;
    let result = build_in(out, &staging, deb);
    if let Err(e) = remove_staging(&staging) {
        eprintln!("    warning: {e:#}");
    }
    result
}

fn build_in(out: &Path, staging: &Path, deb: &Path) -> anyhow::Result<Built> {
    let early = staging.join("early");
    let late = staging.join("late");
    let root = staging.join("root");
    write_tree(&early, assets::EARLY)?;
    write_tree(&late, assets::LATE)?;
    let sources = mmdebstrap::host_sources();
    let plan = mmdebstrap::Plan { root: &root, early: &early, late: &late, deb, sources: sources.as_deref() };
    let mut cmd = mmdebstrap::command(&plan);
    eprintln!("    $ {}", crate::steps::show(&cmd));
    let t0 = Instant::now();
    let status = cmd.status().context("cannot run mmdebstrap (apt-get install mmdebstrap)")?;
    eprintln!("    mmdebstrap took {:.0} s", t0.elapsed().as_secs_f64());
    if !status.success() {
        bail!(
            "mmdebstrap failed ({status}); its last lines above say which package or hook; \
             the mirror is the host's ({})",
            sources.map_or("deb.debian.org".into(), |s| s.display().to_string())
        );
    }
    check_root(&root)?;
    let kernel_release = kernel_release(&root)?;
    let boot = root.join("boot");
    let vmlinuz = out.join("vmlinuz");
    let initrd = out.join("initrd.img");
    copy_atomic(&boot.join(format!("vmlinuz-{kernel_release}")), &vmlinuz)?;
    copy_atomic(&boot.join(format!("initrd.img-{kernel_release}")), &initrd)?;
    let config = fs::read_to_string(boot.join(format!("config-{kernel_release}"))).unwrap_or_default();
    let vmlinux = pvh_kernel(out, &vmlinuz, &config)?;
    let packages = installed_packages(&root)?;
    mkfs(&root, &out.join("rootfs.img"))?;
    Ok(Built { vmlinuz, vmlinux, packages, kernel_release })
}

fn check_free_space(dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("df").args(["-Pk"]).arg(dir).output().context("cannot run df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Filesystem 1024-blocks Used Available Capacity Mounted-on
    let avail: Option<u64> =
        text.lines().nth(1).and_then(|l| l.split_whitespace().nth(3)).and_then(|v| v.parse().ok());
    match avail {
        Some(kib) if kib < NEEDED_FREE_KIB => bail!(
            "only {} MiB free under {}; the Debian guest needs {} MiB to build (`df -h /`)",
            kib >> 10,
            dir.display(),
            NEEDED_FREE_KIB >> 10
        ),
        Some(kib) => eprintln!("    {} MiB free under {}", kib >> 10, dir.display()),
        None => eprintln!("    warning: could not read free space from `df -Pk {}`", dir.display()),
    }
    Ok(())
}

fn remove_staging(staging: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(staging) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the staging directory {}", staging.display()))
        }
        _ => Ok(()),
    }
}

/// Writes `assets` under `dir`, each with its mode.
pub fn write_tree(dir: &Path, assets: &[Asset]) -> anyhow::Result<()> {
    for a in assets {
        let p = dir.join(a.path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&p, a.text).with_context(|| format!("writing {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(a.mode))
            .with_context(|| format!("setting the mode of {}", p.display()))?;
    }
    Ok(())
}

/// What the guest cannot boot or serve without, checked before the image is
/// made from it.
fn check_root(root: &Path) -> anyhow::Result<()> {
    let wanted = [
        ("var/lib/postgresql/15/main/PG_VERSION", "PostgreSQL's cluster 15/main"),
        ("usr/bin/vmscale-informant", "the informant (from its package)"),
        ("usr/lib/vmscale/vmscale.bpf.o", "the informant's eBPF object"),
        ("etc/systemd/system/multi-user.target.wants/vmscale-informant.service", "the informant enabled"),
        ("etc/systemd/system/multi-user.target.wants/vmscale-ready.service", "the ready line enabled"),
        ("etc/systemd/system/serial-getty@ttyS0.service", "the serial getty masked"),
        ("sbin/init", "systemd as init"),
    ];
    for (path, what) in wanted {
        if fs::symlink_metadata(root.join(path)).is_err() {
            bail!("the new root has no {path} ({what}); mmdebstrap's log above should say why");
        }
    }
    if root.join("etc/vmscale-build").exists() {
        bail!("the setup script did not finish (etc/vmscale-build is still there)");
    }
    Ok(())
}

fn kernel_release(root: &Path) -> anyhow::Result<String> {
    let boot = root.join("boot");
    let mut found = Vec::new();
    for e in fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(r) = name.strip_prefix("vmlinuz-") {
            found.push(r.to_owned());
        }
    }
    match found.as_slice() {
        [one] if boot.join(format!("initrd.img-{one}")).is_file() => Ok(one.clone()),
        [one] => {
            bail!("the kernel {one} came without an initrd in {} (initramfs-tools failed?)", boot.display())
        }
        _ => bail!("expected one kernel in {}, found {found:?}", boot.display()),
    }
}

/// `vmlinux` beside `vmlinuz` when the kernel has a PVH entry (QEMU then
/// skips the decompressor, seconds under TCG); the busybox guest does the same.
fn pvh_kernel(out: &Path, vmlinuz: &Path, config: &str) -> anyhow::Result<Option<PathBuf>> {
    let path = out.join("vmlinux");
    let _ = fs::remove_file(&path);
    if !crate::guest::vmlinux::has_pvh(config) {
        return Ok(None);
    }
    let bz = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let Some(elf) = crate::guest::vmlinux::extract(&bz)? else { return Ok(None) };
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, elf).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(Some(path))
}

fn installed_packages(root: &Path) -> anyhow::Result<String> {
    let out = Command::new("dpkg-query")
        .arg(format!("--admindir={}", root.join("var/lib/dpkg").display()))
        .args(["-W", "-f=${Package} ${Version}\\n"])
        .output()
        .context("cannot run dpkg-query")?;
    if !out.status.success() {
        bail!("dpkg-query on the new root failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mkfs(root: &Path, image: &Path) -> anyhow::Result<()> {
    let tmp = image.with_extension("img.tmp");
    let _ = fs::remove_file(&tmp);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-L", "vmscale-root", "-d"]).arg(root).arg(&tmp).arg(IMAGE_SIZE);
    eprintln!("    $ {}", crate::steps::show(&cmd));
    let t0 = Instant::now();
    let status = cmd.status().context("cannot run mkfs.ext4 (apt-get install e2fsprogs)")?;
    eprintln!("    mkfs.ext4 took {:.0} s", t0.elapsed().as_secs_f64());
    if !status.success() {
        let _ = fs::remove_file(&tmp);
        bail!("mkfs.ext4 -d {} failed ({status})", root.display());
    }
    // A rename, never a rewrite in place: QEMUs running on overlays of the
    // old image keep the file they opened. Overlays made from the old image
    // must not be booted again (they name the path, now the new image): the
    // tests make one per VM.
    fs::rename(&tmp, image).with_context(|| format!("renaming to {}", image.display()))
}

fn copy_atomic(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("tmp");
    fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming to {}", to.display()))
}
