//! # `archive`
//!
//! `artifactd-bench archive` measures **PullArchive against Pull for the same bytes**
//! (target: the zip of a 2 GiB folder takes at most 1.10× the time its files take to Pull).
//! It starts `artifactd` as `throughput` does (SQLite, local blobs, fsync off), pushes
//! `--files` files of `--total-mib`/`--files` MiB each into one folder, then per round
//! pulls every file in turn (one stream each, back to back) and pulls the folder's zip
//! (stored entries), both timed from the request to the last byte; it keeps the best of

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::{
    ArchiveFolder, PullArchiveRequest, pull_archive_request, pull_archive_response,
};
use clap::Args;
use tonic::transport::Channel;

use crate::client::{
    artifact_client, artifact_pull, artifact_push, bench_scope, connect, mb_per_s,
};
use crate::content::ChunkPool;
use crate::measure::verdict;
use crate::process::{Server, artifactd_exe};
use crate::scratch::ScratchDir;
use crate::{KIB, MAX_ARTIFACT_BYTES, MIB, runtime, warn_if_debug};

#[derive(Debug, Clone, Args)]
pub(crate) struct ArchiveArgs {
    /// Bytes in the folder, in MiB.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=10240))]
    total_mib: u64,

    /// Files the folder's bytes are split into.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10000))]
    files: u64,

    /// Rounds of both measurements; the best of each is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// Target: the zip takes at most this many times as long as pulling the same files.
const ARCHIVE_TARGET: f64 = 1.10;

pub(crate) fn archive(args: &ArchiveArgs) -> anyhow::Result<()> {
    warn_if_debug("archive");
    let per_file = args.total_mib * MIB / args.files;
    let total = per_file * args.files;
    let scratch = ScratchDir::create()?;
    eprintln!("scratch data in {}", scratch.path().display());
    let env = [
        (
            "DATABASE_URL",
            format!("sqlite://{}", scratch.path().join("artifactd.db").display()),
        ),
        (
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", scratch.path().join("blobs").display()),
        ),
        (
            "ARTIFACTD_MAX_ARTIFACT_BYTES",
            MAX_ARTIFACT_BYTES.to_string(),
        ),
        ("ARTIFACTD_BLOB_FSYNC", "false".to_owned()),
        ("ARTIFACTD_DEFAULT_PLAN", "enterprise".to_owned()),
    ];
    let server = Server::start(&artifactd_exe()?, &env)?;
    let pool = ChunkPool::new(256 * KIB as usize);
    let runtime = runtime()?;
    runtime.block_on(async {
        let mut client = artifact_client(connect(server.grpc_port).await?);
        let paths: Vec<String> = (0..args.files)
            .map(|i| format!("folder/f{i:05}.bin"))
            .collect();
        for (i, path) in paths.iter().enumerate() {
            artifact_push(&mut client, &pool, 100 + i as u64, per_file, path)
                .await
                .with_context(|| format!("pushing {path}"))?;
        }
        let (mut best_pull, mut best_zip) = (Duration::MAX, Duration::MAX);
        for round in 1..=args.rounds {
            let started = Instant::now();
            for path in &paths {
                artifact_pull(&mut client, path, per_file).await?;
            }
            let pull = started.elapsed();
            let started = Instant::now();
            let zip_bytes = archive_pull(&mut client, "folder/").await?;
            let zip = started.elapsed();
            ensure!(
                zip_bytes > total && zip_bytes < total + args.files * 400 + 1024,
                "the zip has {zip_bytes} bytes for {total} bytes of content"
            );
            eprintln!(
                "round {round}/{}: Pull {:.1} MB/s ({:.2} s), PullArchive {:.1} MB/s ({:.2} s)",
                args.rounds,
                mb_per_s(total, pull),
                pull.as_secs_f64(),
                mb_per_s(zip_bytes, zip),
                zip.as_secs_f64()
            );
            best_pull = best_pull.min(pull);
            best_zip = best_zip.min(zip);
        }
        let ratio = best_zip.as_secs_f64() / best_pull.as_secs_f64();
        println!(
            "archive of {} MiB in {} files: Pull {:.2} s ({:.1} MB/s), PullArchive {:.2} s \
             ({:.1} MB/s); zip/pull time {ratio:.3} (target <= {ARCHIVE_TARGET:.2}) {}",
            total / MIB,
            args.files,
            best_pull.as_secs_f64(),
            mb_per_s(total, best_pull),
            best_zip.as_secs_f64(),
            mb_per_s(total, best_zip),
            verdict(ratio <= ARCHIVE_TARGET)
        );
        anyhow::Ok(())
    })?;
    drop(runtime);
    server.stop();
    drop(scratch);
    Ok(())
}

/// Pulls the zip of a folder of the bench scope; returns its size in bytes.
async fn archive_pull(
    client: &mut ArtifactServiceClient<Channel>,
    prefix: &str,
) -> anyhow::Result<u64> {
    let request = PullArchiveRequest {
        source: Some(pull_archive_request::Source::Folder(ArchiveFolder {
            scope: Some(bench_scope()),
            prefix: prefix.into(),
        })),
        deflate: false,
    };
    let mut messages = client.pull_archive(request).await?.into_inner();
    let mut received: u64 = 0;
    while let Some(message) = messages.message().await? {
        if let Some(pull_archive_response::Msg::Chunk(chunk)) = message.msg {
            received += chunk.len() as u64;
        }
    }
    Ok(received)
}
