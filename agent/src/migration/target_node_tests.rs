//! The target node's bookkeeping, driven without a gRPC server: who may
//! prepare, what unknown orders get, and what a restarted agent takes in.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::migration::target::Handoff;
use crate::migration::target_state::Caller;
use crate::migration::tombstones::{self, Tombstone};
use tonic::Status;

const ANYONE: Caller = Caller::Anyone;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmscale-target-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn node(state_dir: &Path) -> Arc<TargetNode> {
    let settings = MigrationSettings {
        listen: Some("127.0.0.1:7073".parse().unwrap()),
        state_dir: state_dir.to_owned(),
        qemu: "/nonexistent/qemu".into(),
        ..MigrationSettings::default()
    };
    TargetNode::new(settings, None, Arc::default())
}

fn spec(id: &str, qmp: &str) -> VmSpec {
    VmSpec { qmp: qmp.into(), ..crate::vms::tests::spec(id) }
}

fn prepare(order: u64, vm: &str) -> Prepare {
    let handoff = Handoff {
        order_id: order,
        vm_id: vm.into(),
        machine: crate::migration::machine::tests::guest(),
        config: Default::default(),
        stream_tls: false,
        source_running: true,
    };
    Prepare { order_id: order, vm: spec(vm, "/x"), handoff }
}

#[tokio::test(start_paused = true)]
async fn nothing_starts_without_the_allocators_order() {
    let d = dir("auth");
    let t = node(&d);
    let e = t.prepare(prepare(7, "vm1"), &ANYONE).await.unwrap_err();
    assert!(matches!(e, TargetError::NotAuthorised { order: 7, .. }), "{e:?}");
    // An order for another VM does not authorise this one.
    t.authorise(7, "vm2", "a");
    let e = t.prepare(prepare(7, "vm1"), &ANYONE).await.unwrap_err();
    assert!(matches!(e, TargetError::NotAuthorised { order: 7, .. }), "{e:?}");
    // Authorised, but the QEMU binary is missing: a clear error, no state left.
    t.authorise(8, "vm1", "a");
    let e = t.prepare(prepare(8, "vm1"), &ANYONE).await.unwrap_err();
    assert!(super::super::reason(&e).contains("did not start"), "{e:?}");
    assert_eq!(t.status(8, &ANYONE).unwrap(), TargetState::Absent);
    // The order may reach the target a moment after the source calls.
    let late = t.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        late.authorise(9, "vm1", "a");
    });
    let e = t.prepare(prepare(9, "vm1"), &ANYONE).await.unwrap_err();
    assert!(matches!(e, TargetError::NotStarted(_)), "authorised while waiting: {e:?}");
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(start_paused = true)]
async fn an_agent_without_a_listen_address_takes_nothing_in() {
    let d = dir("nolisten");
    let settings = MigrationSettings { state_dir: d.clone(), ..MigrationSettings::default() };
    let t = TargetNode::new(settings, None, Arc::default());
    t.authorise(1, "vm1", "a");
    assert!(matches!(t.prepare(prepare(1, "vm1"), &ANYONE).await, Err(TargetError::NotTakingVms)));
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn confirm_abort_and_status_of_unknown_orders() {
    let d = dir("unknown");
    let t = node(&d);
    let e = t.confirm(9, Duration::from_millis(100), &ANYONE).await.unwrap_err();
    assert!(matches!(e, TargetError::UnknownOrder(9)), "{e:?}");
    assert_eq!(t.abort(9, &ANYONE).await.unwrap(), TargetState::Absent, "aborting nothing is fine");
    assert_eq!(t.status(9, &ANYONE).unwrap(), TargetState::Absent);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn an_order_being_started_is_neither_confirmed_nor_aborted() {
    let d = dir("busy");
    let t = node(&d);
    t.moves().step(3, Some(Move::Starting)).unwrap();
    assert!(matches!(t.confirm(3, Duration::from_millis(100), &ANYONE).await, Err(TargetError::ConfirmBusy)));
    assert!(matches!(t.abort(3, &ANYONE).await, Err(TargetError::Busy)));
    t.authorise(3, "vm1", "a");
    assert!(matches!(t.prepare(prepare(3, "vm1"), &ANYONE).await, Err(TargetError::AlreadyPrepared(3))));
    assert_eq!(t.status(3, &ANYONE).unwrap(), TargetState::Starting, "the refused prepare changed nothing");
    let _ = std::fs::remove_dir_all(&d);
}

/// A scripted QEMU monitor on a Unix socket: answers `query-status` and
/// `query-migrate` as told, and counts `cont`s.
fn scripted_qmp(path: &Path, running: bool, incoming: &'static str) -> Arc<AtomicUsize> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let conts = Arc::new(AtomicUsize::new(0));
    let counted = conts.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = tokio::io::split(stream);
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
        write.write_all(format!("{greeting}\r\n").as_bytes()).await.unwrap();
        let mut lines = BufReader::new(read).lines();
        let mut running = running;
        while let Ok(Some(line)) = lines.next_line().await {
            let req: serde_json::Value = serde_json::from_str(&line).unwrap();
            let ret = match req["execute"].as_str().unwrap() {
                "query-status" => {
                    serde_json::json!({"running": running, "status": if running { "running" } else { "paused" }})
                }
                "query-migrate" => serde_json::json!({"status": incoming}),
                "cont" => {
                    running = true;
                    counted.fetch_add(1, Ordering::SeqCst);
                    serde_json::json!({})
                }
                _ => serde_json::json!({}),
            };
            let reply = serde_json::json!({"return": ret, "id": req["id"]});
            write.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
        }
    });
    conts
}

#[tokio::test]
async fn recover_adopts_vms_whose_qemu_is_there_and_forgets_the_rest() {
    let d = dir("recover");
    let t = node(&d);
    let adopted_dir = d.join("adopted");
    let record = |order, vm: &str, qmp: &Path, resumed| AdoptedRecord {
        order_id: order,
        resume: true,
        resumed,
        source_node: "a".into(),
        spec: spec(vm, &qmp.to_string_lossy()),
    };
    // Runs since its confirm.
    let live = d.join("incoming/4/qmp.sock");
    let live_conts = scripted_qmp(&live, true, "completed");
    adopted::persist(&adopted_dir, &record(4, "kept", &live, true)).unwrap();
    // Confirmed, then the agent died before the resume: resumed now.
    let held = d.join("incoming/5/qmp.sock");
    let held_conts = scripted_qmp(&held, false, "completed");
    adopted::persist(&adopted_dir, &record(5, "held", &held, false)).unwrap();
    // Paused by someone after its resume: stays paused.
    let paused = d.join("incoming/7/qmp.sock");
    let paused_conts = scripted_qmp(&paused, false, "completed");
    adopted::persist(&adopted_dir, &record(7, "paused", &paused, true)).unwrap();
    // Confirmed, but its stream broke before the resume: not taken in.
    let broken = d.join("incoming/8/qmp.sock");
    let broken_conts = scripted_qmp(&broken, false, "failed");
    adopted::persist(&adopted_dir, &record(8, "broken", &broken, false)).unwrap();
    // Its QEMU is gone.
    adopted::persist(&adopted_dir, &record(6, "gone", &d.join("incoming/6/qmp.sock"), true)).unwrap();
    std::fs::create_dir_all(d.join("incoming/6")).unwrap();
    std::fs::write(d.join("adopted/broken-record.json"), "{").unwrap();

    let (adopted, killed) = t.recover().await;
    assert_eq!((adopted, killed), (3, 0));
    let mut ids: Vec<String> = t.adopted().borrow().iter().map(|s| s.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["held", "kept", "paused"]);
    let n = |c: &Arc<AtomicUsize>| c.load(Ordering::SeqCst);
    assert_eq!((n(&live_conts), n(&held_conts), n(&paused_conts), n(&broken_conts)), (0, 1, 0, 0));
    // A restarted target still says the guests it took in run here, so
    // no source resumes them; orders it does not hold are none.
    // A guest whose QEMU is gone may have run here before it went: its
    // source must not resume a copy of it either.
    for order in [4, 5, 7, 6] {
        assert_eq!(t.status(order, &ANYONE).unwrap(), TargetState::Running, "order {order}");
        assert_eq!(t.abort(order, &ANYONE).await.unwrap(), TargetState::Running);
    }
    // Its stream broke while it was paused (-S), never resumed: it never
    // ran here, and the source holds the guest.
    assert_eq!(t.abort(8, &ANYONE).await.unwrap(), TargetState::Absent);
    assert!(!d.join("adopted/gone.json").exists(), "a VM whose QEMU is gone leaves only its tombstone");
    assert!(d.join("settled/6.json").exists());
    assert!(!d.join("adopted/broken.json").exists(), "a VM whose stream broke is forgotten");
    assert!(d.join("incoming/4").exists(), "the adopted VM's directory stays");
    assert!(!d.join("incoming/6").exists(), "an unconfirmed move's directory goes");
    t.forget("kept");
    assert_eq!(t.adopted().borrow().len(), 2);
    assert!(!d.join("adopted/kept.json").exists());
    let _ = std::fs::remove_dir_all(&d);
}

fn from(node: &str) -> Caller {
    Caller::Nodes(vec![node.to_owned()])
}

#[tokio::test(start_paused = true)]
async fn an_authorisation_is_used_by_the_first_prepare_of_its_source_only() {
    let d = dir("once");
    let t = node(&d);
    t.authorise(10, "vm1", "a");
    // Another node's agent (or none) cannot use it, nor use it up.
    let e = t.prepare(prepare(10, "vm1"), &from("c")).await.unwrap_err();
    assert!(
        matches!(&e, TargetError::NotTheSource { order: 10, source_node } if source_node == "a"),
        "{e:?}"
    );
    assert_eq!(Status::from(e).code(), tonic::Code::PermissionDenied);
    let e = t.prepare(prepare(10, "vm1"), &Caller::Nodes(vec![])).await.unwrap_err();
    assert!(matches!(e, TargetError::NotTheSource { .. }), "{e:?}");
    // The source's first prepare uses it (its QEMU then fails to start)...
    let e = t.prepare(prepare(10, "vm1"), &from("a")).await.unwrap_err();
    assert!(matches!(e, TargetError::NotStarted(_)), "{e:?}");
    // ...and a replay finds nothing.
    let e = t.prepare(prepare(10, "vm1"), &from("a")).await.unwrap_err();
    assert!(matches!(e, TargetError::NotAuthorised { order: 10, .. }), "{e:?}");
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn only_the_source_node_hears_of_or_changes_its_order() {
    let d = dir("owner");
    let t = node(&d);
    {
        let mut moves = t.moves();
        moves.step(3, Some(Move::Starting)).unwrap();
        moves.set_source(3, "a");
    }
    let other = from("c");
    assert!(matches!(t.status(3, &other), Err(TargetError::NotYours(3))));
    assert!(matches!(t.abort(3, &other).await, Err(TargetError::NotYours(3))));
    assert!(matches!(t.confirm(3, Duration::from_millis(100), &other).await, Err(TargetError::NotYours(3))));
    assert_eq!(Status::from(TargetError::NotYours(3)).code(), tonic::Code::PermissionDenied);
    assert_eq!(t.status(3, &from("a")).unwrap(), TargetState::Starting, "nothing changed");
    let _ = std::fs::remove_dir_all(&d);
}

/// What a confirm leaves on disk before the guest may resume here: the
/// order's tombstone and the VM's record.
fn confirmed(d: &Path, order: u64, vm: &str, qmp: &Path) {
    let t = Tombstone {
        order_id: order,
        vm: vm.into(),
        source_node: "a".into(),
        at_unix_s: tombstones::now_unix_s(),
    };
    tombstones::record(&d.join("settled"), &t).unwrap();
    let r = AdoptedRecord {
        order_id: order,
        resume: true,
        resumed: false,
        source_node: "a".into(),
        spec: spec(vm, &qmp.to_string_lossy()),
    };
    adopted::persist(&d.join("adopted"), &r).unwrap();
}

#[tokio::test]
async fn a_restarted_target_never_says_none_for_a_guest_confirmed_there() {
    let d = dir("durable");
    // Confirmed, then the agent restarted and the QEMU is gone.
    confirmed(&d, 11, "vm1", &d.join("incoming/11/qmp.sock"));
    let t = node(&d);
    t.recover().await;
    assert_eq!(t.abort(11, &from("a")).await.unwrap(), TargetState::Running);
    // Confirmed, ran here, left again (its record gone); a restart later.
    confirmed(&d, 12, "vm2", &d.join("incoming/12/qmp.sock"));
    let t = node(&d);
    t.recover().await;
    t.forget("vm2");
    let t = node(&d);
    t.recover().await;
    for order in [11, 12] {
        assert_eq!(t.abort(order, &from("a")).await.unwrap(), TargetState::Running, "order {order}");
        assert_eq!(t.status(order, &from("a")).unwrap(), TargetState::Running);
        assert!(matches!(t.abort(order, &from("c")).await, Err(TargetError::NotYours(_))));
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn a_qemu_that_does_not_come_back_is_left_alone_and_nobody_resumes_the_source() {
    let d = dir("stuck");
    let qmp = d.join("incoming/13/qmp.sock");
    // A monitor that is there but answers nothing useful: query-status fails.
    std::fs::create_dir_all(qmp.parent().unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&qmp).unwrap();
    confirmed(&d, 13, "vm1", &qmp);
    std::fs::write(d.join("incoming/13/qemu.pid"), std::process::id().to_string()).unwrap();
    let t = node(&d);
    drop(listener);
    let (adopted, killed) = t.recover().await;
    assert_eq!((adopted, killed), (0, 0), "not adopted, and nothing killed");
    let e = t.abort(13, &from("a")).await.unwrap_err();
    assert!(matches!(e, TargetError::Stuck(13)), "{e:?}");
    assert_eq!(Status::from(e).code(), tonic::Code::Unavailable, "the source asks again and stays paused");
    assert!(d.join("adopted/vm1.json").exists() && d.join("settled/13.json").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(start_paused = true)]
async fn an_informant_socket_outside_the_nodes_vsock_dir_is_refused_before_the_order_is_used() {
    use vmscale_contract::informant_addr::InformantAddr;
    let d = dir("informant");
    let t = node(&d);
    t.authorise(12, "vm1", "a");
    let mut p = prepare(12, "vm1");
    p.vm.informant =
        Some(InformantAddr::VsockUnix { path: "/run/containerd/containerd.sock".into(), port: 1 });
    let e = t.prepare(p, &from("a")).await.unwrap_err();
    assert!(matches!(e, TargetError::ForeignInformant(_)), "{e:?}");
    assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
    // The order is still there for a good prepare.
    let e = t.prepare(prepare(12, "vm1"), &from("a")).await.unwrap_err();
    assert!(matches!(e, TargetError::NotStarted(_)), "{e:?}");
    let _ = std::fs::remove_dir_all(&d);
}
