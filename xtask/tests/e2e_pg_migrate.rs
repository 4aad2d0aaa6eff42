//! End to end on the Debian guest with Postgres: `cargo xtask e2e
//! pg-migrate` (see xtask/src/pg/migrate.rs). pgbench runs through a live
//! migration of its guest between two network-namespace nodes and loses no
//! transaction and no connection.

mod e2e_support;

#[test]
fn pgbench_runs_through_a_live_migration_without_losing_anything() {
    if e2e_support::can_make_namespaces() {
        e2e_support::run_scenario("pg-migrate");
    }
}
