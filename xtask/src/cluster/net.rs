//! A cluster spread over "nodes" that are network namespaces of one
//! [`Fabric`]: the allocator in the host's namespace on the fabric's host
//! address, one agent per node inside its namespace (`ip netns exec`) with
//! `[migration] listen` on the node's address, so that the agents move VMs
//! between each other over the flat network as they would between hosts.
//!
//! What this does not simulate: separate kernels. Every "node" shares this
//! host's CPUs, memory and QEMU binary; only the network is separate.

use anyhow::{bail, Context};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmscale_agent::config::Config as AgentConfig;
use vmscale_agent::core::policy::Policy;
use vmscale_agent::migration::settings::MigrationSettings;
use vmscale_agent::qmp::migrate::MigrationConfig;
use vmscale_agent::qmp::DimmBackend;
use vmscale_agent::vms::VmSpec;
use vmscale_allocator::config::Config as AllocatorConfig;
use vmscale_allocator::core::Cluster;
use vmscale_common::tls::Identity;

use super::{write_agent_config, write_vms_file, Daemon, MIB};
use crate::harness::{free_port, free_port_on};
use crate::netns::Fabric;

/// The allocator in the host's namespace, gRPC on the fabric's host address,
/// mutual TLS with the harness CA (`crate::pki`).
#[derive(Debug)]
pub struct Allocator {
    pub daemon: Daemon,
    /// What agents dial: `https://<host address>:<port>`.
    pub url: String,
    /// `/state` and `/metrics`, on 127.0.0.1.
    pub http: u16,
}

impl Allocator {
    /// `config` is the allocator's config (watermark, plan interval...);
    /// its addresses are this run's.
    pub fn start(
        root: &Path,
        dir: &Path,
        fabric: &Fabric,
        config: AllocatorConfig,
    ) -> anyhow::Result<Allocator> {
        let host = fabric.gateway();
        let grpc = free_port_on(host)?;
        let http = free_port()?;
        let pki = crate::pki::ensure(root, &[Identity::Allocator])?;
        let config = AllocatorConfig {
            listen: (host, grpc).into(),
            http_listen: ([127, 0, 0, 1], http).into(),
            tls: Some(pki.files(&Identity::Allocator)),
            order_key: Some(super::order_key(root)?),
            ..config
        };
        let file = dir.join("allocator.toml");
        fs::write(&file, toml::to_string(&config).context("encoding the allocator's config")?)?;
        let daemon = Daemon::spawn(
            "allocator",
            Command::new(root.join("target/release/vmscale-allocator"))
                .arg("--config")
                .arg(&file)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
            dir.join("allocator.log"),
        )?;
        Ok(Allocator { daemon, url: format!("https://{host}:{grpc}"), http })
    }

    pub fn state(&self) -> Option<Cluster> {
        super::allocator_state(self.http)
    }
}

/// One node's agent and what it was given.
#[derive(Debug, Clone)]
pub struct AgentPlan {
    /// The node's name at the allocator.
    pub name: String,
    pub capacity_milli_cpu: u64,
    pub capacity_mib: u64,
    pub policy: Policy,
    /// `[migration.transfer]`: bandwidth, timeout...
    pub transfer: MigrationConfig,
    /// `confirm_grace_ms` of `[migration]`.
    pub confirm_grace_ms: u64,
    /// The plugged DIMMs' backend: `Memfd` where a VM has a vhost-user
    /// device (vsock here), which must map all guest memory.
    pub dimm_backend: DimmBackend,
    /// Where the files of a VM moving here are (`[migration]` directories).
    pub files: crate::migration::NodeFiles,
}

/// An agent running in a node's namespace: its session with the allocator
/// is mutual TLS as its node (the harness CA); its links to the test
/// guests' informants are plain text (`insecure`).
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    pub daemon: Daemon,
    /// `/state`, on the node's address.
    pub http: SocketAddr,
    /// Incoming QEMUs' directories, adopted VM records.
    pub state_dir: PathBuf,
}

impl Agent {
    /// Starts the agent of `node` with `vms` in its VM file; it takes VMs
    /// in on the node's address.
    pub fn start(
        root: &Path,
        dir: &Path,
        fabric: &Fabric,
        node: usize,
        allocator: &str,
        plan: &AgentPlan,
        vms: &[VmSpec],
    ) -> anyhow::Result<Agent> {
        let addr = fabric.nodes[node].addr;
        let name = &plan.name;
        // The ports are picked in the host's namespace but bound in the
        // node's, which has its own port space: only the fabric's subnet
        // must not collide, and it is this run's.
        let http = SocketAddr::from((addr, 7072));
        let listen = SocketAddr::from((addr, 7073));
        let state_dir = dir.join(format!("{name}-state"));
        fs::create_dir_all(&state_dir)?;
        let vms_file = dir.join(format!("{name}-vms.toml"));
        write_vms_file(&vms_file, vms)?;
        let config = dir.join(format!("{name}.toml"));
        let pki = crate::pki::ensure(root, &[Identity::Node(name.clone())])?;
        let mut agent = AgentConfig {
            node: name.clone(),
            allocator: allocator.into(),
            tls: Some(pki.files(&Identity::Node(name.clone()))),
            insecure: true,
            vms_file,
            vms_file_interval_ms: 500,
            http_listen: http,
            capacity_milli_cpu: plan.capacity_milli_cpu,
            capacity_memory_bytes: plan.capacity_mib * MIB,
            allocator_retry_base_ms: 100,
            allocator_retry_max_ms: 1000,
            policy: plan.policy.clone(),
            dimm_backend: plan.dimm_backend,
            migration: plan.files.settings(MigrationSettings {
                listen: Some(listen),
                qemu: "qemu-system-x86_64".into(),
                state_dir: state_dir.clone(),
                confirm_grace_ms: plan.confirm_grace_ms,
                transfer: plan.transfer.clone(),
                ..MigrationSettings::default()
            }),
            ..AgentConfig::default()
        };
        agent.contention.enabled = false;
        write_agent_config(&config, &agent)?;
        let mut cmd =
            fabric.command_in(node, &root.join("target/release/vmscale-agent").display().to_string());
        cmd.arg("--config").arg(&config).env("RUST_LOG", "info").env("NO_COLOR", "1");
        let daemon = Daemon::spawn(&format!("agent {name}"), &mut cmd, dir.join(format!("{name}.log")))?;
        Ok(Agent { name: name.clone(), daemon, http, state_dir })
    }

    pub fn state(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&super::http_get_at(self.http, "/state").ok()?).ok()
    }

    /// The agent's `/state` entry for `vm`.
    pub fn vm(&self, vm: &str) -> Option<serde_json::Value> {
        self.state()?.get("vms")?.get(vm).cloned()
    }
}

/// The QEMU processes whose command line names `dir`: whatever this run
/// started there, agents' incoming QEMUs included (they run in a process
/// group of their own and outlive their agent, so no handle of ours ends
/// them).
pub fn qemus_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let exe = fs::read_link(e.path().join("exe")).unwrap_or_default();
        if !exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu")) {
            continue;
        }
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

/// Kills (SIGKILL) every QEMU under `dir`; how many there were.
pub fn kill_qemus_under(dir: &Path) -> usize {
    let pids = qemus_under(dir);
    for pid in &pids {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    pids.len()
}

/// The named network namespace `pid` runs in (`ip netns identify`); empty
/// for the host's.
pub fn netns_of(pid: u32) -> anyhow::Result<String> {
    let out = Command::new("ip").args(["netns", "identify", &pid.to_string()]).output()?;
    if !out.status.success() {
        bail!("ip netns identify {pid}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The process's command line, arguments split.
pub fn cmdline(pid: u32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}
