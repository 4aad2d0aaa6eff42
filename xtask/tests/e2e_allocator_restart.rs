//! End to end, every part real: `cargo xtask e2e allocator-restart` (see
//! xtask/src/e2e/restart.rs). The allocator is killed mid-ramp and restarted
//! on its port: the agent registers again, nothing grows before that, and the
//! ledger matches QEMU within the node's capacity.

mod e2e_support;

#[test]
fn a_restarted_allocator_is_rebuilt_by_the_agent_before_any_growth() {
    e2e_support::run_scenario("allocator-restart");
}
