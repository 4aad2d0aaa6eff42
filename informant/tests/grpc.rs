//! The real informant server on 127.0.0.1:0 over a fake guest tree, driven by
//! a real tonic client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;
use vmscale_informant::config::{Config, CpuMode, ListenAddr, VSOCK_CID_ANY};
use vmscale_informant::fake::FakeGuest;
use vmscale_informant::{serve, Listener};
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_client::InformantClient;

const GIB: u64 = 1 << 30;
const WAIT: Duration = Duration::from_secs(10);

struct Running {
    guest: FakeGuest,
    client: InformantClient<Channel>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start(tweak: impl FnOnce(&FakeGuest, &mut Config)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let guest = FakeGuest::create(dir.path());
    let mut config = guest.config();
    tweak(&guest, &mut config);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { serve(config, Listener::Tcp(l), s).await.unwrap() });
    let client = InformantClient::connect(addr).await.unwrap();
    Running { guest, client, stop, task, _dir: dir }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task).await.expect("server stops").unwrap();
    }

    /// Asks until the informant has a sample (it takes one at start).
    async fn downscale(&mut self, target_cpus: u32, target_memory_bytes: u64) -> pb::DownscaleResponse {
        let req = pb::DownscaleRequest { target_cpus, target_memory_bytes, ..Default::default() };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = self.client.try_downscale(req).await.unwrap().into_inner();
            if !r.reason.starts_with("no stats yet") || tokio::time::Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An upscale notice from an agent that does not say the CPU mode.
fn notice(cpus: u32, memory_bytes: u64) -> pb::UpscaleNotice {
    pb::UpscaleNotice { cpus, memory_bytes, ..Default::default() }
}

fn handshake(min: u32, max: u32) -> pb::HandshakeRequest {
    pb::HandshakeRequest { versions: Some(pb::VersionRange { min, max }), agent: "test".into() }
}

async fn next(stream: &mut tonic::Streaming<pb::Event>) -> Result<pb::Event, tonic::Status> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event in time")
        .map(|m| m.expect("stream open"))
}

/// The next event satisfying `want`, skipping others.
async fn next_where(
    stream: &mut tonic::Streaming<pb::Event>,
    want: impl Fn(&pb::Event) -> bool,
) -> pb::Event {
    loop {
        let ev = next(stream).await.unwrap();
        if want(&ev) {
            return ev;
        }
    }
}

fn is_pressure(kind: pb::pressure::Kind) -> impl Fn(&pb::Event) -> bool {
    move |e| matches!(&e.body, Some(pb::event::Body::Pressure(p)) if p.kind() == kind)
}

#[tokio::test]
async fn handshake_negotiates_and_reports_sources() {
    let mut r = start(|_, _| {}).await;
    let h = r.client.handshake(handshake(1, 5)).await.unwrap().into_inner();
    assert_eq!(h.version, 1);
    assert!(!h.informant_version.is_empty());
    assert!(!h.cpu_sysfs_mode);
    let status = |n: &str| h.sources.iter().find(|s| s.name == n).unwrap().clone();
    assert!(!status("ebpf").available && status("ebpf").reason.contains("ebpf = false"));
    assert!(!status("psi").available, "a fake tree has no PSI triggers");
    assert!(status("psi").reason.contains("POLLPRI"), "{}", status("psi").reason);
    assert!(status("cgroup_events").available);
    assert!(status("sampler").available);

    let e = r.client.handshake(handshake(7, 9)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("no common protocol version"), "{}", e.message());
    let e = r.client.handshake(handshake(3, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = r.client.handshake(pb::HandshakeRequest { versions: None, agent: "x".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("versions missing"), "{}", e.message());
    r.stop().await;
}

/// The handshake names the guest kernel settings that make scaling worse:
/// the fake tree's kernel has no memmap_on_memory; one with it set and
/// memory onlined movable gets no note.
#[tokio::test]
async fn handshake_names_guest_kernel_settings_that_are_off() {
    let mut r = start(|_, _| {}).await;
    let h = r.client.handshake(handshake(1, 1)).await.unwrap().into_inner();
    assert_eq!(h.guest_notes.len(), 1, "{:?}", h.guest_notes);
    assert!(h.guest_notes[0].contains("CONFIG_MHP_MEMMAP_ON_MEMORY"), "{:?}", h.guest_notes);
    r.stop().await;

    let mut r = start(|g, _| {
        let params = g.sys().join("module/memory_hotplug/parameters");
        std::fs::create_dir_all(&params).unwrap();
        std::fs::write(params.join("memmap_on_memory"), "Y\n").unwrap();
        std::fs::write(g.memory_dir().join("auto_online_blocks"), "online_movable\n").unwrap();
    })
    .await;
    let h = r.client.handshake(handshake(1, 1)).await.unwrap().into_inner();
    assert!(h.guest_notes.is_empty(), "{:?}", h.guest_notes);
    r.stop().await;
}

#[tokio::test]
async fn subscribers_get_samples_and_pressure_and_a_new_one_replaces_the_old() {
    let mut r = start(|_, _| {}).await;
    let mut first = r.client.subscribe(pb::SubscribeRequest {}).await.unwrap().into_inner();
    let ev = next_where(&mut first, |e| e.source == "sampler").await;
    let Some(pb::event::Body::Sample(s)) = ev.body else { panic!("not a sample: {ev:?}") };
    assert_eq!((s.mem_total_bytes, s.workload_anon_bytes, s.online_cpus), (4 * GIB, GIB / 2, 2));
    assert!(ev.monotonic_ns > 0);

    r.guest.set_memory_events(2, 0, 0, 0);
    let ev = next_where(&mut first, is_pressure(pb::pressure::Kind::CgroupHigh)).await;
    assert_eq!(ev.source, "cgroup_events");
    let Some(pb::event::Body::Pressure(p)) = ev.body else { unreachable!() };
    assert_eq!(p.count, 2);

    let mut second = r.client.clone().subscribe(pb::SubscribeRequest {}).await.unwrap().into_inner();
    let end = loop {
        match next(&mut first).await {
            Ok(_) => continue, // events queued before the replacement
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Aborted);
    assert!(end.message().contains("replaced by a newer subscription"), "{}", end.message());
    next_where(&mut second, |e| e.source == "sampler").await;

    // Shutting down ends the live stream with a status, and the server stops.
    r.stop.cancel();
    let end = loop {
        match tokio::time::timeout(WAIT, second.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    tokio::time::timeout(WAIT, r.task).await.expect("server stops").unwrap();
}

#[tokio::test]
async fn downscale_approves_what_fits_and_denies_the_rest() {
    let mut r = start(|_, c| c.downscale.pressure_cooldown_ms = 60_000).await;
    // Guest-wide 1 GiB in use (4 total, 3 available) plus the 256 MiB buffer.
    let ok = r.downscale(0, 2 * GIB).await;
    assert!(ok.approved, "{}", ok.reason);
    assert!(ok.reason.starts_with("approved"), "{}", ok.reason);
    assert_eq!(ok.now.unwrap().memory_total_bytes, 4 * GIB);

    let no = r.downscale(0, GIB).await;
    assert!(!no.approved);
    assert!(
        no.reason.contains("does not fit") && no.reason.contains("ask for at least 1.25 GiB"),
        "{}",
        no.reason
    );

    // Workload anon above guest-wide use counts instead.
    r.guest.set_anon(3 * GIB);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let no = r.downscale(0, 3 * GIB).await;
    assert!(!no.approved && no.reason.contains("workload anon"), "{}", no.reason);

    // Pressure: the cgroup's high counter moves; memory downscales wait, CPU ones don't.
    // First a sample with the workload's smaller anon memory: a target that
    // does not fit is denied for that before any cooldown is looked at.
    r.guest.set_anon(GIB / 2);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = r.downscale(0, 2 * GIB).await;
        if d.approved {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still denied after the workload shrank: {}",
            d.reason
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.guest.set_memory_events(1, 0, 0, 0);
    let deadline = tokio::time::Instant::now() + WAIT;
    let denied = loop {
        let d = r.downscale(0, 2 * GIB).await;
        if !d.approved || tokio::time::Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(denied.reason.contains("memory pressure (cgroup_high)"), "{}", denied.reason);
    assert!(denied.reason.contains("cooldown"), "{}", denied.reason);
    let cpu = r.downscale(1, 0).await;
    assert!(cpu.approved, "{}", cpu.reason);
    r.stop().await;
}

#[tokio::test]
async fn without_samples_downscale_is_denied_and_the_informant_keeps_serving() {
    let mut r = start(|g, _| std::fs::remove_file(g.proc().join("meminfo")).unwrap()).await;
    let h = r.client.handshake(handshake(1, 1)).await.unwrap().into_inner();
    let sampler = h.sources.iter().find(|s| s.name == "sampler").unwrap();
    assert!(!sampler.available && sampler.reason.contains("meminfo"), "{sampler:?}");
    let d = r
        .client
        .try_downscale(pb::DownscaleRequest {
            target_cpus: 0,
            target_memory_bytes: GIB,
            ..Default::default()
        })
        .await;
    let d = d.unwrap().into_inner();
    assert!(!d.approved);
    assert!(d.reason.starts_with("no stats yet"), "{}", d.reason);
    r.stop().await;
}

#[tokio::test]
async fn sysfs_mode_offlines_on_downscale_and_onlines_on_upscale() {
    let mut r = start(|g, c| {
        c.cpu_mode = CpuMode::Sysfs;
        g.add_cpu(2, true);
        g.add_cpu(3, true);
        g.add_memory_block(8, "offline");
    })
    .await;
    let h = r.client.handshake(handshake(1, 1)).await.unwrap().into_inner();
    assert!(h.cpu_sysfs_mode);

    let d = r.downscale(2, 0).await;
    assert!(d.approved, "{}", d.reason);
    let now = d.now.unwrap();
    assert_eq!((now.online_cpus, now.present_cpus), (2, 4));
    assert!(!r.guest.cpu_online(3) && !r.guest.cpu_online(2) && r.guest.cpu_online(1));

    let up = r.client.notify_upscale(notice(3, (9 * 128) << 20)).await;
    let up = up.unwrap().into_inner();
    assert_eq!(up.online_cpus, 3, "{up:?}");
    assert_eq!(up.memory_online_bytes, (9 * 128) << 20);
    assert!(up.warnings.is_empty(), "{:?}", up.warnings);
    assert!(r.guest.cpu_online(2) && !r.guest.cpu_online(3));
    assert_eq!(r.guest.block_state(8), "online_movable");

    // More than the guest has: answered after the wait, with a warning.
    let up = r.client.notify_upscale(notice(8, 0)).await.unwrap().into_inner();
    assert_eq!(up.online_cpus, 4);
    assert!(up.warnings.iter().any(|w| w.contains("less than the announced 8 CPUs")), "{:?}", up.warnings);
    r.stop().await;
}

#[tokio::test]
async fn hotplug_mode_leaves_cpus_to_the_agent() {
    let mut r = start(|g, _| {
        g.add_cpu(2, true);
        g.add_cpu(3, false); // hot-added, not yet online
    })
    .await;
    let d = r.downscale(1, 0).await;
    assert!(d.approved, "{}", d.reason);
    assert!(r.guest.cpu_online(2), "hotplug mode never offlines");
    let up = r.client.notify_upscale(notice(4, 0)).await.unwrap().into_inner();
    assert_eq!(up.online_cpus, 4);
    assert!(r.guest.cpu_online(3));
    r.stop().await;
}

/// One shipped config (hotplug) serves a TCG node whose agent runs the VM
/// in sysfs mode: the agent's cpu_mode wins over the config, per request;
/// an agent that says nothing gets the config's mode.
#[tokio::test]
async fn the_agents_cpu_mode_overrides_the_config() {
    let mut r = start(|g, c| {
        c.cpu_mode = CpuMode::Hotplug;
        g.add_cpu(2, true);
        g.add_cpu(3, true);
    })
    .await;
    let sysfs = pb::CpuMode::Sysfs as i32;
    let req = pb::DownscaleRequest { target_cpus: 2, target_memory_bytes: 0, cpu_mode: sysfs };
    let deadline = tokio::time::Instant::now() + WAIT;
    let d = loop {
        let d = r.client.try_downscale(req).await.unwrap().into_inner();
        if !d.reason.starts_with("no stats yet") || tokio::time::Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(d.approved, "{}", d.reason);
    assert!(!r.guest.cpu_online(3) && !r.guest.cpu_online(2), "sysfs from the agent offlines");

    let up = pb::UpscaleNotice { cpus: 3, memory_bytes: 0, cpu_mode: sysfs };
    let up = r.client.notify_upscale(up).await.unwrap().into_inner();
    assert_eq!(up.online_cpus, 3, "sysfs onlines up to the count: {up:?}");
    assert!(!r.guest.cpu_online(3));

    // Unsaid: the config's hotplug mode onlines whatever is there.
    let up = r.client.notify_upscale(notice(3, 0)).await.unwrap().into_inner();
    assert_eq!(up.online_cpus, 4, "{up:?}");
    // Hotplug said explicitly: never offlines.
    let hotplug = pb::CpuMode::Hotplug as i32;
    let d = r.client.try_downscale(pb::DownscaleRequest { cpu_mode: hotplug, ..req }).await.unwrap();
    assert!(d.get_ref().approved && r.guest.cpu_online(3), "{:?}", d.get_ref());

    let e = r.client.try_downscale(pb::DownscaleRequest { cpu_mode: 9, ..req }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cpu_mode = 9"), "{}", e.message());
    r.stop().await;
}

#[tokio::test]
async fn bad_messages_get_invalid_argument() {
    let mut r = start(|_, _| {}).await;
    let cases = [(0, 0, "both targets are 0"), (4000, 0, "milli-vCPU"), (0, u64::MAX, "unit is bytes")];
    for (cpus, mem, words) in cases {
        let e = r
            .client
            .try_downscale(pb::DownscaleRequest {
                target_cpus: cpus,
                target_memory_bytes: mem,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(words), "{}", e.message());
        let e = r.client.notify_upscale(notice(cpus, mem)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(words), "{}", e.message());
    }
    // The server is still fine.
    r.client.handshake(handshake(1, 1)).await.unwrap();
    r.stop().await;
}

#[tokio::test]
async fn serves_on_vsock() {
    let dir = tempfile::tempdir().unwrap();
    let guest = FakeGuest::create(dir.path());
    // A port unlikely to be taken; vsock has no port 0 of its own to ask for.
    let port = 40_000 + std::process::id() % 20_000;
    let addr = ListenAddr::Vsock { cid: VSOCK_CID_ANY, port };
    let listener = match Listener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            vmscale_informant::skip_unless_ci(&format!(
                "cannot bind {addr}: {}",
                vmscale_informant::error_chain(&e)
            ));
            return;
        }
    };
    assert!(listener.local_addr().ends_with(&format!(":{port}")), "{}", listener.local_addr());
    // This host has no vsock transport to connect through (no vhost-vsock,
    // no vsock_loopback): serving and stopping is what can be checked here.
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(Config { listen: addr, ..guest.config() }, listener, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!task.is_finished());
    stop.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap().unwrap();
}
