//! What goes into the informant's Debian package, as data: the files and
//! where they land, the control file, the conffiles list. Pure, so the
//! layout and the rendering are tested without building anything.

use anyhow::bail;

/// The package's name (and the unit's: `vmscale-informant.service`).
pub const PACKAGE: &str = "vmscale-informant";
/// Where the binary goes: a daemon an administrator may also run by hand
/// (`--help`, a foreground run), so on the PATH, per Debian policy.
pub const BINARY_PATH: &str = "usr/bin/vmscale-informant";
/// Where the eBPF object goes. Not beside the binary: /usr/bin holds
/// programs only. The unit names it with `VMSCALE_EBPF_OBJECT`
/// (agent-ebpf/common/src/object.rs), so the loader looks nowhere else.
pub const EBPF_PATH: &str = "usr/lib/vmscale/vmscale.bpf.o";
/// The systemd unit (`deploy/informant.service`). bookworm's packages still
/// ship units under /lib; merged /usr makes it the same directory.
pub const UNIT_PATH: &str = "lib/systemd/system/vmscale-informant.service";
/// The config (`deploy/informant.toml`), a conffile: an administrator's
/// edits survive upgrades.
pub const CONFIG_PATH: &str = "etc/vmscale/informant.toml";
pub const COPYRIGHT_PATH: &str = "usr/share/doc/vmscale-informant/copyright";
/// `deploy/informant-sysctl.conf`: kernel.perf_event_paranoid at 2, without
/// which Debian's kernels refuse the informant's tracepoint attachments.
/// Under /usr/lib (the package's default; an administrator overrides it in
/// /etc/sysctl.d), applied at every boot by systemd-sysctl before the
/// informant starts, and by the postinst at install.
pub const SYSCTL_PATH: &str = "usr/lib/sysctl.d/60-vmscale-informant.conf";

/// One file of the package: its path under `/` and its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub path: &'static str,
    pub mode: u32,
}

/// Every file the package installs.
pub const LAYOUT: &[Entry] = &[
    Entry { path: BINARY_PATH, mode: 0o755 },
    Entry { path: EBPF_PATH, mode: 0o644 },
    Entry { path: UNIT_PATH, mode: 0o644 },
    Entry { path: CONFIG_PATH, mode: 0o644 },
    Entry { path: SYSCTL_PATH, mode: 0o644 },
    Entry { path: COPYRIGHT_PATH, mode: 0o644 },
];

/// Maintainer scripts, with the mode dpkg wants for them.
pub const SCRIPTS: &[(&str, &str)] = &[
    ("postinst", include_str!("postinst")),
    ("prerm", include_str!("prerm")),
    ("postrm", include_str!("postrm")),
];

/// What the control file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub version: String,
    /// `Depends:` entries, e.g. `libc6 (>= 2.36)`.
    pub depends: Vec<String>,
    /// The installed size, KiB (rounded up), as dpkg counts it.
    pub installed_kib: u64,
}

impl Control {
    pub fn render(&self) -> String {
        format!(
            "Package: {PACKAGE}\n\
             Version: {}\n\
             Architecture: amd64\n\
             Maintainer: vmscale developers <vmscale@localhost>\n\
             Installed-Size: {}\n\
             Depends: {}\n\
             Section: admin\n\
             Priority: optional\n\
             Description: vmscale informant: memory and CPU pressure from inside a VM\n \
             Runs inside each virtual machine that vmscale scales live. It streams the\n \
             guest kernel's memory pressure (eBPF, PSI, cgroup v2 events, a usage\n \
             watermark) to the node agent, approves or denies memory downscales, and\n \
             brings hot-added CPUs and memory online.\n",
            self.version,
            self.installed_kib,
            self.depends.join(", ")
        )
    }
}

/// `DEBIAN/conffiles`: the config only (the unit is the package's, and
/// belongs under /etc/systemd/system when changed).
pub fn conffiles() -> String {
    format!("/{CONFIG_PATH}\n")
}

/// The package file's name, as Debian spells it.
pub fn file_name(version: &str) -> String {
    format!("{PACKAGE}_{version}_amd64.deb")
}

/// `Depends:` for the shared libraries the binary names (`readelf -d`'s
/// NEEDED), given the build host's glibc upstream version: the package
/// wants at least the glibc it was built against. A library not known here
/// is an error, so a new dependency can't slip into the package unnamed.
pub fn depends(needed: &[String], glibc: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut push = |d: String| {
        if !out.contains(&d) {
            out.push(d);
        }
    };
    for lib in needed {
        match lib.as_str() {
            "libc.so.6"
            | "libm.so.6"
            | "libdl.so.2"
            | "libpthread.so.0"
            | "librt.so.1"
            | "ld-linux-x86-64.so.2" => push(format!("libc6 (>= {glibc})")),
            "libgcc_s.so.1" => push("libgcc-s1".to_owned()),
            other => bail!(
                "the informant needs {other}, which the package's Depends does not name yet; \
                 add its Debian package to package/control.rs"
            ),
        }
    }
    Ok(out)
}

/// The upstream part of a Debian version: `2.36-9+deb12u14` -> `2.36`.
pub fn upstream(version: &str) -> &str {
    let no_epoch = version.split_once(':').map_or(version, |(_, v)| v);
    no_epoch.rsplit_once('-').map_or(no_epoch, |(u, _)| u)
}

/// `debian/copyright` in its machine-readable form, naming the workspace's licence.
pub fn copyright(license: &str) -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: vmscale\n\n\
         Files: *\nCopyright: vmscale developers\nLicense: {license}\n \
         On Debian systems the full text of the {license} licence is in\n \
         /usr/share/common-licenses/{license}.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_names_the_package_version_and_dependencies() {
        let deps = depends(
            &["libgcc_s.so.1".into(), "libm.so.6".into(), "libc.so.6".into(), "ld-linux-x86-64.so.2".into()],
            upstream("2.36-9+deb12u14"),
        )
        .unwrap();
        assert_eq!(deps, ["libgcc-s1", "libc6 (>= 2.36)"]);
        let c = Control { version: "0.1.0".into(), depends: deps, installed_kib: 12345 }.render();
        assert!(c.starts_with("Package: vmscale-informant\nVersion: 0.1.0\nArchitecture: amd64\n"), "{c}");
        assert!(c.contains("\nDepends: libgcc-s1, libc6 (>= 2.36)\n"), "{c}");
        assert!(c.contains("\nInstalled-Size: 12345\n"), "{c}");
        // Every continuation line of the description starts with a space,
        // and the file ends with a newline (dpkg-deb rejects it otherwise).
        let description = c.split_once("Description:").unwrap().1;
        assert!(description.lines().skip(1).all(|l| l.starts_with(' ') && l.len() > 1), "{c}");
        assert!(c.ends_with('\n'));
    }

    #[test]
    fn an_unknown_library_is_an_error() {
        let e = depends(&["libssl.so.3".into()], "2.36").unwrap_err().to_string();
        assert!(e.contains("libssl.so.3"), "{e}");
    }

    #[test]
    fn upstream_versions() {
        assert_eq!(upstream("2.36-9+deb12u14"), "2.36");
        assert_eq!(upstream("1:2.36-9"), "2.36");
        assert_eq!(upstream("2.36"), "2.36");
    }

    #[test]
    fn layout_puts_each_file_where_the_unit_and_policy_expect() {
        let paths: Vec<&str> = LAYOUT.iter().map(|e| e.path).collect();
        assert!(paths.iter().all(|p| !p.starts_with('/')), "{paths:?}");
        assert_eq!(file_name("0.1.0"), "vmscale-informant_0.1.0_amd64.deb");
        assert_eq!(conffiles(), "/etc/vmscale/informant.toml\n");
        // The shipped unit starts the binary and names the object where the
        // package puts them.
        let unit = include_str!("../../../deploy/informant.service");
        assert!(unit.contains(&format!("ExecStart=/{BINARY_PATH} --config /{CONFIG_PATH}")), "{unit}");
        assert!(unit.contains(&format!("VMSCALE_EBPF_OBJECT=/{EBPF_PATH}")), "{unit}");
        assert!(unit.contains(&format!("Documentation=file:///{CONFIG_PATH}")), "{unit}");
        assert!(include_str!("postinst").contains(&format!("/{SYSCTL_PATH}")));
        for (name, script) in SCRIPTS {
            assert!(script.starts_with("#!/bin/sh\nset -e\n"), "{name}");
        }
    }
}
