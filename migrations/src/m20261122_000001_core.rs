//! The core tables: content-addressed blobs, the artifact log and push idempotency keys.
//!
//! Timestamps are BIGINT microseconds since the Unix epoch (UTC): exact integers in Rust and
//! in plain SQL alike, which metering relies on. An artifact row is never updated except to
//! end it (`deleted_at`, `end_reason`) or to pin it (`keep`), so the table is also the log
//! that storage usage is integrated from. Paths sort in byte order (`COLLATE "C"` on
//! Postgres; SQLite's default BINARY collation), which List's keyset paging relies on.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261122_000001_core"
    }
}

const POSTGRES: &str = r#"
CREATE TABLE blobs (
    sha256      TEXT PRIMARY KEY,
    size        BIGINT NOT NULL CHECK (size >= 0),
    created_at  BIGINT NOT NULL
);
CREATE TABLE artifacts (
    id          BIGSERIAL PRIMARY KEY,
    project_id  TEXT NOT NULL,
    scope_kind  TEXT NOT NULL CHECK (scope_kind IN ('job', 'workflow', 'project')),
    scope_id    TEXT NOT NULL,
    path        TEXT COLLATE "C" NOT NULL,
    size        BIGINT NOT NULL CHECK (size >= 0),
    sha256      TEXT NOT NULL REFERENCES blobs (sha256),
    mode        INTEGER NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    keep        BOOLEAN NOT NULL DEFAULT FALSE,
    deleted_at  BIGINT,
    end_reason  TEXT CHECK (end_reason IN ('deleted', 'overwritten', 'expired')),
    upload_id   TEXT NOT NULL UNIQUE
);
CREATE UNIQUE INDEX artifacts_live_path
    ON artifacts (project_id, scope_kind, scope_id, path) WHERE deleted_at IS NULL;
CREATE INDEX artifacts_project_created ON artifacts (project_id, created_at);
CREATE INDEX artifacts_sha256 ON artifacts (sha256);
CREATE TABLE push_idempotency (
    project_id       TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    artifact_id      BIGINT NOT NULL REFERENCES artifacts (id),
    deduplicated     BOOLEAN NOT NULL,
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (project_id, idempotency_key)
)
"#;

const SQLITE: &str = r#"
CREATE TABLE blobs (
    sha256      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL CHECK (size >= 0),
    created_at  INTEGER NOT NULL
);
CREATE TABLE artifacts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  TEXT NOT NULL,
    scope_kind  TEXT NOT NULL CHECK (scope_kind IN ('job', 'workflow', 'project')),
    scope_id    TEXT NOT NULL,
    path        TEXT NOT NULL,
    size        INTEGER NOT NULL CHECK (size >= 0),
    sha256      TEXT NOT NULL REFERENCES blobs (sha256),
    mode        INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    keep        BOOLEAN NOT NULL DEFAULT FALSE,
    deleted_at  INTEGER,
    end_reason  TEXT CHECK (end_reason IN ('deleted', 'overwritten', 'expired')),
    upload_id   TEXT NOT NULL UNIQUE
);
CREATE UNIQUE INDEX artifacts_live_path
    ON artifacts (project_id, scope_kind, scope_id, path) WHERE deleted_at IS NULL;
CREATE INDEX artifacts_project_created ON artifacts (project_id, created_at);
CREATE INDEX artifacts_sha256 ON artifacts (sha256);
CREATE TABLE push_idempotency (
    project_id       TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    artifact_id      INTEGER NOT NULL REFERENCES artifacts (id),
    deduplicated     BOOLEAN NOT NULL,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (project_id, idempotency_key)
)
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Postgres => crate::run_script(manager, POSTGRES).await,
            DbBackend::Sqlite => crate::run_script(manager, SQLITE).await,
            other => Err(DbErr::Migration(format!(
                "unsupported database backend {other:?}"
            ))),
        }
    }
}
