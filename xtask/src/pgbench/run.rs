//! One pgbench run in the background: its options, the reader that turns
//! its progress lines into samples while it runs, and its summary.

use anyhow::Context;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::oneshot::{drain, join, kill_group, wait_until};
use super::parse::{self, Errors, Sample, Summary};
use super::{Launch, Target};

/// How long pgbench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// `-T`, in whole seconds (at least one).
    For(Duration),
    /// Until [`Pgbench::stop`] (or the drop); pgbench is given `-T` of a
    /// week so that a demo killed hard does not leave it running for ever.
    UntilStopped,
}

/// `-M`: how statements reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Simple,
    Extended,
    Prepared,
}

/// What each transaction does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// pgbench's TPC-B-like default (writes).
    TpcB,
    /// `-S`: one indexed read.
    SelectOnly,
    /// A script file (`-f`), as the pgbench process sees the path.
    File(PathBuf),
}

/// Options of one run. [`Opts::new`] has the demo's defaults.
#[derive(Debug, Clone)]
pub struct Opts {
    pub target: Target,
    pub clients: u32,
    /// Worker threads (`-j`); more than `clients` is cut to `clients`, which
    /// pgbench requires.
    pub threads: u32,
    pub run: Run,
    pub protocol: Protocol,
    pub script: Script,
    /// Tries per transaction (`--max-tries`); a serialization failure or
    /// deadlock that still fails after them counts as a failed transaction.
    pub max_tries: u32,
    /// Vacuum the tables first (pgbench's default; slow under TCG).
    pub vacuum: bool,
    /// `--rate`: transactions per second over all clients, on a schedule;
    /// latency then counts from each transaction's scheduled start, so a
    /// pause shows in full. `None`: as fast as the clients go.
    pub rate: Option<f64>,
    /// A directory of its own for pgbench's aggregate log (`--log
    /// --aggregate-interval=1`), created if missing: the summary's
    /// `max_latency_ms` comes from it.
    pub log_dir: Option<PathBuf>,
}

impl Opts {
    /// `clients` on the TPC-B-like script until stopped, prepared
    /// statements, two threads (this machine's cores), three tries, no vacuum.
    pub fn new(target: Target, clients: u32) -> Opts {
        Opts {
            target,
            clients,
            threads: 2,
            run: Run::UntilStopped,
            protocol: Protocol::Prepared,
            script: Script::TpcB,
            max_tries: 3,
            vacuum: false,
            rate: None,
            log_dir: None,
        }
    }

    /// pgbench's arguments after the connection's (the database last).
    pub fn args(&self) -> Vec<String> {
        let secs = match self.run {
            Run::For(d) => d.as_secs().max(1),
            Run::UntilStopped => 7 * 24 * 3600,
        };
        let clients = self.clients.max(1);
        let mode = match self.protocol {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
        };
        let mut a: Vec<String> = vec![
            format!("--client={clients}"),
            format!("--jobs={}", self.threads.clamp(1, clients)),
            format!("--time={secs}"),
            format!("--protocol={mode}"),
            "--progress=1".into(),
            "--progress-timestamp".into(),
            format!("--max-tries={}", self.max_tries.max(1)),
            "--failures-detailed".into(),
        ];
        match &self.script {
            Script::TpcB => {}
            Script::SelectOnly => a.push("--select-only".into()),
            Script::File(p) => a.push(format!("--file={}", p.display())),
        }
        if !self.vacuum {
            a.push("--no-vacuum".into());
        }
        if let Some(r) = self.rate.filter(|r| *r > 0.0) {
            a.push(format!("--rate={r}"));
        }
        if let Some(d) = &self.log_dir {
            a.extend(["--log".into(), "--aggregate-interval=1".into()]);
            a.push(format!("--log-prefix={}", d.join(LOG_PREFIX).display()));
        }
        a.push(self.target.db.clone());
        a
    }
}

/// The aggregate log's file names: `pgbench.PID` and `pgbench.PID.N` (one
/// per thread).
const LOG_PREFIX: &str = "pgbench";

/// What the reader has seen so far.
#[derive(Debug, Default)]
struct Live {
    samples: Vec<Sample>,
    errors: Errors,
}

/// A pgbench running in the background. Dropping it ends it.
#[derive(Debug)]
pub struct Pgbench {
    child: Child,
    live: Arc<Mutex<Live>>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<()>>,
    log_dir: Option<PathBuf>,
    started: Instant,
    /// Set once the child has been reaped: no signal may go to its pid then.
    done: bool,
}

impl Pgbench {
    /// Starts pgbench with `opts`, the command built by `launch`.
    pub fn start(opts: &Opts, launch: Launch) -> anyhow::Result<Pgbench> {
        if let Some(d) = &opts.log_dir {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating pgbench's log directory {}", d.display()))?;
        }
        let mut c = opts.target.command(launch, "pgbench");
        c.args(opts.args());
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Not in the demo's process group: a terminal's Ctrl-C must not
            // end it before the demo has read its figures.
            .process_group(0)
            .spawn()
            .with_context(|| {
                format!("cannot start pgbench against {:?}; run pgbench::ensure_client first", opts.target)
            })?;
        let live = Arc::new(Mutex::new(Live::default()));
        let stdout = drain(child.stdout.take());
        let stderr = child.stderr.take().map(|e| read_stderr(e, live.clone())).transpose()?;
        Ok(Pgbench {
            child,
            live,
            stdout,
            stderr,
            log_dir: opts.log_dir.clone(),
            started: Instant::now(),
            done: false,
        })
    }

    /// Every sample so far, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.clone()
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<Sample> {
        self.lock().samples.last().copied()
    }

    /// Broken connections and aborted clients so far.
    pub fn broken_connections(&self) -> u32 {
        self.lock().errors.broken_connections
    }

    /// How long since it started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether pgbench still runs.
    pub fn running(&mut self) -> bool {
        !self.done && matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for a timed run's end; past `timeout` it is stopped as by
    /// [`Pgbench::stop`] (the summary then comes from the samples).
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<Summary> {
        let exited = wait_until(&mut self.child, Instant::now() + timeout)?.is_some();
        if !exited {
            self.end();
        }
        self.finish()
    }

    /// Ends pgbench (TERM, then KILL after 5 s) and sums up what it did.
    pub fn stop(mut self) -> anyhow::Result<Summary> {
        self.end();
        self.finish()
    }

    fn end(&mut self) {
        kill_group(&mut self.child, "TERM");
        if !matches!(wait_until(&mut self.child, Instant::now() + Duration::from_secs(5)), Ok(Some(_))) {
            kill_group(&mut self.child, "KILL");
        }
    }

    /// Once the child has exited: the readers' findings and the log's.
    fn finish(&mut self) -> anyhow::Result<Summary> {
        let status = self.child.wait().context("waiting for pgbench")?;
        self.done = true;
        let stdout = join(self.stdout.take());
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        let max = self.log_dir.as_deref().and_then(log_max_ms);
        let live = std::mem::take(&mut *self.lock());
        Ok(Summary { exit: status.code(), ..parse::summary(&stdout, &live.samples, live.errors, max) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        // The reader only pushes; a panic there leaves whole samples.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        if !self.done {
            kill_group(&mut self.child, "KILL");
        }
    }
}

/// The stderr reader: progress lines become samples, the rest errors.
fn read_stderr(e: ChildStderr, live: Arc<Mutex<Live>>) -> anyhow::Result<JoinHandle<()>> {
    let h = std::thread::Builder::new().name("pgbench-progress".into()).spawn(move || {
        let mut r = BufReader::new(e);
        let mut buf = Vec::new();
        while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf);
            let mut l = live.lock().unwrap_or_else(PoisonError::into_inner);
            match parse::progress(&line) {
                Some(s) => l.samples.push(s),
                None => l.errors.add(&line),
            }
            drop(l);
            buf.clear();
        }
    })?;
    Ok(h)
}

/// The longest transaction in the aggregate logs in `dir`.
fn log_max_ms(dir: &Path) -> Option<f64> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{LOG_PREFIX}.")))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| parse::aggregate_max_ms(&s))
        .reduce(f64::max)
}
