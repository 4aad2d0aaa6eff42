//! Percentiles, one definition for every benchmark and test that reports
//! them: the nearest rank (the smallest sample with at least `q` of the
//! samples at or below it), so a p99 is always a value that was measured.

/// The index, in `n` sorted samples, of the `q`-quantile (`q` in 0..=1);
/// `None` when there are no samples.
pub fn nearest_rank(n: usize, q: f64) -> Option<usize> {
    if n == 0 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    // n is a sample count (far below 2^52); the product is clamped into 1..=n.
    let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
    Some(rank - 1)
}

/// The `q`-quantile of `samples`, which it sorts; `None` when empty.
pub fn quantile<T: Copy + PartialOrd>(samples: &mut [T], q: f64) -> Option<T> {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    nearest_rank(samples.len(), q).map(|i| samples[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_is_a_measured_sample() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(quantile(&mut v, 0.5), Some(50));
        assert_eq!(quantile(&mut v, 0.99), Some(99));
        assert_eq!(quantile(&mut v, 1.0), Some(100));
        assert_eq!(quantile(&mut v, 0.0), Some(1));
        assert_eq!(quantile(&mut [7.5], 0.99), Some(7.5));
        assert_eq!(quantile::<u8>(&mut [], 0.5), None);
        assert_eq!(nearest_rank(3, 2.0), Some(2), "q is clamped");
    }
}
