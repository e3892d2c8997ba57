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

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use artifactd::domain::Timestamp;
use artifactd::domain::metering::Month;
use artifactd::pb::v1::usage_service_client::UsageServiceClient;
use artifactd::pb::v1::{Bill, GetBillRequest};
use clap::Args;
use sea_orm::{ConnectionTrait, DatabaseConnection};

use crate::client::connect;
use crate::measure::{millis, now_micros, percentile, verdict};
use crate::process::{Server, artifactd_exe, migrate_with_artifactd};
use crate::scratch::{ScratchDatabase, connect_postgres, redact};
use crate::{DEFAULT_ADMIN_URL, runtime, warn_if_debug};

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
pub(crate) const DAY_MICROS: i64 = 86_400 * 1_000_000;
/// SHA-256 of the empty string: the one blob every generated artifact points at.
pub(crate) const EMPTY_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[derive(Debug, Clone, Args)]
pub(crate) struct GetBillArgs {
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

pub(crate) fn getbill(args: &GetBillArgs) -> anyhow::Result<()> {
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
