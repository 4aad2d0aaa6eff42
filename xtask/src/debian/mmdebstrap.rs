//! The mmdebstrap command that makes the guest's root directory: Debian
//! bookworm (minbase) with systemd, PostgreSQL 15 and Debian's kernel, from
//! this host's own Debian mirror, configured by hooks (no chroot of ours, no
//! mounts: mmdebstrap mounts what the packages' scripts need and unmounts).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const SUITE: &str = "bookworm";

/// `--include`: what the guest runs beyond minbase. zstd packs the
/// initramfs (see files/initramfs.conf); initramfs-tools comes with the kernel.
pub const PACKAGES: &[&str] =
    &["systemd-sysv", "udev", "iproute2", "kmod", "procps", "zstd", "postgresql-15", "linux-image-amd64"];

/// dpkg `path-exclude`s: documentation, manual pages and translations, and
/// the kernel modules for hardware a QEMU guest never has (sound, graphics,
/// cameras, wireless, physical NICs, InfiniBand, Bluetooth, sensors): about
/// 300 MB less to copy into the image, none of it used. Copyright files stay.
pub const EXCLUDES: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/lib/modules/*/kernel/sound/*",
    "/lib/modules/*/kernel/drivers/gpu/*",
    "/lib/modules/*/kernel/drivers/media/*",
    "/lib/modules/*/kernel/drivers/net/wireless/*",
    "/lib/modules/*/kernel/drivers/net/ethernet/*",
    "/lib/modules/*/kernel/drivers/infiniband/*",
    "/lib/modules/*/kernel/drivers/staging/*",
    "/lib/modules/*/kernel/drivers/bluetooth/*",
    "/lib/modules/*/kernel/drivers/iio/*",
    "/lib/modules/*/kernel/net/wireless/*",
    "/lib/modules/*/kernel/net/mac80211/*",
    "/lib/modules/*/kernel/net/bluetooth/*",
];
pub const INCLUDES: &[&str] = &["/usr/share/doc/*/copyright"];

/// Where this host's apt gets Debian from: the same mirror for the guest
/// (this machine reaches no other). None: mmdebstrap's default,
/// deb.debian.org.
pub fn host_sources() -> Option<PathBuf> {
    ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]
        .iter()
        .map(PathBuf::from)
        .find(|p| std::fs::read_to_string(p).is_ok_and(|s| s.contains("debian")))
}

/// What one run puts where.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The root directory to make (must not exist yet).
    pub root: &'a Path,
    /// Trees copied over the root: before the packages (`early`) and after.
    pub early: &'a Path,
    pub late: &'a Path,
    /// The informant's package, installed by the setup script.
    pub deb: &'a Path,
    pub sources: Option<&'a Path>,
}

pub fn command(p: &Plan) -> Command {
    let mut c = Command::new("mmdebstrap");
    c.args(args(p));
    c
}

fn args(p: &Plan) -> Vec<OsString> {
    let mut a: Vec<OsString> =
        ["--mode=root", "--format=directory", "--variant=minbase"].iter().map(OsString::from).collect();
    a.push(format!("--include={}", PACKAGES.join(",")).into());
    for e in EXCLUDES {
        a.push(format!("--dpkgopt=path-exclude={e}").into());
    }
    for i in INCLUDES {
        a.push(format!("--dpkgopt=path-include={i}").into());
    }
    a.push(format!("--essential-hook=sync-in {} /", quote(p.early)).into());
    a.push(format!("--customize-hook=sync-in {} /", quote(p.late)).into());
    a.push(format!("--customize-hook=copy-in {} /tmp", quote(p.deb)).into());
    let deb_name = p.deb.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    a.push(
        format!(
            "--customize-hook=chroot \"$1\" /bin/sh /{} {}",
            super::assets::SETUP_PATH,
            quote(&Path::new("/tmp").join(deb_name))
        )
        .into(),
    );
    a.push(SUITE.into());
    a.push(p.root.as_os_str().to_owned());
    if let Some(s) = p.sources {
        a.push(s.as_os_str().to_owned());
    }
    a
}

/// A path as one shell word (hooks are run by a shell).
fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_copy_the_trees_and_run_the_setup_with_the_package() {
        let p = Plan {
            root: Path::new("/t/root"),
            early: Path::new("/t/early"),
            late: Path::new("/t/it's"),
            deb: Path::new("/t/vmscale-informant_0.1.0_amd64.deb"),
            sources: Some(Path::new("/etc/apt/sources.list.d/debian.sources")),
        };
        let a: Vec<String> = args(&p).iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert!(a.contains(&"--variant=minbase".to_owned()));
        assert!(a.iter().any(|s| s.starts_with("--include=systemd-sysv,") && s.contains("postgresql-15")));
        assert!(a.contains(&"--essential-hook=sync-in '/t/early' /".to_owned()));
        assert!(a.contains(&r"--customize-hook=sync-in '/t/it'\''s' /".to_owned()));
        assert!(a.contains(
            &"--customize-hook=chroot \"$1\" /bin/sh /etc/vmscale-build/setup.sh \
              '/tmp/vmscale-informant_0.1.0_amd64.deb'"
                .to_owned()
        ));
        let tail = &a[a.len() - 3..];
        assert_eq!(tail, ["bookworm", "/t/root", "/etc/apt/sources.list.d/debian.sources"]);
    }
}
