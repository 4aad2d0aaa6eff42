//! Postgres guests on network-namespace nodes, for the end-to-end scenarios
//! on the Debian guest (`cargo xtask e2e pg-*`): the image from
//! `xtask/src/debian/` booted per VM with its own copy-on-write disk, a tap
//! on the fabric (`xtask/src/netns.rs`) and a static address, the real
//! allocator and agents (`xtask/src/cluster/net.rs`), the informant inside
//! as its Debian package installed it, pgbench from the host
//! (`xtask/src/pgbench/`) and the guest's kernel read back through Postgres
//! (`probe.rs`).
//!
//! - `pg-scale`: one node, a DIMM guest. Idle, its second vCPU goes
//!   offline; pgbench load brings it back (and, CUs being CPU and memory
//!   together, DIMMs with it); quiet takes both away again: the informant
//!   approves, the agent unplugs (`device_del`), the guest offlines the
//!   blocks, the ledger is released. Then a memory-hungry sort gets memory
//!   without an OOM kill, and afterwards the agent unplugs it.
//! - `pg-virtio-mem`: the same memory phase with a virtio-mem device.
//! - `pg-migrate`: two nodes; pgbench runs through a live migration of its
//!   guest and loses no transaction and no connection.

mod migrate;
pub mod probe;
mod scale;
pub mod vm;

pub use migrate::{last_order, migrate};
pub use scale::{logs, scale, virtio_mem, PgCtx};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::pgbench::{self, Opts, Run};
use vm::PgVm;

/// pgbench's tables at scale 1 (100,000 accounts) in the guest's `postgres`
/// database: enough rows for the TPC-B-like script, made in seconds even
/// under TCG.
pub fn init_pgbench(vm: &PgVm) -> anyhow::Result<()> {
    pgbench::ensure_client()?;
    pgbench::init(&vm.conn.target, &pgbench::host, 1, Duration::from_secs(300))
}

/// pgbench's options against `vm`: `clients` on the TPC-B-like script, for
/// `run` or until stopped.
pub fn bench_options(vm: &PgVm, clients: u32, run: Option<Duration>) -> Opts {
    let mut o = Opts::new(vm.conn.target.clone(), clients);
    o.run = run.map_or(Run::UntilStopped, Run::For);
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    o.log_dir = Some(vm.qemu.dir.join(format!("pgbench-{n}")));
    o
}
