//! A throw-away cluster CA for tests and the harnesses: a CA and leaf
//! certificates for [`Identity`]s, written as PEM files that a `[tls]`
//! section names. Every leaf carries both serverAuth and clientAuth, as a
//! node's does (it is a client of the allocator and the server of its
//! migration service).

use crate::tls::{Identity, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a leaf issued by [`TestPki::issue`] is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// The CA's validity: longer than any leaf's.
const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Leaves start an hour back, so a clock a little behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate a certificate for {what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA key {path} is not a usable key")]
    Key {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A CA whose files are in `dir` (`ca.pem`, `ca.key`), and which issues
/// leaves into the same directory (`<dns name>.pem`, `<dns name>.key`).
pub struct TestPki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl TestPki {
    /// A new CA in `dir` (created if missing). Panics on failure: for tests.
    #[allow(clippy::expect_used)] // a test helper: its failure is the test's
    pub fn new(dir: impl AsRef<Path>) -> TestPki {
        TestPki::try_new(dir.as_ref()).expect("cannot make a test CA")
    }

    /// A leaf for `who`, valid from an hour ago for [`LEAF_VALIDITY`].
    /// Panics on failure: for tests.
    #[allow(clippy::expect_used)] // a test helper: its failure is the test's
    pub fn issue(&self, who: &Identity) -> TlsFiles {
        self.try_issue(who).expect("cannot issue a test certificate")
    }

    /// [`TestPki::new`] for callers that handle errors (the harnesses).
    pub fn try_new(dir: &Path) -> Result<TestPki, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_owned(), source })?;
        let gen = |source| PkiError::Generate { what: "the CA".into(), source };
        let key = KeyPair::generate().map_err(gen)?;
        let params = ca_params();
        let cert = params.self_signed(&key).map_err(gen)?;
        write(&dir.join("ca.pem"), &cert.pem())?;
        write(&dir.join("ca.key"), &key.serialize_pem())?;
        Ok(TestPki { dir: dir.to_owned(), issuer: Issuer::new(params, key) })
    }

    /// The CA already in `dir`, to issue more leaves under it (a harness
    /// whose daemons already trust it). Only its key is read: a leaf names
    /// its issuer by distinguished name and key, both the same as at
    /// [`TestPki::try_new`].
    pub fn open(dir: &Path) -> Result<TestPki, PkiError> {
        let path = dir.join("ca.key");
        let pem =
            std::fs::read_to_string(&path).map_err(|source| PkiError::Read { path: path.clone(), source })?;
        let key = KeyPair::from_pem(&pem).map_err(|source| PkiError::Key { path, source })?;
        Ok(TestPki { dir: dir.to_owned(), issuer: Issuer::new(ca_params(), key) })
    }

    /// When the CA made by [`TestPki::try_new`] now would expire.
    pub fn ca_validity() -> Duration {
        CA_VALIDITY
    }

    /// [`TestPki::issue`] for callers that handle errors.
    pub fn try_issue(&self, who: &Identity) -> Result<TlsFiles, PkiError> {
        let now = SystemTime::now();
        self.issue_names(&who.dns_name(), &[who.dns_name()], now - BACKDATE, now + LEAF_VALIDITY)
    }

    /// A leaf named `stem` in the directory with these DNS names and
    /// validity: for tests of wildcards, expiry, several names.
    pub fn issue_names(
        &self,
        stem: &str,
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<TlsFiles, PkiError> {
        let gen = |source| PkiError::Generate { what: stem.to_owned(), source };
        let key = KeyPair::generate().map_err(gen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, names.first().map_or(stem, String::as_str));
        params.subject_alt_names = names
            .iter()
            .map(|n| n.clone().try_into().map(SanType::DnsName))
            .collect::<Result<_, _>>()
            .map_err(gen)?;
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(gen)?;
        let files = TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The CA's certificate: the same name every time (see [`TestPki::open`]).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "vmscale cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    params
}

/// Writes a file whole (a reader polling it sees the old or the new one),
/// private keys readable by the owner only.
fn write(path: &Path, text: &str) -> Result<(), PkiError> {
    let err = |source| PkiError::Write { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}
