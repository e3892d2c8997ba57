//! `artifactd-bench`: how much of the gRPC transport's throughput artifactd keeps, how much
//! memory it needs under many concurrent uploads, how fast it bills a long history and how
//! many small pushes it takes with metering on.
//!
//! # `throughput`
//!
//! `artifactd-bench throughput` starts two child processes on 127.0.0.1:
//!
//! - the real `artifactd` binary (built next to this one) over a fresh SQLite database and a
//!   local blob directory in a scratch directory under the system temp dir (`TMPDIR`);
//! - a *bare* stream server (this binary's hidden `serve-bare` subcommand) that speaks
//!   `artifactd.bench.v1.BareStream`: the same tonic server setup and the same chunked
//!   streaming, but no database, no hashing and no disk — it counts bytes and drops them, or
//!   sends one preallocated chunk over and over.
//!
//! It then measures, with identical chunking, interleaved over several rounds and keeping the
//! best of each:
//!
//! - **bare push** (`Sink`) against **Push**: artifactd streams to a temporary upload,
//!   hashes on the side, fsyncs (unless `--fsync false`), promotes and commits a row;
//! - **bare pull** (`Source`) against **Pull**: artifactd reads the blob from disk (usually
//!   from the page cache, as it was just written).
//!
//! The ratios say how close the service is to what the transport itself can carry on this
//! machine; the targets are Push ≥ 0.80× and Pull ≥ 0.90× of bare. Running both sides in
//! separate processes on the same machine keeps the comparison fair: each measurement pays
//! for the same client, the same loopback TCP and the same HTTP/2 framing.
//!
//! Finally it pushes many large files at once (64 × 256 MiB by default, one connection each,
//! like 64 CI jobs uploading together) while sampling the server's resident memory from
//! `/proc/<pid>/status`, to check that memory per upload stays a few chunks however large
//! the file (target: peak RSS ≤ 200 MiB). This part needs Linux.
//!
//! Upload content comes from a pool of 16 distinct pseudo-random chunks, so the client spends
//! no time generating data; each upload starts at its own place in the pool and has its own
//! first chunk, so every upload has a distinct digest and none is deduplicated.
//!
//! # `getbill`
//!
//! `artifactd-bench getbill` measures **GetBill latency for a project with a long history**
//! (target: median ≤ 50 ms on Postgres with 1,000,000 artifacts). It creates a fresh Postgres
//! database through `--database-admin-url`, migrates it with `artifactd migrate`, and fills
//! it with one `INSERT … SELECT … FROM generate_series` (far faster than pushing): project
//! `big` on the `team` plan, `--artifacts` artifacts created evenly over the 365 days before
//! now, of 1 kB to 5 MB each. Every tenth artifact is still live; the others were deleted
//! 30 days after they were created (those less than 30 days old are still live too, so no
//! timestamp lies in the future). It then starts `artifactd` on that database and times
//! `UsageService/GetBill` sequentially, `--calls` times for the current month (open: usage to
//! date plus a projection) and `--calls` times for the previous, closed month, after 3
//! uncounted warm-up calls each, and prints median, p90 and max per month. The database is
//! dropped at the end, on error too.
//!
//! # `pushrate`
//!
//! `artifactd-bench pushrate` measures **small-push throughput with metering and enforcement
//! on** (target: ≥ 2,000 pushes/s of 4 KiB with 32 concurrent clients on Postgres + Redis),
//! and the same with metering off for comparison. For each mode it creates a fresh Postgres
//! database and Redis key prefix and starts `artifactd` with its default settings otherwise
//! (blob fsync on, local blob directory). With metering on, projects get the `free` plan,
//! whose overage policy is *block* with a 2 GiB storage limit, so every push reserves quota
//! and is checked against the limit (a 10 s run stores well under 2 GiB). Each of `--clients`
//! clients has its own connection and pushes distinct content (no deduplication) to its own
//! job scope, one header and one chunk per push, back to back; pushes completing in the
//! `--seconds` after a 1 s warm-up are counted. The databases and Redis keys are removed at
//! the end.
//!
//! # `archive`
//!
//! `artifactd-bench archive` measures **PullArchive against Pull for the same bytes**
//! (target: the zip of a 2 GiB folder takes at most 1.10× the time its files take to Pull).
//! It starts `artifactd` as `throughput` does (SQLite, local blobs, fsync off), pushes
//! `--files` files of `--total-mib`/`--files` MiB each into one folder, then per round
//! pulls every file in turn (one stream each, back to back) and pulls the folder's zip
//! (stored entries), both timed from the request to the last byte; it keeps the best of
//! each and checks the zip's size against content plus headers.
//! # `sweep`
//!
//! `artifactd-bench sweep` measures **the sweeper on 1,000,000 expired artifacts** with
//! pushes and pulls running alongside (target: all ended and their content collected in
//! ≤ 60 s on Postgres); see `artifactd-bench-parts/sweep.rs`.
//!
//! # `cli`
//!
//! `artifactd-bench cli` measures the `artifact` command line on Postgres: a folder of
//! 10,000 × 4 KiB files, and one 1 GiB file pushed and pulled against this bench's own
//! Push/Pull; see `artifactd-bench-parts/cli.rs`.
//!
//! # `zip64`
//!
//! `artifactd-bench zip64` has the server zip a folder holding a file over 4 GiB and 70,000
//! more files, and checks the zip with Python's `zipfile` and `unzip -t`; see
//! `artifactd-bench-parts/zip64.rs`.
//!
//! Build both binaries first, in release mode:
//! `cargo build --release --bins && target/release/artifactd-bench <subcommand>`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail, ensure};
use artifactd::domain::Timestamp;
use artifactd::domain::metering::Month;
use artifactd::pb::bench::bare_stream_client::BareStreamClient;
use artifactd::pb::bench::bare_stream_server::{BareStream, BareStreamServer};
use artifactd::pb::bench::{Chunk, SinkResult, SourceRequest};
use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::usage_service_client::UsageServiceClient;
use artifactd::pb::v1::{
    ArchiveFolder, Bill, GetBillRequest, ListProjectsUsageRequest, PullArchiveRequest, PullRequest,
    PushHeader, PushRequest, Scope, ScopeKind, pull_archive_request, pull_archive_response,
    pull_response, push_request,
};
use bytes::Bytes;
use clap::{ArgAction, Args, Parser, Subcommand};
use futures::stream::{self, BoxStream, StreamExt};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

#[path = "artifactd-bench-parts/cli.rs"]
mod cli;
#[path = "artifactd-bench-parts/hash.rs"]
mod hash;
#[path = "artifactd-bench-parts/s3.rs"]
mod s3;
#[path = "artifactd-bench-parts/sweep.rs"]
mod sweep;
#[path = "artifactd-bench-parts/zip64.rs"]
mod zip64;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// Largest gRPC message either side sends or accepts: tonic's default, as in the server.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest chunk artifactd accepts in a Push.
const MAX_CHUNK_KIB: usize = 1024;
/// What the artifactd child is configured to accept (10 GiB).
const MAX_ARTIFACT_BYTES: u64 = 10 * GIB;
/// Distinct chunks uploads are assembled from.
const POOL_CHUNKS: usize = 16;
/// Targets, as fractions of the bare stream's throughput.
const PUSH_TARGET: f64 = 0.80;
const PULL_TARGET: f64 = 0.90;
/// Target for the server's peak resident memory during the concurrent pushes.
const RSS_TARGET_MIB: f64 = 200.0;
/// How often the memory sampler reads `/proc/<pid>/status`.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// Free disk space wanted before the memory phase, relative to what it writes.
const DISK_HEADROOM: f64 = 1.25;
/// How long a child server may take to become ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// GetBill target: median latency, in milliseconds.
const GETBILL_TARGET_MS: f64 = 50.0;
/// Uncounted GetBill calls per month before the measured ones.
const GETBILL_WARMUP_CALLS: u32 = 3;
/// The project `getbill` fills, and its plan.
const BIG_PROJECT: &str = "big";
const BIG_PLAN: &str = "team";
/// How far back the generated history reaches, and how long a deleted artifact lived.
const HISTORY_DAYS: i64 = 365;
const ARTIFACT_LIFE_DAYS: i64 = 30;
const DAY_MICROS: i64 = 86_400 * 1_000_000;
/// SHA-256 of the empty string: the one blob every generated artifact points at.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// pushrate target with metering on, in pushes per second.
const PUSHRATE_TARGET: f64 = 2000.0;
/// Pushes before the pushrate window opens, not counted.
const PUSHRATE_WARMUP: Duration = Duration::from_secs(1);
/// Plan projects get in pushrate: block overage, 2 GiB storage limit.
const PUSHRATE_PLAN: &str = "free";
/// Defaults of `--database-admin-url` and `--redis-url` (the same variables as the tests).
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

const PROJECT: &str = "bench";
const JOB: &str = "j1";
const THROUGHPUT_PATH: &str = "throughput/1gib.bin";

/// Appended to `--help`: how to build and run, and where scratch data goes.
const USAGE_NOTE: &str = "Both binaries must be built, in release mode; `cargo run --bin \
    artifactd-bench` builds only this one, so use:

    cargo build --release --bins && target/release/artifactd-bench <subcommand>

Scratch data (up to ~20 GiB for the memory phase) goes under the system temp directory; set \
TMPDIR to put it on the disk you want to measure.";

#[derive(Debug, Parser)]
#[command(
    name = "artifactd-bench",
    about = "Measures artifactd's Push/Pull throughput against a bare gRPC stream, its \
             memory under concurrent pushes, GetBill latency over a long history and the rate \
             of small pushes with metering on",
    after_help = USAGE_NOTE
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Push/Pull throughput against the bare stream, then peak memory under concurrent pushes.
    #[command(after_help = USAGE_NOTE)]
    Throughput(ThroughputArgs),
    /// GetBill latency on Postgres for a project with a long artifact history.
    #[command(name = "getbill", after_help = USAGE_NOTE)]
    GetBill(GetBillArgs),
    /// Small pushes per second from many clients on Postgres + Redis, metering on and off.
    #[command(name = "pushrate", after_help = USAGE_NOTE)]
    PushRate(PushRateArgs),
    /// ListProjectsUsage page latency over many projects' finalized month, Postgres.
    #[command(name = "projects", after_help = USAGE_NOTE)]
    Projects(ProjectsArgs),
    /// PullArchive of a folder against Pull of its files, same bytes.
    #[command(after_help = USAGE_NOTE)]
    Archive(ArchiveArgs),
    /// The sweeper ending 1,000,000 expired artifacts and collecting their content on
    /// Postgres, with pushes and pulls alongside.
    #[command(name = "sweep", after_help = USAGE_NOTE)]
    Sweep(sweep::SweepArgs),
    /// Push and Pull through artifactd on an S3 server vs direct object_store PUT/GET.
    #[command(name = "s3", after_help = USAGE_NOTE)]
    S3(s3::S3Args),
    /// Single-core SHA-256 rate: the server's hasher against the `sha2` crate.
    /// The `artifact` command line against the server's own Push/Pull, on Postgres.
    #[command(after_help = USAGE_NOTE)]
    Cli(cli::CliArgs),
    #[command(after_help = USAGE_NOTE)]
    Hash(hash::HashArgs),
    /// A zip needing zip64 (an entry over 4 GiB, over 65,535 entries) read back by Python's
    /// zipfile and unzip -t.
    #[command(name = "zip64", after_help = USAGE_NOTE)]
    Zip64(zip64::Zip64Args),
    /// Serve the bare `artifactd.bench.v1.BareStream` baseline (started by `throughput`).
    #[command(hide = true)]
    ServeBare {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Debug, Clone, Args)]
struct ThroughputArgs {
    /// Bytes per throughput measurement, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=10240))]
    total_mib: u64,

    /// Chunk size of every stream, in KiB (artifactd accepts at most 1024).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1024))]
    chunk_kib: u64,

    /// Rounds of the four throughput measurements; the best of each is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,

    /// Have artifactd fsync each upload before committing it (ARTIFACTD_BLOB_FSYNC).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    fsync: bool,

    /// Size of each file of the concurrent-push memory phase, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10240))]
    mem_file_mib: u64,

    /// Concurrent pushes in the memory phase, each over its own connection; 0 skips it.
    #[arg(long, default_value_t = 64)]
    mem_pushes: u32,
}

#[derive(Debug, Clone, Args)]
struct ArchiveArgs {
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

#[derive(Debug, Clone, Args)]
struct GetBillArgs {
    /// Postgres URL with the right to create and drop databases; the benchmark's own database
    /// is created next to the one it names.
    #[arg(long, env = "TEST_DATABASE_URL", default_value = DEFAULT_ADMIN_URL, hide_env_values = true)]
    database_admin_url: String,

    /// Artifacts in the project's history.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    artifacts: u64,

    /// Timed GetBill calls per month.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    calls: u32,
}

#[derive(Debug, Clone, Args)]
struct ProjectsArgs {
    /// Postgres URL with the right to create and drop databases; the benchmark's own database
    /// is created next to the one it names.
    #[arg(long, env = "TEST_DATABASE_URL", default_value = DEFAULT_ADMIN_URL, hide_env_values = true)]
    database_admin_url: String,

    /// Projects, each with a month of daily egress and a few artifacts.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    projects: u64,

    /// Rows per page.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    page_size: u32,
}

#[derive(Debug, Clone, Args)]
struct PushRateArgs {
    /// Postgres URL with the right to create and drop databases; the benchmark's own databases
    /// are created next to the one it names.
    #[arg(long, env = "TEST_DATABASE_URL", default_value = DEFAULT_ADMIN_URL, hide_env_values = true)]
    database_admin_url: String,

    /// Redis for artifactd's hot quota figures (keys under a fresh prefix, removed at the end).
    #[arg(long, env = "TEST_REDIS_URL", default_value = DEFAULT_REDIS_URL, hide_env_values = true)]
    redis_url: String,

    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    clients: u32,

    /// Length of the measured window, after a 1 s warm-up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,

    /// Bytes per push, sent as one chunk (at least 8: a counter keeps every push distinct).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(8..=1024 * 1024))]
    size: u64,

    /// Have artifactd fsync each blob before committing it (ARTIFACTD_BLOB_FSYNC).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        BenchCommand::Throughput(args) => throughput(&args),
        BenchCommand::GetBill(args) => getbill(&args),
        BenchCommand::Projects(args) => projects(&args),
        BenchCommand::PushRate(args) => pushrate(&args),
        BenchCommand::Archive(args) => archive(&args),
        BenchCommand::Sweep(args) => sweep::sweep(&args),
        BenchCommand::Hash(args) => hash::hash(&args),
        BenchCommand::S3(args) => s3::s3(&args),
        BenchCommand::Cli(args) => cli::cli(&args),
        BenchCommand::Zip64(args) => zip64::zip64(&args),
        BenchCommand::ServeBare { listen } => serve_bare(listen),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("artifactd-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// The whole run
// ---------------------------------------------------------------------------------------------

/// Warns that a debug build's numbers mean little.
fn warn_if_debug(subcommand: &str) {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build; numbers mean little. Use `cargo build --release \
             --bins && target/release/artifactd-bench {subcommand}`."
        );
    }
}

fn throughput(args: &ThroughputArgs) -> anyhow::Result<()> {
    warn_if_debug("throughput");
    let total = args.total_mib * MIB;
    let chunk_size = usize::try_from(args.chunk_kib * KIB).context("chunk size")?;
    let server_exe = artifactd_exe()?;

    // Declared first so it is removed last, after both children are gone.
    let scratch = ScratchDir::create()?;
    eprintln!("scratch data in {}", scratch.path().display());

    let grpc_port = free_port()?;
    let http_port = free_port()?;
    let bare_port = free_port()?;

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
        ("ARTIFACTD_BLOB_FSYNC", args.fsync.to_string()),
        // The bench moves tens of GiB: the enterprise plan's limits let it, `free` would not.
        ("ARTIFACTD_DEFAULT_PLAN", "enterprise".to_owned()),
    ];
    let mut server = spawn_artifactd(&server_exe, grpc_port, http_port, &env)?;
    let mut bare = spawn_bare(bare_port)?;
    wait_ready_http(&mut server, http_port)?;
    wait_ready_tcp(&mut bare, bare_port)?;

    let pool = ChunkPool::new(chunk_size);
    let runtime = runtime()?;
    let best = runtime.block_on(measure_throughput(args, &pool, total, grpc_port, bare_port))?;
    print_throughput(args, &best);

    if args.mem_pushes > 0 {
        let file_bytes = memory_file_size(args, scratch.path())?;
        let memory = runtime.block_on(measure_memory(
            &pool,
            args.mem_pushes,
            file_bytes,
            u64::from(args.rounds),
            grpc_port,
            server.pid(),
        ))?;
        print_memory(args.mem_pushes, file_bytes, &memory);
    }

    drop(runtime);
    drop(bare);
    drop(server);
    drop(scratch);
    Ok(())
}

/// Target: the zip takes at most this many times as long as pulling the same files.
const ARCHIVE_TARGET: f64 = 1.10;

fn archive(args: &ArchiveArgs) -> anyhow::Result<()> {
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

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// The `artifactd` binary built alongside this one.
fn artifactd_exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating this executable")?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", me.display()))?;
    let exe = dir.join(format!("artifactd{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        bail!(
            "the artifactd server binary is missing: {} does not exist.\n\
             `cargo run --bin artifactd-bench` builds only the benchmark; build both with\n\n    \
             cargo build --release --bins && target/release/artifactd-bench throughput\n",
            exe.display()
        );
    }
    // A server binary much older than this one was probably not rebuilt with it.
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if let (Some(server), Some(bench)) = (modified(&exe), modified(&me))
        && bench
            .duration_since(server)
            .is_ok_and(|age| age > Duration::from_secs(60))
    {
        eprintln!(
            "warning: {} is older than this benchmark and may be stale; \
             `cargo build --release --bins` rebuilds both",
            exe.display()
        );
    }
    Ok(exe)
}

/// A port that was free a moment ago: bound to 127.0.0.1:0, read, released.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// A child process that is killed (and reaped) when this guard is dropped, on success and on
/// every error path alike.
struct ChildGuard {
    name: &'static str,
    child: Child,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the child has already exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited early ({status}); see its log above", self.name),
            Err(e) => Err(e).with_context(|| format!("checking on {}", self.name)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Settings an `artifactd` child takes from this process's environment: cleared, so that
/// only what a benchmark passes explicitly applies.
fn is_artifactd_setting(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with("ARTIFACTD_") || name == "DATABASE_URL" || name == "REDIS_URL"
}

/// The `artifactd` binary configured by `env` alone (on top of its defaults): inherited
/// artifactd settings are removed, logs go to this process's stderr at `warn`.
fn artifactd_command(exe: &Path, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(exe);
    for (name, _) in std::env::vars_os() {
        if is_artifactd_setting(&name) {
            command.env_remove(name);
        }
    }
    command
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

/// Starts the `artifactd` server on 127.0.0.1 (`grpc_port`, `http_port`), configured by
/// `env` (database, blob store, plan, …) on top of its defaults.
fn spawn_artifactd(
    exe: &Path,
    grpc_port: u16,
    http_port: u16,
    env: &[(&str, String)],
) -> anyhow::Result<ChildGuard> {
    let child = artifactd_command(exe, env)
        .env("ARTIFACTD_GRPC_LISTEN", format!("127.0.0.1:{grpc_port}"))
        .env("ARTIFACTD_HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    Ok(ChildGuard {
        name: "artifactd",
        child,
    })
}

/// An `artifactd` server child, ready to serve, and the port of its gRPC API.
struct Server {
    child: ChildGuard,
    grpc_port: u16,
}

impl Server {
    /// Starts `artifactd` with `env` on free ports and waits until /readyz answers 200.
    fn start(exe: &Path, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let grpc_port = free_port()?;
        let http_port = free_port()?;
        let mut child = spawn_artifactd(exe, grpc_port, http_port, env)?;
        wait_ready_http(&mut child, http_port)?;
        Ok(Self { child, grpc_port })
    }

    /// Kills the server now and waits for it to be gone.
    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn stop(self) {
        drop(self.child);
    }
}

/// Runs `artifactd migrate` with `env` and waits for it to finish.
fn migrate_with_artifactd(exe: &Path, env: &[(&str, String)]) -> anyhow::Result<()> {
    let status = artifactd_command(exe, env)
        .arg("migrate")
        .status()
        .with_context(|| format!("running {} migrate", exe.display()))?;
    ensure!(
        status.success(),
        "`artifactd migrate` failed ({status}); see its log above"
    );
    Ok(())
}

fn spawn_bare(port: u16) -> anyhow::Result<ChildGuard> {
    let me = std::env::current_exe().context("locating this executable")?;
    let child = Command::new(&me)
        .args(["serve-bare", "--listen", &format!("127.0.0.1:{port}")])
        // Held open by the guard: the bare server exits when it sees EOF, so it does not
        // outlive this process even if this one is killed outright.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} serve-bare", me.display()))?;
    Ok(ChildGuard {
        name: "the bare stream server",
        child,
    })
}

/// Polls `GET /readyz` (plain HTTP/1.0 over a TcpStream) until it answers 200.
fn wait_ready_http(child: &mut ChildGuard, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        child.check_running()?;
        if readyz(port).unwrap_or(false) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} was not ready after {STARTUP_TIMEOUT:?} (http://127.0.0.1:{port}/readyz)",
            child.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn readyz(port: u16) -> std::io::Result<bool> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    // "HTTP/1.x 200 OK": the status is the second word of the first line.
    let status = response
        .split(|&b| b == b' ')
        .nth(1)
        .unwrap_or_default()
        .to_vec();
    Ok(status == b"200")
}

/// Waits until something accepts connections on `port`.
fn wait_ready_tcp(child: &mut ChildGuard, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        child.check_running()?;
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} was not listening on {addr} after {STARTUP_TIMEOUT:?}",
            child.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh directory under the system temp dir, removed with everything in it on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path =
            std::env::temp_dir().join(format!("artifactd-bench-{}-{nanos:09}", std::process::id()));
        // `create_dir`, not `create_dir_all`: fails rather than reuse an existing directory.
        std::fs::create_dir(&path)
            .with_context(|| format!("creating scratch directory {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!(
                "warning: could not remove scratch directory {}: {e}",
                self.0.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upload content
// ---------------------------------------------------------------------------------------------

/// A few distinct pseudo-random chunks, shared (never copied) by every upload.
#[derive(Clone)]
struct ChunkPool {
    chunks: Arc<[Bytes]>,
    chunk_size: usize,
}

impl ChunkPool {
    fn new(chunk_size: usize) -> Self {
        let chunks = (0..POOL_CHUNKS)
            .map(|seed| Bytes::from(pseudo_random(chunk_size, seed as u64 + 1)))
            .collect();
        Self { chunks, chunk_size }
    }

    /// The `total` bytes of upload `variant`, lazily, chunk by chunk: the pool cycled from
    /// its own starting chunk, after a first chunk stamped with `variant` (the one chunk
    /// copied), so that no two variants share a digest.
    fn upload(&self, variant: u64, total: u64) -> impl Iterator<Item = Bytes> + Send + 'static {
        let chunks = self.chunks.clone();
        let start = variant as usize;
        chunk_lengths(total, self.chunk_size)
            .enumerate()
            .map(move |(i, len)| {
                let chunk = chunks[(start + i) % chunks.len()].slice(..len);
                if i > 0 {
                    return chunk;
                }
                let mut first = chunk.to_vec();
                for (byte, stamp) in first.iter_mut().zip(variant.to_le_bytes()) {
                    *byte ^= stamp;
                }
                Bytes::from(first)
            })
    }
}

/// Lengths of the chunks `total` bytes are sent in: full chunks, then the remainder.
fn chunk_lengths(total: u64, chunk_size: usize) -> impl Iterator<Item = usize> + Send + 'static {
    let chunk = chunk_size as u64;
    // Each length is at most `chunk_size`, so it fits a usize.
    (0..total.div_ceil(chunk)).map(move |i| (total - i * chunk).min(chunk) as usize)
}

/// Deterministic bytes (xorshift64), different per seed.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------------
// Throughput
// ---------------------------------------------------------------------------------------------

/// Best MB/s of each measurement.
#[derive(Debug, Default)]
struct Best {
    bare_push: f64,
    push: f64,
    bare_pull: f64,
    pull: f64,
}

async fn connect(port: u16) -> anyhow::Result<Channel> {
    let url = format!("http://127.0.0.1:{port}");
    Endpoint::from_shared(url.clone())
        .with_context(|| format!("endpoint {url}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

fn artifact_client(channel: Channel) -> ArtifactServiceClient<Channel> {
    ArtifactServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn bench_scope() -> Scope {
    Scope {
        project_id: PROJECT.into(),
        kind: ScopeKind::Job.into(),
        id: JOB.into(),
    }
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE) / 1e6
}

async fn measure_throughput(
    args: &ThroughputArgs,
    pool: &ChunkPool,
    total: u64,
    grpc_port: u16,
    bare_port: u16,
) -> anyhow::Result<Best> {
    let mut bare = BareStreamClient::new(connect(bare_port).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut artifacts = artifact_client(connect(grpc_port).await?);
    let chunk_size = i32::try_from(pool.chunk_size).context("chunk size")?;

    let mut best = Best::default();
    for round in 0..args.rounds {
        // Each round pushes different content, so no push is answered by deduplication.
        let variant = u64::from(round);
        let bare_push = bare_push(&mut bare, pool, variant, total)
            .await
            .context("bare push")?;
        let push = artifact_push(&mut artifacts, pool, variant, total, THROUGHPUT_PATH)
            .await
            .context("Push")?;
        let bare_pull = bare_pull(&mut bare, chunk_size, total)
            .await
            .context("bare pull")?;
        let pull = artifact_pull(&mut artifacts, THROUGHPUT_PATH, total)
            .await
            .context("Pull")?;
        eprintln!(
            "round {}/{}: bare push {bare_push:.1}, Push {push:.1}, bare pull {bare_pull:.1}, \
             Pull {pull:.1} MB/s",
            round + 1,
            args.rounds
        );
        best.bare_push = best.bare_push.max(bare_push);
        best.push = best.push.max(push);
        best.bare_pull = best.bare_pull.max(bare_pull);
        best.pull = best.pull.max(pull);
    }
    Ok(best)
}

async fn bare_push(
    client: &mut BareStreamClient<Channel>,
    pool: &ChunkPool,
    variant: u64,
    total: u64,
) -> anyhow::Result<f64> {
    let chunks = stream::iter(pool.upload(variant, total).map(|data| Chunk { data }));
    let started = Instant::now();
    let received = client.sink(chunks).await?.into_inner().bytes;
    let elapsed = started.elapsed();
    ensure!(
        u64::try_from(received) == Ok(total),
        "the bare server counted {received} bytes, {total} were sent"
    );
    Ok(mb_per_s(total, elapsed))
}

async fn bare_pull(
    client: &mut BareStreamClient<Channel>,
    chunk_size: i32,
    total: u64,
) -> anyhow::Result<f64> {
    let request = SourceRequest {
        bytes: i64::try_from(total).context("size")?,
        chunk_size,
    };
    let started = Instant::now();
    let mut chunks = client.source(request).await?.into_inner();
    let mut received: u64 = 0;
    while let Some(chunk) = chunks.message().await? {
        received += chunk.data.len() as u64;
    }
    let elapsed = started.elapsed();
    ensure!(
        received == total,
        "received {received} bytes from the bare server, asked for {total}"
    );
    Ok(mb_per_s(total, elapsed))
}

/// One Push of upload `variant` to `path` (replacing what is there). Returns MB/s.
async fn artifact_push(
    client: &mut ArtifactServiceClient<Channel>,
    pool: &ChunkPool,
    variant: u64,
    total: u64,
    path: &str,
) -> anyhow::Result<f64> {
    let header = PushHeader {
        scope: Some(bench_scope()),
        path: path.into(),
        force: true,
        expected_size: Some(i64::try_from(total).context("size")?),
        ..Default::default()
    };
    let messages = stream::once(async move {
        PushRequest {
            msg: Some(push_request::Msg::Header(header)),
        }
    })
    .chain(stream::iter(pool.upload(variant, total).map(|chunk| {
        PushRequest {
            msg: Some(push_request::Msg::Chunk(chunk)),
        }
    })));
    let started = Instant::now();
    let response = client.push(messages).await?.into_inner();
    let elapsed = started.elapsed();
    let size = response.artifact.map(|a| a.size).unwrap_or_default();
    ensure!(
        u64::try_from(size) == Ok(total),
        "artifactd stored {size} bytes, {total} were sent"
    );
    ensure!(
        !response.deduplicated,
        "the push was deduplicated, so it measured no blob write"
    );
    Ok(mb_per_s(total, elapsed))
}

/// Pulls `path` whole and checks its size. Returns MB/s.
async fn artifact_pull(
    client: &mut ArtifactServiceClient<Channel>,
    path: &str,
    total: u64,
) -> anyhow::Result<f64> {
    let request = PullRequest {
        scope: Some(bench_scope()),
        path: path.into(),
        offset: 0,
        length: 0,
    };
    let started = Instant::now();
    let mut messages = client.pull(request).await?.into_inner();
    let first = messages
        .message()
        .await?
        .ok_or_else(|| anyhow!("Pull ended before sending the artifact"))?;
    let Some(pull_response::Msg::Artifact(artifact)) = first.msg else {
        bail!("the first Pull message was not the artifact");
    };
    let mut received: u64 = 0;
    while let Some(message) = messages.message().await? {
        match message.msg {
            Some(pull_response::Msg::Chunk(chunk)) => received += chunk.len() as u64,
            _ => bail!("a Pull message after the first was not a chunk"),
        }
    }
    let elapsed = started.elapsed();
    ensure!(
        u64::try_from(artifact.size) == Ok(total) && received == total,
        "pulled {received} bytes of a {}-byte artifact, expected {total}",
        artifact.size
    );
    Ok(mb_per_s(total, elapsed))
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn print_throughput(args: &ThroughputArgs, best: &Best) {
    let push_ratio = best.push / best.bare_push;
    let pull_ratio = best.pull / best.bare_pull;
    println!(
        "artifactd throughput — {} MiB, {} KiB chunks, best of {}, fsync={}",
        args.total_mib, args.chunk_kib, args.rounds, args.fsync
    );
    println!("{:<12} {:>8} {:>9}   target", "", "MB/s", "ratio");
    println!("{:<12} {:>8.1}", "bare push", best.bare_push);
    println!(
        "{:<12} {:>8.1} {:>8.2}×   ≥ {PUSH_TARGET:.2}×  {}",
        "Push",
        best.push,
        push_ratio,
        verdict(push_ratio >= PUSH_TARGET)
    );
    println!("{:<12} {:>8.1}", "bare pull", best.bare_pull);
    println!(
        "{:<12} {:>8.1} {:>8.2}×   ≥ {PULL_TARGET:.2}×  {}",
        "Pull",
        best.pull,
        pull_ratio,
        verdict(pull_ratio >= PULL_TARGET)
    );
}

// ---------------------------------------------------------------------------------------------
// Memory under concurrent pushes
// ---------------------------------------------------------------------------------------------

struct MemoryResult {
    /// Highest VmRSS seen by the sampler during the pushes.
    sampled_peak_kib: u64,
    /// VmHWM at the end: the peak over the server's whole life, between samples included.
    hwm_kib: u64,
    /// VmRSS when the phase started.
    before_kib: u64,
    elapsed: Duration,
    bytes: u64,
}

/// The per-push file size: `--mem-file-mib`, scaled down when the scratch filesystem cannot
/// hold every file with some headroom.
fn memory_file_size(args: &ThroughputArgs, dir: &Path) -> anyhow::Result<u64> {
    let pushes = u64::from(args.mem_pushes);
    let wanted = args.mem_file_mib * MIB;
    let needed = (wanted * pushes) as f64 * DISK_HEADROOM;
    let available = match available_bytes(dir) {
        Ok(available) => available,
        Err(e) => {
            eprintln!("warning: cannot tell free disk space ({e:#}); assuming it suffices");
            return Ok(wanted);
        }
    };
    if available as f64 >= needed {
        return Ok(wanted);
    }
    let fits_mib = (available as f64 / DISK_HEADROOM / pushes as f64 / MIB as f64) as u64;
    ensure!(
        fits_mib >= 1,
        "only {:.1} GiB free in {}: not enough for the memory phase \
         (use --mem-pushes 0 to skip it, or TMPDIR to put scratch data elsewhere)",
        available as f64 / GIB as f64,
        dir.display()
    );
    println!(
        "note: only {:.1} GiB free in {} ({:.1} GiB wanted): memory phase scaled down from \
         {} to {fits_mib} MiB per push",
        available as f64 / GIB as f64,
        dir.display(),
        needed / GIB as f64,
        args.mem_file_mib
    );
    Ok(fits_mib * MIB)
}

/// Free bytes in the filesystem holding `dir`, from `df`.
fn available_bytes(dir: &Path) -> anyhow::Result<u64> {
    let output = Command::new("df")
        .args(["-k", "--output=avail"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("running df")?;
    ensure!(
        output.status.success(),
        "df failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let kib: u64 = stdout
        .lines()
        .last()
        .map(str::trim)
        .ok_or_else(|| anyhow!("df printed nothing"))?
        .parse()
        .with_context(|| format!("parsing df output {stdout:?}"))?;
    Ok(kib * KIB)
}

/// utime + stime of one process from its `/proc/PID/stat`, in seconds (at 100 ticks/s, the
/// kernel's USER_HZ on Linux).
fn process_cpu_seconds(stat: &std::path::Path) -> Option<f64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU seconds of process `pid` so far (0 when it cannot be read, e.g. it has exited).
fn cpu_seconds(pid: u32) -> f64 {
    process_cpu_seconds(&Path::new("/proc").join(pid.to_string()).join("stat")).unwrap_or(0.0)
}

/// One field of `/proc/<pid>/status` in KiB, e.g. `VmRSS`.
fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .ok_or_else(|| anyhow!("no {field} in {path}"))?;
    let kib = value.trim().trim_end_matches("kB").trim();
    kib.parse()
        .with_context(|| format!("parsing {field} {value:?} in {path}"))
}

/// Samples `VmRSS` of `pid` on its own thread until stopped; the thread returns the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl RssSampler {
    fn start(pid: u32) -> anyhow::Result<Self> {
        let first = proc_status_kib(pid, "VmRSS")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                let mut peak = first;
                while !stopping.load(Ordering::Relaxed) {
                    peak = peak.max(proc_status_kib(pid, "VmRSS")?);
                    std::thread::sleep(RSS_SAMPLE_EVERY);
                }
                Ok(peak)
            })
            .context("starting the memory sampler")?;
        Ok(Self { stop, thread })
    }

    fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the memory sampler panicked"))?
    }
}

async fn measure_memory(
    pool: &ChunkPool,
    pushes: u32,
    file_bytes: u64,
    first_variant: u64,
    grpc_port: u16,
    pid: u32,
) -> anyhow::Result<MemoryResult> {
    eprintln!(
        "memory: {pushes} concurrent × {} MiB pushes…",
        file_bytes / MIB
    );
    let before_kib = proc_status_kib(pid, "VmRSS")?;
    let sampler = RssSampler::start(pid)?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..pushes {
        let pool = pool.clone();
        tasks.spawn(async move {
            // Its own connection, as a separate CI job would have.
            let mut client = artifact_client(connect(grpc_port).await?);
            let path = format!("memory/{n}.bin");
            artifact_push(
                &mut client,
                &pool,
                first_variant + u64::from(n),
                file_bytes,
                &path,
            )
            .await
            .with_context(|| format!("Push of {path}"))
        });
    }
    let mut outcome = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let pushed = joined
            .context("a push task panicked")
            .and_then(|result| result);
        if let (Ok(()), Err(e)) = (&outcome, pushed) {
            outcome = Err(e);
            tasks.abort_all();
        }
    }
    let elapsed = started.elapsed();
    let sampled_peak_kib = sampler.finish();
    outcome?;
    let sampled_peak_kib = sampled_peak_kib?;
    let hwm_kib = proc_status_kib(pid, "VmHWM")?;
    Ok(MemoryResult {
        sampled_peak_kib,
        hwm_kib,
        before_kib,
        elapsed,
        bytes: file_bytes * u64::from(pushes),
    })
}

fn print_memory(pushes: u32, file_bytes: u64, memory: &MemoryResult) {
    let mib = |kib: u64| kib as f64 / KIB as f64;
    // VmHWM catches spikes between samples; it also spans the throughput phase before.
    let peak = mib(memory.sampled_peak_kib.max(memory.hwm_kib));
    println!(
        "memory: {pushes} concurrent × {} MiB pushes: peak server RSS {peak:.0} MiB \
         (target ≤ {RSS_TARGET_MIB:.0} MiB) {}, {:.1} s, {:.0} MB/s",
        file_bytes / MIB,
        verdict(peak <= RSS_TARGET_MIB),
        memory.elapsed.as_secs_f64(),
        mb_per_s(memory.bytes, memory.elapsed)
    );
    println!(
        "        RSS before {:.0} MiB, sampled peak {:.0} MiB (every {} ms), VmHWM {:.0} MiB \
         (whole run)",
        mib(memory.before_kib),
        mib(memory.sampled_peak_kib),
        RSS_SAMPLE_EVERY.as_millis(),
        mib(memory.hwm_kib)
    );
}

// ---------------------------------------------------------------------------------------------
// Postgres databases and Redis key prefixes of one run
// ---------------------------------------------------------------------------------------------

/// A short random lowercase hex tag for the names a run creates.
fn random_tag() -> String {
    let mut tag = uuid::Uuid::new_v4().simple().to_string();
    tag.truncate(12);
    tag
}

/// `url` without user, password, path or query, for messages.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}")
        }
        None => "(not a URL)".to_owned(),
    }
}

/// `admin_url` naming database `name` instead: same scheme, credentials, host and options.
fn database_url(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let (scheme, rest) = base
        .split_once("://")
        .ok_or_else(|| anyhow!("the database admin URL is not a URL"))?;
    ensure!(
        matches!(scheme, "postgres" | "postgresql"),
        "the database admin URL must be a postgres:// URL, not {scheme}://"
    );
    let authority = rest.split('/').next().unwrap_or_default();
    let mut url = format!("{scheme}://{authority}/{name}");
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

/// One connection to the Postgres database at `url`.
async fn connect_postgres(url: &str) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(1)
        .connect_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    Database::connect(options)
        .await
        .with_context(|| format!("connecting to Postgres at {}", redact(url)))
}

/// Runs `task` to completion on a thread of its own with its own runtime, so that `Drop` can
/// await whether or not it runs inside a runtime.
fn run_aside<F>(task: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a tokio runtime")?
            .block_on(task)
    })
    .join()
    .map_err(|_| anyhow!("the clean-up thread panicked"))?
}

/// A fresh Postgres database, created through the admin URL and dropped `WITH (FORCE)` (so
/// that no lingering connection keeps it) when the guard is dropped, on success and on every
/// error path alike.
struct ScratchDatabase {
    admin_url: String,
    name: String,
    /// The URL of the new database.
    url: String,
}

impl ScratchDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("artifactd_bench_{}", random_tag());
        let url = database_url(admin_url, &name)?;
        let admin = connect_postgres(admin_url).await?;
        let created = admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating database {name}"));
        let _ = admin.close().await;
        created?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            url,
        })
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let dropped = run_aside(async move {
            let admin = connect_postgres(&admin_url).await?;
            let dropped = admin.execute_unprepared(&sql).await;
            let _ = admin.close().await;
            dropped?;
            Ok(())
        });
        if let Err(e) = dropped {
            eprintln!("warning: could not drop database {}: {e:#}", self.name);
        }
    }
}

async fn connect_redis(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)
        .with_context(|| format!("parsing the Redis URL {}", redact(url)))?;
    client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to Redis at {}", redact(url)))
}

/// A fresh Redis key prefix; every key under it is deleted when the guard is dropped.
struct ScratchRedisPrefix {
    url: String,
    prefix: String,
}

impl ScratchRedisPrefix {
    /// Checks that Redis answers, so that a missing Redis fails here and plainly.
    async fn create(url: &str) -> anyhow::Result<Self> {
        let mut connection = connect_redis(url).await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .with_context(|| format!("PING to Redis at {}", redact(url)))?;
        Ok(Self {
            url: url.to_owned(),
            prefix: format!("bench-{}:", random_tag()),
        })
    }
}

impl Drop for ScratchRedisPrefix {
    fn drop(&mut self) {
        let url = self.url.clone();
        // The prefix is `bench-<hex>:`, with no glob characters.
        let pattern = format!("{}*", self.prefix);
        let removed = run_aside(async move {
            let mut connection = connect_redis(&url).await?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await?;
            }
            Ok(())
        });
        if let Err(e) = removed {
            eprintln!(
                "warning: could not remove the Redis keys {}*: {e:#}",
                self.prefix
            );
        }
    }
}

/// Microseconds since the Unix epoch, now.
fn now_micros() -> anyhow::Result<i64> {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    i64::try_from(since_epoch.as_micros()).context("the system clock is out of range")
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The `p`-th percentile (0 < p ≤ 100) of `sorted`, by nearest rank (the median of an even
/// count is the lower middle value).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// GetBill over a long history
// ---------------------------------------------------------------------------------------------

fn getbill(args: &GetBillArgs) -> anyhow::Result<()> {
    warn_if_debug("getbill");
    let server_exe = artifactd_exe()?;
    let runtime = runtime()?;
    let now = now_micros()?;
    let current = Month::containing(Timestamp::from_micros(now));
    let previous = Month::containing(current.start().saturating_add_micros(-1));

    // Declared first so that it is dropped last, after the server is gone.
    let database = runtime.block_on(ScratchDatabase::create(&args.database_admin_url))?;
    eprintln!(
        "getbill: database {} on {}",
        database.name,
        redact(&database.url)
    );
    let env = [
        ("DATABASE_URL", database.url.clone()),
        // GetBill reads no blob.
        ("ARTIFACTD_BLOB_URL", "memory://".to_owned()),
        ("ARTIFACTD_DEFAULT_PLAN", BIG_PLAN.to_owned()),
    ];
    migrate_with_artifactd(&server_exe, &env)?;
    eprintln!(
        "getbill: inserting {} artifacts into project {BIG_PROJECT}…",
        args.artifacts
    );
    let history = runtime.block_on(populate_history(&database.url, args.artifacts, now))?;
    print_history(args, &history);

    let server = Server::start(&server_exe, &env)?;
    let months = runtime.block_on(measure_getbill(
        server.grpc_port,
        &[current, previous],
        args.calls,
    ))?;
    print_getbill(args, &months);

    server.stop();
    drop(runtime);
    drop(database);
    Ok(())
}

/// What `populate_history` wrote, and how long it took.
struct History {
    /// The blob, the artifacts and the project row.
    insert: Duration,
    vacuum_analyze: Duration,
    artifacts: i64,
    live: i64,
    stored_bytes: i64,
}

/// Fills a freshly migrated database with project `big`'s history; see the module docs.
async fn populate_history(url: &str, artifacts: u64, now_us: i64) -> anyhow::Result<History> {
    let db = connect_postgres(url).await?;
    let history = populate_with(&db, artifacts, now_us).await;
    let _ = db.close().await;
    history
}

async fn populate_with(
    db: &DatabaseConnection,
    artifacts: u64,
    now_us: i64,
) -> anyhow::Result<History> {
    let span_us = HISTORY_DAYS * DAY_MICROS;
    let start_us = now_us - span_us;
    // At most one artifact per microsecond (enforced by `--artifacts`), so the step is ≥ 1.
    let step_us = span_us / i64::try_from(artifacts).context("--artifacts")?;
    let life_us = ARTIFACT_LIFE_DAYS * DAY_MICROS;
    // Artifact i (1..=n) is created at start + i × step: the last one now.
    let created = format!("({start_us} + i::bigint * {step_us})");
    // Nine in ten are deleted 30 days after creation, unless that is still to come.
    let ended = format!("(i % 10 <> 0 AND {created} + {life_us} <= {now_us})");
    let ended_at = format!("CASE WHEN {ended} THEN {created} + {life_us} END");
    let insert_artifacts = format!(
        "INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, mode, \
             created_at, expires_at, keep, deleted_at, end_reason, upload_id, billing_end) \
         SELECT '{BIG_PROJECT}', 'job', 'j' || (i / 1000), 'f' || i, \
             1000 + (i % 5000) * 1000, '{EMPTY_SHA256}', 420, {created}, NULL, false, \
             {ended_at}, CASE WHEN {ended} THEN 'deleted' END, 'u' || i, {ended_at} \
         FROM generate_series(1, {artifacts}) i"
    );

    let started = Instant::now();
    db.execute_unprepared(&format!(
        "INSERT INTO blobs (sha256, size, created_at) VALUES ('{EMPTY_SHA256}', 0, 0)"
    ))
    .await
    .context("inserting the blob")?;
    db.execute_unprepared(&insert_artifacts)
        .await
        .context("inserting the artifacts")?;
    db.execute_unprepared(&format!(
        "INSERT INTO projects (project_id, plan_id, alert_thresholds, created_at, updated_at) \
         VALUES ('{BIG_PROJECT}', '{BIG_PLAN}', '', 0, 0)"
    ))
    .await
    .context("inserting the project")?;
    db.execute_unprepared(&format!(
        "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
         VALUES ('{BIG_PROJECT}', 0, '{BIG_PLAN}', 0)"
    ))
    .await
    .context("inserting the project's plan history")?;
    let insert = started.elapsed();

    // Not in a transaction: execute_unprepared sends it on its own.
    let started = Instant::now();
    db.execute_unprepared("VACUUM ANALYZE artifacts")
        .await
        .context("VACUUM ANALYZE artifacts")?;
    let vacuum_analyze = started.elapsed();

    let counts = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS artifacts, \
                 count(*) FILTER (WHERE deleted_at IS NULL) AS live, \
                 COALESCE(sum(size) FILTER (WHERE deleted_at IS NULL), 0)::bigint AS stored \
             FROM artifacts",
        ))
        .await
        .context("counting the artifacts")?
        .ok_or_else(|| anyhow!("counting the artifacts returned no row"))?;
    Ok(History {
        insert,
        vacuum_analyze,
        artifacts: counts.try_get("", "artifacts")?,
        live: counts.try_get("", "live")?,
        stored_bytes: counts.try_get("", "stored")?,
    })
}

fn print_history(args: &GetBillArgs, history: &History) {
    println!(
        "history: project {BIG_PROJECT} (plan {BIG_PLAN}), {} artifacts created over the last \
         {HISTORY_DAYS} days (~{:.0} per month); {} live now, {:.1} GB stored",
        history.artifacts,
        args.artifacts as f64 * 30.4375 / HISTORY_DAYS as f64,
        history.live,
        history.stored_bytes as f64 / 1e9
    );
    println!(
        "populated in {:.1} s (one INSERT … generate_series {:.1} s, VACUUM ANALYZE {:.1} s)",
        (history.insert + history.vacuum_analyze).as_secs_f64(),
        history.insert.as_secs_f64(),
        history.vacuum_analyze.as_secs_f64()
    );
}

/// The timed GetBill calls for one month, sorted, and the last bill returned.
struct MonthTimings {
    month: Month,
    latencies: Vec<Duration>,
    bill: Bill,
}

async fn measure_getbill(
    grpc_port: u16,
    months: &[Month],
    calls: u32,
) -> anyhow::Result<Vec<MonthTimings>> {
    let mut client = UsageServiceClient::new(connect(grpc_port).await?);
    let mut results = Vec::with_capacity(months.len());
    for &month in months {
        let request = GetBillRequest {
            project_id: BIG_PROJECT.into(),
            month: month.to_string(),
        };
        for _ in 0..GETBILL_WARMUP_CALLS {
            client
                .get_bill(request.clone())
                .await
                .with_context(|| format!("GetBill {month} (warm-up)"))?;
        }
        let mut latencies = Vec::with_capacity(usize::try_from(calls).unwrap_or_default());
        let mut bill = None;
        for _ in 0..calls {
            let started = Instant::now();
            let response = client
                .get_bill(request.clone())
                .await
                .with_context(|| format!("GetBill {month}"))?;
            latencies.push(started.elapsed());
            bill = Some(response.into_inner());
        }
        latencies.sort_unstable();
        results.push(MonthTimings {
            month,
            latencies,
            bill: bill.ok_or_else(|| anyhow!("no GetBill call was made for {month}"))?,
        });
    }
    Ok(results)
}

/// Micro-units of a currency, as `12.34 USD`.
fn money(micros: i64, currency: &str) -> String {
    format!("{:.2} {currency}", micros as f64 / 1e6)
}

fn print_getbill(args: &GetBillArgs, months: &[MonthTimings]) {
    println!(
        "GetBill latency — Postgres, {} artifacts in the history, {} sequential calls per \
         month after {GETBILL_WARMUP_CALLS} warm-up calls",
        args.artifacts, args.calls
    );
    println!(
        "{:<17} {:>9} {:>8} {:>8} {:>14}   target",
        "month", "median ms", "p90 ms", "max ms", "bill total"
    );
    for timings in months {
        let median = millis(percentile(&timings.latencies, 50.0));
        let bill = &timings.bill;
        let state = if bill.closed { "closed" } else { "open" };
        println!(
            "{:<17} {:>9.1} {:>8.1} {:>8.1} {:>14}   median ≤ {GETBILL_TARGET_MS:.0} ms  {}",
            format!("{} ({state})", timings.month),
            median,
            millis(percentile(&timings.latencies, 90.0)),
            millis(percentile(&timings.latencies, 100.0)),
            money(bill.total_micros, &bill.currency),
            verdict(median <= GETBILL_TARGET_MS)
        );
    }
    for timings in months {
        let bill = &timings.bill;
        let lines: Vec<String> = bill
            .line_items
            .iter()
            .map(|line| {
                format!(
                    "{} {} {} ({} billable, {})",
                    line.meter,
                    line.usage,
                    line.unit,
                    line.billable,
                    money(line.amount_micros, &bill.currency)
                )
            })
            .collect();
        let projected = bill
            .projected_total_micros
            .map(|micros| format!("; projected total {}", money(micros, &bill.currency)))
            .unwrap_or_default();
        println!(
            "  {} bill (plan {}): {}{projected}",
            timings.month,
            bill.plan_id,
            lines.join(", ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Small pushes per second
// ---------------------------------------------------------------------------------------------

/// Pushes counted in one pushrate run.
#[derive(Debug, Default)]
struct PushTally {
    /// Successful pushes that completed inside the measured window.
    pushes: u64,
    /// Failed pushes over the whole run, warm-up included.
    errors: u64,
    /// Successful pushes in the window that were answered by deduplication (expected: none).
    deduplicated: u64,
    first_error: Option<String>,
}

impl PushTally {
    fn add(&mut self, other: Self) {
        self.pushes += other.pushes;
        self.errors += other.errors;
        self.deduplicated += other.deduplicated;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn pushrate(args: &PushRateArgs) -> anyhow::Result<()> {
    warn_if_debug("pushrate");
    let server_exe = artifactd_exe()?;
    let runtime = runtime()?;
    let mut tallies = Vec::with_capacity(2);
    for metering in [true, false] {
        tallies.push((
            metering,
            pushrate_mode(args, &server_exe, &runtime, metering)?,
        ));
    }
    print_pushrate(args, &tallies);
    Ok(())
}

/// One pushrate run against a server of its own, on a fresh database and Redis prefix.
fn pushrate_mode(
    args: &PushRateArgs,
    server_exe: &Path,
    runtime: &tokio::runtime::Runtime,
    metering: bool,
) -> anyhow::Result<PushTally> {
    // Declared first so that they are cleaned up last, after the server is gone.
    let database = runtime.block_on(ScratchDatabase::create(&args.database_admin_url))?;
    let redis = runtime.block_on(ScratchRedisPrefix::create(&args.redis_url))?;
    let scratch = ScratchDir::create()?;
    let env = [
        ("DATABASE_URL", database.url.clone()),
        ("REDIS_URL", args.redis_url.clone()),
        ("ARTIFACTD_REDIS_PREFIX", redis.prefix.clone()),
        ("ARTIFACTD_METERING", metering.to_string()),
        ("ARTIFACTD_BLOB_FSYNC", args.fsync.to_string()),
        ("ARTIFACTD_DEFAULT_PLAN", PUSHRATE_PLAN.to_owned()),
        (
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", scratch.path().join("blobs").display()),
        ),
    ];
    eprintln!(
        "pushrate: metering {}: database {} on {}, Redis {} prefix {}, blobs in {}",
        on_off(metering),
        database.name,
        redact(&database.url),
        redact(&args.redis_url),
        redis.prefix,
        scratch.path().display()
    );
    let server = Server::start(server_exe, &env)?;
    let tally = runtime.block_on(measure_pushrate(args, server.grpc_port))?;
    eprintln!(
        "pushrate: metering {}: {} pushes in {} s, {} errors",
        on_off(metering),
        tally.pushes,
        args.seconds,
        tally.errors
    );
    server.stop();
    drop(scratch);
    drop(redis);
    drop(database);
    Ok(tally)
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

async fn measure_pushrate(args: &PushRateArgs, grpc_port: u16) -> anyhow::Result<PushTally> {
    let size = usize::try_from(args.size).context("--size")?;
    // Every client connects before the clock starts.
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(artifact_client(connect(grpc_port).await?));
    }
    let window_start = Instant::now() + PUSHRATE_WARMUP;
    let window_end = window_start + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for (id, client) in (0_u64..).zip(clients) {
        tasks.spawn(push_back_to_back(
            client,
            id,
            size,
            window_start,
            window_end,
        ));
    }
    let mut total = PushTally::default();
    while let Some(joined) = tasks.join_next().await {
        total.add(joined.context("a push task panicked")?);
    }
    Ok(total)
}

/// Client `id` pushing `size`-byte artifacts one after the other until `window_end`, to paths
/// `f1`, `f2`, … of job scope `client-<id>`. Every push has distinct content: random bytes of
/// this client's own, the first 8 stamped with the client and a counter.
async fn push_back_to_back(
    mut client: ArtifactServiceClient<Channel>,
    id: u64,
    size: usize,
    window_start: Instant,
    window_end: Instant,
) -> PushTally {
    let scope = Scope {
        project_id: PROJECT.into(),
        kind: ScopeKind::Job.into(),
        id: format!("client-{id}"),
    };
    let mut content = pseudo_random(size, 1_000 + id);
    let mut tally = PushTally::default();
    let mut n: u64 = 0;
    while Instant::now() < window_end {
        n += 1;
        content[..8].copy_from_slice(&((id << 40) | n).to_le_bytes());
        let data = Bytes::copy_from_slice(&content);
        let outcome = small_push(&mut client, &scope, format!("f{n}"), data).await;
        let done = Instant::now();
        let in_window = window_start <= done && done <= window_end;
        match outcome {
            Ok(deduplicated) if in_window => {
                tally.pushes += 1;
                tally.deduplicated += u64::from(deduplicated);
            }
            Ok(_) => {}
            Err(e) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(format!("client {id}, push {n}: {e:#}"));
                }
            }
        }
    }
    tally
}

/// One Push of `data` as a header (with `expected_size`) and a single chunk. Returns whether
/// it was deduplicated.
async fn small_push(
    client: &mut ArtifactServiceClient<Channel>,
    scope: &Scope,
    path: String,
    data: Bytes,
) -> anyhow::Result<bool> {
    let size = i64::try_from(data.len()).context("size")?;
    let header = PushHeader {
        scope: Some(scope.clone()),
        path,
        expected_size: Some(size),
        ..Default::default()
    };
    let messages = stream::iter([
        PushRequest {
            msg: Some(push_request::Msg::Header(header)),
        },
        PushRequest {
            msg: Some(push_request::Msg::Chunk(data)),
        },
    ]);
    let response = client.push(messages).await?.into_inner();
    let stored = response.artifact.map(|a| a.size).unwrap_or_default();
    ensure!(
        stored == size,
        "artifactd stored {stored} bytes, {size} were sent"
    );
    Ok(response.deduplicated)
}

fn print_pushrate(args: &PushRateArgs, tallies: &[(bool, PushTally)]) {
    let rate = |tally: &PushTally| tally.pushes as f64 / args.seconds as f64;
    println!(
        "artifactd push rate — {}-byte pushes (header with expected_size + one chunk), {} \
         clients with a connection each, {} s window after {} s warm-up",
        args.size,
        args.clients,
        args.seconds,
        PUSHRATE_WARMUP.as_secs()
    );
    println!(
        "server: Postgres ({}, a fresh database per run), Redis ({}, a fresh key prefix per \
         run), default plan {PUSHRATE_PLAN} (block overage, 2 GiB storage limit), local blob \
         directory under {}, every other setting default (blob fsync on)",
        redact(&args.database_admin_url),
        redact(&args.redis_url),
        std::env::temp_dir().display()
    );
    println!(
        "{:<9} {:>9} {:>7} {:>10} {:>7}   target",
        "metering", "pushes", "errors", "pushes/s", "MB/s"
    );
    for (metering, tally) in tallies {
        let target = if *metering {
            format!(
                "≥ {PUSHRATE_TARGET:.0}/s  {}",
                verdict(rate(tally) >= PUSHRATE_TARGET)
            )
        } else {
            "(comparison)".to_owned()
        };
        println!(
            "{:<9} {:>9} {:>7} {:>10.1} {:>7.1}   {target}",
            on_off(*metering),
            tally.pushes,
            tally.errors,
            rate(tally),
            rate(tally) * args.size as f64 / 1e6
        );
    }
    let on = tallies.iter().find(|(metering, _)| *metering);
    let off = tallies.iter().find(|(metering, _)| !*metering);
    if let (Some((_, on)), Some((_, off))) = (on, off)
        && off.pushes > 0
    {
        println!(
            "metering on ÷ off: {:.2}×",
            on.pushes as f64 / off.pushes as f64
        );
    }
    for (metering, tally) in tallies {
        if tally.deduplicated > 0 {
            println!(
                "note: metering {}: {} pushes were deduplicated",
                on_off(*metering),
                tally.deduplicated
            );
        }
        if let Some(error) = &tally.first_error {
            println!(
                "first error (metering {}, of {}): {error}",
                on_off(*metering),
                tally.errors
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bare baseline server
// ---------------------------------------------------------------------------------------------

/// `artifactd.bench.v1.BareStream`: the transport alone, with no storage and no hashing.
#[derive(Debug, Default)]
struct Bare;

#[tonic::async_trait]
impl BareStream for Bare {
    async fn sink(
        &self,
        request: Request<Streaming<Chunk>>,
    ) -> Result<Response<SinkResult>, Status> {
        let mut chunks = request.into_inner();
        let mut bytes: i64 = 0;
        while let Some(chunk) = chunks.message().await? {
            bytes += chunk.data.len() as i64;
        }
        Ok(Response::new(SinkResult { bytes }))
    }

    type SourceStream = BoxStream<'static, Result<Chunk, Status>>;

    async fn source(
        &self,
        request: Request<SourceRequest>,
    ) -> Result<Response<Self::SourceStream>, Status> {
        let SourceRequest { bytes, chunk_size } = request.into_inner();
        let total = u64::try_from(bytes)
            .map_err(|_| Status::invalid_argument("bytes must not be negative"))?;
        let chunk_size = usize::try_from(chunk_size)
            .ok()
            .filter(|size| (1..=MAX_CHUNK_KIB * 1024).contains(size))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "chunk_size must be between 1 and {} bytes",
                    MAX_CHUNK_KIB * 1024
                ))
            })?;
        // One allocation per request; every chunk is a reference-counted view of it.
        let data = Bytes::from(pseudo_random(chunk_size, 1));
        let chunks = chunk_lengths(total, chunk_size).map(move |len| {
            Ok(Chunk {
                data: data.slice(..len),
            })
        });
        Ok(Response::new(stream::iter(chunks).boxed()))
    }
}

fn serve_bare(listen: SocketAddr) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        // Stop when stdin closes (the parent benchmark went away) or on Ctrl-C.
        let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("stdin-watch".into())
            .spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                let _ = closed.send(());
            })
            .context("watching stdin")?;
        let shutdown = async {
            tokio::select! {
                _ = stdin_closed => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let service = BareStreamServer::new(Bare)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        // The same transport setup as artifactd's gRPC listener (src/server.rs).
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .context("serving the bare stream")
    })
}

/// ListProjectsUsage page target: median latency, in milliseconds.
const PROJECTS_PAGE_TARGET_MS: f64 = 200.0;

/// `projects`: fills a database with `--projects` projects, each with 30 days of egress
/// (one record a day) and three artifacts in the previous month, starts the real server,
/// lets the first call finalize the month (timed on its own), then walks every page of
/// `ListProjectsUsage` and reports the page latencies.
fn projects(args: &ProjectsArgs) -> anyhow::Result<()> {
    warn_if_debug("projects");
    let server_exe = artifactd_exe()?;
    let runtime = runtime()?;
    let now = now_micros()?;
    let month = Month::containing(Timestamp::from_micros(now));
    let previous = Month::containing(month.start().saturating_add_micros(-1));
    let database = runtime.block_on(ScratchDatabase::create(&args.database_admin_url))?;
    let env = [
        ("DATABASE_URL", database.url.clone()),
        ("ARTIFACTD_BLOB_URL", "memory://".to_owned()),
    ];
    migrate_with_artifactd(&server_exe, &env)?;
    eprintln!(
        "projects: inserting {} projects' {previous}…",
        args.projects
    );
    let started = Instant::now();
    runtime.block_on(async {
        let db = connect_postgres(&database.url).await?;
        let (start, day) = (previous.start().as_micros(), DAY_MICROS);
        let n = args.projects;
        for statement in [
            format!(
                "INSERT INTO projects (project_id, plan_id, alert_thresholds, created_at, updated_at) \
                 SELECT 'p' || i, CASE WHEN i % 3 = 0 THEN 'team' ELSE 'enterprise' END, '', 0, 0 \
                 FROM generate_series(1, {n}) i"
            ),
            "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
             SELECT project_id, 0, plan_id, 0 FROM projects"
                .to_owned(),
            format!("INSERT INTO blobs (sha256, size, created_at) VALUES ('{EMPTY_SHA256}', 0, 0)"),
            format!(
                "INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, mode, \
                 created_at, keep, upload_id, billing_end) \
                 SELECT 'p' || i, 'job', 'j', 'f' || k, (i % 97 + 1) * 1073741824::bigint * k, \
                 '{EMPTY_SHA256}', 420, {start} + k * 7 * {day}, false, 'u' || i || '-' || k, NULL \
                 FROM generate_series(1, {n}) i, generate_series(1, 3) k"
            ),
            format!(
                "INSERT INTO usage_events (id, project_id, meter, bytes, occurred_at) \
                 SELECT 'e' || i || '-' || d, 'p' || i, 'egress', (i % 89 + 1) * 1073741824::bigint, \
                 {start} + d * {day} + 3600000000 FROM generate_series(1, {n}) i, generate_series(0, 27) d"
            ),
            "VACUUM ANALYZE".to_owned(),
        ] {
            db.execute_unprepared(&statement)
                .await
                .with_context(|| format!("populating: {}", &statement[..40.min(statement.len())]))?;
        }
        let _ = db.close().await;
        anyhow::Ok(())
    })?;
    eprintln!(
        "projects: inserted in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let server = Server::start(&server_exe, &env)?;
    let (finalize, pages) = runtime.block_on(async {
        let mut client = UsageServiceClient::new(connect(server.grpc_port).await?);
        let request = |token: String| ListProjectsUsageRequest {
            month: previous.to_string(),
            page_size: i32::try_from(args.page_size).unwrap_or(100),
            page_token: token,
        };
        // The server's finalizer freezes the month at start-up; the listing answers
        // UNAVAILABLE ("retry later") until it has.
        let started = Instant::now();
        loop {
            match client.list_projects_usage(request(String::new())).await {
                Ok(_) => break,
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    ensure!(
                        started.elapsed() < Duration::from_secs(1200),
                        "the month was not finalized within 20 minutes"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(status) => return Err(status).context("ListProjectsUsage"),
            }
        }
        let finalize = started.elapsed();
        let mut pages = Vec::new();
        let mut token = String::new();
        let mut seen = 0u64;
        let mut last: Option<(i64, String)> = None;
        loop {
            let started = Instant::now();
            let page = client
                .list_projects_usage(request(token))
                .await
                .context("ListProjectsUsage")?
                .into_inner();
            pages.push(started.elapsed());
            for row in &page.projects {
                let key = (row.total_micros, row.project_id.clone());
                if let Some((total, id)) = &last {
                    ensure!(
                        *total > key.0 || (*total == key.0 && *id < key.1),
                        "rows out of order at {}",
                        row.project_id
                    );
                }
                last = Some(key);
            }
            seen += page.projects.len() as u64;
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        ensure!(
            seen == args.projects,
            "listed {seen} of {} projects",
            args.projects
        );
        anyhow::Ok((finalize, pages))
    })?;
    server.stop();
    drop(runtime);
    drop(database);

    let mut sorted = pages.clone();
    sorted.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(percentile(&sorted, 0.5));
    println!(
        "ListProjectsUsage over {} projects × {} days of {previous}, {} per page (Postgres)",
        args.projects,
        previous.seconds() / 86_400,
        args.page_size
    );
    println!(
        "  finalizing {} invoices (the server's finalizer, from start-up):  {:.1} s",
        args.projects,
        finalize.as_secs_f64()
    );
    println!(
        "  {} pages: median {median:.1} ms, p95 {:.1} ms, max {:.1} ms  (target ≤ {PROJECTS_PAGE_TARGET_MS} ms: {})",
        pages.len(),
        ms(percentile(&sorted, 0.95)),
        ms(sorted.last().copied().unwrap_or_default()),
        verdict(median <= PROJECTS_PAGE_TARGET_MS)
    );
    Ok(())
}
