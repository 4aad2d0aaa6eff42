//! Typed resource amounts. CPU is counted in milli-vCPU and memory in bytes on the
//! wire and in the ledger; compute units only ever appear as a step size.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest CPU amount accepted from anyone: one million vCPUs. Anything above is
/// a unit mix-up (vCPU vs milli-vCPU, bytes vs KiB), not a real machine.
pub const MAX_MILLI_CPU: u64 = 1_000_000 * 1000;
/// Largest memory amount accepted from anyone: 1 PiB.
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;

/// An amount of CPU and memory. Every value that enters the core has passed
/// [`Resources::checked`] (at most 2^50), and the core keeps at most
/// `max_nodes` x `max_vms_per_node` of them (about 2^23 by default), so no sum
/// of them reaches 2^64. Sums and differences saturate all the same, by
/// design ([`Resources::saturating_add`], [`Resources::saturating_sub`]): a
/// second guard that can only over-count room as taken, never wrap it free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    pub milli_cpu: u64,
    pub memory_bytes: u64,
}

/// A value that is not a plausible amount of CPU or memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {value} {unit} is beyond the limit of {limit} {unit}; check the units (milli-vCPU, bytes)")]
pub struct AbsurdAmount {
    pub what: String,
    pub value: u64,
    pub unit: &'static str,
    pub limit: u64,
}

impl Resources {
    pub const ZERO: Resources = Resources { milli_cpu: 0, memory_bytes: 0 };

    pub const fn new(milli_cpu: u64, memory_bytes: u64) -> Self {
        Resources { milli_cpu, memory_bytes }
    }

    /// Rejects amounts no machine has, naming the field `what` in the error.
    pub fn checked(self, what: &str) -> Result<Self, AbsurdAmount> {
        if self.milli_cpu > MAX_MILLI_CPU {
            return Err(AbsurdAmount {
                what: format!("{what} cpu"),
                value: self.milli_cpu,
                unit: "milli-vCPU",
                limit: MAX_MILLI_CPU,
            });
        }
        if self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(AbsurdAmount {
                what: format!("{what} memory"),
                value: self.memory_bytes,
                unit: "bytes",
                limit: MAX_MEMORY_BYTES,
            });
        }
        Ok(self)
    }

    /// True when every dimension of `self` is at most the same dimension of `other`.
    pub fn fits_in(self, other: Resources) -> bool {
        self.milli_cpu <= other.milli_cpu && self.memory_bytes <= other.memory_bytes
    }

    pub fn is_zero(self) -> bool {
        self == Resources::ZERO
    }

    pub fn saturating_add(self, o: Resources) -> Resources {
        Resources::new(
            self.milli_cpu.saturating_add(o.milli_cpu),
            self.memory_bytes.saturating_add(o.memory_bytes),
        )
    }

    pub fn saturating_sub(self, o: Resources) -> Resources {
        Resources::new(
            self.milli_cpu.saturating_sub(o.milli_cpu),
            self.memory_bytes.saturating_sub(o.memory_bytes),
        )
    }

    pub fn max(self, o: Resources) -> Resources {
        Resources::new(self.milli_cpu.max(o.milli_cpu), self.memory_bytes.max(o.memory_bytes))
    }

    pub fn min(self, o: Resources) -> Resources {
        Resources::new(self.milli_cpu.min(o.milli_cpu), self.memory_bytes.min(o.memory_bytes))
    }

    /// Each dimension scaled by `f` (a watermark fraction), rounded down.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn scaled(self, f: f64) -> Resources {
        // Amounts are at most 2^50, exactly representable in f64.
        Resources::new((self.milli_cpu as f64 * f) as u64, (self.memory_bytes as f64 * f) as u64)
    }

    /// The larger of the two fractions `self / of`, dimension by dimension; a
    /// zero-sized `of` dimension counts as full when `self` has any of it.
    pub fn max_fraction_of(self, of: Resources) -> f64 {
        let frac = |a: u64, b: u64| {
            if b == 0 {
                if a == 0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                a as f64 / b as f64
            }
        };
        frac(self.milli_cpu, of.milli_cpu).max(frac(self.memory_bytes, of.memory_bytes))
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} mCPU + {} MiB", self.milli_cpu, self.memory_bytes >> 20)
    }
}

/// The step in which increases are granted, e.g. 250 milli-vCPU + 1 GiB.
/// Both dimensions are non-zero: a CU of zero would make "whole CUs" meaningless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeUnit(Resources);

impl ComputeUnit {
    pub fn new(r: Resources) -> Result<Self, String> {
        if r.milli_cpu == 0 || r.memory_bytes == 0 {
            return Err(format!(
                "compute unit {r} has a zero dimension; state both cpu and memory (e.g. 250 mCPU + 1 GiB)"
            ));
        }
        // A CU above 1024 vCPU or 4 TiB is a unit mix-up rather than a policy.
        if r.milli_cpu > 1024 * 1000 || r.memory_bytes > 4 << 40 {
            return Err(format!("compute unit {r} is absurdly large; check the units (milli-vCPU, bytes)"));
        }
        Ok(ComputeUnit(r))
    }

    pub fn get(self) -> Resources {
        self.0
    }

    /// How many whole steps it takes to cover `delta` in every dimension.
    pub fn steps_to_cover(self, delta: Resources) -> u64 {
        delta.milli_cpu.div_ceil(self.0.milli_cpu).max(delta.memory_bytes.div_ceil(self.0.memory_bytes))
    }

    /// `k` steps, each dimension capped at `cap`.
    pub fn steps_capped(self, k: u64, cap: Resources) -> Resources {
        Resources::new(
            k.saturating_mul(self.0.milli_cpu).min(cap.milli_cpu),
            k.saturating_mul(self.0.memory_bytes).min(cap.memory_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn absurd_amounts_are_rejected_with_units_named() {
        let e = Resources::new(MAX_MILLI_CPU + 1, 0).checked("target").unwrap_err();
        assert!(e.to_string().contains("milli-vCPU"), "{e}");
        let e = Resources::new(0, u64::MAX).checked("target").unwrap_err();
        assert!(e.to_string().contains("target memory"), "{e}");
        assert!(Resources::new(MAX_MILLI_CPU, MAX_MEMORY_BYTES).checked("x").is_ok());
    }

    #[test]
    fn compute_unit_rejects_zero_and_absurd() {
        assert!(ComputeUnit::new(Resources::new(0, GIB)).is_err());
        assert!(ComputeUnit::new(Resources::new(250, 0)).is_err());
        assert!(ComputeUnit::new(Resources::new(250, 8 << 40)).is_err());
        assert!(ComputeUnit::new(Resources::new(250, GIB)).is_ok());
    }

    #[test]
    fn steps_round_up_in_the_larger_dimension() {
        let cu = ComputeUnit::new(Resources::new(250, GIB)).unwrap();
        assert_eq!(cu.steps_to_cover(Resources::ZERO), 0);
        assert_eq!(cu.steps_to_cover(Resources::new(1, 0)), 1);
        assert_eq!(cu.steps_to_cover(Resources::new(500, 3 * GIB + 1)), 4);
        assert_eq!(cu.steps_capped(3, Resources::new(600, 10 * GIB)), Resources::new(600, 3 * GIB));
    }

    #[test]
    fn fractions_and_fit() {
        let cap = Resources::new(1000, 10 * GIB);
        assert!(Resources::new(1000, 10 * GIB).fits_in(cap));
        assert!(!Resources::new(1001, 0).fits_in(cap));
        assert_eq!(Resources::new(500, 9 * GIB).max_fraction_of(cap), 0.9);
        assert_eq!(Resources::new(1, 0).max_fraction_of(Resources::ZERO), f64::INFINITY);
        assert_eq!(cap.scaled(0.5), Resources::new(500, 5 * GIB));
    }
}
