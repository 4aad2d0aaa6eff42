//! `cargo xtask image`: the agent and allocator container images, written
//! as OCI image layouts (no Docker daemon, no registry): one directory per
//! image under `target/image/` with `oci-layout`, `index.json` and
//! content-addressed blobs (manifest, config, one gzip layer). Push with any
//! OCI tool, e.g. `skopeo copy oci:target/image/vmscale-agent:0.1.0
//! docker://REGISTRY/vmscale/agent:0.1.0`.
//!
//! Each image is one static binary (glibc `+crt-static`, built like the
//! guest's informant and sharing its target directory) plus the few files a
//! process expects (/etc/passwd, /etc/group, /etc/nsswitch.conf, /tmp).
//! Layers are reproducible: sorted entries, zero mtimes, root ownership.
//! `--check` unpacks each written image, verifying every digest and size,
//! and runs the binary's `--version` inside the unpacked root (chroot).

use anyhow::{bail, ensure, Context};
use flate2::write::GzEncoder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::steps::{cargo, Steps};

/// Built like the guest informant: an explicit target keeps the static
/// flags off build scripts and proc macros.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The guest informant's target directory: same target and flags, so the
/// crates both use (tokio, tonic, prost...) are built once.
const TARGET_DIR: &str = "target/guest-build";
const VERSION: &str = env!("CARGO_PKG_VERSION");

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

#[derive(Debug, Default, clap::Args)]
pub struct Args {
    /// Where to write the image layouts. Default: target/image.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// After writing, unpack each image and run its binary's --version.
    #[arg(long)]
    pub check: bool,
}

/// One image: a binary and how it runs.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: &'static str,
    pub package: &'static str,
    pub binary: &'static str,
    /// `uid:gid`; the agent needs root (QMP sockets, BPF, cgroups).
    pub user: &'static str,
    pub ports: &'static [u16],
}

pub const IMAGES: [Spec; 2] = [
    Spec {
        name: "vmscale-allocator",
        package: "vmscale-allocator",
        binary: "vmscale-allocator",
        user: "65532:65532",
        ports: &[7070, 7071],
    },
    Spec {
        name: "vmscale-agent",
        package: "vmscale-agent",
        binary: "vmscale-agent",
        user: "0:0",
        ports: &[7072],
    },
];

/// A file in a layer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Relative, e.g. `usr/local/bin/vmscale-agent`; a trailing `/` makes a directory.
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let out = a.out.unwrap_or_else(|| root.join("target/image"));
    let mut steps = Steps::new(2 + usize::from(a.check));
    let bins = build(&mut steps, &root)?;
    steps.call("write the OCI image layouts", || {
        // The agent loads its eBPF programs from next to its binary.
        let ebpf = root.join("target/ebpf/vmscale.bpf.o");
        let ebpf = std::fs::read(&ebpf).ok();
        if ebpf.is_none() {
            eprintln!("    no target/ebpf/vmscale.bpf.o (cargo xtask build-ebpf): the agent image goes without run-queue delay figures");
        }
        for (spec, bin) in IMAGES.iter().zip(&bins) {
            let dir = out.join(spec.name);
            let mut entries = files(spec, bin);
            if let (true, Some(obj)) = (spec.name == "vmscale-agent", &ebpf) {
                entries.push(Entry { path: "usr/local/bin/vmscale.bpf.o".into(), mode: 0o644, data: obj.clone() });
            }
            let digest = write_layout(&dir, spec, &entries)?;
            eprintln!(
                "    {}: {} ({} bytes of binary), manifest {digest}",
                spec.name,
                dir.display(),
                bin.len()
            );
        }
        Ok(())
    })?;
    if a.check {
        steps.call("unpack each image and run its binary's --version", || {
            for spec in &IMAGES {
                let line = check(&out.join(spec.name), spec)?;
                eprintln!("    {}: {line}", spec.name);
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Builds both binaries static, stripped of debug info.
fn build(steps: &mut Steps, root: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let target_dir = root.join(TARGET_DIR);
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--target", TARGET]).arg("--target-dir").arg(&target_dir);
    for s in &IMAGES {
        cmd.args(["-p", s.package]);
    }
    cmd.env("RUSTFLAGS", "-C target-feature=+crt-static");
    for var in ["CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(var);
    }
    steps.run("build the static agent and allocator (first build: several minutes)", &mut cmd)?;
    IMAGES
        .iter()
        .map(|s| {
            let built = target_dir.join(TARGET).join("release").join(s.binary);
            let stripped = target_dir.join(format!("{}.image", s.binary));
            let ok = Command::new("objcopy")
                .arg("--strip-debug")
                .arg(&built)
                .arg(&stripped)
                .status()
                .context("cannot run objcopy (binutils) to strip the binaries")?
                .success();
            ensure!(ok, "objcopy --strip-debug {} failed", built.display());
            std::fs::read(&stripped).with_context(|| format!("reading {}", stripped.display()))
        })
        .collect()
}

/// The image's files: the binary and what a process expects to find.
pub fn files(spec: &Spec, binary: &[u8]) -> Vec<Entry> {
    let text = |path: &str, s: &str| Entry { path: path.into(), mode: 0o644, data: s.as_bytes().to_vec() };
    let dir = |path: &str, mode| Entry { path: path.into(), mode, data: Vec::new() };
    vec![
        dir("etc/", 0o755),
        text("etc/group", "root:x:0:\nnonroot:x:65532:\n"),
        // Static glibc resolves names through these built-in sources.
        text("etc/nsswitch.conf", "hosts: files dns\n"),
        text("etc/passwd", "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"),
        dir("tmp/", 0o1777),
        dir("usr/", 0o755),
        dir("usr/local/", 0o755),
        dir("usr/local/bin/", 0o755),
        Entry { path: format!("usr/local/bin/{}", spec.binary), mode: 0o755, data: binary.to_vec() },
    ]
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// A reproducible tar of `entries` (sorted, zero mtimes, root-owned).
pub fn tar(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut b = tar::Builder::new(Vec::new());
    for e in sorted {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(if e.path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(e.data.len() as u64);
        b.append_data(&mut h, &e.path, e.data.as_slice())
            .with_context(|| format!("adding {} to the layer", e.path))?;
    }
    Ok(b.into_inner()?)
}

/// Writes `dir` as an OCI image layout of one image with one layer; returns
/// the manifest's digest.
pub fn write_layout(dir: &Path, spec: &Spec, entries: &[Entry]) -> anyhow::Result<String> {
    let blobs = dir.join("blobs/sha256");
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let put = |bytes: &[u8]| -> anyhow::Result<(String, usize)> {
        let d = sha256(bytes);
        let hex = d.trim_start_matches("sha256:");
        std::fs::write(blobs.join(hex), bytes).with_context(|| format!("writing blob {d}"))?;
        Ok((d, bytes.len()))
    };
    let layer_tar = tar(entries)?;
    let diff_id = sha256(&layer_tar);
    // No file name or time in the header: the same input gives the same digest.
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &layer_tar)?;
    let (layer, layer_size) = put(&gz.finish()?)?;

    let ports: serde_json::Map<String, Value> =
        spec.ports.iter().map(|p| (format!("{p}/tcp"), json!({}))).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": spec.user,
            "Entrypoint": [format!("/usr/local/bin/{}", spec.binary)],
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
            "ExposedPorts": ports,
            "Labels": {"org.opencontainers.image.title": spec.name, "org.opencontainers.image.version": VERSION},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "cargo xtask image"}],
    });
    let (config, config_size) = put(&serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config, "size": config_size},
        "layers": [{"mediaType": LAYER, "digest": layer, "size": layer_size}],
        "annotations": {"org.opencontainers.image.title": spec.name},
    });
    let (manifest, manifest_size) = put(&serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{
            "mediaType": MANIFEST, "digest": manifest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": VERSION},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(manifest)
}

/// Reads a blob named by a descriptor, checking its size and digest.
fn blob(dir: &Path, desc: &Value, media_type: &str) -> anyhow::Result<Vec<u8>> {
    ensure!(desc["mediaType"] == media_type, "descriptor {desc} is not a {media_type}");
    let digest = desc["digest"].as_str().context("descriptor without a digest")?;
    let hex = digest.strip_prefix("sha256:").context("only sha256 digests are written")?;
    let bytes = std::fs::read(dir.join("blobs/sha256").join(hex))
        .with_context(|| format!("blob {digest} is missing"))?;
    ensure!(Some(bytes.len() as u64) == desc["size"].as_u64(), "blob {digest} has the wrong size");
    ensure!(sha256(&bytes) == digest, "blob {digest} does not match its digest");
    Ok(bytes)
}

/// Unpacks the layout's image into `rootfs`, verifying every blob; returns
/// the image config.
pub fn unpack(dir: &Path, rootfs: &Path) -> anyhow::Result<Value> {
    let layout: Value = serde_json::from_slice(&std::fs::read(dir.join("oci-layout"))?)?;
    ensure!(layout["imageLayoutVersion"] == "1.0.0", "{} is not an OCI image layout", dir.display());
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    ensure!(index["schemaVersion"] == 2 && index["mediaType"] == INDEX, "bad index.json");
    let [m] = index["manifests"].as_array().context("index.json without manifests")?.as_slice() else {
        bail!("expected one manifest in {}", dir.display());
    };
    let manifest: Value = serde_json::from_slice(&blob(dir, m, MANIFEST)?)?;
    let config: Value = serde_json::from_slice(&blob(dir, &manifest["config"], CONFIG)?)?;
    let layers = manifest["layers"].as_array().context("manifest without layers")?;
    let diff_ids = config["rootfs"]["diff_ids"].as_array().context("config without diff_ids")?;
    ensure!(layers.len() == diff_ids.len(), "layers and diff_ids differ in number");
    for (l, diff_id) in layers.iter().zip(diff_ids) {
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(blob(dir, l, LAYER)?.as_slice()).read_to_end(&mut tar_bytes)?;
        ensure!(diff_id.as_str() == Some(&sha256(&tar_bytes)), "layer does not match its diff_id");
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        archive.set_preserve_permissions(true);
        archive.unpack(rootfs).with_context(|| format!("unpacking into {}", rootfs.display()))?;
    }
    Ok(config)
}

/// Unpacks the image into a fresh directory and runs its entrypoint with
/// `--version` there (chrooted when root, so nothing of the host is used);
/// returns the line it printed.
pub fn check(dir: &Path, spec: &Spec) -> anyhow::Result<String> {
    let rootfs = crate::workspace_root().join("target/tmp").join(format!("image-check-{}", spec.name));
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    std::fs::create_dir_all(&rootfs)?;
    let config = unpack(dir, &rootfs)?;
    let entry = config["config"]["Entrypoint"][0].as_str().context("config without an entrypoint")?;
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut cmd = if root {
        let mut c = Command::new("chroot");
        c.arg(&rootfs).arg(entry);
        c
    } else {
        Command::new(rootfs.join(entry.trim_start_matches('/')))
    };
    // Nothing of ours in its environment; PATH only to find chroot itself.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let out = cmd
        .arg("--version")
        .env_clear()
        .env("PATH", path)
        .output()
        .with_context(|| format!("cannot run {entry}"))?;
    ensure!(
        out.status.success(),
        "{entry} --version in the unpacked {} failed ({}): {}{}",
        spec.name,
        out.status,
        String::from_utf8_lossy(&out.stderr),
        if root { " (a dynamically linked binary finds no loader in the image)" } else { "" }
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(line == format!("{} {VERSION}", spec.binary), "{entry} --version printed {line:?}");
    std::fs::remove_dir_all(&rootfs)?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_unpacks_to_its_files_and_is_reproducible() {
        let tmp = crate::workspace_root().join("target/tmp/image-unit");
        let _ = std::fs::remove_dir_all(&tmp);
        let spec = &IMAGES[1];
        let entries = files(spec, b"#!/bin/sh\necho hi\n");
        let a = write_layout(&tmp.join("a"), spec, &entries).unwrap();
        let b = write_layout(&tmp.join("b"), spec, &entries).unwrap();
        assert_eq!(a, b, "same input, same manifest digest");
        let config = unpack(&tmp.join("a"), &tmp.join("root")).unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/vmscale-agent");
        assert_eq!(config["config"]["ExposedPorts"], json!({"7072/tcp": {}}));
        let bin = tmp.join("root/usr/local/bin/vmscale-agent");
        assert_eq!(std::fs::read(&bin).unwrap(), b"#!/bin/sh\necho hi\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o7777, 0o755);
        assert!(std::fs::read_to_string(tmp.join("root/etc/passwd")).unwrap().contains("65532"));

        // A blob that does not match its digest is found out.
        let index: Value = serde_json::from_slice(&std::fs::read(tmp.join("a/index.json")).unwrap()).unwrap();
        let m = index["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
        std::fs::write(tmp.join("a/blobs/sha256").join(m), b"{}").unwrap();
        let e = unpack(&tmp.join("a"), &tmp.join("root2")).unwrap_err();
        assert!(format!("{e:#}").contains("wrong size"), "{e:#}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
