//! The parser against real pgbench 15 output (`testdata/`, captured as its
//! README says) and the command lines the driver builds.

use super::parse::{self, aggregate_max_ms, progress, Errors, Sample, Source, Summary};
use super::{memory_hungry_sql, Opts, Protocol, Run, Script, Target};
use std::time::Duration;

/// What the stderr reader makes of a captured stderr.
fn read(stderr: &str) -> (Vec<Sample>, Errors) {
    let mut samples = Vec::new();
    let mut errors = Errors::default();
    for l in stderr.lines() {
        match progress(l) {
            Some(s) => samples.push(s),
            None => errors.add(l),
        }
    }
    (samples, errors)
}

fn summary(stdout: &str, stderr: &str, max: Option<f64>) -> Summary {
    let (samples, errors) = read(stderr);
    parse::summary(stdout, &samples, errors, max)
}

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("testdata/", $name))
    };
}

#[test]
fn a_clean_run_gives_its_samples_and_report() {
    let (samples, errors) = read(fixture!("run.stderr"));
    assert_eq!(samples.len(), 5);
    assert_eq!(
        samples[0],
        Sample {
            at: 1_796_533_236.588,
            tps: 5072.7,
            latency_ms: Some(0.755),
            stddev_ms: Some(0.292),
            failed: 0,
            retried: Some(0),
            retries: Some(0),
        }
    );
    assert!(errors.lines.is_empty());
    let t0 = std::time::UNIX_EPOCH + Duration::from_secs(1_796_533_230);
    assert!((samples[0].secs_after(t0) - 6.588).abs() < 1e-6, "on the demo's clock");
    let s = summary(fixture!("run.stdout"), fixture!("run.stderr"), None);
    assert_eq!(s.source, Source::Report);
    assert_eq!(s.processed, 27_997);
    assert_eq!((s.failed, s.retried, s.broken_connections, s.aborted), (0, Some(0), 0, false));
    assert_eq!((s.latency_avg_ms, s.latency_stddev_ms, s.tps), (Some(0.706), Some(0.342), Some(5636.615188)));
    assert_eq!(s.worst_second_latency_ms, Some(0.905));
    assert_eq!(s.max_latency_ms, None);
    assert!(s.clean());
    assert!(!Summary { exit: Some(1), ..s }.clean(), "pgbench gave up (bad option, say)");
}

#[test]
fn failures_are_counted_per_interval_and_in_the_report() {
    // --max-tries=1 on a script that fights over three rows in REPEATABLE READ.
    let (samples, _) = read(fixture!("serialization.stderr"));
    let per_interval: Vec<u64> = samples.iter().map(|s| s.failed).collect();
    assert_eq!(per_interval, [731, 746, 695, 682]);
    assert!(samples.iter().all(|s| s.retried.is_none()), "no retry columns with one try");
    let s = summary(fixture!("serialization.stdout"), fixture!("serialization.stderr"), None);
    assert_eq!((s.processed, s.failed), (3351, 2854));
    assert_eq!(s.failed, per_interval.iter().sum::<u64>());
    assert!(!s.clean());
}

#[test]
fn retries_are_read_where_max_tries_allows_them() {
    let (samples, _) = read(fixture!("retries.stderr"));
    assert_eq!((samples[0].failed, samples[0].retried, samples[0].retries), (39, Some(289), Some(397)));
    let s = summary(fixture!("retries.stdout"), fixture!("retries.stderr"), None);
    assert_eq!((s.processed, s.failed, s.retried), (1925, 167, Some(966)));
}

#[test]
fn a_run_by_transaction_count_reads_done_of_asked() {
    // "number of transactions actually processed: 1000/1000" (-t 500, 2 clients).
    let s = summary(fixture!("count.stdout"), fixture!("count.stderr"), None);
    assert_eq!((s.source, s.processed, s.tps), (Source::Report, 1000, Some(251.352717)));
}

#[test]
fn a_killed_server_is_broken_connections_and_an_aborted_run() {
    // pg_ctl -m immediate stop under 4 clients: four "client N aborted" lines.
    let s = summary(fixture!("killed.stdout"), fixture!("killed.stderr"), None);
    assert_eq!(s.broken_connections, 4);
    assert!(s.aborted);
    assert_eq!((s.source, s.processed, s.failed), (Source::Report, 3946, 0));
    assert!(!s.clean(), "aborted clients are errors a database client saw");
    assert!(s.errors.iter().any(|e| e.contains("client 2 aborted in command 10")), "{:?}", s.errors);
}

#[test]
fn a_terminated_backend_is_one_aborted_client_among_progress_lines() {
    // pg_terminate_backend on one of three: "client 0 script 0 aborted in
    // command 7 query 0: FATAL: ..." and its CONTEXT line, between samples.
    let (samples, errors) = read(fixture!("terminated.stderr"));
    assert_eq!(samples.len(), 5);
    assert_eq!(errors.broken_connections, 1);
    assert_eq!(errors.lines.len(), 2, "the abort and the run's end: {:?}", errors.lines);
}

#[test]
fn a_refused_connection_counts_once_and_sums_to_nothing() {
    let s = summary(fixture!("refused.stdout"), fixture!("refused.stderr"), None);
    assert_eq!(s.broken_connections, 1, "the follow-up 'could not create connection' is the same failure");
    assert_eq!((s.source, s.processed, s.tps, s.retried), (Source::Progress, 0, None, None));
    assert!(!s.aborted);
    assert!(!s.clean());
}

#[test]
fn a_stopped_run_is_summed_from_its_progress() {
    // SIGTERM after 2.5 s: pgbench prints no report.
    let s = summary(fixture!("sigterm.stdout"), fixture!("sigterm.stderr"), None);
    assert_eq!(s.source, Source::Progress);
    assert_eq!(s.processed, 131 + 452);
    let avg = s.latency_avg_ms.unwrap_or_default();
    let want = (131.0 * 12.469 + 452.0 * 4.467) / 583.0;
    assert!((avg - want).abs() < 1e-9, "{avg} vs {want}");
    assert!(s.tps.is_some_and(|t| (t - 291.5).abs() < 0.01), "{:?}", s.tps);
    assert!(s.clean());
}

#[test]
fn a_paused_server_shows_as_an_empty_second_and_the_longest_transaction() {
    // Every postgres process SIGSTOPped for 2.5 s, as a VM's pause would.
    let (samples, _) = read(fixture!("paused.stderr"));
    let empty = samples.iter().find(|s| s.tps == 0.0).map(|s| (s.latency_ms, s.stddev_ms));
    assert_eq!(empty, Some((None, None)), "an empty second has no latency, not 0 ms");
    let max = [fixture!("paused_log/pgbench.20519"), fixture!("paused_log/pgbench.20519.1")]
        .iter()
        .filter_map(|l| aggregate_max_ms(l))
        .reduce(f64::max);
    assert_eq!(max, Some(2505.401));
    let s = summary(fixture!("paused.stdout"), fixture!("paused.stderr"), max);
    assert_eq!((s.max_latency_ms, s.worst_second_latency_ms), (Some(2505.401), Some(3.788)));
    assert!(s.clean());
}

#[test]
fn progress_lines_in_other_forms() {
    let plain =
        progress("progress: 5.0 s, 123.4 tps, lat 1.234 ms stddev 0.567, 2 failed").map(|s| (s.at, s.failed));
    assert_eq!(plain, Some((5.0, 2)));
    let rate =
        progress("progress: 3.0 s, 10.0 tps, lat 2.000 ms stddev 0.100, 0 failed, lag 0.050 ms, 1 skipped");
    assert_eq!(rate.map(|s| (s.tps, s.latency_ms)), Some((10.0, Some(2.0))));
    let nan = progress("progress: 3.0 s, 1.0 tps, lat 2.000 ms stddev -nan, 0 failed");
    assert_eq!(nan.map(|s| (s.latency_ms, s.stddev_ms)), Some((Some(2.0), None)));
    for other in [
        "pgbench: error: Run was aborted; the above results are incomplete.",
        "pgbench: unrecognized option '--max-triez=3'",
        "progress: soon",
        "WARNING:  terminating connection due to immediate shutdown command",
        "",
    ] {
        assert_eq!(progress(other), None, "{other}");
    }
}

#[test]
fn pgbench_lines_without_error_are_kept_and_the_server_s_are_not() {
    let mut e = Errors::default();
    e.add("pgbench: unrecognized option '--max-triez=3'");
    e.add("WARNING:  terminating connection due to immediate shutdown command");
    e.add("\tIs the server running on that host and accepting TCP/IP connections?");
    assert_eq!(e.lines, ["unrecognized option '--max-triez=3'"]);
    assert_eq!((e.broken_connections, e.aborted), (0, false));
}

#[test]
fn init_and_psql_failures_read_as_errors() {
    let (_, e) = read(fixture!("init_fail.stderr"));
    assert_eq!(e.broken_connections, 1);
    assert!(e.lines[0].contains("database \"nosuchdb\" does not exist"));
    assert!(fixture!("init.stderr").contains("done in"), "the fixture of a good init");
    assert!(fixture!("psql_error.stderr").starts_with("ERROR:  relation \"nosuch\""));
}

#[test]
fn the_command_line_carries_the_options_and_never_the_password() {
    let t = Target::new("10.0.0.2", 5433, "bench", "bench").password("s3cret");
    let mut o = Opts::new(t.clone(), 1);
    o.threads = 4;
    o.run = Run::For(Duration::from_millis(30_400));
    o.protocol = Protocol::Extended;
    o.script = Script::SelectOnly;
    o.log_dir = Some("/tmp/run-1".into());
    let a = o.args();
    for want in [
        "--client=1",
        "--jobs=1",
        "--time=30",
        "--protocol=extended",
        "--progress=1",
        "--progress-timestamp",
        "--max-tries=3",
        "--failures-detailed",
        "--select-only",
        "--no-vacuum",
        "--log",
        "--aggregate-interval=1",
        "--log-prefix=/tmp/run-1/pgbench",
    ] {
        assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
    }
    assert_eq!(a.last().map(String::as_str), Some("bench"), "the database goes last");
    let c = t.command(&super::host, "pgbench");
    let args: Vec<String> = c.get_args().map(|s| s.to_string_lossy().into_owned()).collect();
    assert_eq!(args, ["-h", "10.0.0.2", "-p", "5433", "-U", "bench"]);
    let env: Vec<_> = c.get_envs().filter(|(k, _)| *k == "PGPASSWORD").filter_map(|(_, v)| v).collect();
    assert_eq!(env, ["s3cret"]);
    assert!(!format!("{t:?} {o:?}").contains("s3cret"), "Debug shows the password");
    let until = Opts::new(t.clone(), 8).args();
    assert!(until.iter().any(|x| x == "--time=604800"), "until stopped is a week at most: {until:?}");
    assert!(!until.iter().any(|x| x.starts_with("--rate")), "no schedule unless asked: {until:?}");
    let paced = Opts { rate: Some(10.0), ..Opts::new(t, 2) }.args();
    assert!(paced.iter().any(|x| x == "--rate=10"), "{paced:?}");
}

#[test]
fn the_memory_hungry_query_raises_work_mem_first() {
    let q = memory_hungry_sql(20_000_000, 1024);
    assert!(q.starts_with("SET work_mem = '1024MB';"), "{q}");
    assert!(q.contains("generate_series(1, 20000000)") && q.contains("ORDER BY random()"), "{q}");
}

/// The driver against a real server, when one is named:
/// `VMSCALE_PGBENCH_TARGET=host:port:db:user:password` (tables made by
/// `pgbench -i`). Run with `--ignored`; nothing in the project starts a
/// server on the host.
#[test]
#[ignore = "needs a Postgres server named by VMSCALE_PGBENCH_TARGET"]
fn a_real_run_gives_live_samples_a_stop_and_a_query() {
    let Ok(spec) = std::env::var("VMSCALE_PGBENCH_TARGET") else { return };
    let f: Vec<&str> = spec.split(':').collect();
    let t = Target::new(f[0], f[1].parse().expect("port"), f[2], f[3]).password(f[4]);
    let dir = std::env::temp_dir().join(format!("vmscale-pgbench-{}", std::process::id()));
    let mut o = Opts::new(t.clone(), 2);
    o.log_dir = Some(dir.clone());
    let mut b = super::Pgbench::start(&o, &super::host).expect("start");
    std::thread::sleep(Duration::from_millis(3500));
    assert!(b.running());
    let live = b.samples();
    assert!(live.len() >= 2, "samples while it runs: {live:?}");
    assert!(live.iter().all(|s| s.tps > 0.0 && s.at > 1.7e9), "{live:?}");
    let s = b.stop().expect("stop");
    assert_eq!(s.source, Source::Progress, "a stopped pgbench prints no report");
    assert!(s.processed > 0 && s.clean(), "{s:?}");
    let timed = Opts { run: Run::For(Duration::from_secs(2)), ..o };
    std::fs::remove_dir_all(&dir).expect("clear the log directory");
    let s = super::Pgbench::start(&timed, &super::host)
        .expect("start")
        .wait(Duration::from_secs(30))
        .expect("wait");
    assert_eq!(s.source, Source::Report);
    assert!(s.processed > 0 && s.clean() && s.max_latency_ms.is_some(), "{s:?}");
    let q =
        super::sql(&t, &super::host, &memory_hungry_sql(200_000, 64), Duration::from_secs(60)).expect("psql");
    assert_eq!((q.error.as_deref(), q.output.as_str()), (None, "200000"), "{q:?}");
    let bad = super::sql(&t, &super::host, "SELECT nosuch", Duration::from_secs(60)).expect("psql");
    assert!(bad.error.is_some_and(|e| e.contains("nosuch")));
    super::init(&t, &super::host, 1, Duration::from_secs(120)).expect("init");
    let _ = std::fs::remove_dir_all(&dir);
}
