//! The `vmscale.io/*` annotation keys and the default label (the table is in
//! the crate's documentation).

/// Every annotation key vmscale reads or writes starts with this.
pub const PREFIX: &str = "vmscale.io/";

/// The label key that marks an autoscaled VM pod, unless configured otherwise.
pub const DEFAULT_LABEL_KEY: &str = "vmscale.io/autoscale";
/// Its value.
pub const DEFAULT_LABEL_VALUE: &str = "true";

pub const VM_ID: &str = "vmscale.io/vm-id";
pub const QMP: &str = "vmscale.io/qmp";
pub const INFORMANT: &str = "vmscale.io/informant";
pub const CU_MILLI_CPU: &str = "vmscale.io/cu-milli-cpu";
pub const CU_MEMORY_BYTES: &str = "vmscale.io/cu-memory-bytes";
pub const MIN_CUS: &str = "vmscale.io/min-cus";
pub const MAX_CUS: &str = "vmscale.io/max-cus";
pub const CPU_MODE: &str = "vmscale.io/cpu-mode";
pub const MEMORY: &str = "vmscale.io/memory";
pub const POLICY: &str = "vmscale.io/policy";

/// The keys a pod's owner may set.
pub const SPEC_KEYS: [&str; 10] =
    [VM_ID, QMP, INFORMANT, CU_MILLI_CPU, CU_MEMORY_BYTES, MIN_CUS, MAX_CUS, CPU_MODE, MEMORY, POLICY];

/// Written by the agent on a pod it refuses to scale: why (bounded in
/// length); removed once the pod's annotations are good again.
pub const REFUSED: &str = "vmscale.io/refused";

/// Keys under these (after the prefix) belong to the agent's write-back;
/// they are ignored on read, also ones a newer agent may add.
pub const STATUS_KEY_STARTS: [&str; 4] = ["current-", "approved-", "updated-at", "refused"];

/// Whether `key` is a `vmscale.io/` key that is neither the owner's nor the
/// agent's write-back: most likely a typo (`min-cu`).
pub fn is_unknown(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(PREFIX) else { return false };
    !SPEC_KEYS.contains(&key) && !STATUS_KEY_STARTS.iter().any(|s| rest.starts_with(s))
}
