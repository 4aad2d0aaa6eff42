//! The real server on 127.0.0.1:0 with real tonic clients over TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vmscale_allocator::config::Config;
use vmscale_allocator::shared::Shared;
use vmscale_allocator_client::{channel, ClientError, SessionClient};
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_message::Body as Reply;

const GIB: u64 = 1 << 30;

struct Running {
    addr: String,
    http: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(config: Config) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let http_addr = http.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let shared = Shared::new(config, stop.clone());
    let sh = shared.clone();
    let task = tokio::spawn(async move {
        vmscale_allocator::server::serve(sh, grpc, http).await.unwrap();
    });
    Running { addr, http: http_addr, shared, stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("server stops").unwrap();
    }

    async fn http_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&self.http).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.shared.lock().cluster).unwrap()
    }
}

fn res(milli_cpu: u64, memory_bytes: u64) -> Option<pb::Resources> {
    Some(pb::Resources { milli_cpu, memory_bytes })
}

fn vm(id: &str, cpu: u64, mem: u64, permit: Option<(u64, u64)>) -> pb::VmRegistration {
    pb::VmRegistration {
        vm_id: id.into(),
        current: res(cpu, mem),
        last_permit: permit.and_then(|(c, m)| res(c, m)),
        bounds: Some(pb::Bounds { min: res(250, GIB), max: res(8000, 32 * GIB) }),
        compute_unit: res(250, GIB),
        migration: None,
    }
}

fn hello(node: &str, cpu: u64, mem: u64, vms: Vec<pb::VmRegistration>) -> pb::Hello {
    pb::Hello {
        versions: Some(pb::VersionRange { min: 1, max: 1 }),
        node: node.into(),
        capacity: res(cpu, mem),
        vms,
        agent: "test".into(),
        migration_endpoint: format!("http://{node}:7073"),
    }
}

async fn open(addr: &str, h: pb::Hello) -> Result<SessionClient, ClientError> {
    SessionClient::open(channel(addr).await?, h).await
}

fn node_reserved(state: &serde_json::Value, node: &str) -> (u64, u64) {
    let n = &state["nodes"][node];
    let (mut c, mut m) = (0, 0);
    for v in n["vms"].as_object().unwrap().values() {
        c += v["reserved"]["milli_cpu"].as_u64().unwrap();
        m += v["reserved"]["memory_bytes"].as_u64().unwrap();
    }
    (c, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_agents_never_overcommit() {
    // Every node is short of room here; migrations would freeze VMs mid-test
    // (they have their own test), so the planner is off.
    let srv = start(Config { max_moves_per_round: 0, ..Config::default() }).await;
    let nodes = 24;
    let mut tasks = Vec::new();
    for n in 0..nodes {
        let addr = srv.addr.clone();
        tasks.push(tokio::spawn(async move {
            let node = format!("node-{n}");
            let vms: Vec<_> = (0..4).map(|i| vm(&format!("{node}-vm{i}"), 250, GIB, None)).collect();
            // 4 vCPU, 16 GiB: room for 16 CUs, the VMs ask for far more.
            let s = open(&addr, hello(&node, 4000, 16 * GIB, vms)).await.unwrap();
            assert_eq!(s.welcome.vms.len(), 4);
            let mut held = [(250u64, GIB); 4];
            for step in 0..200u64 {
                let i = usize::try_from((step * 7 + n) % 4).unwrap();
                if step % 3 == 2 {
                    // Release one CU if above the minimum.
                    let (c, m) = held[i];
                    if c > 250 {
                        s.release(&format!("{node}-vm{i}"), c - 250, m - GIB).await.unwrap();
                        held[i] = (c - 250, m - GIB);
                    }
                } else {
                    let (c, m) = held[i];
                    let p = s.reserve(&format!("{node}-vm{i}"), c + 750, m + 3 * GIB).await.unwrap();
                    let got = p.permitted.unwrap();
                    assert!(got.milli_cpu >= c && got.milli_cpu <= c + 750);
                    assert_eq!((got.milli_cpu - c) % 250, 0, "whole CUs");
                    held[i] = (got.milli_cpu, got.memory_bytes);
                }
                let total: (u64, u64) = held.iter().fold((0, 0), |a, h| (a.0 + h.0, a.1 + h.1));
                assert!(total.0 <= 4000 && total.1 <= 16 * GIB, "client view over capacity: {total:?}");
            }
            (node, held)
        }));
    }
    let mut views = Vec::new();
    for t in tasks {
        views.push(t.await.unwrap());
    }
    let state = srv.state();
    for (node, held) in views {
        let (c, m) = node_reserved(&state, &node);
        let want = held.iter().fold((0, 0), |a, h| (a.0 + h.0, a.1 + h.1));
        assert_eq!((c, m), want, "ledger of {node} matches what its agent holds");
        assert!(c <= 4000 && m <= 16 * GIB);
    }
    srv.stop().await;
}

#[tokio::test]
async fn version_mismatch_and_bad_hello_are_refused_with_a_reason() {
    let srv = start(Config::default()).await;
    let mut h = hello("n1", 4000, 16 * GIB, vec![]);
    h.versions = Some(pb::VersionRange { min: 7, max: 9 });
    match open(&srv.addr, h).await {
        Err(ClientError::Refused(s)) => {
            assert_eq!(s.code(), tonic::Code::FailedPrecondition);
            assert!(s.message().contains("no common protocol version"), "{}", s.message());
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    let bad = [
        (hello("n1", 0, 16 * GIB, vec![]), "zero dimension"),
        (hello("", 4000, 16 * GIB, vec![]), "node name"),
        (hello("n1", u64::MAX, 16 * GIB, vec![]), "milli-vCPU"),
    ];
    for (h, want) in bad {
        match open(&srv.addr, h).await {
            Err(ClientError::Refused(s)) => {
                assert_eq!(s.code(), tonic::Code::InvalidArgument);
                assert!(s.message().contains(want), "{} should mention {want}", s.message());
            }
            other => panic!("expected refusal, got {other:?}"),
        }
    }
    // Nothing was registered by the refused sessions.
    assert_eq!(srv.state()["nodes"].as_object().unwrap().len(), 0);

    // Bad VMs are refused alone: the node registers with the good one, and
    // the welcome says which VMs were refused and why.
    let mut forged = vm("c", 250, GIB, None);
    forged.migration = Some(pb::MigrationInProgress { order_id: u64::MAX, target_node: "n2".into() });
    let vms = vec![vm("a", 250, GIB, None), vm("a", 500, GIB, None), vm("b", u64::MAX, GIB, None), forged];
    let s = open(&srv.addr, hello("n1", 4000, 16 * GIB, vms)).await.unwrap();
    let refused: Vec<_> = s.welcome.refused.iter().map(|r| (r.vm_id.as_str(), r.code)).collect();
    let invalid = tonic::Code::InvalidArgument as i32;
    let denied = tonic::Code::PermissionDenied as i32;
    assert_eq!(refused, [("b", invalid), ("a", invalid), ("c", denied)], "{:?}", s.welcome.refused);
    assert!(s.welcome.refused[1].message.contains("twice"), "{:?}", s.welcome.refused[1]);
    assert!(
        s.welcome.refused[2].message.contains("not issued by this cluster"),
        "{:?}",
        s.welcome.refused[2]
    );
    let registered: Vec<_> = s.welcome.vms.iter().map(|v| (v.vm_id.as_str(), v.migrating)).collect();
    assert_eq!(registered, [("a", false), ("c", false)]);
    assert_eq!(node_reserved(&srv.state(), "n1"), (500, 2 * GIB), "a and c count, b does not");
    assert!(srv.state()["orders"].as_object().unwrap().is_empty(), "the forged order is not adopted");
    srv.stop().await;
}

#[tokio::test]
async fn bad_requests_get_errors_and_leave_the_ledger_alone() {
    let srv = start(Config::default()).await;
    let _other =
        open(&srv.addr, hello("other", 4000, 16 * GIB, vec![vm("theirs", 250, GIB, None)])).await.unwrap();
    let s = open(&srv.addr, hello("n1", 4000, 16 * GIB, vec![vm("a", 500, 2 * GIB, None)])).await.unwrap();
    let before = srv.state();
    let cases: Vec<(Body, tonic::Code, &str)> = vec![
        (
            Body::Reserve(pb::Reserve { vm_id: "nope".into(), target: res(500, GIB) }),
            tonic::Code::NotFound,
            "not registered",
        ),
        (
            Body::Reserve(pb::Reserve { vm_id: "theirs".into(), target: res(500, GIB) }),
            tonic::Code::PermissionDenied,
            "registered on node \"other\"",
        ),
        (
            Body::Reserve(pb::Reserve { vm_id: "a".into(), target: res(9000, GIB) }),
            tonic::Code::InvalidArgument,
            "above its maximum",
        ),
        (
            Body::Reserve(pb::Reserve { vm_id: "a".into(), target: res(u64::MAX, GIB) }),
            tonic::Code::InvalidArgument,
            "units",
        ),
        (
            Body::Reserve(pb::Reserve { vm_id: "a".into(), target: None }),
            tonic::Code::InvalidArgument,
            "missing",
        ),
        (
            Body::Release(pb::Release { vm_id: "a".into(), new_size: res(1000, GIB) }),
            tonic::Code::InvalidArgument,
            "above its reservation",
        ),
        (
            Body::Release(pb::Release { vm_id: "a".into(), new_size: res(0, 0) }),
            tonic::Code::InvalidArgument,
            "below its minimum",
        ),
        (Body::Hello(hello("n1", 1, 1, vec![])), tonic::Code::InvalidArgument, "first message"),
        (
            Body::MigrationStatus(pb::MigrationStatus { order_id: 42, phase: 2, reason: String::new() }),
            tonic::Code::NotFound,
            "order 42",
        ),
        (
            Body::MigrationStatus(pb::MigrationStatus { order_id: 42, phase: 0, reason: String::new() }),
            tonic::Code::InvalidArgument,
            "phase",
        ),
        (
            Body::AddVm(pb::AddVm { vm: Some(vm("a", 250, GIB, None)) }),
            tonic::Code::AlreadyExists,
            "already registered",
        ),
        (Body::AddVm(pb::AddVm { vm: None }), tonic::Code::InvalidArgument, "missing"),
    ];
    for (body, code, want) in cases {
        match s.call(body).await {
            Err(ClientError::Request { code: c, message }) => {
                assert_eq!(c, code, "{message}");
                assert!(message.contains(want), "{message:?} should mention {want:?}");
            }
            other => panic!("expected an error mentioning {want}, got {other:?}"),
        }
    }
    // A request naming a node this session does not own.
    match s.call_as("other".into(), Body::Ping(pb::Ping {})).await {
        Err(ClientError::Request { code, .. }) => assert_eq!(code, tonic::Code::PermissionDenied),
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.state(), before, "no bad request changed the ledger");
    // The session still works.
    let p = s.reserve("a", 750, 3 * GIB).await.unwrap();
    assert_eq!(p.permitted, res(750, 3 * GIB));
    let metrics = srv.http_get("/metrics").await;
    assert!(
        metrics.contains("vmscale_allocator_errors_total{kind=\"reserve\",error=\"unknown_vm\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("vmscale_allocator_node_reserved_milli_cpu{node=\"n1\"} 750"), "{metrics}");
    assert!(metrics.contains("vmscale_allocator_decision_seconds_bucket"));
    let state = srv.http_get("/state").await;
    assert!(state.contains("200 OK") && state.contains("\"n1\""), "{state}");
    srv.stop().await;
}

#[tokio::test]
async fn an_agent_that_goes_away_hands_its_node_back() {
    let srv = start(Config::default()).await;
    let s = open(&srv.addr, hello("n1", 4000, 16 * GIB, vec![vm("a", 250, GIB, None)])).await.unwrap();
    assert!(s.reserve("a", 500, 2 * GIB).await.is_ok());
    assert!(srv.state()["nodes"]["n1"]["session"].is_u64());
    drop(s); // the agent closes its side of the stream
    let mut waited = 0;
    while srv.state()["nodes"]["n1"]["session"].is_u64() {
        assert!(waited < 100, "the session is still open 5 s after its agent left");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    // The node keeps its reservations while its agent is away.
    assert_eq!(node_reserved(&srv.state(), "n1"), (500, 2 * GIB));

    // An agent whose connection breaks: through a proxy that is then cut.
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = format!("http://{}", proxy.local_addr().unwrap());
    let upstream = srv.addr.trim_start_matches("http://").to_owned();
    let cut = CancellationToken::new();
    let cut2 = cut.clone();
    tokio::spawn(async move {
        let (mut down, _) = proxy.accept().await.unwrap();
        let mut up = tokio::net::TcpStream::connect(upstream).await.unwrap();
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
            () = cut2.cancelled() => {} // both sockets are dropped: the connection is gone
        }
    });
    let s2 = open(&proxy_addr, hello("n2", 4000, 16 * GIB, vec![])).await.unwrap();
    assert!(srv.state()["nodes"]["n2"]["session"].is_u64());
    cut.cancel();
    let mut waited = 0;
    while srv.state()["nodes"]["n2"]["session"].is_u64() {
        assert!(waited < 100, "the session is still open 5 s after its connection broke");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    drop(s2);
    srv.stop().await;
}

#[tokio::test]
async fn a_second_session_replaces_the_first() {
    let srv = start(Config::default()).await;
    let first = open(&srv.addr, hello("n1", 4000, 16 * GIB, vec![vm("a", 250, GIB, None)])).await.unwrap();
    let second =
        open(&srv.addr, hello("n1", 4000, 16 * GIB, vec![vm("a", 500, 2 * GIB, Some((750, 3 * GIB)))]))
            .await
            .unwrap();
    assert_eq!(second.welcome.vms[0].reserved, res(750, 3 * GIB), "reservation = max(current, last permit)");
    // The first session is told it was replaced, and can no longer act.
    let r = first.reserve("a", 1000, 4 * GIB).await;
    assert!(r.is_err(), "{r:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = first.ended.lock().unwrap().clone().expect("first session ended");
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert!(status.message().contains("newer session"));
    assert!(second.reserve("a", 1000, 4 * GIB).await.is_ok());
    // The replaced session going away does not disconnect the node.
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(srv.state()["nodes"]["n1"]["session"].is_u64());
    srv.stop().await;
}

#[tokio::test]
async fn restart_rebuilds_from_reregistration_without_overcommit() {
    let srv = start(Config::default()).await;
    let s =
        open(&srv.addr, hello("n1", 2000, 8 * GIB, vec![vm("a", 250, GIB, None), vm("b", 250, GIB, None)]))
            .await
            .unwrap();
    let pa = s.reserve("a", 1000, 4 * GIB).await.unwrap().permitted.unwrap();
    let pb_ = s.reserve("b", 2000, 8 * GIB).await.unwrap().permitted.unwrap();
    assert_eq!(pa.milli_cpu + pb_.milli_cpu, 2000, "node filled exactly");
    srv.stop().await;
    assert!(s.reserve("a", 1250, 5 * GIB).await.is_err(), "no grants while the allocator is down");

    // A new allocator knows nothing: the node is unknown until its agent registers.
    let srv = start(Config::default()).await;
    assert_eq!(srv.state()["nodes"].as_object().unwrap().len(), 0);
    // The agent re-registers: "a" runs at its permit, "b" was still plugging (current below permit).
    let s = open(
        &srv.addr,
        hello(
            "n1",
            2000,
            8 * GIB,
            vec![
                vm("a", pa.milli_cpu, pa.memory_bytes, Some((pa.milli_cpu, pa.memory_bytes))),
                vm("b", 250, GIB, Some((pb_.milli_cpu, pb_.memory_bytes))),
            ],
        ),
    )
    .await
    .unwrap();
    let (c, m) = node_reserved(&srv.state(), "n1");
    assert_eq!((c, m), (2000, 8 * GIB), "both permits are held again, nothing counted twice");
    let p = s.reserve("a", pa.milli_cpu + 250, pa.memory_bytes + GIB).await.unwrap();
    assert_eq!(p.outcome, pb::permit::Outcome::Denied as i32, "full node: no grant after restart");
    srv.stop().await;
}

#[tokio::test]
async fn a_hot_node_gets_a_migration_order_and_the_move_lands() {
    let config = Config { plan_interval_ms: 20, ..Config::default() };
    let srv = start(config).await;
    let mut a = open(
        &srv.addr,
        hello("a", 4000, 16 * GIB, vec![vm("big", 2000, 8 * GIB, None), vm("small", 1000, 4 * GIB, None)]),
    )
    .await
    .unwrap();
    let mut b = open(&srv.addr, hello("b", 8000, 32 * GIB, vec![])).await.unwrap();
    // "big" wants the whole node: denied demand pushes node a past its watermark.
    let p = a.reserve("big", 4000, 16 * GIB).await.unwrap();
    assert_eq!(p.outcome, pb::permit::Outcome::Partial as i32);
    let order = tokio::time::timeout(Duration::from_secs(5), a.pushed.recv()).await.unwrap().unwrap();
    let Some(Reply::MigrationOrder(o)) = order.body else { panic!("{order:?}") };
    assert_eq!((o.source_node.as_str(), o.target_node.as_str()), ("a", "b"));
    // The source learns where the target agent takes the VM in, and the
    // target hears of the same order (it accepts nothing else).
    assert_eq!(o.target_endpoint, "http://b:7073");
    let to_target = tokio::time::timeout(Duration::from_secs(5), b.pushed.recv()).await.unwrap().unwrap();
    assert_eq!(to_target.body, Some(Reply::MigrationOrder(o.clone())));
    assert_eq!(o.vm_id, "big", "one move, the VM whose demand covers the excess");
    // While it moves, the VM may not change and is held on both nodes.
    let r = a.reserve(&o.vm_id, 4000, 16 * GIB).await;
    assert!(matches!(r, Err(ClientError::Request { code: tonic::Code::FailedPrecondition, .. })), "{r:?}");
    let st = srv.state();
    assert!(st["nodes"]["b"]["vms"][&o.vm_id].is_object());
    a.call(Body::MigrationStatus(pb::MigrationStatus {
        order_id: o.order_id,
        phase: 1,
        reason: String::new(),
    }))
    .await
    .unwrap();
    a.call(Body::MigrationStatus(pb::MigrationStatus {
        order_id: o.order_id,
        phase: 2,
        reason: String::new(),
    }))
    .await
    .unwrap();
    let st = srv.state();
    assert!(st["nodes"]["a"]["vms"].get(&o.vm_id).is_none(), "released on the source at completion");
    assert_eq!(st["nodes"]["b"]["vms"][&o.vm_id]["state"]["state"], "active");
    assert_eq!(node_reserved(&st, "b"), (4000, 16 * GIB), "target holds the VM with its demand");
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_tells_agents_to_reconnect() {
    let srv = start(Config::default()).await;
    let s = open(&srv.addr, hello("n1", 4000, 16 * GIB, vec![])).await.unwrap();
    let ended = s.ended.clone();
    srv.stop().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = ended.lock().unwrap().clone().expect("session ended");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_session_without_hello_times_out() {
    let srv = start(Config { hello_timeout_ms: 100, ..Config::default() }).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
    let mut client = pb::allocator_client::AllocatorClient::new(channel(&srv.addr).await.unwrap());
    let r = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    let s = r.expect_err("no hello, no session");
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
    drop(tx);
    srv.stop().await;
}

/// The order key makes an allocator that restarted adopt the moves it
/// ordered before (its agents report them), and only those: a second
/// allocator with another key refuses the same report, and nothing is held
/// on the target.
#[tokio::test]
async fn a_restarted_allocator_adopts_only_the_orders_it_signed() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("order.key");
    vmscale_allocator::config::ensure_order_key(&key).unwrap();
    let config = || Config { plan_interval_ms: 20, order_key: Some(key.clone()), ..Config::default() };
    let big = || vm("big", 2000, 8 * GIB, None);
    let small = || vm("small", 1000, 4 * GIB, None);

    let srv = start(config()).await;
    let mut a = open(&srv.addr, hello("a", 4000, 16 * GIB, vec![big(), small()])).await.unwrap();
    let _b = open(&srv.addr, hello("b", 8000, 32 * GIB, vec![])).await.unwrap();
    a.reserve("big", 4000, 16 * GIB).await.unwrap();
    let order = tokio::time::timeout(Duration::from_secs(5), a.pushed.recv()).await.unwrap().unwrap();
    let Some(Reply::MigrationOrder(o)) = order.body else { panic!("{order:?}") };
    srv.stop().await;

    // The source agent reports the move to the restarted allocator.
    let moving = || {
        let mut v = vm(&o.vm_id, 2000, 8 * GIB, None);
        v.migration =
            Some(pb::MigrationInProgress { order_id: o.order_id, target_node: o.target_node.clone() });
        let others = vec![small()];
        hello("a", 4000, 16 * GIB, [vec![v], others].concat())
    };
    let srv = start(config()).await;
    let _b = open(&srv.addr, hello("b", 8000, 32 * GIB, vec![])).await.unwrap();
    let a = open(&srv.addr, moving()).await.unwrap();
    assert!(a.welcome.refused.is_empty(), "{:?}", a.welcome.refused);
    assert!(a.welcome.vms.iter().any(|v| v.vm_id == o.vm_id && v.migrating));
    let st = srv.state();
    assert_eq!(st["orders"][o.order_id.to_string()]["state"], "started", "{st}");
    assert!(st["nodes"]["b"]["vms"][&o.vm_id].is_object(), "room held on the target again");
    srv.stop().await;

    // An allocator with another key: the same report is a forgery to it.
    let srv = start(Config { order_key: None, ..config() }).await;
    let _b = open(&srv.addr, hello("b", 8000, 32 * GIB, vec![])).await.unwrap();
    let a = open(&srv.addr, moving()).await.unwrap();
    assert_eq!(a.welcome.refused.len(), 1, "{:?}", a.welcome.refused);
    assert_eq!(a.welcome.refused[0].code, tonic::Code::PermissionDenied as i32);
    let st = srv.state();
    assert!(st["orders"].as_object().unwrap().is_empty(), "{st}");
    assert!(st["nodes"]["b"]["vms"].as_object().unwrap().is_empty(), "nothing held on b");
    srv.stop().await;
}
