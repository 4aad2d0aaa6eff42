//! End to end, every part real: `cargo xtask e2e denied-downscale` (see
//! xtask/src/e2e.rs). The workload holds its memory; the agent asks to
//! shrink, the informant in the guest denies, and the VM keeps its DIMMs.

mod e2e_support;

#[test]
fn the_informant_denies_a_downscale_and_the_vm_keeps_its_memory() {
    e2e_support::run_scenario("denied-downscale");
}
