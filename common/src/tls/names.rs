//! The DNS names in a certificate's subjectAltName, read from its DER.
//!
//! rustls checks the chain and, on the client side, the server's name; but
//! a server must learn who the *client* is, and webpki only answers "is
//! this certificate valid for name X", which a wildcard `*.node.vmscale`
//! would pass for every node. So the names are read here, exactly as
//! written, and compared byte for byte. The certificate has already passed
//! the handshake's chain check when this runs; the walk still trusts no
//! length: every read is bounds-checked, and at most [`MAX_NAMES`] names
//! are returned.

/// More names than any certificate of ours carries; the rest are ignored.
pub const MAX_NAMES: usize = 16;

/// Why a certificate's names could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the certificate is not DER this reader understands: {0}")]
pub struct NameError(&'static str);

const SEQUENCE: u8 = 0x30;
/// `[3] EXPLICIT Extensions` in TBSCertificate.
const EXTENSIONS: u8 = 0xA3;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
/// `dNSName [2] IMPLICIT IA5String` in GeneralName.
const DNS_NAME: u8 = 0x82;
/// id-ce-subjectAltName, 2.5.29.17.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1D, 0x11];

/// The subjectAltName DNS names of a DER certificate, as written (a name
/// that is not ASCII is left out: no identity of ours is such a name).
pub fn dns_names(der: &[u8]) -> Result<Vec<String>, NameError> {
    let (cert, _) = expect(der, SEQUENCE, "certificate")?;
    let (tbs, _) = expect(cert, SEQUENCE, "tbsCertificate")?;
    let mut rest = tbs;
    while !rest.is_empty() {
        let (tag, value, next) = tlv(rest)?;
        rest = next;
        if tag == EXTENSIONS {
            let (list, _) = expect(value, SEQUENCE, "extensions")?;
            return san(list);
        }
    }
    Ok(Vec::new())
}

/// Finds subjectAltName among the extensions and reads its DNS names.
fn san(mut list: &[u8]) -> Result<Vec<String>, NameError> {
    while !list.is_empty() {
        let (ext, next) = expect(list, SEQUENCE, "extension")?;
        list = next;
        let (oid, mut fields) = expect(ext, OID, "extension id")?;
        if oid != SUBJECT_ALT_NAME {
            continue;
        }
        // `critical BOOLEAN DEFAULT FALSE`, then the value.
        let value = loop {
            let (tag, value, next) = tlv(fields)?;
            if tag == OCTET_STRING {
                break value;
            }
            fields = next;
        };
        let (mut general, _) = expect(value, SEQUENCE, "subjectAltName")?;
        let mut names = Vec::new();
        while !general.is_empty() && names.len() < MAX_NAMES {
            let (tag, name, next) = tlv(general)?;
            general = next;
            if tag == DNS_NAME && name.is_ascii() {
                names.push(String::from_utf8_lossy(name).into_owned());
            }
        }
        return Ok(names);
    }
    Ok(Vec::new())
}

/// One TLV of `tag`, and what follows it.
fn expect<'a>(input: &'a [u8], tag: u8, what: &'static str) -> Result<(&'a [u8], &'a [u8]), NameError> {
    let (t, value, rest) = tlv(input)?;
    if t != tag {
        return Err(NameError(what));
    }
    Ok((value, rest))
}

/// One DER tag-length-value: (tag, value, rest). Definite lengths of at
/// most four bytes; single-byte tags (all X.509 uses).
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), NameError> {
    let (&tag, rest) = input.split_first().ok_or(NameError("truncated tag"))?;
    if tag & 0x1F == 0x1F {
        return Err(NameError("multi-byte tag"));
    }
    let (&first, mut rest) = rest.split_first().ok_or(NameError("truncated length"))?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return Err(NameError("indefinite or oversized length"));
        }
        let (bytes, after) = rest.split_at_checked(n).ok_or(NameError("truncated length"))?;
        rest = after;
        bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    let (value, rest) = rest.split_at_checked(len).ok_or(NameError("value past the end"))?;
    Ok((tag, value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_lengths() {
        assert_eq!(tlv(&[0x04, 0x02, 1, 2, 9]).unwrap(), (0x04, &[1u8, 2][..], &[9u8][..]));
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7u8, 256));
        let (_, v, rest) = tlv(&long).unwrap();
        assert_eq!((v.len(), rest.len()), (256, 0));
    }

    #[test]
    fn hostile_lengths_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            &[],
            &[0x30],
            &[0x30, 0x05, 1],
            &[0x30, 0x80],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF],
            &[0x1F, 0x01, 0x00],
        ];
        for c in cases {
            assert!(tlv(c).is_err(), "{c:?}");
            assert!(dns_names(c).is_err(), "{c:?}");
        }
        // Garbage of every length up to 64 bytes: never a panic.
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37) ^ 0x30).collect();
            let _ = dns_names(&junk);
        }
    }
}
