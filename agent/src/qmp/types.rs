//! Serde types for the query replies the agent reads, and QEMU's migration
//! and run states as enums (no status string leaves this module). Field names follow
//! QEMU's QAPI schema (7.2); fields we do not use are left out, so newer
//! QEMUs that add fields still parse.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A vCPU slot's topology (`socket-id`, `core-id`, `thread-id`, and where the
/// machine has them `die-id`, `node-id`, ...). Kept as a map so that
/// `device_add` can pass back whatever the machine asks for.
pub type CpuProps = BTreeMap<String, i64>;

/// One entry of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct HotpluggableCpu {
    /// The device type to `device_add` into this slot, e.g. `qemu64-x86_64-cpu`.
    #[serde(rename = "type")]
    pub driver: String,
    #[serde(rename = "vcpus-count")]
    pub vcpus_count: u32,
    pub props: CpuProps,
    /// Set when the slot holds a vCPU. Boot vCPUs live under
    /// `/machine/unattached`, `device_add`ed ones under `/machine/peripheral`.
    #[serde(rename = "qom-path", default, skip_serializing_if = "Option::is_none")]
    pub qom_path: Option<String>,
}

impl HotpluggableCpu {
    pub fn is_plugged(&self) -> bool {
        self.qom_path.is_some()
    }

    /// Whether the vCPU in this slot came from `device_add` or `-device`, the
    /// only ones QEMU can unplug.
    pub fn is_removable(&self) -> bool {
        self.qom_path.as_deref().is_some_and(|p| p.starts_with("/machine/peripheral/"))
    }
}

/// One entry of `query-cpus-fast`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VcpuThread {
    #[serde(rename = "cpu-index")]
    pub cpu_index: u32,
    /// The host thread running this vCPU, for the host-side eBPF.
    #[serde(rename = "thread-id")]
    pub thread_id: i64,
    #[serde(rename = "qom-path")]
    pub qom_path: String,
    #[serde(default)]
    pub props: CpuProps,
}

/// `query-memory-size-summary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct MemorySizeSummary {
    /// Boot memory (`-m`).
    #[serde(rename = "base-memory")]
    pub base_memory: u64,
    /// Memory in DIMMs plus what virtio-mem devices have plugged. Absent when
    /// the machine has no hotplug memory region.
    #[serde(rename = "plugged-memory", default)]
    pub plugged_memory: Option<u64>,
}

/// One entry of `query-memory-devices`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "RawMemoryDevice", tag = "type", content = "data", rename_all = "kebab-case")]
pub enum MemoryDevice {
    Dimm(DimmInfo),
    VirtioMem(VirtioMemInfo),
    /// nvdimm, virtio-pmem, sgx-epc, ...: counted by nobody here.
    Other,
}

/// The union as QEMU sends it; serde's `other` cannot skip content, so
/// unknown types are mapped by hand.
#[derive(Deserialize)]
struct RawMemoryDevice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: serde_json::Value,
}

impl TryFrom<RawMemoryDevice> for MemoryDevice {
    type Error = serde_json::Error;

    fn try_from(raw: RawMemoryDevice) -> Result<Self, Self::Error> {
        Ok(match raw.kind.as_str() {
            "dimm" => MemoryDevice::Dimm(serde_json::from_value(raw.data)?),
            "virtio-mem" => MemoryDevice::VirtioMem(serde_json::from_value(raw.data)?),
            _ => MemoryDevice::Other,
        })
    }
}

/// A pc-dimm as `query-memory-devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DimmInfo {
    /// Absent for a DIMM added without an id.
    #[serde(default)]
    pub id: Option<String>,
    pub size: u64,
    pub slot: u32,
    pub node: u32,
    /// QOM path of the backend, e.g. `/objects/vmscale-dimm0-mem`.
    pub memdev: String,
    pub hotplugged: bool,
    pub hotpluggable: bool,
}

/// A virtio-mem device as `query-memory-devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VirtioMemInfo {
    #[serde(default)]
    pub id: Option<String>,
    /// What the guest driver has plugged so far. Without a driver (no guest
    /// OS yet) it stays where it was, whatever is requested.
    pub size: u64,
    #[serde(rename = "requested-size")]
    pub requested_size: u64,
    #[serde(rename = "max-size")]
    pub max_size: u64,
    #[serde(rename = "block-size")]
    pub block_size: u64,
    pub node: u32,
    pub memdev: String,
}

/// One entry of `query-memdev`: a memory backend object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Memdev {
    /// Absent on QEMUs before 2.11 and for backends without an id.
    #[serde(default)]
    pub id: Option<String>,
    pub size: u64,
    #[serde(default)]
    pub share: bool,
}

/// `qom-get /machine memory`: the `-m size,slots,maxmem` the VM started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct MachineMemory {
    pub size: u64,
    #[serde(default)]
    pub slots: u32,
    #[serde(rename = "max-size", default)]
    pub max_size: u64,
}

/// `qom-get /machine smp`: the `-smp` topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct MachineSmp {
    pub cpus: u32,
    pub maxcpus: u32,
}

/// QEMU's `MigrationStatus`: `query-migrate`'s `status` and the `MIGRATION`
/// event's. A status a newer QEMU adds is kept as [`MigrationStatus::Other`]
/// rather than refused, so a reply still parses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(from = "String", into = "String")]
pub enum MigrationStatus {
    /// No migration yet (also what an empty `query-migrate` reply means).
    #[default]
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    Other(String),
}

impl MigrationStatus {
    pub fn as_str(&self) -> &str {
        use MigrationStatus::*;
        match self {
            None => "none",
            Setup => "setup",
            Cancelling => "cancelling",
            Cancelled => "cancelled",
            Active => "active",
            PostcopyActive => "postcopy-active",
            PostcopyPaused => "postcopy-paused",
            PostcopyRecoverSetup => "postcopy-recover-setup",
            PostcopyRecover => "postcopy-recover",
            Completed => "completed",
            Failed => "failed",
            Colo => "colo",
            PreSwitchover => "pre-switchover",
            Device => "device",
            WaitUnplug => "wait-unplug",
            Other(s) => s,
        }
    }
}

impl From<String> for MigrationStatus {
    fn from(s: String) -> Self {
        use MigrationStatus::*;
        match s.as_str() {
            "none" => None,
            "setup" => Setup,
            "cancelling" => Cancelling,
            "cancelled" => Cancelled,
            "active" => Active,
            "postcopy-active" => PostcopyActive,
            "postcopy-paused" => PostcopyPaused,
            "postcopy-recover-setup" => PostcopyRecoverSetup,
            "postcopy-recover" => PostcopyRecover,
            "completed" => Completed,
            "failed" => Failed,
            "colo" => Colo,
            "pre-switchover" => PreSwitchover,
            "device" => Device,
            "wait-unplug" => WaitUnplug,
            _ => Other(s),
        }
    }
}

impl From<MigrationStatus> for String {
    fn from(s: MigrationStatus) -> Self {
        match s {
            MigrationStatus::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU's `RunState`: `query-status`'s `status`. One a newer QEMU adds is
/// kept as [`RunState::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(from = "String", into = "String")]
pub enum RunState {
    Debug,
    /// Started with `-incoming`, waiting for or loading the stream.
    InMigrate,
    InternalError,
    IoError,
    Paused,
    /// A migration source after the switch-over: paused with the guest's
    /// final state.
    PostMigrate,
    /// Started with `-S` and never run.
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    Other(String),
}

impl RunState {
    pub fn as_str(&self) -> &str {
        use RunState::*;
        match self {
            Debug => "debug",
            InMigrate => "inmigrate",
            InternalError => "internal-error",
            IoError => "io-error",
            Paused => "paused",
            PostMigrate => "postmigrate",
            Prelaunch => "prelaunch",
            FinishMigrate => "finish-migrate",
            RestoreVm => "restore-vm",
            Running => "running",
            SaveVm => "save-vm",
            Shutdown => "shutdown",
            Suspended => "suspended",
            Watchdog => "watchdog",
            GuestPanicked => "guest-panicked",
            Colo => "colo",
            Other(s) => s,
        }
    }
}

impl From<String> for RunState {
    fn from(s: String) -> Self {
        use RunState::*;
        match s.as_str() {
            "debug" => Debug,
            "inmigrate" => InMigrate,
            "internal-error" => InternalError,
            "io-error" => IoError,
            "paused" => Paused,
            "postmigrate" => PostMigrate,
            "prelaunch" => Prelaunch,
            "finish-migrate" => FinishMigrate,
            "restore-vm" => RestoreVm,
            "running" => Running,
            "save-vm" => SaveVm,
            "shutdown" => Shutdown,
            "suspended" => Suspended,
            "watchdog" => Watchdog,
            "guest-panicked" => GuestPanicked,
            "colo" => Colo,
            _ => Other(s),
        }
    }
}

impl From<RunState> for String {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Strips `/objects/` from a backend's QOM path, giving the id that
/// `object-del` takes.
pub fn backend_id(memdev_path: &str) -> &str {
    memdev_path.strip_prefix("/objects/").unwrap_or(memdev_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOTPLUGGABLE_CPUS: &str = include_str!("testdata/query-hotpluggable-cpus.json");
    const MEMORY_DEVICES: &str = include_str!("testdata/query-memory-devices.json");
    const MEMDEV: &str = include_str!("testdata/query-memdev.json");
    const CPUS_FAST: &str = include_str!("testdata/query-cpus-fast.json");

    #[test]
    fn hotpluggable_cpus_from_qemu_7_2() {
        let cpus: Vec<HotpluggableCpu> = serde_json::from_str(HOTPLUGGABLE_CPUS).expect("parses");
        assert_eq!(cpus.len(), 8);
        assert_eq!(cpus.iter().filter(|c| c.is_plugged()).count(), 2);
        let boot = cpus.iter().find(|c| c.props["core-id"] == 0).expect("boot");
        assert!(boot.is_plugged() && !boot.is_removable());
        let added = cpus.iter().find(|c| c.props["core-id"] == 1).expect("added");
        assert!(added.is_removable());
        assert_eq!(added.driver, "qemu64-x86_64-cpu");
        assert_eq!(added.props["node-id"], 0);
    }

    #[test]
    fn memory_devices_from_qemu_7_2() {
        let devices: Vec<MemoryDevice> = serde_json::from_str(MEMORY_DEVICES).expect("parses");
        let [MemoryDevice::VirtioMem(vm), MemoryDevice::Dimm(dimm)] = devices.as_slice() else {
            panic!("unexpected {devices:?}");
        };
        assert_eq!(vm.id.as_deref(), Some("vm0"));
        assert_eq!(vm.requested_size, 512 << 20);
        assert_eq!(vm.size, 0);
        assert_eq!(vm.block_size, 2 << 20);
        assert_eq!(dimm.size, 256 << 20);
        assert_eq!(backend_id(&dimm.memdev), "vmscale-dimm0-mem");
    }

    #[test]
    fn unknown_memory_device_types_are_other() {
        let devices: Vec<MemoryDevice> = serde_json::from_str(
            r#"[{"type": "nvdimm", "data": {"id": "nv0", "size": 1}}, {"type": "sgx-epc", "data": {}}]"#,
        )
        .expect("parses");
        assert_eq!(devices, vec![MemoryDevice::Other, MemoryDevice::Other]);
    }

    #[test]
    fn memdev_and_cpus_fast_from_qemu_7_2() {
        let memdevs: Vec<Memdev> = serde_json::from_str(MEMDEV).expect("parses");
        let ids: Vec<_> = memdevs.iter().filter_map(|m| m.id.as_deref()).collect();
        assert_eq!(ids, ["vmscale-dimm0-mem", "vmem0", "pc.ram"]);
        let threads: Vec<VcpuThread> = serde_json::from_str(CPUS_FAST).expect("parses");
        assert_eq!(threads.len(), 2);
        assert_eq!(threads[1].cpu_index, 1);
        assert_eq!(threads[1].qom_path, "/machine/peripheral/vmscale-cpu1");
        assert!(threads.iter().all(|t| t.thread_id > 0));
    }

    #[test]
    fn machine_properties() {
        let memory: MachineMemory =
            serde_json::from_str(r#"{"size": 268435456, "slots": 8, "max-size": 4294967296}"#)
                .expect("parses");
        assert_eq!(memory.slots, 8);
        assert_eq!(memory.max_size, 4 << 30);
        let smp: MachineSmp = serde_json::from_str(
            r#"{"cpus": 1, "maxcpus": 8, "threads": 1, "cores": 8, "dies": 1, "sockets": 1, "clusters": 1}"#,
        )
        .expect("parses");
        assert_eq!(smp.maxcpus, 8);
    }

    #[test]
    fn migration_and_run_states_round_trip_and_keep_unknown_ones() {
        use MigrationStatus as M;
        let known = [
            M::None,
            M::Setup,
            M::Cancelling,
            M::Cancelled,
            M::Active,
            M::PostcopyActive,
            M::PostcopyPaused,
            M::PostcopyRecoverSetup,
            M::PostcopyRecover,
            M::Completed,
            M::Failed,
            M::Colo,
            M::PreSwitchover,
            M::Device,
            M::WaitUnplug,
        ];
        for m in known {
            let wire = serde_json::to_string(&m).expect("serialises");
            assert_eq!(serde_json::from_str::<M>(&wire).expect("parses"), m, "{wire}");
            assert!(!matches!(M::from(m.as_str().to_owned()), M::Other(_)), "{m}");
        }
        assert_eq!(
            serde_json::from_str::<M>(r#""postcopy-fancy""#).expect("parses"),
            M::Other("postcopy-fancy".into())
        );
        use RunState as R;
        let known = [
            R::Debug,
            R::InMigrate,
            R::InternalError,
            R::IoError,
            R::Paused,
            R::PostMigrate,
            R::Prelaunch,
            R::FinishMigrate,
            R::RestoreVm,
            R::Running,
            R::SaveVm,
            R::Shutdown,
            R::Suspended,
            R::Watchdog,
            R::GuestPanicked,
            R::Colo,
        ];
        for r in known {
            let wire = serde_json::to_string(&r).expect("serialises");
            assert_eq!(serde_json::from_str::<R>(&wire).expect("parses"), r, "{wire}");
            assert!(!matches!(R::from(r.as_str().to_owned()), R::Other(_)), "{r}");
        }
        assert_eq!(R::from("napping".to_owned()), R::Other("napping".into()));
        assert_eq!(R::Other("napping".into()).to_string(), "napping");
    }

    #[test]
    fn summary_without_plugged_memory() {
        let s: MemorySizeSummary = serde_json::from_str(r#"{"base-memory": 268435456}"#).expect("parses");
        assert_eq!(s.plugged_memory, None);
    }
}
