//! Orders whose guest was confirmed here, remembered for good: a restarted
//! target must never answer "none" for a guest that ran (or may have run)
//! here, or the source would resume a stale copy of it. One durable file
//! per order (`<state_dir>/settled/<order>.json`), written before the guest
//! may resume here, kept whatever becomes of the VM afterwards (it moves on,
//! its QEMU dies), and pruned only once older than a long configured age.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

/// One order confirmed here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    pub order_id: u64,
    pub vm: String,
    /// The node the guest came from: the only one told about the order.
    pub source_node: String,
    /// When it was confirmed, seconds since the Unix epoch.
    pub at_unix_s: u64,
}

/// Whether `t` is still kept at `now` (seconds) with `max_age_s`.
pub fn kept(t: &Tombstone, now_unix_s: u64, max_age_s: u64) -> bool {
    now_unix_s.saturating_sub(t.at_unix_s) <= max_age_s
}

pub fn path(dir: &Path, order: u64) -> PathBuf {
    dir.join(format!("{order}.json"))
}

/// Writes `t` durably (file, rename, directory).
pub fn record(dir: &Path, t: &Tombstone) -> Result<(), super::RecordError> {
    let path = path(dir, t.order_id);
    std::fs::create_dir_all(dir)
        .and_then(|()| vmscale_common::durable::write_json(&path, t))
        .map_err(|source| super::RecordError { path, source })
}

/// Removes the tombstone of an order whose confirm failed before the guest
/// could run here (its QEMU was killed): the source may resume it.
pub fn remove(dir: &Path, order: u64) {
    let p = path(dir, order);
    // The directory is flushed too: a tombstone back after a crash would
    // say the guest ran here when the source has resumed it.
    let removed = std::fs::remove_file(&p).and_then(|()| std::fs::File::open(dir)?.sync_all());
    if let Err(e) = removed {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("cannot remove {}: {e}", p.display());
        }
    }
}

/// The tombstones in `dir` young enough at `now`; older ones are deleted.
/// A file that cannot be read is kept on disk and reported: it may be the
/// only word that a guest ran here.
pub fn load(dir: &Path, now_unix_s: u64, max_age_s: u64) -> Vec<Tombstone> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for p in rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")) {
        match std::fs::read(&p).map(|b| serde_json::from_slice::<Tombstone>(&b)) {
            Ok(Ok(t)) if kept(&t, now_unix_s, max_age_s) => out.push(t),
            Ok(Ok(_)) => {
                let _ = std::fs::remove_file(&p);
            }
            Ok(Err(e)) => warn!("ignoring the order record {}: {e}", p.display()),
            Err(e) => warn!("cannot read the order record {}: {e}", p.display()),
        }
    }
    out.sort_by_key(|t| t.order_id);
    out
}

/// Seconds since the Unix epoch now.
pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(order: u64, at: u64) -> Tombstone {
        Tombstone { order_id: order, vm: "vm1".into(), source_node: "a".into(), at_unix_s: at }
    }

    #[test]
    fn kept_until_older_than_the_age_then_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let day = 86_400;
        record(dir.path(), &t(1, 100 * day)).unwrap();
        record(dir.path(), &t(2, 131 * day)).unwrap();
        std::fs::write(dir.path().join("9.json"), b"{").unwrap();
        let now = 131 * day;
        assert_eq!(load(dir.path(), now, 30 * day), vec![t(2, 131 * day)]);
        assert!(!path(dir.path(), 1).exists(), "older than 30 days: pruned");
        assert!(dir.path().join("9.json").exists(), "an unreadable record is kept for a person to look at");
        assert_eq!(load(dir.path(), now, 30 * day), vec![t(2, 131 * day)]);
        remove(dir.path(), 2);
        assert!(load(dir.path(), now, 30 * day).is_empty());
        assert!(kept(&t(3, 10), 5, 0), "a clock gone backwards keeps it");
    }
}
