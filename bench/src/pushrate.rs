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

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::{PushHeader, PushRequest, Scope, ScopeKind, push_request};
use bytes::Bytes;
use clap::Args;
use futures::stream;
use tonic::transport::Channel;

use crate::client::{artifact_client, connect};
use crate::content::pseudo_random;
use crate::measure::verdict;
use crate::process::{Server, artifactd_exe};
use crate::scratch::{ScratchDatabase, ScratchDir, ScratchRedisPrefix, redact};
use crate::{DEFAULT_ADMIN_URL, DEFAULT_REDIS_URL, PROJECT, runtime, warn_if_debug};

/// pushrate target with metering on, in pushes per second.
const PUSHRATE_TARGET: f64 = 2000.0;
/// Pushes before the pushrate window opens, not counted.
const PUSHRATE_WARMUP: Duration = Duration::from_secs(1);
/// Plan projects get in pushrate: block overage, 2 GiB storage limit.
const PUSHRATE_PLAN: &str = "free";

#[derive(Debug, Clone, Args)]
pub(crate) struct PushRateArgs {
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

pub(crate) fn pushrate(args: &PushRateArgs) -> anyhow::Result<()> {
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
pub(crate) async fn small_push(
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
