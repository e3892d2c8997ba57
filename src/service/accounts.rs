//! Plans, project plan assignment and usage controls.

use std::sync::Arc;

use crate::domain::{Clock, Error, Plan, ProjectId, ScopeKind, UsageControls};
use crate::service::Metering;
use crate::store::{ProjectRecord, Store};

/// Which usage-control fields an update sets (the request's field mask).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlsMask {
    pub retention_job_days: bool,
    pub retention_workflow_days: bool,
    pub retention_project_days: bool,
    pub spend_cap_micros: bool,
    pub storage_cap_bytes: bool,
    pub alert_thresholds: bool,
}

impl ControlsMask {
    pub const ALL: Self = Self {
        retention_job_days: true,
        retention_workflow_days: true,
        retention_project_days: true,
        spend_cap_micros: true,
        storage_cap_bytes: true,
        alert_thresholds: true,
    };

    /// Parses field-mask paths; an empty mask means every field.
    pub fn parse(paths: &[String]) -> Result<Self, Error> {
        if paths.is_empty() {
            return Ok(Self::ALL);
        }
        let mut mask = Self::default();
        for path in paths {
            match path.as_str() {
                "retention_job_days" => mask.retention_job_days = true,
                "retention_workflow_days" => mask.retention_workflow_days = true,
                "retention_project_days" => mask.retention_project_days = true,
                "spend_cap_micros" => mask.spend_cap_micros = true,
                "storage_cap_bytes" => mask.storage_cap_bytes = true,
                "alert_thresholds" => mask.alert_thresholds = true,
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!("{other:?} is not a UsageControls field"),
                    ));
                }
            }
        }
        Ok(mask)
    }

    fn apply(self, current: &UsageControls, update: UsageControls) -> UsageControls {
        fn pick<T>(set: bool, new: T, old: T) -> T {
            if set { new } else { old }
        }
        UsageControls {
            retention_job_days: pick(
                self.retention_job_days,
                update.retention_job_days,
                current.retention_job_days,
            ),
            retention_workflow_days: pick(
                self.retention_workflow_days,
                update.retention_workflow_days,
                current.retention_workflow_days,
            ),
            retention_project_days: pick(
                self.retention_project_days,
                update.retention_project_days,
                current.retention_project_days,
            ),
            spend_cap_micros: pick(
                self.spend_cap_micros,
                update.spend_cap_micros,
                current.spend_cap_micros,
            ),
            storage_cap_bytes: pick(
                self.storage_cap_bytes,
                update.storage_cap_bytes,
                current.storage_cap_bytes,
            ),
            alert_thresholds: if self.alert_thresholds {
                update.alert_thresholds
            } else {
                current.alert_thresholds.clone()
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Accounts {
    store: Store,
    metering: Metering,
    clock: Arc<dyn Clock>,
}

impl Accounts {
    pub fn new(store: Store, metering: Metering, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            metering,
            clock,
        }
    }

    pub async fn create_plan(&self, plan: Plan) -> Result<Plan, Error> {
        plan.validate()?;
        self.store.create_plan(&plan, self.clock.now()).await?;
        Ok(plan)
    }

    pub async fn update_plan(&self, plan: Plan) -> Result<Plan, Error> {
        plan.validate()?;
        self.store.update_plan(&plan, self.clock.now()).await?;
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

    pub async fn assign_plan(
        &self,
        project: &ProjectId,
        plan_id: &str,
    ) -> Result<ProjectRecord, Error> {
        let record = self
            .store
            .assign_plan(project, plan_id, self.clock.now())
            .await?;
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

    pub async fn controls(&self, project: &ProjectId) -> Result<UsageControls, Error> {
        Ok(self.metering.project(project).await?.controls)
    }

    /// Sets the masked fields, checked against the project's plan. With
    /// `apply_to_existing`, live artifacts of each scope kind whose retention was set get
    /// their expiry recomputed.
    pub async fn update_controls(
        &self,
        project: &ProjectId,
        update: UsageControls,
        mask: ControlsMask,
        apply_to_existing: bool,
    ) -> Result<UsageControls, Error> {
        let record = self.metering.project(project).await?;
        let controls = mask.apply(&record.controls, update);
        controls.validate(&record.plan)?;
        let now = self.clock.now();
        self.store.update_controls(project, &controls, now).await?;
        self.metering.forget(project).await;
        if apply_to_existing {
            for (kind, set) in [
                (ScopeKind::Job, mask.retention_job_days),
                (ScopeKind::Workflow, mask.retention_workflow_days),
                (ScopeKind::Project, mask.retention_project_days),
            ] {
                if let (true, Some(days)) = (set, controls.retention_days(kind)) {
                    let changed = self
                        .store
                        .recompute_expirations(project, kind, days, now)
                        .await?;
                    tracing::info!(project = %project, scope = kind.as_str(), days, changed, "retention applied to existing artifacts");
                }
            }
            self.metering.forget(project).await;
        }
        Ok(controls)
    }
}
