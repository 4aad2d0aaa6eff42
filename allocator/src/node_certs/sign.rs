//! The X.509 side of the node signer: reading a certificate request (its
//! signature checked, so the requester holds the key) and issuing a node
//! certificate. Nothing of the request but its public key goes into the
//! certificate: the name, usages and validity are ours.

use super::decide::{node_dns_name, Requested};
use super::NodeCertsConfig;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, PublicKey, SanType,
};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Issued certificates start this long in the past, for clocks slightly
/// behind ours.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("reading {path}", path = .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA key in {path} is not a PEM private key rcgen can sign with", path = .path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the CA certificate in {path} is not a PEM certificate", path = .path.display())]
    Cert {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("issuing the certificate for node {node}")]
    Issue {
        node: String,
        #[source]
        source: rcgen::Error,
    },
}

/// The cluster CA, ready to sign node certificates.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    validity: Duration,
}

// The issuer holds the CA's private key: print nothing of it.
impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("validity", &self.validity).finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads the CA's certificate and key from the configured files.
    pub fn load(cfg: &NodeCertsConfig) -> Result<Signer, SignError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| SignError::Read { path: path.clone(), source })
        };
        let (cert, key) = (read(&cfg.ca_cert)?, read(&cfg.ca_key)?);
        let key =
            KeyPair::from_pem(&key).map_err(|source| SignError::Key { path: cfg.ca_key.clone(), source })?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key)
            .map_err(|source| SignError::Cert { path: cfg.ca_cert.clone(), source })?;
        let validity = Duration::from_secs(u64::from(cfg.validity_hours) * 3600);
        Ok(Signer { issuer, validity })
    }

    /// A certificate (PEM) for `node`'s identity with `key`, valid from a
    /// little before `now` for the configured time.
    pub fn issue(&self, key: &PublicKey, node: &str, now: SystemTime) -> Result<String, SignError> {
        let err = |source| SignError::Issue { node: node.to_owned(), source };
        let name = node_dns_name(node);
        let mut p = CertificateParams::new(vec![name.clone()]).map_err(err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = (now.checked_sub(BACKDATE).unwrap_or(now)).into();
        p.not_after = (now.checked_add(self.validity).unwrap_or(now)).into();
        p.use_authority_key_identifier_extension = true;
        Ok(p.signed_by(key, &self.issuer).map_err(err)?.pem())
    }
}

/// Reads a CSR's PEM: what it asks for and its public key. The request's
/// signature is checked, so its sender holds the private key.
pub fn read_request(pem: &[u8]) -> Result<(Requested, PublicKey), String> {
    let text = std::str::from_utf8(pem).map_err(|_| "the request is not PEM text".to_owned())?;
    let csr = CertificateSigningRequestParams::from_pem(text).map_err(|e| e.to_string())?;
    let mut dns_names = Vec::new();
    let mut other_sans = false;
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::DnsName(n) => dns_names.push(n.as_str().to_owned()),
            _ => other_sans = true,
        }
    }
    let common_name = csr.params.distinguished_name.get(&DnType::CommonName).map(|v| match v {
        DnValue::Utf8String(s) => s.clone(),
        DnValue::PrintableString(s) => s.as_str().to_owned(),
        DnValue::Ia5String(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    });
    Ok((Requested { dns_names, other_sans, common_name }, csr.public_key))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA written to `dir` and its config.
    pub fn ca(dir: &std::path::Path) -> NodeCertsConfig {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "vmscale test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        NodeCertsConfig {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            agent_user: "system:serviceaccount:vmscale-node:vmscale-agent".into(),
            validity_hours: 72,
        }
    }

    /// A request for `names` (with rcgen's default common name, which the
    /// decision would refuse; reading the request does not care).
    pub fn request(names: &[&str]) -> String {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_request_is_read_and_a_certificate_issued_with_our_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::load(&ca(dir.path())).unwrap();
        let (asked, key) = read_request(request(&["node-a.node.vmscale", "10.0.0.1"]).as_bytes()).unwrap();
        assert_eq!(asked.dns_names, ["node-a.node.vmscale"]);
        assert!(asked.other_sans, "the IP address is another kind of name");
        let pem = signer.issue(&key, "node-a", SystemTime::now()).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        // Read back: signed by the CA, our name only (no IP from the
        // request), our usages, our validity.
        let (names, hours, eku) =
            read_back(&pem, &std::fs::read_to_string(dir.path().join("ca.pem")).unwrap());
        assert_eq!(names, ["node-a.node.vmscale"]);
        assert_eq!(hours, 72, "72 hours and the 5 minutes of backdating");
        assert_eq!(eku, (true, true), "client and server auth");
    }

    /// (DNS names, whole hours of validity, (client auth, server auth)) of
    /// a certificate, whose signature the CA's key must verify.
    pub fn read_back(pem: &str, ca_pem: &str) -> (Vec<String>, i64, (bool, bool)) {
        let (_, cert_pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = cert_pem.parse_x509().unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).unwrap();
        let ca = ca_pem.parse_x509().unwrap();
        cert.verify_signature(Some(ca.public_key())).expect("signed by the CA");
        let names = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => (*d).to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        let v = cert.validity();
        let hours = (v.not_after.timestamp() - v.not_before.timestamp()) / 3600;
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        (names, hours, (eku.client_auth, eku.server_auth))
    }

    #[test]
    fn garbage_and_forged_requests_are_refused() {
        assert!(read_request(b"not pem").is_err());
        assert!(read_request(&[0xff, 0xfe]).is_err());
        // A request changed after it was signed (one base64 digit of its
        // body): its signature no longer matches.
        let good = request(&["node-a.node.vmscale"]);
        assert!(read_request(good.as_bytes()).is_ok());
        let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
        let line = &mut lines[2];
        let c = line.remove(10);
        line.insert(10, if c == 'A' { 'B' } else { 'A' });
        let forged = lines.join("\n");
        assert!(read_request(forged.as_bytes()).is_err());
    }
}
