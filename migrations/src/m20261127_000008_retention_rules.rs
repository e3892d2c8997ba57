//! Lifecycle: retention rules (Semaphore's retention policies) and an index for the
//! lifecycle contract's "expired but not marked ended" rows.
//!
//! - `retention_rules`: per project and scope kind, an ordered list of (glob selector, max
//!   age in microseconds); `position` is the rule's place in its list (first match wins).
//! - `artifacts_live_expiry`: unended rows by `billing_end`, so "which rows have expired by
//!   now" (`deleted_at IS NULL AND billing_end <= now`: what a push to their path and the
//!   sweeper mark ended) is an index range instead of a table scan.
//!
//! Existing rows are untouched: no artifact's expiry or billing end changes.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000008_retention_rules"
    }
}

const SCRIPT: &str = r#"
CREATE TABLE retention_rules (
    project_id      TEXT NOT NULL,
    scope_kind      TEXT NOT NULL CHECK (scope_kind IN ('job', 'workflow', 'project')),
    position        INTEGER NOT NULL CHECK (position >= 0),
    selector        TEXT NOT NULL,
    max_age_micros  BIGINT NOT NULL CHECK (max_age_micros > 0),
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (project_id, scope_kind, position)
);
CREATE INDEX artifacts_live_expiry ON artifacts (billing_end) WHERE deleted_at IS NULL
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
