//! Plans and their versions, projects (their plan history and usage controls) and retention
//! recomputation.
//!
//! The past is never rewritten here: `UpdatePlan` appends a plan version effective from now,
//! `AssignPlan` appends a row to the project's plan history effective from now, and
//! retention changes only move the future end of artifacts live at that instant.

use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, ExprTrait, QueryFilter,
    QueryOrder, TransactionTrait, Value,
};

use super::entities::{artifact, project};
use super::lifecycle::{lifetime_end, live_at, unpinned};
use super::{Store, artifacts::is_unique_violation, db_error};
use crate::domain::metering::{DAY_MICROS, Segment};
use crate::domain::{
    Error, OveragePolicy, Plan, ProjectId, ProjectRecord, ScopeKind, Timestamp, UsageControls,
};

/// The plan columns, in the order [`plan_values`] gives them, shared by `plans` and
/// `plan_versions`.
const PLAN_COLUMNS: &str = "name, currency, included_storage_gib_months, included_egress_gib, \
     storage_price_micros, egress_price_micros, ingress_price_micros, storage_limit_bytes, \
     max_artifact_bytes, max_retention_days, overage_policy";

fn plan_values(plan: &Plan) -> Vec<Value> {
    vec![
        plan.name.clone().into(),
        plan.currency.clone().into(),
        plan.included_storage_gib_months.into(),
        plan.included_egress_gib.into(),
        plan.storage_price_micros.into(),
        plan.egress_price_micros.into(),
        plan.ingress_price_micros.into(),
        plan.storage_limit_bytes.into(),
        plan.max_artifact_bytes.into(),
        plan.max_retention_days.into(),
        plan.overage_policy.as_str().into(),
    ]
}

impl Store {
    pub async fn get_plan(&self, id: &str) -> Result<Option<Plan>, Error> {
        let row = self
            .db
            .query_one_raw(self.statement(
                &format!("SELECT id, version, {PLAN_COLUMNS} FROM plans WHERE id = ?"),
                vec![id.into()],
            ))
            .await
            .map_err(db_error)?;
        row.map(|r| plan_from_row(&r, 0)).transpose()
    }

    pub async fn list_plans(&self) -> Result<Vec<Plan>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                &format!("SELECT id, version, {PLAN_COLUMNS} FROM plans ORDER BY id"),
                vec![],
            ))
            .await
            .map_err(db_error)?;
        rows.iter().map(|r| plan_from_row(r, 0)).collect()
    }

    /// Creates a plan at version 1. Its first version is effective from the beginning of
    /// time: no project can have been on it before, and a project's first plan covers its
    /// whole past (see `project_plans`).
    pub async fn create_plan(&self, plan: &Plan, now: Timestamp) -> Result<Plan, Error> {
        let plan = Plan {
            version: 1,
            ..plan.clone()
        };
        let txn = self.db.begin().await.map_err(db_error)?;
        let mut values = vec![plan.id.clone().into()];
        values.extend(plan_values(&plan));
        values.extend([now.as_micros().into(), now.as_micros().into()]);
        let inserted = txn
            .execute_raw(self.statement(
                &format!(
                    "INSERT INTO plans (id, {PLAN_COLUMNS}, created_at, updated_at, version) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)"
                ),
                values,
            ))
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "plan {:?} already exists",
                    plan.id
                )));
            }
            Err(e) => return Err(db_error(e)),
        }
        self.insert_plan_version(&txn, &plan, Timestamp::from_micros(0), now)
            .await?;
        txn.commit().await.map_err(db_error)?;
        Ok(plan)
    }

    async fn insert_plan_version<C: ConnectionTrait>(
        &self,
        db: &C,
        plan: &Plan,
        effective_from: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let mut values = vec![
            plan.id.clone().into(),
            plan.version.into(),
            effective_from.as_micros().into(),
        ];
        values.extend(plan_values(plan));
        values.push(now.as_micros().into());
        match db
            .execute_raw(self.statement(
                &format!(
                    "INSERT INTO plan_versions (plan_id, version, effective_from, {PLAN_COLUMNS}, \
                     created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                values,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(Error::FailedPrecondition(format!(
                "plan {:?} was changed by another request at the same instant; retry",
                plan.id
            ))),
            Err(e) => Err(db_error(e)),
        }
    }

    /// Makes `plan`'s figures a new version effective from `now`. Bills of everything
    /// before `now` keep the versions they were computed with. Returns the new version.
    pub async fn update_plan(&self, plan: &Plan, now: Timestamp) -> Result<Plan, Error> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let mut values = plan_values(plan);
        values.push(now.as_micros().into());
        values.push(plan.id.clone().into());
        let assignments = PLAN_COLUMNS
            .split(',')
            .map(|c| format!("{} = ?", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let row = txn
            .query_one_raw(self.statement(
                &format!(
                    "UPDATE plans SET {assignments}, updated_at = ?, version = version + 1 \
                     WHERE id = ? RETURNING version"
                ),
                values,
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::NotFound(format!("no plan {:?}", plan.id)))?;
        let version: i32 = row.try_get_by_index(0).map_err(db_error)?;
        let plan = Plan {
            version,
            ..plan.clone()
        };
        self.insert_plan_version(&txn, &plan, now, now).await?;
        txn.commit().await.map_err(db_error)?;
        Ok(plan)
    }

    /// Every version of `plan_id`, oldest first, with the instant each took effect.
    async fn plan_versions(&self, plan_id: &str) -> Result<Vec<(Timestamp, Plan)>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                &format!(
                    "SELECT effective_from, plan_id, version, {PLAN_COLUMNS} FROM plan_versions \
                     WHERE plan_id = ? ORDER BY effective_from"
                ),
                vec![plan_id.into()],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let effective: i64 = r.try_get_by_index(0).map_err(db_error)?;
                Ok((Timestamp::from_micros(effective), plan_from_row(r, 1)?))
            })
            .collect()
    }

    /// One version of a plan.
    pub async fn plan_version(&self, plan_id: &str, version: i32) -> Result<Plan, Error> {
        self.plan_versions(plan_id)
            .await?
            .into_iter()
            .map(|(_, plan)| plan)
            .find(|plan| plan.version == version)
            .ok_or_else(|| Error::Internal(format!("plan {plan_id:?} has no version {version}")))
    }

    /// The project's plan history: (from, plan id), oldest first; each row lasts until the
    /// next. Empty for a project never seen.
    async fn project_plan_rows(&self, project: &ProjectId) -> Result<Vec<(i64, String)>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT valid_from, plan_id FROM project_plans WHERE project_id = ? \
                 ORDER BY valid_from",
                vec![project.as_str().into()],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get_by_index(0).map_err(db_error)?,
                    r.try_get_by_index(1).map_err(db_error)?,
                ))
            })
            .collect()
    }

    /// The plan versions the project was on over `[from, to)`, as consecutive segments
    /// covering the range: the project's plan history cut by each plan's version changes.
    /// A project's first plan, and a plan's first version, cover everything before them.
    /// NOT_FOUND for a project never seen.
    pub async fn plan_segments(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<Segment>, Error> {
        let mut assignments = self.project_plan_rows(project).await?;
        if assignments.is_empty() {
            // A project row written without its history (by hand, or by a tool that
            // predates it) has been on its current plan all along.
            let record = self
                .get_project(project)
                .await?
                .ok_or_else(|| Error::NotFound(format!("no project {project}")))?;
            assignments.push((0, record.plan.id));
        }
        let mut segments = Vec::new();
        for (i, (valid_from, plan_id)) in assignments.iter().enumerate() {
            let start = if i == 0 { i64::MIN } else { *valid_from };
            let end = assignments.get(i + 1).map_or(i64::MAX, |next| next.0);
            let (a, b) = (
                Ord::max(start, from.as_micros()),
                Ord::min(end, to.as_micros()),
            );
            if a >= b {
                continue;
            }
            let versions = self.plan_versions(plan_id).await?;
            for (j, (effective, plan)) in versions.iter().enumerate() {
                let v_start = if j == 0 {
                    i64::MIN
                } else {
                    effective.as_micros()
                };
                let v_end = versions
                    .get(j + 1)
                    .map_or(i64::MAX, |next| next.0.as_micros());
                let (c, d) = (Ord::max(v_start, a), Ord::min(v_end, b));
                if c < d {
                    segments.push(Segment {
                        plan: plan.clone(),
                        from: Timestamp::from_micros(c),
                        to: Timestamp::from_micros(d),
                    });
                }
            }
        }
        if segments.is_empty() {
            return Err(Error::Internal(format!(
                "project {project} has no plan version covering the range"
            )));
        }
        Ok(segments)
    }

    /// The project's record, creating it on `default_plan` the first time it is seen (only
    /// pushes and admin calls create projects).
    pub async fn ensure_project(
        &self,
        project: &ProjectId,
        default_plan: &str,
        now: Timestamp,
    ) -> Result<ProjectRecord, Error> {
        if let Some(record) = self.get_project(project).await? {
            return Ok(record);
        }
        let txn = self.db.begin().await.map_err(db_error)?;
        self.insert_project(&txn, project, default_plan, now)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        self.get_project(project).await?.ok_or_else(|| {
            Error::Internal(format!("project {project} vanished after being created"))
        })
    }

    /// Inserts a project and its first plan-history row (from 0: the first plan covers
    /// everything before), unless it exists.
    async fn insert_project<C: ConnectionTrait>(
        &self,
        db: &C,
        project: &ProjectId,
        plan_id: &str,
        now: Timestamp,
    ) -> Result<(), sea_orm::DbErr> {
        project::Entity::insert(new_project(project, plan_id, now))
            .on_conflict(
                OnConflict::column(project::Column::ProjectId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
        db.execute_raw(self.statement(
            "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
             VALUES (?, 0, ?, ?) ON CONFLICT DO NOTHING",
            vec![
                project.as_str().into(),
                plan_id.into(),
                now.as_micros().into(),
            ],
        ))
        .await?;
        Ok(())
    }

    pub async fn get_project(&self, project: &ProjectId) -> Result<Option<ProjectRecord>, Error> {
        let Some(row) = project::Entity::find_by_id(project.as_str().to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let plan = self.get_plan(&row.plan_id).await?.ok_or_else(|| {
            Error::Internal(format!(
                "project {project} is on missing plan {:?}",
                row.plan_id
            ))
        })?;
        Ok(Some(project_to_domain(row, plan)?))
    }

    /// Puts a project on a plan from `now` on (creating the project if needed): a new row in
    /// its plan history, so what was used before `now` stays billed under the old plan. The
    /// project's retention settings are clamped to the new plan's maximum.
    pub async fn assign_plan(
        &self,
        project: &ProjectId,
        plan_id: &str,
        now: Timestamp,
    ) -> Result<ProjectRecord, Error> {
        let Some(plan) = self.get_plan(plan_id).await? else {
            return Err(Error::NotFound(format!("no plan {plan_id:?}")));
        };
        let txn = self.db.begin().await.map_err(db_error)?;
        let current: Option<String> = project::Entity::find_by_id(project.as_str().to_owned())
            .one(&txn)
            .await
            .map_err(db_error)?
            .map(|p| p.plan_id);
        match current {
            None => self
                .insert_project(&txn, project, plan_id, now)
                .await
                .map_err(db_error)?,
            Some(current) if current == plan_id => {}
            Some(_) => {
                txn.execute_raw(self.statement(
                    "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
                     VALUES (?, ?, ?, ?) ON CONFLICT (project_id, valid_from) \
                     DO UPDATE SET plan_id = excluded.plan_id, assigned_at = excluded.assigned_at",
                    vec![
                        project.as_str().into(),
                        now.as_micros().into(),
                        plan_id.into(),
                        now.as_micros().into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
                let max = plan.max_retention_days;
                txn.execute_raw(self.statement(
                    "UPDATE projects SET plan_id = ?, updated_at = ?, \
                     retention_job_days = CASE WHEN retention_job_days > ? THEN ? ELSE retention_job_days END, \
                     retention_workflow_days = CASE WHEN retention_workflow_days > ? THEN ? ELSE retention_workflow_days END, \
                     retention_project_days = CASE WHEN retention_project_days > ? THEN ? ELSE retention_project_days END \
                     WHERE project_id = ?",
                    vec![
                        plan_id.into(),
                        now.as_micros().into(),
                        max.into(),
                        max.into(),
                        max.into(),
                        max.into(),
                        max.into(),
                        max.into(),
                        project.as_str().into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
            }
        }
        txn.commit().await.map_err(db_error)?;
        self.clamp_expirations(Some(project), None, plan.max_retention_days, now)
            .await?;
        self.get_project(project)
            .await?
            .ok_or_else(|| Error::Internal(format!("project {project} missing after assign")))
    }

    /// The project's plan history, oldest first: each plan version it was on and from when
    /// to when (`None`: still in effect).
    pub async fn plan_history(
        &self,
        project: &ProjectId,
    ) -> Result<Vec<(Plan, Timestamp, Option<Timestamp>)>, Error> {
        let segments = self
            .plan_segments(
                project,
                Timestamp::from_micros(i64::MIN),
                Timestamp::from_micros(i64::MAX),
            )
            .await?;
        Ok(segments
            .into_iter()
            .map(|s| {
                let from = Timestamp::from_micros(Ord::max(s.from.as_micros(), 0));
                let to = (s.to.as_micros() != i64::MAX).then_some(s.to);
                (s.plan, from, to)
            })
            .collect())
    }

    /// Writes the masked control fields, and only those, in one statement that returns the
    /// row it updated: concurrent updates of different fields both survive. `None` when the
    /// project does not exist.
    pub async fn update_controls(
        &self,
        project: &ProjectId,
        update: &UsageControls,
        mask: &crate::domain::ControlsMask,
        now: Timestamp,
    ) -> Result<Option<UsageControls>, Error> {
        let mut query = project::Entity::update_many()
            .col_expr(project::Column::UpdatedAt, Expr::value(now.as_micros()));
        if mask.retention_job_days {
            query = query.col_expr(
                project::Column::RetentionJobDays,
                Expr::value(update.retention_job_days),
            );
        }
        if mask.retention_workflow_days {
            query = query.col_expr(
                project::Column::RetentionWorkflowDays,
                Expr::value(update.retention_workflow_days),
            );
        }
        if mask.retention_project_days {
            query = query.col_expr(
                project::Column::RetentionProjectDays,
                Expr::value(update.retention_project_days),
            );
        }
        if mask.spend_cap_micros {
            query = query.col_expr(
                project::Column::SpendCapMicros,
                Expr::value(update.spend_cap_micros),
            );
        }
        if mask.storage_cap_bytes {
            query = query.col_expr(
                project::Column::StorageCapBytes,
                Expr::value(update.storage_cap_bytes),
            );
        }
        if mask.alert_thresholds {
            query = query.col_expr(
                project::Column::AlertThresholds,
                Expr::value(update.thresholds_to_db()),
            );
        }
        if mask.keep_latest_per_ref {
            query = query.col_expr(
                project::Column::KeepLatestPerRef,
                Expr::value(update.keeps_latest_per_ref()),
            );
        }
        let rows = query
            .filter(project::Column::ProjectId.eq(project.as_str()))
            .exec_with_returning(&self.db)
            .await
            .map_err(db_error)?;
        Ok(rows.into_iter().next().map(|row| controls_from_row(&row)))
    }

    /// Re-derives `expires_at` of a scope kind's artifacts live at `now` (not kept, not yet
    /// expired) from a new retention: `created_at + days`, but never before `now`. Artifacts
    /// that already ended — deleted, replaced or expired, swept or not — are not touched, so
    /// no past window changes. Returns how many artifacts changed.
    pub async fn recompute_expirations(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
        days: i32,
        now: Timestamp,
    ) -> Result<u64, Error> {
        let end = lifetime_end(i64::from(days) * DAY_MICROS, now);
        let changed = artifact::Entity::update_many()
            .col_expr(artifact::Column::ExpiresAt, end.clone())
            .col_expr(artifact::Column::BillingEnd, end)
            .filter(artifact::Column::ProjectId.eq(project.as_str()))
            .filter(artifact::Column::ScopeKind.eq(kind.as_str()))
            .filter(live_at(now))
            .filter(unpinned())
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(changed.rows_affected)
    }

    /// Clamps the expiry of live artifacts (of one project, or of every project on one
    /// plan) to `created_at + max_days`, never before `now`: a plan's maximum retention
    /// bounds every artifact under it. Returns how many changed.
    pub async fn clamp_expirations(
        &self,
        project: Option<&ProjectId>,
        plan_id: Option<&str>,
        max_days: i32,
        now: Timestamp,
    ) -> Result<u64, Error> {
        let ttl = i64::from(max_days) * DAY_MICROS;
        let end = lifetime_end(ttl, now);
        let mut query = artifact::Entity::update_many()
            .col_expr(artifact::Column::ExpiresAt, end.clone())
            .col_expr(artifact::Column::BillingEnd, end)
            .filter(live_at(now))
            .filter(unpinned())
            .filter(
                Expr::col(artifact::Column::ExpiresAt)
                    .is_null()
                    .or(Expr::col(artifact::Column::ExpiresAt)
                        .gt(Expr::col(artifact::Column::CreatedAt).add(ttl))),
            );
        if let Some(project) = project {
            query = query.filter(artifact::Column::ProjectId.eq(project.as_str()));
        }
        if let Some(plan_id) = plan_id {
            query = query.filter(
                artifact::Column::ProjectId.in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(project::Column::ProjectId)
                        .from(project::Entity)
                        .and_where(project::Column::PlanId.eq(plan_id))
                        .to_owned(),
                ),
            );
        }
        let changed = query.exec(&self.db).await.map_err(db_error)?;
        Ok(changed.rows_affected)
    }

    pub async fn list_project_ids(&self) -> Result<Vec<String>, Error> {
        Ok(project::Entity::find()
            .order_by_asc(project::Column::ProjectId)
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|p| p.project_id)
            .collect())
    }
}

fn new_project(project: &ProjectId, plan_id: &str, now: Timestamp) -> project::ActiveModel {
    project::ActiveModel {
        project_id: Set(project.as_str().to_owned()),
        plan_id: Set(plan_id.to_owned()),
        retention_job_days: Set(None),
        retention_workflow_days: Set(None),
        retention_project_days: Set(None),
        spend_cap_micros: Set(None),
        storage_cap_bytes: Set(None),
        alert_thresholds: Set(String::new()),
        keep_latest_per_ref: Set(true),
        created_at: Set(now.as_micros()),
        updated_at: Set(now.as_micros()),
    }
}

/// A plan from a row holding `id, version, PLAN_COLUMNS` from column `first` on: the one
/// place plan columns become a [`Plan`] (the other direction is [`plan_values`]).
fn plan_from_row(r: &sea_orm::QueryResult, first: usize) -> Result<Plan, Error> {
    let i64_at = |i: usize| r.try_get_by_index::<i64>(first + i).map_err(db_error);
    let text_at = |i: usize| r.try_get_by_index::<String>(first + i).map_err(db_error);
    let id = text_at(0)?;
    let policy = text_at(12)?;
    Ok(Plan {
        overage_policy: OveragePolicy::from_db(&policy)
            .ok_or_else(|| Error::Internal(format!("plan {id} has overage policy {policy:?}")))?,
        version: r.try_get_by_index(first + 1).map_err(db_error)?,
        name: text_at(2)?,
        currency: text_at(3)?,
        included_storage_gib_months: i64_at(4)?,
        included_egress_gib: i64_at(5)?,
        storage_price_micros: i64_at(6)?,
        egress_price_micros: i64_at(7)?,
        ingress_price_micros: i64_at(8)?,
        storage_limit_bytes: r.try_get_by_index(first + 9).map_err(db_error)?,
        max_artifact_bytes: i64_at(10)?,
        max_retention_days: r.try_get_by_index(first + 11).map_err(db_error)?,
        id,
    })
}

fn controls_from_row(row: &project::Model) -> UsageControls {
    UsageControls {
        retention_job_days: row.retention_job_days,
        retention_workflow_days: row.retention_workflow_days,
        retention_project_days: row.retention_project_days,
        spend_cap_micros: row.spend_cap_micros,
        storage_cap_bytes: row.storage_cap_bytes,
        alert_thresholds: UsageControls::thresholds_from_db(&row.alert_thresholds),
        keep_latest_per_ref: Some(row.keep_latest_per_ref),
    }
}

fn project_to_domain(row: project::Model, plan: Plan) -> Result<ProjectRecord, Error> {
    Ok(ProjectRecord {
        project_id: ProjectId::parse("project_id", &row.project_id)
            .map_err(|_| Error::Internal(format!("bad project id {:?}", row.project_id)))?,
        plan,
        controls: controls_from_row(&row),
        created_at: Timestamp::from_micros(row.created_at),
    })
}
