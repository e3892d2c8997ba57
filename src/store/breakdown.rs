//! What holds a project's stored bytes at an instant: its largest artifacts, and the
//! scopes and top-level folders holding the most, each a bounded query (`LIMIT`), for the usage pages.
//!
//! Each reads the artifacts costing storage at the instant (`created_at <= at <
//! billing_end`), split in two on `deleted_at`, which partitions them exactly:
//!
//! - not ended (`deleted_at IS NULL`): for the largest artifacts, `artifacts_live_size
//!   (project_id, size DESC) WHERE deleted_at IS NULL` is walked largest first and the walk
//!   stops after `limit` rows stored at the instant;
//! - ended after the instant (`deleted_at > at`): `artifacts_ended (deleted_at, id)` finds
//!   them, and for the current month (the instant is now) there are none.
//!
//! Scopes and folders are sums, so they read every stored row of the project, then keep
//! the top rows (a top-N sort: memory bounded by the limit).

use sea_orm::{ConnectionTrait, DbBackend, QueryResult};

use super::{Store, db_error};
use crate::domain::{Error, ProjectId, Timestamp};

/// One artifact as the pages list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    pub scope_kind: String,
    pub scope_id: String,
    pub path: String,
    pub size: i64,
    pub created_at: Timestamp,
}

/// The bytes stored under one top-level folder of a scope (`folder` ends with `/`; empty
/// for the files at the scope's top).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFolder {
    pub scope_kind: String,
    pub scope_id: String,
    pub folder: String,
    pub bytes: i64,
    pub artifacts: i64,
}

/// One scope's stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredScope {
    pub scope_kind: String,
    pub scope_id: String,
    pub bytes: i64,
    pub artifacts: i64,
}

/// The artifacts stored at an instant: the `?`s are the project, the instant twice.
const STORED_AT: &str = "project_id = ? AND created_at <= ? \
                         AND (billing_end IS NULL OR billing_end > ?)";
/// The artifacts stored at an instant that are not ended: the `?`s are the project, the
/// instant twice.
const LIVE_AT: &str = "project_id = ? AND deleted_at IS NULL AND created_at <= ? \
                       AND (billing_end IS NULL OR billing_end > ?)";
/// The artifacts stored at an instant that have ended since: the project, the instant
/// three times. (`deleted_at > ?` is implied by `billing_end > ?` for an ended row; it lets
/// `artifacts_ended` answer at once when the instant is now.)
const ENDED_SINCE: &str = "project_id = ? AND deleted_at > ? AND created_at <= ? \
                           AND billing_end > ?";

impl Store {
    /// The rows of `sql`, whose `?`s are, for each of `branches`, the project, `at` as many
    /// times as the branch says and the limit; then the limit once more if `outer_limit`.
    async fn stored_at_rows(
        &self,
        sql: &str,
        branches: &[usize],
        outer_limit: bool,
        project: &ProjectId,
        at: Timestamp,
        limit: u64,
    ) -> Result<Vec<QueryResult>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut values = Vec::new();
        for ats in branches {
            values.push(project.as_str().into());
            values.extend((0..*ats).map(|_| at.as_micros().into()));
            values.push(limit.into());
        }
        if outer_limit {
            values.push(limit.into());
        }
        self.db
            .query_all_raw(self.statement(sql, values))
            .await
            .map_err(db_error)
    }

    /// The `limit` largest artifacts stored at `at`, largest first (ties by path): the
    /// `limit` largest not ended, and the `limit` largest ended since, merged.
    pub async fn largest_artifacts(
        &self,
        project: &ProjectId,
        at: Timestamp,
        limit: u64,
    ) -> Result<Vec<StoredArtifact>, Error> {
        const COLUMNS: &str = "scope_kind, scope_id, path, size, created_at";
        const ORDER: &str = "ORDER BY size DESC, scope_kind, scope_id, path LIMIT ?";
        let sql = format!(
            "SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM artifacts WHERE {LIVE_AT} {ORDER}) \
             AS live UNION ALL \
             SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM artifacts WHERE {ENDED_SINCE} {ORDER}) \
             AS ended {ORDER}"
        );
        let rows = self
            .stored_at_rows(&sql, &[2, 3], true, project, at, limit)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredArtifact {
                    scope_kind: r.try_get_by_index(0).map_err(db_error)?,
                    scope_id: r.try_get_by_index(1).map_err(db_error)?,
                    path: r.try_get_by_index(2).map_err(db_error)?,
                    size: r.try_get_by_index(3).map_err(db_error)?,
                    created_at: Timestamp::from_micros(r.try_get_by_index(4).map_err(db_error)?),
                })
            })
            .collect()
    }

    /// The `limit` scopes holding the most bytes at `at`, most first.
    pub async fn largest_scopes(
        &self,
        project: &ProjectId,
        at: Timestamp,
        limit: u64,
    ) -> Result<Vec<StoredScope>, Error> {
        let rows = self
            .stored_at_rows(
                &format!(
                    "SELECT scope_kind, scope_id, CAST(SUM(size) AS BIGINT), COUNT(*) \
                     FROM artifacts WHERE {STORED_AT} \
                     GROUP BY scope_kind, scope_id ORDER BY 3 DESC, 1, 2 LIMIT ?"
                ),
                &[2],
                false,
                project,
                at,
                limit,
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredScope {
                    scope_kind: r.try_get_by_index(0).map_err(db_error)?,
                    scope_id: r.try_get_by_index(1).map_err(db_error)?,
                    bytes: r.try_get_by_index(2).map_err(db_error)?,
                    artifacts: r.try_get_by_index(3).map_err(db_error)?,
                })
            })
            .collect()
    }

    /// The `limit` top-level folders (per scope) holding the most bytes at `at`.
    pub async fn largest_folders(
        &self,
        project: &ProjectId,
        at: Timestamp,
        limit: u64,
    ) -> Result<Vec<StoredFolder>, Error> {
        let position = match self.db.get_database_backend() {
            DbBackend::Postgres => "strpos(path, '/')",
            _ => "instr(path, '/')",
        };
        let folder =
            format!("CASE WHEN {position} > 0 THEN substr(path, 1, {position}) ELSE '' END");
        let rows = self
            .stored_at_rows(
                &format!(
                    "SELECT scope_kind, scope_id, {folder}, CAST(SUM(size) AS BIGINT), COUNT(*) \
                     FROM artifacts WHERE {STORED_AT} GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3 LIMIT ?"
                ),
                &[2],
                false,
                project,
                at,
                limit,
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredFolder {
                    scope_kind: r.try_get_by_index(0).map_err(db_error)?,
                    scope_id: r.try_get_by_index(1).map_err(db_error)?,
                    folder: r.try_get_by_index(2).map_err(db_error)?,
                    bytes: r.try_get_by_index(3).map_err(db_error)?,
                    artifacts: r.try_get_by_index(4).map_err(db_error)?,
                })
            })
            .collect()
    }
}
