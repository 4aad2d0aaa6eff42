//! The agent's links to its peers, each kept alive with backoff and each
//! behind a narrow trait so the shells that use them have fakes in tests.
//!
//! - [`allocator`]: the node's one session with the allocator
//!   ([`allocator::AllocatorSession`]); re-registers every VM on reconnect.
//! - [`informant`]: one link per VM to the informant in its guest
//!   ([`informant::GuestLink`]); guest events become typed at this edge.

pub mod allocator;
pub mod informant;
