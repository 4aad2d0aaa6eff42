//! `cargo xtask <command>`: what cargo alone can't do. Each command lives in its
//! own module; this file only parses the command line.

mod apt;
mod audit;
mod bench;
mod bench_e2e;
mod bench_migration;
mod bench_nodes;
mod bench_pgbench;
mod cluster;
mod console;
mod debian;
mod demo;
mod e2e;
mod ebpf;
mod echo;
mod guest;
mod harness;
mod image;
mod kubectl;
mod migration;
mod netns;
mod package;
mod pg;
mod pgbench;
mod pki;
mod steps;
mod test;
mod vsock;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Project tasks: tests, demo, eBPF build, benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the eBPF objects in agent-ebpf/ (installs the toolchain if missing).
    BuildEbpf(ebpf::Args),
    /// Build a guest image: target/guest/ (busybox initramfs with the informant, the
    /// default) or, with --os debian, target/guest-debian/ (Debian with PostgreSQL).
    BuildGuest(guest::Args),
    /// Build the informant's Debian package in target/package/.
    Package(package::Args),
    /// Write the agent and allocator container images as OCI layouts in target/image.
    Image(image::Args),
    /// Run the tests (the README's test command): sets up, lints, tests every tier.
    Test(test::Args),
    /// Run the local demo (the README's run command).
    Demo(demo::Args),
    /// Run a benchmark, print its figures and write target/bench/<name>.json.
    Bench(bench::Args),
    /// Run one end-to-end scenario (real allocator, agent, QEMU guest, informant).
    E2e(e2e::Args),
    /// Move a guest between two network-namespace nodes while a TCP client echoes through it.
    Migration(migration::Args),
    /// Attack the real daemons with hostile clients and fuzz every decoder;
    /// writes target/bench/audit.json and fails if anything got in.
    Audit(audit::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(a) => ebpf::run(a),
        Command::BuildGuest(a) => guest::run(a),
        Command::Package(a) => package::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Image(a) => image::run(a),
        Command::Test(a) => test::run(a),
        Command::Demo(a) => demo::run(a),
        Command::E2e(a) => e2e::run(a),
        Command::Migration(a) => migration::run(a),
        Command::Audit(a) => audit::run(a),
    }
}

/// The workspace root, from xtask's own manifest directory.
pub fn workspace_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}
