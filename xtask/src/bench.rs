//! `cargo xtask bench <name>`: builds what a benchmark needs, runs it, and
//! records its figures in `target/bench/<name>.json` and in `BENCHMARKS.md`.

use crate::steps::{cargo, Steps};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which benchmark: allocator, agent, informant, e2e, migration or pgbench.
    pub name: String,
    /// Shorter runs for trying things out: the JSON is written, BENCHMARKS.md is left alone
    /// (except by e2e, whose quick run is recorded, marked as such: its full run takes 15 minutes).
    #[arg(long)]
    pub quick: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.name.as_str() {
        "allocator" => allocator(a.quick),
        "agent" => crate::bench_nodes::agent(a.quick),
        "informant" => crate::bench_nodes::informant(a.quick),
        "migration" => crate::bench_migration::run(a.quick),
        "e2e" => crate::bench_e2e::run(a.quick),
        "pgbench" => crate::bench_pgbench::run(a.quick),
        other => bail!(
            "unknown benchmark {other:?}; the benchmarks are: allocator, agent, informant, e2e, migration, pgbench"
        ),
    }
}

/// The allocator benchmark (allocator/benches/allocator): the pure core, the
/// gRPC server in its own process, and a 500,000-VM simulation.
fn allocator(quick: bool) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = dir.join("allocator.json");
    let section = dir.join("allocator.md");
    let server = target.join("release").join("vmscale-allocator");

    let mut steps = Steps::new(if quick { 2 } else { 3 });
    steps.run(
        "build the allocator server (release)",
        cargo().args(["build", "--release", "-p", "vmscale-allocator", "--bin", "vmscale-allocator"]),
    )?;
    let mut bench = cargo();
    bench.args(["bench", "-p", "vmscale-allocator", "--bench", "allocator", "--"]);
    bench.arg("--out").arg(&json).arg("--markdown").arg(&section).arg("--server").arg(&server);
    if quick {
        bench.arg("--quick");
    }
    steps.run(
        "run the benchmark: core, gRPC with 1, 16 and 256 agents, simulation (about 2 minutes)",
        &mut bench,
    )?;
    eprintln!("    figures in {}", json.display());
    if quick {
        eprintln!("    quick run: BENCHMARKS.md left as it was");
        return Ok(());
    }
    let md = root.join("BENCHMARKS.md");
    steps.call("record the figures in BENCHMARKS.md", || {
        let text = std::fs::read_to_string(&section)
            .with_context(|| format!("cannot read {}", section.display()))?;
        record(&md, "allocator", &text)
    })
}

/// Replaces the benchmark's generated section of BENCHMARKS.md (between its
/// markers), or appends it; everything else in the file is kept as written.
pub(crate) fn record(md: &Path, name: &str, section: &str) -> anyhow::Result<()> {
    let begin =
        format!("<!-- BEGIN {name}: written by `cargo xtask bench {name}`; edit outside these markers -->");
    let end = format!("<!-- END {name} -->");
    let old = match std::fs::read_to_string(md) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Benchmarks\n\nFigures recorded by `cargo xtask bench <name>` on the project's build machine.\n\n"
                .to_owned()
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", md.display())),
    };
    let block = format!("{begin}\n{}\n{end}", section.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + end.len()..]),
        _ => format!("{}\n\n{block}\n", old.trim_end()),
    };
    std::fs::write(md, new).with_context(|| format!("cannot write {}", md.display()))
}
