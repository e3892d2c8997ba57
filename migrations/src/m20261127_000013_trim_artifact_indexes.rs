//! Drops `artifacts_project_created (project_id, created_at)`: it is a prefix of
//! `artifacts_project_billing (project_id, created_at, billing_end, size)`, which answers
//! every query it did. Each index costs the sweeper an entry per ended artifact (ending sets
//! `deleted_at`, a column partial indexes filter on, so no ending is a HOT update): at a
//! million expired artifacts on Postgres this one was about a fifth of the ending's time.
//! No row changes.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000013_trim_artifact_indexes"
    }
}

const SCRIPT: &str = "DROP INDEX IF EXISTS artifacts_project_created";

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
