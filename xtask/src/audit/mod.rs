//! `cargo xtask audit`: proof against hostile input (issue 16, item 6).
//!
//! 1. The hostile-client suite ([`attacks`]): the real allocator, agents and
//!    informant on real sockets, each attacked the way the security review
//!    found possible; an attack passes only when it is refused with a clear
//!    status and the daemons' `/state` is as it was ([`state`]).
//! 2. The fuzz pass ([`fuzz`]): every decoder of remote input for a bounded
//!    time each.
//!
//! Prints one line per attack and per fuzz target, writes
//! `target/bench/audit.json` ([`report`]) and fails when anything got in or
//! crashed.

mod attacks;
mod fuzz;
mod hostile;
mod http;
mod lab;
mod report;
mod state;
mod tls;

use anyhow::{bail, Context};
use report::{Attack, Report};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The short pass the test command runs: smaller floods and a few
    /// seconds per fuzz target.
    #[arg(long)]
    pub quick: bool,
    /// Seconds each fuzz target runs. Default 8 with --quick, else 60.
    #[arg(long)]
    pub fuzz_seconds: Option<u64>,
    /// Only the hostile-client suite.
    #[arg(long, conflicts_with = "no_attacks")]
    pub no_fuzz: bool,
    /// Only the fuzz pass.
    #[arg(long)]
    pub no_attacks: bool,
    /// Only this family of attacks (allocator-session, extender,
    /// migration-target, migration-source, informant).
    #[arg(long)]
    pub only: Option<String>,
}

/// The families of attacks, in the order they run.
const FAMILIES: [&str; 5] =
    ["allocator-session", "extender", "migration-target", "migration-source", "informant"];

pub fn run(a: Args) -> anyhow::Result<()> {
    if let Some(o) = a.only.as_deref().filter(|o| !FAMILIES.contains(o)) {
        bail!("--only {o}: no such family of attacks; the families are {}", FAMILIES.join(", "));
    }
    let t0 = std::time::Instant::now();
    let attacks = if a.no_attacks {
        vec![]
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        log_to_file()?;
        eprintln!("==> the hostile-client suite (daemon logs: target/audit/daemons.log)");
        rt.block_on(suite(a.quick, a.only.as_deref()))
    };
    for at in &attacks {
        println!("{}", at.line());
    }
    let suite_seconds = t0.elapsed().as_secs();
    let t1 = std::time::Instant::now();
    let fuzz = if a.no_fuzz {
        vec![]
    } else {
        fuzz::run(a.fuzz_seconds.unwrap_or(if a.quick { 8 } else { 60 }), a.quick)?
    };
    for f in &fuzz {
        println!("{}", f.line());
        if let Some(c) = &f.crash {
            println!("     run it again: {}", fuzz::rerun_hint(&f.target, c, a.quick));
        }
    }
    let report = Report {
        ran_at: crate::harness::now_utc(),
        suite_seconds,
        fuzz_pass_seconds: t1.elapsed().as_secs(),
        ..Report::new(attacks, fuzz)
    };
    let path = crate::workspace_root().join("target/bench/audit.json");
    std::fs::create_dir_all(path.parent().unwrap_or(&path))?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{} (written to {})", report.summary(), path.display());
    if !report.passed() {
        bail!("the audit found hostile input that got in or crashed a decoder: see the lines above");
    }
    Ok(())
}

/// One family's run, not yet started.
type Family = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Vec<Attack>>>>>;

/// Every family in turn; a family that cannot start is one attack that
/// could not run, not the end of the suite.
async fn suite(quick: bool, only: Option<&str>) -> Vec<Attack> {
    let mut out = Vec::new();
    let runs: [Family; 5] = [
        Box::pin(attacks::allocator_hello::run(quick)),
        Box::pin(attacks::extender::run()),
        Box::pin(attacks::migration_target::run()),
        Box::pin(attacks::migration_source::run()),
        Box::pin(attacks::informant::run(quick)),
    ];
    let families = FAMILIES.into_iter().zip(runs);
    for (family, f) in families {
        if only.is_some_and(|o| o != family) {
            continue;
        }
        eprintln!("    {family} ...");
        match f.await {
            Ok(a) => out.extend(a),
            Err(e) => out.push(Attack::could_not_run(family, &e)),
        }
    }
    out
}

/// The daemons' own logs, for a person reading why an attack went as it
/// did: into `target/audit/daemons.log`, not over the audit's lines.
fn log_to_file() -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("target/audit");
    std::fs::create_dir_all(&dir)?;
    let file = std::fs::File::create(dir.join("daemons.log"))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}
