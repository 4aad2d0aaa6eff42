//! Wire types and generated tonic code. Daemons convert these into their own
//! domain types at the edge (`TryFrom`), rejecting invalid values there.

/// Protocol versions this build speaks. Every session opens by intersecting ranges.
pub const ALLOCATOR_PROTOCOL: std::ops::RangeInclusive<u32> = 1..=1;
pub const INFORMANT_PROTOCOL: std::ops::RangeInclusive<u32> = 1..=1;

#[allow(missing_debug_implementations, clippy::all)]
pub mod allocator {
    tonic::include_proto!("vmscale.allocator.v1");
}

#[allow(missing_debug_implementations, clippy::all)]
pub mod migration {
    tonic::include_proto!("vmscale.migration.v1");
}

#[allow(missing_debug_implementations, clippy::all)]
pub mod informant {
    tonic::include_proto!("vmscale.informant.v1");
}

/// Picks the highest version both sides speak, or `None` when the ranges don't overlap.
pub fn negotiate(ours: &std::ops::RangeInclusive<u32>, min: u32, max: u32) -> Option<u32> {
    let hi = (*ours.end()).min(max);
    let lo = (*ours.start()).max(min);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(negotiate(&(1..=3), 2, 5), Some(3));
        assert_eq!(negotiate(&(1..=3), 1, 1), Some(1));
        assert_eq!(negotiate(&(1..=3), 4, 5), None);
        assert_eq!(negotiate(&(2..=3), 0, 1), None);
        // An inverted range from a confused peer never matches.
        assert_eq!(negotiate(&(1..=3), 3, 1), None);
    }
}
