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

/// The guest's vsock device. The guest's side is the same virtio-vsock
/// either way; the host's side is the kernel's vhost-vsock where it exists
/// (production nodes), else a vhost-user backend (vhost-device-vsock) whose
/// unix socket QEMU connects to. A vhost-user device maps all guest memory
/// in the backend, so every RAM backend must be shared: the boot memory
/// becomes `memory-backend-memfd,share=on` (`-machine memory-backend`), so
/// does virtio-mem's, and the agent's DIMMs need `dimm_backend = "memfd"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vsock {
    /// `vhost-vsock-pci,guest-cid=N` (needs `/dev/vhost-vsock`).
    Kernel { guest_cid: u32 },
    /// `vhost-user-vsock-pci` on the backend's control socket (the backend
    /// is given the guest's CID, `--vm guest-cid=N,socket=...`).
    User { socket: PathBuf },
}

/// Where the kernel's vhost-vsock is.
pub const VHOST_VSOCK_DEV: &str = "/dev/vhost-vsock";

impl Vsock {
    /// The kernel's device where this host has it, else the vhost-user
    /// backend at `socket` (which the caller starts).
    pub fn for_this_host(guest_cid: u32, socket: PathBuf) -> Vsock {
        if std::path::Path::new(VHOST_VSOCK_DEV).exists() {
            Vsock::Kernel { guest_cid }
        } else {
            Vsock::User { socket }
        }
    }

    /// Whether guest RAM must be shared with another process.
    pub fn shares_memory(&self) -> bool {
        matches!(self, Vsock::User { .. })
    }
}

/// The boot memory's backend object when it must be shared.
const BOOT_RAM_ID: &str = "ram0";

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
    /// A vsock device (see [`Vsock`]).
    pub vsock: Option<Vsock>,
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
            vsock: None,
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
        let shared = self.vsock.as_ref().is_some_and(Vsock::shares_memory);
        push("-accel", self.accel.name().to_owned());
        if shared {
            push(
                "-object",
                format!("memory-backend-memfd,id={BOOT_RAM_ID},size={}M,share=on", self.memory_mib),
            );
            push("-M", format!("pc,memory-backend={BOOT_RAM_ID}"));
        } else {
            push("-M", "pc".to_owned());
        }
        push("-smp", format!("{},maxcpus={}", self.cpus, self.max_cpus));
        push("-m", format!("{}M,slots={},maxmem={}M", self.memory_mib, self.dimm_slots, self.max_memory_mib));
        if let Some(v) = self.virtio_mem {
            let backend =
                if v.memfd || shared { "memory-backend-memfd,share=on" } else { "memory-backend-ram" };
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
        match &self.vsock {
            Some(Vsock::Kernel { guest_cid }) => {
                push("-device", format!("vhost-vsock-pci,guest-cid={guest_cid}"))
            }
            Some(Vsock::User { socket }) => {
                push("-chardev", format!("socket,id=vsock0,path={}", socket.display()));
                push("-device", "vhost-user-vsock-pci,chardev=vsock0".to_owned());
            }
            None => {}
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

    /// Without vhost-vsock the device is vhost-user, and every RAM backend
    /// is shared memfd (the backend maps it); with it, the kernel's device
    /// and QEMU's own RAM.
    #[test]
    fn vsock_kernel_or_vhost_user_with_shared_memory() {
        let mut q = QemuArgs::new(Accel::Tcg, 1, 4, 512);
        q.virtio_mem = Some(VirtioMem { size_mib: 1024, memfd: false });
        q.vsock = Some(Vsock::User { socket: "/run/vm/vsock.ctl".into() });
        let p = pairs(&q.to_args());
        assert!(p.contains(&("-object".into(), "memory-backend-memfd,id=ram0,size=512M,share=on".into())));
        assert!(p.contains(&("-M".into(), "pc,memory-backend=ram0".into())));
        assert!(p.contains(&("-object".into(), "memory-backend-memfd,share=on,id=vmem0,size=1024M".into())));
        assert!(p.contains(&("-chardev".into(), "socket,id=vsock0,path=/run/vm/vsock.ctl".into())));
        assert!(p.contains(&("-device".into(), "vhost-user-vsock-pci,chardev=vsock0".into())));

        q.vsock = Some(Vsock::Kernel { guest_cid: 7 });
        let p = pairs(&q.to_args());
        assert!(p.contains(&("-device".into(), "vhost-vsock-pci,guest-cid=7".into())));
        assert!(p.contains(&("-M".into(), "pc".into())));
        assert!(p.contains(&("-object".into(), "memory-backend-ram,id=vmem0,size=1024M".into())));
        assert!(!p.iter().any(|(_, v)| v.contains("ram0") || v.starts_with("socket,")));
        let here = Vsock::for_this_host(3, "/s".into());
        assert_eq!(here.shares_memory(), !std::path::Path::new(VHOST_VSOCK_DEV).exists());
    }
}
