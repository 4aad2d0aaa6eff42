//! Who may take part in a move, with the cluster CA's certificates:
//! - the target agent's migration service over mTLS answers the order's
//!   source node only: no certificate, the allocator's, another node's are
//!   refused, and nothing changes;
//! - the source takes from Prepare only `tcp:<the target's address>:<port>`
//!   (an `exec:` or `file:` answer never reaches QEMU);
//! - QEMU's own stream over TLS moves a real guest, and the target's QEMU
//!   refuses a stream from any node but the order's source.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod qmp_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use qmp_support::{client_config, qemu_or_skip, TempDir};
use tokio_util::sync::CancellationToken;
use vmscale_agent::migration::command_line::read_args;
use vmscale_agent::migration::machine_from_args::machine_from_args;
use vmscale_agent::migration::remote::{RemoteTarget, TargetLink};
use vmscale_agent::migration::service::{self, TargetNode};
use vmscale_agent::migration::settings::MigrationSettings;
use vmscale_agent::migration::source::carry_out;
use vmscale_agent::migration::stream_tls::{self, StreamTls};
use vmscale_agent::migration::target::{Handoff, IncomingError, IncomingTarget, LocalIncoming};
use vmscale_agent::migration::MoveError;
use vmscale_agent::qmp::migrate::{Migration, MigrationConfig};
use vmscale_agent::qmp::process::{QemuOptions, QemuProcess};
use vmscale_agent::qmp::QmpClient;
use vmscale_common::testing::TestPki;
use vmscale_common::tls::{Identity, Tls};
use vmscale_proto::migration as pb;
use vmscale_proto::migration::migration_target_client::MigrationTargetClient;

/// The target node "b"'s migration service over mTLS, on loopback.
async fn target_service(pki: &TestPki, state: &Path) -> (SocketAddr, Arc<TargetNode>, CancellationToken) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let settings = MigrationSettings {
        listen: Some(addr),
        state_dir: state.to_owned(),
        qemu: "/nonexistent/qemu".into(),
        ..MigrationSettings::default()
    };
    let files = pki.issue(&Identity::Node("b".into()));
    let node = TargetNode::new(settings, Some(files.clone()), Arc::default());
    let stop = CancellationToken::new();
    let (svc, tls, token) = (node.clone(), Tls::load(&files).unwrap(), stop.clone());
    tokio::spawn(async move { service::serve(svc, addr, Some(tls), token).await.unwrap() });
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, node, stop)
}

/// A client of b's service with `who`'s certificate (none: no certificate).
async fn client(
    pki: &TestPki,
    addr: SocketAddr,
    who: Option<Identity>,
) -> MigrationTargetClient<tonic::transport::Channel> {
    let ep = tonic::transport::Endpoint::from_shared(format!("https://{addr}")).unwrap();
    let tls = match who {
        Some(who) => Tls::load(&pki.issue(&who)).unwrap().client_config(&Identity::Node("b".into())),
        None => tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                std::fs::read(pki.dir().join("ca.pem")).unwrap(),
            ))
            .domain_name("b.node.vmscale"),
    };
    MigrationTargetClient::new(ep.tls_config(tls).unwrap().connect_lazy())
}

/// A handoff as a source sends it, valid in every part.
fn handoff(order: u64, vm: &str) -> String {
    serde_json::json!({
        "handoff": {
            "order_id": order, "vm_id": vm, "config": MigrationConfig::default(), "stream_tls": true,
            "machine": machine(),
        },
        "vm": {
            "id": vm, "qmp": "/x", "cu": {"milli_cpu": 250, "memory_bytes": 268435456},
            "min_cus": 1, "max_cus": 2, "memory": {"kind": "dimm", "dimm_bytes": 268435456}
        }
    })
    .to_string()
}

fn machine() -> serde_json::Value {
    serde_json::json!({"accel": "tcg", "machine": "pc", "cpu_model": null, "cpus": 1, "max_cpus": 1,
        "memory_mib": 64, "slots": 0, "max_memory_mib": 64, "boot_ram": {"id": "pc.ram", "shared": false},
        "virtio_mem": null, "boot": null, "disks": [], "nics": [], "vsock": null, "serial_console": false,
        "no_reboot": false, "host_root_share": false, "devices": {"cpus": [], "dimms": [], "virtio_mem": []}})
}

#[tokio::test]
async fn the_migration_service_answers_the_orders_source_node_only() {
    let dir = TempDir::new();
    let pki = TestPki::new(dir.path().join("pki"));
    let (addr, node, stop) = target_service(&pki, &dir.path().join("b-state")).await;
    node.authorise(7, "vm1", "a");
    let prepare = || pb::PrepareRequest { order_id: 7, vm_id: "vm1".into(), handoff_json: handoff(7, "vm1") };
    // No certificate: the handshake fails, no call is served.
    let e = client(&pki, addr, None).await.prepare(prepare()).await.unwrap_err();
    assert!(format!("{e:?}").contains("CertificateRequired"), "{e:?}");
    // A certificate of the CA, but not a node's, or another node's: refused,
    // and the order stays for its source.
    for who in [Identity::Allocator, Identity::Node("c".into())] {
        let e = client(&pki, addr, Some(who.clone())).await.prepare(prepare()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{who:?}: {e:?}");
        assert!(e.message().contains("node a's to carry out"), "{}", e.message());
    }
    // The source's prepare uses the order (this node's QEMU binary is
    // missing, so it fails to start); a replay finds nothing.
    let mut a = client(&pki, addr, Some(Identity::Node("a".into()))).await;
    let e = a.prepare(prepare()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
    assert!(e.message().contains("did not start"), "{}", e.message());
    let e = a.prepare(prepare()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("or it was used"), "{}", e.message());
    let none = a.status(pb::StatusRequest { order_id: 7 }).await.unwrap().into_inner().state();
    assert_eq!(none, pb::status_reply::State::None);
    stop.cancel();
}

/// A fake target agent that answers Prepare with `uri`.
#[derive(Clone)]
struct Answers(String);

#[tonic::async_trait]
impl pb::migration_target_server::MigrationTarget for Answers {
    async fn prepare(
        &self,
        _: tonic::Request<pb::PrepareRequest>,
    ) -> Result<tonic::Response<pb::PrepareReply>, tonic::Status> {
        Ok(tonic::Response::new(pb::PrepareReply { uri: self.0.clone() }))
    }
    async fn confirm(
        &self,
        _: tonic::Request<pb::ConfirmRequest>,
    ) -> Result<tonic::Response<pb::ConfirmReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
    async fn abort(
        &self,
        _: tonic::Request<pb::AbortRequest>,
    ) -> Result<tonic::Response<pb::AbortReply>, tonic::Status> {
        Ok(tonic::Response::new(pb::AbortReply { state: pb::status_reply::State::None as i32 }))
    }
    async fn status(
        &self,
        _: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
}

#[tokio::test]
async fn a_prepare_answer_other_than_tcp_to_the_target_never_reaches_qemu() {
    let cases = [
        ("exec:sh -c 'touch /tmp/owned'", false),
        ("file:/etc/passwd", false),
        ("unix:/run/qmp.sock", false),
        ("tcp:10.9.9.9:4444", false),
        ("tcp:localhost:4444", false),
        ("tcp:127.0.0.1:4444", true),
    ];
    for (uri, ok) in cases {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(l);
        let stop = CancellationToken::new();
        let svc = pb::migration_target_server::MigrationTargetServer::new(Answers(uri.into()));
        let token = stop.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
        });
        let endpoint = format!("http://{addr}");
        let link = TargetLink { endpoint: &endpoint, node: "b", tls: None };
        let spec = serde_json::from_value(serde_json::json!({
            "id": "vm1", "qmp": "/x", "cu": {"milli_cpu": 250, "memory_bytes": 268435456},
            "min_cus": 1, "max_cus": 2, "memory": {"kind": "dimm", "dimm_bytes": 268435456}
        }))
        .unwrap();
        let target = RemoteTarget::new(link, 1, spec).unwrap();
        let handoff: Handoff = serde_json::from_value(serde_json::json!({
            "order_id": 1, "vm_id": "vm1", "config": MigrationConfig::default(), "machine": machine(),
        }))
        .unwrap();
        let got = target.prepare(&handoff).await;
        match (ok, got) {
            (true, Ok(u)) => assert_eq!(u, uri),
            (false, Err(IncomingError::StreamUri(e))) => assert!(e.to_string().contains("uri"), "{e}"),
            (_, other) => panic!("{uri}: {other:?}"),
        }
        stop.cancel();
    }
}

/// QEMU's stream over TLS: a guest moves from "a" to "b"; a stream from
/// "c" is refused by b's QEMU (its `tls-authz` names a only).
#[tokio::test]
async fn a_stream_over_tls_moves_the_guest_and_b_takes_it_from_a_only() {
    let Some(binary) = qemu_or_skip("migration_tls_stream") else { return };
    for (sender, moves) in [("a", true), ("c", false)] {
        let dir = TempDir::new();
        let pki = TestPki::new(dir.path().join("pki"));
        let (src_tls, dst_tls) = (dir.path().join("src-tls"), dir.path().join("dst-tls"));
        stream_tls::write_creds_dir(&pki.issue(&Identity::Node(sender.into())), &src_tls).unwrap();
        stream_tls::write_creds_dir(&pki.issue(&Identity::Node("b".into())), &dst_tls).unwrap();
        let mut options = QemuOptions::new(binary.clone());
        options.virtio_mem_mib = None;
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        let source = QemuProcess::spawn(&options, &dir.path().join("src")).await.unwrap();
        let client = QmpClient::connect(source.endpoint(), client_config()).await.unwrap();
        let template = MigrationSettings::default().template();
        let machine =
            machine_from_args(&read_args(Path::new("/proc"), source.pid().unwrap()).unwrap(), &template)
                .unwrap();
        let target = LocalIncoming::new(
            binary.clone(),
            template,
            dir.path().join("dst"),
            "127.0.0.1:0".parse().unwrap(),
        )
        .with_stream_tls(Some(StreamTls { dir: dst_tls.clone(), peer_node: "a".into() }));
        let to_b = StreamTls { dir: src_tls.clone(), peer_node: "b".into() };
        stream_tls::apply(&client, stream_tls::source_commands(Some(&to_b))).await.unwrap();
        let config =
            MigrationConfig { timeout_ms: 30_000, stall_timeout_ms: 5_000, ..MigrationConfig::default() };
        let got = carry_out(1, "vm1", &client, machine, &target, &config, |_, _| {}).await;
        let runs = Migration::new(client.clone()).run_status().await.map(|s| s.running);
        match (moves, got) {
            (true, Ok(done)) => {
                assert!(done.info.ram.is_some_and(|r| r.transferred > 0));
                let b = target.client().await.unwrap();
                assert!(Migration::new(b).run_status().await.unwrap().running, "b runs the guest");
            }
            (false, Err(e)) => {
                assert!(
                    matches!(e, MoveError::Migrate(_) | MoveError::Switchover(_) | MoveError::TargetStart(_)),
                    "{e:?}"
                );
                assert!(runs.unwrap(), "the guest runs on the source after the refused stream");
                let log = std::fs::read_to_string(dir.path().join("dst/qemu.log")).unwrap_or_default();
                assert!(log.contains("authz check for CN=c.node.vmscale is denied"), "b's qemu: {log}");
            }
            (want, got) => panic!("sender {sender}: want moved={want}, got {got:?}"),
        }
        target.abort().await;
    }
}
