//! The Kubernetes VM source and status write-back against a scripted API
//! server: a real `kube::Client` over `tower_test::mock`, as kube-rs's own
//! controller example tests. Every request the code makes is taken from the
//! mock, checked (method, path, query, headers, body) and answered by hand;
//! no API server runs here. Each step waits at most `STEP`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tower_test::mock::{self, Handle, SendResponse};
use vmscale_agent::core::policy::Size;
use vmscale_agent::vms::kube::status::{KubeStatusWriter, StatusConfig, StatusReporter, VmStatus};
use vmscale_agent::vms::kube::{KubeSource, KubeSourceConfig};
use vmscale_agent::vms::VmSpec;

const STEP: Duration = Duration::from_secs(10);

type ApiHandle = Handle<Request<Body>, Response<Body>>;
type Reply = SendResponse<Response<Body>>;

fn mock_client() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

async fn next_request(api: &mut ApiHandle) -> (Request<Body>, Reply) {
    timeout(STEP, api.next_request()).await.expect("no request in time").expect("client gone")
}

/// No request within `d`.
async fn assert_quiet(api: &mut ApiHandle, d: Duration) {
    if let Ok(Some((req, _))) = timeout(d, api.next_request()).await {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

/// Once the code under test has dropped its client, the mock reports no
/// more requests: nothing is left running.
async fn assert_closed(api: &mut ApiHandle) {
    let next = timeout(STEP, api.next_request()).await.expect("client still alive");
    assert!(next.is_none(), "unexpected request after cancel");
}

fn query(req: &Request<Body>) -> BTreeMap<String, String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect()
}

fn assert_request(req: &Request<Body>, method: Method, path: &str, want: &[(&str, &str)]) {
    assert_eq!(req.method(), method, "{}", req.uri());
    assert_eq!(req.uri().path(), path);
    let want: BTreeMap<String, String> =
        want.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    assert_eq!(query(req), want, "query of {}", req.uri());
}

const SELECTORS: [(&str, &str); 2] =
    [("fieldSelector", "spec.nodeName=node-a"), ("labelSelector", "vmscale.io/autoscale=true")];

fn assert_list(req: &Request<Body>, path: &str) {
    let mut q = SELECTORS.to_vec();
    q.extend([("resourceVersion", "0"), ("resourceVersionMatch", "NotOlderThan")]);
    assert_request(req, Method::GET, path, &q);
}

fn assert_watch(req: &Request<Body>, path: &str, resource_version: &str) {
    let mut q = SELECTORS.to_vec();
    q.extend([
        ("watch", "true"),
        ("timeoutSeconds", "290"),
        ("allowWatchBookmarks", "true"),
        ("resourceVersion", resource_version),
    ]);
    assert_request(req, Method::GET, path, &q);
}

fn reply(send: Reply, status: StatusCode, body: &[u8]) {
    send.send_response(Response::builder().status(status).body(Body::from(body.to_vec())).unwrap());
}

fn reply_list(send: Reply, resource_version: &str, pods: Vec<Value>) {
    let list = json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": resource_version},
        "items": pods,
    });
    reply(send, StatusCode::OK, &serde_json::to_vec(&list).unwrap());
}

/// A finished watch response: one JSON event per line, then the end, after
/// which the watcher watches again from the last resource version it saw.
fn reply_events(send: Reply, events: &[(&str, Value)]) {
    let mut body = Vec::new();
    for (kind, object) in events {
        serde_json::to_writer(&mut body, &json!({"type": kind, "object": object})).unwrap();
        body.push(b'\n');
    }
    reply(send, StatusCode::OK, &body);
}

/// A pod's UID: a UUID derived from its namespace and name.
fn uid(ns: &str, name: &str) -> String {
    let n = format!("{ns}/{name}").bytes().fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    format!("00000000-0000-4000-8000-{:012x}", n & 0xffff_ffff_ffff)
}

/// A running pod of this node, selected, with good annotations (max 8 CUs).
fn pod(ns: &str, name: &str, rv: &str, extra: &[(&str, Value)]) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "namespace": ns, "name": name, "uid": uid(ns, name), "resourceVersion": rv,
            "labels": {"vmscale.io/autoscale": "true", "app": "postgres"},
            "annotations": {
                "vmscale.io/informant": "http://10.0.2.15:7080",
                "vmscale.io/cu-milli-cpu": "250",
                "vmscale.io/cu-memory-bytes": "1Gi",
                "vmscale.io/min-cus": "1",
                "vmscale.io/max-cus": "8",
                "vmscale.io/memory": "virtio-mem:vm0",
            },
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "qemu", "image": "qemu"}]},
        "status": {"phase": "Running"},
    });
    for (path, v) in extra {
        *p.pointer_mut(path).unwrap_or_else(|| panic!("{path}")) = v.clone();
    }
    p
}

fn annotation(key: &str) -> String {
    format!("/metadata/annotations/vmscale.io~1{key}")
}

fn summary(vms: &[VmSpec]) -> Vec<(String, u32)> {
    vms.iter().map(|v| (v.id.clone(), v.max_cus)).collect()
}

async fn wait_for_set(rx: &mut watch::Receiver<Vec<VmSpec>>, want: &[(&str, u32)]) {
    let want: Vec<(String, u32)> = want.iter().map(|(id, n)| ((*id).to_owned(), *n)).collect();
    let seen = timeout(STEP, rx.wait_for(|vms| summary(vms) == want)).await.map(|r| r.is_ok());
    let now = summary(&rx.borrow());
    assert_eq!(seen, Ok(true), "published set is {now:?}, want {want:?}");
}

#[tokio::test]
async fn source_lists_watches_and_relists_with_exact_requests() {
    let (client, mut api) = mock_client();
    let cancel = CancellationToken::new();
    let mut src =
        KubeSource { config: KubeSourceConfig::new("node-a") }.start(client, cancel.clone()).unwrap();
    assert!(src.vms.borrow().is_empty(), "nothing before the first list");

    // 1. The initial list: every kind of pod a node may show.
    let (req, send) = next_request(&mut api).await;
    assert_list(&req, "/api/v1/pods");
    let bad = pod("ns1", "pg-bad", "90", &[(&annotation("max-cus"), json!("lots"))]);
    let other_label =
        pod("ns1", "pg-other", "91", &[("/metadata/labels/vmscale.io~1autoscale", json!("false"))]);
    let pending = pod("ns1", "pg-pending", "92", &[("/status/phase", json!("Pending"))]);
    let mut deleting = pod("ns1", "pg-deleting", "93", &[]);
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let elsewhere = pod("ns2", "pg-elsewhere", "94", &[("/spec/nodeName", json!("node-b"))]);
    let list =
        vec![pod("ns1", "pg-1", "95", &[]), bad.clone(), other_label, pending.clone(), deleting, elsewhere];
    reply_list(send, "100", list);
    wait_for_set(&mut src.vms, &[("ns1/pg-1", 8)]).await;
    assert_eq!(src.stats.skipped(), BTreeMap::from([("invalid", 1)]));
    assert_eq!(src.pods.get("ns1/pg-1").unwrap().uid, Some(uid("ns1", "pg-1")));

    // 2. Watch from the list's version; changes arrive as events.
    let (req, send) = next_request(&mut api).await;
    assert_watch(&req, "/api/v1/pods", "100");
    let started = pod("ns1", "pg-pending", "101", &[]);
    let grown = pod("ns1", "pg-1", "102", &[(&annotation("max-cus"), json!("16"))]);
    let mut added = pod("ns2", "pg-2", "103", &[]);
    added["metadata"]["annotations"]["vmscale.io/vm-id"] = json!("db-2");
    let mut gone = bad;
    gone["metadata"]["resourceVersion"] = json!("104");
    let bookmark = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"resourceVersion": "105"}});
    reply_events(
        send,
        &[
            ("MODIFIED", started),
            ("MODIFIED", grown),
            ("ADDED", added),
            ("DELETED", gone),
            ("BOOKMARK", bookmark),
        ],
    );
    wait_for_set(&mut src.vms, &[("ns1/pg-1", 16), ("ns1/pg-pending", 8), ("ns2/db-2", 8)]).await;
    assert_eq!(src.pods.get("ns2/db-2").unwrap().name, "pg-2");

    // 3. The watch ended: watch again from the bookmark. The server has
    // compacted that version away (410): the watcher must list again.
    let (req, send) = next_request(&mut api).await;
    assert_watch(&req, "/api/v1/pods", "105");
    let expired = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 105 (150)", "reason": "Expired", "code": 410,
    });
    reply_events(send, &[("ERROR", expired)]);

    // 4. The re-list (after the watcher's backoff) replaces the whole set
    // at once. pg-1's annotations broke meanwhile: it keeps its last good spec.
    let (req, send) = next_request(&mut api).await;
    assert_list(&req, "/api/v1/pods");
    assert_eq!(src.stats.watch_errors(), 1);
    let broken = pod(
        "ns1",
        "pg-1",
        "180",
        &[(&annotation("max-cus"), json!("16")), (&annotation("memory"), json!("balloon"))],
    );
    reply_list(send, "200", vec![broken, pod("ns1", "pg-3", "190", &[])]);
    wait_for_set(&mut src.vms, &[("ns1/pg-1", 16), ("ns1/pg-3", 8)]).await;
    assert_eq!(src.stats.skipped(), BTreeMap::from([("invalid", 2)]));
    assert!(src.pods.get("ns2/db-2").is_none());

    // 5. Watching again from the new list; stopping drops the request and the client.
    let (req, _held) = next_request(&mut api).await;
    assert_watch(&req, "/api/v1/pods", "200");
    cancel.cancel();
    let closed = timeout(STEP, src.vms.changed()).await.expect("source did not stop");
    assert!(closed.is_err(), "the channel closes when the source stops");
    assert_closed(&mut api).await;
}

fn status(milli_cpu: u64, at_s: u64) -> VmStatus {
    VmStatus {
        current: Size::new(milli_cpu, 2 << 30),
        approved: Size::new(milli_cpu + 250, 3 << 30),
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(at_s),
    }
}

async fn assert_patch(api: &mut ApiHandle, path: &str, want: &Value) -> Reply {
    let (req, send) = next_request(api).await;
    assert_request(&req, Method::PATCH, path, &[("fieldManager", "vmscale-agent")]);
    let headers = req.headers();
    assert_eq!(headers[http::header::CONTENT_TYPE], "application/merge-patch+json");
    assert_eq!(headers[http::header::ACCEPT], "application/json");
    let body: Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(&body, want);
    send
}

fn patch_body(cpu: &str, approved_cpu: &str, at: &str) -> Value {
    json!({"metadata": {"annotations": {
        "vmscale.io/current-milli-cpu": cpu,
        "vmscale.io/current-memory-bytes": "2147483648",
        "vmscale.io/approved-milli-cpu": approved_cpu,
        "vmscale.io/approved-memory-bytes": "3221225472",
        "vmscale.io/updated-at": at,
    }}})
}

#[tokio::test]
async fn status_is_written_as_a_merge_patch_of_annotations_only() {
    // The source, limited to one namespace, tells the writer which pod a VM is.
    let (client, mut source_api) = mock_client();
    let cancel = CancellationToken::new();
    let config = KubeSourceConfig { namespace: Some("ns2".into()), ..KubeSourceConfig::new("node-a") };
    let mut src = KubeSource { config }.start(client, cancel.clone()).unwrap();
    let (req, send) = next_request(&mut source_api).await;
    assert_list(&req, "/api/v1/namespaces/ns2/pods");
    let mut p = pod("ns2", "pg-2", "10", &[]);
    p["metadata"]["annotations"]["vmscale.io/vm-id"] = json!("db-2");
    reply_list(send, "11", vec![p.clone()]);
    wait_for_set(&mut src.vms, &[("ns2/db-2", 8)]).await;
    let (req, _held) = next_request(&mut source_api).await;
    assert_watch(&req, "/api/v1/namespaces/ns2/pods", "11");

    let (client, mut api) = mock_client();
    let cfg = StatusConfig { min_interval_ms: 300, write_timeout_ms: 5_000, retry_max_ms: 1_000 };
    let reporter =
        StatusReporter::start(KubeStatusWriter::new(client), src.pods.clone(), cfg, cancel.clone());
    let path = "/api/v1/namespaces/ns2/pods/pg-2";

    // The first report is written at once.
    let t0 = Instant::now();
    reporter.report("ns2/db-2", status(500, 1_800_000_000));
    let send = assert_patch(&mut api, path, &patch_body("500", "750", "2027-01-15T08:00:00Z")).await;
    reply(send, StatusCode::OK, &serde_json::to_vec(&p).unwrap());

    // Two changes right after: one patch with the latest, once the interval is over.
    reporter.report("ns2/db-2", status(750, 1_800_000_010));
    reporter.report("ns2/db-2", status(1000, 1_800_000_011));
    let want = patch_body("1000", "1250", "2027-01-15T08:00:11Z");
    let send = assert_patch(&mut api, path, &want).await;
    assert!(t0.elapsed() >= Duration::from_millis(300), "second patch after {:?}", t0.elapsed());

    // The API server fails it; the same patch is retried after twice the interval.
    let busy = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500,
    });
    reply(send, StatusCode::INTERNAL_SERVER_ERROR, &serde_json::to_vec(&busy).unwrap());
    let send = assert_patch(&mut api, path, &want).await;
    assert!(t0.elapsed() >= Duration::from_millis(300 + 600), "retry after {:?}", t0.elapsed());
    reply(send, StatusCode::OK, &serde_json::to_vec(&p).unwrap());

    // The same sizes at a later time, and a VM with no pod: nothing to write.
    reporter.report("ns2/db-2", status(1000, 1_800_000_020));
    reporter.report("no-such-vm", status(500, 1_800_000_020));
    assert_quiet(&mut api, Duration::from_millis(1_000)).await;

    cancel.cancel();
    drop(reporter);
    assert_closed(&mut api).await;
}

/// A pod that names a `tcp:` QMP monitor is not scaled, and says why on
/// itself: one merge patch of `vmscale.io/refused`, removed (`null`) once
/// the pod is fixed.
#[tokio::test]
async fn a_tcp_qmp_pod_is_refused_with_a_note_on_the_pod() {
    let (client, mut source_api) = mock_client();
    let cancel = CancellationToken::new();
    let mut src =
        KubeSource { config: KubeSourceConfig::new("node-a") }.start(client, cancel.clone()).unwrap();
    let (client, mut api) = mock_client();
    let cfg = StatusConfig { min_interval_ms: 300, write_timeout_ms: 5_000, retry_max_ms: 1_000 };
    let _reporter =
        StatusReporter::start(KubeStatusWriter::new(client), src.pods.clone(), cfg, cancel.clone());

    let (req, send) = next_request(&mut source_api).await;
    assert_list(&req, "/api/v1/pods");
    let tcp = pod("ns1", "pg-tcp", "10", &[]);
    let mut tcp = tcp;
    tcp["metadata"]["annotations"]["vmscale.io/qmp"] = json!("tcp:10.0.0.9:4444");
    reply_list(send, "11", vec![tcp.clone(), pod("ns1", "pg-1", "9", &[])]);
    wait_for_set(&mut src.vms, &[("ns1/pg-1", 8)]).await;

    let path = "/api/v1/namespaces/ns1/pods/pg-tcp";
    let (req, send) = next_request(&mut api).await;
    assert_request(&req, Method::PATCH, path, &[("fieldManager", "vmscale-agent")]);
    let body: Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    let note = body["metadata"]["annotations"]["vmscale.io/refused"].as_str().unwrap().to_owned();
    assert!(note.contains("QMP over TCP is not allowed for pods"), "{note}");
    assert_eq!(body["metadata"]["annotations"].as_object().unwrap().len(), 1, "{body}");
    reply(send, StatusCode::OK, &serde_json::to_vec(&tcp).unwrap());

    // The pod is fixed (and shows the note): the note goes.
    let (req, send) = next_request(&mut source_api).await;
    assert_watch(&req, "/api/v1/pods", "11");
    let mut fixed = pod("ns1", "pg-tcp", "12", &[]);
    fixed["metadata"]["annotations"]["vmscale.io/refused"] = json!(note);
    reply_events(send, &[("MODIFIED", fixed)]);
    wait_for_set(&mut src.vms, &[("ns1/pg-1", 8), ("ns1/pg-tcp", 8)]).await;
    let want = json!({"metadata": {"annotations": {"vmscale.io/refused": null}}});
    let send = assert_patch(&mut api, path, &want).await;
    reply(send, StatusCode::OK, &serde_json::to_vec(&tcp).unwrap());
    cancel.cancel();
}
