//! The one error type of the QMP boundary: transport, QEMU's own replies and
//! the hotplug operations built on them.

use std::time::Duration;

/// What can go wrong talking to QEMU. A QEMU that goes away always ends up as
/// [`Error::Disconnected`], never as a panic or a hang.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened (no QEMU there, or no permission).
    #[error("cannot connect to qmp at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    /// The greeting or `qmp_capabilities` did not come as QMP says; also what a
    /// second client sees while another one holds QEMU's single QMP connection.
    #[error("qmp handshake with {endpoint} failed: {reason}")]
    Handshake { endpoint: String, reason: String },
    /// QEMU closed the connection or died, before or while a command ran.
    #[error("qemu went away: {reason}")]
    Disconnected { reason: String },
    /// No reply in time. The command may still run inside QEMU.
    #[error("qmp command {command} got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    /// QEMU answered with `{"error": {"class", "desc"}}`.
    #[error("qemu rejected {command}: {desc} ({class})")]
    Qemu { command: String, class: String, desc: String },
    /// The reply came but did not have the shape we expect for this command.
    #[error("cannot decode qemu's reply to {command}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    /// QEMU sent something that is not QMP.
    #[error("qmp protocol violation: {0}")]
    Protocol(String),
    /// Every hotpluggable vCPU slot is already in use.
    #[error("no free vcpu slot: all {slots} are in use")]
    NoFreeCpuSlot { slots: usize },
    /// Only vCPUs added with `device_add` (or `-device`) can be unplugged.
    #[error("no hot-pluggable vcpu is present to unplug")]
    NoRemovableCpu,
    /// No DIMM of ours is present to unplug.
    #[error("no hot-plugged dimm is present to unplug")]
    NoRemovableDimm,
    /// The VM has no virtio-mem device (or not the one configured).
    #[error("the vm has no virtio-mem device{}", .id.as_deref().map(|i| format!(" with id {i}")).unwrap_or_default())]
    NoVirtioMem { id: Option<String> },
    /// `device_del` was accepted but the guest did not release the device in
    /// time (no guest OS, or one that ignores the ACPI eject). The device is
    /// still there; the next unplug retries it.
    #[error("device {device} was not released by the guest within {after:?}")]
    UnplugTimeout { device: String, after: Duration },
    /// The guest's virtio-mem driver did not reach the requested size in time.
    #[error(
        "virtio-mem device {device} holds {plugged_bytes} bytes, not the requested \
         {requested_bytes}, after {after:?}"
    )]
    VirtioMemTimeout { device: String, requested_bytes: u64, plugged_bytes: u64, after: Duration },
}

impl Error {
    /// Whether QEMU itself is gone, so retrying on this connection is useless.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Disconnected { .. })
    }

    /// The QMP error class, for errors that QEMU itself returned.
    pub fn qemu_class(&self) -> Option<&str> {
        match self {
            Error::Qemu { class, .. } => Some(class),
            _ => None,
        }
    }

    /// A short stable name of the variant, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Connect { .. } => "connect",
            Error::Handshake { .. } => "handshake",
            Error::Disconnected { .. } => "disconnected",
            Error::Timeout { .. } => "timeout",
            Error::Qemu { .. } => "qemu",
            Error::Decode { .. } => "decode",
            Error::Protocol(_) => "protocol",
            Error::NoFreeCpuSlot { .. } => "no_free_cpu_slot",
            Error::NoRemovableCpu => "no_removable_cpu",
            Error::NoRemovableDimm => "no_removable_dimm",
            Error::NoVirtioMem { .. } => "no_virtio_mem",
            Error::UnplugTimeout { .. } => "unplug_timeout",
            Error::VirtioMemTimeout { .. } => "virtio_mem_timeout",
        }
    }
}

/// Result of the QMP boundary.
pub type Result<T, E = Error> = std::result::Result<T, E>;
