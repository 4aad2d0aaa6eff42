//! The kinds of pressure a guest reports, as the agent's core decides on
//! them. The agent's informant link turns the wire's number into one of these
//! (a number it does not know becomes [`PressureKind::Unknown`]), so nothing
//! past the edge sees the wire type and the kinds a VM's status counts are a
//! fixed set. [`PressureKinds`] is a set of them, as a policy's
//! `ignore_pressure` names it: part of the contract, since a pod's
//! `vmscale.io/policy` may name them.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// What a guest's pressure event says ran short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PressureKind {
    Unspecified,
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
    /// A kind this agent does not know (a newer informant). Acted on as
    /// memory pressure, counted under one name however many numbers arrive.
    Unknown,
}

impl PressureKind {
    pub const ALL: [PressureKind; 14] = [
        PressureKind::Unspecified,
        PressureKind::DirectReclaim,
        PressureKind::MemcgReclaim,
        PressureKind::KswapdWake,
        PressureKind::OomVictim,
        PressureKind::PsiMemory,
        PressureKind::PsiCpu,
        PressureKind::PsiCgroupMemory,
        PressureKind::CgroupHigh,
        PressureKind::CgroupMax,
        PressureKind::CgroupOom,
        PressureKind::CgroupOomKill,
        PressureKind::UsageWatermark,
        PressureKind::Unknown,
    ];

    /// The name `policy.ignore_pressure`, the status map and the log use: the
    /// wire name without `KIND_`, lower case (`psi_cpu`).
    pub fn name(self) -> &'static str {
        match self {
            PressureKind::Unspecified => "unspecified",
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
            PressureKind::Unknown => "unknown",
        }
    }

    /// The kind of a [`name`](Self::name); `None` for anything else.
    pub fn from_name(name: &str) -> Option<PressureKind> {
        PressureKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Calls for the larger (OOM) growth step: a victim was chosen or a
    /// cgroup hit its hard limit.
    pub fn is_oom(self) -> bool {
        matches!(
            self,
            PressureKind::OomVictim
                | PressureKind::CgroupOom
                | PressureKind::CgroupOomKill
                | PressureKind::CgroupMax
        )
    }

    /// Tasks waiting for a CPU rather than for memory.
    pub fn is_cpu(self) -> bool {
        self == PressureKind::PsiCpu
    }
}

impl std::fmt::Display for PressureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of pressure kinds, written as a list of their names
/// (`["psi_cpu"]`); a name that is no kind is refused where the list is
/// parsed, whichever file or annotation it comes from. A bit set: every VM
/// spec carries its policy, and a list of strings would make each larger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PressureKinds(u16);

impl PressureKinds {
    pub fn of(kinds: &[PressureKind]) -> PressureKinds {
        kinds.iter().copied().collect()
    }

    fn bit(k: PressureKind) -> u16 {
        1 << (k as u16)
    }

    pub fn contains(self, k: PressureKind) -> bool {
        self.0 & Self::bit(k) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = PressureKind> {
        PressureKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

impl FromIterator<PressureKind> for PressureKinds {
    fn from_iter<I: IntoIterator<Item = PressureKind>>(kinds: I) -> Self {
        PressureKinds(kinds.into_iter().fold(0, |set, k| set | Self::bit(k)))
    }
}

impl Serialize for PressureKinds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(PressureKind::name))
    }
}

impl<'de> Deserialize<'de> for PressureKinds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names
            .iter()
            .map(|n| {
                PressureKind::from_name(n).ok_or_else(|| {
                    de::Error::custom(format!(
                        "{n:?} is no pressure kind; use lower-case names such as \"psi_cpu\", \"psi_memory\", \
                         \"memcg_reclaim\", or \"unknown\" for kinds this agent does not know"
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_classify() {
        for k in PressureKind::ALL {
            assert_eq!(PressureKind::from_name(k.name()), Some(k), "{k}");
        }
        assert_eq!(PressureKind::from_name("PSI_CPU"), None, "names are lower case");
        assert_eq!(PressureKind::from_name("13"), None);
        let oom: Vec<_> = PressureKind::ALL.into_iter().filter(|k| k.is_oom()).collect();
        assert_eq!(
            oom,
            [
                PressureKind::OomVictim,
                PressureKind::CgroupMax,
                PressureKind::CgroupOom,
                PressureKind::CgroupOomKill
            ]
        );
        assert!(PressureKind::PsiCpu.is_cpu() && !PressureKind::Unknown.is_cpu());
    }

    #[test]
    fn sets_are_written_as_names_and_refuse_others() {
        let set = PressureKinds::of(&[PressureKind::PsiCpu, PressureKind::Unknown]);
        assert!(set.contains(PressureKind::PsiCpu) && !set.contains(PressureKind::PsiMemory));
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, r#"["psi_cpu","unknown"]"#);
        assert_eq!(serde_json::from_str::<PressureKinds>(&json).unwrap(), set);
        assert!(serde_json::from_str::<PressureKinds>("[]").unwrap().is_empty());
        for bad in [r#"["PSI_CPU"]"#, r#"["13"]"#] {
            let e = serde_json::from_str::<PressureKinds>(bad).unwrap_err().to_string();
            assert!(e.contains("is no pressure kind"), "{e}");
        }
    }
}
