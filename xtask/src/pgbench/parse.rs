//! pgbench's output read into types, with no I/O: the progress lines of
//! stderr (`--progress=1 --progress-timestamp`), the final report on stdout,
//! the error lines that say a connection broke, and the aggregate log
//! (`--log --aggregate-interval=1`) for the longest single transaction.
//! The formats are PostgreSQL 15's; `testdata/` holds real captures.

/// One progress interval (one second with `--progress=1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The interval's end: Unix time in seconds with `--progress-timestamp`
    /// (what [`super::Pgbench`] passes), else seconds since pgbench started.
    pub at: f64,
    /// Transactions per second finished in the interval.
    pub tps: f64,
    /// Average latency; `None` when no transaction finished in the interval
    /// (pgbench prints 0.000 then, which is no latency at all).
    pub latency_ms: Option<f64>,
    pub stddev_ms: Option<f64>,
    /// Transactions that failed in this interval (not a running total).
    pub failed: u64,
    /// Transactions retried and retries in the interval; pgbench prints them
    /// only with `--max-tries` other than 1.
    pub retried: Option<u64>,
    pub retries: Option<u64>,
}

impl Sample {
    /// Seconds from `t0` to the interval's end, for a chart whose clock
    /// starts at `t0` (negative if before it).
    pub fn secs_after(&self, t0: std::time::SystemTime) -> f64 {
        let t0 = match t0.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        self.at - t0
    }
}

/// `progress: 1796533236.588 s, 5072.7 tps, lat 0.755 ms stddev 0.292, 0 failed, 0 retried, 0 retries`
/// (also the form without a timestamp and with `lag`/`skipped` from `--rate`);
/// `None` for any other line.
pub fn progress(line: &str) -> Option<Sample> {
    let rest = line.trim_end().strip_prefix("progress: ")?;
    let mut parts = rest.split(", ");
    let at = parts.next()?.strip_suffix(" s")?.parse().ok()?;
    let tps: f64 = parts.next()?.strip_suffix(" tps")?.parse().ok()?;
    let (lat, sd) = parts.next()?.strip_prefix("lat ")?.split_once(" ms stddev ")?;
    let mut s = Sample {
        at,
        tps,
        latency_ms: finite(lat),
        stddev_ms: finite(sd),
        failed: 0,
        retried: None,
        retries: None,
    };
    if tps <= 0.0 {
        (s.latency_ms, s.stddev_ms) = (None, None);
    }
    for p in parts {
        let (n, what) = p.split_once(' ')?;
        match what {
            "failed" => s.failed = n.parse().ok()?,
            "retried" => s.retried = Some(n.parse().ok()?),
            "retries" => s.retries = Some(n.parse().ok()?),
            // `lag 0.1 ms` and `N skipped` (with --rate): not ours to show.
            _ => {}
        }
    }
    Some(s)
}

/// A number pgbench printed, unless it is `nan`/`-nan` (a stddev over too
/// few transactions) or infinite.
fn finite(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Where a [`Summary`]'s figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// pgbench's own final report (it ran to its end, or its clients
    /// aborted and it still reported).
    Report,
    /// The progress samples: pgbench was stopped (it prints no report
    /// when killed) or never got to run.
    Progress,
}

/// What a pgbench run did, as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub source: Source,
    /// Transactions that succeeded ("actually processed"); from progress,
    /// the sum of each interval's tps times its length, rounded.
    pub processed: u64,
    /// Failed transactions (serialization and deadlock failures after their
    /// retries). A broken connection is not one: see `broken_connections`.
    pub failed: u64,
    /// Transactions that needed a retry (only with `--max-tries` above 1).
    pub retried: Option<u64>,
    pub latency_avg_ms: Option<f64>,
    pub latency_stddev_ms: Option<f64>,
    pub tps: Option<f64>,
    /// The longest single transaction, from the aggregate log (`log_dir` in
    /// the options); `None` without it. pgbench 15 does not write the last,
    /// partial second of that log.
    pub max_latency_ms: Option<f64>,
    /// The worst one-second average latency of the progress samples: a
    /// pause shows here even without the aggregate log, diluted by the
    /// second's other transactions.
    pub worst_second_latency_ms: Option<f64>,
    /// Connections that could not be made ("connection to server ...
    /// failed") plus clients that aborted ("client N aborted ..."): each is
    /// an error a client of the database would have seen.
    pub broken_connections: u32,
    /// pgbench said "Run was aborted; the above results are incomplete".
    pub aborted: bool,
    /// pgbench's own lines (errors, a refused option), without the
    /// `pgbench: ` and `error: ` in front, for a person to read.
    pub errors: Vec<String>,
    /// pgbench's exit code: 0 done, 1 bad options or set-up, 2 errors in
    /// the run; `None` when a signal ended it (as [`super::Pgbench::stop`]
    /// does) or nothing ran it (a summary parsed from captured output).
    pub exit: Option<i32>,
}

impl Summary {
    /// No client saw an error: nothing failed, nothing broke, nothing
    /// aborted, and pgbench did not give up on its own.
    pub fn clean(&self) -> bool {
        self.failed == 0 && self.broken_connections == 0 && !self.aborted && self.exit.is_none_or(|c| c == 0)
    }
}

/// What the stderr lines say besides progress: broken connections, the
/// abort, the error lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Errors {
    pub broken_connections: u32,
    pub aborted: bool,
    pub lines: Vec<String>,
}

impl Errors {
    /// Takes one stderr line that is not a progress line. The server's
    /// lines (`WARNING:`, `CONTEXT:`) and the indented hints are left out.
    pub fn add(&mut self, line: &str) {
        let Some(own) = line.trim_end().strip_prefix("pgbench: ") else { return };
        let msg = own.strip_prefix("error: ").unwrap_or(own);
        if is_broken_connection(msg) {
            self.broken_connections += 1;
        }
        if msg.starts_with("Run was aborted") {
            self.aborted = true;
        }
        self.lines.push(msg.to_owned());
    }
}

/// "connection to server at ... failed: ..." (one per connection that
/// could not be made; the "could not create connection for ..." after it is
/// the same failure) and "client 2 aborted in command 10 ..." or "client 0
/// script 0 aborted in command 7 ...".
fn is_broken_connection(msg: &str) -> bool {
    if msg.starts_with("connection to server") && msg.contains(" failed") {
        return true;
    }
    let Some(rest) = msg.strip_prefix("client ") else { return false };
    let mut words = rest.split(' ');
    words.next().is_some_and(|n| n.parse::<u32>().is_ok()) && rest.contains(" aborted")
}

/// The summary from pgbench's stdout report, or from the samples where
/// there is none (it was killed, or failed before running).
pub fn summary(stdout: &str, samples: &[Sample], errors: Errors, max_latency_ms: Option<f64>) -> Summary {
    let worst_second_latency_ms = samples.iter().filter_map(|s| s.latency_ms).reduce(f64::max);
    let mut s = Summary {
        source: Source::Progress,
        processed: 0,
        failed: samples.iter().map(|s| s.failed).sum(),
        // Samples carry retries only with --max-tries other than 1.
        retried: if samples.is_empty() { None } else { samples.iter().map(|s| s.retried).sum() },
        latency_avg_ms: None,
        latency_stddev_ms: None,
        tps: None,
        max_latency_ms,
        worst_second_latency_ms,
        broken_connections: errors.broken_connections,
        aborted: errors.aborted,
        errors: errors.lines,
        exit: None,
    };
    if report(stdout, &mut s) {
        s.source = Source::Report;
    } else {
        from_samples(samples, &mut s);
    }
    s
}

/// Reads the report's lines into `s`; false if stdout holds no report.
fn report(stdout: &str, s: &mut Summary) -> bool {
    let mut found = false;
    for line in stdout.lines() {
        if let Some(v) = line.strip_prefix("number of transactions actually processed: ") {
            // "27997", or "1000/1000" with -t (done / asked for).
            if let Some(n) = v.split('/').next().and_then(|n| n.trim().parse().ok()) {
                s.processed = n;
                found = true;
            }
        } else if let Some(v) = line.strip_prefix("number of failed transactions: ") {
            s.failed = first_word(v).unwrap_or(s.failed);
        } else if let Some(v) = line.strip_prefix("number of transactions retried: ") {
            s.retried = first_word(v).or(s.retried);
        } else if let Some(v) = line.strip_prefix("latency average = ") {
            s.latency_avg_ms = first_word(v);
        } else if let Some(v) = line.strip_prefix("latency stddev = ") {
            s.latency_stddev_ms = first_word(v);
        } else if let Some(v) = line.strip_prefix("tps = ") {
            s.tps = first_word(v);
        }
    }
    found
}

fn first_word<T: std::str::FromStr>(v: &str) -> Option<T> {
    v.split_whitespace().next()?.parse().ok()
}

/// Totals from the progress samples: transactions from each interval's
/// rate and length (the first interval is taken as one second, the
/// `--progress` period), latency as the transaction-weighted mean.
fn from_samples(samples: &[Sample], s: &mut Summary) {
    let mut prev: Option<f64> = None;
    let (mut tx, mut secs, mut lat_sum) = (0.0_f64, 0.0_f64, 0.0_f64);
    for x in samples {
        let dt = prev.map_or(1.0, |p| (x.at - p).max(0.0));
        prev = Some(x.at);
        let n = x.tps.max(0.0) * dt;
        tx += n;
        secs += dt;
        lat_sum += n * x.latency_ms.unwrap_or(0.0);
    }
    // Non-negative and far below 2^53 for any real run: the rounding is the
    // only change.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let processed = tx.round() as u64;
    s.processed = processed;
    if tx > 0.0 {
        s.latency_avg_ms = Some(lat_sum / tx);
    }
    if secs > 0.0 {
        s.tps = Some(tx / secs);
    }
}

/// The longest transaction in aggregate-log lines (`--aggregate-interval`):
/// `start count sum sum2 min max ...`, latencies in microseconds; `None`
/// if no interval holds a transaction.
pub fn aggregate_max_ms(log: &str) -> Option<f64> {
    log.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let count: u64 = f.get(1)?.parse().ok()?;
            let max_us: f64 = f.get(5)?.parse().ok()?;
            (count > 0).then_some(max_us / 1000.0)
        })
        .reduce(f64::max)
}
