//! vsock for guests on hosts without the kernel's vhost-vsock (this machine):
//! the user-space vhost-user backend `vhost-device-vsock` (rust-vmm),
//! installed with cargo when missing, one backend process per VM, killed when
//! its handle drops. QEMU connects to the backend's control socket
//! (`vhost-user-vsock-pci`, see `vmscale_agent::qmp::qemu_args::Vsock`); the
//! host side reaches the guest's ports through the backend's unix socket
//! (`vsock+unix:///PATH:PORT` for the agent).

use anyhow::{bail, Context};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The backend's crate and the version that builds here (rustc 1.95) and
/// whose flags this module speaks (`--vm guest-cid=..,socket=..,uds-path=..`).
pub const CRATE: &str = "vhost-device-vsock";
pub const VERSION: &str = "0.3.0";

/// The installed backend: on PATH, else in cargo's bin directory.
pub fn installed() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(CRATE)).find(|p| p.is_file()));
    on_path.or_else(|| Some(cargo_bin_dir().join(CRATE)).filter(|p| p.is_file()))
}

/// The backend's path, installing it first when it is missing
/// (`cargo install --locked`, about 2 minutes here, its output shown).
pub fn ensure_installed() -> anyhow::Result<PathBuf> {
    if let Some(p) = installed() {
        eprintln!("    {CRATE} present: {}", p.display());
        return Ok(p);
    }
    eprintln!("    {CRATE} not found; installing {VERSION} with cargo (about 2 minutes)");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["install", "--locked", CRATE, "--version", VERSION]);
    // The workspace's own flags are not the tool's.
    for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR"] {
        cmd.env_remove(var);
    }
    eprintln!("    $ {}", crate::steps::show(&cmd));
    let t0 = Instant::now();
    let status = cmd.status().with_context(|| format!("cannot run `{}`", crate::steps::show(&cmd)))?;
    if !status.success() {
        bail!("cargo install {CRATE} {VERSION} failed ({status})");
    }
    eprintln!("    installed in {:.0} s", t0.elapsed().as_secs_f64());
    installed().with_context(|| format!("{CRATE} still not found after install; is ~/.cargo/bin on PATH?"))
}

fn cargo_bin_dir() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h).join("bin"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo/bin"),
    }
}

/// One VM's backend process; dropping it kills it and removes its sockets.
#[derive(Debug)]
pub struct Backend {
    child: Child,
    /// QEMU's side: `-chardev socket,path=...` for `vhost-user-vsock-pci`.
    pub socket: PathBuf,
    /// The host's side: connect, `CONNECT <port>\n`, then the guest's port.
    pub uds: PathBuf,
    pub log: PathBuf,
}

impl Backend {
    /// Starts `bin` for a guest of `guest_cid` with its sockets and log in
    /// `dir`, named after `name`; returns once both sockets exist.
    pub fn start(bin: &Path, guest_cid: u32, dir: &Path, name: &str) -> anyhow::Result<Backend> {
        let socket = dir.join(format!("{name}.vhost-vsock.sock"));
        let uds = dir.join(format!("{name}.vsock"));
        let log = dir.join(format!("{name}.vhost-vsock.log"));
        for p in [&socket, &uds] {
            let _ = fs::remove_file(p);
        }
        let mut cmd = Command::new(bin);
        cmd.args(args(bin, guest_cid, &socket, &uds)?);
        let f = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start {}", crate::steps::show(&cmd)))?;
        eprintln!("    $ {}", crate::steps::show(&cmd));
        let mut b = Backend { child, socket, uds, log };
        let t0 = Instant::now();
        while !(b.socket.exists() && b.uds.exists()) {
            if let Some(st) = b.child.try_wait()? {
                bail!(
                    "{CRATE} stopped ({st}); its log {}:\n{}",
                    b.log.display(),
                    fs::read_to_string(&b.log)?
                );
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("{CRATE} made no sockets in 10 s; its log: {}", b.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(b)
    }

    /// Fails when the backend has stopped.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{CRATE} stopped ({st}); its log: {}", self.log.display());
        }
        Ok(())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in [&self.socket, &self.uds] {
            let _ = fs::remove_file(p);
        }
    }
}

/// The backend's arguments: `--vm key=value,...` where the installed
/// version has it (0.2 and later), else the single-VM flags.
fn args(bin: &Path, guest_cid: u32, socket: &Path, uds: &Path) -> anyhow::Result<Vec<String>> {
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", bin.display()))?;
    let help = String::from_utf8_lossy(&help.stdout);
    Ok(spelled(help.contains("--vm "), guest_cid, socket, uds))
}

fn spelled(vm_flag: bool, guest_cid: u32, socket: &Path, uds: &Path) -> Vec<String> {
    let (socket, uds) = (socket.display(), uds.display());
    if vm_flag {
        vec!["--vm".into(), format!("guest-cid={guest_cid},socket={socket},uds-path={uds}")]
    } else {
        [
            "--guest-cid",
            &guest_cid.to_string(),
            "--socket",
            &socket.to_string(),
            "--uds-path",
            &uds.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_of_the_backends_flags() {
        let (s, u) = (Path::new("/d/vm.ctl"), Path::new("/d/vm.vsock"));
        assert_eq!(spelled(true, 3, s, u), ["--vm", "guest-cid=3,socket=/d/vm.ctl,uds-path=/d/vm.vsock"]);
        assert_eq!(
            spelled(false, 4, s, u),
            ["--guest-cid", "4", "--socket", "/d/vm.ctl", "--uds-path", "/d/vm.vsock"]
        );
    }
}
