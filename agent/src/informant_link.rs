//! The agent's connection to one VM's informant: handshake, the event
//! subscription turned into core inputs, and the two questions the loop asks
//! (may I shrink? / here is more, bring it online). Reconnects with backoff;
//! while it is down the core knows (no informant, no memory downscale).

use crate::core::policy::Usage;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};
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
        oom: bool,
        kind: i32,
        at_ns: u64,
    },
}

pub type Client = Option<InformantClient<Channel>>;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("bad informant address {addr:?}")]
    Address {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to the informant at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the informant refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("no common protocol version with the informant: it speaks {min}..={max}")]
    Version { min: u32, max: u32 },
}

/// Whether an event calls for the larger (OOM) growth step.
pub fn is_oom(kind: i32) -> bool {
    matches!(
        Kind::try_from(kind),
        Ok(Kind::OomVictim | Kind::CgroupOom | Kind::CgroupOomKill | Kind::CgroupMax)
    )
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
            Some(GuestEvent::Pressure { oom: is_oom(p.kind), kind: p.kind, at_ns: e.monotonic_ns })
        }
        None => None,
    }
}

/// Connects and shakes hands; the client and the guest's notes on its
/// kernel settings (logged here, shown in the VM's status).
async fn connect(addr: &str) -> Result<(InformantClient<Channel>, Vec<String>), LinkError> {
    let ep = Endpoint::from_shared(addr.to_owned())
        .map_err(|source| LinkError::Address { addr: addr.to_owned(), source })?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10));
    let ch = ep.connect().await.map_err(|source| LinkError::Connect { addr: addr.to_owned(), source })?;
    let mut c = InformantClient::new(ch);
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

/// Keeps one VM's informant connection until `cancel`; `notes_tx` gets the
/// guest's notes on its kernel settings at each connection.
pub async fn run(
    addr: String,
    events: mpsc::Sender<GuestEvent>,
    client_tx: watch::Sender<Client>,
    notes_tx: watch::Sender<Vec<String>>,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let attempt = async {
            let (mut c, notes) = connect(&addr).await?;
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
                client_tx.send_replace(Some(c));
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
                    warn!(%addr, failures, "cannot reach the informant: {e}");
                }
            }
        }
        let wait = Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)).min(5000));
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
        assert!(matches!(to_guest_event(&oom), Some(GuestEvent::Pressure { oom: true, .. })));
        assert!(!is_oom(Kind::MemcgReclaim as i32));
        assert!(!is_oom(999));
        assert_eq!(to_guest_event(&pb::Event::default()), None);
    }
}
