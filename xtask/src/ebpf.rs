//! `cargo xtask build-ebpf`.

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_a: Args) -> anyhow::Result<()> {
    let _ = crate::workspace_root();
    anyhow::bail!("the eBPF programs are not written yet (informant issue)")
}
