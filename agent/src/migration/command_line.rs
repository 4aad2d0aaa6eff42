//! The VM's base QEMU command line, as a migration target must repeat it.
//!
//! The source QEMU's own arguments (`/proc/<pid>/cmdline`) are the truth
//! about its machine, disks and NICs. What belongs to that one process is
//! removed: its QMP socket and monitor, `-incoming` and `-S` (it may itself
//! have been a migration target, started paused; whether the guest runs
//! travels with the move), `-daemonize`/`-pidfile`, and the vCPU and DIMM
//! devices that the target gets from the source's current state instead
//! (ours are named `vmscale-cpu<N>`, `vmscale-dimm<N>` and
//! `vmscale-dimm<N>-mem`, see [`crate::qmp::cpu`] and [`crate::qmp::dimm`]).

use std::path::{Path, PathBuf};

/// Why the base command line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CommandLineError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is empty: the process is gone", path.display())]
    Empty { path: PathBuf },
    #[error("cannot list the vm's vcpu threads")]
    Threads(#[source] crate::qmp::Error),
    #[error("qemu reports no vcpu thread")]
    NoThread,
    #[error("cannot find the qemu process")]
    Process(#[source] crate::vm_loop::cpu_max::Error),
}

/// Options that take a value and belong to the process, not the VM.
/// (A QMP set up with `-chardev` and `-mon` is not recognised: ours use `-qmp`.)
const PER_PROCESS: [&str; 5] = ["-qmp", "-qmp-pretty", "-monitor", "-incoming", "-pidfile"];

/// Whether an `-object`/`-device` value is one of our hot-added devices.
fn is_hotplugged(value: &str) -> bool {
    value.split(',').any(|part| {
        part.strip_prefix("id=").is_some_and(|id| {
            crate::qmp::dimm::parse_device_id(id).is_some()
                || crate::qmp::dimm::parse_backend_id(id).is_some()
                || id
                    .strip_prefix("vmscale-cpu")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// The base arguments (without the program) from a full argument list.
pub fn base_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        // QEMU accepts `--opt` as `-opt`.
        let opt = if arg.starts_with("--") { &arg[1..] } else { arg };
        let value = args.get(i + 1).map(String::as_str);
        if PER_PROCESS.contains(&opt) {
            i += 2;
            continue;
        }
        if opt == "-daemonize" || opt == "-S" {
            i += 1;
            continue;
        }
        if matches!(opt, "-device" | "-object") && value.is_some_and(is_hotplugged) {
            i += 2;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

/// Reads `/proc/<pid>/cmdline` (under `proc_root`) and returns the base
/// arguments without the program.
pub fn read_base_args(proc_root: &Path, pid: u32) -> Result<Vec<String>, CommandLineError> {
    let path = proc_root.join(pid.to_string()).join("cmdline");
    let raw = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(source) => return Err(CommandLineError::Read { path, source }),
    };
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        return Err(CommandLineError::Empty { path });
    }
    Ok(base_args(&args[1..]))
}

/// The base arguments of the QEMU behind `client`: its process is found
/// from a vCPU thread (QMP has no pid command), then read from `/proc`.
pub async fn read_qemu_base_args(
    client: &crate::qmp::QmpClient,
    proc_root: &Path,
) -> Result<Vec<String>, CommandLineError> {
    use crate::qmp::VcpuThreads;
    let vm = crate::qmp::QmpVm::new(client.clone(), crate::qmp::HotplugConfig::default());
    let threads = vm.vcpu_threads().await.map_err(CommandLineError::Threads)?;
    let tid =
        threads.first().and_then(|t| u32::try_from(t.thread_id).ok()).ok_or(CommandLineError::NoThread)?;
    let pid =
        crate::vm_loop::cpu_max::process_of_thread(proc_root, tid).map_err(CommandLineError::Process)?;
    read_base_args(proc_root, pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn process_options_and_our_devices_are_removed() {
        let full =
            v("-M pc -smp 1,maxcpus=4 -m 256M,slots=4,maxmem=2G -qmp unix:/run/a.sock,server=on,wait=off \
             -object memory-backend-ram,id=vmem0,size=1G -device virtio-mem-pci,id=vm0,memdev=vmem0 \
             -object memory-backend-ram,id=vmscale-dimm0-mem,size=134217728 \
             -device pc-dimm,id=vmscale-dimm0,memdev=vmscale-dimm0-mem,addr=0x140000000,slot=0,node=0 \
             -device qemu64-x86_64-cpu,id=vmscale-cpu1,core-id=1,socket-id=0,thread-id=0 \
             -netdev tap,id=n0,ifname=vm0,script=no -device virtio-net-pci,netdev=n0 \
             -S -incoming defer --pidfile /run/q.pid -daemonize");
        assert_eq!(
            base_args(&full),
            v("-M pc -smp 1,maxcpus=4 -m 256M,slots=4,maxmem=2G \
               -object memory-backend-ram,id=vmem0,size=1G -device virtio-mem-pci,id=vm0,memdev=vmem0 \
               -netdev tap,id=n0,ifname=vm0,script=no -device virtio-net-pci,netdev=n0")
        );
    }

    #[test]
    fn devices_named_like_ours_but_not_ours_stay() {
        let full = v(
            "-device virtio-blk,id=vmscale-cpu-disk -object memory-backend-ram,id=vmscale-dimm01-mem,size=1",
        );
        assert_eq!(base_args(&full), full);
    }

    #[test]
    fn reads_proc_cmdline() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("42")).expect("mkdir");
        std::fs::write(dir.path().join("42/cmdline"), b"qemu-system-x86_64\0-M\0pc\0-qmp\0unix:x\0")
            .expect("write");
        assert_eq!(read_base_args(dir.path(), 42).expect("reads"), v("-M pc"));
        let e = read_base_args(dir.path(), 43).expect_err("no such process");
        assert!(e.to_string().contains("43/cmdline"), "{e}");
    }
}
