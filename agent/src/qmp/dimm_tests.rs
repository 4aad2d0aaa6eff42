//! DIMM planning on hand-made and captured QEMU state.

use std::collections::BTreeSet;

use super::*;
use crate::qmp::types::VirtioMemInfo;

const MIB: u64 = 1 << 20;

fn dimm(index: u32, backend: &str, size: u64) -> MemoryDevice {
    MemoryDevice::Dimm(DimmInfo {
        id: Some(dimm_device_id(index)),
        size,
        slot: index,
        node: 0,
        memdev: format!("/objects/{backend}"),
        hotplugged: true,
        hotpluggable: true,
    })
}

fn virtio_mem() -> MemoryDevice {
    MemoryDevice::VirtioMem(VirtioMemInfo {
        id: Some("vm0".into()),
        size: 0,
        requested_size: 0,
        max_size: 2048 * MIB,
        block_size: 2 * MIB,
        node: 0,
        memdev: "/objects/vmem0".into(),
    })
}

fn memdev(id: &str, size: u64) -> Memdev {
    Memdev { id: Some(id.into()), size, share: false }
}

#[test]
fn names_round_trip_and_foreign_names_are_not_ours() {
    assert_eq!(parse_device_id(&dimm_device_id(12)), Some(12));
    assert_eq!(parse_backend_id(&dimm_backend_id(3)), Some(3));
    for foreign in ["dimm0", "vmscale-dimm", "vmscale-dimm01", "vmscale-dimmx", "vmem0"] {
        assert_eq!(parse_device_id(foreign), None, "{foreign}");
    }
    assert_eq!(parse_backend_id("vmscale-dimm0"), None);
    assert_eq!(parse_backend_id("pc.ram"), None);
}

#[test]
fn first_plug_on_a_fresh_vm() {
    let devices = vec![virtio_mem()];
    let memdevs = vec![memdev("vmem0", 2048 * MIB), memdev("pc.ram", 256 * MIB)];
    assert_eq!(
        plan_plug(&devices, &memdevs, 256 * MIB),
        PlugPlan { delete_backends: vec![], reuse_backend: false, index: 0 }
    );
}

#[test]
fn plug_takes_the_lowest_free_index() {
    let devices = vec![dimm(0, "vmscale-dimm0-mem", 256 * MIB), dimm(2, "vmscale-dimm2-mem", 256 * MIB)];
    let memdevs = vec![memdev("vmscale-dimm0-mem", 256 * MIB), memdev("vmscale-dimm2-mem", 256 * MIB)];
    assert_eq!(plan_plug(&devices, &memdevs, 256 * MIB).index, 1);
}

#[test]
fn a_leftover_backend_of_the_right_size_is_reused() {
    let devices = vec![dimm(0, "vmscale-dimm0-mem", 256 * MIB)];
    let memdevs = vec![memdev("vmscale-dimm0-mem", 256 * MIB), memdev("vmscale-dimm1-mem", 256 * MIB)];
    let orphans = orphan_backends(&devices, &memdevs);
    assert_eq!(orphans.len(), 1);
    assert_eq!(
        plan_plug(&devices, &memdevs, 256 * MIB),
        PlugPlan { delete_backends: vec![], reuse_backend: true, index: 1 }
    );
}

#[test]
fn a_leftover_backend_of_another_size_is_deleted_and_its_index_reused() {
    let devices = vec![];
    let memdevs = vec![memdev("vmscale-dimm0-mem", 128 * MIB)];
    assert_eq!(
        plan_plug(&devices, &memdevs, 256 * MIB),
        PlugPlan { delete_backends: vec!["vmscale-dimm0-mem".into()], reuse_backend: false, index: 0 }
    );
}

#[test]
fn foreign_and_used_backends_are_never_orphans() {
    let devices = vec![virtio_mem(), dimm(0, "vmscale-dimm0-mem", 256 * MIB)];
    let memdevs = vec![
        memdev("vmem0", 2048 * MIB),
        memdev("pc.ram", 256 * MIB),
        memdev("vmscale-dimm0-mem", 256 * MIB),
        memdev("someone-elses", 256 * MIB),
    ];
    assert!(orphan_backends(&devices, &memdevs).is_empty());
}

#[test]
fn unplug_picks_the_highest_of_ours_or_a_pending_one() {
    let foreign = MemoryDevice::Dimm(DimmInfo {
        id: Some("boot-dimm".into()),
        size: MIB,
        slot: 7,
        node: 0,
        memdev: "/objects/boot-mem".into(),
        hotplugged: false,
        hotpluggable: true,
    });
    let devices =
        vec![dimm(0, "vmscale-dimm0-mem", 256 * MIB), foreign, dimm(1, "vmscale-dimm1-mem", 256 * MIB)];
    let last = plan_unplug(&devices, &BTreeSet::new()).expect("dimm");
    assert_eq!(last.id.as_deref(), Some("vmscale-dimm1"));
    let pending = BTreeSet::from(["vmscale-dimm0".to_string()]);
    let again = plan_unplug(&devices, &pending).expect("dimm");
    assert_eq!(again.id.as_deref(), Some("vmscale-dimm0"));
    // A pending id that is gone meanwhile does not stop the choice.
    let gone = BTreeSet::from(["vmscale-dimm9".to_string()]);
    let chosen = plan_unplug(&devices, &gone).expect("dimm");
    assert_eq!(chosen.id.as_deref(), Some("vmscale-dimm1"));
    assert!(matches!(plan_unplug(&[virtio_mem()], &BTreeSet::new()), Err(Error::NoRemovableDimm)));
}

#[test]
fn captured_state_plans() {
    let devices: Vec<MemoryDevice> =
        serde_json::from_str(include_str!("testdata/query-memory-devices.json")).expect("devices");
    let chosen = plan_unplug(&devices, &BTreeSet::new()).expect("dimm");
    assert_eq!(chosen.id.as_deref(), Some("vmscale-dimm0"));
    let memdevs = vec![memdev("vmem0", 2048 * MIB), memdev("vmscale-dimm0-mem", 256 * MIB)];
    assert_eq!(plan_plug(&devices, &memdevs, 256 * MIB).index, 1);
}
