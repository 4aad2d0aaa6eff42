//! The edge between wire types and domain types: requests are checked here
//! (bad values become `InvalidArgument` with a message), replies built here.

use crate::config::CpuMode;
use crate::downscale::DownscaleTarget;
use crate::event::{EventBody, PressureKind, Sample};
use crate::guest::GuestResources;
use crate::hub::Delivery;
use crate::source::SourceStatus;
use vmscale_proto::informant as pb;

/// More vCPUs than QEMU gives any VM; a larger count is a unit mix-up
/// (milli-vCPU sent as CPUs).
pub const MAX_CPUS: u32 = 1024;
/// 64 TiB: more than any VM; a larger value is a unit mix-up.
pub const MAX_MEMORY_BYTES: u64 = 64 << 40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("{what}: both targets are 0 (unchanged); set target_cpus and/or target_memory_bytes")]
    NothingAsked { what: &'static str },
    #[error("{field} = {value} is more than any guest has ({max}); {hint}")]
    TooLarge { field: &'static str, value: u64, max: u64, hint: &'static str },
    #[error("versions missing: send the range of informant protocol versions the agent speaks")]
    NoVersions,
    #[error("version range {min}..={max} is empty (min above max)")]
    EmptyRange { min: u32, max: u32 },
    #[error("cpu_mode = {0} is not one this informant knows (1: hotplug, 2: sysfs, 0: its own config)")]
    CpuMode(i32),
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn check_cpus(field: &'static str, n: u32) -> Result<Option<u32>, ConvertError> {
    if n > MAX_CPUS {
        return Err(ConvertError::TooLarge {
            field,
            value: n.into(),
            max: MAX_CPUS.into(),
            hint: "the unit is whole CPUs, not milli-vCPU",
        });
    }
    Ok((n > 0).then_some(n))
}

fn check_memory(field: &'static str, b: u64) -> Result<Option<u64>, ConvertError> {
    if b > MAX_MEMORY_BYTES {
        return Err(ConvertError::TooLarge {
            field,
            value: b,
            max: MAX_MEMORY_BYTES,
            hint: "the unit is bytes",
        });
    }
    Ok((b > 0).then_some(b))
}

impl TryFrom<&pb::DownscaleRequest> for DownscaleTarget {
    type Error = ConvertError;

    fn try_from(r: &pb::DownscaleRequest) -> Result<Self, Self::Error> {
        let t = DownscaleTarget {
            cpus: check_cpus("target_cpus", r.target_cpus)?,
            memory_bytes: check_memory("target_memory_bytes", r.target_memory_bytes)?,
        };
        if t.cpus.is_none() && t.memory_bytes.is_none() {
            return Err(ConvertError::NothingAsked { what: "downscale request" });
        }
        Ok(t)
    }
}

/// The VM's size after an upscale; `None` where unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpscaleTarget {
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
}

impl TryFrom<&pb::UpscaleNotice> for UpscaleTarget {
    type Error = ConvertError;

    fn try_from(r: &pb::UpscaleNotice) -> Result<Self, Self::Error> {
        let t = UpscaleTarget {
            cpus: check_cpus("cpus", r.cpus)?,
            memory_bytes: check_memory("memory_bytes", r.memory_bytes)?,
        };
        if t.cpus.is_none() && t.memory_bytes.is_none() {
            return Err(ConvertError::NothingAsked { what: "upscale notice" });
        }
        Ok(t)
    }
}

/// The CPU mode the agent says the VM runs in; `None` when it says nothing
/// (an older agent), so the informant's own config decides. A number this
/// informant does not know is refused rather than guessed: offlining CPUs
/// the agent meant to unplug, or the other way round, leaves the VM wrong.
pub fn cpu_mode(wire: i32) -> Result<Option<CpuMode>, ConvertError> {
    match pb::CpuMode::try_from(wire) {
        Ok(pb::CpuMode::Unspecified) => Ok(None),
        Ok(pb::CpuMode::Hotplug) => Ok(Some(CpuMode::Hotplug)),
        Ok(pb::CpuMode::Sysfs) => Ok(Some(CpuMode::Sysfs)),
        Err(_) => Err(ConvertError::CpuMode(wire)),
    }
}

/// The agent's version range, checked.
pub fn version_range(v: Option<&pb::VersionRange>) -> Result<(u32, u32), ConvertError> {
    let v = v.ok_or(ConvertError::NoVersions)?;
    if v.min > v.max {
        return Err(ConvertError::EmptyRange { min: v.min, max: v.max });
    }
    Ok((v.min, v.max))
}

fn pressure_kind(k: PressureKind) -> pb::pressure::Kind {
    use pb::pressure::Kind as K;
    match k {
        PressureKind::DirectReclaim => K::DirectReclaim,
        PressureKind::MemcgReclaim => K::MemcgReclaim,
        PressureKind::KswapdWake => K::KswapdWake,
        PressureKind::OomVictim => K::OomVictim,
        PressureKind::PsiMemory => K::PsiMemory,
        PressureKind::PsiCpu => K::PsiCpu,
        PressureKind::PsiCgroupMemory => K::PsiCgroupMemory,
        PressureKind::CgroupHigh => K::CgroupHigh,
        PressureKind::CgroupMax => K::CgroupMax,
        PressureKind::CgroupOom => K::CgroupOom,
        PressureKind::CgroupOomKill => K::CgroupOomKill,
        PressureKind::UsageWatermark => K::UsageWatermark,
    }
}

fn sample(s: &Sample) -> pb::Sample {
    pb::Sample {
        workload_anon_bytes: s.workload_anon_bytes,
        mem_available_bytes: s.mem_available_bytes,
        mem_total_bytes: s.mem_total_bytes,
        online_cpus: s.online_cpus,
        load_avg_1: s.load_avg_1,
        load_avg_5: s.load_avg_5,
        memory_some_avg10: s.memory_some_avg10,
        memory_full_avg10: s.memory_full_avg10,
        cpu_some_avg10: s.cpu_some_avg10,
    }
}

impl From<Delivery> for pb::Event {
    fn from(d: Delivery) -> Self {
        let body = match d.event.body {
            EventBody::Sample(s) => pb::event::Body::Sample(sample(&s)),
            EventBody::Pressure(p) => pb::event::Body::Pressure(pb::Pressure {
                kind: pressure_kind(p.kind).into(),
                count: p.count,
                stall_ns: p.stall_ns,
                pid: p.pid,
            }),
        };
        pb::Event {
            monotonic_ns: d.event.monotonic_ns,
            source: d.event.source.name().to_owned(),
            body: Some(body),
            dropped: d.dropped,
        }
    }
}

impl From<GuestResources> for pb::GuestResources {
    fn from(r: GuestResources) -> Self {
        pb::GuestResources {
            online_cpus: r.online_cpus,
            memory_total_bytes: r.memory_total_bytes,
            memory_online_bytes: r.memory_online_bytes,
            warnings: r.warnings,
            present_cpus: r.present_cpus,
        }
    }
}

impl From<&SourceStatus> for pb::SourceStatus {
    fn from(s: &SourceStatus) -> Self {
        pb::SourceStatus { name: s.name.clone(), available: s.available, reason: s.reason.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Pressure, SourceKind};

    fn down(cpus: u32, mem: u64) -> Result<DownscaleTarget, ConvertError> {
        DownscaleTarget::try_from(&pb::DownscaleRequest {
            target_cpus: cpus,
            target_memory_bytes: mem,
            ..Default::default()
        })
    }

    #[test]
    fn downscale_requests_are_checked() {
        assert_eq!(down(2, 0), Ok(DownscaleTarget { cpus: Some(2), memory_bytes: None }));
        assert_eq!(down(0, 1 << 30), Ok(DownscaleTarget { cpus: None, memory_bytes: Some(1 << 30) }));
        assert!(down(0, 0).unwrap_err().to_string().contains("both targets are 0"));
        assert!(down(2000, 0).unwrap_err().to_string().contains("milli-vCPU"));
        assert!(down(0, u64::MAX).unwrap_err().to_string().contains("unit is bytes"));
        let status = tonic::Status::from(down(0, 0).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn upscale_notices_are_checked() {
        let up = |cpus, memory_bytes| {
            UpscaleTarget::try_from(&pb::UpscaleNotice { cpus, memory_bytes, ..Default::default() })
        };
        assert_eq!(up(4, 0), Ok(UpscaleTarget { cpus: Some(4), memory_bytes: None }));
        assert!(up(0, 0).is_err());
        assert!(up(4000, 0).is_err());
    }

    /// Absent (an older agent) leaves the informant's config in charge; a
    /// number from a newer agent is refused, never guessed.
    #[test]
    fn cpu_modes_from_the_wire() {
        let table = [
            (0, Ok(None)),
            (1, Ok(Some(CpuMode::Hotplug))),
            (2, Ok(Some(CpuMode::Sysfs))),
            (3, Err(ConvertError::CpuMode(3))),
            (-1, Err(ConvertError::CpuMode(-1))),
        ];
        for (wire, want) in table {
            assert_eq!(cpu_mode(wire), want, "{wire}");
        }
        let status = tonic::Status::from(cpu_mode(7).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("cpu_mode = 7"), "{}", status.message());
    }

    #[test]
    fn version_ranges_are_checked() {
        assert_eq!(version_range(None), Err(ConvertError::NoVersions));
        assert_eq!(version_range(Some(&pb::VersionRange { min: 1, max: 2 })), Ok((1, 2)));
        assert!(version_range(Some(&pb::VersionRange { min: 3, max: 2 })).is_err());
    }

    #[test]
    fn events_carry_their_source_and_drops() {
        let p = Pressure { kind: PressureKind::CgroupOomKill, count: 2, stall_ns: 0, pid: 7 };
        let ev = Event { monotonic_ns: 42, source: SourceKind::CgroupEvents, body: EventBody::Pressure(p) };
        let wire = pb::Event::from(Delivery { event: ev, dropped: 3 });
        assert_eq!((wire.monotonic_ns, wire.source.as_str(), wire.dropped), (42, "cgroup_events", 3));
        let Some(pb::event::Body::Pressure(wp)) = wire.body else { panic!("not pressure") };
        assert_eq!(wp.kind(), pb::pressure::Kind::CgroupOomKill);
        assert_eq!((wp.count, wp.pid), (2, 7));
    }
}
