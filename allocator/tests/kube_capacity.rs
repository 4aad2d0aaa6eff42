//! Node capacity from the cluster against a scripted API server: a real
//! `kube::Client` over `tower_test::mock`; the Node and Pod list and watch
//! requests are checked and answered by hand (no API server runs here), and
//! the ledger follows. Also matches the requests against the ClusterRole in
//! deploy/.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tower_test::mock::{self, Handle, SendResponse};
use vmscale_allocator::capacity::watch::run;
use vmscale_allocator::capacity::VmLabel;
use vmscale_allocator::config::Config;
use vmscale_allocator::core::units::{ComputeUnit, Resources};
use vmscale_allocator::core::vm::{Bounds, VmRegistration};
use vmscale_allocator::core::NodeRegistration;
use vmscale_allocator::shared::Shared;

type ApiHandle = Handle<Request<Body>, Response<Body>>;
type Reply = SendResponse<Response<Body>>;

const STEP: Duration = Duration::from_secs(10);
const GI: u64 = 1 << 30;

struct Api {
    handle: ApiHandle,
    /// (verb, resource) of every request.
    seen: BTreeSet<(String, String)>,
}

impl Api {
    /// The next request: its resource (`nodes`, `pods`), whether it is a
    /// watch, its query, and the reply handle.
    async fn next(&mut self) -> (String, bool, BTreeMap<String, String>, Reply) {
        let (req, reply) = timeout(STEP, self.handle.next_request())
            .await
            .expect("no request in time")
            .expect("client gone");
        assert_eq!(req.method(), Method::GET);
        let resource = req.uri().path().strip_prefix("/api/v1/").expect("core v1 only").to_owned();
        assert!(resource == "nodes" || resource == "pods", "{}", req.uri());
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
        let watch = query.get("watch").is_some_and(|w| w == "true");
        self.seen.insert((if watch { "watch" } else { "list" }.into(), resource.clone()));
        (resource, watch, query, reply)
    }
}

fn respond(reply: Reply, body: Vec<u8>) {
    reply.send_response(Response::builder().status(StatusCode::OK).body(Body::from(body)).unwrap());
}

fn list(kind: &str, rv: &str, items: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}, "items": items}),
    )
    .unwrap()
}

fn events(evs: &[(&str, Value)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (kind, object) in evs {
        serde_json::to_writer(&mut body, &json!({"type": kind, "object": object})).unwrap();
        body.push(b'\n');
    }
    body
}

fn node(name: &str, rv: &str, cpu: &str, mem: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": rv},
        "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "110"}},
    })
}

fn pod(name: &str, rv: &str, node: &str, vm: bool, cpu: &str, mem: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "namespace": "default", "name": name, "resourceVersion": rv,
            "labels": if vm { json!({"vmscale.io/autoscale": "true"}) } else { json!({"app": name}) },
        },
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i", "resources": {"requests": {"cpu": cpu, "memory": mem}}}]},
        "status": {"phase": "Running"},
    })
}

async fn wait_for(shared: &Shared, want: &[(&str, Resources)]) {
    let want: BTreeMap<String, Resources> = want.iter().map(|(n, r)| ((*n).to_owned(), *r)).collect();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let now = shared.lock().cluster.cluster_capacity.clone();
        if now == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "capacities {now:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn capacity_follows_nodes_and_pods_with_exact_requests() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut api = Api { handle, seen: BTreeSet::new() };
    let cancel = CancellationToken::new();
    let shared = Shared::new(Config::default(), cancel.clone());
    let label = VmLabel { key: "vmscale.io/autoscale".into(), value: "true".into() };
    let task = tokio::spawn(run(client, label, shared.clone(), cancel.clone()));

    // An agent already registered node a with the host's whole size, and
    // the VM of pod default/pg.
    let cu = ComputeUnit::new(Resources::new(250, GI)).unwrap();
    let bounds = Bounds::new(Resources::new(250, GI), Resources::new(4000, 16 * GI)).unwrap();
    let pg =
        VmRegistration::new("default/pg".into(), Resources::new(1000, 2 * GI), Resources::ZERO, bounds, cu)
            .unwrap();
    let reg = NodeRegistration {
        node: "a".into(),
        capacity: Resources::new(16_000, 64 * GI),
        vms: vec![pg],
        migration_endpoint: String::new(),
        refused: Vec::new(),
    };
    let session = shared.lock().cluster.open_session(reg, 0).unwrap().session;

    // 1. The two lists, in whichever order the watchers send them; both from
    // the watch cache, the pods' without finished ones.
    let mut watches = BTreeMap::new();
    for _ in 0..2 {
        let (resource, watch, q, reply) = api.next().await;
        assert!(!watch);
        assert_eq!(q.get("resourceVersion").map(String::as_str), Some("0"), "{q:?}");
        assert_eq!(q.get("limit"), None, "one page from the cache");
        if resource == "nodes" {
            assert_eq!(q.get("fieldSelector"), None);
            respond(
                reply,
                list("NodeList", "10", vec![node("a", "1", "8", "32Gi"), node("b", "2", "4", "16Gi")]),
            );
        } else {
            assert_eq!(q["fieldSelector"], "status.phase!=Succeeded,status.phase!=Failed");
            let pods = vec![
                pod("web", "3", "a", false, "1", "2Gi"),
                pod("pg", "4", "a", true, "4", "8Gi"),
                pod("batch", "5", "b", false, "500m", "1Gi"),
            ];
            respond(reply, list("PodList", "20", pods));
        }
    }
    // The VM pod does not count: its VM is in the ledger already.
    wait_for(&shared, &[("a", Resources::new(7000, 30 * GI)), ("b", Resources::new(3500, 15 * GI))]).await;
    assert_eq!(
        shared.lock().cluster.node("a").unwrap().capacity,
        Resources::new(7000, 30 * GI),
        "the live ledger took it"
    );

    // 2. Watches from the lists' versions; pods come and go, a node changes.
    for _ in 0..2 {
        let (resource, watch, q, reply) = api.next().await;
        assert!(watch);
        assert_eq!(q["resourceVersion"], if resource == "nodes" { "10" } else { "20" });
        watches.insert(resource, reply);
    }
    let pod_events = events(&[
        ("DELETED", pod("web", "21", "a", false, "1", "2Gi")),
        ("ADDED", pod("cache", "22", "b", false, "1", "4Gi")),
    ]);
    respond(watches.remove("pods").unwrap(), pod_events);
    wait_for(&shared, &[("a", Resources::new(8000, 32 * GI)), ("b", Resources::new(2500, 11 * GI))]).await;
    respond(watches.remove("nodes").unwrap(), events(&[("DELETED", node("b", "11", "4", "16Gi"))]));
    wait_for(&shared, &[("a", Resources::new(8000, 32 * GI))]).await;
    assert_eq!(shared.lock().cluster.node("a").unwrap().capacity, Resources::new(8000, 32 * GI));

    // pg's VM leaves the ledger: its pod counts again, without any watch
    // event (the label alone no longer hides a pod's requests).
    shared.lock().cluster.remove_vm(&session, "default/pg").unwrap();
    wait_for(&shared, &[("a", Resources::new(4000, 24 * GI))]).await;

    // The watchers watch again; then stop.
    let (_, watch, _, _r1) = api.next().await;
    let (_, watch2, _, _r2) = api.next().await;
    assert!(watch && watch2);
    cancel.cancel();
    timeout(STEP, task).await.unwrap().unwrap();

    let want: BTreeSet<(String, String)> = ["list", "watch"]
        .iter()
        .flat_map(|v| ["nodes", "pods"].map(|r| ((*v).to_owned(), r.to_owned())))
        .collect();
    assert_eq!(api.seen, want);
    assert_cluster_role_grants(&api.seen);
}

/// The ClusterRole in deploy/ grants exactly these requests.
fn assert_cluster_role_grants(seen: &BTreeSet<(String, String)>) {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kustomize/base/allocator-rbac.yaml");
    let text = std::fs::read_to_string(p).unwrap();
    let role: ClusterRole = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .find_map(|v| (v["kind"] == "ClusterRole").then(|| serde_json::from_value(v).unwrap()))
        .unwrap();
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]), "core group only");
        for r in rule.resources.unwrap() {
            for v in &rule.verbs {
                granted.insert((v.clone(), r.clone()));
            }
        }
    }
    assert_eq!(&granted, seen, "the ClusterRole must grant exactly the requests made");
}
