//! `artifactd-bench projects`: ListProjectsUsage page latency over many projects' finalized
//! month, on Postgres.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use artifactd::domain::Timestamp;
use artifactd::domain::metering::Month;
use artifactd::pb::v1::ListProjectsUsageRequest;
use artifactd::pb::v1::usage_service_client::UsageServiceClient;
use clap::Args;
use sea_orm::ConnectionTrait;

use crate::client::connect;
use crate::getbill::{DAY_MICROS, EMPTY_SHA256};
use crate::measure::{now_micros, percentile, verdict};
use crate::process::{Server, artifactd_exe, migrate_with_artifactd};
use crate::scratch::{ScratchDatabase, connect_postgres};
use crate::{DEFAULT_ADMIN_URL, runtime, warn_if_debug};

#[derive(Debug, Clone, Args)]
pub(crate) struct ProjectsArgs {
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

/// ListProjectsUsage page target: median latency, in milliseconds.
const PROJECTS_PAGE_TARGET_MS: f64 = 200.0;

/// `projects`: fills a database with `--projects` projects, each with 30 days of egress
/// (one record a day) and three artifacts in the previous month, starts the real server,
/// lets the first call finalize the month (timed on its own), then walks every page of
/// `ListProjectsUsage` and reports the page latencies.
pub(crate) fn projects(args: &ProjectsArgs) -> anyhow::Result<()> {
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
