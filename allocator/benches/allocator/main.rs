//! The allocator benchmark: `cargo xtask bench allocator` runs it.
//!
//! `cargo bench -p vmscale-allocator --bench allocator -- [PART] [--out FILE]`
//!
//! Parts: `core` (decisions per second of the pure core), `grpc` (the release
//! server in its own process, driven by 1, 16 and 256 agent sessions over
//! loopback), `sim` (5,000 nodes and 500,000 VMs: memory and planning time).
//! Without a part, each part runs in a child process of its own, so that no
//! part's threads or memory colour another's figures; the figures are merged
//! into `--out` and rendered as Markdown into `--markdown`.

mod decisions;
mod grpc;
mod report;
mod sim;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Parser)]
struct Args {
    /// One part only: core, grpc or sim. Without it, all, each in its own process.
    part: Option<String>,
    /// JSON file the figures are merged into.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Markdown rendering of the merged figures (the BENCHMARKS.md section).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The release `vmscale-allocator` binary (default: next to this benchmark's directory).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Shorter runs, for trying things out; the figures are not the real ones.
    #[arg(long)]
    quick: bool,
    /// gRPC part only: these numbers of agents instead of 1, 16 and 256 (for profiling).
    #[arg(long, value_delimiter = ',')]
    agents: Vec<usize>,
    /// Cargo passes `--bench` to benchmarks; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PARTS: [&str; 3] = ["core", "grpc", "sim"];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let figures = match args.part.as_deref() {
        Some(part) => run_part(part, &args)?,
        None => run_all(&args)?,
    };
    if let Some(out) = &args.out {
        let merged = merge_into(out, figures)?;
        if let Some(md) = &args.markdown {
            std::fs::write(md, report::markdown(&merged))
                .with_context(|| format!("cannot write {}", md.display()))?;
        }
    }
    Ok(())
}

fn run_part(part: &str, args: &Args) -> anyhow::Result<Map<String, Value>> {
    match part {
        "core" => Ok(decisions::run(args.quick)),
        "grpc" => grpc::run(&server_binary(args)?, args.quick, &args.agents),
        "sim" => Ok(sim::run(args.quick)),
        other => bail!("unknown part {other:?}; the parts are {}", PARTS.join(", ")),
    }
}

/// Runs every part as a child process of this binary and collects its figures.
fn run_all(args: &Args) -> anyhow::Result<Map<String, Value>> {
    let exe = std::env::current_exe().context("cannot find this benchmark's own binary")?;
    let server = server_binary(args)?;
    let mut all = Map::new();
    all.insert("date".into(), Value::from(report::date()));
    all.insert("machine".into(), report::machine());
    all.insert("load_before".into(), Value::from(report::loadavg()));
    for part in PARTS {
        let tmp = std::env::temp_dir().join(format!("vmscale-bench-{}-{part}.json", std::process::id()));
        let mut cmd = Command::new(&exe);
        cmd.arg(part).arg("--out").arg(&tmp).arg("--server").arg(&server);
        if args.quick {
            cmd.arg("--quick");
        }
        let status = cmd.status().with_context(|| format!("cannot run part {part}"))?;
        if !status.success() {
            bail!("part {part} failed ({status})");
        }
        let text = std::fs::read_to_string(&tmp).with_context(|| format!("part {part} left no figures"))?;
        let _ = std::fs::remove_file(&tmp);
        let Value::Object(m) = serde_json::from_str(&text)? else { bail!("part {part}: not a JSON object") };
        all.extend(m);
    }
    all.insert("load_after".into(), Value::from(report::loadavg()));
    all.insert("quick".into(), Value::from(args.quick));
    println!("\n{}", report::summary(&all));
    Ok(all)
}

/// Overlays `figures` on what `path` already holds and writes it back.
fn merge_into(path: &Path, figures: Map<String, Value>) -> anyhow::Result<Map<String, Value>> {
    let mut merged = match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(), // unreadable: start over rather than fail a long run
        },
        Err(_) => Map::new(),
    };
    merged.extend(figures);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&Value::Object(merged.clone()))?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(merged)
}

/// `--server`, or `vmscale-allocator` in the profile directory this benchmark
/// was built into (`target/release/deps/allocator-*` -> `target/release/`).
fn server_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.server {
        return Ok(s.clone());
    }
    let exe = std::env::current_exe()?;
    let guess = exe.parent().and_then(Path::parent).map(|d| d.join("vmscale-allocator"));
    match guess {
        Some(p) if p.exists() => Ok(p),
        _ => bail!(
            "no allocator binary found next to {}; build it with `cargo build --release -p vmscale-allocator` \
             or pass --server",
            exe.display()
        ),
    }
}
