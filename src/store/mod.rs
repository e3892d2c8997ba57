//! Persistence: sea-orm over Postgres or SQLite. `DbErr` becomes a domain [`Error`] here and
//! nowhere else.

mod artifacts;
mod breakdown;
pub mod entities;
mod invoices;
mod jobs;
pub mod lifecycle;
mod locations;
pub(crate) mod nodelay;
mod plans;
mod push_batch;
mod quota;
mod retention;
mod sweep;
mod uploads;
mod usage;

use std::time::Duration;

use migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, SqlErr,
};

use crate::domain::Error;

pub use crate::domain::ProjectRecord;
pub use crate::domain::metering::ProjectTotals as InvoiceSummary;
pub use artifacts::{NewArtifact, PushCommit, PushedBlob, already_exists, content_collected};
pub use breakdown::{StoredArtifact, StoredFolder, StoredScope};
pub use invoices::Invoice;
pub use jobs::LatestPins;
pub use lifecycle::PinChange;
pub use locations::KeyLock;
pub use quota::{QuotaBase, QuotaCheck};
pub use retention::{LiveArtifact, RulesStamp};
pub use sweep::{BlobCollection, BlobLease, BlobPage, Ended, EndedRow, StoredBlob, SweepLock};
pub use uploads::UploadRecord;
pub use usage::{NetworkPiece, UsageAlert};

/// Arbitrary but fixed key of the Postgres advisory lock that serialises migrations across
/// replicas starting at once.
const MIGRATION_LOCK_KEY: i64 = 0x6172_7469_6661_6374; // "artifact"

/// How long a SQLite statement waits for another connection's write lock before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(20);

/// The metadata database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// The latest instant this process cached a storage rollup for. Writes are dated "now",
    /// after it, unless the clock went back (tests, or a skew beyond the rollup margin);
    /// only then must a write forget rollups.
    rollup_horizon: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// The server's metrics: created with its store, so every layer above reaches them.
    metrics: crate::metrics::Metrics,
    /// Group commit of small pushes (Postgres, when configured; see `push_batch`).
    groups: Option<std::sync::Arc<push_batch::PushGroups>>,
}

impl Store {
    /// Connects with a pool sized for the service; connections idle for `idle_timeout` are
    /// closed, so a burst's extra connections (and their statement and page caches) do not
    /// stay for good. SQLite files (and their directory) are created when missing and put in
    /// WAL mode so readers don't block the writer.
    pub async fn connect(url: &str, idle_timeout: Duration) -> Result<Self, Error> {
        let db = open(url, 32, Some(idle_timeout)).await?;
        Ok(Self {
            db,
            rollup_horizon: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
            metrics: crate::metrics::Metrics::new(),
            groups: None,
        })
    }

    /// Lets up to `concurrent` groups of small (inline) pushes commit at once, each group
    /// in one statement (Postgres; `0`, or SQLite, where writers take turns anyway: every
    /// push commits alone). See `push_batch`.
    pub fn with_group_commits(mut self, concurrent: usize) -> Self {
        self.groups = (concurrent > 0 && self.db.get_database_backend() == DbBackend::Postgres)
            .then(|| {
                push_batch::PushGroups::new(self.db.clone(), self.metrics.clone(), concurrent)
            });
        self
    }

    /// The metrics of the server this store belongs to.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Applies pending migrations. On Postgres a session advisory lock, held on a dedicated
    /// connection, makes concurrent replicas take turns; the later ones find nothing to do.
    pub async fn migrate(url: &str) -> Result<(), Error> {
        let db = open(url, 1, None).await?;
        let locked = db.get_database_backend() == DbBackend::Postgres;
        if locked {
            db.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
                .await
                .map_err(Error::database)?;
        }
        let result = Migrator::up(&db, None).await;
        if locked {
            // Closing the connection would release the lock too; unlocking is just tidy.
            let _ = db
                .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
                .await;
        }
        let _ = db.close().await;
        result.map_err(|e| Error::Internal(format!("migration failed: {e}")))
    }

    /// Cheap liveness probe for `/readyz`.
    pub async fn ping(&self) -> Result<(), Error> {
        self.db.ping().await.map_err(Error::database)
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    pub async fn close(self) {
        if let Some(groups) = &self.groups {
            groups.drain().await;
        }
        let _ = self.db.close().await;
    }
}

/// How long a call waits for a Postgres connection. sqlx keeps reconnecting meanwhile, so
/// while Postgres is down (or restarting) a call answers UNAVAILABLE after this long rather
/// than hanging until its deadline; a short blip is ridden out.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

async fn open(
    url: &str,
    max_connections: u32,
    idle_timeout: Option<Duration>,
) -> Result<DatabaseConnection, Error> {
    let url = prepare_sqlite_url(url)?;
    let mut options = ConnectOptions::new(url.clone());
    options
        .max_connections(max_connections)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(if url.starts_with("postgres") {
            POSTGRES_ACQUIRE_TIMEOUT
        } else {
            Duration::from_secs(30)
        })
        .sqlx_logging(false);
    if let Some(idle_timeout) = idle_timeout {
        options.idle_timeout(idle_timeout);
    }
    // SQLite has one writer at a time; the others wait for the lock. sqlx's 5 s was too short
    // for 32 concurrent pushes on a loaded 2-core machine (UNAVAILABLE "database is locked").
    options.map_sqlx_sqlite_opts(|sqlite| sqlite.busy_timeout(SQLITE_BUSY_TIMEOUT));
    if let Some(port) = postgres_tcp_port(&url) {
        // Every new connection gets TCP_NODELAY (the driver sets none; see nodelay.rs).
        options.map_sqlx_postgres_pool_opts(move |pool| {
            pool.after_connect(move |_, _| {
                Box::pin(async move {
                    nodelay::set_on_sockets_to(port);
                    Ok(())
                })
            })
        });
    }
    let db = Database::connect(options).await.map_err(Error::database)?;
    if db.get_database_backend() == DbBackend::Sqlite {
        db.execute_unprepared("PRAGMA journal_mode=WAL")
            .await
            .map_err(Error::database)?;
    }
    Ok(db)
}

/// The server port of a `postgres://` URL that connects over TCP (not a Unix socket).
fn postgres_tcp_port(url: &str) -> Option<u16> {
    if !url.starts_with("postgres") {
        return None;
    }
    let options: sea_orm::sqlx::postgres::PgConnectOptions = url.parse().ok()?;
    options.get_socket().is_none().then(|| options.get_port())
}

/// For `sqlite://` URLs: creates the database file's directory and asks SQLite to create the
/// file (`mode=rwc`) unless the URL already says otherwise. Other URLs pass through.
fn prepare_sqlite_url(url: &str) -> Result<String, Error> {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Ok(url.to_owned());
    };
    let rest = rest.trim_start_matches("//");
    let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
    if file == ":memory:" || file.is_empty() {
        return Ok(url.to_owned());
    }
    {
        if let Some(dir) = std::path::Path::new(file).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::database(format!("cannot create {}: {e}", dir.display())))?;
        }
    }
    if query.contains("mode=") {
        Ok(url.to_owned())
    } else if query.is_empty() {
        Ok(format!("sqlite://{file}?mode=rwc"))
    } else {
        Ok(format!("sqlite://{file}?{query}&mode=rwc"))
    }
}

/// Maps a database error that is not an expected constraint outcome (those, like a push
/// racing another to one path, are handled where they happen), by what a client can do:
///
/// - the database is unreachable, overloaded or busy → UNAVAILABLE: retry later;
/// - a constraint or serialization failure: a concurrent change won a race → ABORTED: retry
///   the whole request;
/// - anything else (SQL, type or decoding errors, a row that must exist and does not) is a
///   bug → INTERNAL, logged with its cause and never retried blindly.
pub(crate) fn db_error(err: DbErr) -> Error {
    match classify(&err) {
        DbFailure::Unavailable => {
            crate::metrics::database_error("unavailable");
            Error::database(err)
        }
        DbFailure::Conflict => {
            crate::metrics::database_error("conflict");
            tracing::warn!(cause = %err, "database conflict with a concurrent change");
            Error::Aborted("the request conflicted with a concurrent change; retry it".to_owned())
        }
        DbFailure::Bug => {
            crate::metrics::database_error("bug");
            Error::Internal(format!("database: {err}"))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DbFailure {
    Unavailable,
    Conflict,
    Bug,
}

fn classify(err: &DbErr) -> DbFailure {
    use sea_orm::RuntimeErr;
    use sea_orm::sqlx::Error as Sqlx;
    if matches!(
        err.sql_err(),
        Some(SqlErr::UniqueConstraintViolation(_) | SqlErr::ForeignKeyConstraintViolation(_))
    ) {
        return DbFailure::Conflict;
    }
    let sqlx = match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => return DbFailure::Unavailable,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => e,
        _ => return DbFailure::Bug,
    };
    match &**sqlx {
        Sqlx::Io(_)
        | Sqlx::Tls(_)
        | Sqlx::Protocol(_)
        | Sqlx::PoolTimedOut
        | Sqlx::PoolClosed
        | Sqlx::WorkerCrashed => DbFailure::Unavailable,
        Sqlx::Database(db) => classify_code(
            db.code().as_deref().unwrap_or(""),
            db.try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
                .is_some(),
        ),
        _ => DbFailure::Bug,
    }
}

/// By error code: SQLite's numeric result codes, Postgres's SQLSTATE.
fn classify_code(code: &str, sqlite: bool) -> DbFailure {
    if sqlite {
        // The primary result code is the low byte of an extended one.
        return match code.parse::<i32>().map(|c| c & 0xff) {
            // BUSY, LOCKED: another writer holds the database; IOERR, FULL, CANTOPEN:
            // the disk under it.
            Ok(5 | 6 | 10 | 13 | 14) => DbFailure::Unavailable,
            // Unique, primary key and foreign key constraints (extended codes 2067, 1555,
            // 787); a CHECK or NOT NULL failure is a bug.
            _ if matches!(code, "2067" | "1555" | "787") => DbFailure::Conflict,
            _ => DbFailure::Bug,
        };
    }
    match code {
        // serialization_failure, deadlock_detected; unique, foreign key and exclusion
        // violations (a CHECK or NOT NULL failure is a bug)
        "40001" | "40P01" | "23505" | "23503" | "23P01" => DbFailure::Conflict,
        // connection exceptions, insufficient resources (too many connections, disk
        // full), operator intervention (shutdown, cannot connect now), lock timeout
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57") => {
            DbFailure::Unavailable
        }
        "55P03" => DbFailure::Unavailable,
        _ => DbFailure::Bug,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real errors from a real (in-memory SQLite) database, and a refused connection.
    #[tokio::test]
    async fn database_errors_are_classified_by_what_a_client_can_do() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        db.execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE)")
            .await
            .unwrap();
        db.execute_unprepared("INSERT INTO t (name) VALUES ('a')")
            .await
            .unwrap();
        let duplicate = db
            .execute_unprepared("INSERT INTO t (name) VALUES ('a')")
            .await
            .unwrap_err();
        assert_eq!(classify(&duplicate), DbFailure::Conflict, "{duplicate}");
        assert!(matches!(db_error(duplicate), Error::Aborted(_)));

        let missing_table = db
            .execute_unprepared("SELECT * FROM no_such_table")
            .await
            .unwrap_err();
        assert_eq!(classify(&missing_table), DbFailure::Bug, "{missing_table}");
        assert!(matches!(db_error(missing_table), Error::Internal(_)));
        let syntax = db.execute_unprepared("SELEC 1").await.unwrap_err();
        assert_eq!(classify(&syntax), DbFailure::Bug, "{syntax}");

        for bug in [
            DbErr::RecordNotFound("artifact 7".into()),
            DbErr::Type("i64 from text".into()),
            DbErr::Custom("x".into()),
        ] {
            assert_eq!(classify(&bug), DbFailure::Bug, "{bug}");
        }
        for down in [
            DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout),
            DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::ConnectionClosed),
        ] {
            assert_eq!(classify(&down), DbFailure::Unavailable, "{down}");
            assert!(matches!(db_error(down), Error::Unavailable { .. }));
        }
        // Nothing listens on port 1: the connection is refused.
        let mut options = ConnectOptions::new("postgres://postgres@127.0.0.1:1/postgres");
        options.connect_timeout(Duration::from_secs(5));
        let refused = Database::connect(options).await.unwrap_err();
        assert_eq!(classify(&refused), DbFailure::Unavailable, "{refused}");

        assert_eq!(classify_code("40001", false), DbFailure::Conflict);
        assert_eq!(classify_code("23505", false), DbFailure::Conflict);
        assert_eq!(classify_code("57P01", false), DbFailure::Unavailable);
        assert_eq!(classify_code("08006", false), DbFailure::Unavailable);
        assert_eq!(classify_code("53300", false), DbFailure::Unavailable);
        assert_eq!(classify_code("42P01", false), DbFailure::Bug);
        assert_eq!(classify_code("42601", false), DbFailure::Bug);
        assert_eq!(classify_code("5", true), DbFailure::Unavailable);
        assert_eq!(classify_code("517", true), DbFailure::Unavailable);
        assert_eq!(classify_code("2067", true), DbFailure::Conflict);
        assert_eq!(classify_code("1", true), DbFailure::Bug);
        assert_eq!(classify_code("275", true), DbFailure::Bug);
        assert_eq!(classify_code("23514", false), DbFailure::Bug);
    }

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nested/a.db");
        let url = format!("sqlite://{}", file.display());
        assert_eq!(prepare_sqlite_url(&url).unwrap(), format!("{url}?mode=rwc"));
        assert!(file.parent().unwrap().is_dir());
        assert_eq!(
            prepare_sqlite_url("sqlite::memory:").unwrap(),
            "sqlite::memory:"
        );
        assert_eq!(
            prepare_sqlite_url("postgres://h/db").unwrap(),
            "postgres://h/db"
        );
    }
}
