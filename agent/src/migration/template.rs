//! The incoming QEMU's command line, built by the target from its own
//! template (the `[migration]` settings of this node) and the VM's typed
//! spec ([`super::machine::MachineSpec`]), never from arguments in a
//! request. Pure: [`incoming_command_line`] is table-tested, hostile specs
//! included.
//!
//! The order of the options is the one of [`crate::qmp::qemu_args::QemuArgs`]
//! (which starts the VMs a source runs): PCI devices get their slots in
//! the order they are created, and the stream's device sections must find
//! the same slots on the target.

use std::path::{Path, PathBuf};

use super::machine::{MachineSpec, VsockDevice, DEFAULT_BOOT_RAM};
use super::stream_tls::{target_args, StreamTls};
use crate::qmp::qemu_args::HOST_ROOT_SHARE;

/// What this node puts on every incoming QEMU's command line, and where
/// it finds what a spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// `-sandbox on,...`: QEMU's seccomp filter (no new processes, no
    /// privilege changes, no obsolete syscalls).
    pub sandbox: bool,
    /// Where the kernels and initrds named by specs are.
    pub image_dir: Option<PathBuf>,
    /// Where the disks named by specs are.
    pub disk_dir: Option<PathBuf>,
    /// Where the vhost-user vsock sockets named by specs are.
    pub vsock_dir: Option<PathBuf>,
    /// Taps a VM may use start with this.
    pub tap_prefix: String,
    /// Whether a VM may have the read-only 9p share of the host's root.
    pub host_root_share: bool,
}

/// This incoming QEMU's own files and stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingFiles {
    pub qmp: PathBuf,
    pub pid_file: PathBuf,
    pub console: PathBuf,
    /// QEMU's TLS on the stream, from this peer node only; none: plain.
    pub tls: Option<StreamTls>,
}

/// The incoming QEMU's descriptor of the stream's listening socket, which
/// the target agent binds and hands over ([`super::target::LocalIncoming`]).
pub const STREAM_FD: i32 = 3;

/// A spec this template cannot start; the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("the vm boots a kernel directly, and migration.image_dir is not set on this node")]
    NoImageDir,
    #[error("the vm has disks, and migration.disk_dir is not set on this node")]
    NoDiskDir,
    #[error("the vm has a vhost-user vsock, and migration.vsock_dir is not set on this node")]
    NoVsockDir,
    #[error("tap {0:?} does not start with migration.tap_prefix {1:?}")]
    ForeignTap(String, String),
    #[error("the vm shares the host's root over 9p, and migration.host_root_share is off on this node")]
    NoHostShare,
    #[error("the stream's peer {0:?} is not a node name")]
    BadPeer(String),
    #[error("the vm's spec is invalid")]
    Spec(#[from] super::machine::SpecError),
}

/// The seccomp filter's settings: deny everything QEMU does not need once
/// it runs (the incoming side runs no helper programs).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The arguments after the binary. The spec is validated here again, so
/// no caller can skip it.
pub fn incoming_command_line(
    t: &Template,
    spec: &MachineSpec,
    files: &IncomingFiles,
) -> Result<Vec<String>, TemplateError> {
    spec.validate()?;
    let mut a = Args::default();
    a.opt("-accel", spec.accel.name());
    let backend = |shared: bool| if shared { "memory-backend-memfd,share=on" } else { "memory-backend-ram" };
    let ram = &spec.boot_ram;
    if ram.id == DEFAULT_BOOT_RAM && !ram.shared {
        a.opt("-machine", &spec.machine);
    } else {
        a.opt("-object", &format!("{},id={},size={}M", backend(ram.shared), ram.id, spec.memory_mib));
        a.opt("-machine", &format!("{},memory-backend={}", spec.machine, ram.id));
    }
    if let Some(model) = &spec.cpu_model {
        a.opt("-cpu", model);
    }
    a.opt("-smp", &format!("{},maxcpus={}", spec.cpus, spec.max_cpus));
    a.opt("-m", &format!("{}M,slots={},maxmem={}M", spec.memory_mib, spec.slots, spec.max_memory_mib));
    if let Some(v) = spec.virtio_mem {
        a.opt("-object", &format!("{},id=vmem0,size={}M", backend(v.shared), v.size_mib));
        a.opt("-device", "virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size=0");
    }
    if let Some(b) = &spec.boot {
        let dir = t.image_dir.as_deref().ok_or(TemplateError::NoImageDir)?;
        a.opt("-kernel", &path(dir, &b.kernel));
        if let Some(initrd) = &b.initrd {
            a.opt("-initrd", &path(dir, initrd));
        }
        a.opt("-append", &b.append);
    }
    if !spec.disks.is_empty() {
        let dir = t.disk_dir.as_deref().ok_or(TemplateError::NoDiskDir)?;
        for d in &spec.disks {
            // Plain names hold no comma; `,,` is QEMU's escape all the same.
            let file = path(dir, &d.name).replace(',', ",,");
            a.opt("-drive", &format!("file={file},if=virtio,format={}", d.format.name()));
        }
    }
    for (i, n) in spec.nics.iter().enumerate() {
        if !n.tap.starts_with(&t.tap_prefix) || t.tap_prefix.is_empty() {
            return Err(TemplateError::ForeignTap(n.tap.clone(), t.tap_prefix.clone()));
        }
        a.opt("-netdev", &format!("tap,id=n{i},ifname={},script=no,downscript=no", n.tap));
        let mac = n.mac.map(|m| {
            let hex: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
            format!(",mac={}", hex.join(":"))
        });
        a.opt("-device", &format!("virtio-net-pci,netdev=n{i}{},romfile=", mac.unwrap_or_default()));
    }
    match &spec.vsock {
        Some(VsockDevice::Kernel { cid }) => a.opt("-device", &format!("vhost-vsock-pci,guest-cid={cid}")),
        Some(VsockDevice::VhostUser { socket }) => {
            let dir = t.vsock_dir.as_deref().ok_or(TemplateError::NoVsockDir)?;
            a.opt("-chardev", &format!("socket,id=vsock0,path={}", path(dir, socket)));
            a.opt("-device", "vhost-user-vsock-pci,chardev=vsock0");
        }
        None => {}
    }
    if spec.host_root_share {
        if !t.host_root_share {
            return Err(TemplateError::NoHostShare);
        }
        a.opt("-virtfs", HOST_ROOT_SHARE);
    }
    a.flag("-nodefaults");
    a.opt("-display", "none");
    if spec.no_reboot {
        a.flag("-no-reboot");
    }
    if spec.serial_console {
        a.opt("-chardev", &format!("file,id=console,path={},append=on", files.console.display()));
        a.opt("-serial", "chardev:console");
    }
    if t.sandbox {
        a.opt("-sandbox", SANDBOX);
    }
    a.0.extend(spec.devices.qemu_args());
    if let Some(tls) = &files.tls {
        a.0.extend(target_args(tls).ok_or_else(|| TemplateError::BadPeer(tls.peer_node.clone()))?);
    }
    // -S: the guest stays paused after the stream until the source's
    // confirm resumes it. The stream's listener is the agent's socket
    // (`fd` after `tcp:` is QEMU's socket address of that type; QEMU 7.2
    // takes a bare number only on its command line, not over QMP).
    a.flag("-S");
    a.opt("-incoming", &format!("tcp:fd:{STREAM_FD}"));
    a.opt("-pidfile", &files.pid_file.display().to_string());
    a.opt("-qmp", &format!("unix:{},server=on,wait=off", files.qmp.display()));
    Ok(a.0)
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn opt(&mut self, o: &str, v: &str) {
        self.0.push(o.to_owned());
        self.0.push(v.to_owned());
    }

    fn flag(&mut self, o: &str) {
        self.0.push(o.to_owned());
    }
}

#[cfg(test)]
#[path = "template_tests.rs"]
mod tests;
