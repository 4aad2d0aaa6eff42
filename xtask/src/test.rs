//! `cargo xtask test`: the project's one test command (the README's, and CI's).
//! It sets up what the tests need on a fresh machine, then runs every tier.

use crate::steps::{cargo, Steps};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and clippy (for a quick local run).
    #[arg(long)]
    pub no_lint: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut steps = Steps::new(if a.no_lint { 4 } else { 6 });
    steps.call("install the packages the tests run (QEMU for the agent's real-QEMU tests)", || {
        crate::apt::ensure(&["qemu-system-x86"], "agent QMP tests")?;
        crate::kubectl::ensure() // `kubectl kustomize` in agent/tests/deploy_manifests.rs
    })?;
    steps.call("build the eBPF objects (installs the toolchain if missing)", || {
        crate::ebpf::run(crate::ebpf::Args::default())
    })?;
    if !a.no_lint {
        steps.run("check formatting", cargo().args(["fmt", "--all", "--check"]))?;
        steps.run(
            "clippy, warnings are errors",
            cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
        )?;
    }
    steps.run(
        "unit, integration and kernel tests",
        cargo().args(["test", "--workspace", "--no-fail-fast"]).env("RUST_BACKTRACE", "1"),
    )?;
    steps.call(
        "hostile input: attacks on the real daemons and a short fuzz pass (cargo xtask audit --quick)",
        || {
            crate::audit::run(crate::audit::Args {
                quick: true,
                fuzz_seconds: None,
                no_fuzz: false,
                no_attacks: false,
                only: None,
            })
        },
    )?;
    eprintln!("\nall tests passed");
    Ok(())
}
