//! Memory by pc-dimm slots: naming, leftover handling and the plan (pure),
//! then the QMP steps.
//!
//! A DIMM is two QEMU objects: a memory backend (`object-add`) and the
//! `pc-dimm` device on it (`device_add`). An unplug that stops half-way
//! leaves one of two leftovers, which the next operation resolves:
//! - a backend with no DIMM on it (the DIMM went, `object-del` did not
//!   happen): reused by the next plug of the same size, else deleted;
//! - a DIMM whose `device_del` is pending (the guest has not released it):
//!   the next unplug picks that DIMM again and re-sends `device_del`, which
//!   QEMU accepts.
//!
//! Only objects named by us (`vmscale-dimm<N>`, `vmscale-dimm<N>-mem`) are
//! ever deleted.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::error::{Error, Result};
use super::hypervisor::DimmDevice;
use super::types::{backend_id, DimmInfo, Memdev, MemoryDevice};
use super::vm::{Deletion, QmpVm};

const DEVICE_PREFIX: &str = "vmscale-dimm";
const BACKEND_SUFFIX: &str = "-mem";

pub fn dimm_device_id(index: u32) -> String {
    format!("{DEVICE_PREFIX}{index}")
}

pub fn dimm_backend_id(index: u32) -> String {
    format!("{DEVICE_PREFIX}{index}{BACKEND_SUFFIX}")
}

/// The index in one of our DIMM ids, `None` for anybody else's.
pub fn parse_device_id(id: &str) -> Option<u32> {
    let digits = id.strip_prefix(DEVICE_PREFIX)?;
    // Reject "vmscale-dimm01" etc.: only ids we would have made.
    let index: u32 = digits.parse().ok()?;
    (index.to_string() == digits).then_some(index)
}

/// The index in one of our backend ids, `None` for anybody else's.
pub fn parse_backend_id(id: &str) -> Option<u32> {
    parse_device_id(id.strip_suffix(BACKEND_SUFFIX)?)
}

fn dimms(devices: &[MemoryDevice]) -> impl Iterator<Item = &DimmInfo> {
    devices.iter().filter_map(|d| match d {
        MemoryDevice::Dimm(dimm) => Some(dimm),
        _ => None,
    })
}

/// Backends of ours that no memory device uses: leftovers of a half-done
/// unplug (or of a plug whose `device_add` never came back).
pub fn orphan_backends<'a>(devices: &[MemoryDevice], memdevs: &'a [Memdev]) -> Vec<&'a Memdev> {
    let used: BTreeSet<&str> = devices
        .iter()
        .filter_map(|d| match d {
            MemoryDevice::Dimm(dimm) => Some(backend_id(&dimm.memdev)),
            MemoryDevice::VirtioMem(vm) => Some(backend_id(&vm.memdev)),
            MemoryDevice::Other => None,
        })
        .collect();
    memdevs
        .iter()
        .filter(|m| m.id.as_deref().is_some_and(|id| parse_backend_id(id).is_some() && !used.contains(id)))
        .collect()
}

/// What a plug will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlugPlan {
    /// Leftover backends to delete first.
    pub delete_backends: Vec<String>,
    /// Whether the backend already exists (a leftover of the right size).
    pub reuse_backend: bool,
    pub index: u32,
}

/// Picks the DIMM index for a new `bytes` DIMM and decides about leftovers.
pub fn plan_plug(devices: &[MemoryDevice], memdevs: &[Memdev], bytes: u64) -> PlugPlan {
    let device_ids: BTreeSet<&str> = dimms(devices).filter_map(|d| d.id.as_deref()).collect();
    let orphans = orphan_backends(devices, memdevs);
    let reusable = orphans.iter().find_map(|m| {
        let index = parse_backend_id(m.id.as_deref()?)?;
        (m.size == bytes && !device_ids.contains(dimm_device_id(index).as_str())).then_some(index)
    });
    let delete_backends = orphans
        .iter()
        .filter_map(|m| m.id.clone())
        .filter(|id| Some(id.as_str()) != reusable.map(dimm_backend_id).as_deref())
        .collect();
    let index = reusable.unwrap_or_else(|| {
        // Orphans are deleted first, so their ids are free again; ids in use
        // by devices or by backends of present devices are not.
        let taken: BTreeSet<u32> = device_ids
            .iter()
            .filter_map(|id| parse_device_id(id))
            .chain(dimms(devices).filter_map(|d| parse_backend_id(backend_id(&d.memdev))))
            .collect();
        (0..).find(|i| !taken.contains(i)).unwrap_or(u32::MAX)
    });
    PlugPlan { delete_backends, reuse_backend: reusable.is_some(), index }
}

/// The DIMM to unplug: a pending one first, else the one of ours with the
/// highest index.
pub fn plan_unplug<'a>(devices: &'a [MemoryDevice], pending: &BTreeSet<String>) -> Result<&'a DimmInfo> {
    let ours: Vec<(u32, &DimmInfo)> =
        dimms(devices).filter_map(|d| Some((parse_device_id(d.id.as_deref()?)?, d))).collect();
    ours.iter()
        .find(|(_, d)| d.id.as_ref().is_some_and(|id| pending.contains(id)))
        .or_else(|| ours.iter().max_by_key(|(index, _)| *index))
        .map(|(_, d)| *d)
        .ok_or(Error::NoRemovableDimm)
}

impl QmpVm {
    async fn delete_orphans(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            tracing::info!(backend = %id, "deleting leftover dimm backend");
            self.object_del(id).await?;
        }
        Ok(())
    }

    /// Drops notes of pending DIMM unplugs whose DIMM is gone: the guest
    /// let go after we stopped waiting.
    fn forget_finished_unplugs(&self, devices: &[MemoryDevice]) {
        let present: BTreeSet<&str> = dimms(devices).filter_map(|d| d.id.as_deref()).collect();
        self.pending().retain(|id| parse_device_id(id).is_none() || present.contains(id.as_str()));
    }

    pub(super) async fn plug_dimm_inner(&self, bytes: u64) -> Result<DimmDevice> {
        let _op = self.op_lock.lock().await;
        let (devices, memdevs) = tokio::try_join!(self.memory_devices(), self.memdevs())?;
        self.forget_finished_unplugs(&devices);
        let plan = plan_plug(&devices, &memdevs, bytes);
        self.delete_orphans(&plan.delete_backends).await?;
        let id = dimm_device_id(plan.index);
        let backend = dimm_backend_id(plan.index);
        if plan.reuse_backend {
            tracing::info!(%backend, "reusing leftover dimm backend");
        } else {
            let mut args = json!({
                "qom-type": self.config.dimm_backend.qom_type(),
                "id": backend,
                "size": bytes,
            });
            if self.config.dimm_backend == super::hypervisor::DimmBackend::Memfd {
                args["share"] = true.into();
            }
            self.client.execute::<Value>("object-add", Some(args)).await?;
        }
        let added = self
            .client
            .execute::<Value>("device_add", Some(json!({"driver": "pc-dimm", "id": id, "memdev": backend})))
            .await;
        if let Err(e) = added {
            // QEMU refused: take the backend back so no memory is held for
            // nothing. On a timeout or a dead QEMU leave it for the next op.
            if matches!(e, Error::Qemu { .. }) {
                if let Err(cleanup) = self.object_del(&backend).await {
                    tracing::warn!(%backend, error = %cleanup, "cannot delete backend after failed device_add");
                }
            }
            return Err(e);
        }
        tracing::info!(%id, bytes, "dimm plugged");
        Ok(DimmDevice { id, backend, bytes })
    }

    pub(super) async fn unplug_dimm_inner(&self) -> Result<DimmDevice> {
        let _op = self.op_lock.lock().await;
        let (devices, memdevs) = tokio::try_join!(self.memory_devices(), self.memdevs())?;
        self.forget_finished_unplugs(&devices);
        let orphans: Vec<String> =
            orphan_backends(&devices, &memdevs).iter().filter_map(|m| m.id.clone()).collect();
        self.delete_orphans(&orphans).await?;
        let pending = self.pending().clone();
        let dimm = plan_unplug(&devices, &pending)?;
        let device = DimmDevice {
            id: dimm.id.clone().unwrap_or_default(),
            backend: backend_id(&dimm.memdev).to_string(),
            bytes: dimm.size,
        };

        let mut events = self.client.events();
        let deadline = self.unplug_deadline();
        self.device_del(&device.id).await?;
        let path = format!("/machine/peripheral/{}", device.id);
        let deleted = match self.wait_deleted(&mut events, &device.id, &path, deadline).await? {
            Deletion::Deleted => true,
            // No event: maybe lost, so ask QEMU whether the DIMM is gone.
            Deletion::Unknown => {
                !dimms(&self.memory_devices().await?).any(|d| d.id.as_deref() == Some(device.id.as_str()))
            }
        };
        if !deleted {
            return Err(self.unplug_timeout(&device.id));
        }
        self.pending().remove(&device.id);
        // The DIMM is gone; a backend that cannot be deleted now is a
        // leftover the next operation deletes, not a failed unplug.
        if let Err(e) = self.object_del(&device.backend).await {
            tracing::warn!(backend = %device.backend, error = %e, "dimm backend left behind");
        }
        tracing::info!(id = %device.id, "dimm unplugged");
        Ok(device)
    }
}

#[cfg(test)]
#[path = "dimm_tests.rs"]
mod tests;
