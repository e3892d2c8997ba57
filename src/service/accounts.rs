//! Plans, project plan assignment and usage controls.

use std::sync::Arc;

use crate::domain::{
    Clock, ControlsMask, Error, Plan, ProjectId, ScopeKind, Timestamp, UsageControls,
};
use crate::service::Metering;
use crate::service::retention::Retention;
use crate::store::{ProjectRecord, Store};

#[derive(Debug, Clone)]
pub struct Accounts {
    store: Store,
    metering: Metering,
    retention: Retention,
    clock: Arc<dyn Clock>,
}

impl Accounts {
    pub fn new(store: Store, metering: Metering, clock: Arc<dyn Clock>) -> Self {
        Self {
            retention: Retention::new(store.clone(), metering.clone(), clock.clone()),
            store,
            metering,
            clock,
        }
    }

    /// Retention rules: the policy RPCs and the dry run.
    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    pub async fn create_plan(&self, plan: Plan) -> Result<Plan, Error> {
        plan.validate()?;
        self.store.create_plan(&plan, self.clock.now()).await
    }

    /// A new version of the plan, effective now. Months already billed keep the versions
    /// they were billed with; a lower maximum retention clamps the future expiry of every
    /// live artifact of the plan's projects (never into the past).
    pub async fn update_plan(&self, plan: Plan) -> Result<Plan, Error> {
        plan.validate()?;
        let now = self.clock.now();
        let current = self.get_plan(&plan.id).await?;
        if current.currency != plan.currency {
            return Err(Error::invalid(
                "plan.currency",
                format!(
                    "a plan's currency cannot change ({} to {}): bills would mix currencies; \
                     create a new plan instead",
                    current.currency, plan.currency
                ),
            ));
        }
        let plan = self.store.update_plan(&plan, now).await?;
        if plan.max_retention_days < current.max_retention_days {
            let changed = self
                .store
                .clamp_expirations(None, Some(&plan.id), plan.max_retention_days, now)
                .await?;
            tracing::info!(plan = %plan.id, changed, "retention clamped to the plan's new maximum");
        }
        self.metering.forget_all().await;
        tracing::info!(plan = %plan.id, version = plan.version, "plan updated");
        Ok(plan)
    }

    pub async fn get_plan(&self, id: &str) -> Result<Plan, Error> {
        self.store
            .get_plan(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no plan {id:?}")))
    }

    pub async fn list_plans(&self) -> Result<Vec<Plan>, Error> {
        self.store.list_plans().await
    }

    /// Puts the project on a plan from now on; what it used before stays billed under the
    /// plan it was on. Retention settings and live artifacts' expiry are clamped to the new
    /// plan's maximum (never into the past).
    pub async fn assign_plan(
        &self,
        project: &ProjectId,
        plan_id: &str,
    ) -> Result<ProjectRecord, Error> {
        let now = self.clock.now();
        if let Some(existing) = self.store.get_project(project).await?
            && let Some(plan) = self.store.get_plan(plan_id).await?
            && plan.currency != existing.plan.currency
        {
            return Err(Error::FailedPrecondition(format!(
                "project {project} is billed in {}; plan {plan_id:?} is in {}",
                existing.plan.currency, plan.currency
            )));
        }
        let record = self.store.assign_plan(project, plan_id, now).await?;
        // Limits changed: let the hot figures be rebuilt against the new plan.
        self.metering.forget(project).await;
        tracing::info!(project = %project, plan = plan_id, "plan assigned");
        Ok(record)
    }

    pub async fn get_project(&self, project: &ProjectId) -> Result<ProjectRecord, Error> {
        self.store
            .get_project(project)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no project {project}")))
    }

    /// The plan versions the project has been on, oldest first.
    pub async fn plan_history(
        &self,
        project: &ProjectId,
    ) -> Result<Vec<(Plan, Timestamp, Option<Timestamp>)>, Error> {
        self.store.plan_history(project).await
    }

    pub async fn controls(&self, project: &ProjectId) -> Result<UsageControls, Error> {
        Ok(self.get_project(project).await?.controls)
    }

    /// Sets the masked fields, and only those, checked against the project's plan, in one
    /// statement (concurrent updates of different fields both survive). With
    /// `apply_to_existing`, artifacts live now of each scope kind whose retention was set
    /// get their expiry recomputed (never into the past; ended and kept artifacts are
    /// untouched, and so are those a retention rule selects: the rule wins for them).
    pub async fn update_controls(
        &self,
        project: &ProjectId,
        update: UsageControls,
        mask: ControlsMask,
        apply_to_existing: bool,
    ) -> Result<UsageControls, Error> {
        if mask.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "names no field and the request sets none: nothing to update",
            ));
        }
        // A write: the project is created on the default plan if new, so caps can be set
        // before the first push. (Reads never create projects.)
        let record = self.metering.project_for_push(project).await?;
        update.validate_fields(&record.plan, mask)?;
        let now = self.clock.now();
        let controls = self
            .store
            .update_controls(project, &update, &mask, now)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no project {project}")))?;
        self.metering.forget(project).await;
        if apply_to_existing {
            for (kind, set) in [
                (ScopeKind::Job, mask.retention_job_days),
                (ScopeKind::Workflow, mask.retention_workflow_days),
                (ScopeKind::Project, mask.retention_project_days),
            ] {
                if set {
                    let days = controls.effective_retention_days(kind, &record.plan);
                    let changed = self
                        .retention
                        .apply_setting(project, kind, days, now)
                        .await?;
                    tracing::info!(project = %project, scope = kind.as_str(), days, changed, "retention applied to existing artifacts");
                }
            }
            self.metering.forget(project).await;
        }
        if mask.keep_latest_per_ref {
            // Pins follow the setting at once; a release never ends anything before now.
            let change = self.store.apply_keep_latest(project, now).await?;
            tracing::info!(project = %project, on = controls.keeps_latest_per_ref(), pinned = change.pinned, released = change.released, "keep_latest_per_ref applied");
            self.metering.forget(project).await;
        }
        Ok(controls)
    }
}
