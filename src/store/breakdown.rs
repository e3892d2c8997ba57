//! What holds a project's stored bytes at an instant: its largest artifacts, and the
//! scopes and top-level folders holding the most, each a bounded query (`LIMIT`), for the usage pages.
//!
//! Both read the artifacts costing storage at the instant (`created_at <= at <
//! billing_end`) through `artifacts_project_billing (project_id, created_at, billing_end,
//! size)`, then keep the top rows (a top-N sort: memory bounded by the limit).

use sea_orm::{ConnectionTrait, DbBackend};

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

impl Store {
    /// The `limit` largest artifacts stored at `at`, largest first (ties by path).
    pub async fn largest_artifacts(
        &self,
        project: &ProjectId,
        at: Timestamp,
        limit: u64,
    ) -> Result<Vec<StoredArtifact>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT scope_kind, scope_id, path, size, created_at FROM artifacts \
                 WHERE project_id = ? AND created_at <= ? \
                 AND (billing_end IS NULL OR billing_end > ?) \
                 ORDER BY size DESC, scope_kind, scope_id, path LIMIT ?",
                vec![
                    project.as_str().into(),
                    at.as_micros().into(),
                    at.as_micros().into(),
                    i64::try_from(limit).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
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
            .db
            .query_all_raw(self.statement(
                "SELECT scope_kind, scope_id, CAST(SUM(size) AS BIGINT), COUNT(*) FROM artifacts \
                 WHERE project_id = ? AND created_at <= ? \
                 AND (billing_end IS NULL OR billing_end > ?) \
                 GROUP BY scope_kind, scope_id ORDER BY 3 DESC, 1, 2 LIMIT ?",
                vec![
                    project.as_str().into(),
                    at.as_micros().into(),
                    at.as_micros().into(),
                    i64::try_from(limit).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
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
            .db
            .query_all_raw(self.statement(
                &format!(
                    "SELECT scope_kind, scope_id, {folder}, CAST(SUM(size) AS BIGINT), COUNT(*) \
                     FROM artifacts WHERE project_id = ? AND created_at <= ? \
                     AND (billing_end IS NULL OR billing_end > ?) \
                     GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3 LIMIT ?"
                ),
                vec![
                    project.as_str().into(),
                    at.as_micros().into(),
                    at.as_micros().into(),
                    i64::try_from(limit).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
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
