//! The gRPC edge: converts, asks the pure parts, does the sysfs work on the
//! blocking pool, and answers. One agent at a time: a new subscription
//! replaces the old one, whose stream ends with `ABORTED` saying so.

use crate::config::{Config, CpuMode};
use crate::convert::{cpu_mode, version_range, UpscaleTarget};
use crate::downscale::{self, DownscaleTarget, Policy};
use crate::event::monotonic_ns;
use crate::guest::{Guest, GuestResources};
use crate::hotplug_settings::HotplugSettings;
use crate::hub::{EndReason, Hub, Subscription};
use crate::source::SourceStatus;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_server::Informant;

#[derive(Debug)]
pub struct InformantService {
    hub: Arc<Hub>,
    statuses: Vec<SourceStatus>,
    guest: Guest,
    cpu_mode: CpuMode,
    /// Guest kernel settings that make scaling worse, for the handshake.
    guest_notes: Vec<String>,
    policy: Policy,
    upscale_wait: Duration,
    /// Serialises sysfs changes: an upscale and a downscale never interleave.
    guest_lock: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
}

impl InformantService {
    pub fn new(
        config: &Config,
        hub: Arc<Hub>,
        statuses: Vec<SourceStatus>,
        shutdown: CancellationToken,
    ) -> Self {
        let guest_notes = HotplugSettings::read(&config.sys_root).notes();
        for note in &guest_notes {
            warn!(%note, "a guest kernel setting makes scaling worse");
        }
        InformantService {
            hub,
            statuses,
            guest: Guest::new(&config.proc_root, &config.sys_root),
            cpu_mode: config.cpu_mode,
            guest_notes,
            policy: Policy::from(&config.downscale),
            upscale_wait: Duration::from_millis(config.upscale_wait_ms),
            guest_lock: tokio::sync::Mutex::new(()),
            shutdown,
        }
    }
}

impl InformantService {
    /// The CPU mode of one request: the agent's word (it knows how the VM
    /// runs) or, from an agent that does not say, this informant's config.
    fn mode(&self, wire: i32) -> Result<CpuMode, Status> {
        Ok(cpu_mode(wire)?.unwrap_or(self.cpu_mode))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("guest work failed: {e}")))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

fn event_stream(sub: Subscription, shutdown: CancellationToken) -> EventStream {
    Box::pin(futures::stream::unfold(Some((sub, shutdown)), |state| async move {
        let (mut sub, shutdown) = state?;
        tokio::select! {
            biased;
            why = &mut sub.ended => {
                let status = match why {
                    Ok(EndReason::Replaced) => Status::aborted(
                        "replaced by a newer subscription: the informant serves one agent at a time",
                    ),
                    Err(_) => Status::unavailable("the informant ended this subscription"),
                };
                Some((Err(status), None))
            }
            () = shutdown.cancelled() => Some((Err(Status::unavailable("the informant is shutting down")), None)),
            d = sub.events.recv() => d.map(|d| (Ok(pb::Event::from(d)), Some((sub, shutdown)))),
        }
    }))
}

#[tonic::async_trait]
impl Informant for InformantService {
    #[instrument(skip_all, fields(agent = %req.get_ref().agent))]
    async fn handshake(
        &self,
        req: Request<pb::HandshakeRequest>,
    ) -> Result<Response<pb::HandshakeResponse>, Status> {
        let req = req.into_inner();
        let (min, max) = version_range(req.versions.as_ref())?;
        let ours = vmscale_proto::INFORMANT_PROTOCOL;
        let Some(version) = vmscale_proto::negotiate(&ours, min, max) else {
            warn!(min, max, "no common protocol version");
            return Err(Status::failed_precondition(format!(
                "no common protocol version: the agent speaks {min}..={max}, this informant {}..={}; \
                 upgrade the older of the two",
                ours.start(),
                ours.end()
            )));
        };
        info!(version, "handshake");
        Ok(Response::new(pb::HandshakeResponse {
            version,
            sources: self.statuses.iter().map(pb::SourceStatus::from).collect(),
            informant_version: env!("CARGO_PKG_VERSION").to_owned(),
            cpu_sysfs_mode: self.cpu_mode == CpuMode::Sysfs,
            guest_notes: self.guest_notes.clone(),
        }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(&self, _req: Request<pb::SubscribeRequest>) -> Result<Response<EventStream>, Status> {
        let sub = self.hub.subscribe();
        Ok(Response::new(event_stream(sub, self.shutdown.clone())))
    }

    #[instrument(skip_all)]
    async fn try_downscale(
        &self,
        req: Request<pb::DownscaleRequest>,
    ) -> Result<Response<pb::DownscaleResponse>, Status> {
        let target = DownscaleTarget::try_from(req.get_ref())?;
        let mode = self.mode(req.get_ref().cpu_mode)?;
        let _guard = self.guest_lock.lock().await;
        let d = downscale::decide(&target, &self.hub.observations(), &self.policy, monotonic_ns());
        let offline_to = target.cpus.filter(|_| d.approved && mode == CpuMode::Sysfs);
        let guest = self.guest.clone();
        let now = blocking(move || {
            let warnings = offline_to.map(|n| guest.offline_cpus(n)).unwrap_or_default();
            let mut r = guest.resources();
            r.warnings.extend(warnings);
            r
        })
        .await?;
        let (mut approved, mut reason) = (d.approved, d.reason);
        if let Some(n) = offline_to.filter(|&n| now.online_cpus > n) {
            approved = false;
            reason = format!(
                "could not take the guest down to {n} CPUs, {} are still online ({}); nothing else was changed",
                now.online_cpus,
                now.warnings.join("; ")
            );
        }
        info!(?target, ?mode, approved, %reason, "downscale decided");
        Ok(Response::new(pb::DownscaleResponse { approved, reason, now: Some(now.into()) }))
    }

    #[instrument(skip_all)]
    async fn notify_upscale(
        &self,
        req: Request<pb::UpscaleNotice>,
    ) -> Result<Response<pb::GuestResources>, Status> {
        let target = UpscaleTarget::try_from(req.get_ref())?;
        let mode = self.mode(req.get_ref().cpu_mode)?;
        let _guard = self.guest_lock.lock().await;
        // In sysfs mode, online only up to the new count; otherwise, whatever arrived.
        let cpus = match (mode, target.cpus) {
            (CpuMode::Hotplug, _) => Some(None),
            (CpuMode::Sysfs, Some(n)) => Some(Some(n)),
            (CpuMode::Sysfs, None) => None,
        };
        let (want_cpus, want_memory) = (target.cpus.unwrap_or(0), target.memory_bytes.unwrap_or(0));
        let deadline = tokio::time::Instant::now() + self.upscale_wait;
        let r = loop {
            let guest = self.guest.clone();
            let (r, arrived): (GuestResources, bool) = blocking(move || {
                let mut warnings = guest.online_memory();
                if let Some(up_to) = cpus {
                    warnings.extend(guest.online_cpus(up_to));
                }
                let mut r = guest.resources();
                r.warnings.extend(warnings);
                let arrived = guest.has_arrived(&r, want_cpus, want_memory);
                (r, arrived)
            })
            .await?;
            if arrived {
                break r;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut r = r;
                r.warnings.push(format!(
                    "after {} ms the guest shows {} CPUs and {} online, less than the announced {} CPUs and {}",
                    self.upscale_wait.as_millis(),
                    r.online_cpus,
                    downscale::bytes(r.memory_online_bytes),
                    want_cpus,
                    downscale::bytes(want_memory)
                ));
                break r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if r.warnings.is_empty() {
            info!(
                ?target,
                online_cpus = r.online_cpus,
                memory_online_bytes = r.memory_online_bytes,
                "upscale online"
            );
        } else {
            warn!(?target, online_cpus = r.online_cpus, "upscale incomplete: {}", r.warnings.join("; "));
        }
        Ok(Response::new(r.into()))
    }
}
