//! The kernel modules the guest loads, found in the extracted Debian kernel
//! package and ordered so each loads after what it depends on.
//!
//! Debian's package ships no `modules.dep` (its postinst runs depmod), so the
//! dependencies come from each module's own `.modinfo` (`depends=`), which
//! is what depmod reads too.

use anyhow::{bail, Context};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the guest needs, in the order a reader expects; dependencies are
/// added and the order fixed by [`load_order`].
pub const WANTED: &[&str] = &[
    // virtio over PCI, virtio-mem hotplug, virtio-serial
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mem",
    "virtio_console",
    // virtio-net (QEMU user networking or tap)
    "failover",
    "net_failover",
    "virtio_net",
    // the read-only 9p share of the host root
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    // vsock over virtio (vhost-user here, vhost-vsock on production nodes)
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// One kernel release's modules: `lib/modules/<release>` of the package.
#[derive(Debug)]
pub struct Tree {
    pub release: String,
    /// Module name (with `_`, as the kernel spells it) to its file.
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// A module ready to go into the image.
#[derive(Debug)]
pub struct Module {
    pub name: String,
    /// The uncompressed `.ko`.
    pub data: Vec<u8>,
}

impl Tree {
    /// Indexes `<root>/lib/modules/<release>/` of an extracted kernel package.
    pub fn open(root: &Path, release: &str) -> anyhow::Result<Tree> {
        let dir = root.join("lib/modules").join(release);
        let mut files = BTreeMap::new();
        walk(&dir.join("kernel"), &mut |p| {
            if let Some(name) = module_name(p) {
                files.insert(name, p.to_path_buf());
            }
        })
        .with_context(|| format!("reading the modules under {}", dir.display()))?;
        if files.is_empty() {
            bail!("no kernel modules under {}", dir.display());
        }
        let builtin = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name(Path::new(l)))
            .collect();
        Ok(Tree { release: release.to_owned(), files, builtin })
    }

    /// The wanted modules and their dependencies, in load order, each read
    /// (and decompressed where Debian compressed it). Built-in ones are left
    /// out: the kernel has them already.
    pub fn resolve(&self, wanted: &[&str]) -> anyhow::Result<Vec<Module>> {
        let mut read = BTreeMap::new();
        let order = load_order(wanted, |name| {
            if self.builtin.contains(name) {
                return Ok(None);
            }
            let path = self.files.get(name).with_context(|| {
                format!("kernel {} has no module `{name}` (neither a .ko nor built in)", self.release)
            })?;
            let data = read_module(path)?;
            let deps = crate::guest::elf::module_depends(&data)
                .with_context(|| format!("reading the dependencies of {}", path.display()))?;
            read.insert(name.to_owned(), data);
            Ok(Some(deps))
        })?;
        Ok(order
            .into_iter()
            .filter_map(|name| read.remove(&name).map(|data| Module { name, data }))
            .collect())
    }
}

/// Depth-first: every module after its dependencies, each once. `deps`
/// returns a module's dependencies, or `None` for one that needs no loading
/// (built in).
pub fn load_order(
    wanted: &[&str],
    mut deps: impl FnMut(&str) -> anyhow::Result<Option<Vec<String>>>,
) -> anyhow::Result<Vec<String>> {
    fn visit(
        name: &str,
        deps: &mut dyn FnMut(&str) -> anyhow::Result<Option<Vec<String>>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let name = name.replace('-', "_");
        if done.contains(&name) {
            return Ok(());
        }
        if path.contains(&name) {
            bail!("modules depend on each other in a circle: {} -> {name}", path.join(" -> "));
        }
        path.push(name.clone());
        if let Some(ds) = deps(&name)? {
            for d in &ds {
                visit(d, deps, path, done, order)?;
            }
            order.push(name.clone());
        }
        path.pop();
        done.insert(name);
        Ok(())
    }
    let (mut done, mut order) = (BTreeSet::new(), Vec::new());
    for w in wanted {
        visit(w, &mut deps, &mut Vec::new(), &mut done, &mut order)?;
    }
    Ok(order)
}

/// `kernel/fs/9p/9p.ko` -> `9p`; `foo-bar.ko.xz` -> `foo_bar`.
fn module_name(p: &Path) -> Option<String> {
    let file = p.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// The module's bytes, decompressed: busybox's insmod takes plain `.ko`
/// files only. Debian's 6.1 kernels ship them plain; later ones compress.
fn read_module(p: &Path) -> anyhow::Result<Vec<u8>> {
    let tool = match p.extension().and_then(|e| e.to_str()) {
        Some("ko") => return fs::read(p).with_context(|| format!("reading {}", p.display())),
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => bail!("{} is not a kernel module file", p.display()),
    };
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(p)
        .output()
        .with_context(|| format!("running `{tool}` to decompress {} (is it installed?)", p.display()))?;
    if !out.status.success() {
        bail!("`{tool} -dc {}` failed: {}", p.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            walk(&e.path(), f)?;
        } else {
            f(&e.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph<'a>(
        edges: &'a [(&'a str, &'a [&'a str])],
    ) -> impl FnMut(&str) -> anyhow::Result<Option<Vec<String>>> + 'a {
        move |n| match edges.iter().find(|(m, _)| *m == n) {
            Some((_, ds)) => Ok(Some(ds.iter().map(|s| s.to_string()).collect())),
            None if n == "builtin" => Ok(None),
            None => bail!("unknown module {n}"),
        }
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let edges: &[(&str, &[&str])] = &[
            ("virtio_ring", &[]),
            ("virtio", &["virtio_ring"]),
            ("virtio_pci_modern_dev", &[]),
            ("virtio_pci", &["virtio_ring", "virtio_pci_modern_dev", "virtio"]),
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
        ];
        let order = load_order(&["virtio_net", "virtio_pci", "virtio"], graph(edges)).unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_pci_modern_dev",
                "virtio_pci"
            ]
        );
    }

    #[test]
    fn builtins_are_skipped_and_dashes_normalised() {
        let edges: &[(&str, &[&str])] = &[("a_b", &["builtin"]), ("c", &["a-b"])];
        assert_eq!(load_order(&["c"], graph(edges)).unwrap(), ["a_b", "c"]);
    }

    #[test]
    fn circles_and_unknown_modules_are_errors() {
        let edges: &[(&str, &[&str])] = &[("a", &["b"]), ("b", &["a"])];
        let e = load_order(&["a"], graph(edges)).unwrap_err().to_string();
        assert!(e.contains("a -> b -> a"), "{e}");
        let e = load_order(&["nope"], graph(edges)).unwrap_err().to_string();
        assert!(e.contains("unknown module nope"), "{e}");
    }

    #[test]
    fn names_from_file_names() {
        assert_eq!(module_name(Path::new("kernel/fs/9p/9p.ko")).as_deref(), Some("9p"));
        assert_eq!(module_name(Path::new("x/net-failover.ko.xz")).as_deref(), Some("net_failover"));
        assert_eq!(module_name(Path::new("x/modules.order")), None);
    }
}
