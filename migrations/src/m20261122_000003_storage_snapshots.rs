//! Storage rollups, so a bill reads a few rows instead of the project's whole history:
//! `storage_snapshots` holds the bytes (and artifacts) a project stored at the start of a
//! UTC day, and `storage_days` the byte-microseconds of a whole past day. Both describe the
//! past, which is immutable (rows only ever end at or after "now"), so they stay right;
//! writes that could touch them (a clock moved backwards) delete them. Derived data: every
//! row is a sum over the artifact log and can be dropped at any time.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261122_000003_storage_snapshots"
    }
}

const COMMON: &str = r#"
CREATE TABLE storage_snapshots (
    project_id  TEXT NOT NULL,
    at          BIGINT NOT NULL,
    bytes       BIGINT NOT NULL,
    artifacts   BIGINT NOT NULL,
    PRIMARY KEY (project_id, at)
);
CREATE TABLE storage_days (
    project_id   TEXT NOT NULL,
    day          BIGINT NOT NULL,
    byte_micros  TEXT NOT NULL,
    PRIMARY KEY (project_id, day)
);
CREATE INDEX artifacts_project_billing_end ON artifacts (project_id, billing_end, created_at, size)
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Postgres | DbBackend::Sqlite => crate::run_script(manager, COMMON).await,
            other => Err(DbErr::Migration(format!(
                "unsupported database backend {other:?}"
            ))),
        }
    }
}
