//! What a migration target needs on its command line besides the VM's base
//! shape: every vCPU and DIMM the source has as a device, with the same ids,
//! slots and guest addresses, so the migration stream's device sections find
//! their counterparts.
//!
//! The base command line (`-smp`, `-m`, the virtio-mem device, disks, NICs)
//! is the VM's launch configuration and must not itself name vCPU or DIMM
//! devices: everything here is added on top of it. virtio-mem needs nothing
//! extra: its requested and plugged sizes travel in the migration stream; we
//! record them so the target can be checked.
//!
//! Reading is one round of queries; turning it into arguments is pure.

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::client::QmpClient;
use super::migrate::{MigrateError, Result};
use super::types::{backend_id, HotpluggableCpu, Memdev};

/// A vCPU that exists as a device (hot-added, or `-device` on a previous
/// migration target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSpec {
    pub id: String,
    pub driver: String,
    pub props: super::types::CpuProps,
}

/// A pc-dimm and its backend, placed where the source has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimmSpec {
    pub id: String,
    pub backend: String,
    /// QOM type of the backend, e.g. `memory-backend-ram`.
    pub backend_type: String,
    pub share: bool,
    pub size: u64,
    /// Guest physical address: must match, or the guest's memory map moves
    /// under it.
    pub addr: u64,
    pub slot: u32,
    pub node: u32,
}

/// A virtio-mem device's sizes on the source (carried by the stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemSpec {
    pub id: String,
    pub requested_size: u64,
    pub size: u64,
    pub max_size: u64,
}

/// The source's devices at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub cpus: Vec<CpuSpec>,
    pub dimms: Vec<DimmSpec>,
    pub virtio_mem: Vec<VirtioMemSpec>,
}

/// `query-memory-devices` with the members a target needs (`addr` is not in
/// [`super::types::DimmInfo`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
enum RawDevice {
    Dimm {
        #[serde(default)]
        id: Option<String>,
        addr: u64,
        size: u64,
        slot: u32,
        node: u32,
        memdev: String,
    },
    VirtioMem {
        #[serde(default)]
        id: Option<String>,
        #[serde(rename = "requested-size")]
        requested_size: u64,
        size: u64,
        #[serde(rename = "max-size")]
        max_size: u64,
    },
}

/// The device id in a QOM path under `/machine/peripheral/`, the only
/// vCPUs with an id we can give the target.
fn peripheral_id(path: &str) -> Option<&str> {
    path.strip_prefix("/machine/peripheral/").filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Builds the spec from query replies. `backend_type` names each DIMM
/// backend's QOM type. Anonymous devices are refused: the target could not
/// be checked against the source, and we never create them.
pub fn build_spec(
    cpus: &[HotpluggableCpu],
    devices: &[serde_json::Value],
    memdevs: &[Memdev],
    backend_type: impl Fn(&str) -> Option<String>,
) -> Result<DeviceSpec> {
    let mut spec = DeviceSpec::default();
    for slot in super::cpu::slots_in_order(cpus) {
        let Some(path) = &slot.qom_path else { continue };
        if path.starts_with("/machine/unattached/") {
            continue; // a boot vCPU: the target's -smp makes it
        }
        let id = peripheral_id(path)
            .ok_or_else(|| MigrateError::Unsupported(format!("vcpu {path} has no device id")))?;
        spec.cpus.push(CpuSpec { id: id.into(), driver: slot.driver.clone(), props: slot.props.clone() });
    }
    for raw in devices {
        let kind = raw.get("type").and_then(|t| t.as_str()).unwrap_or_default();
        if !matches!(kind, "dimm" | "virtio-mem") {
            return Err(MigrateError::Unsupported(format!("memory device {raw} is not one we rebuild")));
        }
        let device: RawDevice = serde_json::from_value(raw.clone()).map_err(|e| {
            MigrateError::Unsupported(format!("unexpected query-memory-devices entry {raw}: {e}"))
        })?;
        match device {
            RawDevice::Dimm { id, addr, size, slot, node, memdev } => {
                let id = id.ok_or_else(|| {
                    MigrateError::Unsupported(format!("the dimm at {addr:#x} has no device id"))
                })?;
                let backend = backend_id(&memdev).to_string();
                let backend_type = backend_type(&backend).ok_or_else(|| {
                    MigrateError::Unsupported(format!("the type of dimm {id}'s backend {backend} is unknown"))
                })?;
                let share = memdevs.iter().any(|m| m.id.as_deref() == Some(backend.as_str()) && m.share);
                spec.dimms.push(DimmSpec { id, backend, backend_type, share, size, addr, slot, node });
            }
            RawDevice::VirtioMem { id, requested_size, size, max_size } => {
                let id =
                    id.ok_or_else(|| MigrateError::Unsupported("a virtio-mem device has no id".into()))?;
                spec.virtio_mem.push(VirtioMemSpec { id, requested_size, size, max_size });
            }
        }
    }
    spec.dimms.sort_by_key(|d| d.slot);
    Ok(spec)
}

impl DeviceSpec {
    /// `-object`/`-device` arguments for the target, after its base command
    /// line. Backends come before the DIMMs that use them.
    pub fn qemu_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for d in &self.dimms {
            let share = if d.share { ",share=on" } else { "" };
            args.push("-object".into());
            args.push(format!("{},id={},size={}{share}", d.backend_type, d.backend, d.size));
            args.push("-device".into());
            args.push(format!(
                "pc-dimm,id={},memdev={},addr={:#x},slot={},node={}",
                d.id, d.backend, d.addr, d.slot, d.node
            ));
        }
        for c in &self.cpus {
            let props: String = c.props.iter().map(|(k, v)| format!(",{k}={v}")).collect();
            args.push("-device".into());
            args.push(format!("{},id={}{props}", c.driver, c.id));
        }
        args
    }

    /// Bytes of memory in DIMMs.
    pub fn dimm_bytes(&self) -> u64 {
        self.dimms.iter().map(|d| d.size).sum()
    }
}

/// Reads the source's devices now. Hotplug must not run meanwhile (the
/// agent's VM state machine holds scaling while a VM migrates).
pub async fn read_spec(client: &QmpClient) -> Result<DeviceSpec> {
    let (cpus, devices, memdevs) = tokio::try_join!(
        client.execute::<Vec<HotpluggableCpu>>("query-hotpluggable-cpus", None),
        client.execute::<Vec<serde_json::Value>>("query-memory-devices", None),
        client.execute::<Vec<Memdev>>("query-memdev", None),
    )?;
    let mut types = std::collections::BTreeMap::new();
    for raw in &devices {
        if let Ok(RawDevice::Dimm { memdev, .. }) = serde_json::from_value::<RawDevice>(raw.clone()) {
            let path = if memdev.starts_with('/') { memdev.clone() } else { format!("/objects/{memdev}") };
            let kind: String =
                client.execute("qom-get", Some(json!({"path": path, "property": "type"}))).await?;
            types.insert(backend_id(&memdev).to_string(), kind);
        }
    }
    build_spec(&cpus, &devices, &memdevs, |backend| types.get(backend).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus() -> Vec<HotpluggableCpu> {
        serde_json::from_str(include_str!("testdata/query-hotpluggable-cpus.json")).expect("cpus")
    }

    fn devices() -> Vec<serde_json::Value> {
        serde_json::from_str(include_str!("testdata/query-memory-devices.json")).expect("devices")
    }

    fn memdevs() -> Vec<Memdev> {
        serde_json::from_str(include_str!("testdata/query-memdev.json")).expect("memdevs")
    }

    #[test]
    fn captured_state_becomes_target_arguments() {
        let spec =
            build_spec(&cpus(), &devices(), &memdevs(), |_| Some("memory-backend-ram".into())).expect("spec");
        assert_eq!(spec.cpus.len(), 1, "{spec:?}");
        assert_eq!(spec.cpus[0].id, "vmscale-cpu1");
        assert_eq!(spec.dimms.len(), 1);
        assert_eq!(spec.dimm_bytes(), 256 << 20);
        assert_eq!(spec.virtio_mem[0].requested_size, 512 << 20);
        let args = spec.qemu_args().join(" ");
        assert!(args.contains("-object memory-backend-ram,id=vmscale-dimm0-mem,size=268435456"), "{args}");
        assert!(args.contains("-device pc-dimm,id=vmscale-dimm0,memdev=vmscale-dimm0-mem,addr=0x"), "{args}");
        assert!(
            args.contains(
                "-device qemu64-x86_64-cpu,id=vmscale-cpu1,core-id=1,node-id=0,socket-id=0,thread-id=0"
            ),
            "{args}"
        );
        // The backend comes before the DIMM that names it.
        assert!(args.find("-object").expect("object") < args.find("pc-dimm").expect("dimm"));
    }

    #[test]
    fn anonymous_devices_and_unknown_backends_are_refused() {
        let mut cpus = cpus();
        for c in &mut cpus {
            if c.is_removable() {
                c.qom_path = Some("/machine/peripheral-anon/device[3]".into());
            }
        }
        let e = build_spec(&cpus, &[], &[], |_| None).unwrap_err();
        assert!(e.to_string().contains("has no device id"), "{e}");
        let e = build_spec(&[], &devices(), &memdevs(), |_| None).unwrap_err();
        assert!(e.to_string().contains("is unknown"), "{e}");
        let nvdimm = vec![json!({"type": "nvdimm", "data": {"id": "nv0"}})];
        let e = build_spec(&[], &nvdimm, &[], |_| None).unwrap_err();
        assert!(e.to_string().contains("not one we rebuild"), "{e}");
    }

    #[test]
    fn a_shared_backend_stays_shared() {
        let mut memdevs = memdevs();
        for m in &mut memdevs {
            m.share = true;
        }
        let spec =
            build_spec(&[], &devices(), &memdevs, |_| Some("memory-backend-memfd".into())).expect("spec");
        assert!(spec
            .qemu_args()
            .iter()
            .any(|a| a.starts_with("memory-backend-memfd,") && a.ends_with(",share=on")));
    }
}
