//! A QEMU per test, in its own temp dir, killed when the test ends.
//!
//! Without `qemu-system-x86_64` the tests skip with a printed reason, except
//! under `CI=true`, where they fail and name the Debian package to install.
#![allow(clippy::expect_used)] // a test's setup failing is the test failing
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vmscale_agent::qmp::process::{find_qemu, QemuOptions, QemuProcess, QEMU_PACKAGE};
use vmscale_agent::qmp::{ClientConfig, HotplugConfig, QmpClient, QmpVm};

/// A directory removed on drop (after the QEMU in it is gone).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmscale-qmp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The QEMU binary, or `None` (after saying why) when the test should skip.
pub fn qemu_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(qemu) = find_qemu() {
        return Some(qemu);
    }
    let message = format!(
        "qemu-system-x86_64 not found: install the Debian package {QEMU_PACKAGE} \
         (apt-get install -y --no-install-recommends {QEMU_PACKAGE}) or set VMSCALE_QEMU"
    );
    vmscale_common::testing::skip_unless_ci(&format!("{test}: {message}"));
    None
}

/// A running QEMU; field order makes it die before its directory goes.
pub struct TestQemu {
    pub qemu: QemuProcess,
    pub dir: TempDir,
}

impl TestQemu {
    /// Starts QEMU with the default hotplug shape, changed by `shape`.
    pub async fn start(test: &str, shape: impl FnOnce(&mut QemuOptions)) -> Option<Self> {
        let binary = qemu_or_skip(test)?;
        let dir = TempDir::new();
        let mut options = QemuOptions::new(binary);
        shape(&mut options);
        let qemu = QemuProcess::spawn(&options, dir.path()).await.expect("qemu starts");
        Some(Self { qemu, dir })
    }

    pub async fn client(&self) -> QmpClient {
        QmpClient::connect(self.qemu.endpoint(), client_config())
            .await
            .unwrap_or_else(|e| panic!("connect: {e:#}\nqemu log:\n{}", self.qemu.log()))
    }

    /// A `QmpVm` with a short unplug timeout: no guest ever acks here.
    pub async fn vm(&self) -> QmpVm {
        QmpVm::new(self.client().await, hotplug_config())
    }
}

pub fn client_config() -> ClientConfig {
    ClientConfig {
        handshake_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        event_capacity: 256,
    }
}

pub fn hotplug_config() -> HotplugConfig {
    HotplugConfig { unplug_timeout: Duration::from_millis(300), ..HotplugConfig::default() }
}

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A file of pseudo-random bytes, `mib` MiB, to back guest RAM with: a
/// guest without an OS has all-zero RAM, which a migration sends in almost
/// no bytes; this makes the stream as long as its size says.
pub fn random_ram(path: &Path, mib: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create ram file"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).expect("write ram file");
    }
}

/// QEMU arguments that back the boot RAM (`mib` MiB) with `path`.
pub fn file_backed_ram(path: &Path, mib: u64) -> Vec<String> {
    vec![
        "-object".into(),
        format!("memory-backend-file,id=pc.ram,size={mib}M,mem-path={},share=off", path.display()),
        "-machine".into(),
        "memory-backend=pc.ram".into(),
    ]
}
