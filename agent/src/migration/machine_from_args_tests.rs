//! Command lines as our launchers write them become specs; anything else is
//! refused by name.

use super::*;
use crate::migration::template::{incoming_command_line, IncomingFiles};
use crate::qmp::client::Endpoint;
use crate::qmp::qemu_args::{self, DirectBoot, Network, QemuArgs};

fn template() -> Template {
    Template {
        sandbox: false,
        image_dir: Some("/srv/images".into()),
        disk_dir: Some("/srv/disks".into()),
        vsock_dir: Some("/run/vsock".into()),
        tap_prefix: "vm".into(),
        host_root_share: true,
    }
}

fn v(s: &str) -> Vec<String> {
    s.split(' ').map(str::to_owned).collect()
}

/// The migration harness's guest as [`QemuArgs`] writes it, plus what its
/// launcher adds (console, QMP) and what the agent hot-added.
fn harness_args() -> Vec<String> {
    let mut q = QemuArgs::new(qemu_args::Accel::Tcg, 1, 4, 256);
    q.dimm_slots = 4;
    q.max_memory_mib = 1792;
    q.virtio_mem = Some(qemu_args::VirtioMem { size_mib: 1024, memfd: false });
    q.boot = Some(DirectBoot {
        kernel: "/srv/images/vmlinux".into(),
        initrd: "/srv/images/initramfs.img".into(),
        cmdline: "console=ttyS0 vmscale.ip=10.0.0.50/24".into(),
    });
    q.network = Some(Network::Tap { ifname: "vm0".into(), mac: Some([0x52, 0x54, 0, 0x76, 0x6d, 1]) });
    q.no_reboot = true;
    q.qmp = Some(Endpoint::Unix("/run/vm/qmp.sock".into()));
    let mut args = q.to_args();
    args.extend(v("-chardev file,id=console,path=/run/vm/console.log,append=on -serial chardev:console"));
    args.extend(v("-object memory-backend-ram,id=vmscale-dimm0-mem,size=134217728 \
         -device pc-dimm,id=vmscale-dimm0,memdev=vmscale-dimm0-mem,addr=0x100000000,slot=0,node=0 \
         -device qemu64-x86_64-cpu,id=vmscale-cpu1,core-id=1,socket-id=0,thread-id=0"));
    args
}

#[test]
fn the_harness_guest_becomes_its_spec() {
    let spec = machine_from_args(&harness_args(), &template()).unwrap();
    let want = MachineSpec { devices: Default::default(), ..crate::migration::machine::tests::guest() };
    assert_eq!(spec, want);
}

/// What the source's launcher wrote and what the target builds agree on
/// every option that shapes the machine.
#[test]
fn the_target_rebuilds_the_same_machine() {
    let source = harness_args();
    let spec = machine_from_args(&source, &template()).unwrap();
    let files = IncomingFiles {
        qmp: "/in/qmp.sock".into(),
        pid_file: "/in/pid".into(),
        console: "/in/c.log".into(),
        tls: None,
    };
    let target = incoming_command_line(&template(), &spec, &files).unwrap();
    let shaping = |args: &[String]| -> Vec<String> {
        args.windows(2)
            .filter(|w| {
                ["-smp", "-m", "-device", "-netdev", "-kernel", "-initrd", "-append"].contains(&w[0].as_str())
            })
            .map(|w| format!("{} {}", w[0], w[1]))
            .filter(|s| !s.contains("vmscale-"))
            .collect()
    };
    assert_eq!(shaping(&source), shaping(&target));
}

#[test]
fn the_test_harness_file_backed_ram_keeps_its_ram_block() {
    let mut q = QemuArgs::new(qemu_args::Accel::Tcg, 1, 8, 256);
    q.max_memory_mib = 4096;
    q.nographic = true;
    q.qmp = Some(Endpoint::Unix("/t/qmp.sock".into()));
    let mut args = q.to_args();
    args.extend(v("-object memory-backend-file,id=pc.ram,size=256M,mem-path=/t/ram,share=off \
                   -machine memory-backend=pc.ram -qmp unix:/t/watch.sock,server=on,wait=off"));
    let spec = machine_from_args(&args, &template()).unwrap();
    assert_eq!(spec.boot_ram, BootRam { id: "pc.ram".into(), shared: false });
    assert_eq!(
        (spec.cpus, spec.max_cpus, spec.memory_mib, spec.slots, spec.max_memory_mib),
        (1, 8, 256, 8, 4096)
    );
    assert_eq!(spec.virtio_mem, None);
    assert!(!spec.serial_console && spec.nics.is_empty());
}

#[test]
fn what_cannot_be_rebuilt_from_data_is_refused() {
    let base = "-accel tcg -M pc -smp 1 -m 256M -nodefaults";
    let refused = [
        ("-virtfs local,path=/,mount_tag=r,security_model=none", "-virtfs"),
        ("-netdev user,id=n0,hostfwd=tcp:127.0.0.1:4000-:22", "-netdev"),
        ("-device vfio-pci,host=01:00.0", "-device"),
        ("-drive file=/dev/sda,if=virtio,format=raw", "the disk"),
        ("-drive file=/srv/disks/a.img,if=ide,format=raw", "-drive"),
        ("-kernel /boot/vmlinuz", "the kernel"),
        ("-object secret,id=s0,data=hunter2", "-object"),
        ("-chardev socket,id=c0,host=0.0.0.0,port=4444,server=on", "-chardev"),
        ("-serial tcp:0.0.0.0:4444,server=on", "-serial"),
        ("-vnc :0", "-vnc"),
        ("-M pc,accel=kvm", "-M"),
        ("-device virtio-net-pci,netdev=n0,romfile=/etc/shadow", "-device"),
    ];
    for (extra, named) in refused {
        let args = v(&format!("{base} {extra}"));
        let e = machine_from_args(&args, &template()).unwrap_err().to_string();
        assert!(e.contains(named), "{extra}: {e}");
    }
    let e = machine_from_args(&v("-accel tcg -M pc -smp 1 -m 256M"), &template()).unwrap_err();
    assert_eq!(e, ArgsError::Defaults);
    assert!(machine_from_args(&v("-accel tcg -M pc -smp 1 -m 256M -nodefaults"), &template()).is_ok());
    let secret = v(&format!("{base} -object secret,id=s0,data={}", "x".repeat(5000)));
    assert!(
        machine_from_args(&secret, &template()).unwrap_err().to_string().len() < 300,
        "long values are cut"
    );
}

#[test]
fn sizes_parse_with_their_units() {
    assert_eq!(mib("256M", false), Some(256));
    assert_eq!(mib("256", false), Some(256));
    assert_eq!(mib("2G", true), Some(2048));
    assert_eq!(mib("268435456", true), Some(256));
    assert_eq!(mib("1000", true), None, "not whole MiB");
    assert_eq!(mib("99999999999999999T", true), None);
    assert_eq!(mib("", true), None);
}

#[test]
fn qemus_own_answers_must_agree_with_the_description() {
    let spec = machine_from_args(&harness_args(), &template()).unwrap();
    let size = crate::qmp::size::VmSize {
        vcpu_slots: 4,
        memory_base_bytes: 256 << 20,
        dimm_slots: Some(4),
        memory_max_bytes: Some(1792 << 20),
        ..Default::default()
    };
    assert_eq!(agrees_with(&spec, &size), Ok(()));
    let other = crate::qmp::size::VmSize { vcpu_slots: 8, ..size.clone() };
    let e = agrees_with(&spec, &other).unwrap_err();
    assert_eq!(e, ArgsError::Disagrees { what: "maxcpus", described: 4, running: 8 });
    let unknown = crate::qmp::size::VmSize { dimm_slots: None, memory_max_bytes: None, ..size };
    assert_eq!(agrees_with(&spec, &unknown), Ok(()), "what qemu does not tell is not compared");
}

/// A VM that came in over TLS moves on: its QEMU's stream settings are the
/// process's, not the VM's.
#[test]
fn a_qemu_that_came_in_over_tls_is_described_without_its_stream_settings() {
    let tls = crate::migration::stream_tls::StreamTls {
        dir: "/var/lib/vmscale/migration/qemu-tls".into(),
        peer_node: "a".into(),
    };
    let mut args = harness_args();
    args.extend(crate::migration::stream_tls::target_args(&tls).unwrap());
    let plain = machine_from_args(&harness_args(), &template()).unwrap();
    assert_eq!(machine_from_args(&args, &template()).unwrap(), plain);
    let mut other = harness_args();
    other.extend(v("-global migration.x-multifd=on"));
    assert!(machine_from_args(&other, &template()).is_err(), "only the stream's tls settings");
    let mut foreign = harness_args();
    foreign.extend(v("-object tls-creds-x509,id=mine,dir=/etc,endpoint=server"));
    assert!(machine_from_args(&foreign, &template()).is_err(), "only our objects");
}
