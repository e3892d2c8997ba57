//! `artifactd-bench`: how much of the gRPC transport's throughput artifactd keeps, how much
//! memory it needs under many concurrent uploads, how fast it bills a long history and how
//! many small pushes it takes with metering on.
//!
//! One module per subcommand (`throughput`, `getbill`, `pushrate`, `projects`, `archive`,
//! `sweep`, `s3`, `metrics-cost`, `hash`, `coldread`, `cli`, `zip64`), each documented where
//! it is; the shared parts are `process` (child servers), `scratch` (scratch data), `content`, `client`
//! and `measure`.
//!
//! Build both binaries first, in release mode:
//! `cargo build --release --workspace --bins && target/release/artifactd-bench <subcommand>`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::archive::{ArchiveArgs, archive};
use crate::bare::serve_bare;
use crate::getbill::{GetBillArgs, getbill};
use crate::projects::{ProjectsArgs, projects};
use crate::pushrate::{PushRateArgs, pushrate};
use crate::throughput::{ThroughputArgs, throughput};

mod archive;
mod bare;
mod cli;
mod client;
mod coldread;
mod content;
mod getbill;
mod hash;
mod measure;
mod metrics_cost;
mod pagecache;
mod process;
mod projects;
mod pushrate;
mod s3;
mod scratch;
mod sweep;
mod throughput;
mod zip64;

pub(crate) const KIB: u64 = 1024;
pub(crate) const MIB: u64 = 1024 * KIB;
pub(crate) const GIB: u64 = 1024 * MIB;
/// Largest gRPC message either side sends or accepts: tonic's default, as in the server.
pub(crate) const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest chunk artifactd accepts in a Push.
pub(crate) const MAX_CHUNK_KIB: usize = 1024;
/// What the artifactd child is configured to accept (10 GiB).
pub(crate) const MAX_ARTIFACT_BYTES: u64 = 10 * GIB;
/// Distinct chunks uploads are assembled from.
pub(crate) const POOL_CHUNKS: usize = 16;

/// How long a child server may take to become ready.
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Defaults of `--database-admin-url` and `--redis-url` (the same variables as the tests).
pub(crate) const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

pub(crate) const PROJECT: &str = "bench";
pub(crate) const JOB: &str = "j1";

/// Appended to `--help`: how to build and run, and where scratch data goes.
const USAGE_NOTE: &str = "Both binaries must be built, in release mode; `cargo run --bin \
    artifactd-bench` builds only this one, so use:

    cargo build --release --workspace --bins && target/release/artifactd-bench <subcommand>

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
    /// Small pushes/s and Pull MB/s (and the server's CPU for each) with the gRPC metrics
    /// layer on and off, alternating, on Postgres + Redis.
    #[command(name = "metrics-cost", after_help = USAGE_NOTE)]
    MetricsCost(metrics_cost::MetricsCostArgs),
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
    /// The `artifact` command line against the server's own Push/Pull, on Postgres.
    #[command(after_help = USAGE_NOTE)]
    Cli(cli::CliArgs),
    /// Cold reads of one file (no artifactd) after pauses of given lengths: how much the
    /// VM's free page reporting costs a read into freshly allocated page cache.
    #[command(name = "coldread", after_help = USAGE_NOTE)]
    ColdRead(coldread::ColdReadArgs),
    /// Single-core SHA-256 rate: the server's hasher against the `sha2` crate.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        BenchCommand::Throughput(args) => throughput(&args),
        BenchCommand::GetBill(args) => getbill(&args),
        BenchCommand::Projects(args) => projects(&args),
        BenchCommand::PushRate(args) => pushrate(&args),
        BenchCommand::MetricsCost(args) => metrics_cost::metrics_cost(&args),
        BenchCommand::Archive(args) => archive(&args),
        BenchCommand::Sweep(args) => sweep::sweep(&args),
        BenchCommand::Hash(args) => hash::hash(&args),
        BenchCommand::ColdRead(args) => coldread::coldread(&args),
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

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Warns that a debug build's numbers mean little.
pub(crate) fn warn_if_debug(subcommand: &str) {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build; numbers mean little. Use `cargo build --release \
             --bins && target/release/artifactd-bench {subcommand}`."
        );
    }
}
