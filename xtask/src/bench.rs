//! `cargo xtask bench <name>`.

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which benchmark: allocator.
    pub name: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::bail!("unknown benchmark {:?}", a.name)
}
