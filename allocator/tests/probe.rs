//! The kubelet's probes as an exec of the binary (`--probe`): the HTTP
//! listener over TLS takes only clients with a certificate of the cluster
//! CA, which the kubelet's HTTP probes cannot present; the allocator's own
//! certificate can. Against the real server on loopback.

#![allow(clippy::unwrap_used)]

use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vmscale_allocator::config::Config;
use vmscale_allocator::probe::probe;
use vmscale_allocator::server::{serve_with, Extras};
use vmscale_allocator::shared::Shared;
use vmscale_common::testing::TestPki;
use vmscale_common::tls::Identity;

#[tokio::test]
async fn the_probe_passes_the_client_certificate_check_the_kubelet_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listen = http.local_addr().unwrap();
    let config = Config {
        tls: Some(pki.issue(&Identity::Allocator)),
        http_tls: true,
        http_listen,
        ..Config::default()
    };
    let stop = CancellationToken::new();
    let shared = Shared::new(config.clone(), stop.clone());
    let task = tokio::spawn(serve_with(shared, grpc, http, Extras { leader: None, routes: None }));

    let t = Duration::from_secs(10);
    assert_eq!(probe(&config, "/healthz", t).await.unwrap(), 200);
    assert_eq!(probe(&config, "/readyz", t).await.unwrap(), 200, "no election: ready");
    // A client without a certificate (as the kubelet's HTTPS probe) gets no
    // answer at all: the handshake fails.
    let plain = Config { http_tls: false, insecure: true, ..config.clone() };
    assert!(probe(&plain, "/healthz", t).await.is_err());

    stop.cancel();
    task.await.unwrap().unwrap();
}
