//! The allocator: the one central service that hands out CPU and memory on each
//! node and never over-commits it.
//!
//! - [`core`]: the pure decisions: ledgers, permits, sessions, migration orders and plans.
//! - [`convert`]: wire types into domain types, rejecting bad values.
//! - [`session`]: one agent's gRPC stream; [`requests`]: one function per request kind.
//! - [`shared`]: the state sessions, planner and HTTP endpoints share, under one lock.
//! - [`server`]: binds the gRPC and HTTP listeners and runs the planner loop;
//!   [`https`]: the HTTP listener over TLS, and who called ([`https::Peer`]),
//!   served by `vmscale_common::http_serve` (header-read timeout, limits).
//! - [`config`]: the config file and its validation; [`metrics`]: Prometheus.
//! - [`leader`]: leader election on a Lease (Kubernetes mode).
//! - [`capacity`]: node capacities from the cluster (Kubernetes mode).
//! - [`probe`]: the kubelet's exec probe of the HTTP listener over TLS.
//! - [`node_certs`]: the signer of the agents' node certificates (Kubernetes
//!   mode, the CertificateSigningRequest API).
//! - [`extender`]: the kube-scheduler extender (filter and prioritize VM pods).

pub mod capacity;
pub mod config;
pub mod convert;
pub mod core;
pub mod extender;
pub mod https;
pub mod leader;
pub mod metrics;
pub mod node_certs;
pub mod probe;
pub mod requests;
pub mod server;
pub mod session;
pub mod shared;
