//! `pg-migrate`: pgbench through a live migration. Two nodes as network
//! namespaces, the Postgres guest on node a, which it fills past its
//! watermark; pgbench from the host's namespace over the flat network the
//! whole time; node b's agent starts and the allocator orders the VM there.
//! Passes when the order completes, the guest runs in one QEMU in b's
//! namespace, the ledger holds it on b only, and pgbench ends with no failed
//! transaction and no broken connection.
//!
//! The guest has no vsock device here: QEMU refuses to migrate a guest with
//! a vhost-user vsock device, and this machine has no kernel vhost-vsock
//! (which migrates). So the agent runs this VM without its informant (it may
//! grow, never shrink) and the scenario is about the move alone.

use anyhow::{ensure, Context};
use std::time::{Duration, Instant};

use vmscale_allocator::config::Config as AllocatorConfig;
use vmscale_allocator::core::migration::OrderState;
use vmscale_allocator::core::vm::VmState;

use super::scale::PgCtx;
use super::vm::{Link, Memory, PgVm, PgVmPlan};
use crate::cluster::net::{self, Agent, AgentPlan, Allocator};
use crate::netns::Fabric;
use crate::pgbench::{self, Pgbench, Source};

const A: &str = "node-a";
const B: &str = "node-b";
/// pgbench's run: the move starts about 10 s in.
const BENCH: Duration = Duration::from_secs(90);

/// Where the ledger holds `vm`: (node, state) per node.
fn held(alloc: &Allocator, vm: &str) -> Vec<(String, VmState)> {
    let Some(s) = alloc.state() else { return Vec::new() };
    [A, B]
        .into_iter()
        .filter_map(|node| Some((node.to_owned(), s.nodes.get(node)?.vms.get(vm)?.state)))
        .collect()
}

/// The state and reason of the last order for `vm` (the scenario's and the
/// pgbench benchmark's).
pub fn last_order(alloc: &Allocator, vm: &str) -> Option<(u64, OrderState, String)> {
    let s = alloc.state()?;
    s.orders
        .into_values()
        .chain(s.finished_orders)
        .filter(|o| o.vm == vm)
        .max_by_key(|o| o.id)
        .map(|o| (o.id, o.state, o.reason))
}

pub fn migrate(ctx: &PgCtx) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let left = || ctx.timeout.saturating_sub(t0.elapsed());
    let fabric = Fabric::new(2)?;
    let config = AllocatorConfig {
        watermark: 0.9,
        plan_interval_ms: 500,
        order_timeout_ms: 120_000,
        ..Default::default()
    };
    let mut alloc = Allocator::start(&ctx.root, &ctx.dir, &fabric, config)?;
    // Fixed at its size: 1 vCPU and 1 GiB, the whole of node a.
    let plan = PgVmPlan {
        cpus: 1,
        max_cpus: 1,
        min_cus: 4,
        max_cus: 4,
        link: Link::Tcp,
        ..PgVmPlan::small("pg-move", 52, Memory::Dimm)
    };
    let mut vm = PgVm::boot(&ctx.image, &fabric, 0, &plan, &ctx.dir.join(&plan.id))?;
    vm.wait_ready(Duration::from_secs(300))?;
    super::init_pgbench(&vm)?;
    let transfer = vmscale_agent::qmp::migrate::MigrationConfig { timeout_ms: 90_000, ..Default::default() };
    // Node a holds exactly the VM, past its watermark; node b has room for
    // it under its own (the allocator never moves a VM onto a node it
    // would take past its watermark).
    let files = vm.node_files();
    let agent_plan = |name: &str, milli_cpu: u64, mib: u64| AgentPlan {
        name: name.into(),
        capacity_milli_cpu: milli_cpu,
        capacity_mib: mib,
        policy: Default::default(),
        transfer: transfer.clone(),
        confirm_grace_ms: 5000,
        dimm_backend: vmscale_agent::qmp::DimmBackend::Ram,
        files: files.clone(),
    };
    let spec = plan.spec(&vm.agent_qmp, Some(vm.informant_address()));
    let mut a = Agent::start(
        &ctx.root,
        &ctx.dir,
        &fabric,
        0,
        &alloc.url,
        &agent_plan(A, 1000, plan.boot_mib),
        &[spec],
    )?;
    crate::harness::wait_for("agent a to hold the VM", left(), || {
        a.daemon.check()?;
        Ok((held(&alloc, &plan.id) == [(A.to_owned(), VmState::Active)]).then_some(()))
    })?;
    // A timed run, so that pgbench prints its own report (exact counts);
    // long enough to span the move with room on both sides.
    let bench = Pgbench::start(&super::bench_options(&vm, 4, Some(BENCH)), &pgbench::host)?;
    let t_bench = Instant::now();
    // Some transactions on node a first.
    std::thread::sleep(Duration::from_secs(10));
    let mut b = Agent::start(
        &ctx.root,
        &ctx.dir,
        &fabric,
        1,
        &alloc.url,
        &agent_plan(B, 4000, 4 * plan.boot_mib),
        &[],
    )?;
    let t_move = Instant::now();
    let moved = crate::harness::wait_for("the allocator to move the VM to node b", left(), || {
        a.daemon.check()?;
        b.daemon.check()?;
        alloc.daemon.check()?;
        match last_order(&alloc, &plan.id) {
            Some((id, OrderState::Completed, _)) => Ok(Some(id)),
            Some((id, state, reason)) if state.is_final() => {
                anyhow::bail!("order {id} ended {}: {reason}", state.name())
            }
            _ => Ok(None),
        }
    });
    let moved = match moved {
        Ok(id) => id,
        Err(e) => {
            let summary = bench.stop();
            return Err(e).with_context(|| format!("pgbench: {summary:?}"));
        }
    };
    let move_s = t_move.elapsed().as_secs_f64();
    crate::harness::wait_for("the source QEMU to quit", Duration::from_secs(20), || {
        Ok(vm.qemu.exited().map(|_| ()))
    })?;
    ensure!(
        t_bench.elapsed() + Duration::from_secs(5) < BENCH,
        "the move ended {:.0} s into pgbench's {} s run: too late to see transactions on node b",
        t_bench.elapsed().as_secs_f64(),
        BENCH.as_secs()
    );
    // pgbench goes on on node b to its end.
    let summary = bench.wait(BENCH + Duration::from_secs(60))?;
    ensure!(summary.source == Source::Report, "pgbench ended without its report: {summary:?}");
    let qemus = net::qemus_under(&ctx.dir);
    ensure!(qemus.len() == 1, "after the move {} QEMUs run the guest: {qemus:?}", qemus.len());
    let ns = net::netns_of(qemus[0])?;
    ensure!(ns == fabric.nodes[1].ns, "the guest's QEMU runs in namespace {ns:?}, not node b's");
    ensure!(
        held(&alloc, &plan.id) == [(B.to_owned(), VmState::Active)],
        "ledger: {:?}",
        held(&alloc, &plan.id)
    );
    ensure!(summary.clean(), "pgbench lost work through the move: {summary:?}");
    ensure!(summary.processed > 0, "pgbench did no work: {summary:?}");
    let after = vm.conn.query("SELECT count(*) FROM pgbench_history", Duration::from_secs(30))?;
    ensure!(
        after.parse::<u64>().ok() == Some(summary.processed),
        "pgbench reported {} transactions, the guest's pgbench_history holds {after} rows",
        summary.processed
    );
    Ok(format!(
        "order {moved} moved the Postgres guest ({} MiB) from {A} to {B} in {move_s:.1} s under pgbench \
         (4 clients): {} transactions, {} failed, {} broken connections, {:.1} tps, max latency {}; \
         pgbench_history holds every one; one QEMU, in {ns}",
        plan.boot_mib,
        summary.processed,
        summary.failed,
        summary.broken_connections,
        summary.tps.unwrap_or(0.0),
        summary.max_latency_ms.map_or("n/a".into(), |m| format!("{m:.0} ms")),
    ))
}
