//! QEMU's command line as typed data. Every QEMU the project starts (the
//! agent's tests and benchmarks, the e2e guests, the migration harness's
//! guests) is described by one [`QemuArgs`] and turned into argv here, so the
//! hotplug room (`slots`, `maxmem`, `maxcpus`), the virtio-mem device and the
//! QMP socket are spelled one way. Values are numbers, paths and enums, not
//! free text, except `extra` (the caller's own, never a remote peer's).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use super::client::Endpoint;

/// `-accel`: TCG where KVM is not usable (this machine), KVM elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// A kernel booted directly (`-kernel`, `-initrd`, `-append`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// A virtio disk (`-drive if=virtio`): the Debian guest's root, a per-VM
/// qcow2 overlay on a read-only raw image. A migration target on the same
/// host opens the same file: QEMU opens it inactive while incoming and takes
/// it over when the guest resumes there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The guest's network card (virtio-net, no option ROM: the kernel is given
/// directly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// QEMU user networking with one TCP port forwarded from the host.
    User { host: SocketAddr, guest_port: u16 },
    /// A tap device (on a bridge the caller set up); only this kind keeps
    /// TCP connections across a live migration.
    Tap { ifname: String, mac: Option<[u8; 6]> },
}

/// The virtio-mem device `vm0` and its backend `vmem0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMem {
    pub size_mib: u64,
    /// `memory-backend-memfd,share=on` (needed by vhost-user devices).
    pub memfd: bool,
}

/// A read-only 9p share of the host's root, for host programs in the guest.
pub const HOST_ROOT_SHARE: &str =
    "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap";

/// One QEMU, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuArgs {
    pub accel: Accel,
    pub cpus: u32,
    pub max_cpus: u32,
    pub memory_mib: u64,
    pub dimm_slots: u32,
    pub max_memory_mib: u64,
    pub virtio_mem: Option<VirtioMem>,
    pub boot: Option<DirectBoot>,
    /// The first virtio disk (`/dev/vda` in the guest).
    pub disk: Option<Disk>,
    pub network: Option<Network>,
    pub qmp: Option<Endpoint>,
    /// `-S`: vCPUs stay stopped until `cont`.
    pub paused: bool,
    /// `-no-reboot`: a guest that reboots (panics) ends QEMU instead.
    pub no_reboot: bool,
    /// `-virtfs` of [`HOST_ROOT_SHARE`].
    pub share_host_root: bool,
    /// `-nodefaults`: none of the devices QEMU adds on its own (NIC, VGA,
    /// serial port, drives) beside the ones named here.
    pub nodefaults: bool,
    /// `-nographic` (the serial console and QEMU's monitor on stdio) rather
    /// than `-display none`.
    pub nographic: bool,
    /// Appended last, as given.
    pub extra: Vec<String>,
}

impl QemuArgs {
    /// `cpus` of `max_cpus` vCPUs, `memory_mib` of `max_memory_mib` in
    /// `dimm_slots` slots; nothing else.
    pub fn new(accel: Accel, cpus: u32, max_cpus: u32, memory_mib: u64) -> QemuArgs {
        QemuArgs {
            accel,
            cpus,
            max_cpus,
            memory_mib,
            dimm_slots: 8,
            max_memory_mib: memory_mib,
            virtio_mem: None,
            boot: None,
            disk: None,
            network: None,
            qmp: None,
            paused: false,
            no_reboot: false,
            share_host_root: false,
            nodefaults: true,
            nographic: false,
            extra: Vec::new(),
        }
    }

    /// The arguments after the binary.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::with_capacity(32);
        let mut push = |k: &str, v: String| {
            a.push(k.to_owned());
            a.push(v);
        };
        push("-accel", self.accel.name().to_owned());
        push("-M", "pc".to_owned());
        push("-smp", format!("{},maxcpus={}", self.cpus, self.max_cpus));
        push("-m", format!("{}M,slots={},maxmem={}M", self.memory_mib, self.dimm_slots, self.max_memory_mib));
        if let Some(v) = self.virtio_mem {
            let backend = if v.memfd { "memory-backend-memfd,share=on" } else { "memory-backend-ram" };
            push("-object", format!("{backend},id=vmem0,size={}M", v.size_mib));
            // node=0 works without -numa on QEMU 7.2.
            push("-device", "virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size=0".to_owned());
        }
        if let Some(b) = &self.boot {
            push("-kernel", b.kernel.display().to_string());
            push("-initrd", b.initrd.display().to_string());
            push("-append", b.cmdline.clone());
        }
        if let Some(d) = &self.disk {
            // A comma in the path would end QEMU's `file=`; `,,` is its escape.
            let file = d.path.display().to_string().replace(',', ",,");
            push("-drive", format!("file={file},if=virtio,format={}", d.format.name()));
        }
        if let Some(n) = &self.network {
            let (netdev, device) = network_args(n);
            push("-netdev", netdev);
            push("-device", device);
        }
        if let Some(q) = &self.qmp {
            push("-qmp", qmp_arg(q));
        }
        if self.share_host_root {
            push("-virtfs", HOST_ROOT_SHARE.to_owned());
        }
        if self.nodefaults {
            a.push("-nodefaults".to_owned());
        }
        if self.nographic {
            a.push("-nographic".to_owned());
        } else {
            a.extend(["-display", "none"].map(str::to_owned));
        }
        if self.paused {
            a.push("-S".to_owned());
        }
        if self.no_reboot {
            a.push("-no-reboot".to_owned());
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

fn network_args(n: &Network) -> (String, String) {
    match n {
        Network::User { host, guest_port } => (
            format!("user,id=n0,hostfwd=tcp:{}:{}-:{guest_port}", host.ip(), host.port()),
            "virtio-net-pci,netdev=n0,romfile=".to_owned(),
        ),
        Network::Tap { ifname, mac } => {
            let mac = mac.map(|m| {
                let hex: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
                format!(",mac={}", hex.join(":"))
            });
            (
                format!("tap,id=n0,ifname={ifname},script=no,downscript=no"),
                format!("virtio-net-pci,netdev=n0{},romfile=", mac.unwrap_or_default()),
            )
        }
    }
}

/// `-qmp` for a QMP server QEMU listens on.
pub fn qmp_arg(endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Unix(path) => format!("unix:{},server=on,wait=off", path.display()),
        Endpoint::Tcp(addr) => format!("tcp:{addr},server=on,wait=off"),
    }
}

/// The loopback address a forwarded guest port listens on.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(args: &[String]) -> Vec<(String, String)> {
        args.windows(2)
            .filter(|w| w[0].starts_with('-') && !w[1].starts_with('-'))
            .map(|w| (w[0].clone(), w[1].clone()))
            .collect()
    }

    #[test]
    fn hotplug_room_and_virtio_mem_are_spelled_once() {
        let mut q = QemuArgs::new(Accel::Tcg, 1, 8, 256);
        q.max_memory_mib = 4096;
        q.virtio_mem = Some(VirtioMem { size_mib: 2048, memfd: true });
        q.qmp = Some(Endpoint::Unix("/run/vm/qmp.sock".into()));
        q.paused = true;
        let args = q.to_args();
        let p = pairs(&args);
        assert!(p.contains(&("-smp".into(), "1,maxcpus=8".into())));
        assert!(p.contains(&("-m".into(), "256M,slots=8,maxmem=4096M".into())));
        assert!(p.contains(&("-object".into(), "memory-backend-memfd,share=on,id=vmem0,size=2048M".into())));
        assert!(p.contains(&("-qmp".into(), "unix:/run/vm/qmp.sock,server=on,wait=off".into())));
        assert_eq!(args.last().map(String::as_str), Some("-S"));
        assert!(!args.iter().any(|a| a == "-kernel" || a == "-nographic"));
        assert!(args.iter().any(|a| a == "-nodefaults"));
    }

    #[test]
    fn networks_and_direct_boot() {
        let mut q = QemuArgs::new(Accel::Kvm, 2, 4, 512);
        q.boot = Some(DirectBoot {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0 memhp_default_state=online_movable".into(),
        });
        q.network =
            Some(Network::Tap { ifname: "vmtap0".into(), mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]) });
        let p = pairs(&q.to_args());
        assert!(p.contains(&("-accel".into(), "kvm".into())));
        assert!(p.contains(&("-append".into(), "console=ttyS0 memhp_default_state=online_movable".into())));
        assert!(
            p.contains(&("-device".into(), "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile=".into()))
        );
        q.network = Some(Network::User { host: loopback(4000), guest_port: 5000 });
        let p = pairs(&q.to_args());
        assert!(p.contains(&("-netdev".into(), "user,id=n0,hostfwd=tcp:127.0.0.1:4000-:5000".into())));
        q.disk = Some(Disk { path: "/vm/root.qcow2".into(), format: DiskFormat::Qcow2 });
        let p = pairs(&q.to_args());
        assert!(p.contains(&("-drive".into(), "file=/vm/root.qcow2,if=virtio,format=qcow2".into())));
    }
}
