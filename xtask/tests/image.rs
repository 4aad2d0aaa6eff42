//! `cargo xtask image --check`, as a user runs it: builds the static agent
//! and allocator, writes both OCI image layouts, then unpacks each (every
//! blob checked against its digest) and runs the binary's `--version`
//! chrooted in the unpacked root, so nothing from the host is used. This
//! test then reads the layouts itself: each has one small layer with the
//! binary as its entrypoint.

#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::path::Path;
use std::process::Command;

#[test]
fn images_are_written_unpack_and_run_their_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = root.join("target/tmp/image-test");
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["image", "--check", "--out"])
        .arg(&out)
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success(), "cargo xtask image --check failed: {status}");
    for (name, user) in [("vmscale-agent", "0:0"), ("vmscale-allocator", "65532:65532")] {
        let dir = out.join(name);
        let read = |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
        let index = read(&dir.join("index.json"));
        assert_eq!(
            index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            env!("CARGO_PKG_VERSION")
        );
        let blob =
            |d: &Value| dir.join("blobs/sha256").join(d.as_str().unwrap().trim_start_matches("sha256:"));
        let manifest = read(&blob(&index["manifests"][0]["digest"]));
        let config = read(&blob(&manifest["config"]["digest"]));
        assert_eq!(config["config"]["Entrypoint"][0], format!("/usr/local/bin/{name}"));
        assert_eq!(config["config"]["User"], user);
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        // Small: one stripped static binary, compressed.
        let size = layers[0]["size"].as_u64().unwrap();
        assert!(size < 40 << 20, "{name} layer is {size} bytes");
    }
}
