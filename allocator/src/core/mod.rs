//! The pure core of the allocator: every node's ledger, the sessions that own
//! them, and the migration orders. No I/O and no clock of its own: callers pass
//! the time in milliseconds. Every method either applies all of its change or,
//! on error, none of it.
//!
//! - `cluster`: [`Cluster`], its config, and a node's requests about its VMs.
//! - `sessions`: an agent registers its node ([`Cluster::open_session`]) or leaves.
//! - `orders`: migration orders created, adopted, advanced, expired; retry waits.
//! - [`migration`]: one order and its state machine.
//! - [`planner`]: which VMs leave hot nodes, and where to.
//! - [`ledger`]: one node's reservations and grants; [`units`]: amounts.
//! - [`order_ids`]: signed order ids; [`limits`]: bounds on what agents can
//!   make the core keep; [`names`]: what names may be; [`endpoint`]: an
//!   agent's migration endpoint.
//! - [`vm`]: one VM's entry; [`contention`]: run-queue delay reports;
//!   [`cluster_capacity`]: capacities from Kubernetes; [`error`]: why a call failed.

mod cluster;
pub mod cluster_capacity;
pub mod contention;
pub mod endpoint;
pub mod error;
pub mod ledger;
pub mod limits;
pub mod migration;
pub mod names;
pub mod order_ids;
mod orders;
pub mod planner;
mod sessions;
pub mod units;
pub mod vm;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod planner_tests;
#[cfg(test)]
mod tests;

pub use cluster::{Cluster, CoreConfig};
pub use orders::MoveBackoff;
pub use sessions::{NodeRegistration, Opened, Reservation, SessionRef, VmRefusal};
