//! The VM as a migration target rebuilds it: typed data the source sends in
//! place of a command line, every count and size bounded and every name
//! checked against a whitelist before the target looks at it. The target
//! turns it into QEMU's arguments with its own template
//! ([`super::template::incoming_command_line`]); nothing here is ever
//! passed to QEMU as an option of its own, and no name may carry a comma,
//! an `=` or a path separator into a value QEMU splits.

use serde::{Deserialize, Serialize};

use crate::qmp::migrate_spec::DeviceSpec;

/// Most vCPUs (QEMU's `pc` and `q35` machines stop at 288 and 1024).
pub const MAX_VCPUS: u32 = 1024;
/// Most memory, boot or maximum, MiB (16 TiB).
pub const MAX_MEMORY_MIB: u64 = 16 << 20;
/// Most DIMM slots (QEMU's own limit is 256).
pub const MAX_SLOTS: u32 = 256;
pub const MAX_DISKS: usize = 8;
pub const MAX_NICS: usize = 4;
/// Longest kernel command line, bytes.
pub const MAX_APPEND: usize = 4096;
/// Longest name of a file, tap or backend.
pub const MAX_NAME: usize = 64;
/// Longest tap name (Linux's IFNAMSIZ less its NUL).
pub const MAX_TAP: usize = 15;
/// The CIDs a guest may have (0-2 are the hypervisor, local and host).
pub const GUEST_CIDS: std::ops::RangeInclusive<u32> = 3..=0xffff_fffe;

/// The VM's shape, as the source hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    pub accel: Accel,
    /// `-machine` type, e.g. `pc` or `pc-i440fx-7.2`.
    pub machine: String,
    /// `-cpu` model; QEMU's default where absent.
    pub cpu_model: Option<String>,
    /// vCPUs from boot (`-smp`) and the most the VM may have (`maxcpus`).
    pub cpus: u32,
    pub max_cpus: u32,
    /// Boot memory, DIMM slots and the most memory (`-m`), MiB.
    pub memory_mib: u64,
    pub slots: u32,
    pub max_memory_mib: u64,
    /// The boot memory's backend (its id names the RAM block the stream fills).
    pub boot_ram: BootRam,
    /// Our virtio-mem device `vm0` on backend `vmem0`.
    pub virtio_mem: Option<VirtioMemDevice>,
    /// A kernel booted directly; its files are named, the target finds
    /// them in its own `migration.image_dir`.
    pub boot: Option<KernelBoot>,
    /// virtio disks, each a file the target finds in its `migration.disk_dir`.
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub vsock: Option<VsockDevice>,
    /// A serial port writing to a console log (the target's own file).
    pub serial_console: bool,
    /// `-no-reboot`.
    pub no_reboot: bool,
    /// The read-only 9p share of the host's root ([`crate::qmp::qemu_args::HOST_ROOT_SHARE`]);
    /// taken only by a target whose template allows it.
    pub host_root_share: bool,
    /// vCPUs and DIMMs added since boot, as the source's QMP reports them.
    pub devices: DeviceSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// QEMU's own boot RAM block when no backend is named.
pub const DEFAULT_BOOT_RAM: &str = "pc.ram";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootRam {
    pub id: String,
    /// Shared memory (`memory-backend-memfd,share=on`), as a vhost-user
    /// device needs.
    pub shared: bool,
}

impl Default for BootRam {
    fn default() -> Self {
        BootRam { id: DEFAULT_BOOT_RAM.to_owned(), shared: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioMemDevice {
    pub size_mib: u64,
    pub shared: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    pub kernel: String,
    pub initrd: Option<String>,
    /// The kernel command line: one argument of its own after `-append`.
    pub append: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub name: String,
    pub format: DiskFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// A virtio-net card on a tap the target's host set up (same name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VsockDevice {
    /// The kernel's vhost-vsock with this guest CID.
    Kernel { cid: u32 },
    /// A vhost-user backend's socket, named; the target finds it in its
    /// `migration.vsock_dir`.
    VhostUser { socket: String },
}

/// Why a spec is refused; the message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{field} = {value} is not a plain name (1-{MAX_NAME} of [A-Za-z0-9_.-], not starting with '.' or '-')")]
    BadName { field: &'static str, value: String },
    #[error("{field} = {value} is outside {min}..={max}")]
    OutOfRange { field: &'static str, value: u64, min: u64, max: u64 },
    #[error("{field} has {count} entries, at most {max}")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error(
        "the kernel command line is {0} bytes or has control characters (at most {MAX_APPEND} printable)"
    )]
    BadAppend(usize),
    #[error("{0}")]
    Device(String),
}

/// `value` quoted and cut, for messages about hostile input.
fn shown(value: &str) -> String {
    super::stream_uri::shown(value)
}

/// Whether `s` may stand inside a QEMU option value and as a file name:
/// no `,` (QEMU's separator), no `=`, no `/`, no leading `.` or `-`.
pub fn is_plain_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with(['.', '-'])
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn name(field: &'static str, value: &str) -> Result<(), SpecError> {
    if is_plain_name(value, MAX_NAME) {
        Ok(())
    } else {
        Err(SpecError::BadName { field, value: shown(value) })
    }
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), SpecError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(SpecError::OutOfRange { field, value, min, max })
    }
}

fn count(field: &'static str, count: usize, max: usize) -> Result<(), SpecError> {
    if count <= max {
        Ok(())
    } else {
        Err(SpecError::TooMany { field, count, max })
    }
}

/// vCPU topology properties a hot-added vCPU may carry.
const CPU_PROPS: [&str; 6] = ["socket-id", "die-id", "cluster-id", "core-id", "thread-id", "node-id"];
/// Backends a hot-added DIMM may have.
const DIMM_BACKENDS: [&str; 2] = ["memory-backend-ram", "memory-backend-memfd"];

impl MachineSpec {
    /// Every bound and whitelist; a target checks this before anything else.
    pub fn validate(&self) -> Result<(), SpecError> {
        let machine_ok = is_plain_name(&self.machine, 32)
            && (self.machine == "pc"
                || self.machine == "q35"
                || self.machine.starts_with("pc-i440fx-")
                || self.machine.starts_with("pc-q35-"));
        if !machine_ok {
            return Err(SpecError::BadName { field: "machine", value: shown(&self.machine) });
        }
        if let Some(m) = &self.cpu_model {
            name("cpu_model", m)?;
        }
        range("cpus", self.cpus.into(), 1, u64::from(self.max_cpus))?;
        range("max_cpus", self.max_cpus.into(), 1, MAX_VCPUS.into())?;
        range("memory_mib", self.memory_mib, 1, self.max_memory_mib)?;
        range("max_memory_mib", self.max_memory_mib, 1, MAX_MEMORY_MIB)?;
        range("slots", self.slots.into(), 0, MAX_SLOTS.into())?;
        name("boot_ram.id", &self.boot_ram.id)?;
        if let Some(v) = &self.virtio_mem {
            range("virtio_mem.size_mib", v.size_mib, 1, MAX_MEMORY_MIB)?;
        }
        if let Some(b) = &self.boot {
            name("boot.kernel", &b.kernel)?;
            if let Some(i) = &b.initrd {
                name("boot.initrd", i)?;
            }
            if b.append.len() > MAX_APPEND || b.append.chars().any(char::is_control) {
                return Err(SpecError::BadAppend(b.append.len()));
            }
        }
        count("disks", self.disks.len(), MAX_DISKS)?;
        for d in &self.disks {
            name("disks.name", &d.name)?;
        }
        count("nics", self.nics.len(), MAX_NICS)?;
        for n in &self.nics {
            if !is_plain_name(&n.tap, MAX_TAP) {
                return Err(SpecError::BadName { field: "nics.tap", value: shown(&n.tap) });
            }
        }
        match &self.vsock {
            Some(VsockDevice::Kernel { cid }) => {
                range("vsock.cid", (*cid).into(), (*GUEST_CIDS.start()).into(), (*GUEST_CIDS.end()).into())?
            }
            Some(VsockDevice::VhostUser { socket }) => name("vsock.socket", socket)?,
            None => {}
        }
        self.validate_devices()
    }

    /// Hot-added devices: only ours (our ids, known drivers and backends),
    /// within the machine's room.
    fn validate_devices(&self) -> Result<(), SpecError> {
        let d = &self.devices;
        count("devices.cpus", d.cpus.len(), usize::try_from(self.max_cpus).unwrap_or(usize::MAX))?;
        count("devices.dimms", d.dimms.len(), usize::try_from(self.slots).unwrap_or(usize::MAX))?;
        count("devices.virtio_mem", d.virtio_mem.len(), 1)?;
        let bad = |what: String| Err(SpecError::Device(what));
        for c in &d.cpus {
            let ours =
                c.id.strip_prefix("vmscale-cpu")
                    .is_some_and(|n| n.parse::<u32>().is_ok_and(|i| i.to_string() == n));
            if !ours {
                return bad(format!("vcpu id {} is not one of ours (vmscale-cpu<N>)", shown(&c.id)));
            }
            if !(is_plain_name(&c.driver, MAX_NAME) && c.driver.ends_with("-x86_64-cpu")) {
                return bad(format!("vcpu driver {} is not an x86_64 cpu model", shown(&c.driver)));
            }
            if let Some(k) = c.props.keys().find(|k| !CPU_PROPS.contains(&k.as_str())) {
                return bad(format!("vcpu property {} is not a topology id", shown(k)));
            }
            if c.props.values().any(|v| !(0..=i64::from(MAX_VCPUS)).contains(v)) {
                return bad(format!("vcpu {} has a topology id out of range", c.id));
            }
        }
        for m in &d.dimms {
            let ours = crate::qmp::dimm::parse_device_id(&m.id).is_some()
                && crate::qmp::dimm::parse_backend_id(&m.backend).is_some();
            if !ours {
                return bad(format!("dimm {}/{} is not one of ours", shown(&m.id), shown(&m.backend)));
            }
            if !DIMM_BACKENDS.contains(&m.backend_type.as_str()) {
                return bad(format!("dimm backend type {} is not ram or memfd", shown(&m.backend_type)));
            }
            range("devices.dimms.size", m.size, 1, MAX_MEMORY_MIB << 20)?;
            range("devices.dimms.slot", m.slot.into(), 0, u64::from(self.slots.saturating_sub(1)))?;
            range("devices.dimms.node", m.node.into(), 0, 0)?;
        }
        let dimm_mib = d.dimms.iter().fold(0u64, |sum, m| sum.saturating_add(m.size >> 20));
        let used = self
            .memory_mib
            .saturating_add(dimm_mib)
            .saturating_add(self.virtio_mem.map_or(0, |v| v.size_mib));
        range("memory in use (boot, dimms, virtio-mem)", used, 1, self.max_memory_mib)?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The migration harness's guest: direct boot, a tap, virtio-mem, a
    /// console, a hot-added vCPU and DIMM.
    pub(crate) fn guest() -> MachineSpec {
        let devices: DeviceSpec = serde_json::from_value(serde_json::json!({
            "cpus": [{"id": "vmscale-cpu1", "driver": "qemu64-x86_64-cpu",
                      "props": {"core-id": 1, "socket-id": 0, "thread-id": 0}}],
            "dimms": [{"id": "vmscale-dimm0", "backend": "vmscale-dimm0-mem", "backend_type": "memory-backend-ram",
                       "share": false, "size": 134217728, "addr": 4294967296u64, "slot": 0, "node": 0}],
            "virtio_mem": [{"id": "vm0", "requested_size": 0, "size": 0, "max_size": 1073741824}]
        }))
        .unwrap();
        MachineSpec {
            accel: Accel::Tcg,
            machine: "pc".into(),
            cpu_model: None,
            cpus: 1,
            max_cpus: 4,
            memory_mib: 256,
            slots: 4,
            max_memory_mib: 1792,
            boot_ram: BootRam::default(),
            virtio_mem: Some(VirtioMemDevice { size_mib: 1024, shared: false }),
            boot: Some(KernelBoot {
                kernel: "vmlinux".into(),
                initrd: Some("initramfs.img".into()),
                append: "console=ttyS0 vmscale.ip=10.0.0.50/24".into(),
            }),
            disks: vec![],
            nics: vec![Nic { tap: "vm0".into(), mac: Some([0x52, 0x54, 0, 0x76, 0x6d, 1]) }],
            vsock: None,
            serial_console: true,
            no_reboot: true,
            host_root_share: false,
            devices,
        }
    }

    #[test]
    fn the_harness_guest_is_valid() {
        assert_eq!(guest().validate(), Ok(()));
    }

    #[test]
    fn names_that_could_reach_an_option_are_refused() {
        for bad in
            ["", ".", "..", "../sda", "a/b", "x,file=/dev/sda", "a=b", "-virtfs", ".hidden", "a b", "é"]
        {
            assert!(!is_plain_name(bad, MAX_NAME), "{bad:?}");
            let mut s = guest();
            s.disks = vec![Disk { name: bad.into(), format: DiskFormat::Raw }];
            assert!(matches!(s.validate(), Err(SpecError::BadName { field: "disks.name", .. })), "{bad:?}");
        }
        let mut s = guest();
        s.nics[0].tap = "vm0,script=/bin/sh".into();
        assert!(matches!(s.validate(), Err(SpecError::BadName { field: "nics.tap", .. })));
        let mut s = guest();
        s.machine = "pc,accel=kvm".into();
        assert!(matches!(s.validate(), Err(SpecError::BadName { field: "machine", .. })));
        let mut s = guest();
        s.machine = "microvm".into();
        assert!(s.validate().is_err(), "only the pc and q35 machines");
        let mut s = guest();
        s.vsock = Some(VsockDevice::VhostUser { socket: "/run/other.sock".into() });
        assert!(s.validate().is_err());
        let mut s = guest();
        s.boot = Some(KernelBoot { kernel: "/etc/shadow".into(), initrd: None, append: String::new() });
        assert!(s.validate().is_err());
        let mut s = guest();
        s.boot = Some(KernelBoot { kernel: "k".into(), initrd: None, append: "a\nb".into() });
        assert_eq!(s.validate(), Err(SpecError::BadAppend(3)));
    }

    #[test]
    fn counts_and_sizes_are_bounded() {
        let mut s = guest();
        s.max_cpus = u32::MAX;
        assert!(matches!(s.validate(), Err(SpecError::OutOfRange { field: "max_cpus", .. })));
        let mut s = guest();
        s.cpus = 5;
        assert!(matches!(s.validate(), Err(SpecError::OutOfRange { field: "cpus", .. })));
        let mut s = guest();
        s.max_memory_mib = u64::MAX;
        assert!(s.validate().is_err());
        let mut s = guest();
        s.nics = vec![s.nics[0].clone(); MAX_NICS + 1];
        assert!(matches!(s.validate(), Err(SpecError::TooMany { field: "nics", .. })));
        let mut s = guest();
        s.vsock = Some(VsockDevice::Kernel { cid: 2 });
        assert!(s.validate().is_err(), "the host's cid");
        let mut s = guest();
        s.devices.dimms[0].size = u64::MAX;
        assert!(s.validate().is_err());
        let mut s = guest();
        s.devices.dimms = vec![s.devices.dimms[0].clone(); 5];
        assert!(matches!(s.validate(), Err(SpecError::TooMany { field: "devices.dimms", .. })));
    }

    #[test]
    fn only_our_hot_added_devices_pass() {
        let mut s = guest();
        s.devices.cpus[0].driver = "qemu64-x86_64-cpu,id=x".into();
        assert!(matches!(s.validate(), Err(SpecError::Device(_))));
        let mut s = guest();
        s.devices.cpus[0].id = "vfio0".into();
        assert!(matches!(s.validate(), Err(SpecError::Device(_))));
        let mut s = guest();
        s.devices.cpus[0].props.insert("romfile".into(), 1);
        assert!(matches!(s.validate(), Err(SpecError::Device(_))));
        let mut s = guest();
        s.devices.dimms[0].backend_type = "memory-backend-file,mem-path=/dev/sda".into();
        assert!(matches!(s.validate(), Err(SpecError::Device(_))));
        let mut s = guest();
        s.devices.dimms[0].id = "nvdimm0".into();
        assert!(matches!(s.validate(), Err(SpecError::Device(_))));
    }

    #[test]
    fn unknown_fields_are_refused_on_the_wire() {
        let mut v = serde_json::to_value(guest()).unwrap();
        v["base_args"] = serde_json::json!(["-virtfs", "local,path=/"]);
        assert!(serde_json::from_value::<MachineSpec>(v).is_err());
    }
}
