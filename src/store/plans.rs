//! Plans, projects (their plan and usage controls) and retention recomputation.

use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, ExprTrait, QueryFilter, QueryOrder};

use super::entities::{artifact, plan, project};
use super::{Store, artifacts::is_unique_violation, db_error};
use crate::domain::metering::DAY_MICROS;
use crate::domain::{Error, OveragePolicy, Plan, ProjectId, ScopeKind, Timestamp, UsageControls};

/// A project's plan and controls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRecord {
    pub project_id: ProjectId,
    pub plan: Plan,
    pub controls: UsageControls,
    pub created_at: Timestamp,
}

impl Store {
    pub async fn get_plan(&self, id: &str) -> Result<Option<Plan>, Error> {
        plan::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)?
            .map(plan_to_domain)
            .transpose()
    }

    pub async fn list_plans(&self) -> Result<Vec<Plan>, Error> {
        plan::Entity::find()
            .order_by_asc(plan::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(plan_to_domain)
            .collect()
    }

    pub async fn create_plan(&self, plan: &Plan, now: Timestamp) -> Result<(), Error> {
        match plan::Entity::insert(plan_to_active(plan, now, true))
            .exec_without_returning(&self.db)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(Error::AlreadyExists(format!(
                "plan {:?} already exists",
                plan.id
            ))),
            Err(e) => Err(db_error(e)),
        }
    }

    pub async fn update_plan(&self, plan: &Plan, now: Timestamp) -> Result<(), Error> {
        let mut active = plan_to_active(plan, now, false);
        active.created_at = sea_orm::ActiveValue::NotSet;
        let updated = plan::Entity::update_many()
            .set(active)
            .filter(plan::Column::Id.eq(plan.id.as_str()))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        if updated.rows_affected == 0 {
            return Err(Error::NotFound(format!("no plan {:?}", plan.id)));
        }
        Ok(())
    }

    /// The project's record, creating it on `default_plan` the first time it is seen.
    pub async fn ensure_project(
        &self,
        project: &ProjectId,
        default_plan: &str,
        now: Timestamp,
    ) -> Result<ProjectRecord, Error> {
        if let Some(record) = self.get_project(project).await? {
            return Ok(record);
        }
        project::Entity::insert(new_project(project, default_plan, now))
            .on_conflict(
                OnConflict::column(project::Column::ProjectId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(db_error)?;
        self.get_project(project).await?.ok_or_else(|| {
            Error::Internal(format!("project {project} vanished after being created"))
        })
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

    /// Puts a project on a plan, creating the project if needed.
    pub async fn assign_plan(
        &self,
        project: &ProjectId,
        plan_id: &str,
        now: Timestamp,
    ) -> Result<ProjectRecord, Error> {
        if self.get_plan(plan_id).await?.is_none() {
            return Err(Error::NotFound(format!("no plan {plan_id:?}")));
        }
        project::Entity::insert(new_project(project, plan_id, now))
            .on_conflict(
                OnConflict::column(project::Column::ProjectId)
                    .update_columns([project::Column::PlanId, project::Column::UpdatedAt])
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(db_error)?;
        self.get_project(project)
            .await?
            .ok_or_else(|| Error::Internal(format!("project {project} missing after assign")))
    }

    pub async fn update_controls(
        &self,
        project: &ProjectId,
        controls: &UsageControls,
        now: Timestamp,
    ) -> Result<(), Error> {
        project::Entity::update_many()
            .col_expr(
                project::Column::RetentionJobDays,
                Expr::value(controls.retention_job_days),
            )
            .col_expr(
                project::Column::RetentionWorkflowDays,
                Expr::value(controls.retention_workflow_days),
            )
            .col_expr(
                project::Column::RetentionProjectDays,
                Expr::value(controls.retention_project_days),
            )
            .col_expr(
                project::Column::SpendCapMicros,
                Expr::value(controls.spend_cap_micros),
            )
            .col_expr(
                project::Column::StorageCapBytes,
                Expr::value(controls.storage_cap_bytes),
            )
            .col_expr(
                project::Column::AlertThresholds,
                Expr::value(controls.thresholds_to_db()),
            )
            .col_expr(project::Column::UpdatedAt, Expr::value(now.as_micros()))
            .filter(project::Column::ProjectId.eq(project.as_str()))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Re-derives `expires_at` of a scope kind's live, unkept artifacts from a new retention:
    /// `created_at + days`, but never in the past — an artifact does not retroactively stop
    /// costing. Returns how many artifacts changed.
    pub async fn recompute_expirations(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
        days: i32,
        now: Timestamp,
    ) -> Result<u64, Error> {
        let ttl = i64::from(days) * DAY_MICROS;
        let now = now.as_micros();
        let scope = || {
            artifact::Entity::update_many()
                .filter(artifact::Column::ProjectId.eq(project.as_str()))
                .filter(artifact::Column::ScopeKind.eq(kind.as_str()))
                .filter(artifact::Column::DeletedAt.is_null())
                .filter(artifact::Column::Keep.eq(false))
        };
        let future = scope()
            .col_expr(
                artifact::Column::ExpiresAt,
                Expr::col(artifact::Column::CreatedAt).add(ttl),
            )
            .col_expr(
                artifact::Column::BillingEnd,
                Expr::col(artifact::Column::CreatedAt).add(ttl),
            )
            .filter(artifact::Column::CreatedAt.gte(now - ttl))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        let past = scope()
            .col_expr(artifact::Column::ExpiresAt, Expr::value(now))
            .col_expr(artifact::Column::BillingEnd, Expr::value(now))
            .filter(artifact::Column::CreatedAt.lt(now - ttl))
            .filter(
                artifact::Column::BillingEnd
                    .is_null()
                    .or(artifact::Column::BillingEnd.gt(now)),
            )
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        self.forget_snapshots(&self.db, project, Timestamp::from_micros(now))
            .await
            .map_err(db_error)?;
        Ok(future.rows_affected + past.rows_affected)
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
        created_at: Set(now.as_micros()),
        updated_at: Set(now.as_micros()),
    }
}

fn plan_to_active(plan: &Plan, now: Timestamp, creating: bool) -> plan::ActiveModel {
    plan::ActiveModel {
        id: Set(plan.id.clone()),
        name: Set(plan.name.clone()),
        currency: Set(plan.currency.clone()),
        included_storage_gib_months: Set(plan.included_storage_gib_months),
        included_egress_gib: Set(plan.included_egress_gib),
        storage_price_micros: Set(plan.storage_price_micros),
        egress_price_micros: Set(plan.egress_price_micros),
        ingress_price_micros: Set(plan.ingress_price_micros),
        storage_limit_bytes: Set(plan.storage_limit_bytes),
        max_artifact_bytes: Set(plan.max_artifact_bytes),
        max_retention_days: Set(plan.max_retention_days),
        overage_policy: Set(plan.overage_policy.as_str().to_owned()),
        created_at: if creating {
            Set(now.as_micros())
        } else {
            sea_orm::ActiveValue::NotSet
        },
        updated_at: Set(now.as_micros()),
    }
}

fn plan_to_domain(row: plan::Model) -> Result<Plan, Error> {
    Ok(Plan {
        overage_policy: OveragePolicy::from_db(&row.overage_policy).ok_or_else(|| {
            Error::Internal(format!(
                "plan {} has overage policy {:?}",
                row.id, row.overage_policy
            ))
        })?,
        id: row.id,
        name: row.name,
        currency: row.currency,
        included_storage_gib_months: row.included_storage_gib_months,
        included_egress_gib: row.included_egress_gib,
        storage_price_micros: row.storage_price_micros,
        egress_price_micros: row.egress_price_micros,
        ingress_price_micros: row.ingress_price_micros,
        storage_limit_bytes: row.storage_limit_bytes,
        max_artifact_bytes: row.max_artifact_bytes,
        max_retention_days: row.max_retention_days,
    })
}

fn project_to_domain(row: project::Model, plan: Plan) -> Result<ProjectRecord, Error> {
    Ok(ProjectRecord {
        project_id: ProjectId::parse("project_id", &row.project_id)
            .map_err(|_| Error::Internal(format!("bad project id {:?}", row.project_id)))?,
        plan,
        controls: UsageControls {
            retention_job_days: row.retention_job_days,
            retention_workflow_days: row.retention_workflow_days,
            retention_project_days: row.retention_project_days,
            spend_cap_micros: row.spend_cap_micros,
            storage_cap_bytes: row.storage_cap_bytes,
            alert_thresholds: UsageControls::thresholds_from_db(&row.alert_thresholds),
        },
        created_at: Timestamp::from_micros(row.created_at),
    })
}
