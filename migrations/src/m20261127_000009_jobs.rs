//! Jobs as the control plane reports them, and GitLab's "keep latest artifacts per ref".
//!
//! - `jobs`: one row per (project, job id) with its workflow, name, git ref and status.
//!   `seq` is the registration order (ties of `finished_at` go to the later registration);
//!   `latest` marks, per (project, ref, job name), the PASSED job that finished last — a
//!   partial unique index keeps at most one. `keeps_artifacts` is `latest` while the
//!   project's setting is on: what a push reads (and share-locks) to decide its pin, so a
//!   push racing a newer job or a switch of the setting waits for it and sees its result.
//! - `projects.keep_latest_per_ref` (default on, as GitLab): the latest job's artifacts are
//!   pinned until a newer job with the same (ref, name) passes.
//! - `artifacts.kept_latest`: the pin, apart from the user's `keep` so that neither clears
//!   the other. While either is set the artifact's `billing_end` is NULL.
//!
//! Existing rows: no jobs are known, so no artifact is pinned (`kept_latest` false) and
//! every project keeps the default (on) for the jobs reported from now on.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000009_jobs"
    }
}

const POSTGRES: &str = r#"
CREATE TABLE jobs (
    seq            BIGSERIAL PRIMARY KEY,
    project_id     TEXT NOT NULL,
    job_id         TEXT NOT NULL,
    workflow_id    TEXT NOT NULL,
    job_name       TEXT NOT NULL,
    ref            TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'passed', 'failed', 'canceled')),
    registered_at  BIGINT NOT NULL,
    finished_at    BIGINT,
    latest         BOOLEAN NOT NULL DEFAULT FALSE,
    keeps_artifacts BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (project_id, job_id)
);
CREATE UNIQUE INDEX jobs_latest ON jobs (project_id, ref, job_name) WHERE latest;
CREATE INDEX jobs_ref_name ON jobs (project_id, ref, job_name);
ALTER TABLE projects ADD COLUMN keep_latest_per_ref BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE artifacts ADD COLUMN kept_latest BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX artifacts_kept_latest ON artifacts (project_id, scope_id) WHERE kept_latest
"#;

const SQLITE: &str = r#"
CREATE TABLE jobs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id     TEXT NOT NULL,
    job_id         TEXT NOT NULL,
    workflow_id    TEXT NOT NULL,
    job_name       TEXT NOT NULL,
    ref            TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'passed', 'failed', 'canceled')),
    registered_at  INTEGER NOT NULL,
    finished_at    INTEGER,
    latest         BOOLEAN NOT NULL DEFAULT FALSE,
    keeps_artifacts BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (project_id, job_id)
);
CREATE UNIQUE INDEX jobs_latest ON jobs (project_id, ref, job_name) WHERE latest;
CREATE INDEX jobs_ref_name ON jobs (project_id, ref, job_name);
ALTER TABLE projects ADD COLUMN keep_latest_per_ref BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE artifacts ADD COLUMN kept_latest BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX artifacts_kept_latest ON artifacts (project_id, scope_id) WHERE kept_latest
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
