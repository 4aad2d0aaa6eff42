//! Attacks across the agent-informant link, both ways: a guest (a fake
//! informant the agent dials) that floods the agent with event kinds it has
//! never heard of, and a peer that is not the host calling a real informant.

use super::super::hostile::status_words;
use super::super::http::Via;
use super::super::lab::{scratch, until, Agent, Allocator, BareQemu, GIB};
use super::super::report::Attack;
use super::super::tls::{channel, Creds, Pki};
use anyhow::Context;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use vmscale_agent::vms::InformantAddr;
use vmscale_common::tls::{Identity, Tls};
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_server::{Informant, InformantServer};

pub async fn run(quick: bool) -> anyhow::Result<Vec<Attack>> {
    let events = if quick { 100_000 } else { 1_000_000 };
    let flood = match unknown_kinds(events).await {
        Ok(a) => a,
        Err(e) => Attack::could_not_run("informant-flood-of-unknown-event-kinds", &e),
    };
    let mut out = vec![flood];
    match not_the_host().await {
        Ok(a) => out.extend(a),
        Err(e) => out.push(Attack::could_not_run("informant-calls-from-peers-not-the-host", &e)),
    }
    Ok(out)
}

/// A real agent scales a (bare) VM whose informant is the audit's: it sends
/// `n` pressure events, each of a kind no agent knows. Refused when the
/// agent keeps them as one kind and its memory stays bounded.
async fn unknown_kinds(n: u32) -> anyhow::Result<Attack> {
    let name = "informant-flood-of-unknown-event-kinds";
    let dir = scratch("informant-flood")?;
    let pki = Pki::new(&dir)?;
    let config = vmscale_allocator::config::Config {
        tls: Some(pki.files(&Identity::Allocator)?),
        insecure: false,
        ..Allocator::config()
    };
    let alloc = Allocator::start(config, Via::Plain).await?;
    let informant = super::super::lab::listen().await?;
    let informant_port = informant.local_addr()?.port();
    // The guest holds the informant's real certificate: the agent trusts
    // the link, not what comes over it.
    let tls = Tls::load(&pki.files(&Identity::Informant)?).context("the fake informant's certificate")?;
    let stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .tls_config(tls.server_config())
        .context("the fake informant's TLS")?
        .add_service(InformantServer::new(FloodingGuest { events: n }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(informant),
            stop.clone().cancelled_owned(),
        );
    tokio::spawn(server);
    let _stop = stop.drop_guard();
    let qemu = BareQemu::start(&dir, "vm-flood").await?;
    let spec =
        qemu.spec("vm-flood", Some(InformantAddr::Https { host: "127.0.0.1".into(), port: informant_port }));
    let rss_before = rss_kib();
    let node_a = Some(pki.files(&Identity::Node("node-a".into()))?);
    let agent = Agent::start(&dir, "node-a", &alloc.url(), node_a, &[spec], (8000, 8 * GIB), None).await?;
    let a = &agent;
    let seen = until("the agent to count the flood", Duration::from_secs(300), || async move {
        let s = a.state().await.ok()?;
        let vm = s.get("vms")?.get("vm-flood")?;
        let count = vm.get("pressure_events")?.as_u64()?;
        let kinds = vm.get("pressure_kinds")?.as_object()?.len();
        (count >= u64::from(n)).then_some((count, kinds))
    })
    .await;
    let grew_mib = rss_kib().saturating_sub(rss_before) / 1024;
    drop(agent);
    let (count, kinds) = seen?;
    // Every kind the protocol names, plus one for all the others.
    let bounded = kinds <= 14 && grew_mib < 256;
    Ok(Attack::judge(
        name,
        bounded,
        format!(
            "{count} events of {n} unknown kinds counted as {kinds} kinds; this process grew {grew_mib} MiB"
        ),
        None,
    ))
}

/// This process's resident memory, KiB (0 when unreadable).
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A real informant on TCP with mutual TLS, called by clients that are not
/// the host's agent: in plain text, and over TLS without a certificate.
/// Each refused when its call is.
async fn not_the_host() -> anyhow::Result<Vec<Attack>> {
    let dir = scratch("informant-peer")?;
    let pki = Pki::new(&dir)?;
    let l = super::super::lab::listen().await?;
    let addr = l.local_addr()?;
    // No eBPF and an empty sysfs: the informant touches nothing of the host.
    let config = vmscale_informant::config::Config {
        listen: vmscale_informant::config::ListenAddr::Tcp(addr),
        sys_root: dir.clone(),
        ebpf: false,
        tls: Some(pki.files(&Identity::Informant)?),
        insecure: false,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let serving = tokio::spawn(vmscale_informant::server::serve(
        config,
        vmscale_informant::server::Listener::Tcp(l),
        stop.clone(),
    ));
    let _stop = stop.drop_guard();
    // It waits out the server's handshake timeout: meanwhile the rest run.
    let stalled = tokio::spawn(super::super::hostile::stalled(
        "informant-connection-that-never-starts-tls",
        "the informant",
        addr,
    ));
    let mut out = Vec::new();
    let anonymous = pki.no_certificate();
    let host = pki.creds(&Identity::Node("node-a".into()))?;
    // Last, the host's agent: it must be answered, else the refusals
    // before it prove nothing.
    let cases: [(&str, Option<&Creds>); 3] = [
        ("informant-call-in-plain-text", None),
        ("informant-call-without-a-certificate", Some(&anonymous)),
        ("control", Some(&host)),
    ];
    for (name, creds) in cases {
        let call = async {
            let ch = channel(addr, &Identity::Informant, creds).await?;
            let hs = pb::informant_client::InformantClient::new(ch)
                .handshake(pb::HandshakeRequest {
                    versions: Some(pb::VersionRange { min: 1, max: 1 }),
                    agent: "vmscale audit (hostile)".into(),
                })
                .await;
            anyhow::Ok(hs)
        };
        let answer = tokio::time::timeout(Duration::from_secs(20), call).await;
        if name == "control" {
            if !matches!(answer, Ok(Ok(Ok(_)))) {
                let why = anyhow::anyhow!("the host's own agent was not answered ({answer:?}): the refusals above may prove nothing");
                out.push(Attack::could_not_run("informant-control", &why));
            }
            continue;
        }
        out.push(match answer {
            Err(_) => Attack::judge(name, true, "no answer within 20 s", None),
            Ok(Err(e)) => Attack::judge(name, true, format!("cannot connect: {e:#}"), None),
            Ok(Ok(Err(s))) => Attack::judge(name, true, status_words(&s), None),
            Ok(Ok(Ok(r))) => Attack::judge(
                name,
                false,
                format!("handshake answered (informant {})", r.into_inner().informant_version),
                None,
            ),
        });
    }
    out.push(stalled.await?);
    if serving.is_finished() {
        anyhow::bail!("the informant stopped: {:?}", serving.await);
    }
    Ok(out)
}

/// A guest that sends `events` pressure events of kinds no agent knows,
/// then stays connected.
#[derive(Debug, Clone)]
struct FloodingGuest {
    events: u32,
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl Informant for FloodingGuest {
    async fn handshake(
        &self,
        _: Request<pb::HandshakeRequest>,
    ) -> Result<Response<pb::HandshakeResponse>, Status> {
        Ok(Response::new(pb::HandshakeResponse {
            version: 1,
            sources: vec![],
            informant_version: "flooding guest".into(),
            cpu_sysfs_mode: true,
            guest_notes: vec![],
        }))
    }

    type SubscribeStream = Events;

    async fn subscribe(&self, _: Request<pb::SubscribeRequest>) -> Result<Response<Events>, Status> {
        let n = self.events;
        let events = tokio_stream::iter(0..n).map(|i| {
            Ok(pb::Event {
                monotonic_ns: u64::from(i),
                source: "flood".into(),
                body: Some(pb::event::Body::Pressure(pb::Pressure {
                    // Past every kind the protocol names, each one new.
                    kind: i32::try_from(i).unwrap_or(i32::MAX).saturating_add(1000),
                    count: 1,
                    stall_ns: 0,
                    pid: 0,
                })),
                dropped: 0,
            })
        });
        Ok(Response::new(Box::pin(events.chain(tokio_stream::pending()))))
    }

    async fn try_downscale(
        &self,
        _: Request<pb::DownscaleRequest>,
    ) -> Result<Response<pb::DownscaleResponse>, Status> {
        Ok(Response::new(pb::DownscaleResponse {
            approved: false,
            reason: "flooding guest".into(),
            now: None,
        }))
    }

    async fn notify_upscale(
        &self,
        r: Request<pb::UpscaleNotice>,
    ) -> Result<Response<pb::GuestResources>, Status> {
        let r = r.into_inner();
        Ok(Response::new(pb::GuestResources {
            online_cpus: r.cpus.max(1),
            memory_total_bytes: r.memory_bytes,
            memory_online_bytes: r.memory_bytes,
            warnings: vec![],
            present_cpus: r.cpus.max(1),
        }))
    }
}
