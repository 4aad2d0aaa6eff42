//! The hostile-client suite, one file per family of attacks. Each family
//! starts the real daemons it attacks, runs its attacks one after another,
//! reads the daemons' `/state` before and after each, and returns one
//! [`Attack`](super::report::Attack) per attack.

pub mod allocator_hello;
pub mod extender;
pub mod informant;
pub mod migration_source;
pub mod migration_target;
