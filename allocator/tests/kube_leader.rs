//! Leader election against a scripted API server: a real `kube::Client` over
//! `tower_test::mock`, every request checked and answered by hand (no API
//! server runs here). Time is tokio's paused clock, so the waits are exact.
//! Also checks that the RBAC in deploy/ grants exactly the requests made.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::rbac::v1::Role;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tower_test::mock::{self, Handle, SendResponse};
use vmscale_allocator::leader::lease::{run, LeaderError, LeaseConfig};
use vmscale_allocator::leader::Timing;

type ApiHandle = Handle<Request<Body>, Response<Body>>;
type Reply = SendResponse<Response<Body>>;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/vmscale-system/leases/vmscale-allocator";
const STEP: Duration = Duration::from_secs(30);

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: "vmscale-system".into(),
        name: "vmscale-allocator".into(),
        identity: identity.into(),
        timing: Timing {
            lease_duration: Duration::from_secs(10),
            renew_interval: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(7),
        },
    }
}

struct Api {
    handle: ApiHandle,
    /// RBAC verbs of the requests seen.
    verbs: BTreeSet<&'static str>,
}

impl Api {
    async fn next(&mut self) -> (Method, String, Option<Value>, Reply) {
        self.next_opt().await.expect("client gone")
    }

    /// `None` once the code under test has dropped its client.
    async fn next_opt(&mut self) -> Option<(Method, String, Option<Value>, Reply)> {
        let (req, reply) = timeout(STEP, self.handle.next_request()).await.expect("no request in time")?;
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let body = (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).unwrap());
        let verb = match (&parts.method, parts.uri.path()) {
            (&Method::GET, PATH) => "get",
            (&Method::PUT, PATH) => "update",
            (&Method::POST, p) if p == PATH.rsplit_once('/').unwrap().0 => "create",
            (m, p) => panic!("unexpected request {m} {p}"),
        };
        self.verbs.insert(verb);
        Some((parts.method, parts.uri.path().to_owned(), body, reply))
    }

    async fn expect(&mut self, method: Method) -> (Option<Value>, Reply) {
        let (m, path, body, reply) = self.next().await;
        assert_eq!(
            (&m, path.as_str()),
            (&method, if m == Method::POST { &PATH[..PATH.rfind('/').unwrap()] } else { PATH })
        );
        (body, reply)
    }
}

fn respond(reply: Reply, status: StatusCode, body: &Value) {
    reply.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap(),
    );
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn lease(holder: Option<&str>, renew: &str, rv: &str, transitions: i32) -> Value {
    let mut spec = json!({"leaseDurationSeconds": 10, "renewTime": renew, "acquireTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": transitions});
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "vmscale-allocator", "namespace": "vmscale-system", "resourceVersion": rv},
        "spec": spec,
    })
}

/// The server stores what was written and gives it a new resource version.
fn stored(mut written: Value, rv: &str) -> Value {
    written["metadata"]["resourceVersion"] = json!(rv);
    written
}

fn start(
    identity: &str,
) -> (Api, watch::Receiver<bool>, CancellationToken, tokio::task::JoinHandle<Result<(), LeaderError>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (tx, rx) = watch::channel(false);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(client, config(identity), tx, cancel.clone()));
    (Api { handle, verbs: BTreeSet::new() }, rx, cancel, task)
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_over_when_the_holder_stops_renewing_and_hands_back_on_shutdown() {
    let (mut api, leader, cancel, task) = start("b");
    // Replica a holds the Lease and renews it once more.
    let (_, r) = api.expect(Method::GET).await;
    respond(r, StatusCode::OK, &lease(Some("a"), "2026-01-01T00:00:01.000000Z", "10", 2));
    let (_, r) = api.expect(Method::GET).await;
    let last_renewal_seen = Instant::now();
    respond(r, StatusCode::OK, &lease(Some("a"), "2026-01-01T00:00:03.000000Z", "11", 2));
    // Then a stops renewing: b reads the same record until the duration has
    // passed on b's own clock, writing nothing meanwhile.
    let mut reads = 0;
    let put = loop {
        let (m, _, body, r) = api.next().await;
        if m == Method::PUT {
            break (body.unwrap(), r);
        }
        reads += 1;
        assert!(!*leader.borrow());
        respond(r, StatusCode::OK, &lease(Some("a"), "2026-01-01T00:00:03.000000Z", "11", 2));
    };
    let waited = last_renewal_seen.elapsed();
    assert_eq!(reads, 5, "one read per renew interval");
    assert!(waited >= Duration::from_secs(10) && waited <= Duration::from_secs(12), "{waited:?}");
    let (body, r) = put;
    assert_eq!(body["spec"]["holderIdentity"], "b");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
    assert_eq!(body["spec"]["leaseDurationSeconds"], 10);
    // The write carries the version read: a concurrent writer would conflict.
    assert_eq!(body["metadata"]["resourceVersion"], "11");
    respond(r, StatusCode::OK, &stored(body, "12"));
    timeout(STEP, async { leader.clone().wait_for(|l| *l).await.map(|_| ()) }).await.unwrap().unwrap();

    // Renewal: read, then write the same holder with a new renew time.
    let (_, r) = api.expect(Method::GET).await;
    let held = lease(Some("b"), "2026-01-01T00:00:13.000000Z", "12", 3);
    respond(r, StatusCode::OK, &held);
    let (body, r) = api.expect(Method::PUT).await;
    let body = body.unwrap();
    assert_eq!(
        (body["spec"]["holderIdentity"].clone(), body["metadata"]["resourceVersion"].clone()),
        (json!("b"), json!("12"))
    );
    assert_ne!(body["spec"]["renewTime"], held["spec"]["renewTime"]);
    respond(r, StatusCode::OK, &stored(body, "13"));

    // Shutdown hands the Lease back: no holder, so a standby needs no wait.
    tokio::task::yield_now().await;
    cancel.cancel();
    let (body, r) = api.expect(Method::PUT).await;
    let body = body.unwrap();
    assert_eq!(body["spec"].get("holderIdentity"), None, "{body}");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(body["metadata"]["resourceVersion"], "13");
    respond(r, StatusCode::OK, &stored(body, "14"));
    task.await.unwrap().unwrap();
    assert!(!*leader.borrow());
    assert_rbac(&api.verbs, &["get", "update"]);
}

#[tokio::test(start_paused = true)]
async fn creates_a_missing_lease_loses_races_quietly_and_steps_down_when_it_cannot_renew() {
    let (mut api, leader, _cancel, task) = start("a");
    let (_, r) = api.expect(Method::GET).await;
    respond(r, StatusCode::NOT_FOUND, &not_found());
    let (body, r) = api.expect(Method::POST).await;
    let body = body.unwrap();
    assert_eq!(body["spec"]["holderIdentity"], "a");
    assert_eq!(body["spec"]["leaseTransitions"], 0);
    // Another replica created it first.
    respond(
        r,
        StatusCode::CONFLICT,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409}),
    );
    let (_, r) = api.expect(Method::GET).await;
    respond(r, StatusCode::NOT_FOUND, &not_found());
    let (body, r) = api.expect(Method::POST).await;
    assert!(!*leader.borrow());
    respond(r, StatusCode::CREATED, &stored(body.unwrap(), "1"));
    timeout(STEP, async { leader.clone().wait_for(|l| *l).await.map(|_| ()) }).await.unwrap().unwrap();
    let led_at = Instant::now();

    // The API server starts failing: the leader keeps trying every interval
    // and steps down at the renew deadline (7 s), before its 10 s Lease
    // could let a successor in.
    let mut failed_reads = 0;
    while let Some((m, _, _, r)) = api.next_opt().await {
        assert_eq!(m, Method::GET);
        failed_reads += 1;
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "etcd down"});
        respond(r, StatusCode::INTERNAL_SERVER_ERROR, &status);
    }
    assert!(!*leader.borrow());
    // kube retries nothing on its own here: one read per interval.
    assert!((3..=4).contains(&failed_reads), "{failed_reads}");
    let err = timeout(STEP, task).await.unwrap().unwrap().unwrap_err();
    assert!(err.to_string().contains("lost the lease vmscale-system/vmscale-allocator"), "{err}");
    let held = led_at.elapsed();
    assert!(held >= Duration::from_secs(7) && held < Duration::from_secs(10), "{held:?}");
    assert_rbac(&api.verbs, &["create", "get"]);
}

/// The verbs a scenario used are granted by the Role in deploy/, and the
/// Role grants nothing that no scenario uses.
fn assert_rbac(used: &BTreeSet<&'static str>, expected: &[&str]) {
    assert_eq!(used.iter().copied().collect::<Vec<_>>(), expected);
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kustomize/base/allocator-rbac.yaml");
    let text = std::fs::read_to_string(p).unwrap();
    let role: Role = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .find_map(|v: Value| (v["kind"] == "Role").then(|| serde_json::from_value(v).unwrap()))
        .unwrap();
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.api_groups.as_deref(), Some(&["coordination.k8s.io".to_owned()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["leases".to_owned()][..]));
        for v in &rule.verbs {
            // create cannot be limited to a name; the others are.
            let named = rule.resource_names.as_deref() == Some(&["vmscale-allocator".to_owned()][..]);
            assert!(v == "create" || named, "{v} is not limited to the one Lease");
            granted.insert(v.clone());
        }
    }
    let all: BTreeSet<String> = ["get", "create", "update"].map(String::from).into();
    assert_eq!(granted, all, "the Role must grant exactly what the election uses (get, create, update)");
    for v in used {
        assert!(granted.contains(*v), "{v} is used but not granted");
    }
}

/// A Lease store with the API server's rules that matter here: create fails
/// if the Lease exists, update fails unless it carries the current
/// resourceVersion. One task per replica serves that replica's requests;
/// `cut` makes it stop answering (a replica cut off from the API server).
#[derive(Default)]
struct Store {
    lease: Option<Value>,
    rv: u64,
}

async fn serve(
    mut handle: ApiHandle,
    store: std::sync::Arc<std::sync::Mutex<Store>>,
    cut: watch::Receiver<bool>,
) {
    let mut held = Vec::new();
    while let Some((req, reply)) = handle.next_request().await {
        if *cut.borrow() {
            held.push(reply); // never answered
            continue;
        }
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let mut st = store.lock().unwrap();
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409});
        match parts.method {
            Method::GET => match &st.lease {
                Some(l) => respond(reply, StatusCode::OK, l),
                None => respond(reply, StatusCode::NOT_FOUND, &not_found()),
            },
            Method::POST if st.lease.is_some() => respond(reply, StatusCode::CONFLICT, &conflict),
            Method::PUT | Method::POST => {
                let mut l: Value = serde_json::from_slice(&bytes).unwrap();
                let current = st.lease.as_ref().map(|c| c["metadata"]["resourceVersion"].clone());
                if parts.method == Method::PUT && current != Some(l["metadata"]["resourceVersion"].clone()) {
                    respond(reply, StatusCode::CONFLICT, &conflict);
                    continue;
                }
                st.rv += 1;
                l["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                st.lease = Some(l.clone());
                respond(
                    reply,
                    if parts.method == Method::POST { StatusCode::CREATED } else { StatusCode::OK },
                    &l,
                );
            }
            m => panic!("unexpected {m}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn two_replicas_never_lead_at_once_and_the_standby_takes_over_from_a_cut_off_leader() {
    let store = std::sync::Arc::new(std::sync::Mutex::new(Store::default()));
    let mut replicas = Vec::new();
    for id in ["a", "b"] {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (cut_tx, cut_rx) = watch::channel(false);
        tokio::spawn(serve(handle, store.clone(), cut_rx));
        let (tx, rx) = watch::channel(false);
        let task =
            tokio::spawn(run(Client::new(service, "default"), config(id), tx, CancellationToken::new()));
        replicas.push((rx, cut_tx, task));
    }
    let (mut a, mut b) = (replicas[0].0.clone(), replicas[1].0.clone());
    // Whoever leads first (a: its first read comes first), only one leads.
    timeout(STEP, a.wait_for(|l| *l)).await.unwrap().unwrap();
    let watcher = tokio::spawn(async move {
        let mut changes = 0;
        loop {
            tokio::select! {
                r = a.changed() => if r.is_err() { break },
                r = b.changed() => if r.is_err() { break },
            }
            changes += 1;
            assert!(!(*a.borrow() && *b.borrow()), "two leaders at once");
            if *b.borrow() {
                return changes;
            }
        }
        changes
    });
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(*replicas[0].0.borrow() && !*replicas[1].0.borrow(), "a keeps leading while it renews");

    // a is cut off from the API server: it steps down at its renew deadline
    // and exits; b takes over once a's record has not changed for the
    // lease duration, so never before a stepped down.
    let cut_at = tokio::time::Instant::now();
    replicas[0].1.send_replace(true);
    let (rx_a, _, task_a) = replicas.remove(0);
    let err = timeout(STEP, task_a).await.unwrap().unwrap().unwrap_err();
    assert!(err.to_string().contains("lost the lease"), "{err}");
    assert!(!*rx_a.borrow());
    let stepped_down = cut_at.elapsed();
    let mut rx_b = replicas[0].0.clone();
    timeout(STEP, rx_b.wait_for(|l| *l)).await.unwrap().unwrap();
    let took_over = cut_at.elapsed();
    assert!(stepped_down <= Duration::from_secs(7), "{stepped_down:?}");
    assert!(took_over > stepped_down && took_over <= Duration::from_secs(12), "{took_over:?}");
    assert!(watcher.await.unwrap() >= 2);
    let lease = store.lock().unwrap().lease.clone().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}
