//! Compiles `proto/tokenfab/v1/*.proto` with a vendored `protoc`, so that a fresh clone
//! builds without a system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through the PROTOC variable.
    unsafe_env_set("PROTOC", &protoc);

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "common.proto",
        "batch.proto",
        "agent.proto",
        "sla.proto",
        "admin.proto",
        "raft.proto",
    ]
    .map(|f| root.join("tokenfab/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tokenfab_descriptor.bin"))
        .bytes(".tokenfab.v1")
        .compile_protos(&files, &[root])?;
    Ok(())
}

/// `std::env::set_var` is `unsafe` since edition 2024 because other threads may read the
/// environment; a build script has no other threads at this point.
#[allow(unsafe_code)]
fn unsafe_env_set(key: &str, value: &std::path::Path) {
    unsafe { std::env::set_var(key, value) }
}
