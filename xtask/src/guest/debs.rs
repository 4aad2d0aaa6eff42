//! The Debian packages the guest is made from (the kernel, busybox-static),
//! downloaded and unpacked under `target/guest/debian/<package>/` rather than
//! installed, so building a guest never touches the host's `/boot` or
//! `/lib/modules`. `apt-get update` runs at most once, and only when apt
//! can't find a package with the lists it has.

use anyhow::{bail, Context};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A `.deb` unpacked under `<dir>/<package>/`.
#[derive(Debug)]
pub struct Unpacked {
    pub package: String,
    pub version: String,
    pub root: PathBuf,
}

#[derive(Debug)]
pub struct Debs {
    dir: PathBuf,
    may_update: bool,
    updated: bool,
}

impl Debs {
    pub fn new(dir: &Path, may_update: bool) -> Debs {
        Debs { dir: dir.to_path_buf(), may_update, updated: false }
    }

    /// The package a metapackage (e.g. `linux-image-amd64`) points at now.
    pub fn resolve_meta(&mut self, meta: &str) -> anyhow::Result<String> {
        if let Some(p) = depends_of(meta)? {
            return Ok(p);
        }
        self.update_once()?;
        depends_of(meta)?.with_context(|| format!("apt knows no package `{meta}` even after apt-get update"))
    }

    /// `package` unpacked, downloading apt's candidate version the first time.
    pub fn unpacked(&mut self, package: &str) -> anyhow::Result<Unpacked> {
        let root = self.dir.join(package);
        let stamp = root.join(".vmscale-version");
        if let Ok(version) = fs::read_to_string(&stamp) {
            eprintln!("    {package} {} (unpacked in {})", version.trim(), root.display());
            return Ok(Unpacked { package: package.to_owned(), version: version.trim().to_owned(), root });
        }
        let debs = self.dir.join("debs");
        fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        let deb = match download(package, &debs) {
            Ok(d) => d,
            Err(first) if !self.updated && self.may_update => {
                eprintln!("    download failed ({first:#}); updating the package lists and trying again");
                self.update_once()?;
                download(package, &debs)?
            }
            Err(e) => return Err(e),
        };
        let version = deb_field(&deb, "Version")?;
        let tmp = self.dir.join(format!(".{package}.unpacking"));
        let _ = fs::remove_dir_all(&tmp);
        eprintln!("    unpacking {} into {}", deb.display(), root.display());
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        fs::write(tmp.join(".vmscale-version"), &version)?;
        let _ = fs::remove_dir_all(&root);
        fs::rename(&tmp, &root).with_context(|| format!("moving {} to {}", tmp.display(), root.display()))?;
        Ok(Unpacked { package: package.to_owned(), version, root })
    }

    fn update_once(&mut self) -> anyhow::Result<()> {
        if self.updated {
            return Ok(());
        }
        if !self.may_update {
            bail!("apt's package lists need `apt-get update`, which --no-install forbids; run it, then try again");
        }
        // A colleague's apt run or unattended-upgrades may hold the lock a while.
        run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update"]))?;
        self.updated = true;
        Ok(())
    }
}

/// The first `Depends:` of the candidate version of `package`.
fn depends_of(package: &str) -> anyhow::Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["depends", "--no-recommends", "--no-suggests", package])
        .stderr(Stdio::null())
        .output()
        .context("running apt-cache (is this a Debian system?)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::to_owned))
}

fn download(package: &str, debs: &Path) -> anyhow::Result<PathBuf> {
    // Stale downloads of this package would make the pick ambiguous.
    for old in debs_of(package, debs)? {
        let _ = fs::remove_file(old);
    }
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(debs).arg("download").arg(package);
    // As root apt drops to `_apt` for downloads, which can't write here; it
    // would warn and download as root anyway. (/proc/self is owned by our
    // effective uid.)
    if fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    run(&mut cmd)?;
    let mut found = debs_of(package, debs)?;
    match (found.pop(), found.is_empty()) {
        (Some(deb), true) => Ok(deb),
        _ => bail!("apt-get download {package} left no single .deb in {}", debs.display()),
    }
}

fn debs_of(package: &str, debs: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let prefix = format!("{package}_");
    let mut v = Vec::new();
    for e in fs::read_dir(debs).with_context(|| format!("reading {}", debs.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            v.push(p);
        }
    }
    Ok(v)
}

fn deb_field(deb: &Path, field: &str) -> anyhow::Result<String> {
    let out = Command::new("dpkg-deb").arg("-f").arg(deb).arg(field).output().context("running dpkg-deb")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb -f {} {field} failed: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs a command with its output going straight to ours, so downloads show
/// their progress.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = crate::steps::show(cmd);
    eprintln!("    $ {shown}");
    let status = cmd.status().with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}
