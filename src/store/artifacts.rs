//! The artifact log: inserting pushes (with overwrite and idempotency), reading live
//! artifacts, and ending them.
//!
//! "Live" is defined once, by [`live_at`](super::lifecycle::live_at) (the lifecycle contract of DESIGN.md): a row is live
//! at `now` iff `deleted_at IS NULL AND (billing_end IS NULL OR billing_end > now)`, so an
//! artifact is gone for every read at its expiry, to the microsecond, whether or not anything
//! has marked it ended yet. A partial unique index keeps at most one unended row per
//! (project, scope, path), which is what makes concurrent pushes to one path race safely; a
//! push to the path of an expired row first marks that row ended at its expiry
//! ([`expired_at`](super::lifecycle::expired_at)), in the push's own transaction.

use bytes::Bytes;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, ExprTrait, QueryFilter,
    QueryOrder, QuerySelect, SqlErr, Statement, TransactionTrait,
};

use super::entities::{artifact, blob, push_idempotency, usage_event};
use super::lifecycle::{expired_at, live_at, mark_expired};
use super::push_batch::Grouped;
use super::retention::RulesStamp;
use super::{Store, db_error};
use crate::domain::{
    Artifact, ArtifactPath, Error, Scope, ScopeKind, Sha256, Timestamp, scope::prefix_upper_bound,
};

/// Everything the push transaction writes about a new artifact.
#[derive(Debug, Clone)]
pub struct NewArtifact {
    pub scope: Scope,
    pub path: ArtifactPath,
    pub size: i64,
    pub sha256: Sha256,
    pub mode: u32,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub upload_id: String,
    /// Write the ingress usage event (metering on).
    pub record_ingress: bool,
}

/// The jobs row of an artifact's job (project `?`, job id `?`) when that job is the latest
/// PASSED one of its (ref, name) and its project keeps latest artifacts (`keeps_artifacts`);
/// share-locked on Postgres (see [`Store::pins_as_latest`]).
const PINNED_AS_LATEST: &str =
    "SELECT 1 FROM jobs WHERE project_id = ? AND job_id = ? AND keeps_artifacts";

impl NewArtifact {
    /// The artifact as committed; `pinned`: kept as one of the latest job's (no end).
    fn into_artifact(self, id: i64, pinned: bool) -> Artifact {
        Artifact {
            id,
            scope: self.scope,
            path: self.path,
            size: self.size,
            sha256: self.sha256,
            mode: self.mode,
            created_at: self.created_at,
            expires_at: self.expires_at,
            keep: false,
            kept_latest: pinned,
        }
    }
}

/// Where a pushed artifact's bytes are.
#[derive(Debug)]
pub enum PushedBlob {
    /// In the blob store, checked (or written) after the push took a lease on the blob's
    /// row ([`Store::lease_blob`]) that saw `epoch`; `deduplicated` when the content was
    /// there before this push. The commit requires the epoch unchanged: content collected
    /// in between fails the commit (retryable) instead of leaving a row without bytes.
    Stored { deduplicated: bool, epoch: i64 },
    /// Small enough to live in its database row, written in the push's own transaction;
    /// deduplicated when a row for the same content exists.
    Inline(Bytes),
}

/// How a push transaction ended.
#[derive(Debug)]
pub enum PushCommit {
    /// The artifact is live; `replaced` tells whether a live one was overwritten (`force`)
    /// and `replaced_bytes` its size (what leaves the stored total), `deduplicated` whether
    /// its content was stored already.
    Created {
        artifact: Artifact,
        replaced: bool,
        replaced_bytes: i64,
        deduplicated: bool,
    },
    /// The idempotency key was already used; this is the first push's result.
    Replayed {
        artifact: Artifact,
        deduplicated: bool,
    },
    /// Nothing was stored: the blob's lease no longer held (the sweeper collected the
    /// content after the push checked it). The bytes must be stored again before a retry.
    ContentCollected,
    /// Nothing was stored: the retention rules named by the push's stamp are no longer the
    /// stored ones (see [`Store::commit_push_stamped`]). Its lifetime must be resolved again
    /// from the rules stored now before a retry.
    RulesChanged,
}

impl Store {
    /// Writes the blob row, ends the live artifact at the path when `force`, inserts the new
    /// artifact and records the idempotency key, all in one transaction. Every statement is
    /// a write, so SQLite takes its write lock at the first one and waits for it instead of
    /// failing a read-to-write upgrade.
    pub async fn commit_push(
        &self,
        new: &NewArtifact,
        force: bool,
        idempotency_key: Option<&str>,
        blob: &PushedBlob,
    ) -> Result<PushCommit, Error> {
        self.commit_push_stamped(new, force, idempotency_key, blob, None)
            .await
    }

    /// Whether small inline pushes (declared, unforced, without an idempotency key) commit
    /// in groups, where a rule stamp costs the push no statement of its own.
    pub fn commits_in_groups(&self) -> bool {
        self.groups.is_some()
    }

    /// [`Store::commit_push`] for a push whose lifetime came from retention rules with stamp
    /// `rules` (perhaps cached): it commits only while its scope kind's stored rules still
    /// have that stamp, and answers [`PushCommit::RulesChanged`] otherwise. The check is in
    /// the group's statement; a push that commits alone reads the stamp first.
    pub async fn commit_push_stamped(
        &self,
        new: &NewArtifact,
        force: bool,
        idempotency_key: Option<&str>,
        blob: &PushedBlob,
        rules: Option<&RulesStamp>,
    ) -> Result<PushCommit, Error> {
        // A concurrent forced push can end the row we were about to end and insert its own;
        // our insert then conflicts and a retry ends theirs. A few rounds settle any race.
        const FORCE_ATTEMPTS: usize = 5;
        for attempt in 1..=FORCE_ATTEMPTS {
            match self
                .try_commit_push(new, force, idempotency_key, blob, rules)
                .await
            {
                Ok(Some(commit)) => return Ok(commit),
                Ok(None) => return Ok(PushCommit::ContentCollected),
                Err(err) if is_unique_violation(&err) => {
                    if let Some(key) = idempotency_key
                        && let Some((artifact, deduplicated)) =
                            self.find_idempotent(&new.scope, key).await?
                    {
                        return Ok(PushCommit::Replayed {
                            artifact,
                            deduplicated,
                        });
                    }
                    if !force || attempt == FORCE_ATTEMPTS {
                        return Err(already_exists(&new.scope, &new.path));
                    }
                }
                Err(err) => return Err(db_error(err)),
            }
        }
        Err(already_exists(&new.scope, &new.path))
    }

    /// Whether the push's scope kind's stored rules have the stamp `rules` (always, for
    /// none). Stamps are only given with group commit, so on Postgres.
    async fn rules_hold(
        &self,
        new: &NewArtifact,
        rules: Option<&RulesStamp>,
    ) -> Result<bool, DbErr> {
        let Some(stamp) = rules else {
            return Ok(true);
        };
        let stored = self
            .stored_stamp(new.scope.project(), new.scope.kind())
            .await?;
        Ok(stored == *stamp)
    }

    async fn try_commit_push(
        &self,
        new: &NewArtifact,
        force: bool,
        idempotency_key: Option<&str>,
        blob: &PushedBlob,
        rules: Option<&RulesStamp>,
    ) -> Result<Option<PushCommit>, DbErr> {
        let mut rules_checked = false;
        if !force
            && idempotency_key.is_none()
            && self.db.get_database_backend() == DbBackend::Postgres
        {
            let grouped = match (&self.groups, blob) {
                (Some(groups), PushedBlob::Inline(content)) => {
                    self.forget_snapshots(&self.db, new.scope.project(), new.created_at)
                        .await?;
                    groups.commit(new, content, rules).await
                }
                _ => Grouped::Alone,
            };
            // The group's statement checked the stamp, unless it failed as a whole.
            rules_checked = !matches!(grouped, Grouped::Alone);
            match grouped {
                Grouped::Created {
                    id,
                    pinned,
                    deduplicated,
                } => {
                    return Ok(Some(PushCommit::Created {
                        artifact: new.clone().into_artifact(id, pinned),
                        replaced: false,
                        replaced_bytes: 0,
                        deduplicated,
                    }));
                }
                Grouped::RulesChanged => return Ok(Some(PushCommit::RulesChanged)),
                // Settled alone by the transaction below, as after a unique violation.
                Grouped::PathTaken => {}
                Grouped::Alone => {
                    if !self.rules_hold(new, rules).await? {
                        return Ok(Some(PushCommit::RulesChanged));
                    }
                    rules_checked = true;
                    match self.commit_new_in_one_statement(new, blob).await {
                        // The path is taken, perhaps by an expired row nothing has marked
                        // yet: the transaction below marks it and inserts, or conflicts
                        // again if it is live.
                        Err(err) if is_unique_violation(&err) => {}
                        other => return other,
                    }
                }
            }
        }
        if !rules_checked && !self.rules_hold(new, rules).await? {
            return Ok(Some(PushCommit::RulesChanged));
        }
        let now = new.created_at.as_micros();
        let txn = self.db.begin().await?;

        let Some(deduplicated) = self.reference_blob(&txn, new, blob).await? else {
            return Ok(None); // the transaction rolls back when dropped
        };

        // An expired row still holds the path in the unique index: it ends at its expiry,
        // with no force needed, and billing is unchanged.
        mark_expired(at_path(&new.scope, &new.path).filter(expired_at(new.created_at)))
            .exec(&txn)
            .await?;
        let pinned = self.pins_as_latest(&txn, &new.scope).await?;
        let mut replaced = false;
        let mut replaced_bytes = 0;
        if force {
            let ended = at_path(&new.scope, &new.path)
                .filter(live_at(new.created_at))
                .col_expr(artifact::Column::DeletedAt, Expr::value(now))
                .col_expr(artifact::Column::EndReason, Expr::value("overwritten"))
                .col_expr(artifact::Column::BillingEnd, billing_end_at(now))
                .exec_with_returning(&txn)
                .await?;
            replaced = !ended.is_empty();
            // The quota counters release exactly what the overwrite ended.
            replaced_bytes = ended.iter().map(|a| a.size).sum();
        }

        let inserted = artifact::Entity::insert(artifact::ActiveModel {
            id: NotSet,
            project_id: Set(new.scope.project().as_str().to_owned()),
            scope_kind: Set(new.scope.kind().as_str().to_owned()),
            scope_id: Set(new.scope.id().to_owned()),
            path: Set(new.path.as_str().to_owned()),
            size: Set(new.size),
            sha256: Set(new.sha256.as_str().to_owned()),
            mode: Set(new.mode as i32),
            created_at: Set(now),
            expires_at: Set(new.expires_at.map(Timestamp::as_micros)),
            keep: Set(false),
            deleted_at: Set(None),
            end_reason: Set(None),
            upload_id: Set(new.upload_id.clone()),
            billing_end: Set(if pinned {
                None
            } else {
                new.expires_at.map(Timestamp::as_micros)
            }),
            kept_latest: Set(pinned),
        })
        .exec(&txn)
        .await?;
        let id = inserted.last_insert_id;

        // Ingress is the bytes of a successful push, recorded with it; the id is the
        // upload's, so the row exists exactly when the artifact does.
        if new.record_ingress {
            usage_event::Entity::insert(usage_event::ActiveModel {
                id: Set(format!("push:{}", new.upload_id)),
                project_id: Set(new.scope.project().as_str().to_owned()),
                meter: Set("ingress".to_owned()),
                bytes: Set(new.size),
                occurred_at: Set(now),
            })
            .exec_without_returning(&txn)
            .await?;
        }

        if let Some(key) = idempotency_key {
            push_idempotency::Entity::insert(push_idempotency::ActiveModel {
                project_id: Set(new.scope.project().as_str().to_owned()),
                scope_kind: Set(new.scope.kind().as_str().to_owned()),
                scope_id: Set(new.scope.id().to_owned()),
                idempotency_key: Set(key.to_owned()),
                artifact_id: Set(id),
                deduplicated: Set(deduplicated),
                created_at: Set(now),
            })
            .exec_without_returning(&txn)
            .await?;
        }
        self.forget_snapshots(&txn, new.scope.project(), new.created_at)
            .await?;
        txn.commit().await?;

        Ok(Some(PushCommit::Created {
            artifact: new.clone().into_artifact(id, pinned),
            replaced,
            replaced_bytes,
            deduplicated,
        }))
    }

    /// References the push's blob inside its transaction, locking the blob's row until the
    /// commit so the sweeper cannot collect it in between (it takes the same row lock and
    /// then sees the new artifact). Returns whether the content was stored before, or
    /// `None` when a stored blob's lease no longer holds: its content was collected after
    /// the push checked it, so the bytes may be gone.
    async fn reference_blob<C: ConnectionTrait>(
        &self,
        txn: &C,
        new: &NewArtifact,
        blob: &PushedBlob,
    ) -> Result<Option<bool>, DbErr> {
        let now = new.created_at.as_micros();
        let sha256 = new.sha256.as_str();
        match blob {
            PushedBlob::Stored {
                deduplicated,
                epoch,
            } => {
                let held = txn
                    .execute_raw(self.statement(
                        "UPDATE blobs SET last_ref_at = ? \
                         WHERE sha256 = ? AND epoch = ? AND collected_at IS NULL",
                        vec![now.into(), sha256.into(), (*epoch).into()],
                    ))
                    .await?
                    .rows_affected();
                Ok((held == 1).then_some(*deduplicated))
            }
            PushedBlob::Inline(data) => {
                let inserted = txn
                    .execute_raw(self.statement(
                        "INSERT INTO blobs (sha256, size, created_at, content, last_ref_at) \
                         VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                        vec![
                            sha256.into(),
                            new.size.into(),
                            now.into(),
                            data.to_vec().into(),
                            now.into(),
                        ],
                    ))
                    .await?
                    .rows_affected();
                if inserted == 1 {
                    return Ok(Some(false));
                }
                // The content travels with this transaction, so it can always be written
                // into the row: a blob kept in the blob store gains an inline copy (reads
                // prefer it), and a collected one comes back to life.
                let stored = txn
                    .execute_raw(self.statement(
                        "UPDATE blobs SET last_ref_at = ?, content = COALESCE(content, ?) \
                         WHERE sha256 = ? AND collected_at IS NULL",
                        vec![now.into(), data.to_vec().into(), sha256.into()],
                    ))
                    .await?
                    .rows_affected();
                if stored == 1 {
                    return Ok(Some(true));
                }
                txn.execute_raw(self.statement(
                    "UPDATE blobs SET last_ref_at = ?, content = ?, collected_at = NULL \
                     WHERE sha256 = ?",
                    vec![now.into(), data.to_vec().into(), sha256.into()],
                ))
                .await?;
                Ok(Some(false))
            }
        }
    }

    /// Whether an artifact pushed now to `scope` is pinned as one of the latest job's
    /// (`keep_latest_per_ref`): its scope is a job that is the latest PASSED one of its
    /// (ref, name), and the project's setting is on (`jobs.keeps_artifacts`). On Postgres
    /// the job's row is share-locked until the push commits, so a newer job passing or the
    /// setting switching (both update that row) waits for this push and then sees (and
    /// releases) it, or this push waits for them and sees their result.
    async fn pins_as_latest<C: ConnectionTrait>(
        &self,
        db: &C,
        scope: &Scope,
    ) -> Result<bool, DbErr> {
        if scope.kind() != ScopeKind::Job {
            return Ok(false);
        }
        let row = db
            .query_one_raw(self.statement(
                &format!(
                    "SELECT EXISTS ({PINNED_AS_LATEST}{}) AS pinned",
                    self.lock_clause("FOR SHARE")
                ),
                vec![scope.project().as_str().into(), scope.id().into()],
            ))
            .await?;
        match row {
            Some(row) => row.try_get_by_index(0),
            None => Ok(false),
        }
    }

    /// The common push (new path, no idempotency key) on Postgres: blob row, artifact row
    /// and ingress event in one statement (data-modifying CTEs), which is one round trip and
    /// atomic on its own. Foreign keys are checked at the end of the statement.
    async fn commit_new_in_one_statement(
        &self,
        new: &NewArtifact,
        blob: &PushedBlob,
    ) -> Result<Option<PushCommit>, DbErr> {
        let now = new.created_at.as_micros();
        self.forget_snapshots(&self.db, new.scope.project(), new.created_at)
            .await?;
        let expires = new.expires_at.map(Timestamp::as_micros);
        // `blob` yields one row when the content is referenced: a stored blob whose lease
        // still holds (its row locked until the statement commits), or an inline blob
        // inserted or refreshed with the content this push carries. `inserted` tells
        // whether the content is new.
        let (blob_cte, blob_value): (&str, sea_orm::Value) = match blob {
            PushedBlob::Stored {
                deduplicated,
                epoch,
            } => (
                if *deduplicated {
                    "blob AS (UPDATE blobs SET last_ref_at = $3 WHERE sha256 = $1 \
                       AND epoch = $13 AND collected_at IS NULL RETURNING false AS inserted)"
                } else {
                    "blob AS (UPDATE blobs SET last_ref_at = $3 WHERE sha256 = $1 \
                       AND epoch = $13 AND collected_at IS NULL RETURNING true AS inserted)"
                },
                (*epoch).into(),
            ),
            PushedBlob::Inline(data) => (
                "blob AS (INSERT INTO blobs (sha256, size, created_at, content, last_ref_at) \
                   VALUES ($1, $2, $3, $13, $3) ON CONFLICT (sha256) DO UPDATE \
                   SET last_ref_at = EXCLUDED.last_ref_at, \
                     content = COALESCE(blobs.content, EXCLUDED.content), collected_at = NULL \
                   RETURNING (xmax = 0) AS inserted)",
                data.to_vec().into(),
            ),
        };
        let sql = format!(
            "WITH {blob_cte}, \
             pin AS (SELECT $5 = 'job' AND EXISTS (SELECT 1 FROM jobs \
               WHERE project_id = $4 AND job_id = $6 AND keeps_artifacts FOR SHARE) \
               AS pinned), \
             artifact AS (INSERT INTO artifacts (project_id, scope_kind, scope_id, path, \
               size, sha256, mode, created_at, expires_at, keep, upload_id, billing_end, \
               kept_latest) \
               SELECT $4, $5, $6, $7, $2, $1, $8, $3, $9, false, $10, \
               CASE WHEN pin.pinned THEN NULL ELSE $9 END, pin.pinned FROM pin, blob \
               RETURNING id, kept_latest), \
             ingress AS (INSERT INTO usage_events (id, project_id, meter, bytes, occurred_at) \
               SELECT $11, $4, 'ingress', $2, $3 FROM artifact WHERE $12) \
             SELECT id, (SELECT inserted FROM blob), kept_latest FROM artifact"
        );
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                [
                    new.sha256.as_str().into(),
                    new.size.into(),
                    now.into(),
                    new.scope.project().as_str().into(),
                    new.scope.kind().as_str().into(),
                    new.scope.id().into(),
                    new.path.as_str().into(),
                    (new.mode as i32).into(),
                    expires.into(),
                    new.upload_id.as_str().into(),
                    format!("push:{}", new.upload_id).into(),
                    new.record_ingress.into(),
                    blob_value,
                ],
            ))
            .await?;
        let Some(row) = row else {
            return Ok(None); // a stored blob's lease no longer holds
        };
        let id: i64 = row.try_get_by_index(0)?;
        let inserted: bool = row.try_get_by_index(1)?;
        let pinned: bool = row.try_get_by_index(2)?;
        Ok(Some(PushCommit::Created {
            artifact: new.clone().into_artifact(id, pinned),
            replaced: false,
            replaced_bytes: 0,
            deduplicated: !inserted,
        }))
    }

    /// Live artifacts and their logical bytes over all projects at `now` (for the
    /// `artifactd_stored_*` gauges; refreshed in the background, never per request).
    pub async fn live_totals(&self, now: Timestamp) -> Result<(i64, i64), Error> {
        let totals: Option<(i64, Option<i64>)> = artifact::Entity::find()
            .select_only()
            .column_as(artifact::Column::Id.count(), "artifacts")
            .column_as(
                Expr::col(artifact::Column::Size).sum().cast_as("BIGINT"),
                "bytes",
            )
            .filter(super::lifecycle::live_at(now))
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(db_error)?;
        Ok(totals.map_or((0, 0), |(artifacts, bytes)| (artifacts, bytes.unwrap_or(0))))
    }

    /// The result recorded for an idempotency key in `scope` (keys are scoped: another
    /// job's or workflow's use of the same key is unrelated): the artifact it created (even
    /// if it has ended since) and whether its content was deduplicated.
    pub async fn find_idempotent(
        &self,
        scope: &Scope,
        key: &str,
    ) -> Result<Option<(Artifact, bool)>, Error> {
        let Some(record) = push_idempotency::Entity::find_by_id((
            scope.project().as_str().to_owned(),
            scope.kind().as_str().to_owned(),
            scope.id().to_owned(),
            key.to_owned(),
        ))
        .one(&self.db)
        .await
        .map_err(db_error)?
        else {
            return Ok(None);
        };
        let model = artifact::Entity::find_by_id(record.artifact_id)
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| {
                Error::Internal(format!(
                    "idempotency record points at missing artifact {}",
                    record.artifact_id
                ))
            })?;
        Ok(Some((to_domain(model)?, record.deduplicated)))
    }

    /// The artifact live at `now` at a path, if any.
    pub async fn find_live(
        &self,
        scope: &Scope,
        path: &ArtifactPath,
        now: Timestamp,
    ) -> Result<Option<Artifact>, Error> {
        artifact::Entity::find()
            .filter(in_scope(scope))
            .filter(artifact::Column::Path.eq(path.as_str()))
            .filter(live_at(now))
            .one(&self.db)
            .await
            .map_err(db_error)?
            .map(to_domain)
            .transpose()
    }

    /// Where a blob's bytes are: its content when kept in its row, else its location in the
    /// blob store (`None`: its content address).
    pub async fn blob_source(
        &self,
        sha256: &Sha256,
    ) -> Result<(Option<Bytes>, Option<String>), Error> {
        let row: Option<(Option<Vec<u8>>, Option<String>)> =
            blob::Entity::find_by_id(sha256.as_str())
                .select_only()
                .column(blob::Column::Content)
                .column(blob::Column::Location)
                .into_tuple()
                .one(&self.db)
                .await
                .map_err(db_error)?;
        let (content, location) = row.unwrap_or_default();
        Ok((content.map(Bytes::from), location))
    }

    /// Up to `limit` artifacts live at `now` whose path starts with `prefix` and sorts after
    /// `after`, in path (byte) order. Keyset paging: rows added or removed elsewhere in the
    /// listing never shift a page boundary, so pages have no duplicates and no gaps.
    pub async fn list_live(
        &self,
        scope: &Scope,
        prefix: &str,
        after: Option<&str>,
        limit: u64,
        now: Timestamp,
    ) -> Result<Vec<Artifact>, Error> {
        let mut query = artifact::Entity::find()
            .filter(in_scope(scope))
            .filter(live_at(now));
        if !prefix.is_empty() {
            query = query.filter(artifact::Column::Path.gte(prefix));
            if let Some(upper) = prefix_upper_bound(prefix) {
                query = query.filter(artifact::Column::Path.lt(upper));
            }
        }
        if let Some(after) = after {
            query = query.filter(artifact::Column::Path.gt(after));
        }
        query
            .order_by_asc(artifact::Column::Path)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(to_domain)
            .collect()
    }

    /// How many files live at `now` an archive of `prefix` in `scope` holds: (files, content
    /// bytes, path bytes).
    pub async fn archive_summary(
        &self,
        scope: &Scope,
        prefix: &str,
        now: Timestamp,
    ) -> Result<(u64, u64, u64), Error> {
        let octets = match self.db.get_database_backend() {
            DbBackend::Postgres => "octet_length(path)",
            _ => "length(CAST(path AS BLOB))",
        };
        let mut query = artifact::Entity::find()
            .select_only()
            .expr(Expr::cust("CAST(COUNT(*) AS BIGINT)"))
            .expr(Expr::cust("CAST(COALESCE(SUM(size), 0) AS BIGINT)"))
            .expr(Expr::cust(format!(
                "CAST(COALESCE(SUM({octets}), 0) AS BIGINT)"
            )))
            .filter(in_scope(scope))
            .filter(live_at(now));
        if !prefix.is_empty() {
            query = query.filter(artifact::Column::Path.gte(prefix));
            if let Some(upper) = prefix_upper_bound(prefix) {
                query = query.filter(artifact::Column::Path.lt(upper));
            }
        }
        let (files, bytes, path_bytes): (i64, i64, i64) = query
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::Internal("an aggregate returned no row".into()))?;
        let figure = |value: i64| u64::try_from(value).unwrap_or(0);
        Ok((figure(files), figure(bytes), figure(path_bytes)))
    }

    /// Ends the artifact live at `path` and, with `recursive`, every artifact live under it
    /// as a folder; without a path, every artifact live in the scope. Returns how many ended
    /// and their total size. Expired rows are not live:
    /// they already ended at their expiry, and a delete does not move that end.
    ///
    /// A folder may hold millions of files, so they end 1,000 per statement:
    /// memory and each statement's lock time stay bounded. Each batch commits on its own, so
    /// an interrupted delete (deadline, shutdown) keeps what it did and a retry ends the rest.
    pub async fn end_live(
        &self,
        scope: &Scope,
        path: Option<&ArtifactPath>,
        recursive: bool,
        now: Timestamp,
    ) -> Result<(i64, i64), Error> {
        use sea_orm::QueryTrait;
        const END_BATCH_ROWS: u64 = 1000;
        let matching =
            path.map_or_else(sea_orm::Condition::all, |path| at_or_under(path, recursive));
        let (mut count, mut bytes) = (0i64, 0i64);
        loop {
            let batch = artifact::Entity::find()
                .select_only()
                .column(artifact::Column::Id)
                .filter(in_scope(scope))
                .filter(live_at(now))
                .filter(matching.clone())
                .limit(END_BATCH_ROWS)
                .into_query();
            let ended = artifact::Entity::update_many()
                .col_expr(artifact::Column::DeletedAt, Expr::value(now.as_micros()))
                .col_expr(artifact::Column::EndReason, Expr::value("deleted"))
                .col_expr(
                    artifact::Column::BillingEnd,
                    billing_end_at(now.as_micros()),
                )
                .filter(artifact::Column::Id.in_subquery(batch))
                // A concurrent delete may have ended some of the batch in between.
                .filter(live_at(now))
                .exec_with_returning(&self.db)
                .await
                .map_err(db_error)?;
            if ended.is_empty() {
                break;
            }
            self.forget_snapshots(&self.db, scope.project(), now)
                .await
                .map_err(db_error)?;
            count = count.saturating_add(ended.len() as i64);
            bytes = ended
                .iter()
                .fold(bytes, |total, a| total.saturating_add(a.size));
            if (ended.len() as u64) < END_BATCH_ROWS {
                break;
            }
        }
        Ok((count, bytes))
    }
}

/// Rows at `path`, and with `recursive` under it as a folder.
pub(super) fn at_or_under(path: &ArtifactPath, recursive: bool) -> sea_orm::Condition {
    let mut matching = sea_orm::Condition::any().add(artifact::Column::Path.eq(path.as_str()));
    if recursive {
        let (low, high) = path.folder_range();
        matching = matching.add(
            artifact::Column::Path
                .gte(low)
                .and(artifact::Column::Path.lt(high)),
        );
    }
    matching
}

pub(super) fn in_scope(scope: &Scope) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(artifact::Column::ProjectId.eq(scope.project().as_str()))
        .add(artifact::Column::ScopeKind.eq(scope.kind().as_str()))
        .add(artifact::Column::ScopeId.eq(scope.id()))
}

fn at_path(scope: &Scope, path: &ArtifactPath) -> sea_orm::UpdateMany<artifact::Entity> {
    artifact::Entity::update_many()
        .filter(in_scope(scope))
        .filter(artifact::Column::Path.eq(path.as_str()))
}

/// `billing_end` for a live artifact ending at `now`: unchanged when it already stopped
/// costing earlier (it expired before being deleted), else `now`.
fn billing_end_at(now: i64) -> sea_orm::sea_query::SimpleExpr {
    Expr::case(
        artifact::Column::BillingEnd.lt(now),
        Expr::col(artifact::Column::BillingEnd),
    )
    .finally(now)
    .into()
}

pub(crate) fn is_unique_violation(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// A push whose content was collected by the sweeper between the push's check of the bytes
/// and its commit (possible only when the push took longer than the blob grace period):
/// nothing was stored, and the same push again stores the content anew.
pub fn content_collected(sha256: &Sha256) -> Error {
    tracing::warn!(%sha256, "blob collected while a push referencing it committed");
    Error::Aborted(
        "the content was reclaimed while this push committed; nothing was stored, retry the push"
            .to_owned(),
    )
}

pub fn already_exists(scope: &Scope, path: &ArtifactPath) -> Error {
    Error::AlreadyExists(format!(
        "{:?} already exists in {scope}; push with force to replace it",
        path.as_str()
    ))
}

/// Rows were validated on the way in; a row that fails here means the database was edited
/// by hand, which is an internal error rather than the client's.
pub(super) fn to_domain(model: artifact::Model) -> Result<Artifact, Error> {
    let corrupt = |what: &str| Error::Internal(format!("artifact row {} has {what}", model.id));
    let kind = ScopeKind::from_db(&model.scope_kind).ok_or_else(|| corrupt("a bad scope_kind"))?;
    let scope = Scope::parse("scope", &model.project_id, kind, &model.scope_id)
        .map_err(|_| corrupt("a bad scope"))?;
    let path = ArtifactPath::from_stored(&model.path).map_err(|_| corrupt("a bad path"))?;
    let sha256 = Sha256::parse("sha256", &model.sha256).map_err(|_| corrupt("a bad sha256"))?;
    Ok(Artifact {
        id: model.id,
        scope,
        path,
        size: model.size,
        sha256,
        mode: u32::try_from(model.mode).map_err(|_| corrupt("a bad mode"))?,
        created_at: Timestamp::from_micros(model.created_at),
        expires_at: model.expires_at.map(Timestamp::from_micros),
        keep: model.keep,
        kept_latest: model.kept_latest,
    })
}
