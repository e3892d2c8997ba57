//! Adds `artifacts_live_size (project_id, size DESC) WHERE deleted_at IS NULL`, for the
//! usage page's "largest artifacts": the top 20 stored now are read by walking this index
//! largest first and stopping after 20 rows, instead of reading every stored row of the
//! project and sorting them.
//!
//! Partial on `deleted_at IS NULL`, like `artifacts_live_expiry`: ending an artifact (which
//! sets `deleted_at`) adds no entry to it, so the sweeper's cost per ended row does not grow.
//! No row changes.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000014_live_artifacts_by_size"
    }
}

const SCRIPT: &str = "CREATE INDEX IF NOT EXISTS artifacts_live_size \
                      ON artifacts (project_id, size DESC) WHERE deleted_at IS NULL";

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
