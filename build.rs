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
    git_sha();
    Ok(())
}

/// `ARTIFACTD_GIT_SHA` for `--version` and `artifactd_build_info`: taken from the
/// environment when set (a Docker build has no `.git`), else from `git`, else `unknown`.
fn git_sha() {
    println!("cargo:rerun-if-env-changed=ARTIFACTD_GIT_SHA");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let sha = env::var("ARTIFACTD_GIT_SHA")
        .ok()
        .filter(|sha| !sha.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // A new commit changes HEAD, or the branch HEAD points to.
    for path in [
        Some("HEAD".to_owned()),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ]
    .into_iter()
    .flatten()
    {
        // (Only files that exist: a missing one would rerun this script on every build.)
        if let Some(file) = git(&["rev-parse", "--git-path", &path])
            && std::path::Path::new(&file).exists()
        {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    println!("cargo:rustc-env=ARTIFACTD_GIT_SHA={sha}");
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // `set_var` is unsafe in edition 2024 because other threads might read the environment;
    // a build script has no other threads at this point.
    unsafe { env::set_var("PROTOC", path) };
}
