//! The mover's reports and its recovery after a restart, against a scripted
//! allocator session: what the allocator hears, and when.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use vmscale_allocator_client::ClientError;

use super::*;
use crate::links::allocator::fake::ScriptedSession;

struct Harness {
    node: MoverNode,
    /// Kept so the node's session stays open (and to change it).
    session: watch::Sender<Session>,
    dir: tempfile::TempDir,
}

fn harness(session: Option<Arc<ScriptedSession>>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let session: Session = session.map(|s| s as Arc<dyn crate::links::allocator::AllocatorSession>);
    let (tx, rx) = watch::channel(session);
    let node = MoverNode {
        session: rx,
        registry: Arc::default(),
        status: Default::default(),
        proc_root: dir.path().join("proc"),
        transfer: MigrationConfig::default(),
        template: crate::migration::settings::MigrationSettings::default().template(),
        security: crate::links::dial::TcpSecurity { tls: None, insecure: true },
        stream_tls: false,
        state_dir: dir.path().to_owned(),
        metrics: Arc::default(),
    };
    Harness { node, session: tx, dir }
}

fn refusing() -> Arc<ScriptedSession> {
    ScriptedSession::new(|b| match b {
        Body::MigrationStatus(_) => {
            Err(ClientError::Request { code: tonic::Code::NotFound, message: "no such order".into() })
        }
        _ => Ok(pb::allocator_message::Body::Ack(pb::Ack::default())),
    })
}

/// The phases the allocator heard, with their reasons.
fn heard(s: &ScriptedSession) -> Vec<(Phase, String)> {
    s.calls()
        .into_iter()
        .filter_map(|b| match b {
            Body::MigrationStatus(m) => Some((m.phase(), m.reason)),
            _ => None,
        })
        .collect()
}

fn record(endpoint: &str, qmp: &str, confirm_sent: bool) -> MoveRecord {
    MoveRecord {
        order_id: 3,
        vm: "vm1".into(),
        target_node: "b".into(),
        target_endpoint: endpoint.into(),
        qmp: qmp.into(),
        spec: crate::vms::tests::spec("vm1"),
        confirm_sent,
        source_running: true,
    }
}

#[tokio::test]
async fn a_report_is_heard_once_accepted() {
    let s = ScriptedSession::granting();
    let h = harness(Some(s.clone()));
    assert_eq!(h.node.report(3, Phase::Started, "").await, Heard::Accepted);
    assert_eq!(heard(&s), [(Phase::Started, String::new())]);
}

#[tokio::test]
async fn a_refused_completion_releases_the_vm_here() {
    let s = refusing();
    let h = harness(Some(s.clone()));
    assert_eq!(h.node.report(3, Phase::Failed, "why").await, Heard::Refused, "a refusal is final");
    h.node.report_completed(3, "vm1").await;
    let calls = s.calls();
    assert!(
        matches!(calls.last(), Some(Body::RemoveVm(r)) if r.vm_id == "vm1"),
        "the allocator put the VM back on this node's ledger: {calls:?}"
    );
    // Heard: nothing else to do.
    let s = ScriptedSession::granting();
    let h = harness(Some(s.clone()));
    h.node.report_completed(3, "vm1").await;
    assert_eq!(s.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_report_waits_for_a_session_then_gives_up() {
    let h = harness(None);
    let s = ScriptedSession::granting();
    let later = h.session.clone();
    let arrives = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        later.send_replace(Some(arrives));
    });
    assert_eq!(h.node.report(3, Phase::Started, "").await, Heard::Accepted);
    assert_eq!(heard(&s).len(), 1);

    let h = harness(None);
    let t0 = tokio::time::Instant::now();
    assert_eq!(h.node.report(3, Phase::Started, "").await, Heard::GaveUp);
    assert!(t0.elapsed() >= REPORT_PATIENCE);
    // A link gone for good is no busy loop: the wait still takes its time.
    let h = harness(None);
    drop(h.session);
    let t0 = tokio::time::Instant::now();
    assert_eq!(h.node.report(3, Phase::Started, "").await, Heard::GaveUp);
    assert!(t0.elapsed() >= REPORT_PATIENCE);
}

#[tokio::test]
async fn an_order_for_a_vm_not_here_fails_at_once() {
    let s = ScriptedSession::granting();
    let h = harness(Some(s.clone()));
    let order = pb::MigrationOrder {
        order_id: 4,
        vm_id: "elsewhere".into(),
        target_node: "b".into(),
        target_endpoint: "http://b:7073".into(),
        ..Default::default()
    };
    assert_eq!(h.node.move_out(&order, None).await, Ended::Stayed);
    let got = heard(&s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, Phase::Failed);
    assert!(got[0].1.contains("does not run on this node"), "{got:?}");
}

#[tokio::test]
async fn a_restart_before_the_confirm_leaves_the_vm_on_the_source() {
    let s = ScriptedSession::granting();
    let h = harness(Some(s.clone()));
    // Nobody listens at the target (connection refused) and the source's
    // QMP socket is gone: the VM stays, the allocator hears why.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let gone = h.dir.path().join("gone.sock");
    let r = record(&format!("http://127.0.0.1:{port}"), &gone.to_string_lossy(), false);
    write_record(&h.node.state_dir, &r).unwrap();
    assert_eq!(unsettled(&h.node.state_dir), std::slice::from_ref(&r));
    assert_eq!(recover(&h.node, &r).await, Ended::Stayed);
    let got = heard(&s);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, Phase::Failed);
    assert!(got[0].1.contains("restarted mid-move"), "{got:?}");
    assert!(unsettled(&h.node.state_dir).is_empty(), "the record is gone");
}

#[tokio::test]
async fn a_record_without_a_usable_endpoint_settles_on_the_source() {
    let s = ScriptedSession::granting();
    let h = harness(Some(s.clone()));
    let r = record("not a url", &h.dir.path().join("gone.sock").to_string_lossy(), true);
    write_record(&h.node.state_dir, &r).unwrap();
    assert_eq!(recover(&h.node, &r).await, Ended::Stayed);
    assert_eq!(heard(&s).len(), 1);
    assert!(unsettled(&h.node.state_dir).is_empty());
}
