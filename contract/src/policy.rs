//! A VM's scaling policy: every threshold the agent's core decides with, and
//! their one validation. Part of the contract because a pod's
//! `vmscale.io/policy` annotation overrides these fields, and the scheduler
//! extender must refuse exactly the policies the agent would (it places a
//! pod only if the agent will scale it). The agent's node config carries the
//! same type as `[policy]`.

use crate::pressure::PressureKinds;
use serde::{Deserialize, Serialize};

/// The longest `cpu_settle_ms` taken, ms (10 minutes): longer is almost
/// surely a unit slip (µs for ms), and would leave a VM deaf to CPU pressure
/// after every downscale.
pub const MAX_CPU_SETTLE_MS: u64 = 600_000;

/// Scaling policy for one VM. Every threshold is configurable; defaults are in
/// `Default` and documented on each field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// CPU use (1-minute load per vCPU of the goal) the goal aims at. Default 0.7.
    pub cpu_target: f64,
    /// Memory use (workload memory / VM memory) the goal aims at. Default 0.75.
    pub memory_target: f64,
    /// On a memory pressure event (reclaim, PSI, memory.high), grow by this
    /// fraction of the current size, at least one CU. Default 0.5.
    pub pressure_growth: f64,
    /// On an OOM event (victim chosen, memory.max hit), grow by this fraction,
    /// at least two CUs. Default 1.0 (double).
    pub oom_growth: f64,
    /// CUs the first plug of an upscale adds; the rest of the growth is
    /// plugged right after it, before the informant is told. The guest
    /// onlines the first block while QEMU is not yet busy adding the others
    /// (each `device_add` holds QEMU's big lock, which the guest's ACPI
    /// accesses wait for), so relief does not queue behind a whole batch.
    /// 0 plugs the whole growth in one operation. Default 1. (`u16`: every
    /// VM spec carries a policy; a `u32` here would make each one larger.)
    pub first_plug_cus: u16,
    /// How long a pressure-raised goal holds before samples may lower it, ms. Default 30000.
    pub pressure_hold_ms: u64,
    /// Use must stay below the current size this long before a downscale, ms. Default 60000.
    pub downscale_after_ms: u64,
    /// Between two downscale steps while use stays low, ms. Default 10000.
    pub downscale_step_ms: u64,
    /// After the VM gives up a vCPU, CPU pressure is not taken as a reason to
    /// grow for this long, ms: the vCPU's tasks crowd onto the others for a
    /// moment, and growing on that echo would undo the downscale at once
    /// (seen under TCG). The informant's load-average samples still raise the
    /// CPU goal meanwhile. 0 turns it off. At most [`MAX_CPU_SETTLE_MS`].
    /// Default 10000.
    pub cpu_settle_ms: u64,
    /// After the allocator denies an increase, wait this long before asking again, ms. Default 2000.
    pub denied_cooldown_ms: u64,
    /// After the informant denies a downscale, wait this long, ms. Default 30000.
    pub downscale_denied_cooldown_ms: u64,
    /// First retry delay after a failed call, doubled per failure, ms. Default 200.
    pub retry_base_ms: u64,
    /// Longest retry delay, ms. Default 30000.
    pub retry_max_ms: u64,
    /// An operation not answered in this long counts as failed, ms. Default 15000.
    pub op_timeout_ms: u64,
    /// Samples older than this are not used for the goal, ms. Default 10000.
    pub sample_max_age_ms: u64,
    /// Failures in a row after which the VM is reported stuck. Default 5.
    pub stuck_after_failures: u32,
    /// Cap the QEMU process's CPU time at the VM's CPU size with cgroup CFS
    /// bandwidth (`cpu.max`, or v1 `cpu.cfs_quota_us`) whenever that size has
    /// a fractional vCPU, e.g. 750 milli-vCPU: one vCPU online, 75 ms per
    /// 100 ms. Whole vCPUs lift the cap. QEMU must run in a cgroup of its own
    /// (see the agent's `vm_loop/cpu_max.rs`). Default false. A node setting
    /// ([`NODE_ONLY_FIELDS`]): it has the agent write into QEMU's cgroup.
    pub cpu_max_cgroup: bool,
    /// `[policy.polling]`: decide like Neon's autoscaler, from averaged samples
    /// once per loop interval, ignoring pressure events (the agent's `core::polling`).
    /// The core applies it: it averages the samples and ignores the events.
    /// For comparison benchmarks. Default none: event-driven.
    /// Boxed: a VM's spec carries its policy, and this rarely used option
    /// should not make every spec larger (`ignore_pressure` is a bit set for
    /// the same reason).
    pub polling: Option<Box<Polling>>,
    /// Pressure event kinds the VM counts but does not act on, by their
    /// wire names without `KIND_`, lower case (e.g. `["psi_cpu"]`: under TCG
    /// CPU pressure alone grows a VM by whole CUs, memory included, which
    /// hides how fast memory signals are), or `unknown` for kinds this agent
    /// does not know. See [`crate::pressure::PressureKind::name`]; other
    /// names are refused when the policy is parsed. Default none.
    pub ignore_pressure: PressureKinds,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cpu_target: 0.7,
            memory_target: 0.75,
            pressure_growth: 0.5,
            oom_growth: 1.0,
            first_plug_cus: 1,
            pressure_hold_ms: 30_000,
            downscale_after_ms: 60_000,
            downscale_step_ms: 10_000,
            cpu_settle_ms: 10_000,
            denied_cooldown_ms: 2_000,
            downscale_denied_cooldown_ms: 30_000,
            retry_base_ms: 200,
            retry_max_ms: 30_000,
            op_timeout_ms: 15_000,
            sample_max_age_ms: 10_000,
            stuck_after_failures: 5,
            cpu_max_cgroup: false,
            polling: None,
            ignore_pressure: PressureKinds::default(),
        }
    }
}

/// Fields only the node's `[policy]` sets: a VM's own policy (a pod's
/// `vmscale.io/policy`) may not, and [`Policy::for_vm`] takes them from the
/// node. `cpu_max_cgroup` has the agent, as root, write into the cgroup of
/// the VM's QEMU: the node's decision, not the VM owner's.
pub const NODE_ONLY_FIELDS: [&str; 1] = ["cpu_max_cgroup"];

impl Policy {
    /// The policy a VM runs with: its own if it has one, else the node's;
    /// the [`NODE_ONLY_FIELDS`] always the node's.
    pub fn for_vm(own: Option<&Policy>, node: &Policy) -> Policy {
        let mut p = own.unwrap_or(node).clone();
        p.cpu_max_cgroup = node.cpu_max_cgroup;
        p
    }

    pub fn validate(&self) -> Result<(), String> {
        let frac = |name: &str, v: f64| {
            if v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(format!("{name} = {v} must be in (0, 1]"))
            }
        };
        frac("cpu_target", self.cpu_target)?;
        frac("memory_target", self.memory_target)?;
        if !(self.pressure_growth >= 0.0 && self.oom_growth >= 0.0) {
            return Err("pressure_growth and oom_growth must be >= 0".into());
        }
        if self.retry_base_ms == 0 || self.retry_max_ms < self.retry_base_ms {
            return Err("retry_base_ms must be > 0 and <= retry_max_ms".into());
        }
        if self.op_timeout_ms == 0 {
            return Err("op_timeout_ms must be > 0".into());
        }
        if self.cpu_settle_ms > MAX_CPU_SETTLE_MS {
            return Err(format!(
                "cpu_settle_ms = {} is over {MAX_CPU_SETTLE_MS} (10 minutes); it is in milliseconds",
                self.cpu_settle_ms
            ));
        }
        if let Some(p) = &self.polling {
            p.validate(self.sample_max_age_ms)?;
        }
        Ok(())
    }
}

/// `[policy.polling]`: present means polling-only. The sample period is the
/// informant's (`--sample-interval-ms`, e.g. 100); it does not come through
/// the handshake, so the loop logs how many samples each average held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Polling {
    /// How often the loop hands the core a sample, ms. Default 5000 (Neon's
    /// agent reads the VM's metrics every 5 s).
    pub loop_interval_ms: u64,
    /// The window the samples are averaged over, ending at the loop's tick,
    /// ms. Default 500 (Neon's monitor decides on a 500 ms average).
    pub sample_average_ms: u64,
}

impl Default for Polling {
    fn default() -> Self {
        Polling { loop_interval_ms: 5000, sample_average_ms: 500 }
    }
}

impl Polling {
    /// `sample_max_age_ms` is the policy's: the core ignores an average older
    /// than that, so a longer loop interval would leave it blind between ticks.
    pub fn validate(&self, sample_max_age_ms: u64) -> Result<(), String> {
        if self.loop_interval_ms == 0 || self.sample_average_ms == 0 {
            return Err("polling: loop_interval_ms and sample_average_ms must be > 0".into());
        }
        if self.loop_interval_ms > sample_max_age_ms {
            return Err(format!(
                "polling: loop_interval_ms = {} exceeds sample_max_age_ms = {sample_max_age_ms}; the \
                 core would drop each average before the next one came",
                self.loop_interval_ms
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod node_only_tests {
    use super::*;

    #[test]
    fn node_only_fields_come_from_the_node() {
        let node = Policy { cpu_max_cgroup: false, cpu_target: 0.6, ..Policy::default() };
        let own = Policy { cpu_max_cgroup: true, cpu_target: 0.5, ..Policy::default() };
        let p = Policy::for_vm(Some(&own), &node);
        assert_eq!((p.cpu_target, p.cpu_max_cgroup), (0.5, false));
        let node = Policy { cpu_max_cgroup: true, ..node };
        let p = Policy::for_vm(Some(&Policy::default()), &node);
        assert!(p.cpu_max_cgroup, "the node's setting holds for a VM with a policy of its own");
        assert_eq!(Policy::for_vm(None, &node), node);
    }
}
