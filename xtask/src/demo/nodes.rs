//! Where the demo runs: one node on loopback, or two nodes as network
//! namespaces with an agent in each, so that a VM can be moved live.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use vmscale_agent::core::policy::Cu;
use vmscale_agent::vms::{CpuMode, InformantAddr, MemoryMode, VmSpec};
use vmscale_allocator::config::Config as AllocatorConfig;
use vmscale_allocator::core::Cluster;

use crate::cluster::{self, net, Node, Vm, VmPlan, MIB};
use crate::migration::{self, GuestVm, Shape, TAP};
use crate::netns::Fabric;

/// Where the demo runs.
pub(super) enum Setup {
    /// One node: allocator and agent on loopback (no namespaces here).
    Single { node: Node, idle: Vm },
    /// Two nodes as network namespaces, an agent in each; the idle VM is a
    /// tap-networked guest on node a that can be moved live.
    TwoNodes {
        allocator: net::Allocator,
        agents: Vec<net::Agent>,
        /// The idle VM's first QEMU; it quits once the VM moved.
        _idle: GuestVm,
        /// The idle VM's echo server, for a client that shows its TCP
        /// connection survives the move.
        echo: SocketAddr,
        /// Dropped last: its namespaces end whatever still runs in them.
        _fabric: Fabric,
    },
}

impl Setup {
    pub(super) fn check(&mut self) -> anyhow::Result<()> {
        match self {
            Setup::Single { node, idle } => {
                node.check()?;
                idle.check()
            }
            Setup::TwoNodes { allocator, agents, .. } => {
                allocator.daemon.check()?;
                agents.iter_mut().try_for_each(|a| a.daemon.check())
            }
        }
    }

    /// Every agent's VMs: id -> (node, its `/state` entry).
    pub(super) fn vms(&self) -> BTreeMap<String, (String, serde_json::Value)> {
        let mut out = BTreeMap::new();
        let mut add = |node: &str, s: Option<serde_json::Value>| {
            for (id, v) in s.as_ref().and_then(|s| s["vms"].as_object()).into_iter().flatten() {
                out.insert(id.clone(), (node.to_owned(), v.clone()));
            }
        };
        match self {
            Setup::Single { node, .. } => {
                add(cluster::NODE, cluster::http_json(node.agent_http, "/state").ok())
            }
            Setup::TwoNodes { agents, .. } => agents.iter().for_each(|a| add(&a.name, a.state())),
        }
        out
    }

    pub(super) fn allocator_state(&self) -> Option<Cluster> {
        match self {
            Setup::Single { node, .. } => cluster::allocator_state(node.allocator_http),
            Setup::TwoNodes { allocator, .. } => allocator.state(),
        }
    }
}

/// A VM plan of the demo: CUs of 1/8 vCPU and 128 MiB, 1 GiB from boot.
pub(super) fn plan(id: &str, max_cus: u32, workload: Option<String>) -> VmPlan {
    VmPlan {
        id: id.into(),
        cu_milli_cpu: 125,
        cu_mib: 128,
        min_cus: 8,
        max_cus,
        boot_mib: 1024,
        boot_dimms: 0,
        cpus: 2,
        max_cpus: 2,
        workload,
    }
}

/// Node names in the two-node setup.
pub(super) const A: &str = "node-a";
pub(super) const B: &str = "node-b";

/// The allocator, node a (the busy VM, and the idle VM on a tap) and node b.
/// Node a holds both VMs (2 GiB) under its watermark (90% of 2304 MiB);
/// the busy VM's first step up passes it, and the allocator moves the idle
/// VM to node b, which has room for it (90% of 1152 MiB) and not for the
/// busy one (which could not move anyway: its 9p share of the host's root
/// blocks migration).
pub(super) fn two_nodes(
    root: &Path,
    dir: &Path,
    image: &crate::guest::Image,
    busy: &Vm,
) -> anyhow::Result<Setup> {
    let fabric = Fabric::new(2)?;
    fabric.add_tap(0, TAP)?;
    fabric.add_tap(1, TAP)?;
    let config = AllocatorConfig { watermark: 0.9, plan_interval_ms: 1000, ..Default::default() };
    let allocator = net::Allocator::start(root, dir, &fabric, config)?;
    let shape = Shape {
        cpus: 2,
        max_cpus: 2,
        virtio_mem_mib: 0,
        extra_cmdline: vec!["vmscale.informant=--cpu-mode,sysfs".into()],
        ..Shape::new(1024)
    };
    let idle_dir = dir.join("idle");
    let qmp = idle_dir.join("agent.qmp");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let idle =
        migration::start(&fabric, 0, &shape.base_args(image, &fabric), &["-qmp".into(), qmp_arg], &idle_dir)?;
    // The busy VM's informant is forwarded on the host's loopback only;
    // node a's agent reaches it through the fabric's host address.
    let forward = SocketAddr::from((fabric.gateway(), crate::harness::free_port_on(fabric.gateway())?));
    net::forward(forward, SocketAddr::from(([127, 0, 0, 1], busy.informant_port)))?;
    let busy_spec = VmSpec {
        informant: Some(InformantAddr::http(forward.ip().to_string(), forward.port())),
        ..busy.agent_spec()
    };
    let idle_plan = plan("idle", 12, None);
    let idle_spec = VmSpec {
        id: "idle".into(),
        qmp: qmp.display().to_string(),
        informant: Some(InformantAddr::http(
            migration::guest_ip(&fabric).to_string(),
            crate::guest::INFORMANT_PORT,
        )),
        cu: Cu { milli_cpu: idle_plan.cu_milli_cpu, memory_bytes: idle_plan.cu_mib * MIB },
        min_cus: idle_plan.min_cus,
        max_cus: idle_plan.max_cus,
        cpu_mode: CpuMode::Sysfs,
        memory: MemoryMode::Dimm { dimm_bytes: idle_plan.cu_mib * MIB },
        policy: None,
    };
    let agent = |name: &str, cpu: u64, mib: u64| net::AgentPlan {
        name: name.into(),
        capacity_milli_cpu: cpu,
        capacity_mib: mib,
        policy: Default::default(),
        transfer: Default::default(),
        confirm_grace_ms: 10_000,
    };
    let a = net::Agent::start(
        root,
        dir,
        &fabric,
        0,
        &allocator.url,
        &agent(A, 8000, 2304),
        &[busy_spec, idle_spec],
    )?;
    let b = net::Agent::start(root, dir, &fabric, 1, &allocator.url, &agent(B, 4000, 1152), &[])?;
    eprintln!(
        "    allocator: http://127.0.0.1:{}/state, agents: http://{}/state, http://{}/state; Ctrl-C stops the demo",
        allocator.http, a.http, b.http
    );
    let echo = SocketAddr::from((migration::guest_ip(&fabric), migration::ECHO_PORT));
    Ok(Setup::TwoNodes { allocator, agents: vec![a, b], _idle: idle, echo, _fabric: fabric })
}
