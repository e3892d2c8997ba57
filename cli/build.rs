//! Generates the gRPC client (no server code) from the repository's `proto/` with a vendored
//! `protoc`, so a fresh machine needs no system one.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    set_protoc(&protoc);
    let proto = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .bytes(".")
        .compile_protos(
            &[
                proto.join("artifactd/v1/artifact.proto"),
                proto.join("artifactd/v1/usage.proto"),
            ],
            std::slice::from_ref(&proto),
        )?;
    println!("cargo:rerun-if-changed={}", proto.display());
    Ok(())
}

#[allow(unsafe_code)]
fn set_protoc(path: &std::path::Path) {
    // `set_var` is unsafe in edition 2024 because other threads might read the environment;
    // a build script has no other threads at this point.
    unsafe { std::env::set_var("PROTOC", path) };
}
