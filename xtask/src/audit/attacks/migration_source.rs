//! Attacks on a real source agent from the target it was ordered to move a
//! VM to: a target node of the attacker's whose `Prepare` answers with a
//! stream address QEMU must never be handed: `exec:` (QEMU runs it with
//! /bin/sh), `file:` (guest RAM written anywhere), or `tcp:` to an address
//! that is not the target's. The VM is a bare QEMU the real agent scales.

use super::super::hostile::{connect_open, hello, status_words};
use super::super::http::Via;
use super::super::lab::{scratch, until, Agent, Allocator, BareQemu, GIB};
use super::super::report::Attack;
use super::super::state::{agent_view, diff, ledger_view};
use super::super::tls::Pki;
use anyhow::Context;
use serde_json::Value;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use vmscale_common::tls::{Identity, Tls};
use vmscale_proto::migration as pb;
use vmscale_proto::migration::migration_target_server::{MigrationTarget, MigrationTargetServer};

const TARGET: &str = "audit-tgt";

/// One hostile answer and how to tell it was used.
struct Lure {
    name: &'static str,
    uri: String,
    /// Whether QEMU (or the agent) took the bait.
    taken: Box<dyn Fn() -> bool + Send>,
}

pub async fn run() -> anyhow::Result<Vec<Attack>> {
    let dir = scratch("migration-source")?;
    let exec_marker = dir.join("exec-ran");
    let file_marker = dir.join("guest-ram");
    // Another loopback address than the target's: the stream must go to
    // the node the allocator ordered, nowhere else.
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.2:0").await.context("binding 127.0.0.2")?;
    let elsewhere_addr = elsewhere.local_addr()?;
    let connected = Arc::new(AtomicBool::new(false));
    let flag = connected.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = elsewhere.accept().await {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let lures = vec![
        Lure {
            name: "source-given-an-exec-uri",
            uri: format!("exec:touch {}", exec_marker.display()),
            taken: exists(exec_marker),
        },
        Lure {
            name: "source-given-a-file-uri",
            uri: format!("file:{}", file_marker.display()),
            taken: exists(file_marker),
        },
        Lure {
            name: "source-given-a-tcp-uri-elsewhere",
            uri: format!("tcp:{elsewhere_addr}"),
            taken: Box::new(move || connected.load(Ordering::SeqCst)),
        },
    ];

    let pki = Pki::new(&dir)?;
    let config = vmscale_allocator::config::Config {
        tls: Some(pki.files(&Identity::Allocator)?),
        insecure: false,
        ..Allocator::config()
    };
    let alloc = Allocator::start(config, Via::Plain).await?;
    let mut qemu = BareQemu::start(&dir, "vm-src").await?;
    // 1000 mCPU of 1000: over the watermark, so it moves once a node has room.
    let node_a = Some(pki.files(&Identity::Node("node-a".into()))?);
    let vms = [qemu.spec("vm-src", None)];
    let source = Agent::start(&dir, "node-a", &alloc.url(), node_a, &vms, (1000, 4 * GIB), None).await?;
    source.wait_registered("vm-src").await?;

    let (prepared_tx, mut prepared) = mpsc::unbounded_channel();
    let fake = FakeTarget {
        uris: Arc::new(Mutex::new(lures.iter().map(|l| l.uri.clone()).collect())),
        prepared: prepared_tx,
    };
    let listener = super::super::lab::listen().await?;
    let endpoint = format!("https://{}", listener.local_addr()?);
    // The attacker's node holds a real certificate of its own: the source
    // authenticates it, and must still refuse what it answers.
    let target = Identity::Node(TARGET.into());
    let tls = Tls::load(&pki.files(&target)?).context("the fake target's certificate")?;
    let stop = CancellationToken::new();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls.server_config())
            .context("the fake target's TLS")?
            .add_service(MigrationTargetServer::new(fake))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let _stop = stop.drop_guard();

    let mut out = Vec::new();
    let mut before = (nodes(&alloc.state().await?), agent_view(&source.state().await?));
    let creds = pki.creds(&target)?;
    let _session =
        connect_open(alloc.grpc, Some(&creds), hello(TARGET, (16_000, 16 * GIB), vec![], &endpoint))
            .await
            .map_err(|s| anyhow::anyhow!("the fake target's hello was refused: {}", status_words(&s)))?;
    for lure in &lures {
        let r = async {
            let order = tokio::time::timeout(Duration::from_secs(60), prepared.recv())
                .await
                .context("the source did not ask the fake target to prepare within 60 s")?
                .context("the fake target stopped")?;
            let a = &alloc;
            let (state, reason) = until("the order to end", Duration::from_secs(120), || async move {
                finished(&a.state().await.ok()?, order)
            })
            .await?;
            // The source resumes its VM after a failed move, and the planner
            // orders the next one within a second: compare when none is under
            // way on the agent.
            let src = &source;
            let agent_after =
                until("the source to settle between moves", Duration::from_secs(30), || async move {
                    let s = src.state().await.ok()?;
                    s.get("vms")?.get("vm-src")?.get("migration")?.is_null().then(|| agent_view(&s))
                })
                .await?;
            let after = (nodes(&alloc.state().await?), agent_after);
            let changed = diff(&before.0, &after.0).or(diff(&before.1, &after.1));
            anyhow::Ok((state, reason, changed, after))
        };
        out.push(match r.await {
            Ok((state, reason, changed, after)) => {
                let taken = (lure.taken)();
                let alive = qemu.alive();
                let mut seen = format!("order {state}: {}", super::super::report::one_line(&reason, 200));
                if taken {
                    seen.push_str("; QEMU used the uri");
                }
                if !alive {
                    seen.push_str("; the source QEMU is gone");
                }
                before = after;
                Attack::judge(lure.name, state == "failed" && !taken && alive, seen, changed)
            }
            Err(e) => Attack::could_not_run(lure.name, &e),
        });
    }
    drop(source);
    Ok(out)
}

fn exists(p: PathBuf) -> Box<dyn Fn() -> bool + Send> {
    Box::new(move || p.exists())
}

/// The nodes part of the allocator's ledger, each VM's reservation without
/// its state: the orders the planner makes and fails here (the VM
/// "migrating out" while one is open, every half second) are the expected
/// part of each attack; the VM staying on node-a, its size unchanged, is
/// what must hold.
fn nodes(state: &Value) -> Value {
    let mut nodes = ledger_view(state, &[TARGET]).get("nodes").cloned().unwrap_or_default();
    if let Some(all) = nodes.as_object_mut() {
        for n in all.values_mut() {
            if let Some(vms) = n.get_mut("vms").and_then(Value::as_object_mut) {
                for vm in vms.values_mut() {
                    if let Some(vm) = vm.as_object_mut() {
                        vm.remove("state");
                    }
                }
            }
        }
    }
    nodes
}

/// The order's final state and reason once it has ended.
fn finished(state: &Value, order: u64) -> Option<(String, String)> {
    let list = state.get("finished_orders")?.as_array()?;
    let o = list.iter().find(|o| o.get("id").and_then(Value::as_u64) == Some(order))?;
    Some((
        o.get("state")?.as_str()?.to_owned(),
        o.get("reason").and_then(Value::as_str).unwrap_or_default().to_owned(),
    ))
}

/// The attacker's migration service: each `Prepare` gets the next hostile
/// address; a confirm is refused and an abort says no guest runs here, so
/// the source keeps its VM whatever happened to the stream.
#[derive(Debug, Clone)]
struct FakeTarget {
    uris: Arc<Mutex<VecDeque<String>>>,
    prepared: mpsc::UnboundedSender<u64>,
}

#[tonic::async_trait]
impl MigrationTarget for FakeTarget {
    async fn prepare(&self, r: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareReply>, Status> {
        let order = r.into_inner().order_id;
        let uri = vmscale_common::sync::lock(&self.uris).pop_front();
        let Some(uri) = uri else { return Err(Status::unavailable("the audit has no more lures")) };
        let _ = self.prepared.send(order);
        Ok(Response::new(pb::PrepareReply { uri }))
    }

    async fn confirm(&self, _: Request<pb::ConfirmRequest>) -> Result<Response<pb::ConfirmReply>, Status> {
        Err(Status::failed_precondition("the audit's target never runs the guest"))
    }

    async fn abort(&self, _: Request<pb::AbortRequest>) -> Result<Response<pb::AbortReply>, Status> {
        Ok(Response::new(pb::AbortReply { state: pb::status_reply::State::None as i32 }))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(pb::StatusReply { state: pb::status_reply::State::None as i32 }))
    }
}
