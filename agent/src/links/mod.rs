//! The agent's links to its peers, each kept alive with backoff and each
//! behind a narrow trait so the shells that use them have fakes in tests.
//!
//! - [`allocator`]: the node's one session with the allocator
//!   ([`allocator::AllocatorSession`]); re-registers every VM on reconnect.
//! - [`informant`]: one link per VM to the informant in its guest
//!   ([`informant::GuestLink`]); guest events become typed at this edge.
//! - [`dial`]: how the bytes reach an informant ([`dial::InformantAddr`]:
//!   TCP, vsock, or a vhost-user vsock backend's unix socket).

pub mod allocator;
pub mod dial;
pub mod informant;
