//! The plumbing every vmscale daemon shares, written once.
//!
//! - [`backoff`]: exponential retry delays with seeded jitter (pure).
//! - [`error`]: printing an error with its whole `source()` chain.
//! - [`shutdown`]: SIGTERM or Ctrl-C, for every daemon's `main`.
//! - [`durable`]: a JSON record that survives a crash (temp, fsync, rename).
//! - [`config`]: reading a TOML config file with errors that name the file.
//! - [`net`]: a free TCP port that another process cannot take meanwhile.
//! - [`stats`]: nearest-rank percentiles for benchmarks and tests.
//! - [`time`]: durations in whole milliseconds, saturating.
//! - [`sync`]: a mutex lock that outlives a panicked holder.
//! - [`testing`]: how a test that cannot run here says so (and fails in CI);
//!   with the `testing` feature, a throw-away CA (`TestPki`).
//! - [`tls`]: mutual TLS for every link: identities, PEM files, rustls and
//!   tonic configs, who the peer is, certificate rotation.
//! - `http_serve` (feature `http`): an HTTP server loop with a header-read
//!   timeout and connection limits, for the daemons' HTTP listeners.

pub mod backoff;
pub mod config;
pub mod durable;
pub mod error;
#[cfg(feature = "http")]
pub mod http_serve;
pub mod net;
pub mod shutdown;
pub mod stats;
pub mod sync;
pub mod testing;
pub mod time;
pub mod tls;
