//! `cargo xtask package` end to end: builds the informant's Debian package
//! and reads it back with dpkg-deb: the control data, the maintainer
//! scripts, every file with its owner and mode, the unit and the config
//! byte for byte as in deploy/, and the packaged binary runs.
//!
//! It needs dpkg-deb and the eBPF toolchain (installed by xtask as root);
//! without dpkg-deb it skips, and under `CI=true` it fails instead.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb").args(args).arg(deb).output().expect("run dpkg-deb");
    assert!(out.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_package_holds_the_informant_its_unit_and_config() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        vmscale_common::testing::skip_unless_ci("no dpkg-deb: the package cannot be built here");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).arg("package").output().expect("run xtask package");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(out.status.success(), "xtask package failed:\n{}", tail.join("\n"));
    let deb = root()
        .join("target/package")
        .join(format!("vmscale-informant_{}_amd64.deb", env!("CARGO_PKG_VERSION")));
    assert!(deb.is_file(), "{} missing", deb.display());

    let info = dpkg_deb(&["-I"], &deb);
    for want in [
        "Package: vmscale-informant",
        "Architecture: amd64",
        "Depends: ",
        "libc6 (>= 2.",
        "postinst",
        "prerm",
        "postrm",
        "conffiles",
    ] {
        assert!(info.contains(want), "`{want}` missing from dpkg-deb -I:\n{info}");
    }
    let fields = dpkg_deb(&["-f"], &deb);
    assert!(fields.contains(&format!("Version: {}\n", env!("CARGO_PKG_VERSION"))), "{fields}");

    let contents = dpkg_deb(&["-c"], &deb);
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/vmscale-informant"),
        ("-rw-r--r--", "./usr/lib/vmscale/vmscale.bpf.o"),
        ("-rw-r--r--", "./lib/systemd/system/vmscale-informant.service"),
        ("-rw-r--r--", "./etc/vmscale/informant.toml"),
        ("-rw-r--r--", "./usr/lib/sysctl.d/60-vmscale-informant.conf"),
        ("-rw-r--r--", "./usr/share/doc/vmscale-informant/copyright"),
    ] {
        let line = contents.lines().find(|l| l.ends_with(&format!(" {path}")));
        let line = line.unwrap_or_else(|| panic!("{path} missing from dpkg-deb -c:\n{contents}"));
        assert!(line.starts_with(mode), "{line}");
        assert!(line.contains(" root/root "), "{line}");
    }

    // The unit and the config are deploy/'s, unchanged; the binary runs.
    let tmp = std::env::temp_dir().join(format!("vmscale-package-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let ok = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp).status().expect("dpkg-deb -x").success();
    assert!(ok);
    for (packaged, deployed) in [
        ("lib/systemd/system/vmscale-informant.service", "deploy/informant.service"),
        ("etc/vmscale/informant.toml", "deploy/informant.toml"),
        ("usr/lib/sysctl.d/60-vmscale-informant.conf", "deploy/informant-sysctl.conf"),
    ] {
        let a = std::fs::read(tmp.join(packaged)).expect(packaged);
        let b = std::fs::read(root().join(deployed)).expect(deployed);
        assert!(a == b, "{packaged} differs from {deployed}");
    }
    let version =
        Command::new(tmp.join("usr/bin/vmscale-informant")).arg("--version").output().expect("run it");
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    let _ = std::fs::remove_dir_all(&tmp);
}
