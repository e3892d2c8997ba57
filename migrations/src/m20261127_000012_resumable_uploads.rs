//! Resumable pushes (`PushHeader.upload_id`): one row per upload a client named, in the
//! scope it pushes to, holding the first Push's header (a resumed Push must repeat it) and
//! the offset the server has made durable. The bytes are in the blob store under
//! `resumable/<internal_id>`; `internal_id` (the server's own id) is also the finished
//! artifact's `upload_id`, so "completed" is one lookup on that unique column and the
//! artifact row and its ingress record commit together as for any push.
//!
//! A new table: no existing row changes. `updated_at` (moved at every checkpoint) is what
//! the sweeper ages abandoned uploads by, hence its index.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000012_resumable_uploads"
    }
}

const SCRIPT: &str = r#"
CREATE TABLE uploads (
    project_id       TEXT NOT NULL,
    scope_kind       TEXT NOT NULL,
    scope_id         TEXT NOT NULL,
    upload_id        TEXT NOT NULL,
    internal_id      TEXT NOT NULL UNIQUE,
    path             TEXT NOT NULL,
    mode             INTEGER NOT NULL,
    overwrite        BOOLEAN NOT NULL,
    expected_size    BIGINT,
    expected_sha256  TEXT,
    expire_in        BIGINT,
    idempotency_key  TEXT,
    committed_offset BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    PRIMARY KEY (project_id, scope_kind, scope_id, upload_id)
);
CREATE INDEX uploads_updated_at ON uploads (updated_at)
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
