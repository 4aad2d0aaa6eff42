//! Where the demo runs: the Postgres guests (`crate::pg::vm`) on one node or
//! two, each node a network namespace of one [`Fabric`] with an agent in
//! it, and the allocator in the host's namespace.
//!
//! Sizes, and why: both VMs have 2 vCPUs present from boot (sysfs mode) and
//! 512 MiB of boot memory, in CUs of a quarter vCPU and 128 MiB (one DIMM):
//! 4 CUs (1 vCPU, 512 MiB: the boot memory, which nothing unplugs) to 8 (2
//! vCPUs, 1 GiB). So vCPUs go 2 -> 1 when idle, back to 2 under load and
//! down again, and memory 512 MiB -> 1 GiB and back.
//!
//! With two nodes, node a holds both VMs under its watermark at their
//! minimum (1 GiB of 90% of 1200 MiB, 1080 MiB), and pg-1's growth passes
//! it. Node b's agent starts only when the demo wants the move (see
//! `phases.rs`): once pgbench runs against pg-2 and pg-1 wants more than
//! pg-2, so that pg-2 is the smallest VM that covers node a's excess, which
//! the allocator moves (a guest's boot, under TCG, takes both VMs to their
//! maximum at once: with node b there from the start, a VM would move
//! before any pgbench ran). Node b has room for either under its own
//! watermark. CPU capacity is ample on both, so memory alone decides.
//! Alone on node a, pg-1 can reach its maximum.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vmscale_agent::core::policy::{Cu, Policy};
use vmscale_agent::core::pressure::{PressureKind, PressureKinds};
use vmscale_agent::qmp::DimmBackend;
use vmscale_agent::vms::CpuMode;
use vmscale_allocator::config::Config as AllocatorConfig;
use vmscale_allocator::core::Cluster;

use crate::cluster::net::{Agent, AgentPlan, Allocator};
use crate::cluster::MIB;
use crate::netns::Fabric;
use crate::pg::vm::{Link, Memory, PgVm, PgVmPlan};

/// Node names.
pub(super) const A: &str = "node-a";
pub(super) const B: &str = "node-b";
/// The VM under load, and the one that moves (with two nodes).
pub(super) const PG1: &str = "pg-1";
pub(super) const PG2: &str = "pg-2";

/// Node a's memory with two nodes: see the module doc.
const A_MIB_TWO_NODES: u64 = 1200;

/// The allocator, the agents and the VMs. Fields drop in order: the VMs'
/// QEMUs and the daemons before the namespaces they run in.
pub(super) struct Setup {
    two: bool,
    root: PathBuf,
    dir: PathBuf,
    pub allocator: Allocator,
    pub agents: Vec<Agent>,
    /// [`PG1`], [`PG2`], both first started on node a.
    pub vms: Vec<PgVm>,
    /// Dropped last: its namespaces end whatever still runs in them.
    pub fabric: Fabric,
}

impl Setup {
    /// Boots both VMs on node a (they go on booting), starts the allocator
    /// and node a's agent (`two`: node b's comes with [`Setup::start_b`]).
    /// Returns at once: the agent connects to the informants once the
    /// guests are up.
    pub fn start(
        root: &Path,
        dir: &Path,
        image: &crate::debian::DebianImage,
        two: bool,
    ) -> anyhow::Result<Setup> {
        let fabric = Fabric::new(if two { 2 } else { 1 })?;
        let config = AllocatorConfig {
            watermark: 0.9,
            plan_interval_ms: 1000,
            order_timeout_ms: 120_000,
            ..Default::default()
        };
        let allocator = Allocator::start(root, dir, &fabric, config)?;
        let mut vms = Vec::new();
        for (id, host) in [(PG1, 61), (PG2, 62)] {
            let plan = plan(id, host);
            vms.push(PgVm::boot(image, &fabric, 0, &plan, &dir.join(id))?);
        }
        let specs: Vec<_> =
            vms.iter().map(|v| v.plan.spec(&v.agent_qmp, Some(v.informant_address()))).collect();
        let a_mib = if two { A_MIB_TWO_NODES } else { 8192 };
        // Both nodes name pg-2's files: the source describes the VM it moves
        // by names relative to them, the target finds its files by them.
        let a = agent(A, a_mib, movable_files(&vms));
        let agents = vec![Agent::start(root, dir, &fabric, 0, &allocator.url, &a, &specs)?];
        Ok(Setup { two, root: root.to_owned(), dir: dir.to_owned(), allocator, agents, vms, fabric })
    }

    pub fn two_nodes(&self) -> bool {
        self.two
    }

    /// Starts node b's agent, with no VM of its own: a node with room joins.
    pub fn start_b(&mut self) -> anyhow::Result<()> {
        if self.two && self.agents.len() < 2 {
            let b = Agent::start(
                &self.root,
                &self.dir,
                &self.fabric,
                1,
                &self.allocator.url,
                &agent(B, 2048, movable_files(&self.vms)),
                &[],
            )?;
            self.agents.push(b);
        }
        Ok(())
    }

    pub fn vm(&self, id: &str) -> Option<&PgVm> {
        self.vms.iter().find(|v| v.plan.id == id)
    }

    /// Fails when a daemon stopped, or the QEMU of a VM that is not moving
    /// (a moved VM's first QEMU quits by design).
    pub fn check(&mut self, moving: &[String]) -> anyhow::Result<()> {
        self.allocator.daemon.check()?;
        for a in &mut self.agents {
            a.daemon.check()?;
        }
        for v in self.vms.iter_mut().filter(|v| !moving.contains(&v.plan.id)) {
            if let Some(why) = v.qemu.exited() {
                anyhow::bail!("{} stopped: {why}\n{}", v.plan.id, v.qemu.logs());
            }
        }
        Ok(())
    }

    /// Every agent's VMs: id -> (node, its `/state` entry).
    pub fn agent_vms(&self) -> BTreeMap<String, (String, serde_json::Value)> {
        let mut out = BTreeMap::new();
        for a in &self.agents {
            let s = a.state();
            for (id, v) in s.as_ref().and_then(|s| s["vms"].as_object()).into_iter().flatten() {
                out.insert(id.clone(), (a.name.clone(), v.clone()));
            }
        }
        out
    }

    pub fn allocator_state(&self) -> Option<Cluster> {
        self.allocator.state()
    }

    /// Where to look for logs.
    pub fn logs(&self, dir: &Path) -> String {
        format!(
            "logs in {}: allocator.log, {A}.log{}, pg-1/ and pg-2/ (console.log, qemu.log, pgbench-*)",
            dir.display(),
            if self.two_nodes() { format!(", {B}.log") } else { String::new() }
        )
    }
}

/// The `[migration]` files of the VM that moves (pg-2), for both nodes.
fn movable_files(vms: &[PgVm]) -> crate::migration::NodeFiles {
    vms.iter().find(|v| v.plan.id == PG2).map(PgVm::node_files).unwrap_or_default()
}

/// A demo VM: see the module doc. The informant is reached over TCP on the
/// guest's address: pg-2 must be movable (QEMU refuses to migrate the
/// vhost-user vsock this host would need), and one node's agent plugs one
/// kind of DIMM backend, so pg-1 beside it uses TCP too.
fn plan(id: &str, host: u8) -> PgVmPlan {
    let base = PgVmPlan {
        cpus: 2,
        max_cpus: 2,
        cpu_mode: CpuMode::Sysfs,
        boot_mib: 512,
        cu: Cu { milli_cpu: 250, memory_bytes: 128 * MIB },
        min_cus: 4,
        max_cus: 8,
        link: Link::Tcp,
        ..PgVmPlan::small(id, host, Memory::Dimm)
    };
    if id == PG2 {
        // The VM that moves: one vCPU, fixed at 4 CUs. A 2-vCPU guest moved
        // under TCG here panicked at once on the target ("stack-protector:
        // Kernel stack is corrupted in: net_rx_action"), while 1-vCPU moves
        // (the pg-migrate scenario) land; and a pg-2 that grows under its
        // own pgbench can outgrow pg-1 as the planner looks, which then
        // moves pg-1 instead.
        return PgVmPlan { cpus: 1, max_cpus: 1, max_cus: 4, ..base };
    }
    base
}

/// A node's agent: CPU ample, `mib` of memory; down one CU 2 s apart after
/// 5 s of low use, so that quiet shows within the demo; CPU pressure counted
/// but not acted on, and a CPU goal of a load average of 1 per vCPU, as the
/// pg scenarios have it: under TCG on two host cores an idle guest beside
/// others feels CPU pressure every few seconds and never shrank. The load
/// average still brings pg-1's second vCPU under pgbench.
fn agent(name: &str, mib: u64, files: crate::migration::NodeFiles) -> AgentPlan {
    AgentPlan {
        name: name.into(),
        capacity_milli_cpu: 8000,
        capacity_mib: mib,
        policy: Policy {
            cpu_target: 1.0,
            downscale_after_ms: 5000,
            downscale_step_ms: 2000,
            ignore_pressure: PressureKinds::of(&[PressureKind::PsiCpu]),
            ..Policy::default()
        },
        transfer: vmscale_agent::qmp::migrate::MigrationConfig { timeout_ms: 90_000, ..Default::default() },
        confirm_grace_ms: 5000,
        dimm_backend: DimmBackend::Ram,
        files,
    }
}
