//! Scratch data of one run, removed however the run ends: a temp directory, a Postgres
//! database, a Redis key prefix.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, ensure};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};

/// A fresh directory under the system temp dir, removed with everything in it on drop.
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn create() -> anyhow::Result<Self> {
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

    pub(crate) fn path(&self) -> &Path {
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
// Postgres databases and Redis key prefixes of one run
// ---------------------------------------------------------------------------------------------

/// A short random lowercase hex tag for the names a run creates.
pub(crate) fn random_tag() -> String {
    let mut tag = uuid::Uuid::new_v4().simple().to_string();
    tag.truncate(12);
    tag
}

/// `url` without user, password, path or query, for messages.
pub(crate) fn redact(url: &str) -> String {
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
pub(crate) async fn connect_postgres(url: &str) -> anyhow::Result<DatabaseConnection> {
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
pub(crate) struct ScratchDatabase {
    admin_url: String,
    pub(crate) name: String,
    /// The URL of the new database.
    pub(crate) url: String,
}

impl ScratchDatabase {
    pub(crate) async fn create(admin_url: &str) -> anyhow::Result<Self> {
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
pub(crate) struct ScratchRedisPrefix {
    url: String,
    pub(crate) prefix: String,
}

impl ScratchRedisPrefix {
    /// Checks that Redis answers, so that a missing Redis fails here and plainly.
    pub(crate) async fn create(url: &str) -> anyhow::Result<Self> {
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

/// The Postgres and Redis servers a benchmark makes its scratch databases and key prefixes on
/// (the `pushrate` and `metrics-cost` arguments).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScratchServices {
    /// Postgres URL with the right to create and drop databases; the benchmark's own databases
    /// are created next to the one it names.
    #[arg(long, env = "TEST_DATABASE_URL", default_value = crate::DEFAULT_ADMIN_URL, hide_env_values = true)]
    pub(crate) database_admin_url: String,

    /// Redis for artifactd's hot quota figures (keys under fresh prefixes, removed at the end).
    #[arg(long, env = "TEST_REDIS_URL", default_value = crate::DEFAULT_REDIS_URL, hide_env_values = true)]
    pub(crate) redis_url: String,
}
