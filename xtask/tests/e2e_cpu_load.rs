//! End to end, every part real: `cargo xtask e2e cpu-load` (see
//! xtask/src/e2e/cpu.rs). The idle guest's second vCPU goes offline; CPU load
//! brings it back online, and it goes offline again after the load stops.

mod e2e_support;

#[test]
fn cpu_load_adds_a_vcpu_and_idleness_removes_it() {
    e2e_support::run_scenario("cpu-load");
}
