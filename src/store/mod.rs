//! Persistence: sea-orm over Postgres or SQLite. `DbErr` becomes a domain [`Error`] here and
//! nowhere else.

mod artifacts;
pub mod entities;
mod plans;
mod usage;

use std::time::Duration;

use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};

use crate::domain::Error;

pub use artifacts::{NewArtifact, PushCommit, PushedBlob, already_exists};
pub use plans::ProjectRecord;
pub use usage::UsageAlert;

/// Arbitrary but fixed key of the Postgres advisory lock that serialises migrations across
/// replicas starting at once.
const MIGRATION_LOCK_KEY: i64 = 0x6172_7469_6661_6374; // "artifact"

/// The metadata database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// The latest instant this process cached a storage rollup for. Writes are dated "now",
    /// after it, unless the clock went back (tests, or a skew beyond the rollup margin);
    /// only then must a write forget rollups.
    rollup_horizon: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Store {
    /// Connects with a pool sized for the service. SQLite files (and their directory) are
    /// created when missing and put in WAL mode so readers don't block the writer.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let db = open(url, 32).await?;
        Ok(Self {
            db,
            rollup_horizon: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
        })
    }

    /// Applies pending migrations. On Postgres a session advisory lock, held on a dedicated
    /// connection, makes concurrent replicas take turns; the later ones find nothing to do.
    pub async fn migrate(url: &str) -> Result<(), Error> {
        let db = open(url, 1).await?;
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
        let _ = self.db.close().await;
    }
}

async fn open(url: &str, max_connections: u32) -> Result<DatabaseConnection, Error> {
    let url = prepare_sqlite_url(url)?;
    let mut options = ConnectOptions::new(url.clone());
    options
        .max_connections(max_connections)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false);
    let db = Database::connect(options).await.map_err(Error::database)?;
    if db.get_database_backend() == DbBackend::Sqlite {
        db.execute_unprepared("PRAGMA journal_mode=WAL")
            .await
            .map_err(Error::database)?;
    }
    Ok(db)
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

/// Maps a database error that is not an expected constraint outcome.
pub(crate) fn db_error(err: DbErr) -> Error {
    Error::database(err)
}

#[cfg(test)]
mod tests {
    use super::*;

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
