//! Durations as the whole milliseconds the protocol, the state dumps and the
//! reports count in.

use std::time::Duration;

/// `d` in whole milliseconds, `u64::MAX` past 584 million years (a u128
/// would otherwise be truncated silently).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn saturates() {
        assert_eq!(super::millis(std::time::Duration::from_micros(2_500)), 2);
        assert_eq!(super::millis(std::time::Duration::MAX), u64::MAX);
    }
}
