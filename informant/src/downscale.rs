//! Whether the guest can give up CPUs or memory now: a pure function of what
//! the informant has observed and the clock, passed in. Deny when in doubt
//! (no stats, stale stats, recent pressure), with a reason a person can act on.

use crate::config::DownscaleConfig;
use crate::event::{Event, EventBody, PressureKind, Sample};

/// What the agent wants to shrink to; `None` leaves a resource as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownscaleTarget {
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
}

/// The newest of everything a decision looks at, kept up to date by the
/// fan-out as events pass. Times are CLOCK_MONOTONIC ns.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observations {
    pub last_sample: Option<(u64, Sample)>,
    pub last_memory_pressure: Option<(u64, PressureKind)>,
    pub last_cpu_pressure: Option<(u64, PressureKind)>,
}

impl Observations {
    pub fn observe(&mut self, ev: &Event) {
        let newer = |slot: Option<u64>| slot.is_none_or(|t| ev.monotonic_ns >= t);
        match ev.body {
            EventBody::Sample(s) => {
                if newer(self.last_sample.map(|x| x.0)) {
                    self.last_sample = Some((ev.monotonic_ns, s));
                }
            }
            EventBody::Pressure(p) => {
                let slot = if p.kind.is_cpu() {
                    &mut self.last_cpu_pressure
                } else {
                    &mut self.last_memory_pressure
                };
                if newer(slot.map(|x| x.0)) {
                    *slot = Some((ev.monotonic_ns, p.kind));
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub memory_buffer_bytes: u64,
    pub max_stats_age_ns: u64,
    pub pressure_cooldown_ns: u64,
}

impl From<&DownscaleConfig> for Policy {
    fn from(c: &DownscaleConfig) -> Self {
        Policy {
            memory_buffer_bytes: c.memory_buffer_bytes,
            max_stats_age_ns: c.max_stats_age_ms.saturating_mul(1_000_000),
            pressure_cooldown_ns: c.pressure_cooldown_ms.saturating_mul(1_000_000),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub approved: bool,
    pub reason: String,
}

fn deny(reason: String) -> Decision {
    Decision { approved: false, reason }
}

pub fn decide(target: &DownscaleTarget, obs: &Observations, policy: &Policy, now_ns: u64) -> Decision {
    let Some((at, sample)) = obs.last_sample else {
        return deny(
            "no stats yet: the informant has taken no sample since it started; retry in a few seconds, \
             and if this persists read the informant's log (its sampler may be unable to read /proc/meminfo)"
                .into(),
        );
    };
    let age = now_ns.saturating_sub(at);
    if age > policy.max_stats_age_ns {
        return deny(format!(
            "stats are stale: the last sample is {} old, past the {} limit; the informant's sampler may be \
             stuck, read its log",
            secs(age),
            secs(policy.max_stats_age_ns)
        ));
    }
    // Whether the memory fits comes first: it holds as long as the workload
    // does, and its reason says how much to ask for instead; a cooldown
    // only says when to ask again.
    let mut said = Vec::new();
    if let Some(want) = target.memory_bytes {
        let guest_used = sample.mem_total_bytes.saturating_sub(sample.mem_available_bytes);
        let (used, whose) = if sample.workload_anon_bytes >= guest_used {
            (sample.workload_anon_bytes, "workload anon memory")
        } else {
            (guest_used, "memory in use guest-wide (MemTotal - MemAvailable)")
        };
        let needed = used.saturating_add(policy.memory_buffer_bytes);
        if needed > want {
            return deny(format!(
                "{whose} is {} and the buffer {}, together {}, which does not fit in the {} target; \
                 ask for at least {}",
                bytes(used),
                bytes(policy.memory_buffer_bytes),
                bytes(needed),
                bytes(want),
                bytes(needed)
            ));
        }
        said.push(format!(
            "{whose} {} plus the {} buffer fits in {}",
            bytes(used),
            bytes(policy.memory_buffer_bytes),
            bytes(want)
        ));
    }
    let recent = |p: Option<(u64, PressureKind)>, what: &str| {
        let (t, kind) = p?;
        let ago = now_ns.saturating_sub(t);
        (ago < policy.pressure_cooldown_ns).then(|| {
            deny(format!(
                "{what} pressure ({}) {} ago, within the {} cooldown; retry in {}",
                kind.name(),
                secs(ago),
                secs(policy.pressure_cooldown_ns),
                secs(policy.pressure_cooldown_ns - ago)
            ))
        })
    };
    if target.memory_bytes.is_some() {
        if let Some(d) = recent(obs.last_memory_pressure, "memory") {
            return d;
        }
    }
    if target.cpus.is_some() {
        if let Some(d) = recent(obs.last_cpu_pressure, "CPU") {
            return d;
        }
    }
    if let Some(cpus) = target.cpus {
        said.push(format!("no CPU pressure within the cooldown, so {cpus} CPUs will do"));
    }
    Decision { approved: true, reason: format!("approved: {}", said.join("; ")) }
}

fn secs(ns: u64) -> String {
    format!("{:.1} s", ns as f64 / 1e9)
}

/// Bytes for people: MiB below 1 GiB, else GiB with two decimals.
pub fn bytes(b: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let f = b as f64;
    if f < GIB {
        format!("{:.0} MiB", f / MIB)
    } else {
        format!("{:.2} GiB", f / GIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Pressure, SourceKind};

    const S: u64 = 1_000_000_000;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn policy() -> Policy {
        Policy { memory_buffer_bytes: 256 * MIB, max_stats_age_ns: 5 * S, pressure_cooldown_ns: 60 * S }
    }

    fn sample(anon: u64, total: u64, available: u64) -> Sample {
        Sample {
            workload_anon_bytes: anon,
            mem_total_bytes: total,
            mem_available_bytes: available,
            ..Sample::default()
        }
    }

    fn obs(at: u64, s: Sample) -> Observations {
        Observations { last_sample: Some((at, s)), ..Observations::default() }
    }

    fn mem(b: u64) -> DownscaleTarget {
        DownscaleTarget { cpus: None, memory_bytes: Some(b) }
    }

    fn cpus(n: u32) -> DownscaleTarget {
        DownscaleTarget { cpus: Some(n), memory_bytes: None }
    }

    #[test]
    fn decision_table() {
        let now = 1000 * S;
        let fresh = obs(now - S, sample(GIB, 4 * GIB, 3 * GIB));
        let mem_pressure = |ago: u64| Observations {
            last_memory_pressure: Some((now - ago, PressureKind::PsiMemory)),
            ..fresh
        };
        let cpu_pressure =
            Observations { last_cpu_pressure: Some((now - 10 * S, PressureKind::PsiCpu)), ..fresh };
        // (name, target, observations, approved, words the reason must hold)
        let cases: Vec<(&str, DownscaleTarget, Observations, bool, &[&str])> = vec![
            ("no stats", mem(2 * GIB), Observations::default(), false, &["no stats yet", "retry"]),
            (
                "stale stats",
                mem(2 * GIB),
                obs(now - 6 * S, sample(0, GIB, GIB)),
                false,
                &["stale", "6.0 s old"],
            ),
            (
                "stats just fresh enough",
                mem(2 * GIB),
                obs(now - 5 * S, sample(GIB, 4 * GIB, 3 * GIB)),
                true,
                &[],
            ),
            ("fits with buffer", mem(2 * GIB), fresh, true, &["approved", "1.00 GiB", "256 MiB"]),
            ("exactly fits", mem(GIB + 256 * MIB), fresh, true, &["approved"]),
            (
                "one byte short",
                mem(GIB + 256 * MIB - 1),
                fresh,
                false,
                &["does not fit", "at least 1.25 GiB"],
            ),
            (
                "guest-wide use beats workload anon",
                mem(2 * GIB),
                obs(now, sample(GIB, 4 * GIB, 2 * GIB)),
                false,
                &["guest-wide", "2.00 GiB"],
            ),
            (
                "memory pressure 10 s ago",
                mem(2 * GIB),
                mem_pressure(10 * S),
                false,
                &["psi_memory", "retry in 50.0 s"],
            ),
            ("memory pressure long ago", mem(2 * GIB), mem_pressure(61 * S), true, &[]),
            ("memory pressure does not stop a CPU downscale", cpus(1), mem_pressure(S), true, &["1 CPUs"]),
            (
                "CPU pressure stops a CPU downscale",
                cpus(1),
                cpu_pressure,
                false,
                &["CPU pressure", "psi_cpu"],
            ),
            ("CPU pressure does not stop a memory downscale", mem(2 * GIB), cpu_pressure, true, &[]),
            (
                "both: the memory part decides",
                DownscaleTarget { cpus: Some(1), memory_bytes: Some(GIB) },
                fresh,
                false,
                &["does not fit"],
            ),
            ("CPU-only still needs stats", cpus(1), Observations::default(), false, &["no stats"]),
            (
                "memory that does not fit is named before recent CPU pressure",
                DownscaleTarget { cpus: Some(1), memory_bytes: Some(GIB) },
                cpu_pressure,
                false,
                &["does not fit", "at least"],
            ),
            (
                "memory that fits: recent CPU pressure still stops a joint downscale",
                DownscaleTarget { cpus: Some(1), memory_bytes: Some(2 * GIB) },
                cpu_pressure,
                false,
                &["CPU pressure"],
            ),
        ];
        for (name, target, o, approved, words) in cases {
            let d = decide(&target, &o, &policy(), now);
            assert_eq!(d.approved, approved, "{name}: {}", d.reason);
            for w in words {
                assert!(d.reason.contains(w), "{name}: `{}` lacks `{w}`", d.reason);
            }
        }
    }

    #[test]
    fn a_sample_from_the_future_is_fresh() {
        // eBPF timestamps and the request's clock read race by microseconds.
        let d = decide(&mem(2 * GIB), &obs(10 * S, sample(0, GIB, GIB)), &policy(), 9 * S);
        assert!(d.approved, "{}", d.reason);
    }

    #[test]
    fn observations_keep_the_newest_of_each() {
        let mut o = Observations::default();
        let ev = |t: u64, body| Event { monotonic_ns: t, source: SourceKind::Sampler, body };
        let p = |kind| EventBody::Pressure(Pressure { kind, count: 1, stall_ns: 0, pid: 0 });
        o.observe(&ev(5, EventBody::Sample(sample(1, 2, 3))));
        o.observe(&ev(4, EventBody::Sample(sample(9, 9, 9))));
        o.observe(&ev(7, p(PressureKind::OomVictim)));
        o.observe(&ev(6, p(PressureKind::CgroupHigh)));
        o.observe(&ev(8, p(PressureKind::PsiCpu)));
        assert_eq!(o.last_sample, Some((5, sample(1, 2, 3))));
        assert_eq!(o.last_memory_pressure, Some((7, PressureKind::OomVictim)));
        assert_eq!(o.last_cpu_pressure, Some((8, PressureKind::PsiCpu)));
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(bytes(256 * MIB), "256 MiB");
        assert_eq!(bytes(GIB + 256 * MIB), "1.25 GiB");
    }
}
