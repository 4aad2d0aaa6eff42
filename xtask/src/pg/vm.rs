//! One Postgres guest: the Debian image booted under QEMU in a node's
//! network namespace, with its own copy-on-write disk, a tap on the
//! fabric and a static address from the kernel command line.

use anyhow::{bail, Context};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmscale_agent::core::policy::Cu;
use vmscale_agent::qmp::qemu_args::VHOST_VSOCK_DEV;
use vmscale_agent::qmp::qemu_args::{
    Accel, DirectBoot, Disk, DiskFormat, Network, QemuArgs, VirtioMem, Vsock,
};
use vmscale_agent::qmp::DimmBackend;
use vmscale_agent::vms::{CpuMode, InformantAddr, MemoryMode, VmSpec};

use super::probe::Conn;
use crate::cluster::MIB;
use crate::migration::GuestVm;
use crate::netns::Fabric;

/// A DIMM: one 128 MiB memory block, so its memory map fits inside it
/// (`memory_hotplug.memmap_on_memory`, see BENCHMARKS.md).
pub const DIMM_MIB: u64 = 128;

/// Where the informant listens in a guest reached over TCP ([`Link::Tcp`]).
pub const INFORMANT_TCP_PORT: u16 = 7080;

/// The informant's vsock port in the shipped config (deploy/informant.toml).
pub const INFORMANT_VSOCK_PORT: u32 = 7072;

/// How the agent reaches the guest's informant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// vsock, as shipped: the kernel's vhost-vsock where the host has it,
    /// else a vhost-user backend (`xtask/src/vsock.rs`), which QEMU refuses
    /// to migrate.
    Vsock { cid: u32 },
    /// TCP on the guest's address: the informant is told to listen there
    /// (`vmscale.informant=--listen,...` on the kernel command line). For a
    /// guest that moves on a host without vhost-vsock.
    Tcp,
}

/// How memory grows: DIMMs of [`DIMM_MIB`] or one virtio-mem device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    Dimm,
    VirtioMem { region_mib: u64 },
}

/// One guest's shape, its scaling bounds and its place on the network.
#[derive(Debug, Clone)]
pub struct PgVmPlan {
    pub id: String,
    /// The last byte of its address on the fabric (the same on any node).
    pub host: u8,
    /// vCPUs present from boot (sysfs CPU mode: all of them, the informant
    /// takes them on- and offline) and at most.
    pub cpus: u32,
    pub max_cpus: u32,
    pub cpu_mode: CpuMode,
    pub boot_mib: u64,
    pub memory: Memory,
    pub cu: Cu,
    pub min_cus: u32,
    pub max_cus: u32,
    pub link: Link,
    /// More informant flags (`vmscale.informant=` on the kernel command
    /// line, which the image's unit drop-in passes on).
    pub informant_args: Vec<String>,
}

impl PgVmPlan {
    /// A guest booted with 512 MiB and 2 vCPUs (sysfs mode: all present,
    /// the informant takes them on- and offline), in CUs of a quarter vCPU
    /// and 128 MiB: 4 CUs (1 vCPU, the 512 MiB of boot memory nothing can
    /// unplug) to 8 (2 vCPUs, 1 GiB). CUs are CPU and memory together, so
    /// the second vCPU comes with four DIMMs and goes with them.
    ///
    /// At most four DIMMs on purpose: a vhost-user device (the vsock
    /// backend here) maps every RAM region of the guest, and the backend
    /// takes only a few (QEMU refused the eighth DIMM of a 1 GiB guest with
    /// "a used vhost backend has no free memory slots left"). Where more
    /// memory must come and go, use virtio-mem: one region, however large.
    pub fn small(id: &str, host: u8, memory: Memory) -> PgVmPlan {
        PgVmPlan {
            id: id.into(),
            host,
            cpus: 2,
            max_cpus: 2,
            cpu_mode: CpuMode::Sysfs,
            boot_mib: 512,
            memory,
            cu: Cu { milli_cpu: 250, memory_bytes: 128 * MIB },
            min_cus: 4,
            max_cus: 8,
            link: Link::Vsock { cid: u32::from(host) + 3 },
            // Under TCG on a busy host the idle guest feels CPU pressure
            // every 20-30 s (its vCPU threads wait for the host), and the
            // shipped 60 s cooldown after pressure then denies every
            // downscale: 10 s still denies those during and right after load.
            informant_args: vec!["--pressure-cooldown-ms".into(), "10000".into()],
        }
    }

    /// The most memory the VM may reach, MiB.
    pub fn max_mib(&self) -> u64 {
        self.cu.memory_bytes / MIB * u64::from(self.max_cus)
    }

    /// DIMM slots: enough to reach `max_mib` in DIMMs.
    fn slots(&self) -> u32 {
        u32::try_from(self.max_mib().saturating_sub(self.boot_mib).div_ceil(DIMM_MIB))
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// The tap's name on every node (at most 15 characters).
    pub fn tap(&self) -> String {
        format!("pg{}", self.host)
    }

    /// Its MAC: the same on every node, as a migration target's command
    /// line must match the source's.
    fn mac(&self) -> [u8; 6] {
        [0x52, 0x54, 0x00, 0x70, 0x67, self.host]
    }

    /// QEMU's arguments without QMP and console: the same on any node.
    pub fn base_args(
        &self,
        image: &crate::debian::DebianImage,
        fabric: &Fabric,
        disk: &Path,
        vsock: Option<Vsock>,
    ) -> Vec<String> {
        let mut cmdline = format!(
            "{} vmscale.ip={}/24 vmscale.gw={}",
            image.cmdline,
            fabric.addr(self.host),
            fabric.gateway()
        );
        let mut informant = self.informant_args.clone();
        if self.link == Link::Tcp {
            // A test guest: plain text on the harness's network.
            informant.extend([
                "--listen".to_owned(),
                format!("tcp:0.0.0.0:{INFORMANT_TCP_PORT}"),
                "--insecure".to_owned(),
            ]);
        }
        if !informant.is_empty() {
            cmdline.push_str(&format!(" vmscale.informant={}", informant.join(",")));
        }
        let mut q = QemuArgs::new(Accel::Tcg, self.cpus, self.max_cpus, self.boot_mib);
        q.dimm_slots = self.slots();
        q.max_memory_mib = match self.memory {
            Memory::Dimm => self.boot_mib + u64::from(q.dimm_slots) * DIMM_MIB,
            Memory::VirtioMem { region_mib } => self.boot_mib + region_mib + DIMM_MIB,
        };
        q.virtio_mem = match self.memory {
            Memory::Dimm => None,
            Memory::VirtioMem { region_mib } => Some(VirtioMem {
                size_mib: region_mib,
                memfd: vsock.as_ref().is_some_and(Vsock::shares_memory),
            }),
        };
        q.vsock = vsock;
        q.boot = Some(DirectBoot { kernel: image.kernel.clone(), initrd: image.initrd.clone(), cmdline });
        q.network = Some(Network::Tap { ifname: self.tap(), mac: Some(self.mac()) });
        q.no_reboot = true;
        q.disk = Some(Disk { path: disk.to_owned(), format: DiskFormat::Qcow2 });
        q.to_args()
    }

    /// The VM as an agent's VM list has it.
    pub fn spec(&self, qmp: &Path, informant: Option<InformantAddr>) -> VmSpec {
        VmSpec {
            id: self.id.clone(),
            qmp: qmp.display().to_string(),
            informant,
            cu: self.cu,
            min_cus: self.min_cus,
            max_cus: self.max_cus,
            cpu_mode: self.cpu_mode,
            memory: match self.memory {
                Memory::Dimm => MemoryMode::Dimm { dimm_bytes: DIMM_MIB * MIB },
                Memory::VirtioMem { .. } => MemoryMode::VirtioMem { device: "vm0".into() },
            },
            policy: None,
        }
    }
}

/// A booted guest.
#[derive(Debug)]
pub struct PgVm {
    pub plan: PgVmPlan,
    pub qemu: GuestVm,
    pub ip: Ipv4Addr,
    /// The agent's QMP socket (QEMU's first monitor); the harness watches
    /// through `qemu.qmp()`.
    pub agent_qmp: PathBuf,
    pub conn: Conn,
    /// The vsock device's host side, when it has one.
    pub vsock: Option<Vsock>,
    /// The vhost-user backend, where the host has no vhost-vsock.
    pub backend: Option<crate::vsock::Backend>,
}

impl PgVm {
    /// Boots `plan` on `node` with a fresh overlay disk in `dir`; returns at
    /// once (the guest boots on). [`PgVm::wait_ready`] waits for it.
    pub fn boot(
        image: &crate::debian::DebianImage,
        fabric: &Fabric,
        node: usize,
        plan: &PgVmPlan,
        dir: &Path,
    ) -> anyhow::Result<PgVm> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let disk = dir.join("disk.qcow2");
        crate::debian::overlay(image, &disk)?;
        for n in 0..fabric.nodes.len() {
            fabric.add_tap(n, &plan.tap())?;
        }
        let (vsock, backend) = match plan.link {
            Link::Tcp => (None, None),
            Link::Vsock { cid } => {
                let backend = if std::path::Path::new(VHOST_VSOCK_DEV).exists() {
                    None
                } else {
                    let bin = crate::vsock::ensure_installed()?;
                    Some(crate::vsock::Backend::start(&bin, cid, dir, "vsock")?)
                };
                let socket = backend.as_ref().map(|b| b.socket.clone()).unwrap_or_default();
                (Some(Vsock::for_this_host(cid, socket)), backend)
            }
        };
        let base = plan.base_args(image, fabric, &disk, vsock.clone());
        let agent_qmp = dir.join("agent.qmp");
        let extra = ["-qmp".to_owned(), format!("unix:{},server=on,wait=off", agent_qmp.display())];
        let qemu = crate::migration::start(fabric, node, &base, &extra, dir)?;
        let ip = fabric.addr(plan.host);
        let conn = Conn::new(ip);
        Ok(PgVm { plan: plan.clone(), qemu, ip, agent_qmp, conn, vsock, backend })
    }

    /// Waits for the guest's ready line and a first query; the line.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let line = crate::harness::wait_for(
            &format!("{} to boot to its ready line", self.plan.id),
            timeout,
            || {
                if let Some(why) = self.qemu.exited() {
                    bail!("{why}: {}", self.qemu.logs());
                }
                Ok(self
                    .qemu
                    .console()
                    .lines()
                    .find(|l| l.contains(crate::debian::READY_PREFIX))
                    .map(str::to_owned))
            },
        )?;
        if !line.contains("postgres=active") || !line.contains("informant=active") {
            bail!("{} is up but not every unit is active: {line}\n{}", self.plan.id, self.qemu.logs());
        }
        crate::harness::wait_for(
            &format!("Postgres in {} to answer", self.plan.id),
            Duration::from_secs(60),
            || Ok(self.conn.query("SELECT 1", Duration::from_secs(10)).ok().filter(|r| r == "1")),
        )?;
        Ok(line)
    }

    /// The address the agent dials for the guest's informant.
    pub fn informant_address(&self) -> InformantAddr {
        match (&self.vsock, &self.backend) {
            (Some(_), Some(b)) => {
                InformantAddr::VsockUnix { path: b.uds.clone(), port: INFORMANT_VSOCK_PORT }
            }
            (Some(Vsock::Kernel { guest_cid }), None) => {
                InformantAddr::Vsock { cid: *guest_cid, port: INFORMANT_VSOCK_PORT }
            }
            _ => InformantAddr::Http { host: self.ip.to_string(), port: INFORMANT_TCP_PORT },
        }
    }

    /// What a node's agent needs to take this VM in: the Debian image's
    /// kernel and initrd, its disk and vsock socket in its directory, its
    /// tap (`pg<host>`).
    pub fn node_files(&self) -> crate::migration::NodeFiles {
        crate::migration::NodeFiles {
            image_dir: Some(crate::workspace_root().join(crate::debian::IMAGE_DIR)),
            disk_dir: Some(self.qemu.dir.clone()),
            vsock_dir: Some(self.qemu.dir.clone()),
            tap_prefix: Some("pg".into()),
        }
    }

    /// The agents' DIMM backend this guest needs.
    pub fn dimm_backend(&self) -> DimmBackend {
        if self.vsock.as_ref().is_some_and(Vsock::shares_memory) {
            DimmBackend::Memfd
        } else {
            DimmBackend::Ram
        }
    }

    /// OOM kills the guest's console shows (the kernel's own lines).
    pub fn console_oom_kills(&self) -> usize {
        self.qemu.console().lines().filter(|l| l.contains("Out of memory: Killed process")).count()
    }
}
