//! The source's side of [`MachineSpec`]: its own QEMU's command line
//! (`/proc/<pid>/cmdline`, read on this host, never sent anywhere) turned
//! into the typed spec, option by option. An option this does not know is
//! refused with a clear error rather than passed along: a VM whose machine
//! cannot be described as data does not move. Files are named relative to
//! this node's `[migration]` directories, where the target finds its own.
//!
//! What belongs to the process and not the VM is dropped (its QMP sockets,
//! `-incoming`, `-S`, `-pidfile`, `-daemonize`, `-sandbox`), and so are the
//! vCPUs and DIMMs we hot-added: the spec's devices come from QMP.

use std::collections::BTreeMap;
use std::path::Path;

use super::machine::{
    Accel, BootRam, Disk, DiskFormat, KernelBoot, MachineSpec, Nic, VirtioMemDevice, VsockDevice,
    DEFAULT_BOOT_RAM,
};
use super::template::Template;
use crate::qmp::qemu_args::HOST_ROOT_SHARE;

/// Why the source's command line cannot be described.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("cannot move a vm with {option} {value}: the target could not rebuild it from data")]
    Unsupported { option: String, value: String },
    #[error("{option} {value} is not understood")]
    Bad { option: String, value: String },
    #[error("{what} {path:?} is not in {setting} {dir:?} of this node")]
    Outside { what: &'static str, path: String, setting: &'static str, dir: Option<std::path::PathBuf> },
    #[error("the vm's qemu runs without -nodefaults: its default devices cannot be rebuilt")]
    Defaults,
    #[error("the vm's command line has no {0}")]
    Missing(&'static str),
    #[error("the described vm is invalid")]
    Spec(#[from] super::machine::SpecError),
    #[error("the command line says {what} {described}, qemu says {running}: the vm cannot be described")]
    Disagrees { what: &'static str, described: u64, running: u64 },
}

/// Whether QEMU's own answers (`size`, from QMP) agree with a spec read
/// from its command line: the machine's room (vCPU slots, boot memory,
/// DIMM slots, most memory) is what the target rebuilds, and a command line
/// that says otherwise (a config file, an option read another way) is not
/// described truly.
pub fn agrees_with(spec: &MachineSpec, size: &crate::qmp::size::VmSize) -> Result<(), ArgsError> {
    let mib = |bytes: u64| bytes >> 20;
    let mut checks = vec![
        ("maxcpus", u64::from(spec.max_cpus), u64::from(size.vcpu_slots)),
        ("boot memory (MiB)", spec.memory_mib, mib(size.memory_base_bytes)),
    ];
    if let Some(slots) = size.dimm_slots {
        checks.push(("dimm slots", u64::from(spec.slots), u64::from(slots)));
    }
    if let Some(max) = size.memory_max_bytes {
        checks.push(("maxmem (MiB)", spec.max_memory_mib, mib(max)));
    }
    match checks.into_iter().find(|(_, described, running)| described != running) {
        Some((what, described, running)) => Err(ArgsError::Disagrees { what, described, running }),
        None => Ok(()),
    }
}

fn bad(option: &str, value: &str) -> ArgsError {
    ArgsError::Bad { option: option.to_owned(), value: super::stream_uri::shown(value) }
}

fn unsupported(option: &str, value: &str) -> ArgsError {
    ArgsError::Unsupported { option: option.to_owned(), value: super::stream_uri::shown(value) }
}

/// `key=value` pairs of an option value; a first part without `=` is
/// returned as `("", part)` (QEMU's implied key: a type or a size).
fn parts(value: &str) -> Vec<(&str, &str)> {
    value.split(',').map(|p| p.split_once('=').unwrap_or(("", p))).collect()
}

/// A size in MiB: `256M`, `4G`, or `default_unit` bytes per unit without a suffix.
fn mib(s: &str, bytes_without_suffix: bool) -> Option<u64> {
    let (num, mult_mib, div) = match s.char_indices().last()? {
        (i, 'M' | 'm') => (&s[..i], 1, 1),
        (i, 'G' | 'g') => (&s[..i], 1024, 1),
        (i, 'T' | 't') => (&s[..i], 1024 * 1024, 1),
        _ if bytes_without_suffix => (s, 1, 1 << 20),
        _ => (s, 1, 1),
    };
    let n: u64 = num.parse().ok()?;
    if div > 1 && !n.is_multiple_of(div) {
        return None;
    }
    (n / div).checked_mul(mult_mib)
}

/// A file the VM uses, as its name in `dir`.
fn name_in(
    path: &str,
    dir: Option<&Path>,
    what: &'static str,
    setting: &'static str,
) -> Result<String, ArgsError> {
    let p = Path::new(path);
    let inside = dir.is_some_and(|d| p.parent() == Some(d));
    match p.file_name().and_then(|n| n.to_str()) {
        Some(n) if inside => Ok(n.to_owned()),
        _ => Err(ArgsError::Outside { what, path: path.to_owned(), setting, dir: dir.map(Path::to_owned) }),
    }
}

/// Whether an `-object`/`-device` value is one of our hot-added devices.
fn is_hotplugged(value: &str) -> bool {
    parts(value).iter().any(|(k, id)| {
        *k == "id"
            && (crate::qmp::dimm::parse_device_id(id).is_some()
                || crate::qmp::dimm::parse_backend_id(id).is_some()
                || id
                    .strip_prefix("vmscale-cpu")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
    })
}

/// Whether an `-object` value is one of the stream TLS objects an incoming
/// QEMU got from us ([`super::stream_tls`]).
fn is_stream_tls(value: &str) -> bool {
    let id = parts(value).into_iter().find(|(k, _)| *k == "id").map(|(_, id)| id);
    id.is_some_and(|id| id == super::stream_tls::CREDS_ID || id == super::stream_tls::AUTHZ_ID)
}

#[derive(Default)]
struct Seen {
    accel: Option<Accel>,
    machine: Option<String>,
    ram_backend: Option<String>,
    /// Memory backends by id: (shared, size MiB).
    backends: BTreeMap<String, (bool, u64)>,
    smp: Option<(u32, u32)>,
    mem: Option<(u64, u32, u64)>,
    virtio_mem: bool,
    kernel: Option<String>,
    initrd: Option<String>,
    append: Option<String>,
    /// Tap netdevs by id.
    taps: BTreeMap<String, String>,
    /// Chardevs by id: socket path or console file.
    sockets: BTreeMap<String, String>,
    files: Vec<String>,
    nodefaults: bool,
}

/// The spec of the VM whose QEMU runs with `args` (without the program);
/// its devices are left empty for QMP to fill in.
pub fn machine_from_args(args: &[String], t: &Template) -> Result<MachineSpec, ArgsError> {
    let mut s = Seen::default();
    let mut spec = MachineSpec {
        accel: Accel::Tcg,
        machine: String::new(),
        cpu_model: None,
        cpus: 0,
        max_cpus: 0,
        memory_mib: 0,
        slots: 0,
        max_memory_mib: 0,
        boot_ram: BootRam::default(),
        virtio_mem: None,
        boot: None,
        disks: Vec::new(),
        nics: Vec::new(),
        vsock: None,
        serial_console: false,
        no_reboot: false,
        host_root_share: false,
        devices: Default::default(),
    };
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        // QEMU accepts `--opt` as `-opt`.
        let opt = if arg.starts_with("--") { &arg[1..] } else { arg };
        match opt {
            "-nodefaults" => s.nodefaults = true,
            "-no-reboot" => spec.no_reboot = true,
            "-nographic" | "-S" | "-daemonize" => {}
            _ => {
                let Some(v) = args.get(i + 1).map(String::as_str) else { return Err(bad(opt, "")) };
                i += 1;
                value_option(opt, v, t, &mut s, &mut spec)?;
            }
        }
        i += 1;
    }
    finish(s, spec, t)
}

fn value_option(
    opt: &str,
    v: &str,
    t: &Template,
    s: &mut Seen,
    spec: &mut MachineSpec,
) -> Result<(), ArgsError> {
    match opt {
        // The process's own, not the VM's.
        "-qmp" | "-qmp-pretty" | "-monitor" | "-incoming" | "-pidfile" | "-sandbox" => {}
        "-display" if v == "none" => {}
        "-accel" => {
            s.accel = Some(match v {
                "tcg" => Accel::Tcg,
                "kvm" => Accel::Kvm,
                _ => return Err(unsupported(opt, v)),
            })
        }
        "-M" | "-machine" => {
            for (k, val) in parts(v) {
                match k {
                    "" | "type" => s.machine = Some(val.to_owned()),
                    "memory-backend" => s.ram_backend = Some(val.to_owned()),
                    _ => return Err(unsupported(opt, v)),
                }
            }
        }
        "-cpu" => spec.cpu_model = Some(v.to_owned()),
        "-smp" => s.smp = Some(smp(opt, v)?),
        "-m" => s.mem = Some(memory(opt, v)?),
        "-object" if is_hotplugged(v) || is_stream_tls(v) => {}
        // A QEMU that came in over TLS: its stream's settings, not the VM's.
        "-global" if v.starts_with("migration.tls-") => {}
        "-object" => memory_backend(opt, v, s)?,
        "-device" if is_hotplugged(v) => {}
        "-device" => device(v, s, spec)?,
        "-netdev" => netdev(opt, v, s)?,
        "-chardev" => chardev(opt, v, s)?,
        "-serial" => {
            let id = v.strip_prefix("chardev:").ok_or_else(|| unsupported(opt, v))?;
            if !s.files.iter().any(|f| f == id) {
                return Err(unsupported(opt, v));
            }
            spec.serial_console = true;
        }
        "-kernel" => {
            s.kernel = Some(name_in(v, t.image_dir.as_deref(), "the kernel", "migration.image_dir")?)
        }
        "-initrd" => {
            s.initrd = Some(name_in(v, t.image_dir.as_deref(), "the initrd", "migration.image_dir")?)
        }
        "-append" => s.append = Some(v.to_owned()),
        "-drive" => spec.disks.push(drive(opt, v, t)?),
        "-virtfs" if v == HOST_ROOT_SHARE => spec.host_root_share = true,
        _ => return Err(unsupported(opt, v)),
    }
    Ok(())
}

/// `-smp`: boot and most vCPUs.
fn smp(opt: &str, v: &str) -> Result<(u32, u32), ArgsError> {
    let (mut cpus, mut max) = (None, None);
    for (k, val) in parts(v) {
        let n: u32 = val.parse().map_err(|_| bad(opt, v))?;
        match k {
            "" | "cpus" => cpus = Some(n),
            "maxcpus" => max = Some(n),
            _ => return Err(unsupported(opt, v)),
        }
    }
    let cpus = cpus.ok_or_else(|| bad(opt, v))?;
    Ok((cpus, max.unwrap_or(cpus)))
}

/// `-m`: boot memory, DIMM slots and the most memory, MiB.
fn memory(opt: &str, v: &str) -> Result<(u64, u32, u64), ArgsError> {
    let (mut size, mut slots, mut max) = (None, 0, None);
    for (k, val) in parts(v) {
        match k {
            "" | "size" => size = Some(mib(val, false).ok_or_else(|| bad(opt, v))?),
            "slots" => slots = val.parse().map_err(|_| bad(opt, v))?,
            "maxmem" => max = Some(mib(val, true).ok_or_else(|| bad(opt, v))?),
            _ => return Err(unsupported(opt, v)),
        }
    }
    let size = size.ok_or_else(|| bad(opt, v))?;
    Ok((size, slots, max.unwrap_or(size)))
}

/// `-object` other than ours: a RAM backend (of the boot memory or a
/// virtio-mem device), its sharing and size.
fn memory_backend(opt: &str, v: &str, s: &mut Seen) -> Result<(), ArgsError> {
    let p = parts(v);
    let kind = p.first().map(|(_, k)| *k).unwrap_or_default();
    if !matches!(kind, "memory-backend-ram" | "memory-backend-memfd" | "memory-backend-file") {
        return Err(unsupported(opt, v));
    }
    let (mut id, mut size, mut shared) = (None, None, kind == "memory-backend-memfd");
    for (k, val) in &p[1..] {
        match *k {
            "id" => id = Some(*val),
            "size" => size = Some(mib(val, true).ok_or_else(|| bad(opt, v))?),
            "share" => shared = *val == "on",
            // A file backend's file is this host's; the target's
            // copy of the RAM block lives in its own memory.
            "mem-path" if kind == "memory-backend-file" => {}
            _ => return Err(unsupported(opt, v)),
        }
    }
    let (Some(id), Some(size)) = (id, size) else { return Err(bad(opt, v)) };
    s.backends.insert(id.to_owned(), (shared, size));
    Ok(())
}

/// `-netdev`: a tap of this host, by id.
fn netdev(opt: &str, v: &str, s: &mut Seen) -> Result<(), ArgsError> {
    let p = parts(v);
    if p.first().map(|(_, k)| *k) != Some("tap") {
        return Err(unsupported(opt, v));
    }
    let (mut id, mut ifname) = (None, None);
    for (k, val) in &p[1..] {
        match (*k, *val) {
            ("id", x) => id = Some(x),
            ("ifname", x) => ifname = Some(x),
            ("script" | "downscript", "no") => {}
            _ => return Err(unsupported(opt, v)),
        }
    }
    let (Some(id), Some(ifname)) = (id, ifname) else { return Err(bad(opt, v)) };
    s.taps.insert(id.to_owned(), ifname.to_owned());
    Ok(())
}

/// `-chardev`: a socket (the vsock backend's) or a console file, by id.
fn chardev(opt: &str, v: &str, s: &mut Seen) -> Result<(), ArgsError> {
    let p = parts(v);
    let get = |key: &str| p.iter().find(|(k, _)| *k == key).map(|(_, x)| (*x).to_owned());
    match (p.first().map(|(_, k)| *k), get("id"), get("path")) {
        (Some("socket"), Some(id), Some(path)) if p.len() == 3 => {
            s.sockets.insert(id, path);
        }
        (Some("file"), Some(id), Some(_)) => {
            s.files.push(id);
        }
        _ => return Err(unsupported(opt, v)),
    }
    Ok(())
}

/// `-drive`: a virtio disk, named relative to `migration.disk_dir`.
fn drive(opt: &str, v: &str, t: &Template) -> Result<Disk, ArgsError> {
    let (mut file, mut format) = (None, None);
    for (k, val) in parts(v) {
        match (k, val) {
            ("file", f) => file = Some(name_in(f, t.disk_dir.as_deref(), "the disk", "migration.disk_dir")?),
            ("if", "virtio") => {}
            ("format", "raw") => format = Some(DiskFormat::Raw),
            ("format", "qcow2") => format = Some(DiskFormat::Qcow2),
            _ => return Err(unsupported(opt, v)),
        }
    }
    let (Some(name), Some(format)) = (file, format) else { return Err(bad(opt, v)) };
    Ok(Disk { name, format })
}

fn device(v: &str, s: &mut Seen, spec: &mut MachineSpec) -> Result<(), ArgsError> {
    let p = parts(v);
    let get = |key: &str| p.iter().find(|(k, _)| *k == key).map(|(_, x)| *x);
    let keys_in = |allowed: &[&str]| p[1..].iter().all(|(k, _)| allowed.contains(k));
    match p.first().map(|(_, d)| *d).unwrap_or_default() {
        "virtio-mem-pci"
            if get("id") == Some("vm0")
                && get("memdev") == Some("vmem0")
                && keys_in(&["id", "memdev", "node", "requested-size"]) =>
        {
            s.virtio_mem = true;
        }
        "virtio-net-pci"
            if keys_in(&["netdev", "mac", "romfile"]) && get("romfile").is_none_or(str::is_empty) =>
        {
            let tap = get("netdev").and_then(|n| s.taps.get(n)).ok_or_else(|| bad("-device", v))?;
            let mac = get("mac").map(|m| parse_mac(m).ok_or_else(|| bad("-device", v))).transpose()?;
            spec.nics.push(Nic { tap: tap.clone(), mac });
        }
        "vhost-vsock-pci" if keys_in(&["guest-cid"]) => {
            let cid = get("guest-cid").and_then(|c| c.parse().ok()).ok_or_else(|| bad("-device", v))?;
            spec.vsock = Some(VsockDevice::Kernel { cid });
        }
        "vhost-user-vsock-pci" if keys_in(&["chardev"]) => {
            let path = get("chardev").and_then(|c| s.sockets.get(c)).ok_or_else(|| bad("-device", v))?;
            // Named in the node's vsock directory (checked in `finish`).
            spec.vsock = Some(VsockDevice::VhostUser { socket: path.clone() });
        }
        _ => return Err(unsupported("-device", v)),
    }
    Ok(())
}

fn parse_mac(m: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = m.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>().ok()?;
    bytes.try_into().ok()
}

fn finish(s: Seen, mut spec: MachineSpec, t: &Template) -> Result<MachineSpec, ArgsError> {
    if !s.nodefaults {
        return Err(ArgsError::Defaults);
    }
    spec.accel = s.accel.ok_or(ArgsError::Missing("-accel"))?;
    spec.machine = s.machine.ok_or(ArgsError::Missing("-machine"))?;
    (spec.cpus, spec.max_cpus) = s.smp.ok_or(ArgsError::Missing("-smp"))?;
    (spec.memory_mib, spec.slots, spec.max_memory_mib) = s.mem.ok_or(ArgsError::Missing("-m"))?;
    if let Some(id) = s.ram_backend {
        let (shared, _) =
            *s.backends.get(&id).ok_or_else(|| bad("-machine", &format!("memory-backend={id}")))?;
        spec.boot_ram = BootRam { id, shared };
    } else {
        spec.boot_ram = BootRam { id: DEFAULT_BOOT_RAM.to_owned(), shared: false };
    }
    if s.virtio_mem {
        let (shared, size_mib) =
            *s.backends.get("vmem0").ok_or(ArgsError::Missing("virtio-mem backend vmem0"))?;
        spec.virtio_mem = Some(VirtioMemDevice { size_mib, shared });
    }
    if let Some(kernel) = s.kernel {
        spec.boot = Some(KernelBoot { kernel, initrd: s.initrd, append: s.append.unwrap_or_default() });
    }
    if let Some(VsockDevice::VhostUser { socket }) = &spec.vsock {
        let name = name_in(socket, t.vsock_dir.as_deref(), "the vsock socket", "migration.vsock_dir")?;
        spec.vsock = Some(VsockDevice::VhostUser { socket: name });
    }
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
#[path = "machine_from_args_tests.rs"]
mod tests;
