//! The contract between a VM pod's owner and vmscale: the label that marks a
//! pod as an autoscaled VM, the `vmscale.io/*` annotations that describe it,
//! and the one parser of them. The scheduler extender (which places the pod)
//! and the agent (which scales its VM) both use [`annotations::parse`], so a
//! pod one of them accepts the other never refuses.
//!
//! - [`keys`]: the annotation keys and the default label.
//! - [`annotations`]: a pod's annotations into [`annotations::VmAnnotations`],
//!   with errors that name the annotation and the fix.
//! - [`quantity`]: Kubernetes resource quantities (`1Gi`, `500m`, `129e6`).
//! - [`informant_addr`]: where the agent reaches a VM's informant (TCP,
//!   vsock, or a vhost-user vsock backend's socket), the agent's VM list's
//!   parser too.
//! - [`vm_id`]: VM ids, bound to the pod's namespace and bounded as names
//!   and as record file names.
//! - [`policy`]: a VM's scaling policy and its validation (`vmscale.io/policy`
//!   and the agent's `[policy]`), with [`pressure`]: the pressure kinds it names.
//!
//! # Annotations
//!
//! Set by the pod's owner (all values are strings, as annotations are):
//!
//! | annotation | required | value |
//! |---|---|---|
//! | `vmscale.io/qmp` | no | the QMP socket's file name in the pod's socket directory (default `qmp.sock`); the agent derives the directory from the pod's UID (its `[kubernetes] pod_socket_dir`), so a pod can name no other socket; paths and `tcp:` are refused |
//! | `vmscale.io/informant` | no | the informant's gRPC endpoint: `http://HOST:PORT` (TCP) or `vsock://CID:PORT` (AF_VSOCK, guest CID 3 or more), checked by [`informant_addr`]; `vsock+unix://` (a host socket path) is refused for pods; none: memory never shrinks |
//! | `vmscale.io/cu-milli-cpu` | yes | CPU of one compute unit, milli-vCPU, a whole number (`250`) |
//! | `vmscale.io/cu-memory-bytes` | yes | memory of one compute unit: a Kubernetes quantity of whole MiB (`1Gi`, `1536Mi`, `1073741824`) |
//! | `vmscale.io/min-cus` | yes | smallest size, compute units, at least 1 |
//! | `vmscale.io/max-cus` | yes | largest size, compute units, at least `min-cus` |
//! | `vmscale.io/memory` | yes | `dimm:<quantity>` (pc-dimm size, divides the unit's memory) or `virtio-mem:<device id>` (the unit's memory a multiple of 128 MiB) |
//! | `vmscale.io/cpu-mode` | no | `sysfs` (default) or `hotplug` |
//! | `vmscale.io/vm-id` | no | the VM's name; its id for the allocator is `<namespace>/<this>` (letters, digits, `.`, `_`, `-`), default `<namespace>/<pod name>`; bounded by [`vm_id::check`] |
//! | `vmscale.io/policy` | no | JSON object overriding the policy's fields (`{"cpu_target": 0.6}`), each checked as the agent's `[policy]` is (`policy.rs`); `cpu_max_cgroup` is the node's alone and refused here |
//!
//! Written by the agent (ignored when read):
//!
//! | annotation | value |
//! |---|---|
//! | `vmscale.io/current-milli-cpu`, `vmscale.io/current-memory-bytes` | the size QEMU reports now |
//! | `vmscale.io/approved-milli-cpu`, `vmscale.io/approved-memory-bytes` | the allocator's permit: what the VM may grow to without asking |
//! | `vmscale.io/updated-at` | when the agent observed these sizes, RFC 3339 UTC |
//! | `vmscale.io/refused` | why the agent does not scale this pod (its annotations, or a VM id another pod holds); absent when it does |
//!
//! Any other `vmscale.io/` annotation is an error (a typo would otherwise be
//! silently ignored), except keys starting with `current-`, `approved-`,
//! `updated-at` or `refused`, which are left to the agent's write-back.
//!
//! Memory amounts are Kubernetes quantities, but whole MiB: `1G` is 10^9
//! bytes, which no guest can hotplug (QEMU plugs whole pages, Linux onlines
//! 128 MiB blocks), so it is refused with a hint to write `1Gi`.

pub mod annotations;
pub mod informant_addr;
pub mod keys;
pub mod policy;
pub mod pressure;
pub mod quantity;
pub mod vm_id;

pub use annotations::{parse, AnnotationError, VmAnnotations};
pub use informant_addr::{InformantAddr, InformantAddrError};

use std::collections::BTreeMap;

/// The label that marks a pod as an autoscaled VM (`key=value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLabel {
    pub key: String,
    pub value: String,
}

impl Default for VmLabel {
    fn default() -> Self {
        VmLabel { key: keys::DEFAULT_LABEL_KEY.into(), value: keys::DEFAULT_LABEL_VALUE.into() }
    }
}

impl VmLabel {
    /// Whether a pod with these labels carries this one.
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        labels.and_then(|l| l.get(&self.key)) == Some(&self.value)
    }
}
