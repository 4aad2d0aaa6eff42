//! The scheduler extender over real HTTP, with payloads shaped as
//! kube-scheduler sends them (Go field names, `null` for the form not used,
//! whole Pod objects with status and managed fields), against a ledger
//! filled by real agent sessions over gRPC.

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vmscale_allocator::capacity::VmLabel;
use vmscale_allocator::config::Config;
use vmscale_allocator::server::{serve_with, Extras};
use vmscale_allocator::shared::Shared;
use vmscale_allocator_client::{channel, SessionClient};
use vmscale_proto::allocator as pb;

const GIB: u64 = 1 << 30;

async fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let body = serde_json::to_vec(body).unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())))
}

fn res(milli_cpu: u64, memory_bytes: u64) -> Option<pb::Resources> {
    Some(pb::Resources { milli_cpu, memory_bytes })
}

fn hello(node: &str, vm: Option<(u64, u64)>) -> pb::Hello {
    let vms = vm
        .map(|(c, m)| pb::VmRegistration {
            vm_id: format!("{node}-vm"),
            current: res(c, m),
            last_permit: None,
            bounds: Some(pb::Bounds { min: res(250, GIB), max: res(8000, 32 * GIB) }),
            compute_unit: res(250, GIB),
            migration: None,
        })
        .into_iter()
        .collect();
    pb::Hello {
        versions: Some(pb::VersionRange { min: 1, max: 1 }),
        node: node.into(),
        capacity: res(8000, 32 * GIB),
        vms,
        agent: "test".into(),
        migration_endpoint: String::new(),
    }
}

/// A pending VM pod as kube-scheduler has it from its informer.
fn vm_pod(min_cus: &str) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": "pg-0", "namespace": "db", "uid": "5f0c7a8e-1d8e-4c55-9a77-2f4b9e0c1a11",
            "resourceVersion": "48211", "creationTimestamp": "2026-11-28T03:00:00Z",
            "labels": {"app": "postgres", "vmscale.io/autoscale": "true"},
            "annotations": {
                "vmscale.io/qmp": "qmp.sock",
                "vmscale.io/cu-milli-cpu": "250", "vmscale.io/cu-memory-bytes": "1Gi",
                "vmscale.io/min-cus": min_cus, "vmscale.io/max-cus": "16",
                "vmscale.io/memory": "virtio-mem:vm0",
            },
            "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-28T03:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}],
        },
        "spec": {
            "schedulerName": "vmscale-scheduler",
            "containers": [{"name": "qemu", "image": "localhost/qemu:9",
                "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}},
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "securityContext": {}, "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"},
    })
}

fn node_object(name: &str) -> Value {
    json!({
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-28T03:00:00Z",
                "lastTransitionTime": "2026-11-28T02:00:00Z", "reason": "KubeletReady", "message": "kubelet is posting ready status"}]},
    })
}

#[tokio::test]
async fn filter_and_prioritize_answer_kube_scheduler_payloads() {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let http_addr = http.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let config = Config { max_moves_per_round: 0, insecure: true, ..Config::default() };
    let shared = Shared::new(config, stop.clone());
    let label = VmLabel { key: "vmscale.io/autoscale".into(), value: "true".into() };
    let routes = vmscale_allocator::extender::http::router(shared.clone(), label);
    let (_leader, rx) = watch::channel(true);
    let task =
        tokio::spawn(serve_with(shared, grpc, http, Extras { leader: Some(rx), routes: Some(routes) }));

    // Three nodes' agents: one empty, one half full, one nearly full.
    let mut sessions = Vec::new();
    for (node, vm) in
        [("node-a", None), ("node-b", Some((4000, 16 * GIB))), ("node-c", Some((7500, 31 * GIB)))]
    {
        sessions.push(SessionClient::open(channel(&addr).await.unwrap(), hello(node, vm)).await.unwrap());
    }

    // nodeCacheCapable: true -> names in, names out.
    let names = json!(["node-a", "node-b", "node-c", "node-d"]);
    let args = json!({"Pod": vm_pod("4"), "Nodes": null, "NodeNames": names});
    let (status, r) = post(&http_addr, "/scheduler/filter", &args).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["NodeNames"], json!(["node-a", "node-b"]), "{r}");
    assert!(r.get("Nodes").is_none(), "{r}");
    assert!(r["FailedNodes"]["node-c"].as_str().unwrap().contains("needs 1000 mCPU"), "{r}");
    assert!(r["FailedNodes"]["node-d"].as_str().unwrap().contains("no vmscale agent"), "{r}");
    assert_eq!(r["FailedAndUnresolvableNodes"], json!({}));
    assert_eq!(r["Error"], "");

    let (status, r) = post(&http_addr, "/scheduler/prioritize", &args).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r,
        json!([
            {"Host": "node-a", "Score": 8},
            {"Host": "node-b", "Score": 3},
            {"Host": "node-c", "Score": 0},
            {"Host": "node-d", "Score": 0},
        ])
    );

    // nodeCacheCapable: false -> whole Node objects: refused, with the fix.
    let list = json!({"metadata": {}, "items": [node_object("node-a"), node_object("node-c")]});
    let args = json!({"Pod": vm_pod("4"), "Nodes": list, "NodeNames": null});
    let (status, r) = post(&http_addr, "/scheduler/filter", &args).await;
    assert_eq!(status, 422, "{r}");
    assert!(r.as_str().unwrap().contains("nodeCacheCapable: true"), "{r}");

    // A body announced over 1 MiB (64 MiB): 413 before a byte of it is read.
    let mut s = tokio::net::TcpStream::connect(&http_addr).await.unwrap();
    let head = "POST /scheduler/filter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 67108864\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = s.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("over 1048576 bytes"), "{answer}");

    // A name sent twice is answered once.
    let args = json!({"Pod": vm_pod("4"), "NodeNames": ["node-a", "node-a"]});
    let (_, r) = post(&http_addr, "/scheduler/filter", &args).await;
    assert_eq!(r["NodeNames"], json!(["node-a"]), "{r}");

    // Not a VM: every node passes, no preference.
    let mut web = vm_pod("1");
    web["metadata"]["labels"] = json!({"app": "web"});
    let args = json!({"Pod": web, "Nodes": null, "NodeNames": ["node-c", "node-d"]});
    let (_, r) = post(&http_addr, "/scheduler/filter", &args).await;
    assert_eq!(r["NodeNames"], json!(["node-c", "node-d"]));
    let (_, r) = post(&http_addr, "/scheduler/prioritize", &args).await;
    assert_eq!(r, json!([{"Host": "node-c", "Score": 0}, {"Host": "node-d", "Score": 0}]));

    // A VM pod whose annotations are wrong fits nowhere, and says why.
    let args = json!({"Pod": vm_pod("many"), "Nodes": null, "NodeNames": ["node-a"]});
    let (_, r) = post(&http_addr, "/scheduler/filter", &args).await;
    assert_eq!(r["NodeNames"], json!([]));
    assert!(r["FailedAndUnresolvableNodes"]["node-a"].as_str().unwrap().contains("min-cus"), "{r}");

    // Not an ExtenderArgs: a 4xx that names the problem.
    let (status, r) = post(&http_addr, "/scheduler/filter", &json!({"NodeNames": []})).await;
    assert_eq!(status, 422, "{r}");
    assert!(r.as_str().unwrap().contains("Pod"), "{r}");

    for s in sessions {
        s.close();
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Over TLS (`http_tls`) the extender answers kube-scheduler's certificate
/// only; another certificate of the cluster CA gets 403 and no answer.
#[tokio::test]
async fn over_tls_only_the_scheduler_is_answered() {
    use tokio_rustls::TlsConnector;
    use vmscale_common::testing::TestPki;
    use vmscale_common::tls::{Identity, Tls};

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let stop = CancellationToken::new();
    let config = Config {
        max_moves_per_round: 0,
        tls: Some(pki.issue(&Identity::Allocator)),
        http_tls: true,
        ..Config::default()
    };
    let shared = Shared::new(config, stop.clone());
    let routes = vmscale_allocator::extender::http::router(shared.clone(), VmLabel::default());
    let task = tokio::spawn(serve_with(shared, grpc, http, Extras { leader: None, routes: Some(routes) }));

    let call = |who: Identity| {
        let files = pki.issue(&who);
        async move {
            let tls = Tls::load(&files).unwrap();
            let connector = TlsConnector::from(tls.rustls_client());
            let tcp = tokio::net::TcpStream::connect(http_addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from(Identity::Allocator.dns_name()).unwrap();
            let mut s = connector.connect(name, tcp).await.unwrap();
            let body = serde_json::to_vec(&json!({"Pod": vm_pod("4"), "NodeNames": ["node-a"]})).unwrap();
            let head = format!(
                "POST /scheduler/filter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&body).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let answer = call(Identity::Scheduler).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("no vmscale agent"), "{answer}");
    let answer = call(Identity::Node("node-a".into())).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("kube-scheduler.vmscale"), "{answer}");

    stop.cancel();
    task.await.unwrap().unwrap();
}
