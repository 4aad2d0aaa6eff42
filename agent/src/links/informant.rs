//! The agent's connection to one VM's informant: handshake, the event
//! subscription turned into core inputs, and the two questions the loop asks
//! (may I shrink? / here is more, bring it online) behind the narrow
//! [`GuestLink`] trait, so the loop's tests use [`fake::FakeGuest`].
//! Reconnects with backoff; while it is down the core knows (no informant,
//! no memory downscale). Wire types stop here: the pressure kind's number
//! becomes a [`PressureKind`]. How the bytes get there (TCP, vsock, a
//! vhost-user vsock backend's socket) is [`super::dial`]'s.

use super::dial::{self, DialError, InformantAddr};
use crate::core::policy::Usage;
use crate::core::pressure::PressureKind;
use crate::vms::CpuMode;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};
use vmscale_common::backoff::{seed_of, Backoff};
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_client::InformantClient;
use vmscale_proto::informant::pressure::Kind;

/// What the guest told us, as the core wants it.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestEvent {
    /// `mem_total_bytes`: the guest's `MemTotal` (0 when not reported).
    Sample {
        usage: Usage,
        mem_total_bytes: u64,
        at_ns: u64,
    },
    Pressure {
        kind: PressureKind,
        at_ns: u64,
    },
}

/// The informant's answer to a downscale request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownscaleAnswer {
    pub approved: bool,
    /// Why not, in the guest's words, when denied.
    pub reason: String,
}

/// A request the informant refused or could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("informant: {message}")]
pub struct RequestError {
    pub message: String,
}

impl From<tonic::Status> for RequestError {
    fn from(s: tonic::Status) -> Self {
        RequestError { message: s.message().to_owned() }
    }
}

/// What the VM loop asks of a guest.
#[async_trait::async_trait]
pub trait GuestLink: Send + Sync + std::fmt::Debug {
    /// Tells the guest it has `vcpus` vCPUs and `memory_bytes` of memory now,
    /// so that it onlines what was plugged.
    async fn notify_upscale(&self, vcpus: u32, memory_bytes: u64) -> Result<(), RequestError>;

    /// Asks whether the guest can give its memory up down to `memory_bytes`
    /// and keep `vcpus` vCPUs online (0: its CPUs are not asked about). An
    /// approving guest has given the vCPUs up when it answers.
    async fn ask_downscale(&self, vcpus: u32, memory_bytes: u64) -> Result<DownscaleAnswer, RequestError>;
}

const RECONNECT: Backoff = Backoff::from_ms(100, 5000);

/// The live link to the guest, if any.
pub type Link = Option<Arc<dyn GuestLink>>;

/// The gRPC client as a [`GuestLink`], telling the informant the VM's CPU
/// mode with every request (it is how the VM runs, which the agent knows).
#[derive(Debug, Clone)]
struct Informant {
    client: InformantClient<Channel>,
    cpu_mode: pb::CpuMode,
}

/// The VM spec's CPU mode on the wire.
pub fn wire_cpu_mode(m: CpuMode) -> pb::CpuMode {
    match m {
        CpuMode::Hotplug => pb::CpuMode::Hotplug,
        CpuMode::Sysfs => pb::CpuMode::Sysfs,
    }
}

impl Informant {
    fn upscale_notice(&self, vcpus: u32, memory_bytes: u64) -> pb::UpscaleNotice {
        pb::UpscaleNotice { cpus: vcpus, memory_bytes, cpu_mode: self.cpu_mode.into() }
    }

    fn downscale_request(&self, vcpus: u32, memory_bytes: u64) -> pb::DownscaleRequest {
        pb::DownscaleRequest {
            target_cpus: vcpus,
            target_memory_bytes: memory_bytes,
            cpu_mode: self.cpu_mode.into(),
        }
    }
}

#[async_trait::async_trait]
impl GuestLink for Informant {
    async fn notify_upscale(&self, vcpus: u32, memory_bytes: u64) -> Result<(), RequestError> {
        self.client.clone().notify_upscale(self.upscale_notice(vcpus, memory_bytes)).await?;
        Ok(())
    }

    async fn ask_downscale(&self, vcpus: u32, memory_bytes: u64) -> Result<DownscaleAnswer, RequestError> {
        let req = self.downscale_request(vcpus, memory_bytes);
        let r = self.client.clone().try_downscale(req).await?.into_inner();
        Ok(DownscaleAnswer { approved: r.approved, reason: r.reason })
    }
}

/// The guest's side of one VM loop: its events, its link (`None` while
/// down) and its notes on its kernel settings.
#[derive(Debug)]
pub struct GuestChannels {
    pub events: mpsc::Receiver<GuestEvent>,
    pub link: watch::Receiver<Link>,
    pub notes: watch::Receiver<Vec<String>>,
}

impl GuestChannels {
    /// Keeps a link to the informant at `addr` until `cancel`, telling it
    /// the VM's `cpu_mode`; without an address, a guest that never connects.
    pub fn connect(
        addr: Option<InformantAddr>,
        security: dial::TcpSecurity,
        cpu_mode: CpuMode,
        cancel: CancellationToken,
    ) -> GuestChannels {
        let (events_tx, events) = mpsc::channel(1024);
        let (link_tx, link) = watch::channel(None);
        let (notes_tx, notes) = watch::channel(Vec::new());
        if let Some(addr) = addr {
            let guest = LinkEnds { cpu_mode, security, events: events_tx, link: link_tx, notes: notes_tx };
            tokio::spawn(run(addr, guest, cancel));
        }
        GuestChannels { events, link, notes }
    }
}

/// What [`run`] feeds: the loop's ends of its guest channels, and the CPU
/// mode the link tells the informant.
#[derive(Debug)]
pub struct LinkEnds {
    pub cpu_mode: CpuMode,
    /// TLS or plain text on TCP.
    pub security: dial::TcpSecurity,
    pub events: mpsc::Sender<GuestEvent>,
    pub link: watch::Sender<Link>,
    /// The guest's notes on its kernel settings, at each connection.
    pub notes: watch::Sender<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("the informant refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("no common protocol version with the informant: it speaks {min}..={max}")]
    Version { min: u32, max: u32 },
}

/// The kind a wire number names; numbers this agent does not know are one
/// kind, [`PressureKind::Unknown`].
pub fn pressure_kind(wire: i32) -> PressureKind {
    match Kind::try_from(wire) {
        Ok(Kind::Unspecified) => PressureKind::Unspecified,
        Ok(Kind::DirectReclaim) => PressureKind::DirectReclaim,
        Ok(Kind::MemcgReclaim) => PressureKind::MemcgReclaim,
        Ok(Kind::KswapdWake) => PressureKind::KswapdWake,
        Ok(Kind::OomVictim) => PressureKind::OomVictim,
        Ok(Kind::PsiMemory) => PressureKind::PsiMemory,
        Ok(Kind::PsiCpu) => PressureKind::PsiCpu,
        Ok(Kind::PsiCgroupMemory) => PressureKind::PsiCgroupMemory,
        Ok(Kind::CgroupHigh) => PressureKind::CgroupHigh,
        Ok(Kind::CgroupMax) => PressureKind::CgroupMax,
        Ok(Kind::CgroupOom) => PressureKind::CgroupOom,
        Ok(Kind::CgroupOomKill) => PressureKind::CgroupOomKill,
        Ok(Kind::UsageWatermark) => PressureKind::UsageWatermark,
        Err(_) => PressureKind::Unknown,
    }
}

/// Turns one wire event into a core input; `None` for events the core does
/// not use.
pub fn to_guest_event(e: &pb::Event) -> Option<GuestEvent> {
    match &e.body {
        Some(pb::event::Body::Sample(s)) => {
            // What the guest cannot give back right now: the workload's own
            // anonymous memory, or everything not available, whichever is more.
            let used = s.mem_total_bytes.saturating_sub(s.mem_available_bytes).max(s.workload_anon_bytes);
            Some(GuestEvent::Sample {
                usage: Usage { load_avg_1: s.load_avg_1, memory_used_bytes: used },
                mem_total_bytes: s.mem_total_bytes,
                at_ns: e.monotonic_ns,
            })
        }
        Some(pb::event::Body::Pressure(p)) => {
            Some(GuestEvent::Pressure { kind: pressure_kind(p.kind), at_ns: e.monotonic_ns })
        }
        None => None,
    }
}

/// Connects and shakes hands; the client and the guest's notes on its
/// kernel settings (logged here, shown in the VM's status).
async fn connect(
    addr: &InformantAddr,
    security: &dial::TcpSecurity,
) -> Result<(InformantClient<Channel>, Vec<String>), LinkError> {
    let mut c = InformantClient::new(dial::channel(addr, security).await?);
    let ours = vmscale_proto::INFORMANT_PROTOCOL;
    let hs = c
        .handshake(pb::HandshakeRequest {
            versions: Some(pb::VersionRange { min: *ours.start(), max: *ours.end() }),
            agent: format!("vmscale-agent {}", env!("CARGO_PKG_VERSION")),
        })
        .await?
        .into_inner();
    if !ours.contains(&hs.version) {
        return Err(LinkError::Version { min: hs.version, max: hs.version });
    }
    for s in hs.sources.iter().filter(|s| !s.available) {
        info!(%addr, source = %s.name, reason = %s.reason, "informant runs without a source");
    }
    for note in &hs.guest_notes {
        warn!(%addr, %note, "a guest kernel setting makes scaling worse");
    }
    Ok((c, hs.guest_notes))
}

/// Keeps one VM's informant connection until `cancel`.
pub async fn run(addr: InformantAddr, guest: LinkEnds, cancel: CancellationToken) {
    let LinkEnds { cpu_mode, security, events, link: client_tx, notes: notes_tx } = guest;
    let cpu_mode = wire_cpu_mode(cpu_mode);
    let seed = seed_of(&addr.to_string());
    let mut failures: u32 = 0;
    loop {
        let attempt = async {
            let (mut c, notes) = connect(&addr, &security).await?;
            let stream = c.subscribe(pb::SubscribeRequest {}).await?.into_inner();
            notes_tx.send_replace(notes);
            Ok::<_, LinkError>((c, stream))
        };
        let r = tokio::select! {
            () = cancel.cancelled() => return,
            r = attempt => r,
        };
        match r {
            Ok((c, mut stream)) => {
                failures = 0;
                client_tx.send_replace(Some(Arc::new(Informant { client: c, cpu_mode })));
                info!(%addr, "informant connected");
                let why = loop {
                    tokio::select! {
                        () = cancel.cancelled() => {
                            client_tx.send_replace(None);
                            return;
                        }
                        m = stream.message() => match m {
                            Ok(Some(e)) => {
                                if let Some(g) = to_guest_event(&e) {
                                    if events.send(g).await.is_err() {
                                        return; // the VM loop is gone
                                    }
                                }
                            }
                            Ok(None) => break "stream ended".to_owned(),
                            Err(s) => break format!("{:?}: {}", s.code(), s.message()),
                        }
                    }
                };
                client_tx.send_replace(None);
                warn!(%addr, reason = %why, "informant disconnected; reconnecting");
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(%addr, failures, "cannot reach the informant: {}", vmscale_common::error::Chain(&e));
                }
            }
        }
        // 100 ms after a dropped connection, doubling per failure to 5 s.
        let wait = RECONNECT.jittered(failures.saturating_add(1), seed);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_map_to_core_inputs() {
        let sample = pb::Event {
            monotonic_ns: 5,
            source: "sampler".into(),
            dropped: 0,
            body: Some(pb::event::Body::Sample(pb::Sample {
                workload_anon_bytes: 100,
                mem_available_bytes: 600,
                mem_total_bytes: 1000,
                load_avg_1: 1.5,
                ..Default::default()
            })),
        };
        let Some(GuestEvent::Sample { usage, mem_total_bytes, at_ns }) = to_guest_event(&sample) else {
            panic!()
        };
        assert_eq!((usage.memory_used_bytes, mem_total_bytes, at_ns), (400, 1000, 5));
        let oom = pb::Event {
            monotonic_ns: 9,
            source: "ebpf".into(),
            dropped: 0,
            body: Some(pb::event::Body::Pressure(pb::Pressure {
                kind: Kind::OomVictim as i32,
                count: 1,
                stall_ns: 0,
                pid: 42,
            })),
        };
        let kind = PressureKind::OomVictim;
        assert_eq!(to_guest_event(&oom), Some(GuestEvent::Pressure { kind, at_ns: 9 }));
        assert_eq!(to_guest_event(&pb::Event::default()), None);
    }

    /// The VM spec's CPU mode goes with every request, so the informant's
    /// own config does not decide how this VM's CPUs scale.
    #[tokio::test]
    async fn requests_carry_the_vms_cpu_mode() {
        let client = InformantClient::new(tonic::transport::Endpoint::from_static("http://x").connect_lazy());
        for (mode, wire) in [(CpuMode::Sysfs, pb::CpuMode::Sysfs), (CpuMode::Hotplug, pb::CpuMode::Hotplug)] {
            let link = Informant { client: client.clone(), cpu_mode: wire_cpu_mode(mode) };
            let up = link.upscale_notice(2, 1 << 30);
            assert_eq!((up.cpus, up.memory_bytes, up.cpu_mode()), (2, 1 << 30, wire));
            let down = link.downscale_request(1, 1 << 29);
            assert_eq!((down.target_cpus, down.target_memory_bytes, down.cpu_mode()), (1, 1 << 29, wire));
        }
    }

    /// Every wire kind has its name; any number past them is `unknown`, so
    /// a guest cannot grow the VM's status map one key per number.
    #[test]
    fn wire_kinds_become_typed_kinds() {
        for wire in 0..=12 {
            let k = Kind::try_from(wire).unwrap();
            let name = k.as_str_name().trim_start_matches("KIND_").to_lowercase();
            assert_eq!(pressure_kind(wire).name(), name, "{k:?}");
        }
        for unknown in [13, 999, -1, i32::MAX] {
            assert_eq!(pressure_kind(unknown), PressureKind::Unknown);
        }
    }
}

/// A scripted guest for the VM loop's tests.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::sync::Mutex;

    /// Records each request (`notify_upscale(2, 1073741824)`,
    /// `ask_downscale(1, 536870912)`) and approves downscales when told to.
    #[derive(Debug, Default)]
    pub struct FakeGuest {
        pub calls: Mutex<Vec<String>>,
        pub approve: std::sync::atomic::AtomicBool,
    }

    impl FakeGuest {
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        fn record(&self, call: String) {
            self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(call);
        }
    }

    #[async_trait::async_trait]
    impl GuestLink for FakeGuest {
        async fn notify_upscale(&self, vcpus: u32, memory_bytes: u64) -> Result<(), RequestError> {
            self.record(format!("notify_upscale({vcpus}, {memory_bytes})"));
            Ok(())
        }

        async fn ask_downscale(
            &self,
            vcpus: u32,
            memory_bytes: u64,
        ) -> Result<DownscaleAnswer, RequestError> {
            self.record(format!("ask_downscale({vcpus}, {memory_bytes})"));
            let approved = self.approve.load(std::sync::atomic::Ordering::SeqCst);
            Ok(DownscaleAnswer { approved, reason: if approved { String::new() } else { "busy".into() } })
        }
    }

    /// The loop's end of a guest and the test's: send events, connect the
    /// guest (or not) and read its notes.
    #[derive(Debug)]
    pub struct GuestEnds {
        pub events: mpsc::Sender<GuestEvent>,
        pub link: watch::Sender<Link>,
        pub notes: watch::Sender<Vec<String>>,
    }

    pub fn channels() -> (GuestChannels, GuestEnds) {
        let (events_tx, events) = mpsc::channel(1024);
        let (link_tx, link) = watch::channel(None);
        let (notes_tx, notes) = watch::channel(Vec::new());
        (
            GuestChannels { events, link, notes },
            GuestEnds { events: events_tx, link: link_tx, notes: notes_tx },
        )
    }
}
