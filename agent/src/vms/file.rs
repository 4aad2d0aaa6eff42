//! The default VM source: a TOML file listing the VMs of this node. The file is
//! re-read when it changes (checked every `interval`); a broken file is logged
//! and the last good list kept, so a typo never stops running VMs' loops.

use super::VmSpec;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vmscale_common::error::Chain;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    #[serde(default, rename = "vm")]
    vms: Vec<VmSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read VM list {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM list {path} is not valid TOML for [[vm]] entries")]
    Parse {
        path: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("VM list {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Reads and checks a VM list: every entry valid, ids unique.
pub fn load(path: &Path) -> Result<Vec<VmSpec>, FileError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: p.clone(), source })?;
    parse(&text, &p)
}

pub fn parse(text: &str, origin: &str) -> Result<Vec<VmSpec>, FileError> {
    let f: VmFile = toml::from_str(text)
        .map_err(|e| FileError::Parse { path: origin.to_owned(), source: Box::new(e) })?;
    let mut seen = std::collections::HashSet::new();
    for v in &f.vms {
        v.validate().map_err(|reason| FileError::Invalid { path: origin.to_owned(), reason })?;
        if !seen.insert(v.id.as_str()) {
            return Err(FileError::Invalid {
                path: origin.to_owned(),
                reason: format!("vm {} listed twice", v.id),
            });
        }
    }
    Ok(f.vms)
}

/// Publishes the file's VM list now and whenever the file changes.
#[derive(Debug)]
pub struct FileSource {
    pub path: PathBuf,
    pub interval: Duration,
}

impl FileSource {
    /// Loads the file once (an error here is fatal: the operator must fix the
    /// file before the agent starts), then watches it in the background.
    pub fn start(self, cancel: CancellationToken) -> Result<watch::Receiver<Vec<VmSpec>>, FileError> {
        let first = load(&self.path)?;
        let (tx, rx) = watch::channel(first);
        tokio::spawn(async move {
            let mut seen = modified(&self.path);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(self.interval) => {}
                }
                let now = modified(&self.path);
                if now == seen {
                    continue;
                }
                seen = now;
                match load(&self.path) {
                    Ok(vms) => {
                        tracing::info!(path = %self.path.display(), vms = vms.len(), "VM list changed");
                        tx.send_replace(vms);
                    }
                    Err(e) => tracing::warn!("keeping the last good VM list: {}", Chain(&e)),
                }
            }
        });
        Ok(rx)
    }
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[vm]]
id = "pg-1"
qmp = "/run/vmscale/pg-1.qmp"
informant = "http://127.0.0.1:7081"
cu = { milli_cpu = 250, memory_bytes = 268435456 }
min_cus = 1
max_cus = 8
cpu_mode = "sysfs"
memory = { kind = "virtio_mem", device = "vm0" }

[[vm]]
id = "pg-2"
qmp = "tcp:127.0.0.1:4444"
cu = { milli_cpu = 1000, memory_bytes = 1073741824 }
min_cus = 1
max_cus = 4
cpu_mode = "hotplug"
memory = { kind = "dimm", dimm_bytes = 268435456 }
"#;

    #[test]
    fn parses_a_good_file() {
        let vms = parse(GOOD, "t").unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[1].informant, None);
        assert_eq!(vms[1].cpu_mode, super::super::CpuMode::Hotplug);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse(&GOOD.replace("min_cus = 1\nmax_cus = 8", "min_cus = 9\nmax_cus = 8"), "vms.toml")
            .unwrap_err();
        assert!(e.to_string().contains("pg-1") && e.to_string().contains("min_cus"), "{e}");
        let e = parse(&GOOD.replace("pg-2", "pg-1"), "vms.toml").unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = parse("[[vm]]\nid = 3", "vms.toml").unwrap_err();
        assert!(matches!(e, FileError::Parse { .. }));
        let e = parse(&GOOD.replace("min_cus = 1\nmax_cus = 4", "min_cus = 1\nmax_cus = 4\ncolour = 1"), "v")
            .unwrap_err();
        assert!(Chain(&e).to_string().contains("unknown field"), "{}", Chain(&e));
        assert!(matches!(load(Path::new("/nonexistent/vms.toml")), Err(FileError::Read { .. })));
    }

    #[tokio::test]
    async fn changes_are_published_and_bad_edits_ignored() {
        let dir = std::env::temp_dir().join(format!("vmscale-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vms.toml");
        std::fs::write(&path, GOOD).unwrap();
        let cancel = CancellationToken::new();
        let mut rx = FileSource { path: path.clone(), interval: Duration::from_millis(10) }
            .start(cancel.clone())
            .unwrap();
        assert_eq!(rx.borrow().len(), 2);
        // mtime granularity: make sure the next write looks newer.
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(&path, "this is not toml [").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rx.borrow_and_update().len(), 2, "bad edit ignored");
        let one = GOOD.split("[[vm]]").nth(1).unwrap();
        std::fs::write(&path, format!("[[vm]]{one}")).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.changed()).await.unwrap().unwrap();
        assert_eq!(rx.borrow().len(), 1);
        cancel.cancel();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
