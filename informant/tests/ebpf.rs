//! The eBPF source on this machine's real kernel: the programs load and
//! attach, and a memory hog in a small v1 memory cgroup produces memcg
//! reclaim events and an OOM-victim event with the hog's pid.
//!
//! Needs root, BTF, and the object from `cargo xtask build-ebpf`. Under
//! `CI=true` a test that cannot run fails with the reason; elsewhere it
//! prints the reason and passes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vmscale_informant::ebpf::{self, EbpfConfig, EbpfSource, MemoryHog};
use vmscale_informant::event::{monotonic_ns, Event, EventBody, Pressure, PressureKind, SourceKind};
use vmscale_informant::skip_unless_ci;
use vmscale_informant::source::Source;

/// The v1 memory hierarchy of this host (the guest would use cgroup v2).
const MEMORY_V1: &str = "/sys/fs/cgroup/memory";
const HOG_LIMIT_BYTES: u64 = 100 << 20;

/// Tests that load programs run one at a time: each sees every reclaim on
/// the machine, including the other test's hog.
static KERNEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The object and config, or `None` (after skip_unless_ci) when this
/// machine can't run the test.
fn prerequisites(needs_cgroup: bool) -> Option<EbpfConfig> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        skip_unless_ci("the eBPF tests need root (to load programs and create cgroups)");
        return None;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").is_file() {
        skip_unless_ci("the kernel has no BTF (/sys/kernel/btf/vmlinux)");
        return None;
    }
    let object = match ebpf::object::find(None) {
        Ok(p) => p,
        Err(e) => {
            skip_unless_ci(&e.to_string());
            return None;
        }
    };
    if needs_cgroup && !Path::new(MEMORY_V1).join("memory.limit_in_bytes").is_file() {
        skip_unless_ci(&format!("no cgroup v1 memory controller at {MEMORY_V1}"));
        return None;
    }
    Some(EbpfConfig { object: Some(object), ..EbpfConfig::default() })
}

#[tokio::test]
async fn programs_load_and_attach() {
    let Some(config) = prerequisites(false) else { return };
    let _kernel = KERNEL.lock().await;
    let source =
        EbpfSource::new(&config).unwrap_or_else(|e| panic!("{}", vmscale_informant::error_chain(&e)));
    assert_eq!(source.kind(), SourceKind::Ebpf);
    let tracepoints: Vec<String> = EbpfSource::tracepoints().collect();
    assert_eq!(tracepoints.len(), 6);
    println!("loaded {} and attached {}", source.object().display(), tracepoints.join(", "));
}

#[test]
fn a_missing_object_is_named_in_the_error() {
    let config =
        EbpfConfig { object: Some(PathBuf::from("/nonexistent/vmscale.bpf.o")), ..EbpfConfig::default() };
    let e = EbpfSource::new(&config).unwrap_err().to_string();
    assert!(e.contains("object file is missing") && e.contains("/nonexistent/vmscale.bpf.o"), "{e}");
}

/// What the test saw of one kind.
#[derive(Debug, Default)]
struct Seen {
    events: u32,
    count: u64,
    stall_ns: u64,
    first_ns: u64,
    last_ns: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcg_hog_reports_reclaim_and_its_oom_victim() {
    let Some(config) = prerequisites(true) else { return };
    let _kernel = KERNEL.lock().await;
    let source =
        EbpfSource::new(&config).unwrap_or_else(|e| panic!("{}", vmscale_informant::error_chain(&e)));
    let stats = source.stats();
    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    let cancel = CancellationToken::new();
    let task = Box::new(source).spawn(tx, cancel.clone());

    let name = format!("vmscale-ebpf-test-{}", std::process::id());
    let mut hog = MemoryHog::start(Path::new(MEMORY_V1), &name, HOG_LIMIT_BYTES).unwrap();
    let hog_pid = hog.pid();
    let started = Instant::now();

    let mut memcg = Seen::default();
    let mut victim: Option<(Pressure, u64)> = None;
    let mut latencies_us: Vec<f64> = Vec::new();
    let deadline = started + Duration::from_secs(60);
    // Until the victim is in, then one more window and a bit, for the tail.
    let mut until = deadline;
    while let Ok(Some(ev)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
        let received = monotonic_ns();
        let EventBody::Pressure(p) = ev.body else { continue };
        let latency_us = ebpf::latency_ns(&ev, received).unwrap() as f64 / 1000.0;
        latencies_us.push(latency_us);
        println!(
            "  +{:7.3} ms {:?} count {} stall {} ns pid {} latency {latency_us:.1} µs",
            started.elapsed().as_secs_f64() * 1e3,
            p.kind,
            p.count,
            p.stall_ns,
            p.pid
        );
        match p.kind {
            PressureKind::MemcgReclaim => {
                memcg.events += 1;
                memcg.count += u64::from(p.count);
                memcg.stall_ns += p.stall_ns;
                if memcg.first_ns == 0 {
                    memcg.first_ns = ev.monotonic_ns;
                }
                memcg.last_ns = ev.monotonic_ns;
            }
            PressureKind::OomVictim if p.pid == hog_pid => {
                victim = Some((p, ev.monotonic_ns));
                until = Instant::now() + config.window * 5;
            }
            _ => {}
        }
    }
    let status = hog.wait_timeout(Duration::from_secs(5)).unwrap();
    drop(hog);
    cancel.cancel();
    task.await.unwrap();

    latencies_us.sort_by(f64::total_cmp);
    let pct = |q: f64| vmscale_common::stats::nearest_rank(latencies_us.len(), q).map(|i| latencies_us[i]);
    println!(
        "hog pid {hog_pid} in {name} ({} MiB): {} memcg reclaim events carrying {} reclaims, {:.2} ms stall; \
         OOM victim {:?} after {:.2} s; hog status {status:?}",
        HOG_LIMIT_BYTES >> 20,
        memcg.events,
        memcg.count,
        memcg.stall_ns as f64 / 1e6,
        victim.map(|(p, _)| p.pid),
        started.elapsed().as_secs_f64(),
    );
    println!(
        "kernel-to-receiver latency over {} events: p50 {:?} µs, max {:?} µs; ring records {}, tails {}, \
         kernel drops {}, mean ring latency {:?} ns",
        latencies_us.len(),
        pct(0.5),
        pct(1.0),
        stats.records.load(std::sync::atomic::Ordering::Relaxed),
        stats.tails.load(std::sync::atomic::Ordering::Relaxed),
        stats.kernel_dropped.load(std::sync::atomic::Ordering::Relaxed),
        stats.mean_ring_latency_ns(),
    );

    let (p, _) =
        victim.unwrap_or_else(|| panic!("no OOM-victim event for the hog (pid {hog_pid}) within 60 s"));
    assert_eq!(p.count, 1);
    assert!(memcg.events >= 1, "no memcg reclaim event before the OOM kill");
    assert!(memcg.count >= 1, "{memcg:?}");
    assert!(memcg.stall_ns > 0, "reclaims reported no stall time: {memcg:?}");
    // In-kernel aggregation: at most one record per window, plus the first
    // one at once and the tail collected from the state map.
    let windows = (memcg.last_ns - memcg.first_ns) / u64::try_from(config.window.as_nanos()).unwrap();
    assert!(u64::from(memcg.events) <= windows + 3, "{} events over {windows} windows", memcg.events);
}

/// The window is a load-time global: with a 2 s window the kernel sends the
/// first memcg reclaim of the hog at once and nothing more while the hog
/// lives (under a second); the rest arrives as one tail when the window ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_window_folds_the_whole_burst() {
    let Some(mut config) = prerequisites(true) else { return };
    config.window = Duration::from_secs(2);
    let _kernel = KERNEL.lock().await;
    let source =
        EbpfSource::new(&config).unwrap_or_else(|e| panic!("{}", vmscale_informant::error_chain(&e)));
    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    let cancel = CancellationToken::new();
    let task = Box::new(source).spawn(tx, cancel.clone());

    let name = format!("vmscale-ebpf-window-test-{}", std::process::id());
    let mut hog = MemoryHog::start(Path::new(MEMORY_V1), &name, HOG_LIMIT_BYTES).unwrap();
    let hog_pid = hog.pid();
    let mut reclaims: Vec<Pressure> = Vec::new();
    let mut victim_seen = false;
    let mut until = Instant::now() + Duration::from_secs(60);
    while let Ok(Some(ev)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
        let EventBody::Pressure(p) = ev.body else { continue };
        match p.kind {
            PressureKind::MemcgReclaim => reclaims.push(p),
            PressureKind::OomVictim if p.pid == hog_pid => {
                victim_seen = true;
                // The tail comes one window after the first record.
                until = Instant::now() + config.window + Duration::from_millis(500);
            }
            _ => {}
        }
    }
    let _ = hog.wait_timeout(Duration::from_secs(5));
    drop(hog);
    cancel.cancel();
    task.await.unwrap();

    println!("2 s window: memcg reclaim events {reclaims:?}");
    assert!(victim_seen, "no OOM-victim event for the hog (pid {hog_pid})");
    let from_hog = reclaims.iter().filter(|p| p.pid == hog_pid).count();
    assert!(from_hog <= 1, "more than one kernel record inside one 2 s window: {reclaims:?}");
    let total: u64 = reclaims.iter().map(|p| u64::from(p.count)).sum();
    assert!(total >= 10, "the tail did not bring the burst's reclaims: {reclaims:?}");
}

/// The whole path: kernel tracepoint, ring buffer, eBPF source, hub, gRPC
/// stream, a tonic client on loopback. Every other source runs too, on this
/// machine's real /proc and /sys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hog_events_reach_a_grpc_client() {
    use vmscale_informant::config::Config;
    use vmscale_informant::{serve, Listener};
    use vmscale_proto::informant as pb;
    use vmscale_proto::informant::informant_client::InformantClient;

    let Some(_) = prerequisites(true) else { return };
    let _kernel = KERNEL.lock().await;
    // Plain text on loopback: the test is about the events, not TLS.
    let config = Config { ebpf: true, insecure: true, ..Config::default() };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let server = tokio::spawn(async move { serve(config, Listener::Tcp(l), s).await.unwrap() });
    let mut client = InformantClient::connect(addr).await.unwrap();

    let versions = Some(pb::VersionRange { min: 1, max: u32::MAX });
    let h = client.handshake(pb::HandshakeRequest { versions, agent: "ebpf-test".into() }).await.unwrap();
    let ebpf_status = h.into_inner().sources.into_iter().find(|s| s.name == "ebpf").unwrap();
    assert!(ebpf_status.available, "the informant reports its eBPF source down: {}", ebpf_status.reason);
    let mut stream = client.subscribe(pb::SubscribeRequest {}).await.unwrap().into_inner();

    let name = format!("vmscale-ebpf-grpc-test-{}", std::process::id());
    let mut hog = MemoryHog::start(Path::new(MEMORY_V1), &name, HOG_LIMIT_BYTES).unwrap();
    let hog_pid = hog.pid();
    let mut reclaim_events = 0;
    let mut latencies_us = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let victim = loop {
        let msg = tokio::time::timeout_at(deadline, stream.message()).await;
        let Ok(Ok(Some(ev))) = msg else { break None };
        let received = monotonic_ns();
        if ev.source != "ebpf" {
            continue;
        }
        let Some(pb::event::Body::Pressure(p)) = ev.body else { continue };
        latencies_us.push(received.saturating_sub(ev.monotonic_ns) as f64 / 1000.0);
        match p.kind() {
            pb::pressure::Kind::MemcgReclaim => reclaim_events += 1,
            pb::pressure::Kind::OomVictim if p.pid == hog_pid => break Some(p),
            _ => {}
        }
    };
    let _ = hog.wait_timeout(Duration::from_secs(5));
    drop(hog);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stops").unwrap();

    println!(
        "over gRPC: {reclaim_events} memcg reclaim events, OOM victim {:?}; kernel-to-client latencies {:?} µs",
        victim.map(|p| p.pid),
        latencies_us.iter().map(|l| l.round()).collect::<Vec<_>>()
    );
    assert!(victim.is_some(), "no OOM-victim event for the hog (pid {hog_pid}) reached the gRPC client");
    assert!(reclaim_events >= 1, "no memcg reclaim event reached the gRPC client before the OOM kill");
}
