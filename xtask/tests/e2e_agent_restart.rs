//! End to end, every part real: `cargo xtask e2e agent-restart` (see
//! xtask/src/e2e/restart.rs). The agent is killed mid-ramp and restarted: it
//! reads the VM back from QEMU, registers it once, and scaling goes on.

mod e2e_support;

#[test]
fn a_restarted_agent_resumes_from_qemu_without_double_counting() {
    e2e_support::run_scenario("agent-restart");
}
