//! End to end on the Debian guest with Postgres: `cargo xtask e2e
//! pg-virtio-mem` (see xtask/src/pg/scale.rs). A memory-hungry sort grows
//! the guest's virtio-mem device through the agent, without an OOM kill;
//! afterwards the agent shrinks it back.

mod e2e_support;

#[test]
fn a_memory_hungry_sort_grows_virtio_mem_and_it_shrinks_afterwards() {
    if e2e_support::can_make_namespaces() {
        e2e_support::run_scenario("pg-virtio-mem");
    }
}
