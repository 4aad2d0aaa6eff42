//! The demo's database load: `pgbench` and `psql` run from a node (the host,
//! or a node's network namespace) against a Postgres VM over the network.
//!
//! - [`ensure_client`] installs `postgresql-client` if `pgbench` or `psql`
//!   is missing (Debian's, through [`crate::apt`]).
//! - [`Target`] is where to connect; its password goes to the child's
//!   environment (`PGPASSWORD`), never to a command line.
//! - [`Pgbench::start`] runs `pgbench` with `--progress=1
//!   --progress-timestamp --max-tries --failures-detailed`; a reader thread
//!   parses each progress line into a [`Sample`], readable while it runs
//!   ([`Pgbench::samples`], [`Pgbench::latest`]). [`Pgbench::wait`] (a timed
//!   run) or [`Pgbench::stop`] (until stopped) gives the [`Summary`]: from
//!   pgbench's final report when it printed one, else from the samples
//!   (pgbench prints no report when killed), with broken connections and
//!   aborted clients counted from its error lines. The longest single
//!   transaction needs `log_dir` (pgbench's aggregate log); without it only
//!   the worst one-second average is known.
//! - [`init`] (`pgbench -i -s N --quiet`) and [`sql`] (one statement through
//!   `psql`, e.g. [`memory_hungry_sql`]) are one-shot runs with a timeout.
//!
//! Each runs a program built by a [`Launch`]: [`host`] runs it here; for a
//! node's namespace pass `&|p| fabric.command_in(0, p)` (`ip netns exec`).
//! pgbench runs in a process group of its own, so a terminal's Ctrl-C to
//! the demo does not end it before the demo reads its figures; dropping a
//! [`Pgbench`] ends it.
//!
//! ```ignore
//! use crate::pgbench::{self, Opts, Pgbench, Run, Target};
//! pgbench::ensure_client()?;
//! let db = Target::new("10.201.3.2", 5432, "bench", "bench").password("secret");
//! pgbench::init(&db, &pgbench::host, 10, Duration::from_secs(300))?;
//! let mut opts = Opts::new(db.clone(), 8);
//! opts.run = Run::UntilStopped;
//! opts.log_dir = Some(dir.join("pgbench-8"));   // one directory per run
//! let bench = Pgbench::start(&opts, &|p| fabric.command_in(0, p))?;
//! // every second: bench.latest() -> Some(Sample { at, tps, latency_ms, failed, .. }),
//! // at in Unix seconds: sample.secs_after(demo_start) on the timeline's clock
//! let q = pgbench::sql(&db, &pgbench::host, &pgbench::memory_hungry_sql(20_000_000, 1024),
//!                      Duration::from_secs(600))?;   // q.took, q.error
//! let summary = bench.stop()?;   // summary.clean(): no failure, no broken connection
//! ```

// The Postgres demo (xtask/src/pg/) is to call this; until it does, only
// the tests here do.
#![allow(dead_code, unused_imports)]

use std::process::Command;

mod oneshot;
mod parse;
mod run;
#[cfg(test)]
mod tests;

pub use oneshot::{init, memory_hungry_sql, sql, SqlOutcome};
pub use parse::{Sample, Source, Summary};
pub use run::{Opts, Pgbench, Protocol, Run, Script};

/// Builds the command that runs `program` (`"pgbench"`, `"psql"`) where the
/// load comes from: [`host`], or a node's namespace.
pub type Launch<'a> = &'a dyn Fn(&str) -> Command;

/// Runs `program` on this host (from `PATH`).
pub fn host(program: &str) -> Command {
    Command::new(program)
}

/// Installs Debian's `postgresql-client` when `pgbench` or `psql` is not on
/// `PATH` (as root; otherwise the error names the command to run).
pub fn ensure_client() -> anyhow::Result<()> {
    if ["pgbench", "psql"].iter().all(|p| on_path(p)) {
        return Ok(());
    }
    crate::apt::ensure(&["postgresql-client"], "pgbench and psql (the demo's database load)")?;
    anyhow::ensure!(
        on_path("pgbench"),
        "postgresql-client is installed but pgbench is not on PATH ({}); is /usr/bin on it?",
        std::env::var("PATH").unwrap_or_default()
    );
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A database to connect to. `Debug` leaves the password out.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub db: String,
    pub user: String,
    pub password: Option<String>,
    /// Seconds a connection attempt may take (`PGCONNECT_TIMEOUT`): a guest
    /// that went away fails its clients instead of hanging them.
    pub connect_timeout_s: u32,
}

impl Target {
    pub fn new(host: &str, port: u16, db: &str, user: &str) -> Target {
        Target {
            host: host.into(),
            port,
            db: db.into(),
            user: user.into(),
            password: None,
            connect_timeout_s: 10,
        }
    }

    pub fn password(self, password: &str) -> Target {
        Target { password: Some(password.into()), ..self }
    }

    /// `program` with the connection's options and environment; the
    /// database name is the caller's to add (pgbench wants it last).
    fn command(&self, launch: Launch, program: &str) -> Command {
        let mut c = launch(program);
        c.args(["-h", &self.host, "-p", &self.port.to_string(), "-U", &self.user]);
        c.env("PGCONNECT_TIMEOUT", self.connect_timeout_s.to_string());
        match &self.password {
            Some(p) => c.env("PGPASSWORD", p),
            // Not one from the caller's environment by accident.
            None => c.env_remove("PGPASSWORD"),
        };
        c
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "postgres://{}@{}:{}/{}", self.user, self.host, self.port, self.db)
    }
}
