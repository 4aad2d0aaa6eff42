//! End to end, every part real: `cargo xtask e2e memory-ramp` (see
//! xtask/src/e2e.rs). A 32 MiB/s memory ramp in a QEMU guest (TCG) with the
//! real informant; the real agent and allocator must plug memory before the
//! OOM killer fires, with no OOM kill, and the ledger must hold what QEMU has.

mod e2e_support;

#[test]
fn a_memory_ramp_is_met_with_plugged_memory_and_no_oom_kill() {
    e2e_support::run_scenario("memory-ramp");
}
