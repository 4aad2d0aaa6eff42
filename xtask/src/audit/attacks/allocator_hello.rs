//! Attacks on the allocator's session: clients that are not who they claim
//! (no certificate, a certificate from another CA, plain text on the TLS
//! port, another node's name in the hello) and authenticated nodes whose
//! hello lies about how much it carries or which orders it is part of. A
//! real allocator with TLS; the honest node beside the attacker (`node-b`,
//! whose ledger a forged order would put a hold on) is a session the audit
//! holds open with node-b's certificate.

use super::super::hostile::{self, connect_open, hello, stalled, status_words, vm, Opened};
use super::super::http::Via;
use super::super::lab::{scratch, Allocator, GIB, MIB};
use super::super::report::Attack;
use super::super::state::{diff, ledger_view};
use super::super::tls::{Creds, Pki};
use serde_json::Value;
use std::time::Duration;
use vmscale_common::tls::Identity;
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;

/// The honest node whose ledger the attacks aim at.
const VICTIM: &str = "node-b";

fn node(n: &str) -> Identity {
    Identity::Node(n.into())
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Attack>> {
    let pki = Pki::new(&scratch("allocator-session")?)?;
    // A failed move is not planned again within the family's time, so the
    // replay below meets a finished order, not a new one.
    let config = vmscale_allocator::config::Config {
        tls: Some(pki.files(&Identity::Allocator)?),
        insecure: false,
        move_retry_base_ms: 600_000,
        move_retry_max_ms: 600_000,
        // A client that never says hello is dropped after this.
        hello_timeout_ms: 5_000,
        ..Allocator::config()
    };
    let alloc = Allocator::start(config, Via::Plain).await?;
    let victim = connect_open(
        alloc.grpc,
        Some(&pki.creds(&node(VICTIM))?),
        hello(VICTIM, (4000, 4 * GIB), vec![], "https://127.0.0.1:1"),
    )
    .await
    .map_err(|s| anyhow::anyhow!("the honest node's hello was refused: {}", status_words(&s)))?;
    let mut out = Vec::new();
    let h = |n: &str| hello(n, (4000, 4 * GIB), vec![], "");

    out.push(attempt(&alloc, "session-in-plain-text", None, h("audit-plain"), &[]).await);
    let none = pki.no_certificate();
    out.push(attempt(&alloc, "session-without-a-certificate", Some(&none), h("audit-anon"), &[]).await);
    let forged = pki.forged(&node("audit-forged"))?;
    out.push(
        attempt(&alloc, "session-with-another-cas-certificate", Some(&forged), h("audit-forged"), &[]).await,
    );

    // Both wait out a timeout of the allocator's: at once, not in turn.
    let quiet_creds = pki.creds(&node("audit-silent"))?;
    let (stalled, quiet) = tokio::join!(
        stalled("connection-that-never-starts-tls", "the allocator", alloc.grpc),
        silent(&alloc, &quiet_creds)
    );
    out.extend([stalled, quiet]);

    let vms = if quick { 1_000_000 } else { 2_000_000 };
    let many = (0..vms).map(|i| vm(&format!("v{i}"), 250, 128 * MIB)).collect();
    let creds = pki.creds(&node("audit-many"))?;
    let big = hello("audit-many", (4000, 4 * GIB), many, "");
    out.push(attempt(&alloc, "hello-with-a-million-vms", Some(&creds), big, &[]).await);

    let forger = pki.creds(&node("audit-forger"))?;
    for (name, id) in [("hello-order-id-u64-max", u64::MAX), ("hello-forged-order-id", 0x5eed_0000_0001)] {
        out.push(adopt_attack(&alloc, name, &forger, "audit-forger", id).await);
    }
    match issued_order(&alloc, &pki).await {
        Ok((id, reason)) => {
            out.push(reason);
            let replayer = pki.creds(&node("audit-replayer"))?;
            out.push(adopt_attack(&alloc, "hello-replayed-order-id", &replayer, "audit-replayer", id).await);
        }
        Err(e) => out.push(Attack::could_not_run("hello-replayed-order-id", &e)),
    }

    out.push(impersonation(&alloc, &pki.creds(&node("audit-evil"))?, victim).await);
    Ok(out)
}

/// Sends `hello` as `creds` and judges: refused with a status, and the
/// ledger (all nodes but `except`) as it was.
async fn attempt(
    alloc: &Allocator,
    name: &str,
    creds: Option<&Creds>,
    hello: pb::Hello,
    except: &[&str],
) -> Attack {
    let r = async {
        let before = ledger_view(&alloc.state().await?, except);
        let opened = connect_open(alloc.grpc, creds, hello).await;
        tokio::time::sleep(Duration::from_millis(300)).await; // a planner round
        let after = ledger_view(&alloc.state().await?, except);
        anyhow::Ok((opened, diff(&before, &after)))
    };
    match r.await {
        Ok((Err(s), changed)) => Attack::judge(name, true, status_words(&s), changed),
        Ok((Ok(s), changed)) => {
            Attack::judge(name, false, format!("welcomed, {} vms registered", s.welcome.vms.len()), changed)
        }
        Err(e) => Attack::could_not_run(name, &e),
    }
}

/// A hello from a node of the attacker's own whose one VM claims to be
/// moving to the victim under order `id`: a hold on the victim's ledger if
/// the allocator adopts it. Refused when the hello, or that VM's claim,
/// is refused and neither the victim's ledger nor the orders moved.
async fn adopt_attack(alloc: &Allocator, name: &str, creds: &Creds, node: &str, id: u64) -> Attack {
    let mut v = vm("stolen-vm", 2000, GIB);
    v.migration = Some(pb::MigrationInProgress { order_id: id, target_node: VICTIM.into() });
    let r = async {
        let before = ledger_view(&alloc.state().await?, &[node]);
        let opened: Opened =
            connect_open(alloc.grpc, Some(creds), hello(node, (4000, 4 * GIB), vec![v], "")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = ledger_view(&alloc.state().await?, &[node]);
        anyhow::Ok((opened, diff(&before, &after)))
    };
    match r.await {
        Ok((Err(s), changed)) => Attack::judge(name, true, status_words(&s), changed),
        Ok((Ok(s), changed)) => {
            let adopted = s.welcome.vms.iter().any(|r| r.vm_id == "stolen-vm" && r.migrating);
            let seen = if adopted {
                format!("welcomed with order {id} adopted (the vm is migrating)")
            } else {
                format!("welcomed without adopting order {id} ({} of 1 vms registered)", s.welcome.vms.len())
            };
            Attack::judge(name, !adopted, seen, changed)
        }
        Err(e) => Attack::could_not_run(name, &e),
    }
}

/// An order the allocator really issued, then failed by its source: a node
/// of the audit's over its watermark gets one towards the victim. The
/// failure's reason is 1 MiB long: the allocator must keep only a bounded
/// part of it (the second attack returned).
async fn issued_order(alloc: &Allocator, pki: &Pki) -> anyhow::Result<(u64, Attack)> {
    let src = "audit-src";
    let creds = pki.creds(&node(src))?;
    let over = hello(src, (1000, GIB), vec![vm("vm-over", 1000, 512 * MIB)], "");
    let mut s = connect_open(alloc.grpc, Some(&creds), over)
        .await
        .map_err(|s| anyhow::anyhow!("the source's hello was refused: {}", status_words(&s)))?;
    let order = s
        .next_order(Duration::from_secs(10))
        .await
        .ok_or_else(|| anyhow::anyhow!("no migration order within 10 s for a node over its watermark"))?;
    let failed = pb::MigrationStatus {
        order_id: order.order_id,
        phase: pb::migration_status::Phase::Failed as i32,
        reason: "x".repeat(REASON),
    };
    let mut pushed = Vec::new();
    let answer = s.call(2, Body::MigrationStatus(failed), &mut pushed).await;
    let state = alloc.state().await?;
    let kept = state
        .get("finished_orders")
        .and_then(Value::as_array)
        .and_then(|l| l.iter().find(|o| o.get("id").and_then(Value::as_u64) == Some(order.order_id)))
        .and_then(|o| o.get("reason")?.as_str().map(str::len));
    let name = "migration-status-with-a-1-mib-reason";
    let bounded = kept.is_some_and(|k| k <= KEPT_REASON);
    let seen = match (&answer, kept) {
        (Err(st), _) => format!("{}; the order kept a reason of {kept:?} bytes", status_words(st)),
        (Ok(_), Some(k)) => format!("accepted; the finished order keeps {k} of its {REASON} bytes"),
        (Ok(_), None) => "accepted; the order is not among the finished ones".to_owned(),
    };
    Ok((order.order_id, Attack::judge(name, bounded, seen, None)))
}

/// The reason a source sends with its failed move, bytes.
const REASON: usize = 1 << 20;
/// The most of it the allocator may keep (about 1 KiB, issue 16).
const KEPT_REASON: usize = 4096;

/// A client with a node's certificate that opens a session and never
/// sends its hello. Refused when the allocator ends the session by itself,
/// with a status, within its hello timeout (5 s here) and a margin.
async fn silent(alloc: &Allocator, creds: &Creds) -> Attack {
    let name = "session-that-never-says-hello";
    let r = async {
        let before = ledger_view(&alloc.state().await?, &[]);
        let ch = super::super::tls::channel(alloc.grpc, &Identity::Allocator, Some(creds)).await?;
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
        let mut client = pb::allocator_client::AllocatorClient::new(ch);
        let t0 = std::time::Instant::now();
        let call = async {
            let mut stream =
                client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
            stream.message().await
        };
        let ended = tokio::time::timeout(Duration::from_secs(10), call).await;
        let after = ledger_view(&alloc.state().await?, &[]);
        anyhow::Ok((ended, t0.elapsed(), diff(&before, &after)))
    };
    match r.await {
        Ok((Err(_), _, changed)) => Attack::judge(name, false, "still open after 10 s", changed),
        Ok((Ok(Err(s)), took, changed)) => Attack::judge(
            name,
            true,
            format!("{} after {:.1} s", status_words(&s), took.as_secs_f64()),
            changed,
        ),
        Ok((Ok(Ok(m)), took, changed)) => Attack::judge(
            name,
            false,
            format!("answered {m:?} after {:.1} s without a hello", took.as_secs_f64()),
            changed,
        ),
        Err(e) => Attack::could_not_run(name, &e),
    }
}

/// A hello naming the victim from a node that holds its own certificate,
/// not the victim's. Refused when the hello is refused and the victim's
/// session goes on.
async fn impersonation(alloc: &Allocator, creds: &Creds, mut victim: hostile::Session) -> Attack {
    let name = "hello-as-another-node";
    let r = async {
        let before = ledger_view(&alloc.state().await?, &[]);
        let claim = hello(VICTIM, (64_000, 64 * GIB), vec![], "https://127.0.0.1:2");
        let opened = connect_open(alloc.grpc, Some(creds), claim).await;
        let mut pushed = Vec::new();
        let victim_alive = victim.call(9, Body::Ping(pb::Ping {}), &mut pushed).await.is_ok();
        let after = ledger_view(&alloc.state().await?, &[]);
        anyhow::Ok((opened, victim_alive, diff(&before, &after)))
    };
    match r.await {
        Ok((Err(s), alive, changed)) => {
            let seen = format!(
                "{}{}",
                status_words(&s),
                if alive { "" } else { "; the real node's session was closed" }
            );
            Attack::judge(name, alive, seen, changed)
        }
        Ok((Ok(_), _, changed)) => Attack::judge(
            name,
            false,
            "welcomed as the other node; the real node's session was replaced",
            changed,
        ),
        Err(e) => Attack::could_not_run(name, &e),
    }
}
