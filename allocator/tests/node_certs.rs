//! The node-certificate signer against a scripted API server: a real
//! `kube::Client` over `tower_test::mock`. An agent's request for its own
//! node's name is approved and signed (the exact approval and status
//! patches checked, the certificate read back); a request for another
//! node's name is denied with a reason, and nothing is signed. Also matches
//! the requests against the allocator's ClusterRole in deploy/.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::client::Body;
use kube::{Api, Client};
use rcgen::{CertificateParams, DnType, KeyPair, KeyUsagePurpose};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, SystemTime};
use tokio::time::timeout;
use tower_test::mock::{self, Handle};
use vmscale_allocator::node_certs::decide::NODE_SIGNER;
use vmscale_allocator::node_certs::sign::Signer;
use vmscale_allocator::node_certs::watch::{handle, watch_config, Handled};
use vmscale_allocator::node_certs::NodeCertsConfig;

type ApiHandle = Handle<Request<Body>, Response<Body>>;

const STEP: Duration = Duration::from_secs(10);
const AGENT: &str = "system:serviceaccount:vmscale-node:vmscale-agent";
const CSRS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";

fn ca(dir: &Path) -> NodeCertsConfig {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "vmscale test CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = p.self_signed(&key).unwrap();
    std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
    NodeCertsConfig {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        agent_user: AGENT.into(),
        validity_hours: 72,
    }
}

/// A CSR as the API server shows it: `node`'s agent asking for `names`.
fn csr(name: &str, node: &str, names: &[&str]) -> CertificateSigningRequest {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or(""));
    let pem = p.serialize_request(&key).unwrap().pem().unwrap();
    serde_json::from_value(json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name, "resourceVersion": "5"},
        "spec": {
            "request": k8s_openapi::ByteString(pem.into_bytes()),
            "signerName": NODE_SIGNER,
            "usages": ["digital signature", "key encipherment", "client auth", "server auth"],
            "username": AGENT,
            "extra": {"authentication.kubernetes.io/node-name": [node]},
        },
    }))
    .unwrap()
}

async fn next_patch(api: &mut ApiHandle, path: &str) -> (Value, mock::SendResponse<Response<Body>>) {
    let (req, reply) =
        timeout(STEP, api.next_request()).await.expect("no request in time").expect("client gone");
    assert_eq!(req.method(), Method::PATCH, "{}", req.uri());
    assert_eq!(req.uri().path(), path);
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    assert_eq!(query, [("fieldManager".to_owned(), "vmscale-allocator".to_owned())]);
    assert_eq!(req.headers()[http::header::CONTENT_TYPE], "application/merge-patch+json");
    let body = req.into_body().collect_bytes().await.unwrap();
    (serde_json::from_slice(&body).unwrap(), reply)
}

fn ok(reply: mock::SendResponse<Response<Body>>, obj: &CertificateSigningRequest) {
    let body = serde_json::to_vec(obj).unwrap();
    reply.send_response(Response::builder().status(StatusCode::OK).body(Body::from(body)).unwrap());
}

#[tokio::test]
async fn the_agent_of_a_node_gets_that_nodes_name_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::load(&ca(dir.path())).unwrap();
    let (service, mut mock) = mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<CertificateSigningRequest> = Api::all(Client::new(service, "default"));

    // node-a's agent asks for node-a: approved, then signed.
    let good = csr("node-a-1", "node-a", &["node-a.node.vmscale"]);
    let task = tokio::spawn({
        let (api, good) = (api.clone(), good.clone());
        async move { handle(&api, &signer, AGENT, &good, SystemTime::now()).await.map(|h| (h, signer)) }
    });
    let (body, reply) = next_patch(&mut mock, &format!("{CSRS}/node-a-1/approval")).await;
    let cond = &body["status"]["conditions"][0];
    assert_eq!((cond["type"].as_str(), cond["status"].as_str()), (Some("Approved"), Some("True")), "{body}");
    assert!(cond["message"].as_str().unwrap().contains("node node-a"), "{body}");
    ok(reply, &good);
    let (body, reply) = next_patch(&mut mock, &format!("{CSRS}/node-a-1/status")).await;
    let cert: k8s_openapi::ByteString =
        serde_json::from_value(body["status"]["certificate"].clone()).unwrap();
    let pem = String::from_utf8(cert.0).unwrap();
    let (_, cert_pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = cert_pem.parse_x509().unwrap();
    let ca_text = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca_text.as_bytes()).unwrap();
    cert.verify_signature(Some(ca_pem.parse_x509().unwrap().public_key())).expect("signed by the CA");
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(names, ["DNSName(\"node-a.node.vmscale\")"]);
    ok(reply, &good);
    let (handled, signer) = task.await.unwrap().unwrap();
    assert_eq!(handled, Handled::Signed { node: "node-a".into() });

    // node-a's agent asks for node-b: denied with the reason, nothing signed.
    let forged = csr("node-a-2", "node-a", &["node-b.node.vmscale"]);
    let task = tokio::spawn({
        let (api, forged) = (api.clone(), forged.clone());
        async move { handle(&api, &signer, AGENT, &forged, SystemTime::now()).await }
    });
    let (body, reply) = next_patch(&mut mock, &format!("{CSRS}/node-a-2/approval")).await;
    let cond = &body["status"]["conditions"][0];
    assert_eq!(cond["type"], "Denied");
    assert!(cond["message"].as_str().unwrap().contains("may have node-a.node.vmscale"), "{body}");
    ok(reply, &forged);
    assert!(matches!(task.await.unwrap().unwrap(), Handled::Denied(_)));
    assert!(
        timeout(Duration::from_millis(200), mock.next_request()).await.is_err(),
        "no certificate written"
    );
}

/// The watch asks for our signer's requests only, and the ClusterRole grants
/// every request the signer makes.
#[test]
fn the_watch_is_narrow_and_the_role_grants_what_the_signer_does() {
    assert_eq!(watch_config().field_selector.as_deref(), Some("spec.signerName=vmscale.io/node"));
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/base/allocator-rbac.yaml");
    let text = std::fs::read_to_string(&p).unwrap();
    let role: ClusterRole = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| v["kind"] == "ClusterRole" && v["metadata"]["name"] == "vmscale-allocator-signer")
        .map(|v| serde_json::from_value(v).unwrap())
        .next()
        .expect("ClusterRole vmscale-allocator-signer in allocator-rbac.yaml");
    let grants = |group: &str, resource: &str, verb: &str, name: Option<&str>| {
        role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
                && name.is_none_or(|n| r.resource_names.iter().flatten().any(|x| x == n))
        })
    };
    let csr = "certificates.k8s.io";
    for (resource, verb, name) in [
        ("certificatesigningrequests", "list", None),
        ("certificatesigningrequests", "watch", None),
        ("certificatesigningrequests/approval", "patch", None),
        ("certificatesigningrequests/status", "patch", None),
        ("signers", "approve", Some(NODE_SIGNER)),
        ("signers", "sign", Some(NODE_SIGNER)),
    ] {
        assert!(grants(csr, resource, verb, name), "{verb} {resource} {name:?} not granted");
    }
}
