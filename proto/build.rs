//! Compiles the `.proto` files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> anyhow::Result<()> {
    let files = ["proto/allocator.proto", "proto/informant.proto", "proto/migration.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
