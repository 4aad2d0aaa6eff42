//! The guest's configuration files (beside this file in `files/`) and where
//! each lands in the root filesystem. Compiled in, so the image's inputs
//! hash sees every change to them.

/// One file copied into the guest.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Path under the root, without the leading `/`.
    pub path: &'static str,
    pub mode: u32,
    pub text: &'static str,
}

const fn asset(path: &'static str, mode: u32, text: &'static str) -> Asset {
    Asset { path, mode, text }
}

/// Copied in before the kernel is installed, so Debian's initramfs is built
/// small from the start.
pub const EARLY: &[Asset] = &[
    asset("etc/initramfs-tools/conf.d/vmscale.conf", 0o644, include_str!("files/initramfs.conf")),
    asset("etc/initramfs-tools/modules", 0o644, include_str!("files/initramfs-modules")),
];

/// Copied in after every package is installed, before `setup.sh` runs.
pub const LATE: &[Asset] = &[
    asset("usr/local/sbin/vmscale-cmdline", 0o755, include_str!("files/vmscale-cmdline")),
    asset("etc/systemd/system/vmscale-cmdline.service", 0o644, include_str!("files/vmscale-cmdline.service")),
    asset("usr/local/sbin/vmscale-ready", 0o755, include_str!("files/vmscale-ready")),
    asset("etc/systemd/system/vmscale-ready.service", 0o644, include_str!("files/vmscale-ready.service")),
    asset("etc/systemd/system/workload.slice", 0o644, include_str!("files/workload.slice")),
    asset(
        "etc/systemd/system/postgresql@.service.d/vmscale.conf",
        0o644,
        include_str!("files/postgresql-slice.conf"),
    ),
    asset(
        "etc/systemd/system/vmscale-informant.service.d/vmscale.conf",
        0o644,
        include_str!("files/informant-args.conf"),
    ),
    asset("etc/systemd/journald.conf.d/vmscale.conf", 0o644, include_str!("files/journald.conf")),
    asset("etc/postgresql/15/main/conf.d/vmscale.conf", 0o644, include_str!("files/postgresql.conf")),
    asset(SETUP_PATH, 0o755, include_str!("files/setup.sh")),
    asset("etc/vmscale-build/pg_hba.conf", 0o644, include_str!("files/pg_hba.conf")),
];

/// The script the customize hook runs in the chroot (it removes its
/// directory, `etc/vmscale-build`, when done).
pub const SETUP_PATH: &str = "etc/vmscale-build/setup.sh";

/// Every asset's path and text, for the inputs hash.
pub fn fingerprint() -> String {
    let mut s = String::new();
    for a in EARLY.iter().chain(LATE) {
        s.push_str(&format!("== {} {:o}\n{}\n", a.path, a.mode, a.text));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_and_the_informant_drop_in_agree_with_the_code() {
        let ready = include_str!("files/vmscale-ready");
        assert!(ready.contains(r#"echo "vmscale-guest: ready postgres=$pg informant=$inf""#));
        assert!(ready.contains(&format!("echo \"{} postgres=", super::super::READY_PREFIX)));
        // The drop-in's ExecStart repeats the package's, plus the flags.
        let unit = include_str!("../../../deploy/informant.service");
        let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        let drop_in = include_str!("files/informant-args.conf");
        assert!(drop_in.contains(&format!("{exec} $VMSCALE_INFORMANT_ARGS")), "{drop_in}");
        // The workload slice is the cgroup the shipped config names.
        let config = include_str!("../../../deploy/informant.toml");
        assert!(config.contains("workload_cgroup = \"/sys/fs/cgroup/workload.slice\""));
        assert!(include_str!("files/postgresql-slice.conf").contains("Slice=workload.slice"));
    }

    #[test]
    fn paths_are_relative_and_unique() {
        let all: Vec<&str> = EARLY.iter().chain(LATE).map(|a| a.path).collect();
        assert!(all.iter().all(|p| !p.starts_with('/')));
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len());
    }
}
