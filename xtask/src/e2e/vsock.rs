//! `vsock`: the shipped pair over vsock. The guest's informant listens on
//! `vsock:7072` (as `deploy/informant.toml` ships it) and nothing else; the
//! agent reaches it through the guest's vsock device: the kernel's
//! vhost-vsock where the host has it (`vsock://CID:7072`), else a
//! vhost-device-vsock backend (`vsock+unix:///...vsock:7072`, this machine),
//! with every RAM backend shared memfd (boot memory, the agent's DIMMs:
//! `dimm_backend = "memfd"`). Checked: the agent's link shakes hands, the
//! informant sees the host as CID 2, a memory ramp gets DIMMs the agent
//! plugs (memfd, shared) and the informant brings online, with no OOM kill;
//! and the dial and a unary call over the link are timed from here.

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{log_lines, Ctx};
use crate::cluster::qmp::Qmp;
use crate::cluster::{self, Daemon, MIB, NODE};
use crate::harness::{free_port, wait_for};
use crate::vsock::Backend;
use vmscale_agent::config::Config as AgentConfig;
use vmscale_agent::core::policy::{Cu, Policy};
use vmscale_agent::links::dial::{self, InformantAddr};
use vmscale_agent::qmp::qemu_args::{Accel, DirectBoot, QemuArgs, Vsock};
use vmscale_agent::qmp::{DimmBackend, Endpoint};
use vmscale_agent::vms::{CpuMode, MemoryMode, VmSpec};
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_client::InformantClient;

const VM: &str = "e2e-vsock";
/// The first CID a guest may have.
const GUEST_CID: u32 = 3;
/// The informant's port, as `deploy/informant.toml` ships it.
const PORT: u32 = 7072;
const BOOT_MIB: u64 = 1024;
const TARGET_MIB: u64 = 1200;
const DIMM_MIB: u64 = 128;
const MAX_CUS: u32 = 16;
/// Dials and calls timed over the link once the guest is up.
const ROUNDS: usize = 20;

pub(super) fn vsock_link(ctx: &Ctx) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let dir = &ctx.dir;
    let vsock = Vsock::for_this_host(GUEST_CID, dir.join(format!("{VM}.vhost-vsock.sock")));
    // Without the kernel's device: the backend, installed when missing.
    let mut backend = match &vsock {
        Vsock::Kernel { .. } => None,
        Vsock::User { .. } => Some(Backend::start(&crate::vsock::ensure_installed()?, GUEST_CID, dir, VM)?),
    };
    let informant = match &backend {
        None => InformantAddr::Vsock { cid: GUEST_CID, port: PORT },
        Some(b) => InformantAddr::VsockUnix { path: b.uds.clone(), port: PORT },
    };
    let go = dir.join("go");
    let mut qemu = boot(ctx, &vsock, &go)?;
    let console_log = qemu.log.clone();
    let mut node = start_node(ctx, &informant)?;
    let check = |qemu: &mut Daemon, node: &mut Node, backend: &mut Option<Backend>| -> anyhow::Result<()> {
        qemu.check()?;
        node.allocator.check()?;
        node.agent.check()?;
        backend.as_mut().map_or(Ok(()), Backend::check)
    };
    wait_for("the agent's link to the informant over vsock", ctx.timeout, || {
        check(&mut qemu, &mut node, &mut backend)?;
        let s = cluster::http_json(node.agent_http, "/state").ok();
        let up = s.as_ref().and_then(|s| s.pointer(&format!("/vms/{VM}/informant_connected")));
        Ok((up == Some(&Value::Bool(true))).then_some(()))
    })
    .with_context(|| format!("agent log {}", node.agent.log.display()))?;
    let linked = t0.elapsed();
    eprintln!("    agent linked over {informant} {:.1} s after the start", linked.as_secs_f64());
    let host_cids = log_lines(&console_log, "vsock connection from the host");
    ensure!(!host_cids.is_empty(), "the informant logged no vsock connection from the host");
    ensure!(host_cids.iter().all(|l| l.contains("cid=2")), "a vsock peer other than CID 2: {host_cids:?}");

    fs::write(&go, "go\n")?;
    wait_for("the ramp to reach its target", ctx.timeout.saturating_sub(t0.elapsed()), || {
        check(&mut qemu, &mut node, &mut backend)?;
        let text = fs::read_to_string(&console_log).unwrap_or_default();
        if text.contains("oom: Killed process") {
            bail!("OOM kill in the guest during the ramp; console {}", console_log.display());
        }
        if text.contains("workload exited") {
            bail!("the workload exited; console {}", console_log.display());
        }
        Ok(text.contains("ramp: done").then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let (dimms, shared) = dimms_shared(&dir.join(format!("{VM}.watch.qmp")))?;
    ensure!(dimms > 0, "no DIMM plugged over vsock's VM, yet the workload holds {TARGET_MIB} MiB");
    ensure!(shared, "a plugged DIMM's memory is not shared memfd: the vhost-user backend cannot map it");
    let onlined = log_lines(&console_log, "upscale online");
    ensure!(!onlined.is_empty(), "the informant brought nothing online (no `upscale online` on the console)");
    let upscales = log_lines(&node.agent.log, "upscale done");
    ensure!(!upscales.is_empty(), "the agent logged no finished upscale");
    ensure!(!fs::read_to_string(&console_log)?.contains("oom: Killed process"), "OOM kill in the guest");
    // vhost-device-vsock maps 8 memory regions; QEMU refuses DIMMs past them
    // (README: with vhost-user, VMs that grow far want virtio-mem).
    let refused = log_lines(&node.agent.log, "no free memory slots").len();
    let (dial_ms, call_ms) = time_link(&informant)?;
    Ok(format!(
        "informant on vsock:{PORT} reached as {} ({}): agent linked {:.1} s after start, peer CID 2 in the \
         guest ({} connections); ramp to {TARGET_MIB} MiB in a {BOOT_MIB} MiB guest: {dimms} memfd DIMMs of \
         {DIMM_MIB} MiB plugged, {} upscales onlined by the informant, no OOM kill, {refused} plugs refused by \
         QEMU at the backend's memory-region limit; over the link from the host ({ROUNDS} rounds): dial + \
         handshake p50 {:.1} ms p90 {:.1} ms, unary call p50 {:.2} ms p90 {:.2} ms",
        informant,
        if backend.is_some() { "vhost-user-vsock via vhost-device-vsock" } else { "kernel vhost-vsock" },
        linked.as_secs_f64(),
        host_cids.len(),
        onlined.len(),
        dial_ms.0,
        dial_ms.1,
        call_ms.0,
        call_ms.1,
    ))
}

/// The guest: 2 vCPUs (sysfs mode), 1 GiB of shared memfd boot memory,
/// room for 16 DIMMs, the vsock device, the ramp waiting for `go`.
fn boot(ctx: &Ctx, vsock: &Vsock, go: &Path) -> anyhow::Result<Daemon> {
    let dir = &ctx.dir;
    let (agent_qmp, watch_qmp) = (dir.join(format!("{VM}.qmp")), dir.join(format!("{VM}.watch.qmp")));
    for p in [&agent_qmp, &watch_qmp] {
        let _ = fs::remove_file(p);
    }
    let mut q = QemuArgs::new(Accel::Tcg, 2, 2, BOOT_MIB);
    q.dimm_slots = MAX_CUS;
    q.max_memory_mib = BOOT_MIB + u64::from(MAX_CUS) * DIMM_MIB;
    let workload = format!("perl,{},32,{TARGET_MIB},{}", ctx.ramp, go.display());
    q.boot = Some(DirectBoot {
        kernel: ctx.image.kernel.clone(),
        initrd: ctx.image.initramfs.clone(),
        cmdline: format!(
            "{} vmscale.listen=vsock:{PORT} vmscale.informant=--cpu-mode,sysfs vmscale.workload={workload}",
            ctx.image.cmdline
        ),
    });
    q.vsock = Some(vsock.clone());
    q.qmp = Some(Endpoint::Unix(agent_qmp));
    q.extra = vec!["-qmp".into(), format!("unix:{},server=on,wait=off", watch_qmp.display())];
    q.share_host_root = true;
    // QEMU's default serial port carries the console to stdout.
    q.nodefaults = false;
    q.nographic = true;
    q.no_reboot = true;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(q.to_args());
    eprintln!("    $ {}", crate::steps::show(&cmd));
    Daemon::spawn("qemu", &mut cmd, dir.join(format!("{VM}.console.log")))
}

#[derive(Debug)]
struct Node {
    allocator: Daemon,
    agent: Daemon,
    agent_http: u16,
}

/// The allocator and the agent, whose one VM's informant is at `informant`
/// and whose DIMMs are shared memfd.
fn start_node(ctx: &Ctx, informant: &InformantAddr) -> anyhow::Result<Node> {
    let dir = &ctx.dir;
    let bin = ctx.root.join("target/release");
    let (grpc, allocator_http, agent_http) = (free_port()?, free_port()?, free_port()?);
    let (allocator, url) = cluster::spawn_local_allocator(&ctx.root, dir, grpc, allocator_http)?;
    let node = vmscale_common::tls::Identity::Node(NODE.into());
    let pki = crate::pki::ensure(&ctx.root, std::slice::from_ref(&node))?;
    let vms_file = dir.join("vms.toml");
    let spec = VmSpec {
        id: VM.into(),
        qmp: dir.join(format!("{VM}.qmp")).display().to_string(),
        informant: Some(informant.clone()),
        cu: Cu { milli_cpu: 125, memory_bytes: DIMM_MIB * MIB },
        min_cus: u32::try_from(BOOT_MIB / DIMM_MIB)?,
        max_cus: MAX_CUS,
        cpu_mode: CpuMode::Sysfs,
        memory: MemoryMode::Dimm { dimm_bytes: DIMM_MIB * MIB },
        policy: None,
    };
    cluster::write_vms_file(&vms_file, &[spec])?;
    let config = dir.join("agent.toml");
    cluster::write_agent_config(
        &config,
        &AgentConfig {
            node: NODE.into(),
            allocator: url,
            tls: Some(pki.files(&node)),
            vms_file,
            vms_file_interval_ms: 500,
            http_listen: ([127, 0, 0, 1], agent_http).into(),
            capacity_milli_cpu: 4000,
            capacity_memory_bytes: 4096 * MIB,
            allocator_retry_base_ms: 100,
            allocator_retry_max_ms: 1000,
            dimm_backend: DimmBackend::Memfd,
            policy: Policy::default(),
            ..AgentConfig::default()
        },
    )?;
    let agent = Daemon::spawn(
        "agent",
        Command::new(bin.join("vmscale-agent")).arg("--config").arg(&config).env("NO_COLOR", "1"),
        dir.join("agent.log"),
    )?;
    Ok(Node { allocator, agent, agent_http })
}

/// Plugged DIMMs and whether every memory backend QEMU has is shared.
fn dimms_shared(watch: &Path) -> anyhow::Result<(usize, bool)> {
    let mut qmp = Qmp::connect(watch)?;
    let (dimms, _) = qmp.memory()?;
    let memdevs = qmp.execute("query-memdev", json!({}))?;
    let all = memdevs.as_array().context("query-memdev answered no list")?;
    let shared = all.iter().all(|m| m.get("share") == Some(&Value::Bool(true)));
    for m in all {
        eprintln!(
            "    memdev {} share={}",
            m.get("id").unwrap_or(&Value::Null),
            m.get("share").unwrap_or(&Value::Null)
        );
    }
    Ok((dimms.len(), shared))
}

/// (p50, p90) of a fresh dial + handshake, and of a unary call on one
/// channel, in ms, over the agent's own dialer.
fn time_link(addr: &InformantAddr) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let hello = || pb::HandshakeRequest {
            versions: Some(pb::VersionRange { min: 1, max: 1 }),
            agent: "xtask e2e vsock".into(),
        };
        let (mut dials, mut calls) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let mut c = InformantClient::new(dial::channel(addr, &dial::TcpSecurity::default()).await?);
            c.handshake(hello()).await?;
            dials.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let mut c = InformantClient::new(dial::channel(addr, &dial::TcpSecurity::default()).await?);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            c.handshake(hello()).await?;
            calls.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let q = |v: &mut Vec<f64>| -> anyhow::Result<(f64, f64)> {
            let p50 = vmscale_common::stats::quantile(v, 0.5).context("no samples")?;
            let p90 = vmscale_common::stats::quantile(v, 0.9).context("no samples")?;
            Ok((p50, p90))
        };
        Ok((q(&mut dials)?, q(&mut calls)?))
    })
}
