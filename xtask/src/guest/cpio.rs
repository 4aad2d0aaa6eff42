//! A newc ("070701") cpio archive, the format the kernel unpacks as an
//! initramfs, written in-process: entries sorted, owned by root, mtime 0, so
//! the same inputs give the same bytes (and the same hash), and device nodes
//! need no root or fakeroot to create.

use anyhow::Context;
use std::collections::BTreeMap;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// Paths without a leading `/`; parents are added as directories.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

impl Archive {
    pub fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            self.entries.entry(p.to_owned()).or_insert(Node::Dir);
            parent = p;
        }
        self.entries.insert(path, node);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.add(path, Node::File { data, mode });
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.entries.iter().map(|(p, n)| (p.as_str(), n))
    }

    /// The archive's bytes. A `BTreeMap` orders a directory before what it
    /// holds (a path sorts after its own prefix), which is what the kernel
    /// needs to unpack it.
    /// Fails on what newc's 32-bit fields cannot hold (a file of 4 GiB).
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let size: usize = self.entries.values().map(|n| 128 + data_of(n).len()).sum();
        let mut out = Vec::with_capacity(size + 4096);
        for (ino, (path, node)) in self.entries.iter().enumerate() {
            let (mode, rdev) = match node {
                Node::Dir => (S_IFDIR | 0o755, (0, 0)),
                Node::File { mode, .. } => (S_IFREG | (mode & 0o7777), (0, 0)),
                Node::Symlink(_) => (S_IFLNK | 0o777, (0, 0)),
                Node::CharDev { major, minor } => (S_IFCHR | 0o600, (*major, *minor)),
            };
            let nlink = if matches!(node, Node::Dir) { 2 } else { 1 };
            let ino = u32::try_from(ino + 1).context("more than 2^32 entries")?;
            entry(&mut out, path, ino, mode, nlink, rdev, data_of(node))?;
        }
        entry(&mut out, "TRAILER!!!", 0, 0, 1, (0, 0), &[])?;
        Ok(out)
    }
}

fn data_of(n: &Node) -> &[u8] {
    match n {
        Node::File { data, .. } => data,
        Node::Symlink(target) => target.as_bytes(),
        Node::Dir | Node::CharDev { .. } => &[],
    }
}

fn entry(
    out: &mut Vec<u8>,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &[u8],
) -> anyhow::Result<()> {
    let size =
        u32::try_from(data.len()).with_context(|| format!("{name} is 4 GiB or more: newc cannot hold it"))?;
    let name_size = u32::try_from(name.len() + 1).context("a path of 4 GiB")?;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
    Ok(())
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads an archive back: (name, mode, rdev major, data) per entry.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let start = b.as_ptr() as usize;
        let align = |b: &mut &[u8]| {
            let off = b.as_ptr() as usize - start;
            *b = &b[(4 - off % 4) % 4..];
        };
        loop {
            assert_eq!(&b[..6], b"070701");
            let f = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16).unwrap()
            };
            let (mode, size, rmaj, namesize) = (f(1), f(6) as usize, f(9), f(11) as usize);
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            b = &b[110 + namesize..];
            align(&mut b);
            let data = b[..size].to_vec();
            b = &b[size..];
            align(&mut b);
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return v;
            }
            v.push((name, mode, rmaj, data));
        }
    }

    #[test]
    fn round_trips_with_parents_first() {
        let mut a = Archive::default();
        a.file("/usr/bin/tool", b"hello".to_vec(), 0o755);
        a.add("bin/sh", Node::Symlink("/bin/busybox".into()));
        a.add("dev/console", Node::CharDev { major: 5, minor: 1 });
        a.file("init", b"#!/bin/sh\n".to_vec(), 0o755);
        let got = parse(&a.to_bytes().unwrap());
        let names: Vec<_> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/sh", "dev", "dev/console", "init", "usr", "usr/bin", "usr/bin/tool"]);
        let by = |n: &str| got.iter().find(|e| e.0 == n).unwrap().clone();
        assert_eq!(by("usr/bin/tool").1, 0o100755);
        assert_eq!(by("usr/bin/tool").3, b"hello");
        assert_eq!(by("bin/sh").1, 0o120777);
        assert_eq!(by("bin/sh").3, b"/bin/busybox");
        assert_eq!((by("dev/console").1, by("dev/console").2), (0o020600, 5));
        assert_eq!(by("usr").1, 0o040755);
    }

    #[test]
    fn same_inputs_same_bytes() {
        let build = |order: &[&str]| {
            let mut a = Archive::default();
            for p in order {
                a.file(p, p.as_bytes().to_vec(), 0o644);
            }
            a.to_bytes().unwrap()
        };
        assert_eq!(build(&["a/x", "b/y", "a/z"]), build(&["b/y", "a/z", "a/x"]));
    }
}
