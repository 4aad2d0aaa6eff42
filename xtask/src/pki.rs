//! The harnesses' cluster CA: `target/pki/{ca.pem,ca.key,<identity>.pem,
//! <identity>.key}` (identities are DNS names, `vmscale_common::tls`),
//! made on first use and kept: a leaf is reused while its files are there
//! and it has more than a day left, issued under the same CA when a run
//! asks for an identity not made yet (a new node), and everything is made
//! again when the CA itself has less than a week left. A file lock keeps
//! two runs (a test and the demo) from writing at once.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vmscale_common::testing::{TestPki, LEAF_VALIDITY};
use vmscale_common::tls::{Identity, TlsFiles};

/// Relative to the workspace root.
pub const DIR: &str = "target/pki";
/// A leaf with less left than this is issued again.
const LEAF_MARGIN: Duration = Duration::from_secs(24 * 3600);
/// A CA with less left than this is made again (and every leaf with it).
const CA_MARGIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// What is in the directory, and until when (seconds since the epoch).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    ca_not_after: u64,
    leaves: BTreeMap<String, u64>,
}

/// The harness CA's directory, with a leaf for every identity asked for.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// The files of `who`'s certificate (made by [`ensure`]).
    pub fn files(&self, who: &Identity) -> TlsFiles {
        let name = who.dns_name();
        TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        }
    }
}

/// Makes sure `root/target/pki` has a valid CA and a valid leaf for each of
/// `identities` (see the module doc).
pub fn ensure(root: &Path, identities: &[Identity]) -> anyhow::Result<Pki> {
    let dir = root.join(DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock_path = dir.join(".lock");
    let lock = fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
    let manifest_path = dir.join("manifest.json");
    let mut manifest: Manifest =
        fs::read(&manifest_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let now = SystemTime::now();
    let pki = Pki { dir: dir.clone() };
    let ca_ok = dir.join("ca.pem").exists()
        && dir.join("ca.key").exists()
        && left(manifest.ca_not_after, now) > CA_MARGIN;
    let ca = if ca_ok {
        TestPki::open(&dir)?
    } else {
        eprintln!("    making a cluster CA in {}", dir.display());
        let ca = TestPki::try_new(&dir)?;
        manifest = Manifest { ca_not_after: secs(now + TestPki::ca_validity()), leaves: BTreeMap::new() };
        ca
    };
    for who in identities {
        let name = who.dns_name();
        let files = pki.files(who);
        let fresh = manifest.leaves.get(&name).is_some_and(|&t| left(t, now) > LEAF_MARGIN)
            && files.cert.exists()
            && files.key.exists();
        if !fresh {
            ca.try_issue(who).with_context(|| format!("issuing the certificate of {name}"))?;
            manifest.leaves.insert(name, secs(now + LEAF_VALIDITY));
        }
    }
    fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest)?)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    Ok(pki)
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How long until `not_after` (seconds since the epoch); zero if past.
fn left(not_after: u64, now: SystemTime) -> Duration {
    Duration::from_secs(not_after.saturating_sub(secs(now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_reused_and_grown() {
        let root = tempfile::tempdir().unwrap();
        let a = Identity::Node("a".into());
        let pki = ensure(root.path(), &[Identity::Allocator, a.clone()]).unwrap();
        let ca = fs::read(pki.files(&a).ca).unwrap();
        let leaf = fs::read(pki.files(&a).cert).unwrap();
        // Again, and with one more node: the CA and the existing leaf stay.
        let pki = ensure(root.path(), &[a.clone(), Identity::Node("b".into())]).unwrap();
        assert_eq!(fs::read(pki.files(&a).ca).unwrap(), ca);
        assert_eq!(fs::read(pki.files(&a).cert).unwrap(), leaf);
        // The new leaf chains to the same CA.
        vmscale_common::tls::Tls::load(&pki.files(&Identity::Node("b".into()))).unwrap();
        // An expired CA (by the manifest) makes everything again.
        let m = root.path().join(DIR).join("manifest.json");
        let mut manifest: Manifest = serde_json::from_slice(&fs::read(&m).unwrap()).unwrap();
        manifest.ca_not_after = 1;
        fs::write(&m, serde_json::to_vec(&manifest).unwrap()).unwrap();
        let pki = ensure(root.path(), std::slice::from_ref(&a)).unwrap();
        assert_ne!(fs::read(pki.files(&a).ca).unwrap(), ca);
        vmscale_common::tls::Tls::load(&pki.files(&a)).unwrap();
    }
}
