//! Booting the Debian guest: its QEMU command line as the agent's typed
//! [`QemuArgs`], so scenarios add QMP, a tap or a port forward, virtio-mem
//! the same way as for every other QEMU the project starts.
//!
//! ```ignore
//! let image = debian::ensure(&root, &mut steps)?;
//! debian::overlay(&image, &dir.join("vm0.qcow2"))?;
//! let mut q = boot::qemu_args(&image, &dir.join("vm0.qcow2"), &boot::Shape::small(),
//!     &boot::static_ip(Ipv4Addr::new(10, 0, 2, 15), 24, Some(Ipv4Addr::new(10, 0, 2, 2))));
//! q.network = Some(Network::User { host: loopback(port), guest_port: debian::PG_PORT });
//! let vm = boot::start(&q, &dir.join("console.log"), true)?; // wait for READY_PREFIX
//! ```

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use vmscale_agent::qmp::qemu_args::{Accel, DirectBoot, Disk, DiskFormat, QemuArgs};

use super::DebianImage;
use crate::guest::qemu::Vm;

/// A VM's size. Sizes in MiB.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// TCG here (no usable KVM, see ARCHITECTURE.md); KVM where it works.
    pub accel: Accel,
    pub cpus: u32,
    pub max_cpus: u32,
    pub memory_mib: u64,
    pub dimm_slots: u32,
    pub max_memory_mib: u64,
}

impl Shape {
    /// The smoke test's: 1 of 2 vCPUs, 1 GiB of at most 4 GiB.
    pub fn small() -> Shape {
        Shape {
            accel: Accel::Tcg,
            cpus: 1,
            max_cpus: 2,
            memory_mib: 1024,
            dimm_slots: 8,
            max_memory_mib: 4096,
        }
    }
}

/// The QEMU arguments for one VM of `image` booted from `overlay` (made by
/// [`super::overlay`]): Debian's kernel and initrd given directly with the
/// image's command line plus `extra_cmdline` (e.g. [`static_ip`]), the
/// overlay as `/dev/vda`, the serial console on QEMU's stdout
/// (`-nographic`, QEMU's default devices kept for the serial port), and a
/// guest reboot (a panic) ending QEMU. No network: set `network` (a tap on
/// `netns::Fabric`, or user networking with a forward to [`super::PG_PORT`]
/// or the informant's port), and `qmp`, `virtio_mem` as needed.
pub fn qemu_args(image: &DebianImage, overlay: &Path, shape: &Shape, extra_cmdline: &[String]) -> QemuArgs {
    let mut cmdline = image.cmdline.clone();
    for extra in extra_cmdline {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let mut q = QemuArgs::new(shape.accel, shape.cpus, shape.max_cpus, shape.memory_mib);
    q.dimm_slots = shape.dimm_slots;
    q.max_memory_mib = shape.max_memory_mib;
    q.boot = Some(DirectBoot { kernel: image.kernel.clone(), initrd: image.initrd.clone(), cmdline });
    q.disk = Some(Disk { path: overlay.to_path_buf(), format: DiskFormat::Qcow2 });
    q.nodefaults = false;
    q.nographic = true;
    q.no_reboot = true;
    q
}

/// Kernel command line keys for the guest's static address on its first
/// virtio NIC (applied by `vmscale-cmdline.service` before network.target).
pub fn static_ip(addr: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>) -> Vec<String> {
    let mut v = vec![format!("vmscale.ip={addr}/{prefix}")];
    if let Some(gw) = gateway {
        v.push(format!("vmscale.gw={gw}"));
    }
    v
}

/// The kernel command line key that has the informant listen on TCP `port`
/// instead of the packaged config's vsock address (for user networking or a
/// tap, where the VM has no vsock device), in plain text: a test guest.
pub fn informant_tcp(port: u16) -> String {
    format!("vmscale.informant=--listen,tcp:0.0.0.0:{port},--insecure")
}

/// Starts QEMU with `args`; the console goes to `serial_log` (and stderr
/// with `echo`) and arrives line by line on [`Vm::console`]. Dropping the
/// [`Vm`] kills QEMU.
pub fn start(args: &QemuArgs, serial_log: &Path, echo: bool) -> anyhow::Result<Vm> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(args.to_args());
    crate::guest::qemu::spawn(cmd, serial_log, echo)
}

/// The states on a ready line: `(postgres, informant)`.
pub fn ready_states(line: &str) -> Option<(&str, &str)> {
    let rest = line.split_once(super::READY_PREFIX)?.1;
    let mut postgres = None;
    let mut informant = None;
    for word in rest.split_whitespace() {
        if let Some(v) = word.strip_prefix("postgres=") {
            postgres = Some(v);
        } else if let Some(v) = word.strip_prefix("informant=") {
            informant = Some(v);
        }
    }
    Some((postgres?, informant?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn the_vm_boots_the_overlay_with_the_image_kernel() {
        let image = DebianImage {
            kernel: "/g/vmlinux".into(),
            initrd: "/g/initrd.img".into(),
            rootfs: "/g/rootfs.img".into(),
            cmdline: super::super::CMDLINE.into(),
        };
        let extra = static_ip(Ipv4Addr::new(10, 0, 0, 5), 24, Some(Ipv4Addr::new(10, 0, 0, 1)));
        let q = qemu_args(&image, &PathBuf::from("/vm/root.qcow2"), &Shape::small(), &extra);
        let args = q.to_args();
        let at = |k: &str| args.iter().position(|a| a == k).map(|i| args[i + 1].clone()).unwrap();
        assert_eq!(at("-kernel"), "/g/vmlinux");
        assert_eq!(at("-initrd"), "/g/initrd.img");
        assert!(at("-append").ends_with(" vmscale.ip=10.0.0.5/24 vmscale.gw=10.0.0.1"));
        assert_eq!(at("-drive"), "file=/vm/root.qcow2,if=virtio,format=qcow2");
        assert!(args.iter().any(|a| a == "-nographic") && !args.iter().any(|a| a == "-nodefaults"));
    }

    #[test]
    fn ready_lines_are_read() {
        let line = "[  OK  ] x\rvmscale-guest: ready postgres=active informant=failed";
        assert_eq!(ready_states(line), Some(("active", "failed")));
        assert_eq!(ready_states("vmscale-guest: ready postgres=active"), None);
        assert_eq!(ready_states("other"), None);
    }
}
