//! The gRPC figures: the release allocator in a process of its own, and 1, 16
//! and 256 agents (each its own node, session and connection) in this one.
//!
//! - Closed loop: every agent keeps a fixed number of requests in flight on
//!   its session; the rate of answers is the most the pair sustains.
//! - Open loop: requests are sent on a fixed schedule (10,000/s across the
//!   agents) by a pacing thread, whatever the answers do, and latency is
//!   measured from the time a request was due, so a slow answer cannot hide
//!   the requests it delayed (no coordinated omission).

mod agent;

use crate::report::{cpu_seconds, fmt_value, percentile_ms};
use agent::{answer, latency_ns, stamp, Agent, Script};
use anyhow::{bail, Context};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const LEVELS: [usize; 3] = [1, 16, 256];
/// The offered rate of the latency measurement.
const OFFERED_PER_S: u64 = 10_000;
/// Open-loop runs per number of agents; the median p99 counts.
const OPEN_RUNS: usize = 3;

/// Requests each agent keeps in flight in the closed loop.
fn window(agents: usize) -> usize {
    (1024 / agents).clamp(4, 256)
}

/// The server process; killed when dropped, so a failed run leaves none behind.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Clone, Copy)]
struct Phases {
    warmup: Duration,
    closed: Duration,
    open: Duration,
}

pub fn run(server: &Path, quick: bool, levels: &[usize]) -> anyhow::Result<Map<String, Value>> {
    let levels = if levels.is_empty() { &LEVELS[..] } else { levels };
    // A port the server binds right after, which nobody else takes meanwhile.
    let port = vmscale_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into())?;
    let child = Command::new(server)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--http-listen", "127.0.0.1:0", "--log", "warn"])
        // Plain text: the figures are the allocator's, not TLS's.
        .arg("--insecure")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", server.display()))?;
    let server = Server(child);
    let pid = server.0.id().to_string();
    let addr = format!("http://127.0.0.1:{port}");
    let phases = if quick {
        Phases {
            warmup: Duration::from_millis(300),
            closed: Duration::from_secs(1),
            open: Duration::from_secs(2),
        }
    } else {
        Phases {
            warmup: Duration::from_secs(1),
            closed: Duration::from_secs(4),
            open: Duration::from_secs(6),
        }
    };
    // The closed loop needs all the client CPU it can get: two threads. The
    // open loop needs little: one thread, so that the agents take as little of
    // the machine from the server as they can.
    let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let single = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    multi.block_on(wait_ready(port))?;
    let mut rows = Vec::new();
    for &agents in levels {
        let w = window(agents);
        let closed = multi.block_on(async {
            let fleet = open_fleet(&addr, &format!("closed-{agents}"), agents).await?;
            println!(
                "grpc: {agents} agents, {w} requests in flight each: closed loop for {:?}",
                phases.closed
            );
            closed_loop(fleet, w, &pid, phases.warmup, phases.closed).await
        })?;
        println!(
            "grpc: {agents} agents: {:.0} requests/s sustained, p50 {:.3} ms, p99 {:.3} ms (server CPU {:.0}%, client {:.0}%)",
            closed["per_s"].as_f64().unwrap_or(0.0),
            closed["p50_ms"].as_f64().unwrap_or(0.0),
            closed["p99_ms"].as_f64().unwrap_or(0.0),
            closed["server_cpu_pct"].as_f64().unwrap_or(0.0),
            closed["client_cpu_pct"].as_f64().unwrap_or(0.0),
        );
        // Host noise (this machine is a VM) comes in bursts: the open loop runs
        // OPEN_RUNS times and the run with the median p99 stands for the level.
        let mut runs = Vec::new();
        for run in 1..=OPEN_RUNS {
            let open = single.block_on(async {
                let fleet = open_fleet(&addr, &format!("open-{agents}-{run}"), agents).await?;
                open_loop(fleet, &pid, phases.warmup, phases.open).await
            })?;
            println!(
                "grpc: {agents} agents at {OFFERED_PER_S}/s offered (run {run} of {OPEN_RUNS}, {:?}): {:.0}/s \
                 answered, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (sender late: p99 {:.3} ms, max {:.3} ms; \
                 server CPU {:.0}%, client {:.0}%)",
                phases.open,
                open["per_s"].as_f64().unwrap_or(0.0),
                open["p50_ms"].as_f64().unwrap_or(0.0),
                open["p99_ms"].as_f64().unwrap_or(0.0),
                open["max_ms"].as_f64().unwrap_or(0.0),
                open["sender_late_p99_ms"].as_f64().unwrap_or(0.0),
                open["sender_late_max_ms"].as_f64().unwrap_or(0.0),
                open["server_cpu_pct"].as_f64().unwrap_or(0.0),
                open["client_cpu_pct"].as_f64().unwrap_or(0.0),
            );
            runs.push(open);
        }
        let p99s: Vec<f64> = runs.iter().map(|r| r["p99_ms"].as_f64().unwrap_or(f64::NAN)).collect();
        runs.sort_by(|a, b| {
            a["p99_ms"].as_f64().unwrap_or(0.0).total_cmp(&b["p99_ms"].as_f64().unwrap_or(0.0))
        });
        let mut open = runs.swap_remove(runs.len() / 2);
        open["p99_ms_of_runs"] = json!(p99s);
        rows.push(json!({ "agents": agents, "window": w, "closed": closed, "open": open }));
    }
    let server_rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_owned())));
    drop(server);

    let best = rows.iter().map(|r| r["closed"]["per_s"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max);
    let worst_p99 = rows.iter().map(|r| r["open"]["p99_ms"].as_f64().unwrap_or(f64::NAN)).fold(0.0, f64::max);
    let mut m = Map::new();
    m.insert("grpc_reservations_per_s".into(), json!(best.round()));
    m.insert("grpc_p99_ms".into(), json!((worst_p99 * 1000.0).round() / 1000.0));
    m.insert(
        "grpc".into(),
        json!({
            "levels": rows, "offered_per_s": OFFERED_PER_S, "open_seconds": phases.open.as_secs_f64(),
            "server_rss": server_rss,
        }),
    );
    Ok(m)
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("the allocator did not listen on port {port} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// CPU seconds of the server and of this process over the measured window.
async fn cpu_over(pid: String, from: Instant, until: Instant) -> (f64, f64) {
    tokio::time::sleep_until(from.into()).await;
    let (s0, c0) = (cpu_seconds(&pid), cpu_seconds("self"));
    tokio::time::sleep_until(until.into()).await;
    (cpu_seconds(&pid) - s0, cpu_seconds("self") - c0)
}

/// Opens `agents` sessions, each a node of its own, on the current runtime.
async fn open_fleet(addr: &str, tag: &str, agents: usize) -> anyhow::Result<Vec<Agent>> {
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..agents {
        let (addr, node) = (addr.to_owned(), format!("bench-{tag}-{i}"));
        opening.spawn(async move { Agent::open(&addr, node).await });
    }
    let mut fleet = Vec::with_capacity(agents);
    while let Some(a) = opening.join_next().await {
        fleet.push(a??);
    }
    Ok(fleet)
}

fn figures(mut lat: Vec<u64>, window: Duration, cpu: (f64, f64)) -> Value {
    let secs = window.as_secs_f64();
    json!({
        "answers": lat.len(),
        "per_s": (lat.len() as f64 / secs).round(),
        "p50_ms": percentile_ms(&mut lat, 50.0),
        "p99_ms": percentile_ms(&mut lat, 99.0),
        "p999_ms": percentile_ms(&mut lat, 99.9),
        "max_ms": percentile_ms(&mut lat, 100.0),
        "server_cpu_pct": (cpu.0 / secs * 100.0).round(),
        "client_cpu_pct": (cpu.1 / secs * 100.0).round(),
    })
}

/// Every agent keeps `window` requests in flight; counts the answers that
/// arrive within the measured window after the warm-up.
async fn closed_loop(
    fleet: Vec<Agent>,
    window: usize,
    pid: &str,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    let (from, until) = (t0 + warmup, t0 + warmup + measure);
    let cpu = tokio::spawn(cpu_over(pid.to_owned(), from, until));
    let mut tasks = tokio::task::JoinSet::new();
    for mut a in fleet {
        tasks.spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..window {
                a.tx.send(a.script.next(stamp(t0, Instant::now()))).await?;
            }
            let mut in_flight = window;
            while in_flight > 0 {
                let id = answer(&mut a.rx).await?;
                let now = Instant::now();
                in_flight -= 1;
                if now >= from && now < until {
                    lat.push(latency_ns(t0, id, now));
                }
                if now < until {
                    a.tx.send(a.script.next(stamp(t0, now))).await?;
                    in_flight += 1;
                }
            }
            anyhow::Ok(lat) // the agent goes: its session ends
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(figures(all, measure, cpu.await?))
}

/// A pacing thread sends `OFFERED_PER_S` requests a second, round robin over
/// the agents; one task per agent reads the answers.
async fn open_loop(
    fleet: Vec<Agent>,
    pid: &str,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Value> {
    let n = fleet.len();
    let total = OFFERED_PER_S * vmscale_common::time::millis(warmup + measure) / 1000;
    let interval_ns = 1_000_000_000 / OFFERED_PER_S;
    let t0 = Instant::now() + Duration::from_millis(20);
    let from = t0 + warmup;
    let cpu = tokio::spawn(cpu_over(pid.to_owned(), from, from + measure));
    let mut senders: Vec<mpsc::Sender<_>> = Vec::with_capacity(n);
    let mut scripts: Vec<Script> = Vec::with_capacity(n);
    let mut readers = tokio::task::JoinSet::new();
    for (i, Agent { tx, mut rx, script }) in fleet.into_iter().enumerate() {
        senders.push(tx);
        scripts.push(script);
        // Agent i gets requests i, i + n, i + 2n, ... below `total`.
        let expected = (total + (n - i - 1) as u64) / n as u64;
        readers.spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..expected {
                let id = answer(&mut rx).await?;
                let now = Instant::now();
                let due = t0 + Duration::from_nanos(id - 1);
                if due >= from {
                    lat.push(latency_ns(t0, id, now));
                }
            }
            anyhow::Ok(lat)
        });
    }
    let pacer = std::thread::spawn(move || {
        let mut dropped = 0u64;
        // How late each request left: the machine's scheduling delay, which
        // the latencies (measured from the due time) include.
        let mut late = Vec::new();
        for k in 0..total {
            let due = t0 + Duration::from_nanos(k * interval_ns);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if due >= from {
                late.push(latency_ns(t0, stamp(t0, due), Instant::now()));
            }
            let a = usize::try_from(k).unwrap_or(0) % n;
            if senders[a].try_send(scripts[a].next(stamp(t0, due))).is_err() {
                dropped += 1;
            }
        }
        (dropped, late) // the senders go: the sessions end
    });
    let mut all = Vec::new();
    while let Some(r) = readers.join_next().await {
        all.extend(r??);
    }
    let (dropped, mut late) = pacer.join().map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    if dropped > 0 {
        bail!("{dropped} requests could not be queued: the session queues were full");
    }
    let mut v = figures(all, measure, cpu.await?);
    v["sender_late_p99_ms"] = json!(percentile_ms(&mut late, 99.0));
    v["sender_late_max_ms"] = json!(percentile_ms(&mut late, 100.0));
    Ok(v)
}

pub fn markdown(m: &Map<String, Value>) -> String {
    let g = m.get("grpc").cloned().unwrap_or(Value::Null);
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "gRPC: the release `vmscale-allocator` with its default settings (a tokio runtime with a thread \
         per core) in its own process on 127.0.0.1, the agents in the benchmark's process: a 2-thread \
         tokio runtime for the closed loop, a 1-thread one for the open loop. Each agent is a node of 64 \
         VMs with its own session and HTTP/2 connection (TCP_NODELAY). Requests alternate between an \
         increase by one CU and the decrease back (all granted); each counts as one reservation. Closed \
         loop: each agent keeps the stated number of requests in flight (pipelined by request id), so its \
         latencies are queueing at saturation. Open loop: {} requests/s offered on a fixed schedule, round \
         robin over the agents, latency from the time each request was due; three runs of {} s per number \
         of agents, of which the table shows the one with the median p99 (the last column has all three). \
         \"Sender late\" is how late the pacing thread sent requests after their due time: the machine's \
         own scheduling delay, which the latencies include. `grpc_reservations_per_s` is the best \
         closed-loop rate, `grpc_p99_ms` the worst of the three median p99s. Server and client share the \
         machine's 2 cores.\n",
        fmt_value(&g["offered_per_s"]),
        g["open_seconds"]
    );
    let _ = writeln!(
        s,
        "| agents | in flight per agent | sustained /s | p50 | p99 | server CPU | client CPU | \
         at 10,000/s: answered /s | p50 | p99 | p99.9 | max | sender late p99 | p99 of the runs |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in g["levels"].as_array().into_iter().flatten() {
        let (c, o) = (&r["closed"], &r["open"]);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} ms | {:.2} ms | {:.0}% | {:.0}% | {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms \
             | {:.3} ms | {} |",
            r["agents"],
            r["window"],
            fmt_value(&c["per_s"]),
            f(&c["p50_ms"]),
            f(&c["p99_ms"]),
            f(&c["server_cpu_pct"]),
            f(&c["client_cpu_pct"]),
            fmt_value(&o["per_s"]),
            f(&o["p50_ms"]),
            f(&o["p99_ms"]),
            f(&o["p999_ms"]),
            f(&o["max_ms"]),
            f(&o["sender_late_p99_ms"]),
            o["p99_ms_of_runs"]
                .as_array()
                .map(|a| a.iter().map(|v| format!("{:.2}", f(v))).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
        );
    }
    let _ = writeln!(s);
    s
}
