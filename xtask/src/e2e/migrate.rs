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

use vmscale_agent::qmp::migrate::Migration;
use vmscale_agent::qmp::{ClientConfig, HotplugConfig, Hypervisor, QmpClient, QmpVm};

use super::Ctx;
use crate::cluster::net::{self, Agent, AgentPlan, Allocator};
use crate::cluster::MIB;
use crate::echo::EchoClient;
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

/// Polls `f` every 50 ms until it gives `Some`, fails fast on its error.
async fn until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Orders for the VM, open and finished: (id, state, reason).
fn orders(alloc: &Allocator) -> Vec<(u64, String, String)> {
    let Some(s) = alloc.state() else { return Vec::new() };
    let open = s["orders"].as_object().map(|m| m.values().cloned().collect::<Vec<_>>()).unwrap_or_default();
    let done = s["finished_orders"].as_array().cloned().unwrap_or_default();
    open.iter()
        .chain(done.iter())
        .filter(|o| o["vm"] == VM)
        .map(|o| {
            let id = o["id"].as_u64().unwrap_or(0);
            let state = o["state"].as_str().unwrap_or("").to_owned();
            (id, state, o["reason"].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

/// Where the ledger holds the VM: (node, state) per node.
fn held(alloc: &Allocator) -> Vec<(String, String)> {
    let Some(s) = alloc.state() else { return Vec::new() };
    let mut out = Vec::new();
    for node in [A, B] {
        if let Some(e) = s["nodes"][node]["vms"].get(VM) {
            out.push((node.to_owned(), e["state"]["state"].as_str().unwrap_or("?").to_owned()));
        }
    }
    out
}

/// Whether a node's wants (reservations plus unmet demand) are within its
/// watermark, as the planner sees it; None while the allocator doesn't know.
fn under_watermark(alloc: &Allocator, node: &str) -> Option<bool> {
    let s = alloc.state()?;
    let n = &s["nodes"][node];
    let w = n["watermark"].as_f64()?;
    let get = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let (mut cpu, mut mem) = (0, 0);
    for e in n["vms"].as_object()?.values() {
        cpu += get(&e["reserved"], "milli_cpu") + get(&e["unmet"], "milli_cpu");
        mem += get(&e["reserved"], "memory_bytes") + get(&e["unmet"], "memory_bytes");
    }
    let usable = |k: &str| get(&n["capacity"], k).saturating_sub(get(&n["system_reserve"], k)) as f64;
    Some(cpu as f64 <= w * usable("milli_cpu") && mem as f64 <= w * usable("memory_bytes"))
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

async fn scenario(ctx: &Ctx, fabric: &Fabric) -> anyhow::Result<String> {
    let dir = &ctx.dir;
    let t0 = Instant::now();
    let left = || ctx.timeout.saturating_sub(t0.elapsed());
    fabric.add_tap(0, TAP)?;
    fabric.add_tap(1, TAP)?;
    let alloc = Allocator::start(
        &ctx.root,
        dir,
        fabric,
        "watermark = 0.9\nplan_interval_ms = 500\norder_timeout_ms = 90000\n",
    )?;

    // The guest on node a: 1 vCPU of 4, 256 MiB; no virtio-mem, no 9p.
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
    // One more vCPU and one 256 MiB DIMM, as the agent would have added.
    {
        let qmp = QmpVm::new(source.client().await?, HotplugConfig::default());
        qmp.plug_vcpu().await.context("hot-adding a vCPU")?;
        qmp.plug_dimm(CU_MIB * MIB).await.context("hot-adding a DIMM")?;
        let size = qmp.read_size().await?;
        ensure!(size.vcpus_present == 2, "the guest has {} vCPUs after the hot-add", size.vcpus_present);
    }
    let guest_ip = migration::guest_ip(fabric);
    let addr: SocketAddr = (guest_ip, ECHO_PORT).into();
    eprintln!("    waiting for the guest's echo server at {addr} (boot under TCG)");
    let stream = tokio::task::block_in_place(|| {
        crate::echo::connect(addr, Duration::from_secs(180), || source.exited())
    })
    .with_context(|| source.logs())?;
    let echo = EchoClient::start(stream, Duration::from_millis(100))?;

    // Node a holds exactly the VM (2 vCPUs, 512 MiB): past 0.9 of it.
    // Node b has room. Moves are slowed to 16 MiB/s so that the stream
    // lasts long enough to be cut in the middle.
    let transfer = "max_bandwidth_bytes_per_s = 16777216\ndowntime_limit_ms = 300\ntimeout_ms = 20000";
    let plan = |name: &str, cpu: u64, mib: u64| AgentPlan {
        name: name.into(),
        capacity_milli_cpu: cpu,
        capacity_mib: mib,
        policy: String::new(),
        transfer: transfer.into(),
        confirm_grace_ms: 5000,
    };
    let entry = format!(
        "[[vm]]\nid = \"{VM}\"\nqmp = \"{}\"\ninformant = \"http://{guest_ip}:{}\"\n\
         cu = {{ milli_cpu = 1000, memory_bytes = {} }}\nmin_cus = 2\nmax_cus = 2\ncpu_mode = \"sysfs\"\n\
         memory = {{ kind = \"dimm\", dimm_bytes = {} }}\n",
        agent_qmp.display(),
        crate::guest::INFORMANT_PORT,
        CU_MIB * MIB,
        CU_MIB * MIB
    );
    let mut a = Agent::start(&ctx.root, dir, fabric, 0, &alloc.url, &plan(A, 2000, 2 * CU_MIB), &entry)?;
    until("agent a to hold the VM with its informant and the allocator", left(), || {
        a.daemon.check()?;
        let Some(v) = a.vm(VM) else { return Ok(None) };
        let up = |k: &str| v[k] == true;
        Ok((up("informant_connected") && up("allocator_connected")).then_some(()))
    })
    .await?;
    ensure!(held(&alloc) == [(A.to_owned(), "active".to_owned())], "ledger: {:?}", held(&alloc));
    ensure!(under_watermark(&alloc, A) == Some(false), "node a is not past its watermark");
    // Only now a target: the allocator orders the move as b registers.
    let mut b = Agent::start(&ctx.root, dir, fabric, 1, &alloc.url, &plan(B, 4000, 8 * CU_MIB), "")?;

    // 1. The network breaks while memory flows.
    let (first, cut_at) = until("the first move to stream memory", left(), || {
        a.daemon.check()?;
        b.daemon.check()?;
        let m = a.vm(VM).and_then(|v| v["migration"].as_str().map(str::to_owned)).unwrap_or_default();
        if m.contains("migrating") {
            return Ok(Some(m));
        }
        if let Some(o) = orders(&alloc).iter().find(|o| o.1 == "completed" || o.1 == "failed") {
            bail!("order {} ended ({}: {}) before its stream could be cut", o.0, o.1, o.2);
        }
        Ok(None)
    })
    .await
    .map(|m| (m, Instant::now()))?;
    fabric.set_link(1, false)?;
    eprintln!("    cut node b's link during the move ({first})");
    let (failed, reason) = until("the cut move's order to fail", left(), || {
        a.daemon.check()?;
        Ok(orders(&alloc).into_iter().find(|o| o.1 == "failed").map(|o| (o.0, o.2)))
    })
    .await?;
    let fail_s = cut_at.elapsed().as_secs_f64();
    eprintln!("    order {failed} failed {fail_s:.1} s after the cut: {reason}");
    ensure!(!reason.trim().is_empty(), "order {failed} failed without a reason");
    ensure!(source.exited().is_none(), "the source QEMU is gone after the failed move: {}", source.logs());
    ensure!(guest_runs(&source).await, "the guest does not run on node a after the failed move");
    let ledger = held(&alloc);
    ensure!(
        ledger.first().is_some_and(|(n, s)| n == A && s == "active")
            && ledger.iter().all(|(n, s)| n == A || s == "incoming"),
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
    let failed_dir = b.state_dir.join("incoming").join(failed.to_string());
    until("b's incoming QEMU of the failed order to go", left(), || {
        Ok(net::qemus_under(&failed_dir).is_empty().then_some(()))
    })
    .await?;

    // 2. A later order moves the guest.
    let t_retry = Instant::now();
    let (done, _) = until("a later order to complete", left(), || {
        a.daemon.check()?;
        b.daemon.check()?;
        Ok(orders(&alloc).into_iter().find(|o| o.1 == "completed").map(|o| (o.0, o.2)))
    })
    .await?;
    let moved_s = t_retry.elapsed().as_secs_f64();
    until("the source QEMU to quit", Duration::from_secs(15), || Ok(source.exited().map(|_| ()))).await?;
    until("b's agent to scale the VM at its full size", left(), || {
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
        Ok((held(&alloc) == [(B.to_owned(), "active".to_owned())]).then_some(()))
    })
    .await?;
    ensure!(under_watermark(&alloc, A) == Some(true), "node a is not back under its watermark");
    // Agent a drops the VM as its loop ends, a moment after the order.
    until("agent a to drop the VM", Duration::from_secs(10), || Ok(a.vm(VM).is_none().then_some(()))).await?;
    // The client goes on a little on b, then reports.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = tokio::task::block_in_place(|| echo.finish(Duration::from_secs(5)))?;
    ensure!(
        report.lost == 0 && report.wrong == 0,
        "the connection did not survive intact: {report:?}; {}",
        logs(dir)
    );
    a.daemon.check()?;
    b.daemon.check()?;
    // QEMU's own figures, as the source agent logged them.
    let moved = super::log_lines(&a.daemon.log, "the VM moved away").join("\n");
    let qemu_ms = |key: &str| {
        let rest = &moved[moved.find(&format!("{key}=Some("))? + key.len() + 6..];
        rest.split(')').next().map(str::to_owned)
    };
    Ok(format!(
        "order {failed} cut mid-stream failed in {fail_s:.1} s ({reason}); order {done} moved the guest \
         ({} vCPUs, {} MiB) to {B} in {moved_s:.1} s after the link came back (QEMU: total {} ms, downtime {} ms); \
         one QEMU, in {ns}; ledger on {B} only, {A} back under its watermark; echo {} lines sent, {} lost, \
         longest gap {:.0} ms",
        2,
        2 * CU_MIB,
        qemu_ms("total_ms").unwrap_or_else(|| "?".into()),
        qemu_ms("downtime_ms").unwrap_or_else(|| "?".into()),
        report.sent,
        report.lost,
        report.max_gap_ms
    ))
}
