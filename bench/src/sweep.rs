//! `artifactd-bench sweep`: how long the sweeper takes to end 1,000,000 expired artifacts
//! and collect their content on Postgres while pushes and pulls go on (target: ≤ 60 s), and
//! what the sweep does to those pushes' and pulls' latency.
//!
//! It creates a fresh Postgres database, migrates it, and seeds it with SQL
//! (`generate_series`, far faster than pushing): `--artifacts` artifacts of 64 bytes in
//! project `sweep`, created 40 days ago and expired 10 days ago (so every blob is past the
//! one-hour grace), each with content of its own — kept in its blob row (inline), except
//! every `artifacts / files`-th, whose content is a file in the blob directory. It then
//! builds the server in this process (sweeper interval off), serves it on 127.0.0.1,
//! pushes a few live artifacts for the pullers, starts `--pushers` clients pushing distinct
//! 4 KiB files and `--pullers` clients pulling the live ones, each starting `--rate`
//! operations a second (0: back to back), and times one
//! `sweep_once`. Afterwards it checks that every seeded artifact ended at its expiry and
//! every seeded blob (and file) is gone, and prints the figures. The database and the blob
//! directory are removed at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use artifactd::config::Config;
use artifactd::domain::SystemClock;
use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::{PullRequest, Scope, ScopeKind, pull_response};
use artifactd::server::{self, App};
use bytes::Bytes;
use clap::Args;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use tonic::transport::Channel;

use crate::client::connect;
use crate::content::pseudo_random;
use crate::measure::{millis, now_micros, percentile, process_cpu_seconds};
use crate::pushrate::small_push;
use crate::scratch::{ScratchDatabase, ScratchDir, connect_postgres};
use crate::{DEFAULT_ADMIN_URL, runtime, warn_if_debug};

const SWEEP_TARGET_SECONDS: f64 = 60.0;
const DAY_MICROS: i64 = 86_400 * 1_000_000;
/// Live artifacts the pullers read: half inline (8 KiB), half files (64 KiB).
const PULL_ARTIFACTS: u64 = 40;

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Postgres URL with the right to create and drop databases; the benchmark's own database
    /// is created next to the one it names.
    #[arg(long, env = "TEST_DATABASE_URL", default_value = DEFAULT_ADMIN_URL, hide_env_values = true)]
    database_admin_url: String,

    /// Expired artifacts to end, each with content of its own.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    artifacts: u64,

    /// How many of them keep their content in a file rather than their blob row.
    #[arg(long, default_value_t = 10_000)]
    files: u64,

    /// Rows per statement (ARTIFACTD_SWEEP_BATCH).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,

    /// Clients pushing 4 KiB files during the sweep.
    #[arg(long, default_value_t = 2)]
    pushers: u32,

    /// Clients pulling live artifacts during the sweep.
    #[arg(long, default_value_t = 2)]
    pullers: u32,

    /// Operations per second each pusher and puller starts (0: back to back). Back-to-back
    /// clients on this process saturate a 2-core machine by themselves, so the sweep's time
    /// would measure how much CPU they leave it; a steady rate measures the sweep alongside
    /// a given load, and the latencies what that load sees.
    #[arg(long, default_value_t = 25)]
    rate: u32,
}

pub fn sweep(args: &SweepArgs) -> anyhow::Result<()> {
    warn_if_debug("sweep");
    ensure!(
        args.files <= args.artifacts,
        "--files cannot exceed --artifacts"
    );
    runtime()?.block_on(async {
        let database = ScratchDatabase::create(&args.database_admin_url).await?;
        let blob_dir = ScratchDir::create()?;
        artifactd::store::Store::migrate(&database.url)
            .await
            .context("migrating the benchmark database")?;
        let now = now_micros()?;
        let seeding = Instant::now();
        seed(&database.url, args, now, blob_dir.path()).await?;
        println!(
            "seeded {} expired artifacts ({} inline blobs, {} files) in {:.1} s",
            args.artifacts,
            args.artifacts - args.files,
            args.files,
            seeding.elapsed().as_secs_f64()
        );

        let mut config = Config::with_stores(
            &database.url,
            &format!("file://{}", blob_dir.path().display()),
        );
        config.sweep_interval = Duration::ZERO;
        config.sweep_batch = args.batch;
        config.default_plan = "enterprise".to_owned();
        let app = App::build(&config, Arc::new(SystemClock))
            .await
            .context("building the server")?;
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = grpc.local_addr()?.port();
        let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server::serve(app.clone(), grpc, http, async {
            let _ = stopped.await;
        }));

        let measured = measure(&app, args, port).await;
        let _ = stop_server.send(());
        let _ = serving.await;
        let measured = measured?;
        verify(&database.url, args, blob_dir.path()).await?;
        print_sweep(args, &measured);
        Ok(())
    })
}

/// Projects, blobs and artifacts by `generate_series`, then the blob files.
pub(crate) async fn seed(
    url: &str,
    args: &SweepArgs,
    now: i64,
    blob_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let db = connect_postgres(url).await?;
    let created = now - 40 * DAY_MICROS;
    let expired = now - 10 * DAY_MICROS;
    // Every `stride`-th artifact's content is a file; the rest is inline.
    let stride = args.artifacts.checked_div(args.files).unwrap_or(0).max(1);
    let file_filter = if args.files == 0 {
        "false".to_owned()
    } else {
        format!("i % {stride} = 0 AND i / {stride} <= {}", args.files)
    };
    let statements = [
        "INSERT INTO projects (project_id, plan_id, alert_thresholds, created_at, updated_at) \
         VALUES ('sweep', 'enterprise', '', 0, 0)"
            .to_owned(),
        "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
         VALUES ('sweep', 0, 'enterprise', 0)"
            .to_owned(),
        format!(
            "INSERT INTO blobs (sha256, size, created_at, content, last_ref_at) \
             SELECT encode(sha256(int8send(i)), 'hex'), 64, {created}, \
               CASE WHEN {file_filter} THEN NULL \
                 ELSE convert_to(lpad(i::text, 64, 'x'), 'UTF8') END, {created} \
             FROM generate_series(1, {}) AS i",
            args.artifacts
        ),
        format!(
            "INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, mode, \
               created_at, expires_at, keep, upload_id, billing_end) \
             SELECT 'sweep', 'job', 'j' || (i / 1000), 'f/' || i, 64, \
               encode(sha256(int8send(i)), 'hex'), 420, {created}, {expired} + i, false, \
               'seed-' || i, {expired} + i \
             FROM generate_series(1, {}) AS i",
            args.artifacts
        ),
        "VACUUM ANALYZE blobs".to_owned(),
        "VACUUM ANALYZE artifacts".to_owned(),
    ];
    for statement in &statements {
        db.execute_unprepared(statement)
            .await
            .with_context(|| format!("seeding: {}", &statement[..statement.len().min(60)]))?;
    }
    let files = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT sha256 FROM blobs WHERE content IS NULL",
        ))
        .await?;
    let _ = db.close().await;
    for row in files {
        let sha256: String = row.try_get_by_index(0)?;
        let path = blob_file(blob_dir, &sha256);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, [b'f'; 64])?;
    }
    Ok(())
}

fn blob_file(blob_dir: &std::path::Path, sha256: &str) -> std::path::PathBuf {
    blob_dir.join(format!(
        "blobs/sha256/{}/{}/{sha256}",
        &sha256[..2],
        &sha256[2..4]
    ))
}

struct Measured {
    elapsed: Duration,
    ended: u64,
    collected_blobs: u64,
    collected_bytes: u64,
    cpu: CpuTimes,
    pushes: Vec<Duration>,
    pulls: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

/// Latencies of operations that started while the sweep ran.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

async fn measure(app: &App, args: &SweepArgs, port: u16) -> anyhow::Result<Measured> {
    let live = Scope {
        project_id: "live".into(),
        kind: ScopeKind::Project.into(),
        id: String::new(),
    };
    let mut client = ArtifactServiceClient::new(connect(port).await?);
    for i in 0..PULL_ARTIFACTS {
        let size = if i % 2 == 0 { 8 * 1024 } else { 64 * 1024 };
        let data = Bytes::from(pseudo_random(size, 7_000 + i));
        small_push(&mut client, &live, format!("pull/{i}"), data).await?;
    }
    let sweeping = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for id in 0..u64::from(args.pushers) {
        let (sweeping, done, live) = (sweeping.clone(), done.clone(), live.clone());
        let mut client = ArtifactServiceClient::new(connect(port).await?);
        let mut pace = pacer(args.rate);
        tasks.push((
            true,
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut content = pseudo_random(4096, 9_000 + id);
                let mut n = 0u64;
                while !done.load(Ordering::SeqCst) {
                    pace.tick().await;
                    n += 1;
                    content[..8].copy_from_slice(&((id << 40) | n).to_le_bytes());
                    let started = Instant::now();
                    let during = sweeping.load(Ordering::SeqCst);
                    let result = small_push(
                        &mut client,
                        &live,
                        format!("push/{id}/{n}"),
                        Bytes::copy_from_slice(&content),
                    )
                    .await;
                    record(&mut tally, during, started, result.map(|_| ()));
                }
                tally
            }),
        ));
    }
    for id in 0..u64::from(args.pullers) {
        let (sweeping, done, live) = (sweeping.clone(), done.clone(), live.clone());
        let mut client = ArtifactServiceClient::new(connect(port).await?);
        let mut pace = pacer(args.rate);
        tasks.push((
            false,
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut n = id;
                while !done.load(Ordering::SeqCst) {
                    pace.tick().await;
                    n += 1;
                    let started = Instant::now();
                    let during = sweeping.load(Ordering::SeqCst);
                    let result =
                        pull_all(&mut client, &live, format!("pull/{}", n % PULL_ARTIFACTS)).await;
                    record(&mut tally, during, started, result);
                }
                tally
            }),
        ));
    }
    // Let the load settle, then sweep.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sweeping.store(true, Ordering::SeqCst);
    let postgres = postgres_pids(app).await?;
    let cpu_before = CpuTimes::now(&postgres);
    let started = Instant::now();
    let report = app.sweeper.sweep_once().await;
    let elapsed = started.elapsed();
    let cpu = CpuTimes::now(&postgres).since(&cpu_before);
    sweeping.store(false, Ordering::SeqCst);
    done.store(true, Ordering::SeqCst);
    let report = report.context("the sweep failed")?;
    ensure!(report.ran, "the sweeper did not get its lock");
    let mut measured = Measured {
        elapsed,
        ended: report.ended_artifacts,
        collected_blobs: report.collected_blobs,
        collected_bytes: report.collected_bytes,
        cpu,
        pushes: Vec::new(),
        pulls: Vec::new(),
        errors: 0,
        first_error: None,
    };
    for (is_push, task) in tasks {
        let tally = task.await.context("a load task panicked")?;
        measured.errors += tally.errors;
        if measured.first_error.is_none() {
            measured.first_error = tally.first_error;
        }
        if is_push {
            measured.pushes.extend(tally.latencies);
        } else {
            measured.pulls.extend(tally.latencies);
        }
    }
    measured.pushes.sort();
    measured.pulls.sort();
    Ok(measured)
}

/// Ticks `rate` times a second (a late tick is skipped, not made up); never waits at 0.
fn pacer(rate: u32) -> tokio::time::Interval {
    let period = if rate == 0 {
        Duration::from_nanos(1)
    } else {
        Duration::from_secs(1) / rate
    };
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    interval
}

fn record(tally: &mut Tally, during: bool, started: Instant, result: anyhow::Result<()>) {
    match result {
        Ok(()) if during => tally.latencies.push(started.elapsed()),
        Ok(()) => {}
        Err(e) => {
            tally.errors += 1;
            if tally.first_error.is_none() {
                tally.first_error = Some(format!("{e:#}"));
            }
        }
    }
}

async fn pull_all(
    client: &mut ArtifactServiceClient<Channel>,
    scope: &Scope,
    path: String,
) -> anyhow::Result<()> {
    let mut stream = client
        .pull(PullRequest {
            scope: Some(scope.clone()),
            path,
            offset: 0,
            length: 0,
        })
        .await?
        .into_inner();
    let mut expected = None;
    let mut received = 0i64;
    while let Some(message) = stream.message().await? {
        match message.msg {
            Some(pull_response::Msg::Artifact(artifact)) => expected = Some(artifact.size),
            Some(pull_response::Msg::Chunk(chunk)) => received += chunk.len() as i64,
            None => {}
        }
    }
    ensure!(
        expected == Some(received),
        "pulled {received} bytes of {expected:?}"
    );
    Ok(())
}

/// Every seeded artifact ended at its expiry; every seeded blob collected, its file gone.
async fn verify(url: &str, args: &SweepArgs, blob_dir: &std::path::Path) -> anyhow::Result<()> {
    let db = connect_postgres(url).await?;
    let one = |sql: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
                .await?
                .context("no row")?;
            anyhow::Ok(row.try_get_by_index::<i64>(0)?)
        }
    };
    let ended = one(
        "SELECT COUNT(*) FROM artifacts WHERE project_id = 'sweep' AND end_reason = 'expired' \
         AND deleted_at = billing_end",
    )
    .await?;
    let stored = one(
        "SELECT COUNT(*) FROM blobs b WHERE collected_at IS NULL AND EXISTS \
         (SELECT 1 FROM artifacts a WHERE a.sha256 = b.sha256 AND a.project_id = 'sweep')",
    )
    .await?;
    let _ = db.close().await;
    ensure!(
        ended == args.artifacts as i64,
        "{ended} of {} artifacts ended at their expiry",
        args.artifacts
    );
    ensure!(stored == 0, "{stored} seeded blobs are still stored");
    let mut files = 0;
    for entry in walk(&blob_dir.join("blobs/sha256"))? {
        let name = entry.file_name();
        if name.len() == 64 {
            files += 1;
        }
    }
    // What remains are the files of the live 64 KiB artifacts the pullers read.
    ensure!(
        files <= PULL_ARTIFACTS,
        "{files} blob files remain, at most {PULL_ARTIFACTS} live ones expected"
    );
    Ok(())
}

fn walk(dir: &std::path::Path) -> anyhow::Result<Vec<std::fs::DirEntry>> {
    let mut files = Vec::new();
    if !dir.exists() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            files.extend(walk(&entry.path())?);
        } else {
            files.push(entry);
        }
    }
    Ok(files)
}

fn print_sweep(args: &SweepArgs, m: &Measured) {
    let seconds = m.elapsed.as_secs_f64();
    let pass = seconds <= SWEEP_TARGET_SECONDS && m.ended == args.artifacts;
    println!(
        "sweep: ended {} artifacts and collected {} blobs ({} bytes; {} files) in {seconds:.1} s \
         = {:.0} artifacts/s (batch {}; {} pushers and {} pullers at {}; target ≤ \
         {SWEEP_TARGET_SECONDS:.0} s: {})",
        m.ended,
        m.collected_blobs,
        m.collected_bytes,
        args.files,
        m.ended as f64 / seconds.max(1e-9),
        args.batch,
        args.pushers,
        args.pullers,
        if args.rate == 0 {
            "full speed".to_owned()
        } else {
            format!("{}/s each", args.rate)
        },
        if pass { "pass" } else { "MISS" }
    );
    println!(
        "  CPU during the sweep: Postgres (this database's backends and writers) {:.1} s, this process (sweeper, server, clients) {:.1} s, \
         load average {:.1} at the end: with {} cores the CPU alone bounds the sweep at {:.1} s",
        m.cpu.postgres,
        m.cpu.this_process,
        m.cpu.load_average,
        m.cpu.cores,
        (m.cpu.postgres + m.cpu.this_process) / f64::from(m.cpu.cores.max(1)),
    );
    for (what, latencies) in [
        ("pushes (4 KiB)", &m.pushes),
        ("pulls (8–64 KiB)", &m.pulls),
    ] {
        println!(
            "  during the sweep: {} {what}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            millis(percentile(latencies, 50.0)),
            millis(percentile(latencies, 99.0)),
            millis(latencies.last().copied().unwrap_or_default()),
        );
    }
    if m.errors > 0 {
        println!(
            "  {} errors; first: {}",
            m.errors,
            m.first_error.as_deref().unwrap_or("?")
        );
    }
}

/// The Postgres processes working for this benchmark: the backends of its database's
/// connections (the pool keeps them open) and the server's own writers, which flush what
/// they wrote. Other databases' backends (other work on a shared machine) are left out.
async fn postgres_pids(app: &App) -> anyhow::Result<Vec<i32>> {
    let db = app.store.connection();
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             OR backend_type IN ('checkpointer', 'background writer', 'walwriter')",
        ))
        .await?;
    rows.iter()
        .map(|row| Ok(row.try_get_by_index::<i32>(0)?))
        .collect()
}

/// CPU seconds (user + system) spent by the benchmark's Postgres processes and by this
/// process, from `/proc` (zero where it cannot be read): what the sweep cost, apart from
/// what else ran on the machine at the time.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTimes {
    postgres: f64,
    this_process: f64,
    load_average: f64,
    cores: u32,
}

impl CpuTimes {
    fn now(postgres_pids: &[i32]) -> Self {
        let postgres = postgres_pids
            .iter()
            .filter_map(|pid| {
                process_cpu_seconds(
                    &std::path::Path::new("/proc")
                        .join(pid.to_string())
                        .join("stat"),
                )
            })
            .sum();
        Self {
            postgres,
            this_process: process_cpu_seconds(std::path::Path::new("/proc/self/stat"))
                .unwrap_or(0.0),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0),
            cores: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
        }
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            postgres: self.postgres - before.postgres,
            this_process: self.this_process - before.this_process,
            ..*self
        }
    }
}
