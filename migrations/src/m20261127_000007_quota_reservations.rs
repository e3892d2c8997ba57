//! Quota reservations in the database, for Postgres deployments without Redis: one row per
//! push or pull in flight, with its own expiry (unix microseconds on the database's clock),
//! so a crashed replica's reservations lapse on schedule. SQLite gets the table too (one
//! schema everywhere) but runs single-process with in-process reservations.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000007_quota_reservations"
    }
}

const SCRIPT: &str = r#"
CREATE TABLE quota_reservations (
    id          TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL,
    pool        TEXT NOT NULL,
    bytes       BIGINT NOT NULL CHECK (bytes >= 0),
    expires_at  BIGINT NOT NULL
);
CREATE INDEX quota_reservations_project ON quota_reservations (project_id, pool, expires_at)
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Postgres | DbBackend::Sqlite => crate::run_script(manager, SCRIPT).await,
            other => Err(DbErr::Migration(format!(
                "unsupported database backend {other:?}"
            ))),
        }
    }
}
