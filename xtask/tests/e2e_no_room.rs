//! End to end, every part real: `cargo xtask e2e no-room` (see
//! xtask/src/e2e/room.rs). On a node without room the allocator denies, QEMU
//! keeps its size, nothing is over-committed and the agent does not loop.

mod e2e_support;

#[test]
fn a_node_without_room_denies_and_the_vm_stays_as_it_is() {
    e2e_support::run_scenario("no-room");
}
