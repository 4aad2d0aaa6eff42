//! QMP's asynchronous events: the raw form as QEMU sends it, and a typed view
//! of the few the agent acts on.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// When QEMU emitted an event (host wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// One event, as it came. `data` is kept whole so that events we do not type
/// yet still reach whoever listens.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct QmpEvent {
    #[serde(rename = "event")]
    pub name: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
}

/// The events the agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A device is gone: the guest released it after `device_del`.
    DeviceDeleted { device: Option<String>, path: String },
    /// A virtio-mem device's plugged size changed (the guest driver moved).
    MemoryDeviceSizeChange { id: Option<String>, size: u64, qom_path: Option<String> },
    /// The guest's ACPI _OST answer to an insert or eject request.
    AcpiDeviceOst { device: Option<String>, slot: Option<String>, source: Option<u64>, status: Option<u64> },
    /// The VM shut down (by the guest, or by QEMU on a host request).
    Shutdown { guest: bool, reason: Option<String> },
    /// Anything else; see [`QmpEvent::name`].
    Other,
}

#[derive(Deserialize)]
struct DeviceDeleted {
    device: Option<String>,
    path: String,
}

#[derive(Deserialize)]
struct SizeChange {
    id: Option<String>,
    size: u64,
    #[serde(rename = "qom-path")]
    qom_path: Option<String>,
}

#[derive(Deserialize)]
struct OstInfo {
    device: Option<String>,
    slot: Option<String>,
    source: Option<u64>,
    status: Option<u64>,
}

#[derive(Deserialize)]
struct Ost {
    info: OstInfo,
}

#[derive(Deserialize)]
struct Shutdown {
    guest: bool,
    reason: Option<String>,
}

impl QmpEvent {
    /// The typed view. An event we know by name but whose data does not fit
    /// (a QEMU that changed it) falls back to [`EventKind::Other`] rather than
    /// failing: events are hints, queries are the truth.
    pub fn kind(&self) -> EventKind {
        let data = || self.data.clone();
        match self.name.as_str() {
            "DEVICE_DELETED" => serde_json::from_value::<DeviceDeleted>(data())
                .map(|d| EventKind::DeviceDeleted { device: d.device, path: d.path })
                .unwrap_or(EventKind::Other),
            "MEMORY_DEVICE_SIZE_CHANGE" => serde_json::from_value::<SizeChange>(data())
                .map(|d| EventKind::MemoryDeviceSizeChange { id: d.id, size: d.size, qom_path: d.qom_path })
                .unwrap_or(EventKind::Other),
            "ACPI_DEVICE_OST" => serde_json::from_value::<Ost>(data())
                .map(|d| EventKind::AcpiDeviceOst {
                    device: d.info.device,
                    slot: d.info.slot,
                    source: d.info.source,
                    status: d.info.status,
                })
                .unwrap_or(EventKind::Other),
            "SHUTDOWN" => serde_json::from_value::<Shutdown>(data())
                .map(|d| EventKind::Shutdown { guest: d.guest, reason: d.reason })
                .unwrap_or(EventKind::Other),
            _ => EventKind::Other,
        }
    }

    /// Whether this event says the device with this id or QOM path is gone.
    pub fn deletes(&self, device: &str) -> bool {
        match self.kind() {
            EventKind::DeviceDeleted { device: Some(id), .. } if id == device => true,
            EventKind::DeviceDeleted { path, .. } => path == device,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(line: &str) -> QmpEvent {
        serde_json::from_str(line).expect("event parses")
    }

    #[test]
    fn device_deleted() {
        let e = event(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"device": "vmscale-dimm0", "path": "/machine/peripheral/vmscale-dimm0"}}"#,
        );
        assert_eq!(
            e.kind(),
            EventKind::DeviceDeleted {
                device: Some("vmscale-dimm0".into()),
                path: "/machine/peripheral/vmscale-dimm0".into()
            }
        );
        assert!(e.deletes("vmscale-dimm0"));
        assert!(e.deletes("/machine/peripheral/vmscale-dimm0"));
        assert!(!e.deletes("vmscale-dimm1"));
    }

    #[test]
    fn device_deleted_without_id_matches_by_path() {
        // Devices without an id (and some backends) only carry a path.
        let e =
            event(r#"{"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral-anon/device[3]"}}"#);
        assert!(e.deletes("/machine/peripheral-anon/device[3]"));
        assert_eq!(e.timestamp, None);
    }

    #[test]
    fn memory_device_size_change() {
        let e = event(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MEMORY_DEVICE_SIZE_CHANGE", "data": {"id": "vm0", "size": 268435456, "qom-path": "/machine/peripheral/vm0"}}"#,
        );
        assert_eq!(
            e.kind(),
            EventKind::MemoryDeviceSizeChange {
                id: Some("vm0".into()),
                size: 268_435_456,
                qom_path: Some("/machine/peripheral/vm0".into())
            }
        );
    }

    #[test]
    fn acpi_ost_and_shutdown() {
        let e = event(
            r#"{"event": "ACPI_DEVICE_OST", "data": {"info": {"device": "vmscale-dimm0", "slot": "0", "slot-type": "DIMM", "source": 3, "status": 0}}}"#,
        );
        assert_eq!(
            e.kind(),
            EventKind::AcpiDeviceOst {
                device: Some("vmscale-dimm0".into()),
                slot: Some("0".into()),
                source: Some(3),
                status: Some(0)
            }
        );
        let e = event(r#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-signal"}}"#);
        assert_eq!(e.kind(), EventKind::Shutdown { guest: false, reason: Some("host-signal".into()) });
    }

    #[test]
    fn unknown_or_misshapen_events_are_other() {
        assert_eq!(event(r#"{"event": "RESUME"}"#).kind(), EventKind::Other);
        assert_eq!(event(r#"{"event": "DEVICE_DELETED", "data": {"device": 5}}"#).kind(), EventKind::Other);
    }
}
