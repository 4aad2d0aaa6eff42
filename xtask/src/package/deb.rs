//! Lays the package out in a staging directory and runs dpkg-deb on it,
//! unless the package already there was built from the same inputs (the
//! `.inputs` file beside it): the guest image is cached on the package's
//! hash, which must not change while nothing else did.

use anyhow::{bail, Context};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::control::{self, Control, Entry};
use super::Package;

/// Bumped when the layout or the scripts change in a way the inputs' hash
/// would not see.
const FORMAT: u32 = 1;

/// Builds `target/package/<name>.deb` (or keeps it) and returns it.
pub fn assemble(root: &Path, version: &str) -> anyhow::Result<Package> {
    let out_dir = root.join(super::OUT_DIR);
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // One staging directory per process: a test and an image build may
    // package at the same time.
    let stage = out_dir.join(format!("staging.{}", std::process::id()));
    let _ = fs::remove_dir_all(&stage);
    let result = build_in(root, &stage, &out_dir, version);
    let _ = fs::remove_dir_all(&stage);
    result
}

fn build_in(root: &Path, stage: &Path, out_dir: &Path, version: &str) -> anyhow::Result<Package> {
    let binary = root.join("target/release/vmscale-informant");
    let object = root.join(crate::ebpf::OBJECT_PATH);
    let glibc = host_package_version("libc6")?;
    let depends = control::depends(&needed_libraries(&binary)?, control::upstream(&glibc))?;

    // Debug info is four fifths of the release binary; symbols stay for
    // backtraces.
    let bin_dest = stage.join(control::BINARY_PATH);
    mkdir_parent(&bin_dest)?;
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&binary)
        .arg(&bin_dest)
        .status()
        .context("cannot run objcopy (binutils) to strip the informant")?;
    if !status.success() {
        bail!("objcopy --strip-debug {} failed ({status})", binary.display());
    }
    copy(&object, &stage.join(control::EBPF_PATH))?;
    copy(&root.join("deploy/informant.service"), &stage.join(control::UNIT_PATH))?;
    copy(&root.join("deploy/informant.toml"), &stage.join(control::CONFIG_PATH))?;
    copy(&root.join("deploy/informant-sysctl.conf"), &stage.join(control::SYSCTL_PATH))?;
    write(&stage.join(control::COPYRIGHT_PATH), &control::copyright("Apache-2.0"))?;
    for Entry { path, mode } in control::LAYOUT {
        set_mode(&stage.join(path), *mode)?;
    }

    let installed_kib = control::LAYOUT
        .iter()
        .map(|e| fs::metadata(stage.join(e.path)).map(|m| m.len().div_ceil(1024)))
        .sum::<Result<u64, _>>()
        .context("sizing the staged files")?;
    let ctl = Control { version: version.to_owned(), depends, installed_kib };
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian).with_context(|| format!("creating {}", debian.display()))?;
    write(&debian.join("control"), &ctl.render())?;
    write(&debian.join("conffiles"), &control::conffiles())?;
    for (name, text) in control::SCRIPTS {
        let p = debian.join(name);
        write(&p, text)?;
        set_mode(&p, 0o755)?;
    }

    let out = out_dir.join(control::file_name(version));
    let inputs_file = out.with_extension("deb.inputs");
    let inputs = inputs_hash(stage)?;
    if out.is_file() && fs::read_to_string(&inputs_file).is_ok_and(|h| h.trim() == inputs) {
        eprintln!("    {} up to date", out.display());
        return Ok(Package { sha256: sha256_file(&out)?, path: out });
    }
    let _ = fs::remove_file(&inputs_file);
    let tmp = out.with_extension(format!("deb.{}", std::process::id()));
    let mut cmd = Command::new("dpkg-deb");
    cmd.args(["--build", "--root-owner-group"]).arg(stage).arg(&tmp);
    eprintln!("    $ {}", crate::steps::show(&cmd));
    let status = cmd.status().context("cannot run dpkg-deb (Debian's dpkg)")?;
    if !status.success() {
        let _ = fs::remove_file(&tmp);
        bail!("dpkg-deb --build failed ({status}); its message above names the file it refused");
    }
    fs::rename(&tmp, &out).with_context(|| format!("renaming {} into place", tmp.display()))?;
    write(&inputs_file, &format!("{inputs}\n"))?;
    Ok(Package { sha256: sha256_file(&out)?, path: out })
}

/// A hash over every staged file's path, mode and contents, and [`FORMAT`].
fn inputs_hash(stage: &Path) -> anyhow::Result<String> {
    let mut files: Vec<PathBuf> = control::LAYOUT.iter().map(|e| stage.join(e.path)).collect();
    files.extend(["control", "conffiles"].iter().map(|n| stage.join("DEBIAN").join(n)));
    files.extend(control::SCRIPTS.iter().map(|(n, _)| stage.join("DEBIAN").join(n)));
    let mut text = format!("format {FORMAT}\n");
    for f in &files {
        let mode = fs::metadata(f).with_context(|| format!("reading {}", f.display()))?.permissions().mode();
        let rel = f.strip_prefix(stage).unwrap_or(f);
        text.push_str(&format!("{} {mode:o} {}\n", rel.display(), sha256_file(f)?));
    }
    Ok(crate::debian::sha256_hex(text.as_bytes()))
}

/// `sha256sum` of a file (the informant is tens of MiB: C is faster than a
/// debug build of xtask).
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("cannot run sha256sum (coreutils)")?;
    if !out.status.success() {
        bail!("sha256sum {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().map(str::to_owned).context("sha256sum printed nothing")
}

/// The shared libraries the binary names (`readelf -d`, NEEDED).
fn needed_libraries(binary: &Path) -> anyhow::Result<Vec<String>> {
    let out =
        Command::new("readelf").arg("-d").arg(binary).output().context("cannot run readelf (binutils)")?;
    if !out.status.success() {
        bail!(
            "readelf -d {} failed (is the informant built?): {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_owned()))
        .collect())
}

/// The installed version of a host package (what we build against).
fn host_package_version(package: &str) -> anyhow::Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .context("cannot run dpkg-query")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || v.is_empty() {
        bail!("{package} is not installed here: the package's Depends needs its version");
    }
    Ok(v)
}

fn mkdir_parent(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().context("a staged path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    mkdir_parent(to)?;
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    mkdir_parent(path)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}
