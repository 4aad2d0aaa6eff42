//! The one stream every source feeds: typed events with their source and the
//! guest's CLOCK_MONOTONIC time (the same clock eBPF's `bpf_ktime_get_ns` uses,
//! so kernel timestamps and user-space timestamps compare directly).

use serde::Serialize;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// eBPF tracepoints: reclaim, kswapd, OOM victim.
    Ebpf,
    /// PSI triggers on /proc/pressure/* and the workload cgroup's memory.pressure.
    Psi,
    /// cgroup v2 memory.events counters (high, max, oom, oom_kill).
    CgroupEvents,
    /// The periodic sampler.
    Sampler,
    /// Use passing the watermark (`watermark.rs`).
    Watermark,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Ebpf => "ebpf",
            SourceKind::Psi => "psi",
            SourceKind::CgroupEvents => "cgroup_events",
            SourceKind::Sampler => "sampler",
            SourceKind::Watermark => "watermark",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PressureKind {
    DirectReclaim,
    MemcgReclaim,
    KswapdWake,
    OomVictim,
    PsiMemory,
    PsiCpu,
    PsiCgroupMemory,
    CgroupHigh,
    CgroupMax,
    CgroupOom,
    CgroupOomKill,
    /// Use passed the informant's watermark: no shortage yet.
    UsageWatermark,
}

impl PressureKind {
    pub fn name(self) -> &'static str {
        match self {
            PressureKind::DirectReclaim => "direct_reclaim",
            PressureKind::MemcgReclaim => "memcg_reclaim",
            PressureKind::KswapdWake => "kswapd_wake",
            PressureKind::OomVictim => "oom_victim",
            PressureKind::PsiMemory => "psi_memory",
            PressureKind::PsiCpu => "psi_cpu",
            PressureKind::PsiCgroupMemory => "psi_cgroup_memory",
            PressureKind::CgroupHigh => "cgroup_high",
            PressureKind::CgroupMax => "cgroup_max",
            PressureKind::CgroupOom => "cgroup_oom",
            PressureKind::CgroupOomKill => "cgroup_oom_kill",
            PressureKind::UsageWatermark => "usage_watermark",
        }
    }

    /// Pressure on CPU rather than memory (every other kind is memory).
    pub fn is_cpu(self) -> bool {
        matches!(self, PressureKind::PsiCpu)
    }
}

/// Something that hurts or is about to hurt the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pressure {
    pub kind: PressureKind,
    /// Raw events folded into this one (in-kernel aggregation, counter deltas).
    pub count: u32,
    /// Stall time inside the aggregation window, where the source knows it.
    pub stall_ns: u64,
    /// The process concerned (OOM victim), 0 if none.
    pub pid: u32,
}

/// A periodic reading of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Sample {
    /// Anonymous memory of the workload cgroup (`memory.stat` anon), bytes.
    pub workload_anon_bytes: u64,
    pub mem_available_bytes: u64,
    pub mem_total_bytes: u64,
    pub online_cpus: u32,
    pub load_avg_1: f64,
    pub load_avg_5: f64,
    pub memory_some_avg10: f64,
    pub memory_full_avg10: f64,
    pub cpu_some_avg10: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventBody {
    Sample(Sample),
    Pressure(Pressure),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Event {
    /// CLOCK_MONOTONIC in ns when the source saw it; for eBPF events the
    /// kernel's own timestamp.
    pub monotonic_ns: u64,
    pub source: SourceKind,
    pub body: EventBody,
}

/// Now on CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(nanos)
        }
        // CLOCK_MONOTONIC always exists on Linux; 0 marks an impossible failure.
        Err(_) => 0,
    }
}
