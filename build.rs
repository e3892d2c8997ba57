//! Compiles the protobuf API with a vendored `protoc`, so a fresh machine needs no system one,
//! and writes a descriptor set that server reflection serves to grpcurl.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY of intent: build scripts are single-threaded; PROTOC is read by prost-build below.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe_set_protoc(&protoc);

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("artifactd_descriptor.bin"))
        .bytes(".")
        .compile_protos(
            &[
                "proto/artifactd/v1/artifact.proto",
                "proto/artifactd/v1/plan.proto",
                "proto/artifactd/v1/controls.proto",
                "proto/artifactd/v1/usage.proto",
                "proto/artifactd/v1/token.proto",
                "proto/artifactd/v1/job.proto",
            ],
            &["proto"],
        )?;
    // The benchmark's bare stream is kept out of the descriptor set that reflection serves.
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/artifactd/bench/v1/bench.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // `set_var` is unsafe in edition 2024 because other threads might read the environment;
    // a build script has no other threads at this point.
    unsafe { env::set_var("PROTOC", path) };
}
