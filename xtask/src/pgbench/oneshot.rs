//! One-shot runs with a timeout: `pgbench -i` and one statement through
//! `psql`.

use anyhow::{bail, Context};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Launch, Target};

/// Creates pgbench's tables at scale `scale` (`pgbench -i -s N --quiet`;
/// scale 1 is 100 000 accounts, about 16 MiB).
pub fn init(target: &Target, launch: Launch, scale: u32, timeout: Duration) -> anyhow::Result<()> {
    let mut c = target.command(launch, "pgbench");
    c.args(["-i", "-s", &scale.to_string(), "--quiet", &target.db]);
    let done = run_to_end(c, timeout).context("cannot run pgbench -i (is postgresql-client installed?)")?;
    if done.timed_out {
        bail!(
            "pgbench -i -s {scale} against {target:?} did not finish in {} s; a smaller scale, or a longer \
             timeout under TCG",
            timeout.as_secs()
        );
    }
    if !done.status.is_some_and(|s| s.success()) {
        // pgbench -i writes everything, its errors included, to stderr.
        bail!("pgbench -i -s {scale} against {target:?} failed: {}", error_text(&done.stderr));
    }
    Ok(())
}

/// What one statement through `psql` did.
#[derive(Debug, Clone)]
pub struct SqlOutcome {
    /// Wall time from starting psql to its exit (the connection included).
    pub took: Duration,
    /// psql's error (the server's `ERROR:` line and what follows, or "timed
    /// out ..."); `None` when the statement succeeded.
    pub error: Option<String>,
    /// The result, unaligned and without headers (`psql -At`).
    pub output: String,
}

/// Runs `statement` (one or more `;`-separated statements, sent together in
/// one session) with `psql`; the error is in the outcome, not an `Err`,
/// which means psql could not be started at all.
pub fn sql(
    target: &Target,
    launch: Launch,
    statement: &str,
    timeout: Duration,
) -> anyhow::Result<SqlOutcome> {
    let mut c = target.command(launch, "psql");
    // -X: no ~/.psqlrc; ON_ERROR_STOP: a failed statement is a non-zero exit.
    c.args(["-d", &target.db, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", statement]);
    let done = run_to_end(c, timeout).context("cannot run psql (is postgresql-client installed?)")?;
    let error = if done.timed_out {
        Some(format!("timed out after {} s; psql was killed", timeout.as_secs()))
    } else if done.status.is_some_and(|s| s.success()) {
        None
    } else {
        Some(error_text(&done.stderr))
    };
    Ok(SqlOutcome { took: done.took, error, output: done.stdout.trim().to_owned() })
}

/// A query that needs about `rows` × 100 bytes of backend memory at once (a
/// shuffled series counted; 8 million rows took 813 MB), with `work_mem`
/// raised to `work_mem_mib` so the sort stays in memory instead of spilling
/// to disk: the memory-hungry phase.
pub fn memory_hungry_sql(rows: u64, work_mem_mib: u64) -> String {
    format!(
        "SET work_mem = '{work_mem_mib}MB'; \
         SELECT count(*) FROM (SELECT g FROM generate_series(1, {rows}) g ORDER BY random()) s;"
    )
}

/// The stderr of a failed run, trimmed, or a note that it said nothing.
fn error_text(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        "no error output".into()
    } else {
        t.to_owned()
    }
}

/// A finished (or killed) one-shot run.
pub(super) struct Finished {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
    pub timed_out: bool,
}

/// Runs `c` to its end or `timeout`, whichever comes first (then its
/// process group is killed), with stdout and stderr read meanwhile.
pub(super) fn run_to_end(mut c: Command, timeout: Duration) -> anyhow::Result<Finished> {
    let t0 = Instant::now();
    let mut child =
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn()?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_until(&mut child, t0 + timeout)?;
    if status.is_none() {
        kill_group(&mut child, "KILL");
    }
    Ok(Finished {
        status,
        stdout: join(out),
        stderr: join(err),
        took: t0.elapsed(),
        timed_out: status.is_none(),
    })
}

/// The child's exit, or `None` at `deadline`.
pub(super) fn wait_until(child: &mut Child, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
    loop {
        if let Some(s) = child.try_wait().context("waiting for pgbench/psql")? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Signals the child's process group (it leads one: `process_group(0)`) and
/// reaps the child after a KILL. Only while the child is unreaped: its pid
/// cannot have been reused then.
pub(super) fn kill_group(child: &mut Child, signal: &str) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    if signal == "KILL" {
        let _ = child.wait();
    }
}

/// Reads a pipe to its end on a thread of its own (the other pipe may fill
/// meanwhile), lossily: a stray byte must not lose the rest.
pub(super) fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Option<JoinHandle<String>> {
    let mut pipe = pipe?;
    std::thread::Builder::new()
        .name("pgbench-out".into())
        .spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
        .ok()
}

pub(super) fn join(h: Option<JoinHandle<String>>) -> String {
    h.and_then(|h| h.join().ok()).unwrap_or_default()
}
