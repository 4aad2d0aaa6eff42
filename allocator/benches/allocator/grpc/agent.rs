//! A benchmark agent: one node's session over its own HTTP/2 connection, with
//! its requests scripted so that any number may be in flight.

use anyhow::{bail, Context};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use vmscale_allocator_client::channel;
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_message::Body as Reply;

const GIB: u64 = 1 << 30;
const VMS: usize = 64;
/// Room for all 64 VMs at twice their size: every request is granted.
const CAPACITY: pb::Resources = pb::Resources { milli_cpu: 64_000, memory_bytes: 256 * GIB };
const ONE_CU: pb::Resources = pb::Resources { milli_cpu: 250, memory_bytes: GIB };
const TWO_CUS: pb::Resources = pb::Resources { milli_cpu: 500, memory_bytes: 2 * GIB };
/// Messages that may wait to be sent on one session.
const QUEUE: usize = 1 << 16;

/// The sequence of requests of one agent: the k-th request is about VM
/// (k / 2) mod 64, an increase by one CU when k is even and the decrease back
/// when k is odd. A session answers in order, so the pairs stay valid however
/// many requests are in flight.
#[derive(Debug)]
pub struct Script {
    vms: Vec<String>,
    k: u64,
}

impl Script {
    /// The next request, carrying `stamp` as its request id.
    pub fn next(&mut self, stamp: u64) -> pb::AgentMessage {
        let k = self.k;
        self.k += 1;
        let vm_id = self.vms[usize::try_from(k / 2).unwrap_or(0) % VMS].clone();
        let body = if k.is_multiple_of(2) {
            Body::Reserve(pb::Reserve { vm_id, target: Some(TWO_CUS) })
        } else {
            Body::Release(pb::Release { vm_id, new_size: Some(ONE_CU) })
        };
        pb::AgentMessage { request_id: stamp, node: String::new(), body: Some(body) }
    }
}

/// Request ids carry the time a request was sent (closed loop) or was due
/// (open loop), in nanoseconds after `t0`, plus one (0 means "pushed").
pub fn stamp(t0: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(t0).as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

/// The latency of an answer, from the time stamped in its request id.
pub fn latency_ns(t0: Instant, request_id: u64, now: Instant) -> u64 {
    let due = t0 + Duration::from_nanos(request_id.saturating_sub(1));
    u64::try_from(now.saturating_duration_since(due).as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug)]
pub struct Agent {
    pub tx: mpsc::Sender<pb::AgentMessage>,
    pub rx: Streaming<pb::AllocatorMessage>,
    pub script: Script,
}

impl Agent {
    pub async fn open(addr: &str, node: String) -> anyhow::Result<Agent> {
        let vms: Vec<String> = (0..VMS).map(|v| format!("{node}-vm-{v}")).collect();
        let registrations = vms
            .iter()
            .map(|id| pb::VmRegistration {
                vm_id: id.clone(),
                current: Some(ONE_CU),
                last_permit: None,
                bounds: Some(pb::Bounds { min: Some(ONE_CU), max: Some(TWO_CUS) }),
                compute_unit: Some(ONE_CU),
                migration: None,
            })
            .collect();
        let hello = pb::Hello {
            versions: Some(pb::VersionRange { min: 1, max: 1 }),
            node,
            capacity: Some(CAPACITY),
            vms: registrations,
            agent: "allocator benchmark".into(),
            migration_endpoint: String::new(),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tx.send(pb::AgentMessage { request_id: 0, node: String::new(), body: Some(Body::Hello(hello)) })
            .await?;
        let mut client = pb::allocator_client::AllocatorClient::new(channel(addr).await?);
        let mut rx = client.session(ReceiverStream::new(rx)).await.context("session refused")?.into_inner();
        match rx.message().await? {
            Some(pb::AllocatorMessage { body: Some(Reply::Welcome(_)), .. }) => {}
            other => bail!("expected a welcome, got {other:?}"),
        }
        Ok(Agent { tx, rx, script: Script { vms, k: 0 } })
    }
}

/// The request id of the next answer (pushed messages are skipped); an error
/// answer fails the run.
pub async fn answer(rx: &mut Streaming<pb::AllocatorMessage>) -> anyhow::Result<u64> {
    loop {
        let m = rx.message().await?.context("the allocator ended the session")?;
        match m.body {
            Some(Reply::Permit(_) | Reply::Ack(_)) if m.request_id != 0 => return Ok(m.request_id),
            Some(Reply::Error(e)) => bail!("request refused: {}", e.message),
            _ => {}
        }
    }
}
