//! The source QEMU's own arguments (`/proc/<pid>/cmdline`), the truth about
//! its machine, disks and NICs, read on the source's host and described as
//! a [`MachineSpec`] there ([`super::machine_from_args`]): the arguments
//! themselves never leave this host.

use std::path::{Path, PathBuf};

use super::machine::MachineSpec;
use super::machine_from_args::{machine_from_args, ArgsError};
use super::template::Template;

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
    #[error("cannot describe the vm for the target")]
    Describe(#[source] ArgsError),
}

/// Reads `/proc/<pid>/cmdline` (under `proc_root`): the arguments without
/// the program.
pub fn read_args(proc_root: &Path, pid: u32) -> Result<Vec<String>, CommandLineError> {
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
    Ok(args[1..].to_vec())
}

/// The machine of the QEMU behind `client`, described with this node's
/// `template` (its directories): its process is found from a vCPU thread
/// (QMP has no pid command), then its arguments read from `/proc`.
pub async fn read_machine(
    client: &crate::qmp::QmpClient,
    proc_root: &Path,
    template: &Template,
) -> Result<MachineSpec, CommandLineError> {
    use crate::qmp::VcpuThreads;
    let vm = crate::qmp::QmpVm::new(client.clone(), crate::qmp::HotplugConfig::default());
    let threads = vm.vcpu_threads().await.map_err(CommandLineError::Threads)?;
    let tid =
        threads.first().and_then(|t| u32::try_from(t.thread_id).ok()).ok_or(CommandLineError::NoThread)?;
    let pid =
        crate::vm_loop::cpu_max::process_of_thread(proc_root, tid).map_err(CommandLineError::Process)?;
    let args = read_args(proc_root, pid)?;
    machine_from_args(&args, template).map_err(CommandLineError::Describe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_cmdline() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("42")).expect("mkdir");
        std::fs::write(dir.path().join("42/cmdline"), b"qemu-system-x86_64\0-M\0pc\0-qmp\0unix:x\0")
            .expect("write");
        assert_eq!(read_args(dir.path(), 42).expect("reads"), ["-M", "pc", "-qmp", "unix:x"]);
        let e = read_args(dir.path(), 43).expect_err("no such process");
        assert!(e.to_string().contains("43/cmdline"), "{e}");
    }
}
