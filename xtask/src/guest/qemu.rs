//! Booting the guest under QEMU: the command line, the serial console
//! streamed to a log (and, on request, to our stderr), and a handle that
//! stops QEMU when dropped, so nothing is left running.

use anyhow::Context;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use super::Image;
use vmscale_agent::qmp::qemu_args::{loopback, Accel, DirectBoot, Network, QemuArgs};

/// How a VM is shaped. Sizes in MiB.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// TCG here (this machine's KVM can't boot stock guest kernels, see
    /// ARCHITECTURE.md); KVM where it works.
    pub accel: Accel,
    pub cpus: u32,
    pub max_cpus: u32,
    pub memory_mib: u64,
    pub slots: u32,
    pub max_memory_mib: u64,
    /// Host port forwarded to the informant's port in the guest
    /// (127.0.0.1 only).
    pub informant_host_port: u16,
    /// Share the host's root read-only (`hostroot`), so the workload can
    /// run host programs.
    pub share_host_root: bool,
    /// Added to the image's kernel command line (`vmscale.workload=...`).
    pub extra_cmdline: Vec<String>,
    /// Added to QEMU's arguments (`-qmp ...`, `-object ...`).
    pub extra_args: Vec<String>,
    pub serial_log: PathBuf,
    /// Copy each console line to stderr, prefixed with the host's elapsed time.
    pub echo_console: bool,
}

impl VmSpec {
    /// The smoke test's shape: 1 of 4 vCPUs, 512 MiB of at most 2 GiB.
    pub fn small(informant_host_port: u16, serial_log: PathBuf) -> VmSpec {
        VmSpec {
            accel: Accel::Tcg,
            cpus: 1,
            max_cpus: 4,
            memory_mib: 512,
            slots: 4,
            max_memory_mib: 2048,
            informant_host_port,
            share_host_root: true,
            extra_cmdline: Vec::new(),
            extra_args: Vec::new(),
            serial_log,
            echo_console: true,
        }
    }
}

/// A running QEMU; dropping it kills QEMU.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    pub started: Instant,
    /// Console lines as they arrive, with the time they did.
    pub console: mpsc::Receiver<(Instant, String)>,
}

/// The QEMU command for `spec`: the serial console on stdout (`-nographic`),
/// QEMU's default devices kept, the informant's port forwarded.
pub fn command(image: &Image, spec: &VmSpec) -> Command {
    let mut cmdline = image.cmdline.clone();
    for extra in &spec.extra_cmdline {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let mut q = QemuArgs::new(spec.accel, spec.cpus, spec.max_cpus, spec.memory_mib);
    q.dimm_slots = spec.slots;
    q.max_memory_mib = spec.max_memory_mib;
    q.boot = Some(DirectBoot { kernel: image.kernel.clone(), initrd: image.initramfs.clone(), cmdline });
    q.network =
        Some(Network::User { host: loopback(spec.informant_host_port), guest_port: super::INFORMANT_PORT });
    q.share_host_root = spec.share_host_root;
    q.nodefaults = false;
    q.nographic = true;
    q.no_reboot = true;
    q.extra = spec.extra_args.clone();
    let mut c = Command::new("qemu-system-x86_64");
    c.args(q.to_args());
    c
}

/// Starts QEMU; its console goes to `spec.serial_log` and to [`Vm::console`].
pub fn boot(image: &Image, spec: &VmSpec) -> anyhow::Result<Vm> {
    spawn(command(image, spec), &spec.serial_log, spec.echo_console)
}

/// Starts `cmd` (a QEMU with `-nographic`); its console goes to
/// `serial_log` and to [`Vm::console`], and to stderr with `echo`. The
/// Debian guest boots through here too.
pub fn spawn(mut cmd: Command, serial_log: &std::path::Path, echo: bool) -> anyhow::Result<Vm> {
    eprintln!("    $ {}", crate::steps::show(&cmd));
    let mut log = File::create(serial_log).with_context(|| format!("creating {}", serial_log.display()))?;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
    let stdout = child.stdout.take().context("no stdout from QEMU")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = printable(&String::from_utf8_lossy(&line));
            let _ = writeln!(log, "{line}");
            if echo {
                eprintln!("    {:6.2}s | {line}", started.elapsed().as_secs_f64());
            }
            // The receiver may be gone; the log still wants the rest.
            let _ = tx.send((Instant::now(), line));
        }
    });
    Ok(Vm { child, started, console: rx })
}

/// The line without terminal control sequences: SeaBIOS and the kernel clear
/// the screen, which would wipe the terminal we echo to.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            // ESC [ params final-byte, or ESC and one character.
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

impl Vm {
    /// QEMU's exit status if it has stopped.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sequences_are_dropped() {
        assert_eq!(
            printable("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16)\r"),
            "SeaBIOS (version 1.16)"
        );
        assert_eq!(printable("vmscale: [4.01] init\tstarted"), "vmscale: [4.01] init\tstarted");
    }
}
