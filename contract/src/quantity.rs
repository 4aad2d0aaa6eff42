//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `129e6`, `1k`) into
//! the ledger's units: CPU in milli-vCPU, memory in bytes. A pod's requests
//! are rounded up so they are never under-counted; a VM's sizes in its
//! annotations must be whole bytes ([`whole_bytes`]), since a size rounded
//! behind its author's back is a unit slip nobody sees.

/// `s` as a CPU quantity in milli-vCPU.
pub fn milli_cpu(s: &str) -> Option<u64> {
    scaled(s, 3)
}

/// `s` as a memory quantity in bytes, rounded up.
pub fn bytes(s: &str) -> Option<u64> {
    scaled(s, 0)
}

/// `s` as a memory quantity that is a whole number of bytes (`1.5Gi`, `129e6`;
/// not `500m` or `1.5`).
pub fn whole_bytes(s: &str) -> Option<u64> {
    let rounded = bytes(s)?;
    // Rounding up changed nothing exactly when a tiny bit less rounds to less.
    (scaled_by(s, 0, false)? == rounded).then_some(rounded)
}

/// Whether `s` ends in a decimal suffix (`k`, `M`, `G`, `T`, `P`, `E`) or an
/// exponent: powers of 1000, where memory is mostly meant in powers of 1024.
pub fn is_decimal(s: &str) -> bool {
    let s = s.trim();
    let suffix = s.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
    let exponent = suffix.strip_prefix(['e', 'E']).is_some_and(|e| e.parse::<i32>().is_ok());
    matches!(suffix, "k" | "M" | "G" | "T" | "P" | "E") || exponent
}

/// The quantity times 10^`extra`, rounded up; `None` if it is not a
/// quantity, negative, or beyond u64.
fn scaled(s: &str, extra: i32) -> Option<u64> {
    scaled_by(s, extra, true)
}

/// Like [`scaled`], rounding up or down.
fn scaled_by(s: &str, extra: i32, up: bool) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    let digits = format!("{whole}{frac}");
    let mantissa: u128 = digits.parse().ok()?;
    let (pow2, pow10) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        e if e.starts_with(['e', 'E']) => (0, e[1..].parse::<i32>().ok().filter(|x| x.abs() <= 30)?),
        _ => return None,
    };
    let exp = pow10.checked_add(extra)?.checked_sub(i32::try_from(frac.len()).ok()?)?;
    let value = mantissa.checked_mul(1u128.checked_shl(pow2)?)?;
    let out = if exp >= 0 {
        value.checked_mul(10u128.checked_pow(u32::try_from(exp).ok()?)?)?
    } else {
        let divisor = 10u128.checked_pow(exp.unsigned_abs())?;
        if up {
            value.div_ceil(divisor)
        } else {
            value / divisor
        }
    };
    u64::try_from(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        for (q, want) in [
            ("2", 2000),
            ("500m", 500),
            ("0.5", 500),
            ("1.25", 1250),
            ("100u", 1),
            ("1500000n", 2),
            ("1k", 1_000_000),
            ("2e-3", 2),
            ("0", 0),
        ] {
            assert_eq!(milli_cpu(q), Some(want), "{q}");
        }
    }

    #[test]
    fn memory() {
        for (q, want) in [
            ("1Gi", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("128974848", 128_974_848),
            ("129e6", 129_000_000),
            ("129M", 129_000_000),
            ("123Mi", 123 << 20),
            ("1E", 1_000_000_000_000_000_000),
            ("1k", 1000),
            ("1Ki", 1024),
            ("500m", 1),
        ] {
            assert_eq!(bytes(q), Some(want), "{q}");
        }
    }

    #[test]
    fn whole_bytes_only() {
        for (q, want) in [("1.5Gi", Some(3 << 29)), ("129e6", Some(129_000_000)), ("1G", Some(1_000_000_000))]
        {
            assert_eq!(whole_bytes(q), want, "{q}");
        }
        for q in ["500m", "1.5", "0.1Ki", "1e-3", "lots"] {
            assert_eq!(whole_bytes(q), None, "{q}");
        }
    }

    #[test]
    fn decimal_suffixes() {
        for q in ["1G", "129M", "1k", "129e6", "1.5T"] {
            assert!(is_decimal(q), "{q}");
        }
        for q in ["1Gi", "1024", "256Mi", "1.5Gi", "1Ei"] {
            assert!(!is_decimal(q), "{q}");
        }
    }

    #[test]
    fn not_quantities() {
        for q in ["", "Gi", "-1", "1.2.3", "1 Gi", "1GB", "1e", "16Ei", "1e99", "."] {
            assert_eq!(bytes(q), None, "{q}");
        }
    }
}
