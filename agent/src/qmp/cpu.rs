//! vCPU hotplug: which slot to fill or empty (pure), and the QMP steps.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::error::{Error, Result};
use super::hypervisor::CpuDevice;
use super::types::HotpluggableCpu;
use super::vm::{Deletion, QmpVm};

/// Topology keys from the outside in, so slots fill socket by socket, core
/// by core. Keys a machine does not have count as 0.
const TOPOLOGY_ORDER: [&str; 6] = ["node-id", "socket-id", "die-id", "cluster-id", "core-id", "thread-id"];

/// The device id we give the vCPU in the `index`-th slot (in topology order).
/// Deterministic, so a restarted agent or a migration target that re-creates
/// hot-added vCPUs with `-device` uses the same names.
pub fn cpu_device_id(index: usize) -> String {
    format!("vmscale-cpu{index}")
}

/// The slots in topology order (QEMU lists them last-first).
pub fn slots_in_order(cpus: &[HotpluggableCpu]) -> Vec<&HotpluggableCpu> {
    let mut slots: Vec<_> = cpus.iter().collect();
    slots.sort_by_key(|c| {
        TOPOLOGY_ORDER.iter().map(|k| c.props.get(*k).copied().unwrap_or(0)).collect::<Vec<_>>()
    });
    slots
}

/// The first free slot and its index, or why there is none.
pub fn plan_plug(cpus: &[HotpluggableCpu]) -> Result<(usize, &HotpluggableCpu)> {
    slots_in_order(cpus)
        .into_iter()
        .enumerate()
        .find(|(_, c)| !c.is_plugged())
        .ok_or(Error::NoFreeCpuSlot { slots: cpus.len() })
}

/// The vCPU to unplug: one whose unplug is already pending (by QOM path),
/// else the last removable one in topology order.
pub fn plan_unplug<'a>(
    cpus: &'a [HotpluggableCpu],
    pending: &BTreeSet<String>,
) -> Result<&'a HotpluggableCpu> {
    let removable: Vec<_> = slots_in_order(cpus).into_iter().filter(|c| c.is_removable()).collect();
    removable
        .iter()
        .find(|c| c.qom_path.as_ref().is_some_and(|p| pending.contains(p)))
        .or(removable.last())
        .copied()
        .ok_or(Error::NoRemovableCpu)
}

/// `device_add` arguments for a slot: its driver, our id, and every topology
/// property the slot reports.
pub fn device_add_args(slot: &HotpluggableCpu, id: &str) -> Value {
    let mut args = Map::new();
    args.insert("driver".into(), slot.driver.clone().into());
    args.insert("id".into(), id.into());
    for (key, value) in &slot.props {
        args.insert(key.clone(), (*value).into());
    }
    Value::Object(args)
}

impl QmpVm {
    /// Drops notes of pending vCPU unplugs (kept by QOM path) whose vCPU is
    /// gone: the guest let go after we stopped waiting.
    fn forget_finished_cpu_unplugs(&self, cpus: &[HotpluggableCpu]) {
        self.pending().retain(|path| {
            !path.starts_with("/machine/") || cpus.iter().any(|c| c.qom_path.as_ref() == Some(path))
        });
    }

    pub(super) async fn plug_vcpu_inner(&self) -> Result<CpuDevice> {
        let _op = self.op_lock.lock().await;
        let cpus = self.hotpluggable_cpus().await?;
        self.forget_finished_cpu_unplugs(&cpus);
        let (index, slot) = plan_plug(&cpus)?;
        let id = cpu_device_id(index);
        self.client.execute::<Value>("device_add", Some(device_add_args(slot, &id))).await?;
        tracing::info!(%id, props = ?slot.props, "vcpu plugged");
        Ok(CpuDevice { id, props: slot.props.clone() })
    }

    pub(super) async fn unplug_vcpu_inner(&self) -> Result<CpuDevice> {
        let _op = self.op_lock.lock().await;
        let cpus = self.hotpluggable_cpus().await?;
        self.forget_finished_cpu_unplugs(&cpus);
        let pending = self.pending().clone();
        let slot = plan_unplug(&cpus, &pending)?;
        let path = slot.qom_path.clone().unwrap_or_default();
        let id = path.rsplit('/').next().unwrap_or_default().to_string();
        let device = CpuDevice { id: id.clone(), props: slot.props.clone() };

        let mut events = self.client.events();
        let deadline = self.unplug_deadline();
        // device_del takes a QOM path as well as an id; the path also works
        // for vCPUs a previous agent added under other ids.
        self.device_del(&path).await?;
        if let Deletion::Deleted = self.wait_deleted(&mut events, &path, &id, deadline).await? {
            self.pending().remove(&path);
            tracing::info!(%id, "vcpu unplugged");
            return Ok(device);
        }
        // No event: maybe lost, so ask QEMU whether the slot emptied.
        let cpus = self.hotpluggable_cpus().await?;
        if cpus.iter().any(|c| c.qom_path.as_deref() == Some(&path)) {
            return Err(self.unplug_timeout(&path));
        }
        self.pending().remove(&path);
        Ok(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn captured() -> Vec<HotpluggableCpu> {
        serde_json::from_str(include_str!("testdata/query-hotpluggable-cpus.json")).expect("cpus")
    }

    fn slot(core: i64, path: Option<&str>) -> HotpluggableCpu {
        HotpluggableCpu {
            driver: "qemu64-x86_64-cpu".into(),
            vcpus_count: 1,
            props: [("socket-id", 0), ("core-id", core), ("thread-id", 0)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            qom_path: path.map(str::to_string),
        }
    }

    #[test]
    fn plugs_the_lowest_free_slot() {
        let cpus = captured();
        let (index, slot) = plan_plug(&cpus).expect("free slot");
        assert_eq!(index, 2);
        assert_eq!(slot.props["core-id"], 2);
        assert_eq!(
            device_add_args(slot, &cpu_device_id(index)),
            json!({"driver": "qemu64-x86_64-cpu", "id": "vmscale-cpu2", "socket-id": 0,
                   "core-id": 2, "thread-id": 0, "node-id": 0})
        );
    }

    #[test]
    fn a_full_machine_has_no_free_slot() {
        let cpus = vec![slot(0, Some("/machine/unattached/device[0]"))];
        assert!(matches!(plan_plug(&cpus), Err(Error::NoFreeCpuSlot { slots: 1 })));
    }

    #[test]
    fn sockets_fill_before_later_sockets() {
        let mut a = slot(1, None);
        a.props.insert("socket-id".into(), 0);
        let mut b = slot(0, None);
        b.props.insert("socket-id".into(), 1);
        let cpus = vec![b, a];
        let (_, chosen) = plan_plug(&cpus).expect("free");
        assert_eq!(chosen.props["socket-id"], 0);
    }

    #[test]
    fn unplugs_the_last_hot_plugged_vcpu_never_a_boot_one() {
        let cpus = vec![
            slot(0, Some("/machine/unattached/device[0]")),
            slot(1, Some("/machine/peripheral/vmscale-cpu1")),
            slot(2, Some("/machine/peripheral/vmscale-cpu2")),
            slot(3, None),
        ];
        let chosen = plan_unplug(&cpus, &BTreeSet::new()).expect("removable");
        assert_eq!(chosen.qom_path.as_deref(), Some("/machine/peripheral/vmscale-cpu2"));
        let boot_only = &cpus[..1];
        assert!(matches!(plan_unplug(boot_only, &BTreeSet::new()), Err(Error::NoRemovableCpu)));
    }

    #[test]
    fn a_pending_unplug_is_retried_first() {
        let cpus = vec![
            slot(1, Some("/machine/peripheral/vmscale-cpu1")),
            slot(2, Some("/machine/peripheral/vmscale-cpu2")),
        ];
        let pending = BTreeSet::from(["/machine/peripheral/vmscale-cpu1".to_string()]);
        let chosen = plan_unplug(&cpus, &pending).expect("removable");
        assert_eq!(chosen.qom_path.as_deref(), Some("/machine/peripheral/vmscale-cpu1"));
    }
}
