//! End to end on the Debian guest with Postgres, every part real: `cargo
//! xtask e2e pg-scale` (see xtask/src/pg/scale.rs). The informant's unit is
//! active under systemd and the agent reaches it; pgbench load adds a vCPU
//! and quiet removes it; a memory-hungry sort gets memory without an OOM
//! kill, and the agent unplugs it afterwards.

mod e2e_support;

#[test]
fn postgres_load_adds_a_vcpu_and_memory_and_quiet_removes_them() {
    if e2e_support::can_make_namespaces() {
        e2e_support::run_scenario("pg-scale");
    }
}
