//! Resumable uploads (`uploads`): the first Push's header and the durable offset of each
//! upload a client named. Completion is not stored here: an upload completed exactly when
//! an artifact carries its `internal_id` as `upload_id` (a unique column written in the
//! push's own commit), so the two can never disagree.

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Value};

use super::entities::artifact;
use super::{Store, db_error};
use crate::domain::{Artifact, ArtifactPath, Error, Scope, ScopeKind, Sha256, Timestamp, UploadId};

/// One resumable upload as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub scope: Scope,
    pub upload_id: UploadId,
    /// The server's own id: the bytes' key in the blob store and the artifact's upload id.
    pub internal_id: String,
    pub path: ArtifactPath,
    pub mode: u32,
    pub force: bool,
    pub expected_size: Option<i64>,
    pub expected_sha256: Option<Sha256>,
    pub expire_in_micros: Option<i64>,
    pub idempotency_key: Option<String>,
    /// Bytes made durable so far.
    pub committed_offset: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

const COLUMNS: &str = "project_id, scope_kind, scope_id, upload_id, internal_id, path, mode, \
                       overwrite, expected_size, expected_sha256, expire_in, idempotency_key, \
                       committed_offset, created_at, updated_at";

impl Store {
    /// Records a new upload; `false` when the scope already has one of that id (a
    /// concurrent first Push won).
    pub async fn insert_upload(&self, upload: &UploadRecord) -> Result<bool, Error> {
        let values: Vec<Value> = vec![
            upload.scope.project().as_str().into(),
            upload.scope.kind().as_str().into(),
            upload.scope.id().into(),
            upload.upload_id.as_str().into(),
            upload.internal_id.as_str().into(),
            upload.path.as_str().into(),
            (upload.mode as i32).into(),
            upload.force.into(),
            upload.expected_size.into(),
            upload
                .expected_sha256
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .into(),
            upload.expire_in_micros.into(),
            upload.idempotency_key.clone().into(),
            upload.committed_offset.into(),
            upload.created_at.as_micros().into(),
            upload.updated_at.as_micros().into(),
        ];
        let sql = format!(
            "INSERT INTO uploads ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT DO NOTHING"
        );
        let done = self
            .db
            .execute_raw(self.statement(&sql, values))
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    /// The upload of this id in this scope, if any.
    pub async fn find_upload(
        &self,
        scope: &Scope,
        upload_id: &UploadId,
    ) -> Result<Option<UploadRecord>, Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM uploads WHERE project_id = ? AND scope_kind = ? \
             AND scope_id = ? AND upload_id = ?"
        );
        let row = self
            .db
            .query_one_raw(self.statement(
                &sql,
                vec![
                    scope.project().as_str().into(),
                    scope.kind().as_str().into(),
                    scope.id().into(),
                    upload_id.as_str().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        row.map(|row| to_record(&row)).transpose()
    }

    /// Records `offset` bytes as durable (the caller synced them first) at `now`.
    pub async fn checkpoint_upload(
        &self,
        internal_id: &str,
        offset: i64,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.db
            .execute_raw(self.statement(
                "UPDATE uploads SET committed_offset = ?, updated_at = ? WHERE internal_id = ?",
                vec![offset.into(), now.as_micros().into(), internal_id.into()],
            ))
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// The artifact an upload stored, once it completed (whatever became of it since).
    pub async fn artifact_of_upload(&self, internal_id: &str) -> Result<Option<Artifact>, Error> {
        artifact::Entity::find()
            .filter(artifact::Column::UploadId.eq(internal_id))
            .one(&self.db)
            .await
            .map_err(db_error)?
            .map(super::artifacts::to_domain)
            .transpose()
    }

    /// Internal ids of uploads last checkpointed before `before`, oldest first (the sweeper).
    pub async fn stale_uploads(&self, before: Timestamp, limit: u64) -> Result<Vec<String>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT internal_id FROM uploads WHERE updated_at < ? ORDER BY updated_at LIMIT ?",
                vec![before.as_micros().into(), (limit as i64).into()],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| row.try_get::<String>("", "internal_id").map_err(db_error))
            .collect()
    }

    /// Removes an upload's row if it is still last checkpointed before `before` (an upload
    /// resumed meanwhile stays). Returns whether it went.
    pub async fn remove_stale_upload(
        &self,
        internal_id: &str,
        before: Timestamp,
    ) -> Result<bool, Error> {
        let done = self
            .db
            .execute_raw(self.statement(
                "DELETE FROM uploads WHERE internal_id = ? AND updated_at < ?",
                vec![internal_id.into(), before.as_micros().into()],
            ))
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }
}

fn to_record(row: &sea_orm::QueryResult) -> Result<UploadRecord, Error> {
    let get_s = |col: &str| row.try_get::<String>("", col).map_err(db_error);
    let get_i = |col: &str| row.try_get::<i64>("", col).map_err(db_error);
    let get_oi = |col: &str| row.try_get::<Option<i64>>("", col).map_err(db_error);
    let get_os = |col: &str| row.try_get::<Option<String>>("", col).map_err(db_error);
    let internal_id = get_s("internal_id")?;
    let corrupt = |what: &str| Error::Internal(format!("upload row {internal_id} has {what}"));
    let kind =
        ScopeKind::from_db(&get_s("scope_kind")?).ok_or_else(|| corrupt("a bad scope_kind"))?;
    let scope = Scope::parse("scope", &get_s("project_id")?, kind, &get_s("scope_id")?)
        .map_err(|_| corrupt("a bad scope"))?;
    let upload_id = UploadId::parse("upload_id", &get_s("upload_id")?)
        .map_err(|_| corrupt("a bad upload_id"))?;
    let path = ArtifactPath::from_stored(&get_s("path")?).map_err(|_| corrupt("a bad path"))?;
    let expected_sha256 = get_os("expected_sha256")?
        .map(|hex| Sha256::parse("expected_sha256", &hex))
        .transpose()
        .map_err(|_| corrupt("a bad expected_sha256"))?;
    let mode = row.try_get::<i32>("", "mode").map_err(db_error)?;
    Ok(UploadRecord {
        scope,
        upload_id,
        path,
        mode: u32::try_from(mode).map_err(|_| corrupt("a bad mode"))?,
        force: row.try_get::<bool>("", "overwrite").map_err(db_error)?,
        expected_size: get_oi("expected_size")?,
        expected_sha256,
        expire_in_micros: get_oi("expire_in")?,
        idempotency_key: get_os("idempotency_key")?,
        committed_offset: get_i("committed_offset")?,
        created_at: Timestamp::from_micros(get_i("created_at")?),
        updated_at: Timestamp::from_micros(get_i("updated_at")?),
        internal_id,
    })
}
