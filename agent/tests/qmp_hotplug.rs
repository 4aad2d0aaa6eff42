//! Hotplug against a real qemu-system-x86_64 (TCG, no guest OS): what QEMU
//! really does when nobody inside answers ACPI.
#![allow(clippy::unwrap_used)]

mod qmp_support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use vmscale_agent::qmp::types::Memdev;
use vmscale_agent::qmp::{DimmBackend, Error, Hotplug, HotplugConfig, QmpVm, VcpuThreads};

use qmp_support::{hotplug_config, TestQemu, GIB, MIB};

macro_rules! qemu {
    ($name:expr) => {
        qemu!($name, |_| {})
    };
    ($name:expr, $shape:expr) => {
        match TestQemu::start($name, $shape).await {
            Some(q) => q,
            None => return,
        }
    };
}

async fn our_backends(vm: &QmpVm) -> BTreeSet<String> {
    vm.memdevs()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m: Memdev| m.id)
        .filter(|id| id.starts_with("vmscale-"))
        .collect()
}

#[tokio::test]
async fn a_fresh_vm_is_read_from_qemu() {
    let q = qemu!("a_fresh_vm_is_read_from_qemu");
    let vm = q.vm().await;
    assert!(vm.client().greeting().version.qemu.major >= 7);
    let size = vm.read_size().await.unwrap();
    assert_eq!(size.vcpus_present, 1);
    assert_eq!(size.vcpu_slots, 8);
    assert_eq!(size.vcpus_removable, 0);
    assert_eq!(size.memory_base_bytes, 256 * MIB);
    assert_eq!(size.dimm_bytes, 0);
    assert_eq!(size.dimm_slots, Some(8));
    assert_eq!(size.memory_max_bytes, Some(4 * GIB));
    assert_eq!(size.virtio_mem_max_bytes, 2 * GIB);
    assert_eq!(size.virtio_mem_requested_bytes, 0);
    assert_eq!(size.memory_bytes(), 256 * MIB);
}

#[tokio::test]
async fn vcpus_plug_into_free_slots_and_a_restarted_agent_reads_them_back() {
    let q = qemu!("vcpus_plug_into_free_slots");
    let vm = q.vm().await;
    let first = vm.plug_vcpu().await.unwrap();
    let second = vm.plug_vcpu().await.unwrap();
    assert_eq!(first.id, "vmscale-cpu1");
    assert_eq!(first.props["core-id"], 1);
    assert_eq!(second.id, "vmscale-cpu2");
    let size = vm.read_size().await.unwrap();
    assert_eq!((size.vcpus_present, size.vcpus_removable), (3, 2));

    let threads = vm.vcpu_threads().await.unwrap();
    let ids: BTreeSet<i64> = threads.iter().map(|t| t.thread_id).collect();
    assert_eq!(ids.len(), 3, "{threads:?}");
    assert!(ids.iter().all(|id| *id > 0));

    // An agent restart: the old connection goes, a new one reads the truth.
    drop(vm);
    let restarted = q.vm().await;
    assert_eq!(restarted.read_size().await.unwrap(), size);

    for _ in 3..8 {
        restarted.plug_vcpu().await.unwrap();
    }
    assert!(matches!(restarted.plug_vcpu().await, Err(Error::NoFreeCpuSlot { slots: 8 })));
    assert_eq!(restarted.read_size().await.unwrap().vcpus_present, 8);
}

/// QEMU's piix4 ACPI starts in legacy CPU hotplug mode and only switches to
/// the modern interface when the guest's ACPI code runs; in legacy mode it
/// refuses vCPU unplug outright. A fresh QEMU, as for every vCPU unplug.
#[tokio::test]
async fn vcpu_unplug_without_a_guest_is_refused_by_qemu() {
    let q = qemu!("vcpu_unplug_without_a_guest");
    let vm = q.vm().await;
    vm.plug_vcpu().await.unwrap();
    let err = vm.unplug_vcpu().await.unwrap_err();
    let Error::Qemu { command, class, desc } = &err else {
        panic!("expected a qemu error, got {err:#}");
    };
    assert_eq!(command, "device_del");
    assert_eq!(class, "GenericError");
    assert!(desc.contains("not supported"), "{desc}");
    // Nothing changed, and QEMU still works.
    assert_eq!(vm.read_size().await.unwrap().vcpus_present, 2);
    vm.plug_vcpu().await.unwrap();
    // No hot-plugged vCPU at all: nothing to unplug.
    let boot_only = qemu!("vcpu_unplug_boot_only");
    let vm = boot_only.vm().await;
    assert!(matches!(vm.unplug_vcpu().await, Err(Error::NoRemovableCpu)));
}

#[tokio::test]
async fn dimms_plug_and_read_back() {
    let q = qemu!("dimms_plug_and_read_back");
    let vm = q.vm().await;
    let a = vm.plug_dimm(256 * MIB).await.unwrap();
    let b = vm.plug_dimm(512 * MIB).await.unwrap();
    assert_eq!((a.id.as_str(), a.backend.as_str()), ("vmscale-dimm0", "vmscale-dimm0-mem"));
    assert_eq!(b.id, "vmscale-dimm1");
    let size = vm.read_size().await.unwrap();
    assert_eq!(size.dimm_count, 2);
    assert_eq!(size.dimm_bytes, 768 * MIB);
    // QEMU's own total agrees.
    assert_eq!(size.plugged_memory_bytes, 768 * MIB);
    assert_eq!(size.memory_bytes(), GIB);
    drop(vm);
    assert_eq!(q.vm().await.read_size().await.unwrap(), size);
}

#[tokio::test]
async fn dimm_unplug_times_out_without_a_guest_and_is_retried_next_time() {
    let q = qemu!("dimm_unplug_times_out");
    let vm = q.vm().await;
    vm.plug_dimm(256 * MIB).await.unwrap();
    vm.plug_dimm(256 * MIB).await.unwrap();

    let started = std::time::Instant::now();
    let err = vm.unplug_dimm().await.unwrap_err();
    assert!(matches!(&err, Error::UnplugTimeout { device, .. } if device == "vmscale-dimm1"), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(vm.pending_unplugs(), ["vmscale-dimm1"]);
    // QEMU still has it: the size says so.
    assert_eq!(vm.read_size().await.unwrap().dimm_count, 2);

    // A plug meanwhile takes a new slot and leaves the pending one alone.
    assert_eq!(vm.plug_dimm(256 * MIB).await.unwrap().id, "vmscale-dimm2");
    // The next unplug goes for the pending DIMM again: QEMU accepts a second
    // device_del for it.
    let err = vm.unplug_dimm().await.unwrap_err();
    assert!(matches!(&err, Error::UnplugTimeout { device, .. } if device == "vmscale-dimm1"));
    assert_eq!(our_backends(&vm).await.len(), 3);
}

#[tokio::test]
async fn leftover_backends_are_reused_or_deleted() {
    let q = qemu!("leftover_backends");
    let vm = q.vm().await;
    let object_add = |id: &str, size: u64| {
        let args = json!({"qom-type": "memory-backend-ram", "id": id, "size": size});
        let client = vm.client().clone();
        async move { client.execute::<Value>("object-add", Some(args)).await.unwrap() }
    };

    // The DIMM went but its backend stayed: the next plug of that size uses it.
    object_add("vmscale-dimm0-mem", 256 * MIB).await;
    let dimm = vm.plug_dimm(256 * MIB).await.unwrap();
    assert_eq!(dimm.backend, "vmscale-dimm0-mem");
    assert_eq!(our_backends(&vm).await.len(), 1);

    // A leftover of another size is deleted and a fresh backend made.
    object_add("vmscale-dimm5-mem", 128 * MIB).await;
    let dimm = vm.plug_dimm(256 * MIB).await.unwrap();
    assert_eq!(dimm.id, "vmscale-dimm1");
    assert_eq!(
        our_backends(&vm).await,
        BTreeSet::from(["vmscale-dimm0-mem".into(), "vmscale-dimm1-mem".into()])
    );

    // An unplug cleans leftovers first, whatever becomes of the unplug.
    object_add("vmscale-dimm7-mem", 128 * MIB).await;
    object_add("not-ours", 128 * MIB).await;
    assert!(vm.unplug_dimm().await.is_err());
    assert!(!our_backends(&vm).await.contains("vmscale-dimm7-mem"));
    let all: Vec<String> = vm.memdevs().await.unwrap().into_iter().filter_map(|m| m.id).collect();
    assert!(all.contains(&"not-ours".to_string()), "{all:?}");
}

#[tokio::test]
async fn a_refused_dimm_gives_its_backend_back() {
    let q = qemu!("a_refused_dimm");
    let vm = q.vm().await;
    // Larger than maxmem - base: QEMU creates the backend lazily, then
    // refuses the DIMM.
    let err = vm.plug_dimm(8 * GIB).await.unwrap_err();
    assert_eq!(err.qemu_class(), Some("GenericError"), "{err:#}");
    assert!(our_backends(&vm).await.is_empty());
    assert_eq!(vm.plug_dimm(256 * MIB).await.unwrap().id, "vmscale-dimm0");
}

#[tokio::test]
async fn memfd_backed_dimms_are_shared() {
    let q = qemu!("memfd_backed_dimms", |o| o.memfd = true);
    let config = HotplugConfig { dimm_backend: DimmBackend::Memfd, ..hotplug_config() };
    let vm = QmpVm::new(q.client().await, config);
    vm.plug_dimm(256 * MIB).await.unwrap();
    let backend = vm
        .memdevs()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.id.as_deref() == Some("vmscale-dimm0-mem"))
        .unwrap();
    assert!(backend.share);
}

/// Without a guest driver QEMU records `requested-size` and `size` stays 0:
/// no MEMORY_DEVICE_SIZE_CHANGE ever comes.
#[tokio::test]
async fn virtio_mem_request_is_recorded_but_not_plugged_without_a_driver() {
    let q = qemu!("virtio_mem_request");
    let vm = q.vm().await;
    vm.set_virtio_mem_size(512 * MIB).await.unwrap();
    let size = vm.read_size().await.unwrap();
    assert_eq!(size.virtio_mem_requested_bytes, 512 * MIB);
    assert_eq!(size.virtio_mem_plugged_bytes, 0);
    assert_eq!(size.plugged_memory_bytes, 0);
    assert_eq!(size.memory_target_bytes(), 768 * MIB);

    let err = vm.wait_virtio_mem_plugged(Duration::from_millis(300)).await.unwrap_err();
    let Error::VirtioMemTimeout { device, requested_bytes, plugged_bytes, .. } = err else {
        panic!("expected a virtio-mem timeout, got {err:#}");
    };
    assert_eq!((device.as_str(), requested_bytes, plugged_bytes), ("vm0", 512 * MIB, 0));

    // Back to zero is already "reached".
    vm.set_virtio_mem_size(0).await.unwrap();
    assert_eq!(vm.wait_virtio_mem_plugged(Duration::from_millis(300)).await.unwrap(), 0);

    // QEMU checks the size itself.
    let unaligned = vm.set_virtio_mem_size(MIB + 1).await.unwrap_err();
    assert!(unaligned.to_string().contains("block-size"), "{unaligned}");
    let too_big = vm.set_virtio_mem_size(4 * GIB).await.unwrap_err();
    assert_eq!(too_big.qemu_class(), Some("GenericError"));
}

#[tokio::test]
async fn a_vm_without_virtio_mem_says_so() {
    let q = qemu!("no_virtio_mem", |o| o.virtio_mem_mib = None);
    let vm = q.vm().await;
    assert!(matches!(vm.set_virtio_mem_size(GIB).await, Err(Error::NoVirtioMem { id: None })));
    assert_eq!(vm.read_size().await.unwrap().virtio_mem_max_bytes, 0);
}
