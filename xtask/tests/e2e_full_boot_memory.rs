//! End to end: `cargo xtask e2e full-boot-memory` (see
//! xtask/src/e2e/full.rs). A guest whose boot memory is full gets DIMMs and
//! uses them: new processes get their memory, nothing is OOM-killed, and
//! each DIMM's memory map lies inside it (the image's
//! `memory_hotplug.memmap_on_memory=1`) without pinning it: the last DIMM
//! unplugs once the processes are gone.

mod e2e_support;

#[test]
fn a_full_guest_uses_the_memory_plugged_into_it() {
    e2e_support::run_scenario("full-boot-memory");
}
