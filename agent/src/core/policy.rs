//! How many compute units a VM should have, from what the guest reports.
//! Pure arithmetic; the state machine in `vm.rs` decides when to act on it.

use serde::{Deserialize, Serialize};
pub use vmscale_contract::policy::{Policy, MAX_CPU_SETTLE_MS};

/// A compute unit: the step in which a VM grows and shrinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cu {
    pub milli_cpu: u64,
    pub memory_bytes: u64,
}

/// A VM size in CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Size {
    pub milli_cpu: u64,
    pub memory_bytes: u64,
}

impl Size {
    pub const fn new(milli_cpu: u64, memory_bytes: u64) -> Self {
        Size { milli_cpu, memory_bytes }
    }

    /// `n` compute units. Saturating by design: a VM's spec is validated
    /// so that its largest size fits (`VmSpec::validate`), so this only
    /// saturates for values no spec lets through.
    pub fn of_cus(n: u32, cu: Cu) -> Size {
        let n = u64::from(n);
        Size::new(n.saturating_mul(cu.milli_cpu), n.saturating_mul(cu.memory_bytes))
    }

    /// Whole compute units this size holds in both dimensions (rounded down).
    pub fn whole_cus(self, cu: Cu) -> u32 {
        let n = (self.milli_cpu / cu.milli_cpu).min(self.memory_bytes / cu.memory_bytes);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    pub fn fits_in(self, o: Size) -> bool {
        self.milli_cpu <= o.milli_cpu && self.memory_bytes <= o.memory_bytes
    }

    pub fn max(self, o: Size) -> Size {
        Size::new(self.milli_cpu.max(o.milli_cpu), self.memory_bytes.max(o.memory_bytes))
    }

    pub fn min(self, o: Size) -> Size {
        Size::new(self.milli_cpu.min(o.milli_cpu), self.memory_bytes.min(o.memory_bytes))
    }
}

/// vCPUs needed for a CPU amount: fractions round up (the fraction itself is
/// enforced by the QEMU process's `cpu.max`, where configured).
pub fn vcpus_for(milli_cpu: u64) -> u32 {
    u32::try_from(milli_cpu.div_ceil(1000)).unwrap_or(u32::MAX).max(1)
}

/// What the guest reported last.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Usage {
    /// 1-minute load average (runnable tasks).
    pub load_avg_1: f64,
    /// Memory the workload holds, bytes.
    pub memory_used_bytes: u64,
}

/// CUs the usage calls for: enough that load per CPU and memory use sit at
/// their targets. `memory_overhead_bytes` is the part of the VM's memory the
/// guest never gets to use (QEMU's size less the guest's `MemTotal`): the
/// target applies to what the guest has, so the VM needs that much on top.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn cus_for_usage(u: Usage, memory_overhead_bytes: u64, cu: Cu, p: &Policy) -> u32 {
    let cpu_milli = (u.load_avg_1.max(0.0) / p.cpu_target * 1000.0).ceil();
    let cpu_cus = (cpu_milli / cu.milli_cpu as f64).ceil();
    let mem_bytes = (u.memory_used_bytes as f64 / p.memory_target).ceil() + memory_overhead_bytes as f64;
    let mem_cus = (mem_bytes / cu.memory_bytes as f64).ceil();
    // f64 -> u32 saturates; NaN becomes 0.
    cpu_cus.max(mem_cus).min(f64::from(u32::MAX)) as u32
}

/// CUs to add at once for a pressure event of this severity.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn cus_for_pressure(current_cus: u32, oom: bool, p: &Policy) -> u32 {
    let (growth, least) = if oom { (p.oom_growth, 2) } else { (p.pressure_growth, 1) };
    let more = (f64::from(current_cus) * growth).ceil().min(f64::from(u32::MAX)) as u32;
    current_cus.saturating_add(more.max(least))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const CU: Cu = Cu { milli_cpu: 250, memory_bytes: GIB };

    #[test]
    fn usage_table() {
        let p = Policy::default();
        let cases = [
            // (load, used) -> cus
            (0.0, 0, 0),
            (0.7, 0, 4),           // 1 vCPU at 70% target = 4 x 250 mCPU
            (0.0, 3 * GIB, 4),     // 3 GiB / 0.75 = 4 GiB
            (0.0, 3 * GIB + 1, 5), // just over -> round up
            (1.4, 6 * GIB, 8),     // both call for 8
            (0.1, 10 * GIB, 14),   // memory dominates
            (f64::NAN, 0, 0),      // garbage in, no growth out
        ];
        for (load, used, want) in cases {
            let u = Usage { load_avg_1: load, memory_used_bytes: used };
            assert_eq!(cus_for_usage(u, 0, CU, &p), want, "load {load}, used {used}");
        }
    }

    #[test]
    fn memory_the_guest_never_sees_is_added_on_top() {
        let p = Policy::default();
        let cu = Cu { milli_cpu: 125, memory_bytes: 128 << 20 };
        // 200 MiB used in a 512 MiB VM whose guest sees 392 MiB: 200 / 0.75
        // = 267 MiB fits 3 CUs of QEMU's memory (384 MiB), but of those the
        // guest would see only 264; it needs 267 + 120 = 387 MiB: 4 CUs.
        let u = Usage { load_avg_1: 0.0, memory_used_bytes: 200 << 20 };
        assert_eq!(cus_for_usage(u, 0, cu, &p), 3);
        assert_eq!(cus_for_usage(u, 120 << 20, cu, &p), 4);
    }

    #[test]
    fn pressure_growth() {
        let p = Policy::default();
        assert_eq!(cus_for_pressure(4, false, &p), 6);
        assert_eq!(cus_for_pressure(1, false, &p), 2);
        assert_eq!(cus_for_pressure(4, true, &p), 8);
        assert_eq!(cus_for_pressure(0, true, &p), 2);
        assert_eq!(cus_for_pressure(u32::MAX, true, &p), u32::MAX);
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::of_cus(3, CU), Size::new(750, 3 * GIB));
        assert_eq!(Size::new(800, 2 * GIB).whole_cus(CU), 2);
        assert!(Policy::default().validate().is_ok());
        assert!(Policy { memory_target: 0.0, ..Policy::default() }.validate().is_err());
    }

    #[test]
    fn vcpu_rounding() {
        assert_eq!(vcpus_for(0), 1);
        assert_eq!(vcpus_for(250), 1);
        assert_eq!(vcpus_for(1000), 1);
        assert_eq!(vcpus_for(1001), 2);
    }

    /// The node's policy and a VM's own (from a VM file or an annotation)
    /// meet the same checks, here.
    #[test]
    fn validation_names_the_field() {
        let bad = |p: Policy| p.validate().unwrap_err();
        let settle = Policy { cpu_settle_ms: MAX_CPU_SETTLE_MS + 1, ..Policy::default() };
        assert!(bad(settle).contains("cpu_settle_ms"));
        assert!(Policy { cpu_settle_ms: 0, ..Policy::default() }.validate().is_ok());
        // Kinds to ignore are checked as they are parsed, from any source.
        let ignore = |k: &str| toml::from_str::<Policy>(&format!("ignore_pressure = [{k:?}]"));
        assert!(ignore("psi_cpu").is_ok());
        assert!(ignore("unknown").is_ok(), "unknown kinds can be ignored too");
        assert!(ignore("PSI_CPU").unwrap_err().to_string().contains("no pressure kind"));
        assert!(ignore("13").unwrap_err().to_string().contains("no pressure kind"));
        let polling = |loop_interval_ms| Policy {
            polling: Some(Box::new(crate::core::polling::Polling {
                loop_interval_ms,
                sample_average_ms: 500,
            })),
            ..Policy::default()
        };
        assert!(polling(5000).validate().is_ok());
        assert!(bad(polling(20_000)).contains("sample_max_age_ms"));
        assert!(bad(polling(0)).contains("loop_interval_ms"));
    }
}
