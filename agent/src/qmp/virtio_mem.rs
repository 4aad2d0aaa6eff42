//! Memory by virtio-mem: set `requested-size`, then the guest driver plugs or
//! unplugs blocks until `size` matches. Without a guest driver (no OS yet)
//! QEMU records the request and `size` stays where it was.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::error::{Error, Result};
use super::event::EventKind;
use super::types::{MemoryDevice, VirtioMemInfo};
use super::vm::QmpVm;

/// The virtio-mem device with `id`, or the only one when `id` is `None`.
pub fn find_virtio_mem<'a>(devices: &'a [MemoryDevice], id: Option<&str>) -> Result<&'a VirtioMemInfo> {
    let mut all = devices.iter().filter_map(|d| match d {
        MemoryDevice::VirtioMem(vm) => Some(vm),
        _ => None,
    });
    let found = match id {
        Some(id) => all.find(|vm| vm.id.as_deref() == Some(id)),
        None => all.next(),
    };
    found.filter(|vm| vm.id.is_some()).ok_or_else(|| Error::NoVirtioMem { id: id.map(str::to_string) })
}

impl QmpVm {
    async fn virtio_mem(&self) -> Result<VirtioMemInfo> {
        let devices = self.memory_devices().await?;
        find_virtio_mem(&devices, self.config.virtio_mem_id.as_deref()).cloned()
    }

    pub(super) async fn set_virtio_mem_inner(&self, requested_bytes: u64) -> Result<()> {
        let _op = self.op_lock.lock().await;
        let device = self.virtio_mem().await?;
        let id = device.id.unwrap_or_default();
        // QEMU checks the size (block-aligned, at most max-size) and answers
        // with a GenericError otherwise.
        let args = json!({
            "path": format!("/machine/peripheral/{id}"),
            "property": "requested-size",
            "value": requested_bytes,
        });
        self.client.execute::<Value>("qom-set", Some(args)).await?;
        tracing::info!(%id, requested_bytes, "virtio-mem resize requested");
        Ok(())
    }

    pub(super) async fn wait_virtio_mem_inner(&self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        // Subscribe before the first read so a change in between is not lost.
        let mut events = self.client.events();
        let mut device = self.virtio_mem().await?;
        let id = device.id.clone().unwrap_or_default();
        loop {
            if device.size == device.requested_size {
                return Ok(device.size);
            }
            if Instant::now() >= deadline {
                return Err(Error::VirtioMemTimeout {
                    device: id,
                    requested_bytes: device.requested_size,
                    plugged_bytes: device.size,
                    after: timeout,
                });
            }
            // The event is the fast path; the poll covers lost events and
            // drivers that finish without one.
            let poll = (Instant::now() + self.config.virtio_mem_poll).min(deadline);
            loop {
                match tokio::time::timeout_at(poll, events.recv()).await {
                    Err(_) | Ok(Err(RecvError::Lagged(_))) => break,
                    Ok(Err(RecvError::Closed)) => {
                        return Err(Error::Disconnected {
                            reason: "qemu closed the qmp connection during a virtio-mem resize".into(),
                        })
                    }
                    Ok(Ok(event)) => {
                        if let EventKind::MemoryDeviceSizeChange { id: Some(ev_id), .. } = event.kind() {
                            if ev_id == id {
                                break;
                            }
                        }
                    }
                }
            }
            device = self.virtio_mem().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Vec<MemoryDevice> {
        serde_json::from_str(include_str!("testdata/query-memory-devices.json")).expect("devices")
    }

    #[test]
    fn finds_the_only_or_the_named_device() {
        let devices = devices();
        assert_eq!(find_virtio_mem(&devices, None).expect("one").id.as_deref(), Some("vm0"));
        assert!(find_virtio_mem(&devices, Some("vm0")).is_ok());
        assert!(matches!(find_virtio_mem(&devices, Some("vm1")), Err(Error::NoVirtioMem { id: Some(_) })));
        assert!(matches!(find_virtio_mem(&[], None), Err(Error::NoVirtioMem { id: None })));
    }
}
