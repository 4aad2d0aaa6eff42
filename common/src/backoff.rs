//! Exponential backoff with jitter, as a pure function of the failure count
//! and a seed, so that decision cores stay deterministic in tests and a
//! fleet of agents does not retry in the same millisecond (protocol rule 7).

use std::time::Duration;

/// `base` after the first failure, doubled after each further one, never
/// more than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

/// Doublings past this change nothing that `max` would not cap anyway, and
/// keep `1 << n` far from overflow.
const MAX_DOUBLINGS: u32 = 20;

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max }
    }

    pub const fn from_ms(base_ms: u64, max_ms: u64) -> Backoff {
        Backoff { base: Duration::from_millis(base_ms), max: Duration::from_millis(max_ms) }
    }

    /// The wait after `failures` failures in a row, without jitter; zero
    /// failures wait nothing.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(MAX_DOUBLINGS);
        self.base.saturating_mul(1 << doublings).min(self.max)
    }

    /// [`delay`](Self::delay) less up to a quarter, chosen by `seed` (the
    /// same seed, the same wait).
    pub fn jittered(&self, failures: u32, seed: u64) -> Duration {
        let d = self.delay(failures);
        let fraction = (mix(seed ^ u64::from(failures)) % 1000) as f64 / 1000.0;
        d.saturating_sub((d / 4).mul_f64(fraction))
    }

    /// [`delay`](Self::delay) in whole milliseconds, for cores that count
    /// time in `u64` milliseconds.
    pub fn delay_ms(&self, failures: u32) -> u64 {
        u64::try_from(self.delay(failures).as_millis()).unwrap_or(u64::MAX)
    }
}

/// A seed for [`Backoff::jittered`] from a name (a VM or node id): stable
/// for one name, different across names (FNV-1a).
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// A seed from the clock, for I/O shells that have no name to hash.
pub fn clock_seed() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    #[allow(clippy::cast_possible_truncation)] // the low 64 bits are the seed
    let seed = nanos as u64;
    seed
}

/// splitmix64's finaliser: spreads neighbouring seeds over the whole range.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff::from_ms(100, 5_000);

    #[test]
    fn doubles_from_base_and_stops_at_max() {
        let ms = |n| B.delay_ms(n);
        assert_eq!([ms(0), ms(1), ms(2), ms(3), ms(6), ms(7)], [0, 100, 200, 400, 3_200, 5_000]);
        assert_eq!(B.delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_takes_at_most_a_quarter_and_follows_the_seed() {
        for seed in 0..200 {
            let j = B.jittered(3, seed);
            assert!(j <= Duration::from_millis(400) && j >= Duration::from_millis(300), "{j:?}");
            assert_eq!(j, B.jittered(3, seed));
        }
        let distinct: std::collections::BTreeSet<_> = (0..50).map(|s| B.jittered(3, s)).collect();
        assert!(distinct.len() > 10, "seeds should spread the waits: {distinct:?}");
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.delay(40), Duration::MAX);
        assert_eq!(huge.delay_ms(40), u64::MAX);
    }

    #[test]
    fn names_seed_differently() {
        assert_ne!(seed_of("vm-a"), seed_of("vm-b"));
        assert_eq!(seed_of("vm-a"), seed_of("vm-a"));
    }
}
