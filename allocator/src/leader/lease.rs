//! The I/O around [`Elector`]: reads the Lease every `renew_interval`, writes
//! what the elector decides, and publishes whether this replica leads.
//! Requests: `get`, `create` and `update` of one Lease (the RBAC in
//! deploy/kustomize/base/allocator-rbac.yaml grants exactly these).

use super::{Elector, Record, Step, Timing};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vmscale_common::error::chain;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "lost the lease {namespace}/{name} (not renewed within the deadline, or taken over); \
         exiting so that this replica restarts as a standby with an empty ledger"
    )]
    Lost { namespace: String, name: String },
}

/// Campaigns until `cancel`, then hands the Lease back if it holds it.
/// `leader` is true while this replica leads. Returns an error once a replica
/// that led stops leading: its ledger can no longer be trusted, and the
/// process should exit.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    leader: watch::Sender<bool>,
    cancel: CancellationToken,
) -> Result<(), LeaderError> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut elector = Elector::new(cfg.identity.clone(), cfg.timing);
    let start = Instant::now();
    let ms = || vmscale_common::time::millis(start.elapsed());
    // What we last wrote as holder, for the release.
    let mut ours: Option<Lease> = None;
    let mut tick = tokio::time::interval(cfg.timing.renew_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), identity = %cfg.identity, "campaigning for the lease");
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        // One round may take at most an interval, so a hung API server
        // cannot hold a leader past its deadline unnoticed.
        let round = tokio::time::timeout(cfg.timing.renew_interval, campaign(&api, &cfg, &mut elector, ms));
        match round.await {
            Ok(Ok(Some(written))) => ours = Some(written),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                elector.failed();
                warn!("lease {}/{}: {}", cfg.namespace, cfg.name, chain(&e));
            }
            Err(_) => {
                elector.failed();
                warn!(
                    "lease {}/{}: no answer within {:?}",
                    cfg.namespace, cfg.name, cfg.timing.renew_interval
                );
            }
        }
        let leading = elector.is_leader(ms());
        let was = leader.send_replace(leading);
        if leading && !was {
            info!(identity = %cfg.identity, "leading: serving agents and the scheduler");
        }
        if was && !leading {
            return Err(LeaderError::Lost { namespace: cfg.namespace.clone(), name: cfg.name.clone() });
        }
    }
    leader.send_replace(false);
    if let Some(mut lease) = ours {
        let rec = record(&lease);
        if let Some(released) = elector.release(&rec, wall_ms()) {
            lease.spec = Some(spec(&released));
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => info!("handed the lease back"),
                Err(e) => warn!("could not hand the lease back (the standby waits it out): {}", chain(&e)),
            }
        }
    }
    Ok(())
}

/// One read and at most one write; the Lease as written when we wrote one
/// as holder.
async fn campaign(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    elector: &mut Elector,
    ms: impl Fn() -> u64,
) -> Result<Option<Lease>, kube::Error> {
    let read = api.get_opt(&cfg.name).await?;
    let step = elector.observe(read.as_ref().map(record).as_ref(), ms(), wall_ms());
    let (written, rec) = match step {
        Step::Wait => return Ok(None),
        Step::Create(rec) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(&rec)),
            };
            (api.create(&PostParams::default(), &lease).await, rec)
        }
        Step::Update(rec) => {
            // The read's resourceVersion rides along: if another replica
            // wrote in between, this fails with a conflict instead of
            // overwriting it.
            let mut lease = read.unwrap_or_default();
            lease.spec = Some(spec(&rec));
            (api.replace(&cfg.name, &PostParams::default(), &lease).await, rec)
        }
    };
    match written {
        Ok(lease) => {
            elector.wrote(&rec, ms());
            Ok(Some(lease))
        }
        // Lost a race to another replica: not an error worth a warning.
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
            elector.failed();
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn wall_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

fn micro(ms: i64) -> Option<MicroTime> {
    Timestamp::from_millisecond(ms).ok().map(MicroTime)
}

pub fn record(lease: &Lease) -> Record {
    let s = lease.spec.clone().unwrap_or_default();
    Record {
        holder: s.holder_identity.filter(|h| !h.is_empty()),
        lease_duration_ms: s.lease_duration_seconds.map(|d| u64::try_from(d).unwrap_or(0) * 1000),
        acquire_ms: s.acquire_time.map(|t| t.0.as_millisecond()),
        renew_ms: s.renew_time.map(|t| t.0.as_millisecond()),
        transitions: s.lease_transitions.unwrap_or(0),
        version: lease.metadata.resource_version.clone(),
    }
}

pub fn spec(r: &Record) -> LeaseSpec {
    LeaseSpec {
        holder_identity: r.holder.clone(),
        lease_duration_seconds: r.lease_duration_ms.map(|d| i32::try_from(d / 1000).unwrap_or(i32::MAX)),
        acquire_time: r.acquire_ms.and_then(micro),
        renew_time: r.renew_ms.and_then(micro),
        lease_transitions: Some(r.transitions),
        ..LeaseSpec::default()
    }
}
