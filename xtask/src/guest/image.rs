//! The initramfs: what goes in, its manifest and hash, and the compressed
//! image. The archive is deterministic, so the hash of its bytes (with the
//! kernel and the command line) is the hash of every input: the informant,
//! the eBPF object, `/init`, the modules and busybox.

use anyhow::{bail, Context};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use super::cpio::{Archive, Node};
use super::modules::Module;

/// `/init`; kept as a shell script of its own so it reads as one.
pub const INIT: &str = include_str!("init.sh");
/// Where the informant and its eBPF object live in the guest: side by side,
/// where the informant looks for the object by default.
const INFORMANT_DIR: &str = "usr/lib/vmscale";
/// How the image is compressed (Debian's kernel has RD_GZIP and RD_ZSTD).
/// Level 9: 3.5x in a second here; 19 gains 2% for 25 times the time.
pub const COMPRESS: &[&str] = &["zstd", "-q", "-9", "-T0", "--stdout"];

/// Everything the guest's root holds.
#[derive(Debug)]
pub struct Contents<'a> {
    pub busybox: &'a Path,
    pub informant: Vec<u8>,
    pub ebpf_object: Option<Vec<u8>>,
    pub modules: Vec<Module>,
    /// One line for `/etc/vmscale/image`, printed at boot.
    pub label: String,
}

/// Lays out the root filesystem.
pub fn archive(c: Contents<'_>) -> anyhow::Result<Archive> {
    let mut a = Archive::default();
    for dir in ["proc", "sys", "dev", "tmp", "run", "host", "root", "etc", "var"] {
        a.add(dir, Node::Dir);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    a.add("dev/console", Node::CharDev { major: 5, minor: 1 });
    a.file("init", INIT.as_bytes().to_vec(), 0o755);

    let busybox = std::fs::read(c.busybox).with_context(|| format!("reading {}", c.busybox.display()))?;
    a.file("bin/busybox", busybox, 0o755);
    for applet in applets(c.busybox)? {
        if applet != "bin/busybox" {
            a.add(&applet, Node::Symlink("/bin/busybox".into()));
        }
    }

    a.file(&format!("{INFORMANT_DIR}/vmscale-informant"), c.informant, 0o755);
    a.add("usr/bin/vmscale-informant", Node::Symlink(format!("/{INFORMANT_DIR}/vmscale-informant")));
    if let Some(obj) = c.ebpf_object {
        a.file(&format!("{INFORMANT_DIR}/vmscale.bpf.o"), obj, 0o644);
    }

    let mut order = String::new();
    for m in c.modules {
        writeln!(order, "{}", m.name)?;
        a.file(&format!("lib/modules/{}.ko", m.name), m.data, 0o644);
    }
    a.file("etc/vmscale/modules", order.into_bytes(), 0o644);
    a.file("etc/vmscale/image", format!("{}\n", c.label).into_bytes(), 0o644);
    Ok(a)
}

/// The applets' paths (`bin/sh`, `sbin/insmod`, ...), from the binary itself.
fn applets(busybox: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {} --list-full", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list-full failed ({})", busybox.display(), out.status);
    }
    let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_owned())
        // Applets live in bin, sbin, usr/bin and usr/sbin; `linuxrc` at the
        // top would be an init we don't want.
        .filter(|l| l.contains('/') && !l.is_empty())
        .collect();
    for needed in ["bin/sh", "sbin/insmod", "bin/mount", "sbin/ip", "usr/sbin/chroot"] {
        if !list.iter().any(|l| l == needed) {
            bail!("{} has no `{needed}` applet, which /init needs", busybox.display());
        }
    }
    Ok(list)
}

/// One line per entry (kind, mode or target, size, path): what is in the
/// image, for people and for diffs between two builds.
pub fn manifest(a: &Archive) -> String {
    let mut s = String::new();
    for (path, node) in a.entries() {
        let _ = match node {
            Node::Dir => writeln!(s, "dir   /{path}"),
            Node::File { data, mode } => writeln!(s, "file  {mode:04o} {:>9} /{path}", data.len()),
            Node::Symlink(t) => writeln!(s, "link  /{path} -> {t}"),
            Node::CharDev { major, minor } => writeln!(s, "char  {major},{minor} /{path}"),
        };
    }
    s
}

/// Hex SHA-256, by coreutils' `sha256sum` (always there on Debian).
pub fn sha256(data: &[u8]) -> anyhow::Result<String> {
    let out = pipe(Command::new("sha256sum").arg("-"), data)?;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().next().map(str::to_owned).context("sha256sum printed nothing")
}

pub fn compress(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (tool, args) = COMPRESS.split_first().context("no compressor configured")?;
    pipe(Command::new(tool).args(args), data)
}

/// Feeds `input` to the command's stdin and returns its stdout.
pub fn pipe(cmd: &mut Command, input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let shown = crate::steps::show(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    // Write from another thread: the command's output fills its pipe while
    // we are still writing.
    let out = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(input));
        let out = child.wait_with_output();
        let written = writer.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))?;
        written.with_context(|| format!("writing to `{shown}`"))?;
        out.with_context(|| format!("waiting for `{shown}`"))
    })?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256(b"abc").unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn init_parses_as_posix_sh() {
        let out = Command::new("sh").args(["-n", "-c", INIT]).output().unwrap();
        assert!(out.status.success(), "init.sh: {}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn init_is_a_shell_script_that_starts_the_informant() {
        assert!(INIT.starts_with("#!/bin/sh\n"));
        assert!(INIT.contains("vmscale-informant --listen"));
        assert!(INIT.contains("/etc/vmscale/modules"));
        assert!(INIT.contains(&format!("PORT={}", super::super::INFORMANT_PORT)));
    }
}
