//! Live migration with every part real: two "nodes" as network namespaces
//! of one flat L2 network ([`Fabric`]), the allocator in the host's
//! namespace, one agent per node inside its namespace taking VMs in on the
//! node's address, and one guest (tap networking, an echo server, the real
//! informant at the guest's address) on node a, sized so that node a is
//! past its watermark. A TCP client in the host's namespace sends a line
//! to the guest every 100 ms throughout.
//!
//! 1. The allocator orders the VM to node b. While memory flows, node b's
//!    link to the switch is cut: the order fails with a reason, the guest
//!    runs on node a only, the ledger holds it on a, b's incoming QEMU goes.
//! 2. The link comes back: a later order moves the guest to b. It runs in
//!    one QEMU, in b's namespace, with its hot-added vCPU and DIMM; the
//!    ledger holds it on b only, node a is back under its watermark, and
//!    the client got every line back.

use anyhow::{bail, ensure, Context};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use vmscale_agent::core::policy::Cu;
use vmscale_agent::qmp::migrate::MigrationConfig;
use vmscale_agent::vms::{CpuMode, InformantAddr, MemoryMode, VmSpec};
use vmscale_allocator::config::Config as AllocatorConfig;
use vmscale_allocator::core::migration::{Order, OrderState};
use vmscale_allocator::core::vm::VmState;

use vmscale_agent::qmp::migrate::Migration;
use vmscale_agent::qmp::{ClientConfig, Hotplug, HotplugConfig, QmpClient, QmpVm};

use super::Ctx;
use crate::cluster::net::{self, Agent, AgentPlan, Allocator};
use crate::cluster::MIB;
use crate::echo::{EchoClient, EchoReport};
use crate::harness::until;
use crate::migration::{self, GuestVm, Shape, ECHO_PORT, TAP};
use crate::netns::Fabric;

const VM: &str = "mover";
/// Node names at the allocator.
const A: &str = "node-a";
const B: &str = "node-b";
/// CU: one vCPU and 256 MiB. The guest boots with one of each and gets one
/// more of each hot-added: 2 CUs, its min and max, so it never scales and
/// node a's load stays what the test set.
const CU_MIB: u64 = 256;

pub(super) fn migrate(ctx: &Ctx) -> anyhow::Result<String> {
    if let Err(why) = crate::netns::can_run() {
        bail!("this scenario needs network namespaces: {why}");
    }
    let fabric = Fabric::new(2)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let r = rt.block_on(scenario(ctx, &fabric));
    // Agents' QEMUs live in process groups of their own: end them here (the
    // fabric's drop ends whatever runs in its namespaces, too).
    net::kill_qemus_under(&ctx.dir);
    r
}

/// Orders for the VM, open and finished.
fn orders(alloc: &Allocator) -> Vec<Order> {
    let Some(s) = alloc.state() else { return Vec::new() };
    s.orders.into_values().chain(s.finished_orders).filter(|o| o.vm == VM).collect()
}

/// The first order for the VM in `state`.
fn order_in(alloc: &Allocator, state: OrderState) -> Option<Order> {
    orders(alloc).into_iter().find(|o| o.state == state)
}

/// Where the ledger holds the VM: (node, state) per node.
fn held(alloc: &Allocator) -> Vec<(String, VmState)> {
    let Some(s) = alloc.state() else { return Vec::new() };
    [A, B]
        .into_iter()
        .filter_map(|node| Some((node.to_owned(), s.nodes.get(node)?.vms.get(VM)?.state)))
        .collect()
}

/// Whether a node's wants (reservations plus unmet demand) are within its
/// watermark level, by the allocator's own figures; None while the
/// allocator doesn't know the node.
fn under_watermark(alloc: &Allocator, node: &str) -> Option<bool> {
    let n = alloc.state()?.nodes.remove(node)?;
    Some(n.wanted().fits_in(n.watermark_level()))
}

fn qmp_config() -> ClientConfig {
    ClientConfig { command_timeout: Duration::from_secs(30), ..ClientConfig::default() }
}

async fn guest_runs(vm: &GuestVm) -> bool {
    let Ok(c) = QmpClient::connect(&vm.qmp(), qmp_config()).await else { return false };
    Migration::new(c).run_status().await.is_ok_and(|s| s.running)
}

/// Logs to read when something went wrong.
fn logs(dir: &Path) -> String {
    format!("logs in {} (allocator.log, {A}.log, {B}.log, vm-a/console.log)", dir.display())
}

/// What runs while the scenario does: the allocator, the guest's first
/// QEMU on node a and the TCP client through it, the agents once started.
struct Scene<'a> {
    ctx: &'a Ctx,
    fabric: &'a Fabric,
    t0: Instant,
    alloc: Allocator,
    source: GuestVm,
    echo: EchoClient,
    /// The agent's QMP socket of the source QEMU.
    agent_qmp: std::path::PathBuf,
}

/// How the cut move ended.
struct CutMove {
    order: u64,
    reason: String,
    /// From the cut to the order's failure.
    fail_s: f64,
}

/// How the later move ended.
struct Moved {
    order: u64,
    /// From the link's return to the order's completion.
    moved_s: f64,
    /// The namespace the guest's one QEMU runs in.
    ns: String,
}

async fn scenario(ctx: &Ctx, fabric: &Fabric) -> anyhow::Result<String> {
    let mut scene = boot(ctx, fabric).await?;
    let (mut a, mut b) = start_agents(&mut scene).await?;
    let cut = cut_move(&mut scene, &mut a, &mut b).await?;
    let moved = later_move(&mut scene, &mut a, &mut b).await?;
    // The client goes on a little on b, then reports.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let Scene { echo, .. } = scene;
    let report = tokio::task::block_in_place(|| echo.finish(Duration::from_secs(5)))?;
    ensure!(
        report.lost == 0 && report.wrong == 0,
        "the connection did not survive intact: {report:?}; {}",
        logs(&ctx.dir)
    );
    a.daemon.check()?;
    b.daemon.check()?;
    Ok(summary(&a, &cut, &moved, &report))
}

/// The allocator; the guest on node a (1 vCPU of 4, 256 MiB, no virtio-mem,
/// no 9p) with one more vCPU and one 256 MiB DIMM hot-added, as the agent
/// would have; the TCP client through it.
async fn boot<'a>(ctx: &'a Ctx, fabric: &'a Fabric) -> anyhow::Result<Scene<'a>> {
    let dir = &ctx.dir;
    let t0 = Instant::now();
    fabric.add_tap(0, TAP)?;
    fabric.add_tap(1, TAP)?;
    let config = AllocatorConfig {
        watermark: 0.9,
        plan_interval_ms: 500,
        order_timeout_ms: 90_000,
        ..Default::default()
    };
    let alloc = Allocator::start(&ctx.root, dir, fabric, config)?;
    let shape = Shape {
        virtio_mem_mib: 0,
        extra_cmdline: vec!["vmscale.informant=--cpu-mode,sysfs".into()],
        ..Shape::new(CU_MIB)
    };
    let base = shape.base_args(&ctx.image, fabric);
    let vm_dir = dir.join("vm-a");
    let agent_qmp = vm_dir.join("agent.qmp");
    let qmp_arg = format!("unix:{},server=on,wait=off", agent_qmp.display());
    let mut source = migration::start(fabric, 0, &base, &["-qmp".into(), qmp_arg], &vm_dir)?;
    {
        let qmp = QmpVm::new(source.client().await?, HotplugConfig::default());
        qmp.plug_vcpu().await.context("hot-adding a vCPU")?;
        qmp.plug_dimm(CU_MIB * MIB).await.context("hot-adding a DIMM")?;
        let size = qmp.read_size().await?;
        ensure!(size.vcpus_present == 2, "the guest has {} vCPUs after the hot-add", size.vcpus_present);
    }
    let addr: SocketAddr = (migration::guest_ip(fabric), ECHO_PORT).into();
    eprintln!("    waiting for the guest's echo server at {addr} (boot under TCG)");
    let stream = tokio::task::block_in_place(|| {
        crate::echo::connect(addr, Duration::from_secs(180), || source.exited())
    })
    .with_context(|| source.logs())?;
    let echo = EchoClient::start(stream, Duration::from_millis(100))?;
    Ok(Scene { ctx, fabric, t0, alloc, source, echo, agent_qmp })
}

impl Scene<'_> {
    /// What is left of the scenario's time.
    fn left(&self) -> Duration {
        self.ctx.timeout.saturating_sub(self.t0.elapsed())
    }

    /// The VM as node a's agent has it: 2 CUs, its min and max.
    fn vm_spec(&self) -> VmSpec {
        VmSpec {
            id: VM.into(),
            qmp: self.agent_qmp.display().to_string(),
            informant: Some(InformantAddr::http(
                migration::guest_ip(self.fabric).to_string(),
                crate::guest::INFORMANT_PORT,
            )),
            cu: Cu { milli_cpu: 1000, memory_bytes: CU_MIB * MIB },
            min_cus: 2,
            max_cus: 2,
            cpu_mode: CpuMode::Sysfs,
            memory: MemoryMode::Dimm { dimm_bytes: CU_MIB * MIB },
            policy: None,
        }
    }
}

/// Node a's agent with the VM; once it holds the VM, past its watermark,
/// node b's agent (with room), so that the allocator orders the move as b
/// registers. Moves are slowed to 16 MiB/s so that the stream lasts long
/// enough to be cut in the middle.
async fn start_agents(scene: &mut Scene<'_>) -> anyhow::Result<(Agent, Agent)> {
    let transfer = MigrationConfig {
        max_bandwidth_bytes_per_s: 16 << 20,
        downtime_limit_ms: 300,
        timeout_ms: 20_000,
        ..MigrationConfig::default()
    };
    let files = crate::migration::NodeFiles::guest(&scene.ctx.image);
    let plan = |name: &str, cpu: u64, mib: u64| AgentPlan {
        name: name.into(),
        capacity_milli_cpu: cpu,
        capacity_mib: mib,
        policy: Default::default(),
        transfer: transfer.clone(),
        confirm_grace_ms: 5000,
        dimm_backend: vmscale_agent::qmp::DimmBackend::Ram,
        files: files.clone(),
    };
    let (ctx, fabric, url) = (scene.ctx, scene.fabric, scene.alloc.url.clone());
    // Node a holds exactly the VM (2 vCPUs, 512 MiB): past 0.9 of it.
    let mut a =
        Agent::start(&ctx.root, &ctx.dir, fabric, 0, &url, &plan(A, 2000, 2 * CU_MIB), &[scene.vm_spec()])?;
    until("agent a to hold the VM with its informant and the allocator", scene.left(), || {
        a.daemon.check()?;
        let Some(v) = a.vm(VM) else { return Ok(None) };
        let up = |k: &str| v[k] == true;
        Ok((up("informant_connected") && up("allocator_connected")).then_some(()))
    })
    .await?;
    let alloc = &scene.alloc;
    ensure!(held(alloc) == [(A.to_owned(), VmState::Active)], "ledger: {:?}", held(alloc));
    ensure!(under_watermark(alloc, A) == Some(false), "node a is not past its watermark");
    let b = Agent::start(&ctx.root, &ctx.dir, fabric, 1, &url, &plan(B, 4000, 8 * CU_MIB), &[])?;
    Ok((a, b))
}

/// Step 1 of the module doc: the network breaks while memory flows; the
/// order fails with a reason, the guest runs on node a only, the ledger
/// holds it on a, b's incoming QEMU goes.
async fn cut_move(scene: &mut Scene<'_>, a: &mut Agent, b: &mut Agent) -> anyhow::Result<CutMove> {
    let (fabric, dir, left) = (scene.fabric, &scene.ctx.dir, scene.left());
    let alloc = &scene.alloc;
    let first = until("the first move to stream memory", left, || {
        a.daemon.check()?;
        b.daemon.check()?;
        let m = a.vm(VM).and_then(|v| v["migration"].as_str().map(str::to_owned)).unwrap_or_default();
        if m.contains("migrating") {
            return Ok(Some(m));
        }
        if let Some(o) = orders(alloc).iter().find(|o| o.state.is_final()) {
            bail!("order {} ended ({}: {}) before its stream could be cut", o.id, o.state.name(), o.reason);
        }
        Ok(None)
    })
    .await?;
    let cut_at = Instant::now();
    fabric.set_link(1, false)?;
    eprintln!("    cut node b's link during the move ({first})");
    let failed = until("the cut move's order to fail", scene.left(), || {
        a.daemon.check()?;
        Ok(order_in(alloc, OrderState::Failed))
    })
    .await?;
    let (order, reason, fail_s) = (failed.id, failed.reason, cut_at.elapsed().as_secs_f64());
    eprintln!("    order {order} failed {fail_s:.1} s after the cut: {reason}");
    ensure!(!reason.trim().is_empty(), "order {order} failed without a reason");
    let source = &mut scene.source;
    ensure!(source.exited().is_none(), "the source QEMU is gone after the failed move: {}", source.logs());
    ensure!(guest_runs(source).await, "the guest does not run on node a after the failed move");
    let ledger = held(alloc);
    ensure!(
        ledger.first().is_some_and(|(n, s)| n == A && *s == VmState::Active)
            && ledger.iter().all(|(n, s)| n == A || matches!(s, VmState::Incoming { .. })),
        "after the failed move the ledger holds the VM as {ledger:?}"
    );
    let running = net::qemus_under(dir);
    let on_a: Vec<u32> = running
        .iter()
        .copied()
        .filter(|p| net::netns_of(*p).ok().as_deref() == Some(&fabric.nodes[0].ns))
        .collect();
    ensure!(on_a.len() == 1, "QEMUs on node a after the failed move: {on_a:?} (of {running:?})");
    fabric.set_link(1, true)?;
    eprintln!("    node b's link is back");
    // b's incoming QEMU for the failed order goes (aborted by the source,
    // or b's own deadline).
    let failed_dir = b.state_dir.join("incoming").join(order.to_string());
    until("b's incoming QEMU of the failed order to go", scene.left(), || {
        Ok(net::qemus_under(&failed_dir).is_empty().then_some(()))
    })
    .await?;
    Ok(CutMove { order, reason, fail_s })
}

/// Step 2 of the module doc: the link is back and a later order moves the
/// guest to b. It runs in one QEMU, in b's namespace, with its hot-added
/// vCPU and DIMM; the ledger holds it on b only and node a is back under
/// its watermark.
async fn later_move(scene: &mut Scene<'_>, a: &mut Agent, b: &mut Agent) -> anyhow::Result<Moved> {
    let (fabric, dir, alloc) = (scene.fabric, &scene.ctx.dir, &scene.alloc);
    let t_retry = Instant::now();
    let done = until("a later order to complete", scene.left(), || {
        a.daemon.check()?;
        b.daemon.check()?;
        Ok(order_in(alloc, OrderState::Completed))
    })
    .await?;
    let moved_s = t_retry.elapsed().as_secs_f64();
    let source = &mut scene.source;
    until("the source QEMU to quit", Duration::from_secs(15), || Ok(source.exited().map(|_| ()))).await?;
    until("b's agent to scale the VM at its full size", scene.left(), || {
        b.daemon.check()?;
        let Some(v) = b.vm(VM) else { return Ok(None) };
        let c = &v["current"];
        Ok((c["milli_cpu"] == 2000 && c["memory_bytes"] == 2 * CU_MIB * MIB).then_some(()))
    })
    .await?;
    let qemus = net::qemus_under(dir);
    ensure!(qemus.len() == 1, "after the move {} QEMUs run the guest: {qemus:?}", qemus.len());
    let ns = net::netns_of(qemus[0])?;
    ensure!(ns == fabric.nodes[1].ns, "the guest's QEMU runs in namespace {ns:?}, not node b's");
    let args = net::cmdline(qemus[0]).join(" ");
    ensure!(
        args.contains("pc-dimm,id=vmscale-dimm") && args.contains("id=vmscale-cpu"),
        "node b's QEMU lacks the hot-added DIMM or vCPU: {args}"
    );
    until("the ledger to hold the VM on b only", Duration::from_secs(10), || {
        Ok((held(alloc) == [(B.to_owned(), VmState::Active)]).then_some(()))
    })
    .await?;
    ensure!(under_watermark(alloc, A) == Some(true), "node a is not back under its watermark");
    // Agent a drops the VM as its loop ends, a moment after the order.
    until("agent a to drop the VM", Duration::from_secs(10), || Ok(a.vm(VM).is_none().then_some(()))).await?;
    Ok(Moved { order: done.id, moved_s, ns })
}

/// The scenario's line, with QEMU's own figures as the source agent logged them.
fn summary(a: &Agent, cut: &CutMove, moved: &Moved, report: &EchoReport) -> String {
    let logged = super::log_lines(&a.daemon.log, "the VM moved away").join("\n");
    let qemu_ms = |key: &str| {
        let rest = &logged[logged.find(&format!("{key}=Some("))? + key.len() + 6..];
        rest.split(')').next().map(str::to_owned)
    };
    format!(
        "order {} cut mid-stream failed in {:.1} s ({}); order {} moved the guest \
         ({} vCPUs, {} MiB) to {B} in {:.1} s after the link came back (QEMU: total {} ms, downtime {} ms); \
         one QEMU, in {}; ledger on {B} only, {A} back under its watermark; echo {} lines sent, {} lost, \
         longest gap {:.0} ms",
        cut.order,
        cut.fail_s,
        cut.reason,
        moved.order,
        2,
        2 * CU_MIB,
        moved.moved_s,
        qemu_ms("total_ms").unwrap_or_else(|| "?".into()),
        qemu_ms("downtime_ms").unwrap_or_else(|| "?".into()),
        moved.ns,
        report.sent,
        report.lost,
        report.max_gap_ms
    )
}
