//! End to end, every part real: `cargo xtask e2e migrate` (see
//! xtask/src/e2e/migrate.rs). Two nodes as network namespaces, an agent in
//! each: node a passes its watermark and the allocator has its VM moved to
//! b. A move whose network is cut mid-stream fails and leaves the VM on a; a
//! later one lands with the VM's hot-added devices, the ledger follows, and
//! a TCP client talking to the guest throughout loses no line.
//!
//! Needs root (namespaces, taps); without it the test skips, and under
//! `CI=true` it fails instead.

mod e2e_support;

#[test]
fn a_hot_node_has_its_vm_moved_live_and_a_cut_network_fails_the_move_cleanly() {
    if !e2e_support::can_make_namespaces() {
        return;
    }
    e2e_support::run_scenario("migrate");
}
