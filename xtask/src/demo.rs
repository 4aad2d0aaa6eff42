//! `cargo xtask demo`: the project's main job as a newcomer meets it.
//!
//! Today it builds and starts the allocator on localhost. The full local demo
//! (allocator, agent and real QEMU VMs scaling under load) replaces this when
//! the agent and the guest image exist.

use crate::steps::{cargo, Steps};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// gRPC address for agents.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// HTTP address for /metrics, /state and /healthz.
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub http_listen: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut steps = Steps::new(2);
    steps.run(
        "build the allocator (release)",
        cargo().args(["build", "--release", "-p", "vmscale-allocator"]),
    )?;
    eprintln!(
        "\nallocator: agents connect to {}; metrics at http://{}/metrics, ledger at http://{}/state\n\
         (the agent and VMs join the demo with the agent and end-to-end issues; Ctrl-C stops it)",
        a.listen, a.http_listen, a.http_listen
    );
    let bin = crate::workspace_root().join("target/release/vmscale-allocator");
    steps.run(
        "run the allocator",
        std::process::Command::new(bin).args(["--listen", &a.listen, "--http-listen", &a.http_listen]),
    )
}
