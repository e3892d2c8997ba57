//! `artifactd-bench zip64`: a zip that needs zip64, built by the real server and read back by
//! the tools users have. Too slow for a debug test (4 GiB through the server and back),
//! so it is a release bench; the 70,000-entry case alone is also a unit test of the writer
//! (`service::archive`).
//!
//! It starts `artifactd` as `archive` does (SQLite, local blobs, fsync off), pushes one file
//! of `--entry-mib` MiB (default 4 GiB + 1 MiB: past the 4 GiB a classic zip entry can hold)
//! and `--entries` one-byte files (default 70,000: past the 65,535 entries of a classic
//! central directory) into one folder, streams the folder's zip (PullArchive, stored) into
//! a file, and checks it with Python's `zipfile` (every entry's CRC-32 via `testzip`, the
//! large entry's size, the entry count) and with `unzip -t`. It prints how long each step
//! took. The scratch directory (about twice the entry size on disk) is removed at the end.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, ensure};
use artifactd::pb::v1::{
    ArchiveFolder, PullArchiveRequest, pull_archive_request, pull_archive_response,
};
use bytes::Bytes;
use clap::Args;
use tokio::io::AsyncWriteExt;

use crate::client::{artifact_client, artifact_push, bench_scope, connect, mb_per_s};
use crate::content::ChunkPool;
use crate::process::{Server, artifactd_exe};
use crate::pushrate::small_push;
use crate::scratch::ScratchDir;
use crate::{KIB, MAX_ARTIFACT_BYTES, MIB, runtime, warn_if_debug};

/// Largest size and entry count a zip can record without zip64.
const CLASSIC_MAX_SIZE: u64 = u32::MAX as u64;
const CLASSIC_MAX_ENTRIES: u64 = u16::MAX as u64;
/// Concurrent clients pushing the small files.
const SMALL_PUSHERS: u64 = 16;

#[derive(Debug, Clone, Args)]
pub struct Zip64Args {
    /// Size of the large entry, in MiB (0 for none).
    #[arg(long, default_value_t = 4097, value_parser = clap::value_parser!(u64).range(0..=10240))]
    entry_mib: u64,

    /// One-byte entries besides it.
    #[arg(long, default_value_t = 70_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    entries: u64,
}

pub fn zip64(args: &Zip64Args) -> anyhow::Result<()> {
    warn_if_debug("zip64");
    let big = args.entry_mib * MIB;
    ensure!(
        big > 0 || args.entries > 0,
        "nothing to archive: --entry-mib and --entries are both 0"
    );
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
    let zip_path = scratch.path().join("folder.zip");
    let runtime = runtime()?;
    let zip_bytes = runtime.block_on(async {
        let port = server.grpc_port;
        let mut client = artifact_client(connect(port).await?);
        if big > 0 {
            let pool = ChunkPool::new(256 * KIB as usize);
            let started = Instant::now();
            artifact_push(&mut client, &pool, 1, big, "folder/big.bin")
                .await
                .context("pushing the large file")?;
            let took = started.elapsed();
            println!(
                "pushed a {} MiB file in {:.1} s ({:.0} MB/s)",
                args.entry_mib,
                took.as_secs_f64(),
                mb_per_s(big, took)
            );
        }
        if args.entries > 0 {
            let started = Instant::now();
            push_small_files(port, args.entries).await?;
            let took = started.elapsed();
            println!(
                "pushed {} one-byte files in {:.1} s ({:.0} pushes/s)",
                args.entries,
                took.as_secs_f64(),
                args.entries as f64 / took.as_secs_f64().max(1e-9)
            );
        }
        let started = Instant::now();
        let zip_bytes = archive_to_file(&mut client, &zip_path).await?;
        let took = started.elapsed();
        println!(
            "PullArchive: {zip_bytes} bytes written to disk in {:.1} s ({:.0} MB/s)",
            took.as_secs_f64(),
            mb_per_s(zip_bytes, took)
        );
        anyhow::Ok(zip_bytes)
    })?;
    drop(runtime);
    server.stop();

    let started = Instant::now();
    let listing = python_check(&zip_path)?;
    println!(
        "python3 zipfile (testzip: every CRC-32) in {:.1} s: {listing}",
        started.elapsed().as_secs_f64()
    );
    let expected = format!(
        "{} entries, largest {big} bytes",
        args.entries + u64::from(big > 0)
    );
    ensure!(
        listing == expected,
        "zipfile read {listing}, expected {expected}"
    );
    let started = Instant::now();
    let unzip = Command::new("unzip")
        .args(["-t", "-qq"])
        .arg(&zip_path)
        .output()
        .context("running unzip (is it installed?)")?;
    ensure!(
        unzip.status.success(),
        "unzip -t failed: {}{}",
        String::from_utf8_lossy(&unzip.stdout),
        String::from_utf8_lossy(&unzip.stderr)
    );
    println!(
        "unzip -t: no errors, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "zip64: a {zip_bytes}-byte zip (needs zip64: {}) read back by Python's zipfile and unzip -t: PASS",
        needs_zip64(big, args.entries, zip_bytes)
    );
    drop(scratch);
    Ok(())
}

/// What the archive has beyond a classic zip's limits.
fn needs_zip64(big: u64, entries: u64, zip_bytes: u64) -> String {
    let mut why = Vec::new();
    if big > CLASSIC_MAX_SIZE {
        why.push("an entry over 4 GiB");
    }
    if entries + u64::from(big > 0) > CLASSIC_MAX_ENTRIES {
        why.push("more than 65,535 entries");
    }
    if zip_bytes > CLASSIC_MAX_SIZE {
        why.push("a zip over 4 GiB");
    }
    if why.is_empty() {
        "no".to_owned()
    } else {
        why.join(", ")
    }
}

/// `entries` one-byte files `folder/small/NNNNNNN` from a few clients at once.
async fn push_small_files(port: u16, entries: u64) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut pushers = Vec::new();
    for _ in 0..SMALL_PUSHERS {
        let next = next.clone();
        let mut client = artifact_client(connect(port).await?);
        pushers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= entries {
                    return anyhow::Ok(());
                }
                let byte = Bytes::from(vec![b'a' + (i % 26) as u8]);
                small_push(
                    &mut client,
                    &bench_scope(),
                    format!("folder/small/{i:07}"),
                    byte,
                )
                .await
                .with_context(|| format!("pushing small file {i}"))?;
            }
        }));
    }
    for pusher in pushers {
        pusher.await.context("a pusher panicked")??;
    }
    Ok(())
}

/// Streams the zip of `folder/` into `path`; returns its size.
async fn archive_to_file(
    client: &mut artifactd::pb::v1::artifact_service_client::ArtifactServiceClient<
        tonic::transport::Channel,
    >,
    path: &Path,
) -> anyhow::Result<u64> {
    let request = PullArchiveRequest {
        source: Some(pull_archive_request::Source::Folder(ArchiveFolder {
            scope: Some(bench_scope()),
            prefix: "folder/".into(),
        })),
        deflate: false,
    };
    let mut messages = client.pull_archive(request).await?.into_inner();
    let mut file = tokio::io::BufWriter::with_capacity(
        4 * MIB as usize,
        tokio::fs::File::create(path)
            .await
            .with_context(|| format!("creating {}", path.display()))?,
    );
    let mut written = 0u64;
    while let Some(message) = messages.message().await? {
        if let Some(pull_archive_response::Msg::Chunk(chunk)) = message.msg {
            file.write_all(&chunk).await?;
            written += chunk.len() as u64;
        }
    }
    file.flush().await?;
    Ok(written)
}

/// Python's zipfile: every entry's CRC-32 (`testzip`), then "N entries, largest S bytes".
fn python_check(zip: &Path) -> anyhow::Result<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             bad = z.testzip()\n\
             assert bad is None, 'bad CRC in ' + bad\n\
             infos = z.infolist()\n\
             print(f'{len(infos)} entries, largest {max(i.file_size for i in infos)} bytes')\n",
        )
        .arg(zip)
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "python3 zipfile failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
