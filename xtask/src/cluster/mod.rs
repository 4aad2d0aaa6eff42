//! A local vmscale cluster of real processes, for the end-to-end tests and
//! the demo: the allocator and the agent (release binaries), real QEMU guests
//! (the image from `build-guest`, the real informant inside), a second QMP
//! monitor per VM to watch it, and the workload's console lines.
//!
//! Every process is a child that is killed when its handle drops, so a
//! failing test or a Ctrl-C'd demo leaves nothing running.

pub mod net;
pub mod qmp;

use anyhow::{bail, Context};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmscale_agent::config::Config as AgentConfig;
use vmscale_agent::core::policy::{Cu, Policy};
use vmscale_agent::vms::{CpuMode, InformantAddr, MemoryMode, VmSpec};
use vmscale_allocator::core::Cluster;
use vmscale_common::tls::Identity;

use crate::guest::qemu;
use crate::guest::Image;
use crate::harness::free_port;
use crate::steps::{cargo, Steps};

pub const MIB: u64 = 1 << 20;
/// The one node's name.
pub const NODE: &str = "local-node";
/// The memory ramp the guest runs (see its header).
pub const RAMP_PL: &str = include_str!("ramp.pl");

/// Builds the release allocator and agent (a no-op when they are fresh).
pub fn build_daemons(steps: &mut Steps) -> anyhow::Result<()> {
    steps.run(
        "build the allocator and the agent (release)",
        cargo().args(["build", "--release", "-p", "vmscale-allocator", "-p", "vmscale-agent"]),
    )
}

/// A child process killed (and reaped) on drop; its stderr goes to a file.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    /// How it was started, to start it again the same way.
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)>,
    /// Whether `child` has been killed and reaped.
    stopped: bool,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Daemon> {
        let f = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", crate::steps::show(cmd)))?;
        Ok(Daemon {
            name: name.to_owned(),
            child,
            log,
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            envs: cmd.get_envs().map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned))).collect(),
            stopped: false,
        })
    }

    /// SIGKILL, as a crash would: no shutdown handler runs. Waits until the
    /// process is gone.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if !self.stopped {
            self.child.kill().with_context(|| format!("killing {}", self.name))?;
            self.child.wait()?;
            self.stopped = true;
        }
        Ok(())
    }

    /// Starts it again as it was started first (same arguments, so the same
    /// ports), killing it first if it still runs. The log is appended to,
    /// after a line saying so.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(f, "==== {} restarted by the test ====", self.name)?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        self.child =
            cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f).spawn().with_context(|| {
                format!("cannot start {} again ({})", self.name, crate::steps::show(&cmd))
            })?;
        self.stopped = false;
        Ok(())
    }

    /// Fails when the process has stopped (other than by [`Daemon::kill`]).
    pub fn check(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        if let Some(st) = self.child.try_wait()? {
            bail!("{} stopped ({st}); its log: {}\n{}", self.name, self.log.display(), tail(&self.log, 30));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `GET path` over HTTP/1.0 on 127.0.0.1:port; the body.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// An agent's executed actions of one kind (all outcomes), from its
/// `/metrics` at `addr`; 0 while it does not answer.
pub fn agent_operations(addr: std::net::SocketAddr, action: &str) -> u64 {
    let Ok(text) = http_get_at(addr, "/metrics") else { return 0 };
    let label = format!("action=\"{action}\"");
    let total = text
        .lines()
        .filter(|l| l.starts_with("vmscale_agent_operations_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a counter's value, whole and >= 0
    let count = total as u64;
    count
}

/// `GET path` over HTTP/1.0 at `addr`; the body.
pub fn http_get_at(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

pub fn http_json(port: u16, path: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&http_get(port, path)?)?)
}

/// The allocator's `/state` (its whole core, typed) from its HTTP port on
/// 127.0.0.1; `None` while it does not answer.
pub fn allocator_state(port: u16) -> Option<Cluster> {
    serde_json::from_str(&http_get(port, "/state").ok()?).ok()
}

/// The release allocator on loopback: gRPC on `grpc` with mutual TLS (the
/// harness CA, `crate::pki`), `/state` on `http` in plain text (loopback
/// only). The daemon and the URL agents dial.
pub fn spawn_local_allocator(
    root: &Path,
    dir: &Path,
    grpc: u16,
    http: u16,
) -> anyhow::Result<(Daemon, String)> {
    let pki = crate::pki::ensure(root, &[Identity::Allocator])?;
    let file = dir.join("allocator.toml");
    let config = vmscale_allocator::config::Config {
        listen: ([127, 0, 0, 1], grpc).into(),
        http_listen: ([127, 0, 0, 1], http).into(),
        tls: Some(pki.files(&Identity::Allocator)),
        order_key: Some(order_key(root)?),
        ..Default::default()
    };
    fs::write(&file, toml::to_string(&config).context("encoding the allocator's config")?)
        .with_context(|| format!("writing {}", file.display()))?;
    let daemon = Daemon::spawn(
        "allocator",
        Command::new(root.join("target/release/vmscale-allocator")).arg("--config").arg(&file),
        dir.join("allocator.log"),
    )?;
    Ok((daemon, format!("https://127.0.0.1:{grpc}")))
}

/// The harness's order key (`target/pki/order.key`), made on first use and
/// kept, so that an allocator the harness restarts adopts the moves it
/// ordered before (allocator/src/core/order_ids.rs).
pub fn order_key(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join(crate::pki::DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("order.key");
    vmscale_allocator::config::ensure_order_key(&path)
        .with_context(|| format!("making {}", path.display()))?;
    Ok(path)
}

/// An agent's config file from its own type, as the daemon reads it.
pub fn write_agent_config(path: &Path, config: &AgentConfig) -> anyhow::Result<()> {
    fs::write(path, toml::to_string(config).context("encoding the agent's config")?)
        .with_context(|| format!("writing {}", path.display()))
}

/// An agent's VM file (`[[vm]]` entries) from the agent's own type.
pub fn write_vms_file(path: &Path, vms: &[VmSpec]) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct VmFile<'a> {
        vm: &'a [VmSpec],
    }
    fs::write(path, toml::to_string(&VmFile { vm: vms }).context("encoding the VM file")?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The allocator and the agent of one node.
#[derive(Debug)]
pub struct Node {
    pub allocator: Daemon,
    pub agent: Daemon,
    pub allocator_http: u16,
    pub agent_http: u16,
}

/// One VM for the agent's `vms.toml` and QEMU.
#[derive(Debug, Clone)]
pub struct VmPlan {
    pub id: String,
    /// CU size: milli-vCPU and MiB.
    pub cu_milli_cpu: u64,
    pub cu_mib: u64,
    pub min_cus: u32,
    pub max_cus: u32,
    pub boot_mib: u64,
    /// DIMMs of `cu_mib` present from boot.
    pub boot_dimms: u32,
    pub cpus: u32,
    pub max_cpus: u32,
    /// `vmscale.workload=` value (commas for spaces), if any.
    pub workload: Option<String>,
}

/// A running VM: QEMU, its ports and sockets.
#[derive(Debug)]
pub struct Vm {
    pub plan: VmPlan,
    pub qemu: qemu::Vm,
    pub informant_port: u16,
    pub agent_qmp: PathBuf,
    pub watch_qmp: PathBuf,
    pub console_log: PathBuf,
}

/// The guest runs its workload in a chroot of the host's root, shared
/// read-only over 9p, with fresh tmpfs on `/tmp`, `/run` and `/dev/shm`
/// (`guest/init.sh`): files the host wrote under those are not there.
fn workload_visible(dir: &Path) -> anyhow::Result<()> {
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    if let Some(hidden) = ["/tmp", "/run", "/dev/shm"].into_iter().find(|h| dir.starts_with(h)) {
        bail!(
            "{} is under {hidden}, which the guest covers with its own tmpfs, so its workload could not \
             find its files; use a checkout outside {hidden}",
            dir.display()
        );
    }
    Ok(())
}

impl Vm {
    pub fn boot(image: &Image, dir: &Path, plan: &VmPlan) -> anyhow::Result<Vm> {
        Vm::boot_with(image, dir, plan, &[])
    }

    /// [`Vm::boot`] with more informant flags (no spaces or commas in them),
    /// e.g. `["--sample-interval-ms", "100"]`.
    pub fn boot_with(
        image: &Image,
        dir: &Path,
        plan: &VmPlan,
        informant_args: &[&str],
    ) -> anyhow::Result<Vm> {
        Vm::boot_with_kernel_args(image, dir, plan, informant_args, &[])
    }

    /// [`Vm::boot_with`] with more kernel command line words after the
    /// image's own (a later word wins), e.g. `memory_hotplug.memmap_on_memory=0`.
    pub fn boot_with_kernel_args(
        image: &Image,
        dir: &Path,
        plan: &VmPlan,
        informant_args: &[&str],
        kernel_args: &[String],
    ) -> anyhow::Result<Vm> {
        let informant_port = free_port()?;
        let agent_qmp = dir.join(format!("{}.qmp", plan.id));
        let watch_qmp = dir.join(format!("{}.watch.qmp", plan.id));
        let console_log = dir.join(format!("{}.console.log", plan.id));
        let _ = fs::remove_file(&agent_qmp);
        let _ = fs::remove_file(&watch_qmp);
        let slots = plan.max_cus.max(1);
        let mut extra_args = vec![
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", agent_qmp.display()),
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", watch_qmp.display()),
        ];
        for i in 0..plan.boot_dimms {
            extra_args.extend([
                "-object".to_owned(),
                format!("memory-backend-ram,id=bootmem{i},size={}M", plan.cu_mib),
                "-device".to_owned(),
                format!("pc-dimm,id=bootdimm{i},memdev=bootmem{i}"),
            ]);
        }
        let mut informant = vec!["--cpu-mode", "sysfs"];
        informant.extend_from_slice(informant_args);
        let mut extra_cmdline = kernel_args.to_vec();
        extra_cmdline.push(format!("vmscale.informant={}", informant.join(",")));
        if let Some(w) = &plan.workload {
            workload_visible(dir)?;
            extra_cmdline.push(format!("vmscale.workload={w}"));
        }
        let spec = qemu::VmSpec {
            accel: vmscale_agent::qmp::qemu_args::Accel::Tcg,
            cpus: plan.cpus,
            max_cpus: plan.max_cpus,
            memory_mib: plan.boot_mib,
            slots,
            max_memory_mib: plan.boot_mib + u64::from(slots) * plan.cu_mib,
            informant_host_port: informant_port,
            share_host_root: true,
            extra_cmdline,
            extra_args,
            serial_log: console_log.clone(),
            echo_console: false,
        };
        let qemu = qemu::boot(image, &spec)?;
        Ok(Vm { plan: plan.clone(), qemu, informant_port, agent_qmp, watch_qmp, console_log })
    }

    /// This VM's `[[vm]]` entry for the agent.
    pub fn agent_spec(&self) -> VmSpec {
        let p = &self.plan;
        VmSpec {
            id: p.id.clone(),
            qmp: self.agent_qmp.display().to_string(),
            informant: Some(InformantAddr::http("127.0.0.1", self.informant_port)),
            cu: Cu { milli_cpu: p.cu_milli_cpu, memory_bytes: p.cu_mib * MIB },
            min_cus: p.min_cus,
            max_cus: p.max_cus,
            cpu_mode: CpuMode::Sysfs,
            memory: MemoryMode::Dimm { dimm_bytes: p.cu_mib * MIB },
            policy: None,
        }
    }

    /// The QEMU process has stopped.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.qemu.exited() {
            bail!(
                "QEMU of {} stopped ({st}); console {}:\n{}",
                self.plan.id,
                self.console_log.display(),
                tail(&self.console_log, 30)
            );
        }
        Ok(())
    }
}

/// What the node is given: capacity and the agent's policy.
#[derive(Debug, Clone)]
pub struct NodePlan {
    pub capacity_milli_cpu: u64,
    pub capacity_mib: u64,
    pub policy: Policy,
}

impl Node {
    /// Starts the allocator, then the agent with `vms` in its VM file; the
    /// agent's session is mutual TLS (the harness CA, `crate::pki`), its
    /// links to the test guests' informants plain text (`insecure`).
    pub fn start(root: &Path, dir: &Path, plan: &NodePlan, vms: &[&Vm]) -> anyhow::Result<Node> {
        let bin = root.join("target/release");
        let grpc = free_port()?;
        let allocator_http = free_port()?;
        let agent_http = free_port()?;
        let (allocator, url) = spawn_local_allocator(root, dir, grpc, allocator_http)?;
        let node = Identity::Node(NODE.into());
        let pki = crate::pki::ensure(root, std::slice::from_ref(&node))?;
        let vms_file = dir.join("vms.toml");
        write_vms_file(&vms_file, &vms.iter().map(|v| v.agent_spec()).collect::<Vec<_>>())?;
        let config = dir.join("agent.toml");
        write_agent_config(
            &config,
            &AgentConfig {
                node: NODE.into(),
                allocator: url,
                tls: Some(pki.files(&node)),
                insecure: true,
                vms_file,
                vms_file_interval_ms: 500,
                http_listen: ([127, 0, 0, 1], agent_http).into(),
                capacity_milli_cpu: plan.capacity_milli_cpu,
                capacity_memory_bytes: plan.capacity_mib * MIB,
                allocator_retry_base_ms: 100,
                allocator_retry_max_ms: 1000,
                policy: plan.policy.clone(),
                ..AgentConfig::default()
            },
        )?;
        let agent = Daemon::spawn(
            "agent",
            Command::new(bin.join("vmscale-agent"))
                .arg("--config")
                .arg(&config)
                // Debug from the VM loop: each guest event with its guest clock stamp.
                .env("RUST_LOG", "info,vmscale_agent::vm_loop=debug")
                .env("NO_COLOR", "1"),
            dir.join("agent.log"),
        )?;
        Ok(Node { allocator, agent, allocator_http, agent_http })
    }

    pub fn check(&mut self) -> anyhow::Result<()> {
        self.allocator.check()?;
        self.agent.check()
    }

    /// The agent's `/state` entry for `vm`.
    pub fn agent_vm(&self, vm: &str) -> Option<serde_json::Value> {
        let s = http_json(self.agent_http, "/state").ok()?;
        s.get("vms")?.get(vm).cloned()
    }

    /// The allocator's reservation for `vm`: (milli-vCPU, bytes).
    pub fn reserved(&self, vm: &str) -> Option<(u64, u64)> {
        let s = allocator_state(self.allocator_http)?;
        let r = s.nodes.get(NODE)?.vms.get(vm)?.reserved;
        Some((r.milli_cpu, r.memory_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_under_the_guests_own_tmpfs_is_refused_with_the_reason() {
        let e = workload_visible(Path::new("/tmp")).unwrap_err().to_string();
        assert!(e.contains("under /tmp") && e.contains("outside /tmp"), "{e}");
        // The workspace itself (outside those, or the e2e tests fail anyway).
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(
            workload_visible(here).is_ok(),
            !["/tmp", "/run", "/dev/shm"].iter().any(|h| here.starts_with(h))
        );
    }

    #[test]
    fn the_agents_config_and_vm_file_read_back_as_written() {
        let dir = std::env::temp_dir().join(format!("xtask-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let config = AgentConfig {
            node: NODE.into(),
            vms_file: dir.join("vms.toml"),
            http_listen: ([127, 0, 0, 1], 20_001).into(),
            tls: Some(vmscale_common::tls::TlsFiles {
                ca: "/pki/ca.pem".into(),
                cert: "/pki/a.pem".into(),
                key: "/pki/a.key".into(),
            }),
            insecure: true,
            policy: Policy {
                memory_target: 0.9,
                polling: Some(Box::new(vmscale_agent::core::polling::Polling::default())),
                ..Policy::default()
            },
            ..AgentConfig::default()
        };
        write_agent_config(&dir.join("agent.toml"), &config).unwrap();
        assert_eq!(AgentConfig::load(&dir.join("agent.toml")).unwrap(), config);
        let vm = VmSpec {
            id: "a".into(),
            qmp: "/tmp/a.qmp".into(),
            informant: Some(InformantAddr::http("127.0.0.1", 20_002)),
            cu: Cu { milli_cpu: 125, memory_bytes: 128 * MIB },
            min_cus: 8,
            max_cus: 16,
            cpu_mode: CpuMode::Sysfs,
            memory: MemoryMode::Dimm { dimm_bytes: 128 * MIB },
            policy: None,
        };
        write_vms_file(&dir.join("vms.toml"), std::slice::from_ref(&vm)).unwrap();
        assert_eq!(vmscale_agent::vms::file::load(&dir.join("vms.toml")).unwrap(), [vm]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_allocators_state_reads_back_with_its_own_figures() {
        use vmscale_allocator::core::ledger::NodeLedger;
        use vmscale_allocator::core::units::{ComputeUnit, Resources};
        use vmscale_allocator::core::vm::{Bounds, VmEntry, VmState};
        let gib = 1 << 30;
        let mut node = NodeLedger::new(Resources::new(4000, 4 * gib), Resources::new(0, gib), 0.9);
        let cu = ComputeUnit::new(Resources::new(125, 128 * MIB)).unwrap();
        let bounds = Bounds::new(Resources::new(125, 128 * MIB), Resources::new(2000, 2 * gib)).unwrap();
        let entry = VmEntry {
            reserved: Resources::new(1000, gib),
            bounds,
            cu,
            unmet: Resources::new(0, 2 * gib),
            state: VmState::Active,
        };
        node.insert("vm".into(), entry);
        let mut cluster = Cluster::new(vmscale_allocator::config::Config::default().core());
        cluster.nodes.insert(NODE.into(), node.clone());
        let back: Cluster = serde_json::from_str(&serde_json::to_string_pretty(&cluster).unwrap()).unwrap();
        let n = &back.nodes[NODE];
        // The sums the planner compares are the allocator's, not recounted here.
        assert_eq!(n.wanted(), node.wanted());
        assert_eq!(n.watermark_level(), node.watermark_level());
        assert!(!n.wanted().fits_in(n.watermark_level()));
        assert_eq!(n.vms["vm"].reserved, Resources::new(1000, gib));
    }
}
