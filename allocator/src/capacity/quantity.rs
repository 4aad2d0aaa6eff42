//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `129e6`, `1k`) into
//! the ledger's units: CPU in milli-vCPU, memory in bytes, rounded up so a
//! request is never under-counted.

/// `s` as a CPU quantity in milli-vCPU.
pub fn milli_cpu(s: &str) -> Option<u64> {
    scaled(s, 3)
}

/// `s` as a memory quantity in bytes.
pub fn bytes(s: &str) -> Option<u64> {
    scaled(s, 0)
}

/// The quantity times 10^`extra`, rounded up; `None` if it is not a
/// quantity, negative, or beyond u64.
fn scaled(s: &str, extra: i32) -> Option<u64> {
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
    let exp = pow10 + extra - frac.len() as i32;
    let value = mantissa.checked_mul(1u128.checked_shl(pow2)?)?;
    let out = if exp >= 0 {
        value.checked_mul(10u128.checked_pow(exp as u32)?)?
    } else {
        value.div_ceil(10u128.checked_pow(exp.unsigned_abs())?)
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
    fn not_quantities() {
        for q in ["", "Gi", "-1", "1.2.3", "1 Gi", "1GB", "1e", "16Ei", "1e99", "."] {
            assert_eq!(bytes(q), None, "{q}");
        }
    }
}
