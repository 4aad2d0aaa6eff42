//! Periodic samples of the guest: workload anon memory, MemAvailable and
//! MemTotal, online CPUs, load averages and PSI averages. Fields the guest
//! cannot give (no PSI, no workload cgroup) stay 0 and are named once in the
//! log and the handshake.

use crate::event::{monotonic_ns, Event, EventBody, Sample, SourceKind};
use crate::procfs;
use crate::source::{Source, SourceStatus};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Every file a sample reads.
#[derive(Debug, Clone)]
pub struct SamplerPaths {
    pub meminfo: PathBuf,
    pub loadavg: PathBuf,
    pub cpu_online: PathBuf,
    pub psi_memory: PathBuf,
    pub psi_cpu: PathBuf,
    pub memory_stat: Option<PathBuf>,
}

impl SamplerPaths {
    pub fn new(proc_root: &Path, sys_root: &Path, workload_cgroup: Option<&Path>) -> Self {
        SamplerPaths {
            meminfo: proc_root.join("meminfo"),
            loadavg: proc_root.join("loadavg"),
            cpu_online: sys_root.join("devices/system/cpu/online"),
            psi_memory: proc_root.join("pressure/memory"),
            psi_cpu: proc_root.join("pressure/cpu"),
            memory_stat: workload_cgroup.map(|c| c.join("memory.stat")),
        }
    }
}

/// One reading, with a sentence for each part that could not be read.
pub fn take_sample(p: &SamplerPaths) -> (Sample, Vec<String>) {
    let mut s = Sample::default();
    let mut problems = Vec::new();
    let mut read = |path: &Path, what: &str| match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(format!("{what}: cannot read {} ({e})", path.display()));
            None
        }
    };
    let mut notes = Vec::new();
    let mut parsed = |ok: bool, what: &str, path: &Path| {
        if !ok {
            notes.push(format!("{what}: cannot parse {}", path.display()));
        }
    };
    if let Some(t) = read(&p.meminfo, "memory") {
        let m = procfs::parse_meminfo(&t);
        parsed(m.is_some(), "memory", &p.meminfo);
        if let Some(m) = m {
            s.mem_total_bytes = m.total_bytes;
            s.mem_available_bytes = m.available_bytes;
        }
    }
    if let Some(t) = read(&p.loadavg, "load") {
        let l = procfs::parse_loadavg(&t);
        parsed(l.is_some(), "load", &p.loadavg);
        if let Some((one, five)) = l {
            (s.load_avg_1, s.load_avg_5) = (one, five);
        }
    }
    if let Some(t) = read(&p.cpu_online, "online CPUs") {
        let c = procfs::parse_cpu_list(&t);
        parsed(c.is_some(), "online CPUs", &p.cpu_online);
        s.online_cpus = c.map_or(0, |c| u32::try_from(c.len()).unwrap_or(u32::MAX));
    }
    if let Some(t) = read(&p.psi_memory, "memory PSI") {
        let psi = procfs::parse_psi(&t);
        parsed(psi.is_some(), "memory PSI", &p.psi_memory);
        if let Some(psi) = psi {
            s.memory_some_avg10 = psi.some.avg10;
            s.memory_full_avg10 = psi.full.map_or(0.0, |f| f.avg10);
        }
    }
    if let Some(t) = read(&p.psi_cpu, "CPU PSI") {
        let psi = procfs::parse_psi(&t);
        parsed(psi.is_some(), "CPU PSI", &p.psi_cpu);
        s.cpu_some_avg10 = psi.map_or(0.0, |p| p.some.avg10);
    }
    if let Some(stat) = &p.memory_stat {
        if let Some(t) = read(stat, "workload anon") {
            let anon = procfs::parse_flat_key(&t, "anon");
            parsed(anon.is_some(), "workload anon", stat);
            s.workload_anon_bytes = anon.unwrap_or(0);
        }
    }
    problems.extend(notes);
    (s, problems)
}

#[derive(Debug)]
pub struct Sampler {
    paths: SamplerPaths,
    interval: Duration,
    problems: Vec<String>,
}

impl Sampler {
    /// Takes a first sample to see what this guest offers. Without
    /// `/proc/meminfo` there is nothing worth sending.
    pub fn start(paths: SamplerPaths, interval: Duration) -> (Option<Sampler>, SourceStatus) {
        let (_, mut problems) = take_sample(&paths);
        if paths.memory_stat.is_none() {
            problems.push("workload anon: no workload cgroup configured".into());
        }
        if problems.iter().any(|p| p.starts_with("memory:")) {
            let reason = problems.join("; ");
            warn!("sampler unavailable: {reason}");
            return (None, SourceStatus::down(SourceKind::Sampler, reason));
        }
        let mut status = SourceStatus::up(SourceKind::Sampler);
        status.reason = problems.join("; ");
        if !status.reason.is_empty() {
            warn!("sampler runs without some fields: {}", status.reason);
        }
        info!(interval_ms = interval.as_millis(), "sampler started");
        (Some(Sampler { paths, interval, problems }), status)
    }
}

impl Source for Sampler {
    fn kind(&self) -> SourceKind {
        SourceKind::Sampler
    }

    fn spawn(
        self: Box<Self>,
        tx: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run(*self, tx, cancel))
    }
}

async fn run(s: Sampler, tx: mpsc::Sender<Event>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known = s.problems;
    known.retain(|p| !p.starts_with("workload anon: no workload"));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (sample, problems) = take_sample(&s.paths);
        if problems != known {
            // Log changes only: a missing file stays quiet after the first word.
            for p in problems.iter().filter(|p| !known.contains(p)) {
                warn!("sample incomplete: {p}");
            }
            if problems.is_empty() {
                info!("samples complete again");
            }
            known = problems;
        }
        let ev = Event {
            monotonic_ns: monotonic_ns(),
            source: SourceKind::Sampler,
            body: EventBody::Sample(sample),
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeGuest;

    #[test]
    fn sample_reads_every_file() {
        let g = FakeGuest::new();
        g.set_meminfo(4 << 30, 3 << 30);
        g.set_anon(512 << 20);
        let (s, problems) = take_sample(&g.sampler_paths());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            s,
            Sample {
                workload_anon_bytes: 512 << 20,
                mem_available_bytes: 3 << 30,
                mem_total_bytes: 4 << 30,
                online_cpus: 2,
                load_avg_1: 0.5,
                load_avg_5: 0.25,
                memory_some_avg10: 1.5,
                memory_full_avg10: 0.5,
                cpu_some_avg10: 3.0,
            }
        );
    }

    #[test]
    fn the_real_kernel_gives_a_complete_sample() {
        if !Path::new("/proc/pressure/cpu").exists() {
            crate::skip_unless_ci("no PSI on this kernel");
            return;
        }
        let (s, problems) = take_sample(&SamplerPaths::new(Path::new("/proc"), Path::new("/sys"), None));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(s.mem_total_bytes >= s.mem_available_bytes && s.mem_available_bytes > 0, "{s:?}");
        assert!(s.online_cpus >= 1);
    }

    #[test]
    fn missing_parts_are_named_and_left_zero() {
        let g = FakeGuest::new();
        std::fs::remove_file(g.proc().join("pressure/memory")).unwrap();
        std::fs::write(g.proc().join("loadavg"), "garbage").unwrap();
        let (s, problems) = take_sample(&g.sampler_paths());
        assert_eq!(s.memory_some_avg10, 0.0);
        assert_eq!(s.load_avg_1, 0.0);
        assert_eq!(s.online_cpus, 2);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("memory PSI: cannot read"), "{problems:?}");
        assert!(problems[1].starts_with("load: cannot parse"), "{problems:?}");
    }

    #[tokio::test]
    async fn sampler_sends_on_its_interval_and_degrades() {
        let g = FakeGuest::new();
        let paths = SamplerPaths { memory_stat: None, ..g.sampler_paths() };
        let (src, status) = Sampler::start(paths, Duration::from_millis(20));
        assert!(status.available);
        assert!(status.reason.contains("no workload cgroup"), "{}", status.reason);
        let (tx, mut rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let task = Box::new(src.unwrap()).spawn(tx, cancel.clone());
        for _ in 0..3 {
            let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
            assert_eq!(ev.source, SourceKind::Sampler);
            assert!(matches!(ev.body, EventBody::Sample(s) if s.mem_total_bytes > 0));
        }
        cancel.cancel();
        task.await.unwrap();

        std::fs::remove_file(g.proc().join("meminfo")).unwrap();
        let (src, status) = Sampler::start(g.sampler_paths(), Duration::from_millis(20));
        assert!(src.is_none() && !status.available);
        assert!(status.reason.contains("meminfo"), "{}", status.reason);
    }
}
