//! A record that survives a crash at any moment: written to a temporary file
//! beside it, flushed to disk, renamed over the old one, and the directory
//! flushed too. Without the fsyncs a crash can leave an empty file under the
//! final name (the rename reaches the disk before the data).

use serde::Serialize;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes`, atomically and durably. One writer per
/// path at a time: the temporary's name is per process (each record here
/// has one owner: a VM's move, or one order taken in).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name =
        path.file_name().ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Replaces `path` with `value` as pretty JSON, atomically and durably.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("move-7.json");
        write_json(&p, &serde_json::json!({"order": 7})).unwrap();
        write_json(&p, &serde_json::json!({"order": 8})).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back["order"], 8);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("move-7.json")]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write(&p, b"old").unwrap();
        // A directory where the temporary would go makes the write fail.
        std::fs::create_dir(dir.path().join(format!("r.json.tmp.{}", std::process::id()))).unwrap();
        assert!(write(&p, b"new").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }
}
