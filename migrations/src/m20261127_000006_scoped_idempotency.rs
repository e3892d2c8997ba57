//! Push idempotency keys belong to the artifact's scope, not the whole project: the key of
//! job J1 says nothing about job J2's pushes (and cannot be squatted by J2). The primary key
//! becomes (project_id, scope_kind, scope_id, idempotency_key); existing rows take the
//! scope of the artifact they recorded, so every replay reads the same as before.
//!
//! SQLite cannot change a primary key in place: the table is rebuilt and its rows copied.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000006_scoped_idempotency"
    }
}

const POSTGRES: &str = r#"
ALTER TABLE push_idempotency ADD COLUMN scope_kind TEXT;
ALTER TABLE push_idempotency ADD COLUMN scope_id TEXT;
UPDATE push_idempotency SET scope_kind = a.scope_kind, scope_id = a.scope_id
    FROM artifacts a WHERE a.id = push_idempotency.artifact_id;
ALTER TABLE push_idempotency ALTER COLUMN scope_kind SET NOT NULL;
ALTER TABLE push_idempotency ALTER COLUMN scope_id SET NOT NULL;
ALTER TABLE push_idempotency DROP CONSTRAINT push_idempotency_pkey;
ALTER TABLE push_idempotency
    ADD PRIMARY KEY (project_id, scope_kind, scope_id, idempotency_key)
"#;

const SQLITE: &str = r#"
CREATE TABLE push_idempotency_scoped (
    project_id       TEXT NOT NULL,
    scope_kind       TEXT NOT NULL,
    scope_id         TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    artifact_id      INTEGER NOT NULL REFERENCES artifacts (id),
    deduplicated     BOOLEAN NOT NULL,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (project_id, scope_kind, scope_id, idempotency_key)
);
INSERT INTO push_idempotency_scoped (project_id, scope_kind, scope_id, idempotency_key,
    artifact_id, deduplicated, created_at)
SELECT p.project_id, a.scope_kind, a.scope_id, p.idempotency_key, p.artifact_id,
    p.deduplicated, p.created_at
FROM push_idempotency p JOIN artifacts a ON a.id = p.artifact_id;
DROP TABLE push_idempotency;
ALTER TABLE push_idempotency_scoped RENAME TO push_idempotency
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
