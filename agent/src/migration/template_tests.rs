//! The incoming command line from a template and a spec: what a good spec
//! gives, and that no spec, however hostile, adds an option of its own.

use super::*;
use crate::migration::machine::tests::guest;
use crate::migration::machine::{Disk, DiskFormat, KernelBoot, Nic, VsockDevice};

fn template() -> Template {
    Template {
        sandbox: true,
        image_dir: Some("/srv/images".into()),
        disk_dir: Some("/srv/disks".into()),
        vsock_dir: Some("/run/vsock".into()),
        tap_prefix: "vm".into(),
        host_root_share: false,
    }
}

fn files() -> IncomingFiles {
    IncomingFiles {
        qmp: "/var/lib/vmscale/migration/incoming/7/qmp.sock".into(),
        pid_file: "/var/lib/vmscale/migration/incoming/7/qemu.pid".into(),
        console: "/var/lib/vmscale/migration/incoming/7/console.log".into(),
        tls: None,
    }
}

/// Options that take a value, and flags: everything the template may write.
const WITH_VALUE: [&str; 21] = [
    "-global",
    "-accel",
    "-machine",
    "-object",
    "-cpu",
    "-smp",
    "-m",
    "-device",
    "-kernel",
    "-initrd",
    "-append",
    "-drive",
    "-netdev",
    "-chardev",
    "-virtfs",
    "-display",
    "-serial",
    "-sandbox",
    "-incoming",
    "-pidfile",
    "-qmp",
];
const FLAGS: [&str; 3] = ["-nodefaults", "-no-reboot", "-S"];

/// The command line as (option, value) pairs; panics on anything that is
/// not an option this module writes, where an option must stand.
fn pairs(args: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(o) = it.next() {
        if FLAGS.contains(&o.as_str()) {
            out.push((o.clone(), None));
        } else if WITH_VALUE.contains(&o.as_str()) {
            out.push((o.clone(), Some(it.next().expect("a value").clone())));
        } else {
            panic!("foreign option {o:?} in {args:?}");
        }
    }
    out
}

fn values(args: &[String], opt: &str) -> Vec<String> {
    pairs(args).into_iter().filter(|(o, _)| o == opt).filter_map(|(_, v)| v).collect()
}

#[test]
fn the_harness_guest_comes_out_as_it_was_started() {
    let args = incoming_command_line(&template(), &guest(), &files()).unwrap();
    let p = pairs(&args);
    let has = |o: &str, v: &str| p.contains(&(o.to_owned(), Some(v.to_owned())));
    assert!(has("-accel", "tcg"));
    assert!(has("-machine", "pc"), "{args:?}");
    assert!(has("-smp", "1,maxcpus=4"));
    assert!(has("-m", "256M,slots=4,maxmem=1792M"));
    assert!(has("-object", "memory-backend-ram,id=vmem0,size=1024M"));
    assert!(has("-device", "virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size=0"));
    assert!(has("-kernel", "/srv/images/vmlinux") && has("-initrd", "/srv/images/initramfs.img"));
    assert!(has("-append", "console=ttyS0 vmscale.ip=10.0.0.50/24"));
    assert!(has("-netdev", "tap,id=n0,ifname=vm0,script=no,downscript=no"));
    assert!(has("-device", "virtio-net-pci,netdev=n0,mac=52:54:00:76:6d:01,romfile="));
    assert!(has("-serial", "chardev:console"));
    assert!(has("-sandbox", SANDBOX));
    assert!(values(&args, "-global").is_empty(), "a plain stream");
    assert!(
        has("-incoming", "tcp:fd:3") && has("-pidfile", "/var/lib/vmscale/migration/incoming/7/qemu.pid")
    );
    assert!(has("-qmp", "unix:/var/lib/vmscale/migration/incoming/7/qmp.sock,server=on,wait=off"));
    assert!(has(
        "-device",
        "pc-dimm,id=vmscale-dimm0,memdev=vmscale-dimm0-mem,addr=0x100000000,slot=0,node=0"
    ));
    assert!(has("-device", "qemu64-x86_64-cpu,id=vmscale-cpu1,core-id=1,socket-id=0,thread-id=0"));
    assert!(p.iter().any(|(o, _)| o == "-S") && p.iter().any(|(o, _)| o == "-nodefaults"));
    // The virtio-mem device comes before the NIC, as on the source.
    let pos = |v: &str| args.iter().position(|a| a.starts_with(v)).unwrap();
    assert!(pos("virtio-mem-pci") < pos("virtio-net-pci"));
}

#[test]
fn shared_and_named_boot_memory_keep_their_ram_block() {
    let mut s = guest();
    s.boot_ram = crate::migration::machine::BootRam { id: "ram0".into(), shared: true };
    let args = incoming_command_line(&template(), &s, &files()).unwrap();
    assert_eq!(values(&args, "-machine"), ["pc,memory-backend=ram0"]);
    assert!(values(&args, "-object").contains(&"memory-backend-memfd,share=on,id=ram0,size=256M".to_owned()));
}

#[test]
fn names_resolve_inside_the_nodes_own_directories() {
    let mut s = guest();
    s.disks = vec![Disk { name: "pg-1.qcow2".into(), format: DiskFormat::Qcow2 }];
    s.vsock = Some(VsockDevice::VhostUser { socket: "pg-1.vsock".into() });
    s.nics.clear();
    let args = incoming_command_line(&template(), &s, &files()).unwrap();
    assert_eq!(values(&args, "-drive"), ["file=/srv/disks/pg-1.qcow2,if=virtio,format=qcow2"]);
    assert!(values(&args, "-chardev").contains(&"socket,id=vsock0,path=/run/vsock/pg-1.vsock".to_owned()));
    let none = Template { image_dir: None, disk_dir: None, vsock_dir: None, ..template() };
    assert_eq!(incoming_command_line(&none, &s, &files()), Err(TemplateError::NoImageDir));
    s.boot = None;
    assert_eq!(incoming_command_line(&none, &s, &files()), Err(TemplateError::NoDiskDir));
    s.disks.clear();
    assert_eq!(incoming_command_line(&none, &s, &files()), Err(TemplateError::NoVsockDir));
}

#[test]
fn the_template_decides_taps_and_the_host_share() {
    let mut s = guest();
    s.nics = vec![Nic { tap: "eth0".into(), mac: None }];
    assert!(matches!(incoming_command_line(&template(), &s, &files()), Err(TemplateError::ForeignTap(..))));
    let mut s = guest();
    s.host_root_share = true;
    assert_eq!(incoming_command_line(&template(), &s, &files()), Err(TemplateError::NoHostShare));
    let allowed = Template { host_root_share: true, ..template() };
    let args = incoming_command_line(&allowed, &s, &files()).unwrap();
    assert_eq!(values(&args, "-virtfs"), [HOST_ROOT_SHARE]);
    let plain = Template { sandbox: false, ..template() };
    assert!(values(&incoming_command_line(&plain, &guest(), &files()).unwrap(), "-sandbox").is_empty());
}

/// What an attacker would put in a spec to reach the host: each is
/// refused, or stays one value of an option the template chose.
#[test]
fn hostile_specs_produce_no_foreign_option() {
    type Spoil = Box<dyn Fn(&mut MachineSpec)>;
    let hostile: Vec<(&str, Spoil)> = vec![
        ("virtfs in the cpu model", Box::new(|s| s.cpu_model = Some("host -virtfs local,path=/".into()))),
        (
            "a drive in a disk name",
            Box::new(|s| s.disks = vec![Disk { name: "x,file=/dev/sda".into(), format: DiskFormat::Raw }]),
        ),
        (
            "a device path as a disk",
            Box::new(|s| s.disks = vec![Disk { name: "../../dev/sda".into(), format: DiskFormat::Raw }]),
        ),
        ("a tcp monitor in a tap", Box::new(|s| s.nics[0].tap = "vm0 -qmp tcp:0.0.0.0:4444".into())),
        ("a script in a tap", Box::new(|s| s.nics[0].tap = "vm0,script=/tmp/x".into())),
        ("an accel in the machine", Box::new(|s| s.machine = "pc,accel=kvm -virtfs".into())),
        (
            "a kernel outside the images",
            Box::new(|s| {
                s.boot =
                    Some(KernelBoot { kernel: "/etc/shadow".into(), initrd: None, append: String::new() })
            }),
        ),
        (
            "a socket elsewhere",
            Box::new(|s| s.vsock = Some(VsockDevice::VhostUser { socket: "/run/qemu/qmp.sock".into() })),
        ),
        (
            "a foreign device",
            Box::new(|s| s.devices.cpus[0].driver = "vfio-pci,host=01:00.0,id=x-x86_64-cpu".into()),
        ),
        (
            "a file backend",
            Box::new(|s| s.devices.dimms[0].backend_type = "memory-backend-file,mem-path=/etc/shadow".into()),
        ),
        ("a backend id with options", Box::new(|s| s.boot_ram.id = "r,mem-path=/dev/sda".into())),
    ];
    for (what, spoil) in hostile {
        let mut s = guest();
        spoil(&mut s);
        assert!(incoming_command_line(&template(), &s, &files()).is_err(), "{what}: must be refused");
    }
    // Options in the free text stay inside its one value.
    let mut s = guest();
    s.boot = Some(KernelBoot {
        kernel: "vmlinux".into(),
        initrd: None,
        append: "-virtfs local,path=/,mount_tag=r -qmp tcp:0.0.0.0:4444,server=on -drive file=/dev/sda"
            .into(),
    });
    let args = incoming_command_line(&template(), &s, &files()).unwrap();
    let p = pairs(&args);
    assert!(!p.iter().any(|(o, _)| o == "-virtfs"));
    assert_eq!(values(&args, "-qmp").len(), 1, "only the template's own monitor");
    assert!(values(&args, "-qmp")[0].starts_with("unix:/var/lib/vmscale/"));
    assert!(values(&args, "-drive").is_empty());
}

#[test]
fn a_tls_stream_is_taken_from_the_source_node_only() {
    use crate::migration::stream_tls::StreamTls;
    let tls = StreamTls { dir: "/var/lib/vmscale/migration/qemu-tls".into(), peer_node: "a".into() };
    let with = IncomingFiles { tls: Some(tls.clone()), ..files() };
    let args = incoming_command_line(&template(), &guest(), &with).unwrap();
    let authz = "authz-simple,id=vmscale-migration-authz,identity=CN=a.node.vmscale".to_owned();
    assert!(values(&args, "-object").contains(&authz));
    let globals =
        ["migration.tls-creds=vmscale-migration-tls", "migration.tls-authz=vmscale-migration-authz"];
    assert_eq!(values(&args, "-global"), globals);
    let hostile = StreamTls { peer_node: "a,identity=x".into(), ..tls };
    let hostile = IncomingFiles { tls: Some(hostile), ..files() };
    let e = incoming_command_line(&template(), &guest(), &hostile);
    assert_eq!(e, Err(TemplateError::BadPeer("a,identity=x".into())));
}
