//! Attacks on a real target agent's migration service. Each gets an order
//! of its own, really issued: the attacker's source node is over its
//! watermark, the allocator orders its VM moved to `node-b`, and the
//! attacker then calls node-b's `Prepare` with a handoff that is valid but
//! for one hostile change (or, for the first two, a clean handoff from a
//! caller that is not the order's source). node-b's QEMU is a stand-in
//! script that writes down the arguments it was given and exits, so the
//! audit sees exactly what the agent would have run as root. A last clean
//! `Prepare` from the source must reach the stand-in: else every refusal
//! before it proves nothing.

use super::super::hostile::{connect_open, hello, status_words, vm, Session};
use super::super::http::Via;
use super::super::lab::{scratch, until, Agent, Allocator, GIB, MIB};
use super::super::report::{one_line, Attack};
use super::super::state::{agent_view, diff, ledger_view};
use super::super::tls::{channel, Creds, Pki};
use anyhow::Context;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use vmscale_agent::migration::machine::{Accel, BootRam, MachineSpec};
use vmscale_agent::migration::settings::MigrationSettings;
use vmscale_common::tls::Identity;
use vmscale_proto::allocator as apb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::migration as pb;

const SOURCE: &str = "audit-src";
const TARGET: &str = "node-b";
const VM: &str = "vm-evil";

/// What must never show on the target QEMU's command line.
const MARKERS: [&str; 5] = ["/dev/sda", "path=/,", "tcp:0.0.0.0:4444", "hostroot", "-virtfs"];

/// A change to a clean handoff (JSON), and who sends it.
struct Variant {
    name: &'static str,
    caller: Caller,
    change: fn(&mut Value),
}

enum Caller {
    Source,
    OtherNode,
    NoCertificate,
}

fn clean(_: &mut Value) {}

fn variants() -> Vec<Variant> {
    vec![
        Variant { name: "prepare-without-a-certificate", caller: Caller::NoCertificate, change: clean },
        Variant {
            name: "prepare-from-a-node-not-the-orders-source",
            caller: Caller::OtherNode,
            change: clean,
        },
        Variant {
            name: "prepare-with-foreign-qemu-arguments",
            caller: Caller::Source,
            change: |h| {
                h["handoff"]["base_args"] = json!([
                    "-virtfs",
                    "local,path=/,mount_tag=hostroot,security_model=passthrough",
                    "-drive",
                    "file=/dev/sda,format=raw,if=virtio",
                    "-qmp",
                    "tcp:0.0.0.0:4444,server=on,wait=off",
                ]);
            },
        },
        Variant {
            name: "prepare-with-an-option-in-a-name",
            caller: Caller::Source,
            change: |h| {
                h["handoff"]["machine"]["machine"] =
                    json!("pc -virtfs local,path=/,mount_tag=hostroot,security_model=none");
            },
        },
        Variant {
            name: "prepare-with-a-disk-outside-the-disk-dir",
            caller: Caller::Source,
            change: |h| {
                h["handoff"]["machine"]["disks"] = json!([{ "name": "../../../dev/sda", "format": "raw" }])
            },
        },
        Variant {
            name: "prepare-with-the-host-root-share",
            caller: Caller::Source,
            change: |h| h["handoff"]["machine"]["host_root_share"] = json!(true),
        },
        // Last, clean from the source: it must reach the target's qemu.
        Variant { name: "control", caller: Caller::Source, change: clean },
    ]
}

pub async fn run() -> anyhow::Result<Vec<Attack>> {
    let dir = scratch("migration-target")?;
    let pki = Pki::new(&dir)?;
    let argv = dir.join("qemu-argv.txt");
    let stand_in = dir.join("qemu-stand-in.sh");
    std::fs::write(&stand_in, format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\nexit 1\n", argv.display()))?;
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755))?;

    let config = vmscale_allocator::config::Config {
        tls: Some(pki.files(&Identity::Allocator)?),
        insecure: false,
        ..Allocator::config()
    };
    let alloc = Allocator::start(config, Via::Plain).await?;
    let port = crate::harness::free_port()?;
    let settings = MigrationSettings {
        listen: Some(([127, 0, 0, 1], port).into()),
        qemu: stand_in,
        ..MigrationSettings::default()
    };
    let node_b = Identity::Node(TARGET.into());
    let target = Agent::start(
        &dir,
        TARGET,
        &alloc.url(),
        Some(pki.files(&node_b)?),
        &[],
        (4000, 4 * GIB),
        Some(settings),
    )
    .await?;
    let a = &alloc;
    until("node-b to register", Duration::from_secs(20), || async move {
        a.state().await.ok()?.get("nodes")?.get(TARGET).map(|_| ())
    })
    .await?;

    let source = pki.creds(&Identity::Node(SOURCE.into()))?;
    let other = pki.creds(&Identity::Node("audit-other".into()))?;
    let anonymous = pki.no_certificate();
    let mut session = connect_open(
        alloc.grpc,
        Some(&source),
        hello(SOURCE, (1000, GIB), vec![vm(VM, 1000, 512 * MIB)], ""),
    )
    .await
    .map_err(|s| anyhow::anyhow!("the source's hello was refused: {}", status_words(&s)))?;
    let svc = target.migration.context("node-b's migration service has no address")?;

    // It waits out the server's handshake timeout: meanwhile the rest run.
    let stalled = tokio::spawn(super::super::hostile::stalled(
        "prepare-connection-that-never-starts-tls",
        "node-b",
        svc,
    ));
    let mut out = Vec::new();
    let mut request = 10;
    for v in variants() {
        request += 1;
        let creds = match v.caller {
            Caller::Source => &source,
            Caller::OtherNode => &other,
            Caller::NoCertificate => &anonymous,
        };
        let r = one(&alloc, &target, &mut session, request, svc, creds, v.change, &argv).await;
        if v.name == "control" {
            // A clean Prepare from the source must have reached the stand-in.
            match r {
                Ok(p) if p.ran_with.is_some() => {}
                Ok(p) => out.push(Attack::could_not_run(
                    "migration-target-control",
                    &anyhow::anyhow!("a clean Prepare from the order's source did not start the target's qemu ({}): the refusals above may prove nothing", p.seen),
                )),
                Err(e) => out.push(Attack::could_not_run("migration-target-control", &e)),
            }
            continue;
        }
        out.push(match r {
            Ok(p) => {
                let smuggled = p.ran_with.as_deref().is_some_and(|a| MARKERS.iter().any(|m| a.contains(m)));
                let seen = if smuggled {
                    format!("{}; the target ran qemu with the attacker's arguments", p.seen)
                } else {
                    p.seen
                };
                Attack::judge(v.name, p.refused && !smuggled, seen, p.changed)
            }
            Err(e) => Attack::could_not_run(v.name, &e),
        });
    }
    out.push(stalled.await?);
    drop(session);
    Ok(out)
}

/// What one `Prepare` got.
struct Prepared {
    refused: bool,
    seen: String,
    /// The stand-in's arguments, if it ran.
    ran_with: Option<String>,
    changed: Option<String>,
}

/// Waits for a fresh order for the VM, calls `Prepare` for it as `creds`
/// with the clean handoff changed by `change`, then fails the order (as
/// the source) so the next attack gets a fresh one.
#[allow(clippy::too_many_arguments)]
async fn one(
    alloc: &Allocator,
    target: &Agent,
    session: &mut Session,
    request: u64,
    svc: std::net::SocketAddr,
    creds: &Creds,
    change: fn(&mut Value),
    argv: &Path,
) -> anyhow::Result<Prepared> {
    let order =
        session.next_order(Duration::from_secs(20)).await.context("no order towards node-b within 20 s")?;
    // The target hears of the order on its own session.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = std::fs::remove_file(argv);
    let mut handoff = clean_handoff(order.order_id)?;
    change(&mut handoff);
    let before = (ledger_view(&alloc.state().await?, &[SOURCE]), agent_view(&target.state().await?));
    let answer = match channel(svc, &Identity::Node(TARGET.into()), Some(creds)).await {
        Err(e) => Err(tonic::Status::unavailable(format!("connection refused: {e:#}"))),
        Ok(ch) => {
            let req = pb::PrepareRequest {
                order_id: order.order_id,
                vm_id: VM.into(),
                handoff_json: handoff.to_string(),
            };
            let mut client = pb::migration_target_client::MigrationTargetClient::new(ch);
            match tokio::time::timeout(Duration::from_secs(60), client.prepare(req)).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded("audit: no answer within 60 s")),
            }
        }
    };
    let after = (ledger_view(&alloc.state().await?, &[SOURCE]), agent_view(&target.state().await?));
    let ran_with = std::fs::read_to_string(argv).ok();
    let failed = apb::MigrationStatus {
        order_id: order.order_id,
        phase: apb::migration_status::Phase::Failed as i32,
        reason: "audit: next attack".into(),
    };
    let mut pushed = Vec::new();
    session
        .call(request, Body::MigrationStatus(failed), &mut pushed)
        .await
        .map_err(|s| anyhow::anyhow!("failing the order was refused: {}", status_words(&s)))?;
    Ok(Prepared {
        refused: answer.is_err(),
        seen: match &answer {
            Err(s) => one_line(&status_words(s), 240),
            Ok(r) => format!("prepared, stream to {:?}", r.uri),
        },
        ran_with,
        changed: diff(&before.0, &after.0).or(diff(&before.1, &after.1)),
    })
}

/// A handoff the target should take: the VM as the source would describe
/// it (1 vCPU, 128 MiB, no disks).
fn clean_handoff(order_id: u64) -> anyhow::Result<Value> {
    let machine = MachineSpec {
        accel: Accel::Tcg,
        machine: "pc".into(),
        cpu_model: None,
        cpus: 1,
        max_cpus: 1,
        memory_mib: 128,
        slots: 4,
        max_memory_mib: 1024,
        boot_ram: BootRam::default(),
        virtio_mem: None,
        boot: None,
        disks: vec![],
        nics: vec![],
        vsock: None,
        serial_console: false,
        no_reboot: false,
        host_root_share: false,
        devices: Default::default(),
    };
    let spec = vmscale_agent::vms::VmSpec {
        qmp: format!("/run/vmscale/{VM}.qmp"),
        ..super::super::lab::vm_spec(VM, None)
    };
    // The agent's own types: a field the handoff gains is a compile error
    // here, not a clean handoff that is silently refused.
    let wire = vmscale_agent::migration::remote::WireHandoff {
        handoff: vmscale_agent::migration::target::Handoff {
            order_id,
            vm_id: VM.into(),
            machine,
            config: vmscale_agent::qmp::migrate::MigrationConfig::default(),
            // The cluster runs TLS: the stream too.
            stream_tls: true,
            source_running: true,
        },
        vm: spec,
    };
    Ok(serde_json::to_value(wire)?)
}
