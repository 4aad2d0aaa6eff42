//! The agent's node certificate against a scripted API server (a real
//! `kube::Client` over `tower_test::mock`): the CSR it submits asks signer
//! `vmscale.io/node` for its own node's name with a key it made, it waits
//! for the certificate and writes key and certificate (owner-only); a denied
//! request is an error that carries the signer's reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::client::Body;
use kube::Client;
use rcgen::PublicKeyData;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokio::time::timeout;
use tower_test::mock::{self, Handle, SendResponse};
use vmscale_agent::node_cert::{obtain_polling, NodeCertConfig, NodeCertError};

type ApiHandle = Handle<Request<Body>, Response<Body>>;
const STEP: Duration = Duration::from_secs(10);
const CSRS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";

async fn next(api: &mut ApiHandle) -> (Request<Body>, SendResponse<Response<Body>>) {
    timeout(STEP, api.next_request()).await.expect("no request in time").expect("client gone")
}

fn reply(send: SendResponse<Response<Body>>, code: StatusCode, obj: &CertificateSigningRequest) {
    let body = serde_json::to_vec(obj).unwrap();
    send.send_response(Response::builder().status(code).body(Body::from(body)).unwrap());
}

/// The agent's CSR as the API server stores it: named, with its status.
fn stored(mut csr: CertificateSigningRequest, status: serde_json::Value) -> CertificateSigningRequest {
    csr.metadata.name = Some("vmscale-node-node-a-x7k2p".into());
    csr.status = Some(serde_json::from_value(status).unwrap());
    csr
}

fn config(dir: &std::path::Path) -> NodeCertConfig {
    NodeCertConfig { dir: dir.to_path_buf(), expiration_seconds: 7200, wait_ms: 5_000 }
}

#[tokio::test]
async fn the_agent_asks_for_its_own_name_and_writes_what_it_gets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn({
        let cfg = cfg.clone();
        async move {
            obtain_polling(Client::new(service, "default"), "node-a", &cfg, Duration::from_millis(10)).await
        }
    });

    let (req, send) = next(&mut api).await;
    assert_eq!((req.method(), req.uri().path()), (&Method::POST, CSRS));
    let body = req.into_body().collect_bytes().await.unwrap();
    let sent: CertificateSigningRequest = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent.spec.signer_name, "vmscale.io/node");
    assert_eq!(sent.spec.expiration_seconds, Some(7200));
    let asked =
        rcgen::CertificateSigningRequestParams::from_pem(std::str::from_utf8(&sent.spec.request.0).unwrap())
            .expect("a request signed by its key");
    let names: Vec<String> = asked
        .params
        .subject_alt_names
        .iter()
        .map(|n| match n {
            rcgen::SanType::DnsName(d) => d.as_str().to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, ["node-a.node.vmscale"]);
    reply(send, StatusCode::CREATED, &stored(sent.clone(), json!({})));

    // Not signed yet; then signed.
    let path = format!("{CSRS}/vmscale-node-node-a-x7k2p");
    let (req, send) = next(&mut api).await;
    assert_eq!((req.method(), req.uri().path()), (&Method::GET, path.as_str()));
    reply(
        send,
        StatusCode::OK,
        &stored(sent.clone(), json!({"conditions": [{"type": "Approved", "status": "True"}]})),
    );
    let (req, send) = next(&mut api).await;
    assert_eq!(req.uri().path(), path);
    let cert = k8s_openapi::ByteString(b"-----BEGIN CERTIFICATE-----\nissued\n".to_vec());
    reply(send, StatusCode::OK, &stored(sent, json!({"certificate": cert})));
    task.await.unwrap().unwrap();

    assert_eq!(std::fs::read(cfg.cert_path()).unwrap(), b"-----BEGIN CERTIFICATE-----\nissued\n");
    let key = std::fs::read_to_string(cfg.key_path()).unwrap();
    let public = rcgen::KeyPair::from_pem(&key).unwrap().der_bytes().to_vec();
    assert_eq!(public, asked.public_key.der_bytes(), "the key written is the one the request was made with");
    for p in [cfg.key_path(), cfg.cert_path()] {
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
    }
}

#[tokio::test]
async fn a_denied_request_says_why_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn({
        let cfg = cfg.clone();
        async move {
            obtain_polling(Client::new(service, "default"), "node-a", &cfg, Duration::from_millis(10)).await
        }
    });
    let (req, send) = next(&mut api).await;
    let sent: CertificateSigningRequest =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    reply(send, StatusCode::CREATED, &stored(sent.clone(), json!({})));
    let (_, send) = next(&mut api).await;
    let denied = json!({"conditions": [{"type": "Denied", "status": "True", "message": "the agent on node node-b may have node-b.node.vmscale and nothing else"}]});
    reply(send, StatusCode::OK, &stored(sent, denied));
    let e = task.await.unwrap().unwrap_err();
    assert!(matches!(e, NodeCertError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("was denied: the agent on node node-b"), "{e}");
    assert!(!cfg.cert_path().exists() && !cfg.key_path().exists());
}

/// At start the signer may not be up: the agent asks again after a failed
/// call instead of exiting (and filing a new request on every restart).
#[tokio::test(start_paused = true)]
async fn a_failed_call_is_retried_until_the_certificate_comes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (cfg, cancel) = (cfg.clone(), cancel.clone());
        async move {
            vmscale_agent::node_cert::obtain_patiently(
                Client::new(service, "default"),
                "node-a",
                &cfg,
                &cancel,
            )
            .await
        }
    });
    let (req, send) = next(&mut api).await;
    assert_eq!(req.method(), Method::POST);
    let busy = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500});
    send.send_response(
        Response::builder().status(500).body(Body::from(serde_json::to_vec(&busy).unwrap())).unwrap(),
    );
    // Asked again, after the backoff.
    let (req, send) = next(&mut api).await;
    assert_eq!(req.method(), Method::POST);
    let sent: CertificateSigningRequest =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    let cert = k8s_openapi::ByteString(b"CERT".to_vec());
    reply(send, StatusCode::CREATED, &stored(sent.clone(), json!({})));
    let (_, send) = next(&mut api).await;
    reply(send, StatusCode::OK, &stored(sent, json!({"certificate": cert})));
    assert!(task.await.unwrap().unwrap(), "the certificate came");
    assert_eq!(std::fs::read(cfg.cert_path()).unwrap(), b"CERT");
}
