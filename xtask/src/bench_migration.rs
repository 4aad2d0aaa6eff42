//! `cargo xtask bench migration`: live migration of the test guest between
//! two network-namespace nodes (see `migration.rs`), for a 256 MiB and a
//! 1 GiB guest, while a TCP client echoes a line every 100 ms through it.
//!
//! Each round moves the guest three times: by the agent's own move executor
//! (`migration::agent_move`: `carry_out` with the target side the target
//! agent runs, `LocalIncoming`, started in the target node's namespace: the
//! VM described from the source's /proc, its devices, capabilities,
//! bandwidth and downtime limits, progress polled every 50 ms and woken by
//! QEMU's events, the target paused until the confirm resumes it), the same
//! with QEMU's TLS on the stream (each node's certificate from one test CA,
//! `tls-authz` on the target naming the source node), and as a bare
//! QEMU-to-QEMU migration (the same bandwidth limit, nothing else set,
//! polled every 10 ms), so all three are measured on the same guest in the
//! same run. A fresh client connection covers each move, so its longest
//! silence and lost lines belong to that move. Which kind goes first turns
//! round by round, and one uncounted move after boot goes first of all.

use crate::harness::{loadavg, now_utc};
use anyhow::Context;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

use vmscale_agent::qmp::migrate::{tcp_uri, Migration, MigrationConfig};

use crate::echo::{EchoClient, EchoReport};
use crate::migration::{
    agent_move, guest_image, guest_ip, last_event_us, pause_ms, start, MoveFigures, MoveSetup, Running,
    Shape, ECHO_PORT, TAP,
};
use crate::netns::Fabric;

/// Where the bare migration's target listens (not the agent's port).
const BARE_PORT: u16 = 4445;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Ours,
    /// The agent's move with QEMU's TLS on the stream.
    OursTls,
    Bare,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ours => "vmscale",
            Kind::OursTls => "vmscale-tls",
            Kind::Bare => "bare",
        }
    }

    /// The kinds of round `round`, in the order they run: each goes first,
    /// second and third in turn, so a slow start or a busy neighbour does
    /// not always fall on the same one.
    fn in_round(round: u32) -> [Kind; 3] {
        let mut kinds = [Kind::Ours, Kind::OursTls, Kind::Bare];
        kinds.rotate_left(usize::try_from(round % 3).unwrap_or(0));
        kinds
    }
}

/// One move's figures and its client's.
struct Sample {
    moved: MoveFigures,
    echo: EchoReport,
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let rounds = if quick { 2 } else { 5 };
    let sizes: &[u64] = if quick { &[256] } else { &[256, 1024] };
    let mut steps = crate::steps::Steps::new(sizes.len() + 1);
    let image = guest_image(false)?;
    let config = MigrationConfig::default();
    let load_before = loadavg();
    let mut results = Vec::new();
    for &mib in sizes {
        let mut out = None;
        steps.call(
            &format!("{mib} MiB guest: {rounds} rounds of a vmscale move, one over tls and a bare QEMU move"),
            || {
                let rt =
                    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                out = Some(rt.block_on(size_run(&image, mib, rounds, &config))?);
                Ok(())
            },
        )?;
        results.push(out.context("no figures")?);
    }
    let date = now_utc();
    let v = json!({
        "date": date,
        "machine": "2 vCPUs, TCG (no KVM); nodes are network namespaces on one host",
        "downtime_limit_ms": config.downtime_limit_ms,
        "max_bandwidth_bytes_per_s": config.max_bandwidth_bytes_per_s,
        "rounds": rounds,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "guests": results,
    });
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let json_path = dir.join("migration.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&v)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    eprintln!("    figures in {}", json_path.display());
    let md = markdown(&v, &config);
    println!("{md}");
    if quick {
        eprintln!("    quick run: BENCHMARKS.md left as it was");
        return Ok(());
    }
    steps.call("record the figures in BENCHMARKS.md", || {
        crate::bench::record(&crate::workspace_root().join("BENCHMARKS.md"), "migration", &md)
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Boots one guest and runs `rounds` pairs of moves.
async fn size_run(
    image: &crate::guest::Image,
    mib: u64,
    rounds: u32,
    config: &MigrationConfig,
) -> anyhow::Result<Value> {
    let fabric = Fabric::new(2)?;
    let dir = crate::migration::run_dir()?.join(format!("{mib}"));
    let base = Shape::new(mib).base_args(image, &fabric);
    let template = crate::migration::template(image);
    let pki = crate::migration::StreamPki::new(&dir, 2)?;
    fabric.add_tap(0, TAP)?;
    fabric.add_tap(1, TAP)?;
    let mut boot = start(&fabric, 0, &base, &[], &dir.join("boot"))?;
    let addr = (guest_ip(&fabric), ECHO_PORT).into();
    let first = tokio::task::block_in_place(|| {
        crate::echo::connect(addr, Duration::from_secs(180), || boot.exited())
    })
    .with_context(|| boot.logs())?;
    drop(first);
    let mut vm = Running::Harness(boot);
    let (mut ours, mut ours_tls, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    // Let the guest settle after boot (the informant starts its sources),
    // then one move that is not counted: the first move of a guest is
    // slower, whichever kind it is.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let to = 1 - vm.node();
    vm = bare_move(&fabric, &base, &mut vm, to, config, &dir.join("warm-up")).await?.0;
    for round in 0..rounds {
        for kind in Kind::in_round(round) {
            let to = 1 - vm.node();
            let name = format!("{}-{round}", kind.name());
            let order = u64::from(round) + 1;
            let (moved_vm, sample) = with_client(addr, async {
                let plain = MoveSetup { config, template: &template, tls: None };
                match kind {
                    Kind::Ours => agent_move(&fabric, &mut vm, to, plain, &dir.join(&name), order).await,
                    Kind::OursTls => {
                        let tls = MoveSetup { tls: Some(&pki), ..plain };
                        agent_move(&fabric, &mut vm, to, tls, &dir.join(&name), order).await
                    }
                    Kind::Bare => bare_move(&fabric, &base, &mut vm, to, config, &dir.join(&name)).await,
                }
            })
            .await?;
            vm = moved_vm;
            eprintln!("    {name}: {:?}, client {:?}", sample.moved, sample.echo);
            match kind {
                Kind::Ours => ours.push(sample),
                Kind::OursTls => ours_tls.push(sample),
                Kind::Bare => bare.push(sample),
            }
        }
    }
    drop(vm);
    drop(fabric);
    let fig = |s: &[Sample], f: &dyn Fn(&Sample) -> f64| median(s.iter().map(f).collect());
    let summary = |s: &[Sample]| {
        json!({
            "migration_total_ms": fig(s, &|x| x.moved.total_ms as f64),
            "migration_downtime_ms": fig(s, &|x| x.moved.downtime_ms as f64),
            "guest_pause_ms": fig(s, &|x| x.moved.guest_pause_ms.unwrap_or(f64::NAN)),
            "migration_wall_ms": fig(s, &|x| x.moved.wall_ms as f64),
            "client_max_gap_ms": fig(s, &|x| x.echo.max_gap_ms),
            "lost_lines": s.iter().map(|x| x.echo.lost + x.echo.wrong).sum::<u64>(),
            "transferred_mib": fig(s, &|x| (x.moved.transferred_bytes >> 20) as f64),
            "throughput_mib_s": fig(s, &|x| {
                (x.moved.transferred_bytes as f64 / f64::from(1 << 20)) / (x.moved.total_ms.max(1) as f64 / 1000.0)
            }),
            "each": s.iter().map(|x| json!({
                "total_ms": x.moved.total_ms, "downtime_ms": x.moved.downtime_ms,
                "guest_pause_ms": x.moved.guest_pause_ms,
                "wall_ms": x.moved.wall_ms, "client_max_gap_ms": x.echo.max_gap_ms,
                "lines_sent": x.echo.sent, "lost_lines": x.echo.lost + x.echo.wrong,
            })).collect::<Vec<_>>(),
        })
    };
    Ok(json!({
        "memory_mib": mib,
        "vmscale": summary(&ours),
        "vmscale_tls": summary(&ours_tls),
        "bare_qemu": summary(&bare),
    }))
}

/// Runs `work` (a move) with a fresh echo connection that sends for 1 s
/// before and 1.5 s after it.
async fn with_client<F>(addr: std::net::SocketAddr, work: F) -> anyhow::Result<(Running, Sample)>
where
    F: std::future::Future<Output = anyhow::Result<(Running, MoveFigures)>>,
{
    let stream =
        tokio::task::block_in_place(|| crate::echo::connect(addr, Duration::from_secs(10), || None))?;
    let client = EchoClient::start(stream, Duration::from_millis(100))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (vm, moved) = work.await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let echo = tokio::task::block_in_place(|| client.finish(Duration::from_secs(5)))?;
    Ok((vm, Sample { moved, echo }))
}

/// A bare QEMU-to-QEMU migration: target with `-incoming tcp:...`, the same
/// bandwidth limit on the source and nothing else, `migrate`, poll.
async fn bare_move(
    fabric: &Fabric,
    base: &[String],
    source: &mut Running,
    to: usize,
    config: &MigrationConfig,
    dir: &Path,
) -> anyhow::Result<(Running, MoveFigures)> {
    let t0 = Instant::now();
    let uri = tcp_uri((fabric.nodes[to].addr, BARE_PORT).into());
    let target = start(fabric, to, base, &["-incoming".into(), uri.clone()], dir)?;
    // The QMP socket appears before QEMU listens for the stream; QMP
    // answering means its main loop, and so the listener, is up.
    let incoming = Migration::new(target.client().await?);
    let mut target_events = incoming.client().events();
    incoming.run_status().await?;
    let out = source.client().await?;
    // A QEMU that came in over TLS keeps its stream parameters: plain again.
    let plain = vmscale_agent::migration::stream_tls::source_commands(None);
    vmscale_agent::migration::stream_tls::apply(&out, plain)
        .await
        .map_err(|e| anyhow::anyhow!("{}", vmscale_agent::migration::reason(&e)))?;
    let mut source_events = out.events();
    out.execute::<Value>(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": config.max_bandwidth_bytes_per_s})),
    )
    .await?;
    out.execute::<Value>("migrate", Some(json!({ "uri": uri }))).await?;
    let m = Migration::new(out.clone());
    let poll = MigrationConfig { poll_ms: 10, ..config.clone() };
    let info = m.wait(&poll, |_| {}).await.with_context(|| target.logs())?;
    let _ = out.execute::<Value>("quit", None).await;
    source.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !incoming.run_status().await?.running {
        anyhow::ensure!(Instant::now() < deadline, "bare target does not run:\n{}", target.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pause =
        pause_ms(last_event_us(&mut source_events, "STOP"), last_event_us(&mut target_events, "RESUME"));
    let moved = MoveFigures { guest_pause_ms: pause, ..MoveFigures::from_info(&info, t0.elapsed()) };
    Ok((Running::Harness(target), moved))
}

fn markdown(v: &Value, config: &MigrationConfig) -> String {
    let g = |x: &Value, k: &str| x.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let mut s = format!(
        "## Live migration\n\n`cargo xtask bench migration`, {} ({}; {} rounds, medians). The guest moves \
         between two network-namespace nodes over a bridge while a TCP client sends a line every 100 ms to \
         an echo server in it (a fresh connection per move). \"vmscale\" is the agent's move executor \
         (`carry_out` to the target side a target agent runs: the VM described as typed data from the \
         source's /proc, the target's own command line from it, devices, capabilities, {} MiB/s and {} ms limits, the target paused until the confirm resumes it); \
         \"bare\" is plain `migrate` with the same bandwidth limit, the same guest, the same run. \
         \"downtime\" is QEMU's figure (source side, up to the last state sent); \"guest pause\" is \
         from the source's STOP event to the target's RESUME (QEMU's timestamps, one host clock), so it \
         also holds the target loading the last state and, for vmscale, the confirm that resumes it.\n\n\
         \"tls stream\" is the same move with QEMU's TLS on the stream (`tls-creds-x509` on both QEMUs, \
         `tls-authz` on the target naming the source node's certificate). The three kinds take turns \
         going first, round by round.\n\n\
         | guest | move | total ms (QEMU) | wall ms | downtime ms | guest pause ms | client max gap ms | lost lines | MiB sent | MiB/s |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        v["date"].as_str().unwrap_or("?"),
        v["machine"].as_str().unwrap_or("?"),
        v["rounds"],
        config.max_bandwidth_bytes_per_s >> 20,
        config.downtime_limit_ms,
    );
    let mut verdicts = Vec::new();
    for guest in v["guests"].as_array().into_iter().flatten() {
        let mib = guest["memory_mib"].as_u64().unwrap_or(0);
        for (name, key) in
            [("vmscale", "vmscale"), ("vmscale, tls stream", "vmscale_tls"), ("bare", "bare_qemu")]
        {
            let x = &guest[key];
            s.push_str(&format!(
                "| {mib} MiB | {name} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {} | {:.0} | {:.0} |\n",
                g(x, "migration_total_ms"),
                g(x, "migration_wall_ms"),
                g(x, "migration_downtime_ms"),
                g(x, "guest_pause_ms"),
                g(x, "client_max_gap_ms"),
                x["lost_lines"],
                g(x, "transferred_mib"),
                g(x, "throughput_mib_s"),
            ));
        }
        let (ours, bare, tls) = (&guest["vmscale"], &guest["bare_qemu"], &guest["vmscale_tls"]);
        verdicts.push(format!(
            "{mib} MiB over tls: total {:.2}x plain, downtime {:.0} ms vs {:.0} ms, {:.0} vs {:.0} MiB/s, lost lines {}",
            g(tls, "migration_total_ms") / g(ours, "migration_total_ms"),
            g(tls, "migration_downtime_ms"),
            g(ours, "migration_downtime_ms"),
            g(tls, "throughput_mib_s"),
            g(ours, "throughput_mib_s"),
            tls["lost_lines"],
        ));
        let ratio = g(ours, "migration_total_ms") / g(bare, "migration_total_ms");
        verdicts.push(format!(
            "{mib} MiB: lost lines {} ({}), downtime {:.0} ms <= {} ms ({}), guest pause {:.1} ms <= {} ms ({}), \
             total {:.2}x bare ({} <= 1.5x)",
            ours["lost_lines"],
            verdict(ours["lost_lines"].as_u64() == Some(0)),
            g(ours, "migration_downtime_ms"),
            config.downtime_limit_ms,
            verdict(g(ours, "migration_downtime_ms") <= config.downtime_limit_ms as f64),
            g(ours, "guest_pause_ms"),
            config.downtime_limit_ms,
            verdict(g(ours, "guest_pause_ms") <= config.downtime_limit_ms as f64),
            ratio,
            verdict(ratio <= 1.5),
        ));
    }
    s.push_str(&format!(
        "\nLoad average before and after: {} / {} (other work shares the two cores; single moves vary \
         by 2-5x, so the medians of the two kinds move around from run to run).\n",
        v["loadavg_before"].as_str().unwrap_or("?"),
        v["loadavg_after"].as_str().unwrap_or("?"),
    ));
    s.push_str("\nTargets: ");
    s.push_str(&verdicts.join("; "));
    s.push_str(".\n");
    s
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}
