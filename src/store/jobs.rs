//! Jobs and the "keep latest per ref" pins.
//!
//! A job row is written once at registration and once when it finishes. `latest` marks the
//! PASSED job of each (project, ref, job name) that finished last (a partial unique index
//! keeps one); moving it and moving the artifact pins happen in one transaction, so the pins
//! always follow `latest`.
//!
//! Pins (`artifacts.kept_latest`) set `billing_end` NULL on artifacts live at that instant;
//! a release gives each its expiry back, never before the release instant, unless the user
//! keeps it too (`keep`). Neither ever touches an artifact that has already ended, so no
//! billed second changes.
//!
//! Races: `jobs.keeps_artifacts` (latest, with the setting on) is what a push reads, and
//! share-locks on Postgres; FinishJob and a switch of the setting update those rows, so a
//! push landing in a job while a newer job passes, or while the setting is switched, is
//! pinned exactly when its job still keeps its artifacts. FinishJob and the switch take a
//! per-project advisory lock first, so they never interleave with each other. (The
//! project's row is never locked here: the quota coordinator locks it, and a cycle with
//! pushes waiting on it would deadlock.) SQLite has one writer at a time.

use sea_orm::sea_query::{Alias, Expr};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, ExprTrait, QueryFilter,
    QueryResult, TransactionTrait,
};

use super::artifacts::is_unique_violation;
use super::entities::artifact;
use super::lifecycle::{live_at, released_end};
use super::{Store, db_error};
use crate::domain::{Error, Job, JobLabel, JobStatus, NewJob, ProjectId, Timestamp};

/// First key of the advisory locks of pin decisions ("jobs"); the second is the project.
const PIN_LOCK_CLASS: i32 = 0x6a6f_6273;

const JOB_COLUMNS: &str = "seq, project_id, workflow_id, job_id, job_name, ref, status, \
     registered_at, finished_at, latest";

/// How a FinishJob changed the pins of its project's artifacts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatestPins {
    pub pinned: u64,
    pub released: u64,
}

impl Store {
    /// Registers a job; an identical re-registration returns the stored job, a conflicting
    /// one is ALREADY_EXISTS.
    pub async fn register_job(&self, new: &NewJob, now: Timestamp) -> Result<Job, Error> {
        self.db
            .execute_raw(self.statement(
                "INSERT INTO jobs (project_id, job_id, workflow_id, job_name, ref, status, \
                 registered_at) VALUES (?, ?, ?, ?, ?, 'running', ?) \
                 ON CONFLICT (project_id, job_id) DO NOTHING",
                vec![
                    new.project.as_str().into(),
                    new.job_id.as_str().into(),
                    new.workflow_id.as_str().into(),
                    new.name.as_str().into(),
                    new.git_ref.as_str().into(),
                    now.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        let job = self
            .find_job(&self.db, &new.project, &new.job_id, "")
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::Internal(format!("job {} vanished", new.job_id)))?
            .1;
        if !job.same_as(new) {
            return Err(Error::AlreadyExists(format!(
                "job {} of project {} is already registered with workflow {:?}, name {:?} \
                 and ref {:?}; a job id names one job",
                job.job_id,
                job.project,
                job.workflow_id,
                job.name.as_str(),
                job.git_ref.as_str()
            )));
        }
        Ok(job)
    }

    pub async fn get_job(&self, project: &ProjectId, job_id: &str) -> Result<Option<Job>, Error> {
        Ok(self
            .find_job(&self.db, project, job_id, "")
            .await
            .map_err(db_error)?
            .map(|(_, job)| job))
    }

    /// The latest PASSED job for (project, ref, name), if one has passed.
    pub async fn latest_job(
        &self,
        project: &ProjectId,
        git_ref: &JobLabel,
        name: &JobLabel,
    ) -> Result<Option<Job>, Error> {
        let row = self
            .db
            .query_one_raw(self.statement(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE project_id = ? AND ref = ? \
                     AND job_name = ? AND latest"
                ),
                vec![
                    project.as_str().into(),
                    git_ref.as_str().into(),
                    name.as_str().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        row.map(|row| job_from_row(&row).map(|(_, job)| job))
            .transpose()
    }

    /// Records how a job ended. When it PASSED and finished after the current latest job of
    /// its (ref, name), it becomes the latest: with the project's `keep_latest_per_ref` on,
    /// its live artifacts are pinned and the previous latest job's released, in the same
    /// transaction.
    pub async fn finish_job(
        &self,
        project: &ProjectId,
        job_id: &str,
        status: JobStatus,
        now: Timestamp,
    ) -> Result<(Job, LatestPins), Error> {
        // Two jobs of one (ref, name) passing at once may both find no latest job and both
        // claim it; the unique index refuses one, whose retry then sees the other.
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            match self.try_finish_job(project, job_id, status, now).await {
                Err(FinishError::Db(e)) if is_unique_violation(&e) && attempt < ATTEMPTS => {}
                Err(FinishError::Db(e)) => return Err(db_error(e)),
                Err(FinishError::Domain(e)) => return Err(e),
                Ok(done) => return Ok(done),
            }
        }
        Err(Error::Aborted(
            "the job's (ref, name) kept changing under this request; retry it".into(),
        ))
    }

    async fn try_finish_job(
        &self,
        project: &ProjectId,
        job_id: &str,
        status: JobStatus,
        now: Timestamp,
    ) -> Result<(Job, LatestPins), FinishError> {
        let txn = self.db.begin().await?;
        self.lock_pin_decisions(&txn, project).await?;
        // A write first: SQLite takes its write lock here, Postgres locks the job's row.
        let changed = txn
            .execute_raw(self.statement(
                "UPDATE jobs SET status = ?, finished_at = ? \
                 WHERE project_id = ? AND job_id = ? AND status = 'running'",
                vec![
                    status.as_str().into(),
                    now.as_micros().into(),
                    project.as_str().into(),
                    job_id.into(),
                ],
            ))
            .await?
            .rows_affected();
        let Some((seq, job)) = self.find_job(&txn, project, job_id, "").await? else {
            return Err(Error::NotFound(format!(
                "no job {job_id} in project {project}; register it first"
            ))
            .into());
        };
        if changed == 0 {
            if job.status == status {
                return Ok((job, LatestPins::default()));
            }
            return Err(Error::FailedPrecondition(format!(
                "job {job_id} of project {project} already finished as {}; a job finishes once",
                job.status.as_str().to_uppercase()
            ))
            .into());
        }
        if status != JobStatus::Passed {
            txn.commit().await?;
            return Ok((job, LatestPins::default()));
        }
        let keep_latest = self.keeps_latest(&txn, project).await?;
        let current = txn
            .query_one_raw(self.statement(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE project_id = ? AND ref = ? \
                     AND job_name = ? AND latest{}",
                    self.lock_clause("FOR UPDATE")
                ),
                vec![
                    project.as_str().into(),
                    job.git_ref.as_str().into(),
                    job.name.as_str().into(),
                ],
            ))
            .await?
            .map(|row| job_from_row(&row))
            .transpose()?;
        let mut change = LatestPins::default();
        if let Some((current_seq, current)) = &current {
            let theirs = (current.finished_at.map(Timestamp::as_micros), *current_seq);
            if theirs > (Some(now.as_micros()), seq) {
                // It finished later than this one (the clock moved back): it stays latest.
                txn.commit().await?;
                return Ok((job, change));
            }
            txn.execute_raw(self.statement(
                "UPDATE jobs SET latest = FALSE, keeps_artifacts = FALSE WHERE seq = ?",
                vec![(*current_seq).into()],
            ))
            .await?;
            change.released = self
                .release_pins(&txn, project, Some(&current.job_id), now)
                .await?;
        }
        txn.execute_raw(self.statement(
            "UPDATE jobs SET latest = TRUE, keeps_artifacts = ? WHERE seq = ?",
            vec![keep_latest.into(), seq.into()],
        ))
        .await?;
        if keep_latest {
            change.pinned = self.pin_job(&txn, project, job_id, now).await?;
        }
        txn.commit().await?;
        Ok((
            Job {
                latest: true,
                ..job
            },
            change,
        ))
    }

    /// Makes the pins of a project match its `keep_latest_per_ref` setting (after it was
    /// switched): on, every latest job's live artifacts are pinned; off, every pin is
    /// released (never into the past). Returns what changed.
    pub async fn apply_keep_latest(
        &self,
        project: &ProjectId,
        now: Timestamp,
    ) -> Result<LatestPins, Error> {
        let run = async {
            let txn = self.db.begin().await?;
            self.lock_pin_decisions(&txn, project).await?;
            // A write first (SQLite's write lock): the latest jobs take the setting, which
            // also waits for pushes deciding from them (their share locks) on Postgres.
            txn.execute_raw(self.statement(
                "UPDATE jobs SET keeps_artifacts = COALESCE((SELECT keep_latest_per_ref \
                 FROM projects WHERE project_id = ?), TRUE) WHERE project_id = ? AND latest",
                vec![project.as_str().into(), project.as_str().into()],
            ))
            .await?;
            let mut change = LatestPins::default();
            if self.keeps_latest(&txn, project).await? {
                change.pinned = pin(project, now)
                    .filter(artifact::Column::ScopeKind.eq("job"))
                    .filter(
                        artifact::Column::ScopeId.in_subquery(
                            sea_orm::sea_query::Query::select()
                                .column(Alias::new("job_id"))
                                .from(Alias::new("jobs"))
                                .and_where(Expr::col(Alias::new("project_id")).eq(project.as_str()))
                                .and_where(Expr::col(Alias::new("latest")).eq(true))
                                .to_owned(),
                        ),
                    )
                    .exec(&txn)
                    .await?
                    .rows_affected;
            } else {
                change.released = self.release_pins(&txn, project, None, now).await?;
            }
            txn.commit().await?;
            Ok::<_, DbErr>(change)
        };
        run.await.map_err(db_error)
    }

    /// On Postgres, a transaction-scoped advisory lock per project that FinishJob and a
    /// switch of `keep_latest_per_ref` take first: they decide pins from the setting and
    /// the latest jobs, and must not interleave. (SQLite: one writer at a time already.)
    async fn lock_pin_decisions<C: ConnectionTrait>(
        &self,
        db: &C,
        project: &ProjectId,
    ) -> Result<(), DbErr> {
        if self.db.get_database_backend() == DbBackend::Postgres {
            db.execute_raw(self.statement(
                &format!("SELECT pg_advisory_xact_lock({PIN_LOCK_CLASS}, hashtext(?))"),
                vec![project.as_str().into()],
            ))
            .await?;
        }
        Ok(())
    }

    /// The project's setting (on when the project is unknown: the default).
    async fn keeps_latest<C: ConnectionTrait>(
        &self,
        db: &C,
        project: &ProjectId,
    ) -> Result<bool, DbErr> {
        let row = db
            .query_one_raw(self.statement(
                "SELECT keep_latest_per_ref FROM projects WHERE project_id = ?",
                vec![project.as_str().into()],
            ))
            .await?;
        match row {
            Some(row) => row.try_get_by_index(0),
            None => Ok(true),
        }
    }

    /// Pins the artifacts of a job live at `now`.
    async fn pin_job<C: ConnectionTrait>(
        &self,
        db: &C,
        project: &ProjectId,
        job_id: &str,
        now: Timestamp,
    ) -> Result<u64, DbErr> {
        pin(project, now)
            .filter(artifact::Column::ScopeKind.eq("job"))
            .filter(artifact::Column::ScopeId.eq(job_id))
            .exec(db)
            .await
            .map(|done| done.rows_affected)
    }

    /// Releases the pins of one job's live artifacts (or of the whole project's): each gets
    /// its expiry back, but no earlier than `now`; one the user keeps stays without an end
    /// ([`released_end`], the rule Unkeep follows too).
    async fn release_pins<C: ConnectionTrait>(
        &self,
        db: &C,
        project: &ProjectId,
        job_id: Option<&str>,
        now: Timestamp,
    ) -> Result<u64, DbErr> {
        let mut release = artifact::Entity::update_many()
            .col_expr(artifact::Column::KeptLatest, Expr::value(false))
            .col_expr(
                artifact::Column::ExpiresAt,
                released_end(
                    artifact::Column::ExpiresAt,
                    artifact::Column::KeptLatest,
                    now,
                ),
            )
            .col_expr(
                artifact::Column::BillingEnd,
                released_end(
                    artifact::Column::BillingEnd,
                    artifact::Column::KeptLatest,
                    now,
                ),
            )
            .filter(artifact::Column::ProjectId.eq(project.as_str()))
            .filter(artifact::Column::KeptLatest.eq(true))
            .filter(live_at(now));
        if let Some(job_id) = job_id {
            release = release
                .filter(artifact::Column::ScopeKind.eq("job"))
                .filter(artifact::Column::ScopeId.eq(job_id));
        }
        release.exec(db).await.map(|done| done.rows_affected)
    }

    /// ` FOR SHARE` and the like on Postgres; nothing on SQLite (one writer at a time).
    pub(super) fn lock_clause(&self, lock: &str) -> String {
        if lock.is_empty() || self.db.get_database_backend() != DbBackend::Postgres {
            String::new()
        } else {
            format!(" {lock}")
        }
    }

    async fn find_job<C: ConnectionTrait>(
        &self,
        db: &C,
        project: &ProjectId,
        job_id: &str,
        lock: &str,
    ) -> Result<Option<(i64, Job)>, DbErr> {
        let row = db
            .query_one_raw(self.statement(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE project_id = ? AND job_id = ?{}",
                    self.lock_clause(lock)
                ),
                vec![project.as_str().into(), job_id.into()],
            ))
            .await?;
        row.map(|row| job_from_row(&row).map_err(|e| DbErr::Custom(e.to_string())))
            .transpose()
    }
}

enum FinishError {
    Db(DbErr),
    Domain(Error),
}

impl From<DbErr> for FinishError {
    fn from(e: DbErr) -> Self {
        Self::Db(e)
    }
}

impl From<Error> for FinishError {
    fn from(e: Error) -> Self {
        Self::Domain(e)
    }
}

/// Pins a project's artifacts live at `now` (narrowed by the caller): `kept_latest` set,
/// `billing_end` NULL; `expires_at` stays, to be given back on release.
fn pin(project: &ProjectId, now: Timestamp) -> sea_orm::UpdateMany<artifact::Entity> {
    artifact::Entity::update_many()
        .col_expr(artifact::Column::KeptLatest, Expr::value(true))
        .col_expr(
            artifact::Column::BillingEnd,
            Expr::value(Option::<i64>::None),
        )
        .filter(artifact::Column::ProjectId.eq(project.as_str()))
        .filter(artifact::Column::KeptLatest.eq(false))
        .filter(live_at(now))
}

/// Rows were validated on the way in; one that fails here was edited by hand.
fn job_from_row(row: &QueryResult) -> Result<(i64, Job), Error> {
    let get_text = |i: usize| row.try_get_by_index::<String>(i).map_err(db_error);
    let corrupt = |what: &str| Error::Internal(format!("jobs row has {what}"));
    let status = get_text(6)?;
    Ok((
        row.try_get_by_index(0).map_err(db_error)?,
        Job {
            project: ProjectId::parse("project_id", &get_text(1)?)
                .map_err(|_| corrupt("a bad project id"))?,
            workflow_id: get_text(2)?,
            job_id: get_text(3)?,
            name: JobLabel::parse("job_name", &get_text(4)?)
                .map_err(|_| corrupt("a bad job name"))?,
            git_ref: JobLabel::parse("ref", &get_text(5)?).map_err(|_| corrupt("a bad ref"))?,
            status: JobStatus::from_db(&status).ok_or_else(|| corrupt("a bad status"))?,
            registered_at: Timestamp::from_micros(row.try_get_by_index(7).map_err(db_error)?),
            finished_at: row
                .try_get_by_index::<Option<i64>>(8)
                .map_err(db_error)?
                .map(Timestamp::from_micros),
            latest: row.try_get_by_index(9).map_err(db_error)?,
        },
    ))
}
