//! The allocator: the one central service that hands out CPU and memory on each
//! node and never over-commits it.
//!
//! - [`core`] decides, purely: ledgers, permits, migration plans.
//! - [`service`] is the gRPC edge: sessions, conversions, pushes.
//! - [`server`] binds it all to listeners with a shutdown signal.

pub mod core;
