//! Builds the set of sources this guest supports, once, at start-up. A source
//! that cannot run here (no BTF, no CAP_BPF, no tracefs, no PSI, no cgroup v2
//! memory controller) becomes a status with a reason; the informant runs on
//! the others and never exits for it.

use crate::cgroup_events::CgroupEventsSource;
use crate::config::Config;
use crate::event::{PressureKind, SourceKind};
use crate::psi::{PsiSource, TriggerSpec};
use crate::sampler::{Sampler, SamplerPaths};
use crate::source::{Source, SourceStatus};
use crate::watermark::WatermarkSource;
use std::time::Duration;
use tracing::{info, warn};

/// Starts what can start; must run inside a tokio runtime.
pub fn start_sources(config: &Config) -> (Vec<Box<dyn Source>>, Vec<SourceStatus>) {
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    let mut statuses = Vec::new();
    let mut keep = |(src, status): (Option<Box<dyn Source>>, SourceStatus)| {
        sources.extend(src);
        statuses.push(status);
    };

    keep(if config.ebpf {
        match ebpf_source(config) {
            Ok(src) => (Some(src), SourceStatus::up(SourceKind::Ebpf)),
            Err(reason) => (None, SourceStatus::down(SourceKind::Ebpf, reason)),
        }
    } else {
        (None, SourceStatus::down(SourceKind::Ebpf, "disabled in the config (ebpf = false)"))
    });

    let (specs, skipped) = psi_specs(config);
    let (psi, status) = PsiSource::start(specs, skipped);
    keep((psi.map(|s| Box::new(s) as Box<dyn Source>), status));

    keep(match &config.workload_cgroup {
        Some(dir) => {
            let (src, status) = CgroupEventsSource::start(dir, Duration::from_millis(config.events_poll_ms));
            (src.map(|s| Box::new(s) as Box<dyn Source>), status)
        }
        None => (
            None,
            SourceStatus::down(SourceKind::CgroupEvents, "no workload cgroup configured (workload_cgroup)"),
        ),
    });

    let paths = SamplerPaths::new(&config.proc_root, &config.sys_root, config.workload_cgroup.as_deref());
    let (sampler, status) = Sampler::start(paths, Duration::from_millis(config.sample_interval_ms));
    keep((sampler.map(|s| Box::new(s) as Box<dyn Source>), status));

    keep(if config.watermark > 0.0 {
        let (src, status) = WatermarkSource::start_tuned(
            config.proc_root.join("meminfo"),
            config.watermark,
            Duration::from_millis(config.watermark_check_ms),
            config.watermark_max_ramp_mib_per_s << 20,
            Duration::from_millis(config.watermark_lead_ms),
            config.watermark_tuning,
        );
        (src.map(|s| Box::new(s) as Box<dyn Source>), status)
    } else {
        (None, SourceStatus::down(SourceKind::Watermark, "disabled in the config (watermark = 0)"))
    });

    for s in &statuses {
        match (s.available, s.reason.is_empty()) {
            (true, true) => info!(source = %s.name, "source up"),
            (true, false) => warn!(source = %s.name, "source up, partly: {}", s.reason),
            (false, _) => warn!(source = %s.name, "source unavailable, running without it: {}", s.reason),
        }
    }
    (sources, statuses)
}

/// The eBPF source (reclaim, kswapd and OOM-victim tracepoints). Its error
/// says what is missing (the object file, CAP_BPF, tracefs, BTF) and becomes
/// the handshake reason. The object is looked up in the default places (see
/// `crate::ebpf::object`) and the window is the programs' default (10 ms).
fn ebpf_source(config: &Config) -> Result<Box<dyn Source>, String> {
    let ebpf = crate::ebpf::EbpfConfig {
        proc_root: config.proc_root.clone(),
        sys_root: config.sys_root.clone(),
        ..crate::ebpf::EbpfConfig::default()
    };
    crate::ebpf::EbpfSource::new(&ebpf)
        .map(|s| Box::new(s) as Box<dyn Source>)
        .map_err(|e| crate::error_chain(&e))
}

/// The PSI triggers the config asks for, and a sentence for each left out.
fn psi_specs(config: &Config) -> (Vec<TriggerSpec>, Vec<String>) {
    let mut specs = Vec::new();
    let mut skipped = Vec::new();
    let pressure = config.proc_root.join("pressure");
    let mut want =
        |enabled: bool, name: &str, kind, path: Option<std::path::PathBuf>, t| match (enabled, path) {
            (false, _) => skipped.push(format!("{name} trigger disabled in the config")),
            (true, None) => skipped.push(format!("{name} trigger needs a workload cgroup (workload_cgroup)")),
            (true, Some(path)) => specs.push(TriggerSpec { kind, path, trigger: t }),
        };
    let p = &config.psi;
    want(p.memory.enabled, "memory", PressureKind::PsiMemory, Some(pressure.join("memory")), p.memory.into());
    want(p.cpu.enabled, "cpu", PressureKind::PsiCpu, Some(pressure.join("cpu")), p.cpu.into());
    want(
        p.cgroup_memory.enabled,
        "cgroup memory",
        PressureKind::PsiCgroupMemory,
        config.workload_cgroup.as_ref().map(|c| c.join("memory.pressure")),
        p.cgroup_memory.into(),
    );
    (specs, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeGuest;

    #[tokio::test]
    async fn a_fake_guest_runs_on_what_it_has() {
        let g = FakeGuest::new();
        let (sources, statuses) = start_sources(&g.config());
        let by_name = |n: &str| statuses.iter().find(|s| s.name == n).unwrap().clone();
        assert!(!by_name("ebpf").available);
        assert!(by_name("ebpf").reason.contains("ebpf = false"));
        // Regular files cannot wake us with POLLPRI.
        assert!(!by_name("psi").available);
        assert!(by_name("cgroup_events").available);
        assert!(by_name("sampler").available);
        let kinds: Vec<_> = sources.iter().map(|s| s.kind()).collect();
        assert_eq!(kinds, [SourceKind::CgroupEvents, SourceKind::Sampler, SourceKind::Watermark]);
    }

    #[test]
    fn psi_specs_follow_the_config() {
        let g = FakeGuest::new();
        let mut c = Config { workload_cgroup: None, ..g.config() };
        c.psi.cpu.enabled = false;
        let (specs, skipped) = psi_specs(&c);
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].path, g.proc().join("pressure/memory"));
        assert_eq!(skipped.len(), 2, "{skipped:?}");
    }
}
