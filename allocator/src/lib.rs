//! The allocator: the one central service that hands out CPU and memory on each
//! node and never over-commits it.
//!
//! - [`core`] decides, purely: ledgers, permits, migration plans.
//! - [`convert`] turns wire types into domain types, rejecting bad values.
//! - [`service`] and [`session`] are the gRPC edge; [`server`] binds listeners.

pub mod capacity;
pub mod config;
pub mod convert;
pub mod core;
pub mod extender;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod service;
pub mod session;
