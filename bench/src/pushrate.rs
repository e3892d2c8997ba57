//! # `pushrate`
//!
//! `artifactd-bench pushrate` measures **small-push throughput with metering and enforcement
//! on** against **what Postgres itself sustains for the same rows**, in one run (target: at
//! least 4,000 pushes/s of 4 KiB with 32 concurrent clients on Postgres + Redis, or at least
//! 0.9× the bare loop when that is lower). Each round runs four modes one after the other,
//! each on a fresh Postgres database:
//!
//! - **bare loop**: `--clients` tasks write the rows of the same pushes (blob row with the
//!   content, artifact row, ingress record) through artifactd's own store code, one statement
//!   per push exactly as artifactd commits a lone small push, over a pool of 32 connections;
//!   no gRPC, no metering, no group commit: the naive ceiling;
//! - **metering on**: `artifactd` with group commit on (`ARTIFACTD_PUSH_GROUP_COMMITS`, 1 or
//!   `--group-commits`), a
//!   fresh Redis key prefix,
//!   projects on the `free` plan, whose overage policy is *block* with a 2 GiB storage limit,
//!   so every push reserves quota and is checked against the limit;
//! - **metering off** (group commit on), for comparison;
//! - **on, alone**: metering on with `ARTIFACTD_PUSH_GROUP_COMMITS=0`, every push committing by
//!   itself (the server before group commit), for comparison in the same run.
//!
//! Each of `--clients` clients has its own connection and pushes distinct content (no
//! deduplication) to its own job scope, one header and one chunk per push, back to back;
//! pushes completing in the `--seconds` after a 1 s warm-up are counted, with their latency.
//! Printed per mode: the median over `--rounds` of pushes/s, p50 and p99, and the ratio to the
//! bare loop. The databases and Redis keys are removed at the end.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use artifactd::domain::{ArtifactPath, Clock, Hasher, SystemClock};
use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::{PushHeader, PushRequest, Scope, ScopeKind, push_request};
use artifactd::store::{NewArtifact, PushCommit, PushedBlob, Store};
use bytes::Bytes;
use clap::Args;
use futures::stream;
use tonic::transport::Channel;

use crate::client::{artifact_client, connect};
use crate::content::pseudo_random;
use crate::measure::{millis, percentile, verdict};
use crate::process::{Server, artifactd_exe};
use crate::scratch::{ScratchDatabase, ScratchDir, ScratchRedisPrefix, ScratchServices, redact};
use crate::{PROJECT, runtime, warn_if_debug};

/// pushrate target with metering on, in pushes per second: at least this, or at least
/// `PUSHRATE_TARGET_OF_BARE` of the bare loop's rate when that is lower.
const PUSHRATE_TARGET: f64 = 4000.0;
const PUSHRATE_TARGET_OF_BARE: f64 = 0.9;
/// Pushes before the pushrate window opens, not counted.
const PUSHRATE_WARMUP: Duration = Duration::from_secs(1);
/// Plan projects get in pushrate: block overage, 2 GiB storage limit.
const PUSHRATE_PLAN: &str = "free";
/// Lifetime of the bare loop's artifacts (the server's would come from the plan).
const BARE_LIFETIME_MICROS: i64 = 7 * 86_400 * 1_000_000;

#[derive(Debug, Clone, Args)]
pub(crate) struct PushRateArgs {
    /// Where the scratch databases and Redis key prefixes go.
    #[command(flatten)]
    services: ScratchServices,

    /// Concurrent clients, each with its own connection (the bare loop: tasks sharing 32
    /// database connections, the pool artifactd opens).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    clients: u32,

    /// Length of each measured window, after a 1 s warm-up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,

    /// Rounds of every mode (alternating); the figures printed are the medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: u32,

    /// Bytes per push, sent as one chunk (at least 8: a counter keeps every push distinct).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(8..=1024 * 1024))]
    size: u64,

    /// Have artifactd fsync each blob before committing it (ARTIFACTD_BLOB_FSYNC).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,

    /// ARTIFACTD_PUSH_GROUP_COMMITS of the metering on and off modes ("on, alone" has 0).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    group_commits: u32,
}

/// What one pushrate measurement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushMode {
    /// The push's rows written straight to Postgres: no gRPC, no metering.
    Bare,
    /// artifactd with metering and enforcement on.
    Metered,
    /// artifactd with metering off.
    Unmetered,
    /// artifactd with metering on and every push committing alone (no group commit).
    MeteredAlone,
}

impl PushMode {
    const ALL: [Self; 4] = [
        Self::Bare,
        Self::Metered,
        Self::Unmetered,
        Self::MeteredAlone,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Bare => "bare loop",
            Self::Metered => "metering on",
            Self::Unmetered => "metering off",
            Self::MeteredAlone => "on, alone",
        }
    }
}

/// Pushes counted in one pushrate run.
#[derive(Debug, Default)]
pub(crate) struct PushTally {
    /// Successful pushes that completed inside the measured window.
    pub(crate) pushes: u64,
    /// Their latencies, from the request to the answer.
    pub(crate) latencies: Vec<Duration>,
    /// Failed pushes over the whole run, warm-up included.
    pub(crate) errors: u64,
    /// Successful pushes in the window that were answered by deduplication (expected: none).
    pub(crate) deduplicated: u64,
    pub(crate) first_error: Option<String>,
}

impl PushTally {
    fn add(&mut self, other: Self) {
        self.pushes += other.pushes;
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.deduplicated += other.deduplicated;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Counts one push that ended at `done` after `latency`.
    fn record(
        &mut self,
        outcome: anyhow::Result<bool>,
        latency: Duration,
        in_window: bool,
        what: impl FnOnce() -> String,
    ) {
        match outcome {
            Ok(deduplicated) if in_window => {
                self.pushes += 1;
                self.latencies.push(latency);
                self.deduplicated += u64::from(deduplicated);
            }
            Ok(_) => {}
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{}: {e:#}", what()));
                }
            }
        }
    }
}

/// One measurement's figures.
#[derive(Debug, Clone, Copy)]
struct PushFigures {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

pub(crate) fn pushrate(args: &PushRateArgs) -> anyhow::Result<()> {
    warn_if_debug("pushrate");
    let server_exe = artifactd_exe()?;
    let runtime = runtime()?;
    let mut figures: Vec<(PushMode, Vec<PushFigures>)> = PushMode::ALL
        .iter()
        .map(|mode| (*mode, Vec::new()))
        .collect();
    let mut notes = Vec::new();
    for round in 1..=args.rounds {
        for (mode, rounds) in &mut figures {
            let mut tally = pushrate_mode(args, &server_exe, &runtime, *mode)?;
            tally.latencies.sort_unstable();
            let measured = PushFigures {
                rate: tally.pushes as f64 / args.seconds as f64,
                p50: percentile(&tally.latencies, 50.0),
                p99: percentile(&tally.latencies, 99.0),
            };
            eprintln!(
                "pushrate: round {round}, {}: {:.0} pushes/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                mode.label(),
                measured.rate,
                millis(measured.p50),
                millis(measured.p99),
                tally.errors
            );
            if tally.deduplicated > 0 {
                notes.push(format!(
                    "note: round {round}, {}: {} pushes were deduplicated",
                    mode.label(),
                    tally.deduplicated
                ));
            }
            if let Some(error) = &tally.first_error {
                notes.push(format!(
                    "first error (round {round}, {}, of {}): {error}",
                    mode.label(),
                    tally.errors
                ));
            }
            rounds.push(measured);
        }
    }
    print_pushrate(args, &figures, &notes);
    Ok(())
}

/// One pushrate run, on a fresh database (and, for artifactd, a server and Redis prefix of
/// its own).
fn pushrate_mode(
    args: &PushRateArgs,
    server_exe: &Path,
    runtime: &tokio::runtime::Runtime,
    mode: PushMode,
) -> anyhow::Result<PushTally> {
    // Declared first so that they are cleaned up last, after the server is gone.
    let database = runtime.block_on(ScratchDatabase::create(&args.services.database_admin_url))?;
    if mode == PushMode::Bare {
        return runtime.block_on(measure_bare_pushrate(args, &database.url));
    }
    let metering = mode != PushMode::Unmetered;
    let redis = runtime.block_on(ScratchRedisPrefix::create(&args.services.redis_url))?;
    let scratch = ScratchDir::create()?;
    let group_commits = if mode == PushMode::MeteredAlone {
        0
    } else {
        args.group_commits
    };
    let env = [
        ("DATABASE_URL", database.url.clone()),
        ("REDIS_URL", args.services.redis_url.clone()),
        ("ARTIFACTD_REDIS_PREFIX", redis.prefix.clone()),
        ("ARTIFACTD_METERING", metering.to_string()),
        ("ARTIFACTD_BLOB_FSYNC", args.fsync.to_string()),
        ("ARTIFACTD_DEFAULT_PLAN", PUSHRATE_PLAN.to_owned()),
        ("ARTIFACTD_PUSH_GROUP_COMMITS", group_commits.to_string()),
        (
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", scratch.path().join("blobs").display()),
        ),
    ];
    eprintln!(
        "pushrate: {}: database {} on {}, Redis {} prefix {}, blobs in {}",
        mode.label(),
        database.name,
        redact(&database.url),
        redact(&args.services.redis_url),
        redis.prefix,
        scratch.path().display()
    );
    let server = Server::start(server_exe, &env)?;
    let tally = runtime.block_on(measure_pushrate(args, server.grpc_port))?;
    server.stop();
    drop(scratch);
    drop(redis);
    drop(database);
    Ok(tally)
}

async fn measure_pushrate(args: &PushRateArgs, grpc_port: u16) -> anyhow::Result<PushTally> {
    measure_pushes(grpc_port, args.clients, args.seconds, args.size, 0).await
}

/// `clients` clients, each on a connection of its own, pushing `size`-byte artifacts back to
/// back to the server on `grpc_port`; pushes completing in the `seconds` after a 1 s warm-up
/// are counted. Clients are numbered from `first_client` (each pushes to a job scope of its
/// own number), so later runs against the same server push to paths of their own.
pub(crate) async fn measure_pushes(
    grpc_port: u16,
    client_count: u32,
    seconds: u64,
    size: u64,
    first_client: u64,
) -> anyhow::Result<PushTally> {
    let size = usize::try_from(size).context("--size")?;
    // Every client connects before the clock starts.
    let mut clients = Vec::new();
    for _ in 0..client_count {
        clients.push(artifact_client(connect(grpc_port).await?));
    }
    let window_start = Instant::now() + PUSHRATE_WARMUP;
    let window_end = window_start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for (id, client) in (first_client..).zip(clients) {
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

/// The bare loop: `--clients` tasks writing the rows of the same pushes (blob row with the
/// content, artifact row, ingress record) through artifactd's own store code, each push one
/// statement of its own as artifactd commits a lone push, over a pool of 32 connections (the
/// pool artifactd opens) to a freshly migrated database. No gRPC, metering or group commit.
async fn measure_bare_pushrate(args: &PushRateArgs, url: &str) -> anyhow::Result<PushTally> {
    let size = usize::try_from(args.size).context("--size")?;
    Store::migrate(url)
        .await
        .context("migrating the bare loop's database")?;
    let store = Store::connect(url, Duration::from_secs(60))
        .await
        .context("connecting the bare loop's pool")?;
    let window_start = Instant::now() + PUSHRATE_WARMUP;
    let window_end = window_start + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..u64::from(args.clients) {
        tasks.spawn(bare_back_to_back(
            store.clone(),
            id,
            size,
            window_start,
            window_end,
        ));
    }
    let mut total = PushTally::default();
    while let Some(joined) = tasks.join_next().await {
        total.add(joined.context("a bare push task panicked")?);
    }
    store.close().await;
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
    let mut pushes = BackToBack::new(id, size, (window_start, window_end), "client");
    while let Some((n, data)) = pushes.next_push() {
        let outcome = small_push(&mut client, &scope, format!("f{n}"), data).await;
        pushes.record(outcome);
    }
    pushes.tally
}

/// The bare loop's task `id`: the same pushes as `push_back_to_back`'s client `id`.
async fn bare_back_to_back(
    store: Store,
    id: u64,
    size: usize,
    window_start: Instant,
    window_end: Instant,
) -> PushTally {
    let mut tally = PushTally::default();
    let scope = match artifactd::domain::Scope::parse(
        "scope",
        PROJECT,
        artifactd::domain::ScopeKind::Job,
        &format!("client-{id}"),
    ) {
        Ok(scope) => scope,
        Err(e) => {
            tally.record(Err(anyhow!("{e}")), Duration::ZERO, false, || {
                format!("task {id}")
            });
            return tally;
        }
    };
    let mut pushes = BackToBack::new(id, size, (window_start, window_end), "task");
    while let Some((n, data)) = pushes.next_push() {
        let outcome = bare_push(&store, &scope, n, data).await;
        pushes.record(outcome);
    }
    pushes.tally
}

/// Pusher `id`'s pushes one after the other until the window ends, each timed: every push
/// has distinct content, random bytes of the pusher's own with the first 8 stamped with the
/// pusher and a counter (from 1).
struct BackToBack {
    id: u64,
    who: &'static str,
    window: (Instant, Instant),
    content: Vec<u8>,
    n: u64,
    started: Instant,
    tally: PushTally,
}

impl BackToBack {
    fn new(id: u64, size: usize, window: (Instant, Instant), who: &'static str) -> Self {
        Self {
            id,
            who,
            window,
            content: pseudo_random(size, 1_000 + id),
            n: 0,
            started: Instant::now(),
            tally: PushTally::default(),
        }
    }

    /// The next push's counter and content, until the window ends; its clock starts now.
    fn next_push(&mut self) -> Option<(u64, Bytes)> {
        if Instant::now() >= self.window.1 {
            return None;
        }
        self.n += 1;
        self.content[..8].copy_from_slice(&((self.id << 40) | self.n).to_le_bytes());
        let data = Bytes::copy_from_slice(&self.content);
        self.started = Instant::now();
        Some((self.n, data))
    }

    /// The outcome of the push `next_push` gave last.
    fn record(&mut self, outcome: anyhow::Result<bool>) {
        let done = Instant::now();
        let in_window = self.window.0 <= done && done <= self.window.1;
        let (who, id, n) = (self.who, self.id, self.n);
        self.tally
            .record(outcome, done - self.started, in_window, || {
                format!("{who} {id}, push {n}")
            });
    }
}

/// One push's rows, committed as artifactd commits a lone small push: hashed, then blob row
/// (with the content), artifact row and ingress record in one statement.
async fn bare_push(
    store: &Store,
    scope: &artifactd::domain::Scope,
    n: u64,
    data: Bytes,
) -> anyhow::Result<bool> {
    let created_at = SystemClock.now();
    let new = NewArtifact {
        scope: scope.clone(),
        path: ArtifactPath::parse("path", &format!("f{n}"))?,
        size: i64::try_from(data.len()).context("size")?,
        sha256: Hasher::digest(&data),
        mode: 0o644,
        created_at,
        expires_at: Some(created_at.saturating_add_micros(BARE_LIFETIME_MICROS)),
        upload_id: uuid::Uuid::new_v4().simple().to_string(),
        record_ingress: true,
    };
    match store
        .commit_push(&new, false, None, &PushedBlob::Inline(data))
        .await?
    {
        PushCommit::Created { deduplicated, .. } => Ok(deduplicated),
        other => bail!("the commit answered {other:?}"),
    }
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

fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn print_pushrate(args: &PushRateArgs, figures: &[(PushMode, Vec<PushFigures>)], notes: &[String]) {
    println!(
        "artifactd push rate — {}-byte pushes (header with expected_size + one chunk), {} \
         clients with a connection each, {} s windows after {} s warm-up, median of {} \
         rounds (modes alternating within each round)",
        args.size,
        args.clients,
        args.seconds,
        PUSHRATE_WARMUP.as_secs(),
        args.rounds
    );
    println!(
        "server: Postgres ({}, a fresh database per run), Redis ({}, a fresh key prefix per \
         run), default plan {PUSHRATE_PLAN} (block overage, 2 GiB storage limit), local blob \
         directory under {}, ARTIFACTD_PUSH_GROUP_COMMITS={} (but \"on, alone\"), every other \
         setting default (blob fsync on)",
        redact(&args.services.database_admin_url),
        redact(&args.services.redis_url),
        std::env::temp_dir().display(),
        args.group_commits
    );
    println!(
        "bare loop: the same rows (blob with content, artifact, ingress record) through \
         artifactd's store code straight to Postgres, one statement per push as artifactd \
         commits a lone push, {} tasks over 32 connections; no gRPC, metering or group commit",
        args.clients
    );
    println!(
        "on, alone: metering on with ARTIFACTD_PUSH_GROUP_COMMITS=0 (every push commits by \
         itself, as before group commit)"
    );
    let medians: Vec<(PushMode, PushFigures, Vec<f64>)> = figures
        .iter()
        .map(|(mode, rounds)| {
            let rates: Vec<f64> = rounds.iter().map(|f| f.rate).collect();
            let median = PushFigures {
                rate: median_of(rates.clone()),
                p50: Duration::from_secs_f64(median_of(
                    rounds.iter().map(|f| f.p50.as_secs_f64()).collect(),
                )),
                p99: Duration::from_secs_f64(median_of(
                    rounds.iter().map(|f| f.p99.as_secs_f64()).collect(),
                )),
            };
            (*mode, median, rates)
        })
        .collect();
    let bare = medians
        .iter()
        .find(|(mode, _, _)| *mode == PushMode::Bare)
        .map(|(_, f, _)| f.rate)
        .unwrap_or_default();
    println!(
        "{:<13} {:>10} {:>8} {:>8} {:>7}   {:<28} target",
        "mode", "pushes/s", "p50 ms", "p99 ms", "÷ bare", "rounds (pushes/s)"
    );
    for (mode, median, rates) in &medians {
        let ratio = if bare > 0.0 { median.rate / bare } else { 0.0 };
        let target = match mode {
            PushMode::Metered => {
                let wanted = PUSHRATE_TARGET.min(PUSHRATE_TARGET_OF_BARE * bare);
                format!(
                    "≥ {wanted:.0}/s (min of {PUSHRATE_TARGET:.0} and {PUSHRATE_TARGET_OF_BARE}× bare)  {}",
                    verdict(median.rate >= wanted)
                )
            }
            PushMode::Bare => "(ceiling)".to_owned(),
            _ => "(comparison)".to_owned(),
        };
        let rounds = rates
            .iter()
            .map(|rate| format!("{rate:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:<13} {:>10.0} {:>8.2} {:>8.2} {:>6.2}×   {:<28} {target}",
            mode.label(),
            median.rate,
            millis(median.p50),
            millis(median.p99),
            ratio,
            rounds
        );
    }
    for note in notes {
        println!("{note}");
    }
}
