//! Attacks on the scheduler extender (`POST /scheduler/filter` on the
//! allocator's HTTPS server, `http_tls` as in a cluster): a body far past
//! any real scheduler's from kube-scheduler's own certificate, and calls
//! from anyone else (a node's certificate, none, plain text).

use super::super::http::{request, Answer, Via};
use super::super::lab::{scratch, Allocator};
use super::super::report::{one_line, Attack};
use super::super::state::{diff, ledger_view};
use super::super::tls::Pki;
use std::time::{Duration, Instant};
use vmscale_common::tls::Identity;

/// The oversized body: 64 MiB, what the allocator once accepted.
const HUGE: usize = 64 << 20;

pub async fn run() -> anyhow::Result<Vec<Attack>> {
    let pki = Pki::new(&scratch("extender")?)?;
    let server_name = Identity::Allocator.dns_name();
    let scheduler = Via::Tls { creds: pki.creds(&Identity::Scheduler)?, server_name: server_name.clone() };
    let config = vmscale_allocator::config::Config {
        tls: Some(pki.files(&Identity::Allocator)?),
        http_tls: true,
        insecure: false,
        ..Allocator::config()
    };
    let alloc = Allocator::start(config, scheduler.clone()).await?;
    let node =
        Via::Tls { creds: pki.creds(&Identity::Node("node-a".into()))?, server_name: server_name.clone() };
    let anonymous = Via::Tls { creds: pki.no_certificate(), server_name };

    let cases: [(&str, &Via, usize, &[u16]); 4] = [
        ("extender-64-mib-body", &scheduler, HUGE, &[413]),
        ("extender-call-with-a-node-certificate", &node, 0, &[401, 403]),
        ("extender-call-without-a-certificate", &anonymous, 0, &[401, 403]),
        ("extender-call-in-plain-text", &Via::Plain, 0, &[400, 401, 403]),
    ];
    // It waits out the server's handshake timeout: meanwhile the rest run.
    let stalled = tokio::spawn(super::super::hostile::stalled(
        "extender-connection-that-never-starts-tls",
        "the allocator",
        alloc.http,
    ));
    let mut out = Vec::new();
    for (name, via, size, refusals) in cases {
        out.push(match judged(&alloc, via, huge_body(size)).await {
            Ok((Ok(a), took, changed)) => Attack::judge(
                name,
                refusals.contains(&a.status),
                format!(
                    "HTTP {} after {:.1} s: {}",
                    a.status,
                    took.as_secs_f64(),
                    one_line(&String::from_utf8_lossy(&a.body), 120)
                ),
                changed,
            ),
            // No HTTP answer at all: the handshake or the connection was refused.
            Ok((Err(e), _, changed)) => Attack::judge(name, true, format!("no answer: {e:#}"), changed),
            Err(e) => Attack::could_not_run(name, &e),
        });
    }
    out.push(stalled.await?);
    // kube-scheduler itself, with a small body, must be answered: else the
    // refusals above prove nothing.
    match request(alloc.http, &scheduler, "POST", "/scheduler/filter", huge_body(0), Duration::from_secs(30))
        .await
    {
        Ok(a) if a.status == 200 => {}
        other => out.push(Attack::could_not_run(
            "extender-control",
            &anyhow::anyhow!("kube-scheduler's own call was not answered with 200: {other:?}"),
        )),
    }
    Ok(out)
}

/// Posts `body` to `/scheduler/filter` via `via`, with the ledger read
/// before and after.
async fn judged(
    alloc: &Allocator,
    via: &Via,
    body: Vec<u8>,
) -> anyhow::Result<(anyhow::Result<Answer>, Duration, Option<String>)> {
    let before = ledger_view(&alloc.state().await?, &[]);
    let t0 = Instant::now();
    let answer = request(alloc.http, via, "POST", "/scheduler/filter", body, Duration::from_secs(120)).await;
    let took = t0.elapsed();
    let after = ledger_view(&alloc.state().await?, &[]);
    Ok((answer, took, diff(&before, &after)))
}

/// A filter call for a labelled VM pod with node names padded to `size`
/// bytes of valid JSON (at least one name).
fn huge_body(size: usize) -> Vec<u8> {
    let head = r#"{"Pod":{"metadata":{"name":"p","namespace":"default","labels":{"vmscale.io/autoscale":"true"},"annotations":{"vmscale.io/qmp":"/run/p.qmp","vmscale.io/cu-milli-cpu":"250","vmscale.io/cu-memory-bytes":"134217728","vmscale.io/min-cus":"1","vmscale.io/max-cus":"4"}}},"NodeNames":["n0""#;
    let mut b = Vec::with_capacity(size + 64);
    b.extend_from_slice(head.as_bytes());
    let mut i = 1u64;
    while b.len() + 2 < size {
        b.extend_from_slice(format!(",\"n{i}\"").as_bytes());
        i += 1;
    }
    b.extend_from_slice(b"]}");
    b
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bodies_are_valid_json_of_the_size_asked() {
        for size in [0, 1000, 1 << 20] {
            let b = super::huge_body(size);
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert!(b.len() >= size && b.len() < size + 1000, "{} for {size}", b.len());
            assert!(!v["NodeNames"].as_array().unwrap().is_empty());
        }
    }
}
